"""The Python entry point: ``sparsecompile.build(model, "build/", calib=x, target="a100")``.

The command line reads files; here the model may also be an ``nn.Module`` (or a ``torch.export``
``ExportedProgram``) and the calibration data an array. Both are written to a private
temporary directory as the files the command line takes (``torch.export.save`` with a dynamic
batch where the model allows one, ``numpy.save``) and the ordinary build runs on them, so every
check, report and guarantee of ``sparsecompile build`` holds unchanged. Nothing is pickled.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsecompile.errors import SparseCompileError


def _as_arrays(calib: Any) -> list[np.ndarray]:
    items = list(calib) if isinstance(calib, (list, tuple)) else [calib]
    arrays = []
    for item in items:
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu().numpy()
        if not isinstance(item, np.ndarray):
            raise SparseCompileError(f"calib must be an array or tensor [N, ...] (or a tuple of them, one per "
                                     f"input), got {type(item).__name__}")
        arrays.append(item)
    counts = {len(a) if a.ndim else 0 for a in arrays}
    if len(counts) != 1 or 0 in counts:
        raise SparseCompileError("calib arrays must all hold the same number of samples (axis 0), at least one")
    return arrays


def _export(model, example: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    if isinstance(model, torch.export.ExportedProgram):
        return model
    if not isinstance(model, torch.nn.Module):
        raise SparseCompileError(f"model must be an nn.Module or an ExportedProgram, got {type(model).__name__}")
    model = model.eval()
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:  # a dynamic batch lets the build pick its own batch sizes; some models only export static
        return torch.export.export(model, example, dynamic_shapes=tuple({0: batch} for _ in example))
    except Exception:  # noqa: BLE001 - torch raises several types for shapes it cannot make dynamic
        try:
            return torch.export.export(model, example)
        except Exception as exc:  # noqa: BLE001
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise SparseCompileError(f"torch.export could not export the model: {first}") from None


def build_model(model, output: str | Path = "build", *, calib: Any = None, example_inputs: tuple | None = None,
                progress=None, **options):
    """Build ``model`` into ``output``: what ``sparsecompile.build(model, ...)`` calls.

    ``model``: an ``nn.Module`` or ``ExportedProgram`` in memory, or the path of a model file as the
    command line takes it (``.pt2``, TorchScript; a pickle only with ``trust_pickle=True``).
    ``calib``: calibration samples as an array or tensor ``[N, ...]`` (a tuple of them for several
    inputs), or the path of a calibration file or image directory; ``example_inputs``: inputs to export an
    in-memory model with when there is no ``calib`` array (else its first 8 samples are used). ``options``: any
    :class:`sparsecompile.build.BuildOptions` field (``target="a100"``, ``method="hessian"``,
    ``max_drop=0.5``, ...), the single list the command line's ``build`` options are checked against. Returns
    the :class:`~sparsecompile.build.BuildResult` (``.output``, ``.report``, ``.files``).
    """
    from sparsecompile.build import BuildOptions, build

    from_file = isinstance(model, (str, Path))
    in_memory = ("model", "calib", "output", "model_factory", "weights", "trust_pickle", "source_label")
    for key in in_memory if not from_file else ("model", "calib", "output", "source_label"):
        if key in options:
            raise SparseCompileError(f"build: '{key}' is not an option here (the model, calib and output are "
                                     "arguments)")
    unknown = sorted(set(options) - set(BuildOptions.__dataclass_fields__))
    if unknown:
        raise SparseCompileError(f"build: unknown option(s) {', '.join(unknown)} (see BuildOptions)")
    if from_file:
        if calib is not None and not isinstance(calib, (str, Path)):
            with tempfile.TemporaryDirectory(prefix="sparsecompile-api-") as tmp:
                return build(BuildOptions(model=str(model), output=str(output), calib=_save_arrays(calib, tmp),
                                          **options), progress)
        return build(BuildOptions(model=str(model), output=str(output), calib=None if calib is None else str(calib),
                                  **options), progress)
    if isinstance(calib, (str, Path)):
        raise SparseCompileError("build: with a model in memory, pass calib as an array or tensor (or save the "
                                 "model with torch.export.save and pass its path)")
    arrays = _as_arrays(calib) if calib is not None else None
    if example_inputs is None:
        if arrays is None:
            raise SparseCompileError("build_model needs calib or example_inputs to export the model with")
        example_inputs = tuple(torch.from_numpy(np.ascontiguousarray(a[:8])) for a in arrays)
    example = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
    program = _export(model, example)
    with tempfile.TemporaryDirectory(prefix="sparsecompile-api-") as tmp:
        model_path = Path(tmp) / "model.pt2"
        torch.export.save(program, model_path)
        calib_path = _save_arrays(arrays, tmp) if arrays is not None else None
        label = f"<in-memory {type(model).__name__}>"
        return build(BuildOptions(model=str(model_path), output=str(output), source_label=label,
                                  calib=calib_path, **options), progress)


def _save_arrays(calib, tmp: str) -> str:
    """Calibration arrays as the file the command line takes: ``calib.npy``, or ``calib.npz`` for several inputs."""
    arrays = _as_arrays(calib)
    if len(arrays) == 1:
        path = Path(tmp) / "calib.npy"
        np.save(path, arrays[0])
    else:
        path = Path(tmp) / "calib.npz"
        np.savez(path, **{f"input{i}": a for i, a in enumerate(arrays)})
    return str(path)
