"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def source_hash() -> str:
    """sha256 of ``sparsecompile/**/*.py`` (path + bytes), first 16 hex digits.

    Other people edit that tree while benchmarks run and results depend on it, so
    cached build results are keyed by it.
    """
    digest = hashlib.sha256()
    for path in sorted((ROOT / "sparsecompile").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
