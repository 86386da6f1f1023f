"""Graph passes, one module each, run by :class:`PassManager`.

Every pass except ``apply_masks`` keeps the function identical (within
float tolerance); ``tests/passes`` checks each numerically.
"""

from sparsecompile.passes.apply_masks import ApplyMasks
from sparsecompile.passes.fold_batchnorm import FoldBatchNorm
from sparsecompile.passes.lower_conv_im2col import LowerConvIm2col
from sparsecompile.passes.manager import PassContext, PassManager, PassResult
from sparsecompile.passes.permute_channels import PermuteChannels
from sparsecompile.passes.remove_identity import RemoveIdentity
from sparsecompile.passes.shape_prop import ShapePropagation

__all__ = [
    "ApplyMasks", "FoldBatchNorm", "LowerConvIm2col", "PassContext", "PassManager",
    "PassResult", "PermuteChannels", "RemoveIdentity", "ShapePropagation",
]
