"""``sparsecompile engine BUILD_DIR``: build the TensorRT engine from the build's recipe, on the target.

Checks first, in this order, each failure one clear line: a GPU build with a recipe; a CUDA
GPU on this machine (asked through torch; TensorRT is never imported in this process); the
GPU's compute capability is the target's (an engine is specific to it); TensorRT installed.
Then this library's ``build_engine.py`` runs on the build's recipe in a subprocess (a TensorRT
crash cannot take this process down); the build's own copy, ``engine/build_engine.py``, is for
people to read or run by hand and is never run from here. Its verbose log is parsed for the
sparse-math decisions, and ``engine/engine.json`` records per layer: picked sparse / eligible, stayed dense / not
eligible. The build's manifest gains the new files' hashes.

NOT RUN where this project is developed (no GPU): the checks, the log parsing and the
manifest update are tested; the subprocess call and TensorRT are not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sparsecompile.builddir import MANIFEST, open_build
from sparsecompile.engine import build_engine as library_build_engine
from sparsecompile.engine.recipe import ENGINE_DIR
from sparsecompile.engine.sparsity_log import layer_sparsity, layer_tactics, parse_sparsity_log, weight_consumers
from sparsecompile.errors import SparseCompileError
from sparsecompile.fileio import file_sha256
from sparsecompile.hardware import HostInfo, detect_host


def check_engine_host(recipe: dict, host: HostInfo, build_dir: Path, allow_other_gpu: bool = False) -> None:
    target = recipe["target"]
    if host.gpu_capability is None:
        raise SparseCompileError(
            f"no CUDA GPU on this machine: build the {target} engine on the target. Copy {build_dir}/ there and run "
            f"'sparsecompile engine {build_dir}', or 'python {build_dir}/{ENGINE_DIR}/build_engine.py' (needs only "
            f"TensorRT), or 'sh {build_dir}/{ENGINE_DIR}/trtexec.sh'")
    have = f"{host.gpu_capability[0]}.{host.gpu_capability[1]}"
    if recipe.get("compute_capability") and have != recipe["compute_capability"] and not allow_other_gpu:
        raise SparseCompileError(
            f"this GPU ({host.gpu_name}, sm_{have.replace('.', '')}) is not the build's target {target} "
            f"(sm_{recipe['compute_capability'].replace('.', '')}); engines only run on the GPU they were built for. "
            "Rebuild with the right --target, or pass --allow-other-gpu")
    if not host.tensorrt:
        raise SparseCompileError("TensorRT's Python package is not installed: pip install tensorrt "
                                 "(or use NVIDIA's TensorRT container, see docker/README.md)")


def summarize_engine(build_dir: Path, report: dict) -> dict:
    """engine.json's content from the build log: per-layer sparse decisions."""
    import onnx

    engine_dir = build_dir / ENGINE_DIR
    log_path = engine_dir / "build.log"
    log = parse_sparsity_log(log_path.read_text(errors="replace")) if log_path.exists() else None
    consumers = weight_consumers(onnx.load(str(build_dir / "model.onnx"), load_external_data=False))
    rows = layer_sparsity(report["layers"], log, consumers)
    layers_json = engine_dir / "layers.json"
    if layers_json.exists():
        try:
            tactics = layer_tactics(json.loads(layers_json.read_text()), consumers)
        except ValueError:
            tactics = {}
        for row in rows:
            if row["onnx_node"] in tactics:
                row.update(tactics[row["onnx_node"]])
    counts = {}
    for row in rows:
        counts[row["engine"]] = counts.get(row["engine"], 0) + 1
    return {"log_found": log is not None, "counts": counts, "layers": rows}


def refresh_manifest(build_dir: Path) -> None:
    """Record every file of the build (engine files included) in manifest.json, atomically."""
    manifest = json.loads((build_dir / MANIFEST).read_text())
    manifest["files"] = {p.relative_to(build_dir).as_posix(): file_sha256(p)
                         for p in sorted(build_dir.rglob("*")) if p.is_file() and p.name != MANIFEST}
    temp = build_dir / f".{MANIFEST}.partial"
    temp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(temp, build_dir / MANIFEST)


def shared_timing_cache(host: HostInfo) -> Path:
    """One timing cache per GPU kind and TensorRT version, reused by every build on this machine
    (``SPARSECOMPILE_CACHE`` moves the root from ``~/.cache/sparsecompile``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        trt_version = version("tensorrt")
    except PackageNotFoundError:
        trt_version = "unknown"
    cc = host.gpu_capability or (0, 0)
    root = Path(os.environ.get("SPARSECOMPILE_CACHE") or Path.home() / ".cache" / "sparsecompile")
    return root / "timing" / f"sm{cc[0]}{cc[1]}-trt{trt_version}.cache"


def build_engine(build_dir: str | Path, timing_cache: str | None = None, allow_other_gpu: bool = False,
                 host: HostInfo | None = None, verify: bool = True) -> dict:
    path, _ = open_build(build_dir, verify=verify)
    recipe_path = path / ENGINE_DIR / "recipe.json"
    if not recipe_path.exists():
        raise SparseCompileError(f"build '{path}' has no TensorRT recipe (built for a CPU target?); "
                                 "rebuild with a GPU --target")
    recipe = json.loads(recipe_path.read_text())
    host = host or detect_host()
    check_engine_host(recipe, host, path, allow_other_gpu)
    if timing_cache is None:
        timing_cache = shared_timing_cache(host)
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(Path(library_build_engine.__file__).resolve()), "--recipe", str(recipe_path),
               "--timing-cache", str(timing_cache)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise SparseCompileError(f"engine build failed: {last.removeprefix('error: ')}")
    return record_engine(path)


def record_engine(path: Path) -> dict:
    """After an engine build: engine.json, the per-layer outcome in report.json, and the manifest's hashes."""
    report = json.loads((path / "report.json").read_text())
    summary = summarize_engine(path, report)
    (path / ENGINE_DIR / "engine.json").write_text(json.dumps(summary, indent=2) + "\n")
    by_name = {row["name"]: row for row in summary["layers"]}
    for layer in report["layers"]:
        row = by_name.get(layer["name"])
        if row is not None:
            layer["engine"] = {k: row[k] for k in ("engine", "tactic") if row.get(k) is not None}
    recipe = json.loads((path / ENGINE_DIR / "recipe.json").read_text())
    report.setdefault("engine", {}).update(status="built", file=f"{ENGINE_DIR}/{recipe['engine']}",
                                           counts=summary["counts"], log_found=summary["log_found"])
    from sparsecompile.report import write_reports

    write_reports(path, report)
    refresh_manifest(path)
    return summary


def engine_lines(summary: dict) -> list[str]:
    if not summary["log_found"]:
        return ["the TensorRT log has no (Sparsity) lines: was the engine built with sparse weights and a verbose log?"]
    lines = ["per layer (mask = our 2:4 decision; engine = what TensorRT did):"]
    for row in summary["layers"]:
        flag = "  <- TensorRT kept dense kernels (faster here)" if row["engine"] == "eligible, stayed dense" else ""
        tactic = f" [{row['tactic']}]" if row.get("tactic") else ""
        lines.append(f"  {row['name']:<28} mask {row['mask']:<6} engine {row['engine']}{tactic}{flag}")
    lines.append("totals: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["counts"].items())))
    return lines
