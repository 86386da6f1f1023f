"""Build-time benchmark: a ResNet-50-sized model through the whole sparsecompile build.

    python benchmarks/build_time.py [--runs 3] [--threads 2] [--correct bias] [--calib-samples 8]
                                    [--baseline-src DIR] [--keep DIR] [--wait-idle SECONDS] [--permute]
    python benchmarks/build_time.py --sweep 8,32,64 [--threads 1]   # time against calibration samples

What it does:

1. Builds a ResNet-50-shaped network (bottleneck blocks [3, 4, 6, 3], widths
   64/128/256/512 with 4x expansion, BatchNorm, ReLU, residual adds, a
   1000-class Linear head; ~25.5M parameters) with seeded random weights and
   randomised BatchNorm running statistics, so folding BN is not a no-op.
2. Exports it once with ``torch.export`` (dynamic batch dimension) to
   ``model.pt2`` and writes a ``--calib-samples`` (default 8) calibration file
   ``calib.npy``. None of this is timed.
3. Runs ``sparsecompile.build.build`` ``--runs`` times (magnitude 2:4 masks,
   ``--correct`` (default bias, the CLI's default with calibration data), target
   a100, ONNX export and the ONNX Runtime check included), each in a fresh Python
   process (so every build pays the imports and one-off set-up, as the CLI does)
   with ``--threads`` torch threads and ``OMP_NUM_THREADS`` set to match.
   With ``--baseline-src DIR`` (a checkout of another commit, e.g. a ``git
   worktree``) the same builds also run from DIR's sources, alternating
   baseline and current run by run (the order flips every run), so a machine
   load that changes over time hits both alike.
4. Prints per run the wall time, the build process's CPU time, ``other`` (CPU
   seconds other processes used meanwhile: contention) and peak RSS; per variant
   a table of the report's per-stage timings with medians; the median against
   the 30 s target (PASS/MISS, informational: the exit status never depends on
   timing); with a baseline, the ratios current/baseline of the median wall
   time, of the median CPU time and per stage, and whether ``model.onnx``,
   ``weights.safetensors`` and ``model.pt2`` are byte-identical between the two.
5. ``--sweep 8,32,64`` instead runs one build (current sources) per calibration
   set size and prints the stage table and the added seconds per sample
   between consecutive sizes: linear growth shows as a flat per-sample cost.
6. Prints the compressed size of the sparse layers relative to their dense
   fp16 size (the 2:4 format's floor is 0.5625), the number of sparse and
   dense layers, and the size of ``model.onnx``.

This needs no torchvision: the model is defined below in plain torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

# Make `import sparsecompile` work when run from a checkout without installing; a --worker imports the
# sources it was told to time (--src) instead.
_SRC = (sys.argv[sys.argv.index("--src") + 1] if "--worker" in sys.argv and "--src" in sys.argv[:-1]
        else str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, _SRC)

import sparsecompile  # noqa: E402

TARGET_SECONDS = 30.0
FORMAT_FLOOR = 0.5625  # (2 * 16 + 4) / (4 * 16): 2:4 values in fp16 plus 2-bit indices
STAGES = ["load", "normalize", "permute", "masks", "verify", "onnx", "onnxruntime", "compress", "report"]
SEED = 0


# --------------------------------------------------------------------------- model


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride) -> 1x1 expand, plus a shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    def __init__(self, blocks=(3, 4, 6, 3), widths=(64, 128, 256, 512), num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages = []
        in_channels = 64
        for index, (count, width) in enumerate(zip(blocks, widths)):
            stride = 1 if index == 0 else 2
            layers = []
            for block in range(count):
                layers.append(Bottleneck(in_channels, width, stride if block == 0 else 1))
                in_channels = width * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def make_model() -> nn.Module:
    """Random weights (default init) and random BN statistics/affine, so the fold changes weights."""
    model = ResNet50()
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(c, generator=generator))
                module.weight.copy_(0.5 + 0.5 * torch.rand(c, generator=generator))
                module.bias.copy_(0.1 * torch.randn(c, generator=generator))
    return model.eval()


# --------------------------------------------------------------------------- setup (untimed)


def seed_everything(seed: int = SEED) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def export_model(model: nn.Module, batch: int, path: Path) -> int:
    """torch.export with a dynamic batch dim; returns the example batch actually used."""
    for example_batch in dict.fromkeys([batch, max(batch, 2)]):
        x = torch.randn(example_batch, 3, 224, 224, generator=torch.Generator().manual_seed(SEED))
        dynamic_shapes = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
        try:
            with torch.no_grad():
                program = torch.export.export(model, (x,), dynamic_shapes=dynamic_shapes)
        except Exception as exc:  # noqa: BLE001 - size-1 dims get specialised by torch.export
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            print(f"note: export with batch {example_batch} failed ({type(exc).__name__}: {first}); retrying with batch 2")
            continue
        torch.export.save(program, str(path))
        return example_batch
    raise SystemExit("error: could not export the benchmark model with a dynamic batch")


# --------------------------------------------------------------------------- reporting


def source_revision() -> str:
    """The git commit of the sparsecompile being measured (+dirty if its sources are modified)."""
    root = Path(sparsecompile.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "sparsecompile"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + ("+dirty" if dirty else "")


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes on the machine have used (Linux /proc/stat), or None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, idle, iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    except (OSError, ValueError, IndexError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_until_idle(max_seconds: float, window: float = 5.0, threshold: float = 0.10) -> bool:
    """Wait (up to ``max_seconds``) for a ``window`` in which the machine is less than ``threshold`` busy."""
    deadline = time.monotonic() + max_seconds
    cpus = os.cpu_count() or 1
    while True:
        before = busy_cpu_seconds()
        if before is None:
            return False
        time.sleep(window)
        if (busy_cpu_seconds() - before) / (window * cpus) < threshold:
            return True
        if time.monotonic() >= deadline:
            return False


def fmt_bytes(count: int) -> str:
    return f"{count / 2**20:.1f} MiB ({count:,} B)"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths)))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))


def build_once(args) -> dict:
    """One timed build in this process (``--worker``): the sparsecompile on ``sys.path`` builds; returns a summary."""
    from sparsecompile.build import BuildOptions, build
    from sparsecompile.progress import Progress

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    seed_everything()
    options = BuildOptions(
        model=args.model, output=args.out, target="a100", method="magnitude", calib=args.calib,
        error_samples=8, seed=SEED, correct=args.correct, permute=args.permute,
    )
    busy_start = busy_cpu_seconds()
    cpu_start, start = time.process_time(), time.perf_counter()
    result = build(options, Progress(quiet=True))
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    busy_end = busy_cpu_seconds()
    other = max(0.0, busy_end - busy_start - cpu) if busy_start is not None and busy_end is not None else None
    report = result.report
    out = Path(args.out)
    return {
        "wall": wall, "cpu": cpu, "other": other, "timings": report["timings"],
        "peak_rss_mib": report.get("resources", {}).get("peak_rss_mib")
        or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "revision": source_revision(),
        "hashes": {name: file_sha256(out / name) for name in ("model.onnx", "weights.safetensors", "model.pt2")
                   if (out / name).is_file()},
        "summary": report["summary"], "compression": report.get("compression", {}),
        "onnx_bytes": (out / "model.onnx").stat().st_size,
        "sidecars": {p.name: p.stat().st_size for p in out.iterdir()
                     if p.name.startswith("model.onnx") and p.name != "model.onnx"},
        "options": report.get("options", {}), "method": report.get("method"),
        "agreement": report["verification"]["sparse_vs_dense"][0]["relative_error"],
        "ort": report["verification"]["onnxruntime_vs_torch"][0]["relative_error"],
    }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_worker(src: Path, model: Path, calib: Path, out: Path, args) -> dict:
    """One build in a fresh Python process (imports and one-off set-up included, as the CLI pays them)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--src", str(src), "--model", str(model),
               "--calib", str(calib), "--out", str(out), "--threads", str(args.threads), "--correct", args.correct]
    if args.permute:
        command.append("--permute")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(src))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"error: the build with sources {src} failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def stage_table(label: str, results: list[dict], stages: list[str]) -> list[float]:
    """Print one variant's per-run stage timings and medians; returns the median row (stages, total, wall)."""
    rows = []
    for index, r in enumerate(results, 1):
        rows.append([f"run {index}"] + [f"{r['timings'].get(s, 0.0):.2f}" for s in stages]
                    + [f"{r['timings']['total']:.2f}", f"{r['wall']:.2f}", f"{r['cpu']:.1f}",
                       "n/a" if r["other"] is None else f"{r['other']:.1f}", f"{r['peak_rss_mib']:.0f}"])
    medians = [statistics.median(r["timings"].get(s, 0.0) for r in results) for s in stages]
    medians += [statistics.median(r["timings"]["total"] for r in results), statistics.median(r["wall"] for r in results)]
    rows.append(["median"] + [f"{v:.2f}" for v in medians]
                + [f"{statistics.median(r['cpu'] for r in results):.1f}",
                   f"{statistics.median(r['other'] or 0.0 for r in results):.1f}",
                   f"{statistics.median(r['peak_rss_mib'] for r in results):.0f}"])
    print(f"{label} ({results[0]['revision']}):")
    print_table(["run"] + stages + ["total", "wall", "cpu", "other", "rss MiB"], rows)
    print()
    return medians


def run_sweep(args, work: Path, model_path: Path, here: Path) -> None:
    """Build time against calibration set size (current sources, one build per size): time should grow
    linearly, so the per-sample cost between consecutive sizes should stay flat."""
    sizes = sorted({int(v) for v in args.sweep.split(",")})
    generator = torch.Generator().manual_seed(SEED + 1)
    pool = torch.randn(max(sizes), 3, 224, 224, generator=generator).numpy().astype(np.float32)
    rows, points = [], []
    for size in sizes:
        calib_path = work / f"calib-{size}.npy"
        np.save(calib_path, pool[:size])
        r = run_worker(here, model_path, calib_path, work / f"sweep-{size}", args)
        if not args.keep:
            shutil.rmtree(work / f"sweep-{size}", ignore_errors=True)
        points.append((size, r["wall"], r["cpu"]))
        rows.append([str(size)] + [f"{r['timings'].get(s, 0.0):.2f}" for s in STAGES]
                    + [f"{r['timings'].get('budget', 0.0):.2f}", f"{r['wall']:.2f}", f"{r['cpu']:.1f}",
                       "n/a" if r["other"] is None else f"{r['other']:.1f}", f"{r['peak_rss_mib']:.0f}"])
        print(f"sweep {size} samples: {r['wall']:.2f} s wall, {r['cpu']:.1f} s CPU, peak RSS {r['peak_rss_mib']:.0f} MiB",
              flush=True)
    print()
    print("build time against calibration samples (current sources, one build each):")
    print_table(["samples"] + STAGES + ["budget", "wall", "cpu", "other", "rss MiB"], rows)
    for (n0, w0, c0), (n1, w1, c1) in zip(points, points[1:]):
        print(f"  {n0} -> {n1} samples: +{(w1 - w0) / (n1 - n0):.3f} s wall, +{(c1 - c0) / (n1 - n0):.3f} s CPU per sample")
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="timed builds per variant (default 3)")
    parser.add_argument("--batch", type=int, default=1, help="example batch size for torch.export (default 1)")
    parser.add_argument("--keep", metavar="DIR", help="keep model.pt2, calib.npy and every build directory in DIR")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                        help="before each run, wait up to SECONDS for the machine to be idle (shared machines)")
    parser.add_argument("--calib-samples", type=int, default=8, help="samples in calib.npy (default 8)")
    parser.add_argument("--permute", action="store_true",
                        help="include the channel-permutation search (off by default so the numbers compare with "
                             "earlier runs; benchmarks/permutation.py measures it on its own)")
    parser.add_argument("--correct", default="bias", choices=["none", "bn", "bias"],
                        help="statistics correction (default bias, the CLI's default with --calib)")
    parser.add_argument("--baseline-src", metavar="DIR",
                        help="also time the sparsecompile sources in DIR (a checkout, e.g. a git worktree of an "
                             "older commit), alternating baseline and current builds run by run, and print the "
                             "ratio current/baseline")
    parser.add_argument("--sweep", metavar="N,N,...",
                        help="instead of the timed runs: one build (current sources) per calibration set size, "
                             "e.g. 8,32,64, and the added time per sample between sizes (linear growth: flat)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--calib", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(build_once(args)))
        return 0
    if args.runs < 1 or args.batch < 1 or args.calib_samples < 1:
        parser.error("--runs, --batch and --calib-samples must be >= 1")
    here = Path(__file__).resolve().parent.parent
    variants = [("current", here)]
    if args.baseline_src:
        base = Path(args.baseline_src).resolve()
        if not (base / "sparsecompile" / "build.py").is_file():
            parser.error(f"--baseline-src '{base}' holds no sparsecompile/build.py")
        variants.insert(0, ("baseline", base))

    warnings.filterwarnings("ignore")  # the exporter is chatty about internals
    torch.set_num_threads(args.threads)
    seed_everything()

    if args.keep:
        work = Path(args.keep)
        if work.exists() and any(work.iterdir()):
            parser.error(f"--keep directory '{work}' is not empty")
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="sparsecompile-bench-"))

    try:
        model = make_model()
        params = sum(p.numel() for p in model.parameters())
        print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, torch threads {args.threads}, "
              f"sparsecompile {sparsecompile.__version__} ({source_revision()})")
        print(f"model:   ResNet-50-shaped, {params:,} parameters ({params / 1e6:.1f}M), random weights, seed {SEED}")
        print(f"build:   magnitude 2:4, target a100, --correct {args.correct}, {args.calib_samples} calibration samples"
              f"{', --permute' if args.permute else ''}; each build in a fresh process")

        start = time.perf_counter()
        model_path = work / "model.pt2"
        example_batch = export_model(model, args.batch, model_path)
        generator = torch.Generator().manual_seed(SEED + 1)
        calib = torch.randn(args.calib_samples, 3, 224, 224, generator=generator).numpy().astype(np.float32)
        calib_path = work / "calib.npy"
        np.save(calib_path, calib)
        del model
        print(f"setup:   exported {model_path.name} (example batch {example_batch}, dynamic batch dim) "
              f"and {calib_path.name} {list(calib.shape)} in {time.perf_counter() - start:.1f}s (not timed)")
        print()
        if args.sweep:
            run_sweep(args, work, model_path, here)
            return 0

        results: dict[str, list[dict]] = {name: [] for name, _ in variants}
        for run in range(1, args.runs + 1):
            # Alternate which variant goes first, so a load that rises or falls hits both alike.
            order = variants if run % 2 else variants[::-1]
            for name, src in order:
                out = work / f"{name}-run{run}"
                if args.wait_idle > 0 and not wait_until_idle(args.wait_idle):
                    print(f"note: the machine was still busy after waiting {args.wait_idle:.0f} s; running anyway")
                r = run_worker(src, model_path, calib_path, out, args)
                results[name].append(r)
                print(f"run {run}/{args.runs} {name}: {r['wall']:.2f} s wall, {r['cpu']:.1f} s CPU, "
                      f"peak RSS {r['peak_rss_mib']:.0f} MiB"
                      + ("" if r["other"] is None else f", other processes used {r['other']:.1f} CPU-s meanwhile"),
                      flush=True)
                if not args.keep and run < args.runs:
                    shutil.rmtree(out, ignore_errors=True)
        print()
        print("per-stage timings in seconds (stages and total from report['timings']; wall = time.perf_counter")
        print("around build(); cpu = the build process's CPU time, up to threads x wall; other = CPU seconds that")
        print("other processes used on this machine during the run: contention, which inflates wall; rss = peak")
        print("resident memory of the build process)")
        print()
        stages = STAGES + sorted({s for rs in results.values() for r in rs for s in r["timings"]}
                                 - set(STAGES) - {"total"})
        medians = {name: stage_table(name, results[name], stages) for name, _ in variants}
        current = medians["current"]
        median = current[-1]
        verdict = "PASS" if median < TARGET_SECONDS else "MISS"
        print(f"median build wall time: {median:.2f} s  (target < {TARGET_SECONDS:.0f} s on "
              f"{os.cpu_count()} cores, torch threads {args.threads}): {verdict}")
        others = [(r["other"] or 0.0) / r["wall"] for rs in results.values() for r in rs]
        if max(others) > 0.1:
            print(f"  warning: other processes used up to {100 * max(others):.0f}% of a core-second per wall second "
                  "during a run: the cores were shared, so wall times are inflated; judge by the ratio")
        if "baseline" in medians:
            base = medians["baseline"]
            cpu_ratio = (statistics.median(r["cpu"] for r in results["current"])
                         / statistics.median(r["cpu"] for r in results["baseline"]))
            print(f"ratio current / baseline (medians of {args.runs} alternating runs): wall {median / base[-1]:.3f}, "
                  f"total {current[-2] / base[-2]:.3f}, cpu {cpu_ratio:.3f}  (goal: wall <= 0.5)")
            print("  per stage (current/baseline s): " + ", ".join(f"{s} {c:.2f}/{b:.2f}" for s, c, b in zip(stages, current, base)))
            same = {f: results["baseline"][-1]["hashes"].get(f) == results["current"][-1]["hashes"].get(f)
                    for f in results["current"][-1]["hashes"]}
            print("  same bytes as the baseline build: "
                  + ", ".join(f"{f} {'yes' if ok else 'NO'}" for f, ok in same.items()))
        for name, rs in results.items():
            distinct = {tuple(sorted(r["hashes"].items())) for r in rs}
            if len(distinct) > 1:
                print(f"  warning: the {name} builds differ from run to run (not deterministic)")
        print()

        last = results["current"][-1]
        compression, summary, options = last["compression"], last["summary"], last["options"]
        print(f"artifact (last run; method {last['method']}, correct={options.get('correct', 'n/a')}, "
              f"sequential={options.get('sequential', 'n/a')})")
        ratio = compression.get("ratio_vs_dense_fp16")
        size_rows = [
            ["layers (sparse / dense)", f"{summary['sparse_layers']} / {summary['dense_layers']}"
                                        f"  (of {summary['layers']})"],
            ["weights in sparse layers", f"{summary['sparse_layer_weights']:,} of {summary['gemm_weights']:,} GEMM weights"],
            ["sparse layers, compressed", fmt_bytes(compression.get("compressed_bytes", 0))],
            ["sparse layers, dense fp16", fmt_bytes(compression.get("dense_fp16_bytes", 0))],
            ["compressed / dense fp16", f"{ratio:.4f}  (format floor {FORMAT_FLOOR})" if ratio is not None else "n/a"],
            ["weights.safetensors", fmt_bytes(compression.get("file_bytes", 0)) + f"  ({compression.get('weights_dtype')})"],
            ["model.onnx", fmt_bytes(last["onnx_bytes"])],
        ]
        for sidecar, size in last["sidecars"].items():
            size_rows.append([sidecar, fmt_bytes(size)])
        print_table(["quantity", "value"], size_rows)
        print()
        print(f"sparse vs dense relative error {last['agreement']:.3f}, "
              f"ONNX Runtime vs torch relative error {last['ort']:.2e}")
        if args.keep:
            print(f"kept: {work}/ (model.pt2, calib.npy, <variant>-run1..{args.runs})")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
