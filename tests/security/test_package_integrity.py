"""Issue 17, items 2 and 3: a package is data.

* Member names: a crafted package (its manifest re-hashed, so only the name check can catch it) whose
  member name is absolute, has ``..``/empty/``.`` components, a backslash, a drive letter or a NUL is
  refused when opened, by inspect, run and unpack alike; every write resolves inside its target.
* The engine build runs sparsecompile's own ``build_engine.py``, never the copy inside the package,
  and the package's recipe is checked as data before anything is passed on.
* Optional Ed25519 signatures: ``keygen``, ``package --sign-key``, ``--verify-key`` on inspect/run/unpack
  and ``load``.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import sparsecompile.engine.build_engine as library_build_engine
from sparsecompile.errors import SparseCompileError
from sparsecompile.hardware import HostInfo
from sparsecompile.package import load, open_package, package_build, write_onnx
from sparsecompile.package.archive import sha256_bytes
from sparsecompile.package.runner import PackageRunner
from helpers import cli as invoke, one_line_failure

A100_WITH_TENSORRT = HostInfo("x86_64", "NVIDIA A100", (8, 0), True)






@pytest.fixture(scope="module")
def gpu_package(tmp_path_factory, sample_build):
    return package_build(sample_build.output, tmp_path_factory.mktemp("pkg") / "model.scpkg", "a100").path


def members_of(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def craft(src, dst, add=None, replace=None, drop=(), keep_signature=True):
    """A copy of package ``src`` with members added/replaced/dropped and the manifest re-hashed to match,
    as someone who can edit the package would make it. Names go into the zip exactly as given."""
    members = members_of(src)
    manifest = json.loads(members.pop("manifest.json"))
    signature = members.pop("manifest.sig", None)
    for name in drop:
        members.pop(name)
    members.update(replace or {})
    members.update(add or {})
    manifest["members"] = {name: {"bytes": len(data), "sha256": sha256_bytes(data)} for name, data in members.items()}
    with zipfile.ZipFile(dst, "w") as archive:
        archive.writestr("manifest.json", json.dumps(manifest, indent=2, sort_keys=True).encode())
        if signature is not None and keep_signature:
            archive.writestr("manifest.sig", signature)
        for name, data in members.items():
            info = zipfile.ZipInfo("placeholder")
            info.filename = name  # bypass ZipInfo's clean-up (it cuts a name at a NUL)
            archive.writestr(info, data)
    return Path(dst)


# --- item 2: member names --------------------------------------------------------------------------

UNSAFE_NAMES = {
    "dotdot": ("engine/../../../escaped/evil.txt", "'..'"),
    "absolute": ("/tmp/sparsecompile-evil.txt", "absolute"),
    "backslash": ("engine/..\\..\\evil.txt", "backslash"),
    "drive": ("C:/Windows/evil.txt", "drive letter"),
    "drive_relative": ("engine/C:evil.txt", "':'"),
    "empty_component": ("engine//evil.txt", "empty component"),
    "trailing_slash": ("engine/evil/", "empty component"),
    "dot_component": ("engine/./evil.txt", "'.'"),
    "nul": ("engine/evil.txt\x00.json", "NUL"),
}


@pytest.mark.parametrize("name, reason", UNSAFE_NAMES.values(), ids=UNSAFE_NAMES.keys())
def test_unsafe_member_name_is_refused_on_open(tmp_path, gpu_package, name, reason):
    bad = craft(gpu_package, tmp_path / "bad.scpkg", add={name: b"owned\n"})
    with pytest.raises(SparseCompileError, match="unsafe") as error:
        open_package(bad)
    message = str(error.value)
    assert reason in message and repr(name) in message and "\n" not in message
    with pytest.raises(SparseCompileError, match="unsafe"):
        load(bad)


def test_traversal_is_refused_by_inspect_run_and_unpack(tmp_path, gpu_package):
    name = "engine/../../../escaped/evil.txt"
    bad = craft(gpu_package, tmp_path / "bad.scpkg", add={name: b"owned\n"})
    out = tmp_path / "a" / "b" / "out"
    out.mkdir(parents=True)
    one_line_failure(invoke("unpack", bad, "-o", out), "unsafe", repr(name))
    one_line_failure(invoke("inspect", bad), "unsafe", repr(name))
    np.save(tmp_path / "x.npy", np.zeros((2, 4, 8, 8), np.float32))
    one_line_failure(invoke("run", bad, "-i", tmp_path / "x.npy"), "unsafe", repr(name))
    assert not list(tmp_path.rglob("evil.txt"))
    assert not list(out.iterdir())


def test_members_colliding_on_disk_are_refused(tmp_path, gpu_package):
    # Two names that are one file on a case-insensitive file system, and a name that is another's directory.
    recipe = members_of(gpu_package)["engine/recipe.json"]
    bad = craft(gpu_package, tmp_path / "case.scpkg", add={"ENGINE/recipe.json": recipe})
    with pytest.raises(SparseCompileError, match="unsafe.*case-insensitive") as error:
        open_package(bad)
    assert "'ENGINE/recipe.json'" in str(error.value)
    bad = craft(gpu_package, tmp_path / "dir.scpkg", add={"engine/recipe.json/x": b"x"})
    with pytest.raises(SparseCompileError, match="'engine/recipe.json/x' is unsafe.*as a directory"):
        open_package(bad)


def test_manifest_cannot_list_the_manifest_or_signature(tmp_path, gpu_package):
    bad = craft(gpu_package, tmp_path / "bad.scpkg", add={"manifest.sig": b"{}"})
    with pytest.raises(SparseCompileError, match="'manifest.sig'"):
        open_package(bad)


def test_unpack_refuses_to_write_through_a_symlink(tmp_path, gpu_package):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "engine").symlink_to(outside, target_is_directory=True)
    one_line_failure(invoke("unpack", gpu_package, "-o", out), "outside")
    assert not list(outside.iterdir())


def test_every_write_resolves_inside_its_target(tmp_path, gpu_package):
    # A Package object that never went through open_package's checks: the writer still refuses.
    package = open_package(gpu_package)
    package.members["engine/../../evil.txt"] = b"owned\n"
    out = tmp_path / "x" / "out"
    out.mkdir(parents=True)
    with pytest.raises(SparseCompileError, match="unsafe"):
        write_onnx(package, out)
    assert not list(tmp_path.rglob("evil.txt"))


def test_safe_names_still_unpack(tmp_path, gpu_package):
    out = tmp_path / "out"
    out.mkdir()
    result = invoke("unpack", gpu_package, "-o", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "engine/build_engine.py", "engine/recipe.json", "engine/trtexec.sh", "model.onnx"]


# --- item 3a: the engine build runs the library's script, with the recipe checked as data ---------------


def _tampered_script(marker: Path) -> bytes:
    return f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n".encode()


def test_bundled_build_script_never_runs(tmp_path, gpu_package, monkeypatch):
    # On a host that claims an A100 with TensorRT the engine build starts for real; the library's script
    # finds no CUDA device here and the runner falls back. A package's own script must never run.
    marker = tmp_path / "marker.txt"
    bad = craft(gpu_package, tmp_path / "bad.scpkg", replace={"engine/build_engine.py": _tampered_script(marker)})
    monkeypatch.setenv("SPARSECOMPILE_CACHE", str(tmp_path / "cache"))
    calls = []
    real_run = subprocess.run

    def recording_run(command, *args, **kwargs):
        calls.append([str(c) for c in command])
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", recording_run)
    runner = PackageRunner(bad, host=A100_WITH_TENSORRT)
    runner.close()
    assert not marker.exists()
    assert runner.backend == "ort"
    assert any("no CUDA device" in note for note in runner.notes), runner.notes
    assert len(calls) == 1
    script = Path(library_build_engine.__file__).resolve()
    assert calls[0][:2] == [sys.executable, str(script)]
    assert not any("cache" in arg and arg.endswith("build_engine.py") for arg in calls[0])
    assert not list((tmp_path / "cache").rglob("build_engine.py"))


def test_engine_build_arguments_resolve_inside_the_cache(tmp_path, gpu_package, monkeypatch):
    monkeypatch.setenv("SPARSECOMPILE_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_run(command, *args, **kwargs):
        calls.append([str(c) for c in command])
        return subprocess.CompletedProcess(command, 3, "", "error: no CUDA device on this machine\n")

    monkeypatch.setattr(subprocess, "run", fake_run)
    PackageRunner(gpu_package, host=A100_WITH_TENSORRT).close()
    (command,) = calls
    options = dict(zip(command[2::2], command[3::2]))
    assert set(options) == {"--recipe", "--onnx", "--out", "--timing-cache"}
    cache = (tmp_path / "cache").resolve()
    for value in options.values():
        assert Path(value).resolve().is_relative_to(cache), value
    assert options["--out"].endswith("model.a100.engine")


def test_engine_command_runs_the_library_script_for_a_build_dir_too(tmp_path, sample_build, monkeypatch):
    # `sparsecompile engine BUILD` used to run BUILD/engine/build_engine.py. A build copied from elsewhere
    # is an artifact too (checked here with verify=False, so the build's hashes are not what stops it).
    import shutil

    from sparsecompile.engine import run as engine_run

    build = tmp_path / "build"
    shutil.copytree(sample_build.output, build)
    marker = tmp_path / "marker.txt"
    (build / "engine" / "build_engine.py").write_bytes(_tampered_script(marker))
    monkeypatch.setenv("SPARSECOMPILE_CACHE", str(tmp_path / "cache"))
    calls = []
    real_run = subprocess.run

    def recording_run(command, *args, **kwargs):
        calls.append([str(c) for c in command])
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", recording_run)
    with pytest.raises(SparseCompileError, match="no CUDA device"):
        engine_run.build_engine(build, host=A100_WITH_TENSORRT, verify=False)
    assert not marker.exists()
    assert calls and calls[0][:2] == [sys.executable, str(Path(library_build_engine.__file__).resolve())]


BAD_RECIPES = {
    "engine_traversal": {"engine": "../../../../evil.engine"},
    "engine_absolute": {"engine": "/tmp/evil.engine"},
    "timing_cache_traversal": {"timing_cache": "../../evil.cache"},
    "precision_injection": {"precision": "fp16; touch /tmp/owned"},
    "profile_not_shapes": {"profile": {"x": {"min": "$(id)", "opt": [1], "max": [1]}}},
    "profile_unknown_input": {"profile": {"other": {"min": [1, 4, 8, 8], "opt": [1, 4, 8, 8], "max": [1, 4, 8, 8]}}},
    "sparse_weights_not_bool": {"sparse_weights": "yes"},
}


@pytest.mark.parametrize("change", BAD_RECIPES.values(), ids=BAD_RECIPES.keys())
def test_tampered_recipe_is_refused_before_anything_runs(tmp_path, gpu_package, monkeypatch, change):
    recipe = json.loads(members_of(gpu_package)["engine/recipe.json"])
    recipe.update(change)
    bad = craft(gpu_package, tmp_path / "bad.scpkg", replace={"engine/recipe.json": json.dumps(recipe).encode()})
    monkeypatch.setenv("SPARSECOMPILE_CACHE", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda command, *a, **k: calls.append(command))
    runner = PackageRunner(bad, host=A100_WITH_TENSORRT)
    runner.close()
    assert calls == []
    assert runner.backend == "ort"
    assert any("TensorRT engine unavailable" in n and "recipe" in n for n in runner.notes), runner.notes
    assert not list(tmp_path.rglob("evil.*"))


# --- item 3b: optional Ed25519 signatures ----------------------------------------------------------------

@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    pytest.importorskip("cryptography")
    root = tmp_path_factory.mktemp("keys")
    for name in ("alice", "mallory"):
        result = invoke("keygen", root / f"{name}.key")
        assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="module")
def signed_package(tmp_path_factory, sample_build, keys):
    out = tmp_path_factory.mktemp("signed") / "signed.scpkg"
    result = invoke("package", sample_build.output, "--edge", "a100", "-o", out, "--sign-key", keys / "alice.key")
    assert result.exit_code == 0, result.output
    assert "signed" in result.output
    return out


def test_keygen_writes_a_private_key_only_its_owner_reads(keys):
    assert stat.S_IMODE(os.stat(keys / "alice.key").st_mode) == 0o600
    assert b"PRIVATE KEY" in (keys / "alice.key").read_bytes()
    assert b"PUBLIC KEY" in (keys / "alice.key.pub").read_bytes()
    before = (keys / "alice.key").read_bytes()
    one_line_failure(invoke("keygen", keys / "alice.key"), "exists")
    assert (keys / "alice.key").read_bytes() == before


def test_signature_is_detached_and_packaging_stays_deterministic(tmp_path, sample_build, keys, signed_package):
    members = members_of(signed_package)
    manifest = json.loads(members["manifest.json"])
    assert "manifest.sig" in members and "manifest.sig" not in manifest["members"]
    again = package_build(sample_build.output, tmp_path / "again.scpkg", "a100", sign_key=keys / "alice.key")
    assert again.path.read_bytes() == signed_package.read_bytes()


def test_verified_signature_is_accepted_everywhere(tmp_path, keys, signed_package):
    pub = keys / "alice.key.pub"
    result = invoke("inspect", signed_package, "--verify-key", pub)
    assert result.exit_code == 0, result.output
    assert "signature verified" in result.output
    np.save(tmp_path / "x.npy", np.zeros((2, 4, 8, 8), np.float32))
    result = invoke("run", signed_package, "-i", tmp_path / "x.npy", "--verify-key", pub)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    out.mkdir()
    result = invoke("unpack", signed_package, "-o", out, "--verify-key", pub)
    assert result.exit_code == 0, result.output
    with load(signed_package, verify_key=pub) as runner:
        assert runner(np.zeros((2, 4, 8, 8), np.float32)).shape == (2, 10)


def test_unchecked_signature_is_said_to_be_unchecked(signed_package, gpu_package):
    result = invoke("inspect", signed_package)
    assert result.exit_code == 0, result.output
    assert "NOT checked" in result.output and "--verify-key" in result.output
    result = invoke("inspect", gpu_package)
    assert result.exit_code == 0, result.output
    assert "unsigned" in result.output


def test_unsigned_package_is_refused_with_a_key(tmp_path, keys, gpu_package):
    pub = keys / "alice.key.pub"
    for command in (("inspect", gpu_package), ("unpack", gpu_package, "-o", tmp_path)):
        one_line_failure(invoke(*command, "--verify-key", pub), "not signed")
    with pytest.raises(SparseCompileError, match="not signed"):
        load(gpu_package, verify_key=pub)


def test_signature_by_another_key_is_refused(tmp_path, keys, signed_package):
    np.save(tmp_path / "x.npy", np.zeros((2, 4, 8, 8), np.float32))
    one_line_failure(invoke("run", signed_package, "-i", tmp_path / "x.npy", "--verify-key", keys / "mallory.key.pub"),
                   "another key")
    with pytest.raises(SparseCompileError, match="another key"):
        open_package(signed_package, verify_key=keys / "mallory.key.pub")


def test_rewritten_manifest_breaks_the_signature(tmp_path, keys, signed_package):
    # Someone edits a member and re-hashes the manifest: SHA-256 passes, the signature does not.
    bad = craft(signed_package, tmp_path / "bad.scpkg", replace={"report.json": b"{}"})
    assert open_package(bad).members["report.json"] == b"{}"
    one_line_failure(invoke("inspect", bad, "--verify-key", keys / "alice.key.pub"), "does not match")
    # ... and a signature member that is not one at all.
    junk = craft(signed_package, tmp_path / "junk.scpkg", keep_signature=False)
    with zipfile.ZipFile(junk, "a") as archive:
        archive.writestr("manifest.sig", b"not json")
    one_line_failure(invoke("unpack", junk, "-o", tmp_path, "--verify-key", keys / "alice.key.pub"), "manifest.sig")


def test_key_errors_are_one_line(tmp_path, sample_build, keys, signed_package):
    one_line_failure(invoke("inspect", signed_package, "--verify-key", tmp_path / "nope.pub"), "nope.pub")
    (tmp_path / "junk.pub").write_text("hello")
    one_line_failure(invoke("inspect", signed_package, "--verify-key", tmp_path / "junk.pub"), "junk.pub")
    one_line_failure(invoke("inspect", signed_package, "--verify-key", keys / "alice.key"), "private key")
    one_line_failure(invoke("package", sample_build.output, "-o", tmp_path / "m.scpkg", "--sign-key",
                          keys / "alice.key.pub"), "alice.key.pub")
    assert not (tmp_path / "m.scpkg").exists()
    one_line_failure(invoke("inspect", sample_build.output, "--verify-key", keys / "alice.key.pub"), "package")


def test_missing_cryptography_says_what_to_install(tmp_path, keys, signed_package, monkeypatch):
    for module in ("cryptography", "cryptography.exceptions", "cryptography.hazmat.primitives",
                   "cryptography.hazmat.primitives.serialization", "cryptography.hazmat.primitives.asymmetric",
                   "cryptography.hazmat.primitives.asymmetric.ed25519"):
        monkeypatch.setitem(sys.modules, module, None)
    one_line_failure(invoke("inspect", signed_package, "--verify-key", keys / "alice.key.pub"),
                   "pip install 'sparsecompile[sign]'")
    one_line_failure(invoke("keygen", tmp_path / "k.key"), "pip install 'sparsecompile[sign]'")
    assert not (tmp_path / "k.key").exists()
    # Without a key nothing needs cryptography.
    assert invoke("inspect", signed_package).exit_code == 0
