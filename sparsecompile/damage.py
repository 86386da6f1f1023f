"""Damage: how far a sparse model's outputs are from the dense model's, per output, in units a user can read.

Every output gets a *kind* from its shape and values (``--output-kind`` overrides it):

``classes``
    ``[N, C]`` with ``C > 1`` (class scores, logits or probabilities). Damage is the top-1
    agreement lost, in points: ``100 * (1 - mean(argmax dense == argmax sparse))``.
``sequence``
    ``[N, T, C]`` whose last axis is a distribution per position (softmax: every row in
    ``[0, 1]`` summing to 1; or log-softmax: every row's logsumexp is 0), as CTC-style
    recognizers emit. Damage is the per-position argmax agreement lost, in points. The
    report adds the share of samples whose greedy CTC decoding (repeats merged, blank 0
    dropped) is unchanged, and the decoded error: edits per character of the dense
    transcription (a character error rate against dense). Per-position agreement is the
    stricter of the two (a moved blank costs a position but no character) and also fits
    per-frame taggers, so it is what the budget holds.
``scores``
    Independent per-entry scores in ``[0, 1]`` that a threshold turns into decisions: a
    detector's per-anchor class scores ``[N, A, C]`` after a sigmoid, a text detector's
    probability map ``[N, 1, H, W]``. Inferred for those two shapes when every value lies in
    ``[0, 1]`` (and ``[N, A, C]`` rows are not distributions); ``--output-kind I=scores`` (or
    ``I=scores@0.3`` for another threshold) names any other. Damage is the agreement lost on
    *which entries pass the threshold* (0.5 unless given), in points:
    ``100 * (1 - F1)`` between the dense and the sparse above-threshold sets. It follows what
    a detector's post-processing keeps, where a relative error over every anchor (mostly
    background) does not.
``values``
    Anything else: regressions, box offsets, feature maps, embeddings. Damage is the relative
    L2 error ``100 * ||dense - sparse|| / ||dense||`` in percent; the cosine similarity is
    reported beside it. A detector's box regressions are ``values``: the build cannot tell
    which anchors matter by shape.

Budgets: ``classes``, ``sequence`` and ``scores`` outputs are held to ``max_drop`` points,
``values`` outputs to ``max_error`` percent. An output whose sparse values are NaN or
infinite where the dense ones are finite has infinite damage. The model's *score* is the
largest ``damage / budget`` over its outputs: at most 1 is within budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sparsecompile.errors import SparseCompileError

OUTPUT_KINDS = ("classes", "sequence", "scores", "values")
DEFAULT_MAX_DROP = 1.0  # points of top-1 / per-position / above-threshold agreement
DEFAULT_MAX_ERROR = 10.0  # percent relative L2 error, for outputs that are not class scores
DEFAULT_SCORE_THRESHOLD = 0.5  # what a "scores" output's entries must reach to count as a decision
# How each kind's damage reads in the build's lines (report.py uses the same words).
DAMAGE_WHAT = {"classes": "top-1 agreement lost", "sequence": "per-position agreement lost",
               "scores": "above-threshold agreement lost", "values": "relative error"}


def _is_distribution(ref: torch.Tensor) -> bool:
    rows = ref.detach().reshape(-1, ref.shape[-1]).double()
    if not bool(torch.isfinite(rows).all()):
        return False
    if float(rows.min()) >= -1e-6 and float(rows.max()) <= 1 + 1e-6:
        return bool(torch.allclose(rows.sum(-1), torch.ones(rows.shape[0], dtype=rows.dtype), atol=1e-3))
    return bool(torch.allclose(torch.logsumexp(rows, -1), torch.zeros(rows.shape[0], dtype=rows.dtype), atol=1e-3))


def infer_kind(ref: torch.Tensor) -> str:
    """The kind of an output from the dense model's values (see the module docstring)."""
    if not ref.is_floating_point():
        return "values"
    if ref.dim() == 2 and ref.shape[1] > 1:
        return "classes"
    if ref.dim() == 3 and ref.shape[2] > 1 and ref.numel():
        if _is_distribution(ref):
            return "sequence"
        if _is_unit_interval(ref) and float(ref.max()) > float(ref.min()):  # a constant says nothing
            return "scores"
    if ref.dim() == 4 and ref.shape[1] == 1 and ref.numel() and _is_unit_interval(ref) \
            and float(ref.max()) > float(ref.min()):
        return "scores"  # a one-channel probability map (text detection, binary segmentation)
    return "values"


def _is_unit_interval(ref: torch.Tensor) -> bool:
    return bool(torch.isfinite(ref).all()) and float(ref.min()) >= 0.0 and float(ref.max()) <= 1.0


def split_kind(kind: str) -> tuple[str, float | None]:
    """``"scores@0.3"`` -> ``("scores", 0.3)``; other kinds carry no threshold."""
    base, _, threshold = kind.partition("@")
    return base, (float(threshold) if threshold else (DEFAULT_SCORE_THRESHOLD if base == "scores" else None))


def parse_output_kinds(text: str | None) -> dict[int, str]:
    """``"0=classes,1=values"`` -> ``{0: "classes", 1: "values"}``."""
    kinds: dict[int, str] = {}
    for item in (text or "").replace(" ", "").split(","):
        if not item:
            continue
        index, sep, kind = item.partition("=")
        base, _, threshold = kind.partition("@")
        if not sep or not index.isdigit() or base not in OUTPUT_KINDS:
            raise SparseCompileError(
                f"--output-kind '{item}' must look like INDEX=KIND with KIND one of {', '.join(OUTPUT_KINDS)} "
                "(e.g. --output-kind 0=classes,1=values or 1=scores@0.3)")
        if threshold or "@" in kind:
            try:
                value = float(threshold)
            except ValueError:
                value = math.nan
            if base != "scores" or not 0.0 < value < 1.0:
                raise SparseCompileError(f"--output-kind '{item}': only scores take a threshold, a number "
                                         "strictly between 0 and 1 (e.g. 1=scores@0.3)")
        kinds[int(index)] = kind
    return kinds


def ctc_greedy(ids: torch.Tensor, blank: int = 0) -> list[tuple[int, ...]]:
    """Greedy CTC decoding of ``[N, T]`` argmax ids: merge repeats, drop ``blank``."""
    decoded = []
    for row in ids.tolist():
        out, previous = [], None
        for token in row:
            if token != previous and token != blank:
                out.append(token)
            previous = token
        decoded.append(tuple(out))
    return decoded


def edit_distance(a: tuple, b: tuple) -> int:
    """Levenshtein distance between two token sequences."""
    previous = list(range(len(b) + 1))
    for i, token in enumerate(a, start=1):
        current = [i]
        for j, other in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (token != other)))
        previous = current
    return previous[-1]


@dataclass
class OutputDamage:
    output: int
    kind: str
    damage: float  # points (classes, sequence) or percent relative error (values)
    budget: float
    detail: dict = field(default_factory=dict)

    @property
    def unit(self) -> str:
        return "%" if self.kind == "values" else " pt"

    @property
    def ratio(self) -> float:
        if math.isinf(self.damage) or math.isnan(self.damage):
            return math.inf
        return self.damage / self.budget if self.budget > 0 else (math.inf if self.damage > 0 else 0.0)

    def describe(self) -> str:
        what = DAMAGE_WHAT[self.kind]
        value = "non-finite outputs" if math.isinf(self.damage) else f"{self.damage:.3g}{self.unit}"
        budget = f"budget {self.budget:.3g}{self.unit}"
        if "budget_asked" in self.detail:
            budget += f": one changed prediction, {self.detail['budget_asked']:g}{self.unit} asked"
        decoded = (f"; decoded, {100 * self.detail['decoded_error']:.3g}% of characters differ from dense"
                   if "decoded_error" in self.detail else "")
        return f"output {self.output} ({self.kind}): {what} {value} ({budget}{decoded})"

    def to_json(self) -> dict:
        damage = self.damage if math.isfinite(self.damage) else None
        return {"output": self.output, "kind": self.kind, "damage": None if damage is None else round(damage, 4),
                "unit": self.unit.strip(), "budget": self.budget, "within": self.ratio <= 1.0,
                **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.detail.items()}}


def output_damage(index: int, ref: torch.Tensor, cand: torch.Tensor, kind: str, max_drop: float,
                  max_error: float) -> OutputDamage:
    kind, threshold = split_kind(kind)
    budget = max_error if kind == "values" else max_drop
    ref_finite = torch.isfinite(ref) if ref.is_floating_point() else torch.ones_like(ref, dtype=torch.bool)
    cand_finite = torch.isfinite(cand) if cand.is_floating_point() else torch.ones_like(cand, dtype=torch.bool)
    if bool((ref_finite & ~cand_finite).any()):
        bad = int((ref_finite & ~cand_finite).sum())
        return OutputDamage(index, kind, math.inf, budget, {"non_finite_values": bad})
    ref64, cand64 = ref.double(), cand.double()
    both = ref_finite & cand_finite
    diff = torch.where(both, ref64 - cand64, torch.zeros((), dtype=torch.float64))
    norm = float(torch.linalg.vector_norm(torch.where(both, ref64, torch.zeros((), dtype=torch.float64))))
    relative = float(torch.linalg.vector_norm(diff)) / max(norm, 1e-30)
    detail: dict = {"relative_error": relative}
    if kind == "classes":
        # Axis 1 holds the classes: [N, C] scores, or [N, C, H, W] per-pixel scores (with --output-kind).
        agree = float((ref.argmax(1) == cand.argmax(1)).double().mean()) if ref.numel() else 1.0
        detail["top1_agreement"] = agree
        compared = ref.numel() // ref.shape[1] if ref.dim() > 1 and ref.shape[1] else 0
        damage = 100.0 * (1.0 - agree)
    elif kind == "sequence":
        ref_ids, cand_ids = ref.argmax(-1), cand.argmax(-1)
        agree = float((ref_ids == cand_ids).double().mean()) if ref.numel() else 1.0
        detail["position_agreement"] = agree
        compared = ref_ids.numel()
        pairs = list(zip(ctc_greedy(ref_ids.reshape(-1, ref_ids.shape[-1])),
                         ctc_greedy(cand_ids.reshape(-1, cand_ids.shape[-1]))))
        detail["sequence_agreement"] = sum(a == b for a, b in pairs) / max(len(pairs), 1)
        # The recognizer user's number: edits per character of the dense transcription (a CER against dense).
        detail["decoded_error"] = (sum(edit_distance(a, b) for a, b in pairs)
                                   / max(sum(len(a) for a, _ in pairs), 1))
        damage = 100.0 * (1.0 - agree)
    elif kind == "scores":
        ref_on, cand_on = ref >= threshold, cand >= threshold
        both_on, ref_count, cand_count = int((ref_on & cand_on).sum()), int(ref_on.sum()), int(cand_on.sum())
        f1 = 2.0 * both_on / (ref_count + cand_count) if ref_count + cand_count else 1.0
        detail.update({"threshold": threshold, "above_threshold_f1": f1, "dense_above": ref_count,
                       "sparse_above": cand_count})
        # One entry more or less above the threshold is the finest step (none above: nothing to resolve).
        compared = max(ref_count, 1)
        damage = 100.0 * (1.0 - f1)
    else:
        flat_ref = torch.where(both, ref64, torch.zeros((), dtype=torch.float64)).reshape(-1)
        flat_cand = torch.where(both, cand64, torch.zeros((), dtype=torch.float64)).reshape(-1)
        denominator = float(torch.linalg.vector_norm(flat_ref) * torch.linalg.vector_norm(flat_cand))
        detail["cosine"] = float(flat_ref @ flat_cand) / denominator if denominator > 0 else 1.0
        damage = 100.0 * relative
    if kind != "values" and compared:
        # One changed prediction is the finest step the samples can show: a budget below it would call a
        # single flip "over budget" however good the masks are, so the budget is at least that step.
        resolution = 100.0 / compared
        detail["resolution"] = resolution
        if resolution > budget:
            detail["budget_asked"] = budget
            budget = resolution
    return OutputDamage(index, kind, damage, budget, detail)


@dataclass
class Damage:
    outputs: list[OutputDamage]
    samples: int

    @property
    def score(self) -> float:
        """Largest damage / budget over the outputs; at most 1 is within budget."""
        return max((o.ratio for o in self.outputs), default=0.0)

    @property
    def within(self) -> bool:
        return self.score <= 1.0

    @property
    def worst(self) -> OutputDamage | None:
        return max(self.outputs, key=lambda o: o.ratio, default=None)

    @property
    def order_key(self) -> tuple[float, float]:
        """(score, summed relative error of the outputs): how damages are ranked. Agreement scores are
        coarse (a few dozen samples often show no changed prediction), so the relative error breaks ties."""
        return self.score, sum(o.detail.get("relative_error", 0.0) for o in self.outputs)

    def to_json(self) -> dict:
        score = self.score
        return {"samples": self.samples, "score": round(score, 4) if math.isfinite(score) else None,
                "within_budget": self.within, "outputs": [o.to_json() for o in self.outputs]}


def worst_output(outputs: list[dict]) -> dict | None:
    """The output record (``Damage.to_json()["outputs"]``) furthest over its budget; non-finite damage is worst."""
    return max(outputs, key=lambda o: (o["damage"] if o["damage"] is not None else math.inf)
               / max(o["budget"], 1e-12), default=None)


def measure_damage(dense: list[torch.Tensor], sparse: list[torch.Tensor], kinds: list[str],
                   max_drop: float = DEFAULT_MAX_DROP, max_error: float = DEFAULT_MAX_ERROR) -> Damage:
    """Per-output damage of ``sparse`` against ``dense`` (both: one tensor per output, samples on axis 0)."""
    if len(dense) != len(sparse):
        raise SparseCompileError(f"models disagree on the number of outputs: {len(dense)} vs {len(sparse)}")
    outputs = [output_damage(i, ref, cand, kinds[i], max_drop, max_error)
               for i, (ref, cand) in enumerate(zip(dense, sparse))]
    samples = int(dense[0].shape[0]) if dense and dense[0].dim() else 0
    return Damage(outputs, samples)


def output_kinds(dense: list[torch.Tensor], overrides: dict[int, str] | None = None) -> list[str]:
    """Each output's kind: ``overrides`` (from ``--output-kind``) where given, else inferred."""
    overrides = overrides or {}
    unknown = sorted(i for i in overrides if i >= len(dense))
    if unknown:
        raise SparseCompileError(f"--output-kind names output {unknown[0]}, but the model has {len(dense)} output(s)")
    for index, kind in overrides.items():
        ref = dense[index]
        if kind == "classes" and ref.dim() < 2:
            raise SparseCompileError(f"--output-kind {index}=classes: output {index} has shape "
                                     f"{list(ref.shape)}, not [N, C]")
        if kind.startswith("scores") and ref.numel() and not _is_unit_interval(ref):
            raise SparseCompileError(f"--output-kind {index}=scores: output {index} has values outside [0, 1] "
                                     "(logits?); scores must be probabilities that a threshold turns into decisions")
        if kind == "sequence" and ref.dim() < 3:
            raise SparseCompileError(f"--output-kind {index}=sequence: output {index} has shape "
                                     f"{list(ref.shape)}, not [N, T, C]")
    return [overrides.get(i, infer_kind(ref)) for i, ref in enumerate(dense)]


HOLDOUT_FRACTION = 0.25
MIN_HOLDOUT = 8  # fewer held-back samples than this and the guard reuses the fitting samples (and says so)


def holdout_split(num_samples: int, seed: int = 0, multiple: int = 1,
                  fraction: float = HOLDOUT_FRACTION) -> tuple[list[int], list[int]] | None:
    """``(fit, held_back)`` sample indices, or None when there are too few samples to hold any back.

    A seeded shuffle picks the held-back quarter, so data sorted by class still gives a
    held-back set of every class; both lists keep the file's order. ``multiple`` is a static
    batch size: both parts are whole batches.
    """
    count = int(round(num_samples * fraction))
    count -= count % multiple
    fit = num_samples - count
    fit -= fit % multiple
    if count < max(MIN_HOLDOUT, multiple) or fit < max(MIN_HOLDOUT, multiple):
        return None
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed)).tolist()
    held = sorted(order[:count])
    return sorted(order[count:count + fit]), held
