"""Channel permutation in the build: defaults, report, safety net, CLI."""

from __future__ import annotations

import json

import pytest

from sparsecompile.build import BuildOptions, build

from helpers import cli


def _layers(report):
    return {layer["name"]: layer for layer in report["layers"]}


def test_sample_build_is_permuted_and_reported(sample_build):
    report = sample_build.report
    permutation = report["permutation"]
    assert report["options"]["permute"] is True and permutation["enabled"] is True
    groups = {tuple(g["consumers"]): g for g in permutation["groups"]}
    stream = groups[("conv2", "fc1")]  # conv1 -> bn -> relu feeds conv2 and, through the residual, fc1
    assert stream["status"] == "permuted" and set(stream["producers"]) == {"conv1", "conv2"}
    assert stream["kept_permuted"] >= stream["kept_plain"]
    assert "model input" in groups[("conv1",)]["reason"]
    layers = _layers(report)
    for name in ("conv2", "fc1"):
        stats = layers[name]["permutation"]
        assert stats["group"] == stream["id"]
        # the mask applied after permutation keeps what the search promised
        assert layers[name]["retained_magnitude"] == pytest.approx(stats["kept_permuted"], abs=1e-4)
    # the permuted graph was checked against the original model before masking
    assert report["verification"]["normalization_vs_original"][0]["relative_error"] < 1e-5
    names = [p["name"] for p in report["passes"]]
    assert names.index("fold_batchnorm") < names.index("permute_channels")
    markdown = (sample_build.output / "report.md").read_text()
    assert "## Channel permutation" in markdown and "efficacy" in markdown


def test_no_permute_and_targets_without_sparse_cores(model_files, tmp_path):
    common = dict(model=str(model_files / "dynamic.pt2"), calib=str(model_files / "calib.npy"), min_weights=0,
                  correct="none")
    off = build(BuildOptions(output=str(tmp_path / "off"), permute=False, **common)).report
    assert off["permutation"] == {"enabled": False} and "permutation" not in _layers(off)["conv2"]
    cpu = build(BuildOptions(output=str(tmp_path / "cpu"), target="cpu", **common)).report
    assert cpu["permutation"] == {"enabled": False}
    on = build(BuildOptions(output=str(tmp_path / "on"), **common)).report
    # same masks method, permuted channels: at least as much magnitude kept in the permuted layers
    for name in ("conv2", "fc1"):
        assert _layers(on)[name]["retained_magnitude"] >= _layers(off)[name]["retained_magnitude"] - 1e-9


def test_a_wrong_permutation_is_caught_and_undone(model_files, tmp_path, monkeypatch):
    """If a permutation ever changed the function, the build warns and ships the unpermuted graph."""
    from sparsecompile.passes import permute_channels

    real = permute_channels.apply_permutation

    def consumers_only(gm, group, perm):
        group.edits = [e for e in group.edits if e.role == "consumer"]
        real(gm, group, perm)

    monkeypatch.setattr(permute_channels, "apply_permutation", consumers_only)
    result = build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / "b"),
                                calib=str(model_files / "calib.npy"), min_weights=0))
    report = result.report
    assert any("channel permutation changed the model's outputs" in note for note in report["notes"])
    assert all(g["status"] == "unpermuted" for g in report["permutation"]["groups"])
    assert report["verification"]["normalization_vs_original"][0]["relative_error"] < 1e-5


def test_cli_flags(model_files, tmp_path):
    bad = cli("build", str(model_files / "dynamic.pt2"), "-o", str(tmp_path / "x"),
              "--permute-budget", "0")
    assert bad.exit_code != 0 and "--permute-budget" in bad.output
    out = tmp_path / "b"
    ok = cli("build", str(model_files / "dynamic.pt2"), "-o", str(out), "--calib",
             str(model_files / "calib.npy"), "--min-weights", "0", "--permute-budget", "1")
    assert ok.exit_code == 0, ok.output
    assert "permute: " in ok.output and "channel groups permuted" in ok.output
    shown = cli("inspect", str(out))
    assert "permutation" in shown.output and "eff " in shown.output
    assert json.loads((out / "report.json").read_text())["options"]["permute_budget"] == 1.0
    off = cli("build", str(model_files / "dynamic.pt2"), "-o", str(tmp_path / "c"),
              "--no-permute")
    assert off.exit_code == 0, off.output
    assert "channel groups permuted" not in off.output


def test_bn_correction_follows_the_permutation(tmp_path):
    """Folded BN parameters are per output channel: after a permutation they must be reordered too.

    The BNs' running statistics are set to the calibration data's own statistics, so re-estimating
    a BN whose layer and inputs are unchanged (conv1: dense, reads the model input, but its output
    channels are permuted) must give back nearly the same layer output.
    """
    import numpy as np
    import torch

    from conftest import SmallNet

    torch.manual_seed(0)
    model = SmallNet()
    calib = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: one pass gives the data's statistics
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        model.train()
        model(calib)
    model.eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(torch.export.export(model, (calib[:4],), dynamic_shapes=({0: batch},)), tmp_path / "m.pt2")
    np.save(tmp_path / "calib.npy", calib.numpy())
    report = build(BuildOptions(model=str(tmp_path / "m.pt2"), output=str(tmp_path / "b"),
                                calib=str(tmp_path / "calib.npy"), min_weights=0, exclude=["conv1"],
                                correct="bn")).report
    layers = _layers(report)
    assert layers["conv1"]["status"] == "dense"
    assert any(g["status"] == "permuted" and "conv1" in g["producers"] for g in report["permutation"]["groups"])
    correction = layers["conv1"]["correction"]
    assert correction["error_before"] < 1e-6
    # The correction is fitted on the 48 samples not held back for the accuracy check, whose statistics
    # differ slightly from the 64 the BNs were set from (~0.01); a misordered BN gives errors of order 1.
    assert correction["error_after"] < 0.05, correction
