"""Post-training INT8 quantization of the (sparse) ONNX model, in explicit Q/DQ form, keeping 2:4 exact.

What it writes
    An *S8S8 QDQ* model (``onnxruntime.quantization.quantize_static``, ``QuantFormat.QDQ``):
    every quantized Conv/Gemm/MatMul reads its weight as an **int8 initializer** through a
    ``DequantizeLinear`` with one scale per output channel and **zero point 0** (symmetric),
    and its activations through ``QuantizeLinear -> DequantizeLinear`` pairs with one int8
    scale per tensor and zero point 0 (symmetric). Biases become int32 with scale
    ``input_scale * weight_scale``. This is the explicit-quantization form TensorRT consumes
    (``--int8`` with the Q/DQ model, sparse weights enabled) and the form ONNX Runtime's CPU
    kernels run. ``docs/int8.md`` shows the layout.

    For the CPU fallback, ``activations="u8"`` writes uint8 asymmetric activations instead
    (U8S8; weights unchanged): ONNX Runtime's x86 kernels fuse only that form fully. Measured on
    the shipped example: u8 turns all 9 convolutions into QLinearConv (2.5x faster than fp32 at
    batch 8, one thread); s8 turns 3 of 9 and is slower than fp32. So a build that targets both
    writes two files: s8 for TensorRT, u8 for ORT (see :data:`ACTIVATIONS`). In the u8 form ORT
    drops each Relu/Clip after a quantized op and lets its output's QuantizeLinear clip instead, so
    those outputs' ranges are clamped to the op's bounds first (:func:`_clamp_to_activations`).

Why zeros stay zeros (the 2:4 invariant)
    A symmetric int8 weight is ``q = clip(round(w / s_c), -127, 127)`` with ``s_c = max|w_c| / 127``
    per output channel ``c`` and no zero point, so ``w = 0`` gives ``q = 0`` exactly: every
    group of 4 along the reduction axis that had 2 zeros still has them. Quantization can only
    add zeros (tiny weights round to 0), never remove one. :func:`check_qdq_sparsity` checks it
    on the written file, with :func:`sparsecompile.verify.count_nm_violations` (the repo's
    independent checker) on the int8 values along each op's reduction axis (Conv: axis 1 of
    ``[Cout, Cin, kh, kw]``; Gemm: axis 1 with ``transB=1``, else 0; MatMul: axis -2 of B), and
    with polygraphy's sparsity checker (see there for what polygraphy can and cannot read).

Calibration (``calibration=``, a registry: :data:`CALIBRATIONS`)
    ``minmax``      the range of each activation over the calibration samples.
    ``entropy``     TensorRT's KL-divergence threshold (2048-bin histogram, 128 quantized bins).
                    Not ORT's defaults: through ``quantize_static`` its entropy calibrator uses
                    128 bins and 128 quantized bins, which leaves one candidate threshold, i.e.
                    it *is* minmax (measured: byte-identical models). Costs ~2 s per activation
                    tensor on one core for the threshold search.
    ``percentile``  the 99.999th percentile of ``|x|`` (ORT's default percentile).
    Calibration runs once (:func:`calibrate`) and gives a :class:`Calibration` (the tensor
    ranges as JSON text); every later quantization of the same model (the sensitivity search
    quantizes it once per layer) reuses it through ORT's calibration cache instead of
    running the model again.

    **Default: percentile**, by measurement on the shipped example
    (``examples/fashion_mnist``, magnitude 2:4 build, 256 calibration images, the 2000 images of
    ``eval.npz``, fp32 sparse model 93.15 %): percentile 93.15 % (99.6 % top-1 agreement with
    fp32), minmax 93.05 % (99.6 %), entropy 91.20 % (94.95 %). Minmax and percentile are within
    the data's resolution of each other on this model; percentile is the default because one
    outlying calibration sample cannot stretch its range (it can minmax's), and entropy loses
    2 points here. ``benchmarks/int8_cpu.py`` re-measures it; ``benchmarks/results/int8_cpu.md``.

Layers that quantize badly (:func:`quantization_sensitivity`, :func:`keep_float`)
    Sensitivity of a weighted node = the damage (:func:`sparsecompile.damage.measure_damage`,
    the guard's units and budgets) of the model with *only that node* quantized, against the
    reference outputs, on held-back samples; ties in the coarse agreement scores go by
    relative error, as in the sparsity guard. One quantization (cached ranges) and one ORT
    pass per node. Then :func:`keep_float` quantizes everything, and while the model is over
    budget excludes (``nodes_to_exclude``) the most sensitive node still quantized,
    re-measuring after each; an exclusion that does not lower (score, relative error) is
    undone and recorded, and the next is tried. Every trial is recorded with the reason.

Library choice
    ONNX Runtime's quantizer, not NVIDIA ModelOpt: ORT is already a dependency (the CPU
    fallback), its QDQ output is what TensorRT's explicit-quantization path consumes *and*
    what ORT's CPU integer kernels run, so one file serves both. ModelOpt's ONNX PTQ
    (``modelopt.onnx.quantization.quantize``) also calibrates on the CPU execution provider
    by default and is built on ORT's quantizer (its ``ort_patching`` module patches ORT's
    functions) with TensorRT-specific Q/DQ placement, but it is not installed here, its
    ``[onnx]`` extra is avoided (``DESIGN.md``), and its torch path needs a torch-side
    quantized model export. It was not measured against ORT here.

Deterministic: ORT's calibration is not random (it writes its augmented model into a
temporary directory it deletes); the same model, inputs and options give the same bytes
(tested). Nothing here draws random numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from sparsecompile.damage import HOLDOUT_FRACTION, MIN_HOLDOUT, holdout_split
from sparsecompile.errors import SparseCompileError
from sparsecompile.verify import count_nm_violations

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
# name -> (ORT CalibrationMethod member name, calibrator options, what it does)
# minmax keeps each tensor's true [min, max] (not ORT's symmetric option, which saves [-max|x|, max|x|] even for a
# Relu output): the quantizer symmetrizes a range itself for s8 (the same bytes as before), and u8 needs the true
# range (issue 20: a Relu's range saved as [-m, m] made every u8 model predict garbage; see _clamp_to_activations).
# entropy's and percentile's "symmetric" picks their threshold search on |x|; ORT clips those ranges to the data.
CALIBRATIONS = {
    "minmax": ("MinMax", {"symmetric": False}, "range of each activation over the samples"),
    "entropy": ("Entropy", {"symmetric": True, "num_bins": 2048, "num_quantized_bins": 128},
                "TensorRT-style KL-divergence threshold (2048-bin histogram)"),
    "percentile": ("Percentile", {"symmetric": True, "num_bins": 2048, "percentile": 99.999},
                   "99.999th percentile of |x|"),
}
DEFAULT_CALIBRATION = "percentile"
# Activations ORT's calibrator may hold at once (see _collect_in_chunks); more samples go in several passes.
CALIBRATION_MEMORY_BYTES = 1 << 30
# Activation encodings: "s8" (int8, symmetric, zero point 0) is what TensorRT's explicit quantization needs;
# "u8" (uint8, asymmetric) is what ONNX Runtime's x86 CPU kernels fuse. Measured on the shipped example (ORT
# 1.32, AVX-512 VNNI, batch 8, 1 thread): u8 fuses all 9 convolutions into QLinearConv and runs 2.5x faster
# than fp32; s8 fuses 3 of 9 (a Conv followed by Relu stays DQ -> float Conv -> Q) and is *slower* than fp32.
# Weights are int8 symmetric per channel in both, so zeros stay zeros either way.
ACTIVATIONS = {"s8": ("QInt8", True), "u8": ("QUInt8", False)}  # name -> (ORT QuantType, symmetric)
DEFAULT_ACTIVATIONS = "s8"
QUANTIZED_SUFFIX = "_quantized"  # ORT names an int8 weight initializer '<float name>_quantized'


# --------------------------------------------------------------------------- helpers


def _import_ort_quantization():
    try:
        import onnxruntime.quantization as ortq
    except ImportError:
        raise SparseCompileError("INT8 quantization needs onnxruntime: pip install onnxruntime") from None
    return ortq


@contextlib.contextmanager
def _quiet():
    """ORT's calibrators print() progress and quantize_static logs a pre-processing hint on the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _load(path: Path):
    import onnx

    path = Path(path)
    if not path.is_file():
        raise SparseCompileError(f"ONNX model '{path}' not found")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - onnx raises protobuf's DecodeError and others
        raise SparseCompileError(f"'{path}' is not a readable ONNX model: {str(exc).splitlines()[0][:200]}") from None


def _attribute(node, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return attr.i
    return default


def reduction_axis(node, weight_rank: int) -> int:
    """The axis of a node's weight (input 1) that the op sums over: the axis 2:4 groups run along."""
    if node.op_type == "Conv":
        return 1  # [Cout, Cin/groups, kh, kw]
    if node.op_type == "Gemm":
        return 1 if _attribute(node, "transB", 0) else 0
    return weight_rank - 2  # MatMul B: [..., K, N]


@dataclass
class WeightedNode:
    node: str  # ONNX node name (what nodes_to_exclude takes)
    op_type: str
    weight: str  # the float weight initializer's name (the build keeps parameter names: 'stage1.conv1.weight')
    axis: int  # reduction axis of the weight

    @property
    def layer(self) -> str:
        return self.weight[: -len(".weight")] if self.weight.endswith(".weight") else self.weight


def weighted_nodes(model) -> list[WeightedNode]:
    """Conv/Gemm/MatMul nodes of a float model whose input 1 is an initializer: what quantization can touch."""
    initializers = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type in WEIGHT_OPS and len(node.input) > 1 and node.input[1] in initializers:
            rank = len(initializers[node.input[1]].dims)
            found.append(WeightedNode(node.name, node.op_type, node.input[1], reduction_axis(node, rank)))
    return found


def _resolve_nodes(model, names: Sequence[str]) -> list[str]:
    """Node names for ``names``, each a node name, a weight initializer name or a layer name."""
    nodes = weighted_nodes(model)
    all_nodes = {n.name for n in model.graph.node}
    by_alias = {}
    for item in nodes:
        by_alias[item.weight] = item.node
        by_alias[item.layer] = item.node
    resolved = []
    for name in names:
        if name in all_nodes:
            resolved.append(name)
        elif name in by_alias:
            resolved.append(by_alias[name])
        else:
            valid = ", ".join(n.layer for n in nodes[:12]) + (" ..." if len(nodes) > 12 else "")
            raise SparseCompileError(f"cannot keep '{name}' in float: no such node, weight or layer "
                                     f"(quantizable layers: {valid})")
    return sorted(set(resolved), key=resolved.index)


def _check_inputs(model, calib_inputs, what: str = "calibration") -> list[dict[str, np.ndarray]]:
    if not calib_inputs:
        raise SparseCompileError(f"INT8 quantization needs {what} inputs: none were given")
    initializers = {t.name for t in model.graph.initializer}
    wanted = [i.name for i in model.graph.input if i.name not in initializers]
    batches = []
    for index, batch in enumerate(calib_inputs):
        if not isinstance(batch, dict) or sorted(batch) != sorted(wanted):
            got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise SparseCompileError(f"{what} batch {index} has inputs {got}, the model wants {sorted(wanted)}")
        arrays = {name: np.ascontiguousarray(value) for name, value in batch.items()}
        for name, array in arrays.items():
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise SparseCompileError(f"{what} batch {index} input '{name}' holds NaN or infinite values")
        batches.append(arrays)
    return batches


def batches_from_array(array: np.ndarray, input_name: str, batch_size: int = 32) -> list[dict[str, np.ndarray]]:
    """``[N, ...]`` samples -> a list of ``{input_name: batch}`` feeds (what the functions here take)."""
    return [{input_name: array[i:i + batch_size]} for i in range(0, len(array), batch_size)]


def holdout_feeds(arrays: dict[str, np.ndarray], seed: int = 0, batch_size: int = 32
                  ) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Split samples (axis 0 of every array) into (calibration, held-back) feeds with the guard's split.

    :func:`sparsecompile.damage.holdout_split` picks the held-back quarter with a seeded shuffle;
    too few samples to hold any back raises (quantization is then unguarded: the caller decides).
    """
    count = len(next(iter(arrays.values())))
    split = holdout_split(count, seed)
    if split is None:
        raise SparseCompileError(f"{count} calibration samples are too few to hold any back for the INT8 check "
                                 f"(about {MIN_HOLDOUT / HOLDOUT_FRACTION:.0f} needed)")
    fit, held = (np.asarray(indices) for indices in split)

    def feeds(index):
        return [{name: np.ascontiguousarray(a[index[i:i + batch_size]]) for name, a in arrays.items()}
                for i in range(0, len(index), batch_size)]

    return feeds(fit), feeds(held)


def _equal_batches(batches: list[dict[str, np.ndarray]], max_size: int | None = None) -> list[dict[str, np.ndarray]]:
    """The same samples in batches of one size, at most the largest given (and at most ``max_size``): ORT's
    histogram calibrators (entropy, percentile) stack every batch's activations with ``np.asarray`` and
    fail on a smaller last batch."""
    sizes = {len(next(iter(b.values()))) for b in batches}
    limit = max(sizes) if max_size is None else min(max(sizes), max_size)
    if len(sizes) <= 1 and max(sizes) <= limit:
        return batches
    joined = {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}
    total = len(next(iter(joined.values())))
    size = next(s for s in range(limit, 0, -1) if total % s == 0)
    return [{name: a[i:i + size] for name, a in joined.items()} for i in range(0, total, size)]


def _dynamic_batch(model) -> bool:
    """Whether every graph input's first dimension is symbolic (the model takes any batch size)."""
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            return False
    return True


def _collect_in_chunks(calibrator, batches: list[dict[str, np.ndarray]], dynamic: bool, reader_class) -> None:
    """Feed ``batches`` (of one size) to ORT's ``calibrator`` a few at a time.

    Its calibrators keep every calibrated activation of every batch they are given in memory before
    reducing them (a histogram, or a range): 197 MB per sample on the PP-OCRv4 recognizer, so a
    calibration set of a few hundred samples was killed for memory. Both kinds merge repeated
    ``collect_data`` calls (ranges by min/max, histograms by re-binning onto the wider range), so the
    samples go in calls that hold at most ``CALIBRATION_MEMORY_BYTES`` of activations, measured on the
    first batch. A model that fits does it in one call, exactly as before; a dynamic-batch model's batches
    are split when one batch alone is over the budget.
    """
    session = calibrator.infer_session
    names = [output.name for output in session.get_outputs()]
    wanted = getattr(calibrator, "tensors_to_calibrate", None) or set(names)
    size = _sample_count(batches[:1])
    per_batch = sum(value.nbytes for name, value in zip(names, session.run(None, batches[0])) if name in wanted)
    per_call = max(1, CALIBRATION_MEMORY_BYTES // max(1, per_batch // max(size, 1)))
    if dynamic and size > per_call:
        batches = _equal_batches(batches, per_call)
        size = _sample_count(batches[:1])
    per_chunk = max(1, per_call // size)
    for start in range(0, len(batches), per_chunk):
        calibrator.collect_data(reader_class(batches[start:start + per_chunk]))


def _sample_count(batches) -> int:
    return sum(int(next(iter(b.values())).shape[0]) if next(iter(b.values())).ndim else 1 for b in batches)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- calibration and quantization


def _activation_bounds(model) -> dict[str, tuple[float | None, float | None]]:
    """Output tensor -> the (low, high) bounds its op guarantees, for Relu and Clip with constant bounds."""
    from onnx import numpy_helper

    constants = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = node.attribute[0].t

    def constant(name):
        return float(numpy_helper.to_array(constants[name])) if name in constants else None

    bounds = {}
    for node in model.graph.node:
        if node.op_type == "Relu":
            bounds[node.output[0]] = (0.0, None)
        elif node.op_type == "Clip":
            attrs = {a.name: a.f for a in node.attribute}
            low = constant(node.input[1]) if len(node.input) > 1 and node.input[1] else attrs.get("min")
            high = constant(node.input[2]) if len(node.input) > 2 and node.input[2] else attrs.get("max")
            bounds[node.output[0]] = (low, high)
    return bounds


def _clamp_to_activations(model, ranges_json: str) -> str:
    """The calibration cache with each Relu/Clip output's range clamped into what that op can output.

    With asymmetric (u8) activations ORT's QDQ quantizer *removes* every Relu and Clip that follows a quantized
    op and lets the QuantizeLinear of its output do the clipping (``QDQRemovableActivation``): that is right
    only if the saved range starts at the op's lower bound (0 for a Relu). A range that reaches below it (a
    symmetric ``[-m, m]``, as ORT's symmetric minmax saves for a Relu output) gives a zero point in the middle,
    so negative values pass and the network loses its nonlinearities (issue 20: 10 % top-1 on the shipped
    example, all 7 Relus gone). Clamping is exact: the op's output never leaves its bounds, so the clamped range
    still holds every value; for s8 (symmetric, ``max(|low|, |high|)``) it changes nothing on ranges measured
    on data.
    """
    bounds = _activation_bounds(model)
    cache = json.loads(ranges_json)
    data = cache.get("data", {})

    def clamp(value, low, high):  # a number, or ORT's {"data": number or list, "dtype", "CLS": "numpy.array"}
        if isinstance(value, dict) and "data" in value:
            return {**value, "data": clamp(value["data"], low, high)}
        if isinstance(value, list):
            return [clamp(v, low, high) for v in value]
        if isinstance(value, (int, float)):
            value = value if low is None else max(value, low)
            return value if high is None else min(value, high)
        return value

    changed = False
    for name, (low, high) in bounds.items():
        entry = data.get(name)
        if not isinstance(entry, dict):
            continue
        for key in ("lowest", "highest"):
            if key in entry:
                clamped = clamp(entry[key], low, high)
                changed |= clamped != entry[key]
                entry[key] = clamped
    return json.dumps(cache) if changed else ranges_json


@dataclass(frozen=True)
class Calibration:
    """Activation ranges of one float model (ORT's calibration cache as JSON text), reusable across quantizations."""

    method: str
    samples: int
    ranges_json: str
    model_sha256: str


def calibrate(fp32_onnx: Path, calib_inputs: list[dict[str, np.ndarray]],
              calibration: str = DEFAULT_CALIBRATION) -> Calibration:
    """Run the float model on ``calib_inputs`` and compute each activation's range with ``calibration``."""
    if calibration not in CALIBRATIONS:
        raise SparseCompileError(f"unknown calibration '{calibration}' (valid: {', '.join(CALIBRATIONS)})")
    fp32_onnx = Path(fp32_onnx)
    model = _load(fp32_onnx)
    batches = _check_inputs(model, calib_inputs)
    ortq = _import_ort_quantization()
    from onnxruntime.quantization.calibrate import save_tensors_data

    method_name, options, _ = CALIBRATIONS[calibration]
    samples = _sample_count(batches)
    batches = _equal_batches(batches)

    class Reader(ortq.CalibrationDataReader):
        def __init__(self, chunk):
            self._batches = iter(chunk)

        def get_next(self):
            return next(self._batches, None)

    with tempfile.TemporaryDirectory(prefix="sparsecompile-calib-") as tmp, _quiet():
        try:
            calibrator = ortq.create_calibrator(
                fp32_onnx, [], augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                calibrate_method=getattr(ortq.CalibrationMethod, method_name), extra_options=dict(options))
            _collect_in_chunks(calibrator, batches, _dynamic_batch(model), Reader)
            ranges = calibrator.compute_data()
        except SparseCompileError:
            raise
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise SparseCompileError(f"calibrating '{fp32_onnx}' with ONNX Runtime failed: {first}") from None
        cache = Path(tmp) / "ranges.json"
        save_tensors_data(ranges, cache)
        text = cache.read_text()
    return Calibration(calibration, samples, text, _sha256(fp32_onnx))


@dataclass
class QuantizeInfo:
    path: Path
    calibration: str
    calibration_samples: int
    per_channel: bool
    quantized: list[str]  # layers (weight names without '.weight') whose weights are int8
    kept_float: dict[str, str]  # layer -> why it stays float
    sha256: str
    activations: str = DEFAULT_ACTIVATIONS
    search: dict = field(default_factory=dict)  # keep_float's trials and damages, when it chose kept_float

    def to_json(self) -> dict:
        return {"path": str(self.path), "format": f"QDQ {self.activations.upper()}S8", "calibration": self.calibration,
                "calibration_samples": self.calibration_samples, "per_channel_weights": self.per_channel,
                "quantized": self.quantized, "kept_float": self.kept_float, "sha256": self.sha256,
                **({"search": self.search} if self.search else {})}


def quantize_onnx(fp32_onnx: Path, out_onnx: Path, calib_inputs: list[dict[str, np.ndarray]] | None = None, *,
                  calibration: str = DEFAULT_CALIBRATION, exclude_nodes: Sequence[str] = (),
                  reasons: dict[str, str] | None = None, per_channel: bool = True,
                  ranges: Calibration | None = None, only_nodes: Sequence[str] | None = None,
                  activations: str = DEFAULT_ACTIVATIONS) -> QuantizeInfo:
    """Write an S8S8 QDQ model of ``fp32_onnx`` to ``out_onnx``.

    ``calib_inputs``: feeds ``{input name: [batch, ...] array}``; or pass ``ranges`` from
    :func:`calibrate` to skip calibration. ``exclude_nodes``: node, weight or layer names kept
    in float (``reasons`` says why, per name). ``only_nodes``: quantize just these (the
    sensitivity search). ``per_channel`` weights are the default (TensorRT wants them; per
    tensor would let one large channel crush the others). ``activations``: ``"s8"`` for TensorRT
    (the default), ``"u8"`` for ONNX Runtime's CPU kernels (see :data:`ACTIVATIONS`).
    """
    if activations not in ACTIVATIONS:
        raise SparseCompileError(f"unknown activation encoding '{activations}' (valid: {', '.join(ACTIVATIONS)})")
    fp32_onnx, out_onnx = Path(fp32_onnx), Path(out_onnx)
    model = _load(fp32_onnx)
    exclude = _resolve_nodes(model, list(exclude_nodes))
    only = _resolve_nodes(model, list(only_nodes)) if only_nodes is not None else []
    if ranges is None:
        if calib_inputs is None or not len(calib_inputs):
            raise SparseCompileError("INT8 quantization needs calibration inputs: none were given")
        ranges = calibrate(fp32_onnx, calib_inputs, calibration)
    elif ranges.model_sha256 != _sha256(fp32_onnx):
        raise SparseCompileError(f"the calibration ranges were computed for another model than '{fp32_onnx}'")
    ortq = _import_ort_quantization()
    method_name = CALIBRATIONS[ranges.method][0]
    out_onnx.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sparsecompile-quant-") as tmp, _quiet():
        cache = Path(tmp) / "ranges.json"
        cache.write_text(_clamp_to_activations(model, ranges.ranges_json))
        try:
            ortq.quantize_static(
                str(fp32_onnx), str(out_onnx), None, quant_format=ortq.QuantFormat.QDQ, per_channel=per_channel,
                activation_type=getattr(ortq.QuantType, ACTIVATIONS[activations][0]),
                weight_type=ortq.QuantType.QInt8,
                nodes_to_quantize=only or None, nodes_to_exclude=exclude or None,
                calibrate_method=getattr(ortq.CalibrationMethod, method_name), calibration_cache_path=str(cache),
                extra_options={"ActivationSymmetric": ACTIVATIONS[activations][1], "WeightSymmetric": True})
        except Exception as exc:  # noqa: BLE001
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise SparseCompileError(f"ONNX Runtime could not quantize '{fp32_onnx}': {first}") from None
    nodes = weighted_nodes(model)
    layer_of = {n.node: n.layer for n in nodes}
    int8 = set(_int8_weights(_load(out_onnx)))
    reasons = reasons or {}
    alias = {**{n.weight: n.node for n in nodes}, **{n.layer: n.node for n in nodes}}
    why = {alias.get(name, name): text for name, text in reasons.items()}
    kept = {layer_of[node]: why.get(node, "excluded by the caller") for node in exclude if node in layer_of}
    for item in nodes:
        if item.weight not in int8 and item.layer not in kept and not only:
            kept[item.layer] = "ONNX Runtime left its weight in float"
    return QuantizeInfo(out_onnx, ranges.method, ranges.samples, per_channel,
                        [n.layer for n in nodes if n.weight in int8], kept, _sha256(out_onnx), activations)


# --------------------------------------------------------------------------- the 2:4 check on the Q/DQ model


def _int8_weights(q_model) -> dict[str, dict]:
    """Float weight name -> {node, op_type, int8 array, axis, zero points} for weights read through DequantizeLinear."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in q_model.graph.initializer}
    producer = {out: node for node in q_model.graph.node for out in node.output}
    found = {}
    for node in q_model.graph.node:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            continue
        dq = producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in initializers:
            continue
        values = numpy_helper.to_array(initializers[dq.input[0]])
        if values.dtype != np.int8:
            continue
        has_zero = len(dq.input) > 2 and dq.input[2] in initializers
        if len(dq.input) < 2 or dq.input[1] not in initializers:
            continue  # a scale computed at run time: not a weight this module understands
        scale = numpy_helper.to_array(initializers[dq.input[1]])
        zero = numpy_helper.to_array(initializers[dq.input[2]]) if has_zero else np.zeros(scale.shape, np.int8)
        name = dq.input[0][: -len(QUANTIZED_SUFFIX)] if dq.input[0].endswith(QUANTIZED_SUFFIX) else dq.input[0]
        # DequantizeLinear's axis defaults to 1; a 0-d scale is per tensor
        quant_axis = _attribute(dq, "axis", 1) % values.ndim if scale.ndim else None
        found[name] = {"node": node.name, "op_type": node.op_type, "values": values,
                       "axis": reduction_axis(node, values.ndim), "zero_point_zero": bool(np.all(zero == 0)),
                       "initializer": dq.input[0], "scale": scale, "zero_point": zero, "quant_axis": quant_axis,
                       "scale_initializer": dq.input[1], "zero_point_initializer": dq.input[2] if has_zero else None}
    return found


def check_qdq_sparsity(q_onnx: Path, layer_weights: Sequence[str] | None = None, *, fp32_onnx: Path | None = None,
                       polygraphy: bool = True, n: int = 2, m: int = 4) -> dict:
    """Check the int8 weights of a Q/DQ model are ``n:m`` along each op's reduction axis.

    Every Conv/Gemm/MatMul weight that comes through DequantizeLinear from an int8 initializer
    is reported (``weights``: violations, zero share, zero point). ``layer_weights`` (float
    weight names, e.g. the build's sparse layers) must each be ``n:m``; one kept in float is
    checked in float. ``passed`` is True when all of them are. With ``fp32_onnx``, each int8
    weight's zeros are compared with the float model's (``fp32_zeros_kept``: every float zero is
    an int8 zero; ``rounded_to_zero``: nonzeros that became 0). ``polygraphy``: what polygraphy's
    checker says, on the file as is and with the int8 values widened to float32 (see there).
    """
    from onnx import numpy_helper

    q_onnx = Path(q_onnx)
    q_model = _load(q_onnx)
    int8 = _int8_weights(q_model)
    fp32 = {}
    if fp32_onnx is not None:
        fp32 = {t.name: t for t in _load(Path(fp32_onnx)).graph.initializer}
    weights = {}
    for name, item in int8.items():
        values = item["values"]
        record = {"node": item["node"], "op_type": item["op_type"], "dtype": "int8", "axis": item["axis"],
                  "violations": count_nm_violations(values, item["axis"], n, m),
                  "zero_share": round(float(np.mean(values == 0)), 4), "zero_point_zero": item["zero_point_zero"]}
        if name in fp32:
            float_values = numpy_helper.to_array(fp32[name])
            record["fp32_zeros_kept"] = bool(np.all(values[float_values == 0] == 0))
            record["rounded_to_zero"] = int(np.sum((values == 0) & (float_values != 0)))
        weights[name] = record
    float_initializers = {t.name: t for t in q_model.graph.initializer}
    required = list(layer_weights or [])
    failures = []
    for name in required:
        if name in weights:
            record = weights[name]
        elif name in float_initializers:  # kept in float: still has to be n:m
            values = numpy_helper.to_array(float_initializers[name])
            node = next((nd for nd in q_model.graph.node if nd.op_type in WEIGHT_OPS and len(nd.input) > 1
                         and nd.input[1] == name), None)
            axis = reduction_axis(node, values.ndim) if node is not None else 1
            record = weights[name] = {"node": node.name if node is not None else None,
                                      "op_type": node.op_type if node is not None else None,
                                      "dtype": str(values.dtype), "axis": axis,
                                      "violations": count_nm_violations(values, axis, n, m),
                                      "zero_share": round(float(np.mean(values == 0)), 4)}
        else:
            failures.append(f"{name}: not in the model")
            continue
        if record["violations"] != 0:
            failures.append(f"{name}: {record['violations']} groups break {n}:{m}" if record["violations"] > 0
                            else f"{name}: axis {record['axis']} is not a multiple of {m}")
        if record.get("zero_point_zero") is False:
            failures.append(f"{name}: nonzero weight zero point")
        if record.get("fp32_zeros_kept") is False:
            failures.append(f"{name}: a float zero became nonzero")
    result = {"pattern": f"{n}:{m}", "weights": weights, "required": required, "passed": not failures,
              "failures": failures,
              "sparse": sorted(k for k, v in weights.items() if v["violations"] == 0)}
    if polygraphy:
        result["polygraphy"] = polygraphy_sparsity(q_model, int8)
    return result


def int8_weight_entries(q_onnx: Path, sparse_weights: Sequence[str], n: int = 2, m: int = 4):
    """The weights of a Q/DQ model for the compressed weight file (:mod:`sparsecompile.compress`).

    Returns ``(sparse, dense)``. ``sparse``: each of ``sparse_weights`` (float weight names, the build's
    sparse layers) compressed, keyed by its initializer in ``q_onnx``: an int8 weight as an INT8 entry
    (:func:`sparsecompile.compress.compress_int8`: int8 values, indices, and the scale and zero point of
    its DequantizeLinear, exactly as stored), a layer kept in float as a float entry. ``dense``: every
    other weight and bias initializer of a Conv/Gemm/MatMul, read directly or through DequantizeLinear
    (int8 weights of dense layers, int32 biases, float weights), as stored. Activation scales and
    other constants are not included: they stay in the graph.
    """
    from onnx import numpy_helper

    from sparsecompile.compress import compress, compress_int8

    q_model = _load(Path(q_onnx))
    int8 = _int8_weights(q_model)
    initializers = {t.name: t for t in q_model.graph.initializer}
    producer = {out: node for node in q_model.graph.node for out in node.output}
    sparse = {}
    for name in sparse_weights:
        if name in int8:
            item = int8[name]
            sparse[item["initializer"]] = compress_int8(_tensor(item["values"]), item["axis"], _tensor(item["scale"]),
                                                        _tensor(item["zero_point"]), item["quant_axis"], n, m)
        elif name in initializers:  # kept in float
            node = next((nd for nd in q_model.graph.node if nd.op_type in WEIGHT_OPS and len(nd.input) > 1
                         and nd.input[1] == name), None)
            values = numpy_helper.to_array(initializers[name])
            axis = reduction_axis(node, values.ndim) if node is not None else 1
            sparse[name] = compress(_tensor(values), axis, n, m)
        else:
            raise SparseCompileError(f"'{q_onnx}' has no weight '{name}' (neither int8 nor float)")
    dense = {}
    for node in q_model.graph.node:
        if node.op_type not in WEIGHT_OPS:
            continue
        for tensor in node.input[1:3]:
            source = producer.get(tensor)
            if source is not None and source.op_type == "DequantizeLinear":
                tensor = source.input[0]
            if tensor in initializers and tensor not in sparse and tensor not in dense:
                dense[tensor] = _tensor(numpy_helper.to_array(initializers[tensor]))
    return sparse, dense


def write_int8_weights(q_onnx: Path, path: Path, sparse_weights: Sequence[str], n: int = 2, m: int = 4,
                       metadata: dict | None = None) -> dict:
    """Write :func:`int8_weight_entries` of ``q_onnx`` to ``path`` (format version 2); returns the size summary.

    Every stored tensor is read back and compared with the Q/DQ model's initializer (int8 values, scale and
    zero point exactly), so the file is known to reproduce the model before anything ships it."""
    from sparsecompile.compress import decompress, load_weights, save_weights, size_summary

    sparse, dense = int8_weight_entries(q_onnx, sparse_weights, n, m)
    save_weights(path, sparse, dense, metadata)
    stored, _, _ = load_weights(path)
    for name, ct in sparse.items():
        back = stored[name]
        same = back.dtype == ct.dtype and np.array_equal(decompress(back).numpy(), decompress(ct).numpy())
        if ct.quantized:
            same = same and np.array_equal(back.scale.numpy().view(np.uint32), ct.scale.numpy().view(np.uint32)) \
                and np.array_equal(back.zero_point.numpy(), ct.zero_point.numpy())
        if not same:
            raise SparseCompileError(f"internal error: '{path}' does not give back '{name}' of '{q_onnx}' exactly")
    summary = size_summary(sparse) if sparse else {}
    summary["file_bytes"] = Path(path).stat().st_size
    summary["dense_tensors"] = len(dense)
    return summary


def _tensor(array: np.ndarray):
    import torch

    return torch.from_numpy(np.array(array, copy=True, order="C"))


def polygraphy_sparsity(q_model, int8: dict | None = None) -> dict:
    """Polygraphy's 2:4 verdict on a Q/DQ model.

    Polygraphy (0.53.6) follows a weight back through Q/DQ nodes to its initializer but then
    checks only FLOAT/FLOAT16/BFLOAT16 initializers: int8 ones are skipped with a warning. So
    it is run twice: on the model as is (``as_is``: which tensors it finds sparse, normally
    only weights kept in float) and on a copy whose int8 weight initializers are widened to
    float32 with the same values (``int8_widened``), which is what its checker can read;
    zeros are the same in both. Its checker loops in Python over every element (about a
    second per million weights).
    """
    try:
        from polygraphy.logger import G_LOGGER
        from polygraphy.tools.sparse import SparsityPruner
    except ImportError:
        return {"available": False}
    import onnx
    from onnx import numpy_helper

    int8 = _int8_weights(q_model) if int8 is None else int8
    widened = onnx.ModelProto()
    widened.CopyFrom(q_model)
    rename = {item["initializer"] for item in int8.values()}
    for index, tensor in enumerate(widened.graph.initializer):
        if tensor.name in rename:
            values = numpy_helper.to_array(tensor).astype(np.float32)
            widened.graph.initializer[index].CopyFrom(numpy_helper.from_array(values, tensor.name))
    verdict = {"available": True}
    severity = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.ERROR
    try:
        for label, model in (("as_is", q_model), ("int8_widened", widened)):
            pruner = SparsityPruner(model)
            # its element loop compares float32 values with sys.float_info.max: a harmless overflow warning
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                pruner.check()
            found = sorted(t[: -len(QUANTIZED_SUFFIX)] if t.endswith(QUANTIZED_SUFFIX) else t
                           for t in pruner.sparse_tensors)
            verdict[label] = found
    finally:
        G_LOGGER.module_severity = severity
    return verdict


# --------------------------------------------------------------------------- sensitivity and keep-float


def run_onnx(path: Path, feeds: list[dict[str, np.ndarray]], threads: int | None = 1) -> list[np.ndarray]:
    """Outputs of ``path`` on ONNX Runtime (CPU), batches concatenated on axis 0, one array per output."""
    from sparsecompile.backends.onnxruntime_runner import import_onnxruntime

    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        outputs = [session.run(None, feed) for feed in feeds]
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise SparseCompileError(f"ONNX Runtime cannot run '{path}': {first}") from None
    return [np.concatenate([out[i] for out in outputs]) for i in range(len(outputs[0]))]


def _damage(reference: list[np.ndarray], candidate: list[np.ndarray], kinds, max_drop, max_error):
    import torch

    from sparsecompile.damage import measure_damage

    return measure_damage([torch.from_numpy(r) for r in reference], [torch.from_numpy(c) for c in candidate],
                          kinds, max_drop, max_error)


def _order_key(damage) -> tuple[float, float]:
    """(score, largest relative error): the score first; the relative error breaks its frequent ties."""
    relative = max((o.detail.get("relative_error", 0.0) for o in damage.outputs), default=0.0)
    return (damage.score, relative)


@dataclass
class NodeSensitivity:
    node: str
    layer: str
    op_type: str
    score: float  # damage / budget of the model with only this node quantized (at most 1: within budget)
    relative_error: float
    damage: dict

    def to_json(self) -> dict:
        return {"node": self.node, "layer": self.layer, "op_type": self.op_type,
                "score": round(self.score, 4) if math.isfinite(self.score) else None,
                "relative_error": round(self.relative_error, 6), "damage": self.damage}


def _prepare(fp32_onnx, calib_inputs, held_inputs, calibration, ranges, reference, kinds, max_drop, max_error):
    from sparsecompile.damage import DEFAULT_MAX_DROP, DEFAULT_MAX_ERROR, output_kinds

    model = _load(Path(fp32_onnx))
    held = _check_inputs(model, held_inputs, "held-back")
    if ranges is None:
        ranges = calibrate(fp32_onnx, calib_inputs, calibration)
    if reference is None:
        reference = run_onnx(fp32_onnx, held)
    if kinds is None:
        import torch

        kinds = output_kinds([torch.from_numpy(r) for r in reference])
    return (model, held, ranges, reference, kinds, DEFAULT_MAX_DROP if max_drop is None else max_drop,
            DEFAULT_MAX_ERROR if max_error is None else max_error)


def quantization_sensitivity(fp32_onnx: Path, calib_inputs: list[dict[str, np.ndarray]] | None,
                             held_inputs: list[dict[str, np.ndarray]], *, calibration: str = DEFAULT_CALIBRATION,
                             ranges: Calibration | None = None, reference: list[np.ndarray] | None = None,
                             kinds: list[str] | None = None, max_drop: float | None = None,
                             max_error: float | None = None, workdir: Path | None = None,
                             activations: str = DEFAULT_ACTIVATIONS) -> list[NodeSensitivity]:
    """Per weighted node, the damage of quantizing that node alone, most damaging first.

    Measured on ``held_inputs`` against ``reference`` (default: the float model's outputs there),
    in :mod:`sparsecompile.damage` units and budgets (``kinds`` default: inferred).
    """
    model, held, ranges, reference, kinds, max_drop, max_error = _prepare(
        fp32_onnx, calib_inputs, held_inputs, calibration, ranges, reference, kinds, max_drop, max_error)
    results = []
    with tempfile.TemporaryDirectory(prefix="sparsecompile-sens-", dir=workdir) as tmp:
        for item in weighted_nodes(model):
            path = Path(tmp) / "one.onnx"
            quantize_onnx(fp32_onnx, path, ranges=ranges, only_nodes=[item.node], activations=activations)
            damage = _damage(reference, run_onnx(path, held), kinds, max_drop, max_error)
            score, relative = _order_key(damage)
            results.append(NodeSensitivity(item.node, item.layer, item.op_type, score, relative, damage.to_json()))
    return sorted(results, key=lambda s: (-s.score if not math.isnan(s.score) else -math.inf, -s.relative_error))


def keep_float(fp32_onnx: Path, out_onnx: Path, calib_inputs: list[dict[str, np.ndarray]] | None,
               held_inputs: list[dict[str, np.ndarray]], *, calibration: str = DEFAULT_CALIBRATION,
               ranges: Calibration | None = None, exclude_nodes: Sequence[str] = (),
               reference: list[np.ndarray] | None = None, kinds: list[str] | None = None,
               max_drop: float | None = None, max_error: float | None = None,
               activations: str = DEFAULT_ACTIVATIONS) -> QuantizeInfo:
    """Quantize ``fp32_onnx`` and keep the most damaging nodes in float until it is within budget.

    Budgets and units are the guard's (:mod:`sparsecompile.damage`): ``max_drop`` points for
    class-like outputs, ``max_error`` percent for values, measured on ``held_inputs`` against
    ``reference`` (default: the float model's outputs; pass the *dense* model's outputs to hold
    sparsity and quantization together to one budget). ``info.search`` records the full
    model's damage, every trial and each sensitivity; ``info.kept_float`` says why each layer
    stayed float. If even excluding every weighted node misses the budget, the result says
    ``within_budget: False`` and the caller should ship the float model.
    """
    model, held, ranges, reference, kinds, max_drop, max_error = _prepare(
        fp32_onnx, calib_inputs, held_inputs, calibration, ranges, reference, kinds, max_drop, max_error)
    out_onnx = Path(out_onnx)
    excluded = _resolve_nodes(model, list(exclude_nodes))
    reasons = {node: "excluded by the caller" for node in excluded}

    def trial(nodes: list[str]):
        info = quantize_onnx(fp32_onnx, out_onnx, ranges=ranges, exclude_nodes=nodes, reasons=reasons,
                             activations=activations)
        return info, _damage(reference, run_onnx(out_onnx, held), kinds, max_drop, max_error)

    info, damage = trial(excluded)
    search = {"samples": _sample_count(held), "max_drop": max_drop, "max_error": max_error,
              "quantized_all": damage.to_json(), "trials": [], "sensitivity": []}
    if not damage.within:
        sensitivity = quantization_sensitivity(fp32_onnx, None, held, ranges=ranges, reference=reference,
                                               kinds=kinds, max_drop=max_drop, max_error=max_error,
                                               activations=activations)
        search["sensitivity"] = [s.to_json() for s in sensitivity]
        best = _order_key(damage)
        for rank, item in enumerate(sensitivity, 1):
            if damage.within:
                break
            if item.node in excluded:
                continue
            candidate_info, candidate = trial(excluded + [item.node])
            key = _order_key(candidate)
            accepted = key < best
            search["trials"].append({"keep_float": item.layer, "node": item.node, "accepted": accepted,
                                     "score": round(key[0], 4) if math.isfinite(key[0]) else None,
                                     "relative_error": round(key[1], 6)})
            if accepted:
                excluded.append(item.node)
                reasons[item.node] = (f"quantizing it alone: {_worst_text(item)} on {search['samples']} held-back "
                                      f"samples (sensitivity rank {rank} of {len(sensitivity)}); keeping it float "
                                      f"took the model's score from {best[0]:.3g} to {key[0]:.3g}")
                info, damage, best = candidate_info, candidate, key
        # the last written file must be the accepted model
        info, damage = trial(excluded)
    search["final"] = damage.to_json()
    search["within_budget"] = damage.within
    info.search = search
    return info


def _worst_text(item: NodeSensitivity) -> str:
    from sparsecompile.damage import worst_output

    worst = worst_output(item.damage.get("outputs", []))
    if worst is None:
        return f"score {item.score:.3g}"
    value = "non-finite outputs" if worst["damage"] is None else f"{worst['damage']:.3g}{' pt' if worst['unit'] == 'pt' else '%'}"
    return f"output {worst['output']} ({worst['kind']}) damage {value}, relative error {item.relative_error:.3g}"


def save_info(info: QuantizeInfo, path: Path) -> None:
    """``info`` as JSON (the build can embed ``info.to_json()`` in its report instead)."""
    Path(path).write_text(json.dumps(info.to_json(), indent=2) + "\n")
