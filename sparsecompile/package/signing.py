"""Optional Ed25519 signatures for ``.scpkg`` bundles (``pip install 'sparsecompile[sign]'``).

The manifest lists every other member with its SHA-256, so a signature of the
manifest's exact bytes covers the whole bundle. It travels as a detached
member, ``manifest.sig`` (not listed in the manifest, which cannot hash its
own signature)::

    {"algorithm": "ed25519", "format": "sparsecompile-signature", "key_id": "ed25519:<16 hex>",
     "signature": "<base64 of 64 bytes>", "version": 1}

``key_id`` is the first 16 hex digits of the SHA-256 of the raw 32-byte
public key. It is not trusted (nothing signs it): it only tells "signed by
another key" apart from "does not match" in errors, and lets ``inspect`` show
who claims to have signed a bundle it was given no key for. Ed25519
signatures are deterministic, so packaging the same build with the same key
twice gives the same bytes.

Keys are PEM files (``sparsecompile keygen``: PKCS#8 private key, mode 0600,
and ``KEY.pub``, SubjectPublicKeyInfo); OpenSSH ``ssh-ed25519`` keys are read
too. Encrypted private keys are not supported. ``cryptography`` is imported
only when a key is used.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path

from sparsecompile.errors import SparseCompileError
from sparsecompile.fileio import atomic_write

SIGNATURE_FORMAT = "sparsecompile-signature"
SIGNATURE_VERSION = 1
INSTALL_HINT = "pip install 'sparsecompile[sign]'"
_MAX_KEY_BYTES = 64 << 10


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise SparseCompileError(f"package signatures need the 'cryptography' package: {INSTALL_HINT}") from None
    return ed25519, serialization, InvalidSignature


def key_id(public_key) -> str:
    _, serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def generate_key(path: str | Path) -> tuple[Path, Path, str]:
    """``sparsecompile keygen``: a new Ed25519 key pair, ``path`` (private, 0600) and ``path.pub``; never overwrites."""
    ed25519, serialization, _ = _crypto()
    private_path = Path(path)
    public_path = private_path.with_name(private_path.name + ".pub")
    for existing in (private_path, public_path):
        if existing.exists() or existing.is_symlink():
            raise SparseCompileError(f"'{existing}' exists; refusing to overwrite a key (choose another name)")
    if not private_path.resolve().parent.is_dir():
        raise SparseCompileError(f"directory '{private_path.parent}' does not exist")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        # O_EXCL: created here, never through a symlink; 0600 from the start, whatever the umask.
        handle = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise SparseCompileError(f"cannot create '{private_path}': {exc.strerror or exc}") from None
    try:
        os.fchmod(handle, 0o600)
        os.write(handle, private_pem)
    finally:
        os.close(handle)
    try:
        atomic_write(public_path, lambda temp: Path(temp).write_bytes(public_pem))
    except BaseException:
        private_path.unlink()
        raise
    return private_path, public_path, key_id(key.public_key())


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        if path.stat().st_size > _MAX_KEY_BYTES:
            raise SparseCompileError(f"{what} '{path}' is too large to be a key")
        return path.read_bytes()
    except FileNotFoundError:
        raise SparseCompileError(f"{what} '{path}' does not exist") from None
    except IsADirectoryError:
        raise SparseCompileError(f"{what} '{path}' is a directory, not a key file") from None
    except OSError as exc:
        raise SparseCompileError(f"cannot read {what} '{path}': {exc.strerror or exc}") from None


def load_private_key(key):
    """An Ed25519 private key from a PEM (PKCS#8) or OpenSSH file, or ``key`` itself if already loaded."""
    ed25519, serialization, _ = _crypto()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    path = Path(key)
    data = _read_key_file(path, "signing key")
    loaded = None
    for loader in (serialization.load_pem_private_key, serialization.load_ssh_private_key):
        try:
            loaded = loader(data, password=None)
            break
        except TypeError:
            raise SparseCompileError(f"signing key '{path}' is encrypted; sparsecompile reads unencrypted keys only "
                                     "(sparsecompile keygen makes one)") from None
        except Exception:  # noqa: BLE001 - unsupported/garbled key formats
            continue
    if loaded is None:
        hint = " (that is a public key: sign with the private key)" if b"PUBLIC KEY" in data or \
            data.startswith(b"ssh-ed25519") else ""
        raise SparseCompileError(f"signing key '{path}' is not a PEM or OpenSSH private key{hint}")
    if not isinstance(loaded, ed25519.Ed25519PrivateKey):
        raise SparseCompileError(f"signing key '{path}' is not an Ed25519 key ({type(loaded).__name__})")
    return loaded


def load_public_key(key):
    """An Ed25519 public key from a PEM (SubjectPublicKeyInfo) or ``ssh-ed25519`` file, or ``key`` itself."""
    ed25519, serialization, _ = _crypto()
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    path = Path(key)
    data = _read_key_file(path, "verify key")
    if b"PRIVATE KEY" in data:
        raise SparseCompileError(f"verify key '{path}' is a private key; pass the public key ('{path}.pub')")
    loaded = None
    for loader in (serialization.load_pem_public_key, serialization.load_ssh_public_key):
        try:
            loaded = loader(data)
            break
        except Exception:  # noqa: BLE001 - unsupported/garbled key formats
            continue
    if loaded is None:
        raise SparseCompileError(f"verify key '{path}' is not a PEM or OpenSSH public key")
    if not isinstance(loaded, ed25519.Ed25519PublicKey):
        raise SparseCompileError(f"verify key '{path}' is not an Ed25519 key ({type(loaded).__name__})")
    return loaded


def sign_manifest(manifest_bytes: bytes, private_key) -> bytes:
    """The ``manifest.sig`` member for ``manifest_bytes`` (deterministic)."""
    signature = private_key.sign(manifest_bytes)
    document = {"format": SIGNATURE_FORMAT, "version": SIGNATURE_VERSION, "algorithm": "ed25519",
                "key_id": key_id(private_key.public_key()), "signature": base64.b64encode(signature).decode()}
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


def parse_signature(data: bytes, where: str) -> dict:
    """The ``manifest.sig`` document, its fields checked (no cryptography needed)."""
    problem = f"{where}: signature member 'manifest.sig' is malformed"
    try:
        document = json.loads(data)
    except ValueError:
        raise SparseCompileError(f"{problem} (not JSON)") from None
    if not isinstance(document, dict) or document.get("format") != SIGNATURE_FORMAT:
        raise SparseCompileError(f"{problem} (not a {SIGNATURE_FORMAT} document)")
    if document.get("version") != SIGNATURE_VERSION or document.get("algorithm") != "ed25519":
        raise SparseCompileError(f"{where}: signature version {document.get('version')!r}, algorithm "
                                 f"{document.get('algorithm')!r} is not supported (this sparsecompile checks "
                                 f"version {SIGNATURE_VERSION}, ed25519)")
    try:
        raw = base64.b64decode(str(document.get("signature")), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 64:
        raise SparseCompileError(f"{problem} (no 64-byte base64 signature)")
    if not isinstance(document.get("key_id"), str):
        raise SparseCompileError(f"{problem} (no key_id)")
    return {**document, "raw": raw}


def claimed_key_id(data: bytes | None) -> str | None:
    """Who ``manifest.sig`` says signed the bundle (unchecked, for display); None when unreadable."""
    if data is None:
        return None
    try:
        return str(parse_signature(data, "package")["key_id"])[:40]
    except SparseCompileError:
        return None


def verify_manifest(manifest_bytes: bytes, signature: bytes | None, verify_key, where: str) -> str:
    """Refuse unless ``signature`` is ``verify_key``'s signature of ``manifest_bytes``; returns the key id."""
    public_key = load_public_key(verify_key)
    _, _, invalid_signature = _crypto()
    expected = key_id(public_key)
    if signature is None:
        raise SparseCompileError(f"{where}: package is not signed (no manifest.sig), and --verify-key requires "
                                 f"a signature by {expected}")
    document = parse_signature(signature, where)
    try:
        public_key.verify(document["raw"], manifest_bytes)
    except invalid_signature:
        claimed = str(document["key_id"])[:40]
        if claimed != expected:
            raise SparseCompileError(f"{where}: signed by another key ({claimed!r}), not the --verify-key "
                                     f"{expected}; refusing the package") from None
        raise SparseCompileError(f"{where}: signature does not match the manifest (the package was changed "
                                 f"after it was signed); refusing the package") from None
    return expected
