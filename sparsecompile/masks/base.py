"""The mask-method interface.

A mask method looks at one layer's weight (and, for calibration-aware
methods, what the context provides) and returns a boolean keep-mask of the
weight's shape that is N:M along ``layer.reduction_axis``: in every group of
M consecutive entries along that axis (at fixed positions of every other
axis), exactly N are kept. Methods never change the weights; applying the
mask is the ``apply_masks`` pass's job.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from sparsecompile.compress import from_gemm_view, gemm_view


@dataclass
class MaskContext:
    """What a method may use besides the weight.

    ``statistics`` is an :class:`~sparsecompile.masks.statistics.InputStatistics`
    of the layer's input columns over the calibration set, present when the
    method's ``needs`` asks for it.
    """

    statistics: Any = None
    options: dict[str, Any] = field(default_factory=dict)


class MaskMethod(ABC):
    name: str = ""
    description: str = ""
    needs: frozenset[str] = frozenset()  # "norms" and/or "hessian": calibration statistics it uses
    can_update_weights: bool = False  # whether select_and_update may change surviving weights
    learned: bool = False  # True: the build learns the masks first (masks/learned.py, sparsecompile/learned/)

    def __init__(self, n: int = 2, m: int = 4):
        self.n, self.m = n, m

    @abstractmethod
    def scores(self, weight: torch.Tensor, layer, context: MaskContext) -> torch.Tensor:
        """Importance of every weight entry (same shape); the top N per group are kept."""

    def permutation_importance(self, weight: torch.Tensor, layer) -> torch.Tensor:
        """What the channel-permutation search keeps most of: the method's own score when it needs no
        calibration statistics, else ``|w|`` (permutation runs before statistics are collected)."""
        if self.needs:
            return weight.detach().abs()
        return self.scores(weight, layer, MaskContext())

    @property
    def permutation_importance_name(self) -> str:
        """How reports name :meth:`permutation_importance`."""
        return "|w|" if self.needs or self.name == "magnitude" else f"{self.name} score"

    def select(self, weight: torch.Tensor, layer, context: MaskContext | None = None) -> torch.Tensor:
        scores = self.scores(weight, layer, context or MaskContext())
        return topn_mask(scores, layer.reduction_axis, self.n, self.m)

    def select_and_update(self, weight: torch.Tensor, layer, context: MaskContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask plus compensated weights; methods that cannot update return the weight unchanged."""
        return self.select(weight, layer, context), weight


def topn_mask(scores: torch.Tensor, reduction_axis: int, n: int, m: int) -> torch.Tensor:
    """Keep the N highest scores in each group of M along ``reduction_axis``.

    Ties go to the lower index (stable sort), so masks are deterministic.
    """
    matrix = gemm_view(scores.detach(), reduction_axis)
    rows, k = matrix.shape
    groups = matrix.reshape(rows, k // m, m).to(torch.float64)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
    return from_gemm_view(keep.reshape(rows, k), tuple(scores.shape), reduction_axis)
