"""sparsecompile: a deployment compiler that turns dense PyTorch models into
2:4 semi-structured sparse artifacts (ONNX for TensorRT, compressed weights, CPU fallback)."""

__version__ = "0.1.0"

from sparsecompile.errors import SparseCompileError  # noqa: E402

__all__ = ["SparseCompileError", "__version__"]
