"""Statistics correction: repair per-channel output statistics after masking.

Masking a layer shifts the mean and variance of its output channels, and the
error compounds downstream. :class:`StatisticsCorrector` rescales and shifts
each output channel of a layer, ``o' = t * o + c``, by folding ``t`` into the
weight's output rows and ``t * b + c`` into the bias. It is not a pass of its
own: :func:`sparsecompile.sparsify.sparsify` runs it as the ``after`` hook of
the masking traversal (one :class:`~sparsecompile.sequential.LockstepRunner`
pass), so layers are processed in graph order on the calibration set, each
seeing the already-masked and corrected layers upstream (what re-running
BatchNorm statistics does). The build's accuracy guard refits it around
masks already chosen through ``sparsify`` with ``FixedMasks``.

Modes (``--correct``):

``bn``
    BatchNorm re-estimation for layers whose BN was folded. With the fold's
    ``s = gamma / sqrt(var + eps)`` and the sparse layer's output ``o``
    (mean ``mu_o``, variance ``var_o`` over calibration samples and positions),
    the pre-BN variance is ``var_m = var_o / s^2`` and the re-estimated BN is
    ``o' = sqrt(var + eps) / sqrt(var_m + eps) * (o - mu_o) + beta``: exactly
    ``BN(z)`` with running statistics re-measured on the calibration data,
    then folded again. BatchNorms the fold could not remove (after an
    activation, say) get their running mean and (biased) variance replaced by
    the calibration statistics of their input, in place.
``bias``
    Match the dense model's statistics: ``t = std_dense / std_sparse``,
    ``c = mean_dense - t * mean_sparse`` per output channel, for every sparse
    layer (with or without BN). The dense statistics come from the dense model
    run on the same calibration inputs.

Correction changes the surviving weights by one positive factor per output
row; the 2:4 pattern is unchanged. Layers with no bias slot (``mm`` /
``matmul``) cannot take the shift and are skipped with that reason.
"""

from __future__ import annotations

import torch
import torch.fx

from sparsecompile.errors import SparseCompileError
from sparsecompile.graph import CONV_OPS, add_bias, arg, get_tensor, set_tensor
from sparsecompile.passes.fold_batchnorm import BN_OPS, FoldedBatchNorm
from sparsecompile.masks.statistics import activation_input

aten = torch.ops.aten

CORRECTION_MODES = ("bn", "bias")  # plus "none": no correction at all
_EPS = 1e-12


def bias_slot(node: torch.fx.Node) -> tuple[int, str] | None:
    """(argument index, keyword) of the layer's bias, or None when the op has none (``mm``, ``matmul``)."""
    if node.target in CONV_OPS or node.target == aten.linear.default:
        return 2, "bias"
    if node.target == aten.addmm.default:
        return 0, "self"
    return None


def channel_axis(node: torch.fx.Node, layer) -> int:
    """The axis of ``node``'s output that holds the layer's output channels."""
    if node.target in CONV_OPS:
        return 1
    _, kind = activation_input(node, layer.weight_target)
    return -2 if kind == "left" else -1


def channel_scale(var: torch.Tensor, reference_var: torch.Tensor | None = None,
                  folded: FoldedBatchNorm | None = None) -> torch.Tensor:
    """The per-channel factor ``t`` of the correction ``o' = t * (o - mean) + target`` from the sparse
    output's variance ``var``: with ``folded``, BatchNorm re-estimation (``bn``; the target is its beta);
    otherwise the dense output's variance ``reference_var`` is matched (``bias``; the target is the dense
    mean), and channels with no variance keep their scale. Also used, differentiably and per batch,
    while masks are learned (``learned/correction.py``)."""
    if folded is not None:
        pre_bn_var = var / folded.scale.pow(2).clamp_min(_EPS)
        return torch.sqrt(folded.running_var + folded.eps) / torch.sqrt(pre_bn_var + folded.eps)
    return torch.where(var > _EPS, torch.sqrt(reference_var / var.clamp_min(_EPS)), torch.ones_like(var))


def _channel_moments(values: list[torch.Tensor], axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance over all other axes of all ``values``, in float64.

    Each value (a calibration chunk) gets ``torch.var_mean`` in its own dtype: one pass, Welford's
    update, no float64 copy of the activation (a layer1-sized activation took 10x longer through
    float64). The chunks' (count, mean, M2) are then merged in float64 (Chan et al.'s pairwise
    update), so nothing cancels as ``E[x^2] - E[x]^2`` would for a channel whose mean is large against
    its spread. The same inputs give the same bytes (checked for 1, 2 and 4 threads).
    """
    count, mean, m2 = 0, None, None
    for value in values:
        v = value.detach()
        if not v.is_floating_point():
            v = v.float()
        dims = [d for d in range(v.dim()) if d != axis % v.dim()]
        var_k, mean_k = torch.var_mean(v, dim=dims, correction=0)
        k = v.numel() // max(v.shape[axis], 1)
        mean_k, m2_k = mean_k.double(), var_k.double() * k
        if mean is None:
            count, mean, m2 = k, mean_k, m2_k
            continue
        total = count + k
        delta = mean_k - mean
        mean = mean + delta * (k / total)
        m2 = m2 + m2_k + delta * delta * (count * k / total)
        count = total
    return mean, (m2 / count).clamp_min(0.0)


def _relative_error(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> float:
    """``||candidate - reference|| / ||reference||`` over all chunks, from float32 norms (a reported number:
    float64 copies of every activation cost ~10x for the same leading digits)."""
    num = den = 0.0
    for r, c in zip(reference, candidate):
        r32 = r.detach().float()
        num += float(torch.linalg.vector_norm(c.detach().float() - r32)) ** 2
        den += float(torch.linalg.vector_norm(r32)) ** 2
    return (num / den) ** 0.5 if den > 0 else 0.0


def _refuse_non_finite(where: str, **values: torch.Tensor) -> None:
    """Never write a NaN/Inf scale, shift, weight or bias: one line naming the layer and the channels."""
    for name, value in values.items():
        bad = ~torch.isfinite(value)
        if bool(bad.any()):
            channels = bad.reshape(bad.shape[0], -1).any(1).nonzero().flatten().tolist() if bad.dim() else [0]
            shown = ", ".join(map(str, channels[:8])) + (" ..." if len(channels) > 8 else "")
            raise SparseCompileError(
                f"statistics correction of {where} would write a non-finite {name} (channel(s) {shown}): the "
                "calibration activations hold NaN/Inf or overflow; check the calibration data, or pass --correct none"
            )


class StatisticsCorrector:
    """The per-layer correction, usable as an ``after`` hook of a LockstepRunner."""

    def __init__(self, gm, mode: str, layers: list, folded_batchnorm: dict, sparse_targets: set[str]):
        if mode not in CORRECTION_MODES:
            raise ValueError(f"unknown correction mode '{mode}'")
        self.gm, self.mode = gm, mode
        self.folded = folded_batchnorm
        self.by_node = {}
        self.records: dict[str, dict] = {}
        for layer in layers:
            if layer.weight_target is None:
                continue
            if mode == "bn" and layer.weight_target in folded_batchnorm:
                self.by_node[layer.node_name] = layer
            elif mode == "bias" and layer.weight_target in sparse_targets:
                self.by_node[layer.node_name] = layer

        # BatchNorm nodes the fold could not remove (e.g. conv -> ReLU -> BN): re-estimated in place.
        self.batchnorms = {
            node.name: node for node in gm.graph.nodes
            if mode == "bn" and node.op == "call_function" and node.target in BN_OPS
            and all(isinstance(arg(node, i, name), torch.fx.Node) and arg(node, i, name).op == "get_attr"
                    for i, name in ((3, "running_mean"), (4, "running_var")))
        }
        self.batchnorm_records: dict[str, dict] = {}

    @property
    def node_names(self) -> set[str]:
        return set(self.by_node) | set(self.batchnorms)

    def before(self, node, reference_env, working_env) -> None:
        """Re-estimate an unfolded BatchNorm's running statistics from its (working) input."""
        bn = self.batchnorms.get(node.name)
        if bn is None:
            return
        values = working_env[bn.args[0]]
        mean, var = _channel_moments(values, 1)
        _refuse_non_finite(f"BatchNorm '{bn.name}'", mean=mean, variance=var)
        targets = (arg(bn, 3, "running_mean").target, arg(bn, 4, "running_var").target)
        old_mean, old_var = (get_tensor(self.gm, t) for t in targets)
        set_tensor(self.gm, targets[0], mean.to(old_mean.dtype))
        set_tensor(self.gm, targets[1], var.to(old_var.dtype))
        self.batchnorm_records[bn.name] = {
            "mode": "bn", "running_mean": targets[0],
            "mean_shift": float((mean - old_mean.double()).abs().max()),
            "var_ratio_max": float((var / old_var.double().clamp_min(_EPS)).max()),
        }

    def prepare(self, reference_state: dict[str, torch.Tensor]) -> None:
        """Give every layer to correct a bias (zero: the function is unchanged) before running."""
        for node in self.gm.graph.nodes:
            layer = self.by_node.get(node.name)
            slot = bias_slot(node) if layer is not None else None
            if slot is None or arg(node, *slot) is not None:
                continue
            weight = get_tensor(self.gm, layer.weight_target)
            out_axis = 0 if weight.dim() != 2 or layer.reduction_axis == 1 else 1
            zeros = torch.zeros(weight.shape[out_axis], dtype=weight.dtype)
            target = add_bias(self.gm, node, slot, layer.weight_target, zeros)
            reference_state[target] = zeros.clone()
        self.gm.graph.lint()
        self.gm.recompile()

    def after(self, node, reference: list[torch.Tensor], working: list[torch.Tensor]):
        layer = self.by_node.get(node.name)
        if layer is None:  # watched for another reason (mask selection)
            return None
        slot = bias_slot(node)
        before = _relative_error(reference, working)
        if slot is None:
            self.records[layer.name] = {"mode": self.mode, "skipped": "no bias slot to take the shift",
                                        "error_before": before, "error_after": before}
            return None
        axis = channel_axis(node, layer)
        mean, var = _channel_moments(working, axis)
        if self.mode == "bn":
            folded = self.folded[layer.weight_target]
            scale = channel_scale(var, folded=folded)
            shift = folded.beta - scale * mean
        else:
            ref_mean, ref_var = _channel_moments(reference, axis)
            scale = channel_scale(var, reference_var=ref_var)
            shift = ref_mean - scale * mean
        _refuse_non_finite(f"layer '{layer.name}'", scale=scale, shift=shift)
        self._fold_into_layer(node, layer, slot, scale, shift)
        shape = [1] * working[0].dim()
        shape[axis] = -1
        # o' = t * o + c in float32 (float64 for float64 models): what the folded layer computes.
        compute = torch.promote_types(working[0].dtype, torch.float32)
        scale_c, shift_c = scale.reshape(shape).to(compute), shift.reshape(shape).to(compute)
        corrected = [torch.addcmul(shift_c, w.to(compute), scale_c).to(w.dtype) for w in working]
        self.records[layer.name] = {
            "mode": self.mode, "error_before": before, "error_after": _relative_error(reference, corrected),
            "scale_min": float(scale.min()), "scale_max": float(scale.max()),
        }
        return corrected

    def _fold_into_layer(self, node, layer, slot, scale, shift) -> None:
        weight = get_tensor(self.gm, layer.weight_target)
        out_axis = 0 if weight.dim() != 2 or layer.reduction_axis == 1 else 1
        shape = [1] * weight.dim()
        shape[out_axis] = -1
        new_weight = (weight.double() * scale.reshape(shape)).to(weight.dtype)
        bias_target = arg(node, *slot).target  # prepare() made sure there is one
        bias = get_tensor(self.gm, bias_target)
        new_bias = (bias.double() * scale + shift).to(bias.dtype)
        # Also catches overflow of the layer's dtype (a finite float64 scale times a large weight in fp16).
        _refuse_non_finite(f"layer '{layer.name}'", weight=new_weight, bias=new_bias)
        set_tensor(self.gm, layer.weight_target, new_weight)
        set_tensor(self.gm, bias_target, new_bias)

