"""Writing a file so that it is either complete or absent: never half-written under its final name."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], suffix: str | None = None) -> None:
    """Call ``write(temp)`` on a hidden temporary sibling of ``path``, then move it into place.

    The temporary file keeps ``path``'s suffix, or ``suffix`` (``np.save`` appends ``.npy`` to any other), and gets the
    permissions a plain ``open()`` would give (``mkstemp`` makes it private). On any failure,
    Ctrl-C included, it is removed and ``path`` is left as it was.
    """
    path = Path(path)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix or ".partial",
                                    dir=path.resolve().parent)
    os.close(handle)
    try:
        write(temp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (torch-free, so build-directory checks stay fast to import)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
