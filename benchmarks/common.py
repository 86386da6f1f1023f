"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import traceback
from pathlib import Path
from typing import Callable

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


def cached_build_record(cache_dir: Path, key_data: dict, fresh: bool, record: dict,
                        measure: Callable[[Path], dict]) -> dict:
    """One benchmark build, cached as JSON under the sha256 of ``key_data``.

    ``measure(out)`` builds into the fresh directory ``out`` and returns the fields to add to
    ``record``; an exception is recorded in ``record["error"]`` (with the traceback) instead of
    stopping the benchmark. The build directory is always removed.
    """
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:20]
    cached = cache_dir / f"{key}.json"
    if cached.exists() and not fresh:
        return json.loads(cached.read_text())
    out = Path(tempfile.mkdtemp(prefix="bench-")) / "build"
    try:
        record.update(measure(out))
        record["error"] = None
    except Exception as exc:  # noqa: BLE001 - record and go on
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(record, indent=2) + "\n")
    return record
