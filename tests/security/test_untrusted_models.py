"""Model files are data: nothing in a .pt2, TorchScript archive or weights file runs code unless the
user passed --trust-pickle, and an altered archive is refused before it is loaded.

Each crafted file carries a payload that, if unpickled, creates a marker file; the tests assert the
marker never appears (and, where --trust-pickle allows it, that it does: the payload is real).
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from sparsecompile.errors import SparseCompileError
from sparsecompile.frontend import code_members_of_pt2, load_model, load_pt2

from helpers import cli, one_line_failure

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Payload:
    """Unpickling this creates ``path``: stands for any command an attacker would run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _rewrite(src: Path, dst: Path, edit) -> None:
    """Copy the zip ``src`` to ``dst``; ``edit(name, data, add)`` returns new bytes, ``add(name, data)`` adds members."""
    extra: list[tuple[str, bytes]] = []
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, edit(info.filename, zin.read(info.filename), lambda n, d: extra.append((n, d))))
        for name, data in extra:
            zout.writestr(name, data)


def _opaque_constant_pt2(src: Path, dst: Path, marker: Path) -> None:
    """A .pt2 with an opaque constant: torch.export.load hands it to plain pickle.loads."""

    def edit(name, data, add):
        if name.endswith("model_constants_config.json"):
            config = json.loads(data)
            config["config"]["payload"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                           "tensor_meta": None}
            add(name.rsplit("/", 1)[0] + "/opaque_obj_0", pickle.dumps(_Payload(marker)))
            return json.dumps(config).encode()
        return data

    _rewrite(src, dst, edit)


@pytest.fixture()
def evil_pt2(model_files, tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt2"
    _opaque_constant_pt2(model_files / "dynamic.pt2", path, marker)
    return path, marker


def test_pickled_opaque_constant_is_refused_by_build(evil_pt2, tmp_path, model_files):
    path, marker = evil_pt2
    result = cli("build", path, "-o", tmp_path / "out", "--calib", model_files / "calib.npy")
    one_line_failure(result, "opaque_obj_0", "--trust-pickle")
    assert not marker.exists(), "the .pt2's pickled constant ran"
    assert not (tmp_path / "out").exists()


def test_pickled_opaque_constant_is_refused_by_profile_and_spectra(evil_pt2, tmp_path):
    path, marker = evil_pt2
    one_line_failure(cli("profile", path, "--runs", "1", "--warmup", "0", "--top", "0"), "opaque_obj_0")
    one_line_failure(cli("inspect", path, "--spectra"), "opaque_obj_0")
    assert not marker.exists()


def test_payload_is_real_and_runs_only_when_trusted(evil_pt2):
    """The crafted file is a working exploit: with --trust-pickle torch unpickles it (the user's choice)."""
    path, marker = evil_pt2
    assert [m.split(" ")[0] for m in code_members_of_pt2(path)] == [
        n for n in zipfile.ZipFile(path).namelist() if n.endswith("opaque_obj_0")]
    with pytest.raises(Exception):  # noqa: B017 - torch rejects the constant after unpickling it
        load_pt2(path, trust_pickle=True).module()
    assert marker.exists()


def test_custom_object_and_native_members_are_refused(model_files, tmp_path):
    for member, what in (("data/constants/custom_obj_0", "pickled Python object"),
                         ("data/aotinductor/model/model.so", "compiled native code")):
        path = tmp_path / f"{Path(member).name}.pt2"

        def edit(name, data, add, member=member):
            if name.endswith("archive_format"):
                add(name.split("/", 1)[0] + "/" + member, b"\x7fELF not really")
            return data

        _rewrite(model_files / "dynamic.pt2", path, edit)
        with pytest.raises(SparseCompileError, match=f"{Path(member).name} \\({what}"):
            load_pt2(path, trust_pickle=False)


def test_clean_pt2_has_no_code_members(model_files):
    assert code_members_of_pt2(model_files / "dynamic.pt2") == []


def _flip_byte_in_member(src: Path, dst: Path, suffix: str) -> str:
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix) and i.file_size > 8)
        assert info.compress_type == zipfile.ZIP_STORED
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    # The local header's extra field can differ from the central directory's: find the data by content.
    with zipfile.ZipFile(src) as archive:
        payload = archive.read(info)
    start = data.index(payload, info.header_offset)
    data[start + 4] ^= 0xFF
    dst.write_bytes(bytes(data))
    return info.filename


def test_pt2_with_bad_crc_is_refused(model_files, tmp_path):
    """A flipped bit in a weight member used to build silently with the altered weight."""
    path = tmp_path / "crc.pt2"
    member = _flip_byte_in_member(model_files / "dynamic.pt2", path, "weight_0")
    with pytest.raises(SparseCompileError, match=f"'{member}' fails its CRC"):
        load_model(path)
    one_line_failure(cli("build", path, "-o", tmp_path / "out"), "CRC")


def test_torchscript_with_bad_crc_is_refused(model_files, tmp_path):
    path = tmp_path / "crc.ts"
    src = model_files / "scripted.ts"
    with zipfile.ZipFile(src) as archive:
        suffix = next(i.filename for i in archive.infolist()
                      if "/data/" in i.filename and i.file_size > 64).split("/", 1)[1]
    _flip_byte_in_member(src, path, suffix)
    with pytest.raises(SparseCompileError, match="fails its CRC"):
        load_model(path, input_shapes=[(4, 4, 8, 8)])


def test_pickled_module_never_unpickled_without_trust(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "module.pt"
    torch.save(_Payload(marker), path)
    one_line_failure(cli("build", path, "-o", tmp_path / "out", "--input-shape", "1,4,8,8"), "--trust-pickle")
    assert not marker.exists()


def test_weights_file_is_loaded_weights_only(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "weights.pt"
    torch.save({"0.weight": _Payload(marker)}, path)
    result = cli("build", "--model-factory", "conftest:build_factory", "--weights", path,
                  "-o", tmp_path / "out", "--input-shape", "1,4,8,8")
    assert result.exit_code == 1, result.output
    assert not marker.exists()
