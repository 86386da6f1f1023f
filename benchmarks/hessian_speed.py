"""Wall time of the hessian mask stage: one sparsecompile source tree against another.

    python benchmarks/hessian_speed.py --baseline-src DIR [--current-src DIR] [--model M.pt2 --calib C.npy]
                                       [--calib-samples N] [--threads 1 2] [--repeats 3]

``--baseline-src`` and ``--current-src`` (default: this checkout) are whole source trees holding
``sparsecompile/`` -- e.g. ``git worktree add -f /tmp/base_src efb7e9d --detach`` for the commit
before the vectorised hessian, and ``git worktree add -f /tmp/cur_src HEAD --detach``, so other
people's uncommitted edits in the working tree are not timed. Each build
(``--method hessian --correct bias --max-drop none``, target a100, like ``sparsecompile build``)
runs in its own process with ``PYTHONPATH`` set to its tree and ``OMP_NUM_THREADS`` set; baseline
and current alternate, the order flipping every repeat. Printed per run: the ``masks`` stage
(statistics + mask selection, ``report.json`` timings), the build total, the build process's CPU
seconds and the load average; per variant and thread count the medians, the ratios current /
baseline (masks stage and total), whether the saved masks are byte-identical, and the
sparse-vs-dense error and top-1 agreement on the calibration set. The default model is CREPE tiny
(``benchmarks/pretrained_crepe.py`` writes it to ``benchmarks/.cache/crepe/``), else the shipped example.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CREPE = ROOT / "benchmarks" / ".cache" / "crepe"

CHILD = r"""
import hashlib, json, sys, warnings
warnings.filterwarnings("ignore")
import sparsecompile
from sparsecompile.build import BuildOptions, build
from sparsecompile.progress import Progress
model, calib, samples, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
options = BuildOptions(model=model, calib=calib, calib_samples=int(samples) if samples != "all" else None,
                       method="hessian", correct="bias", max_drop=None, target="a100", output=out + "/build",
                       save_masks=out + "/masks", force=True)
report = build(options, Progress(quiet=True)).report
check = report["verification"]["sparse_vs_dense"][0]
print("RESULT " + json.dumps({
    "masks_s": report["timings"]["masks"], "total_s": report["timings"]["total"],
    "masks_sha": hashlib.sha256(open(out + "/masks", "rb").read()).hexdigest()[:16],
    "relative_error": check["relative_error"], "top1": check.get("top1_agreement"),
    "sparse_layers": report["summary"].get("sparse_layers"), "source": sparsecompile.__file__}))
"""


def revision(tree: Path) -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "sparsecompile"], cwd=tree, capture_output=True,
                           text=True).stdout.strip()
    return (done.stdout.strip() or "not a git checkout") + (" + uncommitted edits" if dirty else "")


def run_once(source: Path, threads: int, args, where: Path) -> dict:
    out = Path(tempfile.mkdtemp(dir=where))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(source)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, "-c", CHILD, args.model, args.calib, str(args.calib_samples or "all"),
                           str(out)], env=env, capture_output=True, text=True, cwd=where)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    shutil.rmtree(out, ignore_errors=True)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            record = json.loads(line[len("RESULT "):])
            record["cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
            if not Path(record["source"]).resolve().is_relative_to(source):
                raise RuntimeError(f"the build imported {record['source']}, not the sources in {source}")
            return record
    raise RuntimeError(f"build failed ({source}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    crepe = CREPE / "crepe-tiny.pt2"
    default_model = crepe if crepe.exists() else ROOT / "examples" / "fashion_mnist" / "model.pt2"
    default_calib = (CREPE / "calib-512-s0.npy") if crepe.exists() else ROOT / "examples" / "fashion_mnist" / "calib.npy"
    parser.add_argument("--model", default=str(default_model))
    parser.add_argument("--calib", default=str(default_calib))
    parser.add_argument("--calib-samples", type=int, default=None, help="use the first N calibration samples")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-src", required=True, metavar="DIR",
                        help="source tree timed as the baseline (holds sparsecompile/, e.g. a git worktree)")
    parser.add_argument("--current-src", default=str(ROOT), metavar="DIR",
                        help="source tree timed as current (default: this checkout; a git worktree of HEAD keeps "
                             "uncommitted edits out)")
    args = parser.parse_args(argv)
    args.model, args.calib = str(Path(args.model).resolve()), str(Path(args.calib).resolve())
    sources = {"baseline": Path(args.baseline_src).resolve(), "current": Path(args.current_src).resolve()}
    for name, tree in sources.items():
        if not (tree / "sparsecompile" / "build.py").is_file():
            parser.error(f"--{name}-src '{tree}' holds no sparsecompile/build.py")
    for name, tree in sources.items():
        print(f"{name}: {tree} ({revision(tree)})")
    print(f"model {args.model}\ncalib {args.calib} (samples: {args.calib_samples or 'all'})\n"
          f"load average before: {os.getloadavg()}", flush=True)
    results: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        for repeat in range(args.repeats):
            for threads in args.threads:
                order = ["baseline", "current"] if repeat % 2 == 0 else ["current", "baseline"]
                for name in order:
                    record = run_once(sources[name], threads, args, where)
                    results.setdefault((name, threads), []).append(record)
                    print(f"  repeat {repeat} threads {threads} {name:8s} masks {record['masks_s']:7.2f}s "
                          f"total {record['total_s']:7.2f}s cpu {record['cpu_s']:7.1f}s masks sha {record['masks_sha']} "
                          f"rel.err {record['relative_error']:.6f} top1 {record['top1']}  load {os.getloadavg()[0]:.1f}",
                          flush=True)
    print(f"load average after: {os.getloadavg()}")
    print("\n| threads | variant | runs | median masks stage (s) | median build (s) | masks stage ratio | build ratio "
          "| masks identical |")
    print("|---|---|---|---|---|---|---|---|")
    for threads in args.threads:
        base = results[("baseline", threads)]
        base_median = statistics.median(r["masks_s"] for r in base)
        base_total = statistics.median(r["total_s"] for r in base)
        for name in ("baseline", "current"):
            runs = results[(name, threads)]
            median = statistics.median(r["masks_s"] for r in runs)
            same = {r["masks_sha"] for r in runs} == {r["masks_sha"] for r in base} and len({r["masks_sha"] for r in runs}) == 1
            total = statistics.median(r["total_s"] for r in runs)
            print(f"| {threads} | {name} | {len(runs)} | {median:.2f} | {total:.2f} | "
                  f"{median / base_median:.3f} | {total / base_total:.3f} | {'yes' if same else 'NO'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
