"""Apply keep-masks to layer weights (the one pass that changes the function).

For each masked layer the weight tensor becomes ``where(mask, W, +0.0)``:
kept entries are the original values bit for bit, dropped entries are
positive zero. The graph structure is unchanged; only weight tensors change.
"""

from __future__ import annotations

import torch
import torch.fx

from sparsecompile.graph import get_tensor, set_tensor
from sparsecompile.passes.manager import PassContext, PassResult


def masked(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Kept entries bit for bit, dropped entries +0.0."""
    return torch.where(mask, weight.detach(), torch.zeros((), dtype=weight.dtype))


class ApplyMasks:
    name = "apply_masks"

    def __init__(self, masks: dict[str, torch.Tensor]):
        self.masks = masks  # weight target -> bool mask of the weight's shape

    def __call__(self, gm: torch.fx.GraphModule, context: PassContext) -> PassResult:
        zeroed = 0
        for target, mask in self.masks.items():
            weight = get_tensor(gm, target)
            if mask.shape != weight.shape or mask.dtype != torch.bool:
                raise ValueError(f"mask for '{target}' has shape {tuple(mask.shape)}/{mask.dtype}, "
                                 f"weight has {tuple(weight.shape)}")
            set_tensor(gm, target, masked(weight, mask))
            zeroed += int((~mask).sum())
        return PassResult(gm, bool(self.masks), {"layers": len(self.masks), "zeroed_weights": zeroed})
