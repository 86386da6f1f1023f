"""Activation-aware masks (Wanda-style): score ``|W[row, j]| * ||x_j||``.

``x_j`` is input column ``j`` of the layer's GEMM over the calibration set:
for convolutions the unfolded input patch entry, with the convolution's real
stride, padding and dilation (zero-padded border positions count as zeros,
as the convolution sees them). A weight on a channel that carries large
activations matters more than an equally large weight on a quiet channel.
Groups run along the reduction axis as for every method, so the result is in
TensorRT's layout. Weights are not changed.
"""

from __future__ import annotations

import torch

from sparsecompile.masks.base import MaskContext, MaskMethod
from sparsecompile.masks.statistics import from_gemm_matrix, gemm_matrix


class ActivationMask(MaskMethod):
    name = "activation"
    description = "|w| times the input column's norm over calibration data (Wanda)"
    needs = frozenset({"norms"})

    def scores(self, weight: torch.Tensor, layer, context: MaskContext) -> torch.Tensor:
        if context.statistics is None:
            raise ValueError("the activation method needs calibration statistics")
        matrix = gemm_matrix(weight.detach().abs().double(), layer.reduction_axis)
        scored = matrix * context.statistics.column_norms.to(matrix.dtype)[None, :]
        return from_gemm_matrix(scored, tuple(weight.shape), layer.reduction_axis)
