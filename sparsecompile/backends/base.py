"""The runner interface every backend implements.

A runner loads one artifact, runs inference on NumPy arrays (one per model
input, in the model's input order) and returns NumPy arrays (one per flat
output). Profiling and equivalence checks treat all backends alike through
``load`` / ``infer`` / ``close``, and time them through ``prepare`` /
``timed_infer``:

- ``prepare(inputs)`` turns the NumPy inputs into whatever the runner consumes
  directly (tensors, device buffers), outside any timed region. By default the
  arrays themselves.
- ``timed_infer(prepared)`` runs one inference on prepared inputs and returns
  its latency in milliseconds. By default a wall-clock (``perf_counter_ns``)
  time of ``infer(prepared)``; runners override it to time only the forward
  pass, or to use device events.
- ``layers``: per-layer notes a runner made while loading (e.g. a 2:4 weight
  that stays dense, and why); empty by default.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any, Sequence

import numpy as np


class Runner(ABC):
    name: str = ""
    layers: Sequence[dict] = ()

    @abstractmethod
    def load(self) -> "Runner": ...

    @abstractmethod
    def infer(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]: ...

    def prepare(self, inputs: Sequence[np.ndarray]) -> Any:
        return inputs

    def timed_infer(self, prepared: Any) -> float:
        start = time.perf_counter_ns()
        self.infer(prepared)
        return (time.perf_counter_ns() - start) / 1e6

    def close(self) -> None:  # noqa: B027 - optional for runners without resources
        pass

    def __enter__(self) -> "Runner":
        return self.load()

    def __exit__(self, *exc) -> None:
        self.close()
