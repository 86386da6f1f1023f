"""The run: ``ProfileOptions`` and their checks, ``profile()`` (TARGET in, the result dict out), and
``_measure`` (load each variant alone, then time them interleaved per batch size, then per layer)."""

from __future__ import annotations

import importlib.util
import tempfile
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from sparsecompile.backends import get_backend
from sparsecompile.errors import SparseCompileError
from sparsecompile.profile.design import Variant, interleaving_design, measure_interleaved
from sparsecompile.profile.inputs import DEFAULT_BATCHES, check_batch, parse_batches, random_inputs
from sparsecompile.profile.layers import LAYER_RUNS
from sparsecompile.profile.machine import (
    CudaMemoryMeter, OtherLoad, RssMeter, default_threads, machine_environment, usable_cpus,
)
from sparsecompile.profile.output import check_matplotlib, write_json, write_plot
from sparsecompile.profile.sources import (
    _engine_file, _make_variants, _read_report, _resolve_dense_source, _specs_of_loaded,
)
from sparsecompile.profile.stats import (
    NOISY_MAD_OVER_MEDIAN, NOISY_P90_OVER_P50, bootstrap_ratio, latency_stats, noise_reasons,
)
from sparsecompile.progress import Progress

SCHEMA = "sparsecompile-profile/1"


@dataclass
class ProfileOptions:
    target: str
    backend: str = "ort"
    batches: list[int] | None = None
    runs: int = 200
    warmup: int = 20
    threads: int | None = None
    compare: str | None = None
    dense: str | None = None
    json_out: str | None = None
    plot: str | None = None
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    trust_pickle: bool = False
    top: int = 10
    seed: int = 0
    verify: bool = True  # check a build's files against its manifest hashes before loading


def check_backend_available(backend: str) -> None:
    """A one-line error naming what is missing; never imports tensorrt without a CUDA device."""
    backend = get_backend(backend).name
    if backend == "ort":
        from sparsecompile.backends.onnxruntime_runner import import_onnxruntime

        import_onnxruntime()
        return
    if backend == "torch":
        return
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        needs = ("an NVIDIA GPU, TensorRT (pip install tensorrt) and a CUDA build of PyTorch to hold the buffers"
                 if backend == "tensorrt" else "an NVIDIA GPU and a CUDA build of PyTorch")
        raise SparseCompileError(
            f"backend '{backend}' is not available here: it needs {needs}, and no CUDA device is usable "
            f"(torch {torch.__version__} is {build}; torch.cuda.is_available() is False); run it on a GPU machine "
            "with a CUDA wheel of torch (see pytorch.org), or use --backend ort for the CPU fallback"
        )
    if backend == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        raise SparseCompileError(
            "backend 'tensorrt' needs TensorRT's Python package, which is not installed: pip install tensorrt "
            "(on the GPU machine), or use --backend ort for the CPU fallback"
        )


def _check_writable_parent(path: str, flag: str) -> None:
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise SparseCompileError(f"{flag} '{path}': directory '{parent}' does not exist")
    if Path(path).is_dir():
        raise SparseCompileError(f"{flag} '{path}' is a directory; give a file path")


def profile(options: ProfileOptions, progress: Progress | None = None) -> dict:
    """Measure TARGET and return the result dict (schema ``sparsecompile-profile/1``)."""
    import torch

    progress = progress or Progress()
    if options.runs is None or options.runs < 1:
        raise SparseCompileError(f"--runs must be at least 1, got {options.runs}")
    if options.warmup is None or options.warmup < 0:
        raise SparseCompileError(f"--warmup must be 0 or more, got {options.warmup}")
    if options.threads is not None and options.threads < 1:
        raise SparseCompileError(f"--threads must be at least 1, got {options.threads}")
    if options.top < 0:
        raise SparseCompileError(f"--top must be 0 or more, got {options.top}")
    compare = options.compare
    if compare is not None and compare != "dense":
        raise SparseCompileError(f"--compare '{compare}' is not supported; the only comparison is --compare dense")
    if options.dense is not None:
        compare = "dense"
    options = replace(options, backend=get_backend(options.backend).name)  # an alias runs as its canonical name
    check_backend_available(options.backend)
    if options.plot:
        check_matplotlib()
        _check_writable_parent(options.plot, "--plot")
    if options.json_out:
        _check_writable_parent(options.json_out, "--json-out")

    target = Path(options.target)
    if not target.exists():
        raise SparseCompileError(f"'{target}' does not exist (profile takes a build directory or a model file)")
    is_build = target.is_dir()
    threads = options.threads or default_threads()
    cuda = options.backend == "torch-cuda"

    manifest = report = None
    if is_build:
        from sparsecompile.builddir import open_build

        target, manifest = open_build(target, verify=options.verify)
        if options.backend in ("torch", "torch-cuda") and not (target / "model.pt2").exists():
            raise SparseCompileError(
                f"build '{target}' has no model.pt2 (made by an older sparsecompile) to run with --backend "
                f"{options.backend}; rebuild it, or profile it with --backend ort"
            )
        if options.backend == "tensorrt":
            if compare:
                raise SparseCompileError("--compare dense with --backend tensorrt needs a dense engine, which a build "
                                         "does not have; compare with --backend torch-cuda, or time a dense engine "
                                         "with trtexec")
            _engine_file(target)
        if options.input_shapes:
            raise SparseCompileError("--input-shape is only for model files: a build's input shapes come from its manifest")
        report = _read_report(target)
    elif options.backend == "tensorrt":
        raise SparseCompileError("--backend tensorrt profiles a build's engine: build the model, then run "
                                 "'sparsecompile engine BUILD' on the GPU, then profile BUILD")
    elif compare:
        raise SparseCompileError(
            f"--compare dense needs a build directory; '{target}' is a model file, which is already the dense model"
        )

    batches = parse_batches(options.batches) if isinstance(options.batches, str) else options.batches
    if batches is not None and (not batches or any(not isinstance(b, int) or b < 1 for b in batches)):
        raise SparseCompileError(f"--batch must be positive integers, got {batches}")
    if is_build:  # the build's batch dimension is known now: refuse before exporting or loading anything
        batches = batches or _default_batches(manifest["inputs"])
        for batch in batches:
            check_batch(manifest["inputs"], batch, "the build")

    dense_source = None
    if compare:
        dense_source = _resolve_dense_source(manifest, options.dense, progress)

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    variants: list[Variant] = []
    try:
        with tempfile.TemporaryDirectory(prefix="sparsecompile-profile-") as scratch:
            scratch = Path(scratch)
            variants = _make_variants(options, target, is_build, manifest, report, dense_source, threads, scratch,
                                      progress)
            if all(v.specs for v in variants):  # known before loading: fail before any timing
                batches = _check_batches(variants, batches)
            result = _measure(options, variants, batches, threads, cuda, scratch, progress)
    finally:
        for variant in variants:
            variant.close()
        torch.set_num_threads(previous_threads)

    result.update({
        "target": {"path": str(options.target), "kind": "build" if is_build else "model",
                   "build_target": (manifest or {}).get("target"), "pattern": (manifest or {}).get("pattern"),
                   "source": (manifest or {}).get("source")},
        "dense_source": str(dense_source) if dense_source else None,
    })
    for message in result["warnings"]:
        progress.warn(message)
    if options.json_out:
        write_json(result, Path(options.json_out))
    if options.plot:
        write_plot(result, Path(options.plot))
    return result


def _default_batches(specs: list[dict]) -> list[int]:
    first = specs[0]["shape"] if specs and specs[0]["shape"] else None
    return [first[0]] if first and isinstance(first[0], int) else list(DEFAULT_BATCHES)


def _check_batches(variants: list[Variant], batches: list[int] | None) -> list[int]:
    batches = batches or _default_batches(variants[0].specs)
    for variant in variants:
        what = "the build" if variant.name == "sparse" else f"the {variant.name} model '{variant.artifact}'"
        for batch in batches:
            check_batch(variant.specs, batch, what)
    return batches


def _prime_runtimes(variants: list[Variant], threads: int, scratch: Path) -> None:
    """Pay one-time runtime start-up costs (library pages, thread pools, kernel registries) on a tiny model.

    Otherwise the first variant loaded is charged for them in its load time
    and memory, and the second is not.
    """
    import torch

    with torch.no_grad():
        torch.nn.functional.conv2d(torch.ones(1, 4, 8, 8), torch.ones(4, 4, 3, 3))
        torch.nn.functional.linear(torch.ones(2, 8), torch.ones(8, 8))
    if any(v.device == "cpu" and v.artifact.endswith(".onnx") for v in variants):
        import onnx
        from onnx import TensorProto, helper

        from sparsecompile.backends.onnxruntime_runner import OrtRunner

        weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 4, 3, 3], [0.1] * 144)
        graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "prime",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [weight])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        path = scratch / "prime.onnx"
        onnx.save(model, str(path))
        runner = OrtRunner(path, threads=threads).load()
        runner.infer([np.ones((1, 4, 8, 8), np.float32)])
        runner.close()


def _measure(options, variants, batches, threads, cuda, scratch, progress) -> dict:
    warnings_: list[str] = []
    _prime_runtimes(variants, threads, scratch)
    memory: dict[str, dict[int, float | None]] = {}
    first_specs = None
    # Load each variant alone and run it once per batch: load time and peak memory without the others.
    for variant in variants:
        with progress.stage(f"loading {variant.name} ({options.backend})"):
            variant.meter = CudaMemoryMeter() if variant.device == "cuda" else RssMeter()
            variant.meter.start()
            variant.load()
            holder = variant.extra.get("holder")
            if holder and not variant.specs:
                variant.specs = _specs_of_loaded(holder["loaded"])
                batches = _check_batches([variant], batches)
            first_specs = first_specs or variant.specs
            memory[variant.name] = {}
            for batch in batches:
                arrays = random_inputs(first_specs, batch, options.seed + batch)
                variant.pin_threads()
                variant.time_once(variant.prepare(arrays))
                memory[variant.name][batch] = variant.meter.peak_growth_mb()

    per_variant = {v.name: {"name": v.name, "artifact": v.artifact, "device": v.device, "load_s": v.load_s,
                            "prepare_s": v.prepare_s, "prepare_note": v.prepare_note, "threads": v.thread_report(),
                            "results": []}
                   for v in variants}
    designs = []
    comparisons = []
    names = " / ".join(v.name for v in variants)
    for batch in batches:
        arrays = random_inputs(first_specs, batch, options.seed + batch)
        prepared = {v.name: v.prepare(arrays) for v in variants}
        progress.info(f"      batch {batch}: {options.warmup} warm-up runs of each, then {options.runs} timed runs "
                      f"of {names}" + (" (interleaved, balanced order)" if len(variants) > 1 else ""))
        design = interleaving_design([v.name for v in variants], options.runs, seed=options.seed + batch)
        designs.append({"batch": batch, **design})
        with OtherLoad() as other_load:
            samples = measure_interleaved(variants, prepared, options.runs, options.warmup, design=design,
                                          ticks=lambda items: progress.bar(items, f"batch {batch}", length=options.runs))
        if other_load.value is not None and other_load.value > 0.25 * usable_cpus():
            warnings_.append(f"other processes kept {other_load.value:.1f} of {usable_cpus()} CPUs busy while batch "
                             f"{batch} was measured; with {threads} thread(s) the numbers are slower and noisier than "
                             "on an idle machine")
        for variant in variants:
            stats = latency_stats(samples[variant.name])
            noisy = noise_reasons(stats)
            if noisy:
                warnings_.append(f"{variant.name} at batch {batch} was measured on a noisy machine "
                                 f"({'; '.join(noisy)}); re-run when it is idle or with more --runs")
            per_variant[variant.name]["results"].append({
                "batch": batch, "latency_ms": stats, "throughput_per_s": batch / (stats["p50"] / 1000.0),
                "peak_memory_mb": memory[variant.name][batch], "noisy": bool(noisy),
                "other_cpu_load": other_load.value,
                "samples_ms": [round(s, 6) for s in samples[variant.name]],
            })
        if len(variants) == 2:
            ratio = bootstrap_ratio(samples[variants[0].name], samples[variants[1].name], seed=options.seed)
            comparisons.append({"batch": batch, "numerator": variants[0].name, "denominator": variants[1].name,
                                **ratio})

    layers = None
    if options.top > 0 and all(v.layer_profiler for v in variants):
        batch = batches[0]
        arrays = random_inputs(first_specs, batch, options.seed + batch)
        runs = min(options.runs, LAYER_RUNS)
        with progress.stage(f"per-layer profile at batch {batch} ({runs} runs per variant)"):
            layers = {"batch": batch, "variants": {}}
            for variant in variants:
                layers["variants"][variant.name] = variant.layer_profiler(variant, arrays, runs)

    meter = variants[0].meter
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backend": options.backend,
        "settings": {
            "batches": list(batches), "runs": options.runs, "warmup": options.warmup, "threads": threads,
            "seed": options.seed, "interleaved": len(variants) > 1,
            "warmup_scope": "per variant: --warmup untimed runs of each variant in a row, per batch size",
            "order": {"method": designs[0]["method"], "block_rounds": designs[0]["block_rounds"]},
            "timer": "CUDA events" if cuda else "time.perf_counter_ns around one infer call",
            "memory": getattr(meter, "method", None),
            "noise_thresholds": {"p90_over_p50": NOISY_P90_OVER_P50, "mad_over_median": NOISY_MAD_OVER_MEDIAN},
        },
        "environment": machine_environment(threads, cuda),
        "variants": [per_variant[v.name] for v in variants],
        "comparison": comparisons,
        "design": [{key: d[key] for key in ("batch", "seed", "rounds", "complete_blocks", "balanced", "warmup_last",
                                            "variants", "orders")} for d in designs],
        "layers": layers,
        "warnings": warnings_,
    }
