"""The TensorRT recipe a GPU build carries, and the standalone engine builder script."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from sparsecompile.build import BuildOptions, build
from sparsecompile.engine.recipe import make_recipe, parse_batch, trtexec_command
from sparsecompile.errors import SparseCompileError
from sparsecompile.targets import get_target

INPUTS = [{"name": "x", "dtype": "float32", "shape": ["s0", 3, 32, 32]}]


def test_parse_batch():
    assert parse_batch("1,8,32") == (1, 8, 32)
    assert parse_batch("16") == (16, 16, 16)
    for bad in ("8,1,32", "0,1,2", "1,x", "1,2"):
        with pytest.raises(SparseCompileError, match="--batch"):
            parse_batch(bad)


def test_recipe_profile_precision_and_trtexec_line():
    recipe = make_recipe(get_target("l4"), "fp16", INPUTS, True, (2, 4, 64))
    assert recipe["compute_capability"] == "8.9" and recipe["sparse_weights"]
    assert recipe["profile"] == {"x": {"min": [2, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [64, 3, 32, 32]}}
    line = trtexec_command(recipe)
    for part in ("--onnx=../model.onnx", "--sparsity=enable", "--fp16", "--minShapes=x:2x3x32x32",
                 "--optShapes=x:4x3x32x32", "--maxShapes=x:64x3x32x32", "--saveEngine=model.l4.engine",
                 "--timingCacheFile=timing.cache", "--exportLayerInfo=layers.json", "--verbose"):
        assert part in line
    static = make_recipe(get_target("a100"), "bf16", [{"name": "x", "dtype": "float32", "shape": [4, 3, 8, 8]}],
                         False, None)
    assert static["profile"] is None
    assert "--bf16" in trtexec_command(static) and "Shapes" not in trtexec_command(static)
    assert "--fp16" not in trtexec_command(make_recipe(get_target("a100"), "fp32", INPUTS, True, None))
    with pytest.raises(SparseCompileError, match="int4"):
        make_recipe(get_target("a100"), "int4", INPUTS, True, None)


def test_gpu_build_writes_the_recipe(sample_build):
    engine = sample_build.output / "engine"
    recipe = json.loads((engine / "recipe.json").read_text())
    assert recipe["target"] == "a100" and recipe["precision"] == "fp16"
    assert (sample_build.output / recipe["onnx"].removeprefix("../")).exists()
    assert trtexec_command(recipe) in (engine / "trtexec.sh").read_text()
    assert sample_build.report["engine"]["status"] == "recipe"


def test_build_batch_option(tmp_path, model_files):
    result = build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / "b"),
                                calib=str(model_files / "calib.npy"), min_weights=0, permute=False, batch=(1, 2, 4)))
    assert result.report["engine"]["profile"]["x"]["max"][0] == 4
    with pytest.raises(SparseCompileError, match="static batch of 4"):
        build(BuildOptions(model=str(model_files / "static.pt2"), output=str(tmp_path / "s"),
                           calib=str(model_files / "calib.npy"), batch=(1, 8, 32)))
    assert not (tmp_path / "s").exists()
    cpu = build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / "c"), target="cpu"))
    assert cpu.report["engine"]["status"] == "none" and not (tmp_path / "c" / "engine").exists()


def test_builder_script_needs_only_the_standard_library(sample_build):
    script = sample_build.output / "engine" / "build_engine.py"
    tree = ast.parse(script.read_text())
    top = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    top |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert top <= set(sys.stdlib_module_names) | {"__future__"}


def test_builder_script_refuses_without_a_cuda_device(sample_build, tmp_path):
    script = sample_build.output / "engine" / "build_engine.py"
    # -I: no site packages from this checkout's path tricks; the script must stand alone
    result = subprocess.run([sys.executable, "-I", str(script)], capture_output=True, text=True)
    assert result.returncode == 3, result.stderr
    assert "no CUDA device" in result.stderr and "a100" in result.stderr
    assert "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-I", str(script), "--recipe", str(tmp_path / "nope.json")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "cannot read recipe" in result.stderr


def test_precision_rules(tmp_path, model_files):
    import onnx
    from onnx import TensorProto, helper

    from sparsecompile.engine.recipe import check_precision, has_qdq

    check_precision(get_target("h100"), "fp8")
    check_precision(get_target("a100"), "int8")
    with pytest.raises(SparseCompileError, match="fp8 needs FP8 tensor cores.*a100"):
        check_precision(get_target("a100"), "fp8")
    with pytest.raises(SparseCompileError, match="target 'cpu' has none"):
        check_precision(get_target("cpu"), "int8")
    line = trtexec_command(make_recipe(get_target("a100"), "int8", INPUTS, True, None))
    assert "--int8 --fp16" in line

    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s"], ["y"])],
        "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])])
    onnx.save(helper.make_model(graph), tmp_path / "qdq.onnx")
    assert has_qdq(tmp_path / "qdq.onnx")

    # fp8 on an A100 fails before any work; int8 on a model without Q/DQ fails with the reason, leaving nothing
    with pytest.raises(SparseCompileError, match="fp8"):
        build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / "f"), precision="fp8"))
    with pytest.raises(SparseCompileError, match="explicitly quantized"):
        build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / "i"), precision="int8",
                           permute=False))
    assert not (tmp_path / "f").exists() and not (tmp_path / "i").exists()


def test_engine_is_attempted_only_on_the_target_gpu(tmp_path, model_files, monkeypatch):
    """build tries the engine only where the host is the target; a failure is a warning (NOT a real GPU here)."""
    from sparsecompile import build as build_module
    from sparsecompile.engine import run as engine_run
    from sparsecompile.hardware import HostInfo

    calls = []

    def fake_build_engine(out, host=None, **kwargs):
        calls.append(host)
        raise SparseCompileError("no CUDA device")

    monkeypatch.setattr(engine_run, "build_engine", fake_build_engine)
    hosts = iter([HostInfo("x86_64", "NVIDIA H100", (9, 0), True), HostInfo("x86_64", "NVIDIA A100", (8, 0), True)])
    monkeypatch.setattr("sparsecompile.hardware.detect_host", lambda: next(hosts))
    options = dict(model=str(model_files / "dynamic.pt2"), min_weights=0, permute=False)
    build_module.build(BuildOptions(output=str(tmp_path / "h"), **options))
    assert calls == []  # an H100 is not the a100 target
    result = build_module.build(BuildOptions(output=str(tmp_path / "a"), **options))
    assert len(calls) == 1 and (result.output / "manifest.json").exists()  # failed engine: build still complete
    build_module.build(BuildOptions(output=str(tmp_path / "n"), engine=False, **options))
    assert len(calls) == 1
