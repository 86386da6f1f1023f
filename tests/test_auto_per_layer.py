"""--method auto's per-layer choice: each layer may take the mask of another good candidate, kept only if it helps."""

from __future__ import annotations

import pytest

from sparsecompile import build as build_module
from sparsecompile.build import BuildOptions, build
from sparsecompile.report import summary_lines

from helpers import two_branch_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def two_branch(tmp_path_factory):
    """Two eligible layers that need different methods (``helpers.two_branch_model``): ``magnitude`` breaks one
    and ``activation`` the other."""
    return two_branch_model(tmp_path_factory.mktemp("two_branch"))


def _build(two_branch, tmp_path, name, monkeypatch, methods=("magnitude", "activation"), **kwargs):
    model, calib = two_branch
    monkeypatch.setattr(build_module, "AUTO_METHODS", methods)  # the candidates whose masks can be mixed
    kwargs.setdefault("correct", "bias")
    kwargs.setdefault("per_layer", True)  # opt-in (--per-layer)
    return build(BuildOptions(model=str(model), calib=str(calib), output=str(tmp_path / name), min_weights=1000,
                              permute=False, **kwargs)).report


def test_per_layer_mix_keeps_every_layer_sparse_where_each_single_method_breaks_one(two_branch, tmp_path,
                                                                                   monkeypatch):
    report = _build(two_branch, tmp_path, "mix", monkeypatch)
    choice = report["method_choice"]
    scores = {t["method"]: t["score"] for t in choice["tried"]}
    assert scores["magnitude"] > 1 and scores["activation"] > 1  # each single candidate is over budget
    mix = choice["per_layer"]
    assert mix["adopted"] and mix["score"] < min(scores.values()) and mix["score"] <= 1.0
    assert mix["layers_from"] == {"activation --correct bias": 1, "magnitude --correct bias": 1}
    assert report["method"] == "per-layer" and choice["chosen"]["per_layer"] == mix["layers_from"]
    assert "update_weights" not in choice["chosen"]  # neither candidate updated weights
    # Both layers stay sparse: the guard had nothing to restore, and the shipped damage is the mix's.
    assert report["summary"]["sparse_layers"] == 2 and report["budget"]["reverted"] == []
    assert report["verification"]["damage"]["within_budget"]
    layers = {r["name"]: r for r in report["layers"]}
    assert layers["a"]["status"] == "sparse" and layers["b"]["status"] == "sparse"
    assert any("per layer among the best of 2 candidates" in line for line in summary_lines(report))


def test_without_the_per_layer_choice_the_guard_restores_a_layer(two_branch, tmp_path, monkeypatch):
    """The default (no --per-layer): the best single candidate, then the guard."""
    model, calib = two_branch
    monkeypatch.setattr(build_module, "AUTO_METHODS", ("magnitude", "activation"))
    report = build(BuildOptions(model=str(model), calib=str(calib), output=str(tmp_path / "single"),
                                min_weights=1000, permute=False, correct="bias")).report
    assert "per_layer" not in report["method_choice"] and report["method"] in ("magnitude", "activation")
    assert len(report["budget"]["reverted"]) >= 1 and report["summary"]["sparse_layers"] <= 1


def test_the_mix_is_not_adopted_when_every_layer_prefers_the_best_candidate(two_branch, tmp_path, monkeypatch):
    """Two candidates with the very same masks: every layer ties, ties keep the best candidate's mask, so there is
    nothing to mix; the guard then restores layers as without the per-layer choice."""
    report = _build(two_branch, tmp_path, "same", monkeypatch, methods=("magnitude", "magnitude"))
    mix = report["method_choice"]["per_layer"]
    assert not mix["adopted"] and "best candidate's mask" in mix["why"] and report["method"] == "magnitude"
    assert len(report["budget"]["reverted"]) >= 1


def test_only_candidates_with_the_best_ones_correction_are_mixed(two_branch, tmp_path, monkeypatch):
    """Masks chosen for a bias-corrected layer break it without the correction: with --correct auto both
    corrections are tried, and the mix draws only on candidates with the winner's."""
    report = _build(two_branch, tmp_path, "corrections", monkeypatch, correct="auto")
    choice = report["method_choice"]
    assert {t["correct"] for t in choice["tried"]} == {"bias", "none"}
    best = min(choice["tried"], key=lambda t: (t["score"], t["relative_error"]))
    assert best["score"] > 1 and "per_layer" in choice
    suffix = f"--correct {best['correct']}"
    assert choice["per_layer"]["candidates"] and all(name.endswith(suffix)
                                                     for name in choice["per_layer"]["candidates"])


def test_no_per_layer_choice_when_the_best_candidate_is_within_budget(two_branch, tmp_path, monkeypatch):
    report = _build(two_branch, tmp_path, "hessian", monkeypatch, methods=("magnitude", "activation", "hessian"),
                    update_weights=False)
    choice = report["method_choice"]
    assert min(t["score"] for t in choice["tried"]) <= 1.0 and "per_layer" not in choice
    assert report["method"] == "hessian" and report["summary"]["sparse_layers"] == 2
