"""NVIDIA ModelOpt 2:4 sparsity reference on the shipped Fashion-MNIST ResNet.

    python benchmarks/modelopt_reference.py [--threads 2] [--out benchmarks/results/modelopt_reference.md]

Independent of ``sparsecompile``: a reference point of what an off-the-shelf
tool (``nvidia-modelopt``, ``modelopt.torch.sparsity``) gets on the same model
and calibration data.

What it does:

1. Model: ``examples/fashion_mnist/model.py`` ``build()`` with
   ``examples/fashion_mnist/weights.safetensors`` loaded (strict), eval mode,
   fp32, CPU.
2. Calibration: ``examples/fashion_mnist/calib.npy`` (256 normalized training
   images), fed to modelopt as a list of 4 batches of 64 with
   ``collect_func=lambda batch: batch``.
3. Evaluation: top-1 on the full Fashion-MNIST test set (10,000 images,
   ``data.load("test")`` + ``data.normalize``), torch fp32 on CPU, eval mode.
4. Variants (each starts from a fresh copy of the dense model):
   - ``dense``;
   - ``mts.sparsify(model, "sparse_magnitude")`` then ``mts.export``;
   - ``mts.sparsify(model, "sparsegpt", config={"data_loader": ...,
     "collect_func": ...})`` then ``mts.export``;
   - ``+ BN recal`` for both: after export (masks baked into the weights), all
     BatchNorm layers get ``reset_running_stats()`` and ``momentum=None``
     (cumulative average), the model runs in train mode under ``no_grad`` over
     the 256 calibration images (same 4 batches of 64), then goes back to eval.
     Only BN running statistics change.
5. Mask layout check, per Conv2d / Linear layer: the mask is the exported
   weight ``!= 0`` (ModelOpt's own ``_weight_mask`` is also compared with it
   before export). Two 2:4 layouts are checked:
   - ``trt`` (TensorRT / cuSPARSELt conv layout): for a conv weight
     [Cout, Cin, kh, kw], every group of 4 consecutive Cin at fixed
     (cout, kh, kw) has <= 2 nonzeros (needs Cin % 4 == 0, else "n/a");
   - ``flat``: every group of 4 consecutive entries of the flattened
     Cin*kh*kw axis (``weight.flatten(1)``) has <= 2 nonzeros.
   For a Linear layer the two are the same (groups along in_features).
   A violation is a group with > 2 nonzeros.
   It also checks whether ModelOpt changed any surviving weight (SparseGPT's
   OBS weight update) by comparing the exported weight with
   ``dense_weight * mask``.
6. Prints everything and writes Markdown to
   ``benchmarks/results/modelopt_reference.md``.

Needs ``nvidia-modelopt`` (tested with 0.47.0). On a CPU-only torch install it
can be installed without pulling CUDA wheels with
``pip install --no-deps nvidia-modelopt==0.47.0`` plus its pure-Python
dependencies (``requests``, ``huggingface_hub<1``, ``pydantic``, ``rich``,
``scipy``, ``omegaconf``, ``pulp``, ``regex``, ``ninja``, ``nvidia-ml-py``,
``PyYAML``, ... also installed with ``--no-deps``).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import io
import os
import platform
import sys
import time
import warnings
from contextlib import redirect_stdout

import numpy as np
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EX = os.path.join(ROOT, "examples", "fashion_mnist")
sys.path.insert(0, EX)
import data  # noqa: E402
import model as fm_model  # noqa: E402

CALIB_BATCH = 64
EVAL_BATCH = 500


# --------------------------------------------------------------------------- model / data


def load_dense() -> nn.Module:
    from safetensors.torch import load_file

    m = fm_model.build()
    sd = load_file(os.path.join(EX, "weights.safetensors"))
    m.load_state_dict(sd, strict=True)
    return m.eval().float()


def load_calib() -> list[torch.Tensor]:
    x = np.load(os.path.join(EX, "calib.npy")).astype(np.float32)
    assert x.shape[1:] == (1, 28, 28), x.shape
    t = torch.from_numpy(x)
    return [t[i : i + CALIB_BATCH] for i in range(0, len(t), CALIB_BATCH)]


def load_test() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = data.load("test")
    return torch.from_numpy(data.normalize(images)), torch.from_numpy(labels)


@torch.no_grad()
def top1(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    m.eval()
    correct = 0
    for i in range(0, len(x), EVAL_BATCH):
        correct += (m(x[i : i + EVAL_BATCH]).argmax(1) == y[i : i + EVAL_BATCH]).sum().item()
    return 100.0 * correct / len(x)


@torch.no_grad()
def bn_recalibrate(m: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """Re-estimate BN running stats (cumulative average) over the calibration batches."""
    m = copy.deepcopy(m)
    bns = [mod for mod in m.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    m.train()
    for b in batches:
        m(b)
    return m.eval()


# --------------------------------------------------------------------------- mask checks


def violations(mask: torch.Tensor) -> dict:
    """Groups of 4 with > 2 nonzeros for the trt (Cin at fixed kernel pos) and flat layouts."""
    mask = mask.bool()
    out = {"groups_flat": None, "viol_flat": None, "groups_trt": None, "viol_trt": None}
    if mask.dim() == 2:  # Linear [out, in]
        flat = mask
        trt = mask if mask.shape[1] % 4 == 0 else None
    else:  # Conv2d [cout, cin, kh, kw]
        flat = mask.flatten(1)
        cin = mask.shape[1]
        # put cin last: [cout, kh, kw, cin]
        trt = mask.permute(0, 2, 3, 1).reshape(-1, cin) if cin % 4 == 0 else None
    if flat.shape[1] % 4 == 0:
        g = flat.reshape(-1, 4).sum(1)
        out["groups_flat"], out["viol_flat"] = int(g.numel()), int((g > 2).sum())
    if trt is not None:
        g = trt.reshape(-1, 4).sum(1)
        out["groups_trt"], out["viol_trt"] = int(g.numel()), int((g > 2).sum())
    return out


def layer_report(dense: nn.Module, exported: nn.Module, pre_masks: dict) -> list[dict]:
    dense_w = {n: mod.weight.detach() for n, mod in dense.named_modules()
               if isinstance(mod, (nn.Conv2d, nn.Linear))}
    rows = []
    for name, mod in exported.named_modules():
        if not isinstance(mod, (nn.Conv2d, nn.Linear)):
            continue
        w = mod.weight.detach()
        mask = w != 0
        pre = pre_masks.get(name)
        rows.append({
            "layer": name,
            "shape": "x".join(map(str, w.shape)),
            "sparsified": pre is not None,
            "pre_mask_matches": None if pre is None else bool(torch.equal(pre, mask)),
            "density": mask.float().mean().item(),
            # did modelopt change any surviving weight (e.g. a SparseGPT OBS update)?
            "max_abs_dw_kept": (w - dense_w[name] * mask).abs().max().item(),
            **violations(mask),
        })
    return rows


def collect_pre_masks(m: nn.Module) -> dict:
    """ModelOpt's own masks (``_weight_mask``) for the modules it actually sparsified."""
    masks = {}
    for name, mod in m.named_modules():
        wm = getattr(mod, "_weight_mask", None)
        if isinstance(wm, torch.Tensor) and not bool(wm.all()):
            masks[name] = wm.detach().clone().bool()
    return masks


# --------------------------------------------------------------------------- modelopt runs


def run_modelopt(mts, dense: nn.Module, mode: str, calib: list[torch.Tensor]):
    m = copy.deepcopy(dense).eval()
    config = None
    if mode == "sparsegpt":
        config = {"data_loader": calib, "collect_func": lambda batch: batch}
    log = io.StringIO()
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, redirect_stdout(log):
        warnings.simplefilter("always")
        m = mts.sparsify(m, mode, config=config)
        pre_masks = collect_pre_masks(m)
        m = mts.export(m)
    elapsed = time.perf_counter() - t0
    msgs = [str(w.message) for w in caught]
    return m.eval(), pre_masks, elapsed, log.getvalue(), msgs


# --------------------------------------------------------------------------- reporting


def md_table(header: list[str], rows: list[list], align: str | None = None) -> str:
    align = align or ":---" + "|---:" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + align + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt_viol(v, groups):
    return "n/a" if v is None else f"{v}/{groups}"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                  "modelopt_reference.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    try:
        import modelopt
        import modelopt.torch.sparsity as mts
    except Exception as e:  # noqa: BLE001
        sys.exit(f"cannot import modelopt.torch.sparsity: {type(e).__name__}: {e}")

    start = dt.datetime.now(dt.timezone.utc)
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]

    dense = load_dense()
    calib = load_calib()
    x_test, y_test = load_test()
    n_calib = sum(len(b) for b in calib)
    print(f"modelopt {modelopt.__version__}, torch {torch.__version__}, "
          f"{len(x_test)} test images, {n_calib} calibration images")

    results = []  # (variant, top1)
    acc_dense = top1(dense, x_test, y_test)
    results.append(("dense", acc_dense, None))
    print(f"dense: {acc_dense:.2f}")
    acc_dense_bn = top1(bn_recalibrate(dense, calib), x_test, y_test)
    print(f"dense + BN recal (sanity): {acc_dense_bn:.2f}")

    reports = {}
    notes = {}
    for mode in ("sparse_magnitude", "sparsegpt"):
        m, pre_masks, elapsed, log, msgs = run_modelopt(mts, dense, mode, calib)
        acc = top1(m, x_test, y_test)
        acc_bn = top1(bn_recalibrate(m, calib), x_test, y_test)
        results.append((f"modelopt {mode}", acc, elapsed))
        results.append((f"modelopt {mode} + BN recal", acc_bn, None))
        reports[mode] = layer_report(dense, m, pre_masks)
        notes[mode] = (log, msgs)
        print(f"{mode}: {acc:.2f}   + BN recal: {acc_bn:.2f}   (sparsify+export {elapsed:.1f} s)")
        if log.strip():
            print("  modelopt stdout:\n    " + "\n    ".join(log.strip().splitlines()))
        for w in msgs:
            print(f"  warning: {w}")

    # ---- tables
    acc_rows = [[v, f"{a:.2f}", f"{a - acc_dense:+.2f}", "" if t is None else f"{t:.1f}"]
                for v, a, t in results]
    acc_md = md_table(["variant", "top-1 %", "vs dense (pp)", "sparsify+export s"], acc_rows)

    layer_mds = {}
    for mode, rows in reports.items():
        tr = []
        for r in rows:
            tr.append([
                r["layer"], r["shape"], "yes" if r["sparsified"] else "no",
                f"{r['density']:.3f}",
                fmt_viol(r["viol_trt"], r["groups_trt"]),
                fmt_viol(r["viol_flat"], r["groups_flat"]),
                f"{r['max_abs_dw_kept']:.1e}",
            ])
        sp = [r for r in rows if r["sparsified"]]
        tot_trt = sum(r["viol_trt"] or 0 for r in sp)
        tot_flat = sum(r["viol_flat"] or 0 for r in sp)
        tr.append([f"**total over {len(sp)} sparsified layers**", "", "", "",
                   str(tot_trt), str(tot_flat), ""])
        layer_mds[mode] = md_table(
            ["layer", "weight shape", "sparsified", "density", "trt viol (Cin @ kh,kw)",
             "flat viol (Cin*kh*kw)", "max |dW| kept"],
            tr, align=":---|:---|:---|---:|---:|---:|---:")

    print("\n" + acc_md)
    for mode, t in layer_mds.items():
        print(f"\nmask layout, {mode}:\n{t}")

    # ---- derived notes
    def sparsified_names(mode):
        return [r["layer"] for r in reports[mode] if r["sparsified"]]

    def skipped_names(mode):
        return [r["layer"] for r in reports[mode] if not r["sparsified"]]

    def layout_summary(mode):
        sp = [r for r in reports[mode] if r["sparsified"]]
        trt_ok = all((r["viol_trt"] or 0) == 0 and r["viol_trt"] is not None for r in sp)
        flat_ok = all(r["viol_flat"] == 0 for r in sp)
        if trt_ok and flat_ok:
            return "2:4 in both layouts"
        if trt_ok:
            return "2:4 along Cin at each kernel position (TensorRT layout); not along the flattened axis"
        if flat_ok:
            return ("2:4 only along the flattened Cin*kh*kw axis; NOT the TensorRT layout "
                    "for the 3x3 convs (1x1 convs and Linear coincide)")
        return "neither layout holds everywhere"

    sp_params = {mode: sum(int(np.prod([int(s) for s in r["shape"].split("x")]))
                           for r in reports[mode] if r["sparsified"]) for mode in reports}
    all_params = sum(int(np.prod([int(s) for s in r["shape"].split("x")]))
                     for r in reports["sparse_magnitude"])
    upd = {mode: max((r["max_abs_dw_kept"] for r in reports[mode]), default=0.0)
           for mode in reports}

    end = dt.datetime.now(dt.timezone.utc)
    runtime = time.perf_counter() - t_start
    machine = (f"{os.cpu_count()}-core CPU ({cpu_name()}), {platform.system()} "
               f"{platform.machine()}, Python {platform.python_version()}, torch "
               f"{torch.__version__} ({torch.get_num_threads()} threads), shared with other "
               f"jobs (load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end)")

    lines = [
        "# NVIDIA ModelOpt 2:4 sparsity reference (shipped Fashion-MNIST ResNet)",
        "",
        f"- date: {start.isoformat(timespec='seconds')} (finished {end.isoformat(timespec='seconds')}, "
        f"{runtime:.0f} s)",
        f"- machine: {machine}",
        f"- modelopt: nvidia-modelopt {modelopt.__version__} (`modelopt.torch.sparsity`), "
        "installed with `pip install --no-deps` next to the CPU torch",
        "- command: `python benchmarks/modelopt_reference.py`",
        "- model: `examples/fashion_mnist/model.py` `build()` + `weights.safetensors`, fp32, CPU",
        f"- calibration: `examples/fashion_mnist/calib.npy` ({n_calib} normalized training "
        f"images), {len(calib)} batches of {CALIB_BATCH}; used by sparsegpt (Hessians) and by BN recal",
        f"- evaluation: top-1 on the full Fashion-MNIST test set ({len(x_test)} images, "
        "`data.load(\"test\")` + `data.normalize`), torch eval mode, after `mts.export`",
        "- BN recal: after export, every BatchNorm gets `reset_running_stats()` and "
        "`momentum=None` (cumulative), model in train mode under `no_grad` over the "
        f"calibration batches, then eval (sanity: dense + BN recal = {acc_dense_bn:.2f}%)",
        "",
        "## Top-1 on the 10k test set",
        "",
        acc_md,
        "",
    ]
    for mode in reports:
        lines += [
            f"## Mask layout: {mode}",
            "",
            "Violations = groups of 4 with more than 2 nonzeros, out of all groups of 4. "
            "`trt`: 4 consecutive Cin at fixed (cout, kh, kw) (TensorRT conv layout; n/a "
            "when Cin % 4 != 0); `flat`: 4 consecutive entries of `weight.flatten(1)` "
            "(Cin*kh*kw). Mask = exported weight != 0. `max |dW| kept` = max |exported "
            "weight - dense weight * mask| (nonzero would mean ModelOpt updated kept weights).",
            "",
            layer_mds[mode],
            "",
        ]

    mag_log, mag_msgs = notes["sparse_magnitude"]
    sg_log, sg_msgs = notes["sparsegpt"]
    lines += [
        "## Notes: what ModelOpt did",
        "",
        f"- Both modes wrap every `nn.Conv2d` and `nn.Linear` (default rules `\"*\": {{}}`, only "
        f"`*lm_head*` excluded), but each searcher then skips layers by shape. "
        f"Of {all_params} conv/linear weights, sparse_magnitude sparsified "
        f"{sp_params['sparse_magnitude']} and sparsegpt {sp_params['sparsegpt']}.",
        f"- sparse_magnitude sparsified {len(sparsified_names('sparse_magnitude'))} layers: "
        f"{', '.join(sparsified_names('sparse_magnitude'))}; skipped: "
        f"{', '.join(skipped_names('sparse_magnitude'))}. Its rule (from NVIDIA ASP) requires "
        "`weight.size(0) % 8 == 0` and `weight.size(1) % 16 == 0`, so the stem conv (Cin=1) and "
        "the fc (Cout=10) stay dense. Mask: for each group of 4 the 2-of-4 pattern with the "
        "largest |w| sum; for 4-D conv weights the groups run along Cin at each (cout, kh, kw) "
        f"(it permutes to [kh, kw, Cout, Cin]). Layout: {layout_summary('sparse_magnitude')}.",
        f"- sparsegpt sparsified {len(sparsified_names('sparsegpt'))} layers: "
        f"{', '.join(sparsified_names('sparsegpt'))}; skipped: "
        f"{', '.join(skipped_names('sparsegpt'))}. Its rule requires `weight.size(0) % 4 == 0` "
        "and `weight.size(1) % 4 == 0` (stem Cin=1 and fc Cout=10 fail). It collects a "
        "Hessian X X^T per layer over the calibration data (conv inputs via `nn.Unfold` "
        "with the layer's kernel/stride/dilation but **without its padding**), then runs the "
        "SparseGPT column sweep (col_block_size 128, hessian_damp 0.1) on `weight.flatten(1)`, "
        "so 2:4 groups run along the flattened Cin*kh*kw axis. Layout: "
        f"{layout_summary('sparsegpt')}.",
        "- ModelOpt 0.47's sparsegpt keeps only the mask: `create_sgpt_mask` computes the "
        "OBS-updated weights but returns `weight != 0`, and `set_mask` multiplies the ORIGINAL "
        "weights by it, so the compensating weight update is discarded "
        f"(measured max |dW| on kept weights: sparse_magnitude {upd['sparse_magnitude']:.1e}, "
        f"sparsegpt {upd['sparsegpt']:.1e}).",
        "- ModelOpt's own `_weight_mask` (read before `mts.export`) equals the exported "
        "`weight != 0` for every sparsified layer: "
        + ", ".join(f"{mode} {all(r['pre_mask_matches'] for r in reports[mode] if r['sparsified'])}"
                    for mode in reports) + ".",
        "- Neither mode touches BatchNorm; the `+ BN recal` rows are this script's addition.",
        "- The sparsegpt search config defaults to `device: cuda` but the code never uses it; it "
        "ran on CPU unchanged.",
    ]
    if mag_msgs or sg_msgs:
        lines += ["- warnings emitted by modelopt:"]
        for mode, msgs in (("sparse_magnitude", mag_msgs), ("sparsegpt", sg_msgs)):
            for w in dict.fromkeys(msgs):
                lines.append(f"  - {mode}: {w.strip()}")
    lines.append("")

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"\nwrote {os.path.relpath(args.out, ROOT)} ({runtime:.0f} s)")


if __name__ == "__main__":
    main()
