"""--method auto --auto-learned: learned masks as one more candidate when every heuristic is over budget."""

from __future__ import annotations

import pytest

from sparsecompile import build as build_module
from sparsecompile.build import BuildOptions, build
from sparsecompile.report import summary_lines

from helpers import cli, one_line_failure, two_branch_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def two_branch(tmp_path_factory):
    """``magnitude`` breaks one layer and ``activation`` the other: every heuristic candidate is over budget."""
    return two_branch_model(tmp_path_factory.mktemp("two_branch_learned"))


def _build(two_branch, tmp_path, name, monkeypatch, **kwargs):
    model, calib = two_branch
    monkeypatch.setattr(build_module, "AUTO_METHODS", ("magnitude", "activation"))
    kwargs.setdefault("correct", "bias")
    return build(BuildOptions(model=str(model), calib=str(calib), output=str(tmp_path / name), min_weights=1000,
                              permute=False, **kwargs)).report


def test_learned_candidate_starts_from_the_best_heuristic_and_wins_when_it_measures_better(two_branch, tmp_path,
                                                                                          monkeypatch):
    report = _build(two_branch, tmp_path, "learned", monkeypatch, auto_learned="gumbel", max_steps=60)
    choice = report["method_choice"]
    heuristics = [t for t in choice["tried"] if not t.get("learned")]
    learned = [t for t in choice["tried"] if t.get("learned")]
    assert [t["method"] for t in heuristics] == ["magnitude", "activation"]
    assert all(t["score"] > 1 for t in heuristics)  # every heuristic over budget: the learned one is tried
    (entry,) = learned
    best = min(heuristics, key=lambda t: (t["score"], t["relative_error"]))
    # Gumbel's logits start on the best heuristic's masks, learned under its statistics correction.
    assert entry["method"] == "gumbel" and entry["init"] == best["method"] == "activation"
    assert entry["correct"] == "bias" and entry["from"] == "activation --correct bias"
    assert entry["steps"] > 0 and entry["score"] is not None and entry["seconds"] > 0
    # Measured on this model: the learned masks change fewer held-back predictions than either heuristic's.
    assert entry["score"] < best["score"]
    assert report["method"] == "gumbel" and choice["chosen"] == {"method": "gumbel", "correct": "bias",
                                                                 "learned": True}
    assert report["learning"]["steps"] == entry["steps"] and report["learning"]["options"]["init"] == "activation"
    assert "learning" not in choice  # the learning record moved to the report's own field
    assert any("chosen by --method auto --auto-learned with --correct bias: learned masks did less damage than the "
               "other 2 candidates" in line for line in summary_lines(report))


def test_learned_candidate_that_measures_worse_is_not_kept(two_branch, tmp_path, monkeypatch):
    # Two steps at a negligible learning rate cannot move the logits: the learned masks are the init's, so the
    # score ties the best heuristic's, and a tie keeps the heuristic (the cheaper candidate).
    report = _build(two_branch, tmp_path, "tie", monkeypatch, auto_learned="gumbel", max_steps=2,
                    learn_options={"lr": 1e-12})
    choice = report["method_choice"]
    entry = next(t for t in choice["tried"] if t.get("learned"))
    best = next(t for t in choice["tried"] if t["method"] == "activation")
    assert entry["score"] == best["score"]
    assert report["method"] == "activation" and "learned" not in choice["chosen"]
    assert report["learning"] is None


def test_learned_candidate_is_skipped_when_a_heuristic_is_within_budget(two_branch, tmp_path, monkeypatch):
    report = _build(two_branch, tmp_path, "within", monkeypatch, auto_learned="gumbel", max_drop=100.0)
    choice = report["method_choice"]
    entry = next(t for t in choice["tried"] if t.get("learned"))
    assert entry["skipped"].startswith("not needed: ") and "within the budget" in entry["skipped"]
    assert report["method"] in ("magnitude", "activation") and report["learning"] is None


def test_without_auto_learned_an_over_budget_auto_build_names_the_flag(two_branch, tmp_path, monkeypatch):
    model, calib = two_branch
    monkeypatch.setattr(build_module, "AUTO_METHODS", ("magnitude", "activation"))
    result = cli("build", model, "--calib", calib, "-o", tmp_path / "hint", "--min-weights", 1000, "--no-permute",
                 "--correct", "bias")
    assert result.exit_code == 0, result.output
    assert "every candidate is over the budget" in result.output and "--auto-learned gumbel" in result.output


def test_auto_learned_outside_auto_warns_that_it_has_no_effect(two_branch, tmp_path):
    model, calib = two_branch
    result = cli("build", model, "--calib", calib, "-o", tmp_path / "named", "--min-weights", 1000, "--no-permute",
                 "--method", "magnitude", "--auto-learned", "gumbel", "--max-drop", "none")
    assert result.exit_code == 0, result.output
    assert "--auto-learned gumbel only adds a candidate to --method auto" in result.output


def test_unknown_auto_learned_method_is_one_line_error(two_branch, tmp_path):
    model, calib = two_branch
    with pytest.raises(build_module.SparseCompileError, match="unknown --auto-learned 'hessian'; valid: gumbel, "):
        build(BuildOptions(model=str(model), calib=str(calib), output=str(tmp_path / "bad"), auto_learned="hessian"))
    assert not (tmp_path / "bad").exists()


def test_bad_learn_option_with_auto_learned_fails_before_the_candidates(two_branch, tmp_path):
    model, calib = two_branch
    result = cli("build", model, "--calib", calib, "-o", tmp_path / "lr", "--min-weights", 1000, "--no-permute",
                 "--auto-learned", "gumbel", "--learn-option", "lr=0")
    one_line_failure(result, "lr must be > 0")
    assert "auto: magnitude" not in result.output  # no candidate was built first
    assert not (tmp_path / "lr").exists()
