"""End-to-end builds through the library API: artifacts, verification, atomicity."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from conftest import TwoInTwoOut
from sparsecompile.build import BuildOptions, build
from sparsecompile.builddir import open_build
from sparsecompile.compress import decompress, load_weights
from sparsecompile.errors import SparseCompileError
from sparsecompile.verify import count_nm_violations


def _initializers(path):
    model = onnx.load(str(path))
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}, model


def _layers(report):
    return {layer["name"]: layer for layer in report["layers"]}


def test_build_writes_a_complete_verified_artifact(sample_build):
    out, report = sample_build.output, sample_build.report
    path, manifest = open_build(out)
    assert set(manifest["files"]) == {"model.onnx", "weights.safetensors", "report.json", "report.md",
                                      "model.pt2", "engine/recipe.json", "engine/build_engine.py", "engine/trtexec.sh"}
    assert json.loads((out / "report.json").read_text())["layers"] == report["layers"]
    layers = _layers(report)
    assert {name for name, layer in layers.items() if layer["status"] == "sparse"} == {"conv1", "conv2", "fc1", "fc2"}
    for layer in layers.values():
        assert 0.5 <= layer["retained_magnitude"] <= 1.0
        assert layer["output_error"] > 0
    assert report["verification"]["nm_check"] == "passed"
    assert report["verification"]["onnxruntime_vs_torch"][0]["relative_error"] < 1e-3
    assert report["verification"]["normalization_vs_original"][0]["relative_error"] < 1e-5
    assert "top1_agreement" in report["verification"]["sparse_vs_dense"][0]
    folded = next(p for p in report["passes"] if p["name"] == "fold_batchnorm")
    assert folded["modified"] and sorted(folded["stats"]["folded"]) == ["conv1", "conv2"]
    assert "# sparsecompile build report" in (out / "report.md").read_text()


def test_onnx_weights_are_2_4_in_the_tensorrt_layout(sample_build):
    weights, model = _initializers(sample_build.output / "model.onnx")
    ops = {node.op_type for node in model.graph.node}
    assert "Conv" in ops and "BatchNormalization" not in ops
    for layer in sample_build.report["layers"]:
        array = weights[layer["weight"]]
        # Conv weights [Cout, Cin, kh, kw]: groups of 4 input channels at each kernel position.
        assert count_nm_violations(array, 1, 2, 4) == 0
        assert np.count_nonzero(array) <= array.size // 2


def test_polygraphy_agrees_the_weights_are_sparse(sample_build):
    pytest.importorskip("polygraphy")
    from polygraphy.tools.sparse import SparsityPruner

    pruner = SparsityPruner(onnx.load(str(sample_build.output / "model.onnx")))
    pruner.check()
    sparse = {layer["weight"] for layer in sample_build.report["layers"] if layer["status"] == "sparse"}
    assert sparse and sparse <= set(pruner.sparse_tensors)


def test_compressed_weights_match_the_onnx_weights(sample_build):
    weights, _ = _initializers(sample_build.output / "model.onnx")
    sparse, dense, meta = load_weights(sample_build.output / "weights.safetensors")
    assert meta["target"] == "a100" and meta["dtype"] == "fp16"
    for layer in sample_build.report["layers"]:
        restored = decompress(sparse[layer["weight"]])
        assert restored.dtype == torch.float16
        np.testing.assert_array_equal(restored.numpy(), weights[layer["weight"]].astype(np.float16))
        assert layer["compressed_bytes"] / layer["dense_fp16_bytes"] == pytest.approx(0.5625, abs=0.01)
    assert "conv1.bias" in dense  # created by the BN fold


def test_dense_target_builds_dense(model_files, tmp_path):
    result = build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / "t4"),
                                target="t4", calib=str(model_files / "calib.npy"), min_weights=0))
    assert not result.report["sparsified"]
    assert all(layer["status"] == "dense" for layer in result.report["layers"])
    assert all("no sparse tensor cores" in layer["reason"] for layer in result.report["layers"])
    assert any("dense artifact" in note for note in result.report["notes"])
    forced = build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / "t4s"),
                                target="t4", sparsify=True, calib=str(model_files / "calib.npy"), min_weights=0))
    assert forced.report["summary"]["sparse_layers"] == 4
    assert any("no speedup" in note for note in forced.report["notes"])


def test_exclude_and_min_weights(model_files, tmp_path):
    result = build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / "b"),
                                exclude=["^fc1$", "nomatch_zz"], min_weights=400))
    layers = _layers(result.report)
    assert layers["fc1"]["reason"] == "excluded by --exclude"
    assert layers["fc2"]["reason"] == "only 320 weights (< --min-weights 400)"
    assert layers["conv1"]["status"] == "sparse" and layers["conv2"]["status"] == "sparse"
    assert any("nomatch_zz" in note for note in result.report["notes"])
    assert any("random inputs" in note for note in result.report["notes"])


def test_model_without_eligible_layers_builds_dense(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU()).eval()  # Cin = 3
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 8, 8),)), tmp_path / "m.pt2")
    result = build(BuildOptions(model=str(tmp_path / "m.pt2"), output=str(tmp_path / "out"), min_weights=0))
    assert result.report["summary"]["sparse_layers"] == 0
    assert any("no layer is eligible" in note for note in result.report["notes"])
    assert (tmp_path / "out" / "model.onnx").exists()


def test_several_inputs_and_outputs(tmp_path):
    model = TwoInTwoOut().eval()
    torch.export.save(torch.export.export(model, (torch.randn(3, 8, 20), torch.randn(3, 12))), tmp_path / "two.pt2")
    result = build(BuildOptions(model=str(tmp_path / "two.pt2"), output=str(tmp_path / "out"), min_weights=0))
    assert [i["name"] for i in result.report["inputs"]] == ["signal", "features"]
    assert len(result.report["outputs"]) == 2
    assert _layers(result.report)["conv"]["status"] == "sparse"  # Conv1d, Cin = 8
    assert _layers(result.report)["fc"]["status"] == "sparse"  # K = 12


def test_im2col_lowering_gives_the_same_masks(model_files, tmp_path):
    common = dict(model=str(model_files / "dynamic.pt2"), calib=str(model_files / "calib.npy"), min_weights=0,
                  correct="none")
    plain = build(BuildOptions(output=str(tmp_path / "plain"), **common))
    lowered = build(BuildOptions(output=str(tmp_path / "lowered"), lower_conv="im2col", **common))
    plain_w, _ = _initializers(tmp_path / "plain" / "model.onnx")
    lowered_w, model = _initializers(tmp_path / "lowered" / "model.onnx")
    assert "Conv" not in {node.op_type for node in model.graph.node}
    for name in ("conv1.weight", "conv2.weight"):
        conv = plain_w[name]  # [Cout, Cin, kh, kw]
        gemm = lowered_w[name]  # [Cout, kh*kw*Cin], ordered (kh, kw, cin)
        assert gemm.shape == (conv.shape[0], conv.shape[1] * conv.shape[2] * conv.shape[3])
        np.testing.assert_array_equal(gemm, conv.transpose(0, 2, 3, 1).reshape(conv.shape[0], -1))
        assert count_nm_violations(gemm, 1) == 0
    plain_out = plain.report["verification"]["sparse_vs_dense"][0]["relative_error"]
    lowered_out = lowered.report["verification"]["sparse_vs_dense"][0]["relative_error"]
    assert lowered_out == pytest.approx(plain_out, rel=1e-3)


def test_existing_non_build_directory_is_refused(model_files, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.txt").write_text("do not delete")
    options = BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(out), min_weights=0)
    with pytest.raises(SparseCompileError, match="--force"):
        build(options)
    assert (out / "thesis.txt").read_text() == "do not delete"
    options.force = True
    build(options)
    assert not (out / "thesis.txt").exists() and (out / "manifest.json").exists()


def test_failed_build_leaves_previous_build_intact(model_files, tmp_path, monkeypatch):
    out = tmp_path / "b"
    options = BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(out), min_weights=0)
    build(options)
    before = (out / "manifest.json").read_text()

    def broken_export(*args, **kwargs):
        raise SparseCompileError("ONNX export failed: simulated")

    monkeypatch.setattr("sparsecompile.build.export_onnx", broken_export)
    with pytest.raises(SparseCompileError, match="simulated"):
        build(options)
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no staging leftovers

    fresh = tmp_path / "never"
    with pytest.raises(SparseCompileError):
        build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(fresh)))
    assert not fresh.exists()


def test_rebuild_over_previous_build_needs_no_force(model_files, tmp_path):
    out = tmp_path / "b"
    options = BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(out), min_weights=0)
    build(options)
    options.exclude = ["fc"]
    result = build(options)
    assert _layers(result.report)["fc1"]["status"] == "dense"


def test_bad_options_fail_before_any_work(model_files, tmp_path):
    with pytest.raises(SparseCompileError, match="valid targets"):
        build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / "x"), target="v100"))
    with pytest.raises(SparseCompileError, match="valid methods"):
        build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / "x"), method="oracle"))
    assert not (tmp_path / "x").exists()


def test_calibration_that_does_not_fit(model_files, tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((8, 3, 8, 8), np.float32))
    with pytest.raises(SparseCompileError, match="sample shape 3x8x8"):
        build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / "x"),
                           calib=str(tmp_path / "bad.npy")))
    assert not (tmp_path / "x").exists()


def test_build_saves_the_sparse_program_for_torch_backends(sample_build):
    from sparsecompile.backends.onnxruntime_runner import OrtRunner
    from sparsecompile.frontend import load_pt2

    module = load_pt2(sample_build.output / "model.pt2", trust_pickle=False).module()
    x = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    with OrtRunner(sample_build.output / "model.onnx") as runner:
        want = runner.infer([x.numpy()])[0]
    with torch.no_grad():
        got = module(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    params = dict(module.named_parameters())
    for layer in sample_build.report["layers"]:
        if layer["status"] == "sparse":
            weight = params[layer["weight"]]
            assert (weight == 0).float().mean().item() >= 0.5


@pytest.mark.parametrize("with_calib", [True, False])
def test_a_normalization_that_changes_the_function_fails_the_build(model_files, tmp_path, monkeypatch, with_calib):
    # With calibration data the dense outputs come from the masks stage's reference stream and the check runs
    # there; without, right after normalization. Either way a changed function must stop the build.
    from sparsecompile.graph import get_tensor, set_tensor
    from sparsecompile.passes import FoldBatchNorm

    original = FoldBatchNorm.__call__

    def breaking(self, gm, context):
        result = original(self, gm, context)
        weight = next(n.target for n in result.graph_module.graph.nodes
                      if n.op == "get_attr" and n.target.endswith("weight"))
        set_tensor(result.graph_module, weight, get_tensor(result.graph_module, weight) * 2)
        return result

    monkeypatch.setattr(FoldBatchNorm, "__call__", breaking)
    options = BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / "b"), min_weights=0,
                           method="magnitude", permute=False,
                           calib=str(model_files / "calib.npy") if with_calib else None)
    with pytest.raises(SparseCompileError, match="graph normalization changed the model's outputs"):
        build(options)
    assert not (tmp_path / "b").exists()
