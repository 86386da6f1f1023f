"""Per-layer speed model: will a 2:4 mask make this layer faster on the target?

For each GEMM-like layer, with M = output positions x batch, N = output channels and
K = the reduction length (``cin*kh*kw`` for a convolution):

    dense  = max(2*M*N*K / P,        bytes_dense  / B) + launch
    sparse = max(2*M*N*K / (P * g),  bytes_sparse / B) + launch

where P is the target's dense fp16 tensor-core throughput and B its memory bandwidth. The
sparse weights take 0.5625x of the dense bytes (values plus 2-bit indices), and g is the
effective gain of sparse tensor-core math on a compute-bound GEMM. g is 2 in theory;
``SPARSE_MATH_GAIN`` = 1.5 here. Activations are read and written in full either way.

TensorRT times sparse and dense kernels and keeps the faster, and NVIDIA's maintainers
report that sparse convolutions win only when input and output channels are about 256 or
more, counting a kh x kw kernel as kh*kw times the input channels. A layer below that
(N < 256 or K < 256) is flagged ``likely_dense``: TensorRT will probably run it dense
whatever the model predicts.

Where the numbers come from: P and B are the vendors' spec-sheet values for each target
(dense fp16 tensor TFLOPS, DRAM GB/s), kept with each target's other facts in
:data:`sparsecompile.targets.HARDWARE` (:data:`DEVICES` is the view of the targets that have
them). g and the launch overhead are assumptions. **The model is not calibrated against
measurements**: no GPU was available where it was written. Treat its speedups as a ranking and
a warning, not a promise. ``sparsecompile profile`` and TensorRT's own log (``sparsecompile
engine``) are what count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparsecompile.graph import CONV_OPS
from sparsecompile.targets import HARDWARE, DeviceSpec

SPARSE_MATH_GAIN = 1.5  # assumed effective speedup of sparse tensor-core math (theory: 2x)
LAUNCH_US = 3.0  # assumed per-kernel overhead, the same for both
MIN_CHANNELS = 256  # NVIDIA maintainers' rule of thumb for sparse convolutions in TensorRT
COMPRESSED_WEIGHT_FRACTION = 0.5625
FASTER_THRESHOLD = 1.05  # --sparse-only-if-faster keeps layers predicted at least this much faster


DEVICES: dict[str, DeviceSpec] = {t.name: t.device for t in HARDWARE.values() if t.device is not None}


@dataclass(frozen=True)
class GemmDims:
    m_per_sample: int  # output positions per sample (pixels for a conv, tokens for a linear)
    n: int
    k: int
    kernel: int = 1  # kh*kw: K counts each input channel this many times

    @property
    def input_channels(self) -> int:
        return self.k // self.kernel


def gemm_dims(node: torch.fx.Node, weight_shape: tuple[int, ...], reduction_axis: int,
              batch: int) -> GemmDims | None:
    """GEMM dimensions of a layer from its weight and the output shape shape propagation recorded."""
    meta = node.meta.get("tensor_meta")
    shape = tuple(getattr(meta, "shape", ()) or ())
    if not shape:
        return None
    k = weight_shape[reduction_axis]
    if node.target in CONV_OPS:
        kernel = math.prod(weight_shape[2:])
        return GemmDims(max(1, math.prod(shape[2:])), weight_shape[0], k * kernel, kernel)
    n = math.prod(weight_shape) // k
    rows = math.prod(shape[:-1])  # everything but the output features
    return GemmDims(max(1, rows // max(1, batch)) if len(shape) > 1 else 1, n, k)


def predict(dims: GemmDims, target: str, batch: int, bytes_per_value: int = 2) -> dict | None:
    spec = DEVICES.get(target)
    if spec is None:
        return None
    m, n, k = dims.m_per_sample * batch, dims.n, dims.k
    flops = 2.0 * m * n * k
    peak = spec.dense_fp16_tflops * 1e12
    bandwidth = spec.bandwidth_gbs * 1e9
    activations = (m * dims.input_channels + m * n) * bytes_per_value  # implicit GEMM reads the input once
    weights = k * n * bytes_per_value
    dense_compute, dense_memory = flops / peak, (activations + weights) / bandwidth
    sparse_compute = flops / (peak * SPARSE_MATH_GAIN)
    sparse_memory = (activations + COMPRESSED_WEIGHT_FRACTION * weights) / bandwidth
    dense_us = max(dense_compute, dense_memory) * 1e6 + LAUNCH_US
    sparse_us = max(sparse_compute, sparse_memory) * 1e6 + LAUNCH_US
    small = [f"{name} {value} < {MIN_CHANNELS}" for name, value in (("output channels", n), ("K", k))
             if value < MIN_CHANNELS]
    return {
        "batch": batch, "m": m, "n": n, "k": k,
        "dense_us": round(dense_us, 3), "sparse_us": round(sparse_us, 3),
        "speedup": round(dense_us / sparse_us, 3),
        "bound": "compute" if dense_compute >= dense_memory else "memory",
        "likely_dense": bool(small),
        "why": ", ".join(small) if small else None,
    }


def not_faster_reason(prediction: dict, target: str) -> str | None:
    """Why ``--sparse-only-if-faster`` leaves a layer dense (None: keep it sparse)."""
    if prediction["likely_dense"]:
        return f"{prediction['why']}: TensorRT would likely keep dense kernels on {target} (--sparse-only-if-faster)"
    if prediction["speedup"] < FASTER_THRESHOLD:
        return (f"predicted {prediction['speedup']:.2f}x at batch {prediction['batch']} on {target}, "
                f"{prediction['bound']}-bound (--sparse-only-if-faster)")
    return None
