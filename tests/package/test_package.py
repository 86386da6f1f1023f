"""Edge bundles: packaging, verified loading, running, inspecting, and every kind of bad bundle."""

from __future__ import annotations

import json
import pickle
import platform
import zipfile

import numpy as np
import onnx
import pytest
import torch

import sparsecompile
from sparsecompile.backends.onnxruntime_runner import OrtRunner
from sparsecompile.errors import SparseCompileError
from sparsecompile.package import EDGE_TARGETS, load, open_package, package_build
from sparsecompile.hardware import HostInfo, normalize_arch
from sparsecompile.package.edges import check_host, default_edge, get_edge
from sparsecompile.package.runner import PackageRunner
from helpers import cli as invoke, one_line_failure

HOST_ARCH = normalize_arch(platform.machine())
OTHER_CPU = "cpu-aarch64" if HOST_ARCH == "x86_64" else "cpu-x86_64"






@pytest.fixture(scope="module")
def fp32_build(tmp_path_factory, model_files):
    """A CPU-target build forced sparse: fp32 weights, so a bundle must reproduce it exactly."""
    from sparsecompile.build import BuildOptions, build

    out = tmp_path_factory.mktemp("builds") / "cpu"
    return build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(out), target="cpu", sparsify=True,
                              calib=str(model_files / "calib.npy"), min_weights=0))


@pytest.fixture(scope="module")
def gpu_package(tmp_path_factory, sample_build):
    path = tmp_path_factory.mktemp("pkg") / "model.scpkg"
    return package_build(sample_build.output, path, "a100")


@pytest.fixture(scope="module")
def cpu_package(tmp_path_factory, fp32_build):
    path = tmp_path_factory.mktemp("pkg") / "cpu.scpkg"
    return package_build(fp32_build.output, path, f"cpu-{HOST_ARCH}")


def _build_outputs(build_dir, x):
    with OrtRunner(build_dir / "model.onnx") as runner:
        return runner.infer([x])


def _x(batch=6, seed=3):
    return np.random.default_rng(seed).standard_normal((batch, 4, 8, 8)).astype(np.float32)


def _rewrite(src, dst, replace=None, drop=(), add=None, manifest=None):
    """Copy a bundle changing members (the manifest stays as it was unless given)."""
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        for info in a.infolist():
            if info.filename in drop:
                continue
            data = a.read(info)
            if info.filename == "manifest.json" and manifest is not None:
                data = json.dumps(manifest).encode()
            if replace and info.filename in replace:
                data = replace[info.filename]
            b.writestr(info.filename, data)
        for name, data in (add or {}).items():
            b.writestr(name, data)
    return dst


# --- what a bundle holds -------------------------------------------------------------------------


def test_bundle_members_and_manifest(gpu_package, sample_build):
    manifest = gpu_package.manifest
    with zipfile.ZipFile(gpu_package.path) as archive:
        names = archive.namelist()
    assert names[0] == "manifest.json"
    assert set(names) == {"manifest.json", "graph.onnx", "weights.safetensors", "report.json",
                          "engine/recipe.json", "engine/build_engine.py", "engine/trtexec.sh"}
    assert manifest["format"] == "sparsecompile-package" and manifest["version"] == 1
    assert manifest["target"]["name"] == "a100" and manifest["build_target"] == "a100"
    assert manifest["precision"] == "fp16" and manifest["pattern"] == "2:4"
    assert manifest["model"]["source"]["sha256"] == sample_build.report["source"]["sha256"]
    assert [i["name"] for i in manifest["inputs"]] == [i["name"] for i in sample_build.report["inputs"]]
    assert manifest["masks"]["method"] == sample_build.report["method"]
    assert {layer["name"] for layer in manifest["sparsity"]["layers"]} == {r["name"] for r in sample_build.report["layers"]}
    assert manifest["accuracy"]["sparse_vs_dense"] == sample_build.report["verification"]["sparse_vs_dense"]
    for library in ("sparsecompile", "torch", "onnx", "onnxruntime"):
        assert manifest["libraries"][library]
    assert set(manifest["members"]) == set(names) - {"manifest.json"}


def test_graph_ships_without_its_weights(gpu_package, sample_build):
    package = open_package(gpu_package.path)
    graph = onnx.load_from_string(package.members["graph.onnx"]).graph
    build_graph = onnx.load(str(sample_build.output / "model.onnx")).graph
    stripped = {s["name"] for s in package.manifest["graph"]["external_initializers"]}
    sparse_weights = {r["weight"] for r in sample_build.report["layers"] if r["status"] == "sparse"}
    assert sparse_weights and sparse_weights <= stripped
    assert not stripped & {i.name for i in graph.initializer}
    stripped_bytes = sum(4 * int(np.prod(s["shape"])) for s in package.manifest["graph"]["external_initializers"])
    assert len(package.members["graph.onnx"]) + stripped_bytes <= (sample_build.output / "model.onnx").stat().st_size
    assert {i.name for i in graph.initializer} | stripped == {i.name for i in build_graph.initializer}
    # the build machine's stack traces do not travel
    assert b"stack_trace" not in package.members["graph.onnx"]


def test_sparse_layers_at_the_format_floor(gpu_package):
    sizes = gpu_package.manifest["sizes"]
    sparse = sizes["sparse_layers"]
    assert sparse["tensors"] >= 2
    # 2 fp16 values + 4 index bits per group of 4 = 0.5625 (+1 padding byte per odd-sized tensor)
    assert sparse["compressed_bytes"] <= 0.5625 * sparse["dense_fp16_bytes"] + sparse["tensors"]
    assert gpu_package.size < sizes["dense_onnx_bytes"]


def test_recipe_for_gpu_targets_only(gpu_package, cpu_package, tmp_path, sample_build):
    members = open_package(gpu_package.path).members
    recipe = json.loads(members["engine/recipe.json"])
    assert recipe["target"] == "a100" and recipe["compute_capability"] == "8.0" and recipe["precision"] == "fp16"
    assert recipe["profile"]["x"] == {"min": [1, 4, 8, 8], "opt": [8, 4, 8, 8], "max": [32, 4, 8, 8]}
    script = members["engine/trtexec.sh"].decode()
    assert "--sparsity=enable" in script and "--fp16" in script and "--maxShapes=x:32x4x8x8" in script
    assert members["engine/build_engine.py"] == (sample_build.output / "engine" / "build_engine.py").read_bytes()
    assert gpu_package.manifest["engine"]["members"] == ["engine/build_engine.py", "engine/recipe.json",
                                                         "engine/trtexec.sh"]
    assert cpu_package.manifest["engine"] is None
    assert not any(name.startswith("engine/") for name in open_package(cpu_package.path).members)
    # re-targeted: a build for a100 shipped to a Jetson gets the Jetson's recipe
    orin = package_build(sample_build.output, tmp_path / "orin.scpkg", "jetson-orin")
    orin_recipe = json.loads(open_package(orin.path).members["engine/recipe.json"])
    assert orin_recipe["target"] == "jetson-orin" and orin_recipe["compute_capability"] == "8.7"
    assert orin_recipe["engine"] == "model.jetson-orin.engine"


def test_packaging_twice_is_byte_identical(tmp_path, sample_build):
    first = package_build(sample_build.output, tmp_path / "a.scpkg", "jetson-orin")
    (tmp_path / "again").mkdir()
    second = package_build(sample_build.output, tmp_path / "again" / "a.scpkg", "jetson-orin")
    assert first.path.read_bytes() == second.path.read_bytes()
    with zipfile.ZipFile(first.path) as archive:
        assert {i.date_time for i in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}


# --- running a bundle ----------------------------------------------------------------------------


def test_fp32_bundle_reproduces_the_build_exactly(cpu_package, fp32_build):
    x = _x()
    with load(cpu_package.path) as runner:
        got = runner(x)
        assert runner.backend == "ort"
    np.testing.assert_array_equal(got, _build_outputs(fp32_build.output, x)[0])
    assert cpu_package.manifest["accuracy"]["bundle_vs_build_onnx"]["max_abs_diff"] == 0.0


def test_fp16_bundle_matches_the_build_within_fp16_rounding(gpu_package, sample_build):
    x = _x()
    runner = sparsecompile.load(gpu_package.path)
    got = runner(x)
    want = _build_outputs(sample_build.output, x)[0]
    scale = np.abs(want).max()
    assert 0 < np.abs(got - want).max() <= 5e-3 * scale  # weights were rounded to fp16, not more
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.8
    assert any("no CUDA GPU" in n for n in runner.notes) or torch.cuda.is_available()
    runner.close()
    with pytest.raises(SparseCompileError, match="closed"):
        runner(x)


def test_loading_never_unpickles(gpu_package, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("unpickling during package load")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    with load(gpu_package.path) as runner:
        assert runner(_x()).shape == (6, 10)


def test_wrong_input_is_refused(gpu_package):
    with load(gpu_package.path) as runner:
        with pytest.raises(SparseCompileError, match="shape"):
            runner(np.zeros((2, 3, 8, 8), np.float32))
        with pytest.raises(SparseCompileError, match="float32"):
            runner(np.zeros((2, 4, 8, 8), np.float64))


def test_cli_run_refuses_wrong_input_files(tmp_path, gpu_package):
    np.save(tmp_path / "shape.npy", np.zeros((2, 3, 8, 8), np.float32))
    one_line_failure(invoke("run", gpu_package.path, "-i", tmp_path / "shape.npy"), "must have shape")
    np.save(tmp_path / "dtype.npy", np.zeros((2, 4, 8, 8), np.float64))
    one_line_failure(invoke("run", gpu_package.path, "-i", tmp_path / "dtype.npy"), "must be float32")


def test_cli_package_run_inspect_unpack(tmp_path, sample_build):
    out = tmp_path / "m.scpkg"
    result = invoke("package", sample_build.output, "--edge", "jetson-orin", "-o", out)
    assert result.exit_code == 0, result.output
    assert "jetson-orin" in result.output and "0.5625x" in result.output and "dense ONNX" in result.output
    x = _x(3)
    np.save(tmp_path / "x.npy", x)
    result = invoke("run", out, "-i", tmp_path / "x.npy", "-o", tmp_path / "y.npy")
    assert result.exit_code == 0, result.output
    with load(out) as runner:
        np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), runner(x))
    result = invoke("inspect", out)
    assert result.exit_code == 0, result.output
    for fragment in ("jetson-orin", "members verified", "sha256", "top-1 agreement", "engine/recipe.json"):
        assert fragment in result.output
    assert json.loads(invoke("inspect", out, "--json").output)["target"]["name"] == "jetson-orin"
    result = invoke("unpack", out, "-o", tmp_path / "model.onnx")
    assert result.exit_code == 0, result.output
    restored = onnx.load(str(tmp_path / "model.onnx"))
    onnx.checker.check_model(restored)
    with OrtRunner(tmp_path / "model.onnx") as runner:
        np.testing.assert_array_equal(runner.infer([x])[0], np.load(tmp_path / "y.npy"))
    (tmp_path / "engine").mkdir()
    result = invoke("unpack", out, "-o", tmp_path / "engine")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "engine" / "model.onnx").read_bytes() == (tmp_path / "model.onnx").read_bytes()
    assert "--sparsity=enable" in (tmp_path / "engine" / "engine" / "trtexec.sh").read_text()
    assert json.loads((tmp_path / "engine" / "engine" / "recipe.json").read_text())["onnx"] == "../model.onnx"


# --- targets and hosts ---------------------------------------------------------------------------


def test_edge_targets_and_defaults():
    assert {"jetson-orin", "a100", "cpu-x86_64", "cpu-aarch64"} <= set(EDGE_TARGETS)
    assert default_edge("a100") == "a100"
    assert default_edge("cpu") == f"cpu-{HOST_ARCH}"
    with pytest.raises(SparseCompileError, match="valid: .*jetson-orin"):
        get_edge("tpu")


def test_host_checks():
    orin, cpu = get_edge("jetson-orin"), get_edge("cpu-x86_64")
    assert check_host(orin, HostInfo("x86_64")) is None  # no GPU: the CPU fallback runs
    assert check_host(orin, HostInfo("aarch64", "Orin", (8, 7))) is None
    problem = check_host(orin, HostInfo("x86_64", "NVIDIA H100", (9, 0)))
    assert "built for jetson-orin (sm_87)" in problem and "sm_90" in problem
    assert "built for cpu-x86_64" in check_host(cpu, HostInfo("aarch64"))
    assert check_host(cpu, HostInfo("x86_64")) is None


def test_bundle_for_another_target_is_refused(tmp_path, fp32_build):
    path = package_build(fp32_build.output, tmp_path / "other.scpkg", OTHER_CPU).path
    with pytest.raises(SparseCompileError, match=f"built for {OTHER_CPU}"):
        load(path)
    np.save(tmp_path / "x.npy", _x(2))
    one_line_failure(invoke("run", path, "-i", tmp_path / "x.npy"), f"built for {OTHER_CPU}")
    result = invoke("run", path, "-i", tmp_path / "x.npy", "--allow-other-target")
    assert result.exit_code == 0, result.output
    with pytest.raises(SparseCompileError, match="sm_87"):
        PackageRunner(package_build(fp32_build.output, tmp_path / "orin.scpkg", "jetson-orin").path,
                      host=HostInfo("x86_64", "NVIDIA H100", (9, 0)))


# --- bad bundles ---------------------------------------------------------------------------------


def test_tampered_member_is_named(tmp_path, gpu_package):
    weights = open_package(gpu_package.path).members["weights.safetensors"]
    flipped = weights[:-10] + bytes([weights[-10] ^ 1]) + weights[-9:]
    bad = _rewrite(gpu_package.path, tmp_path / "bad.scpkg", replace={"weights.safetensors": flipped})
    with pytest.raises(SparseCompileError, match="'weights.safetensors' fails its SHA-256"):
        load(bad)
    one_line_failure(invoke("inspect", bad), "weights.safetensors")


def test_resized_member_is_named(tmp_path, gpu_package):
    bad = _rewrite(gpu_package.path, tmp_path / "bad.scpkg", replace={"report.json": b"{}"})
    with pytest.raises(SparseCompileError, match="'report.json' has 2 bytes"):
        open_package(bad)


def test_truncated_bundle(tmp_path, gpu_package):
    data = gpu_package.path.read_bytes()
    for cut in (len(data) // 2, len(data) - 30):
        bad = tmp_path / f"cut{cut}.scpkg"
        bad.write_bytes(data[:cut])
        with pytest.raises(SparseCompileError, match="truncated"):
            open_package(bad)
    np.save(tmp_path / "x.npy", _x(2))
    one_line_failure(invoke("run", bad, "-i", tmp_path / "x.npy"), "truncated")


def test_missing_and_extra_members(tmp_path, gpu_package):
    missing = _rewrite(gpu_package.path, tmp_path / "missing.scpkg", drop={"graph.onnx"})
    with pytest.raises(SparseCompileError, match="member 'graph.onnx' is missing"):
        open_package(missing)
    extra = _rewrite(gpu_package.path, tmp_path / "extra.scpkg", add={"payload.py": b"print('hi')"})
    with pytest.raises(SparseCompileError, match="unexpected member 'payload.py'"):
        open_package(extra)


def test_wrong_manifest_version_and_format(tmp_path, gpu_package):
    manifest = dict(gpu_package.manifest, version=99)
    bad = _rewrite(gpu_package.path, tmp_path / "v99.scpkg", manifest=manifest)
    with pytest.raises(SparseCompileError, match="version 99 is not supported"):
        open_package(bad)
    other = _rewrite(gpu_package.path, tmp_path / "other.scpkg", manifest={"format": "something-else"})
    with pytest.raises(SparseCompileError, match="not a sparsecompile package"):
        open_package(other)
    junk = tmp_path / "junk.scpkg"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(SparseCompileError, match="not a sparsecompile package"):
        open_package(junk)


def test_package_errors_are_one_line(tmp_path, sample_build):
    one_line_failure(invoke("package", tmp_path / "nope", "-o", tmp_path / "m.scpkg"), "does not exist")
    one_line_failure(invoke("run", tmp_path / "nope.scpkg", "-i", tmp_path / "x.npy"), "does not exist")
    (tmp_path / "keep.txt").write_text("precious")
    one_line_failure(invoke("package", sample_build.output, "-o", tmp_path / "keep.txt"), "not a sparsecompile package")
    assert (tmp_path / "keep.txt").read_text() == "precious"
    one_line_failure(invoke("package", sample_build.output, "-o", tmp_path / "no" / "m.scpkg"), "does not exist")
    result = invoke("package", sample_build.output, "--edge", "tpu", "-o", tmp_path / "m.scpkg")
    assert result.exit_code == 2 and "tpu" in result.output


def test_changed_build_is_refused(tmp_path, fp32_build):
    import shutil

    copy = tmp_path / "build"
    shutil.copytree(fp32_build.output, copy)
    report = json.loads((copy / "report.json").read_text())
    report["method"] = "edited"
    (copy / "report.json").write_text(json.dumps(report))
    with pytest.raises(SparseCompileError, match="'report.json' changed since the build"):
        package_build(copy, tmp_path / "m.scpkg", "cpu-x86_64")
    assert not (tmp_path / "m.scpkg").exists()
    assert not list(tmp_path.glob(".m.scpkg.*"))


# --- backend choice (the TensorRT path itself cannot run here: no GPU) ----------------------------


def test_backend_choice():
    from sparsecompile.package.runner import choose_backend

    orin = get_edge("jetson-orin")
    assert choose_backend(orin, HostInfo("aarch64", "Orin", (8, 7), True)) == ("tensorrt", None)
    backend, note = choose_backend(orin, HostInfo("aarch64", "Orin", (8, 7), False))
    assert backend == "ort" and "pip install tensorrt" in note
    backend, note = choose_backend(orin, HostInfo("x86_64"))
    assert backend == "ort" and "no CUDA GPU" in note
    assert choose_backend(get_edge("cpu-x86_64"), HostInfo("x86_64", "A100", (8, 0), True)) == ("ort", None)


def test_engine_cache_key(gpu_package, tmp_path, monkeypatch):
    from sparsecompile.package.runner import engine_cache_dir

    monkeypatch.setenv("SPARSECOMPILE_CACHE", str(tmp_path))
    package = open_package(gpu_package.path)
    a100 = engine_cache_dir(package, HostInfo("x86_64", "A100", (8, 0), True))
    assert a100.parent == tmp_path / "engines" and a100.name.endswith("-sm80")
    assert a100 == engine_cache_dir(open_package(gpu_package.path), HostInfo("x86_64", "A100", (8, 0), True))
    assert engine_cache_dir(package, HostInfo("x86_64", "H100", (9, 0), True)) != a100


def test_failed_engine_build_falls_back_to_onnxruntime(gpu_package, tmp_path, monkeypatch):
    # A host that claims an A100 and TensorRT: the recipe's builder finds no CUDA device and exits,
    # and the runner must fall back to ONNX Runtime, saying why, with the same outputs.
    monkeypatch.setenv("SPARSECOMPILE_CACHE", str(tmp_path))
    runner = PackageRunner(gpu_package.path, host=HostInfo("x86_64", "NVIDIA A100", (8, 0), True))
    assert runner.backend == "ort"
    assert any("TensorRT engine unavailable" in n and "no CUDA device" in n for n in runner.notes), runner.notes
    x = _x()
    with load(gpu_package.path) as plain:
        np.testing.assert_array_equal(runner(x), plain(x))
    cached = list((tmp_path / "engines").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.onnx").exists() and (cached[0] / "engine" / "recipe.json").exists()
