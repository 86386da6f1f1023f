"""Run a serialized TensorRT engine (``load`` / ``infer`` / ``close`` like every runner).

Buffers are torch CUDA tensors; inputs are checked against the engine's dtypes and its
optimization profile (a batch outside the profile is a one-line error naming the range).
``load`` checks for a CUDA GPU and for TensorRT *before* importing TensorRT.

NOT RUN where this project is developed (no GPU, no TensorRT): written against the
TensorRT 10 Python API documentation (named I/O tensors, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``); only the refusal without a GPU is tested.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from sparsecompile.backends.base import Runner
from sparsecompile.errors import SparseCompileError
from sparsecompile.hardware import detect_host


class TensorRTRunner(Runner):
    name = "tensorrt"

    def __init__(self, engine_path: str | Path):
        self.engine_path = Path(engine_path)
        self.engine = self.context = self.stream = None

    def load(self) -> "TensorRTRunner":
        host = detect_host()
        if host.gpu_capability is None:
            raise SparseCompileError("the TensorRT backend needs a CUDA GPU and this machine has none "
                                     "(use the ONNX Runtime backend, --backend ort)")
        if not host.tensorrt:
            raise SparseCompileError("the TensorRT backend needs TensorRT: pip install tensorrt")
        if not self.engine_path.is_file():
            raise SparseCompileError(f"engine '{self.engine_path}' does not exist")
        import tensorrt as trt
        import torch

        self._trt, self._torch = trt, torch
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise SparseCompileError(f"TensorRT cannot load '{self.engine_path}' (built with another TensorRT "
                                     "version or for another GPU?); rebuild it with sparsecompile engine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.stream = torch.cuda.Stream()
        return self

    def _dtype(self, name: str) -> np.dtype:
        return np.dtype(self._trt.nptype(self.engine.get_tensor_dtype(name)))

    def infer(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self.context is None:
            self.load()
        torch = self._torch
        if len(inputs) != len(self.input_names):
            raise SparseCompileError(f"the engine takes {len(self.input_names)} input(s), got {len(inputs)}")
        keep = []
        for name, array in zip(self.input_names, inputs):
            want = self._dtype(name)
            if array.dtype != want:
                raise SparseCompileError(f"input '{name}' must be {want.name}, got {array.dtype}")
            if not self.context.set_input_shape(name, tuple(array.shape)):
                low, _, high = self.engine.get_tensor_profile_shape(name, 0)
                raise SparseCompileError(f"input '{name}' shape {list(array.shape)} is outside the engine's profile "
                                         f"({list(low)} to {list(high)}); rebuild with another --batch")
            tensor = torch.from_numpy(np.ascontiguousarray(array)).cuda()
            self.context.set_tensor_address(name, tensor.data_ptr())
            keep.append(tensor)
        outputs = []
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=torch.from_numpy(np.empty(0, self._dtype(name))).dtype, device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        ok = self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        if not ok:
            raise SparseCompileError("TensorRT failed to run the engine")
        return [o.cpu().numpy() for o in outputs]

    def close(self) -> None:
        self.context = self.engine = self.stream = None
