"""The per-layer speed model (uncalibrated: these tests check its arithmetic and rules, not GPU truth)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsecompile.build import BuildOptions, build
from sparsecompile.engine.speed_model import GemmDims, gemm_dims, not_faster_reason, predict
from sparsecompile.passes import ShapePropagation
from sparsecompile.passes.manager import PassContext

from helpers import export_graph


def _node(gm, op_name):
    return next(n for n in gm.graph.nodes if n.op == "call_function" and op_name in str(n.target))


def test_gemm_dims_of_conv_and_linear():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.fc = nn.Linear(16, 12)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    x = torch.randn(2, 8, 10, 10)
    gm = export_graph(Net().eval(), x)
    ShapePropagation()(gm, PassContext(example_inputs=(x,)))
    conv = gemm_dims(_node(gm, "conv2d"), (16, 8, 3, 3), 1, batch=2)
    assert conv == GemmDims(m_per_sample=25, n=16, k=72, kernel=9) and conv.input_channels == 8
    linear = gemm_dims(_node(gm, "linear"), (12, 16), 1, batch=2)
    assert linear == GemmDims(m_per_sample=1, n=12, k=16)


def test_large_compute_bound_layers_gain_small_ones_are_flagged():
    big = predict(GemmDims(49, 512, 512 * 9, 9), "a100", batch=64)
    assert big["bound"] == "compute" and not big["likely_dense"]
    assert 1.3 < big["speedup"] <= 1.5 + 1e-9
    assert not_faster_reason(big, "a100") is None
    small = predict(GemmDims(784, 32, 288, 9), "a100", batch=8)
    assert small["likely_dense"] and "output channels 32 < 256" in small["why"]
    assert "--sparse-only-if-faster" in not_faster_reason(small, "a100")
    # batch 1 through a large linear layer: memory-bound on the weights, which shrink to 0.5625x
    decode = predict(GemmDims(1, 4096, 4096), "a100", batch=1)
    assert decode["bound"] == "memory" and 1.2 < decode["speedup"] < 1 / 0.5625
    # a slower device gains in the same places; an unknown one has no model
    assert predict(GemmDims(49, 512, 4608, 9), "jetson-orin", batch=8)["speedup"] > 1.3
    assert predict(GemmDims(49, 512, 4608, 9), "cpu", batch=8) is None


@pytest.mark.parametrize("only_if_faster", [False, True])
def test_build_records_predictions_and_can_leave_slow_layers_dense(tmp_path, model_files, only_if_faster):
    result = build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / "b"), min_weights=0,
                                calib=str(model_files / "calib.npy"), permute=False,
                                sparse_only_if_faster=only_if_faster))
    layers = [r for r in result.report["layers"] if "speed" in r]
    assert layers and all(r["speed"]["likely_dense"] for r in layers)  # SmallNet's channels are all < 256
    if only_if_faster:
        assert all(r["status"] == "dense" and "--sparse-only-if-faster" in r["reason"] for r in layers)
        assert any("left dense" in n for n in result.report["notes"])
    else:
        assert any(r["status"] == "sparse" for r in layers)
        assert any("will likely stay dense in TensorRT" in n for n in result.report["notes"])
