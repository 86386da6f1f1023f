"""Gumbel-softmax mask learning and the shared training loop (objectives, determinism, checkpoints)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from conftest import make_small_net
from helpers import count_ops, export_graph
from sparsecompile.errors import SparseCompileError
from sparsecompile.graph import get_tensor
from sparsecompile.layers import find_layers
from sparsecompile.learned import (
    GumbelMaskLearner, GumbelOptions, TrainConfig, TrainingInterrupted, learn_gumbel_masks, mask_to_patterns,
    train_masks,
)
from sparsecompile.learned.gumbel import temperature
from sparsecompile.learned.train import METADATA_KEY, layer_output_probe
from sparsecompile.masks import topn_mask
from sparsecompile.verify import count_nm_violations, flat_outputs


def _calib(count: int = 64, seed: int = 3) -> torch.Tensor:
    return torch.randn(count, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_gm():
    return export_graph(make_small_net(), _calib(4), dynamic_batch=True)


def _quick(**kwargs) -> TrainConfig:
    base = dict(max_steps=12, batch_size=16, eval_every=4, patience=None, seed=0)
    base.update(kwargs)
    return TrainConfig(**base)


def _eligible(gm):
    return [layer for layer in find_layers(gm) if layer.reason is None]


def _eligible_all(gm):
    """Every layer, however small (the toy nets here are below the default size floor)."""
    return [layer for layer in find_layers(gm, min_weights=0) if layer.reason is None]


def _magnitude_masks(gm):
    return {layer.weight_target: topn_mask(get_tensor(gm, layer.weight_target).abs(), layer.reduction_axis, 2, 4)
            for layer in _eligible(gm)}


def _scaled_input_toy(seed: int = 0, wrong_heuristic: bool = True):
    """One Linear(16 -> 4): in each group of 4 inputs, features 0-1 have large weights and tiny inputs,
    features 2-3 small weights and large inputs, so the output-matching mask keeps 2-3 (pattern 5) while
    magnitude keeps 0-1. ``wrong_heuristic=False``: equal input scales, where magnitude is optimal."""
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(16, 4, bias=False)
    magnitude = torch.tensor([1.0, 1.0, 0.2, 0.2]).repeat(4)
    signs = torch.where(torch.rand(4, 16, generator=generator) < 0.5, -1.0, 1.0)
    with torch.no_grad():
        linear.weight.copy_(magnitude * (1 + 0.1 * torch.rand(4, 16, generator=generator)) * signs)
    scale = torch.tensor([0.1, 0.1, 3.0, 3.0] if wrong_heuristic else [1.0, 1.0, 1.0, 1.0]).repeat(4)
    inputs = torch.randn(512, 16, generator=generator) * scale
    gm = export_graph(nn.Sequential(linear).eval(), inputs[:4], dynamic_batch=True)
    optimal = torch.tensor([False, False, True, True] if wrong_heuristic else [True, True, False, False]).repeat(4, 4)
    return gm, inputs, optimal


def _state(gm) -> dict[str, torch.Tensor]:
    tensors = dict(gm.named_parameters())
    tensors.update(dict(gm.named_buffers()))
    return {name: t.detach().clone() for name, t in tensors.items()}


def test_magnitude_init_reproduces_the_magnitude_mask_at_step_0(small_gm):
    learner = GumbelMaskLearner(small_gm, find_layers(small_gm))
    expected = _magnitude_masks(small_gm)
    assert set(learner.masks()) == set(expected) and len(expected) == 4
    for target, mask in learner.masks().items():
        assert torch.equal(mask, expected[target]), target
    result = learn_gumbel_masks(small_gm, _calib(), config=_quick(max_steps=0))
    assert result.steps == 0 and result.stop_reason == "max_steps"
    for target, mask in result.masks.items():
        assert torch.equal(mask, expected[target]), target


def test_init_masks_from_any_heuristic_are_the_starting_point(small_gm):
    layers = find_layers(small_gm)
    random_masks = {layer.weight_target: topn_mask(torch.rand(layer.weight_shape, generator=torch.Generator().manual_seed(i)),
                                                   layer.reduction_axis, 2, 4)
                    for i, layer in enumerate(_eligible(small_gm))}
    learner = GumbelMaskLearner(small_gm, layers, init_masks=random_masks)
    for target, mask in learner.masks().items():
        assert torch.equal(mask, random_masks[target])
    logits = next(iter(learner.logits.values()))
    assert logits.shape[-1] == 6 and float(logits.detach().max()) == GumbelOptions().init_logit


@pytest.mark.parametrize("init", ["hessian", "activation"])
def test_data_driven_inits_need_the_callers_masks_for_every_layer(small_gm, init):
    layers = find_layers(small_gm)
    targets = [layer.weight_target for layer in _eligible(small_gm)]
    with pytest.raises(SparseCompileError, match=f"init '{init}' needs init_masks.*missing: {targets[0]}"):
        GumbelMaskLearner(small_gm, layers, options=GumbelOptions(init=init))
    masks = {layer.weight_target: topn_mask(torch.rand(layer.weight_shape), layer.reduction_axis, 2, 4)
             for layer in _eligible(small_gm)}
    learner = GumbelMaskLearner(small_gm, layers, options=GumbelOptions(init=init), init_masks=masks)
    assert all(torch.equal(learner.masks()[t], masks[t]) for t in targets)


def test_random_init_gives_n_m_masks_other_than_magnitude(small_gm):
    learner = GumbelMaskLearner(small_gm, find_layers(small_gm), options=GumbelOptions(init="random"))
    magnitude = _magnitude_masks(small_gm)
    differ = 0
    for target, mask in learner.masks().items():
        mask_to_patterns(mask, 1, 2, 4)  # raises unless every group keeps exactly 2
        differ += int((mask != magnitude[target]).sum())
    assert differ > 0


def test_training_leaves_the_weights_bit_identical_and_returns_exact_2_4_masks(small_gm):
    before = _state(small_gm)
    result = learn_gumbel_masks(small_gm, _calib(), config=_quick(lr=0.5))
    after = _state(small_gm)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]) and before[name].dtype == after[name].dtype, name
    assert all(p.grad is None for p in small_gm.parameters())
    layers = {layer.weight_target: layer for layer in _eligible(small_gm)}
    assert set(result.masks) == set(layers)
    for target, mask in result.masks.items():
        weight = get_tensor(small_gm, target)
        axis = layers[target].reduction_axis
        assert mask.dtype == torch.bool and mask.shape == weight.shape
        assert int(mask.sum()) * 2 == mask.numel()
        mask_to_patterns(mask, axis, 2, 4)
        assert count_nm_violations(result.weights[target], axis, 2, 4) == 0
        assert torch.equal(result.weights[target], torch.where(mask, weight, torch.zeros(())))


@pytest.mark.parametrize("init", ["magnitude", "random"])
def test_finds_the_known_optimal_mask_where_magnitude_is_wrong(init):
    gm, inputs, optimal = _scaled_input_toy()
    result = learn_gumbel_masks(gm, inputs, options=GumbelOptions(init=init),  # default lr and init_logit
                                # 150 steps of the default 32 samples (100 of 64 did it before; 100 of 32 leave one group)
                                config=TrainConfig(max_steps=150, objective="mse", eval_every=10, patience=None))
    assert torch.equal(result.masks["0.weight"], optimal)
    held_out = [entry["held_out"] for entry in result.history]
    assert result.best_held_out < held_out[0] * 0.1  # the optimal mask's error is far below the start's
    if init == "magnitude":
        assert torch.equal(_magnitude_masks(gm)["0.weight"], ~optimal)  # the heuristic really was wrong


def test_early_stopping_returns_the_best_held_out_masks():
    gm, inputs, optimal = _scaled_input_toy(wrong_heuristic=False)  # magnitude is already optimal
    result = learn_gumbel_masks(gm, inputs, config=TrainConfig(max_steps=200, lr=0.2, objective="mse", eval_every=5,
                                                               patience=2))
    assert result.stop_reason == "early_stopping" and result.steps == 10
    assert result.best_step == 0 and torch.equal(result.masks["0.weight"], optimal)
    assert result.held_out and result.objective == ["mse"]


def test_seeded_runs_are_identical(small_gm):
    runs = [learn_gumbel_masks(small_gm, _calib(), config=_quick(lr=0.5, seed=seed)) for seed in (7, 7, 8)]
    assert runs[0].history == runs[1].history
    for target in runs[0].masks:
        assert torch.equal(runs[0].masks[target], runs[1].masks[target])
    assert [e.get("loss") for e in runs[0].history] != [e.get("loss") for e in runs[2].history]


def _straight_and_resumed(make_learner, gm, inputs, config, tmp_path, stop_at):
    straight_learner = make_learner()
    straight = train_masks(straight_learner, gm, inputs, config=config)
    path = tmp_path / "state.safetensors"

    def interrupt(step, loss, agreement, held_out, info):
        if step == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as caught:
        train_masks(make_learner(), gm, inputs, config=config, callback=interrupt, checkpoint_path=path)
    assert caught.value.step == stop_at and caught.value.checkpoint_path == str(path)
    resumed_learner = make_learner()
    resumed = train_masks(resumed_learner, gm, inputs, config=config, checkpoint_path=path, resume=path)
    return straight, straight_learner, resumed, resumed_learner, path


def test_interrupt_then_resume_gives_the_same_masks_as_a_straight_run(small_gm, tmp_path):
    config = _quick(max_steps=20, eval_every=5, lr=0.5)
    straight, s_learner, resumed, r_learner, path = _straight_and_resumed(
        lambda: GumbelMaskLearner(small_gm, find_layers(small_gm)), small_gm, _calib(), config, tmp_path, 10)
    assert resumed.steps == straight.steps == 20
    assert resumed.history == straight.history and resumed.best_step == straight.best_step
    for target in straight.masks:
        assert torch.equal(straight.masks[target], resumed.masks[target])
        assert torch.equal(s_learner.logits[target], r_learner.logits[target])
    # A finished checkpoint resumes to the finished result without training further.
    again = train_masks(GumbelMaskLearner(small_gm, find_layers(small_gm)), small_gm, _calib(), config=config, resume=path)
    assert again.steps == 20 and again.history == straight.history


def test_checkpoint_is_safetensors_with_a_json_header(small_gm, tmp_path):
    from safetensors import safe_open

    path = tmp_path / "ckpt.safetensors"
    learn_gumbel_masks(small_gm, _calib(), config=_quick(max_steps=3), checkpoint_path=path)
    raw = path.read_bytes()
    header_length = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and json.loads(raw[8:8 + header_length])  # plain safetensors, no pickle
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()[METADATA_KEY])
        keys = set(handle.keys())
    assert header["method"] == "gumbel" and header["step"] == 3 and header["stop_reason"] == "max_steps"
    assert any(k.startswith("param/") for k in keys) and any(k.startswith("optim/") for k in keys)


def test_interrupt_without_a_checkpoint_path_saves_nothing_and_still_raises(small_gm):
    def interrupt(step, *_):
        raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as caught:
        learn_gumbel_masks(small_gm, _calib(), config=_quick(), callback=interrupt)
    assert caught.value.step == 1 and caught.value.checkpoint_path is None


def test_resume_refuses_a_checkpoint_from_another_run(small_gm, tmp_path):
    path = tmp_path / "ckpt.safetensors"
    learn_gumbel_masks(small_gm, _calib(), config=_quick(max_steps=2), checkpoint_path=path)
    with pytest.raises(SparseCompileError, match="options differs"):
        learn_gumbel_masks(small_gm, _calib(), options=GumbelOptions(init_logit=1.0), config=_quick(max_steps=2),
                           resume=path)
    with pytest.raises(SparseCompileError, match="fingerprint differs"):
        learn_gumbel_masks(small_gm, _calib(seed=9), config=_quick(max_steps=2), resume=path)
    with pytest.raises(SparseCompileError, match="lr"):
        learn_gumbel_masks(small_gm, _calib(), config=_quick(max_steps=2, lr=0.3), resume=path)
    with pytest.raises(SparseCompileError, match="not found"):
        learn_gumbel_masks(small_gm, _calib(), config=_quick(max_steps=2), resume=tmp_path / "missing.safetensors")


def test_objectives_auto_kl_mse_and_labels(small_gm):
    assert learn_gumbel_masks(small_gm, _calib(), config=_quick(max_steps=1)).objective == ["kl"]
    assert learn_gumbel_masks(small_gm, _calib(), config=_quick(max_steps=1, objective="mse")).objective == ["mse"]
    labels = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(0))
    with_labels = learn_gumbel_masks(small_gm, _calib(), labels=labels, config=_quick(max_steps=1))
    assert with_labels.objective == ["ce"]
    with pytest.raises(SparseCompileError, match="needs labels"):
        learn_gumbel_masks(small_gm, _calib(), config=_quick(objective="ce"))
    gm, inputs, _ = _scaled_input_toy()
    assert learn_gumbel_masks(gm, inputs, config=_quick(max_steps=1)).objective == ["kl"]  # [N, 4] looks like logits
    with pytest.raises(SparseCompileError, match="unknown objective"):
        learn_gumbel_masks(small_gm, _calib(), config=_quick(objective="l1"))


class _Sigmoid(nn.Module):
    """The small net with a final sigmoid (like CREPE's pitch bins): its 2-D outputs are probabilities."""

    def __init__(self):
        super().__init__()
        self.net = make_small_net()

    def forward(self, x):
        return torch.sigmoid(self.net(x))


def test_auto_objective_uses_mse_for_outputs_that_are_already_probabilities():
    gm = export_graph(_Sigmoid().eval(), _calib(4), dynamic_batch=True)
    assert learn_gumbel_masks(gm, _calib(), config=_quick(max_steps=1)).objective == ["mse"]
    assert learn_gumbel_masks(gm, _calib(), config=_quick(max_steps=1, objective="kl")).objective == ["kl"]


def test_progress_callback_gets_step_loss_agreement_and_held_out_metric(small_gm):
    calls = []
    learn_gumbel_masks(small_gm, _calib(), config=_quick(max_steps=6, eval_every=3),
                       callback=lambda *args: calls.append(args))
    assert [c[0] for c in calls] == [1, 2, 3, 4, 5, 6]
    for step, loss, agreement, held_out, info in calls:
        assert isinstance(loss, float) and loss >= 0
        assert 0.0 <= agreement <= 1.0 and held_out >= 0
        assert set(info) == {"changed_from_init", "mean_max_probability"}
        assert 0.0 <= info["changed_from_init"] <= 1.0 and 1 / 6 <= info["mean_max_probability"] <= 1.0


def test_time_budget_stops_with_a_finished_result(small_gm):
    result = learn_gumbel_masks(small_gm, _calib(), config=_quick(max_steps=1000, time_budget_s=0.0))
    assert result.stop_reason == "time_budget" and result.steps == 0
    for target, mask in _magnitude_masks(small_gm).items():
        assert torch.equal(result.masks[target], mask)


def test_a_static_batch_model_gets_whole_batches_only():
    gm = export_graph(make_small_net(), _calib(8))  # static batch of 8
    result = learn_gumbel_masks(gm, _calib(80), config=_quick(max_steps=3, batch_size=8, static_batch=True))
    assert result.steps == 3 and result.held_out  # 8 held out (one batch), 72 for training
    with pytest.raises(SparseCompileError, match="static-batch"):
        learn_gumbel_masks(gm, _calib(6), config=_quick(max_steps=3, batch_size=8, static_batch=True))


def test_temperature_anneals_from_tau_start_to_tau_end():
    options = GumbelOptions(tau_start=2.0, tau_end=0.2)
    assert temperature(options, 0, 100) == 2.0
    assert temperature(options, 99, 100) == pytest.approx(0.2)
    assert temperature(options, 50, 101) == pytest.approx((2.0 * 0.2) ** 0.5)  # geometric midpoint
    linear = GumbelOptions(tau_start=2.0, tau_end=0.2, tau_schedule="linear")
    assert temperature(linear, 50, 101) == pytest.approx(1.1)
    with pytest.raises(SparseCompileError, match="unknown Gumbel init 'wanda'"):
        GumbelOptions(init="wanda").validate()


def test_a_real_ctrl_c_finishes_the_step_saves_and_raises(small_gm, tmp_path):
    import os
    import signal

    path = tmp_path / "sigint.safetensors"

    def press_ctrl_c(step, *_):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)  # handled by the loop: a flag, checked before the next step

    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as caught:
        learn_gumbel_masks(small_gm, _calib(), config=_quick(), callback=press_ctrl_c, checkpoint_path=path)
    assert caught.value.step == 4 and path.exists()
    assert signal.getsignal(signal.SIGINT) is handler  # the previous handler is back
    resumed = learn_gumbel_masks(small_gm, _calib(), config=_quick(), resume=path)
    straight = learn_gumbel_masks(small_gm, _calib(), config=_quick())
    assert resumed.history == straight.history


def test_a_run_stopped_by_its_time_budget_continues_when_resumed_with_more_time(small_gm, tmp_path):
    path = tmp_path / "budget.safetensors"
    first = learn_gumbel_masks(small_gm, _calib(), config=_quick(time_budget_s=0.0), checkpoint_path=path)
    assert first.stop_reason == "time_budget" and first.steps == 0
    resumed = learn_gumbel_masks(small_gm, _calib(), config=_quick(), resume=path)
    assert resumed.stop_reason == "max_steps" and resumed.steps == 12


def test_typed_options_check_and_coerce_by_field_type():
    from sparsecompile.learned import method_options, typed_options
    from sparsecompile.learned.train import config_from_dict

    assert typed_options(TrainConfig, {"batch_size": 32.0, "lr": 1, "patience": None, "other": "x"}, "opt") == {
        "batch_size": 32, "lr": 1, "patience": None, "other": "x"}  # unknown keys are the caller's to report
    assert isinstance(config_from_dict({"max_steps": 10.0}).max_steps, int)
    for values, message in [({"batch_size": 1.5}, "opt batch_size must be a whole number, got 1.5"),
                            ({"lr": "fast"}, "opt lr must be a number, got 'fast'"),
                            ({"lr": True}, "opt lr must be a number, got True"),
                            ({"lr": float("nan")}, "opt lr must be a number, got nan"),
                            ({"objective": 3}, "opt objective must be text, got 3")]:
        with pytest.raises(SparseCompileError, match=f"^{re.escape(message)}$"):
            typed_options(TrainConfig, values, "opt")
    assert method_options("gumbel", {"init_logit": 4}).init_logit == 4
    with pytest.raises(SparseCompileError, match="gumbel option init must be text"):
        method_options("gumbel", {"init": 1})


def test_learn_masks_dispatches_by_name_with_dict_options(small_gm):
    from sparsecompile.learned import learn_masks, method_options

    result = learn_masks("gumbel", small_gm, _calib(), options={"init_logit": 2.0}, config=_quick(max_steps=2))
    assert result.method == "gumbel" and result.steps == 2
    assert method_options("proxsparse", {"lambda1": 3.0}).lambda1 == 3.0
    with pytest.raises(SparseCompileError, match="valid: gumbel, proxsparse"):
        learn_masks("sparsegpt", small_gm, _calib())
    with pytest.raises(SparseCompileError, match="unknown gumbel option"):
        method_options("gumbel", {"temperature": 1.0})


def test_layer_output_probe_returns_the_model_output_and_every_layer_output(small_gm):
    layers = _eligible(small_gm)
    probe = layer_output_probe(small_gm, layers)
    x = _calib(5)
    seen = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            seen[node.name] = result = super().run_node(node)
            return result

    Recorder(small_gm).run(x)
    out, features = probe(x)
    assert torch.equal(flat_outputs(out)[0], small_gm(x))
    assert len(features) == len(layers) == 4
    for layer, feature in zip(layers, features):
        assert torch.equal(feature, seen[layer.node_name]), layer.name
    assert not any(name.startswith("_probe") for name, _ in small_gm.named_children())  # gm itself is untouched
    with pytest.raises(SparseCompileError, match="FX graph module"):
        layer_output_probe(make_small_net(), layers)


class _InplaceNet(nn.Module):
    """Linear -> ReLU(inplace=True) -> Linear: the export keeps ``relu_``, which rewrites the first layer's
    output tensor in place."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.act, self.fc2 = nn.Linear(16, 32), nn.ReLU(inplace=True), nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_layer_outputs_are_read_before_an_in_place_activation_rewrites_them():
    """Regression: the probe returned fc1's output *after* ``relu_`` had rewritten it in place."""
    net = _InplaceNet().eval()
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    gm = export_graph(net, x[:4], dynamic_batch=True)
    assert count_ops(gm, torch.ops.aten.relu_.default) == 1  # the case under test is really there
    layers = _eligible_all(gm)
    out, (first, second) = layer_output_probe(gm, layers)(x)
    with torch.no_grad():
        pre_activation = net.fc1(x)
        assert torch.equal(flat_outputs(out)[0], net(x))
    assert (pre_activation < 0).any()  # so a ReLU'd copy would differ
    assert torch.allclose(first, pre_activation, atol=1e-6) and torch.allclose(second, net(x), atol=1e-6)


class _Blind(nn.Module):
    """The model output ignores the layer (times zero): only the layer-output term can teach its mask."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x) * 0.0


def test_the_layer_output_term_teaches_masks_the_output_objective_cannot():
    toy, inputs, optimal = _scaled_input_toy()
    linear = nn.Linear(16, 4, bias=False)
    linear.weight.data.copy_(get_tensor(toy, _eligible(toy)[0].weight_target))
    gm = export_graph(_Blind(linear).eval(), inputs[:4], dynamic_batch=True)
    (target,) = [layer.weight_target for layer in _eligible(gm)]
    config = dict(max_steps=150, eval_every=10, patience=None, objective="mse")  # 150 steps of 32 samples
    blind = learn_gumbel_masks(gm, inputs, config=TrainConfig(**config, feature_weight=0.0))
    assert torch.equal(blind.masks[target], _magnitude_masks(gm)[target])  # zero gradient: the start is kept
    taught = learn_gumbel_masks(gm, inputs, config=TrainConfig(**config, feature_weight=1.0))
    assert torch.equal(taught.masks[target], optimal)
    assert blind.best_held_out == 0.0  # the output objective sees nothing
    assert taught.best_held_out < taught.history[0]["held_out"] * 0.1  # the held-out metric includes the layer term
    with pytest.raises(SparseCompileError, match="feature_weight"):
        TrainConfig(feature_weight=-1.0).validate()



@pytest.mark.parametrize("feature_weight", [0.0, 1.0])
def test_uncached_teacher_outputs_give_the_same_run(small_gm, monkeypatch, feature_weight):
    """Above TEACHER_CACHE_BYTES the dense outputs are recomputed per batch (from the probe's dense pass when
    the layer term is on): the run must not change."""
    import sparsecompile.learned.train as train

    config = dict(max_steps=6, batch_size=16, eval_every=3, patience=None, seed=0, feature_weight=feature_weight)
    cached = learn_gumbel_masks(small_gm, _calib(), config=TrainConfig(**config))
    monkeypatch.setattr(train, "TEACHER_CACHE_BYTES", 0)
    uncached = learn_gumbel_masks(small_gm, _calib(), config=TrainConfig(**config))
    assert uncached.history == cached.history
    for target, mask in cached.masks.items():
        assert torch.equal(uncached.masks[target], mask)


def test_this_module_runs_on_one_torch_thread():
    assert torch.get_num_threads() == 1  # conftest.one_torch_thread, through pytestmark
