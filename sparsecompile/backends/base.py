"""The runner interface every backend implements.

A runner loads one artifact, runs inference on NumPy arrays (one per model
input, in the model's input order) and returns NumPy arrays (one per flat
output). Profiling and equivalence checks treat all backends alike through
``load`` / ``infer`` / ``close``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np


class Runner(ABC):
    name: str = ""

    @abstractmethod
    def load(self) -> "Runner": ...

    @abstractmethod
    def infer(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]: ...

    def close(self) -> None:  # noqa: B027 - optional for runners without resources
        pass

    def __enter__(self) -> "Runner":
        return self.load()

    def __exit__(self, *exc) -> None:
        self.close()
