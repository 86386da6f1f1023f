"""--max-drop (layer selection under an accuracy budget), --keep-dense, and N:M patterns beyond 2:4."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from sparsecompile.budget import drop_points, layer_params
from sparsecompile.build import BuildOptions, build
from sparsecompile.cli import main


def _options(model_files, tmp_path, name, **kwargs):
    return BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / name), min_weights=0,
                        calib=str(model_files / "calib.npy"), permute=False, **kwargs)


def test_drop_points():
    dense = [torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])]
    same = [dense[0] * 1.1]
    flipped = [torch.tensor([[1.0, 2.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])]
    assert drop_points(dense, same) == (0.0, "top-1 agreement")
    assert drop_points(dense, flipped) == (25.0, "top-1 agreement")
    value, metric = drop_points([torch.ones(4, 1)], [torch.full((4, 1), 1.02)])
    assert metric == "relative output error" and value == pytest.approx(2.0)


def test_budget_keeps_the_most_sensitive_layers_dense(tmp_path, model_files):
    free = build(_options(model_files, tmp_path, "free"))
    free_drop = 100 * (1 - free.report["verification"]["sparse_vs_dense"][0]["top1_agreement"])
    assert free_drop > 0  # SmallNet with random weights loses agreement when masked: the budget has work to do
    result = build(_options(model_files, tmp_path, "tight", max_drop=0.0))
    budget = result.report["budget"]
    assert budget["initial_drop"] == pytest.approx(free_drop, abs=1e-4)
    assert budget["met"] and budget["final_drop"] == 0.0 and budget["reverted"]
    agreement = result.report["verification"]["sparse_vs_dense"][0]["top1_agreement"]
    assert agreement == 1.0  # what the report verifies is the model the budget measured
    reverted = {entry["layer"] for entry in budget["reverted"]}
    for record in result.report["layers"]:
        if record["name"] in reverted:
            assert record["status"] == "dense" and "kept dense by --max-drop 0" in record["reason"]
            assert "correction" not in record
    assert set(budget["sensitivity"]) >= reverted
    loose = build(_options(model_files, tmp_path, "loose", max_drop=100.0))
    assert loose.report["budget"]["reverted"] == [] and loose.report["summary"]["sparse_layers"] == \
        free.report["summary"]["sparse_layers"]


def test_layer_params_include_the_bias(small_net):
    from helpers import export_graph

    from sparsecompile.layers import find_layers

    gm = export_graph(small_net, torch.randn(2, 4, 8, 8))
    layers = {layer.name: layer for layer in find_layers(gm, min_weights=0)}
    assert layer_params(gm, layers["conv2"]) == ["conv2.weight", "conv2.bias"]
    assert layer_params(gm, layers["conv1"]) == ["conv1.weight"]  # bias=False


def test_keep_dense_is_accepted_on_the_command_line(tmp_path, model_files):
    result = CliRunner().invoke(main, ["build", str(model_files / "dynamic.pt2"), "-o", str(tmp_path / "k"),
                                       "--min-weights", "0", "--keep-dense", "fc.*", "--no-permute"])
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
