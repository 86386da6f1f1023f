"""The ``.scpkg`` container: a zip archive written deterministically, read with every member verified.

Writing: members in a fixed order (``manifest.json`` first, the rest sorted),
every timestamp 1980-01-01 00:00, mode 0644, already-compressed binaries
stored and text deflated, so packaging the same build twice gives the same
bytes. The file appears under its final name only once complete.

Reading (:func:`open_package`): nothing is extracted to disk and nothing is
unpickled. The manifest lists every other member with its size and SHA-256;
a member that is missing, extra, of the wrong size or hash, or unreadable is
refused with an error that names it. Sizes are checked against the zip
directory *before* a member is decompressed, so a crafted archive cannot make
the reader inflate gigabytes. The manifest itself is not signed: the hashes
make a bundle tamper-evident for accidental or partial changes, not against
someone who rewrites the manifest too.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sparsecompile.errors import SparseCompileError
from sparsecompile.fileio import atomic_write

PACKAGE_FORMAT = "sparsecompile-package"
PACKAGE_VERSION = 1
MANIFEST = "manifest.json"
_EPOCH = (1980, 1, 1, 0, 0, 0)
_STORED_SUFFIXES = (".safetensors", ".engine")
_MAX_MANIFEST_BYTES = 16 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_archive(path: Path, members: dict[str, bytes]) -> None:
    """Write ``members`` (name -> bytes, must include the manifest) as a deterministic zip, atomically."""
    names = [MANIFEST] + sorted(n for n in members if n != MANIFEST)

    def write(temp: str) -> None:
        with zipfile.ZipFile(temp, "w") as archive:
            for name in names:
                info = zipfile.ZipInfo(name, date_time=_EPOCH)
                info.external_attr = 0o100644 << 16
                info.create_system = 3  # unix, whatever the packaging machine is
                stored = name.endswith(_STORED_SUFFIXES)
                info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
                archive.writestr(info, members[name], compresslevel=None if stored else 9)

    atomic_write(path, write)


def is_package_file(path: Path) -> bool:
    """True when ``path`` is a zip whose manifest names the package format (used before overwriting)."""
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(MANIFEST)
            if info.file_size > _MAX_MANIFEST_BYTES:
                return False
            return json.loads(archive.read(MANIFEST)).get("format") == PACKAGE_FORMAT
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, AttributeError):
        return False


@dataclass
class Package:
    path: Path
    manifest: dict
    members: dict[str, bytes]  # every member but the manifest, verified

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def _read(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> bytes:
    try:
        return archive.read(info)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise SparseCompileError(f"{where}: member '{info.filename}' is corrupt or truncated ({exc})") from None


def open_package(path: str | Path) -> Package:
    """Open a bundle and verify it completely: format, version, member set, sizes and hashes."""
    path = Path(path)
    where = str(path)
    if not path.exists():
        raise SparseCompileError(f"package '{path}' does not exist")
    if path.is_dir():
        raise SparseCompileError(f"'{path}' is a directory, not a .scpkg package (a build directory? "
                                 f"package it with: sparsecompile package {path} -o model.scpkg)")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise SparseCompileError(f"{where}: not a sparsecompile package, or truncated (no valid zip directory)") from None
    except OSError as exc:
        raise SparseCompileError(f"cannot read '{path}': {exc.strerror or exc}") from None
    with archive:
        infos = archive.infolist()
        names = [i.filename for i in infos]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise SparseCompileError(f"{where}: member '{duplicates[0]}' appears more than once")
        by_name = {i.filename: i for i in infos}
        if MANIFEST not in by_name:
            raise SparseCompileError(f"{where}: not a sparsecompile package (no {MANIFEST})")
        if by_name[MANIFEST].file_size > _MAX_MANIFEST_BYTES:
            raise SparseCompileError(f"{where}: {MANIFEST} is implausibly large")
        try:
            manifest = json.loads(_read(archive, by_name[MANIFEST], where))
        except ValueError:
            raise SparseCompileError(f"{where}: {MANIFEST} is not valid JSON") from None
        if not isinstance(manifest, dict) or manifest.get("format") != PACKAGE_FORMAT:
            raise SparseCompileError(f"{where}: not a sparsecompile package ({MANIFEST} does not name {PACKAGE_FORMAT!r})")
        version = manifest.get("version")
        if version != PACKAGE_VERSION:
            raise SparseCompileError(
                f"{where}: package format version {version!r} is not supported (this sparsecompile reads "
                f"version {PACKAGE_VERSION}); repackage the build with this version")
        listed = manifest.get("members")
        if not isinstance(listed, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
                for v in listed.values()):
            raise SparseCompileError(f"{where}: {MANIFEST} has no valid 'members' table")
        missing = sorted(set(listed) - set(by_name))
        if missing:
            raise SparseCompileError(f"{where}: member '{missing[0]}' is missing (the manifest lists it)")
        extra = sorted(set(by_name) - set(listed) - {MANIFEST})
        if extra:
            raise SparseCompileError(f"{where}: unexpected member '{extra[0]}' (not in the manifest)")
        members = {}
        for name, entry in sorted(listed.items()):
            info = by_name[name]
            if info.file_size != entry["bytes"]:
                raise SparseCompileError(f"{where}: member '{name}' has {info.file_size} bytes, the manifest says "
                                         f"{entry['bytes']} (tampered or corrupt)")
            data = _read(archive, info, where)
            if sha256_bytes(data) != entry["sha256"]:
                raise SparseCompileError(f"{where}: member '{name}' fails its SHA-256 check (tampered or corrupt)")
            members[name] = data
    return Package(path, manifest, members)
