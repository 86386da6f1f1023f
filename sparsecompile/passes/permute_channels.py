"""Permute channels so N:M masks keep more of the weights, at zero runtime cost.

For every channel group (:mod:`sparsecompile.permutation.groups`: the
tensors that must share one input-channel permutation, with their producers,
consumers and channel-wise parameters) the pass searches a permutation ``p``
of the group's channels (:mod:`sparsecompile.permutation.search`) and
applies it to every stored tensor involved:

* producers' output channels: ``W'[i] = W[p[i]]``, ``b'[i] = b[p[i]]``;
* consumers' input channels: ``W'[:, i] = W[:, p[i]]`` (a flattened read
  permutes blocks of features, a grouped conv permutes within its groups);
* channel-wise parameters on the way (BatchNorm statistics, LayerNorm and
  PReLU weights, per-channel constants, depthwise conv weights).

Every activation in the group is then the original one with its channels
reordered by ``p``, and every consumer undoes the reordering in its
reduction, so the function is unchanged (exactly, up to float summation
order). Only the grouping of input channels into N:M groups changes.

The objective is the importance kept by an N:M mask summed over the group's
scored consumers (eligible layers reading the channels directly), each
consumer's importance normalized to sum 1 so a large layer does not drown a
small one. Importance is ``|w|`` unless a callable is given. Groups that
cannot be permuted safely keep their channel order, with the reason recorded.

Each group's search stops on counted work (``max_work``, ``--permute-effort``),
so the same model and seed give the same channel orders on any machine;
``budget_s`` (``--permute-budget``) is only a wall-time safety cap. A group
that hits it is recorded with ``stopped_by: "time cap"`` and counted in the
report's ``time_cap_hit`` (the build warns: that order depends on machine speed).

Outputs (``PassResult.outputs``): a :class:`ChannelPermutation`, the per-group
and per-layer records, the channel orders applied (saved by ``--save-masks``)
and each producer's output-channel order (per-channel state kept outside the
graph, such as folded BatchNorm parameters, must follow it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, TypeVar

import torch
import torch.fx

from sparsecompile.compress import gemm_view
from sparsecompile.graph import get_tensor
from sparsecompile.layers import GemmLayer
from sparsecompile.passes.manager import PassContext, PassResult
from sparsecompile.errors import SparseCompileError
from sparsecompile.permutation.groups import ChannelGroup, apply_permutation, find_groups
from sparsecompile.permutation.search import (
    DEFAULT_MAX_WORK,
    DEFAULT_TIME_CAP_S,
    STOPPED_TIME,
    kept_magnitude,
    search_permutation,
    unstructured_bound,
)

Importance = Callable[[torch.Tensor, GemmLayer], torch.Tensor]
PerChannel = TypeVar("PerChannel")


def group_signature(group: ChannelGroup) -> str:
    """A group's identity across two loads of the same architecture: its readers, producers and size."""
    consumers = ",".join(sorted(c.layer.name for c in group.consumers))
    return f"consumers={consumers};producers={','.join(sorted(group.producers))};channels={group.size}"


def magnitude_importance(weight: torch.Tensor, layer: GemmLayer) -> torch.Tensor:
    return weight.detach().abs()


@dataclass
class ChannelPermutation:
    """What :class:`PermuteChannels` applied to a graph (its ``PassResult.outputs``)."""

    budget_s: float  # the wall-time safety cap per group
    max_work: int | None  # the deterministic work limit per group
    importance: str  # the importance's name
    group_stats: list[dict] = field(default_factory=list)  # one record per channel group, in search order
    layer_stats: dict[str, dict] = field(default_factory=dict)  # layer name -> kept fractions, efficacy, group id
    # weight target -> index applied along its output channels: per-channel state kept outside
    # the graph (e.g. folded BatchNorm parameters for statistics correction) must follow it (``reindexed``)
    output_orders: dict[str, torch.Tensor] = field(default_factory=dict)
    # group signature -> channel order applied: --save-masks saves them, --masks replays them
    permutations: dict[str, list[int]] = field(default_factory=dict)

    def report(self) -> dict:
        permuted = [g for g in self.group_stats if g["status"] == "permuted"]
        return {
            "enabled": True, "budget_s": self.budget_s, "max_work": self.max_work, "importance": self.importance,
            "groups": self.group_stats, "permuted_groups": len(permuted),
            "time_cap_hit": len(self.time_capped()),
            "search_seconds": round(sum(g.get("search_seconds", 0.0) for g in self.group_stats), 3),
        }

    def time_capped(self) -> list[dict]:
        """Records of the groups whose search the wall-time cap stopped (their order depends on machine speed)."""
        return [g for g in self.group_stats if g.get("stopped_by") == STOPPED_TIME]

    def reindexed(self, per_output_channel: dict[str, PerChannel]) -> dict[str, PerChannel]:
        """``per_output_channel`` (weight target -> state with ``reindexed(index)``, e.g. folded BatchNorm
        parameters) with each entry whose layer's output channels were reordered reordered the same way."""
        return {target: state.reindexed(self.output_orders[target]) if target in self.output_orders else state
                for target, state in per_output_channel.items()}

    def discarded(self, reason: str) -> ChannelPermutation:
        """The same search when its permuted graph is not used (the build falls back to the unpermuted one):
        every group and layer reported unpermuted for ``reason``, no order to follow or save."""
        groups = [dict(record, status="unpermuted", reason=reason) if record["status"] == "permuted" else record
                  for record in self.group_stats]
        layers = {name: {"group": stats["group"], "reason": reason} for name, stats in self.layer_stats.items()}
        return replace(self, group_stats=groups, layer_stats=layers, output_orders={}, permutations={})


class PermuteChannels:
    name = "permute_channels"

    def __init__(self, layers: list[GemmLayer], eligible: set[str], *, n: int = 2, m: int = 4,
                 budget_s: float = DEFAULT_TIME_CAP_S, max_work: int | None = DEFAULT_MAX_WORK, seed: int = 0,
                 importance: Importance | None = None,
                 importance_name: str = "magnitude", on_group: Callable[[str], None] | None = None,
                 iterate: Callable | None = None, given: dict[str, list[int]] | None = None):
        self.layers = layers
        self.eligible = eligible  # node names of layers that will be masked
        self.n, self.m = n, m
        self.budget_s = budget_s  # wall-time safety cap per group
        self.max_work = max_work  # the deterministic work limit per group
        self.seed = seed
        self.importance = importance or magnitude_importance
        self.importance_name = importance_name
        self.on_group = on_group
        self.iterate = iterate  # e.g. a progress bar over the groups: iterate(groups) -> iterable
        self.given = given  # group signature -> channel order: replay saved orders instead of searching (--masks)

    def __call__(self, gm: torch.fx.GraphModule, context: PassContext) -> PassResult:
        groups = find_groups(gm, self.layers, self.eligible)
        if self.given is not None:
            unknown = sorted(set(self.given) - {group_signature(g) for g in groups})
            if unknown:
                raise SparseCompileError(f"the saved masks were chosen with a channel order for a group this model "
                                         f"does not have ({unknown[0]}): is it the same architecture?")
        out = ChannelPermutation(self.budget_s, self.max_work, self.importance_name)
        modified = False
        for group in self.iterate(groups) if self.iterate else groups:
            started = time.perf_counter()
            record = self._permute_group(gm, group, out)
            record["seconds"] = round(time.perf_counter() - started, 3)
            modified |= record["status"] == "permuted"
            out.group_stats.append(record)
            if self.on_group:
                self.on_group(_describe(record))
        permuted = [g for g in out.group_stats if g["status"] == "permuted"]
        stats = {
            "groups": len(groups), "permuted_groups": len(permuted),
            "unpermuted": {str(g["id"]): g["reason"] for g in out.group_stats if g["status"] != "permuted"},
        }
        return PassResult(gm, modified, stats, outputs=out)

    def _permute_group(self, gm, group: ChannelGroup, out: ChannelPermutation) -> dict:
        record = {
            "id": group.id, "channels": group.size or None,  # None: exploration stopped before sizing
            "consumers": [c.layer.name for c in group.consumers],
            "producers": list(group.producers), "status": "unpermuted", "reason": group.reason,
        }
        if group.reason:
            for consumer in group.consumers:
                out.layer_stats.setdefault(consumer.layer.name, {"group": group.id, "reason": group.reason})
            return record
        scored = [c for c in group.consumers if c.scored]
        if not scored:
            record["reason"] = "no eligible layer reads these channels directly (only flattened or grouped reads)"
            for consumer in group.consumers:
                out.layer_stats.setdefault(consumer.layer.name, {"group": group.id, "reason": record["reason"]})
            return record
        matrices = {}
        for consumer in scored:
            layer = consumer.layer
            weight = get_tensor(gm, layer.weight_target)
            scores = gemm_view(self.importance(weight.detach(), layer).float(), layer.reduction_axis)
            # per-column sums added exactly: a single-output torch sum rounds differently with the thread count
            total = math.fsum(scores.sum(dim=0, dtype=torch.float64).tolist())
            matrices[layer.name] = (consumer, scores / total if total > 0 else scores)
        if self.given is not None:
            return self._replay_group(gm, group, record, matrices, out)
        segments, skipped = self._searchable_segments(group, scored)
        record["segments"] = len(segments)
        if skipped:
            record["unaligned_segments"] = skipped
        if not segments:
            record["reason"] = (f"no channel segment is a multiple of {self.m} aligned with every reader "
                                f"(segments {group.segments()})")
            self._record_layers(group, matrices, None, out)
            return record
        stacked = torch.zeros(sum(s.shape[0] for _, s in matrices.values()), group.size)
        row = 0
        for consumer, scores in matrices.values():
            stacked[row:row + scores.shape[0], consumer.offset:consumer.offset + consumer.size] = scores
            row += scores.shape[0]
        result = search_permutation(stacked, n=self.n, m=self.m, budget_s=self.budget_s, max_work=self.max_work,
                                    seed=self.seed + group.id, segments=segments)
        record.update(
            kept_plain=round(result.kept_plain / len(matrices), 6),
            kept_permuted=round(result.kept_permuted / len(matrices), 6),
            bound=round(result.bound / len(matrices), 6),
            efficacy=round(result.efficacy, 4), search_seconds=round(result.seconds, 3),
            rounds=result.rounds, work=result.work, stopped_by=result.stopped_by,
            budget_exhausted=result.budget_exhausted,
        )
        perm = result.permutation
        if torch.equal(perm, torch.arange(group.size)):
            record["reason"] = "the search found no better channel order"
            self._record_layers(group, matrices, None, out)
            return record
        self._apply(gm, group, perm, out)
        record["status"] = "permuted"
        record["reason"] = None
        if result.budget_exhausted:
            record["note"] = (f"search stopped by the --permute-budget {self.budget_s:g}s time cap before its work "
                              "limit: best order found so far used, which depends on machine speed (not reproducible)")
        self._record_layers(group, matrices, perm, out)
        return record

    def _apply(self, gm, group: ChannelGroup, perm: torch.Tensor, out: ChannelPermutation) -> None:
        apply_permutation(gm, group, perm)
        out.permutations[group_signature(group)] = perm.tolist()
        for edit in group.edits:
            if edit.role in ("producer", "passthrough") and edit.kind == "axis" and edit.block == 1:
                local = perm[edit.offset:edit.offset + edit.size] - edit.offset
                previous = out.output_orders.get(edit.target)
                out.output_orders[edit.target] = local if previous is None else previous[local]

    def _replay_group(self, gm, group: ChannelGroup, record: dict, matrices: dict, out: ChannelPermutation) -> dict:
        """Apply the saved order of this group (or none, if it was not permuted when the masks were saved)."""
        order = self.given.get(group_signature(group))
        if order is None:
            record["reason"] = "not permuted when the saved masks were chosen"
            self._record_layers(group, matrices, None, out)
            return record
        perm = torch.tensor(order, dtype=torch.long)
        if perm.numel() != group.size or not torch.equal(perm.sort().values, torch.arange(group.size)):
            raise SparseCompileError(f"the saved channel order of group {group_signature(group)} does not fit "
                                     f"this model ({perm.numel()} entries for {group.size} channels)")
        self._apply(gm, group, perm, out)
        self._record_layers(group, matrices, perm, out)
        stats = [out.layer_stats[name] for name in matrices]
        plain = sum(s["kept_plain"] for s in stats) / len(stats)
        kept = sum(s["kept_permuted"] for s in stats) / len(stats)
        bound = sum(s["bound"] for s in stats) / len(stats)
        record.update(status="permuted", reason=None, note="channel order replayed from the saved masks",
                      kept_plain=round(plain, 6), kept_permuted=round(kept, 6), bound=round(bound, 6),
                      efficacy=round((kept - plain) / (bound - plain), 4) if bound - plain > 1e-12 else 0.0,
                      search_seconds=0.0, rounds=0, work=0, stopped_by="replayed", budget_exhausted=False)
        return record

    def _searchable_segments(self, group: ChannelGroup, scored) -> tuple[list[tuple[int, int]], list]:
        """Segments whose length is a multiple of M and whose start is group-aligned for every reader."""
        usable, skipped = [], []
        for start, end in group.segments():
            readers = [c for c in scored if c.offset <= start and end <= c.offset + c.size]
            aligned = (end - start) % self.m == 0 and all((start - c.offset) % self.m == 0 for c in readers)
            if not readers or end - start <= self.m:
                continue  # nothing to gain
            (usable if aligned else skipped).append((start, end))
        return usable, skipped

    def _record_layers(self, group: ChannelGroup, matrices: dict, perm: torch.Tensor | None,
                       out: ChannelPermutation) -> None:
        for name, (consumer, scores) in matrices.items():
            plain = kept_magnitude(scores, self.n, self.m)
            bound = unstructured_bound(scores, self.n, self.m)
            stats = {"group": group.id, "kept_plain": round(plain, 6), "bound": round(bound, 6)}
            if perm is not None:
                local = perm[consumer.offset:consumer.offset + consumer.size] - consumer.offset
                kept = kept_magnitude(scores[:, local], self.n, self.m)
                stats["kept_permuted"] = round(kept, 6)
                stats["efficacy"] = round((kept - plain) / (bound - plain), 4) if bound - plain > 1e-12 else 0.0
            out.layer_stats[name] = stats
        for consumer in group.consumers:
            if consumer.layer.name not in out.layer_stats:
                why = ("reads them flattened; permuted along, not scored" if consumer.block > 1
                       else "permuted along, not scored")
                out.layer_stats[consumer.layer.name] = {"group": group.id, "note": why}


def _describe(record: dict) -> str:
    channels = f"{record['channels']} channels, " if record["channels"] else ""
    head = f"permutation group {record['id']} ({channels}{len(record['consumers'])} readers)"
    if record["status"] == "permuted":
        return (f"{head}: kept {record['kept_plain']:.4f} -> {record['kept_permuted']:.4f} "
                f"(efficacy {record['efficacy']:.2f}, {record['search_seconds']:.2f}s)")
    return f"{head}: unpermuted - {record['reason']}"
