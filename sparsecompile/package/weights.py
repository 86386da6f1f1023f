"""Split the ONNX graph from its weights, and put them back.

A bundle ships ``graph.onnx`` *without* the initializers that the build's
weight file holds: those travel once, in ``weights.safetensors``, sparse
layers compressed (N:M values + in-group indices, see
:mod:`sparsecompile.compress`) and everything else plain. Small constants the
ONNX exporter made itself (shape vectors, axes) stay in the graph.

The manifest lists each removed initializer with its ONNX dtype and shape;
:func:`restore_weights` decompresses the matching tensor, casts it to that
dtype (a fp16 bundle widens to the graph's fp32 here, exactly) and adds it
back. Nothing here unpickles: safetensors and protobuf only.

INT8 bundles ship ``model.int8.onnx`` and its ``weights.int8.safetensors``:
a sparse layer's entry holds the int8 values and indices *and* the scale and
zero point of its ``DequantizeLinear``, so those two initializers leave the
graph as well; their manifest entries name the weight they come with
(``"part_of"``) and which part (``"part": "scale" | "zero_point"``).
:func:`check_matches_graph` refuses a weight file that does not reproduce
the graph's initializers exactly (one from another build).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from sparsecompile.compress import CompressedTensor, decompress, load_weights, save_weights
from sparsecompile.errors import SparseCompileError


def _np_dtype(onnx_type: int) -> np.dtype:
    import onnx

    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx_type))


_PARTS = ("scale", "zero_point")


def _quantization_parts(model, sparse: dict[str, CompressedTensor]) -> dict[str, tuple[str, str]]:
    """Initializer name -> (INT8 entry, part) for the scale and zero point of each INT8 entry's DequantizeLinear."""
    parts = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in sparse and sparse[node.input[0]].quantized:
            for part, name in zip(_PARTS, node.input[1:3]):
                if name:
                    parts[name] = (node.input[0], part)
    return parts


def check_matches_graph(model, sparse: dict[str, CompressedTensor], dense: dict[str, torch.Tensor],
                        where: str) -> None:
    """Refuse weights that do not give back ``model``'s initializers exactly (values, scales, zero points)."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    parts = _quantization_parts(model, sparse)

    def same(name: str, tensor: torch.Tensor) -> bool:
        want = np.ascontiguousarray(numpy_helper.to_array(initializers[name]))
        got = np.ascontiguousarray(tensor.numpy())
        return got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()  # bit for bit

    for name, tensor in [(n, decompress(ct)) for n, ct in sparse.items()] + list(dense.items()):
        if name not in initializers:
            raise SparseCompileError(f"{where}: the weight file holds '{name}', which the graph does not have "
                                     "(weights of another model?)")
        if not same(name, tensor):
            raise SparseCompileError(f"{where}: '{name}' in the weight file differs from the graph's initializer "
                                     "(weights of another build?)")
    for name, (owner, part) in parts.items():
        if name not in initializers or not same(name, getattr(sparse[owner], part)):
            raise SparseCompileError(f"{where}: the {part.replace('_', ' ')} of '{owner}' in the weight file differs "
                                     f"from the graph's '{name}' (weights of another build?)")


def strip_weights(model, sparse: dict[str, CompressedTensor], dense: dict[str, torch.Tensor]):
    """Remove from ``model`` (in place) every initializer the weight file holds with the same shape.

    Returns ``(specs, sparse_kept, dense_kept)``: the removed initializers as
    ``{"name", "dtype", "shape"}`` (plus ``"part_of"``, ``"part"`` for an INT8 entry's scale and zero
    point) and the weight entries the graph needs.
    """
    graph_inputs = {i.name for i in model.graph.input}
    parts = _quantization_parts(model, sparse)
    specs, sparse_kept, dense_kept, keep = [], {}, {}, []
    for init in model.graph.initializer:
        name, shape = init.name, list(init.dims)
        if name in parts and name not in graph_inputs:
            owner, part = parts[name]
            if list(getattr(sparse[owner], part).shape) == shape:
                specs.append({"name": name, "dtype": _np_dtype(init.data_type).name, "shape": shape,
                              "part_of": owner, "part": part})
                continue
        source = sparse.get(name)
        stored_shape = list(source.shape) if source is not None else (
            list(dense[name].shape) if name in dense else None)
        if stored_shape is None or stored_shape != shape or name in graph_inputs:
            keep.append(init)
            continue
        specs.append({"name": name, "dtype": _np_dtype(init.data_type).name, "shape": shape})
        if source is not None:
            sparse_kept[name] = source
        else:
            dense_kept[name] = dense[name]
    stripped = {spec["name"] for spec in specs}
    for spec in specs:  # an owner that stayed in the graph (shape mismatch) keeps its scale there too
        if "part_of" in spec and spec["part_of"] not in stripped:
            raise SparseCompileError(f"internal error: '{spec['name']}' was stripped without '{spec['part_of']}'")
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return specs, sparse_kept, dense_kept


def weights_file_bytes(sparse, dense, metadata: dict) -> bytes:
    with tempfile.TemporaryDirectory(prefix="sparsecompile-") as tmp:
        path = os.path.join(tmp, "weights.safetensors")
        save_weights(path, sparse, dense, metadata)
        with open(path, "rb") as handle:
            return handle.read()


def read_weights_bytes(data: bytes, where: str):
    with tempfile.TemporaryDirectory(prefix="sparsecompile-") as tmp:
        path = os.path.join(tmp, "weights.safetensors")
        with open(path, "wb") as handle:
            handle.write(data)
        try:
            return load_weights(path)
        except SparseCompileError as exc:
            raise SparseCompileError(f"{where}: weights.safetensors: {str(exc).split(': ', 1)[-1]}") from None


def restore_weights(model, specs: list[dict], sparse, dense, where: str):
    """Add the initializers listed in ``specs`` back to ``model`` (in place) from the weight entries."""
    from onnx import numpy_helper

    present = {i.name for i in model.graph.initializer}
    for spec in specs:
        name = spec["name"]
        if name in present:
            raise SparseCompileError(f"{where}: initializer '{name}' is both in the graph and in the weights")
        if "part_of" in spec:
            owner, part = spec["part_of"], spec.get("part")
            if part not in _PARTS or owner not in sparse or not sparse[owner].quantized:
                raise SparseCompileError(f"{where}: initializer '{name}' is the {str(part)[:20]!r} of '{str(owner)[:80]}',"
                                         " which weights.safetensors has no INT8 entry with")
            tensor = getattr(sparse[owner], part)
        elif name in sparse:
            tensor = decompress(sparse[name])
        elif name in dense:
            tensor = dense[name]
        else:
            raise SparseCompileError(f"{where}: weights.safetensors has no tensor '{name}' that the graph needs")
        if list(tensor.shape) != list(spec["shape"]):
            raise SparseCompileError(f"{where}: tensor '{name}' has shape {list(tensor.shape)}, the graph needs {spec['shape']}")
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        array = tensor.numpy().astype(np.dtype(spec["dtype"]), copy=False)
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
    return model
