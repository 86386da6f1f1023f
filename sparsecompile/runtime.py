"""``sparsecompile run``: inference on a build or a package with the CPU fallback (ONNX Runtime)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import click
import numpy as np

from sparsecompile.backends import get_backend
from sparsecompile.builddir import open_build
from sparsecompile.errors import SparseCompileError
from sparsecompile.fileio import atomic_write

RUN_BACKENDS = ("ort", "torch-cuda")  # the backends `sparsecompile run` takes for a build directory


def _load_array_file(path: Path) -> list[tuple[str, np.ndarray]]:
    if not path.exists():
        raise SparseCompileError(f"input file '{path}' does not exist")
    try:
        if zipfile.is_zipfile(path):
            with np.load(path, allow_pickle=False) as archive:
                return [(key, archive[key]) for key in archive.files]
        return [("", np.load(path, allow_pickle=False))]
    except (ValueError, OSError, EOFError) as exc:
        raise SparseCompileError(f"cannot read input '{path}' as a NumPy array: {exc}") from None


def read_inputs(paths: list[str], specs: list[dict]) -> list[np.ndarray]:
    """Arrays in the model's input order, checked against the build's input specs."""
    arrays: list[tuple[str, np.ndarray]] = []
    for path in paths:
        arrays.extend(_load_array_file(Path(path)))
    names = [spec["name"] for spec in specs]
    keys = [key for key, _ in arrays]
    if len(arrays) > 1 and set(keys) == set(names):
        arrays = [arrays[keys.index(name)] for name in names]
    if len(arrays) != len(specs):
        raise SparseCompileError(
            f"the model takes {len(specs)} input(s) ({', '.join(names)}) but {len(arrays)} array(s) were given"
        )
    result = []
    for spec, (_, array) in zip(specs, arrays):
        if array.dtype != np.dtype(spec["dtype"]):
            raise SparseCompileError(
                f"input '{spec['name']}' must be {spec['dtype']}, got {array.dtype} "
                f"(convert with array.astype(np.{spec['dtype']}))"
            )
        want = spec["shape"]
        if len(want) != array.ndim or any(isinstance(w, int) and w != g for w, g in zip(want, array.shape)):
            shown = "x".join(str(w) for w in want)
            raise SparseCompileError(
                f"input '{spec['name']}' must have shape {shown}, got {'x'.join(map(str, array.shape))}"
            )
        result.append(array)
    return result


def write_outputs(path: Path, names: list[str], arrays: list[np.ndarray]) -> None:
    path = Path(path)
    if len(arrays) > 1 and path.suffix != ".npz":
        raise SparseCompileError(f"the model has {len(arrays)} outputs: use an .npz output path, not '{path}'")
    if path.parent and not path.parent.exists():
        raise SparseCompileError(f"output directory '{path.parent}' does not exist")

    def write(temp: str) -> None:
        if path.suffix == ".npz":
            np.savez(temp, **dict(zip(names, arrays)))
        else:
            np.save(temp, arrays[0])

    atomic_write(path, write, suffix=path.suffix or ".npy")


def _print_outputs(names: list[str], outputs: list[np.ndarray]) -> None:
    for name, array in zip(names, outputs):
        line = f"{name}: shape {'x'.join(map(str, array.shape))} {array.dtype}"
        if array.ndim == 2 and array.shape[1] > 1:
            line += f", argmax {array.argmax(1)[:8].tolist()}{' ...' if array.shape[0] > 8 else ''}"
        click.echo(line)


def example_arrays(specs: list[dict], batch: int = 8, seed: int = 0) -> list[np.ndarray]:
    """Seeded inputs of the model's dtypes and shapes (symbolic dims become ``batch``)."""
    rng = np.random.default_rng(seed)
    arrays = []
    for spec in specs:
        shape = [d if isinstance(d, int) and d > 0 else batch for d in spec["shape"]]
        dtype = np.dtype(spec["dtype"])
        arrays.append(rng.standard_normal(shape).astype(dtype) if dtype.kind == "f" else np.zeros(shape, dtype))
    return arrays


def fallback_onnx(build_dir: Path, manifest: dict) -> Path:
    """The ONNX file the CPU fallback runs: ``model.int8.onnx`` of a --precision int8 build for a CPU target,
    else ``model.onnx`` (a GPU target's INT8 file is TensorRT's input, not ONNX Runtime's)."""
    from sparsecompile.builddir import INT8_ONNX
    from sparsecompile.targets import TARGETS

    known = TARGETS.get(manifest.get("target"))
    int8 = Path(build_dir) / INT8_ONNX
    return int8 if int8.exists() and known is not None and known.kind == "cpu" else Path(build_dir) / "model.onnx"


def build_runner(path: Path, manifest: dict, backend: str, threads: int | None = None):
    """A runner over a build directory: ``ort`` (model.onnx) or ``torch-cuda`` (model.pt2, 2:4 weights
    as semi-structured sparse tensors). ``backend`` is resolved by :func:`sparsecompile.backends.get_backend`."""
    entry = get_backend(backend)
    if entry.name == "ort":
        # A --precision int8 build for a CPU target carries the INT8 model (uint8 activations, ORT's integer
        # kernels) as the fallback to run; a GPU target's INT8 file is TensorRT's input, so ORT runs fp32.
        return entry.runner_class()(fallback_onnx(path, manifest), threads=threads)
    if entry.name == "torch-cuda":
        import json

        if not (path / "model.pt2").exists():
            raise SparseCompileError(f"build '{path}' has no model.pt2 (made by an older sparsecompile); rebuild it")
        report = json.loads((path / "report.json").read_text())
        sparse = [r["weight"] for r in report["layers"] if r["status"] == "sparse"]
        return entry.runner_class()(path / "model.pt2", sparse, example_arrays(manifest["inputs"]))
    raise SparseCompileError(f"backend '{entry.name}' does not run a build directory with sparsecompile run; "
                             f"valid: {', '.join(RUN_BACKENDS)} (sparsecompile profile times the others)")


def run_build_dir(build_dir: str, inputs: list[str], output: str | None, threads: int | None,
                  backend: str = "ort", verify: bool = True) -> list[np.ndarray]:
    path, manifest = open_build(build_dir, verify=verify)
    arrays = read_inputs(inputs, manifest["inputs"])
    with build_runner(path, manifest, backend, threads) as runner:
        outputs = runner.infer(arrays)
        for layer in runner.layers:
            if layer["status"] == "dense":
                click.echo(f"note: {layer['weight']} runs dense: {layer['reason']}", err=True)
    names = [spec["name"] for spec in manifest["outputs"]]
    _print_outputs(names, outputs)
    if output:
        write_outputs(Path(output), names, outputs)
        click.echo(f"wrote {output}")
    return outputs


def run_package(package_path: str, inputs: list[str], output: str | None, threads: int | None,
                allow_other_target: bool = False, verify_key=None) -> list[np.ndarray]:
    from sparsecompile.package.runner import PackageRunner

    with PackageRunner(package_path, threads=threads, allow_other_target=allow_other_target,
                       verify_key=verify_key) as runner:
        for note in runner.notes:
            click.echo(f"note: {note}", err=True)
        arrays = read_inputs(inputs, runner.input_specs)
        outputs = runner.run(arrays)
        _print_outputs(runner.output_names, outputs)
    if output:
        write_outputs(Path(output), runner.output_names, outputs)
        click.echo(f"wrote {output}")
    return outputs
