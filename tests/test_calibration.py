"""Calibration data: formats, matching to model inputs, and the errors users see."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsecompile.calibration import load_calibration, match_to_model, random_calibration
from sparsecompile.errors import SparseCompileError

EXAMPLE = (torch.zeros(2, 4, 8, 8),)


def test_npy_roundtrip_and_cap(tmp_path):
    data = np.random.default_rng(0).standard_normal((10, 4, 8, 8)).astype(np.float32)
    np.save(tmp_path / "c.npy", data)
    calib = load_calibration(tmp_path / "c.npy", max_samples=6)
    assert calib.num_samples == 6
    np.testing.assert_array_equal(calib.inputs[0].numpy(), data[:6])
    matched = match_to_model(calib, EXAMPLE, ["x"])
    assert matched.num_samples == 6


def test_batches_static_drop_partial(tmp_path):
    np.save(tmp_path / "c.npy", np.zeros((10, 3), np.float32))
    calib = load_calibration(tmp_path / "c.npy")
    assert [b[0].shape[0] for b in calib.batches(4)] == [4, 4, 2]
    assert [b[0].shape[0] for b in calib.batches(4, static=True)] == [4, 4]


def test_npz_matched_by_name(tmp_path):
    a, b = np.ones((5, 3), np.float32), np.zeros((5, 7), np.float32)
    np.savez(tmp_path / "c.npz", second=b, first=a)
    calib = load_calibration(tmp_path / "c.npz")
    matched = match_to_model(calib, (torch.zeros(1, 3), torch.zeros(1, 7)), ["first", "second"])
    assert matched.inputs[0].shape == (5, 3) and matched.inputs[1].shape == (5, 7)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((4, 4, 8, 8), np.float64), "dtype float64 but the model expects float32"),
        (np.zeros((4, 3, 8, 8), np.float32), "sample shape 3x8x8 but the model expects 4x8x8"),
        (np.zeros((4, 4, 8), np.float32), "sample shape 4x8"),
    ],
)
def test_mismatch_errors(tmp_path, array, message):
    np.save(tmp_path / "c.npy", array)
    with pytest.raises(SparseCompileError, match=message):
        match_to_model(load_calibration(tmp_path / "c.npy"), EXAMPLE, ["x"])


def test_wrong_array_count(tmp_path):
    np.savez(tmp_path / "c.npz", a=np.zeros((2, 4, 8, 8), np.float32), b=np.zeros((2, 1), np.float32))
    with pytest.raises(SparseCompileError, match="2 array\\(s\\) but the model takes 1"):
        match_to_model(load_calibration(tmp_path / "c.npz"), EXAMPLE, ["x"])


def test_unreadable_files(tmp_path):
    with pytest.raises(SparseCompileError, match="does not exist"):
        load_calibration(tmp_path / "missing.npy")
    (tmp_path / "junk.npy").write_bytes(b"junk")
    with pytest.raises(SparseCompileError, match="cannot read"):
        load_calibration(tmp_path / "junk.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(SparseCompileError, match="pickled"):
        load_calibration(tmp_path / "obj.npy")
    np.savez(tmp_path / "uneven.npz", a=np.zeros((2, 1)), b=np.zeros((3, 1)))
    with pytest.raises(SparseCompileError, match="different sample counts"):
        load_calibration(tmp_path / "uneven.npz")


def test_random_calibration_matches_example():
    calib = random_calibration((torch.zeros(1, 3, 5), torch.zeros(1, 2, dtype=torch.int64)), samples=6)
    assert calib.inputs[0].shape == (6, 3, 5) and calib.inputs[0].dtype == torch.float32
    assert calib.inputs[1].dtype == torch.int64


# --- image directories and callables ---------------------------------------------------------

def _write_images(folder, count=3, size=(6, 5), mode="RGB"):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    arrays = []
    for index in range(count):
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        array = rng.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(array, mode).save(folder / f"img{index}.png")
        arrays.append(array)
    return np.stack(arrays)


def test_image_directory_with_preprocess(tmp_path):
    pytest.importorskip("PIL")  # installed with the [test] extra; this guards local runs without it
    from sparsecompile.calibration import parse_preprocess

    raw = _write_images(tmp_path / "imgs")
    preprocess = parse_preprocess("mean=0.5,0.4,0.3 std=0.2,0.2,0.25 layout=nchw")
    calib = load_calibration(tmp_path / "imgs", preprocess=preprocess)
    expected = ((raw / 255.0 - [0.5, 0.4, 0.3]) / [0.2, 0.2, 0.25]).transpose(0, 3, 1, 2)
    assert calib.inputs[0].shape == (3, 3, 5, 6) and calib.inputs[0].dtype == torch.float32
    np.testing.assert_allclose(calib.inputs[0].numpy(), expected, rtol=1e-5, atol=1e-5)
    resized = load_calibration(tmp_path / "imgs", 2, parse_preprocess("resize=4,8 channels=1 layout=nhwc"))
    assert resized.inputs[0].shape == (2, 4, 8, 1)


def test_image_directory_errors(tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    from sparsecompile.calibration import parse_preprocess

    (tmp_path / "empty").mkdir()
    with pytest.raises(SparseCompileError, match="holds no images"):
        load_calibration(tmp_path / "empty")
    _write_images(tmp_path / "mixed")
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(tmp_path / "mixed" / "z.png")
    with pytest.raises(SparseCompileError, match="resize=H,W"):
        load_calibration(tmp_path / "mixed")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
    with pytest.raises(SparseCompileError, match="cannot read calibration image"):
        load_calibration(tmp_path / "broken")
    for bad in ("resize=a,b", "layout=chw", "std=0", "colour=red"):
        with pytest.raises(SparseCompileError, match="--preprocess"):
            parse_preprocess(bad)


def make_batches():
    """``--calib test_calibration:make_batches``: three batches of two named inputs."""
    for index in range(3):
        yield {"first": np.full((4, 3), index, np.float32), "second": torch.zeros(4, 7)}


def failing_batches():
    raise RuntimeError("no data today")


def test_callable_source(monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    calib = load_calibration("test_calibration:make_batches", max_samples=10)
    assert calib.keys == ("first", "second") and calib.num_samples == 10
    assert calib.inputs[0][:, 0].tolist() == [0] * 4 + [1] * 4 + [2] * 2
    matched = match_to_model(calib, (torch.zeros(1, 7), torch.zeros(1, 3)), ["second", "first"])
    assert matched.inputs[0].shape == (10, 7)
    with pytest.raises(SparseCompileError, match="no data today"):
        load_calibration("test_calibration:failing_batches")
    with pytest.raises(SparseCompileError, match="cannot import"):
        load_calibration("no_such_pkg_zz:fn")
