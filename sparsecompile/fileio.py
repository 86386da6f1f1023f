"""Writing a file so that it is either complete or absent: never half-written under its final name."""

from __future__ import annotations

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
