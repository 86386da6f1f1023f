"""Marchenko-Pastur (MP) spectral diagnostics of GEMM weights.

Math (following "Pruning Deep Neural Networks via the Marchenko-Pastur
Distribution", section 2.2):

* A weight is viewed as its GEMM matrix ``W`` of shape ``n x p``: a linear
  weight ``[out, in]`` as is, a convolution ``[Cout, Cin, *k]`` as
  ``Cout x (Cin*prod(k))`` (the column order does not change singular values).
* ``N = max(n, p)``, ``M = min(n, p)``, aspect ratio ``q = M / N`` in (0, 1].
* Normalisation: the spectrum analysed is the eigenvalues of the ``M x M``
  Gram matrix divided by ``N``, i.e. ``lambda_i = s_i^2 / N`` with ``s_i`` the
  singular values of ``W`` (these are also the nonzero eigenvalues of
  ``W^T W / N``). If the entries were iid with variance ``sigma^2`` this
  spectrum follows MP with ratio ``q`` and scale ``sigma^2``, supported on
  ``[sigma^2 (1 - sqrt q)^2, sigma^2 (1 + sqrt q)^2]``; the upper edge is
  ``lambda_+ = sigma^2 (1 + sqrt q)^2`` (``edge``), equivalently the
  singular-value edge ``s_+ = sigma (sqrt N + sqrt M)`` (``singular_edge``).
* Fit of ``sigma^2`` (``fit_method = "median-iterative"``): the median of the
  bulk eigenvalues is matched to the median of MP(q, 1), so
  ``sigma^2 = median(bulk) / median_MP(q)``. The bulk starts as all
  eigenvalues; eigenvalues above the spike threshold are removed and the fit
  is repeated until the spike count is stable (at most 20 rounds). A median is
  used because a few spikes move it by only a few ranks, whereas they inflate
  a mean (``sum s_i^2 / (n p)``) without bound.
* Spikes: eigenvalues above ``spike_threshold = lambda_+ + t * s_TW`` where
  ``s_TW`` is the Tracy-Widom scale of the largest eigenvalue of a white
  Wishart matrix (Johnstone 2001), ``sigma^2 (sqrt N + sqrt M)
  (1/sqrt N + 1/sqrt M)^(1/3) / N``, and ``t = 2.02`` (about the 99th
  percentile of TW1), so a pure-noise matrix shows a spurious spike about 1%
  of the time instead of half the time.
* ``bulk_energy_fraction``: the share of ``||W||_F^2 = sum s_i^2`` carried by
  the eigenvalues at or below the spike threshold.

These are diagnostics: the fit assumes an iid bulk, and trained layers are
often heavy-tailed rather than MP-plus-spikes (the paper says so too). For
small matrices (``M < 32``) the fit is flagged ``reliable: false``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from sparsecompile.graph import get_tensor

FIT_METHOD = "median-iterative"
TRACY_WIDOM_99 = 2.02  # ~99th percentile of the Tracy-Widom (beta=1) law
MIN_RELIABLE_DIM = 32
TOP_VALUES = 5


@lru_cache(maxsize=256)
def mp_median(q: float) -> float:
    """Median of the Marchenko-Pastur law with ratio ``q`` in (0, 1] and unit scale."""
    return mp_quantile(q, 0.5)


def mp_quantile(q: float, level: float, points: int = 20001) -> float:
    """Quantile of MP(q, sigma^2 = 1), by integrating the density on a cosine grid.

    With ``x = a + (b - a)(1 - cos t)/2`` the density times ``dx`` is
    ``(b - a)^2 sin^2 t / (8 pi q x) dt``: smooth, even at ``a = 0`` (q = 1).
    """
    if not 0 < q <= 1:
        raise ValueError(f"MP ratio must be in (0, 1], got {q}")
    a, b = (1 - math.sqrt(q)) ** 2, (1 + math.sqrt(q)) ** 2
    t = torch.linspace(0.0, math.pi, points, dtype=torch.float64)
    x = a + (b - a) * (1 - torch.cos(t)) / 2
    weight = (b - a) ** 2 * torch.sin(t) ** 2 / (8 * math.pi * q * x.clamp_min(1e-300))
    if a == 0:  # sin^2 t / (1 - cos t) = 1 + cos t: the removable singularity at t = 0
        weight = (b ** 2) * (1 + torch.cos(t)) / (4 * math.pi * q * b)
    cdf = torch.cumulative_trapezoid(weight, t)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), cdf]) / cdf[-1]
    index = int(torch.searchsorted(cdf, torch.tensor(level, dtype=torch.float64)))
    index = min(max(index, 1), points - 1)
    c0, c1 = float(cdf[index - 1]), float(cdf[index])
    frac = 0.0 if c1 == c0 else (level - c0) / (c1 - c0)
    return float(x[index - 1] + frac * (x[index] - x[index - 1]))


def mp_density(x: torch.Tensor, q: float, sigma2: float) -> torch.Tensor:
    """MP(q, sigma^2) density at ``x`` (for plots)."""
    a, b = sigma2 * (1 - math.sqrt(q)) ** 2, sigma2 * (1 + math.sqrt(q)) ** 2
    inside = (x > a) & (x < b)
    value = torch.sqrt(((b - x) * (x - a)).clamp_min(0)) / (2 * math.pi * sigma2 * q * x.clamp_min(1e-300))
    return torch.where(inside, value, torch.zeros_like(value))


def gemm_matrix_2d(weight: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` stays; ``[Cout, Cin, *k]`` becomes ``Cout x (Cin*prod(k))``."""
    if weight.dim() < 2:
        raise ValueError(f"a GEMM weight needs at least 2 dimensions, got shape {tuple(weight.shape)}")
    return weight.detach().reshape(weight.shape[0], -1)


def layer_spectrum(weight: torch.Tensor, *, keep_eigenvalues: bool = False, top: int = TOP_VALUES) -> dict:
    """MP fit of one weight; JSON-serialisable (see the module docstring for every field)."""
    matrix = gemm_matrix_2d(weight).double()
    n, p = matrix.shape
    big, small = max(n, p), min(n, p)
    q = small / big
    singular = torch.linalg.svdvals(matrix)  # descending, length M
    eig = singular ** 2 / big
    total_energy = float((singular ** 2).sum())
    result = {
        "shape": list(weight.shape), "matrix": [n, p], "q": q, "fit_method": FIT_METHOD,
        "normalisation": "eigenvalues of W^T W / max(n, p) (nonzero part), lambda_i = s_i^2 / max(n, p)",
        "reliable": small >= MIN_RELIABLE_DIM,
    }
    if total_energy == 0.0:
        result.update(sigma2=0.0, edge=0.0, singular_edge=0.0, spike_threshold=0.0, spikes=0,
                      bulk_energy_fraction=1.0, top_singular_values=[0.0] * min(top, small), reliable=False,
                      note="all-zero weight")
        if keep_eigenvalues:
            result["eigenvalues"] = eig.tolist()
        return result
    median_unit = mp_median(q)
    tw_scale_unit = (math.sqrt(big) + math.sqrt(small)) * (1 / math.sqrt(big) + 1 / math.sqrt(small)) ** (1 / 3) / big
    spikes, sigma2 = 0, 0.0
    for _ in range(20):
        bulk = eig[spikes:]  # eig is descending: spikes are the first ones
        sigma2 = float(bulk.median()) / median_unit
        threshold = sigma2 * ((1 + math.sqrt(q)) ** 2 + TRACY_WIDOM_99 * tw_scale_unit)
        new_spikes = int((eig > threshold).sum())
        if new_spikes >= small:  # degenerate (e.g. rank-deficient with zero median): keep the last sane count
            new_spikes = small - 1
        if new_spikes == spikes:
            break
        spikes = new_spikes
    edge = sigma2 * (1 + math.sqrt(q)) ** 2
    threshold = sigma2 * ((1 + math.sqrt(q)) ** 2 + TRACY_WIDOM_99 * tw_scale_unit)
    bulk_energy = float((singular[spikes:] ** 2).sum())
    result.update(
        sigma2=sigma2, edge=edge, singular_edge=math.sqrt(edge * big), spike_threshold=threshold,
        spikes=spikes, bulk_energy_fraction=min(1.0, max(0.0, bulk_energy / total_energy)),
        top_singular_values=[float(s) for s in singular[:top]],
        top_eigenvalue_over_edge=float(eig[0]) / edge if edge > 0 else float("inf"),
    )
    if keep_eigenvalues:
        result["eigenvalues"] = eig.tolist()
    return result


def model_spectra(gm: torch.nn.Module, layers, *, keep_eigenvalues: bool = False) -> dict[str, dict]:
    """``layer_spectrum`` of every layer that has a weight (``layers`` from ``find_layers``).

    Layers stay in the given order; a weight that cannot be analysed (fewer
    than two dimensions) gets ``{"error": ...}`` instead of a fit.
    """
    spectra: dict[str, dict] = {}
    for layer in layers:
        if not getattr(layer, "weight_target", None):
            continue
        weight = get_tensor(gm, layer.weight_target)
        try:
            spectra[layer.name] = layer_spectrum(weight, keep_eigenvalues=keep_eigenvalues)
        except ValueError as exc:
            spectra[layer.name] = {"shape": list(weight.shape), "error": str(exc)}
    return spectra


def mp_sensitivity(spectrum: dict) -> float:
    """Per-layer sensitivity prior in [0, 1]: the fraction of energy outside the MP bulk.

    Rationale (MP pruning paper, sections 2.3-4): a trained weight is modelled
    as structured signal (low-rank spikes above the MP edge) plus a random-like
    bulk; the random-like part has a small data-path effect and its removal is
    what pruning can afford, while spikes carry what training learned. A 2:4
    mask removes half of every row regardless, so it perturbs the spike
    directions too; the more of a layer's energy sits in spikes, the more of
    the learned signal a fixed-ratio mask damages. The paper uses MP-like
    layers as candidates for larger budgets and protects non-MP layers; this
    number is the matching ordering (higher = keep dense first). It is a prior
    from the weights alone, not a measurement: heavy-tailed layers with no
    clear spikes score low even when they matter, and fits flagged
    ``reliable: false`` (small matrices) deserve little trust.
    """
    if "bulk_energy_fraction" not in spectrum:
        return float("nan")
    return float(min(1.0, max(0.0, 1.0 - spectrum["bulk_energy_fraction"])))


def plot_spectra(spectra: dict[str, dict], path, *, columns: int = 3) -> bool:
    """Write a PNG: per layer, the eigenvalue histogram with the fitted MP density and edge.

    Layers whose spectrum lacks ``eigenvalues`` (``keep_eigenvalues=False``)
    show their top singular values against the singular-value edge instead.
    Returns False (and writes nothing) when matplotlib cannot be imported.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - optional dependency
        return False
    items = [(name, s) for name, s in spectra.items() if "sigma2" in s]
    if not items:
        items = [("(no layers)", {})]
    rows = math.ceil(len(items) / columns)
    fig, axes = plt.subplots(rows, min(columns, len(items)), figsize=(4.2 * min(columns, len(items)), 3.2 * rows),
                             squeeze=False)
    for ax in axes.flat[len(items):]:
        ax.axis("off")
    for ax, (name, spectrum) in zip(axes.flat, items):
        ax.set_title(name if len(name) < 40 else "..." + name[-37:], fontsize=8)
        if not spectrum:
            continue
        if "eigenvalues" in spectrum:
            eig = torch.tensor(spectrum["eigenvalues"], dtype=torch.float64)
            hi = max(float(eig.max()), spectrum["edge"]) * 1.05
            ax.hist(eig.numpy(), bins=60, range=(0, hi), density=True, alpha=0.6, color="tab:blue")
            xs = torch.linspace(0, hi, 400, dtype=torch.float64)
            ax.plot(xs.numpy(), mp_density(xs, spectrum["q"], spectrum["sigma2"]).numpy(), color="tab:red", lw=1)
            ax.axvline(spectrum["edge"], color="tab:red", ls="--", lw=0.8)
            ax.set_xlabel("eigenvalue of W^T W / max(n,p)", fontsize=7)
        else:
            values = spectrum["top_singular_values"]
            ax.bar(range(len(values)), values, color="tab:blue")
            ax.axhline(spectrum["singular_edge"], color="tab:red", ls="--", lw=0.8)
            ax.set_xlabel("top singular values (red: MP edge)", fontsize=7)
        ax.text(0.98, 0.95, f"spikes={spectrum['spikes']}\nbulk E={spectrum['bulk_energy_fraction']:.2f}",
                transform=ax.transAxes, ha="right", va="top", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)
    return True
