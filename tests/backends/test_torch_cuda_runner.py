"""The torch-cuda backend: per-layer fallback logic on the CPU (stand-in conversion), the real thing on a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from helpers import cli, one_line_failure
from sparsecompile.backends.torch_cuda_runner import TorchCudaRunner, accelerate
from sparsecompile.errors import SparseCompileError


class Marked(torch.Tensor):
    """Stands in for a semi-structured sparse tensor: same values, recognisable type."""


def _convert_small_only(weight):
    if weight.shape[0] > 16:
        raise RuntimeError("shape not supported by the sparse kernel")
    return weight.as_subclass(Marked)


def test_accelerate_keeps_what_works_and_says_why_not():
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 32))
    x = torch.randn(2, 4, 6, 6)
    before = model(x)
    layers = accelerate(model, ["0.weight", "2.weight", "4.weight", "9.weight"], lambda: model(x), _convert_small_only)
    status = {layer["weight"]: (layer["status"], layer["reason"]) for layer in layers}
    assert status["2.weight"] == ("sparse", None) and isinstance(model[2].weight.data, Marked)
    assert status["0.weight"][0] == "dense" and "--lower-conv im2col" in status["0.weight"][1]
    assert status["4.weight"][0] == "dense" and "not supported" in status["4.weight"][1]
    assert not isinstance(model[4].weight.data, Marked)  # reverted
    assert status["9.weight"] == ("dense", "weight not found in the program")
    torch.testing.assert_close(model(x), before)


def test_a_swap_that_breaks_the_model_is_reverted():
    model = nn.Sequential(nn.Linear(8, 8))
    x = torch.randn(3, 8)

    def run():
        if isinstance(model[0].weight.data, Marked):
            raise RuntimeError("dense input rows must be a multiple of 32")
        return model(x)

    layers = accelerate(model, ["0.weight"], run, lambda w: w.as_subclass(Marked))
    assert layers[0]["status"] == "dense" and "multiple of 32" in layers[0]["reason"]
    assert not isinstance(model[0].weight.data, Marked)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA GPU")
def test_refuses_without_a_gpu(sample_build, tmp_path):
    with pytest.raises(SparseCompileError, match="needs a CUDA GPU"):
        TorchCudaRunner(sample_build.output / "model.pt2", [], []).load()
    np.save(tmp_path / "x.npy", np.zeros((2, 4, 8, 8), np.float32))
    one_line_failure(cli("run", sample_build.output, "-i", tmp_path / "x.npy", "--backend", "torch-cuda"),
                     "needs a CUDA GPU")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="needs a GPU with sparse tensor cores")
def test_torch_cuda_matches_onnxruntime(tmp_path, model_files):
    from sparsecompile.backends.onnxruntime_runner import OrtRunner
    from sparsecompile.build import BuildOptions, build
    from sparsecompile.runtime import build_runner, example_arrays
    from sparsecompile.builddir import open_build

    result = build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / "b"), min_weights=0,
                                lower_conv="im2col", calib=str(model_files / "calib.npy")))
    path, manifest = open_build(result.output)
    x = example_arrays(manifest["inputs"], batch=32)
    with build_runner(path, manifest, "torch-cuda") as runner:
        got = runner.infer(x)[0]
        assert any(layer["status"] == "sparse" for layer in runner.layers), runner.layers
    with OrtRunner(path / "model.onnx") as runner:
        want = runner.infer(x)[0]
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())
