"""What is timed and in which order: the ``Variant`` (one thing being timed), the balanced interleaving of
the timed rounds (``interleaving_design``) and the loop that runs them (``measure_interleaved``)."""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np


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
