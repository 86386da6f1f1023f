"""TensorRT's sparse-math lines, parsed and mapped back to our layers; the engine command's checks."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest

from helpers import cli, one_line_failure
from sparsecompile.builddir import open_build
from sparsecompile.engine.run import build_engine, check_engine_host, engine_lines, record_engine, summarize_engine
from sparsecompile.engine.sparsity_log import layer_sparsity, parse_sparsity_log, weight_consumers
from sparsecompile.errors import SparseCompileError
from sparsecompile.hardware import HostInfo

# The two lines in trtexec's documented format (timestamps, severity, [TRT] prefix), among other log lines.
TRTEXEC_LOG = """\
[11/22/2026-10:00:01] [I] [TRT] Detected 1 inputs and 1 output network tensors.
[11/22/2026-10:00:09] [I] [TRT] (Sparsity) Layers eligible for sparse math: node_conv2d_1 + node_relu_1, node_conv2d_2 + node_add_3 + node_relu_2, node_linear
[11/22/2026-10:00:09] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: node_conv2d_2 + node_add_3 + node_relu_2
[11/22/2026-10:00:10] [I] Engine built in 9.1 sec.
"""
# The Python API logger's form, and a build where nothing went sparse.
PYTHON_LOG = """\
[TensorRT] INFO: (Sparsity) Layers eligible for sparse math: conv_a
[TensorRT] INFO: (Sparsity) TRT inference plan picked sparse implementation for layers:
"""


def test_parse_both_lists():
    log = parse_sparsity_log(TRTEXEC_LOG)
    assert log.eligible == ["node_conv2d_1 + node_relu_1", "node_conv2d_2 + node_add_3 + node_relu_2", "node_linear"]
    assert log.picked == ["node_conv2d_2 + node_add_3 + node_relu_2"]
    quiet = parse_sparsity_log(PYTHON_LOG)
    assert quiet.eligible == ["conv_a"] and quiet.picked == []
    assert parse_sparsity_log("[I] [TRT] Engine built.\n") is None


def test_layers_mapped_through_weight_consumers():
    layers = [{"name": n, "weight": f"{n}.weight", "status": s}
              for n, s in (("conv1", "sparse"), ("conv2", "sparse"), ("fc", "sparse"), ("stem", "dense"))]
    consumers = {"conv1.weight": "node_conv2d_1", "conv2.weight": "node_conv2d_2", "fc.weight": "node_linear",
                 "stem.weight": "node_conv2d"}
    rows = {r["name"]: r["engine"] for r in layer_sparsity(layers, parse_sparsity_log(TRTEXEC_LOG), consumers)}
    assert rows == {"conv1": "eligible, stayed dense", "conv2": "picked sparse", "fc": "eligible, stayed dense",
                    "stem": "not eligible"}  # node_conv2d is not node_conv2d_1: whole names only
    assert {r["engine"] for r in layer_sparsity(layers, None, consumers)} == {"unknown"}


def test_engine_summary_on_a_build(tmp_path, sample_build):
    build_dir = tmp_path / "b"
    shutil.copytree(sample_build.output, build_dir)
    model = onnx.load(str(build_dir / "model.onnx"))
    consumers = weight_consumers(model)
    sparse = [r for r in sample_build.report["layers"] if r["status"] == "sparse"]
    first, second = consumers[sparse[0]["weight"]], consumers[sparse[1]["weight"]]
    (build_dir / "engine" / "build.log").write_text(
        f"[I] [TRT] (Sparsity) Layers eligible for sparse math: {first} + relu_x, {second}\n"
        f"[I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: {first} + relu_x\n")
    # the engine inspector's JSON (profiling verbosity DETAILED), as TensorRT documents it
    (build_dir / "engine" / "layers.json").write_text(json.dumps({"Layers": [
        {"Name": f"{first} + relu_x", "LayerType": "CaskConvolution",
         "TacticName": "sm80_xmma_fprop_sparse_conv_f16f16_f16f16_f16_nhwckrsc_nhwc_tilesize128x128x64"},
        {"Name": second, "LayerType": "CaskConvolution", "TacticName": "sm80_xmma_fprop_implicit_gemm_f16f16"},
        "a bare name without details"], "Bindings": ["x", "output"]}))
    summary = summarize_engine(build_dir, sample_build.report)
    tactics = {r["name"]: r.get("tactic") for r in summary["layers"]}
    assert "sparse_conv" in tactics[sparse[0]["name"]] and "implicit_gemm" in tactics[sparse[1]["name"]]
    by_name = {r["name"]: r["engine"] for r in summary["layers"]}
    assert by_name[sparse[0]["name"]] == "picked sparse"
    assert by_name[sparse[1]["name"]] == "eligible, stayed dense"
    assert summary["counts"]["picked sparse"] == 1
    text = "\n".join(engine_lines(summary))
    assert "TensorRT kept dense kernels" in text
    (build_dir / "engine" / "model.a100.engine").write_bytes(b"stand-in engine")
    record_engine(build_dir)
    _, manifest = open_build(build_dir)
    assert {"engine/build.log", "engine/engine.json", "engine/layers.json", "engine/model.a100.engine"} <= set(
        manifest["files"])
    report = json.loads((build_dir / "report.json").read_text())
    assert report["engine"]["status"] == "built" and report["engine"]["counts"]["picked sparse"] == 1
    layer = next(r for r in report["layers"] if r["name"] == sparse[0]["name"])
    assert layer["engine"]["engine"] == "picked sparse" and "sparse_conv" in layer["engine"]["tactic"]
    from sparsecompile.fileio import file_sha256

    assert manifest["files"]["report.json"] == file_sha256(build_dir / "report.json")
    result = cli("inspect", build_dir)
    assert result.exit_code == 0 and "picked sparse" in result.output


def test_engine_command_checks_the_machine(tmp_path, sample_build, model_files):
    recipe = json.loads((sample_build.output / "engine" / "recipe.json").read_text())
    with pytest.raises(SparseCompileError, match="no CUDA GPU on this machine.*build_engine.py"):
        check_engine_host(recipe, HostInfo("x86_64"), sample_build.output)
    with pytest.raises(SparseCompileError, match="sm_90.*not the build's target a100"):
        check_engine_host(recipe, HostInfo("x86_64", "NVIDIA H100", (9, 0), True), sample_build.output)
    with pytest.raises(SparseCompileError, match="pip install tensorrt"):
        check_engine_host(recipe, HostInfo("x86_64", "NVIDIA A100", (8, 0), False), sample_build.output)
    check_engine_host(recipe, HostInfo("x86_64", "NVIDIA A100", (8, 0), True), sample_build.output)
    check_engine_host(recipe, HostInfo("x86_64", "NVIDIA H100", (9, 0), True), sample_build.output, allow_other_gpu=True)
    one_line_failure(cli("engine", sample_build.output))
    from sparsecompile.build import BuildOptions, build

    cpu = build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / "cpu"), target="cpu"))
    with pytest.raises(SparseCompileError, match="no TensorRT recipe"):
        build_engine(cpu.output, host=HostInfo("x86_64", "NVIDIA A100", (8, 0), True))


def test_timing_cache_is_shared_per_gpu_kind(tmp_path, monkeypatch):
    from sparsecompile.engine.run import shared_timing_cache

    monkeypatch.setenv("SPARSECOMPILE_CACHE", str(tmp_path))
    a100 = shared_timing_cache(HostInfo("x86_64", "A100", (8, 0), True))
    assert a100.parent == tmp_path / "timing" and a100.name.startswith("sm80-trt")
    assert shared_timing_cache(HostInfo("x86_64", "A100", (8, 0), True)) == a100
    assert shared_timing_cache(HostInfo("x86_64", "H100", (9, 0), True)) != a100


def test_detect_host_here():
    import platform

    import torch

    from sparsecompile.hardware import detect_host, normalize_arch

    host = detect_host()
    assert host.arch == normalize_arch(platform.machine())
    if not torch.cuda.is_available():
        assert host.gpu_capability is None and not host.tensorrt and "without a CUDA GPU" in host.describe()
