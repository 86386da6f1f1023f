"""The layer-reversion search of the accuracy guard, on planted damage functions.

The damage here is a function of which layers are sparse (read from the model's weights), so the
tests can plant the interactions that statistics correction creates on real models: restoring
one layer alone does not help, restoring several together does.
"""

from __future__ import annotations

import torch
import torch.fx

from sparsecompile.budget import enforce_budget
from sparsecompile.damage import Damage, OutputDamage
from sparsecompile.layers import GemmLayer


class Chain(torch.nn.Module):
    def __init__(self, count: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(count))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _setup(count: int):
    torch.manual_seed(0)
    dense = torch.fx.symbolic_trace(Chain(count))
    sparse = torch.fx.symbolic_trace(Chain(count))
    sparse.load_state_dict(dense.state_dict())
    layers, masks = [], {}
    for i in range(count):
        target = f"layers.{i}.weight"
        layers.append(GemmLayer(f"l{i}", f"layers_{i}", "linear", target, (4, 4), 1, extra={"macs": 16}))
        masks[target] = torch.tensor([1, 1, 0, 0], dtype=torch.bool).repeat(4, 1)
        with torch.no_grad():
            sparse.get_parameter(target).mul_(masks[target])
    return dense, sparse, layers, masks


def _sparse_set(gm, dense, count: int) -> frozenset[int]:
    return frozenset(i for i in range(count)
                     if not torch.equal(gm.get_parameter(f"layers.{i}.weight"), dense.get_parameter(f"layers.{i}.weight")))


def _damage(points: float) -> Damage:
    return Damage([OutputDamage(0, "classes", points, 1.0)], 8)


def _batches():
    return [(torch.randn(8, 4),)]


def test_greedy_walk_falls_back_to_the_smallest_helping_prefix_when_single_restorations_stall():
    count = 6
    dense, sparse, layers, masks = _setup(count)
    untouched = torch.fx.symbolic_trace(Chain(count))
    untouched.load_state_dict(dense.state_dict())
    ranking = {0: 9.0, 1: 8.0, 2: 7.0, 3: 6.0, 4: 1.0, 5: 0.8}  # planted sensitivities: l0 ranks first
    check_marker = [torch.zeros(1)]

    def score_of(sparse_layers: frozenset[int]) -> float:
        # l0 and l1 interact: restoring either alone changes nothing, both together remove 2 points.
        # l2 costs 0.5, l4 and l5 0.25 each, l3 nothing (restoring it does not help, and it can stay sparse).
        points = 1.0 + 0.5 * (2 in sparse_layers) + 0.25 * len(sparse_layers & {4, 5})
        return points + (2.0 if {0, 1} & sparse_layers else 0.0)

    def assess(dense_out, out):
        if dense_out is not check_marker:  # the sensitivity pass: the dense model with one layer sparse
            alone = _sparse_set(dense, untouched, count)
            return _damage(ranking[next(iter(alone))] if alone else 0.0)
        return _damage(score_of(_sparse_set(sparse, dense, count)))

    result = enforce_budget(sparse, dense, layers, masks, assess=assess, check_batches=_batches,
                            check_dense=check_marker, fit_batches=_batches,
                            max_drop=1.0, max_error=10.0)
    assert result.search == "greedy" and result.met and result.final.score == 1.0
    # l0, l1 and l3 did not help alone; l2, l4, l5 did. The fallback bisects over [l0, l1, l3]: l0 alone
    # fails, l0 + l1 is within budget, so l3 stays sparse instead of going back with the rest.
    assert _sparse_set(sparse, dense, count) == frozenset({3})
    assert set(masks) == {"layers.3.weight"}
    assert [(t["dense_layers"], t["within"]) for t in result.trials] == [(1, False), (2, True)]
    assert [entry["layer"] for entry in result.reverted] == ["l2", "l4", "l5", "l0", "l1"]
    assert [entry["layer"] for entry in result.skipped] == ["l3"]


def _planted_refit_search(count: int, in_place_penalty: float):
    """enforce_budget with a refit on a chain of ``count`` layers: each of the 3 most sensitive layers costs 1
    point, the rest 0.1 (within budget needs the 3 dense); a model restored in place, not refitted, costs
    ``in_place_penalty`` more (the later corrections are off, as on real models). Returns (result, dense,
    masks, refits, walk_checks): the refitted dense-layer sets, and the sparse-layer count of each in-place
    check of the walk."""
    dense, sparse, layers, masks = _setup(count)
    refits, walk_checks = [], []

    def refit(dense_names):
        refits.append(set(dense_names))
        graph = torch.fx.symbolic_trace(Chain(count))
        graph.load_state_dict(dense.state_dict())
        for layer in layers:
            if layer.name not in dense_names:
                with torch.no_grad():
                    graph.get_parameter(layer.weight_target).mul_(masks[layer.weight_target])
        return track(graph), "outcome"

    ranking = [f"l{i}" for i in range(count)]  # l0 most sensitive
    check_marker = [torch.zeros(1)]
    state = {"graph": None}

    def assess(dense_out, out):
        if dense_out is not check_marker:  # sensitivity: dense model with one layer sparse
            sparse_now = _sparse_set(dense, dense_reference, count)
            return _damage(10.0 - ranking.index(f"l{next(iter(sparse_now))}") if sparse_now else 0.0)
        graph = state["graph"]
        sparse_now = _sparse_set(graph, dense, count)
        points = 0.5 + sum(1.0 if i < 3 else 0.1 for i in sparse_now)
        if graph is sparse and 0 < count - len(sparse_now) < count:
            walk_checks.append(len(sparse_now))
            points += in_place_penalty
        return _damage(points)

    dense_reference = torch.fx.symbolic_trace(Chain(count))
    dense_reference.load_state_dict(dense.state_dict())

    def track(graph):  # the planted damage reads whichever model ran last
        graph.register_forward_pre_hook(lambda module, args: state.__setitem__("graph", module))
        return graph

    track(sparse)
    track(dense)
    result = enforce_budget(sparse, dense, layers, masks, assess=assess, check_batches=_batches,
                            check_dense=check_marker, fit_batches=_batches,
                            max_drop=1.0, max_error=10.0, refit=refit)
    return result, dense, masks, refits, walk_checks


def test_bisection_with_refit_finds_the_smallest_within_budget_prefix():
    count = 8
    result, dense, masks, refits, _ = _planted_refit_search(count, in_place_penalty=2.0)
    # The in-place walk runs too but no restoration helps it, so it ends fully dense; bisection keeps 5 sparse.
    assert result.search == "bisection" and result.met
    assert result.alternative["search"] == "greedy" and result.alternative["sparse_layers"] == 0
    assert "stopped" not in result.alternative
    assert [entry["layer"] for entry in result.reverted] == ["l0", "l1", "l2"]
    assert set(masks) == {f"layers.{i}.weight" for i in range(3, count)}
    assert _sparse_set(result.graph, dense, count) == frozenset(range(3, count))
    tried = {t["dense_layers"]: t["within"] for t in result.trials}
    assert tried[3] is True and tried[2] is False  # the smallest within-budget prefix, and the one below it fails
    assert len(refits) <= 3  # bisection over 8: log2(8) trials


def test_the_walk_stops_once_it_keeps_less_than_bisection():
    # Restoring in place costs only 0.3 points here, so the walk's restorations each help a little: l0, l1, l2
    # leave it at 1.3 (over budget) with 5 layers sparse, l3 at 1.2 with 4: fewer than bisection's 5 within
    # budget. From there it could only lose, so it stops instead of restoring l4 and l5 (two passes).
    count = 8
    result, _, masks, _, walk_checks = _planted_refit_search(count, in_place_penalty=0.3)
    assert result.search == "bisection" and result.met
    assert set(masks) == {f"layers.{i}.weight" for i in range(3, count)}
    assert walk_checks == [7, 6, 5, 4]  # l0..l3 restored, each lowering the damage; l4 and l5 never tried
    alternative = result.alternative
    assert alternative["search"] == "greedy" and alternative["sparse_layers"] == 4
    assert "kept less" in alternative["stopped"] and alternative["final_score"] == 1.2
    assert result.to_json()["alternative"]["stopped"] == alternative["stopped"]
