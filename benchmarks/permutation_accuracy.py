"""Does channel permutation change top-1 after 2:4 masking? Paired builds with and without it.

    python benchmarks/permutation_accuracy.py [--fresh] [--threads 2] [--output FILE.md]

Models (the same four as ``benchmarks/accuracy.py``, which this script imports as a module):
the shipped ``examples/fashion_mnist/model.pt2`` (FashionResNet 32/64/128, seed 0, 9 epochs)
and the cached ``benchmarks/.cache/models`` ones (16/32/64 seeds 0 and 1, 32/64/128 seed 1,
5 epochs each; nothing is trained here -- a missing model is an error). Calibration: 256
stratified training images per model (``accuracy.calibration_file``, cached).

For every model x method {magnitude, hessian} x correct {bias, none} x permute {False, True}
one ``sparsecompile.build.build`` (target a100, 2:4, min_weights 4096, permute_budget 10 s,
force) and the top-1 of its ``model.onnx`` on the full 10,000-image Fashion-MNIST test set
(ONNX Runtime CPU, ``--threads`` intra-op threads). Recorded per build: top-1, the report's
timings (total and ``permute``), the mean ``retained_magnitude`` over the sparse layers
(share of each layer's |w| the mask keeps, plain mean over layers), and from
``report["permutation"]`` the number of permuted channel groups and the mean efficacy of the
searched groups.

Results are cached as JSON in ``benchmarks/.cache/permutation_accuracy/``, keyed by the
model and calibration sha256, method, correct, permute and a hash of ``sparsecompile/**/*.py``,
so a rerun with unchanged sources reuses them; ``--fresh`` ignores the cache.

Output: per-model tables and a summary (mean +- sample std over the 4 models of top-1
without / with permutation and of the paired difference, plus the mean retained |w|),
printed and written to ``benchmarks/results/permutation_accuracy.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import accuracy as acc  # noqa: E402  (benchmarks/accuracy.py; puts the repo root on sys.path)
import torch  # noqa: E402

from sparsecompile.build import BuildOptions, build  # noqa: E402
from common import cached_build_record, source_hash  # noqa: E402  (benchmarks/common.py)
from sparsecompile.progress import Progress  # noqa: E402

ROOT = BENCH.parent
CACHE_DIR = acc.CACHE / "permutation_accuracy"
METHODS = ["magnitude", "hessian"]
CORRECTIONS = ["bias", "none"]
PERMUTE = [False, True]
CALIB_SAMPLES = 256
BUDGET = 10.0
RESULT_VERSION = 1  # bump when the meaning of a cached result changes

SPECS = acc.standard_specs()


def summarize_report(report: dict) -> dict:
    sparse = [r for r in report["layers"] if r.get("status") == "sparse" and "retained_magnitude" in r]
    perm = report.get("permutation", {}) or {}
    groups = perm.get("groups", []) if perm.get("enabled") else []
    searched = [g for g in groups if "efficacy" in g]
    permuted = [g for g in groups if g.get("status") == "permuted"]
    return {
        "sparse_layers": len(sparse),
        "retained_mean": statistics.fmean(r["retained_magnitude"] for r in sparse) if sparse else None,
        "retained_per_layer": {r["name"]: round(r["retained_magnitude"], 6) for r in sparse},
        "permutation_enabled": bool(perm.get("enabled")),
        "groups": len(groups),
        "searched_groups": len(searched),
        "permuted_groups": len(permuted),
        "efficacy_mean_searched": statistics.fmean(g["efficacy"] for g in searched) if searched else None,
        "efficacy_mean_permuted": statistics.fmean(g["efficacy"] for g in permuted) if permuted else None,
        "budget_exhausted_groups": sum(1 for g in searched if g.get("budget_exhausted")),
        "permutation_notes": [n for n in report.get("notes", []) if "permut" in n.lower()],
    }


def run_one(spec, calib, method, correct, permute, ctx) -> dict:
    src = source_hash()  # per build: the tree may be edited by others during the run
    key_data = {"v": RESULT_VERSION, "model": ctx["model_sha"][spec.key], "calib": ctx["calib_sha"][spec.key],
                "method": method, "correct": correct, "permute": permute, "permute_budget": BUDGET,
                "min_weights": 4096, "target": "a100", "source": src, "threads": ctx["threads"]}
    record = {"model": spec.key, "method": method, "correct": correct, "permute": permute, "key": key_data}

    def measure(out: Path) -> dict:
        options = BuildOptions(model=str(spec.pt2), output=str(out), target="a100", calib=str(calib),
                               method=method, correct=correct, min_weights=4096, permute=permute,
                               permute_budget=BUDGET, force=True)
        wall = time.perf_counter()
        result = build(options, Progress(quiet=True))
        fields = {"build_wall": round(time.perf_counter() - wall, 3)}
        report = result.report
        fields["timings"] = report["timings"]
        fields["build_seconds"] = report["timings"]["total"]
        fields["permute_seconds"] = report["timings"].get("permute")
        fields.update(summarize_report(report))
        fields["accuracy"] = acc.onnx_accuracy(out / "model.onnx", ctx["test_x"], ctx["test_y"],
                                               threads=ctx["threads"])
        return fields

    return cached_build_record(CACHE_DIR, key_data, ctx["fresh"], record, measure)


def paired_t(mean: float, se: float, df: int) -> tuple[float, float | None]:
    """t statistic and two-sided p of a one-sample t-test of the paired differences (p None without scipy)."""
    if se == 0:
        return (float("inf") if mean else 0.0), (0.0 if mean else 1.0)
    t = mean / se
    try:
        from scipy import stats
    except ImportError:
        return t, None
    return t, float(2 * stats.t.sf(abs(t), df))


def ms(values, scale=100.0, signed=False, digits=2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "ERR"
    mean = statistics.fmean(values) * scale
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    if len(values) > 1:
        text += f" ± {statistics.stdev(values) * scale:.{digits}f}"
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads (default 2)")
    ap.add_argument("--fresh", action="store_true", help="ignore cached build results")
    ap.add_argument("--corrections", nargs="+", default=CORRECTIONS, choices=["bias", "none", "bn"],
                    help="--correct modes to compare (default: bias none)")
    ap.add_argument("--output", help="Markdown output (default benchmarks/results/permutation_accuracy.md)")
    args = ap.parse_args()
    CORRECTIONS[:] = args.corrections
    command = "python benchmarks/permutation_accuracy.py" + "".join(f" {a}" for a in sys.argv[1:])

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    started = time.time()
    start_load = os.getloadavg()

    def log(msg=""):
        print(msg, flush=True)

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    import onnxruntime as ort
    machine = (f"{os.cpu_count()}-core CPU ({cpu}), torch {torch.__version__} ({torch.get_num_threads()} threads), "
               f"onnxruntime {ort.__version__} (CPU, {args.threads} intra-op threads), "
               f"Python {platform.python_version()}")
    date = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    src_start = source_hash()
    log(f"date: {date}")
    log(f"machine: {machine}")
    log(f"command: {command}")
    log(f"sparsecompile sources hash {src_start}; load average at start {start_load[0]:.2f}")

    train_x, train_y = acc.fm_data.load("train")
    test_x, test_y = acc.fm_data.load("test")
    log(f"data: {len(train_x)} train / {len(test_x)} test images (full test set for every accuracy)")

    calibs, model_sha, calib_sha, dense = {}, {}, {}, {}
    for spec in SPECS:
        if not spec.pt2.exists():
            raise SystemExit(f"missing model {spec.pt2}: run benchmarks/accuracy.py first to train it")
        calibs[spec.key] = acc.calibration_file(spec, CALIB_SAMPLES, train_x, train_y, print)
        model_sha[spec.key] = acc.sha256(spec.pt2)
        calib_sha[spec.key] = acc.sha256(calibs[spec.key])
        dense[spec.key] = acc.torch_accuracy(torch.export.load(str(spec.pt2)).module(), test_x, test_y)
        log(f"{spec.label}: dense top-1 {100 * dense[spec.key]:.2f}%  calib {calibs[spec.key].relative_to(ROOT)}")

    ctx = {"model_sha": model_sha, "calib_sha": calib_sha, "threads": args.threads, "fresh": args.fresh,
           "test_x": test_x, "test_y": test_y}
    jobs = [(s, m, c, p) for s in SPECS for m in METHODS for c in CORRECTIONS for p in PERMUTE]
    results = {}
    for i, (spec, method, correct, permute) in enumerate(jobs, 1):
        r = run_one(spec, calibs[spec.key], method, correct, permute, ctx)
        results[(spec.key, method, correct, permute)] = r
        head = f"[{i}/{len(jobs)}] {spec.key} {method} correct={correct} permute={permute}"
        if r["error"]:
            log(f"{head}: ERROR {r['error'].splitlines()[0]}")
            continue
        perm = (f", permute {r['permute_seconds']:.1f}s, {r['permuted_groups']}/{r['groups']} groups permuted, "
                f"efficacy {r['efficacy_mean_searched']:.3f}"
                + (f", {r['budget_exhausted_groups']} hit the budget" if r["budget_exhausted_groups"] else "") if r["permute"] and r["efficacy_mean_searched"] is not None
                else (f", {r['permuted_groups']}/{r['groups']} groups permuted" if r["permute"] else ""))
        log(f"{head}: top-1 {100 * r['accuracy']:.2f}%, retained |w| {r['retained_mean']:.4f}, "
            f"build {r['build_seconds']:.1f}s{perm}" + (" [cached]" if r.get("cached") else ""))

    src_end = source_hash()
    used = sorted({r["key"]["source"] for r in results.values()})
    total = time.time() - started
    end_load = os.getloadavg()

    def get(key, method, correct, permute, field="accuracy"):
        r = results.get((key, method, correct, permute))
        return None if r is None or r["error"] else r.get(field)

    def diff(key, method, correct, field="accuracy"):
        a, b = get(key, method, correct, False, field), get(key, method, correct, True, field)
        return None if a is None or b is None else b - a

    sections = []  # (title, headers, rows, note)

    # ---- summary
    summary_rows, diffs_all = [], []
    for method in METHODS:
        for correct in CORRECTIONS:
            d = [diff(s.key, method, correct) for s in SPECS]
            diffs_all += [x for x in d if x is not None]
            ups = sum(1 for x in d if x is not None and x > 0)
            downs = sum(1 for x in d if x is not None and x < 0)
            summary_rows.append([
                f"{method} + {correct}",
                ms([get(s.key, method, correct, False) for s in SPECS]),
                ms([get(s.key, method, correct, True) for s in SPECS]),
                ms(d, signed=True),
                f"{ups}/{downs}/{len(SPECS) - ups - downs}",
                ms([get(s.key, method, correct, False, "retained_mean") for s in SPECS], scale=1.0, digits=4),
                ms([get(s.key, method, correct, True, "retained_mean") for s in SPECS], scale=1.0, digits=4),
            ])
    summary_headers = ["method + correct", "top-1 no perm (%)", "top-1 perm (%)", "perm − no perm (pp)",
                       "models up/down/equal", "retained |w| no perm", "retained |w| perm"]
    sections.append((f"Summary: mean ± sample std over {len(SPECS)} models", summary_headers, summary_rows,
                     "Paired difference = top-1 with permutation − top-1 without, same model, method, correction "
                     "and calibration set; its std is over the 4 models. Retained |w| = plain mean over the "
                     "sparse layers of the share of the layer's |w| that the 2:4 mask keeps."))

    # ---- per model
    for spec in SPECS:
        rows = []
        for method in METHODS:
            for correct in CORRECTIONS:
                a, b = get(spec.key, method, correct, False), get(spec.key, method, correct, True)
                rp = results[(spec.key, method, correct, True)]
                ra = results[(spec.key, method, correct, False)]
                fmt = lambda x: "ERR" if x is None else f"{100 * x:.2f}"  # noqa: E731
                rows.append([
                    f"{method} + {correct}", fmt(a), fmt(b),
                    "n/a" if a is None or b is None else f"{100 * (b - a):+.2f}",
                    "ERR" if ra["error"] else f"{ra['retained_mean']:.4f}",
                    "ERR" if rp["error"] else f"{rp['retained_mean']:.4f}",
                    "ERR" if rp["error"] else f"{rp['permuted_groups']}/{rp['groups']}",
                    "ERR" if rp["error"] or rp["efficacy_mean_searched"] is None else f"{rp['efficacy_mean_searched']:.3f}",
                    "ERR" if ra["error"] else f"{ra['build_seconds']:.1f}",
                    "ERR" if rp["error"] else f"{rp['build_seconds']:.1f} ({rp['permute_seconds'] or 0:.1f})",
                ])
        ok = next((r for r in results.values() if r["model"] == spec.key and not r["error"]), None)
        note = (f"dense top-1 {100 * dense[spec.key]:.2f}% (torch, exported program)"
                + (f"; {ok['sparse_layers']} sparse layers" if ok else ""))
        sections.append((f"Model {spec.label}",
                         ["method + correct", "top-1 no perm", "top-1 perm", "Δ (pp)", "retained |w| no perm",
                          "retained |w| perm", "groups permuted", "mean efficacy", "build s no perm",
                          "build s perm (permute)"], rows, note))

    # ---- verdict text
    dense_mean = statistics.fmean(dense[s.key] for s in SPECS)
    findings = []
    for method in METHODS:
        for correct in CORRECTIONS:
            d = [diff(s.key, method, correct) for s in SPECS]
            d = [x for x in d if x is not None]
            if len(d) < 2:
                continue
            m, sd = statistics.fmean(d), statistics.stdev(d)
            se = sd / len(d) ** 0.5
            t, p = paired_t(m, se, len(d) - 1)
            ups = sum(1 for x in d if x > 0)
            a = [get(s.key, method, correct, False) for s in SPECS]
            b = [get(s.key, method, correct, True) for s in SPECS]
            gap = ""
            if None not in a and None not in b:
                gap = (f" Mean drop vs dense ({100 * dense_mean:.2f}%): {100 * (statistics.fmean(a) - dense_mean):+.2f} pp "
                       f"without, {100 * (statistics.fmean(b) - dense_mean):+.2f} pp with permutation.")
            if p is not None and p < 0.05:
                verdict = ("larger than the model-to-model spread of the paired difference (paired t-test p < 0.05), "
                           "but with 4 models this is weak evidence")
            elif abs(m) <= sd:
                verdict = "within the model-to-model noise (|mean| ≤ std of the paired differences)"
            else:
                verdict = ("the sign is consistent but the paired t-test does not reach p < 0.05 with 4 models: "
                           "suggestive, not established")
            findings.append(
                f"- **{method} + {correct}**: paired difference {100 * m:+.2f} ± {100 * sd:.2f} pp (mean ± std over "
                f"{len(d)} models; standard error {100 * se:.2f} pp; t = {t:.2f}, df = {len(d) - 1}"
                + (f", two-sided p = {p:.2f}" if p is not None else "") + f"); {ups}/{len(d)} models up; {verdict}."
                + gap)
    diffs_all = [x for x in (diff(s.key, m, c) for s in SPECS for m in METHODS for c in CORRECTIONS) if x is not None]
    if diffs_all:
        findings.append(
            f"- All {len(diffs_all)} paired differences together (not independent: the same 4 models recur): mean "
            f"{100 * statistics.fmean(diffs_all):+.2f} pp, range {100 * min(diffs_all):+.2f} to "
            f"{100 * max(diffs_all):+.2f} pp; {sum(1 for x in diffs_all if x > 0)} up, "
            f"{sum(1 for x in diffs_all if x < 0)} down, {sum(1 for x in diffs_all if x == 0)} equal.")
    ret = [diff(s.key, m, c, "retained_mean") for s in SPECS for m in METHODS for c in CORRECTIONS]
    ret = [x for x in ret if x is not None]
    if ret:
        findings.append(
            f"- Retained |w| (mean over sparse layers) rises by {statistics.fmean(ret):+.4f} on average "
            f"(range {min(ret):+.4f} to {max(ret):+.4f}) with permutation, in every build.")

    perm_ok = [r for r in results.values() if r["permute"] and not r["error"]]
    exhausted = sum(r["budget_exhausted_groups"] for r in perm_ok)
    searched = sum(r["searched_groups"] for r in perm_ok)
    errors = [(k, r) for k, r in results.items() if r["error"]]
    n_cached = sum(1 for r in results.values() if r.get("cached"))

    # ---- print
    log()
    for title, headers, rows, note in sections:
        log(title)
        log(acc.text_table(headers, rows))
        if note:
            log(f"  {note}")
        log()
    for line in findings:
        log(line)
    for (key, method, correct, permute), r in errors:
        log(f"ERROR {key} {method} correct={correct} permute={permute}: {r['error']}")
    if len(used) > 1 or src_end != src_start:
        log(f"WARNING: sparsecompile/ sources changed during the run ({src_start} -> {src_end}); builds used "
            f"{len(used)} version(s): {', '.join(used)}")
    log(f"total runtime {total:.0f}s ({total / 60:.1f} min); {len(results)} builds ({n_cached} from cache); "
        f"load average start {start_load[0]:.2f}, end {end_load[0]:.2f}")

    # ---- markdown
    out = Path(args.output) if args.output else acc.RESULTS / "permutation_accuracy.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    md = ["# Channel permutation vs top-1 after 2:4 masking", "",
          f"- date: {date}",
          f"- machine: {machine}; shared with other jobs (load average {start_load[0]:.2f} at start, "
          f"{end_load[0]:.2f} at end), so build times are inflated",
          f"- command: `{command}`",
          f"- total runtime: {total:.0f} s ({total / 60:.1f} min), {len(results)} builds ({n_cached} reused from "
          f"`benchmarks/.cache/permutation_accuracy`)",
          f"- sparsecompile sources hash (sha256 of sparsecompile/**/*.py): `{src_start}` at start, `{src_end}` at "
          f"end; builds ran on {len(used)} version(s): {', '.join(f'`{h}`' for h in used)}",
          f"- models: {'; '.join(f'{s.label} (dense {100 * dense[s.key]:.2f}%)' for s in SPECS)}",
          f"- calibration: {CALIB_SAMPLES} normalized training images per model, stratified by class "
          "(`accuracy.calibration_file`)",
          f"- builds: target a100, 2:4, min_weights 4096, sequential, permute_budget {BUDGET:g} s per group; "
          "accuracy = `model.onnx` on ONNX Runtime CPU, full 10,000-image Fashion-MNIST test set",
          "- 'mean efficacy' = mean over the searched channel groups of the share of the gap between the "
          "plain 2:4 kept magnitude and the unstructured bound that the permutation closes (report "
          "`permutation.groups[].efficacy`); hessian needs calibration statistics, so its permutation "
          "search also scores |w| (`MaskMethod.permutation_importance`): both methods get the same channel "
          "order, which is why the efficacy columns match", ""]
    md += ["## What the numbers show", ""] + findings + [
        "", "Reading (the last two sentences describe this run's numbers): the paired difference compares builds of the same model, so model-to-model variation in "
        "top-1 cancels; its std over the 4 models is the noise yardstick used above. Large gains appear "
        "where masking without a statistics correction loses many points (correct = none); with "
        "correct = bias (what `--correct auto` picks when calibration data is given) the change is a few "
        "tenths of a point, the same order as its model-to-model std.", "",
        "Caveats: 4 models of one small architecture family (FashionResNet, 4-7 sparse layers) on one data "
        "set is a small sample, and the t-test with df = 3 has little power; the differences are on a "
        "fixed 10,000-image test set (0.01 pp = 1 image); the permutation search is time-budgeted "
        f"({BUDGET:g} s per group), so on a busier machine it could stop earlier and find other orders "
        f"({exhausted} of {searched} searched groups hit the budget in this run).", ""]
    for title, headers, rows, note in sections:
        esc = lambda cells: [str(c).replace("|", "\\|") for c in cells]  # noqa: E731 - '|w|' in cells
        md += [f"## {title}", "", acc.md_table(esc(headers), [esc(r) for r in rows]), ""]
        if note:
            md += [note, ""]
    if errors:
        md += ["## Errors", ""]
        for (key, method, correct, permute), r in errors:
            md.append(f"- {key} {method} correct={correct} permute={permute}: `{r['error']}`")
        md.append("")
    out.write_text("\n".join(md))
    log(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
