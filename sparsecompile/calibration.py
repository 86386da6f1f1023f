"""Calibration inputs: loading, checking against the model, batching.

``--calib`` takes a ``.npy`` file (one model input) or a ``.npz`` file (one
array per model input, matched by input name when every name is present,
otherwise in file order). Axis 0 of every array is the sample axis. Data
must match the model's input dtype and every non-batch dimension; a mismatch
is a one-line error that says what was expected.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from sparsecompile.errors import SparseCompileError


@dataclass
class CalibrationData:
    inputs: tuple[torch.Tensor, ...]  # each [N, ...]
    source: str
    keys: tuple[str, ...] = ()  # array names in the .npz, if any

    @property
    def num_samples(self) -> int:
        return int(self.inputs[0].shape[0])

    def first_batch(self, size: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[:size] for t in self.inputs)

    def batches(self, batch_size: int, static: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
        """Consecutive batches; a static-batch model gets only full batches."""
        total = self.num_samples
        stop = total - total % batch_size if static else total
        for start in range(0, stop, batch_size):
            yield tuple(t[start:start + batch_size] for t in self.inputs)

    def subset(self, count: int) -> "CalibrationData":
        return CalibrationData(tuple(t[:count] for t in self.inputs), self.source, self.keys)


def _fmt(shape) -> str:
    return "x".join(str(d) for d in shape)


def load_calibration(path: str | Path, max_samples: int | None = None) -> CalibrationData:
    path = Path(path)
    if not path.exists():
        raise SparseCompileError(f"calibration file '{path}' does not exist")
    if path.is_dir():
        raise SparseCompileError(f"calibration path '{path}' is a directory; expected a .npy or .npz file")
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if magic != b"\x93NUMPY" and not zipfile.is_zipfile(path):
        raise SparseCompileError(f"cannot read calibration file '{path}': not a .npy or .npz file")
    try:
        if zipfile.is_zipfile(path):
            with np.load(path, allow_pickle=False) as archive:
                arrays = [(key, archive[key]) for key in archive.files]
        else:
            arrays = [("", np.load(path, allow_pickle=False))]
    except ValueError as exc:
        if "pickle" in str(exc):
            raise SparseCompileError(
                f"calibration file '{path}' holds Python objects (pickled); save plain numeric arrays with np.save"
            ) from None
        raise SparseCompileError(f"cannot read calibration file '{path}': {exc}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise SparseCompileError(f"cannot read calibration file '{path}': {exc}") from None
    if not arrays:
        raise SparseCompileError(f"calibration file '{path}' holds no arrays")
    tensors = []
    for key, array in arrays:
        label = f"'{path}'" + (f" array '{key}'" if key else "")
        if array.dtype.kind not in "fiub":
            raise SparseCompileError(f"calibration {label} has dtype {array.dtype}; expected numeric data")
        if array.ndim == 0:
            raise SparseCompileError(f"calibration {label} is a scalar; axis 0 must index samples")
        if array.shape[0] == 0:
            raise SparseCompileError(f"calibration {label} has no samples")
        tensors.append((key, torch.from_numpy(np.ascontiguousarray(array))))
    counts = {t.shape[0] for _, t in tensors}
    if len(counts) != 1:
        raise SparseCompileError(
            f"calibration arrays in '{path}' have different sample counts: {sorted(counts)}"
        )
    if max_samples is not None:
        tensors = [(k, t[:max_samples]) for k, t in tensors]
    return CalibrationData(tuple(t for _, t in tensors), str(path), tuple(k for k, _ in tensors))


def match_to_model(
    data: CalibrationData,
    example_inputs: tuple[torch.Tensor, ...],
    input_names: list[str],
) -> CalibrationData:
    """Order arrays by input name and check dtypes and non-batch shapes."""
    keys = list(data.keys)
    tensors = list(data.inputs)
    if len(tensors) != len(example_inputs):
        raise SparseCompileError(
            f"calibration data has {len(tensors)} array(s) but the model takes {len(example_inputs)} input(s)"
            f" ({', '.join(input_names)}); use a .npz with one array per input"
        )
    if len(tensors) > 1 and set(keys) == set(input_names):
        tensors = [tensors[keys.index(name)] for name in input_names]
    for name, tensor, example in zip(input_names, tensors, example_inputs):
        if tensor.dtype != example.dtype:
            raise SparseCompileError(
                f"calibration data for input '{name}' has dtype {str(tensor.dtype).replace('torch.', '')} "
                f"but the model expects {str(example.dtype).replace('torch.', '')}; convert it "
                f"(e.g. array.astype(np.{str(example.dtype).replace('torch.', '')}))"
            )
        if tuple(tensor.shape[1:]) != tuple(example.shape[1:]):
            raise SparseCompileError(
                f"calibration data for input '{name}' has sample shape {_fmt(tensor.shape[1:])} "
                f"but the model expects {_fmt(example.shape[1:])} (full shape N x {_fmt(example.shape[1:])})"
            )
    return CalibrationData(tuple(tensors), data.source)


def random_calibration(example_inputs: tuple[torch.Tensor, ...], samples: int = 32, seed: int = 0) -> CalibrationData:
    """Stand-in data when the user gives none: enough to check equivalence, not accuracy."""
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for example in example_inputs:
        shape = (samples, *example.shape[1:])
        if example.is_floating_point():
            tensors.append(torch.randn(shape, generator=generator).to(example.dtype))
        else:
            high = int(example.max().item()) + 1 if example.numel() else 2
            tensors.append(torch.randint(0, max(high, 2), shape, generator=generator).to(example.dtype))
    return CalibrationData(tuple(tensors), "random")
