"""INT8 on the CPU fallback: fp32 dense vs 2:4 fp32 vs 2:4 INT8 (Q/DQ) ONNX on ONNX Runtime, plus accuracy.

    python benchmarks/int8_cpu.py [--models fashion_mnist,resnet50] [--batches 1,8] [--runs 30] [--warmup 5]
                                  [--threads 1] [--out benchmarks/results/int8_cpu.md] [--accuracy-only]

``--accuracy-only`` re-measures just step 4 (no timing) and replaces the accuracy section of an
existing ``--out`` file in place, noting the re-run under the header; the timing table stays.

Per model:

1. Build it (``sparsecompile.build.build``, target a100, magnitude masks; ResNet-50 with
   ``--no-permute`` as in ``cpu_fallback.py``) into ``benchmarks/.cache/int8_cpu/`` (git-ignored),
   reused when present; export the dense source model to ONNX (``export_onnx``).
2. Quantize the build's ``model.onnx`` with ``sparsecompile.quantize.quantize_onnx`` (default
   calibration) on the build's calibration file, and check the int8 weights are still 2:4
   (``check_qdq_sparsity``, the repo's checker; polygraphy on the widened int8 values for
   the small model only: its checker is a Python loop).
3. Time the three ONNX files on ONNX Runtime (CPU EP, ``--threads`` intra-op threads, one
   inter-op thread, spinning off), interleaved: each round runs every variant once, the
   order rotating every round, after ``--warmup`` untimed runs each; the same seeded random
   input for all. Report medians and the ratios to fp32 dense with 95 % paired-bootstrap
   intervals (``sparsecompile.profile.bootstrap_ratio``).
4. For ``fashion_mnist``: top-1 on ``examples/fashion_mnist/eval.npz`` (2000 held-out test
   images the calibration never saw) of dense fp32, sparse fp32 and sparse INT8 with each
   calibration method, agreement of each INT8 model with sparse fp32, and ``keep_float`` on
   the calibration file's held-back quarter (what the build's guard would do).

The exit status never depends on timing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import ROOT  # noqa: E402

from sparsecompile.backends.onnx_export import export_onnx  # noqa: E402
from sparsecompile.build import BuildOptions, build  # noqa: E402
from sparsecompile.builddir import read_manifest  # noqa: E402
from sparsecompile.frontend import load_model  # noqa: E402
from sparsecompile.profile import bootstrap_ratio  # noqa: E402
from sparsecompile.progress import Progress  # noqa: E402
from sparsecompile.quantize import (  # noqa: E402
    CALIBRATIONS,
    DEFAULT_CALIBRATION,
    batches_from_array,
    calibrate,
    check_qdq_sparsity,
    holdout_feeds,
    keep_float,
    quantize_onnx,
    run_onnx,
)

CACHE = ROOT / "benchmarks" / ".cache" / "int8_cpu"
GOAL = 0.6


def model_spec(name: str) -> dict:
    if name == "fashion_mnist":
        return {"name": name, "model": ROOT / "examples/fashion_mnist/model.pt2",
                "calib": ROOT / "examples/fashion_mnist/calib.npy", "permute": None, "shape": (1, 28, 28),
                "about": "examples/fashion_mnist/model.pt2 (FashionResNet, 1x28x28, 0.3M parameters)"}
    if name == "resnet50":
        from build_time import export_model, make_model

        CACHE.mkdir(parents=True, exist_ok=True)
        model_path, calib_path = CACHE / "resnet50.pt2", CACHE / "resnet50-calib.npy"
        if not model_path.exists():
            export_model(make_model(), 2, model_path)
        if not calib_path.exists():
            generator = torch.Generator().manual_seed(1)
            np.save(calib_path, torch.randn(16, 3, 224, 224, generator=generator).numpy())
        return {"name": name, "model": model_path, "calib": calib_path, "permute": False, "shape": (3, 224, 224),
                "about": "ResNet-50-sized network of benchmarks/build_time.py (3x224x224, 25.5M parameters, random "
                         "weights, 16 random calibration inputs); built with --no-permute"}
    raise SystemExit(f"unknown model {name!r} (fashion_mnist, resnet50)")


def prepare(spec: dict) -> dict:
    out = CACHE / f"{spec['name']}-build"
    if read_manifest(out) is None:
        start = time.perf_counter()
        build(BuildOptions(model=str(spec["model"]), output=str(out), target="a100", calib=str(spec["calib"]),
                          method="magnitude", permute=spec["permute"]), Progress(quiet=True))
        print(f"{spec['name']}: built in {time.perf_counter() - start:.0f} s", flush=True)
    dense = CACHE / f"{spec['name']}-dense.onnx"
    if not dense.exists():
        loaded = load_model(spec["model"])
        export_onnx(loaded.module, loaded.example_inputs, dense, loaded.input_names)
    calib = np.load(spec["calib"])
    start = time.perf_counter()
    q_path = CACHE / f"{spec['name']}-int8.onnx"
    ranges = calibrate(out / "model.onnx", batches_from_array(calib, "x", 8))
    info = quantize_onnx(out / "model.onnx", q_path, ranges=ranges)
    seconds = time.perf_counter() - start
    quantize_onnx(out / "model.onnx", CACHE / f"{spec['name']}-int8-u8.onnx", ranges=ranges, activations="u8")
    sparse_layers = [f"{layer['weight']}" for layer in __import__("json").loads((out / "report.json").read_text())["layers"]
                     if layer["status"] == "sparse"]
    check = check_qdq_sparsity(q_path, sparse_layers, fp32_onnx=out / "model.onnx",
                               polygraphy=spec["name"] == "fashion_mnist")
    return {"build": out, "dense": dense, "sparse": out / "model.onnx", "int8": q_path,
            "int8_u8": CACHE / f"{spec['name']}-int8-u8.onnx", "info": info,
            "quantize_s": seconds, "check": check, "sparse_layers": sparse_layers}


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_variants(paths: dict[str, Path], shape, batch: int, runs: int, warmup: int, threads: int) -> dict:
    sessions = {name: session(path, threads) for name, path in paths.items()}
    x = np.random.default_rng(batch).normal(0, 1, (batch, *shape)).astype(np.float32)
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, {"x": x})
    names = list(sessions)
    times = {name: [] for name in names}
    for round_index in range(runs):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in order:
            start = time.perf_counter()
            sessions[name].run(None, {"x": x})
            times[name].append((time.perf_counter() - start) * 1000)
    medians = {name: statistics.median(v) for name, v in times.items()}
    ratios = {name: bootstrap_ratio(times[name], times["dense fp32"]) for name in names if name != "dense fp32"}
    return {"medians": medians, "ratios": ratios}


def fashion_accuracy(prep: dict) -> dict:
    sys.path.insert(0, str(ROOT / "examples/fashion_mnist"))
    import data

    evaluation = np.load(ROOT / "examples/fashion_mnist/eval.npz")
    images, labels = data.normalize(evaluation["images"]), evaluation["labels"]
    feeds = batches_from_array(images, "x", 250)

    def top1(path):
        logits = run_onnx(path, feeds)[0]
        return float(np.mean(logits.argmax(1) == labels)), logits.argmax(1)

    rows = {}
    rows["dense fp32"], _ = top1(prep["dense"])
    rows["sparse fp32"], sparse_pred = top1(prep["sparse"])
    calib = np.load(ROOT / "examples/fashion_mnist/calib.npy")
    agreement, timing = {}, {}
    for method in CALIBRATIONS:
        path = CACHE / f"fashion_mnist-int8-{method}.onnx"
        start = time.perf_counter()
        ranges = calibrate(prep["sparse"], batches_from_array(calib, "x", 32), method)
        quantize_onnx(prep["sparse"], path, ranges=ranges)
        timing[method] = time.perf_counter() - start
        rows[f"sparse int8 ({method})"], pred = top1(path)
        agreement[method] = float(np.mean(pred == sparse_pred))
        quantize_onnx(prep["sparse"], path, ranges=ranges, activations="u8")
        rows[f"sparse int8 u8 ({method})"], pred = top1(path)
        agreement[f"u8 {method}"] = float(np.mean(pred == sparse_pred))
    fit, held = holdout_feeds({"x": calib})
    guarded = keep_float(prep["sparse"], CACHE / "fashion_mnist-int8-guarded.onnx", fit, held)
    rows["sparse int8 (keep_float, default budget)"], pred = top1(CACHE / "fashion_mnist-int8-guarded.onnx")
    agreement["keep_float"] = float(np.mean(pred == sparse_pred))
    return {"top1": rows, "agreement": agreement, "seconds": timing, "guarded": guarded}


ACCURACY_HEADING = "## Accuracy on the shipped example (eval.npz, 2000 test images, 1 image = 0.05 pt)"
RERUN_NOTE = "The accuracy section was re-measured by `python benchmarks/int8_cpu.py --accuracy-only`"


def accuracy_lines(accuracy: dict) -> list[str]:
    lines = [ACCURACY_HEADING, "", "| model | top-1 | agreement with sparse fp32 | calibrate + quantize s |",
             "|---|---|---|---|"]
    for row, value in accuracy["top1"].items():
        u8 = row.startswith("sparse int8 u8 (")
        method = row[row.index("(") + 1:-1] if row.startswith("sparse int8") else None
        key = "keep_float" if method and method.startswith("keep_float") else (f"u8 {method}" if u8 else method)
        agree = f"{100 * accuracy['agreement'][key]:.2f} %" if key else ""
        seconds = f"{accuracy['seconds'][method]:.1f}" if method in accuracy["seconds"] and not u8 else ""
        lines.append(f"| {row} | {100 * value:.2f} % | {agree} | {seconds} |")
    guarded = accuracy["guarded"]
    return lines + ["", f"keep_float on the calibration file's held-back quarter ({guarded.search['samples']} "
                    f"samples, max-drop {guarded.search['max_drop']} pt): fully quantized score "
                    f"{guarded.search['quantized_all']['score']}, kept float: "
                    f"{', '.join(guarded.kept_float) or 'none'}."]


def rewrite_accuracy(out: Path, accuracy: dict) -> None:
    """Replace the accuracy section of an existing results file and note the re-run under its header."""
    if not out.is_file():
        raise SystemExit(f"--accuracy-only rewrites the accuracy section of an existing {out}: run without it first")
    lines = [line for line in out.read_text().splitlines() if not line.startswith(RERUN_NOTE)]
    try:
        start = lines.index(ACCURACY_HEADING)
        end = next(i for i in range(start, len(lines)) if lines[i].startswith("keep_float on")) + 1
    except (ValueError, StopIteration):
        raise SystemExit(f"{out} has no accuracy section to replace: run without --accuracy-only") from None
    lines[start:end] = accuracy_lines(accuracy)
    made = next(i for i, line in enumerate(lines) if line.startswith("Made by"))
    lines.insert(made + 1, f"{RERUN_NOTE} on {dt.date.today().isoformat()}; the timing table is from the run above.")
    out.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="fashion_mnist,resnet50")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/int8_cpu.md"))
    ap.add_argument("--accuracy-only", action="store_true",
                    help="re-measure only the fashion_mnist accuracy section of an existing --out file (no timing)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    CACHE.mkdir(parents=True, exist_ok=True)
    if args.accuracy_only:
        rewrite_accuracy(Path(args.out), fashion_accuracy(prepare(model_spec("fashion_mnist"))))
        print(f"rewrote the accuracy section of {args.out}")
        return
    import onnxruntime as ort

    lines = [f"# INT8 on the CPU fallback (ONNX Runtime {ort.__version__})", "",
             f"Made by `python benchmarks/int8_cpu.py --models {args.models} --batches {args.batches} --runs "
             f"{args.runs} --warmup {args.warmup} --threads {args.threads}` on {dt.date.today().isoformat()}, "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared machine: read the ratios, "
             "not the absolute times).", "",
             f"- ORT: CPU execution provider, intra-op threads = {args.threads}, one inter-op thread, spinning off; "
             f"each round runs every variant once, order rotating; {args.warmup} warm-up runs each, {args.runs} "
             "timed rounds; medians; ratio = median / median of fp32 dense with a 95 % paired-bootstrap interval.",
             "- dense fp32 = the source model exported to ONNX; sparse fp32 = the build's `model.onnx` (2:4, "
             "magnitude masks, `--correct bias`); sparse int8 = `sparsecompile.quantize.quantize_onnx` of it "
             f"(QDQ S8S8, per-channel symmetric weights, calibration `{DEFAULT_CALIBRATION}` on the build's calib "
             "file).", f"- Goal (issue 20): sparse int8 at most {GOAL}x of dense fp32 latency on the ResNet-50-sized "
             "model at batch 1 and 8.", "",
             "- sparse int8 u8 = the same with uint8 asymmetric activations (the encoding ORT's x86 kernels fuse; "
             "TensorRT needs the symmetric int8 one).", "",
             "| model | batch | dense fp32 ms | sparse fp32 ms | sparse int8 (s8) ms | sparse int8 u8 ms | "
             "sparse fp32 / dense | int8 s8 / dense | int8 u8 / dense |", "|---|---|---|---|---|---|---|---|---|"]
    notes, accuracy = [], None
    for name in args.models.split(","):
        spec = model_spec(name)
        prep = prepare(spec)
        check = prep["check"]
        notes.append(f"- `{name}`: {spec['about']}. Quantized in {prep['quantize_s']:.1f} s; int8 2:4 check "
                     f"{'passed' if check['passed'] else 'FAILED: ' + '; '.join(check['failures'])} on "
                     f"{len(prep['sparse_layers'])} sparse layers (every float zero kept: "
                     f"{all(w.get('fp32_zeros_kept', True) for w in check['weights'].values())})"
                     + (f"; polygraphy on the int8 values widened to float finds "
                        f"{len(set(check['polygraphy']['int8_widened']) & set(prep['sparse_layers']))} of them 2:4, "
                        f"on the file as is {len(check['polygraphy']['as_is'])} (it skips int8 initializers)"
                        if "polygraphy" in check and check["polygraphy"].get("available") else "") + ".")
        for batch in [int(b) for b in args.batches.split(",")]:
            result = time_variants({"dense fp32": prep["dense"], "sparse fp32": prep["sparse"],
                                    "sparse int8": prep["int8"], "sparse int8 u8": prep["int8_u8"]}, spec["shape"], batch, args.runs, args.warmup,
                                   args.threads)
            med, rat = result["medians"], result["ratios"]

            def fmt(r):
                return f"{r['ratio']:.2f}x [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"

            lines.append(f"| {name} | {batch} | {med['dense fp32']:.2f} | {med['sparse fp32']:.2f} | "
                         f"{med['sparse int8']:.2f} | {med['sparse int8 u8']:.2f} | {fmt(rat['sparse fp32'])} | "
                         f"{fmt(rat['sparse int8'])} | {fmt(rat['sparse int8 u8'])} |")
            print(lines[-1], flush=True)
        if name == "fashion_mnist":
            accuracy = fashion_accuracy(prep)
    lines += ["", *notes]
    if accuracy is not None:
        lines += ["", *accuracy_lines(accuracy)]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
