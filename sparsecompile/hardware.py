"""This machine: CPU architecture, CUDA GPU and its compute capability, TensorRT.

TensorRT is only looked up (``find_spec``), never imported here: without a CUDA
device its runtime can crash the process.
"""

from __future__ import annotations

import contextlib
import importlib.util
import platform
from dataclasses import dataclass


def normalize_arch(machine: str) -> str:
    machine = machine.lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}.get(machine, machine)


@dataclass(frozen=True)
class HostInfo:
    arch: str
    gpu_name: str | None = None
    gpu_capability: tuple[int, int] | None = None
    tensorrt: bool = False

    def describe(self) -> str:
        if self.gpu_capability:
            return f"{self.arch} with {self.gpu_name} (sm_{self.gpu_capability[0]}{self.gpu_capability[1]})"
        return f"{self.arch} without a CUDA GPU"


def detect_host() -> HostInfo:
    """This machine: CPU architecture and, if torch sees one, the CUDA GPU."""
    arch = normalize_arch(platform.machine())
    name = capability = None
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            capability = tuple(torch.cuda.get_device_capability(0))
    except Exception:  # noqa: BLE001 - a broken CUDA setup means "no GPU" here
        name = capability = None
    tensorrt = capability is not None and importlib.util.find_spec("tensorrt") is not None
    return HostInfo(arch, name, capability, tensorrt)


@contextlib.contextmanager
def torch_threads(count: int):
    """Run a block with ``count`` torch intra-op threads, restoring the previous count after.

    Many small SVDs and norms (spectra, certificates) are far slower with several threads on a shared
    machine than with one.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
