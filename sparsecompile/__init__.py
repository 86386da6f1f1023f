"""sparsecompile: a deployment compiler that turns dense PyTorch models into
2:4 semi-structured sparse artifacts (ONNX for TensorRT, compressed weights, CPU fallback)."""

__version__ = "0.1.0"

from sparsecompile.errors import SparseCompileError  # noqa: E402



def load(path, threads=None, allow_other_target=False):
    """Load a ``.scpkg`` bundle (hashes verified, nothing unpickled); returns a callable runner.

    ``runner(x)`` returns the model's output as a NumPy array (a list for several outputs).
    """
    from sparsecompile.package.runner import load as _load

    return _load(path, threads=threads, allow_other_target=allow_other_target)


def build_model(model, output="build", *, calib=None, example_inputs=None, progress=None, **options):
    """The same as ``sparsecompile.build(model, output, ...)`` (sparsecompile/api.py); kept for existing callers."""
    from sparsecompile.api import build_model as _build_model

    return _build_model(model, output, calib=calib, example_inputs=example_inputs, progress=progress, **options)


def __getattr__(name):
    # ``sparsecompile.build(model, ...)`` without importing the (heavy) build module at ``import sparsecompile``:
    # the submodule is callable (sparsecompile/build.py, _BuildModule) and importing it binds it here.
    if name == "build":
        import importlib

        return importlib.import_module("sparsecompile.build")
    raise AttributeError(f"module 'sparsecompile' has no attribute '{name}'")


__all__ = ["SparseCompileError", "__version__", "build", "build_model", "load"]
