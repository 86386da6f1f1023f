"""Verification: an independent N:M checker and dense-vs-sparse comparisons.

``count_nm_violations`` deliberately shares no code with mask selection or
the compressed format: it works on a NumPy copy, moves the checked axis last
with ``np.moveaxis`` and counts nonzeros per group, so a bug in the code that
makes masks cannot hide itself here.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.fx
from torch.utils._pytree import tree_leaves

from sparsecompile.errors import SparseCompileError


def count_nm_violations(weight, axis: int, n: int = 2, m: int = 4) -> int:
    """Number of groups of ``m`` consecutive entries along ``axis`` with more than ``n`` nonzeros."""
    # Only whether each entry is nonzero matters: a boolean array, no float copy of the weight.
    nonzero = ((weight.detach().cpu() != 0).numpy() if isinstance(weight, torch.Tensor)
               else np.asarray(weight) != 0)
    if nonzero.shape[axis] % m:
        return -1
    moved = np.moveaxis(nonzero, axis, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    return int(np.sum(groups.sum(axis=-1, dtype=np.int32) > n))


def flat_outputs(output) -> list[torch.Tensor]:
    return [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]


@torch.no_grad()
def run_batches(module, batches: Iterable[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
    """Run ``module`` over batches and concatenate each output along axis 0."""
    return concat_outputs(module(*batch) for batch in batches)


def concat_outputs(per_batch: Iterable) -> list[torch.Tensor]:
    """Each batch's (possibly nested) outputs flattened, then concatenated output by output along axis 0
    (a 0-d output counts as one entry per batch)."""
    collected: list[list[torch.Tensor]] = []
    for output in per_batch:
        outputs = flat_outputs(output)
        if not collected:
            collected = [[] for _ in outputs]
        for bucket, out in zip(collected, outputs):
            bucket.append(out.detach().reshape(1) if out.dim() == 0 else out.detach())
    return [torch.cat(bucket) for bucket in collected]


def compare_outputs(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> list[dict]:
    """Per output: max/mean absolute error, relative error, and top-1 agreement for classifier-like outputs.

    NaN/Inf never pass for agreement: a candidate that is non-finite where the reference is finite has
    infinite errors, the errors are otherwise measured where both are finite, and a row with any
    non-finite value (in either model) never counts as agreeing (NaN == NaN rows used to: 100%).
    """
    if len(reference) != len(candidate):
        raise SparseCompileError(f"models disagree on the number of outputs: {len(reference)} vs {len(candidate)}")
    results = []
    for index, (ref, cand) in enumerate(zip(reference, candidate)):
        ref64, cand64 = ref.double(), cand.double()
        ref_finite, cand_finite = torch.isfinite(ref64), torch.isfinite(cand64)
        entry = {"output": index, "shape": list(ref.shape)}
        if bool((ref_finite & ~cand_finite).any()):
            entry.update(max_abs_error=float("inf"), mean_abs_error=float("inf"), relative_error=float("inf"))
        else:
            both = ref_finite & cand_finite
            ref_kept, cand_kept = ref64[both], cand64[both]
            diff = (ref_kept - cand_kept).abs()
            entry.update(
                max_abs_error=float(diff.max()) if diff.numel() else 0.0,
                mean_abs_error=float(diff.mean()) if diff.numel() else 0.0,
                relative_error=float(torch.linalg.vector_norm(ref_kept - cand_kept)
                                     / torch.linalg.vector_norm(ref_kept).clamp_min(1e-30)),
            )
        entry["nonfinite_reference"] = int((~ref_finite).sum())
        entry["nonfinite_candidate"] = int((~cand_finite).sum())
        if ref.dim() == 2 and ref.shape[1] > 1 and ref.is_floating_point():
            rows_finite = ref_finite.all(1) & cand_finite.all(1)
            agree = (ref.argmax(1) == cand.argmax(1)) & rows_finite
            entry["top1_agreement"] = float(agree.double().mean()) if agree.numel() else 1.0
        results.append(entry)
    return results


def nonfinite_samples(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> tuple[int, int, int | None]:
    """(samples where ``candidate`` has NaN/Inf and ``reference`` is finite there, samples, first such index):
    outputs on axis 0 are per sample; a 0-d output counts as one."""
    total = max((int(r.shape[0]) if r.dim() else 1 for r in reference), default=0)
    bad = torch.zeros(total, dtype=torch.bool)
    for ref, cand in zip(reference, candidate):
        if not (cand.is_floating_point() or cand.is_complex()):
            continue
        new = torch.isfinite(ref) & ~torch.isfinite(cand)
        rows = new.reshape(new.shape[0], -1).any(1) if new.dim() else new.reshape(1)
        bad[: rows.shape[0]] |= rows
    count = int(bad.sum())
    return count, total, (int(bad.nonzero()[0]) if count else None)


def check_outputs_finite(reference: list[torch.Tensor], candidate: list[torch.Tensor], what: str) -> None:
    """Fail (one line) when ``candidate`` outputs NaN/Inf where ``reference`` does not: such a model is
    broken, whatever the agreement numbers say."""
    count, total, first = nonfinite_samples(reference, candidate)
    if count:
        raise SparseCompileError(
            f"{what} outputs NaN or Inf on {count} of {total} calibration sample(s) where the dense model does "
            f"not (first at index {first}); no build was written"
        )


class _LayerErrorInterpreter(torch.fx.Interpreter):
    """Runs the dense graph; at each masked layer also evaluates it with the masked weight."""

    def __init__(self, gm, masked_weights: dict[str, torch.Tensor]):
        super().__init__(gm)
        self.masked_weights = masked_weights  # layer node name -> (weight node, masked tensor)
        self.sums: dict[str, list[float]] = {}

    def run_node(self, node):
        result = super().run_node(node)
        if node.name not in self.masked_weights:
            return result
        weight_node, masked = self.masked_weights[node.name]
        chain = [weight_node] + [u for u in weight_node.users if u is not node]
        saved = {c: self.env[c] for c in chain if c in self.env}
        self.env[weight_node] = masked
        for view in chain[1:]:
            self.env[view] = super().run_node(view)
        sparse_result = super().run_node(node)
        self.env.update(saved)
        sums = self.sums.setdefault(node.name, [0.0, 0.0])
        # float32 norms: float64 copies of large activations cost 10x more for 4 equal digits.
        sums[0] += float(torch.linalg.vector_norm((result - sparse_result).float())) ** 2
        sums[1] += float(torch.linalg.vector_norm(result.float())) ** 2
        return result


@torch.no_grad()
def layer_output_errors(gm, layers, masks: dict[str, torch.Tensor], batches) -> dict[str, float]:
    """Relative output error of each masked layer on the dense model's own activations.

    ``||layer(x; W*mask) - layer(x; W)|| / ||layer(x; W)||`` with ``x`` the
    layer's input in the dense model: the error the mask alone introduces.
    """
    from sparsecompile.graph import get_tensor

    nodes = {n.name: n for n in gm.graph.nodes}
    plan = {}
    for layer in layers:
        if layer.weight_target not in masks:
            continue
        node = nodes[layer.node_name]
        weight_nodes = [a for a in node.all_input_nodes if a.op == "get_attr" and a.target == layer.weight_target]
        if not weight_nodes:  # reached through a transpose view
            weight_nodes = [
                v.args[0] for v in node.all_input_nodes
                if v.op == "call_function" and v.args and getattr(v.args[0], "target", None) == layer.weight_target
            ]
        if not weight_nodes:
            continue
        weight = get_tensor(gm, layer.weight_target)
        plan[layer.node_name] = (weight_nodes[0], torch.where(masks[layer.weight_target], weight, torch.zeros((), dtype=weight.dtype)))
    interpreter = _LayerErrorInterpreter(gm, plan)
    for batch in batches:
        interpreter.run(*batch)
    by_node = {name: (s[0] / s[1]) ** 0.5 if s[1] > 0 else 0.0 for name, s in interpreter.sums.items()}
    return {layer.name: by_node[layer.node_name] for layer in layers if layer.node_name in by_node}
