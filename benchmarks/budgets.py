"""Accuracy budgets and N:M patterns on the Fashion-MNIST CNNs of ``accuracy.py``.

    python benchmarks/budgets.py [--threads 2] [--fresh] [--output FILE.md]

Models: the four of ``benchmarks/accuracy.py`` (shipped 32/64/128 s0, and the cached 16/32/64 s0 and s1 and
32/64/128 s1; run accuracy.py first to train them). Calibration: 512 stratified training images per model
(``accuracy.calibration_file``). Every build: target a100, magnitude masks, ``--correct bias``, min_weights
4096, no channel permutation (to keep the sweep short; permutation is measured in permutation_accuracy.py).

1. ``--max-drop`` sweep: none, 4, 2, 1, 0.5 points. Recorded per build:
   - the share of the GEMM multiply-accumulates in sparse layers (``report.summary``);
   - the calibration-set agreement with the dense model, which the budget is measured on;
   - top-1 on the full 10,000-image test set (ONNX Runtime);
   - the certificate (``--certify``) on the calibration samples: the fractions certified and
     observed unchanged.
2. ``--pattern`` sweep: 1:4, 2:4, 4:8, 8:16, with the same settings and no budget. It reports test
   top-1 and the compressed size of the sparse layers against dense fp16.

Results are cached in ``benchmarks/.cache/budgets/``, keyed by model, calibration, options and the
``sparsecompile/`` source hash. Output: printed, and written to ``benchmarks/results/budgets.md``.
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

import accuracy as acc  # noqa: E402  (puts the repo root on sys.path)
import torch  # noqa: E402

from common import cached_build_record, run_header, source_hash  # noqa: E402
from sparsecompile.build import BuildOptions, build  # noqa: E402
from sparsecompile.progress import Progress  # noqa: E402

ROOT = BENCH.parent
CACHE_DIR = acc.CACHE / "budgets"
CALIB_SAMPLES = 512
MAX_DROPS = [None, 4.0, 2.0, 1.0, 0.5]
PATTERNS = [(1, 4), (2, 4), (4, 8), (8, 16)]
RESULT_VERSION = 2  # 2: certificate fields read from the report's summary
SPECS = acc.standard_specs()


def run_one(spec, calib, max_drop, pattern, ctx) -> dict:
    key_data = {"v": RESULT_VERSION, "model": ctx["model_sha"][spec.key], "calib": ctx["calib_sha"][spec.key],
                "max_drop": max_drop, "pattern": list(pattern), "source": source_hash(), "threads": ctx["threads"]}

    def measure(out: Path) -> dict:
        started = time.perf_counter()
        result = build(BuildOptions(model=str(spec.pt2), output=str(out), target="a100", calib=str(calib),
                                    correct="bias", min_weights=4096, permute=False, pattern=pattern,
                                    max_drop=max_drop, engine=False, force=True, certify=pattern == (2, 4),
                                    certify_samples=CALIB_SAMPLES), Progress(quiet=True))
        report = result.report
        summary = report["summary"]
        certificate = (report.get("certificate") or {}).get("summary") or {}
        return {
            "build_seconds": round(time.perf_counter() - started, 2),
            "macs_fraction": summary["sparse_layer_macs"] / summary["gemm_macs"],
            "sparse_layers": summary["sparse_layers"], "layers": summary["layers"],
            "calib_agreement": report["verification"]["sparse_vs_dense"][0]["top1_agreement"],
            "budget": report.get("budget"),
            "certified": certificate.get("certified_fraction"),
            "observed_unchanged": certificate.get("observed_unchanged_fraction"),
            "bound_looseness": certificate.get("median_looseness"),
            "size_ratio": report["compression"].get("ratio_vs_dense_fp16"),
            "accuracy": acc.onnx_accuracy(out / "model.onnx", ctx["test_x"], ctx["test_y"], threads=ctx["threads"]),
        }

    return cached_build_record(CACHE_DIR, key_data, ctx["fresh"],
                               {"model": spec.key, "max_drop": max_drop, "pattern": f"{pattern[0]}:{pattern[1]}"},
                               measure)


def mean_std(values, scale=100.0, digits=2) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _looseness(values) -> str:
    values = [v for v in values if v is not None]
    return f"{min(values):.2g} – {max(values):.2g}" if values else "-"


def md_table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="ignore cached build results")
    ap.add_argument("--output", default=str(BENCH / "results" / "budgets.md"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    started = time.time()
    header = [*run_header("budgets.py", args.threads), f"- sparsecompile sources hash {source_hash()}"]
    print("\n".join(header), flush=True)

    train_x, train_y = acc.fm_data.load("train")
    test_x, test_y = acc.fm_data.load("test")
    calibs, model_sha, calib_sha, dense = {}, {}, {}, {}
    for spec in SPECS:
        if not spec.pt2.exists():
            raise SystemExit(f"missing model {spec.pt2}: run benchmarks/accuracy.py first to train it")
        calibs[spec.key] = acc.calibration_file(spec, CALIB_SAMPLES, train_x, train_y, print)
        model_sha[spec.key], calib_sha[spec.key] = acc.sha256(spec.pt2), acc.sha256(calibs[spec.key])
        dense[spec.key] = acc.torch_accuracy(torch.export.load(str(spec.pt2)).module(), test_x, test_y)
        print(f"{spec.label}: dense top-1 {100 * dense[spec.key]:.2f}%", flush=True)
    ctx = {"model_sha": model_sha, "calib_sha": calib_sha, "threads": args.threads, "fresh": args.fresh,
           "test_x": test_x, "test_y": test_y}

    results = {}
    jobs = [(s, d, (2, 4)) for s in SPECS for d in MAX_DROPS] + [(s, None, p) for s in SPECS for p in PATTERNS
                                                                  if p != (2, 4)]
    for i, (spec, max_drop, pattern) in enumerate(jobs, 1):
        r = run_one(spec, calibs[spec.key], max_drop, pattern, ctx)
        results[(spec.key, max_drop, pattern)] = r
        what = f"[{i}/{len(jobs)}] {spec.key} max_drop={max_drop} pattern={pattern[0]}:{pattern[1]}"
        if r["error"]:
            print(f"{what}: ERROR {r['error'].splitlines()[0]}", flush=True)
        else:
            print(f"{what}: top-1 {100 * r['accuracy']:.2f}%, calib agreement {100 * r['calib_agreement']:.2f}%, "
                  f"sparse MACs {100 * r['macs_fraction']:.1f}%, build {r['build_seconds']}s", flush=True)

    def col(key, max_drop, pattern, field):
        r = results.get((key, max_drop, pattern))
        return None if r is None or r["error"] else r.get(field)

    def drop(key, max_drop, pattern):
        acc_ = col(key, max_drop, pattern, "accuracy")
        return None if acc_ is None else acc_ - dense[key]

    sections = []
    rows = []
    for max_drop in MAX_DROPS:
        p = (2, 4)
        rows.append([
            "none" if max_drop is None else f"{max_drop:g}",
            mean_std([col(s.key, max_drop, p, "macs_fraction") for s in SPECS], digits=1),
            mean_std([1 - col(s.key, max_drop, p, "calib_agreement") for s in SPECS if col(s.key, max_drop, p, "calib_agreement") is not None]),
            mean_std([col(s.key, max_drop, p, "accuracy") for s in SPECS]),
            mean_std([drop(s.key, max_drop, p) for s in SPECS]),
            mean_std([col(s.key, max_drop, p, "certified") for s in SPECS], digits=1),
            mean_std([col(s.key, max_drop, p, "observed_unchanged") for s in SPECS], digits=1),
            _looseness([col(s.key, max_drop, p, "bound_looseness") for s in SPECS]),
        ])
    sections.append(("`--max-drop` sweep (2:4, magnitude + bias): mean ± std over 4 models", md_table(
        ["--max-drop (pt)", "MACs in sparse layers (%)", "calib agreement drop (pt)", "test top-1 (%)",
         "test drop vs dense (pt)", "certified unchanged (%)", "observed unchanged (%)",
         "bound / actual change (median, range over models)"], rows)))
    per_model = []
    for s in SPECS:
        for max_drop in MAX_DROPS:
            r = results.get((s.key, max_drop, (2, 4)))
            if r is None or r["error"]:
                continue
            kept = ", ".join(e["layer"] for e in (r["budget"] or {}).get("reverted", [])) or "-"
            per_model.append([s.label, "none" if max_drop is None else f"{max_drop:g}",
                              f"{100 * r['macs_fraction']:.1f}", f"{r['sparse_layers']}/{r['layers']}",
                              f"{100 * (1 - r['calib_agreement']):.2f}", f"{100 * r['accuracy']:.2f}",
                              f"{100 * dense[s.key]:.2f}", kept])
    sections.append(("Per model", md_table(["model", "--max-drop", "sparse MACs (%)", "sparse layers",
                                            "calib drop (pt)", "test top-1 (%)", "dense (%)", "kept dense"],
                                           per_model)))
    rows = []
    for pattern in PATTERNS:
        rows.append([f"{pattern[0]}:{pattern[1]}",
                     mean_std([col(s.key, None, pattern, "accuracy") for s in SPECS]),
                     mean_std([drop(s.key, None, pattern) for s in SPECS]),
                     mean_std([col(s.key, None, pattern, "size_ratio") for s in SPECS], scale=1.0, digits=4)])
    sections.append(("N:M sweep (magnitude + bias, no budget): mean ± std over 4 models", md_table(
        ["pattern", "test top-1 (%)", "drop vs dense (pt)", "sparse layers vs dense fp16"], rows)))
    dense_row = mean_std([dense[s.key] for s in SPECS])
    text = ["# Accuracy budgets and N:M patterns (Fashion-MNIST CNNs)", "", *header,
            f"- Dense test top-1 (mean ± std over the 4 models): {dense_row}%",
            f"- Calibration: {CALIB_SAMPLES} stratified training images per model; test: 10,000 images",
            f"- Wall time: {time.time() - started:.0f} s", ""]
    for title, table in sections:
        text += [f"## {title}", "", table, ""]
    output = "\n".join(text)
    print(output)
    Path(args.output).write_text(output + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
