"""INT8 post-training quantization (sparsecompile.quantize): 2:4 survives, bad layers stay float, ORT agrees.

The models are hand-built ONNX graphs (onnx.helper) with 2:4-masked weights, so every test
runs in seconds: a small CNN (Conv 3x3 -> Relu -> Conv 1x1 -> Relu -> GlobalAveragePool ->
Flatten -> Gemm) and an MLP (Gemm transB=1 -> Relu -> MatMul -> Relu -> Gemm), which covers
the three reduction axes (Conv: 1, Gemm transB=1: 1, MatMul B [K, N]: 0).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper

from sparsecompile.errors import SparseCompileError
from sparsecompile.quantize import (
    calibrate,
    check_qdq_sparsity,
    holdout_feeds,
    keep_float,
    quantization_sensitivity,
    quantize_onnx,
    run_onnx,
)
from sparsecompile.verify import count_nm_violations

pytest.importorskip("onnxruntime")


def mask_2_4(weight: np.ndarray, axis: int) -> np.ndarray:
    """Zero the 2 smallest of every 4 consecutive entries along ``axis``."""
    moved = np.moveaxis(weight, axis, -1).copy()
    groups = moved.reshape(*moved.shape[:-1], -1, 4)
    np.put_along_axis(groups, np.argsort(np.abs(groups), -1)[..., :2], 0, -1)
    return np.moveaxis(groups.reshape(moved.shape), -1, axis).astype(np.float32)


def save_model(path, nodes, inits, inputs, outputs):
    graph = oh.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_cnn(path, seed: int = 0):
    rng = np.random.default_rng(seed)
    inits = {"conv1.weight": mask_2_4(rng.normal(0, 0.3, (8, 4, 3, 3)), 1),
             "conv1.bias": rng.normal(0, 0.1, 8).astype(np.float32),
             "conv2.weight": mask_2_4(rng.normal(0, 0.3, (8, 8, 1, 1)), 1),
             "conv2.bias": rng.normal(0, 0.1, 8).astype(np.float32),
             "fc.weight": mask_2_4(rng.normal(0, 0.3, (10, 8)), 1), "fc.bias": np.zeros(10, np.float32)}
    nodes = [oh.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             oh.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             oh.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], name="conv2"),
             oh.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             oh.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
             oh.make_node("Flatten", ["p"], ["f"], name="flatten"),
             oh.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], name="fc", transB=1)]
    return save_model(path, nodes, inits, [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                      [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])])


def make_mlp(path, outlier: float = 1.0, seed: int = 0):
    """``outlier`` > 1 makes channel 0 of fc2's input ``outlier`` times larger (and fc2's row 0 that much
    smaller, so the float function hardly changes): one per-tensor int8 scale then crushes the other channels."""
    rng = np.random.default_rng(seed)
    w1 = mask_2_4(rng.normal(0, 0.3, (32, 16)), 1)
    b1 = rng.normal(0, 0.1, 32).astype(np.float32)
    w2 = mask_2_4(rng.normal(0, 0.3, (32, 32)), 0)  # MatMul B: [K, N], 2:4 along K
    w1[0] *= outlier
    b1[0] *= outlier
    w2[0] /= outlier
    inits = {"fc1.weight": w1, "fc1.bias": b1, "fc2.weight": w2,
             "fc3.weight": mask_2_4(rng.normal(0, 0.3, (10, 32)), 1), "fc3.bias": np.zeros(10, np.float32)}
    nodes = [oh.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h1"], name="fc1", transB=1),
             oh.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             oh.make_node("MatMul", ["r1", "fc2.weight"], ["h2"], name="fc2"),
             oh.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             oh.make_node("Gemm", ["r2", "fc3.weight", "fc3.bias"], ["y"], name="fc3", transB=1)]
    return save_model(path, nodes, inits, [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                      [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])])


def feeds(shape, count: int = 128, seed: int = 1):
    return holdout_feeds({"x": np.random.default_rng(seed).normal(0, 1, (count, *shape)).astype(np.float32)})


def initializers(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_zeros_stay_zeros_and_the_qdq_model_passes_the_2_4_check(tmp_path):
    fp32 = make_cnn(tmp_path / "cnn.onnx")
    fit, _ = feeds((4, 8, 8))
    info = quantize_onnx(fp32, tmp_path / "q.onnx", fit, calibration="minmax")
    assert info.quantized == ["conv1", "conv2", "fc"] and not info.kept_float

    # Layout: every weight is an int8 initializer read through DequantizeLinear, one scale per output channel, zp 0.
    q_model = onnx.load(str(tmp_path / "q.onnx"))
    values = initializers(tmp_path / "q.onnx")
    float_weights = initializers(fp32)
    for name, channels in (("conv1.weight", 8), ("conv2.weight", 8), ("fc.weight", 10)):
        q = values[name + "_quantized"]
        assert q.dtype == np.int8 and name not in values
        assert values[name + "_scale"].shape == (channels,) and not values[name + "_zero_point"].any()
        assert np.array_equal(q == 0, float_weights[name] == 0)  # no tiny weight here rounds to 0
        assert count_nm_violations(q, 1) == 0
    dq = {n.output[0]: n for n in q_model.graph.node if n.op_type == "DequantizeLinear"}
    conv1 = next(n for n in q_model.graph.node if n.name == "conv1")
    assert dq[conv1.input[1]].input[0] == "conv1.weight_quantized"
    assert dq[conv1.input[0]].op_type == "DequantizeLinear"  # the activation comes through Q/DQ too

    report = check_qdq_sparsity(tmp_path / "q.onnx", ["conv1.weight", "conv2.weight", "fc.weight"], fp32_onnx=fp32)
    assert report["passed"], report["failures"]
    assert all(w["fp32_zeros_kept"] and w["zero_point_zero"] for w in report["weights"].values())
    # polygraphy skips int8 initializers; on the same values widened to float it finds all three 2:4.
    poly = report["polygraphy"]
    if poly["available"]:
        assert poly["as_is"] == []
        assert set(poly["int8_widened"]) == {"conv1.weight", "conv2.weight", "fc.weight"}


def test_the_2_4_check_fails_on_a_broken_int8_weight(tmp_path):
    fp32 = make_cnn(tmp_path / "cnn.onnx")
    fit, _ = feeds((4, 8, 8))
    quantize_onnx(fp32, tmp_path / "q.onnx", fit, calibration="minmax")
    model = onnx.load(str(tmp_path / "q.onnx"))
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name == "conv2.weight_quantized":
            broken = numpy_helper.to_array(tensor).copy()
            broken[0, :4, 0, 0] = 5  # one group of 4 input channels, all nonzero
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(broken, tensor.name))
    onnx.save(model, str(tmp_path / "broken.onnx"))
    report = check_qdq_sparsity(tmp_path / "broken.onnx", ["conv1.weight", "conv2.weight"], polygraphy=False)
    assert not report["passed"]
    assert report["failures"] == ["conv2.weight: 1 groups break 2:4"]
    assert report["weights"]["conv1.weight"]["violations"] == 0


def _simulate_qdq(path, x: np.ndarray) -> np.ndarray:
    """The Q/DQ graph in float torch: QuantizeLinear = round-half-even and clamp, DequantizeLinear = scale.

    This is the fake-quantized model with exactly the file's scales; ORT instead fuses DQ -> op -> Q into
    integer kernels (int32 accumulation, a float requantization multiplier)."""
    model = onnx.load(str(path))
    env = {name: torch.from_numpy(value.copy()) for name, value in initializers(path).items()}
    env["x"] = torch.from_numpy(x)
    for node in model.graph.node:
        args = [env[name] for name in node.input]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            value, scale, zero = args[0].double(), args[1].double(), args[2]
            if scale.dim() == 1:  # per channel along ``axis``
                shape = [1] * value.dim()
                shape[axis] = -1
                scale, zero = scale.reshape(shape), zero.reshape(shape)
            if node.op_type == "QuantizeLinear":
                info = torch.iinfo(zero.dtype)
                out = torch.clamp(torch.round(value / scale) + zero.double(), info.min, info.max).to(zero.dtype)
            else:
                out = ((value - zero.double()) * scale).float()
        elif node.op_type == "Gemm":
            out = args[0] @ (args[1].t() if trans_b else args[1]) + (args[2] if len(args) > 2 else 0)
        elif node.op_type == "MatMul":
            out = args[0] @ args[1]
        elif node.op_type == "Relu":
            out = torch.relu(args[0])
        else:
            raise AssertionError(f"unexpected op {node.op_type}")
        env[node.output[0]] = out
    return env[model.graph.output[0].name].numpy()


def test_int8_onnx_on_ort_agrees_with_the_fake_quantized_reference(tmp_path):
    fp32 = make_mlp(tmp_path / "mlp.onnx")
    fit, held = feeds((16,), count=256)
    quantize_onnx(fp32, tmp_path / "q.onnx", fit)
    x = np.concatenate([f["x"] for f in held])
    ort_out = run_onnx(tmp_path / "q.onnx", [{"x": x}])[0]
    reference = _simulate_qdq(tmp_path / "q.onnx", x)
    step = float(initializers(tmp_path / "q.onnx")["y_scale"])  # the output's int8 step
    difference = np.abs(ort_out - reference)
    # Integer kernels may round an intermediate value to the neighbouring int8 step: allow one output step
    # almost everywhere and two at most.
    assert np.mean(difference <= step * 1.001) >= 0.98, np.max(difference) / step
    assert np.max(difference) <= 2 * step
    # And the int8 model is close to fp32: same top-1 on (nearly) every sample, a few percent relative error.
    float_out = run_onnx(fp32, [{"x": x}])[0]
    assert np.mean(float_out.argmax(1) == ort_out.argmax(1)) >= 0.95
    assert np.linalg.norm(float_out - ort_out) / np.linalg.norm(float_out) < 0.05


def test_an_outlier_heavy_activation_is_found_and_its_layer_kept_float(tmp_path):
    fp32 = make_mlp(tmp_path / "mlp.onnx", outlier=500.0)
    fit, held = feeds((16,), count=256)
    # A random MLP's 10 logits are close: quantizing fc3 alone flips ~2 of 64 samples, hence a 5-point budget.
    ranking = quantization_sensitivity(fp32, fit, held, max_drop=5.0)
    assert ranking[0].layer == "fc2" and ranking[0].score > 1.0  # its input's channel 0 is 500x the others
    assert ranking[-1].layer == "fc3" and ranking[-1].relative_error < 0.05 < ranking[0].relative_error

    info = keep_float(fp32, tmp_path / "q.onnx", fit, held, max_drop=5.0)
    assert not info.search["quantized_all"]["within_budget"] and info.search["within_budget"]
    assert "fc2" in info.kept_float and "sensitivity rank 1" in info.kept_float["fc2"]
    assert "fc3" in info.quantized
    values = initializers(tmp_path / "q.onnx")
    assert values["fc2.weight"].dtype == np.float32 and "fc3.weight_quantized" in values
    accepted = [t["keep_float"] for t in info.search["trials"] if t["accepted"]]
    assert accepted[0] == "fc2" and set(accepted) == set(info.kept_float)
    # The 2:4 check covers the float layer too.
    assert check_qdq_sparsity(tmp_path / "q.onnx", ["fc1.weight", "fc2.weight", "fc3.weight"],
                              polygraphy=False)["passed"]


def test_a_well_behaved_model_keeps_every_layer_quantized(tmp_path):
    fp32 = make_mlp(tmp_path / "mlp.onnx")
    fit, held = feeds((16,), count=256)
    info = keep_float(fp32, tmp_path / "q.onnx", fit, held, max_drop=5.0)
    assert info.kept_float == {} and info.search["trials"] == [] and info.search["within_budget"]


def test_same_inputs_give_the_same_bytes(tmp_path):
    fp32 = make_cnn(tmp_path / "cnn.onnx")
    fit, _ = feeds((4, 8, 8))
    first = quantize_onnx(fp32, tmp_path / "a.onnx", fit, exclude_nodes=["conv2"])
    second = quantize_onnx(fp32, tmp_path / "b.onnx", fit, exclude_nodes=["conv2.weight"])
    assert first.sha256 == second.sha256
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert first.kept_float == {"conv2": "excluded by the caller"}
    other = quantize_onnx(fp32, tmp_path / "c.onnx", fit, calibration="minmax")
    assert other.sha256 != first.sha256


@pytest.mark.parametrize("case, needle", [
    ("missing", "not found"),
    ("no_calib", "none were given"),
    ("wrong_names", "the model wants ['x']"),
    ("unknown_method", "valid: minmax, entropy, percentile"),
    ("unknown_layer", "cannot keep 'nope' in float"),
    ("not_onnx", "not a readable ONNX model"),
])
def test_bad_input_gives_a_one_line_error(tmp_path, case, needle):
    fp32 = make_mlp(tmp_path / "mlp.onnx")
    fit, _ = feeds((16,), count=64)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    calls = {
        "missing": lambda: quantize_onnx(tmp_path / "nope.onnx", tmp_path / "q.onnx", fit),
        "no_calib": lambda: quantize_onnx(fp32, tmp_path / "q.onnx", []),
        "wrong_names": lambda: quantize_onnx(fp32, tmp_path / "q.onnx", [{"input": fit[0]["x"]}]),
        "unknown_method": lambda: quantize_onnx(fp32, tmp_path / "q.onnx", fit, calibration="kl"),
        "unknown_layer": lambda: quantize_onnx(fp32, tmp_path / "q.onnx", fit, exclude_nodes=["nope"]),
        "not_onnx": lambda: quantize_onnx(tmp_path / "junk.onnx", tmp_path / "q.onnx", fit),
    }
    with pytest.raises(SparseCompileError) as caught:
        calls[case]()
    message = str(caught.value)
    assert needle in message and "\n" not in message
    assert not (tmp_path / "q.onnx").exists()


def test_too_few_samples_to_hold_back_is_an_error():
    with pytest.raises(SparseCompileError, match="too few to hold any back"):
        holdout_feeds({"x": np.zeros((12, 4), np.float32)})


@pytest.mark.parametrize("calibration", ["percentile", "minmax"])
def test_a_smaller_last_batch_calibrates(tmp_path, calibration):
    # ORT's histogram calibrators stack every batch's activations and refuse ragged batches; 48 samples in
    # batches of 32 and 16 are re-batched to equal sizes first.
    fp32 = make_mlp(tmp_path / "mlp.onnx")
    x = np.random.default_rng(3).normal(0, 1, (48, 16)).astype(np.float32)
    ragged = quantize_onnx(fp32, tmp_path / "a.onnx", [{"x": x[:32]}, {"x": x[32:]}], calibration=calibration)
    even = quantize_onnx(fp32, tmp_path / "b.onnx", [{"x": x[:24]}, {"x": x[24:]}], calibration=calibration)
    assert ragged.calibration_samples == 48 and ragged.sha256 == even.sha256


def test_u8_activations_for_the_cpu_keep_int8_symmetric_weights(tmp_path):
    fp32 = make_cnn(tmp_path / "cnn.onnx")
    fit, _ = feeds((4, 8, 8))
    info = quantize_onnx(fp32, tmp_path / "u8.onnx", fit, activations="u8")
    values = initializers(tmp_path / "u8.onnx")
    assert info.to_json()["format"] == "QDQ U8S8" and values["x_zero_point"].dtype == np.uint8
    assert check_qdq_sparsity(tmp_path / "u8.onnx", ["conv1.weight", "conv2.weight", "fc.weight"], fp32_onnx=fp32,
                              polygraphy=False)["passed"]
    with pytest.raises(SparseCompileError, match="valid: s8, u8"):
        quantize_onnx(fp32, tmp_path / "x.onnx", fit, activations="fp8")


@pytest.mark.parametrize("calibration", ["percentile", "entropy", "minmax"])
def test_a_calibration_set_over_the_memory_budget_goes_in_several_passes(tmp_path, monkeypatch, calibration):
    # ORT's calibrators hold every calibrated activation of what they are given (197 MB per sample on the
    # PP-OCRv4 recognizer: an INT8 build of it was killed for memory). With a tiny budget the samples go in
    # several collect_data passes, whose ranges / histograms ORT merges.
    import sparsecompile.quantize as quantize

    fp32 = make_cnn(tmp_path / "cnn.onnx")
    x = np.random.default_rng(4).normal(0, 1, (64, 4, 8, 8)).astype(np.float32)
    batches = [{"x": x[i:i + 32]} for i in range(0, 64, 32)]
    whole = calibrate(fp32, batches, calibration)
    calls = []
    original = quantize._collect_in_chunks

    def counting(calibrator, batches, dynamic, reader_class):
        collect = calibrator.collect_data
        calibrator.collect_data = lambda reader: (calls.append(1), collect(reader))
        return original(calibrator, batches, dynamic, reader_class)

    monkeypatch.setattr(quantize, "_collect_in_chunks", counting)
    monkeypatch.setattr(quantize, "CALIBRATION_MEMORY_BYTES", 8 * 4 * 8 * 8 * 4 * 6)  # a few samples' activations
    chunked = calibrate(fp32, batches, calibration)
    # minmax's augmented model outputs only each tensor's per-batch min and max: it fits in one pass
    assert (len(calls) == 1 if calibration == "minmax" else len(calls) > 2) and chunked.samples == 64
    def highest(calibration_result):  # ORT's calibration cache: {"data": {tensor: {"highest": ...}}}
        data = json.loads(calibration_result.ranges_json)["data"]
        return {k: np.asarray(v["highest"]["data"] if isinstance(v["highest"], dict) else v["highest"], np.float64)
                for k, v in data.items()}

    ranges, chunked_ranges = highest(whole), highest(chunked)
    assert ranges.keys() == chunked_ranges.keys()
    for name, high in ranges.items():
        if calibration == "minmax":  # ranges merge exactly
            assert np.array_equal(high, chunked_ranges[name]), name
        else:  # merged histograms: the same threshold up to the re-binning
            assert np.allclose(high, chunked_ranges[name], rtol=0.1), (name, high, chunked_ranges[name])
