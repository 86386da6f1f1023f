"""Learned masks (gumbel, proxsparse) against magnitude on the Fashion-MNIST CNNs of ``accuracy.py``.

    python benchmarks/learned_accuracy.py [--steps N] [--feature-weight W] [--calib-samples 2048] [--threads 2] [--fresh]

For the four models of ``accuracy.py`` (run it first to train them), this script builds one model per
method and correction:
- methods: gumbel (magnitude init) and proxsparse, each learned label-free for ``--steps`` steps (default:
  the build's) on ``--calib-samples`` stratified training images, with the layer-output term at
  ``--feature-weight`` (default: the build's), and magnitude on the same images;
- corrections: ``none`` (weights bit-identical) and ``bias`` (masks learned under the correction
  since stop 15; ``results/learned_accuracy.md`` predates that).

Every build targets a100 2:4 with min_weights 4096 and no permutation. It reports test top-1 on
10,000 images (ONNX Runtime) and the wall time of the build. Results are cached in
``benchmarks/.cache/learned_accuracy/`` and written to ``benchmarks/results/learned_accuracy.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import accuracy as acc  # noqa: E402
import torch  # noqa: E402

from common import cached_build_record, run_header, source_hash  # noqa: E402
from sparsecompile.build import BuildOptions, build  # noqa: E402
from sparsecompile.learned import TrainConfig  # noqa: E402
from sparsecompile.progress import Progress  # noqa: E402

CACHE_DIR = acc.CACHE / "learned_accuracy"
METHODS = ["magnitude", "gumbel", "proxsparse"]
CORRECTIONS = ["none", "bias"]
SPECS = acc.standard_specs()


def run_one(spec, calib, method, correct, ctx) -> dict:
    key_data = {"v": 2, "model": ctx["model_sha"][spec.key], "calib": ctx["calib_sha"][spec.key], "method": method,
                "correct": correct, "steps": ctx["steps"], "source": source_hash(), "threads": ctx["threads"],
                "feature_weight": ctx["feature_weight"]}
    learned = method in ("gumbel", "proxsparse")

    def measure(out: Path) -> dict:
        started = time.perf_counter()
        result = build(BuildOptions(model=str(spec.pt2), output=str(out), target="a100", calib=str(calib),
                                    method=method, correct=correct, min_weights=4096, permute=False,
                                    max_steps=ctx["steps"], engine=False, force=True,
                                    learn_options={"feature_weight": ctx["feature_weight"]} if learned else {}),
                       Progress(quiet=True))
        return {"build_seconds": round(time.perf_counter() - started, 1),
                "learning": result.report.get("learning"),
                "accuracy": acc.onnx_accuracy(out / "model.onnx", ctx["test_x"], ctx["test_y"],
                                              threads=ctx["threads"])}

    return cached_build_record(CACHE_DIR, key_data, ctx["fresh"],
                               {"model": spec.key, "method": method, "correct": correct}, measure)


def mean_std(values, scale=100.0) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=BuildOptions().max_steps)
    ap.add_argument("--feature-weight", type=float, default=TrainConfig().feature_weight)
    ap.add_argument("--calib-samples", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--output", default=str(BENCH / "results" / "learned_accuracy.md"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    started = time.time()
    header = [*run_header("learned_accuracy.py", args.threads, "(shared machine: wall times are indicative)"),
              f"- {args.calib_samples} stratified training images per model, {args.steps} steps, label-free, "
              f"layer-output term weight {args.feature_weight:g}; test top-1 on 10,000 images"]
    print("\n".join(header), flush=True)
    train_x, train_y = acc.fm_data.load("train")
    test_x, test_y = acc.fm_data.load("test")
    calibs, model_sha, calib_sha, dense = {}, {}, {}, {}
    for spec in SPECS:
        if not spec.pt2.exists():
            raise SystemExit(f"missing model {spec.pt2}: run benchmarks/accuracy.py first")
        calibs[spec.key] = acc.calibration_file(spec, args.calib_samples, train_x, train_y, print)
        model_sha[spec.key], calib_sha[spec.key] = acc.sha256(spec.pt2), acc.sha256(calibs[spec.key])
        dense[spec.key] = acc.torch_accuracy(torch.export.load(str(spec.pt2)).module(), test_x, test_y)
    ctx = {"model_sha": model_sha, "calib_sha": calib_sha, "threads": args.threads, "fresh": args.fresh,
           "steps": args.steps, "test_x": test_x, "test_y": test_y, "feature_weight": args.feature_weight}
    results = {}
    jobs = [(s, m, c) for s in SPECS for m in METHODS for c in CORRECTIONS]
    for i, (spec, method, correct) in enumerate(jobs, 1):
        r = run_one(spec, calibs[spec.key], method, correct, ctx)
        results[(spec.key, method, correct)] = r
        status = r["error"] or f"top-1 {100 * r['accuracy']:.2f}% (dense {100 * dense[spec.key]:.2f}%), {r['build_seconds']}s"
        print(f"[{i}/{len(jobs)}] {spec.key} {method} correct={correct}: {status}", flush=True)

    def get(key, method, correct, field="accuracy"):
        r = results.get((key, method, correct))
        return None if r is None or r["error"] else r.get(field)

    lines = ["| method | correct | test top-1 (%) | drop vs dense (pt) | build s (mean) |", "|---|---|---|---|---|"]
    for method in METHODS:
        for correct in CORRECTIONS:
            accs = [get(s.key, method, correct) for s in SPECS]
            drops = [None if a is None else a - dense[s.key] for a, s in zip(accs, SPECS)]
            secs = [get(s.key, method, correct, "build_seconds") for s in SPECS]
            secs = [x for x in secs if x is not None]
            lines.append(f"| {method} | {correct} | {mean_std(accs)} | {mean_std(drops)} | "
                         f"{statistics.mean(secs):.0f} |" if secs else f"| {method} | {correct} | - | - | - |")
    per_model = ["| model | dense | " + " | ".join(f"{m} {c}" for m in METHODS for c in CORRECTIONS) + " |",
                 "|---|---|" + "---|" * (len(METHODS) * len(CORRECTIONS))]
    for s in SPECS:
        cells = [f"{100 * get(s.key, m, c):.2f}" if get(s.key, m, c) is not None else "-"
                 for m in METHODS for c in CORRECTIONS]
        per_model.append(f"| {s.label} | {100 * dense[s.key]:.2f} | " + " | ".join(cells) + " |")
    text = ["# Learned masks vs magnitude (Fashion-MNIST CNNs)", "", *header,
            f"- Dense test top-1: {mean_std([dense[s.key] for s in SPECS])}%", f"- Wall time: {time.time() - started:.0f} s",
            "", "## Mean ± std over 4 models", "", *lines, "", "## Per model (test top-1 %)", "", *per_model, ""]
    output = "\n".join(text)
    print(output)
    Path(args.output).write_text(output + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
