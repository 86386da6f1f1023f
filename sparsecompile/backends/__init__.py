"""Backends: how a built model is exported and run, and the one registry that names them.

``onnx_export`` writes ``model.onnx`` (and ``model.pt2``); the runners execute a build:
``onnxruntime_runner`` (the CPU fallback), ``torch_runner`` (eager torch), ``torch_cuda_runner``
(2:4 semi-structured sparse tensors on a GPU) and ``tensorrt_runner`` (an engine; TensorRT is
imported lazily and is not installed on machines without a GPU). ``base`` is their common contract.

Every place that takes a backend by name (``sparsecompile run`` and :func:`sparsecompile.runtime.build_runner`,
``sparsecompile profile``, a package's backend choice) resolves it with :func:`get_backend`: one
canonical name per backend, plus aliases for spellings that were accepted before the names were
unified. An entry names its runner class as ``"module:Class"`` and imports it only when asked
(:meth:`Backend.runner_class`), so importing this package never imports torch, onnxruntime or tensorrt.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from sparsecompile.errors import SparseCompileError


@dataclass(frozen=True)
class Backend:
    """One backend: its canonical ``name``, accepted ``aliases``, and facts its callers branch on."""

    name: str
    runner: str  # "module:Class" of its Runner, imported lazily
    runtime: str  # the library that runs it ("onnxruntime", "torch", "torch-cuda", "tensorrt"): thread pinning
    device: str  # "cpu" or "cuda"
    artifact: str  # what of a build it runs
    summary: str
    aliases: tuple[str, ...] = ()

    def runner_class(self) -> type:
        module, _, attr = self.runner.partition(":")
        return getattr(importlib.import_module(module), attr)


_ENTRIES = (
    Backend("ort", "sparsecompile.backends.onnxruntime_runner:OrtRunner", runtime="onnxruntime", device="cpu",
            artifact="model.onnx", summary="ONNX Runtime on the CPU (the CPU fallback)",
            aliases=("onnxruntime-cpu",)),
    Backend("torch", "sparsecompile.backends.torch_runner:TorchRunner", runtime="torch", device="cpu",
            artifact="model.pt2", summary="eager PyTorch on the CPU"),
    Backend("torch-cuda", "sparsecompile.backends.torch_cuda_runner:TorchCudaRunner", runtime="torch-cuda",
            device="cuda", artifact="model.pt2",
            summary="PyTorch on a CUDA GPU in fp16, 2:4 weights as semi-structured sparse tensors"),
    Backend("tensorrt", "sparsecompile.backends.tensorrt_runner:TensorRTRunner", runtime="tensorrt", device="cuda",
            artifact="engine/*.engine", summary="a TensorRT engine on a CUDA GPU"),
)

BACKENDS: dict[str, Backend] = {entry.name: entry for entry in _ENTRIES}
_BY_SPELLING: dict[str, Backend] = {spelling: entry for entry in _ENTRIES for spelling in (entry.name, *entry.aliases)}


def backend_names() -> tuple[str, ...]:
    """The canonical names, in registry order."""
    return tuple(BACKENDS)


def get_backend(name: str) -> Backend:
    """The backend called ``name`` (a canonical name or an alias); a one-line error listing the valid names."""
    entry = _BY_SPELLING.get(name) if isinstance(name, str) else None
    if entry is None:
        aliases = ", ".join(f"{alias} = {entry.name}" for entry in _ENTRIES for alias in entry.aliases)
        raise SparseCompileError(f"unknown backend '{name}'; valid backends: {', '.join(BACKENDS)}"
                                 + (f" (aliases: {aliases})" if aliases else ""))
    return entry


__all__ = ["Backend", "BACKENDS", "backend_names", "get_backend"]
