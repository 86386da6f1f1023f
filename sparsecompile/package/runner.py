"""Load a ``.scpkg`` bundle and run it: ``sparsecompile.load("model.scpkg")``.

Loading verifies every member's hash first (:func:`open_package`), checks that
the bundle's edge target suits this machine, reconstitutes the ONNX graph
from the compressed weights (decompression happens once, at load) and opens
an ONNX Runtime session on the CPU.

Backend choice: the TensorRT engine path (build the engine from the bundle's
recipe on first use, cache it, run it) is not implemented in this version; on
a machine with a matching GPU the runner says so and uses the CPU fallback.
Nothing here imports TensorRT.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from sparsecompile.errors import SparseCompileError
from sparsecompile.package.archive import Package, open_package
from sparsecompile.hardware import HostInfo, detect_host
from sparsecompile.package.edges import check_host, get_edge
from sparsecompile.package.weights import read_weights_bytes, restore_weights


def reconstitute_onnx(package: Package):
    """The bundle's ONNX model with its weights restored (an ``onnx.ModelProto``)."""
    import onnx

    where = str(package.path)
    try:
        model = onnx.load_from_string(package.members["graph.onnx"])
    except Exception as exc:  # noqa: BLE001 - protobuf decode errors
        raise SparseCompileError(f"{where}: graph.onnx is not a valid ONNX model ({type(exc).__name__})") from None
    sparse, dense, _ = read_weights_bytes(package.members["weights.safetensors"], where)
    specs = package.manifest.get("graph", {}).get("external_initializers", [])
    return restore_weights(model, specs, sparse, dense, where)


class PackageRunner:
    """A callable over a verified bundle: ``runner(x)`` returns the output array (a list for several)."""

    def __init__(self, path: str | Path, threads: int | None = None, allow_other_target: bool = False,
                 host: HostInfo | None = None):
        from sparsecompile.backends.onnxruntime_runner import OrtRunner

        self.package = open_package(path)
        self.manifest = self.package.manifest
        self.notes: list[str] = []
        edge = get_edge(self.manifest["target"]["name"])
        host = host or detect_host()
        problem = check_host(edge, host)
        if problem and not allow_other_target:
            raise SparseCompileError(f"{problem}; package the build for this machine "
                                     f"(sparsecompile package BUILD --edge ...) or pass --allow-other-target")
        if problem:
            self.notes.append(f"{problem}; running the CPU fallback anyway (--allow-other-target)")
        if edge.kind == "gpu" and host.gpu_capability is not None and not problem:
            self.notes.append("this version does not run TensorRT engines from a bundle; build one on this machine "
                              "with the bundle's engine recipe (sparsecompile unpack PACKAGE -o DIR). "
                              "Running the ONNX Runtime CPU fallback")
        elif edge.kind == "gpu" and host.gpu_capability is None:
            self.notes.append(f"no CUDA GPU here: running the {edge.name} bundle on the ONNX Runtime CPU fallback")
        self.backend = "onnxruntime-cpu"
        model = reconstitute_onnx(self.package)
        import onnx

        with tempfile.TemporaryDirectory(prefix="sparsecompile-") as tmp:
            onnx_path = os.path.join(tmp, "model.onnx")
            onnx.save(model, onnx_path)
            self._runner = OrtRunner(onnx_path, threads=threads).load()

    @property
    def input_specs(self) -> list[dict]:
        return self.manifest["inputs"]

    @property
    def output_names(self) -> list[str]:
        return [spec["name"] for spec in self.manifest["outputs"]]

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self._runner is None:
            raise SparseCompileError("this runner is closed")
        return self._runner.infer([np.asarray(a) for a in inputs])

    def __call__(self, *inputs: np.ndarray):
        outputs = self.run(inputs)
        return outputs[0] if len(outputs) == 1 else outputs

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    def __enter__(self) -> "PackageRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(path: str | Path, threads: int | None = None, allow_other_target: bool = False) -> PackageRunner:
    """Open, verify and load a ``.scpkg`` bundle; returns a callable runner."""
    return PackageRunner(path, threads=threads, allow_other_target=allow_other_target)


def write_onnx(path: str | Path, output: str | Path) -> Path:
    """``sparsecompile unpack``: the bundle's ONNX with weights restored, for trtexec or other tools.

    ``output`` a directory: writes ``model.onnx`` there and, for GPU targets, the engine recipe under
    ``engine/`` (the layout of a build directory, so the recipe's ``../model.onnx`` resolves).
    Returns the ONNX path."""
    import onnx

    package = open_package(path)
    output = Path(output)
    if output.is_dir():
        directory, output = output, output / "model.onnx"
        for name, data in package.members.items():
            if name.startswith("engine/"):
                (directory / "engine").mkdir(exist_ok=True)
                _atomic_write(directory / name, lambda temp, data=data: Path(temp).write_bytes(data))
    if not output.resolve().parent.is_dir():
        raise SparseCompileError(f"output directory '{output.parent}' does not exist")
    model = reconstitute_onnx(package)
    _atomic_write(output, lambda temp: onnx.save(model, temp))
    return output


def _atomic_write(output: Path, write) -> None:
    handle, temp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".partial", dir=output.resolve().parent)
    os.close(handle)
    try:
        write(temp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)
        os.replace(temp, output)
    finally:
        if os.path.exists(temp):
            os.remove(temp)
