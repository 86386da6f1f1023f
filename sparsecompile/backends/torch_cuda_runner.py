"""``--backend torch-cuda``: the sparse model on a GPU with torch's semi-structured sparse tensors.

The build's sparse program (``model.pt2``, loaded without unpickling) is moved to the GPU in
fp16. Then every weight the build made 2:4 sparse is replaced by
``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt where torch has it, CUTLASS
otherwise), so its matrix products run on sparse tensor cores. Those tensors are 2-D, so Linear
layers and im2col-lowered convolutions (``--lower-conv im2col``) qualify and native
convolutions do not. A layer whose shape or dtype the kernels reject stays dense. Each
layer's fate and reason go to ``runner.layers``. :func:`accelerate` checks each replacement
by running the whole model once, and reverts it if that fails.

NOT RUN where this project is developed (no GPU). The per-layer fallback logic is
tested on the CPU with a stand-in conversion, and the real path is covered by tests marked
``gpu`` that skip without CUDA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from sparsecompile.backends.base import Runner
from sparsecompile.errors import SparseCompileError
from sparsecompile.verify import flat_outputs

MIN_CAPABILITY = (8, 0)


def _owner(module: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    *path, attr = name.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)
    return owner, attr


def accelerate(module: torch.nn.Module, sparse_weights: Sequence[str], run: Callable[[], object],
               convert: Callable[[torch.Tensor], torch.Tensor]) -> list[dict]:
    """Swap each named 2:4 weight for ``convert(weight)``, keeping the swap only if ``run()`` still works."""
    layers = []
    for name in sparse_weights:
        try:
            owner, attr = _owner(module, name)
            weight = getattr(owner, attr)
        except AttributeError:
            layers.append({"weight": name, "status": "dense", "reason": "weight not found in the program"})
            continue
        if weight.dim() != 2:
            layers.append({"weight": name, "status": "dense",
                           "reason": f"{weight.dim()}-D weight (a native convolution): semi-structured tensors are "
                                     "2-D; build with --lower-conv im2col"})
            continue
        try:
            sparse = convert(weight.detach())
            setattr(owner, attr, torch.nn.Parameter(sparse, requires_grad=False))
            run()
        except Exception as exc:  # noqa: BLE001 - kernels reject shapes/dtypes with assorted errors
            setattr(owner, attr, weight)
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            layers.append({"weight": name, "status": "dense", "reason": f"sparse kernel unavailable: {reason}"})
            continue
        layers.append({"weight": name, "status": "sparse", "reason": None})
    return layers


def semi_structured_backend() -> str:
    from torch.sparse import SparseSemiStructuredTensor

    if getattr(SparseSemiStructuredTensor, "_FORCE_CUTLASS", False):
        return "CUTLASS"
    available = getattr(torch.backends, "cusparselt", None)
    return "cuSPARSELt" if available is not None and available.is_available() else "CUTLASS"


class TorchCudaRunner(Runner):
    name = "torch-cuda"

    def __init__(self, program_path: str | Path | None, sparse_weights: Sequence[str] = (),
                 example_inputs: Sequence[np.ndarray] = (), dtype: torch.dtype = torch.float16, sparse: bool = True,
                 module: torch.nn.Module | None = None):
        """``program_path``: a build's ``model.pt2``; or ``module`` (e.g. the dense model, ``sparse=False``)."""
        self.program_path = Path(program_path) if program_path is not None else None
        self._given_module = module
        self.sparse_weights = list(sparse_weights)
        self.example_inputs = list(example_inputs)
        self.dtype = dtype
        self.sparse = sparse
        self.module = None
        self.layers: list[dict] = []
        self.kernels = None

    def load(self) -> "TorchCudaRunner":
        if not torch.cuda.is_available():
            raise SparseCompileError("--backend torch-cuda needs a CUDA GPU and this machine has none "
                                     "(use --backend ort)")
        capability = torch.cuda.get_device_capability()
        if capability < MIN_CAPABILITY:
            raise SparseCompileError(f"--backend torch-cuda needs sparse tensor cores (compute capability 8.0 or "
                                     f"newer); {torch.cuda.get_device_name()} is sm_{capability[0]}{capability[1]}")
        if self._given_module is not None:
            module = self._given_module
        else:
            from sparsecompile.frontend import load_pt2

            module = load_pt2(self.program_path, trust_pickle=False).module()
        self.module = module.to(device="cuda", dtype=self.dtype)
        torch.cuda.synchronize()
        if self.sparse and self.sparse_weights:
            from torch.sparse import to_sparse_semi_structured

            self.kernels = semi_structured_backend()
            with torch.no_grad():
                self.layers = accelerate(self.module, self.sparse_weights, lambda: self._forward(self.example_inputs),
                                         to_sparse_semi_structured)
        return self

    def prepare(self, inputs: Sequence[np.ndarray]) -> tuple[torch.Tensor, ...]:
        """Inputs on the device in the runner's dtype (outside any timed region)."""
        tensors = []
        for array in inputs:
            tensor = torch.from_numpy(np.ascontiguousarray(array)).cuda()
            tensors.append(tensor.to(self.dtype) if tensor.is_floating_point() else tensor)
        torch.cuda.synchronize()
        return tuple(tensors)

    def _forward(self, inputs: Sequence[np.ndarray]):
        outputs = self.module(*self.prepare(inputs))
        torch.cuda.synchronize()
        return outputs

    @torch.no_grad()
    def timed_infer(self, tensors: tuple[torch.Tensor, ...]) -> float:
        """One inference on prepared inputs, in milliseconds, timed with CUDA events."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        self.module(*tensors)
        end.record()
        torch.cuda.synchronize()
        return float(start.elapsed_time(end))

    @torch.no_grad()
    def infer(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self.module is None:
            self.load()
        return [t.float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy()
                for t in flat_outputs(self._forward(inputs))]

    def close(self) -> None:
        self.module = self._given_module = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
