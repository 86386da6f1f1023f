"""--precision int8 with --calib: the build quantizes the sparse ONNX itself (sparsecompile/quantize.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import cli, one_line_failure
from sparsecompile.build import BuildOptions, build
from sparsecompile.errors import SparseCompileError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _options(model_files, tmp_path, name, **kwargs):
    return BuildOptions(model=str(model_files / "dynamic.pt2"), calib=str(model_files / "calib.npy"),
                        output=str(tmp_path / name), min_weights=0, permute=False, method="magnitude",
                        precision="int8", **kwargs)


def test_cpu_int8_build_writes_a_checked_int8_fallback_that_run_uses(model_files, tmp_path):
    import onnx
    import onnxruntime as ort

    result = build(_options(model_files, tmp_path, "cpu", target="cpu", sparsify=True))
    out = result.output
    q = result.report["quantization"]
    assert (out / "model.int8.onnx").exists() and q["path"] == "model.int8.onnx"
    assert q["format"] == "QDQ U8S8" and q["activations"] == "u8" and q["calibration"] == "percentile"
    # Every sparse layer's int8 weight is still 2:4, zeros kept (the build fails otherwise).
    sparse = [r["weight"] for r in result.report["layers"] if r["status"] == "sparse"]
    assert sparse and q["sparsity_check"]["passed"] and sorted(q["sparsity_check"]["required"]) == sorted(sparse)
    # The damage of sparsity, of quantization and of both is reported separately, on the held-back samples.
    assert set(q["damage"]) == {"sparsity", "quantization", "both"}
    assert q["damage"]["sparsity"] == result.report["verification"]["damage"]
    assert q["damage"]["quantization"]["outputs"][0]["relative_error"] > 0  # quantization really changed something
    manifest = json.loads((out / "manifest.json").read_text())
    assert "model.int8.onnx" in manifest["files"]  # hashed like every other file: inspect/run verify it
    graph = onnx.load(str(out / "model.int8.onnx"))
    assert any(node.op_type == "DequantizeLinear" for node in graph.graph.node)

    # `run` on a CPU build executes the INT8 model.
    x = np.load(model_files / "calib.npy")[:8]
    np.save(tmp_path / "x.npy", x)
    ran = cli("run", out, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy")
    assert ran.exit_code == 0, ran.output
    y = np.load(tmp_path / "y.npy")
    name = manifest["inputs"][0]["name"]
    int8 = ort.InferenceSession(str(out / "model.int8.onnx")).run(None, {name: x})[0]
    fp32 = ort.InferenceSession(str(out / "model.onnx")).run(None, {name: x})[0]
    assert np.allclose(y, int8, atol=1e-6) and not np.allclose(y, fp32, atol=1e-6)
    # The summary says what happened in one line.
    assert any(line.startswith("int8:") and "2:4 kept" in line for line in
               __import__("sparsecompile.report", fromlist=["summary_lines"]).summary_lines(result.report))
    # Its weights, sparse layers' int8 values compressed (tests/test_int8_format.py, tests/package/test_package_int8.py).
    assert q["weights"]["path"] == "weights.int8.safetensors" and "weights.int8.safetensors" in manifest["files"]


def test_gpu_int8_build_points_the_tensorrt_recipe_at_the_qdq_model(model_files, tmp_path):
    result = build(_options(model_files, tmp_path, "gpu", target="a100"))
    q = result.report["quantization"]
    assert q["format"] == "QDQ S8S8" and q["sparsity_check"]["passed"]
    recipe = json.loads((result.output / "engine" / "recipe.json").read_text())
    assert recipe["onnx"] == "../model.int8.onnx" and recipe["precision"] == "int8"
    assert "--int8" in result.report["engine"]["trtexec"] and "--sparsity" in result.report["engine"]["trtexec"]


def test_cpu_int8_with_minmax_ranges_keeps_the_model(model_files, tmp_path):
    """uint8 activations with minmax ranges once gave a constant prediction (ORT drops the Relu after a quantized
    op, and the symmetric range let negatives through); the build's int8 check now finds it within budget."""
    q = build(_options(model_files, tmp_path, "m", target="cpu", sparsify=True, int8_calibration="minmax")).report[
        "quantization"]
    assert q["calibration"] == "minmax" and q["activations"] == "u8" and not q["kept_float"]
    assert q["damage"]["quantization"]["within_budget"] and q["damage"]["both"]["within_budget"]
    assert q["damage"]["quantization"]["outputs"][0]["relative_error"] < 0.05  # percentile's is about 0.01


def test_int8_refusals_are_one_line(model_files, tmp_path):
    with pytest.raises(SparseCompileError, match="needs --calib"):
        build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / "n"), target="cpu",
                           precision="int8"))
    refused = cli("build", model_files / "dynamic.pt2", "-o", tmp_path / "c", "--target", "cpu",
                  "--precision", "int8")
    one_line_failure(refused, "needs --calib")
