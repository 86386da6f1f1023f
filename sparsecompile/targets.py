"""Hardware targets: one registry, :data:`HARDWARE`, lists each piece of hardware once with all of its facts.

A target says what the hardware can do with 2:4 sparse weights: whether it
has sparse tensor cores (NVIDIA Ampere, compute capability >= 8.0, and
later), the precision TensorRT should build with by default, and the
alignment the reduction axis needs before a layer is made sparse. An entry
also carries what the other parts of the compiler need to know about the
same hardware, and each of them reads it through a view derived here or in
its own module, never from a table of its own:

* ``buildable``: ``sparsecompile build --target NAME`` builds for it
  (:data:`TARGETS`, :func:`get_target`).
* ``device``: the spec-sheet numbers the per-layer speed model predicts with
  (:data:`sparsecompile.engine.speed_model.DEVICES`); None where it predicts
  nothing (no sparse tensor cores, or no numbers).
* ``edge``: ``sparsecompile package --edge NAME`` ships a bundle to it
  (:data:`sparsecompile.package.edges.EDGE_TARGETS`): every GPU, whose
  TensorRT engine is built on the device from the bundle's recipe, and
  CPU-only machines by ``arch``, which run the ONNX Runtime fallback.

Targets without sparse tensor cores (``t4``, ``cpu``) build a dense artifact
by default: masking there costs accuracy and buys no speed. ``--sparsify``
forces masks anyway (smaller compressed weights, accuracy studies).
"""

from __future__ import annotations

from dataclasses import dataclass

from sparsecompile.errors import SparseCompileError


@dataclass(frozen=True)
class DeviceSpec:
    """What :mod:`sparsecompile.engine.speed_model` predicts with: the vendor's spec-sheet values."""

    dense_fp16_tflops: float  # dense fp16 tensor-core throughput
    bandwidth_gbs: float  # DRAM bandwidth
    source: str


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    kind: str  # "gpu" or "cpu"
    compute_capability: tuple[int, int] | None
    sparse_tensor_cores: bool
    default_precision: str  # precision the engine/compressed weights use
    reduction_alignment: int = 4  # reduction size must be a multiple of this
    buildable: bool = True  # a --target of `sparsecompile build`
    edge: bool = False  # an --edge of `sparsecompile package`
    arch: str | None = None  # CPU architecture a CPU edge bundle needs; None for GPUs
    device: DeviceSpec | None = None  # speed-model numbers

    def to_json(self) -> dict:
        """The build facts, as the build report records its target."""
        cc = self.compute_capability
        return {"name": self.name, "description": self.description, "kind": self.kind,
                "compute_capability": ".".join(map(str, cc)) if cc else None,
                "sparse_tensor_cores": self.sparse_tensor_cores, "default_precision": self.default_precision,
                "reduction_alignment": self.reduction_alignment}


def _by_name(entries: list[Target]) -> dict[str, Target]:
    """The registry keyed by name; a name listed twice is a mistake, not an override."""
    registry: dict[str, Target] = {}
    for entry in entries:
        if entry.name in registry:
            raise ValueError(f"hardware target '{entry.name}' is listed twice")
        registry[entry.name] = entry
    return registry


HARDWARE: dict[str, Target] = _by_name(
    [
        Target("a100", "NVIDIA A100 (Ampere, sm_80)", "gpu", (8, 0), True, "fp16", edge=True,
               device=DeviceSpec(312.0, 2039.0, "A100 80GB SXM datasheet")),
        Target("a10", "NVIDIA A10 (Ampere, sm_86)", "gpu", (8, 6), True, "fp16", edge=True,
               device=DeviceSpec(125.0, 600.0, "A10 datasheet")),
        Target("l4", "NVIDIA L4 (Ada Lovelace, sm_89)", "gpu", (8, 9), True, "fp16", edge=True,
               device=DeviceSpec(121.0, 300.0, "L4 datasheet")),
        Target("h100", "NVIDIA H100 (Hopper, sm_90)", "gpu", (9, 0), True, "fp16", edge=True,
               device=DeviceSpec(989.0, 3350.0, "H100 SXM datasheet")),
        Target("jetson-orin", "NVIDIA Jetson AGX/NX Orin (Ampere, sm_87)", "gpu", (8, 7), True, "fp16", edge=True,
               device=DeviceSpec(42.5, 204.8, "Jetson AGX Orin 64GB: GPU 170 sparse INT8 TOPS -> ~42.5 dense fp16")),
        Target("t4", "NVIDIA T4 (Turing, sm_75): no sparse tensor cores", "gpu", (7, 5), False, "fp16", edge=True),
        Target("cpu", "CPU through ONNX Runtime: weights run dense", "cpu", None, False, "fp32"),
        # A --target cpu build ships to either architecture; which one is a packaging fact only.
        Target("cpu-x86_64", "x86-64 server or PC without a GPU (ONNX Runtime)", "cpu", None, False, "fp32",
               buildable=False, edge=True, arch="x86_64"),
        Target("cpu-aarch64", "Arm64 server or board without a GPU (ONNX Runtime)", "cpu", None, False, "fp32",
               buildable=False, edge=True, arch="aarch64"),
    ]
)

TARGETS: dict[str, Target] = {name: t for name, t in HARDWARE.items() if t.buildable}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise SparseCompileError(
            f"unknown target '{name}'; valid targets: {', '.join(sorted(TARGETS))}"
        ) from None
