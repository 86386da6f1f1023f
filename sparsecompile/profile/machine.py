"""The machine measured on: CPUs and default threads, the environment stored with the numbers, the load
other processes put on it, and the peak-memory meters (peak RSS on the CPU, CUDA allocations on a GPU)."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path

import numpy as np


def _cpuinfo() -> list[dict]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    cpus = []
    for block in text.strip().split("\n\n"):
        entry = {}
        for line in block.splitlines():
            if ":" in line:
                key, value = line.split(":", 1)
                entry[key.strip()] = value.strip()
        cpus.append(entry)
    return cpus


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def physical_cores() -> int:
    """Physical cores (distinct socket/core pairs in /proc/cpuinfo), else the logical count."""
    pairs = {(c.get("physical id"), c.get("core id")) for c in _cpuinfo() if "core id" in c}
    return len(pairs) or os.cpu_count() or 1


def default_threads() -> int:
    return max(1, min(physical_cores(), usable_cpus()))


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_environment(threads: int, cuda: bool = False) -> dict:
    """What the numbers were measured on; stored with them."""
    import torch

    from sparsecompile import __version__

    cpus = _cpuinfo()
    model = next((c.get("model name") for c in cpus if c.get("model name")), None) or platform.processor() or None
    env = {
        "cpu_model": model,
        "physical_cores": physical_cores(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "sparsecompile": __version__, "torch": torch.__version__, "onnxruntime": _version("onnxruntime"),
            "onnx": _version("onnx"), "numpy": np.__version__,
        },
        "thread_env": {key: os.environ.get(key) for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")},
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "gpu": None,
    }
    if cuda or torch.cuda.is_available():
        with contextlib.suppress(Exception):
            index = torch.cuda.current_device()
            gpu = {"name": torch.cuda.get_device_name(index),
                   "capability": ".".join(map(str, torch.cuda.get_device_capability(index))),
                   "memory_gib": round(torch.cuda.get_device_properties(index).total_memory / 2**30, 1),
                   "cuda": torch.version.cuda}
            with contextlib.suppress(Exception):  # needs pynvml
                gpu["clock_mhz"] = torch.cuda.clock_rate(index)
            env["gpu"] = gpu
    return env


def _busy_cpu_seconds() -> float | None:
    """CPU seconds every process on the machine has used (Linux /proc/stat), or None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    except (OSError, ValueError, IndexError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """How many CPUs *other* processes kept busy while we measured (machine busy time minus ours)."""

    def __enter__(self) -> "OtherLoad":
        self.value: float | None = None
        self._wall = time.perf_counter()
        self._busy = _busy_cpu_seconds()
        times = os.times()
        self._own = times.user + times.system
        return self

    def __exit__(self, *exc) -> None:
        busy = _busy_cpu_seconds()
        wall = time.perf_counter() - self._wall
        if busy is None or self._busy is None or wall <= 0:
            return
        times = os.times()
        own = times.user + times.system - self._own
        self.value = max(0.0, (busy - self._busy - own) / wall)


# --------------------------------------------------------------------------- memory


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _release_free_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``), so a variant loaded after another
    one cannot reuse the pages the first one freed and look smaller than it is."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssMeter:
    """Peak RSS growth of this process since :meth:`start` (Linux; None where it cannot be measured)."""

    method = "peak RSS growth (VmHWM reset through /proc/self/clear_refs)"

    def __init__(self):
        self.baseline_kib: int | None = None

    def start(self) -> None:
        _release_free_heap()
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # resets VmHWM to the current RSS
            self.baseline_kib = _status_kib("VmRSS")
        except OSError:
            self.baseline_kib = None

    def peak_growth_mb(self) -> float | None:
        peak = _status_kib("VmHWM")
        if self.baseline_kib is None or peak is None:
            return None
        return max(0.0, (peak - self.baseline_kib) / 1024.0)


class CudaMemoryMeter:
    method = "torch.cuda.max_memory_allocated growth"

    def __init__(self):
        self.baseline = 0

    def start(self) -> None:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.baseline = torch.cuda.memory_allocated()

    def peak_growth_mb(self) -> float | None:
        import torch

        torch.cuda.synchronize()
        return max(0.0, (torch.cuda.max_memory_allocated() - self.baseline) / 2**20)
