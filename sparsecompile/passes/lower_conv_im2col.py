"""Lower eligible 2-D convolutions to im2col + GEMM, reduction axis ordered (kh, kw, cin).

A convolution with weight ``W[Cout, Cin, kh, kw]`` on input ``x[N, Cin, H, W]``
equals::

    cols = im2col(x)                          # [N, Cin*kh*kw, L], rows ordered (cin, kh, kw)
    cols = cols.view(N, Cin, kh*kw, L).permute(0, 2, 1, 3).reshape(N, kh*kw*Cin, L)
                                              # rows now ordered (kh, kw, cin)
    W2   = W.permute(0, 2, 3, 1).reshape(Cout, kh*kw*Cin)
    y    = (W2 @ cols + b[:, None]).view(N, Cout, Ho, Wo)

Ordering the reduction axis (kh, kw, cin) -- cin fastest -- means that a group
of 4 consecutive GEMM columns is 4 consecutive *input channels at one kernel
position* whenever ``Cin % 4 == 0``: exactly the grouping TensorRT's sparse
convolution kernels check, so one 2:4 mask serves the native sparse conv and
the sparse GEMM. The weight keeps its attribute name; only its layout changes
to the 2-D ``W2``.

Lowered: ``conv2d``/``convolution`` (2-D, not transposed, groups == 1, numeric
padding, a constant weight used only here, ``Cin`` a multiple of the target
alignment). Everything else is left as is, with the reason recorded.
"""

from __future__ import annotations

import torch
import torch.fx

from sparsecompile.graph import CONV_OPS, attr_uses, conv_params, get_tensor, node_shape, set_tensor
from sparsecompile.passes.manager import PassContext, PassResult

aten = torch.ops.aten


class LowerConvIm2col:
    name = "lower_conv_im2col"

    def __init__(self, alignment: int = 4):
        self.alignment = alignment

    def __call__(self, gm: torch.fx.GraphModule, context: PassContext) -> PassResult:
        lowered: list[str] = []
        skipped: dict[str, str] = {}
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in CONV_OPS:
                continue
            reason = self._lower(gm, node)
            if reason:
                skipped[node.name] = reason
            else:
                lowered.append(node.name)
        if lowered:
            gm.graph.eliminate_dead_code()
        return PassResult(gm, bool(lowered), {"lowered": lowered, "skipped": skipped})

    def _lower(self, gm, node: torch.fx.Node) -> str | None:
        p = conv_params(node)
        weight_node = p["weight"]
        if p["transposed"]:
            return "transposed convolution"
        if not (isinstance(weight_node, torch.fx.Node) and weight_node.op == "get_attr"):
            return "weight is not a constant"
        weight = get_tensor(gm, weight_node.target)
        if weight.dim() != 4:
            return f"{weight.dim() - 2}-D convolution (only 2-D convolutions are lowered)"
        if p["groups"] != 1:
            return f"grouped convolution (groups={p['groups']})"
        cout, cin, kh, kw = weight.shape
        if cin % self.alignment:
            return f"Cin={cin} is not a multiple of {self.alignment}"
        if attr_uses(gm, weight_node.target) != 1:
            return f"weight '{weight_node.target}' is shared with other layers"
        out_shape = node_shape(node)
        if out_shape is None or len(out_shape) != 4 or any(d < 0 for d in out_shape[2:]):
            return "output spatial size unknown (run shape propagation first)"
        out_h, out_w = out_shape[2], out_shape[3]
        reduction = kh * kw * cin

        graph = gm.graph
        with graph.inserting_before(node):
            x = p["input"]
            cols = graph.call_function(aten.im2col.default, (x, [kh, kw], p["dilation"], p["padding"], p["stride"]))
            cols = graph.call_function(aten.view.default, (cols, [-1, cin, kh * kw, out_h * out_w]))
            cols = graph.call_function(aten.permute.default, (cols, [0, 2, 1, 3]))
            cols = graph.call_function(aten.reshape.default, (cols, [-1, reduction, out_h * out_w]))
            out = graph.call_function(aten.matmul.default, (weight_node, cols))
            if p["bias"] is not None:
                bias = graph.call_function(aten.unsqueeze.default, (p["bias"], -1))
                out = graph.call_function(aten.add.Tensor, (out, bias))
            out = graph.call_function(aten.view.default, (out, [-1, cout, out_h, out_w]))
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        set_tensor(gm, weight_node.target, weight.permute(0, 2, 3, 1).reshape(cout, reduction).contiguous())
        return None
