"""Fold inference-mode BatchNorm into the preceding convolution or linear layer.

For a BN with running mean ``mu``, running variance ``var``, affine ``gamma``
and ``beta`` and epsilon ``eps``, per output channel ``c``::

    s[c]    = gamma[c] / sqrt(var[c] + eps)
    W'[c]   = W[c] * s[c]                (c = output-channel axis of W)
    b'[c]   = (b[c] - mu[c]) * s[c] + beta[c]     (b = 0 if the layer has none)

so ``BN(layer(x; W, b)) == layer(x; W', b')`` up to float rounding (the fold
is computed in float64 and rounded once).

Recognised BN forms (what ``torch.export`` emits, before and after
decomposition): ``aten.batch_norm`` (training=False),
``aten._native_batch_norm_legit_no_training``, ``aten.native_batch_norm`` and
``aten._native_batch_norm_legit`` with training=False (their ``getitem(0)``).
Producers: ``conv1d/2d/3d`` and non-transposed ``convolution`` (output
channel axis 0 of the weight), ``linear`` and ``addmm`` on 2-D activations.

Not folded, with the reason recorded (the negative cases): the producer's
output is used by anything besides the BN; the BN is in training mode; the
producer's weight is not a constant or is shared with other layers; a
transposed convolution; BN statistics that are not constants; a BN whose
input does not come from a foldable layer.

Outputs (``PassResult.outputs``): ``{weight target: FoldedBatchNorm}``, what
each fold removed, so statistics correction can re-estimate the BN later.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from sparsecompile.graph import (
    CONV_OPS, arg, conv_params, get_tensor, attr_uses, is_getitem, layer_name_for,
    add_bias, node_shape, set_tensor,
)
from sparsecompile.passes.manager import PassContext, PassResult

aten = torch.ops.aten

# op -> (index of the `training` argument or None, returns a tuple?)
BN_OPS = {
    aten.batch_norm.default: (5, False),
    aten._native_batch_norm_legit_no_training.default: (None, True),
    aten.native_batch_norm.default: (5, True),
    aten._native_batch_norm_legit.default: (5, True),
}


def _eps(node: torch.fx.Node) -> float:
    if node.target == aten._native_batch_norm_legit_no_training.default:
        return float(arg(node, 6, "eps", 1e-5))
    return float(arg(node, 7, "eps", 1e-5))


def _const(gm, value) -> torch.Tensor | None | str:
    """Tensor behind a get_attr node, None for an absent argument, 'dynamic' otherwise."""
    if value is None:
        return None
    if isinstance(value, torch.fx.Node) and value.op == "get_attr":
        return get_tensor(gm, value.target)
    return "dynamic"


@dataclass
class FoldedBatchNorm:
    """What a fold removed, kept so statistics correction can re-estimate the BN later."""

    scale: torch.Tensor  # gamma / sqrt(running_var + eps), float64
    running_var: torch.Tensor  # float64
    eps: float
    beta: torch.Tensor  # float64
    output_axis: int  # output-channel axis of the stored weight

    def reindexed(self, index: torch.Tensor) -> FoldedBatchNorm:
        """The same BN after the layer's output channels were reordered (new channel i = old index[i])."""
        return FoldedBatchNorm(self.scale[index], self.running_var[index], self.eps, self.beta[index],
                               self.output_axis)


class FoldBatchNorm:
    name = "fold_batchnorm"

    def __call__(self, gm: torch.fx.GraphModule, context: PassContext) -> PassResult:
        folded: list[str] = []
        skipped: dict[str, str] = {}
        params: dict[str, FoldedBatchNorm] = {}  # weight target -> folded BN
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in BN_OPS:
                continue
            reason = self._try_fold(gm, node, folded, params)
            if reason:
                skipped[node.name] = reason
        if folded:
            gm.graph.eliminate_dead_code()
        return PassResult(gm, bool(folded), {"folded": folded, "skipped": skipped}, outputs=params)

    def _try_fold(self, gm, bn: torch.fx.Node, folded: list[str], params: dict[str, FoldedBatchNorm]) -> str | None:
        training_index, returns_tuple = BN_OPS[bn.target]
        if training_index is not None and arg(bn, training_index, "training", False):
            return "batch norm in training mode (export the model after model.eval())"
        if returns_tuple and not all(is_getitem(u, 0) for u in bn.users):
            return "batch norm's saved statistics are used"
        producer = bn.args[0]
        if not isinstance(producer, torch.fx.Node) or producer.op != "call_function":
            return "input is not produced by a conv or linear layer"
        if len(producer.users) != 1:
            return f"output of '{producer.name}' is used {len(producer.users)} times"

        gamma, beta = _const(gm, arg(bn, 1, "weight")), _const(gm, arg(bn, 2, "bias"))
        mean, var = _const(gm, arg(bn, 3, "running_mean")), _const(gm, arg(bn, 4, "running_var"))
        if any(isinstance(t, str) for t in (gamma, beta, mean, var)) or mean is None or var is None:
            return "batch norm parameters or statistics are not constants"

        located = self._locate_weight(gm, producer)
        if isinstance(located, str):
            return located
        weight_node, out_axis, bias_slot = located
        weight = get_tensor(gm, weight_node.target)
        if attr_uses(gm, weight_node.target) != 1 or len(weight_node.users) != 1:
            return f"weight '{weight_node.target}' is shared with other layers"
        bias_value = arg(producer, *bias_slot)
        bias = _const(gm, bias_value)
        if isinstance(bias, str):
            return "layer bias is not a constant"
        if bias is not None and attr_uses(gm, bias_value.target) != 1:
            return f"bias '{bias_value.target}' is shared with other layers"

        channels = weight.shape[out_axis]
        if mean.numel() != channels:
            return f"batch norm has {mean.numel()} channels but the layer has {channels} outputs"

        f64 = torch.float64
        scale = (gamma.to(f64) if gamma is not None else torch.ones(channels, dtype=f64)) / torch.sqrt(
            var.to(f64) + _eps(bn)
        )
        shift = beta.to(f64) if beta is not None else torch.zeros(channels, dtype=f64)
        old_bias = bias.to(f64) if bias is not None else torch.zeros(channels, dtype=f64)
        shape = [1] * weight.dim()
        shape[out_axis] = channels
        new_weight = (weight.to(f64) * scale.reshape(shape)).to(weight.dtype)
        new_bias = ((old_bias - mean.to(f64)) * scale + shift).to(weight.dtype)

        set_tensor(gm, weight_node.target, new_weight)
        if bias is not None:
            set_tensor(gm, bias_value.target, new_bias)
        else:
            add_bias(gm, producer, bias_slot, weight_node.target, new_bias)

        for user in list(bn.users) if returns_tuple else [bn]:
            user.replace_all_uses_with(producer)
            if user is not bn:
                gm.graph.erase_node(user)
        gm.graph.erase_node(bn)
        params[weight_node.target] = FoldedBatchNorm(
            scale=scale, running_var=var.to(f64), eps=_eps(bn), beta=shift, output_axis=out_axis,
        )
        folded.append(layer_name_for(weight_node.target))
        return None

    @staticmethod
    def _locate_weight(gm, producer: torch.fx.Node):
        """(weight get_attr node, output-channel axis, (bias arg index, name)) or a reason."""
        if producer.target in CONV_OPS:
            params = conv_params(producer)
            if params["transposed"]:
                return "transposed convolution"
            weight = params["weight"]
            if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
                return "convolution weight is not a constant"
            return weight, 0, (2, "bias")
        if producer.target == aten.linear.default:
            shape = node_shape(producer)
            if shape is not None and len(shape) != 2:
                return "linear output is not 2-D (batch norm would normalise another axis)"
            weight = producer.args[1]
            if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
                return "linear weight is not a constant"
            return weight, 0, (2, "bias")
        if producer.target == aten.addmm.default:
            operand = producer.args[2]
            if isinstance(operand, torch.fx.Node) and operand.op == "get_attr":
                return operand, 1, (0, "self")  # stored [in, out]: outputs are columns
            if (
                isinstance(operand, torch.fx.Node)
                and operand.target in (aten.permute.default, aten.t.default)
                and len(operand.users) == 1
                and isinstance(operand.args[0], torch.fx.Node)
                and operand.args[0].op == "get_attr"
                and (operand.target == aten.t.default or list(operand.args[1]) == [1, 0])
            ):
                return operand.args[0], 0, (0, "self")
            return "addmm weight is not a (transposed) constant"
        return f"input comes from '{producer.target}', not a conv or linear layer"
