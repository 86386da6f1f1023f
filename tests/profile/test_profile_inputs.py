"""``sparsecompile.profile.inputs``: ``--batch`` parsing, batch checks against a model's specs, seeded inputs."""

from __future__ import annotations

import numpy as np
import pytest

from sparsecompile.errors import SparseCompileError
from sparsecompile.profile import check_batch, parse_batches, random_inputs


def test_parse_batches():
    assert parse_batches("1,8,32") == [1, 8, 32]
    assert parse_batches(" 4, 4 ,2") == [4, 2]
    assert parse_batches(None) is None
    for bad in ("1,x", "", "0", "-1,2", "1.5"):
        with pytest.raises(SparseCompileError, match="--batch"):
            parse_batches(bad)


def test_inputs_follow_specs_and_fixed_batches_are_refused():
    specs = [{"name": "x", "dtype": "float32", "shape": ["batch", 3, 4]},
             {"name": "ids", "dtype": "int64", "shape": ["batch", 5]}]
    x, ids = random_inputs(specs, 6, seed=3)
    assert x.shape == (6, 3, 4) and x.dtype == np.float32 and ids.shape == (6, 5) and ids.dtype == np.int64
    again = random_inputs(specs, 6, seed=3)
    assert np.array_equal(x, again[0])  # seeded
    check_batch(specs, 17, "the build")
    static = [{"name": "x", "dtype": "float32", "shape": [4, 3]}]
    check_batch(static, 4, "the build")
    with pytest.raises(SparseCompileError, match="fixed batch of 4.*--batch 8"):
        check_batch(static, 8, "the build")
