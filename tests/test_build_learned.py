"""--method gumbel / proxsparse through the whole build (the learning itself: tests/learned/)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsecompile.build import BuildOptions, build
from sparsecompile.cli import _key_values, main
from sparsecompile.errors import SparseCompileError
from sparsecompile.progress import Progress

from helpers import cli


def _options(model_files, tmp_path, name, **kwargs):
    return BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / name), min_weights=0,
                        calib=str(model_files / "calib.npy"), permute=False, **kwargs)


@pytest.mark.parametrize("method", ["gumbel", "proxsparse"])
def test_learned_build_keeps_weights_and_records_learning(tmp_path, model_files, method):
    """--correct none: the weights stay bit for bit (the default, auto, corrects: see the next test)."""
    result = build(_options(model_files, tmp_path, method, method=method, max_steps=6, correct="none"))
    report = result.report
    assert report["method"] == method and report["options"]["correct"] == "none"
    learning = report["learning"]
    assert learning["method"] == method and 0 < learning["steps"] <= 6
    assert learning["stop_reason"] in ("max_steps", "early_stopping", "time_budget")
    assert learning["correct_in_loop"] == "none"
    sparse = [r for r in report["layers"] if r["status"] == "sparse"]
    assert sparse and all(r["kept_weights"] == "unchanged" for r in sparse)  # the build checks bit-identity


@pytest.mark.parametrize("correct, effective", [("bias", "bias"), ("bn", "bn"), ("auto", "bias")])
def test_a_learned_method_learns_under_the_correction_it_gets(tmp_path, model_files, correct, effective):
    """--correct bias|bn (auto: bias, as for the heuristics): the masks are learned under that correction,
    which the build then applies."""
    result = build(_options(model_files, tmp_path, correct, method="gumbel", max_steps=4, correct=correct))
    report = result.report
    assert report["options"]["correct"] == effective and report["learning"]["correct_in_loop"] == effective
    corrected = [r for r in report["layers"] if r.get("correction")]
    assert corrected and all(r["correction"]["mode"] == effective for r in corrected)
    assert all(r["kept_weights"] != "unchanged" for r in corrected)  # said, not hidden


def test_loop_options_reach_the_learning(tmp_path, model_files):
    result = build(_options(model_files, tmp_path, "c", method="gumbel", max_steps=4,
                            learn_options={"feature_weight": 0.5, "lr": 0.2, "patience": "none", "init_logit": 4.0}))
    learning = result.report["learning"]
    assert learning["feature_weight"] == 0.5 and learning["steps"] == 4
    assert learning["options"] == {"feature_weight": 0.5, "lr": 0.2, "patience": "none", "init_logit": 4.0}
    plain = build(_options(model_files, tmp_path, "p", method="gumbel", max_steps=4, learn_options={"feature_weight": 0}))
    assert plain.report["learning"]["feature_weight"] == 0


def test_gumbel_init_from_hessian_masks_starts_at_the_hessian_build(tmp_path, model_files):
    """init=hessian: the logits start on the masks a --method hessian --correct none build picks."""
    from sparsecompile.masks.saved import load_masks

    build(_options(model_files, tmp_path, "h", method="hessian", correct="none",
                   save_masks=str(tmp_path / "h.safetensors")))
    learned = build(_options(model_files, tmp_path, "g", method="gumbel", max_steps=0,
                             learn_options={"init": "hessian"}, save_masks=str(tmp_path / "g.safetensors")))
    build(_options(model_files, tmp_path, "m", method="magnitude", correct="none",
                   save_masks=str(tmp_path / "m.safetensors")))
    assert learned.report["learning"]["options"] == {"init": "hessian"}
    want, got = load_masks(tmp_path / "h.safetensors").masks, load_masks(tmp_path / "g.safetensors").masks
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    other = load_masks(tmp_path / "m.safetensors").masks
    assert any(not torch.equal(want[k], other[k]) for k in want)  # the test can tell the inits apart


def test_learned_bad_input(tmp_path, model_files):
    with pytest.raises(SparseCompileError, match="learns from data: pass --calib"):
        build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / "a"), method="gumbel",
                           min_weights=0, permute=False))
    with pytest.raises(SparseCompileError, match="--resume needs --checkpoint"):
        build(_options(model_files, tmp_path, "b", method="gumbel", resume=True))
    np.save(tmp_path / "labels.npy", np.zeros(3, dtype=np.int64))
    with pytest.raises(SparseCompileError, match="one integer label per calibration sample"):
        build(_options(model_files, tmp_path, "c", method="gumbel", labels=str(tmp_path / "labels.npy")))
    with pytest.raises(SparseCompileError, match="unknown gumbel option.*training-loop options: feature_weight"):
        build(_options(model_files, tmp_path, "d", method="gumbel", max_steps=2, learn_options={"nope": 1}))
    with pytest.raises(SparseCompileError, match="feature_weight must be"):
        build(_options(model_files, tmp_path, "e", method="gumbel", max_steps=2, learn_options={"feature_weight": -1}))
    with pytest.raises(SparseCompileError, match="--learn-option lr must be a number, got 'fast'"):
        build(_options(model_files, tmp_path, "f", method="gumbel", max_steps=2, learn_options={"lr": "fast"}))
    with pytest.raises(SparseCompileError, match="--learn-option batch_size must be a whole number, got 16.5"):
        build(_options(model_files, tmp_path, "g", method="gumbel", max_steps=2, learn_options={"batch_size": 16.5}))
    with pytest.raises(SparseCompileError, match="gumbel option tau_end must be a number, got 'cold'$"):
        build(_options(model_files, tmp_path, "h", method="gumbel", max_steps=2, learn_options={"tau_end": "cold"}))
    with pytest.raises(SparseCompileError, match="proxsparse option alm_max_iter must be a whole number"):
        build(_options(model_files, tmp_path, "i", method="proxsparse", max_steps=2,
                       learn_options={"alm_max_iter": 2.5}))
    for name in "abcdefghi":
        assert not (tmp_path / name).exists()


def test_checkpoint_and_resume_give_the_same_masks(tmp_path, model_files):
    from sparsecompile.masks.saved import load_masks

    ckpt = tmp_path / "learn.ckpt"
    build(_options(model_files, tmp_path, "first", method="gumbel", max_steps=8, checkpoint=str(ckpt),
                   save_masks=str(tmp_path / "first.safetensors")))
    assert ckpt.exists()
    again = build(_options(model_files, tmp_path, "again", method="gumbel", max_steps=8, checkpoint=str(ckpt),
                           resume=True, save_masks=str(tmp_path / "again.safetensors")))
    assert again.report["learning"]["steps"] == 8
    first, second = load_masks(tmp_path / "first.safetensors"), load_masks(tmp_path / "again.safetensors")
    assert all((first.masks[k] == second.masks[k]).all() for k in first.masks)


def test_whole_number_options_given_as_floats_are_taken(tmp_path, model_files):
    result = build(_options(model_files, tmp_path, "w", method="gumbel", max_steps=2,
                            learn_options={"batch_size": 16.0, "eval_every": 1.0}))
    assert result.report["learning"]["steps"] == 2


def test_learn_option_parsing_and_cli(tmp_path, model_files):
    assert _key_values(["init=random", "tau_end=0.05", "steps=3"], "--learn-option") == {
        "init": "random", "tau_end": 0.05, "steps": 3}
    result = cli("build", str(model_files / "dynamic.pt2"), "-o", str(tmp_path / "o"),
                 "--method", "gumbel", "--learn-option", "oops")
    assert result.exit_code == 2 and "KEY=VALUE" in result.output
    result = cli("build", str(model_files / "dynamic.pt2"), "-o", str(tmp_path / "o"),
                 "--calib", str(model_files / "calib.npy"), "--method", "gumbel",
                 "--max-steps", "2", "--learn-option", "batch_size=16.5")
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1] == (
        "error: --learn-option batch_size must be a whole number, got 16.5")
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


def test_torchrun_build_with_two_gloo_ranks(tmp_path, model_files):
    """torchrun, 2 CPU processes: both learn (gradients averaged), rank 0 alone writes the build.

    On failure the message holds both ranks' logs (torchrun --tee), since a dying rank's own stderr
    is what tells why.
    """
    import json
    import subprocess
    import sys

    out = tmp_path / "ddp"
    logs = tmp_path / "logs"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "--tee", "3", "--log-dir", str(logs), "-m", "sparsecompile", "build", str(model_files / "dynamic.pt2"), "-o", str(out),
               "--calib", str(model_files / "calib.npy"), "--method", "gumbel", "--max-steps", "4",
               "--min-weights", "0", "--no-permute", "--learn-option", "init=hessian"]  # masks broadcast
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    ranks = "\n".join(f"--- {path.relative_to(logs)}\n{path.read_text(errors='replace')[-3000:]}"
                      for path in sorted(logs.rglob("*.log")))
    assert result.returncode == 0, result.stderr[-2000:] + "\n" + ranks
    assert result.stdout.count("wrote ") == 1  # one rank reports and writes
    report = json.loads((out / "report.json").read_text())
    assert report["learning"]["data_parallel_ranks"] == 2 and report["learning"]["steps"] == 4
    assert report["learning"]["options"] == {"init": "hessian"}


def test_cli_and_library_share_the_learning_defaults():
    from sparsecompile.learned import TrainConfig

    (param,) = [p for p in main.commands["build"].params if p.name == "max_steps"]
    assert param.default == BuildOptions().max_steps == TrainConfig().max_steps


class _CountingProgress(Progress):
    def __init__(self):
        super().__init__(quiet=True)
        self.prefixes = []

    def stage(self, name):
        self.prefixes.append((self.index + 1, name))
        return super().stage(name)


@pytest.mark.parametrize("kwargs", [
    {"method": "magnitude"},
    {"method": "gumbel", "max_steps": 2},
    {"method": "magnitude", "permute": True, "max_drop": 1.0, "certify": True},
    {"method": "gumbel", "max_steps": 2, "exclude": [".*"]},  # nothing eligible: no learning stage
])
def test_stage_numbers_end_at_the_announced_total(tmp_path, model_files, kwargs):
    progress = _CountingProgress()
    options = _options(model_files, tmp_path, "s", **{k: v for k, v in kwargs.items() if k != "permute"})
    options.permute = kwargs.get("permute", False)
    build(options, progress)
    assert progress.index == progress.total == len(progress.prefixes), progress.prefixes
    assert any("learning" in name for _, name in progress.prefixes) == (
        kwargs["method"] == "gumbel" and "exclude" not in kwargs)
