"""The build directory: atomic creation, identification, loading.

A build directory is complete when its ``manifest.json`` names the
``sparsecompile-build`` format. Builds are written into a hidden temporary
sibling directory and moved into place only once everything is written, so a
failed or interrupted build never leaves a directory that looks complete.

Layout (see README "Output layout")::

    build/
      manifest.json        format/version, source model hash, target, files
      model.onnx           sparse model, dense layout with zeros (TensorRT's input)
      weights.safetensors  compressed N:M weights + dense weights of other layers
      model.int8.onnx      --precision int8 with --calib: the Q/DQ model
      weights.int8.safetensors  its weights: sparse layers' int8 values compressed, with their scales
      report.json          per-layer decisions, errors, sizes, verification
      report.md            the same, readable
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from sparsecompile.errors import SparseCompileError

BUILD_FORMAT = "sparsecompile-build"
BUILD_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INT8_ONNX = "model.int8.onnx"  # --precision int8 builds: the Q/DQ model beside model.onnx
INT8_WEIGHTS = "weights.int8.safetensors"  # ... and its weights, sparse layers' int8 values compressed (docs/format.md)


def read_manifest(path: Path) -> dict | None:
    """The manifest of a complete build at ``path``, or None if it is not one."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != BUILD_FORMAT:
        return None
    return manifest


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _foreign_entries(out: Path, manifest: dict) -> list[str]:
    """Files and folders inside a previous build that the build did not write (the user's own)."""
    listed = set(manifest.get("files", {})) if isinstance(manifest.get("files"), dict) else set()
    listed.add(MANIFEST)
    build_dirs = {parent.as_posix() for name in listed for parent in Path(name).parents if parent != Path(".")}
    foreign = []
    for entry in sorted(out.rglob("*")):
        rel = entry.relative_to(out).as_posix()
        if any(rel.startswith(f"{f}/") for f in foreign):
            continue  # inside a foreign folder already named
        if entry.is_dir() and not entry.is_symlink():
            if rel not in build_dirs:
                foreign.append(rel)
        elif rel not in listed:
            foreign.append(rel)
    return [f"{name}/" if (out / name).is_dir() else name for name in foreign]


def check_output_dir(out: Path, force: bool, inputs: tuple = ()) -> None:
    """Refuse an output directory the build must not replace; call before any work.

    The build replaces ``out`` as a whole, so it refuses: a file; a directory holding the
    current directory or one of the build's ``inputs`` (with or without ``--force``); a
    parent it cannot write; and, without ``--force``, a directory that is not a previous
    build or a previous build holding files the build did not write (they would be lost).
    """
    resolved = Path(out).resolve()
    cwd = Path.cwd().resolve()
    if cwd == resolved or cwd.is_relative_to(resolved):
        raise SparseCompileError(
            f"output directory '{out}' holds the current directory and would be replaced as a whole; "
            "choose a new or build-only directory for -o")
    for item in inputs:
        if item and Path(item).exists() and Path(item).resolve().is_relative_to(resolved):
            raise SparseCompileError(
                f"output directory '{out}' holds the build's input '{item}', which replacing it would delete; "
                "choose another -o")
    existing = _nearest_existing(resolved.parent)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise SparseCompileError(f"cannot create the build next to '{out}': '{existing}' is not a writable directory")
    if not resolved.exists():
        return
    if not resolved.is_dir():
        raise SparseCompileError(f"output path '{out}' exists and is not a directory")
    if force or not any(resolved.iterdir()):
        return
    manifest = read_manifest(resolved)
    if manifest is None:
        raise SparseCompileError(
            f"output directory '{out}' exists and is not a previous sparsecompile build; "
            "choose another -o or pass --force to replace it (its contents will be deleted)"
        )
    foreign = _foreign_entries(resolved, manifest)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise SparseCompileError(
            f"output directory '{out}' is a previous build that also holds files it did not write ({shown}); "
            "move them out, or pass --force to replace the directory and delete them"
        )


_STAGING_KINDS = ("partial", "old")


def _staging_prefix(out: Path, kind: str) -> str:
    return f".{out.name}.{kind}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process
    return True


def remove_stale_staging(out: Path) -> tuple[list[str], list[str]]:
    """Remove staging folders an interrupted build of ``out`` left behind.

    Staging folders are named ``.NAME.partial-PID-XXXX`` (and ``.NAME.old-PID-XXXX`` during the
    swap); one whose process no longer runs is stale. Returns (removed, left): older
    folders without a process id (earlier sparsecompile versions) are only reported.
    """
    out = Path(out).resolve()
    removed, left = [], []
    if not out.parent.is_dir():
        return removed, left
    for entry in sorted(out.parent.iterdir()):
        for kind in _STAGING_KINDS:
            prefix = f".{out.name}.{kind}-"
            if not entry.name.startswith(prefix) or not entry.is_dir() or entry.is_symlink():
                continue
            pid_text = entry.name[len(prefix):].split("-", 1)[0]
            if not pid_text.isdigit():
                left.append(str(entry))
            elif int(pid_text) != os.getpid() and not _pid_alive(int(pid_text)):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(str(entry))
    return removed, left


@contextlib.contextmanager
def atomic_build_dir(out: Path):
    """Yield a temporary directory that replaces ``out`` only if the block succeeds.

    On any failure (in the block or while swapping) the staging folder is removed and a
    previous ``out`` is left, or put back, as it was.
    """
    out = Path(out).resolve()  # "-o ." has no name of its own; the resolved path does
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(out, "partial"), dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; a build dir is an ordinary directory
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    try:
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=_staging_prefix(out, "old"), dir=parent))
            os.replace(out, old / "previous")
        os.replace(staging, out)
    except BaseException as exc:
        if old is not None and (old / "previous").exists() and not out.exists():
            os.replace(old / "previous", out)
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if isinstance(exc, OSError):
            raise SparseCompileError(f"could not move the finished build into '{out}': {exc.strerror or exc}; "
                                     "nothing was changed there") from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _safe_member(root: Path, name: str) -> Path:
    """``root / name`` for a manifest entry, refusing names that leave ``root``."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name or name.startswith("/") \
            or any(part in ("", ".", "..") for part in name.split("/")) or (len(name) > 1 and name[1] == ":"):
        raise SparseCompileError(f"build '{root}': manifest lists an invalid file name {name!r}")
    resolved = (root / name).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise SparseCompileError(f"build '{root}': manifest file '{name}' resolves outside the build directory")
    return root / name


def verify_build_files(path: Path, manifest: dict) -> None:
    """Check every file the manifest lists against its SHA-256."""
    from sparsecompile.fileio import file_sha256

    files = manifest.get("files")
    if not isinstance(files, dict):
        raise SparseCompileError(f"build '{path}': its manifest has no file list to verify; rebuild it")
    for name, digest in files.items():
        member = _safe_member(path, name)
        if not member.is_file():
            raise SparseCompileError(f"build '{path}' is missing '{name}'")
        if file_sha256(member) != digest:
            raise SparseCompileError(
                f"build '{path}': '{name}' changed since the build (SHA-256 differs from its manifest); "
                "rebuild it, or pass --no-verify to use it as it is")


def open_build(path: str | Path, *, verify: bool = True) -> tuple[Path, dict]:
    """Validate a build directory and return (path, manifest).

    With ``verify`` (the default) every file the manifest lists must match its
    size and SHA-256, so a build edited after the fact (a zeroed weight, a swapped
    ``model.pt2``) is refused before anything reads it. ``--no-verify`` skips the hashes.
    """
    path = Path(path)
    if not path.exists():
        raise SparseCompileError(f"build directory '{path}' does not exist")
    if not path.is_dir():
        raise SparseCompileError(f"'{path}' is not a build directory")
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise SparseCompileError(f"'{path}' is not a complete sparsecompile build (no {MANIFEST})")
    manifest = read_manifest(path)
    if manifest is None:
        raise SparseCompileError(f"'{manifest_path}' is not a sparsecompile build manifest")
    version = manifest.get("version")
    if version != BUILD_FORMAT_VERSION:
        raise SparseCompileError(
            f"'{path}' was made by an incompatible sparsecompile (build format {version}, "
            f"this version reads {BUILD_FORMAT_VERSION}); rebuild it"
        )
    if verify:
        verify_build_files(path, manifest)
    else:
        for name in manifest.get("files", {}) if isinstance(manifest.get("files"), dict) else ():
            if not _safe_member(path, name).exists():
                raise SparseCompileError(f"build '{path}' is missing '{name}'")
    return path, manifest
