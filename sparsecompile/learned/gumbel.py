"""Learned N:M masks with the Gumbel-softmax (one categorical per group of M).

Math
----
Every group of M consecutive weights along a layer's reduction axis (see
:mod:`sparsecompile.learned.patterns`: input channels at one kernel position
for a conv) chooses one of the ``P = C(M, N)`` keep-patterns (6 for 2:4),
``D in {0,1}^{P x M}``. The choice is a categorical variable with logits
``l in R^P`` (``pi = softmax(l)``). A training step draws, per group,

    y = softmax((l + g) / tau),   g_p ~ Gumbel(0, 1) i.i.d.,
    z = onehot(argmax_p y)  in the forward pass,  dz/dl := dy/dl  in the backward pass
        (straight-through: ``z = onehot - y.detach() + y``),

and the group's weights become ``w * (z @ D)``: the forward pass always sees an
exact N:M mask, the gradient reaches the logits through the relaxed sample.
The temperature is annealed from ``tau_start`` to ``tau_end``
(exponentially by default: ``tau_t = tau_0 (tau_1/tau_0)^(t/(T-1))``). The
weights are frozen -- only the logits train -- and the module is never
written: masked weights are passed to ``torch.func.functional_call``.

The final mask is ``argmax_p l`` per group (deterministic; the seed paper
samples once more from the relaxed distribution, which at low temperature is
the same choice almost surely).

Initialisation
--------------
``init="magnitude"`` (default) puts ``init_logit`` on the pattern of the
magnitude mask (top-N ``|w|`` per group) and 0 on the others, so the method
starts from -- and at step 0 returns exactly -- the heuristic's mask; with the
Gumbel noise the heuristic pattern is sampled with probability
``e^c / (e^c + P - 1)`` (0.97 for the default ``c = 5``, P = 6; 0.80 for ``c = 3``). Any heuristic's masks can
be passed as ``init_masks``. ``init="hessian"`` and ``init="activation"`` start from
those data-driven heuristics instead; their masks need calibration data and a
walk through the model, so the caller computes them and passes them as
``init_masks`` (the build does, see :func:`sparsecompile.build._learn_masks`).
``init="random"`` draws logits from ``N(0, random_init_std^2)`` as in the seed
paper (its masks start random).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from sparsecompile.errors import SparseCompileError
from sparsecompile.learned.patterns import mask_to_patterns, num_patterns, patterns_to_mask, soft_mask
from sparsecompile.learned.train import (
    STREAM_INIT, STREAM_NOISE, MaskLearner, TrainConfig, TrainResult, stream_seed, train_masks,
)
from sparsecompile.masks.base import topn_mask

INITS = ("magnitude", "hessian", "activation", "random")
HEURISTIC_INITS = ("hessian", "activation")  # masks computed by the caller from calibration data
TAU_SCHEDULES = ("exponential", "linear", "constant")


@dataclass
class GumbelOptions:
    init: str = "magnitude"  # magnitude | hessian | activation (masks from the caller) | random
    init_logit: float = 5.0  # logit of the heuristic's pattern (others 0)
    random_init_std: float = 0.01  # init="random": logits ~ N(0, std^2)
    tau_start: float = 1.0
    tau_end: float = 0.1
    tau_schedule: str = "exponential"  # exponential | linear | constant (tau_start throughout)

    def validate(self) -> None:
        if self.init not in INITS:
            raise SparseCompileError(f"unknown Gumbel init '{self.init}'; valid: {', '.join(INITS)}")
        if self.tau_schedule not in TAU_SCHEDULES:
            raise SparseCompileError(f"unknown tau_schedule '{self.tau_schedule}'; valid: {', '.join(TAU_SCHEDULES)}")
        if not (self.tau_start > 0 and self.tau_end > 0):
            raise SparseCompileError("temperatures must be > 0")
        if self.random_init_std < 0:
            raise SparseCompileError("random_init_std must be >= 0")


def temperature(options: GumbelOptions, step: int, total_steps: int) -> float:
    """tau at (0-based) ``step`` of ``total_steps``."""
    if options.tau_schedule == "constant" or total_steps <= 1:
        return options.tau_start
    progress = min(1.0, step / (total_steps - 1))
    if options.tau_schedule == "linear":
        return options.tau_start + (options.tau_end - options.tau_start) * progress
    return options.tau_start * (options.tau_end / options.tau_start) ** progress


class GumbelMaskLearner(MaskLearner):
    """Pattern logits ``[rows, groups, C(M, N)]`` per eligible layer; weights frozen."""

    method = "gumbel"
    default_lr = 0.3
    # 32 samples a step: the same 1,500 steps at half the work of 64, and as accurate on the shipped example
    # (benchmarks/results/learned_speed.md).
    default_batch_size = 32

    def __init__(self, gm: torch.nn.Module, layers: Sequence, n: int = 2, m: int = 4,
                 options: GumbelOptions | None = None, init_masks: dict[str, torch.Tensor] | None = None,
                 seed: int = 0):
        super().__init__(gm, layers, n, m)
        self.opts = options or GumbelOptions()
        self.opts.validate()
        self.num_patterns = num_patterns(n, m)
        init_masks = dict(init_masks or {})
        unknown = sorted(set(init_masks) - set(self.targets))
        if unknown:
            raise SparseCompileError(f"init_masks for layers that are not learned: {', '.join(unknown)}")
        missing = [t for t in self.targets if t not in init_masks]
        if self.opts.init in HEURISTIC_INITS and missing:
            raise SparseCompileError(f"Gumbel init '{self.opts.init}' needs init_masks (the {self.opts.init} masks, "
                                     f"computed from calibration data) for every learned layer; missing: "
                                     f"{', '.join(missing)}")
        self.logits: dict[str, torch.Tensor] = {}
        self.init_patterns: dict[str, torch.Tensor] = {}
        for index, target in enumerate(self.targets):
            weight, axis = self.originals[target], self.axes[target]
            rows = weight.numel() // weight.shape[axis]
            groups = weight.shape[axis] // m
            shape = (rows, groups, self.num_patterns)
            if target in init_masks or self.opts.init != "random":
                mask = init_masks.get(target)
                if mask is None:
                    mask = topn_mask(weight.abs(), axis, n, m)
                if tuple(mask.shape) != tuple(weight.shape):
                    raise SparseCompileError(f"init mask for '{target}' has shape {list(mask.shape)}, "
                                             f"weight {list(weight.shape)}")
                patterns = mask_to_patterns(mask.to(weight.device), axis, n, m)
                logits = torch.zeros(shape, dtype=torch.float32, device=weight.device)
                logits.scatter_(-1, patterns.unsqueeze(-1), float(self.opts.init_logit))
            else:
                generator = torch.Generator().manual_seed(stream_seed(seed, STREAM_INIT, index))
                logits = (torch.randn(shape, generator=generator) * self.opts.random_init_std).to(weight.device)
            self.init_patterns[target] = logits.argmax(-1)
            self.logits[target] = logits.requires_grad_(True)

    def trainable(self) -> dict[str, torch.Tensor]:
        return dict(self.logits)

    def training_weights(self, step: int, total_steps: int, seed: int) -> dict[str, torch.Tensor]:
        tau = temperature(self.opts, step, total_steps)
        weights = {}
        for index, target in enumerate(self.targets):
            logits = self.logits[target]
            generator = torch.Generator().manual_seed(stream_seed(seed, STREAM_NOISE, step, index))
            noise = -torch.empty(logits.shape, dtype=torch.float32).exponential_(generator=generator).log()
            soft = F.softmax((logits + noise.to(logits.device)) / tau, dim=-1)
            hard = F.one_hot(soft.argmax(-1), self.num_patterns).to(soft.dtype)
            sample = hard - soft.detach() + soft
            weight = self.originals[target]
            mask = soft_mask(sample, weight.shape, self.axes[target], self.n, self.m)
            weights[target] = weight * mask.to(weight.dtype)
        return weights

    @torch.no_grad()
    def masks(self) -> dict[str, torch.Tensor]:
        return {t: patterns_to_mask(self.logits[t].argmax(-1), self.originals[t].shape, self.axes[t], self.n, self.m)
                for t in self.targets}

    @torch.no_grad()
    def progress_info(self) -> dict[str, float]:
        changed, total, confidence = 0, 0, 0.0
        for target in self.targets:
            logits = self.logits[target]
            changed += int((logits.argmax(-1) != self.init_patterns[target]).sum())
            total += logits.shape[0] * logits.shape[1]
            confidence += float(F.softmax(logits, -1).amax(-1).sum())
        return {"changed_from_init": changed / max(total, 1), "mean_max_probability": confidence / max(total, 1)}

    def options(self) -> dict:
        return asdict(self.opts)


def learn_gumbel_masks(gm: torch.nn.Module, inputs, *, layers: Sequence | None = None, n: int = 2, m: int = 4,
                       options: GumbelOptions | None = None, config: TrainConfig | None = None,
                       labels: torch.Tensor | None = None, init_masks: dict[str, torch.Tensor] | None = None,
                       callback=None, checkpoint_path=None, resume=None, folded_batchnorm=None) -> TrainResult:
    """Learn N:M masks of ``gm``'s eligible layers with Gumbel-softmax pattern logits.

    ``layers`` defaults to ``find_layers(gm, n=n, m=m)`` (those with ``reason is None`` are learned);
    ``inputs`` is a tensor, a tuple of tensors (samples on axis 0) or a ``CalibrationData``.
    ``gm`` is not modified. See :func:`sparsecompile.learned.train.train_masks` for the rest.
    """
    config = config or TrainConfig()
    if layers is None:
        from sparsecompile.layers import find_layers

        layers = find_layers(gm, n=n, m=m)
    learner = GumbelMaskLearner(gm, layers, n, m, options=options, init_masks=init_masks, seed=config.seed)
    return train_masks(learner, gm, inputs, labels=labels, config=config, callback=callback,
                       checkpoint_path=checkpoint_path, resume=resume, folded_batchnorm=folded_batchnorm)


__all__ = ["HEURISTIC_INITS", "GumbelMaskLearner", "GumbelOptions", "learn_gumbel_masks", "temperature"]
