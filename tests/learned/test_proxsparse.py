"""ProxSparse: the EnumALM proximal operator of the 2:4 regulariser, and the proximal training."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from conftest import make_small_net
from helpers import export_graph
from sparsecompile.errors import SparseCompileError
from sparsecompile.graph import get_tensor
from sparsecompile.layers import find_layers
from sparsecompile.learned import (
    ProxSparseLearner, ProxSparseOptions, TrainConfig, TrainingInterrupted, enum_alm, enum_pgd,
    learn_proxsparse_masks, mask_to_patterns, train_masks,
)
from sparsecompile.learned.proxsparse import alm, prox_objective, reg_2to4
from sparsecompile.verify import count_nm_violations


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _grad_restricted(w: torch.Tensor) -> torch.Tensor:
    """d Reg24 / d w on w >= 0: for coordinate i, the sum of the pairwise products of the other three."""
    a0, a1, a2, a3 = w.unbind(-1)
    return torch.stack([a1 * a2 + a1 * a3 + a2 * a3, a0 * a2 + a0 * a3 + a2 * a3,
                        a0 * a1 + a0 * a3 + a1 * a3, a0 * a1 + a0 * a2 + a1 * a2], -1)


def reference_objective(y: torch.Tensor, lam: torch.Tensor, points: int = 9, starts: int = 4,
                        refine_steps: int = 400) -> torch.Tensor:
    """Brute force: the best objective over a grid on [0, z]^4 (z = sorted |y|; the optimum lies in that box
    and, up to signs, in the non-negative orthant), then projected-gradient refinement of the best grid points."""
    z = y.abs().sort(-1, descending=True).values
    lam = lam.expand(z.shape[0])
    t = torch.linspace(0, 1, points, dtype=z.dtype)
    grid = torch.cartesian_prod(t, t, t, t)
    best = torch.empty(z.shape[0], dtype=z.dtype)
    for start in range(0, z.shape[0], 64):
        zc, lc = z[start:start + 64], lam[start:start + 64]
        candidates = grid[None] * zc[:, None, :]
        objective = prox_objective(candidates, zc[:, None, :], lc[:, None])
        picks = objective.topk(starts, largest=False).indices
        w = candidates.gather(1, picks[..., None].expand(-1, -1, 4))
        zz, ll = zc[:, None, :].expand_as(w), lc[:, None].expand(w.shape[:2])
        step = 0.5 / (1 + 3 * ll * zz[..., 0])
        for _ in range(refine_steps):
            w = (w - step[..., None] * (w - zz + ll[..., None] * _grad_restricted(w))).clamp_min(0)
        refined = prox_objective(w, zz, ll).min(1).values
        best[start:start + 64] = torch.minimum(refined, objective.min(1).values)
    return best


def _random_groups(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    y = torch.randn(count, 4, generator=generator, dtype=torch.float64)
    return y * torch.rand(count, 1, generator=generator, dtype=torch.float64) * 3


def test_enum_alm_is_at_least_as_good_as_a_brute_force_search():
    y = _random_groups(48)
    y[0] = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)  # ties
    y[1] = torch.tensor([0.5, -0.5, 0.0, 0.0], dtype=torch.float64)  # already 2:4
    lams = torch.logspace(-2, 1, 12, dtype=torch.float64)
    ys = y.repeat(len(lams), 1)
    lam = lams.repeat_interleave(len(y))
    w = enum_alm(ys, lam)
    ours = prox_objective(w, ys, lam)
    reference = reference_objective(ys, lam)
    assert bool((ours <= reference + 1e-6 * (1 + reference.abs())).all()), float((ours - reference).max())
    assert bool((ours <= prox_objective(ys, ys, lam) + 1e-12).all())  # never worse than not moving


def test_the_restart_finds_the_3_sparse_point_that_plain_alm_overshoots():
    y = torch.tensor([[1.0967, 1.0933, 1.0823, 0.0018]], dtype=torch.float64)
    z = y.abs().sort(-1, descending=True).values
    plain = alm(z, 1.0, 3, tol=1e-12, max_iter=10_000)
    assert float(plain[0, 0]) == 0.0  # the first soft-threshold killed the largest coordinate
    w = enum_alm(y, 1.0, tol=1e-10, max_iter=10_000)
    assert float(prox_objective(w, y, 1.0)) < float(prox_objective(plain, z, 1.0)) - 0.03
    assert float(prox_objective(w, y, 1.0)) == pytest.approx(0.56572, abs=1e-4)
    assert int((w != 0).sum()) == 3


def test_prox_properties():
    y = _random_groups(256, seed=1)
    for lam in (0.0, 0.3, 3.0):
        w = enum_alm(y, lam)
        assert bool((w * y >= 0).all()) and bool((w.abs() <= y.abs() + 1e-12).all())  # shrinks toward 0, keeps signs
        permutation = torch.randperm(4, generator=torch.Generator().manual_seed(2))
        assert torch.allclose(enum_alm(y[:, permutation], lam), w[:, permutation], atol=1e-5)
    assert torch.equal(enum_alm(y, 0.0), y)
    huge = enum_alm(y, 1e6)
    top2 = y.abs().topk(2, dim=-1).indices
    assert torch.equal(huge, torch.zeros_like(y).scatter(-1, top2, y.gather(-1, top2)))


def test_vectorised_solver_matches_group_by_group_and_per_group_lambdas():
    y = _random_groups(40, seed=3)
    lam = torch.linspace(0.01, 3.0, 40, dtype=torch.float64)
    together = enum_alm(y, lam)
    alone = torch.cat([enum_alm(y[i:i + 1], float(lam[i])) for i in range(40)])
    assert torch.allclose(together, alone, atol=1e-5)
    assert enum_alm(torch.zeros(0, 4), 1.0).shape == (0, 4)
    with pytest.raises(SparseCompileError):
        enum_alm(torch.zeros(3, 5), 1.0)


def test_regulariser_vanishes_exactly_on_2_4_groups():
    assert float(reg_2to4(torch.tensor([3.0, -2.0, 0.0, 0.0]))) == 0.0
    assert float(reg_2to4(torch.tensor([1.0, 2.0, 3.0, 0.0]))) == 6.0
    assert float(reg_2to4(torch.tensor([1.0, -1.0, 1.0, 1.0]))) == 4.0


def test_speed_against_the_projected_gradient_baseline(capsys):
    """Prints EnumALM vs EnumPGD timings (no timing assertion: the machine is shared)."""
    y = _random_groups(4096, seed=4).float()
    lines = []
    for lam in (0.1, 1.0, 3.0):
        start = time.perf_counter()
        w_alm = enum_alm(y, lam)
        t_alm = time.perf_counter() - start
        start = time.perf_counter()
        w_pgd = enum_pgd(y, lam)
        t_pgd = time.perf_counter() - start
        ours, theirs = prox_objective(w_alm, y, lam), prox_objective(w_pgd, y, lam)
        assert bool((ours <= theirs + 1e-4 * (1 + theirs.abs())).all())
        lines.append(f"lam={lam}: EnumALM {t_alm * 1e3:.1f} ms, EnumPGD {t_pgd * 1e3:.1f} ms "
                     f"({t_pgd / max(t_alm, 1e-9):.1f}x), PGD worse by up to {float((theirs - ours).max()):.2e}")
    with capsys.disabled():
        print("\n2:4 prox on 4096 groups (float32): " + "; ".join(lines))


# ---------------------------------------------------------------------------- training


def _calib(count: int = 64, seed: int = 3) -> torch.Tensor:
    return torch.randn(count, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def small_gm():
    return export_graph(make_small_net(), _calib(4), dynamic_batch=True)


def _scaled_input_toy(seed: int = 0):
    """Linear(16 -> 4) where magnitude keeps the wrong pair in every group (see test_gumbel)."""
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(16, 4, bias=False)
    magnitude = torch.tensor([1.0, 1.0, 0.2, 0.2]).repeat(4)
    signs = torch.where(torch.rand(4, 16, generator=generator) < 0.5, -1.0, 1.0)
    with torch.no_grad():
        linear.weight.copy_(magnitude * (1 + 0.1 * torch.rand(4, 16, generator=generator)) * signs)
    inputs = torch.randn(512, 16, generator=generator) * torch.tensor([0.1, 0.1, 3.0, 3.0]).repeat(4)
    gm = export_graph(nn.Sequential(linear).eval(), inputs[:4], dynamic_batch=True)
    return gm, inputs, torch.tensor([False, False, True, True]).repeat(4, 4)


def test_final_weights_are_the_original_weights_times_an_exact_2_4_mask(small_gm):
    before = {name: t.detach().clone() for name, t in small_gm.state_dict().items()}
    result = learn_proxsparse_masks(small_gm, _calib(), options=ProxSparseOptions(lambda1=5.0, lambda2=0.1),
                                    config=TrainConfig(max_steps=10, batch_size=16, lr=0.01, eval_every=5,
                                                       patience=None))
    for name, tensor in small_gm.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    layers = {layer.weight_target: layer for layer in find_layers(small_gm) if layer.reason is None}
    assert set(result.masks) == set(layers) and result.method == "proxsparse"
    for target, mask in result.masks.items():
        original = get_tensor(small_gm, target)
        axis = layers[target].reduction_axis
        mask_to_patterns(mask, axis, 2, 4)  # exactly 2 of every 4
        assert torch.equal(result.weights[target], original * mask)
        assert count_nm_violations(result.weights[target], axis, 2, 4) == 0


def test_learned_weights_move_toward_2_4_and_the_penalties_behave(small_gm):
    learner = ProxSparseLearner(small_gm, find_layers(small_gm), options=ProxSparseOptions(lambda1=5.0, lambda2=1.0))
    assert float(learner.penalty().detach()) == 0.0  # RegW0 is zero at W = W0
    assert learner.progress_info()["fraction_2to4"] == 0.0
    config = TrainConfig(max_steps=30, batch_size=16, lr=0.05, eval_every=10, patience=None)
    train_masks(learner, small_gm, _calib(), config=config)
    info = learner.progress_info()
    assert info["fraction_2to4"] > 0.5 and info["relative_norm_gap"] > 0
    with torch.no_grad():
        for target, u in learner.weights.items():
            u.copy_(learner.start[target] * torch.where(torch.rand_like(u) < 0.5, 0.0, 1.0))
    assert float(learner.penalty().detach()) == pytest.approx(0.0, abs=1e-6)  # zero wherever W is 0 or W0


def test_finds_the_known_optimal_mask_with_sgd():
    gm, inputs, optimal = _scaled_input_toy()
    result = learn_proxsparse_masks(gm, inputs, options=ProxSparseOptions(lambda1=0.5),
                                    config=TrainConfig(max_steps=300, lr=0.3, optimizer="sgd", objective="mse",
                                                       eval_every=10, patience=None,
                                                       feature_weight=0.0))  # one layer: the term would double mse
    assert torch.equal(result.masks["0.weight"], optimal)
    assert result.history[-1]["fraction_2to4"] == 1.0
    assert result.best_held_out < 0.1 * result.history[0]["held_out"]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_proxsparse_resumes_to_the_same_result(small_gm, tmp_path, optimizer):
    config = TrainConfig(max_steps=12, batch_size=16, lr=0.02, eval_every=3, patience=None, optimizer=optimizer)
    options = ProxSparseOptions(lambda1=5.0, lambda2=0.1)

    def make():
        return ProxSparseLearner(small_gm, find_layers(small_gm), options=options)

    straight_learner = make()
    straight = train_masks(straight_learner, small_gm, _calib(), config=config)
    path = tmp_path / "prox.safetensors"

    def interrupt(step, *_):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        train_masks(make(), small_gm, _calib(), config=config, callback=interrupt, checkpoint_path=path)
    resumed_learner = make()
    resumed = train_masks(resumed_learner, small_gm, _calib(), config=config, resume=path)
    assert resumed.history == straight.history
    for target in straight.masks:
        assert torch.equal(straight.masks[target], resumed.masks[target])
        assert torch.equal(straight_learner.weights[target], resumed_learner.weights[target])


def test_only_2_4_is_supported(small_gm):
    with pytest.raises(SparseCompileError, match="2:4"):
        ProxSparseLearner(small_gm, find_layers(small_gm, n=1, m=4), n=1, m=4)
    with pytest.raises(SparseCompileError):
        ProxSparseOptions(scale="column").validate()


class _DeadChannelNet(nn.Module):
    """Linear -> hardswish -> Linear -> softmax over 500 classes, with a dead channel (all-zero weight row and
    bias, as pruned pretrained networks have) and layers whose weights differ in scale by 10^3."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 500)

    def forward(self, x):
        h = nn.functional.hardswish(self.a(x))  # slope 1/2 at 0: the dead channel gets a gradient
        return torch.softmax(self.head(torch.relu(self.b(h))), -1)


def _dead_channel_model():
    torch.manual_seed(0)
    net = _DeadChannelNet().eval()
    with torch.no_grad():
        net.b.weight.mul_(0.01)
        net.head.weight.mul_(20)
        net.a.weight[3] = 0
        net.a.bias[3] = 0
    inputs = torch.randn(128, 16, generator=torch.Generator().manual_seed(1))
    return export_graph(net, inputs[:4], dynamic_batch=True), inputs


def test_weights_zero_in_w0_stay_zero_and_a_dead_channel_does_not_make_the_loss_nan():
    """The OCR recognizer's failure ("loss became nan at step 4") in small: a dead channel's row moved off zero,
    and under the in-loop bias correction its dense output variance of 0 gave sqrt(0 / var) a NaN gradient."""
    gm, inputs = _dead_channel_model()
    learner = ProxSparseLearner(gm, find_layers(gm))
    zero = {t: learner.start[t] == 0 for t in learner.targets}
    assert bool(zero["a.weight"][3].all())
    config = TrainConfig(max_steps=8, batch_size=32, eval_every=2, patience=None, correct="bias")
    result = train_masks(learner, gm, inputs, config=config)
    losses = [entry["loss"] for entry in result.history if "loss" in entry]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    for target, u in learner.weights.items():
        assert bool(torch.isfinite(u).all()), target
        assert bool((u.detach()[zero[target]] == 0).all()), target
    assert torch.equal(result.weights["a.weight"][3], torch.zeros(16))
