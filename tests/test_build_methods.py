"""Builds with calibration-aware methods, statistics correction and their options."""

from __future__ import annotations

import pytest

from sparsecompile.build import BuildOptions, build
from sparsecompile.errors import SparseCompileError


def _layers(result):
    return {layer["name"]: layer for layer in result.report["layers"]}


@pytest.fixture(scope="module")
def builds(model_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")

    def make(name, **options):
        options.setdefault("method", "magnitude")
        options.setdefault("max_drop", None)  # these test the methods' mechanics; the guard has tests/test_guard.py
        return build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(root / name),
                                  calib=str(model_files / "calib.npy"), min_weights=0, **options))

    return make


def test_no_correction_keeps_surviving_weights_bit_for_bit(builds):
    result = builds("plain", correct="none")
    assert result.report["options"]["correct"] == "none"
    assert all(layer["kept_weights"] == "unchanged" for layer in _layers(result).values())


def test_default_correction_with_calibration_is_bias(builds):
    result = builds("auto")
    assert result.report["options"]["correct"] == "bias"
    layers = _layers(result)
    assert all(layer["kept_weights"] == "rescaled per output row (--correct)" for layer in layers.values())
    assert {"error_before", "error_after"} <= set(layers["conv2"]["correction"])
    plain = builds("plain2", correct="none")
    corrected_error = result.report["verification"]["sparse_vs_dense"][0]["relative_error"]
    plain_error = plain.report["verification"]["sparse_vs_dense"][0]["relative_error"]
    assert corrected_error < plain_error


def test_default_correction_without_calibration_is_none(model_files, tmp_path):
    result = build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / "b"), min_weights=0))
    assert result.report["options"]["correct"] == "none"


def test_hessian_beats_magnitude_on_the_layer_it_optimises(builds):
    magnitude = _layers(builds("mag", correct="none"))
    hessian = _layers(builds("hes", method="hessian", correct="none"))
    # conv1 sees the raw input in both builds, and the per-layer error uses the same calibration samples.
    assert hessian["conv1"]["output_error"] <= magnitude["conv1"]["output_error"] + 1e-9
    assert hessian["conv1"]["kept_weights"] == "unchanged"


@pytest.mark.parametrize("options", [
    dict(method="activation", correct="bn"),
    dict(method="hessian", update_weights=True, correct="none"),
    dict(method="hessian", sequential=False, correct="bias"),
])
def test_method_and_option_combinations_build_valid_artifacts(builds, options):
    name = "-".join(f"{k}{v}" for k, v in options.items())
    result = builds(name, **options)
    assert result.report["verification"]["nm_check"] == "passed"
    assert result.report["summary"]["sparse_layers"] == 4
    assert result.report["verification"]["onnxruntime_vs_torch"][0]["relative_error"] < 1e-3
    if options.get("update_weights"):
        assert any(layer["kept_weights"] == "updated (--update-weights)" for layer in _layers(result).values())


def test_option_errors(model_files, tmp_path):
    with pytest.raises(SparseCompileError, match="--update-weights needs"):
        build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / "x"), update_weights=True))
    with pytest.raises(SparseCompileError, match="unknown --correct"):
        build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / "x"), correct="magic"))
    with pytest.raises(SparseCompileError, match="--preprocess applies"):
        build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / "x"),
                           calib=str(model_files / "calib.npy"), preprocess="resize=8,8"))
    assert not (tmp_path / "x").exists()


def test_hessian_falls_back_to_magnitude_where_the_hessian_would_not_fit(builds, monkeypatch):
    monkeypatch.setattr("sparsecompile.sparsify.MAX_HESSIAN_COLUMNS", 100)  # conv2: K = 9 * 16 = 144
    result = builds("fallback", method="hessian", correct="none")
    layers = _layers(result)
    assert "too large for the Hessian" in layers["conv2"]["mask_note"]
    assert "mask_note" not in layers["conv1"]  # K = 36
    assert result.report["verification"]["nm_check"] == "passed"
    assert any("too large for the Hessian" in note for note in result.report["notes"])
