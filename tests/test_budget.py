"""--max-drop (layer selection under an accuracy budget), --keep-dense, and N:M patterns beyond 2:4."""

from __future__ import annotations

import json

import pytest
import torch

from sparsecompile.budget import layer_params
from sparsecompile.build import BuildOptions, build

from helpers import cli


def _options(model_files, tmp_path, name, **kwargs):
    kwargs.setdefault("calib", str(model_files / "calib.npy"))
    return BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / name), min_weights=0,
                        permute=False, **kwargs)


@pytest.mark.parametrize("correct", ["none", "bias"])
def test_budget_keeps_the_most_sensitive_layers_dense(tmp_path, model_files, correct):
    # Judged as values (relative error %), SmallNet's damage is never zero, so a budget of half of it has work.
    common = {"method": "magnitude", "output_kind": "0=values", "correct": correct}
    free = build(_options(model_files, tmp_path, "free", max_drop=None, **common))
    free_damage = free.report["verification"]["damage"]["outputs"][0]
    assert free_damage["kind"] == "values" and free_damage["damage"] > 0
    assert free.report["budget"] is None and free.report["options"]["max_drop"] is None
    half = free_damage["damage"] * 0.65
    result = build(_options(model_files, tmp_path, "tight", max_drop=0.0, max_error=half, **common))
    budget = result.report["budget"]
    assert budget["initial"]["outputs"][0]["damage"] == pytest.approx(free_damage["damage"], abs=1e-4)
    assert budget["met"] and budget["final"]["outputs"][0]["damage"] <= half and budget["reverted"]
    assert 0 < result.report["summary"]["sparse_layers"] < free.report["summary"]["sparse_layers"]
    # What the report verifies is the model the budget measured, on the same samples.
    assert result.report["verification"]["damage"] == budget["final"]
    reverted = {entry["layer"] for entry in budget["reverted"]}
    ranks = [entry["sensitivity"] for entry in budget["reverted"]]
    for record in result.report["layers"]:
        if record["name"] in reverted:
            assert record["status"] == "dense" and "kept dense by --max-drop 0" in record["reason"]
            assert "correction" not in record
    assert set(budget["sensitivity"]) >= reverted and ranks
    scores = [budget["initial"]["score"]] + [entry["score_after"] for entry in budget["reverted"]]
    if correct == "bias":  # both searches ran; the one keeping more sparse is reported, the other beside it
        assert budget["alternative"]["search"] in ("greedy", "bisection")
        assert {budget["search"], budget["alternative"]["search"]} == {"greedy", "bisection"}
        assert budget["alternative"]["sparse_layers"] <= result.report["summary"]["sparse_layers"]
    else:
        assert budget["alternative"] is None and budget["search"] == "greedy"
    if budget["search"] == "greedy" and not budget["trials"]:  # every recorded step lowered the score
        assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
    elif budget["search"] == "bisection":  # on the ranking, correction refitted per trial: the smallest prefix
        assert budget["trials"]
        count = len(budget["reverted"])
        assert {entry["score_after"] for entry in budget["reverted"]} == {budget["final"]["score"]}
        assert [entry["rank"] for entry in budget["reverted"]] == list(range(1, count + 1))
        assert any(t["dense_layers"] == count and t["within"] for t in budget["trials"])
        assert count == 1 or any(t["dense_layers"] == count - 1 and not t["within"] for t in budget["trials"])
        # The refitted corrections are the ones reported for the layers that stayed sparse.
        assert any("correction" in record for record in result.report["layers"] if record["status"] == "sparse")
    loose = build(_options(model_files, tmp_path, "loose", max_drop=100.0, max_error=1e6, **common))
    assert loose.report["budget"]["reverted"] == [] and loose.report["summary"]["sparse_layers"] == \
        free.report["summary"]["sparse_layers"]


def test_without_calibration_the_guard_is_off_and_says_so(tmp_path, model_files):
    result = build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / "nocalib"),
                                min_weights=0, permute=False))
    assert result.report["budget"] is None and result.report["method"] == "magnitude"
    assert any("no --calib" in note for note in result.report["notes"])


def test_layer_params_include_the_bias(small_net):
    from helpers import export_graph

    from sparsecompile.layers import find_layers

    gm = export_graph(small_net, torch.randn(2, 4, 8, 8))
    layers = {layer.name: layer for layer in find_layers(gm, min_weights=0)}
    assert layer_params(gm, layers["conv2"]) == ["conv2.weight", "conv2.bias"]
    assert layer_params(gm, layers["conv1"]) == ["conv1.weight"]  # bias=False


def test_keep_dense_is_accepted_on_the_command_line(tmp_path, model_files):
    result = cli("build", str(model_files / "dynamic.pt2"), "-o", str(tmp_path / "k"),
                 "--min-weights", "0", "--keep-dense", "fc.*", "--no-permute")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "k" / "report.json").read_text())
    fc = [r for r in report["layers"] if r["name"].startswith("fc")]
    assert fc and all(r["status"] == "dense" and "exclude" in r["reason"] for r in fc)


@pytest.mark.parametrize("pattern,bits", [((1, 4), 2), ((4, 8), 3), ((8, 16), 4)])
def test_other_patterns_build_dense_with_zeros_and_say_so(tmp_path, model_files, pattern, bits):
    n, m = pattern
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).eval()
    x = torch.randn(4, 32)
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("b", min=1, max=64)},)),
                      tmp_path / "mlp.pt2")
    result = build(BuildOptions(model=str(tmp_path / "mlp.pt2"), output=str(tmp_path / "b"), min_weights=0,
                                pattern=pattern))
    report = result.report
    assert report["pattern"] == f"{n}:{m}" and not report["pattern_accelerated"]
    assert any("not accelerated on a100" in note for note in report["notes"])
    assert not json.loads((result.output / "engine" / "recipe.json").read_text())["sparse_weights"]
    assert all("speed" not in r for r in report["layers"])
    sparse = [r for r in report["layers"] if r["status"] == "sparse"]
    assert sparse and all(abs(r["zero_fraction"] - (1 - n / m)) < 1e-9 for r in sparse)
    compression = report["compression"]  # fp16 values + ceil(log2 M)-bit indices
    assert compression["ratio_vs_dense_fp16"] == pytest.approx(n * (16 + bits) / (16 * m), abs=1e-3)
