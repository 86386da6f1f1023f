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


def read_manifest(path: Path) -> dict | None:
    """The manifest of a complete build at ``path``, or None if it is not one."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != BUILD_FORMAT:
        return None
    return manifest


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse to overwrite a directory that is not a previous build, unless forced."""
    if not out.exists():
        return
    if not out.is_dir():
        raise SparseCompileError(f"output path '{out}' exists and is not a directory")
    if force or not any(out.iterdir()) or read_manifest(out) is not None:
        return
    raise SparseCompileError(
        f"output directory '{out}' exists and is not a previous sparsecompile build; "
        "choose another -o or pass --force to replace it (its contents will be deleted)"
    )


@contextlib.contextmanager
def atomic_build_dir(out: Path):
    """Yield a temporary directory that replaces ``out`` only if the block succeeds."""
    out = Path(out)
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; a build dir is an ordinary directory
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
        os.replace(out, old / "previous")
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def open_build(path: str | Path) -> tuple[Path, dict]:
    """Validate a build directory and return (path, manifest)."""
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
    for name in manifest.get("files", {}):
        if not (path / name).exists():
            raise SparseCompileError(f"build '{path}' is missing '{name}'")
    return path, manifest
