"""Channel-permutation search for N:4 sparsity (Pool & Yu, NeurIPS 2021; NVIDIA Apex ASP).

Objective
    ``scores`` is a non-negative importance matrix ``[R, C]``: rows are output rows
    of one or more stacked layers, columns are the input channels they share. An
    N:M mask keeps, in every row, the ``n`` largest entries of every group of ``m``
    *consecutive* columns; ``kept_magnitude`` is the sum of what it keeps. A column
    permutation ``perm`` (new column ``i`` = old column ``perm[i]``, i.e.
    ``scores[:, perm]``) changes which channels share a group. We look for the
    ``perm`` that maximizes ``kept_magnitude(scores[:, perm])``. Quality is
    reported as efficacy = (kept_permuted - kept_plain) / (bound - kept_plain),
    with ``bound`` the row-wise unstructured optimum at the same density (Apex's
    "50% rows" reference).

Move set
    A *stripe* is a group of ``m = 4`` consecutive columns. A move takes two
    stripes and re-splits their 8 columns into the best of the 35 ways of making
    two groups of 4 (Apex's "stripe groups of 8 columns"). All 35 partitions of
    a pair are scored in one vectorized pass: the kept sum of each of the 70
    possible 4-subsets is assembled from cached per-stripe pair/triple statistics
    (for n = 2: top2({a, b, c, d}) = max(max(a, b) + max(c, d), a + b, c + d) and
    top2({a, b, c, x}) = max(top2({a, b, c}), max(a, b, c) + x)) and summed over
    rows. n = 3 is solved as n = 1 on the negated matrix (keeping the 3 largest of
    4 = dropping the smallest). Pairs are scored in batches, chunked over pairs and
    rows (a few tens of MB of temporaries); the statistics cache holds 25 (n = 2)
    or 15 (n = 1, 3) float32 values per stripe and row, ~6x or ~4x the matrix.

Local search
    Every pair of stripes carries a flag "evaluated since either stripe last
    changed"; only stale pairs are evaluated. Two kinds of round:

    * matching round (while many pairs are stale): the next perfect matching of a
      round-robin schedule over each segment's stripes (reshuffled every cycle) is
      evaluated at once and every improving pair is re-split; the pairs are
      disjoint, so the gains add exactly;
    * table round (once at most ``TABLE_ROUND_PAIRS`` x stripes pairs are stale, or
      stale pairs x rows <= ``TABLE_ROUND_WORK``, i.e. small problems from the
      start): every stale pair is evaluated and disjoint improving moves are
      applied, greedily by gain (mutually-best pairs first). Table rounds from the
      start are Apex's steepest-descent stripe-group search; on the Apex README
      matrix they reproduce its result exactly (2919.759).

    The local search ends at a certified local optimum: no pair of stripes has an
    improving re-split.

Escapes (iterated local search)
    From the local optimum: re-split one random pair of stripes with a random
    non-identity partition (that pair is not re-evaluated until one of its
    stripes changes, otherwise the next round simply undoes the kick), run the
    local search again (only the pairs the changes made stale), keep the result
    if it beats the best local optimum, otherwise put the changed stripes back.

Stopping rules (all but the last count work, so they do not depend on the machine)
    Escapes stop after ``patience`` attempts in a row found nothing better, after
    ``max_escapes`` attempts, or once the escapes evaluated ``ESCAPE_WORK``
    (stripe pair x row) scores -- this caps them at about 1-2 s on 2 CPU cores
    for tall matrices, where each one costs a full re-evaluation of two stripes.
    The whole search stops before a round once it evaluated ``max_work`` (stripe
    pair x row) scores in all (``stopped_by="effort"``: large layers, whose
    first local search alone would take minutes; the best permutation found so
    far is returned). Work is counted exactly, so where the search stops depends
    only on the inputs and the seed. Otherwise it ends by itself
    (``stopped_by="converged"``). A move must gain more than ``REL_EPS`` (1e-5)
    of the pair's kept sum (float32 sums), an escape must raise the float64
    total.

    Wall time is only a safety cap: when ``budget_s`` runs out first (a machine
    far slower or busier than usual), the search stops with
    ``stopped_by="time cap"`` and ``budget_exhausted=True``; the result then
    depends on machine speed, and callers must say so (the build warns and
    reports it).

Result guarantees
    The returned permutation maps every segment onto itself and leaves columns
    outside every segment in place; it is never worse than the identity
    (checked in float64 at the end: if it were, the identity is returned).

Determinism
    For fixed inputs and ``seed`` the search is deterministic (random choices
    come from a ``torch.Generator`` seeded with ``seed``; every stopping rule but
    the time cap counts work) *as long as the time cap is not hit*. Decisions do
    not depend on the torch thread count: every reduction that decides something
    either has many outputs (torch then splits the work between threads by
    output, so each sum is added up in the same order whatever the thread count)
    or is a float64 total added up exactly (``math.fsum`` of per-column sums,
    :func:`_total`) -- a single-output torch sum would be split across threads
    and round differently. (A different torch build or CPU instruction set may
    still round float32 sums differently, which can change near-tied choices.)
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import torch

__all__ = ["SearchResult", "kept_magnitude", "search_permutation", "unstructured_bound"]

_M = 4
# The 6 pairs of a stripe's 4 columns, and each triple as (pair, element): the
# triple that omits column o is pair _TRI_PAIR[o] plus column _TRI_ELEM[o].
_PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
_PA = torch.tensor([p[0] for p in _PAIRS])
_PB = torch.tensor([p[1] for p in _PAIRS])
_TRI_PAIR = torch.tensor([3, 1, 0, 0])
_TRI_ELEM = torch.tensor([3, 3, 3, 2])

# Search constants (tuned on the benchmark matrices, see benchmarks/permutation.py).
TABLE_ROUND_PAIRS = 4  # table rounds once stale pairs <= this x number of stripes ...
TABLE_ROUND_WORK = 1 << 16  # ... or stale pairs x rows <= this (small problems: fewer, larger rounds)
REL_EPS = 1e-5  # an improving move must gain more than this x the pair's kept sum
CHUNK_ELEMS = 1 << 20  # elements of one [pairs, 6, 6, rows] temporary
DEFAULT_PATIENCE = 25  # escapes in a row without a better local optimum
DEFAULT_MAX_ESCAPES = 50  # escapes in all
ESCAPE_WORK = 10_000_000  # no new escape once the escapes evaluated this many (stripe pair x row)s
# No new round once the search evaluated this many (stripe pair x row) scores. Groups up to ~256
# channels (and 64x128 .. 2304x256 matrices) converge well before it; on the largest ResNet-50 groups
# (512-2048 channels, 2000-4600 rows) it is about 4 s of one CPU core (10-15 M scores/s) and keeps more
# than the old 3 s wall-clock budget did even on an idle 2-core machine (benchmarks/README.md).
DEFAULT_MAX_WORK = 60_000_000
# Safety cap on wall time per search, reported when hit. 20-40x the default work's time on an idle
# 2-core machine: an oversubscribed one (two OpenMP threads, load 4) once took 73 s for it, and the cap
# must not decide the result there, or builds stop being reproducible exactly when machines are busy.
DEFAULT_TIME_CAP_S = 120.0

STOPPED_CONVERGED, STOPPED_EFFORT, STOPPED_TIME = "converged", "effort", "time cap"


def _slot(subset: tuple[int, ...]) -> int:
    """Index of a 4-subset of a stripe pair's 8 columns in the 70 subset sums.

    Columns 0-3 are the first stripe, 4-7 the second. Layout: 36 subsets with
    two columns from each stripe (6 x 6 pairs), 16 with three from the first
    (omitted column x column of the second), 16 with one from the first (its
    column x omitted column of the second), the first stripe, the second stripe.
    """
    left = tuple(p for p in subset if p < 4)
    right = tuple(p - 4 for p in subset if p >= 4)
    if len(left) == 2:
        return 6 * _PAIRS.index(left) + _PAIRS.index(right)
    if len(left) == 3:
        return 36 + 4 * (6 - sum(left)) + right[0]
    if len(left) == 1:
        return 52 + 4 * left[0] + (6 - sum(right))
    return 68 if len(left) == 4 else 69


# The 35 partitions of 8 columns into two groups of 4 (group A holds column 0);
# partition 0 is the identity {0, 1, 2, 3} | {4, 5, 6, 7}.
_PART_A = torch.tensor([(0, *rest) for rest in itertools.combinations(range(1, 8), 3)])
_PART_B = torch.tensor([[c for c in range(8) if c not in a] for a in _PART_A.tolist()])
_SLOT_A = torch.tensor([_slot(tuple(a)) for a in _PART_A.tolist()])
_SLOT_B = torch.tensor([_slot(tuple(b)) for b in _PART_B.tolist()])


# --------------------------------------------------------------------------- objective


def _check_nm(scores: torch.Tensor, n: int, m: int) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D [rows, columns] matrix, got shape {tuple(scores.shape)}")
    if not 0 < n <= m:
        raise ValueError(f"need 0 < n <= m, got n={n}, m={m}")
    if scores.shape[1] % m:
        raise ValueError(f"the number of columns ({scores.shape[1]}) must be a multiple of m={m}")


def _row_chunks(scores: torch.Tensor):
    """``scores`` in float64 row blocks of about a million entries."""
    step = max(1, (1 << 20) // max(scores.shape[1], 1))
    for r0 in range(0, scores.shape[0], step):
        yield scores[r0:r0 + step].detach().to(torch.float64)


def _total(values: torch.Tensor) -> list[float]:
    """Per-column float64 sums of a [rows, k] block, as a list for an exact ``math.fsum``.

    A many-output reduction is split between threads by output, so each column sum is added up
    in the same order whatever the thread count (a single-output ``.sum()`` would not be)."""
    return values.reshape(values.shape[0], -1).t().sum(dim=1, dtype=torch.float64).tolist() if values.numel() else []


def kept_magnitude(scores: torch.Tensor, n: int = 2, m: int = 4) -> float:
    """Sum, over rows and groups of ``m`` consecutive columns, of each group's ``n`` largest entries."""
    _check_nm(scores, n, m)
    return math.fsum(v for block in _row_chunks(scores)
                     for v in _total(block.reshape(block.shape[0], -1, m).topk(n, dim=-1).values))


def unstructured_bound(scores: torch.Tensor, n: int = 2, m: int = 4) -> float:
    """Row-wise optimum at density n/m without structure: per row, the sum of its ``C*n/m`` largest entries."""
    _check_nm(scores, n, m)
    keep = scores.shape[1] * n // m
    return math.fsum(v for block in _row_chunks(scores) for v in _total(block.topk(keep, dim=1).values))


@dataclass
class SearchResult:
    permutation: torch.Tensor  # int64 [C]: new column i = old column permutation[i]
    kept_plain: float  # kept_magnitude(scores)
    kept_permuted: float  # kept_magnitude(scores[:, permutation])
    bound: float  # unstructured_bound(scores)
    seconds: float
    rounds: int  # batched evaluation rounds (matching and table rounds, escapes included)
    budget_exhausted: bool  # stopped by the wall-time safety cap (budget_s): the result depends on machine speed
    work: int = 0  # (stripe pair x row) scores evaluated: the deterministic measure of effort
    stopped_by: str = STOPPED_CONVERGED  # "converged" | "effort" (max_work) | "time cap" (budget_s)

    @property
    def efficacy(self) -> float:
        """Share of the gap between the plain N:M mask and the unstructured bound closed by the permutation."""
        gap = self.bound - self.kept_plain
        if gap <= 1e-12 * max(abs(self.bound), 1.0):
            return 0.0
        return (self.kept_permuted - self.kept_plain) / gap


# --------------------------------------------------------------------------- pair scoring


def _stripe_stats(x: torch.Tensor, n: int) -> torch.Tensor:
    """Per-stripe statistics of ``x [B, 4, rows]`` as one [B, K, rows] tensor.

    n = 2 (K = 25): the 4 columns, the 6 pair maxima, the 6 pair sums, the 4 triple maxima,
    the 4 triple top-2 sums (triple o omits column o) and the stripe's own top-2 sum.
    n = 1 (K = 15): the 4 columns, the 6 pair maxima, the 4 triple maxima and the stripe maximum.
    """
    a, b = x[:, _PA], x[:, _PB]
    hi = torch.maximum(a, b)
    tri_hi = hi[:, _TRI_PAIR]
    tri_x = x[:, _TRI_ELEM]
    max3 = torch.maximum(tri_hi, tri_x)
    if n == 1:
        top = torch.maximum(hi[:, 0], hi[:, 5])[:, None]
        return torch.cat([x, hi, max3, top], dim=1)
    s = a + b
    top3 = torch.maximum(s[:, _TRI_PAIR], tri_hi + tri_x)  # top-2 of {a, b, c} = max(a + b, max(a, b) + c)
    top = torch.maximum(hi[:, 0] + hi[:, 5], torch.maximum(s[:, 0], s[:, 5]))[:, None]
    return torch.cat([x, hi, s, max3, top3, top], dim=1)


def _subset_sums(si: torch.Tensor, sj: torch.Tensor, n: int) -> torch.Tensor:
    """Row sums of the kept part (top-n) of all 70 4-subsets of each pair of stripes.

    ``si``, ``sj``: [P, K, rows] statistics (:func:`_stripe_stats`) of the two stripes of
    each pair. Returns [P, 70] float32, laid out as described in :func:`_slot`.
    """
    xi, xj, hi_i, hi_j = si[:, 0:4], sj[:, 0:4], si[:, 4:10], sj[:, 4:10]
    if n == 1:
        m3_i, m3_j = si[:, 10:14], sj[:, 10:14]
        t22 = torch.maximum(hi_i[:, :, None], hi_j[:, None])
        t31 = torch.maximum(m3_i[:, :, None], xj[:, None])
        t13 = torch.maximum(xi[:, :, None], m3_j[:, None])
    else:
        s_i, s_j = si[:, 10:16], sj[:, 10:16]
        m3_i, m3_j, t3_i, t3_j = si[:, 16:20], sj[:, 16:20], si[:, 20:24], sj[:, 20:24]
        # two columns from each stripe: top2 = max(hi_p + hi_q, s_p, s_q)
        t22 = hi_i[:, :, None] + hi_j[:, None]
        torch.maximum(t22, torch.maximum(s_i[:, :, None], s_j[:, None]), out=t22)
        # three from one stripe + column x of the other: top2 = max(top2(triple), max(triple) + x)
        t31 = m3_i[:, :, None] + xj[:, None]
        torch.maximum(t31, t3_i[:, :, None], out=t31)
        t13 = xi[:, :, None] + m3_j[:, None]
        torch.maximum(t13, t3_j[:, None], out=t13)
    p = si.shape[0]
    return torch.cat([t22.sum(-1).reshape(p, 36), t31.sum(-1).reshape(p, 16), t13.sum(-1).reshape(p, 16),
                      si[:, -1].sum(-1)[:, None], sj[:, -1].sum(-1)[:, None]], dim=1)


def _best_splits(stats: torch.Tensor, gi: torch.Tensor, gj: torch.Tensor,
                 n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best of the 35 re-splits for each stripe pair ``(gi[k], gj[k])``; ``stats [G, K, rows]``.

    Returns (gain [P] float64, partition index [P] int64, scale [P] float64) where gain is
    relative to the current split (partition 0) and scale is the pair's current kept sum.
    """
    num, rows = gi.numel(), stats.shape[2]
    rc = min(rows, max(1, CHUNK_ELEMS // 36))
    pc = max(1, CHUNK_ELEMS // (36 * rc))
    if num <= pc and rows <= rc:
        sums = _subset_sums(stats.index_select(0, gi), stats.index_select(0, gj), n).double()
    else:
        sums = torch.zeros(num, 70, dtype=torch.float64)
        for r0 in range(0, rows, rc):
            part = stats[:, :, r0:r0 + rc]
            for p0 in range(0, num, pc):
                sums[p0:p0 + pc] += _subset_sums(part.index_select(0, gi[p0:p0 + pc]),
                                                 part.index_select(0, gj[p0:p0 + pc]), n)
    values = sums[:, _SLOT_A] + sums[:, _SLOT_B]
    best, part = values.max(dim=1)
    return best - values[:, 0], part, sums[:, 68].abs() + sums[:, 69].abs()


def _mutual_best_matching(num: int, i: torch.Tensor, j: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """Indices into (i, j, gain) of disjoint pairs chosen greedily by gain.

    Repeatedly takes every pair whose two stripes are each other's best partner
    (a locally dominant edge; the heaviest edge always is one), then drops the
    stripes used. Same result class as the sequential greedy matching.
    """
    table = torch.full((num, num), -1.0, dtype=torch.float64)
    edge = torch.full((num, num), -1, dtype=torch.int64)
    k = torch.arange(i.numel())
    table[i, j] = gain
    table[j, i] = gain
    edge[i, j] = k
    edge[j, i] = k
    chosen = []
    while True:
        best, partner = table.max(dim=1)
        live = best > 0
        if not live.any():
            break
        me = torch.arange(num)
        mutual = live & (partner[partner] == me) & (me < partner)
        if not mutual.any():  # ties broken inconsistently: take the heaviest edge
            flat = int(table.argmax())
            mutual = torch.zeros(num, dtype=torch.bool)
            mutual[min(flat // num, flat % num)] = True
            partner[min(flat // num, flat % num)] = max(flat // num, flat % num)
        a = me[mutual]
        b = partner[mutual]
        chosen.append(edge[a, b])
        used = torch.cat([a, b])
        table[used] = -1.0
        table[:, used] = -1.0
    return torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.int64)


# --------------------------------------------------------------------------- search


class _Search:
    """State of one search: the permutation, per-stripe statistics and the pair freshness flags."""

    def __init__(self, scores: torch.Tensor, n: int, segments: list[tuple[int, int]],
                 gen: torch.Generator, deadline: float, max_work: int | None = None):
        cols = scores.shape[1]
        base = scores.detach().to(torch.float32).t().contiguous()  # [C, rows]
        if n == 3:  # keep the 3 largest of 4 == drop the smallest: maximize the max of the negation
            base, n = -base, 1
        self.base, self.n = base, n
        self.rows = base.shape[1]
        self.gen, self.deadline, self.max_work = gen, deadline, max_work
        self.perm = torch.arange(cols)
        self.perm4 = self.perm.view(-1, _M)  # a view: writes go to self.perm
        self.stats = torch.empty(cols // _M, 15 if n == 1 else 25, self.rows)  # [G, K, rows], current permutation
        self._fill(torch.arange(cols // _M), self.perm4)
        # active stripes: global index and segment of each; pairs are "local" indices into these
        glob = [torch.arange(a // _M, b // _M) for a, b in segments]
        self.glob = torch.cat(glob) if glob else torch.zeros(0, dtype=torch.int64)
        seg_of = torch.cat([torch.full((g.numel(),), k) for k, g in enumerate(glob)]) if glob else self.glob
        num = self.num = self.glob.numel()
        self.allowed = (seg_of[:, None] == seg_of[None, :]) & ~torch.eye(num, dtype=torch.bool)
        self.fresh = torch.zeros(num, num, dtype=torch.bool)  # evaluated since either stripe last changed
        members = [torch.nonzero(seg_of == k).flatten() for k in range(len(segments))]
        self.segments = [m for m in members if m.numel() >= 2]
        self.schedule: list[tuple[torch.Tensor, int] | None] = [None] * len(self.segments)
        self.rounds = 0
        self.work = 0  # pair x row evaluations so far
        self.stopped_by = STOPPED_CONVERGED

    # ---- state

    def objective(self) -> float:
        """Kept sum of the current permutation (of the negated matrix for n = 3), exact in float64."""
        return math.fsum(self.stats[self.glob, -1].sum(dim=1, dtype=torch.float64).tolist())

    def out_of_budget(self) -> bool:
        """Whether the work limit or (a safety cap) the deadline stops the search before another round."""
        if self.max_work is not None and self.work >= self.max_work:
            self.stopped_by = STOPPED_EFFORT
            return True
        if time.perf_counter() > self.deadline:
            self.stopped_by = STOPPED_TIME
            return True
        return False

    def _fill(self, glob: torch.Tensor, cols: torch.Tensor) -> None:
        """Statistics of stripes ``glob`` (global indices) holding columns ``cols [k, 4]``, in chunks."""
        step = max(1, CHUNK_ELEMS // (self.stats.shape[1] * max(self.rows, 1)))
        for k in range(0, glob.numel(), step):
            self.stats[glob[k:k + step]] = _stripe_stats(self.base[cols[k:k + step]], self.n)

    def _set(self, local: torch.Tensor, cols: torch.Tensor) -> None:
        """Give the active stripes ``local`` the columns ``cols [k, 4]``; their pairs become stale."""
        glob = self.glob[local]
        self.perm4[glob] = cols
        self._fill(glob, cols)
        self.fresh[local] = False
        self.fresh[:, local] = False

    def _apply(self, i: torch.Tensor, j: torch.Tensor, part: torch.Tensor) -> None:
        """Re-split the stripe pairs (local indices i, j; all disjoint) with the given partitions."""
        if i.numel() == 0:
            return
        cols8 = torch.cat([self.perm4[self.glob[i]], self.perm4[self.glob[j]]], dim=1)
        self._set(torch.cat([i, j]), torch.cat([cols8.gather(1, _PART_A[part]), cols8.gather(1, _PART_B[part])]))

    # ---- local search

    def _next_matching(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Next round of each segment's round-robin schedule (circle method, reshuffled every cycle)."""
        left, right = [], []
        for k, members in enumerate(self.segments):
            state = self.schedule[k]
            if state is None or state[1] >= state[0].numel() - 1:
                order = members[torch.randperm(members.numel(), generator=self.gen)]
                if order.numel() % 2:
                    order = torch.cat([order, torch.tensor([-1])])
                state = (order, 0)
            order, r = state
            self.schedule[k] = (order, r + 1)
            ring = torch.cat([order[:1], torch.roll(order[1:], r)])
            a, b = ring[:ring.numel() // 2], ring[ring.numel() // 2:].flip(0)
            keep = (a >= 0) & (b >= 0)
            left.append(a[keep])
            right.append(b[keep])
        a, b = torch.cat(left), torch.cat(right)
        return torch.minimum(a, b), torch.maximum(a, b)

    def _evaluate(self, i: torch.Tensor, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gain (0 where not improving) and best partition of each pair; marks the pairs fresh."""
        gain, part, scale = _best_splits(self.stats, self.glob[i], self.glob[j], self.n)
        self.work += i.numel() * self.rows
        self.fresh[i, j] = True
        self.fresh[j, i] = True
        improving = gain > REL_EPS * scale + 1e-30
        return gain.where(improving, torch.zeros(())), part

    def local_search(self) -> bool:
        """Improve until no pair of stripes has an improving re-split; False if stopped before (``stopped_by``)."""
        while True:
            stale = torch.triu(self.allowed & ~self.fresh, diagonal=1)
            n_stale = int(stale.sum())
            if n_stale == 0:
                return True
            if self.out_of_budget():
                return False
            self.rounds += 1
            if n_stale <= TABLE_ROUND_PAIRS * self.num or n_stale * self.rows <= TABLE_ROUND_WORK:
                i, j = stale.nonzero(as_tuple=True)
                gain, part = self._evaluate(i, j)
                pick = _mutual_best_matching(self.num, i, j, gain)
            else:
                i, j = self._next_matching()
                keep = ~self.fresh[i, j]
                i, j = i[keep], j[keep]
                if i.numel() == 0:
                    continue
                gain, part = self._evaluate(i, j)
                pick = torch.nonzero(gain > 0).flatten()
            self._apply(i[pick], j[pick], part[pick])

    # ---- escapes

    def escape(self) -> tuple[bool, bool]:
        """One escape attempt from a certified local optimum; returns (found better, finished).

        A random pair of stripes gets a random non-identity re-split (the pair is then not
        re-evaluated until one of its stripes changes, so the kick is not simply undone) and
        the local search runs. If the kept sum did not go up, the stripes that changed are put
        back (their old contents were certified against all the others).
        """
        best_cols = self.perm4[self.glob].clone()
        best_value = self.objective()
        # a pair from a segment chosen with probability proportional to its number of pairs
        weights = torch.tensor([float(m.numel() * (m.numel() - 1)) for m in self.segments])
        members = self.segments[int(torch.multinomial(weights, 1, generator=self.gen))]
        pick = members[torch.randperm(members.numel(), generator=self.gen)[:2]]
        i, j = pick.min().view(1), pick.max().view(1)
        self._apply(i, j, torch.randint(1, 35, (1,), generator=self.gen))
        self.fresh[i, j] = True
        self.fresh[j, i] = True
        finished = self.local_search()
        if self.objective() > best_value + 1e-12 * abs(best_value):
            self.fresh[i, j] = False  # the kicked pair was never evaluated; certify it
            self.fresh[j, i] = False
            return True, self.local_search() if finished else False
        changed = torch.nonzero((self.perm4[self.glob] != best_cols).any(dim=1)).flatten()
        self._set(changed, best_cols[changed])
        self.fresh[changed] = True
        self.fresh[:, changed] = True
        return False, finished


def _normalize_segments(segments, cols: int, m: int) -> list[tuple[int, int]]:
    if segments is None:
        return [(0, cols)]
    out = []
    for seg in segments:
        try:
            start, end = (int(v) for v in seg)
        except (TypeError, ValueError):
            raise ValueError(f"a segment must be a (start, end) pair of ints, got {seg!r}") from None
        if not 0 <= start <= end <= cols:
            raise ValueError(f"segment [{start}, {end}) is not inside the {cols} columns")
        if start % m or (end - start) % m:
            raise ValueError(f"segment [{start}, {end}) must start at a multiple of m={m} and span a multiple of m")
        if end > start:
            out.append((start, end))
    out.sort()
    for (s0, e0), (s1, e1) in itertools.pairwise(out):
        if s1 < e0:
            raise ValueError(f"segments [{s0}, {e0}) and [{s1}, {e1}) overlap")
    return out


def search_permutation(scores: torch.Tensor, *, n: int = 2, m: int = 4, budget_s: float = DEFAULT_TIME_CAP_S,
                       seed: int = 0, segments: list[tuple[int, int]] | None = None,
                       patience: int = DEFAULT_PATIENCE, max_escapes: int = DEFAULT_MAX_ESCAPES,
                       max_work: int | None = DEFAULT_MAX_WORK) -> SearchResult:
    """Search a column permutation of ``scores [R, C]`` that maximizes the kept N:M magnitude.

    ``segments``: half-open column ranges [start, end) that the permutation maps onto
    themselves (columns outside all segments stay in place); ``None`` = all columns.
    ``max_work``: the work limit, in (stripe pair x row) scores evaluated (``None``: none); no
    round starts once it is reached (``stopped_by="effort"``). Deterministic.
    ``budget_s``: wall-clock safety cap; when it runs out first the best permutation found so
    far is returned with ``budget_exhausted=True``, ``stopped_by="time cap"`` (the result then
    depends on machine speed).
    ``patience`` / ``max_escapes``: escapes (random re-split + local search) in a row without
    a better local optimum / in total, after the first local optimum.
    See the module docstring for the algorithm.
    """
    start_time = time.perf_counter()
    deadline = start_time + budget_s
    if m != _M:
        raise ValueError(f"channel permutation search supports M=4 only (N:4 sparsity), got m={m}")
    if n not in (1, 2, 3):
        raise ValueError(f"channel permutation search supports n in (1, 2, 3) for M=4, got n={n}")
    _check_nm(scores, n, m)
    scores = scores.detach().cpu()
    cols = scores.shape[1]
    segs = _normalize_segments(segments, cols, m)
    kept_plain = kept_magnitude(scores, n, m)
    bound = unstructured_bound(scores, n, m)

    gen = torch.Generator().manual_seed(seed)
    search = _Search(scores, n, segs, gen, deadline, max_work)
    if search.segments and search.rows:
        finished = search.local_search()
        fails = escapes = 0
        work_cap = search.work + ESCAPE_WORK
        while finished and fails < patience and escapes < max_escapes and search.work < work_cap:
            if search.out_of_budget():
                break
            escapes += 1
            better, finished = search.escape()
            fails = 0 if better else fails + 1
    perm = search.perm.clone()

    kept_permuted = kept_magnitude(scores[:, perm], n, m)
    if kept_permuted < kept_plain:  # float32 search noise; never return worse than identity
        perm, kept_permuted = torch.arange(cols), kept_plain
    return SearchResult(permutation=perm, kept_plain=kept_plain, kept_permuted=kept_permuted, bound=bound,
                        seconds=time.perf_counter() - start_time, rounds=search.rounds,
                        budget_exhausted=search.stopped_by == STOPPED_TIME, work=search.work,
                        stopped_by=search.stopped_by)
