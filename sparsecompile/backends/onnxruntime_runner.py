"""CPU fallback: run the emitted ONNX graph with ONNX Runtime.

ONNX Runtime runs the weights dense (it densifies sparse initializers too),
so this backend is about portability, not sparse speed. Threads are pinned
and spinning is off so timings are repeatable on shared machines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from sparsecompile.backends.base import Runner
from sparsecompile.errors import SparseCompileError


_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise SparseCompileError("the ONNX Runtime backend needs onnxruntime: pip install onnxruntime") from None
    return onnxruntime


class OrtRunner(Runner):
    name = "ort"

    def __init__(self, onnx_path: str | Path, threads: int | None = None, profile_prefix: str | Path | None = None,
                 optimized_model_path: str | Path | None = None):
        self.onnx_path = Path(onnx_path)
        self.threads = threads
        # Per-node profiling (``sparsecompile profile``): ORT writes a JSON trace on end_profiling(), and
        # the optimized graph it really runs (fused, renamed nodes) can be saved to map nodes to layers.
        self.profile_prefix = profile_prefix
        self.optimized_model_path = optimized_model_path
        self.session = None

    def load(self) -> "OrtRunner":
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if self.profile_prefix is not None:
            options.enable_profiling = True
            options.profile_file_prefix = str(self.profile_prefix)
        if self.optimized_model_path is not None:
            options.optimized_model_filepath = str(self.optimized_model_path)
        try:
            self.session = ort.InferenceSession(str(self.onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise SparseCompileError(f"ONNX Runtime cannot load '{self.onnx_path}': {first}") from None
        return self

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def infer(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self.session is None:
            self.load()
        specs = self.session.get_inputs()
        if len(inputs) != len(specs):
            raise SparseCompileError(f"the model takes {len(specs)} input(s), got {len(inputs)}")
        feed = {}
        for spec, array in zip(specs, inputs):
            expected_dtype = _ORT_TYPES.get(spec.type)
            if expected_dtype is not None and array.dtype != expected_dtype:
                raise SparseCompileError(
                    f"input '{spec.name}' must be {np.dtype(expected_dtype).name}, got {array.dtype}"
                )
            expected_rank = len(spec.shape)
            if array.ndim != expected_rank:
                raise SparseCompileError(
                    f"input '{spec.name}' must have {expected_rank} dimensions {spec.shape}, got shape {list(array.shape)}"
                )
            for dim, (want, got) in enumerate(zip(spec.shape, array.shape)):
                if isinstance(want, int) and want != got:
                    raise SparseCompileError(
                        f"input '{spec.name}' must have shape {spec.shape}, got {list(array.shape)} (dim {dim})"
                    )
            feed[spec.name] = np.ascontiguousarray(array)
        try:
            return self.session.run(None, feed)
        except Exception as exc:  # noqa: BLE001
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise SparseCompileError(f"ONNX Runtime failed: {first}") from None

    def end_profiling(self) -> Path:
        """Stop profiling and return the path of ORT's JSON trace (needs ``profile_prefix``)."""
        return Path(self.session.end_profiling())

    def close(self) -> None:
        self.session = None
