"""Shape propagation: annotate every node with the shape and dtype of its value.

Runs the graph once on the example inputs (``torch.fx``'s ShapeProp) and
stores ``node.meta['tensor_meta']``. Later passes (im2col lowering, layer
selection, reports) read static shapes from there. The graph is not changed.
"""

from __future__ import annotations

import torch
import torch.fx
from torch.fx.passes.shape_prop import ShapeProp

from sparsecompile.passes.manager import PassContext, PassResult


class ShapePropagation:
    name = "shape_prop"

    def __call__(self, gm: torch.fx.GraphModule, context: PassContext) -> PassResult:
        with torch.no_grad():
            ShapeProp(gm).propagate(*context.example_inputs)
        annotated = sum(1 for n in gm.graph.nodes if "tensor_meta" in n.meta)
        return PassResult(gm, False, {"annotated_nodes": annotated})
