"""Build a TensorRT engine with sparse weights from a sparsecompile recipe.

Standalone on purpose: it needs only Python and TensorRT (no sparsecompile,
no torch), so it runs on the target device. ``sparsecompile build`` copies it
into ``build/engine/build_engine.py`` next to ``recipe.json``;
``sparsecompile engine build/`` runs it in a subprocess.

    python build_engine.py [--recipe recipe.json] [--onnx ../model.onnx] [--timing-cache FILE]

It refuses to start without a CUDA device, checked through the CUDA driver
library *before* TensorRT is imported (TensorRT's runtime can take the
process down when no device exists). The builder's log goes to
``build.log`` at verbose level, so the "(Sparsity) Layers eligible for sparse
math" and "picked sparse implementation" lines are there for
``sparsecompile engine`` to parse; per-layer engine information (tactics)
goes to ``layers.json``.

NOT RUN where this project is developed (no GPU, no TensorRT there): only the
CUDA check and the argument handling are tested; the TensorRT calls follow
the TensorRT 8.6/10 Python API documentation.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time

EXIT_NO_DEVICE = 3


def cuda_device_count() -> int:
    """CUDA devices seen by the driver (0 when there is no driver), without importing TensorRT."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        if lib.cuInit(0) != 0:
            return 0
        count = ctypes.c_int(0)
        return count.value if lib.cuDeviceGetCount(ctypes.byref(count)) == 0 else 0
    return 0


def _arguments(argv):
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description="Build a sparse TensorRT engine from a sparsecompile recipe.")
    parser.add_argument("--recipe", default=os.path.join(here, "recipe.json"))
    parser.add_argument("--onnx", help="ONNX model (default: the recipe's, relative to the recipe)")
    parser.add_argument("--out", help="engine file (default: the recipe's, next to the recipe)")
    parser.add_argument("--timing-cache", help="timing cache to read and update (default: the recipe's)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _arguments(argv)
    try:
        with open(args.recipe) as handle:
            recipe = json.load(handle)
    except (OSError, ValueError) as exc:
        print(f"error: cannot read recipe '{args.recipe}': {exc}", file=sys.stderr)
        return 2
    base = os.path.dirname(os.path.abspath(args.recipe))
    onnx_path = args.onnx or os.path.join(base, recipe["onnx"])
    engine_path = args.out or os.path.join(base, recipe["engine"])
    cache_path = args.timing_cache or os.path.join(base, recipe["timing_cache"])
    if not os.path.isfile(onnx_path):
        print(f"error: ONNX model '{onnx_path}' does not exist", file=sys.stderr)
        return 2
    if cuda_device_count() == 0:
        print(f"error: no CUDA device on this machine: build the {recipe['target']} engine on the target GPU",
              file=sys.stderr)
        return EXIT_NO_DEVICE
    try:
        import tensorrt as trt
    except ImportError:
        print("error: TensorRT's Python package is not installed (pip install tensorrt, or use NVIDIA's "
              "TensorRT container)", file=sys.stderr)
        return 2
    return _build(trt, recipe, onnx_path, engine_path, cache_path, os.path.join(base, "build.log"),
                  os.path.join(base, "layers.json"))


def _build(trt, recipe, onnx_path, engine_path, cache_path, log_path, layers_path) -> int:
    log = open(log_path, "w")

    class FileLogger(trt.ILogger):
        tags = {trt.ILogger.Severity.INTERNAL_ERROR: "F", trt.ILogger.Severity.ERROR: "E",
                trt.ILogger.Severity.WARNING: "W", trt.ILogger.Severity.INFO: "I",
                trt.ILogger.Severity.VERBOSE: "V"}

        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            log.write(f"[{self.tags.get(severity, '?')}] [TRT] {msg}\n")
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                print(f"TensorRT: {msg}", file=sys.stderr)

    logger = FileLogger()
    logger.min_severity = trt.ILogger.Severity.VERBOSE
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        print(f"error: TensorRT cannot parse '{onnx_path}': {errors}", file=sys.stderr)
        return 1
    config = builder.create_builder_config()
    if recipe.get("sparse_weights", True):
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    precision = recipe["precision"]
    if precision in ("fp16", "int8", "fp8"):  # quantized engines keep fp16 for the layers without Q/DQ
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    elif precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    elif precision == "fp8":
        config.set_flag(trt.BuilderFlag.FP8)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if recipe.get("profile"):
        profile = builder.create_optimization_profile()
        for name, shapes in recipe["profile"].items():
            profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(profile)
    cache_data = b""
    if os.path.isfile(cache_path):
        with open(cache_path, "rb") as handle:
            cache_data = handle.read()
    cache = config.create_timing_cache(cache_data)
    config.set_timing_cache(cache, ignore_mismatch=False)
    started = time.time()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        print(f"error: TensorRT could not build the engine; see {log_path}", file=sys.stderr)
        return 1
    with open(engine_path + ".partial", "wb") as handle:
        handle.write(serialized)
    os.replace(engine_path + ".partial", engine_path)
    with open(cache_path, "wb") as handle:
        handle.write(config.get_timing_cache().serialize())
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(serialized)
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    with open(layers_path, "w") as handle:
        handle.write(info)
    log.close()
    print(f"built {engine_path} in {time.time() - started:.1f}s (TensorRT {trt.__version__}); log: {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
