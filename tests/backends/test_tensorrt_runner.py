"""The TensorRT runner refuses cleanly where it cannot run (here: no GPU), without importing TensorRT."""

from __future__ import annotations

import sys

import pytest
import torch

from sparsecompile.backends.tensorrt_runner import TensorRTRunner
from sparsecompile.errors import SparseCompileError


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA GPU")
def test_refuses_without_a_gpu_and_never_imports_tensorrt(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not an engine")
    with pytest.raises(SparseCompileError, match="needs a CUDA GPU"):
        TensorRTRunner(engine).load()
    assert "tensorrt" not in sys.modules
