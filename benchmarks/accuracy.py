"""Accuracy benchmark: 2:4 mask methods x statistics corrections on small Fashion-MNIST CNNs.

    python benchmarks/accuracy.py [--quick] [--calib-samples 256|512] [--learned-calib-samples 2048]
                                  [--no-learned] [--learned-corrections none,bn,bias] [--threads 2] [--fresh]

What it does:

1. Models. The shipped ``examples/fashion_mnist/model.pt2`` (FashionResNet
   widths 32/64/128, seed 0, 9 epochs) plus models trained here and cached in
   ``benchmarks/.cache/``: widths 16/32/64 seeds 0 and 1, widths 32/64/128
   seed 1, ``--epochs`` (default 5) each. Training mirrors
   ``examples/fashion_mnist/train.py`` (its ``augment``, ``to_tensor``,
   ``accuracy`` and ``stratified_calib`` are imported from it; its ``main``
   hard-codes the widths, so the loop is repeated here: batch 128, SGD
   nesterov momentum 0.9, wd 5e-4, one-cycle lr 0.1 with pct_start 0.25,
   label smoothing 0.1, random crop + flip, channels-last, seeded). Each model
   is exported with ``torch.export`` (dynamic batch ``Dim``, like train.py).
2. Calibration: ``--calib-samples`` (default 256) normalized TRAIN images,
   stratified by class with ``train.stratified_calib`` and
   ``default_rng(model_seed + 1)`` -- for the shipped model with 256 samples
   that is exactly ``examples/fashion_mnist/calib.npy`` (checked).
3. For every model: dense top-1 on the full 10,000-image test set (torch,
   the exported program), then one ``sparsecompile.build.build`` per
   method x correction (target a100, min_weights 4096, force) and top-1 of
   each build's ``model.onnx`` on the full test set with ONNX Runtime (CPU,
   ``--threads`` intra-op threads).
   Methods: random, magnitude, activation, hessian, hessian+update_weights;
   corrections: none, bn, bias. ``random`` is not in sparsecompile's
   registry: this script registers a ``RandomMask`` (uniform random scores,
   seeded per layer, top-2 of every 4 along the reduction axis) into
   ``sparsecompile.masks.MASK_METHODS`` in this process only, so random
   masks go through the same pipeline (corrections, ONNX, ORT check).
   On the shipped model also magnitude+bias and hessian+bias with
   ``sequential=False`` (one-shot). Learned masks (gumbel, proxsparse) are
   built with the build's defaults (label-free) on ``--learned-calib-samples``
   (default 2048) stratified training images, once per model and correction
   in ``--learned-corrections`` (default all three; with ``bn``/``bias`` the
   masks are learned under that correction, ``none`` keeps the weights bit
   for bit). ``--no-learned`` skips them; they take most of the run.
4. Prints the tables (aggregate mean +- sample std over models, top-1 and
   drop vs dense; per model; build time; one-shot) and writes them as
   Markdown to ``benchmarks/results/accuracy.md`` (``--quick``:
   ``accuracy-quick.md``).
5. If ``modelopt`` is importable, adds NVIDIA ModelOpt rows
   (``sparse_magnitude`` and ``sparsegpt``, evaluated in torch); otherwise
   prints that they were skipped.

``--quick``: only the shipped model, only magnitude/hessian x none/bias, no learned rows.

Per-build results are cached in ``benchmarks/.cache/results/`` keyed by the
model file, calibration file, build options and a hash of the
``sparsecompile/`` sources, so an interrupted run resumes; ``--fresh``
ignores that cache.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
EXAMPLE = ROOT / "examples" / "fashion_mnist"
CACHE = BENCH / ".cache"
RESULTS = BENCH / "results"

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(EXAMPLE))
sys.path.insert(0, str(BENCH))

from common import cached_build_record, source_hash  # noqa: E402  (benchmarks/common.py)
import data as fm_data  # noqa: E402  (examples/fashion_mnist/data.py)
import model as fm_model  # noqa: E402  (examples/fashion_mnist/model.py)
import train as fm_train  # noqa: E402  (examples/fashion_mnist/train.py)

import sparsecompile.masks as sc_masks  # noqa: E402
from sparsecompile.build import BuildOptions, build  # noqa: E402
from sparsecompile.masks.base import MaskContext, MaskMethod  # noqa: E402
from sparsecompile.progress import Progress  # noqa: E402

METHODS = [  # (label, method, update_weights)
    ("random", "random", False),
    ("magnitude", "magnitude", False),
    ("activation", "activation", False),
    ("hessian", "hessian", False),
    ("hessian+update", "hessian", True),
]
CORRECTIONS = ["none", "bn", "bias"]
QUICK_METHODS = ["magnitude", "hessian"]
QUICK_CORRECTIONS = ["none", "bias"]
ONE_SHOT = [("magnitude", "magnitude", False, "bias"), ("hessian", "hessian", False, "bias")]
# Learned masks (label, method): built with the build's defaults on --learned-calib-samples images, for each
# correction in --learned-corrections (the others are n/a).
LEARNED = [("gumbel", "gumbel"), ("proxsparse", "proxsparse")]
RESULT_VERSION = 1  # bump when the meaning of a cached result changes


# --------------------------------------------------------------------------- random masks


class RandomMask(MaskMethod):
    """Random 2:4 baseline: uniform random scores, seeded per layer (benchmark-only)."""

    name = "random"
    description = "keep N random entries in each group of M (benchmark baseline)"
    seed = 0

    def scores(self, weight: torch.Tensor, layer, context: MaskContext) -> torch.Tensor:
        key = getattr(layer, "weight_target", None) or getattr(layer, "name", "")
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(str(key).encode()))
        return torch.rand(weight.shape, generator=generator, dtype=torch.float64)


sc_masks.MASK_METHODS.setdefault("random", RandomMask)


# --------------------------------------------------------------------------- models


class ModelSpec:
    def __init__(self, widths, seed, epochs, shipped=False):
        self.widths, self.seed, self.epochs, self.shipped = tuple(widths), seed, epochs, shipped
        self.key = f"w{'-'.join(map(str, self.widths))}-s{seed}" + ("-shipped" if shipped else f"-e{epochs}")
        self.label = f"{'/'.join(map(str, self.widths))} s{seed}" + (" (shipped, 9 ep)" if shipped else f" ({epochs} ep)")

    @property
    def pt2(self) -> Path:
        return EXAMPLE / "model.pt2" if self.shipped else CACHE / "models" / f"{self.key}.pt2"

    @property
    def weights(self) -> Path:
        return EXAMPLE / "weights.safetensors" if self.shipped else CACHE / "models" / f"{self.key}.weights.pt"

    @property
    def meta(self) -> Path:
        return CACHE / "models" / f"{self.key}.json"


def standard_specs(epochs: int = 5) -> list[ModelSpec]:
    """The four models every Fashion-MNIST benchmark uses: the shipped one and three trained here."""
    return [ModelSpec((32, 64, 128), 0, 9, shipped=True), ModelSpec((16, 32, 64), 0, epochs),
            ModelSpec((16, 32, 64), 1, epochs), ModelSpec((32, 64, 128), 1, epochs)]


def load_state(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    return torch.load(path, weights_only=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def train_model(spec: ModelSpec, train_x, train_y, test_x, test_y, log) -> dict:
    """examples/fashion_mnist/train.py's recipe for any widths; writes spec.pt2 / spec.weights."""
    batch = fm_train.BATCH
    lr = 0.1
    torch.manual_seed(spec.seed)
    rng = np.random.default_rng(spec.seed)
    net = fm_model.FashionResNet(widths=spec.widths).eval().to(memory_format=torch.channels_last)
    params = sum(p.numel() for p in net.parameters())
    log(f"training FashionResNet widths={spec.widths} seed={spec.seed} epochs={spec.epochs} params={params:,}")
    steps = math.ceil(len(train_x) / batch)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=spec.epochs, steps_per_epoch=steps,
                                                pct_start=0.25)
    start = time.time()
    history = []
    first_epoch, spent = 1, 0.0
    ckpt = CACHE / "models" / f"{spec.key}.partial.pt"
    if ckpt.exists():  # resume an interrupted training run (per-epoch checkpoint)
        state = torch.load(ckpt, weights_only=False)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        first_epoch, history, spent = state["epoch"] + 1, state["history"], state["seconds"]
        log(f"  resuming from the epoch {state['epoch']} checkpoint")
    start -= spent
    for epoch in range(first_epoch, spec.epochs + 1):
        net.train()
        t0 = time.time()
        order = rng.permutation(len(train_x))
        loss_sum = 0.0
        for s in range(steps):
            idx = order[s * batch:(s + 1) * batch]
            x = fm_train.to_tensor(fm_train.augment(train_x[idx], rng))
            y = torch.from_numpy(train_y[idx])
            loss = F.cross_entropy(net(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
        acc = float(fm_train.accuracy(net, test_x, test_y))
        history.append(round(acc, 4))
        log(f"  epoch {epoch}/{spec.epochs} loss {loss_sum / len(train_x):.4f} test acc {acc:.4f} "
            f"({time.time() - t0:.0f}s)")
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "epoch": epoch,
                    "history": history, "seconds": time.time() - start}, ckpt)
    train_seconds = time.time() - start
    net = net.to(memory_format=torch.contiguous_format).eval()

    spec.pt2.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(8, 1, 28, 28)
    program = torch.export.export(net, (example,),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    torch.export.save(program, str(spec.pt2))
    loaded = torch.export.load(str(spec.pt2)).module()
    with torch.no_grad():
        for n in (1, 8, 37):
            x = torch.from_numpy(fm_data.normalize(test_x[:n]))
            if not torch.allclose(net(x), loaded(x), atol=1e-4, rtol=1e-4):
                raise RuntimeError(f"exported {spec.key} does not match the eager model at batch {n}")
    torch.save({k: v.detach().contiguous() for k, v in net.state_dict().items()}, spec.weights)
    meta = {"widths": list(spec.widths), "seed": spec.seed, "epochs": spec.epochs, "params": params,
            "train_seconds": round(train_seconds, 1), "test_acc_per_epoch": history,
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    spec.meta.write_text(json.dumps(meta, indent=2) + "\n")
    ckpt.unlink(missing_ok=True)
    log(f"  trained {spec.key} in {train_seconds:.0f}s, wrote {spec.pt2.relative_to(ROOT)}")
    return meta


def calibration_file(spec: ModelSpec, n: int, train_x, train_y, log) -> Path:
    """n normalized train images, stratified by class, default_rng(seed + 1) as train.py does."""
    idx = fm_train.stratified_calib(train_x, train_y, n, np.random.default_rng(spec.seed + 1))
    calib = fm_data.normalize(train_x[idx])
    shipped_calib = EXAMPLE / "calib.npy"
    if spec.shipped and n == fm_train.N_CALIB:
        if np.array_equal(np.load(shipped_calib), calib):
            return shipped_calib
        log("note: examples/fashion_mnist/calib.npy differs from the regenerated calibration set; "
            "using the regenerated one")
    path = CACHE / "calib" / f"calib-seed{spec.seed + 1}-n{n}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or not np.array_equal(np.load(path), calib):
        np.save(path, calib)
    return path


# --------------------------------------------------------------------------- evaluation


def torch_accuracy(module, images, labels, batch=1000) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            logits = module(torch.from_numpy(fm_data.normalize(images[i:i + batch])))
            correct += int((logits.argmax(1).numpy() == labels[i:i + batch]).sum())
    return correct / len(images)


def onnx_accuracy(path: Path, images, labels, threads: int, batch=1000) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = 0
    for i in range(0, len(images), batch):
        logits = session.run(None, {name: fm_data.normalize(images[i:i + batch])})[0]
        correct += int((np.argmax(logits, axis=1) == labels[i:i + batch]).sum())
    return correct / len(images)


def run_build(spec, calib, label, method, update, correct, sequential, ctx) -> dict:
    ctx["source_hash"] = source_hash()  # per build: the tree may be edited while this runs
    key_data = {
        "v": RESULT_VERSION, "model": ctx["model_sha"][spec.key], "calib": ctx["calib_sha"][str(calib)],
        "method": method, "update": update, "correct": correct, "sequential": sequential,
        "min_weights": 4096, "target": "a100", "source": ctx["source_hash"], "threads": ctx["threads"],
    }
    record = {"model": spec.key, "label": label, "method": method, "update_weights": update,
              "correct": correct, "sequential": sequential, "key": key_data}

    def measure(out: Path) -> dict:
        options = BuildOptions(model=str(spec.pt2), output=str(out), target="a100", calib=str(calib),
                               method=method, correct=correct, update_weights=update, sequential=sequential,
                               min_weights=4096, force=True)
        wall = time.perf_counter()
        result = build(options, Progress(quiet=True))
        wall = time.perf_counter() - wall
        return {"build_seconds": result.report["timings"]["total"], "build_wall": round(wall, 3),
                "timings": result.report["timings"], "summary": result.report.get("summary", {}),
                "accuracy": onnx_accuracy(out / "model.onnx", ctx["test_x"], ctx["test_y"], ctx["threads"])}

    return cached_build_record(CACHE / "results", key_data, ctx["fresh"], record, measure, work_dir=ctx["work"])


def modelopt_rows(specs, calibs, ctx, log) -> dict | None:
    """NVIDIA ModelOpt rows (sparse_magnitude, sparsegpt) if modelopt is importable, else None."""
    try:
        import modelopt.torch.sparsity as mts  # noqa: F401
    except ImportError:
        return None
    rows = {}
    for mode in ("sparse_magnitude", "sparsegpt"):
        for spec in specs:
            try:
                net = fm_model.FashionResNet(widths=spec.widths)
                net.load_state_dict(load_state(spec.weights))
                net.eval()
                calib = torch.from_numpy(np.load(calibs[spec.key]))
                config = {"data_loader": [calib[i:i + 64] for i in range(0, len(calib), 64)],
                          "collect_func": lambda x: x}
                start = time.perf_counter()
                net = mts.sparsify(net, mode=mode, config=config if mode == "sparsegpt" else None)
                net = mts.export(net)
                seconds = time.perf_counter() - start
                acc = torch_accuracy(net.eval(), ctx["test_x"], ctx["test_y"])
                rows[(f"modelopt {mode}", spec.key)] = {"accuracy": acc, "build_seconds": seconds, "error": None}
            except Exception as exc:  # noqa: BLE001
                rows[(f"modelopt {mode}", spec.key)] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"  modelopt {mode} {spec.key}: " + (f"{rows[(f'modelopt {mode}', spec.key)].get('accuracy', 0):.4f}"
                                                     if rows[(f"modelopt {mode}", spec.key)]["error"] is None
                                                     else rows[(f"modelopt {mode}", spec.key)]["error"]))
    return rows


# --------------------------------------------------------------------------- tables


def pct(x) -> str:
    return f"{100 * x:.2f}"


def mean_spread(values, scale=100.0, signed=False) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "ERR"
    mean = statistics.fmean(values) * scale
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    if len(values) > 1:
        text += f" ± {statistics.stdev(values) * scale:.2f}"
    return text


def text_table(headers, rows) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    line = fmt(headers)
    return "\n".join([line, "-" * len(line)] + [fmt(r) for r in rows])


def md_table(headers, rows) -> str:
    out = ["| " + " | ".join(map(str, headers)) + " |",
           "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|"]
    out += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shipped model only, magnitude/hessian x none/bias")
    ap.add_argument("--calib-samples", type=int, default=256, choices=[256, 512])
    ap.add_argument("--epochs", type=int, default=5, help="training epochs of the extra models (default 5)")
    ap.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads (default 2)")
    ap.add_argument("--fresh", action="store_true", help="ignore cached build results (models stay cached)")
    ap.add_argument("--learned-calib-samples", type=int, default=2048,
                    help="calibration images for the learned rows (gumbel, proxsparse; default 2048)")
    ap.add_argument("--no-learned", action="store_true", help="skip the learned rows (they take most of the time)")
    ap.add_argument("--learned-corrections", default="none,bn,bias",
                    help="comma-separated --correct values for the learned rows (default none,bn,bias), or "
                         "per method: gumbel:none,bn,bias/proxsparse:none")
    ap.add_argument("--output", help="Markdown output (default benchmarks/results/accuracy[-quick].md)")
    args = ap.parse_args()
    command = "python benchmarks/accuracy.py" + "".join(f" {a}" for a in sys.argv[1:])

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    started = time.time()
    start_load = os.getloadavg()

    def log(msg=""):
        print(msg, flush=True)

    specs = standard_specs(args.epochs)[:1 if args.quick else None]
    methods = [m for m in METHODS if not args.quick or m[0] in QUICK_METHODS]
    corrections = QUICK_CORRECTIONS if args.quick else CORRECTIONS
    learned = [] if args.quick or args.no_learned else LEARNED
    # "none,bn,bias" for every learned method, or per method: "gumbel:none,bn,bias/proxsparse:none".
    learned_corrections: dict[str, list[str]] = {}
    for group in args.learned_corrections.split("/"):
        names, _, values = group.rpartition(":")
        chosen = [c.strip() for c in values.split(",") if c.strip()]
        if any(c not in CORRECTIONS for c in chosen):
            ap.error(f"--learned-corrections takes values from {', '.join(CORRECTIONS)}")
        if names and names.strip() not in {label for label, _ in LEARNED}:
            ap.error(f"--learned-corrections: unknown learned method '{names.strip()}'; "
                     f"valid: {', '.join(label for label, _ in LEARNED)}")
        for label, _ in LEARNED:
            if not names or label == names.strip():
                learned_corrections[label] = chosen
    src_hash = source_hash()

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    import onnxruntime as ort
    machine = (f"{os.cpu_count()}-core CPU ({cpu}), torch {torch.__version__} ({args.threads} threads), "
               f"onnxruntime {ort.__version__} (CPU, {args.threads} intra-op threads), Python {platform.python_version()}")
    log(f"machine: {machine}")
    log(f"command: {command}")
    log(f"sparsecompile sources hash {src_hash}; load average at start {start_load[0]:.2f}")

    train_x, train_y = fm_data.load("train")
    test_x, test_y = fm_data.load("test")
    log(f"data: {len(train_x)} train / {len(test_x)} test images (full test set used for every accuracy)")

    metas, calibs, learned_calibs, model_sha, calib_sha, dense = {}, {}, {}, {}, {}, {}
    for spec in specs:
        if spec.shipped:
            metas[spec.key] = {"epochs": 9, "train_seconds": 1807, "note": "shipped (examples/fashion_mnist)"}
        elif spec.pt2.exists() and spec.weights.exists() and spec.meta.exists():
            metas[spec.key] = json.loads(spec.meta.read_text())
            log(f"cached model {spec.pt2.relative_to(ROOT)}")
        else:
            metas[spec.key] = train_model(spec, train_x, train_y, test_x, test_y, log)
        calibs[spec.key] = calibration_file(spec, args.calib_samples, train_x, train_y, log)
        model_sha[spec.key] = sha256(spec.pt2)
        calib_sha[str(calibs[spec.key])] = sha256(calibs[spec.key])
        if learned:
            learned_calibs[spec.key] = calibration_file(spec, args.learned_calib_samples, train_x, train_y, log)
            calib_sha[str(learned_calibs[spec.key])] = sha256(learned_calibs[spec.key])
        dense[spec.key] = torch_accuracy(torch.export.load(str(spec.pt2)).module(), test_x, test_y)
        log(f"{spec.label}: dense top-1 {pct(dense[spec.key])}%  calib {calibs[spec.key].relative_to(ROOT)}")

    work = CACHE / "work"
    work.mkdir(parents=True, exist_ok=True)
    ctx = {"model_sha": model_sha, "calib_sha": calib_sha, "source_hash": src_hash, "threads": args.threads,
           "fresh": args.fresh, "work": str(work), "test_x": test_x, "test_y": test_y}

    results = {}  # (label, correct, model key) -> record
    jobs = [(spec, label, method, update, correct, True)
            for spec in specs for (label, method, update) in methods for correct in corrections]
    if not args.quick:
        jobs += [(specs[0], label, method, update, correct, False) for (label, method, update, correct) in ONE_SHOT]
    jobs += [(spec, label, method, False, correct, True)
             for spec in specs for (label, method) in learned for correct in learned_corrections.get(label, [])]
    learned_labels = {label for label, _ in learned}
    for i, (spec, label, method, update, correct, sequential) in enumerate(jobs, 1):
        calib = (learned_calibs if label in learned_labels else calibs)[spec.key]
        record = run_build(spec, calib, label, method, update, correct, sequential, ctx)
        results[(label, correct, spec.key, sequential)] = record
        mode = "" if sequential else " one-shot"
        if record["error"]:
            log(f"[{i}/{len(jobs)}] {spec.key} {label}{mode} correct={correct}: ERROR {record['error'].splitlines()[0]}")
        else:
            log(f"[{i}/{len(jobs)}] {spec.key} {label}{mode} correct={correct}: top-1 {pct(record['accuracy'])}% "
                f"(dense {pct(dense[spec.key])}), build {record['build_seconds']:.1f}s"
                + (" [cached]" if record.get("cached") else ""))

    mo_rows = modelopt_rows(specs, calibs, ctx, log)
    modelopt_note = None
    if mo_rows is None:
        modelopt_note = "modelopt rows skipped: modelopt (nvidia-modelopt) is not installed"
        log(modelopt_note)

    end_hash = source_hash()
    used_hashes = sorted({r["key"]["source"] for r in results.values()})
    total = time.time() - started
    end_load = os.getloadavg()

    # ------------------------------------------------------------------ tables
    def acc(label, correct, key, sequential=True):
        r = results.get((label, correct, key, sequential))
        return None if r is None or r["error"] else r["accuracy"]

    def not_run(label, correct) -> bool:  # learned rows are built with --learned-corrections only
        return label in learned_labels and correct not in learned_corrections.get(label, [])

    row_labels = [m[0] for m in methods] + [label for label, _ in learned]
    sections = []  # (title, headers, rows, note)

    agg_rows = [["dense"] + [mean_spread([dense[s.key] for s in specs])] * len(corrections)]
    drop_rows = []
    for label in row_labels:
        agg_rows.append([label] + ["n/a" if not_run(label, c) else mean_spread([acc(label, c, s.key) for s in specs])
                                   for c in corrections])
        drop_rows.append([label] + ["n/a" if not_run(label, c) else
                                    mean_spread([None if acc(label, c, s.key) is None else acc(label, c, s.key) - dense[s.key]
                                                 for s in specs], signed=True) for c in corrections])
    if mo_rows:
        for name in sorted({k[0] for k in mo_rows}):
            vals = [mo_rows.get((name, s.key), {}) for s in specs]
            agg_rows.append([name] + [mean_spread([v.get("accuracy") for v in vals])] + ["n/a"] * (len(corrections) - 1))
            drop_rows.append([name] + [mean_spread([v["accuracy"] - dense[s.key] if v.get("accuracy") is not None else None
                                                    for v, s in zip(vals, specs)], signed=True)]
                             + ["n/a"] * (len(corrections) - 1))
    n_models = len(specs)
    spread = "mean ± sample std" if n_models > 1 else "single model"
    sections.append((f"Top-1 (%) on the 10k test set, {spread} over {n_models} model(s); columns = --correct",
                     ["method"] + corrections, agg_rows, None))
    sections.append((f"Top-1 change vs dense (percentage points), {spread} over {n_models} model(s)",
                     ["method"] + corrections, drop_rows, None))

    time_rows = []
    for label in row_labels:
        cells = []
        for c in corrections:
            if not_run(label, c):
                cells.append("n/a")
                continue
            secs = [results[(label, c, s.key, True)].get("build_seconds") for s in specs
                    if not results[(label, c, s.key, True)]["error"]]
            cells.append(f"{statistics.fmean(secs):.1f}" if secs else "ERR")
        time_rows.append([label] + cells)
    sections.append((f"Build time (s, report timings total, mean over {n_models} model(s); shared 2-core CPU)",
                     ["method"] + corrections, time_rows, None))

    for spec in specs:
        rows = [["dense"] + [pct(dense[spec.key])] * len(corrections)]
        for label in row_labels:
            rows.append([label] + [("n/a" if not_run(label, c) else "ERR" if acc(label, c, spec.key) is None else
                                    f"{pct(acc(label, c, spec.key))} ({100 * (acc(label, c, spec.key) - dense[spec.key]):+.2f})")
                                   for c in corrections])
        if mo_rows:
            for name in sorted({k[0] for k in mo_rows}):
                v = mo_rows.get((name, spec.key), {})
                rows.append([name] + [pct(v["accuracy"]) if v.get("accuracy") is not None else "ERR"]
                            + ["n/a"] * (len(corrections) - 1))
        summ = next((r["summary"] for r in results.values() if r["model"] == spec.key and r.get("summary")), {})
        meta = metas[spec.key]
        note = (f"epochs {meta.get('epochs')}, training {meta.get('train_seconds')} s"
                + (f", per-epoch test acc {meta['test_acc_per_epoch']}" if "test_acc_per_epoch" in meta else "")
                + (f"; sparse layers {summ.get('sparse_layers')}/{summ.get('layers')}, "
                   f"{summ.get('sparse_layer_weights', 0):,} of {summ.get('gemm_weights', 0):,} GEMM weights in sparse layers"
                   if summ else ""))
        sections.append((f"Model {spec.label}: top-1 % (change vs dense, pp)", ["method"] + corrections, rows, note))

    if not args.quick:
        rows = []
        for label, method, update, correct in ONE_SHOT:
            key = specs[0].key
            seq, one = results[(label, correct, key, True)], results[(label, correct, key, False)]
            fmt_acc = lambda r: "ERR" if r["error"] else pct(r["accuracy"])  # noqa: E731
            fmt_t = lambda r: "ERR" if r["error"] else f"{r['build_seconds']:.1f}"  # noqa: E731
            delta = ("n/a" if seq["error"] or one["error"] else f"{100 * (one['accuracy'] - seq['accuracy']):+.2f}")
            rows.append([f"{label} + {correct}", fmt_acc(seq), fmt_acc(one), delta, fmt_t(seq), fmt_t(one)])
        sections.append((f"sequential vs one-shot on the shipped model ({specs[0].label}), top-1 % and build s",
                         ["method", "sequential", "one-shot", "one-shot - seq (pp)", "seq build s", "one-shot build s"],
                         rows, None))

    errors = [(k, r) for k, r in results.items() if r["error"]]
    if mo_rows:
        errors += [((k[0], "-", k[1], True), v) for k, v in mo_rows.items() if v.get("error")]

    # ------------------------------------------------------------------ print
    log()
    for title, headers, rows, note in sections:
        log(title)
        log(text_table(headers, rows))
        if note:
            log(f"  {note}")
        log()
    if modelopt_note:
        log(modelopt_note)
    for (label, correct, key, seq), r in errors:
        log(f"ERROR {key} {label} correct={correct}{'' if seq else ' one-shot'}: {r['error']}")
    if len(used_hashes) > 1:
        log(f"WARNING: the builds ran on {len(used_hashes)} versions of sparsecompile/ ({', '.join(used_hashes)}): "
            "other people edited it during the run; results may mix code versions")
    if end_hash != src_hash:
        log(f"WARNING: sparsecompile/ sources changed during the run ({src_hash} -> {end_hash}); "
            "results may mix code versions")
    n_cached = sum(1 for r in results.values() if r.get("cached"))
    log(f"total runtime {total:.0f}s ({total / 60:.1f} min); {len(results)} builds ({n_cached} from cache); "
        f"load average start {start_load[0]:.2f}, end {end_load[0]:.2f}")

    # ------------------------------------------------------------------ markdown
    out = Path(args.output) if args.output else RESULTS / ("accuracy-quick.md" if args.quick else "accuracy.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    md = [f"# Accuracy benchmark{' (quick)' if args.quick else ''}", "",
          f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
          f"- machine: {machine}; shared with other jobs (load average {start_load[0]:.2f} at start, "
          f"{end_load[0]:.2f} at end), so build times are inflated",
          f"- command: `{command}`",
          f"- total runtime: {total:.0f} s ({total / 60:.1f} min), {len(results)} builds ({n_cached} reused from "
          "`benchmarks/.cache/results`)",
          f"- sparsecompile sources hash (sha256 of sparsecompile/**/*.py): `{src_hash}` at start, `{end_hash}` at end; "
          f"builds ran on {len(used_hashes)} version(s): {', '.join(f'`{h}`' for h in used_hashes)}",
          f"- calibration: {args.calib_samples} normalized training images per model, stratified by class "
          "(`train.stratified_calib`, `default_rng(seed + 1)`)",
          "- builds: target a100, 2:4, min_weights 4096, sequential unless noted; accuracy = `model.onnx` "
          "on ONNX Runtime CPU, full 10,000-image test set",
          "- random: a benchmark-only `RandomMask` (uniform random scores, seeded per layer) registered into "
          "`sparsecompile.masks.MASK_METHODS` in-process, built through the same pipeline",
          ]
    if learned:
        md.append(f"- learned rows ({', '.join(label for label, _ in learned)}): the build's defaults (label-free, "
                  f"channel permutation on like every row here) on {args.learned_calib_samples} stratified training "
                  "images (`default_rng(seed + 1)`); with `bn`/`bias` the masks are learned under that correction, "
                  "with `none` the weights are bit for bit the dense ones")
    if modelopt_note:
        md.append(f"- {modelopt_note}")
    md.append("")
    for title, headers, rows, note in sections:
        md += [f"## {title}", "", md_table(headers, rows), ""]
        if note:
            md += [note, ""]
    if errors:
        md += ["## Errors", ""]
        for (label, correct, key, seq), r in errors:
            md.append(f"- {key} {label} correct={correct}{'' if seq else ' one-shot'}: `{r['error']}`")
        md.append("")
    out.write_text("\n".join(md))
    log(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
