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

A bundle is data. The engine is built by *this library's*
``sparsecompile/engine/build_engine.py``, never by the ``engine/build_engine.py``
inside the bundle (that copy is for people reading or unpacking it). The
bundle's ``engine/recipe.json`` is checked field by field (:func:`engine_recipe`)
and re-serialized into the cache; every path handed to the builder is an
argument (no shell) resolved inside the cache directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from sparsecompile.backends import get_backend
from sparsecompile.errors import SparseCompileError
from sparsecompile.fileio import atomic_write
from sparsecompile.engine import build_engine as library_build_engine
from sparsecompile.engine.recipe import PRECISIONS, RECIPE_FORMAT, RECIPE_VERSION
from sparsecompile.package.archive import Package, member_path, open_package, write_member
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
    """``(backend, note)`` for a bundle on this host (the host already accepted): the canonical name
    (:func:`sparsecompile.backends.get_backend`) of ``tensorrt`` or of the CPU fallback ``ort``."""
    fallback, tensorrt = get_backend("ort").name, get_backend("tensorrt").name
    if edge.kind != "gpu":
        return fallback, None
    if host.gpu_capability is None:
        return fallback, f"no CUDA GPU here: running the {edge.name} bundle on the ONNX Runtime CPU fallback"
    if check_host(edge, host) is not None:
        return fallback, None
    if not host.tensorrt:
        return fallback, "TensorRT is not installed (pip install tensorrt): running the ONNX Runtime CPU fallback"
    return tensorrt, None


def engine_cache_dir(package: Package, host: HostInfo) -> Path:
    """Where a bundle's engine for this GPU is built once and reused (``SPARSECOMPILE_CACHE`` overrides the root)."""
    members = package.manifest["members"]
    digest = hashlib.sha256("".join(f"{n}:{members[n]['sha256']};" for n in sorted(members)).encode()).hexdigest()
    root = Path(os.environ.get("SPARSECOMPILE_CACHE") or Path.home() / ".cache" / "sparsecompile")
    cc = host.gpu_capability or (0, 0)
    return root / "engines" / f"{digest[:20]}-sm{cc[0]}{cc[1]}"


_PLAIN_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")


def engine_recipe(package: Package) -> dict:
    """The bundle's ``engine/recipe.json`` as checked data: only the fields the builder uses, each validated.

    File names must be plain names (they are placed inside the engine cache); the precision one of
    :data:`PRECISIONS`; the profile, when there is one, min/opt/max lists of positive ints for the
    bundle's own inputs. The recipe's ``onnx`` path is not used: the builder is given the cache's ONNX."""
    where = f"{package.path}: engine/recipe.json"
    try:
        recipe = json.loads(package.members["engine/recipe.json"])
    except KeyError:
        raise SparseCompileError(f"{package.path}: no engine/recipe.json in this GPU bundle") from None
    except ValueError:
        raise SparseCompileError(f"{where} is not valid JSON") from None
    if not isinstance(recipe, dict) or recipe.get("format") != RECIPE_FORMAT or recipe.get("version") != RECIPE_VERSION:
        raise SparseCompileError(f"{where} is not a {RECIPE_FORMAT} v{RECIPE_VERSION} recipe")
    for field in ("engine", "timing_cache"):
        value = recipe.get(field)
        if not isinstance(value, str) or not _PLAIN_FILE_NAME.match(value):
            raise SparseCompileError(f"{where}: '{field}' must be a plain file name, not {str(value)[:80]!r}")
    if not recipe["engine"].endswith(".engine"):
        raise SparseCompileError(f"{where}: 'engine' must end in .engine, not {recipe['engine'][:80]!r}")
    if recipe.get("precision") not in PRECISIONS:
        raise SparseCompileError(f"{where}: 'precision' must be one of {', '.join(PRECISIONS)}, "
                                 f"not {str(recipe.get('precision'))[:80]!r}")
    if not isinstance(recipe.get("sparse_weights", True), bool):
        raise SparseCompileError(f"{where}: 'sparse_weights' must be true or false")
    profile = recipe.get("profile")
    inputs = {spec["name"]: len(spec["shape"]) for spec in package.manifest.get("inputs", [])}
    if profile is not None:
        if not isinstance(profile, dict):
            raise SparseCompileError(f"{where}: 'profile' must map input names to min/opt/max shapes")
        for name, shapes in profile.items():
            if name not in inputs:
                raise SparseCompileError(f"{where}: 'profile' names {name[:80]!r}, not an input of this model")
            if not isinstance(shapes, dict) or set(shapes) != {"min", "opt", "max"} or not all(
                    isinstance(s, list) and len(s) == inputs[name]
                    and all(isinstance(d, int) and not isinstance(d, bool) and 0 < d < 1 << 31 for d in s)
                    for s in shapes.values()):
                raise SparseCompileError(f"{where}: 'profile' for {name!r} must give min, opt and max shapes "
                                         "(lists of positive ints, one per dimension)")
    target = package.manifest.get("target", {}).get("name")
    if recipe.get("target") != target:
        raise SparseCompileError(f"{where}: 'target' {str(recipe.get('target'))[:80]!r} is not the bundle's "
                                 f"target {target!r}")
    checked = {key: recipe.get(key) for key in ("format", "version", "target", "compute_capability", "precision",
                                                "engine", "timing_cache", "profile")}
    checked.update(sparse_weights=recipe.get("sparse_weights", True), onnx="../model.onnx")
    if checked["compute_capability"] is not None and not (
            isinstance(checked["compute_capability"], str) and re.fullmatch(r"\d{1,2}\.\d{1,2}", checked["compute_capability"])):
        raise SparseCompileError(f"{where}: 'compute_capability' must look like 8.0")
    return checked


def build_engine_command(cache: Path, recipe: dict) -> list[str]:
    """The engine build: this library's build_engine.py (never the bundle's), every path inside ``cache``."""
    script = Path(library_build_engine.__file__).resolve()
    return [sys.executable, str(script),
            "--recipe", str(member_path(cache, "engine/recipe.json", "engine cache")),
            "--onnx", str(member_path(cache, "model.onnx", "engine cache")),
            "--out", str(member_path(cache, f"engine/{recipe['engine']}", "engine cache")),
            "--timing-cache", str(member_path(cache, f"engine/{recipe['timing_cache']}", "engine cache"))]


def _tensorrt_runner(package: Package, host: HostInfo):
    """Build the bundle's engine on first use (cached), then load it. Not run here: no GPU."""
    from sparsecompile.backends.tensorrt_runner import TensorRTRunner

    recipe = engine_recipe(package)
    cache = engine_cache_dir(package, host)
    cache.mkdir(parents=True, exist_ok=True)
    engine_file = member_path(cache, f"engine/{recipe['engine']}", "engine cache")
    if not engine_file.exists():
        write_onnx(package, member_path(cache, "model.onnx", "engine cache"))
        write_member(cache, "engine/recipe.json", (json.dumps(recipe, indent=2) + "\n").encode(), "engine cache")
        result = subprocess.run(build_engine_command(cache, recipe), capture_output=True, text=True, cwd=cache)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
            raise SparseCompileError(last.removeprefix("error: "))
    return TensorRTRunner(engine_file).load()


class PackageRunner:
    """A callable over a verified bundle: ``runner(x)`` returns the output array (a list for several)."""

    def __init__(self, path: str | Path, threads: int | None = None, allow_other_target: bool = False,
                 host: HostInfo | None = None, verify_key=None):
        from sparsecompile.backends.onnxruntime_runner import OrtRunner

        self.package = open_package(path, verify_key=verify_key)
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
        if self.backend == get_backend("tensorrt").name:
            try:
                self._runner = _tensorrt_runner(self.package, host)
            except SparseCompileError as exc:
                self.backend = get_backend("ort").name
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


def load(path: str | Path, threads: int | None = None, allow_other_target: bool = False,
         verify_key=None) -> PackageRunner:
    """Open, verify and load a ``.scpkg`` bundle; returns a callable runner.

    ``verify_key`` (an Ed25519 public key file, e.g. from ``sparsecompile keygen``): refuse the bundle unless
    its ``manifest.sig`` is that key's signature."""
    return PackageRunner(path, threads=threads, allow_other_target=allow_other_target, verify_key=verify_key)


def write_onnx(path: str | Path | Package, output: str | Path, verify_key=None) -> Path:
    """``sparsecompile unpack``: the bundle's ONNX with weights restored, for trtexec or other tools.

    ``output`` a directory: writes ``model.onnx`` there and, for GPU targets, the engine recipe under
    ``engine/`` (the layout of a build directory, so the recipe's ``../model.onnx`` resolves).
    Every member path is checked to stay inside ``output``. Returns the ONNX path."""
    import onnx

    package = path if isinstance(path, Package) else open_package(path, verify_key=verify_key)
    output = Path(output)
    if output.is_dir():
        directory = output
        engine_members = sorted(name for name in package.members if name.startswith("engine/"))
        for name in engine_members + ["model.onnx"]:  # every target checked before anything is written
            member_path(directory, name, str(package.path))
        for name in engine_members:
            write_member(directory, name, package.members[name], str(package.path))
        output = member_path(directory, "model.onnx", str(package.path))
    if not output.resolve().parent.is_dir():
        raise SparseCompileError(f"output directory '{output.parent}' does not exist")
    model = reconstitute_onnx(package)
    atomic_write(output, lambda temp: onnx.save(model, temp))
    return output
