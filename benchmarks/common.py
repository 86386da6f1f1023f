"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import sys
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


def run_header(script: str, threads: int, machine_note: str = "") -> list[str]:
    """Markdown bullets for a result file: date, machine (CPU model, torch, threads) and the command line."""
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    return [f"- Date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- Machine: {os.cpu_count()}-core CPU ({cpu}), torch {torch.__version__}, {threads} threads"
            + (f" {machine_note}" if machine_note else ""),
            f"- Command: `python benchmarks/{script}" + "".join(f" {a}" for a in sys.argv[1:]) + "`"]


def cached_build_record(cache_dir: Path, key_data: dict, fresh: bool, record: dict,
                        measure: Callable[[Path], dict], work_dir: str | Path | None = None) -> dict:
    """One benchmark build, cached as JSON under the sha256 of ``key_data``.

    ``measure(out)`` builds into the fresh directory ``out`` (under ``work_dir``, default the system
    temporary directory) and returns the fields to add to ``record``; an exception is recorded in
    ``record["error"]`` (with the traceback) instead of stopping the benchmark. The build directory is
    always removed. The returned record says whether it came from the cache (``record["cached"]``, not stored).
    """
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:20]
    cached = cache_dir / f"{key}.json"
    if cached.exists() and not fresh:
        stored = json.loads(cached.read_text())
        stored["cached"] = True
        return stored
    out = Path(tempfile.mkdtemp(prefix="bench-", dir=work_dir)) / "build"
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
    record["cached"] = False
    return record
