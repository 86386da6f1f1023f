"""Emit ONNX from the (sparse) FX graph.

The ONNX graph keeps weights *dense with zeros*: that is the form TensorRT
consumes (it detects 2:4 weights itself when sparse weights are enabled) and
ONNX Runtime densifies sparse initializers anyway. Initializers keep the
original parameter names (``layer1.0.conv1.weight``) so reports, the
polygraphy sparsity check and later packaging can map them back to layers.
The batch dimension is symbolic (``batch``) when the model exported with a
dynamic batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import torch

from sparsecompile.errors import SparseCompileError
from sparsecompile.frontend import export_module
from sparsecompile.verify import flat_outputs


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress and warnings about unrelated torchvision ops."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _drop_provenance(exported) -> None:
    """Remove nodes' ``from_node`` provenance: it records ``id(graph)`` (a memory address) per node, which
    ``torch.export.save`` writes into model.pt2, so two identical builds would differ. Debug-only metadata."""
    for module in exported.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                node.meta.pop("from_node", None)


_SERIALIZATION_ID = ".data/serialization_id"


def stable_serialization_id(path: str | Path) -> None:
    """Make a torch zip archive's ``.data/serialization_id`` a function of its contents, in place.

    torch's zip writer stores a random number there (20 of its 40 digits), so two archives of the same
    program differ byte for byte. The record is replaced by digits of a SHA-256 over every other record's
    name, size and CRC-32, same length; its CRC-32 (local header or data descriptor, central directory) is
    updated. Archives laid out otherwise (no such record, a compressed one) are left alone.
    """
    path = Path(path)
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        start_dir = archive.start_dir
    targets = [i for i in infos if i.filename.endswith(_SERIALIZATION_ID)]
    if len(targets) != 1 or targets[0].compress_type != zipfile.ZIP_STORED:
        return
    target = targets[0]
    others = sorted((i.filename, i.file_size, i.CRC) for i in infos if i is not target)
    digits = str(int(hashlib.sha256(repr(others).encode()).hexdigest(), 16))
    data = (digits * (target.file_size // len(digits) + 1))[:target.file_size].encode()
    crc = struct.pack("<L", zlib.crc32(data))
    with open(path, "r+b") as f:
        f.seek(target.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            return
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        # find the central directory entry before writing anything
        f.seek(start_dir)
        central = None
        for _ in infos:
            head = f.read(46)
            if head[:4] != b"PK\x01\x02":
                return
            n, e, c = struct.unpack("<HHH", head[28:34])
            name = f.read(n)
            if name.decode("utf-8", "replace") == target.filename:
                central = f.tell() - n - 46
                break
            f.seek(e + c, 1)
        if central is None:
            return
        old_crc = struct.pack("<L", target.CRC)
        data_at = target.header_offset + 30 + name_len + extra_len
        f.seek(data_at + target.file_size)
        after = f.read(8)
        if local[14:18] == old_crc:
            f.seek(target.header_offset + 14)
            f.write(crc)
        if target.flag_bits & 0x08:  # data descriptor after the data, with or without its signature
            if after[:4] == b"PK\x07\x08" and after[4:8] == old_crc:
                f.seek(data_at + target.file_size + 4)
            elif after[:4] == old_crc:
                f.seek(data_at + target.file_size)
            else:
                return
            f.write(crc)
        f.seek(data_at)
        f.write(data)
        f.seek(central + 16)
        f.write(crc)


def export_onnx(
    module: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: str | Path,
    input_names: list[str],
    opset: int | None = None,
    program_path: str | Path | None = None,
    output_count: int | None = None,
) -> dict:
    """Write ``module`` as ONNX to ``path``; returns input/output metadata.

    ``program_path``: also save the ``torch.export`` program the ONNX was made from (for torch backends).
    ``output_count``: the number of tensor outputs, when the caller already knows it (saves a forward pass).
    """
    count = output_count
    if count is None:
        with torch.no_grad():
            count = len(flat_outputs(module(*example_inputs)))
    output_names = ["output"] if count == 1 else [f"output_{i}" for i in range(count)]
    try:
        with _quiet():
            exported, dynamic = export_module(module, example_inputs)
            program = torch.onnx.export(
                exported, tuple(example_inputs), dynamo=True, input_names=list(input_names), output_names=output_names, opset_version=opset,
                optimize=True, verbose=False,
            )
            program.save(str(path))
            if program_path is not None:
                _drop_provenance(exported)
                torch.export.save(exported, str(program_path))
                stable_serialization_id(program_path)
    except SparseCompileError:
        raise
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise SparseCompileError(f"ONNX export failed: {type(exc).__name__}: {first}") from None
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        return [
            {
                "name": v.name,
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            }
            for v in values
        ]

    return {
        "inputs": describe(model.graph.input),
        "outputs": describe(model.graph.output),
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "dynamic_batch": dynamic,
    }
