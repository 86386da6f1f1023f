"""What TARGET gives to time: the build's report and engine, the dense model for ``--compare dense``
(found and hash-checked), and the variants (``_make_variants``) with their loaders and per-layer profilers."""

from __future__ import annotations

import json
import time
from pathlib import Path

from sparsecompile.backends import get_backend
from sparsecompile.errors import SparseCompileError
from sparsecompile.profile.design import Variant
from sparsecompile.profile.inputs import random_inputs
from sparsecompile.profile.layers import (
    layer_map_from_onnx, layer_map_from_report, ort_layer_profile, torch_layer_map, torch_layer_profile,
)
from sparsecompile.progress import Progress


def _read_report(path: Path) -> dict | None:
    try:
        return json.loads((path / "report.json").read_text())
    except (OSError, ValueError):
        return None


def _specs_of_loaded(loaded) -> list[dict]:
    import torch

    specs = []
    for name, tensor in zip(loaded.input_names, loaded.example_inputs):
        shape: list = list(map(int, tensor.shape))
        if loaded.dynamic_batch and shape:
            shape[0] = "batch"
        dtype = torch.empty((), dtype=tensor.dtype).numpy().dtype.name
        specs.append({"name": name, "dtype": dtype, "shape": shape})
    return specs


def _resolve_dense_source(manifest: dict, dense: str | None, progress: Progress) -> Path:
    """The dense model file for ``--compare dense``: ``--dense`` or the build's source, hash-checked."""
    source = manifest.get("source") or {}
    if dense is not None:
        path = Path(dense)
        if not path.exists():
            raise SparseCompileError(f"--dense model '{path}' does not exist")
        if path.is_dir():
            raise SparseCompileError(f"--dense '{path}' is a directory; pass the dense model file (.pt2, ...)")
        from sparsecompile.fileio import file_sha256

        if source.get("sha256") and source.get("kind") != "factory" and file_sha256(path) != source["sha256"]:
            progress.warn(f"--dense '{path}' is not the file this build was made from (SHA-256 differs from the "
                          "build's source); the dense numbers are for that file")
        return path
    if source.get("kind") == "factory":
        raise SparseCompileError(
            f"--compare dense: this build was made from a model factory ('{source.get('path')}'), so there is no "
            "dense model file to load; export the dense model (torch.export.save) and pass --dense MODEL"
        )
    if not source.get("path"):
        raise SparseCompileError("--compare dense: the build's manifest names no source model; pass --dense MODEL")
    path = Path(source["path"])
    if not path.is_file():
        raise SparseCompileError(
            f"--compare dense: the build's source model '{path}' no longer exists (relative paths are resolved "
            "from the current directory); pass --dense MODEL"
        )
    from sparsecompile.fileio import file_sha256

    if source.get("sha256") and file_sha256(path) != source["sha256"]:
        raise SparseCompileError(
            f"--compare dense: '{path}' has changed since the build (SHA-256 differs from the build's source); "
            "pass --dense MODEL to compare against it anyway"
        )
    return path


def _load_dense(path: Path, manifest_specs: list[dict] | None, input_shapes, trust_pickle: bool):
    from sparsecompile.frontend import _classify_file, load_model

    shapes = list(input_shapes) if input_shapes else None
    if shapes is None and manifest_specs and _classify_file(path) == "torchscript":
        shapes = [tuple(2 if not isinstance(d, int) else d for d in spec["shape"]) for spec in manifest_specs]
    return load_model(path, input_shapes=shapes, trust_pickle=trust_pickle)


def _engine_file(build: Path) -> Path:
    recipe_path = build / "engine" / "recipe.json"
    if not recipe_path.exists():
        raise SparseCompileError(f"build '{build}' has no TensorRT recipe (a CPU target?); rebuild for a GPU target")
    engine = build / "engine" / json.loads(recipe_path.read_text())["engine"]
    if not engine.exists():
        raise SparseCompileError(f"build '{build}' has no TensorRT engine yet: run 'sparsecompile engine {build}' "
                                 "on the target GPU first")
    return engine


def _make_variants(options, target, is_build, manifest, report, dense_source, threads, scratch, progress):
    from sparsecompile.backends.onnxruntime_runner import OrtRunner
    from sparsecompile.backends.torch_runner import TorchRunner

    backend = get_backend(options.backend)
    variants = []
    layers_wanted = options.top > 0

    def ort_variant(name, onnx_path, specs, param_map):
        profiler = None
        if layers_wanted:
            def profiler(variant, arrays, runs):
                return ort_layer_profile(variant, arrays, runs, threads=threads, param_map=param_map,
                                         workdir=scratch / "layers")
        return Variant(name=name, artifact=str(onnx_path), specs=specs,
                       loader=lambda: OrtRunner(onnx_path, threads=threads).load(), layer_profiler=profiler,
                       threads=threads, runtime=get_backend("ort").runtime)

    def export_dense(path: Path, manifest_specs):
        from sparsecompile.backends.onnx_export import export_onnx

        with progress.stage(f"loading and exporting the dense model '{path}' to ONNX"):
            start = time.perf_counter()
            loaded = _load_dense(path, manifest_specs, options.input_shapes, options.trust_pickle)
            onnx_path = scratch / "dense.onnx"
            info = export_onnx(loaded.module, loaded.example_inputs, onnx_path, loaded.input_names)
        return onnx_path, info, time.perf_counter() - start

    cuda = backend.name == "torch-cuda"
    if is_build and backend.name == "tensorrt":  # NOT RUN here: no GPU
        from sparsecompile.backends.tensorrt_runner import TensorRTRunner

        engine = _engine_file(target)
        return [Variant(name="sparse", artifact=str(engine), specs=manifest["inputs"],
                        loader=lambda: TensorRTRunner(engine).load(), device=backend.device, runtime=backend.runtime)]
    if is_build and backend.name in ("torch", "torch-cuda"):
        from sparsecompile.frontend import load_pt2

        sparse_weights = [r["weight"] for r in (report or {}).get("layers", []) if r.get("status") == "sparse"]

        def torch_variant(name, artifact, specs, module_fn, sparse):
            def load():
                module = module_fn()
                if cuda:
                    from sparsecompile.backends.torch_cuda_runner import TorchCudaRunner

                    return TorchCudaRunner(None, sparse_weights if sparse else (), random_inputs(specs, 8),
                                           module=module, sparse=sparse).load()
                return TorchRunner(module)  # not load(): it would set eval mode, and the module is used as loaded

            def profiler(variant, arrays, runs):
                return torch_layer_profile(variant, arrays, runs, param_map=torch_layer_map(variant.runner.module))

            return Variant(name=name, artifact=artifact, specs=specs, loader=load, device=backend.device,
                           layer_profiler=profiler if layers_wanted else None, threads=threads,
                           runtime=backend.runtime)

        variants.append(torch_variant("sparse", str(target / "model.pt2"), manifest["inputs"],
                                      lambda: load_pt2(target / "model.pt2", trust_pickle=False).module(), True))
        if dense_source is not None:
            def dense_module():
                return _load_dense(dense_source, manifest["inputs"], options.input_shapes, options.trust_pickle).module

            variants.append(torch_variant("dense", str(dense_source), manifest["inputs"], dense_module, False))
        return variants
    if is_build:
        param_map = layer_map_from_report(report)
        from sparsecompile.runtime import fallback_onnx

        variants.append(ort_variant("sparse", fallback_onnx(target, manifest), manifest["inputs"], param_map))
        if dense_source is not None:
            onnx_path, info, seconds = export_dense(dense_source, manifest["inputs"])
            if len(info["inputs"]) != len(manifest["inputs"]):
                raise SparseCompileError(
                    f"the dense model '{dense_source}' takes {len(info['inputs'])} input(s) but the build takes "
                    f"{len(manifest['inputs'])}; pass the model this build was made from with --dense")
            dense = ort_variant("dense", onnx_path, info["inputs"], param_map)
            dense.prepare_s, dense.prepare_note = seconds, f"ONNX exported from {dense_source}"
            variants.append(dense)
        return variants

    # A model file: the dense baseline.
    from sparsecompile.frontend import load_model

    if backend.name == "ort":
        onnx_path, info, seconds = export_dense(target, None)
        variant = ort_variant("dense", onnx_path, info["inputs"], layer_map_from_onnx(onnx_path))
        variant.prepare_s, variant.prepare_note = seconds, f"ONNX exported from {target}"
        return [variant]

    holder: dict = {}

    def load_torch():
        loaded = load_model(target, input_shapes=list(options.input_shapes) or None, trust_pickle=options.trust_pickle)
        holder["loaded"] = loaded
        if cuda:
            from sparsecompile.backends.torch_cuda_runner import TorchCudaRunner

            return TorchCudaRunner(None, module=loaded.module, sparse=False).load()
        return TorchRunner(loaded.module)

    def torch_profiler(variant, arrays, runs):
        return torch_layer_profile(variant, arrays, runs, param_map=torch_layer_map(variant.runner.module))

    variant = Variant(name="dense", artifact=str(target), specs=[], loader=load_torch,
                      layer_profiler=torch_profiler if layers_wanted else None, device=backend.device,
                      threads=threads, runtime=backend.runtime)
    # Loading is part of what is measured (load time and memory), so specs are filled in after loading.
    variant.extra["holder"] = holder
    return [variant]
