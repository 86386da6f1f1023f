"""Load a ``.scpkg`` bundle and run it: ``sparsecompile.load("model.scpkg")``.

Loading verifies every member's hash first (:func:`open_package`), checks that
the bundle's edge target suits this machine, reconstitutes the ONNX graph
from the compressed weights (decompression happens once, at load) and opens
an ONNX Runtime session on the CPU.

Backend choice (:func:`choose_backend`): a GPU bundle on a machine with the
target's GPU and TensorRT builds its engine from the bundle's recipe on first
use, caches it (:func:`engine_cache_dir`) and runs it with TensorRT; if that
fails, or anywhere else, the bundle runs with ONNX Runtime on the CPU, and the
runner's ``notes`` say why. The TensorRT path has NOT been run here (no GPU):
the choice, the cache key and the fallback after a failed engine build are
tested; the engine build and TensorRT inference are not.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from sparsecompile.errors import SparseCompileError
from sparsecompile.fileio import atomic_write
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


def choose_backend(edge, host: HostInfo) -> tuple[str, str | None]:
    """``("tensorrt" | "onnxruntime-cpu", note)`` for a bundle on this host (the host already accepted)."""
    if edge.kind != "gpu":
        return "onnxruntime-cpu", None
    if host.gpu_capability is None:
        return "onnxruntime-cpu", f"no CUDA GPU here: running the {edge.name} bundle on the ONNX Runtime CPU fallback"
    if check_host(edge, host) is not None:
        return "onnxruntime-cpu", None
    if not host.tensorrt:
        return "onnxruntime-cpu", ("TensorRT is not installed (pip install tensorrt): running the ONNX Runtime "
                                   "CPU fallback")
    return "tensorrt", None


def engine_cache_dir(package: Package, host: HostInfo) -> Path:
    """Where a bundle's engine for this GPU is built once and reused (``SPARSECOMPILE_CACHE`` overrides the root)."""
    members = package.manifest["members"]
    digest = hashlib.sha256("".join(f"{n}:{members[n]['sha256']};" for n in sorted(members)).encode()).hexdigest()
    root = Path(os.environ.get("SPARSECOMPILE_CACHE") or Path.home() / ".cache" / "sparsecompile")
    cc = host.gpu_capability or (0, 0)
    return root / "engines" / f"{digest[:20]}-sm{cc[0]}{cc[1]}"


def _tensorrt_runner(package: Package, host: HostInfo):
    """Build the bundle's engine on first use (cached), then load it. Not run here: no GPU."""
    from sparsecompile.backends.tensorrt_runner import TensorRTRunner

    cache = engine_cache_dir(package, host)
    recipe = json.loads(package.members["engine/recipe.json"])
    engine_file = cache / "engine" / recipe["engine"]
    if not engine_file.exists():
        cache.mkdir(parents=True, exist_ok=True)
        write_onnx(package, cache)
        result = subprocess.run([sys.executable, str(cache / "engine" / "build_engine.py"),
                                 "--recipe", str(cache / "engine" / "recipe.json")], capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
            raise SparseCompileError(last.removeprefix("error: "))
    return TensorRTRunner(engine_file).load()


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
        self.backend, note = choose_backend(edge, host)
        if note:
            self.notes.append(note)
        self._runner = None
        if self.backend == "tensorrt":
            try:
                self._runner = _tensorrt_runner(self.package, host)
            except SparseCompileError as exc:
                self.backend = "onnxruntime-cpu"
                self.notes.append(f"TensorRT engine unavailable ({exc}): running the ONNX Runtime CPU fallback")
        if self._runner is None:
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


def write_onnx(path: str | Path | Package, output: str | Path) -> Path:
    """``sparsecompile unpack``: the bundle's ONNX with weights restored, for trtexec or other tools.

    ``output`` a directory: writes ``model.onnx`` there and, for GPU targets, the engine recipe under
    ``engine/`` (the layout of a build directory, so the recipe's ``../model.onnx`` resolves).
    Returns the ONNX path."""
    import onnx

    package = path if isinstance(path, Package) else open_package(path)
    output = Path(output)
    if output.is_dir():
        directory, output = output, output / "model.onnx"
        for name, data in package.members.items():
            if name.startswith("engine/"):
                (directory / "engine").mkdir(exist_ok=True)
                atomic_write(directory / name, lambda temp, data=data: Path(temp).write_bytes(data))
    if not output.resolve().parent.is_dir():
        raise SparseCompileError(f"output directory '{output.parent}' does not exist")
    model = reconstitute_onnx(package)
    atomic_write(output, lambda temp: onnx.save(model, temp))
    return output
