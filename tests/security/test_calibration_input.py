"""Calibration input and "nothing broken is reported as fine" (issue 17, item 4 and the .npy header item).

NaN/Inf calibration samples used to give a model whose outputs were all NaN (bias correction wrote NaN
into biases) from a build that exited 0 reporting "agreement 10.94%"; all-NaN data reported 100%.
A .npy whose header claimed 2^40 samples ended in "unexpected MemoryError ... bug".
"""

from __future__ import annotations

import io
import struct
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsecompile.build import BuildOptions, build
from sparsecompile.calibration import load_calibration, parse_preprocess
from sparsecompile.errors import SparseCompileError
from sparsecompile.verify import compare_outputs

from helpers import cli, one_line_failure

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _calib(n=48, seed=2):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed)).numpy()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _npy_with_shape(shape, dtype="<f4", payload: bytes = b"\0" * 64) -> bytes:
    """A .npy whose header claims ``shape`` followed by ``payload`` (usually far less data)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": tuple(shape)})
    return buffer.getvalue() + payload


# --- non-finite samples -------------------------------------------------------------------------------


def test_nan_and_inf_samples_in_npy_are_refused_with_count_and_first_index(tmp_path):
    data = _calib()
    data[5, 0, 0, 0] = np.nan
    data[9] = np.inf
    data[30, 3, 7, 7] = -np.inf
    np.save(tmp_path / "bad.npy", data)
    with pytest.raises(SparseCompileError, match=r"3 calibration sample\(s\).*NaN or Inf.*first at index 5"):
        load_calibration(tmp_path / "bad.npy")
    # --calib-samples past the bad ones: only the samples used count
    assert load_calibration(tmp_path / "bad.npy", max_samples=5).num_samples == 5


def test_nan_calibration_build_fails_on_the_cli_and_writes_nothing(tmp_path, model_files):
    data = _calib()
    data[7, 1, 2, 3] = np.nan
    np.save(tmp_path / "nan.npy", data)
    np.save(tmp_path / "allnan.npy", np.full_like(data, np.nan))
    for name in ("nan.npy", "allnan.npy"):
        out = tmp_path / f"out-{name}"
        result = cli("build", model_files / "dynamic.pt2", "--calib", tmp_path / name, "-o", out, "--min-weights", 0)
        one_line_failure(result, "NaN or Inf", "first at index")
        assert not out.exists()
        assert not list(tmp_path.glob(".*partial*"))


def test_nan_in_one_npz_member_is_refused(tmp_path):
    second = np.zeros((6, 3), np.float32)
    second[4, 1] = np.nan
    np.savez(tmp_path / "two.npz", first=np.zeros((6, 2), np.float32), second=second)
    with pytest.raises(SparseCompileError, match=r"1 calibration sample\(s\).*first at index 4"):
        load_calibration(tmp_path / "two.npz")


def test_nan_from_a_calibration_callable_is_refused(tmp_path, monkeypatch):
    (tmp_path / "nan_batches_zz.py").write_text(
        "import numpy as np\n"
        "def batches():\n"
        "    for i in range(3):\n"
        "        x = np.zeros((4, 3), np.float32)\n"
        "        if i == 2:\n"
        "            x[1, 0] = np.inf\n"
        "        yield x\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SparseCompileError, match=r"1 calibration sample\(s\).*first at index 9"):
        load_calibration("nan_batches_zz:batches")


def test_image_preprocess_with_non_finite_numbers_is_refused():
    for text in ("scale=nan", "mean=0.5,inf,0.5", "std=nan"):
        with pytest.raises(SparseCompileError, match="finite"):
            parse_preprocess(text)


def test_image_directory_giving_non_finite_values_is_refused(tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((4, 4, 3), 10 * i, np.uint8)).save(tmp_path / f"{i}.png")
    # 1e39 overflows float32: every pixel becomes inf
    with pytest.raises(SparseCompileError, match="NaN or Inf"):
        load_calibration(tmp_path, preprocess=parse_preprocess("scale=1e39"))


# --- verification refuses what it used to report as fine -----------------------------------------------


def test_all_nan_outputs_never_count_as_agreeing():
    nan = torch.full((8, 10), float("nan"))
    finite = torch.randn(8, 10)
    for reference, candidate in ((nan, nan), (finite, nan)):
        entry = compare_outputs([reference], [candidate])[0]
        assert entry["top1_agreement"] == 0.0, entry
    half = finite.clone()
    half[:4] = float("nan")
    assert compare_outputs([finite], [half])[0]["top1_agreement"] == 0.5


def test_comparison_reports_new_non_finite_outputs_as_infinite_error():
    reference = torch.randn(4, 10)
    candidate = reference.clone()
    candidate[2, 3] = float("nan")
    entry = compare_outputs([reference], [candidate])[0]
    assert entry["relative_error"] == float("inf") and entry["max_abs_error"] == float("inf")
    assert entry["nonfinite_candidate"] == 1 and entry["nonfinite_reference"] == 0


def test_build_fails_when_the_sparse_model_outputs_nan_where_the_dense_did_not(tmp_path, model_files, monkeypatch):
    """Any route to a NaN-producing sparse model (here: a poisoned bias after masking) fails the build."""
    import sparsecompile.build as build_module
    from sparsecompile.graph import get_tensor, set_tensor

    real_sparsify = build_module.sparsify

    def poisoned(gm, *args, **kwargs):
        result = real_sparsify(gm, *args, **kwargs)
        bias = get_tensor(gm, "fc2.bias")
        set_tensor(gm, "fc2.bias", torch.full_like(bias, float("nan")))
        return result

    monkeypatch.setattr(build_module, "sparsify", poisoned)
    out = tmp_path / "out"
    with pytest.raises(SparseCompileError, match=r"NaN or Inf.*48 of 48 calibration sample"):
        build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(out),
                           calib=str(model_files / "calib.npy"), min_weights=0, permute=False,
                           method="magnitude", max_drop=None))  # no accuracy guard: it would restore fc2
    assert not out.exists()


def test_statistics_correction_never_writes_a_non_finite_bias(model_files):
    """Second line of defence: NaN activations reaching the correction are refused, naming the layer."""
    from sparsecompile.frontend import load_model
    from sparsecompile.layers import find_layers
    from sparsecompile.masks import get_method
    from sparsecompile.passes import FoldBatchNorm, PassContext, PassManager
    from sparsecompile.sparsify import sparsify

    loaded = load_model(str(model_files / "dynamic.pt2"))
    manager = PassManager([FoldBatchNorm()])
    gm = manager.run(loaded.module, PassContext(example_inputs=loaded.example_inputs))
    folded = manager.outputs(FoldBatchNorm.name)
    layers = find_layers(gm, min_weights=0)
    data = torch.from_numpy(_calib(16))
    data[3] = float("nan")
    for mode in ("bias", "bn"):
        with pytest.raises(SparseCompileError, match=r"statistics correction .*'conv1'.*non-finite"):
            sparsify(gm, [layer for layer in layers if layer.reason is None], layers, get_method("magnitude"),
                     [(data,)], correct=mode, folded_batchnorm=folded)


# --- array files whose headers lie or are huge ----------------------------------------------------------


def test_npy_header_claiming_2_to_the_40_samples_is_refused(tmp_path):
    path = tmp_path / "huge.npy"
    path.write_bytes(_npy_with_shape((2 ** 40, 4, 8, 8)))
    with pytest.raises(SparseCompileError, match=r"header.*bytes.*file"):
        load_calibration(path)
    with pytest.raises(SparseCompileError, match=r"header.*bytes.*file"):
        load_calibration(path, max_samples=2)


def test_npy_header_lie_on_the_cli_is_a_one_line_error(tmp_path, model_files):
    path = tmp_path / "huge.npy"
    path.write_bytes(_npy_with_shape((2 ** 40, 4, 8, 8)))
    result = cli("build", model_files / "dynamic.pt2", "--calib", path, "-o", tmp_path / "out")
    one_line_failure(result, "huge.npy", "header")


def test_calib_samples_is_applied_before_reading_the_whole_file(tmp_path):
    data = np.random.default_rng(0).standard_normal((2000, 4, 16, 16), dtype=np.float32)  # 8 MB
    np.save(tmp_path / "big.npy", data)
    del data
    tracemalloc.start()
    try:
        calib = load_calibration(tmp_path / "big.npy", max_samples=3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert calib.num_samples == 3 and calib.inputs[0].shape == (3, 4, 16, 16)
    assert peak < 1_000_000, peak  # a few samples, not the 8 MB file
    np.testing.assert_array_equal(calib.inputs[0].numpy(), np.load(tmp_path / "big.npy")[:3])
    assert calib.inputs[0].numpy().flags.writeable  # a copy, not a read-only map of the file


def test_fortran_order_npy_still_loads(tmp_path):
    data = np.asfortranarray(_calib(10))
    np.save(tmp_path / "f.npy", data)
    np.testing.assert_array_equal(load_calibration(tmp_path / "f.npy", max_samples=4).inputs[0].numpy(), data[:4])


def test_npz_member_header_larger_than_its_zip_entry_is_refused(tmp_path):
    path = tmp_path / "lie.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", _npy_with_shape((2 ** 40, 4, 8, 8)))
    with pytest.raises(SparseCompileError, match=r"'x'.*header.*bytes"):
        load_calibration(path)


def test_npz_member_with_an_absurd_declared_size_is_refused(tmp_path):
    """A member whose zip entry declares ~4 GB from a few hundred compressed bytes (consistent header)."""
    declared = 0xF0000000
    header = _npy_with_shape((1,), payload=b"")
    count = (declared - len(header)) // 4
    member = _npy_with_shape((count,), payload=b"\0" * 400)
    declared = len(_npy_with_shape((count,), payload=b"")) + 4 * count
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", member)
    raw = bytearray(path.read_bytes())
    # patch the uncompressed size in the local header (offset 22) and the central directory entry (offset 24)
    local = raw.find(b"PK\x03\x04")
    struct.pack_into("<I", raw, local + 22, declared)
    central = raw.find(b"PK\x01\x02")
    struct.pack_into("<I", raw, central + 24, declared)
    path.write_bytes(bytes(raw))
    assert zipfile.ZipFile(path).getinfo("x.npy").file_size == declared
    with pytest.raises(SparseCompileError, match=r"'x'.*declares"):
        load_calibration(path, max_samples=2)


def test_npz_calib_samples_reads_only_the_samples_used(tmp_path):
    data = np.random.default_rng(1).standard_normal((2000, 1024), dtype=np.float32)  # 8 MB
    np.savez_compressed(tmp_path / "big.npz", x=data)
    tracemalloc.start()
    try:
        calib = load_calibration(tmp_path / "big.npz", max_samples=3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(calib.inputs[0].numpy(), data[:3])
    assert peak < 2_000_000, peak


def test_pickled_arrays_are_still_refused(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(SparseCompileError, match="pickled"):
        load_calibration(tmp_path / "obj.npy")
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(SparseCompileError, match="pickled"):
        load_calibration(tmp_path / "obj.npz")


def test_no_np_load_in_the_package_allows_pickle():
    root = Path(__import__("sparsecompile").__file__).parent
    for path in root.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "np.load(" in line or "numpy.load(" in line:
                assert "allow_pickle=False" in line, f"{path}:{number}: {line.strip()}"


def test_pickled_labels_are_a_one_line_error(tmp_path, model_files):
    """--labels went through a bare np.load: a pickled file was 'unexpected ValueError ... bug'."""
    np.save(tmp_path / "labels.npy", np.array([{"a": 1}] * 48, dtype=object), allow_pickle=True)
    result = cli("build", model_files / "dynamic.pt2", "--calib", model_files / "calib.npy", "-o", tmp_path / "out",
                  "--method", "gumbel", "--max-steps", 1, "--labels", tmp_path / "labels.npy",
                  "--learn-option", "init=random", "--max-drop", "none", "--min-weights", 0)
    one_line_failure(result, "labels.npy", "pickled")
    assert not (tmp_path / "out").exists()


def test_labels_are_checked_like_calibration_arrays(tmp_path):
    from sparsecompile.calibration import load_labels

    np.save(tmp_path / "ok.npy", np.arange(6, dtype=np.int32))
    assert load_labels(tmp_path / "ok.npy").dtype == torch.int64
    np.save(tmp_path / "float.npy", np.array([0.0, np.nan, 1.0]))
    with pytest.raises(SparseCompileError, match="integer"):
        load_labels(tmp_path / "float.npy")
    (tmp_path / "huge.npy").write_bytes(_npy_with_shape((2 ** 40,), dtype="<i8"))
    with pytest.raises(SparseCompileError, match="header"):
        load_labels(tmp_path / "huge.npy")
