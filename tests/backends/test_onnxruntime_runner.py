"""The ONNX Runtime runner (CPU fallback) and the ONNX exporter around it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from conftest import make_small_net, small_input
from sparsecompile.backends.onnx_export import export_onnx
from sparsecompile.backends.onnxruntime_runner import OrtRunner
from sparsecompile.backends.torch_runner import TorchRunner
from sparsecompile.errors import SparseCompileError


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = make_small_net()
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    info = export_onnx(model, (small_input(4),), path, ["x"])
    return model, path, info


def test_export_keeps_parameter_names_and_dynamic_batch(exported):
    _, path, info = exported
    names = {init.name for init in onnx.load(str(path)).graph.initializer}
    assert {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"} <= names
    assert info["dynamic_batch"]
    assert [i["name"] for i in info["inputs"]] == ["x"] and [o["name"] for o in info["outputs"]] == ["output"]
    assert isinstance(info["inputs"][0]["shape"][0], str)  # symbolic batch
    assert info["inputs"][0]["shape"][1:] == [4, 8, 8]


def test_ort_matches_torch_on_other_batch_sizes(exported):
    model, path, _ = exported
    with OrtRunner(path, threads=1) as ort_runner, TorchRunner(model) as torch_runner:
        for batch in (1, 5):
            x = small_input(batch, seed=batch).numpy()
            np.testing.assert_allclose(ort_runner.infer([x])[0], torch_runner.infer([x])[0], rtol=1e-4, atol=1e-5)


def test_ort_rejects_bad_inputs(exported):
    _, path, _ = exported
    with OrtRunner(path) as runner:
        with pytest.raises(SparseCompileError, match="must be float32"):
            runner.infer([np.zeros((2, 4, 8, 8))])
        with pytest.raises(SparseCompileError, match="takes 1 input"):
            runner.infer([np.zeros((2, 4, 8, 8), np.float32)] * 2)
        with pytest.raises(SparseCompileError, match="must have shape"):
            runner.infer([np.zeros((2, 3, 8, 8), np.float32)])


def test_ort_refuses_a_file_that_is_not_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(SparseCompileError, match="cannot load"):
        OrtRunner(bad).load()


def test_two_outputs_are_named(tmp_path):
    from conftest import TwoInTwoOut

    info = export_onnx(TwoInTwoOut().eval(), (torch.randn(2, 8, 20), torch.randn(2, 12)), tmp_path / "two.onnx",
                       ["signal", "features"])
    assert [o["name"] for o in info["outputs"]] == ["output_0", "output_1"]
