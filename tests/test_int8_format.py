"""INT8 entries of the compressed weight format (docs/format.md section 8): int8 values + indices + scales."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sparsecompile.compress import (
    CompressedTensor,
    compress,
    compress_int8,
    decompress,
    dequantize,
    load_weights,
    save_weights,
    size_summary,
)
from sparsecompile.errors import SparseCompileError
from sparsecompile.verify import count_nm_violations

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (shape, reduction axis, quantization axis): conv [O, I, kh, kw], Linear [O, I], MatMul B [K, N], per tensor
CASES = [((8, 8, 3, 3), 1, 0), ((6, 16), 1, 0), ((16, 6), 0, 1), ((4, 12), 1, None)]


def int8_nm(shape, axis, seed, n=2, m=4) -> torch.Tensor:
    """A random int8 weight that is n:m along ``axis``, with some groups sparser still (rounded-to-zero weights)."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(-127, 128, shape, generator=generator, dtype=torch.int16)
    moved = values.movedim(axis, -1)
    groups = moved.reshape(-1, m)
    keep = torch.rand(groups.shape, generator=generator).argsort(dim=1)[:, :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
    mask &= torch.rand(groups.shape, generator=generator) > 0.1
    return (groups * mask).reshape(moved.shape).movedim(-1, axis).to(torch.int8).contiguous()


def scales_for(shape, quant_axis, seed):
    generator = torch.Generator().manual_seed(seed)
    count = () if quant_axis is None else (shape[quant_axis],)
    scale = (torch.rand(count, generator=generator) * 0.05 + 1e-4).to(torch.float32)
    return scale, torch.zeros(count, dtype=torch.int8)


@pytest.mark.parametrize("shape,axis,quant_axis", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_file_round_trip_is_exact(tmp_path, shape, axis, quant_axis, seed):
    weight = int8_nm(shape, axis, seed)
    scale, zero_point = scales_for(shape, quant_axis, seed)
    ct = compress_int8(weight, axis, scale, zero_point, quant_axis)
    bias = torch.arange(shape[0], dtype=torch.int32) - 3
    save_weights(tmp_path / "w.safetensors", {"layer.weight_quantized": ct}, {"layer.bias_quantized": bias}, {"k": 1})
    sparse, dense, user = load_weights(tmp_path / "w.safetensors")
    back = sparse["layer.weight_quantized"]
    assert back.quantized and back.quant_axis == quant_axis and back.dtype == torch.int8
    assert torch.equal(decompress(back), weight)  # the int8 tensor, exactly
    assert back.scale.dtype == torch.float32 and torch.equal(back.scale.view(torch.int32), scale.view(torch.int32))
    assert torch.equal(back.zero_point, zero_point) and back.zero_point.dtype == torch.int8
    assert torch.equal(dense["layer.bias_quantized"], bias) and user == {"k": 1}
    assert torch.equal(dequantize(back).view(torch.int32), dequantize(ct).view(torch.int32))


@pytest.mark.parametrize("shape,axis,quant_axis", CASES)
def test_zeros_stay_zeros_and_the_int8_values_are_2_4(shape, axis, quant_axis):
    weight = int8_nm(shape, axis, 7)
    scale, zero_point = scales_for(shape, quant_axis, 7)
    ct = compress_int8(weight, axis, scale, zero_point, quant_axis)
    # two stored values per group of four, every zero of the weight still zero, 2:4 along the reduction axis
    assert ct.values.shape == (weight.numel() // shape[axis], shape[axis] // 2)
    restored = decompress(ct)
    assert torch.equal(restored == 0, weight == 0)
    assert count_nm_violations(restored.numpy(), axis, 2, 4) == 0
    assert torch.equal(dequantize(ct) == 0, weight == 0)  # zero point 0: a zero dequantizes to exactly 0.0


def test_dequantize_is_bit_equal_to_onnxruntime():
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    for shape, axis, quant_axis in CASES:
        weight = int8_nm(shape, axis, 3)
        scale, zero_point = scales_for(shape, quant_axis, 3)
        ct = compress_int8(weight, axis, scale, zero_point, quant_axis)
        node = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"],
                                **({"axis": quant_axis} if quant_axis is not None else {}))
        graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(weight.numpy(), "q"),
                                   numpy_helper.from_array(scale.numpy(), "s"),
                                   numpy_helper.from_array(zero_point.numpy(), "z")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        model.ir_version = 10
        ours = dequantize(ct).numpy()
        theirs = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
        assert theirs.dtype == np.float32 and np.array_equal(ours.view(np.int32), theirs.view(np.int32)), shape


def test_sizes_count_values_indices_and_scales():
    weight = int8_nm((64, 64), 1, 0)
    scale, zero_point = scales_for((64, 64), 0, 0)
    ct = compress_int8(weight, 1, scale, zero_point, 0)
    # per group of 4: 2 int8 values + 4 index bits = 2.5 bytes against 4; 64 * (4 + 1) bytes of scales both sides
    assert ct.nbytes == 64 * 32 + 64 * 64 // 8 + 64 * 5
    summary = size_summary({"w": ct})
    assert summary["dense_bytes"] == 64 * 64 + 64 * 5 and summary["scale_bytes"] == 64 * 5
    assert summary["int8_tensors"] == 1
    assert summary["ratio_vs_dense"] == pytest.approx((2560 + 320) / (4096 + 320))
    assert size_summary({"w": compress(torch.zeros(4, 8), 1)}).keys() == {
        "tensors", "compressed_bytes", "values_bytes", "indices_bytes", "dense_bytes", "dense_fp16_bytes",
        "ratio_vs_dense", "ratio_vs_dense_fp16"}  # float files: the summary as before


def _header(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["sparsecompile"]), {k: handle.get_tensor(k) for k in handle.keys()}


def test_version_2_only_for_files_with_int8_entries(tmp_path):
    float_only = tmp_path / "f.safetensors"
    save_weights(float_only, {"fc.weight": compress(torch.tensor([[0, 1.5, 0, -2.0]]), 1)}, {})
    assert _header(float_only)[0]["version"] == 1
    ct = compress_int8(int8_nm((4, 8), 1, 0), 1, *scales_for((4, 8), 0, 0), 0)
    mixed = tmp_path / "m.safetensors"
    save_weights(mixed, {"a.weight_quantized": ct, "b.weight": compress(torch.tensor([[0, 1.5, 0, -2.0]]), 1)}, {})
    header, tensors = _header(mixed)
    assert header["version"] == 2
    assert header["sparse"]["a.weight_quantized"] == {
        "shape": [4, 8], "reduction_axis": 1, "n": 2, "m": 4, "dtype": "int8",
        "quantization": {"axis": 0, "scale_dtype": "float32", "zero_point_dtype": "int8"}}
    assert "quantization" not in header["sparse"]["b.weight"]
    assert set(tensors) == {"a.weight_quantized.values", "a.weight_quantized.indices", "a.weight_quantized.scale",
                            "a.weight_quantized.zero_point", "b.weight.values", "b.weight.indices"}
    sparse, _, _ = load_weights(mixed)
    assert sparse["a.weight_quantized"].quantized and not sparse["b.weight"].quantized


def _one_line(excinfo, fragment):
    message = str(excinfo.value)
    assert "\n" not in message and fragment in message, message


def test_bad_int8_entries_are_refused_in_one_line(tmp_path):
    weight = int8_nm((8, 8), 1, 0)
    scale, zero_point = scales_for((8, 8), 0, 0)
    with pytest.raises(SparseCompileError) as excinfo:
        compress_int8(weight, 1, scale[:4], zero_point, 0)
    _one_line(excinfo, "scale has shape (4,)")
    for bad in (torch.full_like(scale, float("nan")), torch.zeros_like(scale), -scale):
        with pytest.raises(SparseCompileError) as excinfo:
            compress_int8(weight, 1, bad, zero_point, 0)
        _one_line(excinfo, "scale holds zero, negative or non-finite values")
    with pytest.raises(SparseCompileError) as excinfo:
        compress_int8(weight, 1, scale, zero_point.to(torch.uint8), 0)
    _one_line(excinfo, "zero point int8")
    with pytest.raises(SparseCompileError) as excinfo:
        compress_int8(weight.float(), 1, scale, zero_point, 0)
    _one_line(excinfo, "int8 values")
    with pytest.raises(SparseCompileError) as excinfo:  # int8 values alone mean nothing: their scales must travel
        save_weights(tmp_path / "x.safetensors", {"w": compress(weight, 1)}, {})
    _one_line(excinfo, "need their scales")
    with pytest.raises(SparseCompileError) as excinfo:
        dequantize(compress(weight.float(), 1))
    _one_line(excinfo, "INT8 entry")
    bad_pattern = weight.clone()
    bad_pattern[0, :4] = 1
    with pytest.raises(SparseCompileError) as excinfo:  # the int8 values must be 2:4 themselves
        compress_int8(bad_pattern, 1, scale, zero_point, 0)
    _one_line(excinfo, "not 2:4 sparse")


def test_corrupt_or_mismatched_int8_files_are_refused_in_one_line(tmp_path):
    from safetensors.torch import save_file

    ct = compress_int8(int8_nm((8, 8), 1, 0), 1, *scales_for((8, 8), 0, 0), 0)
    good = tmp_path / "good.safetensors"
    save_weights(good, {"w": ct}, {})
    header, tensors = _header(good)

    def rewritten(change_header=None, change_tensors=None, drop=()):
        h = json.loads(json.dumps(header))
        t = {k: v.clone() for k, v in tensors.items() if k not in drop}
        if change_header:
            change_header(h)
        if change_tensors:
            change_tensors(t)
        path = tmp_path / "bad.safetensors"
        save_file(t, str(path), metadata={"sparsecompile": json.dumps(h)})
        return path

    def refused(path, fragment):
        with pytest.raises(SparseCompileError) as excinfo:
            load_weights(path)
        _one_line(excinfo, fragment)

    refused(rewritten(drop=("w.scale",)), "'w.scale' is missing")
    refused(rewritten(change_tensors=lambda t: t.update({"w.scale": t["w.scale"][:4].clone()})), "scale has shape")
    refused(rewritten(change_tensors=lambda t: t["w.scale"].__setitem__(0, float("inf"))), "non-finite")
    refused(rewritten(change_tensors=lambda t: t.update({"w.zero_point": t["w.zero_point"].to(torch.int16)})),
            "zero point int8")
    refused(rewritten(change_tensors=lambda t: t.update({"w.values": t["w.values"].float()})), "header says int8")
    refused(rewritten(change_header=lambda h: h.update(version=1)), "needs format version 2")
    refused(rewritten(change_header=lambda h: h["sparse"]["w"]["quantization"].update(axis=5)), "quantization axis")
    refused(rewritten(change_header=lambda h: h["sparse"]["w"].pop("quantization")), "bad dtype")
    refused(rewritten(change_header=lambda h: h["sparse"]["w"]["quantization"].update(scale_dtype="float16")),
            "scale/zero point dtypes")
    # a float-only file claiming version 2 is refused too: the writer picks the version from the contents
    float_file = tmp_path / "f.safetensors"
    save_weights(float_file, {"fc.weight": compress(torch.tensor([[0, 1.5, 0, -2.0]]), 1)}, {})
    header, tensors = _header(float_file)
    refused(rewritten(change_header=lambda h: h.update(version=2)), "must hold INT8 entries")
    data = bytearray(good.read_bytes())
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(bytes(data[:-7]))
    refused(truncated, "corrupt or truncated")


def test_a_hand_made_int8_entry_is_a_compressed_tensor():
    """The dataclass takes the quantization fields directly too (what load_weights builds)."""
    weight = int8_nm((4, 8), 1, 2)
    reference = compress_int8(weight, 1, *scales_for((4, 8), 0, 2), 0)
    ct = CompressedTensor(values=reference.values, indices=reference.indices, shape=(4, 8), reduction_axis=1, n=2,
                          m=4, scale=reference.scale, zero_point=reference.zero_point, quant_axis=-2)
    assert ct.quant_axis == 0 and torch.equal(decompress(ct), weight)


def test_documented_int8_example_bytes(tmp_path):
    """docs/format.md section 8, worked example."""
    import struct

    weight = torch.tensor([[0, 3, 0, -5, 0, 0, 127, 0]], dtype=torch.int8)
    ct = compress_int8(weight, 1, torch.tensor([0.0078125]), torch.tensor([0], dtype=torch.int8), 0)
    assert ct.values.numpy().tobytes() == bytes.fromhex("03fb007f") and ct.indices.numpy().tobytes() == b"\x8d"
    assert ct.scale.numpy().tobytes() == bytes.fromhex("0000003c")
    assert dequantize(ct).tolist() == [[0, 0.0234375, 0, -0.0390625, 0, 0, 0.9921875, 0]]
    path = tmp_path / "example.safetensors"
    save_weights(path, {"fc.weight_quantized": ct}, {"fc.bias_quantized": torch.tensor([-3], dtype=torch.int32)},
                 {"model": "tiny"})
    data = path.read_bytes()
    header_length = struct.unpack("<Q", data[:8])[0]
    assert len(data) == 790 and data[8 + header_length:] == bytes.fromhex("0000003c" "fdffffff" "03fb007f" "00" "8d")
    assert json.loads(json.loads(data[8:8 + header_length])["__metadata__"]["sparsecompile"])["version"] == 2



def test_the_documented_numpy_decoder_reads_int8_entries(tmp_path):
    """docs/format.md section 7's decoder (numpy + safetensors only) gives back the int8 weight of an INT8 file."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "format.md").read_text()
    section = text.split("## 7. Decoding with numpy + safetensors only", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "docs/format.md", "exec"), namespace)  # the repository's own documentation
    weight = int8_nm((8, 8, 3, 3), 1, 5)
    ct = compress_int8(weight, 1, *scales_for((8, 8, 3, 3), 0, 5), 0)
    path = tmp_path / "w.safetensors"
    save_weights(path, {"conv.weight_quantized": ct}, {})
    decoded = namespace["decode"](str(path), "conv.weight_quantized")
    assert decoded.dtype == np.int8 and np.array_equal(decoded, weight.numpy())
