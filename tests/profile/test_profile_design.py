"""The profiler's round order: a variant slowed down by the one that ran just before it must not bias ratios.

Fake variants read a fake clock (``timed_infer`` returns a planted latency, nothing sleeps): each knows
which variant ran last, through shared state, and pays a planted penalty after particular predecessors.
"""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pytest
import torch

from sparsecompile.backends.base import Runner
from sparsecompile.profile import Variant, interleaving_design, measure_interleaved, predecessor_counts


class _FakeClock:
    """Latency = base[variant] + penalty(predecessor, variant); remembers who ran last."""

    def __init__(self, base: dict[str, float], penalty):
        self.base, self.penalty, self.last, self.log = base, penalty, None, []

    def runner(self, name):
        clock = self

        class FakeRunner(Runner):
            def load(self):
                return self

            def infer(self, _inputs):
                raise AssertionError("the profiler times runs through timed_infer")

            def timed_infer(self, _prepared):
                ms = clock.base[name] + (clock.penalty(clock.last, name) if clock.last is not None else 0.0)
                clock.last = name
                clock.log.append(name)
                return ms

        return FakeRunner()


def _variants(clock: _FakeClock) -> list[Variant]:
    variants = [Variant(name=n, artifact=n, specs=[], loader=lambda n=n: clock.runner(n)) for n in clock.base]
    for variant in variants:
        variant.load()
    return variants


def _old_fixed_cycle(names, runs, reverse=False) -> dict:
    """The order profile.py used before: A B C, B C A, C A B, ... (warm-up rounds in the same cycle)."""
    order = list(range(len(names)))[::-1] if reverse else list(range(len(names)))
    orders = [order[i % len(order):] + order[:i % len(order)] for i in range(runs)]
    return {"variants": list(names), "orders": orders, "warmup_last": names[order[-1]]}


def _after_torch(previous, name):  # torch's threads keep spinning after it returns: whoever runs next is slower
    return 2.0 if previous == "torch" and name != "torch" else 0.0


BASE = {"sparse": 10.0, "dense": 10.0, "torch": 25.0}


def _measure(design, warmup=3):
    clock = _FakeClock(BASE, _after_torch)
    variants = _variants(clock)
    runs = len(design["orders"])
    return measure_interleaved(variants, {n: None for n in BASE}, runs=runs, warmup=warmup, design=design)


def test_the_old_fixed_cycle_puts_the_planted_penalty_on_one_variant():
    """Reproduces the bias of issue 19: the cycle decides which of two equal variants looks 1.2x slower."""
    names = list(BASE)
    forward = _measure(_old_fixed_cycle(names, 60))
    assert statistics.median(forward["sparse"]) / statistics.median(forward["dense"]) == pytest.approx(1.2)
    assert statistics.mean(forward["sparse"]) > statistics.mean(forward["dense"]) + 0.5
    backward = _measure(_old_fixed_cycle(names, 60, reverse=True))
    assert statistics.median(backward["dense"]) / statistics.median(backward["sparse"]) == pytest.approx(1.2)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_the_balanced_design_cancels_the_planted_penalty(seed):
    names = list(BASE)
    design = interleaving_design(names, 60, seed=seed)  # 60 = 10 blocks of 3! rounds
    assert design["balanced"] and design["complete_blocks"] == 10
    samples = _measure(design)
    # Equal variants measure equal, though one of them is slowed down by torch whenever it follows it.
    assert statistics.mean(samples["sparse"]) == pytest.approx(statistics.mean(samples["dense"]))
    assert statistics.median(samples["sparse"]) == pytest.approx(statistics.median(samples["dense"]))
    # Both pay it in exactly a third of their runs: each follows each variant (itself included) 20 times.
    assert sum(s > 10.0 for s in samples["sparse"]) == sum(s > 10.0 for s in samples["dense"]) == 20
    assert samples["torch"] == [25.0] * 60


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_every_variant_follows_every_variant_equally_often(count):
    names = [f"v{i}" for i in range(count)]
    blocks = 3
    design = interleaving_design(names, blocks * math.factorial(count), seed=count)
    orders = design["orders"]
    assert all(sorted(o) == list(range(count)) for o in orders)  # every round runs every variant once
    per_block = math.factorial(count)
    for b in range(blocks):  # every ordering once per block
        block = orders[b * per_block:(b + 1) * per_block]
        assert sorted(map(tuple, block)) == sorted(itertools.permutations(range(count)))
    for position in range(count):  # every variant equally often in every position
        assert {sum(o[position] == i for o in orders) for i in range(count)} == {blocks * per_block // count}
    counts = predecessor_counts(design)
    assert {c for row in counts.values() for c in row.values()} == {blocks * math.factorial(count - 1)}


@pytest.mark.parametrize("count", [2, 3, 4])
def test_any_predecessor_penalty_costs_each_variant_its_average(count):
    """Random penalty matrix P[previous][variant]: a variant's mean is its base + the mean of its column."""
    rng = np.random.default_rng(count)
    names = [f"v{i}" for i in range(count)]
    penalty = {p: {n: float(rng.uniform(0, 5)) for n in names} for p in names}
    base = {n: 10.0 for n in names}
    clock = _FakeClock(base, lambda previous, name: penalty[previous][name])
    variants = _variants(clock)
    runs = 2 * math.factorial(count)
    samples = measure_interleaved(variants, {n: None for n in names}, runs=runs, warmup=2,
                                  design=interleaving_design(names, runs, seed=3))
    for name in names:
        expected = 10.0 + statistics.mean(penalty[p][name] for p in names)
        assert statistics.mean(samples[name]) == pytest.approx(expected)


def test_seeded_reproducible_and_recorded():
    names = ["sparse", "dense", "torch"]
    a, b = interleaving_design(names, 30, seed=4), interleaving_design(names, 30, seed=4)
    assert a == b and a["seed"] == 4 and a["variants"] == names
    assert any(interleaving_design(names, 30, seed=s)["orders"] != a["orders"] for s in range(5, 10))
    partial = interleaving_design(names, 8, seed=0)  # 1 block of 6 + 2 rounds
    assert not partial["balanced"] and partial["complete_blocks"] == 1 and len(partial["orders"]) == 8
    assert interleaving_design(names, 0)["orders"] == []


def test_many_variants_get_a_random_order_per_round():
    names = [f"v{i}" for i in range(5)]
    design = interleaving_design(names, 600, seed=0)
    assert design["block_rounds"] is None and not design["balanced"]
    assert all(sorted(o) == list(range(5)) for o in design["orders"])
    counts = predecessor_counts(design)
    # Balanced in expectation: 600 * (1/5 + 1/25) = 144 per pair of different variants, 24 for itself.
    for name in names:
        for previous in names:
            expected = 24 if previous == name else 144
            assert abs(counts[name][previous] - expected) < 6 * math.sqrt(expected), (name, previous)


def test_warm_up_runs_each_variant_in_a_row_ending_with_the_first_timed_variant():
    clock = _FakeClock({"a": 1.0, "b": 1.0, "c": 1.0}, lambda previous, name: 0.0)
    variants = _variants(clock)
    design = interleaving_design(["a", "b", "c"], 6, seed=2)
    measure_interleaved(variants, {"a": None, "b": None, "c": None}, runs=6, warmup=3, design=design)
    warm = clock.log[:9]
    assert [warm[i:i + 3] for i in (0, 3, 6)] == [[n] * 3 for n in warm[::3]]
    assert sorted(warm[::3]) == ["a", "b", "c"]
    first = design["variants"][design["orders"][0][0]]
    assert warm[-1] == design["warmup_last"] == first
    with pytest.raises(ValueError, match="other variants"):
        measure_interleaved(variants, {}, runs=5, warmup=0, design=design)


def test_torch_threads_are_set_per_variant_and_reported():
    seen: list[tuple[str, int]] = []

    class ThreadRecorder(Runner):
        def __init__(self, name):
            self.name = name

        def load(self):
            return self

        def infer(self, _inputs):
            seen.append((self.name, torch.get_num_threads()))

    before = torch.get_num_threads()
    one = Variant(name="one", artifact="", specs=[], loader=lambda: ThreadRecorder("one"), threads=1, runtime="torch")
    two = Variant(name="two", artifact="", specs=[], loader=lambda: ThreadRecorder("two"), threads=2, runtime="torch")
    for variant in (one, two):
        variant.load()
    try:
        samples = measure_interleaved([one, two], {"one": None, "two": None}, runs=4, warmup=1)
        assert len(samples["one"]) == len(samples["two"]) == 4
        assert len(seen) == 10  # 1 warm-up + 4 timed runs each
        assert all(threads == (1 if name == "one" else 2) for name, threads in seen), seen
        assert one.thread_report() == {"runtime": "torch", "intra_op_num_threads": 1,
                                       "inter_op_num_threads": torch.get_num_interop_threads()}
    finally:
        torch.set_num_threads(before)
    ort = Variant(name="ort", artifact="", specs=[], loader=lambda: ThreadRecorder("ort"), threads=3, runtime="onnxruntime")
    assert ort.thread_report() == {"runtime": "onnxruntime", "intra_op_num_threads": 3, "inter_op_num_threads": 1,
                                   "spinning": False}
    assert Variant(name="fake", artifact="", specs=[], loader=dict).thread_report()["intra_op_num_threads"] is None


class _Recorder(Runner):
    def __init__(self, name, log):
        self.name, self.log = name, log

    def load(self):
        return self

    def infer(self, inputs):
        self.log.append(self.name)


def test_variants_are_interleaved():
    log: list[str] = []
    variants = [Variant(name=n, artifact=n, specs=[], loader=lambda n=n: _Recorder(n, log)) for n in ("A", "B")]
    for variant in variants:
        variant.load()
    samples = measure_interleaved(variants, {"A": [], "B": []}, runs=4, warmup=2)
    warm, timed = log[:4], log[4:]
    assert sorted(warm) == ["A", "A", "B", "B"] and warm[0] == warm[1]  # each variant warmed up in a row
    rounds = [timed[i:i + 2] for i in range(0, len(timed), 2)]
    assert len(rounds) == 4
    assert all(sorted(r) == ["A", "B"] for r in rounds)  # every round runs each variant once
    assert [r[0] for r in rounds] in (["A", "B"] * 2, ["B", "A"] * 2)  # and the first one alternates
    assert rounds[0][0] == warm[-1]  # the warm-up ends with the variant the first round starts with
    assert [len(samples["A"]), len(samples["B"])] == [4, 4]
    assert all(s >= 0 for s in samples["A"] + samples["B"])

    log.clear()
    three = variants + [Variant(name="C", artifact="C", specs=[], loader=lambda: _Recorder("C", log))]
    three[2].load()
    measure_interleaved(three, {"A": [], "B": [], "C": []}, runs=6, warmup=0)
    rounds = [tuple(log[i:i + 3]) for i in range(0, len(log), 3)]
    assert len(set(rounds)) == 6  # all 3! orderings, once each
