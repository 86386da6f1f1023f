"""Learned-mask build time against a magnitude build, on the shipped example (issue 19 item 1).

    python benchmarks/learned_speed.py                       # magnitude, default (auto) and gumbel builds
    python benchmarks/learned_speed.py --variants magnitude,gumbel --runs 2
    python benchmarks/learned_speed.py --variants 'magnitude;gumbel:max-steps=1500'   # a row with extra flags

Every variant is one ``sparsecompile build examples/fashion_mnist/model.pt2 --calib
examples/fashion_mnist/calib.npy`` subprocess (``--threads``, default 1), run ``--runs`` times with
the variants interleaved run by run, so machine load hits them alike. A variant is ``magnitude``,
``auto`` (the CLI default), ``gumbel`` or ``proxsparse``, optionally followed by ``:flag=value,...``
(``gumbel:max-steps=1500`` adds ``--max-steps 1500``; ``gumbel:learn-option=batch_size=32`` adds
``--learn-option batch_size=32``).

Per variant it prints the median wall time, the median CPU time of the build process, the CPU
seconds *other* processes used meanwhile (``/proc/stat``; well above 0 means the cores were shared
and wall time is inflated), the ratio of wall and CPU time to the magnitude build of the same run
(the issue's goal: a default gumbel build within 15x), the top-1 accuracy of the build's
``model.onnx`` on ``examples/fashion_mnist/eval.npz`` (2,000 images; dense for reference), and for
learned variants the steps taken and why training stopped. ``--output FILE`` also writes the table
as Markdown. The exit status never depends on timing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_time import busy_cpu_seconds  # noqa: E402
from common import ROOT, run_header  # noqa: E402

EXAMPLE = ROOT / "examples" / "fashion_mnist"
METHODS = ("magnitude", "auto", "gumbel", "proxsparse")


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``gumbel:max-steps=600,learn-option=batch_size=32`` -> ("gumbel", ["--max-steps", "600", ...])."""
    method, _, rest = text.partition(":")
    if method not in METHODS:
        raise SystemExit(f"unknown variant method '{method}'; valid: {', '.join(METHODS)}")
    flags: list[str] = [] if method == "auto" else ["--method", method]
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        flags += [f"--{key}"] + ([value] if value else [])
    return method, flags


def eval_data() -> tuple[np.ndarray, np.ndarray]:
    """The example's 2,000 evaluation images, normalised as its evaluate.py does, and their labels."""
    sys.path.insert(0, str(EXAMPLE))
    import data  # examples/fashion_mnist/data.py

    stored = np.load(EXAMPLE / "eval.npz")
    return data.normalize(stored["images"]), stored["labels"]


def top1(onnx_path: Path) -> float:
    import onnxruntime as ort

    images, labels = eval_data()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: images[i:i + 250]})[0] for i in range(0, len(images), 250)])
    return float((logits.argmax(1) == labels).mean() * 100)


def dense_top1() -> float:
    import torch

    images, labels = eval_data()
    module = torch.export.load(str(EXAMPLE / "model.pt2")).module()
    with torch.no_grad():
        logits = module(torch.from_numpy(images)).numpy()
    return float((logits.argmax(1) == labels).mean() * 100)


def run_build(flags: list[str], out: Path, threads: int) -> dict:
    command = [sys.executable, "-m", "sparsecompile", "build", str(EXAMPLE / "model.pt2"),
               "--calib", str(EXAMPLE / "calib.npy"), "--threads", str(threads), "-o", str(out), *flags]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy = busy_cpu_seconds()
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    busy_end = busy_cpu_seconds()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    record = {"wall": wall, "cpu": cpu, "rc": proc.returncode,
              "other": max(0.0, busy_end - busy - cpu) if busy is not None and busy_end is not None else None}
    if proc.returncode != 0:
        record["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return record
    report = json.loads((out / "report.json").read_text())
    learning = report.get("learning") or {}
    record.update(top1=top1(out / "model.onnx"), steps=learning.get("steps"), stop=learning.get("stop_reason"),
                  method=report.get("method"))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="magnitude,auto,gumbel",
                        help="variants separated by ',' (default magnitude,auto,gumbel), or by ';' when a variant "
                             "carries flags ('magnitude;gumbel:max-steps=600,learn-option=batch_size=32')")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, help="also write the table as Markdown here")
    args = parser.parse_args()
    texts = [t for t in (args.variants.split(";") if ";" in args.variants else args.variants.split(",")) if t]
    variants = [(text, *parse_variant(text)) for text in texts]
    if not any(method == "magnitude" for _, method, _ in variants):
        variants.insert(0, ("magnitude", *parse_variant("magnitude")))
    records: dict[str, list[dict]] = {text: [] for text, _, _ in variants}
    with tempfile.TemporaryDirectory(prefix="learned-speed-") as tmp:
        for run in range(args.runs):
            for text, _, flags in variants:
                out = Path(tmp) / f"{len(records[text])}-{text.replace(':', '_').replace('=', '_')}"
                record = run_build(flags, out, args.threads)
                records[text].append(record)
                shown = f"top-1 {record['top1']:.2f}%" if "top1" in record else f"FAILED: {record.get('error')}"
                print(f"run {run + 1}/{args.runs} {text}: {record['wall']:.1f} s wall, {record['cpu']:.1f} s CPU, "
                      f"other {record['other'] or 0:.0f} CPU s, {shown}", flush=True)
    base = records[next(text for text, method, _ in variants if method == "magnitude")]
    base_wall = statistics.median(r["wall"] for r in base)
    base_cpu = statistics.median(r["cpu"] for r in base)
    dense = dense_top1()
    lines = run_header("learned_speed.py", args.threads) + [
        f"- Shipped example (`examples/fashion_mnist`), {args.runs} run(s) per variant, interleaved; "
        f"top-1 on eval.npz (2,000 images), dense {dense:.2f}%", "",
        "| variant | wall s (median) | CPU s | other CPU s | wall / magnitude | CPU / magnitude | top-1 % | "
        "vs dense pt | steps | stopped by |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for text, method, _ in variants:
        rows = [r for r in records[text] if r["rc"] == 0]
        if not rows:
            lines.append(f"| {text} | failed: {records[text][0].get('error')} |||||||||")
            continue
        wall = statistics.median(r["wall"] for r in rows)
        cpu = statistics.median(r["cpu"] for r in rows)
        other = statistics.median(r["other"] or 0 for r in rows)
        acc = statistics.median(r["top1"] for r in rows)
        steps = ", ".join(str(r["steps"]) for r in rows if r.get("steps") is not None) or "-"
        stops = ", ".join(sorted({str(r["stop"]) for r in rows if r.get("stop")})) or "-"
        lines.append(f"| {text} | {wall:.1f} | {cpu:.1f} | {other:.0f} | {wall / base_wall:.1f}x | "
                     f"{cpu / base_cpu:.1f}x | {acc:.2f} | {acc - dense:+.2f} | {steps} | {stops} |")
    print("\n".join(lines))
    if args.output:
        args.output.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
