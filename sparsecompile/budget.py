"""Layer selection under an accuracy budget: ``--max-drop``.

The drop is measured on the calibration set against the dense model, in percentage points.
For a classifier (a 2-D floating-point first output with more than one column) it is
``100 * (1 - top-1 agreement)``. Otherwise it is ``100 * relative L2 output error``.

When the fully masked model exceeds the budget, layers go back to dense greedily:

1. Each masked layer gets a sensitivity. With ``signal="measured"`` it is the drop of the
   model with only that layer masked, one calibration pass per layer. With ``signal="mp"``
   it is the spectral prior of :func:`sparsecompile.analysis.spectral.mp_sensitivity`, which
   costs no passes.
2. Layers are ranked by sensitivity per unit of benefit. The benefit is the speed model's
   predicted time saved where the target has one, otherwise the layer's weight count.
3. Layers are restored in that order (weight *and* bias, which statistics correction may have
   changed), one at a time, re-measuring after each, until the budget holds or nothing is left.

Every decision is measured on the final model, so the budget holds on the calibration set
(not necessarily on other data). Sequential correction of later layers was fitted with the
reverted layers sparse. Restoring a layer leaves those fits slightly off, and the
re-measurement includes that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from sparsecompile.graph import get_tensor, set_tensor
from sparsecompile.verify import compare_outputs, run_batches


def drop_points(dense_outputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> tuple[float, str]:
    """``(drop, metric)``: points of top-1 agreement lost, or the relative output error in percent."""
    first = compare_outputs(dense_outputs[:1], outputs[:1])[0]
    if "top1_agreement" in first:
        return 100.0 * (1.0 - first["top1_agreement"]), "top-1 agreement"
    return 100.0 * first["relative_error"], "relative output error"


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


@dataclass
class BudgetResult:
    max_drop: float
    metric: str
    initial_drop: float
    final_drop: float
    sensitivity: dict[str, float] = field(default_factory=dict)  # layer -> drop with only it masked (or prior)
    reverted: list[dict] = field(default_factory=list)  # in order: layer, sensitivity, drop after reverting
    met: bool = True

    def to_json(self) -> dict:
        return {"max_drop": self.max_drop, "metric": self.metric, "initial_drop": round(self.initial_drop, 4),
                "final_drop": round(self.final_drop, 4), "met": self.met, "reverted": self.reverted,
                "sensitivity": {k: round(v, 4) for k, v in self.sensitivity.items()}}


def enforce_budget(sparse_gm, dense_gm, layers: list, masks: dict[str, torch.Tensor], batches: Callable[[], list],
                   dense_outputs: list[torch.Tensor], max_drop: float, signal: str = "measured",
                   priors: dict[str, float] | None = None, benefit: dict[str, float] | None = None,
                   progress=None) -> BudgetResult:
    """Restore masked layers of ``sparse_gm`` to their ``dense_gm`` values until the drop is within ``max_drop``.

    ``masks`` loses the restored layers' entries. ``priors`` holds the sensitivities for
    ``signal="mp"``. ``benefit`` is each layer's gain from being sparse, higher meaning better.
    """
    masked_layers = [layer for layer in layers if layer.weight_target in masks]
    drop, metric = drop_points(dense_outputs, run_batches(sparse_gm, batches()))
    result = BudgetResult(max_drop, metric, drop, drop)
    if drop <= max_drop or not masked_layers:
        result.met = drop <= max_drop
        return result

    if signal == "mp":
        result.sensitivity = {layer.name: float((priors or {}).get(layer.name, 0.0)) for layer in masked_layers}
    else:
        # Sensitivity of each layer alone: the dense model with just this layer's sparse tensors.
        sparse_values = {layer.name: {p: get_tensor(sparse_gm, p).clone() for p in layer_params(sparse_gm, layer)}
                         for layer in masked_layers}
        items = progress.bar(masked_layers, "layer sensitivity") if progress is not None else masked_layers
        for layer in items:
            dense_values = {p: get_tensor(dense_gm, p).clone() for p in sparse_values[layer.name]}
            for p, value in sparse_values[layer.name].items():
                set_tensor(dense_gm, p, value)
            alone, _ = drop_points(dense_outputs, run_batches(dense_gm, batches()))
            for p, value in dense_values.items():
                set_tensor(dense_gm, p, value)
            result.sensitivity[layer.name] = alone

    def priority(layer) -> float:
        gain = (benefit or {}).get(layer.name) or float(layer.numel)
        return result.sensitivity[layer.name] / max(gain, 1e-12)

    for rank, layer in enumerate(sorted(masked_layers, key=priority, reverse=True), start=1):
        for p in layer_params(sparse_gm, layer):
            set_tensor(sparse_gm, p, get_tensor(dense_gm, p).clone())
        del masks[layer.weight_target]
        drop, _ = drop_points(dense_outputs, run_batches(sparse_gm, batches()))
        result.reverted.append({"layer": layer.name, "rank": rank,
                                "sensitivity": round(result.sensitivity[layer.name], 4),
                                "drop_after": round(drop, 4)})
        layer.reason = (f"kept dense by --max-drop {max_drop:g}: {signal} sensitivity "
                        f"{result.sensitivity[layer.name]:.3g}{' pt' if signal == 'measured' else ''} "
                        f"(rank {rank}); the model's drop is {drop:.3g} pt with it dense")
        if progress is not None:
            progress.detail(f"--max-drop: {layer.name} back to dense, drop now {drop:.3f}")
        if drop <= max_drop:
            break
    result.final_drop = drop
    result.met = drop <= max_drop
    return result
