"""``sparsecompile package``: one verified bundle per edge target.

The bundle (a ``.scpkg`` zip, see :mod:`sparsecompile.package.archive`) holds

* ``manifest.json``: format and version, model name and source hash, edge and
  build target, precision, inputs/outputs, preprocessing, mask method and
  settings, per-layer sparsity, the build's accuracy checks, library versions,
  sizes, and the size and SHA-256 of every other member;
* ``graph.onnx``: the build's ONNX graph without the weights below; for a ``--precision int8`` build,
  the Q/DQ model (``model.int8.onnx``);
* ``weights.safetensors``: the weights the graph needs, sparse layers compressed (an INT8 build's:
  ``weights.int8.safetensors``, int8 values + indices + per-channel scales, ``docs/format.md``);
* ``report.json``: the full build report;
* ``engine/`` for GPU targets: the build's TensorRT recipe re-targeted to the edge device
  (``recipe.json``, ``build_engine.py``, ``trtexec.sh``, see :mod:`sparsecompile.engine.recipe`);
  no engine is built here;
* ``manifest.sig`` with ``--sign-key``: a detached Ed25519 signature of the manifest's bytes
  (:mod:`sparsecompile.package.signing`), the only member the manifest does not list.

Before anything is written the bundle is read back the way a device reads it
(reconstituted graph run by ONNX Runtime) and compared with the build's ONNX on
seeded inputs; the difference is recorded in the manifest. fp32 and INT8 bundles
must reproduce it bit for bit.

INT8 builds: a ``--target cpu`` INT8 model has uint8 activations (what ONNX
Runtime's x86 kernels fuse), which TensorRT's explicit quantization does not
take, so it is refused for GPU edges; a GPU INT8 build (int8 activations) runs
on every edge (ONNX Runtime on CPUs, TensorRT ``--int8`` with sparse weights on GPUs).
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparsecompile import __version__
from sparsecompile.builddir import INT8_ONNX, INT8_WEIGHTS, open_build
from sparsecompile.compress import load_weights, size_summary
from sparsecompile.errors import SparseCompileError
from sparsecompile.package.archive import (
    MANIFEST, PACKAGE_FORMAT, PACKAGE_VERSION, SIGNATURE, is_package_file, sha256_bytes, write_archive,
)
from sparsecompile.engine import build_engine as build_engine_script
from sparsecompile.engine.recipe import ENGINE_DIR, make_recipe, trtexec_script
from sparsecompile.package.edges import EdgeTarget, default_edge, get_edge
from sparsecompile.runtime import example_arrays
from sparsecompile.package.weights import check_matches_graph, restore_weights, strip_weights, weights_file_bytes
from sparsecompile.targets import TARGETS



def format_floor_fp16(pattern: str, value_bits: int = 16) -> float:
    """Compressed/dense size of an N:M layer: N values + N indices of ceil(log2 M) bits per M values
    (``value_bits`` 16 for fp16, 8 for int8, scales not counted)."""
    n, m = (int(v) for v in pattern.split(":"))
    return n * (value_bits + math.ceil(math.log2(m))) / (value_bits * m)


def _int8_sources(path: Path, report: dict, edge: EdgeTarget) -> tuple[str, str]:
    """The Q/DQ model and its weight file of an INT8 build, after refusing an edge that cannot run it."""
    quantization = report["quantization"]
    if edge.kind == "gpu" and quantization.get("activations") == "u8":
        raise SparseCompileError(
            f"'{path}' is a --target {report['target']['name']} INT8 build with uint8 activations (for ONNX Runtime), "
            f"which TensorRT on {edge.name} cannot run; rebuild with --target {edge.name} --precision int8 --calib C, "
            "or package this build for a cpu-* edge")
    if not (path / INT8_WEIGHTS).is_file():
        raise SparseCompileError(f"'{path}' is an INT8 build without {INT8_WEIGHTS} (made by an older sparsecompile); "
                                 "rebuild it to package it")
    return INT8_ONNX, INT8_WEIGHTS


@dataclass
class PackResult:
    path: Path
    manifest: dict
    size: int
    signed_by: str | None = None  # the signing key's id (``--sign-key``)


def _library_versions() -> dict:
    import onnx
    import onnxruntime
    import safetensors
    import torch

    return {"sparsecompile": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "safetensors": safetensors.__version__, "numpy": np.__version__}


def _engine_members(edge: EdgeTarget, precision: str, build_manifest: dict, build_path: Path) -> dict[str, bytes]:
    """The build's TensorRT recipe, re-targeted to ``edge`` (same batch profile), as bundle members."""
    profile_batch = None
    sparse_weights = True
    build_recipe = build_path / ENGINE_DIR / "recipe.json"
    if build_recipe.exists():
        built = json.loads(build_recipe.read_text())
        precision = built.get("precision", precision)  # the build's engine precision (int8/fp8 for Q/DQ models)
        sparse_weights = built.get("sparse_weights", True)
        profile = built.get("profile") or {}
        first = next(iter(profile.values()), None)
        if first:
            profile_batch = (first["min"][0], first["opt"][0], first["max"][0])
    recipe = make_recipe(edge, precision, build_manifest["inputs"], bool(build_manifest.get("dynamic_batch")),
                         profile_batch, sparse_weights=sparse_weights)
    return {
        f"{ENGINE_DIR}/recipe.json": (json.dumps(recipe, indent=2) + "\n").encode(),
        f"{ENGINE_DIR}/build_engine.py": Path(build_engine_script.__file__).read_bytes(),
        f"{ENGINE_DIR}/trtexec.sh": trtexec_script(recipe).encode(),
    }


def _drop_exporter_traces(model) -> None:
    """The exporter stores each node's Python stack trace and FX source (file paths of the build
    machine) in metadata; a bundle keeps only the module ``namespace`` that maps nodes to layers."""
    for node in model.graph.node:
        kept = [p for p in node.metadata_props if not p.key.startswith("pkg.torch.onnx.")]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)


def _compare(a: list[np.ndarray], b: list[np.ndarray]) -> dict:
    worst = max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.size else 0.0
                for x, y in zip(a, b))
    scale = max(float(np.max(np.abs(x))) if x.size else 0.0 for x in a)
    return {"max_abs_diff": worst, "relative_diff": worst / scale if scale else worst}


def package_build(build_dir: str | Path, output: str | Path, edge_name: str | None = None,
                  force: bool = False, note: str | None = None, progress=None, sign_key=None) -> PackResult:
    """Bundle a build for ``edge_name`` into ``output`` (a ``.scpkg`` file).

    ``sign_key`` (an Ed25519 private key file or key): add ``manifest.sig``, its signature of the manifest."""
    import onnx

    from sparsecompile.backends.onnxruntime_runner import OrtRunner

    path, build_manifest = open_build(build_dir)
    output = Path(output)
    if output.is_dir():
        raise SparseCompileError(f"output '{output}' is a directory; give a file name such as model.scpkg")
    if not output.resolve().parent.is_dir():
        raise SparseCompileError(f"output directory '{output.parent}' does not exist")
    if output.exists() and not force and not is_package_file(output):
        raise SparseCompileError(f"'{output}' exists and is not a sparsecompile package; choose another -o or pass --force")
    private_key = None
    if sign_key is not None:  # a bad key fails before any work
        from sparsecompile.package.signing import load_private_key

        private_key = load_private_key(sign_key)
    try:
        report = json.loads((path / "report.json").read_text())
    except (OSError, ValueError) as exc:
        raise SparseCompileError(f"cannot read '{path / 'report.json'}': {exc}") from None
    build_target = report["target"]["name"]
    edge = get_edge(edge_name or default_edge(build_target))
    quantization = report.get("quantization")
    onnx_file, weights_file = _int8_sources(path, report, edge) if quantization else ("model.onnx",
                                                                                       "weights.safetensors")
    notes = []
    if quantization and edge.kind == "cpu" and quantization.get("activations") == "s8":
        notes.append(f"INT8 model with int8 activations (built for {build_target}, TensorRT's form): ONNX Runtime's "
                     "x86 kernels fuse only part of it; for a fast CPU bundle build with --target cpu --precision int8")
    if edge.kind == "gpu" and not report.get("sparsified"):
        notes.append(f"the build has no sparse layers (target {build_target}): the {edge.name} engine runs dense")
    if edge.kind == "gpu" and build_target in TARGETS and not TARGETS[build_target].sparse_tensor_cores \
            and TARGETS[edge.name].sparse_tensor_cores:
        notes.append(f"built for {build_target}, which has no sparse tensor cores; rebuild with --target {edge.name} "
                     "for masks and precision chosen for it")

    model = onnx.load(str(path / onnx_file), load_external_data=False)
    sparse, dense, weights_meta = load_weights(path / weights_file)
    if quantization:
        check_matches_graph(model, sparse, dense, str(path / weights_file))
    specs, sparse_kept, dense_kept = strip_weights(model, sparse, dense)
    _drop_exporter_traces(model)
    precision = "int8" if quantization else (weights_meta or {}).get("dtype", report["options"].get("weights_dtype"))
    graph_bytes = model.SerializeToString()
    weights_bytes = weights_file_bytes(sparse_kept, dense_kept, {"pattern": report["pattern"], "dtype": precision})

    # Read the bundle back as a device would and compare with the build's ONNX.
    if progress:
        progress.info("checking the bundle against the build's ONNX ...")
    restored = onnx.load_from_string(graph_bytes)
    restore_weights(restored, specs, sparse_kept, dense_kept, "bundle")
    feed = example_arrays(build_manifest["inputs"], batch=4)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sparsecompile-") as tmp:
        onnx.save(restored, f"{tmp}/restored.onnx")
        with OrtRunner(f"{tmp}/restored.onnx", threads=1) as runner:
            got = runner.infer(feed)
    with OrtRunner(path / onnx_file, threads=1) as runner:
        want = runner.infer(feed)
    check = {**_compare(want, got), "inputs": "seeded random, batch 4" if build_manifest.get("dynamic_batch") else "seeded random",
             "build_onnx": onnx_file}
    if precision in ("fp32", "int8") and check["max_abs_diff"] != 0.0:
        raise SparseCompileError(f"internal error: the {precision} bundle does not reproduce the build's {onnx_file} "
                                 f"(max abs diff {check['max_abs_diff']:.3g})")

    sizes = size_summary(sparse_kept) if sparse_kept else {}
    members = {"graph.onnx": graph_bytes, "weights.safetensors": weights_bytes,
               "report.json": (path / "report.json").read_bytes()}
    if edge.kind == "gpu":
        members.update(_engine_members(edge, precision, build_manifest, path))
    dense_onnx_bytes = (path / "model.onnx").stat().st_size
    layers = report.get("layers", [])
    manifest = {
        "format": PACKAGE_FORMAT, "version": PACKAGE_VERSION,
        "created": report.get("created"),
        "model": {"name": Path(report["source"]["path"] or "model").stem, "source": report["source"]},
        "target": edge.to_json(),
        "build_target": build_target,
        "precision": precision,
        "pattern": report["pattern"],
        "inputs": build_manifest["inputs"], "outputs": build_manifest["outputs"],
        "dynamic_batch": build_manifest.get("dynamic_batch", False),
        "preprocessing": {
            "calibration": report["verification"]["calibration"],
            "preprocess": report["options"].get("preprocess"),
            "note": note or "feed inputs preprocessed exactly like the calibration data the build used",
        },
        "masks": {"method": report["method"], "options": report["options"],
                  "permutation": {"enabled": report.get("permutation", {}).get("enabled", False)}},
        "sparsity": {
            "summary": report["summary"],
            "layers": [{"name": r["name"], "status": r["status"], "shape": r["shape"],
                        "zero_fraction": r.get("zero_fraction"), "reason": r.get("reason")} for r in layers],
        },
        "accuracy": {"sparse_vs_dense": report["verification"]["sparse_vs_dense"],
                     "bundle_vs_build_onnx": check,
                     **({"int8_damage": quantization.get("damage")} if quantization else {})},
        "quantization": ({key: quantization.get(key) for key in
                          ("format", "activations", "calibration", "calibration_samples", "per_channel_weights",
                           "quantized", "kept_float")} | {"onnx": INT8_ONNX, "weights": INT8_WEIGHTS}
                         if quantization else None),
        "engine": ({"kind": "recipe", "members": sorted(m for m in members if m.startswith(f"{ENGINE_DIR}/")),
                    "note": "no engine inside: build it on the target (sparsecompile unpack PACKAGE -o DIR, then "
                            "python DIR/engine/build_engine.py or sh DIR/engine/trtexec.sh)"}
                   if edge.kind == "gpu" else None),
        "graph": {"external_initializers": specs,
                  "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)},
        "sizes": {
            "sparse_layers": sizes,
            "format_floor_vs_dense_fp16": format_floor_fp16(report["pattern"]),
            **({"format_floor_vs_dense_int8": format_floor_fp16(report["pattern"], 8),
                "int8_onnx_bytes": (path / INT8_ONNX).stat().st_size} if quantization else {}),
            "dense_onnx_bytes": dense_onnx_bytes,
            "graph_bytes": len(graph_bytes), "weights_bytes": len(weights_bytes),
        },
        "libraries": _library_versions(),
        "notes": notes,
        "members": {name: {"bytes": len(data), "sha256": sha256_bytes(data)} for name, data in sorted(members.items())},
    }
    members[MANIFEST] = (json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
    signed_by = None
    if private_key is not None:
        from sparsecompile.package.signing import key_id, sign_manifest

        members[SIGNATURE] = sign_manifest(members[MANIFEST], private_key)
        signed_by = key_id(private_key.public_key())
    write_archive(output, members)
    return PackResult(output, manifest, output.stat().st_size, signed_by)


def size_lines(result: PackResult) -> list[str]:
    """What the user sees after packaging: the bundle against the dense ONNX, and the sparse layers' floor."""
    sizes = result.manifest["sizes"]
    kb = 1024.0
    dense_onnx = sizes["dense_onnx_bytes"]
    lines = [f"wrote {result.path}: {result.size / kb:.1f} KiB for {result.manifest['target']['name']} "
             f"({result.size / dense_onnx:.2f}x of the dense ONNX, {dense_onnx / kb:.1f} KiB)"]
    for name, entry in result.manifest["members"].items():
        lines.append(f"  {name:<24} {entry['bytes'] / kb:9.1f} KiB")
    sparse = sizes["sparse_layers"]
    if sparse and result.manifest["precision"] == "int8":
        lines.append(f"  sparse layers: {sparse['compressed_bytes'] / kb:.1f} KiB compressed (int8 values, indices, "
                     f"scales) vs {sparse['dense_bytes'] / kb:.1f} KiB dense int8 = {sparse['ratio_vs_dense']:.4f}x "
                     f"(format floor {sizes['format_floor_vs_dense_int8']:.4f}x for {result.manifest['pattern']} at "
                     "int8, scales aside)")
    elif sparse:
        lines.append(f"  sparse layers: {sparse['compressed_bytes'] / kb:.1f} KiB compressed vs "
                     f"{sparse['dense_fp16_bytes'] / kb:.1f} KiB dense fp16 = {sparse['ratio_vs_dense_fp16']:.4f}x "
                     f"(format floor {sizes['format_floor_vs_dense_fp16']:.4f}x for {result.manifest['pattern']} at fp16; "
                     f"{result.manifest['precision']} values here)")
    else:
        lines.append("  no sparse layers in this build: weights are stored dense")
    check = result.manifest["accuracy"]["bundle_vs_build_onnx"]
    lines.append(f"  bundle vs build {check.get('build_onnx', 'ONNX')}: max abs diff {check['max_abs_diff']:.3g} "
                 f"(relative {check['relative_diff']:.2g}; {result.manifest['precision']} weights)")
    lines.append(f"  signed: {SIGNATURE}, Ed25519 key {result.signed_by} (check with --verify-key KEY.pub)"
                 if result.signed_by else "  unsigned (sign with --sign-key KEY; make a key with sparsecompile keygen)")
    lines.extend(f"  note: {n}" for n in result.manifest["notes"])
    return lines
