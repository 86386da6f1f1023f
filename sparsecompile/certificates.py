"""Prediction-stability certificates of a build: stored by ``build --certify``, recomputed by
``sparsecompile certify BUILD --calib FILE``.

The math lives in :mod:`sparsecompile.analysis.certify`. It gives a sound per-sample bound on how far the
build's parameter changes can move the outputs, and a sample whose dense margin exceeds sqrt(2) times
that bound provably keeps its prediction. This module handles the build directory:

* ``certify/certificate.json``: the full result on the build's calibration set (summary, per-layer
  table ranked by share of the bound, the Gumbel paper's lemma quantities);
* ``certify/dense_values.safetensors``: the dense value of every tensor the build changed (masked
  weights, corrected biases, re-estimated statistics; zeros for a bias the build added). With the
  build's ``model.pt2`` it reconstructs the dense model in the build's own graph and channel order,
  which the certificate compares against.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from sparsecompile.errors import SparseCompileError

CERTIFY_DIR = "certify"


def certificate_summary(result: dict, top: int = 5) -> dict:
    """What report.json keeps: the summary and the riskiest layers."""
    keys = ("layer", "node", "op", "share_of_bound", "risk_rank", "local_term", "downstream_gain", "margin_used")
    return {"summary": result["summary"],
            "riskiest_layers": [{k: row[k] for k in keys if k in row} for row in result.get("layers", [])[:top]],
            "margin_ranking": result.get("margin_ranking", [])[:top]}


def write_certificate(directory: Path, result: dict, dense_values: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    target = Path(directory) / CERTIFY_DIR
    target.mkdir(exist_ok=True)
    (target / "certificate.json").write_text(json.dumps(result, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in dense_values.items()}, str(target / "dense_values.safetensors"))


def certificate_lines(result: dict, top: int = 5) -> list[str]:
    summary = result["summary"]
    lines = []
    if summary.get("not_certifiable"):
        lines.append("not certifiable: " + "; ".join(summary["not_certifiable"][:3]))
    for note in summary.get("unmodelled_ops", [])[:3]:
        lines.append(f"loose: {note}")
    if summary.get("unbounded_samples"):
        lines.append(f"{summary['unbounded_samples']} samples have no finite bound (an op without a bound rule "
                     "follows a changed layer)")
    samples = summary.get("samples", 0)
    if samples:
        lines.append(f"{samples} samples: {100 * summary['certified_fraction']:.1f}% guaranteed unchanged "
                     f"(certified), {100 * summary['observed_unchanged_fraction']:.1f}% observed unchanged")
        if summary.get("median_looseness") is not None:
            lines.append(f"bound vs actual output change: median {summary['median_looseness']:.3g}x looser "
                         f"(median bound {summary['median_bound']:.3g}, median change {summary['median_actual_change']:.3g})")
    by = summary.get("certified_by")
    if by:
        lines.append(f"certified by: class-margin back-substitution {100 * by.get('crown_margins', 0):.1f}%, "
                     f"elementwise boxes {100 * by.get('taylor_box', 0):.1f}%, "
                     f"global l2 chain {100 * by.get('global_l2', 0):.1f}%")
    used = summary.get("margin_used")
    ranking = result.get("margin_ranking") or []
    if used and ranking:
        lines.append(f"margin the bound takes (median over samples, closest class pair): total "
                     f"{used['median_total']:.3g}, of which nonlinear ops {used['median_by_nonlinear_ops']:.3g}; "
                     "by layer:")
        for row in ranking[:top]:
            lines.append(f"  {row['layer']:<28} median {row['median']:.3g}  max {row['max']:.3g}")
    rows = result.get("layers") or result.get("riskiest_layers") or []
    if rows:
        lines.append("riskiest layers (share of the bound):")
        for row in rows[:top]:
            name = row.get("layer") or row.get("node")
            local = row.get("local_term", 0)
            local = local.get("median", 0) if isinstance(local, dict) else local
            lines.append(f"  {name:<28} {100 * row.get('share_of_bound', 0):5.1f}%  "
                         f"local term {local:.3g} (median) x downstream gain {row.get('downstream_gain', 0):.3g}")
    lines.append("bounds are sound; the global l2 chain is loose (operator norms multiply through depth), the "
                 "elementwise boxes and margin back-substitution follow each sample's activations")
    return lines


def certify_build(build_dir: str, calib: str, samples: int = 256, progress=None, verify: bool = True) -> dict:
    """Recompute the certificate of a ``--certify`` build on other calibration data."""
    from safetensors.torch import load_file

    from sparsecompile.analysis.certify import certify
    from sparsecompile.builddir import open_build
    from sparsecompile.calibration import load_calibration, match_to_model
    from sparsecompile.frontend import load_pt2
    from sparsecompile.graph import set_tensor
    from sparsecompile.hardware import torch_threads
    from sparsecompile.layers import find_layers
    from sparsecompile.runtime import example_arrays

    path, manifest = open_build(build_dir, verify=verify)
    values_path = path / CERTIFY_DIR / "dense_values.safetensors"
    if not values_path.exists():
        raise SparseCompileError(f"build '{path}' was made without --certify: rebuild it with --certify "
                                 "(it keeps the dense values certification compares against)")
    if not (path / "model.pt2").exists():
        raise SparseCompileError(f"build '{path}' has no model.pt2 (made by an older sparsecompile); rebuild it")
    sparse = load_pt2(path / "model.pt2", trust_pickle=False).module()
    dense = copy.deepcopy(sparse)
    for name, value in load_file(str(values_path)).items():
        try:
            set_tensor(dense, name, value)
        except (AttributeError, KeyError):
            raise SparseCompileError(f"'{values_path}' names '{name}', which model.pt2 does not have") from None
    example = tuple(torch.from_numpy(a) for a in example_arrays(manifest["inputs"], batch=2))
    data = load_calibration(calib, samples, None, progress)
    data = match_to_model(data, example, [spec["name"] for spec in manifest["inputs"]])
    layers = find_layers(dense, min_weights=0)
    with torch_threads(1):
        # every sample: certify runs a graph with a baked-in batch size at that size (padding the last batch)
        return certify(dense, sparse, layers, list(data.batches(64)))
