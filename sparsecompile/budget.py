"""Layer selection under an accuracy budget: the accuracy guard and ``--max-drop`` / ``--max-error``.

Damage is measured per output against the dense model (:mod:`sparsecompile.damage`): points
of top-1 agreement for class scores, points of per-position agreement for CTC-like
sequences, percent relative error for everything else, each against its budget. The
model is within budget when every output is (its *score*, the largest damage / budget, is
at most 1). The check runs on the *held-back* calibration samples, which chose no mask.

When the fully masked model exceeds the budget, layers go back to dense greedily:

1. Each masked layer gets a sensitivity. With ``signal="measured"`` it is the score of the
   dense model with only that layer masked, on (at most 64 of) the samples the masks were
   chosen on, one pass per layer; ties (agreement scores are coarse) go by the outputs'
   relative error. With ``signal="mp"`` it is the spectral prior of
   :func:`sparsecompile.analysis.spectral.mp_sensitivity`, which costs no passes.
2. Layers are ranked by sensitivity per unit of benefit. The benefit is the speed model's
   predicted time saved where the target has one, otherwise the layer's MACs (weights if
   MACs are unknown).
3. Layers are restored in that order (weight *and* bias, which statistics correction may have
   changed), one at a time, re-measuring on the held-back samples after each, until the
   budget holds or nothing is left. Restoring every layer gives the dense model back, so
   the budget can always be met; a build that needed that says so with a warning.

Without statistics correction (``refit`` not given), restoring a layer changes nothing else, and
step 3 is a greedy walk: a restoration that does not lower the score is undone (the layer
stays sparse, listed in ``kept_sparse_after_trial``) and the next layer is tried, so the
score falls at every recorded step. If no single restoration helps any more, the remaining
layers go back in growing prefixes of the ranking (bisection) until the budget holds.

With statistics correction, restoring one layer alone is misleading: every later layer's
correction was fitted with it sparse, so restoring it leaves their fits off (measured on an
OCR recognizer: after three restorations no single one lowered the damage, and the old walk
ended with every layer dense). There ``refit(dense_names)`` rebuilds the model from the
dense one with the same masks on the remaining layers and the correction fitted again, and
the search bisects on *how many* of the ranked layers go back: the smallest prefix of the
ranking whose refitted model is within budget. Each trial costs one correction pass on the
fitting samples plus one pass on the held-back ones, about ``log2(layers)`` trials in all.
The cheap one-at-a-time walk runs as well (on a small CNN it kept layers sparse where every
bisection prefix was over budget), and the result that keeps more of the benefit (time saved
or MACs) sparse is used; the other is recorded as ``alternative``. Bisection runs first, and the walk stops
as soon as it keeps less of the benefit sparse than bisection's within-budget result: it only ever restores
layers, so it could not win from there (``alternative.stopped`` says so).
The score need not fall monotonically along the ranking; every trial is recorded
(``trials``), so a non-monotone step is visible, and the result is always a measured model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from sparsecompile.damage import Damage
from sparsecompile.graph import get_tensor, set_tensor
from sparsecompile.verify import run_batches

SENSITIVITY_SAMPLES = 64  # fitting samples each layer's sensitivity is measured on (one pass per layer)


def layer_params(gm, layer) -> list[str]:
    """The tensors a layer owns that masking or correction may change: its weight and bias."""
    names = [layer.weight_target]
    for suffix in (".weight", "_weight"):
        if layer.weight_target.endswith(suffix):
            bias = layer.weight_target[: -len(suffix)] + suffix.replace("weight", "bias")
            try:
                get_tensor(gm, bias)
            except (AttributeError, KeyError):
                break
            names.append(bias)
            break
    return names


def has_tensor(gm, name: str) -> bool:
    try:
        get_tensor(gm, name)
    except (AttributeError, KeyError):
        return False
    return True


def dense_value(dense_gm, sparse_gm, name: str) -> torch.Tensor:
    """``name``'s dense value; zeros for a bias that statistics correction added to a layer that had none."""
    if has_tensor(dense_gm, name):
        return get_tensor(dense_gm, name).clone()
    return torch.zeros_like(get_tensor(sparse_gm, name))


@dataclass
class BudgetResult:
    max_drop: float
    max_error: float
    initial: Damage
    final: Damage
    sensitivity: dict[str, float] = field(default_factory=dict)  # layer -> score with only it masked (or prior)
    reverted: list[dict] = field(default_factory=list)  # in order: layer, sensitivity, score after reverting
    skipped: list[dict] = field(default_factory=list)  # tried, but restoring them alone did not lower the damage
    signal: str = "measured"
    search: str = "greedy"  # "greedy" (one layer at a time) or "bisection" (prefixes of the ranking, refitted)
    trials: list[dict] = field(default_factory=list)  # bisection: {"dense_layers", "score", "within"} per trial
    graph: object = None  # bisection: the refitted model that replaces the sparse one (None: changed in place)
    refit_outcome: object = None  # bisection: the refit's sparsify result (its corrections replace the old ones)
    alternative: dict | None = None  # with correction: the other search's outcome (the one not chosen)
    stopped: str | None = None  # why the search ended short of the budget (the walk, once it cannot win)

    @property
    def met(self) -> bool:
        return self.final.within

    def to_json(self) -> dict:
        return {"max_drop": self.max_drop, "max_error": self.max_error, "met": self.met,
                "measured_on": f"{self.final.samples} held-back calibration samples",
                "initial": self.initial.to_json(), "final": self.final.to_json(),
                "reverted": self.reverted, "kept_sparse_after_trial": self.skipped, "signal": self.signal,
                "search": self.search, "trials": self.trials, "alternative": self.alternative,
                **({"stopped": self.stopped} if self.stopped else {}),
                "sensitivity": {k: (round(v, 4) if math.isfinite(v) else None) for k, v in self.sensitivity.items()}}


def sensitivity_samples(batches) -> list:
    """The first SENSITIVITY_SAMPLES of ``batches`` (whole batches): a layer ranking needs far fewer samples than
    the budget itself."""
    chosen, count = [], 0
    for batch in batches:
        if count >= SENSITIVITY_SAMPLES:
            break
        chosen.append(batch)
        count += int(batch[0].shape[0])
    return chosen


def damage_alone(dense_gm, values: dict[str, torch.Tensor], assess, batches: list, reference: list) -> Damage:
    """The damage of ``dense_gm`` with only ``values`` (one layer's sparse tensors, by name) swapped in, on
    ``batches`` against the dense ``reference`` outputs; ``dense_gm`` is restored afterwards. A bias that statistics
    correction added to a bias-less layer has no slot in the dense graph: the layer alone is then judged with its
    sparse weight and no bias (the dense layer's zero bias)."""
    own = {p: value for p, value in values.items() if has_tensor(dense_gm, p)}
    dense_values = {p: get_tensor(dense_gm, p).clone() for p in own}
    for p, value in own.items():
        set_tensor(dense_gm, p, value)
    try:
        return assess(reference, run_batches(dense_gm, batches))
    finally:
        for p, value in dense_values.items():
            set_tensor(dense_gm, p, value)


def enforce_budget(sparse_gm, dense_gm, layers: list, masks: dict[str, torch.Tensor], *,
                   assess: Callable[[list[torch.Tensor], list[torch.Tensor]], Damage],
                   check_batches: Callable[[], list], check_dense: list[torch.Tensor],
                   fit_batches: Callable[[], list],
                   max_drop: float, max_error: float, signal: str = "measured",
                   priors: dict[str, float] | None = None, benefit: dict[str, float] | None = None,
                   reason: str = "the accuracy guard", progress=None,
                   refit: Callable[[set[str]], tuple] | None = None,
                   initial_outputs: list[torch.Tensor] | None = None) -> BudgetResult:
    """Restore masked layers of ``sparse_gm`` to their ``dense_gm`` values until ``assess`` is within budget.

    ``assess(dense_outputs, outputs)`` gives the per-output damage; ``check_*`` are the held-back
    samples (and the dense outputs on them) the budget is judged on, ``fit_batches`` the samples the
    sensitivities are measured on (the first SENSITIVITY_SAMPLES of them). ``masks`` loses the restored
    layers' entries. ``refit(names)``
    (given when statistics correction is on) returns ``(graph, outcome)``: the dense model with the
    other masked layers masked and corrected again; the search then bisects on the ranking.
    ``initial_outputs``: ``sparse_gm``'s outputs on the check samples, when the caller has them already.
    """
    masked_layers = [layer for layer in layers if layer.weight_target in masks]
    if initial_outputs is None:
        initial_outputs = run_batches(sparse_gm, check_batches())
    damage = assess(check_dense, initial_outputs)
    result = BudgetResult(max_drop, max_error, damage, damage, signal=signal)
    if damage.within or not masked_layers:
        return result

    tiebreak: dict[str, float] = {}
    if signal == "mp":
        result.sensitivity = {layer.name: float((priors or {}).get(layer.name, 0.0)) for layer in masked_layers}
    else:
        # Sensitivity of each layer alone: the dense model with just this layer's sparse tensors.
        sparse_values = {layer.name: {p: get_tensor(sparse_gm, p).clone() for p in layer_params(sparse_gm, layer)}
                         for layer in masked_layers}
        fit = sensitivity_samples(fit_batches())
        fit_reference = run_batches(dense_gm, fit)
        items = progress.bar(masked_layers, "layer sensitivity") if progress is not None else masked_layers
        for layer in items:
            alone = damage_alone(dense_gm, sparse_values[layer.name], assess, fit, fit_reference)
            # Agreement scores are coarse (many layers alone change no prediction): the outputs' relative
            # error breaks their ties, so the ranking still follows how far each layer moves the outputs.
            result.sensitivity[layer.name], tiebreak[layer.name] = alone.order_key

    def gain(layer) -> float:
        return (benefit or {}).get(layer.name) or float(layer.extra.get("macs") or layer.numel)

    def priority(layer) -> tuple[float, float, str]:
        sensitivity = result.sensitivity[layer.name]
        return (math.inf if not math.isfinite(sensitivity) else sensitivity / max(gain(layer), 1e-12),
                tiebreak.get(layer.name, 0.0) / max(gain(layer), 1e-12), layer.name)

    order = sorted(masked_layers, key=priority, reverse=True)
    if refit is None:
        return _greedy(result, order, masks, sparse_gm, dense_gm, assess, check_batches, check_dense, damage,
                       reason, signal, progress)

    # With statistics correction both searches run and the one that keeps more of the benefit sparse wins:
    # bisection with the correction refitted (one walk cannot see past restorations that leave later
    # corrections off: on an OCR recognizer the walk ended fully dense), and the cheap one-at-a-time walk
    # (on a small CNN bisection's prefixes were all over budget where the walk kept layers sparse).
    reasons = {layer.name: layer.reason for layer in order}
    bisection_masks = dict(masks)
    bisection = _bisect_refit(_fresh(result), order, bisection_masks, refit, assess, check_batches, check_dense,
                              dense_gm, reason, progress)
    bisection_reasons = {layer.name: layer.reason for layer in order}
    for layer in order:
        layer.reason = reasons[layer.name]

    def kept(chosen_masks) -> float:
        return sum(gain(layer) for layer in order if layer.weight_target in chosen_masks)

    # The walk only ever restores layers, so once it keeps less than bisection's within-budget result it cannot
    # win (ties go to the walk): it stops there instead of spending more passes.
    floor = kept(bisection_masks) if bisection.graph is not None else None
    greedy = _greedy(_fresh(result), order, masks, sparse_gm, dense_gm, assess, check_batches, check_dense, damage,
                     reason, signal, progress,
                     below=None if floor is None else (
                         lambda restoring=None: kept(masks) - (gain(restoring) if restoring is not None else 0.0) < floor))

    if bisection.graph is not None and kept(bisection_masks) > kept(masks):
        chosen, other = bisection, greedy
        other_sparse = sum(layer.weight_target in masks for layer in order)
        masks.clear()
        masks.update(bisection_masks)
        for layer in order:
            layer.reason = bisection_reasons[layer.name]
    else:
        chosen, other = greedy, bisection
        other_sparse = sum(layer.weight_target in bisection_masks for layer in order)
    chosen.alternative = {"search": other.search, "sparse_layers": other_sparse,
                          **({"stopped": other.stopped} if other.stopped else {}),
                          "final_score": round(other.final.score, 4) if math.isfinite(other.final.score) else None,
                          "trials": other.trials}
    return chosen


def _fresh(result: BudgetResult) -> BudgetResult:
    """A result with the same budgets, initial damage and sensitivities, and nothing searched yet."""
    return BudgetResult(result.max_drop, result.max_error, result.initial, result.initial,
                        sensitivity=result.sensitivity, signal=result.signal)


def _greedy(result: BudgetResult, order: list, masks: dict, sparse_gm, dense_gm, assess, check_batches, check_dense,
            damage: Damage, reason: str, signal: str, progress,
            below: Callable[..., bool] | None = None) -> BudgetResult:
    """Restore ``order`` one layer at a time in ``sparse_gm`` (see the module docstring). ``below(layer=None)``:
    whether what stays sparse (less ``layer``, if given) can no longer beat the other search; the walk then
    stops where it is (``result.stopped`` says so)."""
    stop = "the walk already kept less of the benefit sparse than bisection's within-budget result"
    previous = damage.score
    kept_sparse = []
    for rank, layer in enumerate(order, start=1):
        if below is not None and not damage.within and below():
            result.stopped, result.final = stop, damage
            return result
        names = layer_params(sparse_gm, layer)
        sparse_values = {p: get_tensor(sparse_gm, p).clone() for p in names}
        for p in names:
            set_tensor(sparse_gm, p, dense_value(dense_gm, sparse_gm, p))
        trial = assess(check_dense, run_batches(sparse_gm, check_batches()))
        entry = {"layer": layer.name, "rank": rank,
                 "sensitivity": round(result.sensitivity[layer.name], 4)
                 if math.isfinite(result.sensitivity[layer.name]) else None,
                 "score_after": round(trial.score, 4) if math.isfinite(trial.score) else None}
        if trial.score >= previous and not trial.within:
            # Restoring it did not lower the damage (later layers' corrections were fitted with it sparse):
            # it stays sparse, so the score never rises along the search.
            for p, value in sparse_values.items():
                set_tensor(sparse_gm, p, value)
            kept_sparse.append(layer)
            result.skipped.append(entry)
            continue
        damage, previous = trial, trial.score
        del masks[layer.weight_target]
        entry["worst_after"] = damage.worst.describe() if damage.worst is not None else ""
        result.reverted.append(entry)
        layer.reason = (f"kept dense by {reason}: {signal} sensitivity "
                        f"{result.sensitivity[layer.name]:.3g} (rank {rank}); "
                        f"with it dense, {entry['worst_after'] or 'no output'}")
        if progress is not None:
            progress.detail(f"{reason}: {layer.name} back to dense, score now {damage.score:.3f}")
        if damage.within:
            break
    if not damage.within and kept_sparse and below is not None and below(kept_sparse[0]):
        result.stopped = stop  # the fallback restores at least the first of them: it cannot win either
    elif not damage.within and kept_sparse:
        # No single further reversion helped: the smallest prefix of the rest (in rank order) that restored
        # together is within budget, by bisection (all of them restored is the dense model: within).
        def restore(count: int) -> None:
            for index, layer in enumerate(kept_sparse):
                for p, value in trial_values[layer.name].items():
                    set_tensor(sparse_gm, p, dense_value(dense_gm, sparse_gm, p) if index < count else value)

        def trial(count: int):
            restore(count)
            return assess(check_dense, run_batches(sparse_gm, check_batches())), None

        trial_values = {layer.name: {p: get_tensor(sparse_gm, p).clone() for p in layer_params(sparse_gm, layer)}
                        for layer in kept_sparse}
        high, found = _smallest_prefix(len(kept_sparse), trial, result.trials)
        restore(high)  # the last trial may have been another prefix
        damage = found[0] if found is not None else assess(check_dense, run_batches(sparse_gm, check_batches()))
        skipped_by_name = {entry["layer"]: entry for entry in result.skipped}
        for layer in kept_sparse[:high]:
            del masks[layer.weight_target]
            layer.reason = (f"kept dense by {reason}: restoring it alone did not lower the damage; it went back "
                            f"with the {high} most sensitive of the rest")
            result.reverted.append({**skipped_by_name[layer.name], "together": True,
                                    "score_after": round(damage.score, 4) if math.isfinite(damage.score) else None,
                                    "worst_after": damage.worst.describe() if damage.worst is not None else ""})
        result.skipped = [skipped_by_name[layer.name] for layer in kept_sparse[high:]]
    result.final = damage
    return result


def _smallest_prefix(total: int, trial: Callable[[int], tuple], trials: list[dict]):
    """Bisection for the smallest count in ``1..total`` whose ``trial(count) -> (damage, payload)`` is within
    budget; ``total`` (everything dense) is taken as within without a trial. Returns ``(count, (damage,
    payload))``, or ``(total, None)`` when no tried count was within. Every trial is appended to ``trials``."""
    low, high, found = 0, total, None
    while high - low > 1:
        middle = (low + high) // 2
        damage, payload = trial(middle)
        trials.append({"dense_layers": middle,
                       "score": round(damage.score, 4) if math.isfinite(damage.score) else None,
                       "within": damage.within})
        if damage.within:
            high, found = middle, (damage, payload)
        else:
            low = middle
    return high, found


def _bisect_refit(result: BudgetResult, order: list, masks: dict, refit, assess, check_batches, check_dense,
                  dense_gm, reason: str, progress) -> BudgetResult:
    """The smallest prefix of ``order`` that, restored to dense with the correction refitted, is within budget."""
    result.search = "bisection"

    def trial(count: int):
        graph, outcome = refit({layer.name for layer in order[:count]})
        damage = assess(check_dense, run_batches(graph, check_batches()))
        if progress is not None:
            progress.detail(f"{reason}: {count} of {len(order)} layers dense (correction refitted), "
                            f"score {damage.score:.3f}")
        return damage, (graph, outcome)

    high, found = _smallest_prefix(len(order), trial, result.trials)
    if found is None:  # only the dense model is within budget
        damage = assess(check_dense, run_batches(dense_gm, check_batches()))
    else:
        damage, (result.graph, result.refit_outcome) = found
    for rank, layer in enumerate(order[:high], start=1):
        del masks[layer.weight_target]
        sensitivity = result.sensitivity[layer.name]
        entry = {"layer": layer.name, "rank": rank,
                 "sensitivity": round(sensitivity, 4) if math.isfinite(sensitivity) else None,
                 "score_after": round(damage.score, 4) if math.isfinite(damage.score) else None,
                 "worst_after": damage.worst.describe() if damage.worst is not None else "", "together": True}
        result.reverted.append(entry)
        layer.reason = (f"kept dense by {reason}: {result.signal} sensitivity {sensitivity:.3g} (rank {rank}); "
                        f"the {high} highest-ranked layers went back to dense (correction refitted): "
                        f"{entry['worst_after'] or 'no output'}")
    result.final = damage
    return result
