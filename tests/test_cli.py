"""The command line: help, one-line errors with non-zero exits, inspect and run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from helpers import cli as invoke, one_line_failure

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




@pytest.mark.parametrize("command", [[], ["build"], ["inspect"], ["run"]])
def test_help_reads_well(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0
    assert "Usage:" in result.output
    if command == ["build"]:
        for flag in ("--target", "--calib", "--exclude", "--trust-pickle", "--lower-conv", "--input-shape"):
            assert flag in result.output




def test_build_errors_are_one_line(tmp_path, model_files):
    one_line_failure(invoke("build", tmp_path / "missing.pt2", "-o", tmp_path / "o"), "does not exist")
    one_line_failure(invoke("build", model_files / "dynamic.pt2", "-o", tmp_path / "o", "--target", "v100"),
                    "valid targets")
    one_line_failure(invoke("build", model_files / "pickled.pt", "-o", tmp_path / "o", "--input-shape", "1,4,8,8"),
                    "--trust-pickle")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("x")
    one_line_failure(invoke("build", model_files / "dynamic.pt2", "-o", tmp_path / "taken"), "--force")
    assert not (tmp_path / "o").exists()


def test_build_inspect_run(tmp_path, model_files):
    out = tmp_path / "b"
    result = invoke("build", model_files / "dynamic.pt2", "-o", out, "--calib", model_files / "calib.npy",
                    "--min-weights", "0", "--exclude", "zz_nothing")
    assert result.exit_code == 0, result.output
    assert "warning: --exclude 'zz_nothing' matches no layer" in result.output
    assert "top-1 agreement" in result.output
    assert re.search(r"wrote .* in [0-9.]+s, peak memory [0-9]+ MiB", result.output)
    resources = json.loads((out / "report.json").read_text())["resources"]
    assert resources["peak_rss_mib"] > 50 and resources["seconds"] > 0 and resources["torch_threads"] >= 1

    shown = invoke("inspect", out)
    assert shown.exit_code == 0
    assert "conv2" in shown.output and "sparse" in shown.output and "kept |w|" in shown.output
    assert '"layers"' in invoke("inspect", out, "--json").output

    x = np.load(model_files / "calib.npy")[:5]
    np.save(tmp_path / "x.npy", x)
    ran = invoke("run", out, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy")
    assert ran.exit_code == 0, ran.output
    y = np.load(tmp_path / "y.npy")
    assert y.shape == (5, 10)

    import torch

    from sparsecompile.frontend import load_model
    from sparsecompile.build import BuildOptions, build as run_build  # noqa: F401 - library and CLI agree
    reference = load_model(model_files / "dynamic.pt2").module
    dense = reference(torch.from_numpy(x)).detach().numpy()
    assert not np.allclose(y, dense)  # the sparse model really differs from the dense one
    assert (y.argmax(1) == dense.argmax(1)).mean() >= 0.2


def test_run_rejects_bad_inputs(tmp_path, sample_build):
    out = sample_build.output
    np.save(tmp_path / "f64.npy", np.zeros((2, 4, 8, 8)))
    one_line_failure(invoke("run", out, "--input", tmp_path / "f64.npy"), "must be float32")
    np.save(tmp_path / "shape.npy", np.zeros((2, 3, 8, 8), np.float32))
    one_line_failure(invoke("run", out, "--input", tmp_path / "shape.npy"), "must have shape")
    one_line_failure(invoke("run", tmp_path, "--input", tmp_path / "shape.npy"), "not a complete sparsecompile build")
    one_line_failure(invoke("inspect", tmp_path / "nope"), "does not exist")


def test_inspect_rejects_other_versions(tmp_path, sample_build):
    import json
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(sample_build.output, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    one_line_failure(invoke("inspect", copy), "incompatible")


def test_real_process_exit_code_and_stderr(tmp_path):
    """The installed entry point: exit status 1, one line on stderr, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "sparsecompile", "build", str(tmp_path / "nope.pt2"), "-o", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error:")


def test_usage_errors_exit_2_as_the_readme_says(tmp_path):
    """Errors sparsecompile finds exit 1; a malformed command line is click's usage error, status 2."""
    for args in (("build", "--no-such-flag"), ("inspect",), ("profile", tmp_path, "--runs", "many")):
        result = invoke(*args)
        assert result.exit_code == 2 and "Usage:" in result.output, result.output
    readme = open(os.path.join(REPO, "README.md")).read()
    assert "exits with status 2" in readme and "exit with status 1" in readme


def test_threads_are_set_for_the_build_recorded_and_restored(tmp_path, model_files, monkeypatch):
    import torch

    from sparsecompile import build as build_module

    seen = []
    original = build_module._build

    def spy(options, progress=None):
        seen.append(torch.get_num_threads())
        return original(options, progress)

    monkeypatch.setattr(build_module, "_build", spy)
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    out = tmp_path / "t"
    result = invoke("build", model_files / "dynamic.pt2", "-o", out, "--min-weights", "0", "--threads", str(wanted))
    assert result.exit_code == 0, result.output
    assert seen == [wanted] and torch.get_num_threads() == before
    assert json.loads((out / "report.json").read_text())["resources"]["torch_threads"] == wanted
    refused = invoke("build", model_files / "dynamic.pt2", "-o", tmp_path / "u", "--threads", "0")
    assert refused.exit_code == 2 and "--threads" in refused.output
