"""Edge targets for ``sparsecompile package --edge`` and the host they run on.

An edge target names the device a bundle is shipped to: the entries of
:data:`sparsecompile.targets.HARDWARE` marked ``edge`` — every GPU (the
TensorRT engine is built on the device from the bundle's recipe) and CPU-only
machines by architecture, which run the ONNX Runtime fallback.
:data:`EDGE_TARGETS` is a view of that registry. The runner compares a
bundle's edge target with the host (:func:`sparsecompile.hardware.detect_host`)
before it runs anything.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

from sparsecompile.errors import SparseCompileError
from sparsecompile.hardware import HostInfo, normalize_arch
from sparsecompile.targets import HARDWARE


@dataclass(frozen=True)
class EdgeTarget:
    name: str
    description: str
    kind: str  # "gpu" or "cpu"
    arch: str | None  # CPU architecture a cpu-* bundle needs; None for GPU targets
    compute_capability: tuple[int, int] | None

    def to_json(self) -> dict:
        cc = self.compute_capability
        return {"name": self.name, "description": self.description, "kind": self.kind, "arch": self.arch,
                "compute_capability": ".".join(map(str, cc)) if cc else None}


EDGE_TARGETS: dict[str, EdgeTarget] = {
    t.name: EdgeTarget(t.name, t.description, t.kind, t.arch, t.compute_capability)
    for t in HARDWARE.values() if t.edge
}


def get_edge(name: str) -> EdgeTarget:
    try:
        return EDGE_TARGETS[name]
    except KeyError:
        raise SparseCompileError(f"unknown edge target '{name}'; valid: {', '.join(sorted(EDGE_TARGETS))}") from None


def default_edge(build_target: str) -> str:
    """A build for a GPU ships to that GPU; a CPU build to CPUs like this machine's."""
    if build_target in EDGE_TARGETS:
        return build_target
    arch = normalize_arch(platform.machine())
    return f"cpu-{arch}" if f"cpu-{arch}" in EDGE_TARGETS else "cpu-x86_64"


def check_host(edge: EdgeTarget, host: HostInfo) -> str | None:
    """Why a bundle for ``edge`` must not run on ``host`` (None when it may)."""
    if edge.kind == "cpu":
        if host.arch != edge.arch:
            return f"the bundle was built for {edge.name} but this machine is {host.arch}"
        return None
    if host.gpu_capability is not None and host.gpu_capability != edge.compute_capability:
        cc = edge.compute_capability
        return (f"the bundle was built for {edge.name} (sm_{cc[0]}{cc[1]}) but this machine has "
                f"{host.gpu_name} (sm_{host.gpu_capability[0]}{host.gpu_capability[1]})")
    return None
