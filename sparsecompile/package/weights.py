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


def strip_weights(model, sparse: dict[str, CompressedTensor], dense: dict[str, torch.Tensor]):
    """Remove from ``model`` (in place) every initializer the weight file holds with the same shape.

    Returns ``(specs, sparse_kept, dense_kept)``: the removed initializers as
    ``{"name", "dtype", "shape"}`` and the weight entries the graph needs.
    """
    graph_inputs = {i.name for i in model.graph.input}
    specs, sparse_kept, dense_kept, keep = [], {}, {}, []
    for init in model.graph.initializer:
        name, shape = init.name, list(init.dims)
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
        if name in sparse:
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
