"""The training loop shared by the learned mask methods (Gumbel-softmax, ProxSparse).

Objective
---------
Label-free by default: the student is the model with the learner's weights
(differentiable masked or regularised weights), the teacher is the same
FX module with its dense weights, and the loss matches their outputs on the
calibration inputs. Per model output, ``objective="auto"`` picks

* ``kl``: ``KL(softmax(teacher) || softmax(student))`` averaged over samples,
  for classifier-like outputs (floating point, 2-D, more than one column) whose
  dense values on the calibration set are not all inside [0, 1];
* ``mse``: ``mean((student - teacher)**2) / mean(teacher**2)``, otherwise. Outputs
  that are already probabilities (a final sigmoid or softmax: every dense value in
  [0, 1]) get MSE too, since a softmax over probabilities is nearly flat and KL on
  it barely sees a change (the CREPE pitch model's 360 sigmoid bins). The
  denominator is a constant measured once over the calibration set, so this is
  the MSE up to a fixed scale that makes learning rates transferable between
  models.

With ``labels`` (int64 class indices, one per calibration sample) the objective
is cross-entropy of the first output against them (``objective="ce"``).
Several outputs add up their losses.

Layer outputs
-------------
With ``feature_weight = w > 0`` the loss adds ``w`` times the mean, over the
learned layers, of each layer's relative squared output error
``mean((o_sparse - o_dense)**2) / mean(o_dense**2)`` on the batch, where both
models see the same inputs and ``o_sparse`` has every upstream mask applied.
The output objective alone gives deep layers a weak, noisy signal from a few
thousand images; matching every layer's output gives each mask a direct one
(measured in ``benchmarks/results/learned_ablation.md``). The dense layer
outputs are recomputed per batch (one extra forward pass without gradients).
The held-out metric used for early stopping is the same sum. A layer's output is
copied as the layer runs: an in-place activation after it (``relu_`` from
``ReLU(inplace=True)``) would otherwise rewrite it into the activation's output.

Statistics correction in the loop
---------------------------------
With ``correct = "bias"`` or ``"bn"`` (the build passes its ``--correct``), every
learned layer the build's correction pass can correct gets that correction in
the student's forward pass, measured on the batch
(:mod:`sparsecompile.learned.correction`), so the masks are learned for the
corrected network the build ships. The layer-output term and the held-out
metric see the corrected outputs.

Optimisation
------------
Adam on the learner's trainable tensors (``betas=(0.9, 0.999)``; ``optimizer="sgd"``:
SGD with momentum 0.9), the learning rate following ``lr_schedule`` (cosine or linear decay after an optional
linear warm-up; the rate is computed from the step number, so there is no
scheduler state). After every optimiser step the learner may apply a proximal
step (ProxSparse). Every ``eval_every`` steps (and at step 0 and the last
step) the current *final* masks -- what the method would return now -- are
evaluated on a held-out slice of the calibration set (``holdout_fraction``,
10% by default, drawn with the seed). The result is the best held-out mask
set (early stopping: training stops after ``patience`` evaluations without
improvement). With fewer than 10 calibration samples there is no held-out
slice and the training samples are used for evaluation (``result.held_out``
is False).

Determinism and resuming
------------------------
Every random draw is derived from ``(seed, stream, step)``: the batch order
of epoch ``e`` is a permutation seeded by ``(seed, e)``, the Gumbel noise of
step ``s`` by ``(seed, s)``. A checkpoint (one safetensors file: the
learner's tensors, Adam's state and the best masks, plus a JSON header with
the step, history and configuration) therefore holds everything a run needs,
and ``N`` steps straight give the same result as ``k`` steps, a checkpoint,
and ``N - k`` resumed steps (same machine, same torch build and thread count).

Interrupts
----------
In the main thread a first Ctrl-C sets a flag that is checked between steps:
the current step finishes, a checkpoint is written if a path was given, and
:class:`TrainingInterrupted` is raised -- a partial run is never returned as
if it had finished. A ``KeyboardInterrupt`` raised inside a step (a second
Ctrl-C, or one from the progress callback) is handled the same way when the
state is consistent; if it lands while the optimiser is updating tensors no
checkpoint is written (the exception says so).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call

from sparsecompile.errors import SparseCompileError
from sparsecompile.fileio import atomic_write
from sparsecompile.graph import get_tensor
from sparsecompile.learned.correction import IN_LOOP_MODES, InLoopCorrection, match_batch_statistics
from sparsecompile.passes.correct_statistics import channel_axis
from sparsecompile.verify import flat_outputs

CHECKPOINT_FORMAT = "sparsecompile-learned-checkpoint"
CHECKPOINT_VERSION = 1
METADATA_KEY = "sparsecompile_learned"

OBJECTIVES = ("auto", "kl", "mse", "ce")
LR_SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adam", "sgd")
# Teacher outputs are kept in memory up to this size; above it they are recomputed per batch.
TEACHER_CACHE_BYTES = 1 << 30
# The dense layer outputs (the layer-output term's targets and the in-loop correction's statistics) are kept
# in memory up to this size; above it the dense model runs again on every batch (one more forward pass per step).
FEATURE_CACHE_BYTES = 1 << 30
_EPS = 1e-12

# callback(step, loss, agreement, held-out metric, method numbers): called after every step; the last three are
# from the latest evaluation, the method numbers being MaskLearner.progress_info() (e.g. ProxSparse's fraction_2to4).
ProgressCallback = Callable[[int, float, float, float, dict], None]


class TrainingInterrupted(SparseCompileError):
    """Training stopped by an interrupt before it finished.

    ``checkpoint_path`` is where the state of the last completed step was
    saved (``None`` if no path was given or the state was not consistent);
    ``step`` is the number of completed steps.
    """

    def __init__(self, step: int, checkpoint_path: str | None, detail: str = ""):
        where = f"; resume from checkpoint {checkpoint_path}" if checkpoint_path else "; no checkpoint was saved"
        super().__init__(f"mask learning interrupted after step {step}{where}{detail}")
        self.step = step
        self.checkpoint_path = checkpoint_path


@dataclass
class TrainConfig:
    """Options of the shared loop. ``lr=None`` takes the method's default."""

    max_steps: int = 1500
    batch_size: int | None = None  # None: the method's default (MaskLearner.default_batch_size)
    lr: float | None = None
    optimizer: str = "adam"  # adam | sgd (momentum 0.9)
    lr_schedule: str = "cosine"  # cosine | linear | constant (after warm-up)
    warmup_fraction: float = 0.0  # of max_steps, linear warm-up from 0
    min_lr_fraction: float = 0.0  # the schedule decays to lr * min_lr_fraction
    objective: str = "auto"  # auto | kl | mse | ce (ce needs labels)
    holdout_fraction: float = 0.1
    eval_every: int = 20
    patience: int | None = 10  # evaluations without held-out improvement before stopping; None: never
    time_budget_s: float | None = None
    seed: int = 0
    eval_batch_size: int = 256
    static_batch: bool = False  # the model only takes batch_size samples at a time (evaluation uses it too)
    checkpoint_every: int | None = None  # steps between periodic checkpoints (needs a checkpoint path)
    # Weight of the layer-output matching term (0: output objective only); see "Layer outputs" above.
    feature_weight: float = 1.0
    # Statistics correction the masks are learned under (none | bn | bias; see learned/correction.py).
    # The build sets it to its --correct mode.
    correct: str = "none"

    def validate(self) -> None:
        if self.max_steps < 0:
            raise SparseCompileError(f"max_steps must be >= 0, got {self.max_steps}")
        if (self.batch_size is not None and self.batch_size < 1) or self.eval_batch_size < 1:
            raise SparseCompileError("batch sizes must be >= 1")
        if self.lr is not None and not self.lr > 0:
            raise SparseCompileError(f"lr must be > 0, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise SparseCompileError(f"unknown lr_schedule '{self.lr_schedule}'; valid: {', '.join(LR_SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise SparseCompileError(f"unknown optimizer '{self.optimizer}'; valid: {', '.join(OPTIMIZERS)}")
        if self.objective not in OBJECTIVES:
            raise SparseCompileError(f"unknown objective '{self.objective}'; valid: {', '.join(OBJECTIVES)}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise SparseCompileError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        if not 0.0 <= self.warmup_fraction < 1.0 or not 0.0 <= self.min_lr_fraction <= 1.0:
            raise SparseCompileError("warmup_fraction must be in [0, 1) and min_lr_fraction in [0, 1]")
        if self.eval_every < 1:
            raise SparseCompileError(f"eval_every must be >= 1, got {self.eval_every}")
        if self.patience is not None and self.patience < 1:
            raise SparseCompileError(f"patience must be >= 1 or None, got {self.patience}")
        if self.correct not in IN_LOOP_MODES:
            raise SparseCompileError(f"unknown correct '{self.correct}'; valid: {', '.join(IN_LOOP_MODES)}")
        if not (self.feature_weight >= 0 and math.isfinite(self.feature_weight)):
            raise SparseCompileError(f"feature_weight must be a finite number >= 0, got {self.feature_weight}")


# Options that may differ between a checkpoint and the run that resumes it.
_RESUME_MAY_CHANGE = {"time_budget_s", "checkpoint_every", "eval_batch_size"}


def learning_rate(config: TrainConfig, base_lr: float, step: int) -> float:
    """The rate of (0-based) ``step``: linear warm-up, then the decay schedule."""
    total = max(1, config.max_steps)
    warmup = int(round(config.warmup_fraction * total))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if config.lr_schedule == "constant":
        return base_lr
    progress = (step - warmup) / max(1, total - warmup)
    low = config.min_lr_fraction
    if config.lr_schedule == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (low + (1.0 - low) * factor)


def stream_seed(seed: int, stream: int, *index: int) -> int:
    """A seed for draw ``index`` of random stream ``stream``; independent of anything run before."""
    digest = hashlib.blake2b("/".join(str(int(v)) for v in (seed, stream) + index).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


STREAM_DATA, STREAM_NOISE, STREAM_SPLIT, STREAM_INIT = 1, 2, 3, 4


def layer_output_probe(gm: torch.nn.Module, layers: Sequence, correct: bool = False) -> torch.fx.GraphModule:
    """A module computing what ``gm`` computes, returning ``(gm's output, [output of each layer])``.

    It shares ``gm``'s parameters and buffers (same names), so ``functional_call`` overrides reach it.
    The layer outputs are copies taken as each layer runs (an in-place activation downstream does not
    reach them). With ``correct``, every layer's output passes through
    :func:`~sparsecompile.learned.correction.match_batch_statistics` before anything downstream (and the
    returned list) sees it; the module then takes, after the model's inputs, three per layer (target
    mean, reference variance, folded BatchNorm; a ``None`` target mean: that layer passes unchanged).
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise SparseCompileError("layer outputs are read from the graph: this needs an FX graph module")
    # A plain graph (default code generator): it takes the (tensor) inputs as positional placeholders and
    # returns the pair as is, where an exported module's generator would re-nest outputs with a fixed spec.
    graph = torch.fx.Graph()
    copied: dict = {}
    original = graph.graph_copy(gm.graph, copied)
    nodes = {node.name: copied[node] for node in gm.graph.nodes if node in copied}
    missing = [layer.node_name for layer in layers if layer.node_name not in nodes]
    if missing:
        raise SparseCompileError(f"layer node(s) not in the graph: {', '.join(missing)}")
    outputs = [nodes[layer.node_name] for layer in layers]
    replaced: dict = {}
    if correct:
        last = [node for node in graph.nodes if node.op == "placeholder"][-1]
        for i, layer in enumerate(layers):
            targets = []
            for part in ("mean", "reference_var", "batchnorm"):
                with graph.inserting_after(last):
                    last = graph.placeholder(f"sc_correction_{part}_{i}")
                targets.append(last)
            node = outputs[i]
            with graph.inserting_after(node):
                fixed = graph.call_function(match_batch_statistics, (node, *targets, channel_axis(node, layer)))
            node.replace_all_uses_with(fixed, delete_user_cb=lambda user: user is not fixed)
            outputs[i] = replaced[node] = fixed
        original = torch.fx.node.map_arg(original, lambda n: replaced.get(n, n))  # a layer may be the output
    # A copy taken before anything downstream runs: an in-place consumer (``relu_`` from ReLU(inplace=True))
    # would otherwise rewrite the returned tensor into the activation's output.
    features = []
    for node in outputs:
        with graph.inserting_after(node):
            features.append(graph.call_function(torch.ops.aten.clone.default, (node,)))
    graph.output((original, features))
    graph.lint()
    return torch.fx.GraphModule(gm, graph)


def _sample_cache(values: Sequence[torch.Tensor], samples: int, limit: int) -> list[torch.Tensor] | None:
    """Zeroed ``[samples, ...]`` tensors shaped like ``values`` (one chunk's), or None above ``limit`` bytes."""
    if sum(v[:1].numel() * v.element_size() for v in values) * samples > limit:
        return None
    return [v.new_zeros((samples,) + tuple(v.shape[1:])) for v in values]


def masked_weight(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Kept entries bit for bit, dropped entries +0.0 (what ``apply_masks`` writes)."""
    return torch.where(mask, weight.detach(), torch.zeros((), dtype=weight.dtype, device=weight.device))


def masked_weights(gm: torch.nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{target: where(mask, original weight, 0)}``: the final sparse weights of a mask set."""
    return {target: masked_weight(get_tensor(gm, target), mask) for target, mask in masks.items()}


class MaskLearner(ABC):
    """A learned mask method, as the shared loop sees it.

    It owns trainable tensors (``trainable()``; the optimiser updates them) and, from
    them, produces the weights of the training forward pass
    (``training_weights``), any extra differentiable penalty, a post-step
    hook (ProxSparse's proximal step), and the *final* masks it would return
    now (``masks``). It never changes the module's weights. A learner is
    stateful: use a fresh one per run (or resume it from a checkpoint).
    """

    method: str = ""
    default_lr: float = 1e-3
    default_batch_size: int = 64  # training samples per step when TrainConfig.batch_size is None

    def __init__(self, gm: torch.nn.Module, layers: Sequence, n: int = 2, m: int = 4):
        self.n, self.m = n, m
        self.layers = [layer for layer in layers if layer.reason is None]
        if not self.layers:
            raise SparseCompileError("no eligible layers to learn masks for")
        self.targets = [layer.weight_target for layer in self.layers]
        if len(set(self.targets)) != len(self.targets):
            raise SparseCompileError("two eligible layers share one weight tensor")
        self.axes = {layer.weight_target: layer.reduction_axis for layer in self.layers}
        self.originals = {t: get_tensor(gm, t).detach() for t in self.targets}
        for target, weight in self.originals.items():
            if weight.shape[self.axes[target]] % m:
                raise SparseCompileError(f"'{target}': reduction axis of length {weight.shape[self.axes[target]]} "
                                         f"is not a multiple of {m}")

    @abstractmethod
    def trainable(self) -> dict[str, torch.Tensor]:
        """Leaf tensors (``requires_grad=True``) by stable name; the checkpoint stores them by that name."""

    @abstractmethod
    def training_weights(self, step: int, total_steps: int, seed: int) -> dict[str, torch.Tensor]:
        """Differentiable replacement weights for the training forward pass of ``step``."""

    def penalty(self) -> torch.Tensor | None:
        """Extra differentiable term added to the loss (None: nothing)."""
        return None

    def after_step(self, lr: float) -> None:
        """Called (under no_grad) after each optimiser step with its learning rate."""

    def after_load(self) -> None:
        """Called after a checkpoint restored the trainable tensors."""

    @abstractmethod
    def masks(self) -> dict[str, torch.Tensor]:
        """The final masks the method would return now: bool, N:M along each layer's reduction axis."""

    def progress_info(self) -> dict[str, float]:
        """Method-specific numbers recorded in the history at every evaluation."""
        return {}

    def options(self) -> dict[str, Any]:
        """The method's options (JSON); a checkpoint resumes only with equal options."""
        return {}


@dataclass
class TrainResult:
    """A finished run. ``masks`` are the best held-out masks; ``weights`` = original weights where kept, else 0."""

    method: str
    masks: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]
    steps: int  # optimiser steps taken (including resumed ones)
    best_step: int
    best_held_out: float
    stop_reason: str  # max_steps | early_stopping | time_budget
    wall_time_s: float
    held_out: bool  # False: evaluated on the training samples (too few calibration samples)
    objective: list[str]
    history: list[dict] = field(default_factory=list)  # one entry per evaluation


def _as_inputs(inputs) -> tuple[torch.Tensor, ...]:
    if hasattr(inputs, "inputs") and not isinstance(inputs, torch.Tensor):  # CalibrationData
        inputs = inputs.inputs
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    inputs = tuple(inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise SparseCompileError("calibration inputs must be a tensor or a sequence of tensors (samples on axis 0)")
    count = inputs[0].shape[0]
    if any(t.shape[0] != count for t in inputs) or count < 1:
        raise SparseCompileError("every calibration input needs the same number (>= 1) of samples on axis 0")
    return inputs


def _digest(tensors) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        t = tensor.detach().cpu().contiguous()
        digest.update(str((tuple(t.shape), str(t.dtype))).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class _InterruptFlag:
    """While active in the main thread, the first SIGINT only sets ``raised``; the second interrupts."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            try:
                self._previous = signal.signal(signal.SIGINT, self._handle)
            except ValueError:  # not allowed here (e.g. embedded interpreter)
                self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


class MaskTrainer:
    """Trains one :class:`MaskLearner` on calibration inputs; see the module docstring.

    ``run()`` returns a :class:`TrainResult`; ``save_checkpoint(path)`` /
    ``load_checkpoint(path)`` write and restore the full state (call
    ``load_checkpoint`` before ``run`` to resume).
    """

    def __init__(self, learner: MaskLearner, gm: torch.nn.Module, inputs, *, labels: torch.Tensor | None = None,
                 config: TrainConfig | None = None, callback: ProgressCallback | None = None,
                 checkpoint_path: str | os.PathLike | None = None, folded_batchnorm: dict | None = None):
        self.learner, self.gm = learner, gm
        self.config = config or TrainConfig()
        self.config.validate()
        if self.config.batch_size is None:
            self.config = replace(self.config, batch_size=learner.default_batch_size)
        self.callback = callback
        self.checkpoint_path = os.fspath(checkpoint_path) if checkpoint_path is not None else None
        self.inputs = _as_inputs(inputs)
        self.labels = labels
        self.num_samples = int(self.inputs[0].shape[0])
        if labels is not None:
            if labels.dim() != 1 or labels.shape[0] != self.num_samples or labels.dtype != torch.int64:
                raise SparseCompileError(f"labels must be int64 of shape [{self.num_samples}]")
        if self.config.objective == "ce" and labels is None:
            raise SparseCompileError("objective 'ce' needs labels")
        self.base_lr = self.config.lr if self.config.lr is not None else learner.default_lr
        self.device = next(iter(learner.originals.values())).device
        # Frozen copies of every parameter/buffer (shared storage, no grad): the forward never touches .grad
        # of the module's own tensors, and never writes them.
        self._frozen = {name: t.detach() for name, t in
                        list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))}
        self.correction = (InLoopCorrection(gm, learner.layers, self.config.correct, folded_batchnorm, self.device)
                           if self.config.correct != "none" else None)
        self._probe = (layer_output_probe(gm, learner.layers, correct=self.correction is not None)
                       if self.config.feature_weight > 0 or self.correction is not None else None)
        # The probe holds only the tensors its graph reads (a folded BatchNorm's are gone).
        self._probe_names = ({name for name, _ in self._probe.named_parameters(remove_duplicate=False)}
                             | {name for name, _ in self._probe.named_buffers(remove_duplicate=False)}
                             if self._probe is not None else set())
        self._split()
        self._prepare_teacher()
        params = learner.trainable()
        self._param_names = list(params)
        tensors = [params[name] for name in self._param_names]
        if self.config.optimizer == "adam":
            self.optimizer = torch.optim.Adam(tensors, lr=self.base_lr, betas=(0.9, 0.999), eps=1e-8, foreach=False)
        else:
            self.optimizer = torch.optim.SGD(tensors, lr=self.base_lr, momentum=0.9, foreach=False)
        self.step = 0
        self.best_step = 0
        self.best_metric = math.inf
        self.best_masks: dict[str, torch.Tensor] = {}
        self.evals_since_best = 0
        self.history: list[dict] = []
        self.elapsed_before = 0.0
        self.stop_reason: str | None = None
        self.last_eval: tuple[float, float] | None = None
        self.last_loss: float | None = None
        self._fingerprint = {
            "weights": _digest(learner.originals[t] for t in learner.targets),
            "inputs": _digest(self.inputs + ((labels,) if labels is not None else ())),
        }

    # ------------------------------------------------------------------ data

    def _split(self) -> None:
        count = self.num_samples
        hold = int(math.floor(count * self.config.holdout_fraction))
        if count < 10 or hold < 1:
            hold = 0
        order = torch.randperm(count, generator=torch.Generator().manual_seed(stream_seed(self.config.seed, STREAM_SPLIT, 0)))
        eval_index, train_index = order[:hold], order[hold:]
        if self.config.static_batch:  # the model takes exactly batch_size samples: whole batches only
            size = self.config.batch_size
            train_index = train_index[:train_index.numel() // size * size]
            eval_index = eval_index[:eval_index.numel() // size * size]
            if train_index.numel() == 0:
                raise SparseCompileError(f"a static-batch model needs at least {size} training samples "
                                         f"(after holding out {hold}); got {count} calibration samples")
        self.held_out = eval_index.numel() > 0
        self.train_index = train_index
        self.eval_index = eval_index if self.held_out else train_index

    def _eval_chunks(self, index: torch.Tensor):
        size = self.config.batch_size if self.config.static_batch else self.config.eval_batch_size
        for start in range(0, index.numel(), size):
            yield index[start:start + size]

    def _select(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t[index.to(t.device)].to(self.device) for t in self.inputs)

    def _batch_index(self, step: int) -> torch.Tensor:
        size = self.train_index.numel()
        batch = min(self.config.batch_size, size)
        per_epoch = size // batch
        epoch, offset = divmod(step, per_epoch)
        perm = torch.randperm(size, generator=torch.Generator().manual_seed(stream_seed(self.config.seed, STREAM_DATA, epoch)))
        return self.train_index[perm[offset * batch:(offset + 1) * batch]]

    # ------------------------------------------------------------------ model

    def _forward(self, overrides: dict[str, torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        state = dict(self._frozen)
        state.update(overrides)
        return flat_outputs(functional_call(self.gm, state, inputs, strict=False, tie_weights=False))

    def _run_probe(self, overrides: dict[str, torch.Tensor], inputs: tuple[torch.Tensor, ...],
                   targets: tuple | None = None):
        """(model outputs, layer outputs) through the probe module (see :func:`layer_output_probe`);
        ``targets``: the per-layer statistics of the in-loop correction (None: no correction)."""
        state = {name: t for name, t in self._frozen.items() if name in self._probe_names}
        state.update(overrides)
        if self.correction is not None:
            inputs = tuple(inputs) + (targets if targets is not None else self.correction.identity())
        model_out, features = functional_call(self._probe, state, inputs, strict=False, tie_weights=False)
        return flat_outputs(model_out), list(features)

    def _objective(self, overrides: dict[str, torch.Tensor], index: torch.Tensor):
        """(student outputs, teacher outputs, loss) on samples ``index``: the output objective, plus the
        layer-output term when it is on (see the module docstring)."""
        inputs = self._select(index)
        if self._probe is None:
            teacher = self._teacher(index)
            student = self._forward(overrides, inputs)
            return student, teacher, self._loss(student, teacher, index)
        if self._feature_cache is not None:
            teacher, teacher_features = self._teacher(index), [f[index] for f in self._feature_cache]
        else:
            with torch.no_grad():  # one dense pass gives the layer outputs and, when not cached, the model outputs
                dense_outputs, teacher_features = self._run_probe({}, inputs)
            teacher = self._teacher(index) if self._teacher_cache is not None else dense_outputs
        targets = self.correction.targets(teacher_features) if self.correction is not None else None
        student, student_features = self._run_probe(overrides, inputs, targets)
        loss = self._loss(student, teacher, index)
        if self.config.feature_weight == 0:
            return student, teacher, loss
        return student, teacher, loss + self.config.feature_weight * self._feature_loss(student_features,
                                                                                         teacher_features)

    def _feature_loss(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        """Mean over layers of the relative squared error of each layer's output."""
        terms = [(s.float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp_min(_EPS)
                 for s, t in zip(student, teacher)]
        return torch.stack(terms).mean()

    @torch.no_grad()
    def _teacher(self, index: torch.Tensor) -> list[torch.Tensor]:
        if self._teacher_cache is not None:
            return [t[index] for t in self._teacher_cache]
        return self._forward({}, self._select(index))

    @torch.no_grad()
    def _prepare_teacher(self) -> None:
        """One dense pass over the samples in use: the objectives, the MSE scales, and (if small) the outputs.

        With a probe the same pass also gives the dense layer outputs. They do not change during training,
        so when they fit in ``FEATURE_CACHE_BYTES`` (and the outputs are cached too) they are kept, and no step
        runs the dense model again (a quarter to a third of a step's work).
        """
        used = [self.train_index] + ([self.eval_index] if self.held_out else [])
        cache: list[torch.Tensor] | None = None
        feature_cache: list[torch.Tensor] | None = None
        sums: list[float] = []
        counts: list[int] = []
        lows: list[float] = []
        highs: list[float] = []
        shapes: list[tuple[int, ...]] = []
        for part in used:
            for index in self._eval_chunks(part):
                inputs = self._select(index)
                outs, features = self._run_probe({}, inputs) if self._probe is not None else (self._forward({}, inputs), [])
                if not shapes:
                    if not outs:
                        raise SparseCompileError("the model returned no tensor outputs")
                    shapes = [tuple(o.shape) for o in outs]
                    sums, counts = [0.0] * len(outs), [0] * len(outs)
                    lows, highs = [math.inf] * len(outs), [-math.inf] * len(outs)
                    cache = _sample_cache(outs, self.num_samples, TEACHER_CACHE_BYTES)
                    if cache is not None and features:
                        feature_cache = _sample_cache(features, self.num_samples, FEATURE_CACHE_BYTES)
                for i, out in enumerate(outs):
                    sums[i] += float(out.double().pow(2).sum())
                    counts[i] += out.numel()
                    if out.is_floating_point() and out.numel():
                        lows[i], highs[i] = min(lows[i], float(out.min())), max(highs[i], float(out.max()))
                for stored, value in zip((cache or []) + (feature_cache or []), outs + features):
                    stored[index.to(value.device)] = value
        self._teacher_cache, self._feature_cache = cache, feature_cache
        self._mse_scale = [max(total / max(c, 1), 1e-12) for total, c in zip(sums, counts)]
        kinds = []
        for i, shape in enumerate(shapes):
            classifier = len(shape) == 2 and shape[1] > 1 and self._float_output(i)
            probabilities = 0.0 <= lows[i] and highs[i] <= 1.0
            if self.config.objective == "auto":
                if self.labels is not None:
                    kind = "ce" if i == 0 else "none"
                else:
                    kind = "kl" if classifier and not probabilities else "mse"
            elif self.config.objective == "ce":
                kind = "ce" if i == 0 else "none"
            elif self.config.objective == "kl":
                if not classifier:
                    raise SparseCompileError(f"objective 'kl' needs 2-D logits; output {i} has shape {list(shape)}")
                kind = "kl"
            else:
                kind = "mse"
            kinds.append(kind)
        if kinds[0] == "ce" and not (len(shapes[0]) == 2 and shapes[0][1] > 1):
            raise SparseCompileError("objective 'ce' needs 2-D logits as the first output")
        self.objective_kinds = kinds

    def _float_output(self, i: int) -> bool:
        return self._teacher_cache is None or self._teacher_cache[i].is_floating_point()

    def _loss(self, student: list[torch.Tensor], teacher: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        total = None
        for i, (kind, s, t) in enumerate(zip(self.objective_kinds, student, teacher)):
            if kind == "kl":
                term = F.kl_div(F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1), log_target=True,
                                reduction="batchmean")
            elif kind == "mse":
                term = (s.float() - t.float()).pow(2).mean() / self._mse_scale[i]
            elif kind == "ce":
                term = F.cross_entropy(s.float(), self.labels[index].to(s.device))
            else:
                continue
            total = term if total is None else total + term
        return total

    @torch.no_grad()
    def evaluate(self, masks: dict[str, torch.Tensor]) -> tuple[float, float]:
        """(held-out objective, agreement with dense) of the model with ``masks`` applied.

        Agreement is top-1 agreement for a classifier-like first output, else
        ``max(0, 1 - ||student - teacher|| / ||teacher||)`` on the first output.
        """
        overrides = masked_weights(self.gm, masks)
        loss_sum, agree, count = 0.0, 0.0, 0
        err_sq, ref_sq = 0.0, 0.0
        for index in self._eval_chunks(self.eval_index):
            student, teacher, loss = self._objective(overrides, index)
            size = index.numel()
            loss_sum += float(loss) * size
            s0, t0 = student[0], teacher[0]
            if s0.dim() == 2 and s0.shape[1] > 1:
                agree += float((s0.argmax(1) == t0.argmax(1)).sum())
            else:
                err_sq += float((s0.double() - t0.double()).pow(2).sum())
                ref_sq += float(t0.double().pow(2).sum())
            count += size
        metric = loss_sum / count
        if ref_sq > 0 or err_sq > 0:
            agreement = max(0.0, 1.0 - math.sqrt(err_sq / max(ref_sq, 1e-30)))
        else:
            agreement = agree / count
        return metric, agreement

    # ------------------------------------------------------------------ loop

    def _record_eval(self, loss: float | None) -> None:
        masks = {t: mk.detach().clone() for t, mk in self.learner.masks().items()}
        metric, agreement = self.evaluate(masks)
        self.last_eval = (metric, agreement)
        entry = {"step": self.step, "held_out": metric, "agreement": agreement,
                 "lr": learning_rate(self.config, self.base_lr, max(self.step - 1, 0))}
        if loss is not None:
            entry["loss"] = loss
        entry.update(self.learner.progress_info())
        self.history.append(entry)
        if metric < self.best_metric or not self.best_masks:
            self.best_metric, self.best_step, self.best_masks = metric, self.step, masks
            self.evals_since_best = 0
        else:
            self.evals_since_best += 1

    def _train_step(self) -> float:
        """One optimiser step; returns the loss. Sets ``_committing`` while tensors are being updated.

        Data-parallel (``torch.distributed`` initialised, world size > 1): every rank draws the same global
        batch, runs its own slice of it, and the gradients are averaged across ranks, so the parameters --
        and the masks -- stay identical on every rank.
        """
        config = self.config
        index = self._batch_index(self.step)
        world, rank = _world()
        if world > 1:
            index = index[rank::world]
        lr = learning_rate(config, self.base_lr, self.step)
        weights = self.learner.training_weights(self.step, config.max_steps, config.seed)
        _, _, loss = self._objective(weights, index)
        if not torch.isfinite(loss.detach()):
            raise SparseCompileError(f"the {self.learner.method} loss became {float(loss)} at step {self.step}; "
                                     "try a lower learning rate")
        penalty = self.learner.penalty()
        total = loss if penalty is None else loss + penalty
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if world > 1:
            _average_gradients([p for group in self.optimizer.param_groups for p in group["params"]], world)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._committing = True
        self.optimizer.step()
        with torch.no_grad():
            self.learner.after_step(lr)
        self.step += 1
        self.last_loss = float(loss.detach())
        self._committing = False
        return self.last_loss

    def run(self) -> TrainResult:
        """Train until ``max_steps``, early stopping or the time budget; raises :class:`TrainingInterrupted`."""
        config = self.config
        started = time.monotonic()
        self._committing = False
        if self.stop_reason is None:
            with _InterruptFlag() as flag:
                try:
                    if not self.history:
                        self._record_eval(None)
                    elif (self.history[-1]["step"] != self.step and self.step % config.eval_every == 0
                          and self.step < config.max_steps):
                        self._record_eval(self.last_loss)  # an interrupt landed between a step and its evaluation
                    while True:
                        if self.step >= config.max_steps:
                            self.stop_reason = "max_steps"
                        elif config.patience is not None and self.evals_since_best >= config.patience:
                            self.stop_reason = "early_stopping"
                        elif (config.time_budget_s is not None
                              and _any_rank(self.elapsed_before + time.monotonic() - started >= config.time_budget_s)):
                            self.stop_reason = "time_budget"
                        if self.stop_reason:
                            if self.history[-1]["step"] != self.step:
                                self._record_eval(self.last_loss)
                            break
                        if flag.raised:
                            raise KeyboardInterrupt
                        loss = self._train_step()
                        if self.step % config.eval_every == 0 or self.step == config.max_steps:
                            self._record_eval(loss)
                        if (self.checkpoint_path and config.checkpoint_every
                                and self.step % config.checkpoint_every == 0):
                            self._save(self.checkpoint_path, self.elapsed_before + time.monotonic() - started)
                        if self.callback is not None:
                            metric, agreement = self.last_eval
                            info = {k: v for k, v in self.history[-1].items()
                                    if k not in ("step", "held_out", "agreement", "lr", "loss")}
                            self.callback(self.step, loss, agreement, metric, info)
                except KeyboardInterrupt:
                    if self._committing:
                        earlier = (f"; {self.checkpoint_path} holds an earlier periodic checkpoint"
                                   if self.checkpoint_path and os.path.exists(self.checkpoint_path) else "")
                        raise TrainingInterrupted(self.step, None, " (interrupted while tensors were being updated, "
                                                  f"so this state was not saved{earlier})") from None
                    saved = None
                    if self.checkpoint_path:
                        self._save(self.checkpoint_path, self.elapsed_before + time.monotonic() - started)
                        saved = self.checkpoint_path
                    raise TrainingInterrupted(self.step, saved) from None
        self.elapsed_before += time.monotonic() - started
        if self.checkpoint_path:
            self._save(self.checkpoint_path, self.elapsed_before)
        masks = self.best_masks
        return TrainResult(
            method=self.learner.method, masks=masks, weights=masked_weights(self.gm, masks), steps=self.step,
            best_step=self.best_step, best_held_out=self.best_metric, stop_reason=self.stop_reason,
            wall_time_s=self.elapsed_before, held_out=self.held_out, objective=list(self.objective_kinds),
            history=list(self.history),
        )

    # ------------------------------------------------------------------ checkpoints

    def _header(self, elapsed: float) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "method": self.learner.method,
            "options": self.learner.options(), "train": asdict(self.config), "n": self.learner.n, "m": self.learner.m,
            "layers": {t: list(self.learner.originals[t].shape) for t in self.learner.targets},
            "fingerprint": self._fingerprint, "step": self.step, "best_step": self.best_step,
            "best_metric": self.best_metric if math.isfinite(self.best_metric) else None,
            "evals_since_best": self.evals_since_best, "history": self.history, "elapsed_s": elapsed,
            "stop_reason": self.stop_reason, "params": self._param_names, "last_loss": self.last_loss,
        }

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write the full training state (atomically) to ``path``: one safetensors file with a JSON header."""
        self._save(os.fspath(path), self.elapsed_before)

    def _save(self, path: str, elapsed: float) -> None:
        from safetensors.torch import save_file

        if _world()[1] != 0:  # data-parallel: rank 0 writes, the state is the same everywhere
            return

        tensors: dict[str, torch.Tensor] = {}
        params = self.learner.trainable()
        for name in self._param_names:
            tensors[f"param/{name}"] = params[name].detach()
        for i, name in enumerate(self._param_names):
            state = self.optimizer.state.get(self.optimizer.param_groups[0]["params"][i], {})
            for key, value in state.items():
                if value is not None:
                    tensors[f"optim/{name}/{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
        for target, mask in self.best_masks.items():
            tensors[f"best/{target}"] = mask.to(torch.uint8)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        header = json.dumps(self._header(elapsed), default=float)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        atomic_write(path, lambda temp: save_file(tensors, temp, metadata={METADATA_KEY: header}))

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore a state written by :meth:`save_checkpoint`; refuses one from another run setup."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.exists(path):
            raise SparseCompileError(f"checkpoint not found: {path}")
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as error:  # a truncated or foreign file
            raise SparseCompileError(f"cannot read checkpoint {path}: {error}") from None
        try:
            header = json.loads(metadata[METADATA_KEY])
        except (KeyError, ValueError):
            raise SparseCompileError(f"{path} is not a sparsecompile mask-learning checkpoint") from None
        if header.get("format") != CHECKPOINT_FORMAT or header.get("version") != CHECKPOINT_VERSION:
            raise SparseCompileError(f"{path}: unsupported checkpoint format/version")
        mine = self._header(0.0)
        for key in ("method", "options", "n", "m", "layers", "fingerprint", "params"):
            if json.loads(json.dumps(mine[key], default=float)) != header[key]:
                raise SparseCompileError(f"checkpoint {path} was written by a different run ({key} differs)")
        ours = {k: v for k, v in json.loads(json.dumps(mine["train"])).items() if k not in _RESUME_MAY_CHANGE}
        theirs = {k: v for k, v in header["train"].items() if k not in _RESUME_MAY_CHANGE}
        if ours != theirs:
            changed = sorted(k for k in ours if ours.get(k) != theirs.get(k))
            raise SparseCompileError(f"checkpoint {path} used other training options ({', '.join(changed)})")
        params = self.learner.trainable()
        with torch.no_grad():
            for name in self._param_names:
                params[name].copy_(tensors[f"param/{name}"].to(params[name].device))
        state_dict = self.optimizer.state_dict()
        state_dict["state"] = {}
        for i, name in enumerate(self._param_names):
            entry = {key.rsplit("/", 1)[1]: value for key, value in tensors.items()
                     if key.startswith(f"optim/{name}/")}
            if entry:
                state_dict["state"][i] = entry
        self.optimizer.load_state_dict(state_dict)
        self.learner.after_load()
        self.best_masks = {key[len("best/"):]: value.to(torch.bool).to(self.device)
                           for key, value in tensors.items() if key.startswith("best/")}
        self.step, self.best_step = header["step"], header["best_step"]
        self.best_metric = header["best_metric"] if header["best_metric"] is not None else math.inf
        self.evals_since_best, self.history = header["evals_since_best"], header["history"]
        self.elapsed_before, self.stop_reason = header["elapsed_s"], header["stop_reason"]
        self.last_loss = header.get("last_loss")
        budget = self.config.time_budget_s
        if self.stop_reason == "time_budget" and (budget is None or budget > self.elapsed_before):
            self.stop_reason = None  # resumed with more time: carry on
        if self.history:
            self.last_eval = (self.history[-1]["held_out"], self.history[-1]["agreement"])


def _world() -> tuple[int, int]:
    """(world size, rank) of an initialised ``torch.distributed`` group, else (1, 0)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _average_gradients(params, world: int) -> None:
    import torch.distributed as dist

    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
        param.grad.div_(world)


def _any_rank(flag: bool) -> bool:
    """A stop decision every rank takes together (clocks differ between processes)."""
    world, _ = _world()
    if world == 1:
        return flag
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def train_masks(learner: MaskLearner, gm: torch.nn.Module, inputs, *, labels: torch.Tensor | None = None,
                config: TrainConfig | None = None, callback: ProgressCallback | None = None,
                checkpoint_path: str | os.PathLike | None = None,
                resume: str | os.PathLike | None = None, folded_batchnorm: dict | None = None) -> TrainResult:
    """Train ``learner`` and return its masks; ``resume`` continues from a checkpoint file.

    ``checkpoint_path`` receives the state at the end, on interrupt, and every
    ``config.checkpoint_every`` steps. Resuming with ``resume == checkpoint_path`` is the usual pattern.
    ``folded_batchnorm`` (weight target -> ``FoldedBatchNorm``, from the fold pass) is what
    ``config.correct = "bn"`` re-estimates.
    """
    trainer = MaskTrainer(learner, gm, inputs, labels=labels, config=config, callback=callback,
                          checkpoint_path=checkpoint_path, folded_batchnorm=folded_batchnorm)
    if resume is not None:
        trainer.load_checkpoint(resume)
    return trainer.run()


def typed_options(cls, values: dict, what: str) -> dict:
    """``values`` checked against the field types of the options dataclass ``cls``.

    ``int`` fields take whole numbers (``16.0`` becomes ``16``), ``float`` fields any number, ``str`` fields
    text, and ``X | None`` fields also ``None``; anything else is a one-line error naming ``what`` and the
    key (``what`` is, e.g., ``"--learn-option"``). Keys that are not fields pass through unchanged: the
    caller reports those with the valid names.
    """
    kinds = {f.name: str(f.type) for f in fields(cls)}
    checked = {}
    for key, value in values.items():
        kind = kinds.get(key, "")
        base = kind.split("|")[0].strip()
        if key not in kinds or (value is None and "None" in kind):
            checked[key] = value
            continue
        if base in ("int", "float"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SparseCompileError(f"{what} {key} must be a number, got {value!r}")
            if base == "int":
                if not float(value).is_integer():
                    raise SparseCompileError(f"{what} {key} must be a whole number, got {value!r}")
                value = int(value)
        elif base == "str" and not isinstance(value, str):
            raise SparseCompileError(f"{what} {key} must be text, got {value!r}")
        checked[key] = value
    return checked


def config_from_dict(data: dict) -> TrainConfig:
    """A :class:`TrainConfig` from a dict, refusing unknown keys and values of the wrong type (for CLI/JSON
    plumbing)."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SparseCompileError(f"unknown training option(s): {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    return TrainConfig(**typed_options(TrainConfig, data, "training option"))


__all__ = [
    "MaskLearner", "MaskTrainer", "ProgressCallback", "TrainConfig", "TrainResult", "TrainingInterrupted",
    "config_from_dict", "learning_rate", "masked_weight", "masked_weights", "train_masks", "typed_options",
]
