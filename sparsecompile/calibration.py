"""Calibration inputs: loading, checking against the model, batching.

``--calib`` takes

* a ``.npy`` file (one model input) or a ``.npz`` file (one array per model
  input, matched by input name when every name is present, otherwise in file
  order), samples on axis 0, loaded without pickle;
* a directory of images (PNG, JPEG, BMP, PPM/PGM, TIFF; needs Pillow),
  turned into one float32 input by ``--preprocess`` (resize, scale, mean/std
  normalisation, layout);
* ``pkg.module:function``: a Python callable returning an iterable of
  batches (arrays or tensors, or tuples/dicts of them for several inputs).

Data must match the model's input dtype and every non-batch dimension; a
mismatch is a one-line error that says what was expected.
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

    def select(self, indices: list[int]) -> "CalibrationData":
        """The samples at ``indices`` (in that order)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return CalibrationData(tuple(t[index] for t in self.inputs), self.source, self.keys)


def _fmt(shape) -> str:
    return "x".join(str(d) for d in shape)


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}


@dataclass
class Preprocess:
    """How ``--preprocess`` turns image files into model input (``key=value`` pairs)."""

    resize: tuple[int, int] | None = None  # (height, width)
    scale: float = 1 / 255
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str = "nchw"
    channels: int = 3


def parse_preprocess(text: str | None) -> Preprocess:
    """``"resize=224,224 mean=0.485,0.456,0.406 std=0.229,0.224,0.225 layout=nchw channels=3 scale=0.00392"``."""
    result = Preprocess()
    if not text:
        return result
    for item in text.replace(";", " ").split():
        key, _, value = item.partition("=")
        try:
            numbers = tuple(float(v) for v in value.split(",")) if key in ("resize", "mean", "std", "scale", "channels") else ()
        except ValueError:
            raise SparseCompileError(f"--preprocess {key}={value}: expected comma-separated numbers") from None
        if not all(np.isfinite(numbers)):
            raise SparseCompileError(f"--preprocess {key}={value}: expected finite numbers")
        if key == "resize" and len(numbers) in (1, 2) and all(v > 0 for v in numbers):
            result.resize = (int(numbers[0]), int(numbers[-1]))
        elif key in ("mean", "std") and numbers:
            if key == "std" and any(v == 0 for v in numbers):
                raise SparseCompileError("--preprocess std must not contain 0")
            setattr(result, key, numbers)
        elif key == "scale" and len(numbers) == 1:
            result.scale = numbers[0]
        elif key == "channels" and numbers in ((1.0,), (3.0,)):
            result.channels = int(numbers[0])
        elif key == "layout" and value in ("nchw", "nhwc"):
            result.layout = value
        else:
            raise SparseCompileError(
                f"--preprocess: cannot use '{item}'; keys: resize=H,W scale=S mean=M,.. std=S,.. "
                "layout=nchw|nhwc channels=1|3"
            )
    return result


def load_calibration(spec: str | Path, max_samples: int | None = None, preprocess: Preprocess | None = None,
                     progress=None) -> CalibrationData:
    """Load ``--calib``: an array file, an image directory or a ``pkg.module:function`` callable."""
    path = Path(spec)
    try:
        if path.is_dir():
            data = _load_image_dir(path, max_samples, preprocess or Preprocess(), progress)
        elif not path.exists() and ":" in str(spec) and not str(spec).endswith((".npy", ".npz")):
            data = _load_callable(str(spec), max_samples)
        elif not path.exists():
            raise SparseCompileError(f"calibration file '{path}' does not exist")
        else:
            data = _load_array_file(path, max_samples)
    except MemoryError:
        raise SparseCompileError(f"calibration data '{spec}' does not fit in memory; pass --calib-samples "
                                 "to use fewer samples") from None
    check_finite(data)
    return data


def check_informative(data: CalibrationData) -> list[str]:
    """Refuse calibration data that cannot tell masks apart; returns warnings for weaker problems.

    Every sample identical (for example all zeros) is an error: statistics, corrections and the
    accuracy guard would all see one point. Some all-zero or duplicate samples are only worth a warning.
    """
    total = data.num_samples
    if total == 0:
        raise SparseCompileError(f"--calib '{data.source}' holds no samples")
    flat = [t.reshape(total, -1).double() for t in data.inputs if t.numel()]
    if flat and total > 1 and all(bool((f == f[:1]).all()) for f in flat):
        value = "zero" if all(not bool(f.any()) for f in flat) else "the same"
        raise SparseCompileError(
            f"--calib '{data.source}': all {total} calibration samples are {value}; they cannot show which weights "
            "matter or check accuracy: pass real inputs")
    warnings = []
    zero = torch.stack([~f.any(1) for f in flat]).all(0) if flat else torch.zeros(total, dtype=torch.bool)
    if int(zero.sum()):
        warnings.append(f"{int(zero.sum())} of {total} calibration samples are all zeros "
                        f"(first at index {int(zero.nonzero()[0])})")
    return warnings


def check_finite(data: CalibrationData) -> None:
    """Refuse samples holding NaN or Inf: statistics correction would write NaN into the biases, and
    comparisons on them say nothing. One line: how many samples, and the first one."""
    total = data.num_samples
    counts = sorted({int(t.shape[0]) for t in data.inputs})
    if len(counts) != 1:
        raise SparseCompileError(f"--calib '{data.source}': arrays have different sample counts: {counts}")
    bad_by_input = [
        ~torch.isfinite(t).reshape(total, -1).all(1) if (t.is_floating_point() or t.is_complex()) and t.numel()
        else torch.zeros(total, dtype=torch.bool)
        for t in data.inputs
    ]
    bad = torch.stack(bad_by_input).any(0)
    count = int(bad.sum())
    if count:
        first = int(bad.nonzero()[0])
        where = ""
        if len(data.inputs) > 1:
            index = next(i for i, rows in enumerate(bad_by_input) if rows[first])
            where = f", in array '{data.keys[index] if data.keys and data.keys[index] else index}'"
        raise SparseCompileError(
            f"--calib '{data.source}': {count} calibration sample(s) of {total} contain NaN or Inf "
            f"(first at index {first}{where}); remove or repair them (statistics from them are NaN)"
        )


def _load_image_dir(path: Path, max_samples: int | None, preprocess: Preprocess, progress) -> CalibrationData:
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SparseCompileError(
            f"calibration directory '{path}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    try:
        from PIL import Image
    except ImportError:
        raise SparseCompileError("reading calibration images needs Pillow: pip install pillow") from None
    files = files[:max_samples] if max_samples else files
    images = []
    iterator = progress.bar(files, "images") if progress is not None else files
    for file in iterator:
        try:
            with Image.open(file) as image:
                image = image.convert("L" if preprocess.channels == 1 else "RGB")
                if preprocess.resize:
                    height, width = preprocess.resize
                    image = image.resize((width, height), Image.BILINEAR)
                array = np.asarray(image, dtype=np.float32)
        except (OSError, ValueError) as exc:
            raise SparseCompileError(f"cannot read calibration image '{file}': {exc}") from None
        if images and array.shape != images[0].shape:
            raise SparseCompileError(
                f"calibration image '{file.name}' is {array.shape[1]}x{array.shape[0]} but '{files[0].name}' is "
                f"{images[0].shape[1]}x{images[0].shape[0]}; pass --preprocess resize=H,W"
            )
        images.append(array)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to Inf is refused by check_finite
        batch = np.stack(images) * np.float32(preprocess.scale)  # [N, H, W] or [N, H, W, C]
    if batch.ndim == 3:
        batch = batch[..., None]
    for name in ("mean", "std"):
        values = getattr(preprocess, name)
        if values is not None and len(values) not in (1, batch.shape[-1]):
            raise SparseCompileError(f"--preprocess {name} has {len(values)} values for {batch.shape[-1]} channel(s)")
    if preprocess.mean is not None:
        batch = batch - np.asarray(preprocess.mean, np.float32)
    if preprocess.std is not None:
        batch = batch / np.asarray(preprocess.std, np.float32)
    if preprocess.layout == "nchw":
        batch = batch.transpose(0, 3, 1, 2)
    return CalibrationData((torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)),), str(path))


def _as_tensors(item, label: str) -> list[tuple[str, torch.Tensor]]:
    if isinstance(item, dict):
        return [(str(k), _as_tensor(v, label)) for k, v in item.items()]
    if isinstance(item, (tuple, list)):
        return [("", _as_tensor(v, label)) for v in item]
    return [("", _as_tensor(item, label))]


def _as_tensor(value, label: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
        return torch.from_numpy(np.ascontiguousarray(value))
    raise SparseCompileError(f"{label} yielded a {type(value).__name__}; expected arrays or tensors")


def _load_callable(spec: str, max_samples: int | None) -> CalibrationData:
    from sparsecompile.frontend import import_callable

    function = import_callable(spec, "--calib")
    label = f"--calib {spec}"
    try:
        batches = function()
        collected: list[list[tuple[str, torch.Tensor]]] = []
        count = 0
        for item in batches:
            tensors = _as_tensors(item, label)
            if collected and len(tensors) != len(collected[0]):
                raise SparseCompileError(f"{label} yielded batches with different numbers of arrays")
            collected.append(tensors)
            count += int(tensors[0][1].shape[0]) if tensors[0][1].dim() else 1
            if max_samples and count >= max_samples:
                break
    except SparseCompileError:
        raise
    except Exception as exc:  # noqa: BLE001 - user code
        raise SparseCompileError(f"{label} raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not collected:
        raise SparseCompileError(f"{label} yielded no batches")
    keys = tuple(k for k, _ in collected[0])
    try:
        inputs = tuple(torch.cat([batch[i][1] for batch in collected]) for i in range(len(keys)))
    except RuntimeError as exc:
        raise SparseCompileError(f"{label} yielded batches whose shapes do not stack: {exc}") from None
    if max_samples:
        inputs = tuple(t[:max_samples] for t in inputs)
    return CalibrationData(inputs, spec, keys if all(keys) else ())


def _load_array_file(path: Path, max_samples: int | None) -> CalibrationData:
    """A .npy or .npz, read without pickle; each array's header is checked against the bytes that hold it
    before anything is allocated, and only the first ``max_samples`` samples are read."""
    with open(path, "rb") as handle:
        magic = handle.read(6)
    is_zip = zipfile.is_zipfile(path)
    if magic != b"\x93NUMPY" and not is_zip:
        raise SparseCompileError(f"cannot read calibration file '{path}': not a .npy or .npz file")
    try:
        if is_zip:
            arrays = _read_npz(path, max_samples)
        else:
            with open(path, "rb") as handle:
                arrays = [("", _read_npy(handle, path.stat().st_size, max_samples, f"'{path}'", path))]
    except (OSError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError) as exc:
        raise SparseCompileError(f"cannot read calibration file '{path}': {exc}") from None
    if not arrays:
        raise SparseCompileError(f"calibration file '{path}' holds no arrays")
    tensors = [(key, torch.from_numpy(array)) for key, array in arrays]
    counts = {t.shape[0] for _, t in tensors}
    if len(counts) != 1:
        raise SparseCompileError(
            f"calibration arrays in '{path}' have different sample counts: {sorted(counts)}"
        )
    return CalibrationData(tuple(t for _, t in tensors), str(path), tuple(k for k, _ in tensors))


def load_labels(spec: str | Path) -> torch.Tensor:
    """``--labels``: a .npy of integer class labels (int64), read like calibration arrays (no pickle, header
    checked against the file size)."""
    path = Path(spec)
    label = f"labels '{path}'"
    try:
        with open(path, "rb") as handle:
            if handle.read(6) != b"\x93NUMPY":
                raise SparseCompileError(f"cannot read {label}: not a .npy file")
            handle.seek(0)
            array = _read_npy(handle, path.stat().st_size, None, label, path)
    except OSError as exc:
        raise SparseCompileError(f"cannot read {label}: {exc.strerror or exc}") from None
    if array.dtype.kind not in "iu":
        raise SparseCompileError(f"{label} have dtype {array.dtype}; expected integer class indices")
    return torch.from_numpy(array.astype(np.int64, copy=False))


# Deflate cannot expand data more than ~1032:1; a zip entry declaring more is lying (or a zip bomb).
_MAX_DEFLATE_RATIO = 1100


def _read_npz(path: Path, max_samples: int | None) -> list[tuple[str, np.ndarray]]:
    arrays = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            label = f"'{path}' array '{key}'"
            if not info.filename.endswith(".npy"):
                raise SparseCompileError(f"calibration {label} is not a .npy member; an .npz holds only arrays")
            declared = info.file_size
            if info.compress_type == zipfile.ZIP_STORED and declared != info.compress_size:
                raise SparseCompileError(f"calibration {label}: its zip entry declares {declared} bytes but stores "
                                         f"{info.compress_size}; the file is damaged or crafted")
            if info.compress_type == zipfile.ZIP_DEFLATED and declared > _MAX_DEFLATE_RATIO * info.compress_size + 4096:
                raise SparseCompileError(f"calibration {label}: its zip entry declares {declared} bytes from "
                                         f"{info.compress_size} compressed bytes, more than deflate can produce; "
                                         "the file is damaged or crafted")
            with archive.open(info) as member:
                arrays.append((key, _read_npy(member, declared, max_samples, label, path)))
    return arrays


def _read_npy(stream, total_bytes: int, max_samples: int | None, label: str, path: Path) -> np.ndarray:
    """The first ``max_samples`` samples of the .npy in ``stream`` (``total_bytes`` long), as a new array."""
    from numpy.lib import format as npy_format

    try:
        version = npy_format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = npy_format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = npy_format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
    except ValueError as exc:
        raise SparseCompileError(f"cannot read calibration {label}: bad .npy header "
                                 f"({(str(exc).splitlines() or [''])[0][:200]})") from None
    if dtype.hasobject:
        raise SparseCompileError(
            f"calibration {label} holds Python objects (pickled); save plain numeric arrays with np.save"
        )
    if dtype.kind not in "fiub":
        raise SparseCompileError(f"calibration {label} has dtype {dtype}; expected numeric data")
    if len(shape) == 0:
        raise SparseCompileError(f"calibration {label} is a scalar; axis 0 must index samples")
    if shape[0] == 0:
        raise SparseCompileError(f"calibration {label} has no samples")
    header_bytes = stream.tell()
    row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=object))
    data_bytes = row_bytes * shape[0]
    if data_bytes > total_bytes - header_bytes:
        raise SparseCompileError(
            f"calibration {label}: its header declares {shape[0]} samples of shape {_fmt(shape[1:]) or 'scalar'} "
            f"({dtype}, {data_bytes} bytes) but the file holds only {max(total_bytes - header_bytes, 0)} bytes of "
            "data; the file is truncated or its header is wrong"
        )
    rows = min(shape[0], max_samples) if max_samples else shape[0]
    needed = data_bytes if fortran_order else rows * row_bytes
    memory = _physical_memory()
    if memory and needed > memory // 2:
        raise SparseCompileError(
            f"calibration {label} needs {needed / 2**30:.1f} GiB of memory to read "
            f"({rows} samples), more than this machine can spare; pass --calib-samples to use fewer"
        )
    array = np.empty(tuple(reversed(shape)) if fortran_order else (rows, *shape[1:]), dtype)
    _read_exactly(stream, array, label)
    if fortran_order:
        array = array.T[:rows]
    native = array.dtype.newbyteorder("=")
    return np.ascontiguousarray(array, dtype=native)  # a copy only where needed: order, byte order


def _read_exactly(stream, array: np.ndarray, label: str) -> None:
    view = memoryview(array.reshape(-1).view(np.uint8)) if array.size else memoryview(b"")
    filled = 0
    while filled < len(view):
        count = stream.readinto(view[filled:])
        if not count:
            raise SparseCompileError(f"cannot read calibration {label}: the data ends after {filled} of "
                                     f"{len(view)} bytes")
        filled += count


def _physical_memory() -> int | None:
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


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
