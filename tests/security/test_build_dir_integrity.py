"""Build directories: verified before use, never replaced at the cost of the user's files, no staging left over."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sparsecompile.build import BuildOptions, build
from sparsecompile.builddir import open_build, remove_stale_staging
from sparsecompile.errors import SparseCompileError

from helpers import cli, one_line_failure

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def fresh_build(sample_build, tmp_path):
    path = tmp_path / "build"
    shutil.copytree(sample_build.output, path)
    return path


def _zero_one_weight(path: Path) -> None:
    weights = load_file(str(path / "weights.safetensors"))
    name = next(iter(weights))
    weights[name] = np.zeros_like(weights[name])
    save_file(weights, str(path / "weights.safetensors"), metadata=None)


def test_tampered_weight_is_refused_by_run_inspect_profile(fresh_build, tmp_path, model_files):
    """A build with a zeroed weight used to run silently."""
    open_build(fresh_build)  # intact: verifies
    _zero_one_weight(fresh_build)
    with pytest.raises(SparseCompileError, match="weights.safetensors' changed since the build"):
        open_build(fresh_build)
    np.save(tmp_path / "x.npy", np.load(model_files / "calib.npy")[:2])
    for args in (("run", fresh_build, "-i", tmp_path / "x.npy"), ("inspect", fresh_build),
                 ("profile", fresh_build, "--runs", "1", "--warmup", "0", "--top", "0", "--batch", "1")):
        one_line_failure(cli(*args), "weights.safetensors", "--no-verify")
    # The escape hatch: the user takes responsibility.
    assert cli("inspect", fresh_build, "--no-verify").exit_code == 0
    assert cli("run", fresh_build, "-i", tmp_path / "x.npy", "--no-verify").exit_code == 0


def test_swapped_model_pt2_is_refused(fresh_build, model_files):
    shutil.copy(model_files / "static.pt2", fresh_build / "model.pt2")
    one_line_failure(cli("inspect", fresh_build), "model.pt2")


def test_manifest_file_names_cannot_leave_the_build(fresh_build):
    import json

    manifest = json.loads((fresh_build / "manifest.json").read_text())
    for bad in ("../outside", "/etc/passwd", "a\\b", "sub//x"):
        changed = dict(manifest, files={**manifest["files"], bad: "0" * 64})
        (fresh_build / "manifest.json").write_text(json.dumps(changed))
        with pytest.raises(SparseCompileError, match="invalid file name|outside"):
            open_build(fresh_build)


def test_rebuild_refuses_to_delete_user_files(fresh_build, model_files):
    """A NOTES.txt and a mydata/ folder inside a previous build used to vanish without --force."""
    (fresh_build / "NOTES.txt").write_text("mine")
    (fresh_build / "mydata").mkdir()
    (fresh_build / "mydata" / "a.npy").write_bytes(b"x")
    result = cli("build", model_files / "dynamic.pt2", "-o", fresh_build, "--input-shape", "2,4,8,8")
    one_line_failure(result, "NOTES.txt", "mydata/", "--force")
    assert (fresh_build / "NOTES.txt").read_text() == "mine" and (fresh_build / "mydata" / "a.npy").exists()
    # A plain previous build is still replaced without --force; with --force the user's files go.
    result = cli("build", model_files / "dynamic.pt2", "-o", fresh_build, "--input-shape", "2,4,8,8", "--force")
    assert result.exit_code == 0, result.output
    assert not (fresh_build / "NOTES.txt").exists()


def test_output_holding_cwd_or_inputs_is_refused(model_files, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(model_files / "dynamic.pt2", work / "model.pt2")
    monkeypatch.chdir(work)
    for out in (".", str(tmp_path)):
        result = cli("build", "model.pt2", "-o", out, "--force", "--input-shape", "2,4,8,8")
        one_line_failure(result, "current directory")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = cli("build", work / "model.pt2", "-o", work, "--force", "--input-shape", "2,4,8,8")
    one_line_failure(result, "holds the build's input")
    assert (work / "model.pt2").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_unwritable_parent_fails_before_any_work(model_files, tmp_path):
    if os.geteuid() == 0:  # root writes through permission bits: a parent that is a file fails the same way
        parent = tmp_path / "a-file"
        parent.write_text("")
    else:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o500)
    result = cli("build", model_files / "dynamic.pt2", "-o", parent / "out", "--input-shape", "2,4,8,8")
    one_line_failure(result, "not a writable directory")
    assert "loading model" not in result.output


def test_killed_build_staging_is_removed_on_next_build(model_files, tmp_path):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.partial-{dead.pid}-abcd"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half")
    legacy = tmp_path / ".out.partial-xyz123"  # an older version's name: reported, not removed
    legacy.mkdir()
    live = tmp_path / f".out.partial-{os.getppid()}-efgh"  # a running process's: left alone
    live.mkdir()
    result = build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(out), input_shapes=[(2, 4, 8, 8)]))
    assert not stale.exists() and legacy.exists() and live.exists()
    assert any("xyz123" in note for note in result.report["notes"])
    assert remove_stale_staging(out) == ([], [str(legacy.resolve())])


def test_failed_swap_leaves_no_staging_and_keeps_previous(fresh_build, model_files, monkeypatch):
    import sparsecompile.builddir as builddir

    before = sorted(p.name for p in fresh_build.iterdir())
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst) == fresh_build.resolve() and ".partial-" in Path(src).name:
            raise OSError(16, "Device or resource busy")
        return real_replace(src, dst)

    monkeypatch.setattr(builddir.os, "replace", failing_replace)
    with pytest.raises(SparseCompileError, match="nothing was changed"):
        build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(fresh_build),
                           input_shapes=[(2, 4, 8, 8)]))
    assert sorted(p.name for p in fresh_build.iterdir()) == before
    assert [p.name for p in fresh_build.parent.iterdir() if p.name.startswith(".")] == []


def test_verifying_a_build_does_not_import_torch():
    # The fallback's load time: open_build hashes every file, and that must not pull torch in (about 4 s).
    import subprocess
    import sys

    code = "import sys, sparsecompile.builddir as b; b.file_sha256; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code.replace("b.file_sha256", "__import__('sparsecompile.fileio')")],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
