"""``sparsecompile profile``: statistics, interleaving, the per-layer map, the CLI and its one-line errors."""

from __future__ import annotations

import json
import math
import shutil
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sparsecompile.backends.base import Runner
from sparsecompile.cli import main
from sparsecompile.errors import SparseCompileError
from sparsecompile.profile import (
    SCHEMA,
    OtherLoad,
    RssMeter,
    Variant,
    bootstrap_ratio,
    check_batch,
    latency_stats,
    measure_interleaved,
    noise_reasons,
    parse_batches,
    profile_command,
    random_inputs,
)
from helpers import one_line_failure

if "profile" not in main.commands:  # cli.py registers it in the packaged CLI; make sure the tests see it
    main.add_command(profile_command)

FAST = ["--runs", "5", "--warmup", "1", "--threads", "1"]


def invoke(*args):
    return CliRunner().invoke(main, ["profile", *[str(a) for a in args]], catch_exceptions=False)




def _copy_build(build_dir, tmp_path, name="copy", **manifest_changes):
    copy = tmp_path / name
    shutil.copytree(build_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for key, value in manifest_changes.items():
        manifest[key] = value
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


# --------------------------------------------------------------------------- statistics


def test_latency_stats_on_known_values():
    stats = latency_stats(np.arange(1, 102, dtype=float))  # 1..101
    assert stats["n"] == 101
    assert stats["p50"] == 51 and stats["p90"] == 91 and stats["p99"] == 100
    assert stats["min"] == 1 and stats["max"] == 101 and stats["mean"] == 51
    assert stats["mad"] == 25  # median of |x - 51| over 1..101
    assert latency_stats([2.0, 2.0, 2.0])["mad"] == 0


def test_noise_flags():
    quiet = latency_stats(np.full(100, 10.0) + np.linspace(0, 0.5, 100))
    assert noise_reasons(quiet) == []
    spiky = latency_stats(np.r_[np.full(80, 10.0), np.full(20, 20.0)])  # p90 = 20 -> p90/p50 = 2
    assert any("p90/p50" in r for r in noise_reasons(spiky))
    spread = latency_stats(np.linspace(5, 15, 101))  # MAD/median = 2.5/10
    assert any("MAD/median" in r for r in noise_reasons(spread))


def _paired_series(n, seed, true_ratio=0.8):
    rng = np.random.default_rng(seed)
    drift = 1.0 + 0.5 * np.sin(np.linspace(0, 6, n))  # the machine slows down and speeds up for both
    dense = 10.0 * drift * rng.lognormal(0.0, 0.1, n)
    sparse = true_ratio * 10.0 * drift * rng.lognormal(0.0, 0.1, n)
    return sparse, dense


def test_bootstrap_interval_contains_true_ratio_and_narrows():
    widths = {}
    for n in (40, 1000):
        sparse, dense = _paired_series(n, seed=n)
        result = bootstrap_ratio(sparse, dense, resamples=1000, seed=1)
        assert result["ci_low"] <= 0.8 <= result["ci_high"], (n, result)
        assert result["ci_low"] <= result["ratio"] <= result["ci_high"]
        widths[n] = result["ci_high"] - result["ci_low"]
    assert widths[1000] < widths[40] / 3
    # Over many synthetic runs a 95% interval misses the truth rarely (not never).
    misses = 0
    for seed in range(40):
        sparse, dense = _paired_series(60, seed=100 + seed)
        r = bootstrap_ratio(sparse, dense, resamples=400, seed=seed)
        misses += not (r["ci_low"] <= 0.8 <= r["ci_high"])
    assert misses <= 6
    with pytest.raises(ValueError):
        bootstrap_ratio([1.0, 2.0], [1.0])


def test_parse_batches():
    assert parse_batches("1,8,32") == [1, 8, 32]
    assert parse_batches(" 4, 4 ,2") == [4, 2]
    assert parse_batches(None) is None
    for bad in ("1,x", "", "0", "-1,2", "1.5"):
        with pytest.raises(SparseCompileError, match="--batch"):
            parse_batches(bad)


def test_inputs_follow_specs_and_fixed_batches_are_refused():
    specs = [{"name": "x", "dtype": "float32", "shape": ["batch", 3, 4]},
             {"name": "ids", "dtype": "int64", "shape": ["batch", 5]}]
    x, ids = random_inputs(specs, 6, seed=3)
    assert x.shape == (6, 3, 4) and x.dtype == np.float32 and ids.shape == (6, 5) and ids.dtype == np.int64
    again = random_inputs(specs, 6, seed=3)
    assert np.array_equal(x, again[0])  # seeded
    check_batch(specs, 17, "the build")
    static = [{"name": "x", "dtype": "float32", "shape": [4, 3]}]
    check_batch(static, 4, "the build")
    with pytest.raises(SparseCompileError, match="fixed batch of 4.*--batch 8"):
        check_batch(static, 8, "the build")


class _Recorder(Runner):
    def __init__(self, name, log):
        self.name, self.log = name, log

    def load(self):
        return self

    def infer(self, inputs):
        self.log.append(self.name)


def test_variants_are_interleaved():
    log: list[str] = []
    variants = [Variant(name=n, artifact=n, specs=[], loader=lambda n=n: _Recorder(n, log)) for n in ("A", "B")]
    for variant in variants:
        variant.load()
    samples = measure_interleaved(variants, {"A": [], "B": []}, runs=4, warmup=2)
    warm, timed = log[:4], log[4:]
    assert sorted(warm) == ["A", "A", "B", "B"] and warm[0] == warm[1]  # each variant warmed up in a row
    rounds = [timed[i:i + 2] for i in range(0, len(timed), 2)]
    assert len(rounds) == 4
    assert all(sorted(r) == ["A", "B"] for r in rounds)  # every round runs each variant once
    assert [r[0] for r in rounds] in (["A", "B"] * 2, ["B", "A"] * 2)  # and the first one alternates
    assert rounds[0][0] == warm[-1]  # the warm-up ends with the variant the first round starts with
    assert [len(samples["A"]), len(samples["B"])] == [4, 4]
    assert all(s >= 0 for s in samples["A"] + samples["B"])

    log.clear()
    three = variants + [Variant(name="C", artifact="C", specs=[], loader=lambda: _Recorder("C", log))]
    three[2].load()
    measure_interleaved(three, {"A": [], "B": [], "C": []}, runs=6, warmup=0)
    rounds = [tuple(log[i:i + 3]) for i in range(0, len(log), 3)]
    assert len(set(rounds)) == 6  # all 3! orderings, once each


def test_memory_and_load_probes():
    meter = RssMeter()
    meter.start()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    growth = meter.peak_growth_mb()
    del block
    if growth is not None:  # Linux
        assert 50 < growth < 200
    with OtherLoad() as load:
        sum(range(200_000))
    assert load.value is None or load.value >= 0


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
