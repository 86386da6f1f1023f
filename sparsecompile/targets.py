"""Deployment targets, keyed by name.

A target says what the hardware can do with 2:4 sparse weights: whether it
has sparse tensor cores (NVIDIA Ampere, compute capability >= 8.0, and
later), the precision TensorRT should build with by default, and the
alignment the reduction axis needs before a layer is made sparse.

Targets without sparse tensor cores (``t4``, ``cpu``) build a dense artifact
by default: masking there costs accuracy and buys no speed. ``--sparsify``
forces masks anyway (smaller compressed weights, accuracy studies).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sparsecompile.errors import SparseCompileError


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    kind: str  # "gpu" or "cpu"
    compute_capability: tuple[int, int] | None
    sparse_tensor_cores: bool
    default_precision: str  # precision the engine/compressed weights use
    reduction_alignment: int = 4  # reduction size must be a multiple of this

    def to_json(self) -> dict:
        data = asdict(self)
        data["compute_capability"] = (
            ".".join(map(str, self.compute_capability)) if self.compute_capability else None
        )
        return data


TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        Target("a100", "NVIDIA A100 (Ampere, sm_80)", "gpu", (8, 0), True, "fp16"),
        Target("a10", "NVIDIA A10 (Ampere, sm_86)", "gpu", (8, 6), True, "fp16"),
        Target("l4", "NVIDIA L4 (Ada Lovelace, sm_89)", "gpu", (8, 9), True, "fp16"),
        Target("h100", "NVIDIA H100 (Hopper, sm_90)", "gpu", (9, 0), True, "fp16"),
        Target("jetson-orin", "NVIDIA Jetson AGX/NX Orin (Ampere, sm_87)", "gpu", (8, 7), True, "fp16"),
        Target("t4", "NVIDIA T4 (Turing, sm_75): no sparse tensor cores", "gpu", (7, 5), False, "fp16"),
        Target("cpu", "CPU through ONNX Runtime: weights run dense", "cpu", None, False, "fp32"),
    ]
}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise SparseCompileError(
            f"unknown target '{name}'; valid targets: {', '.join(sorted(TARGETS))}"
        ) from None
