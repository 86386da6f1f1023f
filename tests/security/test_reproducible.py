"""Reproducible builds (issue 17, item 5): same inputs + options + version => the same bytes.

The channel-permutation search stops on counted work (``--permute-effort``), never on how fast
the machine is; wall time is only a safety cap (``--permute-budget``) that is reported when it
binds. A build's payload (model.onnx, weights.safetensors, model.pt2, engine/, saved masks) is
byte-identical across runs, output directories and torch thread counts.
"""

from __future__ import annotations

import json
import zipfile

import pytest
import torch

import sparsecompile.permutation.search as search_module
from helpers import cli
from sparsecompile.permutation.search import search_permutation


class _SlowClock:
    """``time.perf_counter`` of a machine that is ``step`` seconds slower per call (a busy machine)."""

    def __init__(self, step: float):
        self.step, self.now, self.calls = step, 1000.0, 0

    def perf_counter(self) -> float:
        self.calls += 1
        self.now += self.step
        return self.now


def _scores(rows: int = 64, cols: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).abs()


def test_a_slow_machine_finds_the_same_permutation(monkeypatch):
    """Every stopping rule counts work: a clock 0.1 s per reading slower (~30 simulated seconds for
    this search, ten times the old default budget) changes nothing while the safety cap holds."""
    scores = _scores()
    normal = search_permutation(scores, seed=3)
    clock = _SlowClock(0.1)
    monkeypatch.setattr(search_module, "time", clock)
    slow = search_permutation(scores, seed=3)
    assert clock.calls > 100  # the clock was read and ran far past a few seconds ...
    assert not slow.budget_exhausted and slow.stopped_by != "time cap"  # ... but below the cap
    assert torch.equal(slow.permutation, normal.permutation)
    assert slow.kept_permuted == normal.kept_permuted
    assert slow.rounds == normal.rounds and slow.work == normal.work


def test_the_effort_limit_is_deterministic(monkeypatch):
    """A search cut short by ``max_work`` stops at the same point whatever the clock says."""
    scores = _scores(512, 128, seed=1)  # converges after ~10M scores
    first = search_permutation(scores, seed=0, max_work=1_000_000)
    assert first.stopped_by == "effort" and not first.budget_exhausted
    assert first.kept_permuted > first.kept_plain and first.work >= 1_000_000
    monkeypatch.setattr(search_module, "time", _SlowClock(0.2))
    second = search_permutation(scores, seed=0, max_work=1_000_000, budget_s=1e6)
    assert torch.equal(first.permutation, second.permutation)
    assert (first.work, first.rounds, second.stopped_by) == (second.work, second.rounds, "effort")


def test_the_time_cap_when_hit_is_reported(monkeypatch):
    monkeypatch.setattr(search_module, "time", _SlowClock(10.0))
    result = search_permutation(_scores(), seed=0, budget_s=60.0)
    assert result.budget_exhausted and result.stopped_by == "time cap"
    assert result.kept_permuted >= result.kept_plain


def test_the_build_reports_a_hit_time_cap(model_files, tmp_path, monkeypatch):
    """A build whose search hit --permute-budget says so: a warning, report.json, inspect."""
    monkeypatch.setattr(search_module, "time", _SlowClock(50.0))
    out = tmp_path / "capped"
    result = cli("build", model_files / "dynamic.pt2", "-o", out, "--calib", model_files / "calib.npy",
                 "--min-weights", "0", "--permute-budget", "20")
    assert result.exit_code == 0, result.output
    assert "time cap" in result.output and "--permute-budget" in result.output
    report = json.loads((out / "report.json").read_text())
    searched = [g for g in report["permutation"]["groups"] if "stopped_by" in g]
    assert searched and all(g["stopped_by"] == "time cap" and g["budget_exhausted"] for g in searched)
    assert report["permutation"]["time_cap_hit"] == len(searched)
    assert any("--permute-budget" in note and "not reproducible" in note for note in report["notes"])
    shown = cli("inspect", out)
    assert shown.exit_code == 0, shown.output
    assert "time cap" in shown.output


# --------------------------------------------------------------------------- whole builds

PAYLOAD = ("model.onnx", "weights.safetensors", "model.pt2")


def _build(model_files, out, masks, threads: int | None = None):
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        result = cli("build", model_files / "dynamic.pt2", "-o", out, "--calib", model_files / "calib.npy",
                     "--min-weights", "0", "--seed", "4", "--save-masks", masks)
    finally:
        torch.set_num_threads(previous)
    assert result.exit_code == 0, result.output
    return json.loads((out / "manifest.json").read_text())


def test_two_builds_give_the_same_bytes(model_files, tmp_path):
    first = _build(model_files, tmp_path / "one" / "build", tmp_path / "one.masks")
    second = _build(model_files, tmp_path / "two" / "other-name", tmp_path / "two.masks", threads=1)
    report = json.loads((tmp_path / "one" / "build" / "report.json").read_text())
    assert report["permutation"]["permuted_groups"] > 0  # the search really ran
    assert report["options"]["permute_effort"] == 60.0 and report["permutation"]["time_cap_hit"] == 0
    assert {g.get("stopped_by") for g in report["permutation"]["groups"]} <= {"converged", None}
    for name in PAYLOAD:
        a = (tmp_path / "one" / "build" / name).read_bytes()
        b = (tmp_path / "two" / "other-name" / name).read_bytes()
        assert a == b, f"{name} differs between two identical builds"
    assert (tmp_path / "one.masks").read_bytes() == (tmp_path / "two.masks").read_bytes()
    # every hashed file except the reports (timings, creation time) has the same hash
    payload = {k: v for k, v in first["files"].items() if not k.startswith("report.")}
    assert set(PAYLOAD) <= set(payload) and any(k.startswith("engine/") for k in payload)
    assert payload == {k: v for k, v in second["files"].items() if not k.startswith("report.")}


def test_saved_program_has_no_run_specific_ids(model_files, tmp_path):
    """model.pt2 carried a random serialization id and Python object ids (graph_id) per build."""
    _build(model_files, tmp_path / "b", tmp_path / "b.masks")
    with zipfile.ZipFile(tmp_path / "b" / "model.pt2") as archive:
        names = archive.namelist()
        ids = [archive.read(n) for n in names if n.endswith(".data/serialization_id")]
        program = b"".join(archive.read(n) for n in names if n.endswith(".json"))
    assert all(set(i.decode()) <= set("0123456789") for i in ids)
    assert b'\\"graph_id\\": 1' not in program and b'"graph_id": 1' not in program
    torch.export.load(tmp_path / "b" / "model.pt2")  # still a valid program


@pytest.mark.parametrize("threads", [1, 3])
def test_search_does_not_depend_on_the_thread_count(threads):
    """Decisions are made on sums whose rounding does not depend on how torch splits the work."""
    scores = _scores(2048, 64, seed=5)  # tall: reductions large enough for torch to use threads
    # No wall-time cap: on a loaded machine it could end one search early, which is not what this tests.
    reference = search_permutation(scores, seed=1, budget_s=float("inf"))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        other = search_permutation(scores, seed=1, budget_s=float("inf"))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(reference.permutation, other.permutation)
    assert reference.kept_permuted == other.kept_permuted


@pytest.mark.parametrize("flag,value", [("--permute-effort", "0"), ("--permute-effort", "-1"),
                                        ("--permute-budget", "0")])
def test_permute_limits_must_be_positive(model_files, tmp_path, flag, value):
    result = cli("build", model_files / "dynamic.pt2", "-o", tmp_path / "x", flag, value)
    assert result.exit_code != 0 and flag in result.output
    assert not (tmp_path / "x").exists()
