"""Property tests for the compressed N:M weight format (sparsecompile.compress)."""

from __future__ import annotations

import math
import os
import struct
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsecompile.compress import (
    CompressedTensor,
    compress,
    decompress,
    from_gemm_view,
    gemm_view,
    load_weights,
    save_weights,
    size_summary,
)
from sparsecompile.errors import SparseCompileError

PATTERNS = [(2, 4), (1, 4), (4, 8), (8, 16)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT_VIEW = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype])


# --------------------------------------------------------------------------
# Independent reference: Python loops over groups and big-int bit packing.
# --------------------------------------------------------------------------


def reference_compress(weight: torch.Tensor, axis: int, n: int, m: int):
    """Returns (values [rows, G*n], positions list, packed bytes, expected dense)."""
    axis %= weight.dim()
    matrix = weight.movedim(axis, -1).reshape(-1, weight.shape[axis])
    rows, k = matrix.shape
    values = torch.empty(rows, (k // m) * n, dtype=weight.dtype)
    expected = torch.zeros_like(matrix)
    positions = []
    for r in range(rows):
        for g in range(k // m):
            group = matrix[r, g * m:(g + 1) * m]
            nonzero = [p for p in range(m) if group[p].item() != 0]
            assert len(nonzero) <= n
            fillers = [p for p in range(m) if p not in nonzero][: n - len(nonzero)]
            kept = sorted(nonzero + fillers)
            for s, p in enumerate(kept):
                values[r, g * n + s] = group[p]
                expected[r, g * m + p] = group[p]
            positions.extend(kept)
    index_bits = math.ceil(math.log2(m))
    stream = 0
    for i, p in enumerate(positions):
        stream |= p << (i * index_bits)
    packed = stream.to_bytes((len(positions) * index_bits + 7) // 8, "little")
    moved = tuple(s for i, s in enumerate(weight.shape) if i != axis) + (weight.shape[axis],)
    return values, positions, packed, expected.reshape(moved).movedim(-1, axis)


# --------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------


@st.composite
def nm_weights(draw, dtypes=DTYPES, patterns=PATTERNS, max_groups=3):
    """An N:M-sparse weight with some groups holding fewer than n nonzeros."""
    n, m = draw(st.sampled_from(patterns))
    dtype = draw(st.sampled_from(dtypes))
    rank = draw(st.integers(2, 4))
    axis = draw(st.integers(0, rank - 1))
    shape = [draw(st.integers(1, 3)) for _ in range(rank)]
    shape[axis] = m * draw(st.integers(1, max_groups))
    seed = draw(st.integers(0, 2**31 - 1))
    all_zero = draw(st.booleans()) and draw(st.booleans())
    scale = draw(st.sampled_from([1e-6, 1.0, 100.0]))

    gen = torch.Generator().manual_seed(seed)
    dense = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    groups = gemm_view(dense, axis).reshape(-1, shape[axis] // m, m)
    # Per group: keep between 0 and n randomly chosen positions.
    keep_count = torch.randint(0, n + 1, groups.shape[:2], generator=gen)
    rank_in_group = torch.rand(groups.shape, generator=gen).argsort(-1).argsort(-1)
    mask = rank_in_group < keep_count.unsqueeze(-1)
    if all_zero:
        mask.zero_()
    # Mix +0.0 and -0.0 so sign handling of dropped vs. kept zeros is exercised.
    zero = torch.where(torch.rand(groups.shape, generator=gen) < 0.5, -0.0, 0.0).to(dtype)
    groups = torch.where(mask, groups, zero)
    weight = from_gemm_view(groups.reshape(-1, shape[axis]), shape, axis).contiguous()
    if draw(st.booleans()):
        axis -= rank  # negative axes must work the same way
    return weight, axis, n, m


# --------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------


@SETTINGS
@given(nm_weights())
def test_round_trip_is_exact_and_matches_reference(case):
    weight, axis, n, m = case
    ct = compress(weight, axis, n=n, m=m)
    ref_values, _, ref_packed, expected = reference_compress(weight, axis, n, m)

    assert ct.shape == tuple(weight.shape)
    assert ct.reduction_axis == axis % weight.dim()
    assert (ct.n, ct.m, ct.dtype) == (n, m, weight.dtype)
    assert ct.indices.dtype == torch.uint8 and ct.indices.dim() == 1
    assert torch.equal(bits(ct.values), bits(ref_values))
    assert ct.indices.numpy().tobytes() == ref_packed

    restored = decompress(ct)
    assert restored.dtype == weight.dtype and restored.shape == weight.shape
    assert torch.equal(restored, weight)
    # Bitwise: identical except dropped zeros, which come back as +0.0.
    assert torch.equal(bits(restored), bits(expected))


@SETTINGS
@given(nm_weights(max_groups=2))
def test_all_zero_weight_keeps_first_n_positions(case):
    weight, axis, n, m = case
    weight = torch.zeros_like(weight)
    ct = compress(weight, axis, n=n, m=m)
    _, positions, packed, _ = reference_compress(weight, axis, n, m)
    assert positions == list(range(n)) * (len(positions) // n)
    assert ct.indices.numpy().tobytes() == packed
    assert torch.equal(bits(decompress(ct)), bits(weight))


def test_kept_filler_zero_keeps_its_sign_and_dropped_zero_becomes_positive():
    weight = torch.tensor([[-0.0, -0.0, 3.0, -0.0]], dtype=torch.float16)
    ct = compress(weight, 1)
    # Slots: the nonzero at 2 plus the lowest-index zero (position 0, -0.0).
    assert bits(ct.values).tolist() == bits(torch.tensor([[-0.0, 3.0]], dtype=torch.float16)).tolist()
    restored = decompress(ct)
    assert bits(restored).tolist() == bits(torch.tensor([[-0.0, 0.0, 3.0, 0.0]], dtype=torch.float16)).tolist()


def test_nan_and_inf_count_as_nonzero_and_survive():
    weight = torch.tensor([[float("nan"), 0, 0, float("-inf")]], dtype=torch.float32)
    ct = compress(weight, 1)
    assert torch.equal(bits(decompress(ct)), bits(weight))
    with pytest.raises(SparseCompileError):
        compress(torch.tensor([[float("nan"), 1.0, 0, float("inf")]]), 1)


def test_float64_passes_through():
    weight = torch.tensor([[0.0, 1e-300, 0.0, -2.5]], dtype=torch.float64)
    ct = compress(weight, 1)
    assert ct.dtype == torch.float64
    assert torch.equal(bits(decompress(ct)), bits(weight))


def test_conv_groups_are_consecutive_input_channels_at_one_kernel_position():
    out_ch, in_ch, kh, kw = 3, 8, 2, 3
    weight = torch.zeros(out_ch, in_ch, kh, kw)
    gen = torch.Generator().manual_seed(0)
    for o in range(out_ch):
        for y in range(kh):
            for x in range(kw):
                for g in range(in_ch // 4):
                    chosen = torch.randperm(4, generator=gen)[:2] + 4 * g
                    weight[o, chosen, y, x] = torch.randn(2, generator=gen)
    ct = compress(weight, 1)
    view = gemm_view(weight, 1)
    assert view.shape == (out_ch * kh * kw, in_ch)
    assert torch.equal(view[0], weight[0, :, 0, 0])
    assert torch.equal(view[1], weight[0, :, 0, 1])
    assert torch.equal(from_gemm_view(view, weight.shape, 1), weight)
    # Row 0 of the values is the nonzeros of weight[0, :, 0, 0] in channel order.
    column = weight[0, :, 0, 0]
    assert torch.equal(ct.values[0], column[column != 0])
    assert torch.equal(decompress(ct), weight)


def test_matmul_operand_stored_as_k_by_n_uses_axis_0():
    k, n_out = 8, 3
    weight_t = torch.zeros(n_out, k)
    weight_t[:, [0, 3, 5, 6]] = torch.randn(n_out, 4)
    weight = weight_t.t().contiguous()  # [K, N]
    ct = compress(weight, 0)
    assert ct.values.shape == (n_out, 4)
    assert torch.equal(decompress(ct), weight)
    with pytest.raises(SparseCompileError):
        compress(weight, 1)  # axis 1 (length 3) is N, not the reduction axis


def test_large_weight_round_trip_hits_the_size_floor():
    # Speed lives in benchmarks/; here only exactness and the 0.5625 floor on a real-sized layer.
    rows, k = 2048, 4608
    gen = torch.Generator().manual_seed(1)
    groups = torch.randn(rows, k // 4, 4, generator=gen)
    keep = torch.rand(groups.shape, generator=gen).argsort(-1).argsort(-1) < 2
    weight = (groups * keep).reshape(rows, k).half()
    ct = compress(weight, 1)
    restored = decompress(ct)
    assert torch.equal(restored, weight)
    assert ct.nbytes == ct.dense_nbytes() * 0.5625


# --------------------------------------------------------------------------
# Rejections
# --------------------------------------------------------------------------


@SETTINGS
@given(nm_weights(), st.data())
def test_rejects_weight_that_is_not_nm_sparse(case, data):
    weight, axis, n, m = case
    groups = gemm_view(weight, axis).reshape(-1, weight.shape[axis] // m, m).clone()
    row = data.draw(st.integers(0, groups.shape[0] - 1))
    group = data.draw(st.integers(0, groups.shape[1] - 1))
    groups[row, group, : n + 1] = 1.0
    bad = from_gemm_view(groups.reshape(-1, weight.shape[axis]), weight.shape, axis)
    with pytest.raises(SparseCompileError, match=rf"not {n}:{m} sparse.*1 of {groups.shape[0] * groups.shape[1]} groups"):
        compress(bad, axis, n=n, m=m)


def test_violation_message_names_first_offending_group():
    weight = torch.zeros(2, 8, 3, 3)
    weight[1, 4:7, 2, 0] = 1.0
    weight[1, 0:4, 2, 1] = 1.0
    with pytest.raises(SparseCompileError) as info:
        compress(weight, 1)
    message = str(info.value)
    assert "\n" not in message
    assert "2 of 36 groups" in message
    assert "(1, 4, 2, 0)" in message  # row-major first: kernel position (2, 0) comes before (2, 1)


@pytest.mark.parametrize("k,m", [(6, 4), (4, 8), (12, 8), (3, 2)])
def test_rejects_reduction_length_not_multiple_of_m(k, m):
    with pytest.raises(SparseCompileError, match="not a multiple"):
        compress(torch.zeros(2, k), 1, n=1, m=m)


@pytest.mark.parametrize("n,m", [(4, 4), (5, 4), (0, 4), (-1, 4)])
def test_rejects_invalid_pattern(n, m):
    with pytest.raises(SparseCompileError):
        compress(torch.zeros(2, 8), 1, n=n, m=m)


def test_rejects_bad_axis_and_dtype():
    with pytest.raises(SparseCompileError):
        compress(torch.zeros(2, 8), 2)
    with pytest.raises(SparseCompileError):
        compress(torch.zeros(2, 8, dtype=torch.int32), 1)


# --------------------------------------------------------------------------
# Packing, by hand
# --------------------------------------------------------------------------


def test_hand_written_2_4_fp16_row():
    weight = torch.tensor([[0, 1.5, 0, -2, 0, 0, 0.25, 0]], dtype=torch.float16)
    ct = compress(weight, 1)
    # values: 1.5, -2.0 | filler 0.0 (position 0), 0.25 -- fp16 little-endian.
    assert ct.values.contiguous().view(torch.uint8).numpy().tobytes() == bytes(
        [0x00, 0x3E, 0x00, 0xC0, 0x00, 0x00, 0x00, 0x34]
    )
    # positions 1, 3, 0, 2 -> 0b10_00_11_01
    assert ct.indices.tolist() == [0b10001101]
    assert ct.nbytes == 9 and ct.dense_nbytes() == 16


def test_hand_written_4_8_three_bit_indices():
    weight = torch.zeros(1, 8)
    weight[0, [1, 2, 5, 7]] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ct = compress(weight, 1, n=4, m=8)
    # 3-bit positions 1, 2, 5, 7: bits 0-2 = 1, 3-5 = 2, 6-8 = 5, 9-11 = 7, 4 zero pad bits.
    # byte 0 = 001 | 010<<3 | (101 & 0b11)<<6 = 0x51; byte 1 = 101>>2 | 111<<1 = 0x0F
    assert ct.indices.tolist() == [0x51, 0x0F]
    assert ct.index_bits == 3


def test_hand_written_1_4_across_rows_and_8_16():
    weight = torch.zeros(2, 8)
    weight[0, 5] = 1.0
    ct = compress(weight, 1, n=1, m=4)
    # slots: row 0 -> positions 0 (all-zero group), 1; row 1 -> 0, 0
    assert ct.indices.tolist() == [0b00000100]

    weight = torch.zeros(1, 16)
    weight[0, [0, 3, 4, 9, 10, 11, 14, 15]] = 1.0
    ct = compress(weight, 1, n=8, m=16)
    assert ct.indices.tolist() == [0x30, 0x94, 0xBA, 0xFE]


# --------------------------------------------------------------------------
# Size accounting
# --------------------------------------------------------------------------


@SETTINGS
@given(nm_weights())
def test_index_bytes_formula(case):
    weight, axis, n, m = case
    ct = compress(weight, axis, n=n, m=m)
    rows = weight.numel() // weight.shape[axis]
    groups = weight.shape[axis] // m
    index_bits = math.ceil(math.log2(m))
    assert ct.index_bits == index_bits
    assert ct.indices.numel() == math.ceil(rows * groups * n * index_bits / 8)
    assert ct.nbytes == rows * groups * n * weight.element_size() + ct.indices.numel()
    assert ct.dense_nbytes() == weight.numel() * weight.element_size()
    assert ct.dense_nbytes(torch.float16) == weight.numel() * 2


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 5), st.integers(1, 4))
def test_2_4_fp16_ratio_is_exactly_0_5625_for_even_group_count(rows, half_groups, kernel):
    weight = torch.zeros(rows, 8 * half_groups, kernel, dtype=torch.float16)
    ct = compress(weight, 1)
    assert (rows * 2 * half_groups * kernel) % 2 == 0
    assert ct.nbytes / ct.dense_nbytes() == 0.5625
    summary = size_summary({"a": ct, "b": compress(weight.float(), 1)})
    assert summary["dense_fp16_bytes"] == 2 * weight.numel() * 2
    assert summary["dense_bytes"] == weight.numel() * 2 + weight.numel() * 4
    assert summary["compressed_bytes"] == ct.nbytes + compress(weight.float(), 1).nbytes
    assert summary["ratio_vs_dense"] == summary["compressed_bytes"] / summary["dense_bytes"]
    assert summary["ratio_vs_dense_fp16"] == summary["compressed_bytes"] / summary["dense_fp16_bytes"]


def test_odd_group_count_pays_one_padding_nibble():
    ct = compress(torch.zeros(1, 4, dtype=torch.float16), 1)
    assert ct.indices.numel() == 1
    assert ct.nbytes == 4 + 1


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    st.lists(nm_weights(max_groups=2), min_size=1, max_size=3),
    st.sampled_from(DTYPES),
    st.one_of(st.none(), st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3)),
)
def test_file_round_trip(cases, dense_dtype, user):
    sparse = {f"layer{i}.weight": compress(w, a, n=n, m=m) for i, (w, a, n, m) in enumerate(cases)}
    dense = {
        "layer0.bias": torch.randn(5).to(dense_dtype),
        "embed": torch.randn(3, 4).to(dense_dtype)[:, 1:],  # non-contiguous
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.safetensors")
        save_weights(path, sparse, dense, user)
        assert os.listdir(tmp) == ["model.safetensors"]  # no temp file left behind
        loaded_sparse, loaded_dense, loaded_user = load_weights(path)

    assert loaded_user == user
    assert set(loaded_sparse) == set(sparse)
    for name, ct in sparse.items():
        got = loaded_sparse[name]
        assert (got.shape, got.reduction_axis, got.n, got.m, got.dtype) == (
            ct.shape, ct.reduction_axis, ct.n, ct.m, ct.dtype
        )
        assert torch.equal(bits(got.values), bits(ct.values))
        assert torch.equal(got.indices, ct.indices)
        assert torch.equal(bits(decompress(got)), bits(decompress(ct)))
    assert set(loaded_dense) == set(dense)
    for name, tensor in dense.items():
        assert torch.equal(bits(loaded_dense[name]), bits(tensor))


def test_save_overwrites_atomically_and_header_is_documented_json(tmp_path):
    import json

    from safetensors import safe_open

    path = tmp_path / "w.safetensors"
    path.write_bytes(b"old")
    ct = compress(torch.tensor([[0, 1.5, 0, -2, 0, 0, 0.25, 0]], dtype=torch.float16), 1)
    save_weights(path, {"fc.weight": ct}, {"fc.bias": torch.zeros(1)}, {"model": "tiny"})
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["sparsecompile"])
        assert set(handle.keys()) == {"fc.weight.values", "fc.weight.indices", "fc.bias"}
    assert header == {
        "format": "sparsecompile-nm",
        "version": 1,
        "sparse": {"fc.weight": {"shape": [1, 8], "reduction_axis": 1, "n": 2, "m": 4, "dtype": "float16"}},
        "dense": ["fc.bias"],
        "user": {"model": "tiny"},
    }


def _saved_file(tmp_path):
    ct = compress(torch.tensor([[0, 1.5, 0, -2, 0, 0, 0.25, 0]] * 3, dtype=torch.float16), 1)
    path = tmp_path / "w.safetensors"
    save_weights(path, {"fc.weight": ct}, {"fc.bias": torch.ones(3)})
    return path


def test_truncated_file_rejected(tmp_path):
    data = _saved_file(tmp_path).read_bytes()
    for cut in (0, 4, 8, 40, len(data) // 2, len(data) - 1):
        truncated = tmp_path / f"cut{cut}.safetensors"
        truncated.write_bytes(data[:cut])
        with pytest.raises(SparseCompileError):
            load_weights(truncated)


@settings(max_examples=20, deadline=None)
@given(st.binary(min_size=0, max_size=300))
def test_random_bytes_rejected(blob):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "junk.bin")
        with open(path, "wb") as f:
            f.write(blob)
        with pytest.raises(SparseCompileError):
            load_weights(path)


def test_plain_safetensors_and_missing_file_rejected(tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(SparseCompileError, match="not a sparsecompile weight file"):
        load_weights(plain)
    with pytest.raises(SparseCompileError, match="no such"):
        load_weights(tmp_path / "missing.safetensors")


def _rewrite(path, tensors, header_json):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"sparsecompile": header_json})


def test_missing_or_wrong_size_tensor_rejected(tmp_path):
    import json

    from safetensors import safe_open

    path = _saved_file(tmp_path)
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()["sparsecompile"]
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}

    broken = tmp_path / "broken.safetensors"
    _rewrite(broken, {k: v for k, v in tensors.items() if k != "fc.weight.indices"}, header)
    with pytest.raises(SparseCompileError, match="missing"):
        load_weights(broken)

    _rewrite(broken, {**tensors, "fc.weight.indices": tensors["fc.weight.indices"][:-1].clone()}, header)
    with pytest.raises(SparseCompileError, match="indices"):
        load_weights(broken)

    _rewrite(broken, {**tensors, "fc.weight.values": tensors["fc.weight.values"][:, :2].clone()}, header)
    with pytest.raises(SparseCompileError, match="values"):
        load_weights(broken)

    _rewrite(broken, {k: v for k, v in tensors.items() if k != "fc.bias"}, header)
    with pytest.raises(SparseCompileError, match="missing"):
        load_weights(broken)

    for field, value in (("format", "other"), ("version", 2)):
        bad_header = json.loads(header)
        bad_header[field] = value
        _rewrite(broken, tensors, json.dumps(bad_header))
        with pytest.raises(SparseCompileError):
            load_weights(broken)

    _rewrite(broken, tensors, "{not json")
    with pytest.raises(SparseCompileError):
        load_weights(broken)


def test_corrupt_indices_rejected_on_decompress():
    ct = compress(torch.tensor([[0, 1.5, 0, -2]], dtype=torch.float16), 1)
    repeated = CompressedTensor(
        values=ct.values, indices=torch.tensor([0b0101], dtype=torch.uint8),
        shape=ct.shape, reduction_axis=1, n=2, m=4,
    )
    with pytest.raises(SparseCompileError, match="corrupt"):
        decompress(repeated)


def test_struct_of_saved_file_starts_with_header_length(tmp_path):
    data = _saved_file(tmp_path).read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    assert data[8:9] == b"{" and 8 + header_len <= len(data)


def test_packing_is_numpy_little_endian_bit_order():
    # The documented decoder: numpy.unpackbits(bitorder="little") then weight bits.
    ct = compress(torch.tensor([[0, 0, 7, 0, 0, 0, 0, 0, 1, 2, 3, 0]], dtype=torch.float32), 1, n=3, m=4)
    raw = np.unpackbits(ct.indices.numpy(), bitorder="little")[: 9 * 2].reshape(-1, 2)
    positions = raw[:, 0] + 2 * raw[:, 1]
    assert positions.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2]


def test_documented_example_file_bytes(tmp_path):
    """The worked example in docs/format.md, byte for byte."""
    path = tmp_path / "tiny.safetensors"
    ct = compress(torch.tensor([[0, 1.5, 0, -2, 0, 0, 0.25, 0]], dtype=torch.float16), 1)
    save_weights(path, {"fc.weight": ct}, {"fc.bias": torch.tensor([0.5], dtype=torch.float16)}, {"model": "tiny"})
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    assert (len(data), header_len) == (483, 464)
    assert data[8 + header_len:] == bytes.fromhex("0038" "003e00c000000034" "8d")
