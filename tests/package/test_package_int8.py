"""INT8 builds: weights.int8.safetensors from model.int8.onnx, and packages that carry and run the INT8 model."""

from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import sparsecompile
from helpers import cli, one_line_failure
from sparsecompile.backends.onnxruntime_runner import OrtRunner
from sparsecompile.build import BuildOptions, build
from sparsecompile.compress import decompress, dequantize, load_weights, save_weights
from sparsecompile.errors import SparseCompileError
from sparsecompile.fileio import file_sha256
from sparsecompile.hardware import normalize_arch
from sparsecompile.package import open_package, package_build
from sparsecompile.package.runner import engine_recipe
from sparsecompile.verify import count_nm_violations

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HOST_CPU = f"cpu-{normalize_arch(__import__('platform').machine())}"


def _int8_build(root, model_files, target):
    extra = {"sparsify": True} if target == "cpu" else {}
    return build(BuildOptions(model=str(model_files / "dynamic.pt2"), calib=str(model_files / "calib.npy"),
                              output=str(root / target), min_weights=0, permute=False, method="magnitude",
                              precision="int8", target=target, **extra))


@pytest.fixture(scope="module")
def cpu_int8(tmp_path_factory, model_files):
    return _int8_build(tmp_path_factory.mktemp("int8"), model_files, "cpu")


@pytest.fixture(scope="module")
def gpu_int8(tmp_path_factory, model_files):
    return _int8_build(tmp_path_factory.mktemp("int8"), model_files, "a100")


def _x(batch=5, seed=4):
    return np.random.default_rng(seed).standard_normal((batch, 4, 8, 8)).astype(np.float32)


def _int8_onnx_outputs(build_dir, x):
    with OrtRunner(build_dir / "model.int8.onnx", threads=1) as runner:
        return runner.infer([x])


# --- the build's weights.int8.safetensors ---------------------------------------------------------


def test_int8_weight_file_reproduces_the_qdq_model_exactly(cpu_int8):
    out, report = cpu_int8.output, cpu_int8.report
    weights = report["quantization"]["weights"]
    assert weights["path"] == "weights.int8.safetensors" and weights["file_bytes"] == (out / weights["path"]).stat().st_size
    sparse, dense, user = load_weights(out / "weights.int8.safetensors")
    assert user["dtype"] == "int8" and user["onnx"] == "model.int8.onnx" and user["pattern"] == "2:4"
    model = onnx.load(str(out / "model.int8.onnx"))
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    sparse_layers = [r["weight"] for r in report["layers"] if r["status"] == "sparse"]
    assert sorted(sparse) == sorted(f"{name}_quantized" for name in sparse_layers)
    for name, ct in sparse.items():
        assert ct.quantized and ct.dtype == torch.int8 and ct.quant_axis == 0
        q = decompress(ct).numpy()
        assert q.dtype == np.int8 and np.array_equal(q, initializers[name])  # exactly the Q/DQ model's int8 weight
        assert count_nm_violations(q, ct.reduction_axis, 2, 4) == 0
        layer = name[: -len(".weight_quantized")]
        scale, zero_point = initializers[f"{layer}.weight_scale"], initializers[f"{layer}.weight_zero_point"]
        assert np.array_equal(ct.scale.numpy().view(np.int32), scale.view(np.int32))
        assert np.array_equal(ct.zero_point.numpy(), zero_point) and not zero_point.any()  # symmetric
        assert f"{layer}.weight" not in initializers  # quantized: the float weight left the Q/DQ model
        expected = (q.astype(np.int32) - 0).astype(np.float32) * scale.reshape(-1, *[1] * (q.ndim - 1))
        assert np.array_equal(dequantize(ct).numpy().view(np.int32), expected.view(np.int32))
    # the rest of the weighted nodes' tensors (int32 biases here) are stored dense, exactly
    assert dense and all(np.array_equal(t.numpy(), initializers[k]) for k, t in dense.items())
    # the fp32 model's zeros are int8 zeros
    fp32 = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out / "model.onnx")).graph.initializer}
    for name in sparse_layers:
        assert not decompress(sparse[f"{name}_quantized"]).numpy()[fp32[name] == 0].any()
    # size vs dense int8: 2 values + 4 index bits per group of 4, scales on both sides
    assert weights["ratio_vs_dense"] < 0.7 and weights["compressed_bytes"] < weights["dense_bytes"]
    line = next(line for line in sparsecompile.report.summary_lines(report) if "weights.int8.safetensors" in line)
    assert "dense int8" in line and f"{weights['ratio_vs_dense']:.4f}x" in line
    shown = cli("inspect", out)
    assert shown.exit_code == 0 and "weights.int8.safetensors: sparse layers" in shown.output


# --- packages --------------------------------------------------------------------------------------


def test_cpu_int8_package_runs_the_int8_model(cpu_int8, tmp_path):
    result = package_build(cpu_int8.output, tmp_path / "m.scpkg", HOST_CPU)
    manifest = result.manifest
    assert manifest["precision"] == "int8" and manifest["quantization"]["format"] == "QDQ U8S8"
    assert manifest["quantization"]["onnx"] == "model.int8.onnx"
    assert manifest["accuracy"]["bundle_vs_build_onnx"]["build_onnx"] == "model.int8.onnx"
    assert manifest["accuracy"]["bundle_vs_build_onnx"]["max_abs_diff"] == 0.0
    assert manifest["accuracy"]["int8_damage"] == cpu_int8.report["quantization"]["damage"]
    package = open_package(result.path)
    graph = onnx.load_from_string(package.members["graph.onnx"])
    assert any(node.op_type == "QuantizeLinear" for node in graph.graph.node)  # the Q/DQ graph, not model.onnx
    left = {t.name for t in graph.graph.initializer}
    for spec in manifest["graph"]["external_initializers"]:
        assert spec["name"] not in left
    parts = {s["name"]: s for s in manifest["graph"]["external_initializers"] if "part_of" in s}
    assert {s["part"] for s in parts.values()} == {"scale", "zero_point"}  # scales travel with their weight
    sparse, _, _ = load_weights(cpu_int8.output / "weights.int8.safetensors")
    assert {s["part_of"] for s in parts.values()} == set(sparse)
    # The bundle's weight member is the INT8 compressed file
    member = tmp_path / "member.safetensors"
    member.write_bytes(package.members["weights.safetensors"])
    bundled, _, _ = load_weights(member)
    assert all(bundled[k].quantized and torch.equal(decompress(bundled[k]), decompress(v)) for k, v in sparse.items())
    # Its runner gives exactly what model.int8.onnx gives (not the fp32 model's outputs)
    x = _x()
    with sparsecompile.load(result.path, threads=1) as runner:
        assert runner.backend == "ort"
        got = runner(x)
    want = _int8_onnx_outputs(cpu_int8.output, x)[0]
    assert np.array_equal(got, want)
    with OrtRunner(cpu_int8.output / "model.onnx", threads=1) as fp32:
        assert not np.array_equal(got, fp32.infer([x])[0])
    # same build, same bytes
    again = package_build(cpu_int8.output, tmp_path / "again.scpkg", HOST_CPU)
    assert again.path.read_bytes() == result.path.read_bytes()


def test_gpu_int8_package_builds_a_sparse_int8_engine_from_the_qdq_model(gpu_int8, tmp_path):
    for edge in ("a100", "jetson-orin"):
        result = package_build(gpu_int8.output, tmp_path / f"{edge}.scpkg", edge)
        package = open_package(result.path)
        recipe = json.loads(package.members["engine/recipe.json"])
        assert recipe["precision"] == "int8" and recipe["sparse_weights"] is True and recipe["target"] == edge
        script = package.members["engine/trtexec.sh"].decode()
        assert "--int8" in script and "--sparsity=enable" in script and "--onnx=../model.onnx" in script
        assert engine_recipe(package)["precision"] == "int8"  # what the runner's engine build would use
        assert result.manifest["quantization"]["format"] == "QDQ S8S8"
    # unpacked, ../model.onnx is the Q/DQ model with every weight back: what trtexec --int8 reads
    out = tmp_path / "unpacked"
    out.mkdir()
    assert cli("unpack", tmp_path / "jetson-orin.scpkg", "-o", out).exit_code == 0
    restored = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(restored)
    built = onnx.load(str(gpu_int8.output / "model.int8.onnx"))

    def arrays(model):
        return {t.name: (numpy_helper.to_array(t).dtype, numpy_helper.to_array(t).shape,
                         numpy_helper.to_array(t).tobytes()) for t in model.graph.initializer}

    assert arrays(restored) == arrays(built)  # every initializer back, bit for bit
    assert "--int8" in (out / "engine" / "trtexec.sh").read_text()


def test_gpu_int8_build_runs_on_a_cpu_edge_with_a_note(gpu_int8, tmp_path):
    result = package_build(gpu_int8.output, tmp_path / "cpu.scpkg", HOST_CPU)
    assert any("int8 activations" in note for note in result.manifest["notes"])
    x = _x(3)
    with sparsecompile.load(result.path, threads=1) as runner:
        assert np.array_equal(runner(x), _int8_onnx_outputs(gpu_int8.output, x)[0])


def test_cpu_int8_build_is_refused_for_a_gpu_edge(cpu_int8, tmp_path):
    refused = cli("package", cpu_int8.output, "--edge", "jetson-orin", "-o", tmp_path / "g.scpkg")
    one_line_failure(refused, "uint8 activations", "jetson-orin", "--target jetson-orin --precision int8")
    assert not (tmp_path / "g.scpkg").exists()


def _copy_with(build_dir, tmp_path, name, data):
    """A copy of the build whose ``name`` is replaced by ``data``, its manifest hash updated (a consistent edit)."""
    copy = tmp_path / f"edited-{len(list(tmp_path.glob('edited-*')))}"
    shutil.copytree(build_dir, copy)
    (copy / name).write_bytes(data)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"][name] = file_sha256(copy / name)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_mismatched_or_corrupt_int8_weights_are_refused_in_one_line(cpu_int8, gpu_int8, tmp_path):
    # weights of another build: same masks, so the same int8 weights and scales, but int32 biases quantized with
    # the other build's activation scales -> the first differing tensor is named
    other = (gpu_int8.output / "weights.int8.safetensors").read_bytes()
    mixed = _copy_with(cpu_int8.output, tmp_path, "weights.int8.safetensors", other)
    _, theirs, _ = load_weights(mixed / "weights.int8.safetensors")
    _, ours, _ = load_weights(cpu_int8.output / "weights.int8.safetensors")
    differing = sorted(k for k in ours if not torch.equal(theirs[k], ours[k]))
    assert differing and all(k.endswith(".bias_quantized") for k in differing)
    one_line_failure(cli("package", mixed, "-o", tmp_path / "a.scpkg"), "differs from the graph's initializer",
                     "weights of another build")
    # one scale changed by one ulp -> named as that weight's scale
    path = tmp_path / "w.safetensors"
    sparse, dense, user = load_weights(cpu_int8.output / "weights.int8.safetensors")
    first = sorted(sparse)[0]
    sparse[first].scale = torch.nextafter(sparse[first].scale, torch.tensor(1.0))
    save_weights(path, sparse, dense, user)
    nudged = _copy_with(cpu_int8.output, tmp_path, "weights.int8.safetensors", path.read_bytes())
    one_line_failure(cli("package", nudged, "-o", tmp_path / "b.scpkg"), f"the scale of '{first}'")
    # a truncated file -> the safetensors reader's one line
    data = (cpu_int8.output / "weights.int8.safetensors").read_bytes()
    cut = _copy_with(cpu_int8.output, tmp_path, "weights.int8.safetensors", data[:-10])
    one_line_failure(cli("package", cut, "-o", tmp_path / "c.scpkg"), "corrupt or truncated")
    # changed without updating the build's manifest -> the build's hash check
    edited = tmp_path / "edited"
    shutil.copytree(cpu_int8.output, edited)
    (edited / "weights.int8.safetensors").write_bytes(other)
    one_line_failure(cli("package", edited, "-o", tmp_path / "d.scpkg"), "weights.int8.safetensors", "changed")
    # an INT8 build from before weights.int8.safetensors existed -> rebuild
    old = tmp_path / "old"
    shutil.copytree(cpu_int8.output, old)
    (old / "weights.int8.safetensors").unlink()
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["files"]["weights.int8.safetensors"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    one_line_failure(cli("package", old, "-o", tmp_path / "e.scpkg"), "rebuild it")


def test_a_bundle_with_a_bad_int8_scale_is_refused_in_one_line(cpu_int8, tmp_path):
    """A bundle whose manifest was rewritten to match a corrupted weight member still fails on load, in one line."""
    bundle = package_build(cpu_int8.output, tmp_path / "m.scpkg", HOST_CPU).path
    package = open_package(bundle)
    member = tmp_path / "member.safetensors"
    member.write_bytes(package.members["weights.safetensors"])
    sparse, dense, user = load_weights(member)
    first = sorted(sparse)[0]
    # bypass compress_int8's own checks: write a NaN scale the way a corrupting tool would
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(member), framework="pt") as handle:
        header = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    tensors[f"{first}.scale"][0] = float("nan")
    save_file(tensors, str(member), metadata=header)
    data = member.read_bytes()
    manifest = dict(package.manifest)
    manifest["members"] = {**manifest["members"], "weights.safetensors": {
        "bytes": len(data), "sha256": __import__("hashlib").sha256(data).hexdigest()}}
    bad = tmp_path / "bad.scpkg"
    with zipfile.ZipFile(bundle) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            body = src.read(info)
            if info.filename == "weights.safetensors":
                body = data
            elif info.filename == "manifest.json":
                body = json.dumps(manifest).encode()
            dst.writestr(info.filename, body)
    with pytest.raises(SparseCompileError) as excinfo:
        sparsecompile.load(bad)
    message = str(excinfo.value)
    assert "\n" not in message and "non-finite" in message and first in message, message
    np.save(tmp_path / "x.npy", _x(2))
    one_line_failure(cli("run", bad, "-i", tmp_path / "x.npy", "-o", tmp_path / "y.npy"), "non-finite")


def test_the_documented_commands_work(cpu_int8, tmp_path):
    """docs/int8.md "Shipping it": package, inspect, run; the runner's output is model.int8.onnx's.

    (The build is the fixture's: the documented flags plus --min-weights 0 and magnitude masks, so that the
    tests' small CNN has sparse layers and builds in seconds.)"""
    bundle = tmp_path / "model.scpkg"
    packaged = cli("package", cpu_int8.output, "-o", bundle)
    assert packaged.exit_code == 0, packaged.output
    assert "dense int8" in packaged.output and "bundle vs build model.int8.onnx: max abs diff 0" in packaged.output
    shown = cli("inspect", bundle)
    assert shown.exit_code == 0, shown.output
    assert "precision int8" in shown.output and "int8      model.int8.onnx (QDQ U8S8" in shown.output
    x = _x(4)
    np.save(tmp_path / "x.npy", x)
    ran = cli("run", bundle, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy")
    assert ran.exit_code == 0, ran.output
    assert np.array_equal(np.load(tmp_path / "y.npy"), _int8_onnx_outputs(cpu_int8.output, x)[0])


def test_a_sparse_layer_kept_float_is_a_float_entry_and_restores(cpu_int8, tmp_path):
    """int8_weight_entries on a Q/DQ model with one sparse layer kept float; the bundle's strip/restore round trip."""
    from sparsecompile import quantize
    from sparsecompile.package.weights import check_matches_graph, restore_weights, strip_weights

    fp32 = cpu_int8.output / "model.onnx"
    q = tmp_path / "q.onnx"
    quantize.quantize_onnx(fp32, q, [{"x": _x(16, 1)}], exclude_nodes=["conv2"], activations="u8")
    sparse_layers = [r["weight"] for r in cpu_int8.report["layers"] if r["status"] == "sparse"]
    sparse, dense = quantize.int8_weight_entries(q, sparse_layers)
    assert "conv2.weight" in sparse and not sparse["conv2.weight"].quantized
    assert sparse["conv2.weight"].dtype == torch.float32
    assert {k for k, v in sparse.items() if v.quantized} == {f"{w}_quantized" for w in sparse_layers if w != "conv2.weight"}
    path = tmp_path / "w.safetensors"
    save_weights(path, sparse, dense, None)
    sparse, dense, _ = load_weights(path)
    model = onnx.load(str(q))
    check_matches_graph(model, sparse, dense, "test")
    specs, sparse_kept, dense_kept = strip_weights(model, sparse, dense)
    assert "conv2.weight" in {s["name"] for s in specs}
    restore_weights(model, specs, sparse_kept, dense_kept, "test")
    x = _x(3)
    with OrtRunner(q, threads=1) as want:
        expected = want.infer([x])[0]
    onnx.save(model, tmp_path / "restored.onnx")
    with OrtRunner(tmp_path / "restored.onnx", threads=1) as got:
        assert np.array_equal(got.infer([x])[0], expected)
