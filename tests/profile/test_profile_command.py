"""``sparsecompile profile`` end to end: the command on real builds and model files (timing, the dense
comparison, the per-layer map, JSON and plots) and its one-line errors."""

from __future__ import annotations

import json
import math
import shutil
import sys

import pytest
import torch

from helpers import cli, one_line_failure
from sparsecompile.cli import main
from sparsecompile.profile import SCHEMA, profile_command

if "profile" not in main.commands:  # cli.py registers it in the packaged CLI; make sure the tests see it
    main.add_command(profile_command)

FAST = ["--runs", "5", "--warmup", "1", "--threads", "1"]


def invoke(*args):
    return cli("profile", *args)


def _copy_build(build_dir, tmp_path, name="copy", **manifest_changes):
    copy = tmp_path / name
    shutil.copytree(build_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for key, value in manifest_changes.items():
        manifest[key] = value
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


# --------------------------------------------------------------------------- the CLI on real builds


def test_profile_build_with_dense_comparison(sample_build, tmp_path):
    out = tmp_path / "profile.json"
    result = invoke(sample_build.output, "--batch", "1,3", *FAST, "--compare", "dense", "--json-out", out)
    assert result.exit_code == 0, result.output
    assert "sparse/dense latency" in result.output and "p50 ms" in result.output
    data = json.loads(out.read_text())
    assert data["schema"] == SCHEMA
    assert [v["name"] for v in data["variants"]] == ["sparse", "dense"]
    assert data["settings"]["interleaved"] and data["settings"]["threads"] == 1
    # The design is recorded: per batch its seed and the order of every round (5 runs: 2 blocks of 2 + 1).
    assert [d["batch"] for d in data["design"]] == [1, 3] and [d["seed"] for d in data["design"]] == [1, 3]
    for design in data["design"]:
        assert design["variants"] == ["sparse", "dense"] and len(design["orders"]) == 5
        assert design["complete_blocks"] == 2 and not design["balanced"]
        assert [o[0] for o in design["orders"]][:4] in ([0, 1, 0, 1], [1, 0, 1, 0])
    for variant in data["variants"]:  # thread counts per variant
        assert variant["threads"] == {"runtime": "onnxruntime", "intra_op_num_threads": 1,
                                      "inter_op_num_threads": 1, "spinning": False}
    assert "threads: sparse onnxruntime intra-op 1, inter-op 1; dense onnxruntime intra-op 1" in result.output
    assert "round order: every ordering of the 2 variants once per block of 2 rounds" in result.output
    for variant in data["variants"]:
        assert variant["load_s"] > 0
        assert [r["batch"] for r in variant["results"]] == [1, 3]
        for row in variant["results"]:
            lat = row["latency_ms"]
            assert all(math.isfinite(lat[k]) and lat[k] > 0 for k in ("p50", "p90", "p99", "min", "max"))
            assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
            assert len(row["samples_ms"]) == 5
            assert row["throughput_per_s"] == pytest.approx(row["batch"] * 1000 / lat["p50"])
            assert row["peak_memory_mb"] is None or row["peak_memory_mb"] >= 0
    assert [c["batch"] for c in data["comparison"]] == [1, 3]
    for c in data["comparison"]:
        assert c["ci_low"] <= c["ratio"] <= c["ci_high"] and 0.2 < c["ratio"] < 5
    env = data["environment"]
    assert env["versions"]["onnxruntime"] and env["versions"]["torch"] and env["physical_cores"] >= 1

    # Per-layer: ORT nodes map back to the build's layers with the build's sparse/dense status.
    report = json.loads((sample_build.output / "report.json").read_text())
    status = {layer["name"]: layer["status"] for layer in report["layers"]}
    layers = data["layers"]
    assert layers["batch"] == 1
    for name in ("sparse", "dense"):
        rows = layers["variants"][name]["layers"]
        assert rows, name
        for row in rows:
            assert row["layer"] in status and row["status"] == status[row["layer"]]
            assert row["ms"] > 0 and row["nodes"]
    mapped = {row["layer"] for row in layers["variants"]["sparse"]["layers"]}
    sparse_layers = {n for n, s in status.items() if s == "sparse"}
    assert sparse_layers and sparse_layers <= mapped  # every sparse conv/linear was found in the trace
    assert "sparse" in result.output and "(not a layer)" in result.output


def test_profile_build_defaults_and_layer_table_off(sample_build):
    result = invoke(sample_build.output, *FAST, "--top", "0")
    assert result.exit_code == 0, result.output
    for batch in ("1", "8", "32"):  # the default batch sizes for a dynamic batch
        assert any(line.split()[:2] == ["sparse", batch] for line in result.output.splitlines()), result.output
    assert "top " not in result.output and "sparse/dense" not in result.output


def test_compare_dense_without_the_source_file(sample_build, tmp_path, model_files):
    source = json.loads((sample_build.output / "manifest.json").read_text())["source"]
    gone = _copy_build(sample_build.output, tmp_path, "gone", source={**source, "path": str(tmp_path / "moved.pt2")})
    one_line_failure(invoke(gone, *FAST, "--compare", "dense"), "--dense MODEL")
    changed = _copy_build(sample_build.output, tmp_path, "changed",
                          source={**source, "path": str(model_files / "static.pt2")})
    one_line_failure(invoke(changed, *FAST, "--compare", "dense"), "SHA-256 differs")
    factory = _copy_build(sample_build.output, tmp_path, "factory",
                          source={"path": "tests.conftest:build_factory", "kind": "factory", "sha256": None})
    one_line_failure(invoke(factory, *FAST, "--compare", "dense"), "--dense MODEL")
    one_line_failure(invoke(gone, *FAST, "--dense", tmp_path / "nothing.pt2"), "does not exist")


def test_dense_option_warns_when_the_file_is_not_the_source(sample_build, tmp_path, model_files):
    source = json.loads((sample_build.output / "manifest.json").read_text())["source"]
    gone = _copy_build(sample_build.output, tmp_path, "gone", source={**source, "path": str(tmp_path / "moved.pt2")})
    other = tmp_path / "other.pt2"
    shutil.copy(model_files / "dynamic.pt2", other)
    with open(other, "ab") as handle:
        handle.write(b"\0")  # same model, different bytes (zip archives tolerate trailing data)
    result = invoke(gone, "--batch", "2", *FAST, "--top", "0", "--dense", other)
    assert result.exit_code == 0, result.output
    assert "warning: --dense" in result.output and "SHA-256 differs" in result.output
    assert "sparse/dense latency" in result.output


def test_torch_backend_on_a_model_file(model_files, tmp_path):
    out = tmp_path / "torch.json"
    result = invoke(model_files / "dynamic.pt2", "--backend", "torch", "--batch", "1,2", *FAST, "--json-out", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["backend"] == "torch" and [v["name"] for v in data["variants"]] == ["dense"]
    threads = data["variants"][0]["threads"]
    assert threads["runtime"] == "torch" and threads["intra_op_num_threads"] == 1
    assert "threads: dense torch intra-op 1" in result.output and "round order" not in result.output
    rows = data["variants"][0]["results"]
    assert [r["batch"] for r in rows] == [1, 2] and all(r["latency_ms"]["p50"] > 0 for r in rows)
    layers = {row["layer"] for row in data["layers"]["variants"]["dense"]["layers"]}
    assert {"conv1", "conv2", "fc1", "fc2"} <= layers
    assert data["layers"]["variants"]["dense"]["profiler"].startswith("torch.profiler")


# --------------------------------------------------------------------------- one-line errors


def test_bad_input_errors(sample_build, tmp_path, model_files):
    build = sample_build.output
    one_line_failure(invoke(tmp_path / "missing", *FAST), "does not exist")
    old = _copy_build(build, tmp_path, "old", version=99)
    one_line_failure(invoke(old, *FAST), "incompatible sparsecompile")
    one_line_failure(invoke(build, "--batch", "1,x", *FAST), "--batch '1,x'")
    one_line_failure(invoke(build, "--runs", "0"), "--runs must be at least 1")
    one_line_failure(invoke(build, "--backend", "nope", *FAST), "valid backends: ort, torch, torch-cuda, tensorrt")
    one_line_failure(invoke(build, "--compare", "sparse", *FAST), "--compare dense")
    one_line_failure(invoke(model_files / "dynamic.pt2", "--compare", "dense", *FAST), "needs a build directory")
    one_line_failure(invoke(build, "--json-out", tmp_path / "no" / "dir.json", *FAST), "does not exist")
    static = _copy_build(build, tmp_path, "static",
                         inputs=[{"name": "x", "dtype": "float32", "shape": [4, 4, 8, 8]}])
    one_line_failure(invoke(static, "--batch", "8", *FAST), "fixed batch of 4")


def test_static_model_file_refuses_other_batches(model_files):
    one_line_failure(invoke(model_files / "static.pt2", "--batch", "8", *FAST), "fixed batch of 4")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device exists here")
def test_gpu_backends_say_what_is_missing(sample_build, model_files):
    one_line_failure(invoke(model_files / "dynamic.pt2", "--backend", "torch-cuda", *FAST), "needs an NVIDIA GPU")
    one_line_failure(invoke(sample_build.output, "--backend", "tensorrt", *FAST), "pip install tensorrt")
    assert "tensorrt" not in sys.modules  # never imported without a CUDA device


def test_plot_without_matplotlib_is_a_clear_error(sample_build, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    one_line_failure(invoke(sample_build.output, *FAST, "--plot", tmp_path / "p.png"), "pip install matplotlib")
    assert not (tmp_path / "p.png").exists()


def test_plot_is_written(sample_build, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "profile.png"
    result = invoke(sample_build.output, "--batch", "1", *FAST, "--plot", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help_lists_the_options():
    result = invoke("--help")
    assert result.exit_code == 0
    for flag in ("--backend", "--batch", "--runs", "--warmup", "--threads", "--compare", "--dense", "--json-out",
                 "--plot", "--input-shape"):
        assert flag in result.output


def test_build_with_the_torch_backend_runs_its_program(sample_build, tmp_path):
    out = tmp_path / "p.json"
    result = invoke(sample_build.output, "--backend", "torch", "--compare", "dense", "--batch", "2", "--json-out", out,
                    *FAST)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [v["name"] for v in data["variants"]] == ["sparse", "dense"]
    assert data["variants"][0]["artifact"].endswith("model.pt2")
    assert all(r["latency_ms"]["p50"] > 0 for v in data["variants"] for r in v["results"])
    assert data["comparison"][0]["numerator"] == "sparse"
