"""Batch sizes and inputs: ``--batch`` parsing, shape checks against a model's specs, seeded random inputs."""

from __future__ import annotations

import numpy as np

from sparsecompile.errors import SparseCompileError

DEFAULT_BATCHES = (1, 8, 32)


def parse_batches(text: str | None) -> list[int] | None:
    """``"1,8,32"`` -> ``[1, 8, 32]``; None stays None (the model's default)."""
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",")]
    try:
        batches = [int(p) for p in parts]
    except ValueError:
        batches = []
    if not batches or any(b < 1 for b in batches):
        raise SparseCompileError(f"--batch '{text}' is not a comma-separated list of positive integers (e.g. 1,8,32)")
    return list(dict.fromkeys(batches))


def concrete_shape(spec: dict, batch: int) -> list[int]:
    shape = []
    for axis, dim in enumerate(spec["shape"]):
        if isinstance(dim, int) and dim > 0:
            shape.append(dim)
        elif axis == 0:
            shape.append(batch)
        else:
            raise SparseCompileError(
                f"input '{spec['name']}' has a symbolic dimension '{dim}' (axis {axis}) besides the batch; "
                "profile can only vary the batch dimension"
            )
    return shape


def check_batch(specs: list[dict], batch: int, what: str) -> None:
    """A clear error when a model with a fixed batch dimension cannot run ``batch``."""
    for spec in specs:
        shape = spec["shape"]
        if shape and isinstance(shape[0], int) and shape[0] != batch:
            raise SparseCompileError(
                f"{what} has a fixed batch of {shape[0]} (input '{spec['name']}' shape "
                f"{'x'.join(map(str, shape))}) and cannot run --batch {batch}; use --batch {shape[0]}, or export "
                "the model with a dynamic batch and rebuild it"
            )


def random_inputs(specs: list[dict], batch: int, seed: int = 0) -> list[np.ndarray]:
    """Seeded random arrays with the specs' dtypes and shapes, batch dimension set to ``batch``."""
    rng = np.random.default_rng(seed)
    arrays = []
    for spec in specs:
        shape = concrete_shape(spec, batch)
        dtype = np.dtype(spec["dtype"])
        if dtype == np.bool_:
            arrays.append(rng.integers(0, 2, size=shape).astype(np.bool_))
        elif np.issubdtype(dtype, np.integer):
            arrays.append(rng.integers(0, 16, size=shape).astype(dtype))  # small: valid as indices too
        else:
            arrays.append(rng.standard_normal(shape).astype(dtype))
    return arrays
