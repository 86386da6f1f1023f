"""build --certify / sparsecompile certify, and --spectra / inspect --spectra / --budget-signal mp, end to end.

The analyses themselves are tested against brute force in tests/analysis/."""

from __future__ import annotations

import json

import pytest

from sparsecompile.build import BuildOptions, build
from sparsecompile.certificates import certify_build
from sparsecompile.errors import SparseCompileError
from helpers import cli as invoke




@pytest.fixture(scope="module")
def certified(tmp_path_factory, model_files):
    out = tmp_path_factory.mktemp("cert") / "b"
    return build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(out), min_weights=0,
                              calib=str(model_files / "calib.npy"), permute=False, certify=True, spectra=True,
                              certify_samples=48))


def test_build_certificate(certified):
    certificate = certified.report["certificate"]
    summary = certificate["summary"]
    assert summary["samples"] == 48 and summary["certifiable"]
    assert summary["self_check"]["violations"] == 0 and summary["certified_but_changed"] == 0
    assert 0 <= summary["certified_fraction"] <= summary["observed_unchanged_fraction"] <= 1
    agreement = certified.report["verification"]["sparse_vs_dense"][0]["top1_agreement"]
    assert summary["observed_unchanged_fraction"] == pytest.approx(agreement)  # same 48 samples, same models
    sparse = {r["name"] for r in certified.report["layers"] if r["status"] == "sparse"}
    assert {row["layer"] for row in certificate["riskiest_layers"]} <= sparse | {None}
    assert (certified.output / "certify" / "certificate.json").exists()
    assert (certified.output / "certify" / "dense_values.safetensors").exists()


def test_inspect_shows_which_layers_take_the_margin(certified):
    ranking = certified.report["certificate"]["margin_ranking"]
    assert ranking and all(row["layer"] for row in ranking)
    result = invoke("inspect", certified.output)
    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.output.splitlines() if "margin taken by layer" in line]
    assert f"{ranking[0]['layer']} {ranking[0]['median']:.3g}" in line


def test_certify_command_reproduces_the_build(certified, model_files, tmp_path):
    again = certify_build(str(certified.output), str(model_files / "calib.npy"), samples=48)
    before = certified.report["certificate"]["summary"]
    assert again["summary"]["observed_unchanged_fraction"] == pytest.approx(before["observed_unchanged_fraction"])
    assert again["summary"]["certified_fraction"] == pytest.approx(before["certified_fraction"])
    assert again["summary"]["median_bound"] == pytest.approx(before["median_bound"], rel=1e-3)
    result = invoke("certify", certified.output, "--calib", model_files / "calib.npy", "--samples", 16,
                    "--json-out", tmp_path / "c.json")
    assert result.exit_code == 0, result.output
    assert "guaranteed unchanged" in result.output and "riskiest layers" in result.output
    assert json.loads((tmp_path / "c.json").read_text())["summary"]["samples"] == 16


def test_certify_needs_a_certify_build(sample_build, model_files):
    with pytest.raises(SparseCompileError, match="rebuild it with --certify"):
        certify_build(str(sample_build.output), str(model_files / "calib.npy"))
    result = invoke("certify", sample_build.output, "--calib", model_files / "calib.npy")
    assert result.exit_code == 1 and result.output.count("error:") == 1


def test_spectra_in_the_build_and_for_a_model_file(certified, sample_build, model_files, tmp_path):
    spectra = {r["name"]: r["spectrum"] for r in certified.report["layers"] if "spectrum" in r}
    assert set(spectra) == {r["name"] for r in certified.report["layers"]}
    assert all(0 <= s["bulk_energy_fraction"] <= 1 and s["spikes"] >= 0 for s in spectra.values())
    result = invoke("inspect", certified.output, "--spectra")
    assert result.exit_code == 0 and "bulk energy" in result.output and "conv2" in result.output
    result = invoke("inspect", model_files / "dynamic.pt2", "--spectra", "--plot", tmp_path / "s.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s.png").stat().st_size > 1000
    result = invoke("inspect", sample_build.output, "--spectra")
    assert result.exit_code == 1 and "rebuild with --spectra" in result.output


def test_budget_with_the_spectral_signal(tmp_path, model_files):
    result = build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / "mp"), min_weights=0,
                                calib=str(model_files / "calib.npy"), permute=False, max_drop=0.0,
                                method="magnitude", output_kind="0=values", max_error=0.5, budget_signal="mp"))
    budget = result.report["budget"]
    assert budget["met"] and budget["reverted"]
    assert all(0 <= v <= 1 for v in budget["sensitivity"].values())
    reverted = {e["layer"] for e in budget["reverted"]}
    assert all("mp sensitivity" in r["reason"] for r in result.report["layers"] if r["name"] in reverted)
    assert all("spectrum" in r for r in result.report["layers"])


def test_certificate_line_survives_missing_bounds():
    from sparsecompile.report import certificate_line

    full = {"summary": {"samples": 64, "certified_fraction": 0.25, "observed_unchanged_fraction": 0.9,
                        "median_looseness": 12.0}}
    assert certificate_line(full) == ("certify: 25.0% of 64 calibration samples guaranteed unchanged, 90.0% observed "
                                      "unchanged (bound median 12x the actual change; sparsecompile certify for the "
                                      "riskiest layers)")
    # Nothing changed (no looseness), or no fraction at all: no crash, no made-up numbers.
    quiet = {"summary": {"samples": 64, "certified_fraction": 1.0, "observed_unchanged_fraction": 1.0,
                         "median_looseness": None}}
    assert "bound median" not in certificate_line(quiet) and "100.0% of 64" in certificate_line(quiet)
    none = {"summary": {"samples": 64, "certified_fraction": None, "median_looseness": None,
                        "not_certifiable": ["aten.foo has no rule"]}}
    assert certificate_line(none) == "certify: not certifiable: aten.foo has no rule"
    assert certificate_line({"summary": {}}) == "certify: not certifiable: no bound was computed"
