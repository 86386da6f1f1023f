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
import io
import logging
import warnings
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


def export_onnx(
    module: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: str | Path,
    input_names: list[str],
    opset: int | None = None,
    program_path: str | Path | None = None,
) -> dict:
    """Write ``module`` as ONNX to ``path``; returns input/output metadata.

    ``program_path``: also save the ``torch.export`` program the ONNX was made from (for torch backends).
    """
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
                torch.export.save(exported, str(program_path))
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
