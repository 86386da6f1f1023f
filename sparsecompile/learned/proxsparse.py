"""ProxSparse: learned 2:4 masks by proximal gradient descent with a 2:4 regulariser.

Problem
-------
ProxSparse relaxes "find a 2:4 mask M for the frozen weights W0" into a
regularised problem on continuous weights W:

    min_W  L(W) + lambda1 * Reg24(W) + lambda2 * RegW0(W)

* ``Reg24(w) = |w1 w2 w3| + |w2 w3 w4| + |w3 w4 w1| + |w4 w1 w2|`` per group of
  4 (the degree-3 elementary symmetric polynomial of ``|w|``): zero exactly
  when the group has at most 2 nonzeros, non-smooth, so it induces exact 2:4
  groups the way l1 induces zeros.
* ``RegW0(W) = || W * (W - W0) / (W0 + eps * sgn(W0)) ||_F^2`` (``sgn(0) = 1``):
  zero exactly when every nonzero of W equals its W0 value, so a weight may
  either go to zero or stay at its original value.

Algorithm 1 (proximal gradient): a gradient step on ``f = L + lambda2 RegW0``
(here an Adam step), then the proximal operator of ``h = eta * lambda1 * Reg24``
(eta = the step's learning rate) applied group by group. At the end the
weights are projected to 2:4 by magnitude (top 2 of ``|W|`` per group) and the
survivors are snapped back to their original values: the returned weights are
exactly ``W0 * mask``.

Proximal operator (EnumALM, Algorithms 2 and 3)
-----------------------------------------------
``prox(y) = argmin_w 1/2 ||w - y||^2 + lam * Reg24(w)`` for ``y in R^4``. With
``z = sort(|y|, descending)`` the optimum (in sorted coordinates, signs
restored at the end) is one of three candidates: the 2-sparse ``[z1, z2, 0, 0]``,
a 3-sparse ``[w1, w2, w3, 0]`` and a dense ``[w1..w4]`` minimiser of the
restricted objective. ALM finds the latter two by alternating minimisation:
cyclically, ``w_i <- max(z_i - lam * sum_{j<k; j,k != i} w_j w_k, 0)`` (the exact
minimiser in ``w_i`` with the others fixed is a soft threshold), from ``w = z``
until ``||w - w_prev|| <= tol``. EnumALM returns the candidate with the lowest
objective. :func:`enum_alm` runs all groups of a tensor ``[G, 4]`` at once
(one vectorised sweep per coordinate, until every group has converged or
``max_iter``). :func:`enum_pgd` is the projected-gradient baseline (EnumPGD)
kept for comparison.

Scale
-----
Reg24 is cubic, so lambda1 in raw weight units would depend on the model's
weight scale. By default (``scale="row"``) the learner trains normalised
weights ``U = W / s`` with ``s`` the RMS of each row of ``W0``'s GEMM view
(``scale="layer"``: the layer's RMS; ``"none"``: raw units, as in the paper);
the regularisers, the Adam steps and the proximal steps all act on U, so
lambda1, lambda2, eps and the learning rate are scale-free. The forward
pass uses ``W = s * U``.

Weights that are zero in W0
---------------------------
They stay exactly zero: after every Adam step U is projected onto the support
of W0 (the proximal operator of ``Reg24`` plus the indicator of that subspace is
the projection followed by the 2:4 prox, since the prox never moves a zero
coordinate), so the training model never holds a weight the shipped model
(``W0 * mask``) cannot. Without it a dead output channel (an all-zero row, as
pretrained networks have: 4 in the OCR recognizer's build graph, in p2o/Conv/12
and p2o/Conv/24, and 12,471 zero weights in all) came alive: its
row has no RMS to normalise by (its scale falls back to 1) and Adam moved it off
zero (to 1e-5 within three steps there), and under the in-loop ``bias``
correction a channel whose dense output is exactly zero (reference variance 0)
then gets the factor ``sqrt(0 / var)`` once its variance passes 1e-12, whose
gradient is ``inf * 0 = nan``: every weight upstream turned NaN in that step
and the loss in the next ("the proxsparse loss became nan at step 4"). A lower
learning rate only delays it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from sparsecompile.compress import from_gemm_view, gemm_view
from sparsecompile.errors import SparseCompileError
from sparsecompile.learned.train import MaskLearner, TrainConfig, TrainResult, train_masks

_OTHERS = ((1, 2, 3), (0, 2, 3), (0, 1, 3), (0, 1, 2))
SCALES = ("row", "layer", "none")


def reg_2to4(w: torch.Tensor) -> torch.Tensor:
    """``Reg24`` of every group: ``w`` is ``[..., 4]``; returns ``[...]``."""
    a = w.abs()
    a0, a1, a2, a3 = a.unbind(-1)
    return a0 * a1 * a2 + a1 * a2 * a3 + a2 * a3 * a0 + a3 * a0 * a1


def prox_objective(w: torch.Tensor, y: torch.Tensor, lam) -> torch.Tensor:
    """``1/2 ||w - y||^2 + lam * Reg24(w)`` per group (``[..., 4]`` -> ``[...]``)."""
    return 0.5 * (w - y).pow(2).sum(-1) + lam * reg_2to4(w)


def _as_lam(lam, groups: torch.Tensor) -> torch.Tensor:
    lam = torch.as_tensor(lam, dtype=groups.dtype, device=groups.device)
    if lam.dim() == 0:
        return lam
    if lam.shape != groups.shape[:-1]:
        raise SparseCompileError(f"lambda of shape {list(lam.shape)} does not match {list(groups.shape[:-1])} groups")
    return lam


def _balanced_start(z: torch.Tensor, lam: torch.Tensor, support: int) -> torch.Tensor:
    """The critical point of the restricted objective when all ``support`` coordinates equal their mean.

    With ``w_i = t`` for i < S the stationarity condition is ``t = zbar - lam * C(S-1, 2) * t^2``
    (``C = 1`` for S = 3, ``3`` for S = 4), whose non-negative root is the start.
    """
    zbar = z[:, :support].mean(-1)
    c = 1.0 if support == 3 else 3.0
    lam_c = (lam * c).expand_as(zbar)
    disc = (1.0 + 4.0 * lam_c * zbar).sqrt()
    t = torch.where(lam_c > 0, 2.0 * zbar / (1.0 + disc), zbar)  # = (disc - 1) / (2 lam c), stable form
    start = torch.zeros_like(z)
    start[:, :support] = t.unsqueeze(-1)
    return start


def alm(z: torch.Tensor, lam, support: int, tol: float = 1e-6, max_iter: int = 100,
        start: torch.Tensor | None = None) -> torch.Tensor:
    """Algorithm 2 on sorted non-negative groups ``z [G, 4]``: a critical point of the restricted objective.

    Coordinates ``support..3`` stay 0 (``support=3``: 3-sparse, ``4``: dense). Cyclic soft-thresholding
    from ``start`` (default ``w = z``, as in the paper) until a group moves by at most ``tol`` (Euclidean) in
    one sweep, or ``max_iter`` sweeps. Converged groups leave the working set, so a few slow groups
    cost little.
    """
    lam = _as_lam(lam, z)
    count = z.shape[0]
    w = (z if start is None else start).clone()
    w[:, support:] = 0
    if count == 0:
        return w
    lam_all = lam.expand(count) if lam.dim() == 0 else lam
    active = torch.arange(count, device=z.device)
    cols = [w[:, i].clone() for i in range(4)]
    zs = [z[:, i].contiguous() for i in range(support)]
    lams = lam_all.clone()
    tol_sq = tol * tol
    for sweep in range(1, max_iter + 1):
        previous = [cols[i].clone() for i in range(support)]
        for i in range(support):
            a, b, c = _OTHERS[i]
            pairs = cols[a] * (cols[b] + cols[c]) + cols[b] * cols[c]
            cols[i] = (zs[i] - lams * pairs).clamp_min(0)
        moved = sum((cols[i] - previous[i]).pow(2) for i in range(support))
        done = moved <= tol_sq
        finished = bool(done.all())
        if finished or sweep == max_iter or (sweep % 4 == 0 and bool(done.any())):
            rows = active if finished or sweep == max_iter else active[done]
            pick = slice(None) if finished or sweep == max_iter else done
            for i in range(support):
                w[rows, i] = cols[i][pick]
            if finished or sweep == max_iter:
                break
            keep = ~done
            active = active[keep]
            cols = [col[keep] for col in cols]
            zs = [col[keep] for col in zs]
            lams = lams[keep]
    return w


def alm_restarted(z: torch.Tensor, lam, support: int, tol: float = 1e-6, max_iter: int = 100) -> torch.Tensor:
    """:func:`alm` from ``z``; groups where it ended with a zero inside the support are re-run from the
    balanced start and keep the better of the two.

    Why: from ``w = z`` the first soft-threshold can overshoot to 0 when the other coordinates are large
    (``z = [1.097, 1.093, 1.082, 0]``, ``lam = 1``: it returns ``[0, 1.093, 1.082, 0]``, objective 0.601,
    while the 3-sparse critical point ``[0.675, 0.666, 0.632, 0]`` has 0.566). A point with a zero inside
    the support is a 2-sparse point, never better than the 2-sparse candidate, so nothing is lost.
    """
    lam_t = _as_lam(lam, z)
    w = alm(z, lam_t, support, tol, max_iter)
    failed = (w[:, :support] == 0).any(-1) & (z[:, support - 1] > 0)
    if bool(failed.any()):
        index = failed.nonzero().squeeze(-1)
        sub_z = z[index]
        sub_lam = lam_t if lam_t.dim() == 0 else lam_t[index]
        retry = alm(sub_z, sub_lam, support, tol, max_iter, start=_balanced_start(sub_z, sub_lam, support))
        better = prox_objective(retry, sub_z, sub_lam) < prox_objective(w[index], sub_z, sub_lam)
        w[index[better]] = retry[better]
    return w


def _enumerate(y: torch.Tensor, lam, solve) -> torch.Tensor:
    if y.dim() != 2 or y.shape[-1] != 4:
        raise SparseCompileError(f"the 2:4 proximal operator takes groups of shape [G, 4], got {list(y.shape)}")
    if not y.is_floating_point():
        raise SparseCompileError("the 2:4 proximal operator needs floating-point input")
    lam_t = _as_lam(lam, y)
    sign = torch.sign(y)
    z, order = torch.sort(y.abs(), dim=-1, descending=True, stable=True)
    two = z.clone()
    two[:, 2:] = 0
    three = solve(z, lam_t, 3)
    dense = solve(z, lam_t, 4)
    candidates = torch.stack([two, three, dense])  # [3, G, 4]
    objectives = prox_objective(candidates, z.unsqueeze(0), lam_t)  # [3, G]
    best = objectives.argmin(0)  # ties: the sparser candidate
    chosen = candidates.gather(0, best.view(1, -1, 1).expand(1, -1, 4)).squeeze(0)
    result = torch.empty_like(chosen).scatter_(-1, order, chosen)
    return sign * result


def enum_alm(y: torch.Tensor, lam, tol: float = 1e-6, max_iter: int = 100) -> torch.Tensor:
    """Algorithm 3 (EnumALM): ``argmin_w 1/2||w - y||^2 + lam Reg24(w)`` for every group of ``y [G, 4]``.

    ``lam`` is a scalar or one value per group (``[G]``). Vectorised over groups.
    """
    return _enumerate(y, lam, lambda z, lam_t, support: alm_restarted(z, lam_t, support, tol, max_iter))


def pgd(z: torch.Tensor, lam, support: int, tol: float = 1e-6, max_iter: int = 1000) -> torch.Tensor:
    """Projected gradient descent on the restricted objective over ``w >= 0`` (EnumPGD's inner solver)."""
    lam = _as_lam(lam, z)
    w = z.clone()
    w[:, support:] = 0
    # The Hessian of lam*Reg24 on [0, z1]^4 has entries <= lam*z1, so its norm is <= 1 + 3*lam*z1.
    step = 1.0 / (1.0 + 3.0 * lam * z[:, :1].squeeze(-1))
    keep = torch.zeros_like(w)
    keep[:, :support] = 1
    for _ in range(max_iter):
        a0, a1, a2, a3 = w.unbind(-1)
        grad = torch.stack([a1 * a2 + a1 * a3 + a2 * a3, a0 * a2 + a0 * a3 + a2 * a3,
                            a0 * a1 + a0 * a3 + a1 * a3, a0 * a1 + a0 * a2 + a1 * a2], -1)
        grad = (w - z + lam.unsqueeze(-1) * grad if lam.dim() else w - z + lam * grad) * keep
        new = (w - step.unsqueeze(-1) * grad).clamp_min(0)
        moved = float((new - w).pow(2).sum(-1).max()) if w.numel() else 0.0
        w = new
        if moved <= tol * tol:
            break
    return w


def enum_pgd(y: torch.Tensor, lam, tol: float = 1e-6, max_iter: int = 1000) -> torch.Tensor:
    """The projected-gradient baseline (EnumPGD): same enumeration, PGD for the two subproblems."""
    return _enumerate(y, lam, lambda z, lam_t, support: pgd(z, lam_t, support, tol, max_iter))


# ---------------------------------------------------------------------------- training


@dataclass
class ProxSparseOptions:
    lambda1: float = 5.0  # 2:4 regulariser strength (scale-free units, see the module docstring)
    lambda2: float = 0.0  # frozen-weight regulariser strength
    epsilon: float = 1e-2  # RegW0 denominator guard, in normalised units
    scale: str = "row"  # row | layer | none
    alm_tol: float = 1e-6
    alm_max_iter: int = 100

    def validate(self) -> None:
        if self.lambda1 < 0 or self.lambda2 < 0 or self.epsilon <= 0:
            raise SparseCompileError("lambda1 and lambda2 must be >= 0 and epsilon > 0")
        if self.scale not in SCALES:
            raise SparseCompileError(f"unknown scale '{self.scale}'; valid: {', '.join(SCALES)}")
        if self.alm_tol <= 0 or self.alm_max_iter < 1:
            raise SparseCompileError("alm_tol must be > 0 and alm_max_iter >= 1")


class ProxSparseLearner(MaskLearner):
    """Trains normalised weights ``U = W / s`` ([rows, K] GEMM view per layer) by Adam + the EnumALM prox."""

    method = "proxsparse"
    default_lr = 3e-3

    def __init__(self, gm: torch.nn.Module, layers: Sequence, n: int = 2, m: int = 4,
                 options: ProxSparseOptions | None = None):
        if (n, m) != (2, 4):
            raise SparseCompileError(f"ProxSparse's regulariser and proximal solver are for 2:4, not {n}:{m}")
        super().__init__(gm, layers, n, m)
        self.opts = options or ProxSparseOptions()
        self.opts.validate()
        self.scales: dict[str, torch.Tensor] = {}
        self.start: dict[str, torch.Tensor] = {}
        self.denominators: dict[str, torch.Tensor] = {}
        self.support: dict[str, torch.Tensor] = {}  # where W0 is nonzero; U is held at 0 elsewhere
        self.weights: dict[str, torch.Tensor] = {}
        for target in self.targets:
            matrix = gemm_view(self.originals[target], self.axes[target]).to(torch.float32)
            if self.opts.scale == "row":
                scale = matrix.pow(2).mean(1, keepdim=True).sqrt()
            elif self.opts.scale == "layer":
                scale = matrix.pow(2).mean().sqrt().reshape(1, 1).expand(matrix.shape[0], 1)
            else:
                scale = torch.ones(matrix.shape[0], 1, device=matrix.device)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale)).contiguous()
            start = matrix / scale
            sgn = torch.where(start >= 0, torch.ones_like(start), -torch.ones_like(start))
            self.scales[target] = scale
            self.start[target] = start
            self.denominators[target] = start + self.opts.epsilon * sgn
            self.support[target] = start != 0
            self.weights[target] = start.clone().requires_grad_(True)

    def trainable(self) -> dict[str, torch.Tensor]:
        return dict(self.weights)

    def _weight(self, target: str, u: torch.Tensor) -> torch.Tensor:
        original = self.originals[target]
        return from_gemm_view(u * self.scales[target], original.shape, self.axes[target]).to(original.dtype)

    def training_weights(self, step: int, total_steps: int, seed: int) -> dict[str, torch.Tensor]:
        return {t: self._weight(t, self.weights[t]) for t in self.targets}

    def penalty(self) -> torch.Tensor | None:
        if self.opts.lambda2 == 0:
            return None
        total = None
        for t in self.targets:
            u = self.weights[t]
            term = (u * (u - self.start[t]) / self.denominators[t]).pow(2).sum()
            total = term if total is None else total + term
        return self.opts.lambda2 * total

    def after_step(self, lr: float) -> None:
        for t in self.targets:
            self.weights[t].masked_fill_(~self.support[t], 0.0)  # see "Weights that are zero in W0"
        lam = lr * self.opts.lambda1
        if lam == 0:
            return
        for t in self.targets:
            u = self.weights[t]
            groups = u.detach().reshape(-1, 4)
            u.copy_(enum_alm(groups, lam, self.opts.alm_tol, self.opts.alm_max_iter).reshape(u.shape))

    @torch.no_grad()
    def masks(self) -> dict[str, torch.Tensor]:
        result = {}
        for t in self.targets:
            groups = self.weights[t].detach().abs().reshape(-1, 4)
            order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[:, :2]
            keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
            result[t] = from_gemm_view(keep.reshape(self.weights[t].shape), self.originals[t].shape, self.axes[t])
        return result

    @torch.no_grad()
    def progress_info(self) -> dict[str, float]:
        sparse_groups, groups_total, gap, norm = 0, 0, 0.0, 0.0
        masks = self.masks()
        for t in self.targets:
            u = self.weights[t].detach()
            groups = u.reshape(-1, 4)
            sparse_groups += int(((groups != 0).sum(-1) <= 2).sum())
            groups_total += groups.shape[0]
            keep = gemm_view(masks[t], self.axes[t])
            gap += float(((u - self.start[t]) * keep).pow(2).sum())
            norm += float((self.start[t] * keep).pow(2).sum())
        return {"fraction_2to4": sparse_groups / max(groups_total, 1),
                "relative_norm_gap": (gap / norm) ** 0.5 if norm > 0 else 0.0}

    def options(self) -> dict:
        return asdict(self.opts)


def learn_proxsparse_masks(gm: torch.nn.Module, inputs, *, layers: Sequence | None = None,
                           options: ProxSparseOptions | None = None, config: TrainConfig | None = None,
                           labels: torch.Tensor | None = None, callback=None, checkpoint_path=None,
                           resume=None, folded_batchnorm=None) -> TrainResult:
    """Learn 2:4 masks of ``gm``'s eligible layers with ProxSparse; ``result.weights`` is ``W0 * mask``.

    ``gm`` is not modified. See :func:`learn_gumbel_masks` for the shared arguments.
    """
    if layers is None:
        from sparsecompile.layers import find_layers

        layers = find_layers(gm, n=2, m=4)
    learner = ProxSparseLearner(gm, layers, 2, 4, options=options)
    return train_masks(learner, gm, inputs, labels=labels, config=config, callback=callback,
                       checkpoint_path=checkpoint_path, resume=resume, folded_batchnorm=folded_batchnorm)


__all__ = [
    "ProxSparseLearner", "ProxSparseOptions", "alm", "enum_alm", "enum_pgd", "learn_proxsparse_masks", "pgd",
    "prox_objective", "reg_2to4",
]
