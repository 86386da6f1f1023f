"""Statistics correction inside the mask-learning loop (``--correct bn|bias`` with a learned method).

After masking, the build's statistics correction (``passes/correct_statistics.py``)
gives each sparse layer's output channel one scale and one shift,
``o' = t * o + c``, measured on the calibration set. Masks learned without
it spend their freedom on what that correction repairs for free (a channel's
mean and spread) and are then corrected anyway. Learning them *under* the
correction aims them at what it cannot repair.

In the loop, the correction is measured on each batch, like BatchNorm in
training mode: with the layer's output ``o`` on the batch (mean ``mu``,
biased variance ``var`` per channel), ``o' = (o - mu) * t + target``,
differentiable, with the pass's own factor ``t``
(:func:`~sparsecompile.passes.correct_statistics.channel_scale`). Per mode

``bias``
    ``target`` and the variance ``t`` matches are the dense layer's
    per-channel mean and variance on the same batch (from the dense pass the
    loop runs anyway); channels with no variance keep their scale.
``bn``
    re-estimated BatchNorm for layers whose BN was folded: ``target`` is its
    beta and ``t`` rescales to its running variance, which is ``BN`` with
    statistics measured on the batch. BatchNorms the fold could not remove
    are re-estimated after learning only.

Layers the build's correction skips (no bias slot to take the shift: ``mm``
/ ``matmul``; under ``bn``, layers without a folded BN) pass unchanged. The
build then runs the usual correction on the whole calibration set, so the
batch estimate is used only while learning (and for the held-out metric,
per evaluation chunk).
"""

from __future__ import annotations

from typing import Sequence

import torch

from sparsecompile.passes.correct_statistics import CORRECTION_MODES, bias_slot, channel_axis, channel_scale
from sparsecompile.passes.fold_batchnorm import FoldedBatchNorm

IN_LOOP_MODES = ("none",) + CORRECTION_MODES
_NONE = (None, None, None)


def _other_dims(out: torch.Tensor, axis: int) -> tuple[list[int], list[int]]:
    """(the dims to reduce over, the broadcast shape of a per-channel vector) for channel axis ``axis``."""
    axis = axis % out.dim()
    shape = [1] * out.dim()
    shape[axis] = -1
    return [d for d in range(out.dim()) if d != axis], shape


def _centred_moments(out: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, biased variance, ``out - mean``) over ``dims``, keepdim. Two passes (the centred form, as stable
    as ``Tensor.var``), written out because ``Tensor.var`` over several non-contiguous dims runs 3-4x
    slower on CPU than a mean plus an elementwise square; the centred tensor is reused by the caller."""
    mean = out.mean(dims, keepdim=True)
    centred = out - mean
    return mean, (centred * centred).mean(dims, keepdim=True), centred


def channel_moments(out: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``out`` over everything but ``axis``."""
    dims, _ = _other_dims(out, axis)
    mean, var, _ = _centred_moments(out, dims)
    return mean.reshape(-1), var.reshape(-1)


def match_batch_statistics(out: torch.Tensor, target_mean: torch.Tensor | None,
                           reference_var: torch.Tensor | None, folded: FoldedBatchNorm | None,
                           axis: int) -> torch.Tensor:
    """``(out - mu) * channel_scale(var, reference_var, folded) + target_mean`` per channel of ``axis``, with
    ``mu``, ``var`` measured on ``out`` itself; ``target_mean=None``: ``out`` unchanged. See the module
    docstring."""
    if target_mean is None:
        return out
    dims, shape = _other_dims(out, axis)
    _, var, centred = _centred_moments(out, dims)
    scale = channel_scale(var.reshape(-1), reference_var, folded)
    return centred * scale.reshape(shape) + target_mean.reshape(shape)


class InLoopCorrection:
    """The per-layer plan of one mode: which layers are corrected, on which axis, towards what.

    ``targets(dense_features)`` gives the probe's extra inputs (three per layer, see
    :func:`sparsecompile.learned.train.layer_output_probe`); ``identity()`` the inputs that leave every
    layer unchanged (the dense pass).
    """

    def __init__(self, gm: torch.fx.GraphModule, layers: Sequence, mode: str, folded_batchnorm: dict | None,
                 device: torch.device | None = None):
        if mode not in CORRECTION_MODES:
            raise ValueError(f"unknown correction mode '{mode}'")
        nodes = {node.name: node for node in gm.graph.nodes}
        folded = folded_batchnorm or {}
        self.mode = mode
        self.axes: list[int] = []
        self.corrects: list[bool] = []
        self.batchnorms: list[FoldedBatchNorm | None] = []  # bn: the folded BN in float32 on ``device``
        self.skipped: dict[str, str] = {}
        for layer in layers:
            node = nodes[layer.node_name]
            self.axes.append(channel_axis(node, layer))
            bn = folded.get(layer.weight_target) if mode == "bn" else None
            if bias_slot(node) is None:
                self.skipped[layer.name] = "no bias slot to take the shift"
            elif mode == "bn" and bn is None:
                self.skipped[layer.name] = "no folded BatchNorm"
            self.corrects.append(layer.name not in self.skipped)
            self.batchnorms.append(None if bn is None else FoldedBatchNorm(
                *(t.to(device=device, dtype=torch.float32) for t in (bn.scale, bn.running_var)), bn.eps,
                bn.beta.to(device=device, dtype=torch.float32), bn.output_axis))

    @property
    def corrected(self) -> int:
        return sum(self.corrects)

    def identity(self) -> tuple:
        return _NONE * len(self.axes)

    def targets(self, dense_features: Sequence[torch.Tensor]) -> tuple:
        flat: list = []
        for feature, axis, corrects, bn in zip(dense_features, self.axes, self.corrects, self.batchnorms):
            if not corrects:
                flat.extend(_NONE)
            elif bn is not None:
                flat.extend((bn.beta, None, bn))
            else:
                mean, var = channel_moments(feature.detach(), axis)
                flat.extend((mean, var, None))
        return tuple(flat)


__all__ = ["IN_LOOP_MODES", "InLoopCorrection", "channel_moments", "match_batch_statistics"]
