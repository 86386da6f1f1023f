"""The engine recipe a GPU build carries: ``build/engine/``.

For a target with a GPU, ``sparsecompile build`` writes

* ``recipe.json``: target, compute capability, precision, the ONNX file, the engine and
  timing-cache file names, and the optimization profile (min/opt/max shape per input,
  from ``--batch MIN,OPT,MAX``; none for a static batch);
* ``build_engine.py``: a standalone script (Python + TensorRT only) that builds the engine
  from ``recipe.json`` with the TensorRT Python API;
* ``trtexec.sh``: the same build as one ``trtexec`` command line.

Either one, run on the target device, builds the same engine: sparse weights enabled, the
target's precision, the batch profile, a timing cache reused across builds, a verbose log
(``build.log``) that ``sparsecompile engine`` parses, and per-layer engine information
(``layers.json``) with each layer's tactic.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sparsecompile.errors import SparseCompileError

RECIPE_FORMAT = "sparsecompile-engine-recipe"
RECIPE_VERSION = 1
ENGINE_DIR = "engine"
_PRECISION_FLAGS = {"fp16": " --fp16", "bf16": " --bf16", "fp32": "", "int8": " --int8 --fp16", "fp8": " --fp8 --fp16"}
PRECISIONS = tuple(_PRECISION_FLAGS)
# int8/fp8 engines come from explicitly quantized models (Q/DQ nodes in the ONNX): the build's own model.int8.onnx
# (--precision int8 --calib; the recipe's "onnx" then points at it, and a package's graph is that model), or a
# model quantized elsewhere (e.g. nvidia-modelopt). int8 keeps --sparsity=enable: the int8 weights stay 2:4.
# fp8 tensor cores exist from Ada (sm_89) on.
QUANTIZED = ("int8", "fp8")
FP8_MIN_CAPABILITY = (8, 9)


def check_precision(target, precision: str) -> None:
    """Refuse precisions the target cannot build (cheap: before any work)."""
    if precision not in _PRECISION_FLAGS:
        raise SparseCompileError(f"unknown --precision '{precision}'; valid: auto, {', '.join(_PRECISION_FLAGS)}")
    if precision in QUANTIZED and target.kind != "gpu":
        raise SparseCompileError(f"--precision {precision} is for TensorRT engines; target '{target.name}' has none")
    if precision == "fp8" and (target.compute_capability or (0, 0)) < FP8_MIN_CAPABILITY:
        raise SparseCompileError(f"--precision fp8 needs FP8 tensor cores (Ada/Hopper: l4, h100); "
                                 f"{target.name} has none")


def has_qdq(onnx_path) -> bool:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.node)


def parse_batch(text: str) -> tuple[int, int, int]:
    """``--batch``: ``N`` or ``MIN,OPT,MAX``."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise SparseCompileError(f"--batch '{text}' is not N or MIN,OPT,MAX (e.g. 1,8,32)") from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise SparseCompileError(f"--batch '{text}': need 1 <= MIN <= OPT <= MAX (e.g. 1,8,32)")
    return values[0], values[1], values[2]


def _shape(spec: dict, batch: int) -> list[int]:
    return [batch if not isinstance(d, int) or d <= 0 else d for d in spec["shape"]]


def make_recipe(target, precision: str, inputs: list[dict], dynamic: bool, batch: tuple[int, int, int] | None,
                sparse_weights: bool = True) -> dict:
    """``sparse_weights`` False for patterns TensorRT cannot accelerate (anything but 2:4)."""
    check_precision(target, precision)
    profile = None
    if dynamic:
        low, opt, high = batch or (1, 8, 32)
        profile = {spec["name"]: {"min": _shape(spec, low), "opt": _shape(spec, opt), "max": _shape(spec, high)}
                   for spec in inputs}
    cc = target.compute_capability
    return {
        "format": RECIPE_FORMAT, "version": RECIPE_VERSION,
        "target": target.name, "compute_capability": f"{cc[0]}.{cc[1]}" if cc else None,
        "precision": precision, "sparse_weights": sparse_weights,
        "onnx": "../model.onnx", "engine": f"model.{target.name}.engine", "timing_cache": "timing.cache",
        "profile": profile,
    }


def trtexec_command(recipe: dict) -> str:
    shapes = ""
    if recipe["profile"]:
        def arg(which):
            return ",".join(f"{name}:" + "x".join(map(str, s[which])) for name, s in recipe["profile"].items())
        shapes = f" --minShapes={arg('min')} --optShapes={arg('opt')} --maxShapes={arg('max')}"
    sparsity = " --sparsity=enable" if recipe.get("sparse_weights", True) else ""
    return (f"trtexec --onnx={recipe['onnx']}{sparsity}{_PRECISION_FLAGS[recipe['precision']]}{shapes}"
            f" --saveEngine={recipe['engine']} --timingCacheFile={recipe['timing_cache']}"
            " --profilingVerbosity=detailed --exportLayerInfo=layers.json --verbose > build.log 2>&1")


def trtexec_script(recipe: dict) -> str:
    return (
        "#!/bin/sh\n"
        f"# Build the TensorRT engine for {recipe['target']} on the target device with trtexec.\n"
        "# Same engine as build_engine.py; run from this directory. Written by sparsecompile, not run here.\n"
        "set -e\n"
        'cd "$(dirname "$0")"\n'
        f"{trtexec_command(recipe)}\n"
        f"echo \"built {recipe['engine']}; sparsity decisions: grep Sparsity build.log\"\n"
    )


def write_recipe(directory: Path, recipe: dict) -> list[Path]:
    """Write recipe.json, build_engine.py and trtexec.sh into ``directory`` (created)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    shutil.copyfile(Path(__file__).with_name("build_engine.py"), directory / "build_engine.py")
    (directory / "trtexec.sh").write_text(trtexec_script(recipe))
    return [directory / name for name in ("recipe.json", "build_engine.py", "trtexec.sh")]
