"""Build options: numbers checked for finiteness and range, bad regexes and option combinations refused,
all before any work; options that a build would silently ignore are named (issue 17, should-fix list).

``--max-drop nan`` used to be accepted (every layer went dense with a nonsensical warning); an invalid
``--exclude`` regex and ``--resume`` without ``--checkpoint`` were caught only after 12-31 s of work;
``--target cpu --method hessian --update-weights`` built a dense model without a word.
"""

from __future__ import annotations

import json
import math

import pytest

from sparsecompile.build import BuildOptions, build
from sparsecompile.errors import SparseCompileError

from helpers import cli, one_line_failure

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _refused_before_work(result, *needles):
    one_line_failure(result, *needles)
    assert "loading model" not in result.output, result.output  # no stage started


@pytest.mark.parametrize("option, value", [
    ("--max-drop", "nan"), ("--max-drop", "inf"), ("--max-drop", "-1"),
    ("--max-error", "nan"), ("--auto-time-cap", "nan"),
    ("--permute-budget", "nan"), ("--permute-effort", "nan"),
    ("--time-budget", "nan"), ("--time-budget", "inf"),
])
def test_non_finite_numbers_are_refused_before_any_work(tmp_path, model_files, option, value):
    result = cli("build", model_files / "dynamic.pt2", "--calib", model_files / "calib.npy", "-o", tmp_path / "out",
                  "--method", "gumbel", option, value)
    _refused_before_work(result, option)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("item", ["lr=nan", "tau_end=inf", "lr=-inf"])
def test_non_finite_learn_options_are_refused_before_any_work(tmp_path, model_files, item):
    result = cli("build", model_files / "dynamic.pt2", "--calib", model_files / "calib.npy", "-o", tmp_path / "out",
                  "--method", "gumbel", "--learn-option", item)
    _refused_before_work(result, "--learn-option", item.split("=")[0])


def test_invalid_exclude_regex_is_refused_before_any_work(tmp_path, model_files):
    result = cli("build", model_files / "dynamic.pt2", "-o", tmp_path / "out", "--exclude", "conv(")
    _refused_before_work(result, "--exclude", "conv(")


def test_resume_without_checkpoint_is_refused_before_any_work(tmp_path, model_files):
    result = cli("build", model_files / "dynamic.pt2", "--calib", model_files / "calib.npy", "-o", tmp_path / "out",
                  "--method", "gumbel", "--resume")
    _refused_before_work(result, "--resume", "--checkpoint")
    result = cli("build", model_files / "dynamic.pt2", "--calib", model_files / "calib.npy", "-o", tmp_path / "out",
                  "--method", "gumbel", "--resume", "--checkpoint", tmp_path / "missing.ckpt")
    _refused_before_work(result, "--resume", "missing.ckpt")


@pytest.mark.parametrize("changes, needle", [
    ({"calib_samples": 0}, "--calib-samples"),
    ({"calib_samples": 2.5}, "--calib-samples"),
    ({"min_weights": -1}, "--min-weights"),
    ({"max_steps": -1}, "--max-steps"),
    ({"time_budget": math.nan}, "--time-budget"),
    ({"time_budget": 0.0}, "--time-budget"),
    ({"certify_samples": 0}, "certify_samples"),
    ({"error_samples": 0}, "error_samples"),
    ({"seed": -1}, "--seed"),
    ({"seed": 2 ** 64}, "--seed"),
    ({"seed": 1.5}, "--seed"),
    ({"pattern": (4, 4)}, "--pattern"),
    ({"pattern": (0, 4)}, "--pattern"),
    ({"input_shapes": [(0, 4, 8, 8)]}, "--input-shape"),
    ({"batch": (8, 1, 32)}, "--batch"),
    ({"learn_options": {"lr": math.inf}}, "--learn-option"),
    ({"exclude": ["fc[1"]}, "--exclude"),
    ({"resume": True}, "--checkpoint"),
])
def test_library_build_checks_every_number_first(tmp_path, changes, needle):
    """The same checks through the library API, before even the model path is looked at."""
    options = BuildOptions(model=str(tmp_path / "absent.pt2"), output=str(tmp_path / "out"), **changes)
    with pytest.raises(SparseCompileError) as error:
        build(options)
    assert needle in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_options_a_cpu_build_would_ignore_are_named(tmp_path, model_files):
    """--target cpu chooses no masks: --method/--update-weights/--one-shot did nothing, silently."""
    out = tmp_path / "out"
    result = cli("build", model_files / "dynamic.pt2", "--calib", model_files / "calib.npy", "-o", out,
                  "--target", "cpu", "--method", "hessian", "--update-weights", "--one-shot", "--min-weights", 0)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    ignored = [line for line in warnings if "no effect" in line]
    assert len(ignored) == 1, warnings
    for needle in ("target 'cpu'", "--method hessian", "--update-weights", "--one-shot", "--sparsify"):
        assert needle in ignored[0], ignored[0]
    notes = json.loads((out / "report.json").read_text())["notes"]
    assert any("--method hessian" in note and "no effect" in note for note in notes), notes


def test_learning_options_with_a_heuristic_method_are_named(tmp_path, model_files):
    out = tmp_path / "out"
    result = cli("build", model_files / "dynamic.pt2", "-o", out, "--method", "magnitude", "--max-steps", 10,
                  "--objective", "kl", "--learn-option", "lr=0.1", "--min-weights", 0, "--no-permute")
    assert result.exit_code == 0, result.output
    ignored = [line for line in result.output.splitlines() if line.startswith("warning:") and "no effect" in line]
    assert len(ignored) == 1, result.output
    for needle in ("--max-steps", "--objective", "--learn-option", "--method magnitude", "gumbel"):
        assert needle in ignored[0], ignored[0]
