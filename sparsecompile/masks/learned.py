"""``--method gumbel`` and ``--method proxsparse``: masks learned end to end with the weights frozen.

The learning itself lives in :mod:`sparsecompile.learned`: Gumbel-softmax pattern logits, and
ProxSparse's proximal 2:4 regulariser with the EnumALM solver. Both use the shared, label-free,
resumable training loop. The build runs it over all eligible layers at once, before masks are applied
(:func:`sparsecompile.build._learn_masks`). These classes are the one registration of a learned
method (``MASK_METHODS``): each names its learning function and options dataclass
(:meth:`LearnedMask.learner`, imported only when used), and hands each layer its learned mask to the
ordinary pipeline (apply, optional correction, verify, compress).
"""

from __future__ import annotations

import torch

from sparsecompile.errors import SparseCompileError
from sparsecompile.masks.base import MaskContext, MaskMethod


class LearnedMask(MaskMethod):
    learned = True

    @classmethod
    def learner(cls):
        """``(learn function, options dataclass)`` of this method, from :mod:`sparsecompile.learned`."""
        raise NotImplementedError

    def __init__(self, n: int = 2, m: int = 4):
        super().__init__(n, m)
        self.masks: dict[str, torch.Tensor] | None = None  # set by the build after learning

    def scores(self, weight: torch.Tensor, layer, context: MaskContext) -> torch.Tensor:
        if self.masks is None or layer.weight_target not in self.masks:
            raise SparseCompileError(f"internal error: no learned mask for '{layer.weight_target}'")
        return self.masks[layer.weight_target].to(torch.float32)

    def permutation_importance(self, weight: torch.Tensor, layer) -> torch.Tensor:
        return weight.detach().abs()  # channels are permuted before learning, by magnitude

    @property
    def permutation_importance_name(self) -> str:
        return "|w|"


class GumbelMask(LearnedMask):
    name = "gumbel"
    description = "learned: Gumbel-softmax over the 2:4 patterns of each group, weights frozen"

    @classmethod
    def learner(cls):
        from sparsecompile.learned.gumbel import GumbelOptions, learn_gumbel_masks

        return learn_gumbel_masks, GumbelOptions


class ProxSparseMask(LearnedMask):
    name = "proxsparse"
    description = "learned: proximal 2:4 regulariser (EnumALM), final mask on the original weights"

    @classmethod
    def learner(cls):
        from sparsecompile.learned.proxsparse import ProxSparseOptions, learn_proxsparse_masks

        return learn_proxsparse_masks, ProxSparseOptions
