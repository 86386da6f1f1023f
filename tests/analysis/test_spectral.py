"""Marchenko-Pastur diagnostics: the fit against random-matrix theory on matrices whose truth is known."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import export_graph
from conftest import make_small_net, small_input
from sparsecompile.analysis.spectral import (
    layer_spectrum, model_spectra, mp_median, mp_quantile, mp_sensitivity, plot_spectra,
)
from sparsecompile.layers import find_layers


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gaussian(n: int, p: int, sigma: float, seed: int) -> torch.Tensor:
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * sigma


def _with_spikes(weight: torch.Tensor, strengths: list[float], seed: int) -> torch.Tensor:
    """``W + sum_i theta_i u_i v_i^T`` with random unit vectors u_i, v_i."""
    g = torch.Generator().manual_seed(seed)
    n, p = weight.shape
    spiked = weight.clone()
    for theta in strengths:
        u = torch.randn(n, generator=g, dtype=torch.float64)
        v = torch.randn(p, generator=g, dtype=torch.float64)
        spiked += theta * torch.outer(u / u.norm(), v / v.norm())
    return spiked


def test_mp_median_matches_the_closed_form_law():
    # median of MP(q=1): solves int_0^m sqrt((4-x)x)/(2 pi x) dx = 1/2 (scipy: 0.6527759416)
    assert mp_median(1.0) == pytest.approx(0.6527759416, abs=1e-6)
    # quantiles are increasing and span the support [(1-sqrt q)^2, (1+sqrt q)^2]
    q = 0.25
    levels = [mp_quantile(q, t) for t in (0.001, 0.25, 0.5, 0.75, 0.999)]
    assert levels == sorted(levels)
    assert levels[0] >= (1 - math.sqrt(q)) ** 2 - 1e-9 and levels[-1] <= (1 + math.sqrt(q)) ** 2 + 1e-9


@pytest.mark.parametrize("n,p", [(200, 400), (300, 300), (96, 864)])
def test_gaussian_matrix_fits_theory_with_no_spikes(n, p):
    sigma = 0.5
    spikes = []
    for seed in range(3):
        s = layer_spectrum(_gaussian(n, p, sigma, seed))
        q = min(n, p) / max(n, p)
        assert s["q"] == pytest.approx(q)
        assert s["sigma2"] == pytest.approx(sigma ** 2, rel=0.03)
        assert s["edge"] == pytest.approx(sigma ** 2 * (1 + math.sqrt(q)) ** 2, rel=0.03)
        assert s["singular_edge"] == pytest.approx(sigma * (math.sqrt(max(n, p)) + math.sqrt(min(n, p))), rel=0.02)
        # the largest singular value of a Gaussian matrix sits at the edge (Tracy-Widom fluctuations)
        assert s["top_singular_values"][0] == pytest.approx(s["singular_edge"], rel=0.05)
        assert s["bulk_energy_fraction"] == pytest.approx(1.0, abs=0.02)
        spikes.append(s["spikes"])
    assert sum(spikes) <= 1


def test_rank_one_spikes_are_counted_and_take_energy_out_of_the_bulk():
    n, p, sigma = 200, 400, 0.5
    base = _gaussian(n, p, sigma, seed=5)
    edge = sigma * (math.sqrt(p) + math.sqrt(n))
    before = layer_spectrum(base)
    fractions = [before["bulk_energy_fraction"]]
    for k in (1, 3, 5):
        spiked = layer_spectrum(_with_spikes(base, [edge * (2 + i) for i in range(k)], seed=k))
        assert spiked["spikes"] == k
        # a finite number of spikes leaves the bulk (and so the fitted scale) where it was
        assert spiked["sigma2"] == pytest.approx(before["sigma2"], rel=0.05)
        fractions.append(spiked["bulk_energy_fraction"])
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert fractions == sorted(fractions, reverse=True) and fractions[-1] < fractions[0] - 0.3
    assert mp_sensitivity(layer_spectrum(_with_spikes(base, [3 * edge], 0))) > mp_sensitivity(before)


def test_convolution_weight_is_read_as_cout_by_cin_k_k():
    weight = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    s = layer_spectrum(weight)
    assert s["shape"] == [16, 8, 3, 3] and s["matrix"] == [16, 72]
    assert s["q"] == pytest.approx(16 / 72)
    expected = torch.linalg.svdvals(weight.reshape(16, 72).double())
    assert s["top_singular_values"] == pytest.approx(expected[:5].tolist(), rel=1e-9)
    # the column order (cin, kh, kw) vs (kh, kw, cin) does not change singular values
    other = layer_spectrum(weight.permute(0, 2, 3, 1).contiguous())
    assert other["top_singular_values"] == pytest.approx(s["top_singular_values"], rel=1e-9)
    with pytest.raises(ValueError):
        layer_spectrum(torch.ones(5))


def test_zero_weight_and_small_matrices_are_flagged():
    zero = layer_spectrum(torch.zeros(8, 8))
    assert zero["spikes"] == 0 and zero["bulk_energy_fraction"] == 1.0 and zero["reliable"] is False
    assert layer_spectrum(torch.randn(10, 12))["reliable"] is False
    assert mp_sensitivity({"shape": [1]}) != mp_sensitivity({"shape": [1]})  # NaN when there is no fit


def test_model_spectra_names_every_layer_with_a_weight_and_is_json(tmp_path):
    gm = export_graph(make_small_net(), small_input())
    layers = find_layers(gm)
    spectra = model_spectra(gm, layers, keep_eigenvalues=True)
    assert list(spectra) == [layer.name for layer in layers if layer.weight_target]
    assert spectra["conv2"]["matrix"] == [16, 144]
    for s in spectra.values():
        assert 0.0 <= s["bulk_energy_fraction"] <= 1.0
        assert 0.0 <= mp_sensitivity(s) <= 1.0
        assert len(s["eigenvalues"]) == min(s["matrix"])
    json.dumps(spectra)
    # a layer without eigenvalues is drawn as its top singular values against the edge
    del spectra["fc2"]["eigenvalues"]
    path = tmp_path / "spectra.png"
    assert plot_spectra(spectra, path) is True
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
