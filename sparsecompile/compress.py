"""Compressed N:M sparse weight format.

Layout
------
A weight of any rank is first viewed as a 2-D "GEMM matrix" ``[rows, K]``::

    matrix = weight.movedim(reduction_axis, -1).reshape(rows, K)

where ``K = weight.shape[reduction_axis]`` is the length of the reduction
(dot-product) axis and ``rows`` is the product of all other dimensions. Each
row is cut into ``G = K // m`` groups of ``m`` consecutive elements. For a conv
weight ``[O, I, kh, kw]`` with ``reduction_axis=1`` a group is ``m``
consecutive input channels at one kernel position, which is what TensorRT's
sparse conv kernels expect; for a Linear weight ``[O, I]`` the axis is 1; for
a matmul operand stored as ``[K, N]`` it is 0.

Every group stores exactly ``n`` slots:

* ``values``: ``[rows, G * n]`` in the weight's dtype; slot ``s`` of group
  ``g`` in row ``r`` is ``values[r, g * n + s]``.
* ``indices``: a 1-D ``uint8`` tensor holding each slot's in-group position
  (``0 <= p < m``) as ``index_bits = ceil(log2(m))`` bits. The positions of
  all slots, taken in row-major order of ``[rows, G, n]``, form one bit
  stream that is packed little-endian (first slot in the lowest bits of
  byte 0, each position's least significant bit first) and padded with zero
  bits to a whole byte, so ``len(indices) == ceil(rows * G * n * index_bits / 8)``.

Invariants
----------
* Within a group the ``n`` positions are strictly ascending.
* A group keeps all of its nonzeros (``w != 0``; NaN counts as nonzero), then,
  if it has fewer than ``n``, its lowest-index remaining positions with their
  stored values (so a kept ``-0.0`` stays ``-0.0``).
* ``decompress(compress(w, a))`` equals ``w`` bit for bit except that dropped
  zeros come back as ``+0.0``.

For 2:4 this is 4 bits of metadata per group of 4, so fp16 storage is
``(2 * 16 + 4) / (4 * 16) = 0.5625`` of dense fp16 (exactly, when the number of
groups is even; otherwise the last index byte carries 4 bits of padding).

``compress`` always returns CPU tensors: compression is an offline step.

INT8 entries
------------
A sparse entry may instead hold the int8 weight of a quantized (Q/DQ) model
(:func:`compress_int8`): ``values`` and ``indices`` as above, on the int8
values, plus the weight's ``scale`` (float32) and ``zero_point`` (int8), one
per output channel along ``quant_axis`` (or one each, 0-d, per tensor). The
float weight a runtime computes is ``(q - zero_point) * scale``
(:func:`dequantize`, bit-equal to ONNX Runtime's ``DequantizeLinear``). int8
has no ``-0``, so ``decompress`` gives back the int8 tensor exactly. A file
holding any INT8 entry is format version 2 (version-1 readers refuse it);
a file without one is written as version 1, byte for byte as before.

Files (see ``docs/format.md``) are single safetensors files: ``<name>.values``
and ``<name>.indices`` per sparse tensor (and ``<name>.scale``,
``<name>.zero_point`` per INT8 entry), ``<name>`` per dense tensor, and a
JSON header under the ``"sparsecompile"`` metadata key.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sparsecompile.errors import SparseCompileError
from sparsecompile.fileio import atomic_write

FORMAT_NAME = "sparsecompile-nm"
FORMAT_VERSION = 1
FORMAT_VERSION_INT8 = 2  # a file with at least one INT8 entry (scales and zero points)
METADATA_KEY = "sparsecompile"

_DTYPES_BY_NAME: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
_NAMES_BY_DTYPE = {dtype: name for name, dtype in _DTYPES_BY_NAME.items()}
# INT8 entries: int8 values (symmetric weights: zero point 0), float32 scales, int8 zero points (ONNX Runtime's
# QDQ weights). Plain int8 values without their scales cannot be stored: they mean nothing alone.
_QUANTIZED_DTYPES: dict[str, torch.dtype] = {"int8": torch.int8}
_SCALE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32}
_ZERO_POINT_DTYPES: dict[str, torch.dtype] = {"int8": torch.int8}
_VALUE_DTYPES = {**_DTYPES_BY_NAME, **_QUANTIZED_DTYPES}
_VALUE_NAMES = {dtype: name for name, dtype in _VALUE_DTYPES.items()}

# Positions are stored in uint8 before packing, so a group can have at most
# 256 members.
_MAX_M = 256


def _normalize_axis(axis: int, ndim: int) -> int:
    if ndim == 0:
        raise SparseCompileError("cannot compress a 0-d (scalar) tensor: it has no reduction axis")
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise SparseCompileError(f"reduction_axis must be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise SparseCompileError(
            f"reduction_axis {axis} is out of range for a tensor of rank {ndim}"
        )
    return axis % ndim


def _other_dims_product(shape: tuple[int, ...], axis: int) -> int:
    return math.prod(shape[:axis] + shape[axis + 1:])


def gemm_view(weight: torch.Tensor, reduction_axis: int) -> torch.Tensor:
    """``weight`` as ``[rows, K]`` with the reduction axis last (groups run along it)."""
    axis = _normalize_axis(reduction_axis, weight.dim())
    k = weight.shape[axis]
    # Explicit row count instead of -1: reshape(-1, 0) is ambiguous for K == 0.
    rows = _other_dims_product(tuple(weight.shape), axis)
    return weight.movedim(axis, -1).reshape(rows, k)


def from_gemm_view(matrix: torch.Tensor, shape, reduction_axis: int) -> torch.Tensor:
    """Inverse of :func:`gemm_view`: rebuild a tensor of ``shape`` from ``[rows, K]``."""
    shape = tuple(int(s) for s in shape)
    axis = _normalize_axis(reduction_axis, len(shape))
    moved_shape = shape[:axis] + shape[axis + 1:] + (shape[axis],)
    return matrix.reshape(moved_shape).movedim(-1, axis)


def _index_bits(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


def _packed_index_nbytes(slots: int, bits: int) -> int:
    return (slots * bits + 7) // 8


@dataclass
class CompressedTensor:
    """An N:M sparse weight: ``n`` kept values and their positions per group of ``m``."""

    values: torch.Tensor
    indices: torch.Tensor
    shape: tuple
    reduction_axis: int
    n: int
    m: int
    # INT8 entries only: w = (q - zero_point) * scale along quant_axis (None: one scale for the tensor)
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None
    quant_axis: int | None = None

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        self.reduction_axis = _normalize_axis(int(self.reduction_axis), len(self.shape))
        self.n = int(self.n)
        self.m = int(self.m)
        if self.quant_axis is not None:
            self.quant_axis = _normalize_axis(int(self.quant_axis), len(self.shape))

    @property
    def quantized(self) -> bool:
        return self.scale is not None

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def index_bits(self) -> int:
        return _index_bits(self.m)

    @property
    def rows(self) -> int:
        return _other_dims_product(self.shape, self.reduction_axis)

    @property
    def groups_per_row(self) -> int:
        return self.shape[self.reduction_axis] // self.m

    @property
    def quant_nbytes(self) -> int:
        """Bytes of the scales and zero points (0 for a float entry)."""
        return sum(t.numel() * t.element_size() for t in (self.scale, self.zero_point) if t is not None)

    @property
    def nbytes(self) -> int:
        return (
            self.values.numel() * self.values.element_size()
            + self.indices.numel() * self.indices.element_size()
            + self.quant_nbytes
        )

    def dense_nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Dense size in ``dtype`` (default: the values' own); a dense INT8 weight counts its scales too."""
        if dtype is None:
            return math.prod(self.shape) * self.dtype.itemsize + self.quant_nbytes
        return math.prod(self.shape) * dtype.itemsize


def _check_pattern(n: int, m: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int)):
        raise SparseCompileError(f"n and m must be ints, got n={n!r}, m={m!r}")
    if not 2 <= m <= _MAX_M:
        raise SparseCompileError(f"group size m={m} is not supported (need 2 <= m <= {_MAX_M})")
    if not 1 <= n < m:
        raise SparseCompileError(f"invalid {n}:{m} pattern: need 1 <= n < m")


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _VALUE_NAMES:
        supported = ", ".join(_VALUE_DTYPES)
        raise SparseCompileError(f"unsupported weight dtype {dtype}; supported: {supported} (int8 with its scales)")


def _pack_positions(positions: np.ndarray, bits: int) -> torch.Tensor:
    """Pack uint8 positions into a little-endian bit stream of ``bits`` per slot."""
    positions = np.ascontiguousarray(positions, dtype=np.uint8)
    if 8 % bits == 0:
        # Whole slots per byte (1, 2, 4 or 8 bits): shift-and-or is ~10x faster
        # than expanding to one byte per bit, and yields the same stream.
        per_byte = 8 // bits
        padded = np.zeros(-(-positions.size // per_byte) * per_byte, dtype=np.uint8)
        padded[: positions.size] = positions
        slots = padded.reshape(-1, per_byte)
        packed = np.zeros(slots.shape[0], dtype=np.uint8)
        for i in range(per_byte):
            packed |= slots[:, i] << np.uint8(bits * i)
        return torch.from_numpy(packed)
    return torch.from_numpy(_pack_positions_bitwise(positions, bits))


def _pack_positions_bitwise(positions: np.ndarray, bits: int) -> np.ndarray:
    shifts = np.arange(bits, dtype=np.uint8)
    bit_stream = ((positions[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(bit_stream, bitorder="little")


def _unpack_positions(indices: torch.Tensor, slots: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`_pack_positions`; returns int64 positions (for scatter)."""
    packed = indices.cpu().contiguous().numpy()
    if 8 % bits == 0:
        per_byte = 8 // bits
        mask = np.uint8((1 << bits) - 1)
        shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
        unpacked = ((packed[:, None] >> shifts) & mask).reshape(-1)[:slots]
        return torch.from_numpy(unpacked.astype(np.int64))
    bit_stream = np.unpackbits(packed, count=slots * bits, bitorder="little")
    weights = 1 << np.arange(bits, dtype=np.int64)
    return torch.from_numpy(bit_stream.reshape(slots, bits).astype(np.int64) @ weights)


def _describe_violation(
    shape: tuple[int, ...], axis: int, m: int, n: int, counts: torch.Tensor, bad: torch.Tensor
) -> str:
    num_bad = int(bad.sum())
    row, group = (int(v) for v in bad.nonzero()[0])
    other_shape = shape[:axis] + shape[axis + 1:]
    other_index = list(np.unravel_index(row, other_shape)) if other_shape else []
    start = group * m
    index = tuple(int(v) for v in other_index[:axis]) + (start,) + tuple(
        int(v) for v in other_index[axis:]
    )
    return (
        f"weight of shape {tuple(shape)} is not {n}:{m} sparse along axis {axis}: "
        f"{num_bad} of {counts.numel()} groups have more than {n} nonzeros; "
        f"first at index {index} ({int(counts[row, group])} nonzeros in "
        f"elements {start}..{start + m - 1} of axis {axis})"
    )


def compress(weight: torch.Tensor, reduction_axis: int, n: int = 2, m: int = 4) -> CompressedTensor:
    """Compress an N:M-sparse ``weight``; groups of ``m`` run along ``reduction_axis``."""
    _check_pattern(n, m)
    _check_dtype(weight.dtype)
    shape = tuple(weight.shape)
    axis = _normalize_axis(reduction_axis, weight.dim())
    k = shape[axis]
    if k % m != 0:
        raise SparseCompileError(
            f"weight of shape {shape}: reduction axis {axis} has length {k}, "
            f"which is not a multiple of the group size {m}"
        )
    rows = _other_dims_product(shape, axis)
    num_groups = k // m

    # Compression is an offline step; doing it on the CPU lets numpy do the
    # mask-to-index conversion, which is several times faster than torch's.
    groups = gemm_view(weight.detach().cpu(), axis).reshape(rows, num_groups, m)
    nonzero = groups != 0
    # int16 is enough for m <= 256 and markedly faster than the default int64.
    counts = nonzero.sum(dim=-1, dtype=torch.int16)
    bad = counts > n
    if bool(bad.any()):
        raise SparseCompileError(_describe_violation(shape, axis, m, n, counts, bad))

    # Pad each group to exactly n slots with its lowest-index zeros: the c-th
    # zero (1-based) is kept iff c <= n - nonzeros.
    zero_rank = (~nonzero).cumsum(dim=-1, dtype=torch.int16)
    keep = nonzero | (zero_rank <= (n - counts).unsqueeze(-1))

    # Flat indices come out in row-major order, so slots are in ascending
    # position order within each group; take() copies bit patterns unchanged.
    flat_kept = np.flatnonzero(keep.numpy())
    values = groups.reshape(-1).take(torch.from_numpy(flat_kept)).reshape(rows, num_groups * n)
    positions = (flat_kept % m).astype(np.uint8)
    indices = _pack_positions(positions, _index_bits(m))
    return CompressedTensor(
        values=values.contiguous(),
        indices=indices,
        shape=shape,
        reduction_axis=axis,
        n=n,
        m=m,
    )


def _validate_quantization(ct: CompressedTensor, where: str) -> None:
    """An INT8 entry's scale and zero point: dtypes, one per channel along ``quant_axis`` (or 0-d), finite > 0."""
    if not ct.quantized:
        if ct.zero_point is not None or ct.quant_axis is not None:
            raise SparseCompileError(f"{where}a zero point or quantization axis without a scale")
        return
    if ct.dtype not in _QUANTIZED_DTYPES.values():
        raise SparseCompileError(f"{where}a quantized entry needs int8 values, got {ct.dtype}")
    if ct.zero_point is None:
        raise SparseCompileError(f"{where}a quantized entry needs its zero point")
    if ct.scale.dtype not in _SCALE_DTYPES.values() or ct.zero_point.dtype not in _ZERO_POINT_DTYPES.values():
        raise SparseCompileError(f"{where}scale must be float32 and zero point int8, got {ct.scale.dtype} and "
                                 f"{ct.zero_point.dtype}")
    expected = () if ct.quant_axis is None else (ct.shape[ct.quant_axis],)
    for label, tensor in (("scale", ct.scale), ("zero point", ct.zero_point)):
        if tuple(tensor.shape) != expected:
            raise SparseCompileError(f"{where}{label} has shape {tuple(tensor.shape)}, expected {expected} "
                                     + ("(one per tensor)" if ct.quant_axis is None else
                                        f"(one per channel of axis {ct.quant_axis})"))
    if ct.scale.numel() and not bool(torch.all(torch.isfinite(ct.scale) & (ct.scale > 0))):
        raise SparseCompileError(f"{where}scale holds zero, negative or non-finite values")


def _validate_layout(ct: CompressedTensor, context: str = "") -> None:
    where = f"{context}: " if context else ""
    _check_pattern(ct.n, ct.m)
    _validate_quantization(ct, where)
    k = ct.shape[ct.reduction_axis]
    if k % ct.m != 0:
        raise SparseCompileError(
            f"{where}reduction axis length {k} is not a multiple of the group size {ct.m}"
        )
    slots = ct.rows * ct.groups_per_row * ct.n
    expected_values = (ct.rows, ct.groups_per_row * ct.n)
    if tuple(ct.values.shape) != expected_values:
        raise SparseCompileError(
            f"{where}values have shape {tuple(ct.values.shape)}, expected {expected_values}"
        )
    if ct.indices.dtype != torch.uint8 or ct.indices.dim() != 1:
        raise SparseCompileError(
            f"{where}indices must be a 1-D uint8 tensor, got {ct.indices.dim()}-D {ct.indices.dtype}"
        )
    expected_bytes = _packed_index_nbytes(slots, ct.index_bits)
    if ct.indices.numel() != expected_bytes:
        raise SparseCompileError(
            f"{where}indices have {ct.indices.numel()} bytes, expected {expected_bytes}"
        )


def decompress(ct: CompressedTensor) -> torch.Tensor:
    """Rebuild the dense weight; positions not stored come back as +0.0."""
    _validate_layout(ct)
    rows, num_groups, n, m = ct.rows, ct.groups_per_row, ct.n, ct.m
    positions = _unpack_positions(ct.indices, rows * num_groups * n, ct.index_bits)
    positions = positions.reshape(rows, num_groups, n).to(ct.values.device)
    # Out-of-range or repeated positions would make scatter silently wrong.
    if n > 1 and positions.numel() and bool((positions[..., 1:] <= positions[..., :-1]).any()):
        raise SparseCompileError("corrupt sparse indices: positions within a group are not strictly ascending")
    if positions.numel() and int(positions.max()) >= m:
        raise SparseCompileError(f"corrupt sparse indices: position >= group size {m}")
    dense = torch.zeros(rows, num_groups, m, dtype=ct.values.dtype, device=ct.values.device)
    dense.scatter_(2, positions, ct.values.reshape(rows, num_groups, n))
    return from_gemm_view(dense.reshape(rows, num_groups * m), ct.shape, ct.reduction_axis).contiguous()


def _quantization_spec(ct: CompressedTensor) -> dict:
    return {"axis": ct.quant_axis, "scale_dtype": "float32", "zero_point_dtype": "int8"}


def compress_int8(values: torch.Tensor, reduction_axis: int, scale: torch.Tensor, zero_point: torch.Tensor,
                  quant_axis: int | None, n: int = 2, m: int = 4) -> CompressedTensor:
    """Compress the int8 weight of a quantized model with its scales and zero points.

    ``scale`` (float32) and ``zero_point`` (int8) hold one value per index of ``quant_axis`` (the output
    channels), or are 0-d with ``quant_axis=None`` (one per tensor); they are stored exactly as given.
    The groups run along ``reduction_axis`` of the int8 ``values``, as for a float weight.
    """
    if values.dtype != torch.int8:
        raise SparseCompileError(f"compress_int8 takes int8 values, got {values.dtype}")
    ct = compress(values, reduction_axis, n, m)
    ct.scale = scale.detach().cpu().contiguous()
    ct.zero_point = zero_point.detach().cpu().contiguous()
    ct.quant_axis = None if quant_axis is None else _normalize_axis(int(quant_axis), values.dim())
    _validate_layout(ct)
    return ct


def dequantize(ct: CompressedTensor) -> torch.Tensor:
    """The float32 weight of an INT8 entry: ``(q - zero_point) * scale``, bit-equal to ONNX's DequantizeLinear.

    The difference is formed in int32 and converted to float32 exactly (|q - zp| <= 255), then one float32
    multiply per element, which is what ONNX Runtime's kernel computes."""
    if not ct.quantized:
        raise SparseCompileError("dequantize needs an INT8 entry (with scales); this one holds float values")
    q = decompress(ct).to(torch.int32)
    shape = [1] * q.dim()
    if ct.quant_axis is not None:
        shape[ct.quant_axis] = -1
    zero_point = ct.zero_point.to(torch.int32).reshape(shape)
    return (q - zero_point).to(torch.float32) * ct.scale.to(torch.float32).reshape(shape)


def _header(sparse: dict[str, CompressedTensor], dense: dict[str, torch.Tensor], metadata) -> str:
    quantized = any(ct.quantized for ct in sparse.values())
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION_INT8 if quantized else FORMAT_VERSION,
        "sparse": {
            name: {
                "shape": list(ct.shape),
                "reduction_axis": ct.reduction_axis,
                "n": ct.n,
                "m": ct.m,
                "dtype": _VALUE_NAMES[ct.dtype],
                **({"quantization": _quantization_spec(ct)} if ct.quantized else {}),
            }
            for name, ct in sparse.items()
        },
        "dense": list(dense),
        "user": metadata,
    }
    try:
        return json.dumps(header, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SparseCompileError(f"metadata is not JSON-serializable: {exc}") from None


def save_weights(
    path,
    sparse: dict[str, CompressedTensor],
    dense: dict[str, torch.Tensor],
    metadata: dict | None = None,
) -> None:
    """Write sparse and dense tensors to one safetensors file, atomically."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def add(key: str, tensor: torch.Tensor) -> None:
        if key in tensors:
            raise SparseCompileError(f"tensor name {key!r} is used twice in the weight file")
        tensors[key] = tensor.detach().cpu().contiguous()

    for name, ct in sparse.items():
        if not isinstance(name, str):
            raise SparseCompileError(f"tensor names must be strings, got {name!r}")
        _check_dtype(ct.dtype)
        _validate_layout(ct, context=f"sparse tensor {name!r}")
        if ct.dtype in _QUANTIZED_DTYPES.values() and not ct.quantized:
            raise SparseCompileError(f"sparse tensor {name!r}: int8 values need their scales and zero points "
                                     "(compress_int8)")
        add(f"{name}.values", ct.values)
        add(f"{name}.indices", ct.indices)
        if ct.quantized:
            add(f"{name}.scale", ct.scale)
            add(f"{name}.zero_point", ct.zero_point)
    for name, tensor in dense.items():
        if not isinstance(name, str):
            raise SparseCompileError(f"tensor names must be strings, got {name!r}")
        add(name, tensor)

    # safetensors refuses tensors that share storage (e.g. the same tensor
    # under two names); give each repeat its own copy.
    seen_storages: set[int] = set()
    for key, tensor in tensors.items():
        if tensor.numel() == 0:
            continue
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen_storages:
            tensors[key] = tensor.clone()
        else:
            seen_storages.add(storage)

    header = _header(sparse, dense, metadata)
    atomic_write(path, lambda temp: save_file(tensors, temp, metadata={METADATA_KEY: header}))


def _require(condition: bool, path: str, problem: str) -> None:
    if not condition:
        raise SparseCompileError(f"{path}: invalid sparsecompile weight file: {problem}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_header(path: str, raw_metadata: dict | None) -> dict:
    if not raw_metadata or METADATA_KEY not in raw_metadata:
        raise SparseCompileError(
            f"{path}: not a sparsecompile weight file (no {METADATA_KEY!r} header in the safetensors metadata)"
        )
    try:
        header = json.loads(raw_metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise SparseCompileError(f"{path}: corrupt sparsecompile header: {exc}") from None
    _require(isinstance(header, dict), path, "header is not a JSON object")
    if header.get("format") != FORMAT_NAME:
        raise SparseCompileError(
            f"{path}: not a sparsecompile weight file (format {header.get('format')!r}, expected {FORMAT_NAME!r})"
        )
    version = header.get("version")
    if version not in (FORMAT_VERSION, FORMAT_VERSION_INT8):
        raise SparseCompileError(
            f"{path}: unsupported sparsecompile format version {version!r} (this build reads versions "
            f"{FORMAT_VERSION} and {FORMAT_VERSION_INT8})"
        )
    _require(isinstance(header.get("sparse"), dict), path, "'sparse' must be an object")
    _require(
        isinstance(header.get("dense"), list) and all(isinstance(x, str) for x in header["dense"]),
        path,
        "'dense' must be a list of names",
    )
    for name, spec in header["sparse"].items():
        _require(isinstance(spec, dict), path, f"entry for {name!r} must be an object")
        shape = spec.get("shape")
        _require(
            isinstance(shape, list) and len(shape) >= 1 and all(_is_int(s) and s >= 0 for s in shape),
            path,
            f"bad shape for {name!r}: {shape!r}",
        )
        for field in ("reduction_axis", "n", "m"):
            _require(_is_int(spec.get(field)), path, f"bad {field} for {name!r}: {spec.get(field)!r}")
        quantization = spec.get("quantization")
        if quantization is None:
            _require(spec.get("dtype") in _DTYPES_BY_NAME, path, f"bad dtype for {name!r}: {spec.get('dtype')!r}")
            continue
        _require(version == FORMAT_VERSION_INT8, path,
                 f"{name!r} is an INT8 entry, which needs format version {FORMAT_VERSION_INT8}, not {version}")
        _require(spec.get("dtype") in _QUANTIZED_DTYPES, path,
                 f"bad dtype for INT8 entry {name!r}: {spec.get('dtype')!r} (int8)")
        _require(isinstance(quantization, dict) and set(quantization) == {"axis", "scale_dtype", "zero_point_dtype"},
                 path, f"bad quantization for {name!r}: {quantization!r}")
        axis = quantization["axis"]
        _require(axis is None or (_is_int(axis) and 0 <= axis < len(shape)), path,
                 f"bad quantization axis for {name!r}: {axis!r}")
        _require(quantization["scale_dtype"] in _SCALE_DTYPES and quantization["zero_point_dtype"] in _ZERO_POINT_DTYPES,
                 path, f"bad scale/zero point dtypes for {name!r}: {quantization['scale_dtype']!r}, "
                 f"{quantization['zero_point_dtype']!r} (float32, int8)")
    quantized = any("quantization" in spec for spec in header["sparse"].values())
    _require(quantized == (version == FORMAT_VERSION_INT8), path,
             f"format version {version} files {'must' if version == FORMAT_VERSION_INT8 else 'cannot'} hold INT8 entries")
    return header


def load_weights(path) -> tuple[dict[str, CompressedTensor], dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`save_weights`: ``(sparse, dense, user_metadata)``."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SparseCompileError(f"{path}: no such weight file")
    try:
        with safe_open(path, framework="pt") as handle:
            header = _parse_header(path, handle.metadata())
            stored = set(handle.keys())
            expected: set[str] = set()
            sparse: dict[str, CompressedTensor] = {}
            for name, spec in header["sparse"].items():
                values_key, indices_key = f"{name}.values", f"{name}.indices"
                quantization = spec.get("quantization")
                keys = [values_key, indices_key] + ([f"{name}.scale", f"{name}.zero_point"] if quantization else [])
                for key in keys:
                    _require(key in stored, path, f"tensor {key!r} is missing")
                expected.update(keys)
                ct = CompressedTensor(
                    values=handle.get_tensor(values_key),
                    indices=handle.get_tensor(indices_key),
                    shape=tuple(spec["shape"]),
                    reduction_axis=spec["reduction_axis"],
                    n=spec["n"],
                    m=spec["m"],
                    **({"scale": handle.get_tensor(f"{name}.scale"),
                        "zero_point": handle.get_tensor(f"{name}.zero_point"),
                        "quant_axis": quantization["axis"]} if quantization else {}),
                )
                _require(
                    ct.dtype == _VALUE_DTYPES[spec["dtype"]],
                    path,
                    f"{values_key!r} has dtype {ct.dtype}, header says {spec['dtype']}",
                )
                try:
                    _validate_layout(ct)
                except SparseCompileError as exc:
                    raise SparseCompileError(f"{path}: invalid sparse tensor {name!r}: {exc}") from None
                sparse[name] = ct
            dense: dict[str, torch.Tensor] = {}
            for name in header["dense"]:
                _require(name in stored, path, f"tensor {name!r} is missing")
                _require(name not in expected, path, f"tensor {name!r} is listed twice")
                expected.add(name)
                dense[name] = handle.get_tensor(name)
            unexpected = sorted(stored - expected)
            _require(not unexpected, path, f"tensors not described by the header: {unexpected[:5]}")
    except SparseCompileError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SparseCompileError(f"{path}: corrupt or truncated safetensors file ({message})") from None
    return sparse, dense, header.get("user")


def size_summary(sparse: dict[str, CompressedTensor]) -> dict:
    """Byte totals and ratios; ratios are 1.0 when there is nothing to compare.

    ``dense_bytes`` is each tensor dense in its own dtype; for INT8 entries that is the int8 weight plus the
    same scales and zero points, which ``compressed_bytes`` counts too (``scale_bytes`` of it)."""
    compressed = sum(ct.nbytes for ct in sparse.values())
    dense_own = sum(ct.dense_nbytes() for ct in sparse.values())
    dense_fp16 = sum(ct.dense_nbytes(torch.float16) for ct in sparse.values())
    summary = {
        "tensors": len(sparse),
        "compressed_bytes": compressed,
        "values_bytes": sum(ct.values.numel() * ct.values.element_size() for ct in sparse.values()),
        "indices_bytes": sum(ct.indices.numel() for ct in sparse.values()),
        "dense_bytes": dense_own,
        "dense_fp16_bytes": dense_fp16,
        "ratio_vs_dense": compressed / dense_own if dense_own else 1.0,
        "ratio_vs_dense_fp16": compressed / dense_fp16 if dense_fp16 else 1.0,
    }
    if any(ct.quantized for ct in sparse.values()):
        summary["int8_tensors"] = sum(1 for ct in sparse.values() if ct.quantized)
        summary["scale_bytes"] = sum(ct.quant_nbytes for ct in sparse.values())
    return summary
