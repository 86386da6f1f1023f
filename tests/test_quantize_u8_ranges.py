"""uint8 activations get ranges that start where a Relu/Clip output starts (issue 20's minmax bug).

With asymmetric (u8) activations ONNX Runtime's QDQ quantizer drops every Relu and Clip after a
quantized op and lets the QuantizeLinear of its output clip instead, so that output's saved range
must start at the op's lower bound. ``minmax`` used to save ORT's symmetric ranges ``[-m, m]``: the
zero point landed mid-range, negatives passed, and the shipped example fell to 10 % top-1. Here a
tiny hand-built graph (Conv -> Relu -> Conv -> Clip(0, 6) -> pool -> Gemm) shows the same thing.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper

from sparsecompile.quantize import Calibration, calibrate, quantize_onnx, run_onnx

pytest.importorskip("onnxruntime")


def _relu_clip_net(path):
    rng = np.random.default_rng(7)
    weights = {"a.weight": rng.normal(0, 0.4, (8, 3, 3, 3)), "a.bias": rng.normal(0, 0.2, 8),
               "b.weight": rng.normal(0, 0.4, (8, 8, 3, 3)), "b.bias": rng.normal(0, 0.2, 8),
               "head.weight": rng.normal(0, 0.4, (5, 8)), "head.bias": np.zeros(5),
               "lo": np.array(0.0), "hi": np.array(6.0)}
    nodes = [oh.make_node("Conv", ["x", "a.weight", "a.bias"], ["a_out"], name="a", pads=[1] * 4),
             oh.make_node("Relu", ["a_out"], ["a_act"], name="a_relu"),
             oh.make_node("Conv", ["a_act", "b.weight", "b.bias"], ["b_out"], name="b", pads=[1] * 4),
             oh.make_node("Clip", ["b_out", "lo", "hi"], ["b_act"], name="b_clip"),
             oh.make_node("GlobalAveragePool", ["b_act"], ["pooled"], name="pool"),
             oh.make_node("Flatten", ["pooled"], ["flat"], name="flat"),
             oh.make_node("Gemm", ["flat", "head.weight", "head.bias"], ["y"], name="head", transB=1)]
    graph = oh.make_graph(nodes, "relu_clip", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
                          [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    folder = tmp_path_factory.mktemp("u8")
    fp32 = _relu_clip_net(folder / "net.onnx")
    x = np.random.default_rng(3).normal(0, 1, (64, 3, 6, 6)).astype(np.float32)
    feeds = [{"x": x[i:i + 16]} for i in range(0, 64, 16)]
    return folder, fp32, feeds, run_onnx(fp32, feeds)[0], calibrate(fp32, feeds, "minmax")


def _error(q_onnx, feeds, reference) -> float:
    return float(np.abs(run_onnx(q_onnx, feeds)[0] - reference).max() / np.abs(reference).max())


def _activation_zero_points(q_onnx) -> dict[str, int]:
    model = onnx.load(str(q_onnx))
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {node.input[0]: int(values[node.input[2]]) for node in model.graph.node
            if node.op_type == "QuantizeLinear" and len(node.input) > 2}


def _symmetric(ranges: Calibration) -> Calibration:
    """The same ranges made ``[-max|x|, max|x|]``, as ORT's symmetric minmax saves them."""
    cache = json.loads(ranges.ranges_json)
    for entry in cache["data"].values():
        low, high = (np.asarray(entry[k]["data"], np.float32) for k in ("lowest", "highest"))
        bound = np.maximum(np.abs(low), np.abs(high))
        entry["lowest"]["data"], entry["highest"]["data"] = (-bound).tolist(), bound.tolist()
    return Calibration(ranges.method, ranges.samples, json.dumps(cache), ranges.model_sha256)


def test_minmax_saves_each_tensors_true_range(net):
    data = json.loads(net[4].ranges_json)["data"]
    low = {name: np.asarray(entry["lowest"]["data"]).item() for name, entry in data.items()}
    assert low["a_act"] == 0.0 and low["b_act"] >= 0.0 and low["x"] < 0.0


def test_u8_with_minmax_keeps_the_relu_and_clip(net):
    folder, fp32, feeds, reference, ranges = net
    u8 = quantize_onnx(fp32, folder / "u8.onnx", ranges=ranges, activations="u8").path
    ops = [node.op_type for node in onnx.load(str(u8)).graph.node]
    assert "Relu" not in ops and "Clip" not in ops  # ORT folded them into the QuantizeLinear of their outputs ...
    zero_points = _activation_zero_points(u8)
    assert zero_points["a_act"] == 0 and zero_points["b_act"] == 0  # ... which therefore clip at 0
    assert _error(u8, feeds, reference) < 0.05  # before the fix: 1.33 (0.011 now)


def test_symmetric_ranges_are_clamped_for_u8_and_change_nothing_for_s8(net):
    folder, fp32, feeds, reference, ranges = net
    symmetric = _symmetric(ranges)
    u8 = quantize_onnx(fp32, folder / "sym-u8.onnx", ranges=symmetric, activations="u8").path
    zero_points = _activation_zero_points(u8)
    assert zero_points["a_act"] == 0 and zero_points["b_act"] == 0
    assert _error(u8, feeds, reference) < 0.05
    # s8 symmetrizes every range itself: true and symmetric ranges give the same bytes
    s8_true = quantize_onnx(fp32, folder / "s8-true.onnx", ranges=ranges)
    s8_symmetric = quantize_onnx(fp32, folder / "s8-sym.onnx", ranges=symmetric)
    assert s8_true.sha256 == s8_symmetric.sha256
    assert _error(s8_true.path, feeds, reference) < 0.05
