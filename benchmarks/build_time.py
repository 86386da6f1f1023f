"""Build-time benchmark: a ResNet-50-sized model through the whole sparsecompile build.

    python benchmarks/build_time.py [--runs 3] [--batch 1] [--keep DIR] [--threads 2] [--wait-idle SECONDS]

What it does:

1. Builds a ResNet-50-shaped network (bottleneck blocks [3, 4, 6, 3], widths
   64/128/256/512 with 4x expansion, BatchNorm, ReLU, residual adds, a
   1000-class Linear head; ~25.5M parameters) with seeded random weights and
   randomised BatchNorm running statistics, so folding BN is not a no-op.
2. Exports it once with ``torch.export`` (dynamic batch dimension) to
   ``model.pt2`` and writes an 8-sample calibration file ``calib.npy``.
   None of this is timed.
3. Runs ``sparsecompile.build.build`` ``--runs`` times (magnitude 2:4 masks,
   target a100, ONNX export and the ONNX Runtime check included), each into
   a fresh output directory, with ``torch.set_num_threads(2)``, and prints the
   wall time and per-stage timings of every run, the median total, and
   PASS/MISS against the 30 s target. The exit status never depends on timing.
4. Prints the compressed size of the sparse layers relative to their dense
   fp16 size (the 2:4 format's floor is 0.5625), the number of sparse and
   dense layers, and the size of ``model.onnx``.

This needs no torchvision: the model is defined below in plain torch.
"""

from __future__ import annotations

import argparse
import os
import random
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

# Make `import sparsecompile` work when run from a checkout without installing.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sparsecompile  # noqa: E402
from sparsecompile.build import BuildOptions, build  # noqa: E402
from sparsecompile.progress import Progress  # noqa: E402

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="timed builds (default 3)")
    parser.add_argument("--batch", type=int, default=1, help="example batch size for torch.export (default 1)")
    parser.add_argument("--keep", metavar="DIR", help="keep model.pt2, calib.npy and every build directory in DIR")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                        help="before each run, wait up to SECONDS for the machine to be idle (shared machines)")
    parser.add_argument("--calib-samples", type=int, default=8, help="samples in calib.npy (default 8)")
    parser.add_argument("--permute", action="store_true",
                        help="include the channel-permutation search (off by default so the numbers compare with "
                             "earlier runs; benchmarks/permutation.py measures it on its own)")
    parser.add_argument("--correct", default="none", choices=["none", "bn", "bias"],
                        help="statistics correction (default none: magnitude masks alone; the CLI's default "
                             "with --calib is bias)")
    args = parser.parse_args()
    if args.runs < 1 or args.batch < 1 or args.calib_samples < 1:
        parser.error("--runs, --batch and --calib-samples must be >= 1")

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
        print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
              f"sparsecompile {sparsecompile.__version__} ({source_revision()})")
        print(f"model:   ResNet-50-shaped, {params:,} parameters ({params / 1e6:.1f}M), random weights, seed {SEED}")

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

        rows, totals, others, last = [], [], [], None
        for run in range(1, args.runs + 1):
            out = work / f"build-run{run}"
            seed_everything()
            options = BuildOptions(
                model=str(model_path), output=str(out), target="a100", method="magnitude",
                calib=str(calib_path), error_samples=8, seed=SEED, correct=args.correct,
                permute=args.permute,
            )
            if args.wait_idle > 0 and not wait_until_idle(args.wait_idle):
                print(f"note: the machine was still busy after waiting {args.wait_idle:.0f} s; running anyway")
            busy_start = busy_cpu_seconds()
            cpu_start, start = time.process_time(), time.perf_counter()
            result = build(options, Progress(quiet=True))
            wall = time.perf_counter() - start
            cpu = time.process_time() - cpu_start
            busy_end = busy_cpu_seconds()
            # CPU time other processes took from the machine while this build ran.
            other = max(0.0, busy_end - busy_start - cpu) if busy_start is not None and busy_end is not None else None
            totals.append(wall)
            others.append(other or 0.0)
            timings = result.report["timings"]
            rows.append([f"run {run}"] + [f"{timings.get(s, 0.0):.2f}" for s in STAGES]
                        + [f"{timings['total']:.2f}", f"{wall:.2f}", f"{cpu:.1f}", "n/a" if other is None else f"{other:.1f}"])
            print(f"run {run}/{args.runs}: {wall:.2f} s wall, {cpu:.1f} s CPU"
                  + ("" if other is None else f", other processes used {other:.1f} CPU-s meanwhile"), flush=True)
            last = result
            if not args.keep and run < args.runs:
                shutil.rmtree(out, ignore_errors=True)
        print()

        median = statistics.median(totals)
        stage_medians = [statistics.median(float(r[1 + i]) for r in rows) for i in range(len(STAGES))]
        rows.append(["median"] + [f"{v:.2f}" for v in stage_medians]
                    + [f"{statistics.median(float(r[-4]) for r in rows):.2f}", f"{median:.2f}",
                       f"{statistics.median(float(r[-2]) for r in rows):.1f}", ""])
        print("per-stage timings in seconds (stages and total from report['timings']; wall = time.perf_counter")
        print("around build(); cpu = this process's CPU time, up to threads x wall; other = CPU seconds that")
        print("other processes used on this machine during the run: contention, which inflates wall)")
        print_table(["run"] + STAGES + ["total", "wall", "cpu", "other"], rows)
        print()
        verdict = "PASS" if median < TARGET_SECONDS else "MISS"
        print(f"median build wall time: {median:.2f} s  (target < {TARGET_SECONDS:.0f} s on "
              f"{os.cpu_count()} cores, torch threads {args.threads}): {verdict}")
        if max(o / w for o, w in zip(others, totals)) > 0.1:
            print(f"  warning: other processes used up to {max(others):.0f} CPU-s during a run on {os.cpu_count()} CPUs: "
                  "the cores were shared, so these wall times are inflated (rerun on an idle machine)")
        if verdict == "MISS":
            slowest = max(zip(stage_medians, STAGES))
            print(f"  slowest stage: {slowest[1]} ({slowest[0]:.2f} s median, "
                  f"{100 * slowest[0] / median:.0f}% of the build)")
        print()

        report = last.report
        compression = report.get("compression", {})
        summary = report["summary"]
        onnx_path = last.output / "model.onnx"
        onnx_bytes = onnx_path.stat().st_size
        sidecars = [p for p in last.output.iterdir() if p.name.startswith("model.onnx") and p != onnx_path]
        options = report.get("options", {})
        print(f"artifact (last run; method {report.get('method')}, correct={options.get('correct', 'n/a')}, "
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
            ["model.onnx", fmt_bytes(onnx_bytes)],
        ]
        for sidecar in sidecars:
            size_rows.append([sidecar.name, fmt_bytes(sidecar.stat().st_size)])
        print_table(["quantity", "value"], size_rows)
        ort = report["verification"]["onnxruntime_vs_torch"][0]
        agree = report["verification"]["sparse_vs_dense"][0]
        print()
        print(f"sparse vs dense relative error {agree['relative_error']:.3f}, "
              f"ONNX Runtime vs torch relative error {ort['relative_error']:.2e}")
        if args.keep:
            print(f"kept: {work}/ (model.pt2, calib.npy, build-run1..{args.runs})")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
