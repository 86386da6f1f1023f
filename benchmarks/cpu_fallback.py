"""CPU fallback benchmark: the sparse build on ONNX Runtime vs dense ONNX Runtime vs torch eager.

    python benchmarks/cpu_fallback.py [--models fashion_mnist,resnet50] [--batches 1,8] [--runs 60]
                                      [--warmup 5] [--threads 2] [--torch-threads N] [--seed 0] [--permute]
                                      [--wait-idle SECONDS] [--fresh] [--out benchmarks/results/cpu_fallback.md]

For each model:

1. Build it with ``sparsecompile.build.build`` (target a100, 2:4, the CLI's
   defaults) into ``benchmarks/.cache/cpu_fallback/`` (git-ignored), keyed by
   the model, the options and a hash of the ``sparsecompile/`` sources; a
   cached build is reused. The ResNet-50-sized model is built with
   ``--no-permute`` unless ``--permute`` is given: channel permutation does
   not change the function or the ONNX Runtime graph's cost, and its search
   takes minutes on 2 cores.
2. Export the *dense* source model to ONNX the way ``sparsecompile profile
   --compare dense`` does (``export_onnx`` on the loaded model).
3. Time, per batch size, three variants *interleaved* (sparse ORT, dense
   ORT, torch eager: one iteration of each per round) in the balanced order
   of ``sparsecompile.profile.interleaving_design``: every one of the 6
   orderings once per block of 6 rounds, chained so that each variant runs
   directly after each variant (itself included) equally often, shuffled with
   ``--seed`` + batch size (``--runs`` should be a multiple of 6). Threads are
   pinned per variant and reported: ORT intra-op = ``--threads`` (one inter-op
   thread, spinning off), torch = ``--torch-threads`` (default ``--threads``),
   set before every torch run. Before timing, each variant runs ``--warmup``
   times in a row, untimed; the same seeded random input for all three. Torch
   eager is the original ``nn.Module`` (``FashionResNet`` with its shipped
   weights; the ResNet-50-sized model of ``build_time.py``) under
   ``torch.no_grad()``.
4. Report medians, the ratios sparse/dense-ORT and sparse-ORT/torch-eager
   with 95 % paired-bootstrap intervals (``sparsecompile.profile.bootstrap_ratio``,
   2000 resamples of the rounds), and the fallback load time: ``open_build`` +
   ``OrtRunner.load`` of the build in a fresh Python process (imports timed
   separately, then the first inference at batch 1), median of 5 processes, with
   the torch ``.pt2`` load (``torch.export.load(...).module()``) beside it.

Goals (issue 8): fallback load under 2 s for the ResNet-50-sized model; the
CPU fallback at about 0.55x of torch eager's latency or better. The exit status
never depends on timing. Models: ``fashion_mnist`` = ``examples/fashion_mnist/model.pt2``
(calibration ``examples/fashion_mnist/calib.npy``), ``resnet50`` = the ResNet-50-sized
network of ``build_time.py`` (25.5M parameters, random weights, 224x224 inputs,
8 random calibration samples).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import ROOT, source_hash  # noqa: E402

from sparsecompile.backends.onnx_export import export_onnx  # noqa: E402
from sparsecompile.backends.onnxruntime_runner import OrtRunner  # noqa: E402
from sparsecompile.build import BuildOptions, build  # noqa: E402
from sparsecompile.builddir import open_build, read_manifest  # noqa: E402
from sparsecompile.frontend import load_model  # noqa: E402
from sparsecompile.profile import (  # noqa: E402
    OtherLoad,
    Variant,
    bootstrap_ratio,
    interleaving_design,
    latency_stats,
    machine_environment,
    measure_interleaved,
    noise_reasons,
    random_inputs,
)
from sparsecompile.progress import Progress  # noqa: E402

LOAD_GOAL_S = 2.0
TORCH_RATIO_GOAL = 0.55
CACHE = ROOT / "benchmarks" / ".cache" / "cpu_fallback"


# --------------------------------------------------------------------------- models


def fashion_mnist(cache: Path) -> dict:
    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT))
    from examples.fashion_mnist.model import build as build_fashion

    eager = build_fashion()
    eager.load_state_dict(load_file(str(ROOT / "examples/fashion_mnist/weights.safetensors")))
    return {"name": "fashion_mnist", "model": ROOT / "examples/fashion_mnist/model.pt2",
            "calib": ROOT / "examples/fashion_mnist/calib.npy", "eager": eager.eval(), "permute": None,
            "about": "examples/fashion_mnist/model.pt2 (FashionResNet, 1x28x28, 0.4M parameters)"}


def resnet50(cache: Path, permute: bool) -> dict:
    from build_time import export_model, make_model

    eager = make_model()
    model_path = cache / "resnet50.pt2"
    calib_path = cache / "resnet50-calib.npy"
    if not model_path.exists():
        export_model(eager, 2, model_path)
    if not calib_path.exists():
        generator = torch.Generator().manual_seed(1)
        np.save(calib_path, torch.randn(8, 3, 224, 224, generator=generator).numpy())
    return {"name": "resnet50", "model": model_path, "calib": calib_path, "eager": eager,
            "permute": None if permute else False,
            "about": "ResNet-50-sized network of benchmarks/build_time.py (3x224x224, 25.5M parameters, random "
                     "weights)" + ("" if permute else "; built with --no-permute")}


def cached_build(spec: dict, cache: Path, fresh: bool) -> tuple[Path, float | None]:
    """The build directory for ``spec`` (reused when cached); returns (path, build seconds or None)."""
    key = f"{spec['name']}-{source_hash()}-{'permute' if spec['permute'] is None else 'nopermute'}"
    out = cache / key
    if fresh and out.exists():
        shutil.rmtree(out)
    if read_manifest(out) is not None:
        return out, None
    start = time.perf_counter()
    build(BuildOptions(model=str(spec["model"]), output=str(out), target="a100", calib=str(spec["calib"]),
                       permute=spec["permute"]), Progress(quiet=True))
    return out, time.perf_counter() - start


def dense_onnx(spec: dict, cache: Path) -> Path:
    path = cache / f"{spec['name']}-dense-{source_hash()}.onnx"
    if not path.exists():
        loaded = load_model(spec["model"])
        export_onnx(loaded.module, loaded.example_inputs, path, loaded.input_names)
    return path


class EagerRunner:
    def __init__(self, module):
        self.module = module

    def prepare(self, arrays):
        return tuple(torch.from_numpy(a) for a in arrays)

    def infer(self, tensors):
        with torch.no_grad():
            return self.module(*tensors)


# --------------------------------------------------------------------------- measurements


_LOAD_SCRIPT = """
import json, sys, time
start = time.perf_counter()
kind, path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
if kind == "ort":
    import numpy as np
    from sparsecompile.backends.onnxruntime_runner import OrtRunner
    from sparsecompile.builddir import open_build
    imported = time.perf_counter()
    build_dir, manifest = open_build(path)
    runner = OrtRunner(build_dir / "model.onnx", threads=threads).load()
    loaded = time.perf_counter()
    shape = [1 if not isinstance(d, int) else d for d in manifest["inputs"][0]["shape"]]
    runner.infer([np.zeros(shape, np.float32)])
else:
    import torch
    torch.set_num_threads(threads)
    imported = time.perf_counter()
    module = torch.export.load(path).module()
    loaded = time.perf_counter()
print(json.dumps({"import_s": imported - start, "load_s": loaded - imported,
                  "first_run_s": time.perf_counter() - loaded}))
"""


def _fresh_process_load(kind: str, path: Path, threads: int) -> dict:
    result = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, kind, str(path), str(threads)], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def load_times(build_dir: Path, model_path: Path, threads: int, torch_threads: int, repeats: int = 5) -> dict:
    """Cold loads, each in a fresh Python process (imports timed separately), median of ``repeats``.

    In one long-lived process a second load of the same file is 3-4x faster (freed pages are reused),
    which is not what a user starting a server sees.
    """
    ort = [_fresh_process_load("ort", build_dir, threads) for _ in range(repeats)]
    pt2 = [_fresh_process_load("torch", model_path, torch_threads) for _ in range(repeats)]
    return {"ort_s": statistics.median(r["load_s"] for r in ort),
            "ort_import_s": statistics.median(r["import_s"] for r in ort),
            "ort_first_run_s": statistics.median(r["first_run_s"] for r in ort),
            "ort_all_s": [r["load_s"] for r in ort],
            "torch_s": statistics.median(r["load_s"] for r in pt2),
            "torch_import_s": statistics.median(r["import_s"] for r in pt2),
            "torch_all_s": [r["load_s"] for r in pt2]}


def time_model(spec: dict, build_dir: Path, dense_path: Path, args) -> dict:
    manifest = open_build(build_dir)[1]
    variants = [
        Variant("sparse ORT", str(build_dir / "model.onnx"), manifest["inputs"],
                lambda: OrtRunner(build_dir / "model.onnx", threads=args.threads).load(),
                threads=args.threads, runtime="onnxruntime"),
        Variant("dense ORT", str(dense_path), manifest["inputs"],
                lambda: OrtRunner(dense_path, threads=args.threads).load(),
                threads=args.threads, runtime="onnxruntime"),
        Variant("torch eager", spec["name"], manifest["inputs"], lambda: EagerRunner(spec["eager"]),
                threads=args.torch_threads, runtime="torch"),
    ]
    for variant in variants:
        variant.load()
    rows = []
    for batch in args.batches:
        if args.wait_idle:
            from build_time import wait_until_idle

            wait_until_idle(args.wait_idle)
        arrays = random_inputs(manifest["inputs"], batch, seed=batch)
        prepared = {v.name: v.prepare(arrays) for v in variants}
        start = time.perf_counter()
        design = interleaving_design([v.name for v in variants], args.runs, seed=args.seed + batch)
        with OtherLoad() as other:
            samples = measure_interleaved(variants, prepared, args.runs, args.warmup, design=design)
        stats = {name: latency_stats(values) for name, values in samples.items()}
        row = {
            "batch": batch, "seconds": time.perf_counter() - start, "stats": stats, "other_cpus": other.value,
            "design": design, "threads": {v.name: v.thread_report() for v in variants},
            "noisy": {name: noise_reasons(s) for name, s in stats.items() if noise_reasons(s)},
            "sparse_vs_dense": bootstrap_ratio(samples["sparse ORT"], samples["dense ORT"]),
            "sparse_vs_torch": bootstrap_ratio(samples["sparse ORT"], samples["torch eager"]),
            "dense_vs_torch": bootstrap_ratio(samples["dense ORT"], samples["torch eager"]),
        }
        rows.append(row)
        print(f"  {spec['name']} batch {batch}: " + ", ".join(f"{n} {s['p50']:.2f} ms" for n, s in stats.items())
              + f"; sparse/torch {row['sparse_vs_torch']['ratio']:.2f}x ({row['seconds']:.0f} s)", flush=True)
    for variant in variants:
        variant.close()
    return {"rows": rows}


# --------------------------------------------------------------------------- report


def ci(r: dict) -> str:
    return f"{r['ratio']:.2f}x [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"


def thread_text(results: list[dict]) -> str:
    """``sparse ORT onnxruntime intra-op 2, inter-op 1; ...``, or every distinct setting when they varied."""
    seen: dict[str, list[str]] = {}
    for result in results:
        for row in result["timing"]["rows"]:
            for name, info in row["threads"].items():
                text = (f"{info['runtime']} intra-op {info['intra_op_num_threads']}, inter-op "
                        f"{info['inter_op_num_threads']}" + (", spinning off" if info.get("spinning") is False else ""))
                if text not in seen.setdefault(name, []):
                    seen[name].append(text)
    return "; ".join(f"{name}: {' / '.join(texts)}" for name, texts in seen.items())


def order_text(results: list[dict], args) -> str:
    designs = [row["design"] for result in results for row in result["timing"]["rows"]]
    if not designs:
        return "none"
    first = designs[0]
    balanced = all(d["balanced"] for d in designs)
    return (f"every one of the {first['block_rounds']} orderings once per block of {first['block_rounds']} rounds, "
            "chained so that each round starts with the variant that ended the one before; "
            + (f"all blocks complete, so each variant ran directly after each variant, itself included, "
               f"{args.runs // 6 * 2} times" if balanced and first["block_rounds"] == 6 else
               "balanced over the complete blocks only")
            + f"; orderings shuffled with seed {args.seed} + batch size (`interleaving_design` rebuilds them)"
            if first["block_rounds"] else f"{first['method']}, seed {args.seed} + batch size")


def tables(results: list[dict]) -> list[str]:
    lines = [
        "| model | batch | sparse ORT p50 ms | dense ORT p50 ms | torch eager p50 ms | sparse/dense ORT | "
        f"sparse ORT/torch (goal <= {TORCH_RATIO_GOAL}x) | other CPUs busy | noisy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for result in results:
        for row in result["timing"]["rows"]:
            s = row["stats"]
            noisy = "; ".join(f"{n}: {', '.join(r)}" for n, r in row["noisy"].items()) or "no"
            lines.append(
                f"| {result['name']} | {row['batch']} | {s['sparse ORT']['p50']:.2f} | {s['dense ORT']['p50']:.2f} | "
                f"{s['torch eager']['p50']:.2f} | {ci(row['sparse_vs_dense'])} | {ci(row['sparse_vs_torch'])} | "
                f"{'n/a' if row['other_cpus'] is None else format(row['other_cpus'], '.2f')} | {noisy} |")
    lines += ["", f"| model | fallback load s (goal < {LOAD_GOAL_S:g} s for resnet50) | + first inference s | "
                  "imports s | torch .pt2 load s | torch imports s | build s |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for result in results:
        load = result["load"]
        built = "cached" if result["build_s"] is None else f"{result['build_s']:.0f}"
        lines.append(f"| {result['name']} | {load['ort_s']:.3f} | {load['ort_first_run_s']:.3f} | "
                     f"{load['ort_import_s']:.2f} | {load['torch_s']:.3f} | {load['torch_import_s']:.2f} | {built} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="fashion_mnist,resnet50", help="comma-separated: fashion_mnist,resnet50")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--runs", type=int, default=60, help="timed rounds per batch size (each runs all 3 variants)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed runs of each variant (in a row) per batch size, before the timed rounds")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (and torch's, by default)")
    parser.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: --threads)")
    parser.add_argument("--seed", type=int, default=0, help="the round order is shuffled with SEED + batch size")
    parser.add_argument("--permute", action="store_true", help="build the ResNet-50-sized model with permutation")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each batch size, wait up to SECONDS for a 5 s window with the machine < 10%% busy")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where builds and dense ONNX files are cached")
    parser.add_argument("--fresh", action="store_true", help="rebuild even if a cached build exists")
    parser.add_argument("--out", type=Path, help="also write the tables as Markdown with the machine info")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.torch_threads = args.torch_threads or args.threads
    if args.runs % 6:
        print(f"note: --runs {args.runs} is not a multiple of 6 (3! orderings): the round order is balanced over "
              f"the first {args.runs - args.runs % 6} rounds only", flush=True)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = set(names) - {"fashion_mnist", "resnet50"}
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}; choose from fashion_mnist, resnet50")
    torch.set_num_threads(args.torch_threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now().astimezone()
    env = machine_environment(args.threads)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + (sys.argv[1:] if argv is None else argv))

    results = []
    for name in names:
        spec = fashion_mnist(args.cache) if name == "fashion_mnist" else resnet50(args.cache, args.permute)
        print(f"{name}: building (or reusing a cached build) ...", flush=True)
        build_dir, build_s = cached_build(spec, args.cache, args.fresh)
        dense_path = dense_onnx(spec, args.cache)
        report = json.loads((build_dir / "report.json").read_text())
        load = load_times(build_dir, spec["model"], args.threads, args.torch_threads)
        print(f"  fallback load {load['ort_s']:.3f} s in a fresh process (torch .pt2 {load['torch_s']:.3f} s)",
              flush=True)
        timing = time_model(spec, build_dir, dense_path, args)
        results.append({"name": name, "about": spec["about"], "build_s": build_s, "load": load, "timing": timing,
                        "sparse_layers": report["summary"]})

    lines = tables(results)
    print()
    print("\n".join(lines))
    if args.out:
        gpu = env["gpu"]["name"] if env.get("gpu") else "none"
        env_threads = (", ".join(f"{k}={v}" for k, v in env["thread_env"].items() if v is not None)
                       or "no OMP/MKL variables set")
        md = [
            "# CPU fallback: sparse build on ONNX Runtime vs dense ONNX Runtime vs torch eager",
            "",
            f"- Command: `{command}`",
            f"- Date: {started:%Y-%m-%d %H:%M %Z}",
            f"- Machine: {env['cpu_model']}, {env['physical_cores']} physical cores / {env['usable_cpus']} usable "
            f"CPUs, GPU {gpu}; load average at start {env['load_average_1min']:.2f}",
            f"- Software: Python {env['python']}, torch {env['versions']['torch']}, onnxruntime "
            f"{env['versions']['onnxruntime']}, onnx {env['versions']['onnx']}",
            f"- Threads per variant (fixed; torch's set before every torch run): {thread_text(results)}; "
            f"environment {env_threads}",
            f"- Method: per batch size {args.warmup} untimed runs of each variant in a row, then {args.runs} timed "
            "rounds, each round one inference of every variant (interleaved). Round order: "
            f"{order_text(results, args)}. p50 = median latency; ratios are ratios of medians "
            "with 95 % paired-bootstrap intervals (2000 resamples of the rounds). Noisy = p90/p50 > 1.5 or "
            "MAD/median > 0.1. Other CPUs busy = CPU time other processes used during the timed rounds / wall "
            f"time (from /proc/stat): the machine is shared, and with {args.threads} thread(s) per variant on "
            f"{env['usable_cpus']} CPUs any other job slows the variants, torch's OpenMP threads most.",
            "- Models: " + "; ".join(f"`{r['name']}` = {r['about']}" for r in results),
            "",
            *lines,
            "",
        ]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(md))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
