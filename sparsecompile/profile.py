"""``sparsecompile profile``: latency, throughput, load time, memory and per-layer time.

TARGET is a build directory (its ``model.onnx``) or a model file that was not
built (the dense baseline). With ``--compare dense`` the build's dense model is
profiled in the same run, interleaved with the sparse one.

Timing discipline (shared machines swing by +-30 %):

* thread counts are pinned per variant and reported with the results
  (``variants[].threads``): ONNX Runtime sessions get ``intra_op_num_threads``
  = ``--threads`` (default: the physical cores this process may use) and one
  inter-op thread, spinning off (``OrtRunner``); torch variants set
  ``torch.set_num_threads(--threads)`` before every run, outside the timer;
* every variant is loaded and run once at every batch size first (this run
  measures peak memory), then per batch size each variant runs ``--warmup``
  times in a row untimed, and ``--runs`` timed rounds run *interleaved*: each
  round runs every variant once, in the order of a balanced design
  (``interleaving_design``): every ordering once per block of k! rounds,
  chained so every variant runs directly after every variant, itself
  included, equally often. Drift of the machine hits every variant alike, and
  a variant slowed down by whatever ran just before it (a runtime's threads
  still spinning, evicted caches) slows every variant alike. The orders and
  their seed (``--seed`` + batch size) are stored in ``design``;
* one iteration is one ``infer`` call timed with ``time.perf_counter_ns``
  (CPU) or CUDA events with ``torch.cuda.synchronize`` (``torch-cuda``, inputs
  already on the device);
* statistics are outlier-robust: percentiles (NumPy's linear interpolation),
  median absolute deviation (MAD, unscaled), and throughput =
  batch / median latency.

Ratio of two variants (sparse/dense): ``median(sparse) / median(dense)``. Its
confidence interval is a *paired percentile bootstrap*: the iteration pairs
(run i of sparse, run i of dense, which ran back to back) are resampled with
replacement ``BOOTSTRAP_RESAMPLES`` times and the ratio of medians recomputed
each time; the interval is the central ``CONFIDENCE`` of those ratios.
Resampling pairs, not the two series separately, keeps the drift the pair
shares out of the interval.

A result is flagged noisy when ``p90 / p50 > NOISY_P90_OVER_P50`` or
``MAD / median > NOISY_MAD_OVER_MEDIAN``: either means the machine was busy
or throttling while measuring, and the numbers should be re-taken.

Peak memory (CPU) is the growth of the process's peak RSS (``VmHWM`` after
resetting it through ``/proc/self/clear_refs``) from just before the variant
was loaded to the end of its first run at that batch size (batches run in the
order given, each variant before the next is loaded; freed heap pages are
handed back to the OS with glibc's ``malloc_trim`` first, so a variant cannot
look smaller by reusing pages the previous one freed); on CUDA it is
``torch.cuda.max_memory_allocated`` over the same span.

Per-layer time: ONNX Runtime's profiler (a separate session with
``enable_profiling``) gives per-node kernel times of the *optimized* graph ORT
really runs (fused, renamed nodes). That graph is saved too, and a node maps to
a layer when one of its inputs is the layer's weight or bias initializer (ONNX
initializers keep the parameter names); fused NCHWc nodes, whose weights ORT
reorders into new tensors, map through their bias or through the original
node that produced the tensor the fused node is named after. The torch backend
labels each FX node that uses a layer's weight with
``torch.profiler.record_function`` and reads ``torch.profiler``'s inclusive
time per label.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import click
import numpy as np

from sparsecompile.backends import backend_names, get_backend
from sparsecompile.errors import SparseCompileError
from sparsecompile.fileio import atomic_write
from sparsecompile.progress import Progress

SCHEMA = "sparsecompile-profile/1"
BACKENDS = backend_names()  # every registered backend can be profiled
DEFAULT_BATCHES = (1, 8, 32)
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95
NOISY_P90_OVER_P50 = 1.5
NOISY_MAD_OVER_MEDIAN = 0.10
LAYER_RUNS = 20  # profiled iterations per variant for the per-layer table (after LAYER_WARMUP)
LAYER_WARMUP = 2
_LAYER_OPS = ("conv", "linear", "addmm", "matmul", "mm", "gemm")


# --------------------------------------------------------------------------- statistics


def latency_stats(samples_ms: Sequence[float]) -> dict:
    """Robust summary of per-iteration latencies in milliseconds."""
    values = np.asarray(samples_ms, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no samples")
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "n": int(values.size),
        "p50": float(p50), "p90": float(p90), "p99": float(p99),
        "min": float(values.min()), "max": float(values.max()), "mean": float(values.mean()),
        "mad": float(np.median(np.abs(values - p50))),
    }


def noise_reasons(stats: dict) -> list[str]:
    """Why a latency distribution looks like a noisy machine (empty when it does not)."""
    reasons = []
    if stats["p50"] > 0 and stats["p90"] / stats["p50"] > NOISY_P90_OVER_P50:
        reasons.append(f"p90/p50 = {stats['p90'] / stats['p50']:.2f} > {NOISY_P90_OVER_P50}")
    if stats["p50"] > 0 and stats["mad"] / stats["p50"] > NOISY_MAD_OVER_MEDIAN:
        reasons.append(f"MAD/median = {stats['mad'] / stats['p50']:.2f} > {NOISY_MAD_OVER_MEDIAN}")
    return reasons


def bootstrap_ratio(numerator: Sequence[float], denominator: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                    confidence: float = CONFIDENCE, seed: int = 0) -> dict:
    """``median(numerator) / median(denominator)`` with a paired percentile-bootstrap interval.

    ``numerator[i]`` and ``denominator[i]`` must be one pair of back-to-back
    iterations; pairs are resampled together.
    """
    a = np.asarray(numerator, dtype=np.float64)
    b = np.asarray(denominator, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError("need two equally long, non-empty series of paired samples")
    ratio = float(np.median(a) / np.median(b))
    rng = np.random.default_rng(seed)
    ratios = np.empty(resamples)
    chunk = max(1, 2_000_000 // a.size)  # bound memory for long series
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        index = rng.integers(0, a.size, size=(count, a.size))
        ratios[start:start + count] = np.median(a[index], axis=1) / np.median(b[index], axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(ratios, [tail, 1.0 - tail])
    return {"ratio": ratio, "ci_low": float(low), "ci_high": float(high), "confidence": confidence,
            "resamples": resamples, "method": "paired percentile bootstrap of the ratio of medians"}


def parse_batches(text: str | None) -> list[int] | None:
    """``"1,8,32"`` -> ``[1, 8, 32]``; None stays None (the model's default)."""
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",")]
    try:
        batches = [int(p) for p in parts]
    except ValueError:
        batches = []
    if not batches or any(b < 1 for b in batches):
        raise SparseCompileError(f"--batch '{text}' is not a comma-separated list of positive integers (e.g. 1,8,32)")
    return list(dict.fromkeys(batches))


# --------------------------------------------------------------------------- machine


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


# --------------------------------------------------------------------------- inputs


def concrete_shape(spec: dict, batch: int) -> list[int]:
    shape = []
    for axis, dim in enumerate(spec["shape"]):
        if isinstance(dim, int) and dim > 0:
            shape.append(dim)
        elif axis == 0:
            shape.append(batch)
        else:
            raise SparseCompileError(
                f"input '{spec['name']}' has a symbolic dimension '{dim}' (axis {axis}) besides the batch; "
                "profile can only vary the batch dimension"
            )
    return shape


def check_batch(specs: list[dict], batch: int, what: str) -> None:
    """A clear error when a model with a fixed batch dimension cannot run ``batch``."""
    for spec in specs:
        shape = spec["shape"]
        if shape and isinstance(shape[0], int) and shape[0] != batch:
            raise SparseCompileError(
                f"{what} has a fixed batch of {shape[0]} (input '{spec['name']}' shape "
                f"{'x'.join(map(str, shape))}) and cannot run --batch {batch}; use --batch {shape[0]}, or export "
                "the model with a dynamic batch and rebuild it"
            )


def random_inputs(specs: list[dict], batch: int, seed: int = 0) -> list[np.ndarray]:
    """Seeded random arrays with the specs' dtypes and shapes, batch dimension set to ``batch``."""
    rng = np.random.default_rng(seed)
    arrays = []
    for spec in specs:
        shape = concrete_shape(spec, batch)
        dtype = np.dtype(spec["dtype"])
        if dtype == np.bool_:
            arrays.append(rng.integers(0, 2, size=shape).astype(np.bool_))
        elif np.issubdtype(dtype, np.integer):
            arrays.append(rng.integers(0, 16, size=shape).astype(dtype))  # small: valid as indices too
        else:
            arrays.append(rng.standard_normal(shape).astype(dtype))
    return arrays


# --------------------------------------------------------------------------- variants


@dataclass
class Variant:
    """One thing being timed: a name, how to load its runner, its inputs and per-layer profiler."""

    name: str
    artifact: str
    specs: list[dict]
    loader: Callable[[], Any]
    layer_profiler: Callable[["Variant", list[np.ndarray], int], dict] | None = None
    device: str = "cpu"
    prepare_s: float = 0.0
    prepare_note: str = ""
    load_s: float | None = None
    runner: Any = None
    meter: Any = None
    threads: int | None = None  # intra-op threads, set for every run (see ``pin_threads``)
    runtime: str | None = None  # "onnxruntime", "torch", "torch-cuda", "tensorrt"; None: nothing to pin
    extra: dict = field(default_factory=dict)

    def load(self) -> None:
        start = time.perf_counter()
        self.runner = self.loader()
        self.load_s = time.perf_counter() - start

    def prepare(self, arrays: list[np.ndarray]) -> Any:
        return self.runner.prepare(arrays)

    def time_once(self, prepared: Any) -> float:
        """One inference, in milliseconds."""
        return self.runner.timed_infer(prepared)

    def pin_threads(self) -> None:
        """Make the process-wide torch thread count this variant's (ORT sessions carry their own)."""
        if self.threads is not None and self.runtime in ("torch", "torch-cuda"):
            import torch

            if torch.get_num_threads() != self.threads:
                torch.set_num_threads(self.threads)

    def thread_report(self) -> dict:
        """The thread settings this variant ran with, as measured where the runtime can say."""
        if self.runtime == "onnxruntime":
            return {"runtime": "onnxruntime", "intra_op_num_threads": self.threads, "inter_op_num_threads": 1,
                    "spinning": False}
        if self.runtime in ("torch", "torch-cuda"):
            import torch

            self.pin_threads()
            return {"runtime": self.runtime, "intra_op_num_threads": torch.get_num_threads(),
                    "inter_op_num_threads": torch.get_num_interop_threads()}
        return {"runtime": self.runtime, "intra_op_num_threads": self.threads}

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
        self.runner = None


# --------------------------------------------------------------------------- round order

BALANCED_MAX_VARIANTS = 4  # up to 4! = 24 rounds per balanced block; more variants get a random order per round


def _euler_block(count: int, start: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """Every ordering of ``count`` variants once, chained so each round starts with the variant that ended
    the round before (the last round ends with ``start``, the variant the first round starts with).

    An ordering is an edge first -> last of the complete directed graph on the variants ((count-2)!
    orderings per edge, so in-degree = out-degree); the chain is an Eulerian circuit (Hierholzer's
    algorithm, edges taken in a seeded random order).
    """
    orders = list(itertools.permutations(range(count)))
    if count == 1:
        return orders
    rng.shuffle(orders)
    edges: dict[int, list[tuple[int, ...]]] = {}
    for order in orders:
        edges.setdefault(order[0], []).append(order)
    stack: list[tuple[int, tuple[int, ...] | None]] = [(start, None)]
    circuit: list[tuple[int, ...]] = []
    while stack:
        node, via = stack[-1]
        if edges.get(node):
            order = edges[node].pop()
            stack.append((order[-1], order))
        else:
            stack.pop()
            if via is not None:
                circuit.append(via)
    circuit.reverse()
    return circuit


def interleaving_design(names: Sequence[str], runs: int, seed: int = 0) -> dict:
    """The order of the variants in each of ``runs`` timed rounds, and what that order guarantees.

    With ``k`` <= ``BALANCED_MAX_VARIANTS`` variants the rounds come in blocks of ``k!``: each block runs
    every ordering once, and the orderings are chained so that a round starts with the variant that ended
    the previous one (see ``_euler_block``; the chain closes, so blocks chain too). Within a complete
    block, then,

    * every variant runs in every position of a round equally often ((k-1)! times), and
    * every variant runs directly after every variant, itself included, equally often ((k-1)! times,
      counting the step from one round to the next; the first timed run follows the last warm-up run,
      which ``measure_interleaved`` makes ``warmup_last``, the variant every block ends with).

    So when a run is slowed down (or sped up) by whatever ran just before it -- a runtime whose threads
    keep spinning after it returns, caches it evicted -- every variant meets every predecessor the same
    number of times: two variants that the predecessor affects alike get the same multiset of penalties
    (equal means *and* medians), e.g. the sparse and the dense model after torch eager, and the mean
    penalty of any variant is its penalty averaged over all predecessors. The blocks' orderings are
    shuffled with ``seed``. When ``runs`` is not
    a multiple of ``k!`` the last ``runs % k!`` rounds are the start of one more such block, so the balance
    is exact over the complete blocks only. With more than ``BALANCED_MAX_VARIANTS`` variants every round
    gets an independent seeded random ordering: balanced in expectation, not exactly.
    """
    count = len(names)
    if count < 1 or runs < 0:
        raise ValueError("need at least one variant and runs >= 0")
    rng = np.random.default_rng(seed)
    if count <= BALANCED_MAX_VARIANTS:
        block = math.factorial(count)
        start = int(rng.integers(count))
        orders: list[tuple[int, ...]] = []
        while len(orders) < runs:
            orders.extend(_euler_block(count, start, rng))
        orders = orders[:runs]
        method = "balanced blocks: every ordering once per block, chained (Eulerian circuit)"
        complete = runs // block
    else:
        block = None
        orders = [tuple(int(i) for i in rng.permutation(count)) for _ in range(runs)]
        start = orders[0][0] if orders else 0
        method = "random ordering per round"
        complete = None
    return {
        "method": method, "seed": seed, "variants": list(names), "rounds": runs, "block_rounds": block,
        "complete_blocks": complete, "balanced": block is not None and runs % block == 0,
        "warmup_last": names[start], "orders": [list(map(int, o)) for o in orders],
    }


def predecessor_counts(design: dict) -> dict[str, dict[str, int]]:
    """How often each variant ran directly after each variant in the timed rounds of ``design``.

    The first timed run's predecessor is the last warm-up run (``warmup_last``).
    """
    names = design["variants"]
    counts = {n: {p: 0 for p in names} for n in names}
    previous = names.index(design["warmup_last"])
    for order in design["orders"]:
        for index in order:
            counts[names[index]][names[previous]] += 1
            previous = index
    return counts


def measure_interleaved(variants: Sequence[Variant], prepared: dict[str, Any], runs: int, warmup: int,
                        ticks: Callable[[range], Any] | None = None, seed: int = 0,
                        design: dict | None = None) -> dict[str, list[float]]:
    """Warm every variant up, then time ``runs`` rounds that run every variant once each.

    Warm-up: each variant runs ``warmup`` times in a row, untimed, the variant ``design["warmup_last"]``
    last. The order within each round comes from ``design`` (default: ``interleaving_design`` of the
    variants' names with ``seed``; see it for what the order guarantees). Before each run the variant's
    thread count is set (``Variant.pin_threads``), outside the timed region.
    """
    names = [v.name for v in variants]
    if design is None:
        design = interleaving_design(names, runs, seed)
    if design["variants"] != names or len(design["orders"]) != runs:
        raise ValueError("the design is for other variants or another number of rounds")
    last = names.index(design["warmup_last"])
    for variant in [v for i, v in enumerate(variants) if i != last] + [variants[last]]:
        for _ in range(warmup):
            variant.pin_threads()
            variant.time_once(prepared[variant.name])
    samples: dict[str, list[float]] = {v.name: [] for v in variants}
    rounds = range(runs) if ticks is None else ticks(range(runs))
    for index in rounds:
        for position in design["orders"][index]:
            variant = variants[position]
            variant.pin_threads()
            samples[variant.name].append(variant.time_once(prepared[variant.name]))
    return samples


# --------------------------------------------------------------------------- layer maps


def layer_map_from_report(report: dict | None) -> dict[str, dict]:
    """Parameter name (weight and bias) -> ``{"layer", "status", "op"}`` from a build's report.json."""
    mapping: dict[str, dict] = {}
    for layer in (report or {}).get("layers", []):
        weight = layer.get("weight")
        if not weight or not layer.get("name"):
            continue
        info = {"layer": layer["name"], "status": layer.get("status", "?"), "op": layer.get("op", "")}
        mapping[weight] = info
        if weight.endswith(".weight"):
            mapping.setdefault(weight[: -len("weight")] + "bias", info)
    return mapping


def layer_map_from_onnx(onnx_path: Path, status: str = "dense") -> dict[str, dict]:
    """For a model without a report: every Conv/Gemm/MatMul weight initializer ``X.weight`` is layer ``X``."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    mapping: dict[str, dict] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        for name in node.input:
            if name in initializers and name.endswith(".weight"):
                info = {"layer": name[: -len(".weight")], "status": status, "op": node.op_type.lower()}
                mapping.setdefault(name, info)
                mapping.setdefault(name[: -len("weight")] + "bias", info)
    return mapping


def map_ort_nodes(node_names: Sequence[str], original_onnx: Path, optimized_onnx: Path | None,
                  param_map: dict[str, dict]) -> dict[str, dict]:
    """ORT profiler node names -> layer info, for those that belong to a layer.

    Looks at (1) the node's inputs in the optimized graph ORT ran, (2) the
    original node of the same name, (3) for nodes ORT renamed after the
    tensor they produce (``relu_1_nchwc``), the original producer of that
    tensor and, through single-input ops (Relu, Clip, ...), the node before it.
    """
    import onnx

    def graph_nodes(path):
        if path is None or not Path(path).exists():
            return []
        try:
            return list(onnx.load(str(path), load_external_data=False).graph.node)
        except Exception:  # noqa: BLE001 - an optimized graph ORT could not serialize is optional
            return []

    original = graph_nodes(original_onnx)
    optimized = {node.name: node for node in graph_nodes(optimized_onnx)}
    by_name = {node.name: node for node in original}
    producer = {out: node for node in original for out in node.output}

    def from_inputs(node):
        for name in node.input:
            if name in param_map:
                return param_map[name]
        return None

    def walk_back(node, depth=3):
        while node is not None and depth >= 0:
            found = from_inputs(node)
            if found:
                return found
            data_inputs = [i for i in node.input if i in producer]
            if len(data_inputs) != 1:
                return None
            node = producer[data_inputs[0]]
            depth -= 1
        return None

    result = {}
    for name in node_names:
        found = None
        if name in optimized:
            found = from_inputs(optimized[name])
        if found is None and name in by_name:
            found = from_inputs(by_name[name])
        if found is None:
            base = re.sub(r"(_nchwc|_token_\d+)$", "", name)
            if base in producer:
                found = walk_back(producer[base])
        if found is not None:
            result[name] = found
    return result


def _layer_table(per_node_ms: dict[str, float], op_of: dict[str, str], node_layers: dict[str, dict]) -> dict:
    layers: dict[str, dict] = {}
    other_ms, other_ops = 0.0, {}
    for node, ms in per_node_ms.items():
        info = node_layers.get(node)
        if info is None:
            other_ms += ms
            op = op_of.get(node, "?")
            other_ops[op] = other_ops.get(op, 0.0) + ms
            continue
        row = layers.setdefault(info["layer"], {"layer": info["layer"], "status": info["status"], "op": info["op"],
                                                "ms": 0.0, "nodes": []})
        row["ms"] += ms
        row["nodes"].append(node)
    total = sum(per_node_ms.values())
    rows = sorted(layers.values(), key=lambda r: -r["ms"])
    for row in rows:
        row["share"] = row["ms"] / total if total else 0.0
    return {"total_ms": total, "layers": rows, "other_ms": other_ms,
            "other_ops": dict(sorted(other_ops.items(), key=lambda kv: -kv[1]))}


def ort_layer_profile(variant: Variant, arrays: list[np.ndarray], runs: int, *, threads: int,
                      param_map: dict[str, dict], workdir: Path) -> dict:
    """Per-layer mean time per run from ONNX Runtime's profiler (a separate profiling session)."""
    from sparsecompile.backends.onnxruntime_runner import OrtRunner

    workdir.mkdir(parents=True, exist_ok=True)
    # The optimized graph names the fused nodes; a model near protobuf's 2 GiB limit cannot be saved
    # without external data, so large ones map through the original graph only.
    small = Path(variant.artifact).stat().st_size < 2**30
    optimized = workdir / f"{variant.name}.optimized.onnx" if small else None
    runner = OrtRunner(variant.artifact, threads=threads, profile_prefix=workdir / f"{variant.name}.ort",
                       optimized_model_path=optimized).load()
    try:
        for _ in range(LAYER_WARMUP + runs):
            runner.infer(arrays)
        trace_path = runner.end_profiling()
    finally:
        runner.close()
    events = json.loads(Path(trace_path).read_text())
    run_windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                         if e.get("cat") == "Session" and e.get("name") == "model_run")
    kept = run_windows[LAYER_WARMUP:]
    per_node: dict[str, float] = {}
    op_of: dict[str, str] = {}
    starts = [w[0] for w in kept]
    import bisect

    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        index = bisect.bisect_right(starts, event["ts"]) - 1
        if index < 0 or event["ts"] > kept[index][1]:
            continue  # a warm-up run
        node = event["name"][: -len("_kernel_time")]
        per_node[node] = per_node.get(node, 0.0) + event["dur"] / 1000.0
        op_of[node] = event.get("args", {}).get("op_name", "?")
    count = max(1, len(kept))
    per_node = {k: v / count for k, v in per_node.items()}
    node_layers = map_ort_nodes(list(per_node), Path(variant.artifact), optimized, param_map)
    table = _layer_table(per_node, op_of, node_layers)
    table.update({"runs": len(kept), "profiler": "onnxruntime"})
    return table


def torch_layer_map(module) -> dict[str, dict]:
    """For a model without a report: weights ``X.weight`` used by conv/linear/matmul FX nodes are layer ``X``."""
    mapping: dict[str, dict] = {}
    for node in module.graph.nodes:
        if node.op != "call_function":
            continue
        op = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        if not any(key in op for key in _LAYER_OPS):
            continue
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and str(arg.target).endswith(".weight"):
                name = str(arg.target)[: -len(".weight")]
                mapping.setdefault(str(arg.target), {"layer": name, "status": "dense", "op": op})
    return mapping


@contextlib.contextmanager
def _quiet_native_stderr():
    """torch.profiler's native tracer prints start/stop lines to fd 2; keep them out of the user's terminal."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def torch_layer_profile(variant: Variant, arrays: list[np.ndarray], runs: int, *, param_map: dict[str, dict]) -> dict:
    """Per-layer time from torch.profiler: FX nodes using a layer's weight run inside a labelled range."""
    import torch
    import torch.fx

    runner = variant.runner
    module = runner.module
    labels: dict[str, dict] = {}
    for node in module.graph.nodes:
        if node.op == "call_function":
            for arg in node.all_input_nodes:
                if arg.op == "get_attr" and str(arg.target) in param_map:
                    labels[node.name] = param_map[str(arg.target)]
                    break

    class Labelled(torch.fx.Interpreter):
        def run_node(self, node):
            info = labels.get(node.name)
            if info is None:
                return super().run_node(node)
            with torch.profiler.record_function(f"layer::{info['layer']}"):
                return super().run_node(node)

    cuda = variant.device == "cuda"
    tensors = runner.prepare(arrays)
    interpreter = Labelled(module)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad():
        for _ in range(LAYER_WARMUP):
            interpreter.run(*tensors)
        with _quiet_native_stderr():
            prof = torch.profiler.profile(activities=activities)
            prof.start()
        try:
            start = time.perf_counter()
            for _ in range(runs):
                interpreter.run(*tensors)
            if cuda:
                torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - start) * 1000.0 / runs
        finally:
            with _quiet_native_stderr():
                prof.stop()
    per_layer: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key.startswith("layer::"):
            micros = getattr(event, "device_time_total", 0.0) if cuda else event.cpu_time_total
            if cuda and not micros:
                micros = event.cpu_time_total
            per_layer[event.key[len("layer::"):]] = micros / 1000.0 / runs
    by_layer = {info["layer"]: info for info in labels.values()}
    rows = []
    for layer, ms in sorted(per_layer.items(), key=lambda kv: -kv[1]):
        info = by_layer[layer]
        rows.append({"layer": layer, "status": info["status"], "op": info["op"], "ms": ms,
                     "share": ms / wall_ms if wall_ms else 0.0,
                     "nodes": [n for n, i in labels.items() if i["layer"] == layer]})
    other = max(0.0, wall_ms - sum(per_layer.values()))
    return {"total_ms": wall_ms, "layers": rows, "other_ms": other, "other_ops": {}, "runs": runs,
            "profiler": "torch.profiler" + (" (device time)" if cuda else " (CPU time, FX interpreter)")}


# --------------------------------------------------------------------------- options and checks


@dataclass
class ProfileOptions:
    target: str
    backend: str = "ort"
    batches: list[int] | None = None
    runs: int = 200
    warmup: int = 20
    threads: int | None = None
    compare: str | None = None
    dense: str | None = None
    json_out: str | None = None
    plot: str | None = None
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    trust_pickle: bool = False
    top: int = 10
    seed: int = 0
    verify: bool = True  # check a build's files against its manifest hashes before loading


def check_backend_available(backend: str) -> None:
    """A one-line error naming what is missing; never imports tensorrt without a CUDA device."""
    backend = get_backend(backend).name
    if backend == "ort":
        from sparsecompile.backends.onnxruntime_runner import import_onnxruntime

        import_onnxruntime()
        return
    if backend == "torch":
        return
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        needs = ("an NVIDIA GPU, TensorRT (pip install tensorrt) and a CUDA build of PyTorch to hold the buffers"
                 if backend == "tensorrt" else "an NVIDIA GPU and a CUDA build of PyTorch")
        raise SparseCompileError(
            f"backend '{backend}' is not available here: it needs {needs}, and no CUDA device is usable "
            f"(torch {torch.__version__} is {build}; torch.cuda.is_available() is False); run it on a GPU machine "
            "with a CUDA wheel of torch (see pytorch.org), or use --backend ort for the CPU fallback"
        )
    if backend == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        raise SparseCompileError(
            "backend 'tensorrt' needs TensorRT's Python package, which is not installed: pip install tensorrt "
            "(on the GPU machine), or use --backend ort for the CPU fallback"
        )


def check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SparseCompileError("--plot needs matplotlib, which is not installed: pip install matplotlib") from None


def _check_writable_parent(path: str, flag: str) -> None:
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise SparseCompileError(f"{flag} '{path}': directory '{parent}' does not exist")
    if Path(path).is_dir():
        raise SparseCompileError(f"{flag} '{path}' is a directory; give a file path")


def _read_report(path: Path) -> dict | None:
    try:
        return json.loads((path / "report.json").read_text())
    except (OSError, ValueError):
        return None


def _specs_of_loaded(loaded) -> list[dict]:
    import torch

    specs = []
    for name, tensor in zip(loaded.input_names, loaded.example_inputs):
        shape: list = list(map(int, tensor.shape))
        if loaded.dynamic_batch and shape:
            shape[0] = "batch"
        dtype = torch.empty((), dtype=tensor.dtype).numpy().dtype.name
        specs.append({"name": name, "dtype": dtype, "shape": shape})
    return specs


def _resolve_dense_source(manifest: dict, dense: str | None, progress: Progress) -> Path:
    """The dense model file for ``--compare dense``: ``--dense`` or the build's source, hash-checked."""
    source = manifest.get("source") or {}
    if dense is not None:
        path = Path(dense)
        if not path.exists():
            raise SparseCompileError(f"--dense model '{path}' does not exist")
        if path.is_dir():
            raise SparseCompileError(f"--dense '{path}' is a directory; pass the dense model file (.pt2, ...)")
        from sparsecompile.fileio import file_sha256

        if source.get("sha256") and source.get("kind") != "factory" and file_sha256(path) != source["sha256"]:
            progress.warn(f"--dense '{path}' is not the file this build was made from (SHA-256 differs from the "
                          "build's source); the dense numbers are for that file")
        return path
    if source.get("kind") == "factory":
        raise SparseCompileError(
            f"--compare dense: this build was made from a model factory ('{source.get('path')}'), so there is no "
            "dense model file to load; export the dense model (torch.export.save) and pass --dense MODEL"
        )
    if not source.get("path"):
        raise SparseCompileError("--compare dense: the build's manifest names no source model; pass --dense MODEL")
    path = Path(source["path"])
    if not path.is_file():
        raise SparseCompileError(
            f"--compare dense: the build's source model '{path}' no longer exists (relative paths are resolved "
            "from the current directory); pass --dense MODEL"
        )
    from sparsecompile.fileio import file_sha256

    if source.get("sha256") and file_sha256(path) != source["sha256"]:
        raise SparseCompileError(
            f"--compare dense: '{path}' has changed since the build (SHA-256 differs from the build's source); "
            "pass --dense MODEL to compare against it anyway"
        )
    return path


def _load_dense(path: Path, manifest_specs: list[dict] | None, input_shapes, trust_pickle: bool):
    from sparsecompile.frontend import _classify_file, load_model

    shapes = list(input_shapes) if input_shapes else None
    if shapes is None and manifest_specs and _classify_file(path) == "torchscript":
        shapes = [tuple(2 if not isinstance(d, int) else d for d in spec["shape"]) for spec in manifest_specs]
    return load_model(path, input_shapes=shapes, trust_pickle=trust_pickle)


# --------------------------------------------------------------------------- the run


def profile(options: ProfileOptions, progress: Progress | None = None) -> dict:
    """Measure TARGET and return the result dict (schema ``sparsecompile-profile/1``)."""
    import torch

    progress = progress or Progress()
    if options.runs is None or options.runs < 1:
        raise SparseCompileError(f"--runs must be at least 1, got {options.runs}")
    if options.warmup is None or options.warmup < 0:
        raise SparseCompileError(f"--warmup must be 0 or more, got {options.warmup}")
    if options.threads is not None and options.threads < 1:
        raise SparseCompileError(f"--threads must be at least 1, got {options.threads}")
    if options.top < 0:
        raise SparseCompileError(f"--top must be 0 or more, got {options.top}")
    compare = options.compare
    if compare is not None and compare != "dense":
        raise SparseCompileError(f"--compare '{compare}' is not supported; the only comparison is --compare dense")
    if options.dense is not None:
        compare = "dense"
    options = replace(options, backend=get_backend(options.backend).name)  # an alias runs as its canonical name
    check_backend_available(options.backend)
    if options.plot:
        check_matplotlib()
        _check_writable_parent(options.plot, "--plot")
    if options.json_out:
        _check_writable_parent(options.json_out, "--json-out")

    target = Path(options.target)
    if not target.exists():
        raise SparseCompileError(f"'{target}' does not exist (profile takes a build directory or a model file)")
    is_build = target.is_dir()
    threads = options.threads or default_threads()
    cuda = options.backend == "torch-cuda"

    manifest = report = None
    if is_build:
        from sparsecompile.builddir import open_build

        target, manifest = open_build(target, verify=options.verify)
        if options.backend in ("torch", "torch-cuda") and not (target / "model.pt2").exists():
            raise SparseCompileError(
                f"build '{target}' has no model.pt2 (made by an older sparsecompile) to run with --backend "
                f"{options.backend}; rebuild it, or profile it with --backend ort"
            )
        if options.backend == "tensorrt":
            if compare:
                raise SparseCompileError("--compare dense with --backend tensorrt needs a dense engine, which a build "
                                         "does not have; compare with --backend torch-cuda, or time a dense engine "
                                         "with trtexec")
            _engine_file(target)
        if options.input_shapes:
            raise SparseCompileError("--input-shape is only for model files: a build's input shapes come from its manifest")
        report = _read_report(target)
    elif options.backend == "tensorrt":
        raise SparseCompileError("--backend tensorrt profiles a build's engine: build the model, then run "
                                 "'sparsecompile engine BUILD' on the GPU, then profile BUILD")
    elif compare:
        raise SparseCompileError(
            f"--compare dense needs a build directory; '{target}' is a model file, which is already the dense model"
        )

    batches = parse_batches(options.batches) if isinstance(options.batches, str) else options.batches
    if batches is not None and (not batches or any(not isinstance(b, int) or b < 1 for b in batches)):
        raise SparseCompileError(f"--batch must be positive integers, got {batches}")
    if is_build:  # the build's batch dimension is known now: refuse before exporting or loading anything
        batches = batches or _default_batches(manifest["inputs"])
        for batch in batches:
            check_batch(manifest["inputs"], batch, "the build")

    dense_source = None
    if compare:
        dense_source = _resolve_dense_source(manifest, options.dense, progress)

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    variants: list[Variant] = []
    try:
        with tempfile.TemporaryDirectory(prefix="sparsecompile-profile-") as scratch:
            scratch = Path(scratch)
            variants = _make_variants(options, target, is_build, manifest, report, dense_source, threads, scratch,
                                      progress)
            if all(v.specs for v in variants):  # known before loading: fail before any timing
                batches = _check_batches(variants, batches)
            result = _measure(options, variants, batches, threads, cuda, scratch, progress)
    finally:
        for variant in variants:
            variant.close()
        torch.set_num_threads(previous_threads)

    result.update({
        "target": {"path": str(options.target), "kind": "build" if is_build else "model",
                   "build_target": (manifest or {}).get("target"), "pattern": (manifest or {}).get("pattern"),
                   "source": (manifest or {}).get("source")},
        "dense_source": str(dense_source) if dense_source else None,
    })
    for message in result["warnings"]:
        progress.warn(message)
    if options.json_out:
        write_json(result, Path(options.json_out))
    if options.plot:
        write_plot(result, Path(options.plot))
    return result


def _engine_file(build: Path) -> Path:
    recipe_path = build / "engine" / "recipe.json"
    if not recipe_path.exists():
        raise SparseCompileError(f"build '{build}' has no TensorRT recipe (a CPU target?); rebuild for a GPU target")
    engine = build / "engine" / json.loads(recipe_path.read_text())["engine"]
    if not engine.exists():
        raise SparseCompileError(f"build '{build}' has no TensorRT engine yet: run 'sparsecompile engine {build}' "
                                 "on the target GPU first")
    return engine


def _default_batches(specs: list[dict]) -> list[int]:
    first = specs[0]["shape"] if specs and specs[0]["shape"] else None
    return [first[0]] if first and isinstance(first[0], int) else list(DEFAULT_BATCHES)


def _check_batches(variants: list[Variant], batches: list[int] | None) -> list[int]:
    batches = batches or _default_batches(variants[0].specs)
    for variant in variants:
        what = "the build" if variant.name == "sparse" else f"the {variant.name} model '{variant.artifact}'"
        for batch in batches:
            check_batch(variant.specs, batch, what)
    return batches


def _make_variants(options, target, is_build, manifest, report, dense_source, threads, scratch, progress):
    from sparsecompile.backends.onnxruntime_runner import OrtRunner
    from sparsecompile.backends.torch_runner import TorchRunner

    backend = get_backend(options.backend)
    variants = []
    layers_wanted = options.top > 0

    def ort_variant(name, onnx_path, specs, param_map):
        profiler = None
        if layers_wanted:
            def profiler(variant, arrays, runs):
                return ort_layer_profile(variant, arrays, runs, threads=threads, param_map=param_map,
                                         workdir=scratch / "layers")
        return Variant(name=name, artifact=str(onnx_path), specs=specs,
                       loader=lambda: OrtRunner(onnx_path, threads=threads).load(), layer_profiler=profiler,
                       threads=threads, runtime=get_backend("ort").runtime)

    def export_dense(path: Path, manifest_specs):
        from sparsecompile.backends.onnx_export import export_onnx

        with progress.stage(f"loading and exporting the dense model '{path}' to ONNX"):
            start = time.perf_counter()
            loaded = _load_dense(path, manifest_specs, options.input_shapes, options.trust_pickle)
            onnx_path = scratch / "dense.onnx"
            info = export_onnx(loaded.module, loaded.example_inputs, onnx_path, loaded.input_names)
        return onnx_path, info, time.perf_counter() - start

    cuda = backend.name == "torch-cuda"
    if is_build and backend.name == "tensorrt":  # NOT RUN here: no GPU
        from sparsecompile.backends.tensorrt_runner import TensorRTRunner

        engine = _engine_file(target)
        return [Variant(name="sparse", artifact=str(engine), specs=manifest["inputs"],
                        loader=lambda: TensorRTRunner(engine).load(), device=backend.device, runtime=backend.runtime)]
    if is_build and backend.name in ("torch", "torch-cuda"):
        from sparsecompile.frontend import load_pt2

        sparse_weights = [r["weight"] for r in (report or {}).get("layers", []) if r.get("status") == "sparse"]

        def torch_variant(name, artifact, specs, module_fn, sparse):
            def load():
                module = module_fn()
                if cuda:
                    from sparsecompile.backends.torch_cuda_runner import TorchCudaRunner

                    return TorchCudaRunner(None, sparse_weights if sparse else (), random_inputs(specs, 8),
                                           module=module, sparse=sparse).load()
                return TorchRunner(module)  # not load(): it would set eval mode, and the module is used as loaded

            def profiler(variant, arrays, runs):
                return torch_layer_profile(variant, arrays, runs, param_map=torch_layer_map(variant.runner.module))

            return Variant(name=name, artifact=artifact, specs=specs, loader=load, device=backend.device,
                           layer_profiler=profiler if layers_wanted else None, threads=threads,
                           runtime=backend.runtime)

        variants.append(torch_variant("sparse", str(target / "model.pt2"), manifest["inputs"],
                                      lambda: load_pt2(target / "model.pt2", trust_pickle=False).module(), True))
        if dense_source is not None:
            def dense_module():
                return _load_dense(dense_source, manifest["inputs"], options.input_shapes, options.trust_pickle).module

            variants.append(torch_variant("dense", str(dense_source), manifest["inputs"], dense_module, False))
        return variants
    if is_build:
        param_map = layer_map_from_report(report)
        from sparsecompile.runtime import fallback_onnx

        variants.append(ort_variant("sparse", fallback_onnx(target, manifest), manifest["inputs"], param_map))
        if dense_source is not None:
            onnx_path, info, seconds = export_dense(dense_source, manifest["inputs"])
            if len(info["inputs"]) != len(manifest["inputs"]):
                raise SparseCompileError(
                    f"the dense model '{dense_source}' takes {len(info['inputs'])} input(s) but the build takes "
                    f"{len(manifest['inputs'])}; pass the model this build was made from with --dense")
            dense = ort_variant("dense", onnx_path, info["inputs"], param_map)
            dense.prepare_s, dense.prepare_note = seconds, f"ONNX exported from {dense_source}"
            variants.append(dense)
        return variants

    # A model file: the dense baseline.
    from sparsecompile.frontend import load_model

    if backend.name == "ort":
        onnx_path, info, seconds = export_dense(target, None)
        variant = ort_variant("dense", onnx_path, info["inputs"], layer_map_from_onnx(onnx_path))
        variant.prepare_s, variant.prepare_note = seconds, f"ONNX exported from {target}"
        return [variant]

    holder: dict = {}

    def load_torch():
        loaded = load_model(target, input_shapes=list(options.input_shapes) or None, trust_pickle=options.trust_pickle)
        holder["loaded"] = loaded
        if cuda:
            from sparsecompile.backends.torch_cuda_runner import TorchCudaRunner

            return TorchCudaRunner(None, module=loaded.module, sparse=False).load()
        return TorchRunner(loaded.module)

    def torch_profiler(variant, arrays, runs):
        return torch_layer_profile(variant, arrays, runs, param_map=torch_layer_map(variant.runner.module))

    variant = Variant(name="dense", artifact=str(target), specs=[], loader=load_torch,
                      layer_profiler=torch_profiler if layers_wanted else None, device=backend.device,
                      threads=threads, runtime=backend.runtime)
    # Loading is part of what is measured (load time and memory), so specs are filled in after loading.
    variant.extra["holder"] = holder
    return [variant]


def _prime_runtimes(variants: list[Variant], threads: int, scratch: Path) -> None:
    """Pay one-time runtime start-up costs (library pages, thread pools, kernel registries) on a tiny model.

    Otherwise the first variant loaded is charged for them in its load time
    and memory, and the second is not.
    """
    import torch

    with torch.no_grad():
        torch.nn.functional.conv2d(torch.ones(1, 4, 8, 8), torch.ones(4, 4, 3, 3))
        torch.nn.functional.linear(torch.ones(2, 8), torch.ones(8, 8))
    if any(v.device == "cpu" and v.artifact.endswith(".onnx") for v in variants):
        import onnx
        from onnx import TensorProto, helper

        from sparsecompile.backends.onnxruntime_runner import OrtRunner

        weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 4, 3, 3], [0.1] * 144)
        graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "prime",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [weight])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        path = scratch / "prime.onnx"
        onnx.save(model, str(path))
        runner = OrtRunner(path, threads=threads).load()
        runner.infer([np.ones((1, 4, 8, 8), np.float32)])
        runner.close()


def _measure(options, variants, batches, threads, cuda, scratch, progress) -> dict:
    warnings_: list[str] = []
    _prime_runtimes(variants, threads, scratch)
    memory: dict[str, dict[int, float | None]] = {}
    first_specs = None
    # Load each variant alone and run it once per batch: load time and peak memory without the others.
    for variant in variants:
        with progress.stage(f"loading {variant.name} ({options.backend})"):
            variant.meter = CudaMemoryMeter() if variant.device == "cuda" else RssMeter()
            variant.meter.start()
            variant.load()
            holder = variant.extra.get("holder")
            if holder and not variant.specs:
                variant.specs = _specs_of_loaded(holder["loaded"])
                batches = _check_batches([variant], batches)
            first_specs = first_specs or variant.specs
            memory[variant.name] = {}
            for batch in batches:
                arrays = random_inputs(first_specs, batch, options.seed + batch)
                variant.pin_threads()
                variant.time_once(variant.prepare(arrays))
                memory[variant.name][batch] = variant.meter.peak_growth_mb()

    per_variant = {v.name: {"name": v.name, "artifact": v.artifact, "device": v.device, "load_s": v.load_s,
                            "prepare_s": v.prepare_s, "prepare_note": v.prepare_note, "threads": v.thread_report(),
                            "results": []}
                   for v in variants}
    designs = []
    comparisons = []
    names = " / ".join(v.name for v in variants)
    for batch in batches:
        arrays = random_inputs(first_specs, batch, options.seed + batch)
        prepared = {v.name: v.prepare(arrays) for v in variants}
        progress.info(f"      batch {batch}: {options.warmup} warm-up runs of each, then {options.runs} timed runs "
                      f"of {names}" + (" (interleaved, balanced order)" if len(variants) > 1 else ""))
        design = interleaving_design([v.name for v in variants], options.runs, seed=options.seed + batch)
        designs.append({"batch": batch, **design})
        with OtherLoad() as other_load:
            samples = measure_interleaved(variants, prepared, options.runs, options.warmup, design=design,
                                          ticks=lambda items: progress.bar(items, f"batch {batch}", length=options.runs))
        if other_load.value is not None and other_load.value > 0.25 * usable_cpus():
            warnings_.append(f"other processes kept {other_load.value:.1f} of {usable_cpus()} CPUs busy while batch "
                             f"{batch} was measured; with {threads} thread(s) the numbers are slower and noisier than "
                             "on an idle machine")
        for variant in variants:
            stats = latency_stats(samples[variant.name])
            noisy = noise_reasons(stats)
            if noisy:
                warnings_.append(f"{variant.name} at batch {batch} was measured on a noisy machine "
                                 f"({'; '.join(noisy)}); re-run when it is idle or with more --runs")
            per_variant[variant.name]["results"].append({
                "batch": batch, "latency_ms": stats, "throughput_per_s": batch / (stats["p50"] / 1000.0),
                "peak_memory_mb": memory[variant.name][batch], "noisy": bool(noisy),
                "other_cpu_load": other_load.value,
                "samples_ms": [round(s, 6) for s in samples[variant.name]],
            })
        if len(variants) == 2:
            ratio = bootstrap_ratio(samples[variants[0].name], samples[variants[1].name], seed=options.seed)
            comparisons.append({"batch": batch, "numerator": variants[0].name, "denominator": variants[1].name,
                                **ratio})

    layers = None
    if options.top > 0 and all(v.layer_profiler for v in variants):
        batch = batches[0]
        arrays = random_inputs(first_specs, batch, options.seed + batch)
        runs = min(options.runs, LAYER_RUNS)
        with progress.stage(f"per-layer profile at batch {batch} ({runs} runs per variant)"):
            layers = {"batch": batch, "variants": {}}
            for variant in variants:
                layers["variants"][variant.name] = variant.layer_profiler(variant, arrays, runs)

    meter = variants[0].meter
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backend": options.backend,
        "settings": {
            "batches": list(batches), "runs": options.runs, "warmup": options.warmup, "threads": threads,
            "seed": options.seed, "interleaved": len(variants) > 1,
            "warmup_scope": "per variant: --warmup untimed runs of each variant in a row, per batch size",
            "order": {"method": designs[0]["method"], "block_rounds": designs[0]["block_rounds"]},
            "timer": "CUDA events" if cuda else "time.perf_counter_ns around one infer call",
            "memory": getattr(meter, "method", None),
            "noise_thresholds": {"p90_over_p50": NOISY_P90_OVER_P50, "mad_over_median": NOISY_MAD_OVER_MEDIAN},
        },
        "environment": machine_environment(threads, cuda),
        "variants": [per_variant[v.name] for v in variants],
        "comparison": comparisons,
        "design": [{key: d[key] for key in ("batch", "seed", "rounds", "complete_blocks", "balanced", "warmup_last",
                                            "variants", "orders")} for d in designs],
        "layers": layers,
        "warnings": warnings_,
    }


# --------------------------------------------------------------------------- output


def _fmt_ms(value: float) -> str:
    return f"{value:.3f}" if value < 100 else f"{value:.1f}"


def format_profile(result: dict, top: int = 10) -> str:
    settings, env = result["settings"], result["environment"]
    target = result["target"]
    what = (f"build for {target['build_target']} ({target['pattern']})" if target["kind"] == "build"
            else "model file, dense")
    lines = [
        f"profile of {target['path']} ({what}): backend {result['backend']}, {settings['threads']} thread(s), "
        f"{settings['runs']} timed runs after {settings['warmup']} warm-up runs of each variant per batch"
        + (", variants interleaved" if settings["interleaved"] else ""),
    ]
    threads = []
    for v in result["variants"]:
        info = v.get("threads") or {}
        if info.get("intra_op_num_threads") is not None:
            inter = f", inter-op {info['inter_op_num_threads']}" if info.get("inter_op_num_threads") else ""
            threads.append(f"{v['name']} {info['runtime']} intra-op {info['intra_op_num_threads']}{inter}")
    if threads:
        lines.append("threads: " + "; ".join(threads))
    designs = result.get("design") or []
    if settings["interleaved"] and designs:
        order, block = settings["order"], settings["order"]["block_rounds"]
        if block:
            extra = settings["runs"] % block
            lines.append(f"round order: every ordering of the {len(designs[0]['variants'])} variants once per block of "
                         f"{block} rounds, so each variant runs after each (itself included) equally often; "
                         + (f"{settings['runs'] // block} complete blocks" if not extra else
                            f"{settings['runs'] // block} complete blocks + {extra} round(s), balanced over the "
                            "complete blocks only")
                         + f"; orderings shuffled with seed {settings['seed']} + batch size")
        else:
            lines.append(f"round order: {order['method']} (seed {settings['seed']} + batch size)")
    lines.append("")
    header = ["variant", "batch", "p50 ms", "p90 ms", "p99 ms", "min ms", "max ms", "items/s", "peak MB", ""]
    rows = []
    by_batch: dict[int, list] = {}
    for variant in result["variants"]:
        for row in variant["results"]:
            by_batch.setdefault(row["batch"], []).append((variant["name"], row))
    for batch in sorted(by_batch):
        for name, row in by_batch[batch]:
            lat = row["latency_ms"]
            mem = row["peak_memory_mb"]
            rows.append([name, str(batch), _fmt_ms(lat["p50"]), _fmt_ms(lat["p90"]), _fmt_ms(lat["p99"]),
                         _fmt_ms(lat["min"]), _fmt_ms(lat["max"]), f"{row['throughput_per_s']:,.1f}",
                         "n/a" if mem is None else f"{mem:,.1f}", "noisy" if row["noisy"] else ""])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    for r in [header] + rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:-1], widths[1:-1])] + [r[-1]]
        lines.append("  ".join(cells).rstrip())
    loads = ", ".join(f"{v['name']} {v['load_s']:.2f} s" for v in result["variants"] if v["load_s"] is not None)
    lines += ["", f"load time: {loads}"]
    for v in result["variants"]:
        if v["prepare_note"]:
            lines.append(f"  {v['name']}: {v['prepare_note']} in {v['prepare_s']:.1f} s (not part of its load time)")
    lines.append(f"peak MB: {settings['memory']}, from before loading to the first run at that batch")
    if result["comparison"]:
        first = result["comparison"][0]
        lines += ["", f"{first['numerator']}/{first['denominator']} latency (ratio of medians, "
                      f"{first['confidence']:.0%} CI from {first['resamples']} paired bootstrap resamples):"]
        for c in result["comparison"]:
            lines.append(f"  batch {c['batch']:>4}: {c['ratio']:.3f}x  [{c['ci_low']:.3f}, {c['ci_high']:.3f}]")
        if result["backend"] == "ort":
            lines.append("  (ONNX Runtime runs 2:4 weights dense on a CPU: expect about 1.0x here; the speed-up "
                         "comes from sparse tensor cores through TensorRT)")
    layers = result.get("layers")
    if layers and top > 0:
        names = list(layers["variants"])
        primary = layers["variants"][names[0]]
        status_note = "; status = in the build" if target["kind"] == "build" else ""
        lines += ["", f"top {top} layers at batch {layers['batch']} ({primary['profiler']}, mean of "
                      f"{primary['runs']} runs{status_note}):"]
        others = {n: {r["layer"]: r for r in layers["variants"][n]["layers"]} for n in names[1:]}
        header = ["layer", "op", "status"] + [f"{n} ms" for n in names] + ["share"]
        rows = []
        for row in primary["layers"][:top]:
            cells = [row["layer"], row["op"], row["status"], _fmt_ms(row["ms"])]
            for n in names[1:]:
                other = others[n].get(row["layer"])
                cells.append(_fmt_ms(other["ms"]) if other else "-")
            cells.append(f"{row['share']:.1%}")
            rows.append(cells)
        tail = ["(not a layer)", "other", "", _fmt_ms(primary["other_ms"])]
        tail += [_fmt_ms(layers["variants"][n]["other_ms"]) for n in names[1:]]
        total = primary["total_ms"]
        tail.append(f"{primary['other_ms'] / total:.1%}" if total else "")
        rows.append(tail)
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        for r in [header] + rows:
            lines.append("  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1]), r[2].ljust(widths[2])]
                                   + [c.rjust(w) for c, w in zip(r[3:], widths[3:])]).rstrip())
        if primary["layers"] and not any(r["status"] == "sparse" for r in primary["layers"]) and target["kind"] == "build":
            lines.append("  (no profiled node mapped to a sparse layer)")
    gpu = env.get("gpu")
    load = env.get("load_average_1min")
    lines += ["", f"machine: {env['cpu_model']}, {env['physical_cores']} physical core(s), {env['usable_cpus']} usable "
                  f"CPU(s)" + (f", load average {load:.2f} at start" if load is not None else "")]
    versions = env["versions"]
    lines.append(f"software: python {env['python']}, torch {versions['torch']}, onnxruntime {versions['onnxruntime']}, "
                 f"onnx {versions['onnx']}" + (f"; GPU {gpu['name']}" if gpu else ""))
    return "\n".join(lines)


def write_json(result: dict, path: Path) -> None:
    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    atomic_write(path, lambda temp: Path(temp).write_text(json.dumps(finite(result), indent=1) + "\n"))


def write_plot(result: dict, path: Path) -> None:
    """Latency distributions per variant and batch, and the per-layer bars."""
    check_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    layers = result.get("layers")
    fig, axes = plt.subplots(1, 2 if layers else 1, figsize=(13 if layers else 7, 5), squeeze=False)
    ax = axes[0][0]
    data, labels, colors = [], [], []
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for batch in result["settings"]["batches"]:  # variants side by side per batch size
        for index, variant in enumerate(result["variants"]):
            for row in variant["results"]:
                if row["batch"] == batch:
                    data.append(row["samples_ms"])
                    labels.append(f"{variant['name']}\nbatch {batch}")
                    colors.append(palette[index % len(palette)])
    boxes = ax.boxplot(data, whis=(1, 99), showfliers=True, flierprops={"markersize": 2}, patch_artist=True)
    for patch, color in zip(boxes["boxes"], colors):
        patch.set_facecolor(color)
        patch.set_alpha(0.5)
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_ylabel("latency per run (ms, log scale; whiskers p1-p99)")
    ax.set_title(f"latency, backend {result['backend']} ({result['settings']['threads']} threads)")
    if layers:
        ax = axes[0][1]
        names = list(layers["variants"])
        primary = layers["variants"][names[0]]["layers"][:15][::-1]
        y = np.arange(len(primary))
        height = 0.8 / len(names)
        for index, name in enumerate(names):
            rows = {r["layer"]: r["ms"] for r in layers["variants"][name]["layers"]}
            values = [rows.get(r["layer"], 0.0) for r in primary]
            ax.barh(y + index * height, values, height=height, label=name)
        ax.set_yticks(y + height * (len(names) - 1) / 2,
                      [f"{r['layer']} ({r['status']})" for r in primary], fontsize=7)
        ax.set_xlabel("mean time per run (ms)")
        ax.set_title(f"top layers at batch {layers['batch']}")
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda temp: fig.savefig(temp, dpi=120, format=path.suffix.lstrip(".") or "png"))
    plt.close(fig)


# --------------------------------------------------------------------------- CLI


@click.command("profile", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("target", type=click.Path())
@click.option("-b", "--backend", default="ort", show_default=True, metavar="NAME",
              help=f"Runtime to time: {', '.join(BACKENDS)}. ort runs the build's model.onnx on the CPU; torch and "
                   "torch-cuda run a model file eagerly.")
@click.option("--batch", "batch_text", metavar="B1,B2,...",
              help=f"Batch sizes (default: {','.join(map(str, DEFAULT_BATCHES))} for a dynamic batch, the model's "
                   "fixed batch otherwise).")
@click.option("--runs", default=200, show_default=True, type=int, help="Timed runs per variant and batch size.")
@click.option("--warmup", default=20, show_default=True, type=int, help="Untimed runs before timing, per batch size.")
@click.option("--threads", type=int, help="Intra-op threads for ONNX Runtime and torch (default: physical cores).")
@click.option("--compare", metavar="dense",
              help="Also profile the build's dense model, interleaved, and report the sparse/dense latency ratio.")
@click.option("--dense", "dense_model", type=click.Path(), metavar="MODEL",
              help="Dense model file for --compare dense (default: the build's source, if unchanged). Implies "
                   "--compare dense.")
@click.option("--json-out", type=click.Path(), metavar="PATH",
              help=f"Write the results as JSON (schema {SCHEMA}).")
@click.option("--plot", type=click.Path(), metavar="PATH", help="Write latency and per-layer plots (needs matplotlib).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="D0,D1,...",
              help="Input shape of a model file that carries none (TorchScript); repeat per input.")
@click.option("--trust-pickle", is_flag=True, help="Allow loading a pickled model file (runs code: trusted files only).")
@click.option("--top", default=10, show_default=True, type=int,
              help="Layers in the per-layer table (0 skips the per-layer profile).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random inputs and the bootstrap.")
@click.option("--no-verify", is_flag=True, help="Skip checking a build's files against its manifest's SHA-256 hashes.")
@click.pass_context
def profile_command(ctx, target, backend, batch_text, runs, warmup, threads, compare, dense_model, json_out, plot,
                    input_shapes, trust_pickle, top, seed, no_verify):
    """Measure latency, throughput, load time, memory and per-layer time of TARGET.

    TARGET is a build directory (sparsecompile build) or a model file (the
    dense baseline). Prints a table; --json-out and --plot write files.

    \b
    Examples:
      sparsecompile profile build/ --batch 1,8 --runs 200
      sparsecompile profile build/ --compare dense --json-out profile.json
      sparsecompile profile model.pt2 --backend torch
    """
    from sparsecompile.frontend import parse_input_shape

    verbose = bool((ctx.obj or {}).get("verbose"))
    options = ProfileOptions(
        target=target, backend=backend, batches=parse_batches(batch_text), runs=runs, warmup=warmup,
        threads=threads, compare=compare, dense=dense_model, json_out=json_out, plot=plot,
        input_shapes=[parse_input_shape(s) for s in input_shapes], trust_pickle=trust_pickle, top=top, seed=seed,
        verify=not no_verify,
    )
    result = profile(options, Progress(verbose=verbose))
    click.echo(format_profile(result, top=top))
    for path, what in ((json_out, "JSON"), (plot, "plot")):
        if path:
            click.echo(f"wrote {what} to {path}")


__all__ = [
    "SCHEMA", "BACKENDS", "ProfileOptions", "profile", "profile_command", "format_profile", "latency_stats",
    "bootstrap_ratio", "noise_reasons", "parse_batches", "measure_interleaved", "interleaving_design",
    "predecessor_counts", "write_json", "write_plot",
]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(profile_command())
