"""The accuracy guard and --method auto: a default build with --calib never ships a model it measured as broken."""

from __future__ import annotations

import json

import pytest

from sparsecompile.build import BuildOptions, build
from sparsecompile.errors import SparseCompileError

from helpers import cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _options(scaled_mlp, tmp_path, name, **kwargs):
    model, calib = scaled_mlp
    kwargs.setdefault("calib", str(calib))
    return BuildOptions(model=str(model), output=str(tmp_path / name), min_weights=1000, permute=False, **kwargs)


def _damage(report):
    return report["verification"]["damage"]["outputs"][0]["damage"]


def test_default_build_chooses_a_method_that_keeps_accuracy(scaled_mlp, tmp_path):
    result = build(_options(scaled_mlp, tmp_path, "auto"))
    report = result.report
    choice = report["method_choice"]
    scores = {(t["method"], t["correct"], t.get("update_weights", False)): t.get("score") for t in choice["tried"]}
    assert len(scores) == 8 and scores[("magnitude", "bias", False)] > 10  # magnitude loses > 10 points
    assert report["method"] == "activation" and choice["chosen"]["method"] == "activation"
    assert scores[("activation", "bias", False)] == 0.0 and not any("skipped" in t for t in choice["tried"])
    assert [t.get("update_weights", False) for t in choice["tried"] if t["method"] == "hessian"] == \
        [False, False, True, True]  # hessian with weights unchanged and OBS-updated, each with and without bias
    # Several candidates change no held-back prediction; among equal scores the smaller relative error wins.
    ties = [t for t in choice["tried"] if t["score"] == 0.0]
    assert len(ties) >= 2
    chosen = next(t for t in choice["tried"] if t["method"] == choice["chosen"]["method"]
                  and t["correct"] == choice["chosen"]["correct"] and not t.get("update_weights"))
    assert chosen["relative_error"] == min(t["relative_error"] for t in ties)
    assert report["summary"]["sparse_layers"] == 1 and _damage(report) == 0.0
    assert report["budget"]["reverted"] == []  # a model that is fine does not trigger the guard
    assert report["verification"]["calibration"] == {"source": str(scaled_mlp[1]), "samples": 256,
                                                     "fit_samples": 192, "held_back_samples": 64}


def test_magnitude_breaks_the_model_and_the_guard_restores_it(scaled_mlp, tmp_path):
    result = build(_options(scaled_mlp, tmp_path, "restore", method="magnitude"))
    budget = result.report["budget"]
    assert budget["initial"]["outputs"][0]["damage"] > 10 and not budget["initial"]["within_budget"]
    assert [entry["layer"] for entry in budget["reverted"]] == ["0"] and budget["met"]
    assert result.report["summary"]["sparse_layers"] == 0 and _damage(result.report) == 0.0
    assert any("went back to dense" in note for note in result.report["notes"])
    layer = next(r for r in result.report["layers"] if r["name"] == "0")
    assert layer["status"] == "dense" and "kept dense by the accuracy guard" in layer["reason"]


def test_on_damage_fail_refuses_with_the_worst_layer_named(scaled_mlp, tmp_path):
    with pytest.raises(SparseCompileError, match=r"over the accuracy budget .*largest output error: 0\b"):
        build(_options(scaled_mlp, tmp_path, "fail", method="magnitude", on_damage="fail"))
    assert not (tmp_path / "fail").exists()
    model, calib = scaled_mlp
    result = cli("build", str(model), "--calib", str(calib), "-o", str(tmp_path / "f"),
                 "--min-weights", "1000", "--method", "magnitude", "--on-damage", "fail")
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1].startswith("error: the sparse model")


def test_a_broken_build_is_never_reported_as_fine(scaled_mlp, tmp_path):
    """--max-drop none ships every layer sparse, but the damage is measured and a WARNING says so."""
    model, calib = scaled_mlp
    out = tmp_path / "none"
    result = cli("build", str(model), "--calib", str(calib), "-o", str(out), "--min-weights",
                 "1000", "--method", "magnitude", "--max-drop", "none", "--no-permute")
    assert result.exit_code == 0, result.output
    assert "OVER BUDGET" in result.output and "WARNING: the sparse model is over the accuracy budget" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["budget"] is None and report["summary"]["sparse_layers"] == 1
    assert not report["verification"]["damage"]["within_budget"]


def test_guard_budgets_and_output_kinds_are_checked_before_work(scaled_mlp, tmp_path):
    for kwargs, message in (({"max_drop": "lots"}, "--max-drop 'lots'"), ({"max_drop": float("nan")}, "--max-drop"),
                            ({"max_error": float("inf")}, "--max-error"), ({"on_damage": "panic"}, "--on-damage"),
                            ({"output_kind": "0=boxes"}, "INDEX=KIND")):
        with pytest.raises(SparseCompileError, match=message):
            build(_options(scaled_mlp, tmp_path, "bad", **kwargs))
    with pytest.raises(SparseCompileError, match="has 1 output"):
        build(_options(scaled_mlp, tmp_path, "bad", output_kind="3=values"))


def test_values_outputs_use_the_relative_error_budget(scaled_mlp, tmp_path):
    result = build(_options(scaled_mlp, tmp_path, "values", method="magnitude", output_kind="0=values",
                            max_error=1000.0))
    out = result.report["verification"]["damage"]["outputs"][0]
    assert out["kind"] == "values" and out["unit"] == "%" and out["within"]
    assert result.report["summary"]["sparse_layers"] == 1  # within the loose relative-error budget: stays sparse


def test_constant_calibration_data_is_refused(scaled_mlp, tmp_path):
    import numpy as np

    for name, data in (("zeros", np.zeros((64, 64), np.float32)), ("same", np.ones((64, 64), np.float32))):
        path = tmp_path / f"{name}.npy"
        np.save(path, data)
        with pytest.raises(SparseCompileError, match="cannot show which weights matter"):
            build(BuildOptions(model=str(scaled_mlp[0]), output=str(tmp_path / name), calib=str(path)))
    some = np.load(scaled_mlp[1])
    some[3] = 0
    np.save(tmp_path / "some.npy", some)
    result = build(_options(scaled_mlp, tmp_path, "some", calib=str(tmp_path / "some.npy")))
    assert any("1 of 256 calibration samples are all zeros (first at index 3)" in n for n in result.report["notes"])


def test_sigmoid_scores_per_anchor_are_judged_on_what_passes_the_threshold(tmp_path):
    import numpy as np
    import torch
    from torch import nn

    # A detector-like head: [N, 8 anchors, 4 classes] of sigmoid scores, with the scaled inputs that make
    # magnitude masks drop the weights that matter (as in the scaled_mlp fixture).
    generator = torch.Generator().manual_seed(1)
    even = torch.arange(64) % 2 == 0
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.Unflatten(1, (8, 4)), nn.Sigmoid())
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(64, 64, generator=generator) / 8 * torch.where(even, 0.5, 1.0))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.randn(32, 64, generator=generator) / 8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.export.save(torch.export.export(model.eval(), (torch.randn(4, 64),), dynamic_shapes=({0: batch},)),
                      tmp_path / "head.pt2")
    np.save(tmp_path / "calib.npy", (torch.randn(256, 64, generator=generator)
                                     * torch.where(even, 1000.0, 1.0)).numpy())
    options = {"model": str(tmp_path / "head.pt2"), "calib": str(tmp_path / "calib.npy"), "min_weights": 1000,
               "permute": False, "method": "magnitude", "correct": "none"}
    broken = build(BuildOptions(output=str(tmp_path / "free"), max_drop=None, **options)).report
    out = broken["verification"]["damage"]["outputs"][0]
    assert out["kind"] == "scores" and out["threshold"] == 0.5 and out["unit"] == "pt"
    assert out["damage"] > 5 and not out["within"] and 0 < out["above_threshold_f1"] < 0.95
    guarded = build(BuildOptions(output=str(tmp_path / "guarded"), **options)).report
    assert guarded["budget"]["initial"]["outputs"][0]["kind"] == "scores" and guarded["budget"]["met"]
    assert guarded["verification"]["damage"]["outputs"][0]["damage"] <= 1.0
    # Logits are no scores: the override is refused.
    logits = nn.Sequential(nn.Linear(16, 8)).eval()
    torch.export.save(torch.export.export(logits, (torch.randn(4, 16),), dynamic_shapes=({0: batch},)),
                      tmp_path / "logits.pt2")
    np.save(tmp_path / "logits.npy", torch.randn(64, 16, generator=generator).numpy())
    with pytest.raises(SparseCompileError, match="outside \\[0, 1\\]"):
        build(BuildOptions(model=str(tmp_path / "logits.pt2"), calib=str(tmp_path / "logits.npy"),
                           output=str(tmp_path / "logits"), output_kind="0=scores", min_weights=0, permute=False,
                           method="magnitude"))


def test_a_failing_auto_candidate_is_skipped_and_named(scaled_mlp, tmp_path, monkeypatch):
    from sparsecompile import build as build_module

    original = build_module.sparsify

    def flaky(gm, eligible, layers, method, *args, **kwargs):
        if method.name == "hessian" and kwargs.get("update_weights"):
            raise SparseCompileError("the calibration Hessian is not positive definite even with heavy damping")
        return original(gm, eligible, layers, method, *args, **kwargs)

    monkeypatch.setattr(build_module, "sparsify", flaky)
    report = build(_options(scaled_mlp, tmp_path, "flaky")).report
    failed = [t for t in report["method_choice"]["tried"] if "failed" in t]
    assert len(failed) == 2 and all(t["method"] == "hessian" and t["update_weights"] for t in failed)
    assert "positive definite" in failed[0]["failed"] and report["method"] == "activation"


def test_guard_restores_layers_whose_bias_the_correction_added(tmp_path):
    import numpy as np
    import torch
    from torch import nn

    # Linear layers without a bias: statistics correction gives them one, which the dense graph has no slot
    # for. The guard must still measure and restore them (it crashed with "'Module' object has no attribute
    # 'bias'" on a real text detector).
    generator = torch.Generator().manual_seed(3)
    even = torch.arange(64) % 2 == 0
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.ReLU(), nn.Linear(64, 64, bias=False), nn.ReLU(),
                          nn.Linear(64, 10)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(64, 64, generator=generator) / 8 * torch.where(even, 0.5, 1.0))
        model[2].weight.copy_(torch.randn(64, 64, generator=generator) / 8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.export.save(torch.export.export(model, (torch.randn(4, 64),), dynamic_shapes=({0: batch},)),
                      tmp_path / "nobias.pt2")
    np.save(tmp_path / "calib.npy", (torch.randn(256, 64, generator=generator)
                                     * torch.where(even, 1000.0, 1.0)).numpy())
    report = build(BuildOptions(model=str(tmp_path / "nobias.pt2"), calib=str(tmp_path / "calib.npy"),
                                output=str(tmp_path / "out"), min_weights=1000, permute=False,
                                method="magnitude", correct="bias")).report
    budget = report["budget"]
    assert budget["initial"]["score"] > 1 and budget["met"] and budget["reverted"]
    assert report["verification"]["damage"]["within_budget"]
