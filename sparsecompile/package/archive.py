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
the reader inflate gigabytes.

Member names are data from the archive: every name in the zip directory and
in the manifest must be a plain relative path (:func:`unsafe_member_name`: no
absolute path, ``..``, ``.`` or empty component, backslash, drive letter or
``:``, NUL, nor characters outside ``A-Z a-z 0-9 . _ -``), and no two names may
collide on disk. A bundle with one such name is refused when opened, before
anything is written; :func:`member_path` checks again at every write and
refuses a path that resolves outside its target directory (a symlink there).

The hashes make a bundle tamper-evident for accidental or partial changes,
not against someone who rewrites the manifest too. Against that, a bundle can
carry a detached Ed25519 signature of the manifest bytes (``manifest.sig``,
not itself in the manifest; :mod:`sparsecompile.package.signing`), checked
when the reader is given a public key (``verify_key``).
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sparsecompile.errors import SparseCompileError
from sparsecompile.fileio import atomic_write

PACKAGE_FORMAT = "sparsecompile-package"
PACKAGE_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
_EPOCH = (1980, 1, 1, 0, 0, 0)
_STORED_SUFFIXES = (".safetensors", ".engine")
_MAX_MANIFEST_BYTES = 16 << 20
_MAX_SIGNATURE_BYTES = 64 << 10
_MAX_NAME_CHARS = 255
_PLAIN_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*\Z")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def unsafe_member_name(name) -> str | None:
    """Why ``name`` cannot name a package member (``None`` when it can): only plain relative paths can."""
    if not isinstance(name, str) or not name:
        return "empty"
    if "\x00" in name:
        return "contains a NUL byte"
    if "\\" in name:
        return "contains a backslash"
    if name.startswith("/"):
        return "absolute path"
    if re.match(r"[A-Za-z]:", name):
        return "starts with a drive letter"
    parts = name.split("/")
    if ".." in parts:
        return "has a '..' component"
    if "" in parts:
        return "has an empty component"
    if "." in parts:
        return "has a '.' component"
    if ":" in name:
        return "contains ':'"
    if len(name) > _MAX_NAME_CHARS:
        return f"longer than {_MAX_NAME_CHARS} characters"
    odd = next((p for p in parts if not _PLAIN_COMPONENT.match(p)), None)
    if odd is not None:
        return f"component {odd!r} is not made of A-Z a-z 0-9 . _ - (or starts with '.' or '-')"
    return None


def _unsafe(where: str, name, reason: str) -> SparseCompileError:
    return SparseCompileError(f"{where}: member name {name!r} is unsafe ({reason}); refusing the package")


def check_member_names(names, where: str) -> None:
    """Refuse unsafe names, and names that would be one file on disk (case-insensitively, or a file that
    another name needs as its directory)."""
    for name in names:
        reason = unsafe_member_name(name)
        if reason:
            raise _unsafe(where, name, reason)
    seen: dict[str, str] = {}
    for name in sorted(names):
        other = seen.setdefault(name.casefold(), name)
        if other != name:
            raise _unsafe(where, name, f"the same file as {other!r} on a case-insensitive file system")
    folded = {n.casefold() for n in names}
    for name in sorted(names):
        parts = name.casefold().split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in folded:
                raise _unsafe(where, name, f"needs {'/'.join(name.split('/')[:i])!r}, also a member, as a directory")


def member_path(root: str | Path, name: str, where: str = "package") -> Path:
    """Where member ``name`` goes under directory ``root``: refused unless the name is safe and the path,
    symlinks resolved, stays inside ``root``."""
    reason = unsafe_member_name(name)
    if reason:
        raise _unsafe(where, name, reason)
    base = Path(root).resolve()
    target = base.joinpath(*name.split("/")).resolve()
    if target == base or not target.is_relative_to(base):
        raise SparseCompileError(f"{where}: member {name!r} would be written to '{target}', outside '{base}' "
                                 f"(a symlink there?); refusing to write it")
    return target


def write_member(root: str | Path, name: str, data: bytes, where: str = "package") -> Path:
    """Write member ``name`` under ``root`` atomically, creating its directories, only inside ``root``."""
    target = member_path(root, name, where)
    target.parent.mkdir(parents=True, exist_ok=True)
    target = member_path(root, name, where)  # again: the directories now exist, so symlinks are resolved
    atomic_write(target, lambda temp: Path(temp).write_bytes(data))
    return target


def write_archive(path: Path, members: dict[str, bytes]) -> None:
    """Write ``members`` (name -> bytes, must include the manifest) as a deterministic zip, atomically."""
    names = [MANIFEST] + sorted(n for n in members if n != MANIFEST)
    check_member_names(names, str(path))

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
    members: dict[str, bytes]  # every member but the manifest and its signature, verified
    signature: bytes | None = None  # manifest.sig as found in the bundle
    signature_key_id: str | None = None  # set when the signature was verified against a given key

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def _read(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> bytes:
    try:
        return archive.read(info)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise SparseCompileError(f"{where}: member '{info.filename}' is corrupt or truncated ({exc})") from None


def open_package(path: str | Path, verify_key=None) -> Package:
    """Open a bundle and verify it completely: member names, format, version, member set, sizes and hashes.

    ``verify_key`` (a public key file, or a loaded Ed25519 public key): also require ``manifest.sig`` to be
    that key's signature of the manifest bytes, checked before the manifest is parsed."""
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
        for info in infos:  # zipfile cuts a name at a NUL: the name as stored is orig_filename
            if info.orig_filename != info.filename:
                raise _unsafe(where, info.orig_filename, unsafe_member_name(info.orig_filename) or "altered on reading")
        check_member_names(names, where)
        by_name = {i.filename: i for i in infos}
        if MANIFEST not in by_name:
            raise SparseCompileError(f"{where}: not a sparsecompile package (no {MANIFEST})")
        if by_name[MANIFEST].file_size > _MAX_MANIFEST_BYTES:
            raise SparseCompileError(f"{where}: {MANIFEST} is implausibly large")
        manifest_bytes = _read(archive, by_name[MANIFEST], where)
        signature = None
        if SIGNATURE in by_name:
            if by_name[SIGNATURE].file_size > _MAX_SIGNATURE_BYTES:
                raise SparseCompileError(f"{where}: {SIGNATURE} is implausibly large")
            signature = _read(archive, by_name[SIGNATURE], where)
        key_id = None
        if verify_key is not None:
            from sparsecompile.package.signing import verify_manifest

            key_id = verify_manifest(manifest_bytes, signature, verify_key, where)
        try:
            manifest = json.loads(manifest_bytes)
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
        check_member_names(list(listed), where)
        reserved = sorted(set(listed) & {MANIFEST, SIGNATURE})
        if reserved:
            raise SparseCompileError(f"{where}: {MANIFEST} lists '{reserved[0]}' among the members it hashes")
        missing = sorted(set(listed) - set(by_name))
        if missing:
            raise SparseCompileError(f"{where}: member '{missing[0]}' is missing (the manifest lists it)")
        extra = sorted(set(by_name) - set(listed) - {MANIFEST, SIGNATURE})
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
    return Package(path, manifest, members, signature, key_id)
