"""``sparsecompile build``: the whole pipeline, data flowing one way.

    load -> normalize (passes) -> permute -> find layers -> select masks (or learn them) -> accuracy guard
         -> verify -> certify -> emit ONNX -> check on ONNX Runtime -> compress -> INT8 -> report -> engine

The build is the ordered list ``STAGES``: named stages over one ``BuildState``, checked and settled from
the options first (``_check_options``); the "[k/N]" progress lines, N and the report's timings come from
that list (``_run_stages``).

Everything is written into a staging directory that replaces ``--output``
only when the build succeeded (see :mod:`sparsecompile.builddir`).
"""

from __future__ import annotations

import contextlib
import copy
import sys
import types
import datetime as _dt
import json
import platform
import resource
import time
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from sparsecompile import __version__
from sparsecompile.backends.onnx_export import export_onnx
from sparsecompile.backends.onnxruntime_runner import OrtRunner
from sparsecompile.budget import BudgetResult, enforce_budget
from sparsecompile.damage import (DEFAULT_MAX_DROP, DEFAULT_MAX_ERROR, holdout_split, measure_damage, output_kinds,
                                  parse_output_kinds)
from sparsecompile.certificates import certificate_summary, write_certificate
from sparsecompile.masks.saved import FixedMasks, SavedMaskMethod, check_against, load_masks, save_masks, update_norms
from sparsecompile.builddir import (BUILD_FORMAT, BUILD_FORMAT_VERSION, INT8_ONNX, MANIFEST, atomic_build_dir,
                                   check_output_dir, remove_stale_staging)
from sparsecompile.calibration import (
    CalibrationData, check_informative, load_calibration, match_to_model, parse_preprocess, random_calibration,
)
from sparsecompile.compress import compress, save_weights, size_summary
from sparsecompile.engine.recipe import (
    ENGINE_DIR, QUANTIZED, check_precision, has_qdq, make_recipe, trtexec_command, write_recipe,
)
from sparsecompile.engine.speed_model import DEVICES, MIN_CHANNELS, gemm_dims, not_faster_reason, predict
from sparsecompile.errors import SparseCompileError
from sparsecompile.fileio import file_sha256
from sparsecompile.frontend import check_readable, load_model
from sparsecompile.graph import get_tensor
from sparsecompile.hardware import torch_threads
from sparsecompile.layers import find_layers, unmatched_patterns
from sparsecompile.masks import MASK_METHODS, get_method
from sparsecompile.passes import (
    FoldBatchNorm, LowerConvIm2col, PassContext, PassManager, PermuteChannels, RemoveIdentity, ShapePropagation,
)
from sparsecompile.passes.correct_statistics import CORRECTION_MODES
from sparsecompile.passes.fold_batchnorm import FoldedBatchNorm
from sparsecompile.passes.permute_channels import ChannelPermutation
from sparsecompile.progress import Progress
from sparsecompile.report import write_reports
from sparsecompile.sparsify import sparsify
from sparsecompile.targets import get_target
from sparsecompile.verify import (
    check_outputs_finite, compare_outputs, count_nm_violations, layer_output_errors, run_batches,
)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Tolerance for "the normalized graph computes the same function" (relative L2 error).
NORMALIZATION_TOLERANCE = 1e-4
# What --correct auto means when calibration data is given (see benchmarks/results/accuracy.md).
DEFAULT_CORRECTION = "bias"
# --method auto's candidates, cheapest first (masks x statistics correction, see _choose_method).
AUTO_METHODS = ("magnitude", "activation", "hessian")
# --method auto's per-layer choice mixes the masks of this many of the best candidates
PER_LAYER_CANDIDATES = 3
ON_DAMAGE = ("restore", "fail", "warn")
# ONNX Runtime vs torch on the same sparse weights (different kernels, fp32).
ORT_TOLERANCE = 1e-3


@dataclass
class BuildOptions:
    model: str | None = None
    output: str = "build"
    target: str = "a100"
    model_factory: str | None = None
    weights: str | None = None
    trust_pickle: bool = False
    calib: str | None = None
    calib_samples: int | None = None
    preprocess: str | None = None  # for a --calib image directory, see calibration.parse_preprocess
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    method: str = "auto"  # "auto": the least damaging heuristic on held-back samples (magnitude without --calib)
    pattern: tuple[int, int] = (2, 4)
    exclude: list[str] = field(default_factory=list)
    min_weights: int = 4096
    lower_conv: str = "none"  # "none" | "im2col"
    permute: bool | None = None  # channel permutation; None: on when masks go to sparse tensor cores
    permute_budget: float = 120.0  # wall-time safety cap per channel group, seconds (reported when it binds)
    permute_effort: float = 60.0  # search work per channel group, millions of (stripe pair x row) scores
    sparsify: bool | None = None  # None: the target decides
    weights_dtype: str = "auto"  # "auto" = target precision, or fp32/fp16/bf16
    batch: tuple[int, int, int] | None = None  # TensorRT profile (min, opt, max) for a dynamic batch
    sparse_only_if_faster: bool = False  # leave layers the speed model does not predict faster dense
    precision: str = "auto"  # TensorRT engine precision: auto (= weights dtype), fp16, bf16, fp32, int8, fp8
    int8_calibration: str = "percentile"  # --precision int8 with --calib: activation ranges (sparsecompile/quantize.py)
    engine: bool = True  # build the TensorRT engine now when this machine has the target GPU and TensorRT
    # The accuracy guard (budget.py, damage.py): "auto" = on with --calib at DEFAULT_MAX_DROP, off without it;
    # None = every eligible layer sparse (damage still measured and reported).
    max_drop: float | str | None = "auto"  # points of top-1 / per-position agreement
    max_error: float = DEFAULT_MAX_ERROR  # percent relative error, for outputs that are not class scores
    on_damage: str = "restore"  # over budget: "restore" layers to dense, "fail" the build, or "warn"
    output_kind: str | None = None  # "0=classes,1=values": how each output's damage is measured
    auto_time_cap: float = 1800.0  # seconds for --method auto's candidates (a safety cap, reported when it binds)
    # --method auto over budget: try each layer with the mask of another good candidate. Off by default: on the
    # OCR recognizer and text detector it gained nothing on the task metric and cost 3 passes per layer.
    per_layer: bool = False
    # --method auto over budget: also learn masks with this method (gumbel | proxsparse), started from the best
    # heuristic's masks, and keep them if they measure less damaging. Off by default: slow on a CPU (minutes to
    # hours) and, on the OCR recognizer, Gumbel masks measured more damaging than hessian's on the held-back samples.
    auto_learned: str | None = None
    masks: str | None = None  # apply masks saved by --save-masks (same architecture) instead of choosing
    save_masks: str | None = None  # write the chosen masks (and the weights they were chosen on) here
    certify: bool = False  # margin certificates on the calibration set (analysis/certify.py)
    spectra: bool = False  # Marchenko-Pastur spectral diagnostics per layer (analysis/spectral.py)
    certify_samples: int = 256
    # learned methods (gumbel, proxsparse): see sparsecompile/learned
    max_steps: int = 1500
    time_budget: float | None = None  # seconds of mask learning
    objective: str = "auto"  # auto | kl | mse | ce (ce needs labels)
    labels: str | None = None  # .npy of integer class labels, one per calibration sample
    checkpoint: str | None = None  # learning checkpoint written here (periodically, at the end, on Ctrl-C)
    resume: bool = False  # continue from --checkpoint
    learn_options: dict = field(default_factory=dict)  # method options, e.g. {"init": "random"}
    budget_signal: str = "measured"  # "measured" | "mp": how layer sensitivity is judged under --max-drop
    force: bool = False
    correct: str = "auto"  # statistics correction: "auto" | "none" | "bn" | "bias"
    sequential: bool = True  # layer k's statistics with layers < k already sparse
    # Let hessian compensate the surviving weights (OBS/SparseGPT). None: --method auto tries hessian both ways,
    # a named method keeps the weights; True: updated; False: never (auto included).
    update_weights: bool | None = None
    error_samples: int = 64  # calibration samples used for per-layer errors
    seed: int = 0
    threads: int | None = None  # torch intra-op threads for the whole build; None: torch's default
    source_label: str | None = None  # what the report calls the source (build_model: the in-memory model)


@dataclass
class BuildResult:
    output: Path
    report: dict

    @property
    def files(self) -> dict[str, Path]:
        """Each artifact the build wrote (``model.onnx``, ``weights.safetensors``, ``report.json``, ...) by its
        name in the build directory, as a path."""
        manifest = json.loads((Path(self.output) / MANIFEST).read_text())
        return {name: Path(self.output) / name for name in (*manifest["files"], MANIFEST)}


@dataclass
class BuildState:
    """What flows between the build's stages: settled from the options by ``_check_options``, then filled
    in stage by stage (each field is set by the stage named in its comment, and read by later ones)."""

    options: BuildOptions
    progress: Progress
    started: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, keyed by stage name
    notes: list[str] = field(default_factory=list)  # the report's notes (warnings included)
    # _check_options: what the options mean for this build
    target: Any = None
    n: int = 2
    m: int = 4
    method: Any = None  # the MaskMethod; --method auto: magnitude until the masks stage picks
    auto_method: bool = False  # --method auto with calibration data: candidates compared on held-back samples
    learned: bool = False  # a learned method (gumbel, proxsparse): the learn stage runs
    saved: Any = None  # --masks: the SavedMasks applied instead of choosing
    guard: dict = field(default_factory=dict)  # the accuracy guard's settings (_guard_settings)
    out: Path | None = None
    preprocess: Any = None
    sparsify_layers: bool = False
    permute: bool = False
    accelerated: bool = False  # 2:4 masks on a target with sparse tensor cores
    weights_dtype_name: str = "fp32"
    engine_precision: str = "fp32"
    quantize_int8: bool = False
    # load
    calib: CalibrationData | None = None  # every calibration sample
    fit_calib: CalibrationData | None = None  # the samples that fit masks and corrections
    check_calib: CalibrationData | None = None  # the held-back samples that check them (``calib`` if none)
    fit_index: list[int] | None = None
    loaded: Any = None  # frontend.LoadedModel
    batch_size: int = 0
    # normalize, permute, lower
    context: PassContext | None = None
    reference_outputs: list | None = None  # the loaded model's outputs on ``calib``
    folded_params: dict[str, FoldedBatchNorm] = field(default_factory=dict)  # FoldBatchNorm's outputs
    pass_records: list = field(default_factory=list)
    gm: torch.fx.GraphModule | None = None
    permutation: ChannelPermutation | None = None  # PermuteChannels' outputs (None: not permuted)
    unpermuted: torch.fx.GraphModule | None = None  # the graph before permutation, until it is checked
    dense_outputs: list | None = None  # the normalized dense model's outputs on ``calib``
    normalization: list | None = None  # comparison of those with ``reference_outputs``
    # masks, learn
    layers: list = field(default_factory=list)
    eligible: list = field(default_factory=list)
    dense_gm: torch.fx.GraphModule | None = None
    correct: str = "none"
    learning: dict | None = None
    method_choice: dict | None = None
    kinds: Any = None  # how each output's damage is measured (damage.output_kinds)
    assess: Callable | None = None  # (dense outputs, sparse outputs) -> the damage on the check samples
    check_dense: list | None = None  # the dense model's outputs on ``check_calib``
    outcome: Any = None  # sparsify's SparsifyOutcome
    masks: dict = field(default_factory=dict)
    sparse_gm: torch.fx.GraphModule | None = None
    # budget (the accuracy guard)
    budget: BudgetResult | None = None
    check_sparse: list | None = None  # ``sparse_gm``'s outputs on ``check_calib`` while still current
    # verify, certify
    layer_records: list[dict] = field(default_factory=list)
    sparse_outputs: list | None = None
    agreement: list | None = None
    final_damage: Any = None
    references: dict = field(default_factory=dict)  # dense weights of the masked layers, for --save-masks
    certificate: dict | None = None
    dense_values: dict | None = None
    # the stages that write the build directory
    staging: Path | None = None  # open while those stages run (atomic_build_dir)
    onnx_info: dict | None = None
    ort_check: list | None = None
    compression: dict | None = None
    quantization: dict | None = None
    engine_info: dict | None = None
    report: dict | None = None
    # engine
    host: Any = None

    def batches(self, data: CalibrationData):
        return data.batches(self.batch_size, static=not self.loaded.dynamic_batch)

    def on_pass(self, name: str) -> None:
        self.progress.detail(f"pass {name}")

    def warn(self, message: str) -> None:
        """Warn now and keep the message in the report's notes."""
        self.progress.warn(message)
        self.notes.append(message)


def _always(state: BuildState) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    """One named step of the build, run over the :class:`BuildState` by ``_run_stages``.

    ``title`` is its progress line "[k/N] title ..." (a string, or a function of the state read when the
    stage starts); ``None`` for a step with no line of its own, which is neither counted nor timed.
    ``own_line``: the stage is counted and timed but its run opens the line itself (learning does its
    set-up and checks first). ``enabled`` says, before the first stage, whether the options ask for it;
    ``needed``, read just before it would start, whether it has anything to do (False skips it). N counts
    the enabled stages that are ``expected`` to run; the runner takes a skipped one off the count and adds
    an unexpected one that runs. ``writes``: the stage writes into the build's staging directory, which
    the runner opens before the first such stage and puts in place after the last (atomic_build_dir).
    The report's ``timings`` has one entry per counted stage that ran, under its name.
    """

    name: str
    title: str | Callable[[BuildState], str] | None
    run: Callable[[BuildState], None]
    enabled: Callable[[BuildState], bool] = _always
    needed: Callable[[BuildState], bool] = _always
    expected: bool = True
    own_line: bool = False
    writes: bool = False

    @property
    def counted(self) -> bool:
        return self.title is not None or self.own_line


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str):
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 3)


def _lowering_passes(options: BuildOptions, alignment: int) -> list:
    if options.lower_conv == "im2col":
        return [LowerConvIm2col(alignment=alignment), ShapePropagation()]
    return []


def _check_option_values(options: BuildOptions) -> None:
    """Every number in range and finite, regexes valid, option pairs complete: one line each, before any work.

    (NaN passes click's FloatRange, and ``--max-drop nan`` used to send every layer dense.) The accuracy
    guard's budgets are checked in ``_guard_settings``, ``--permute-*`` in ``build``.
    """
    import math
    import numbers
    import re

    def whole(value, name: str, low: int, high: int | None = None) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (
                high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f">= {low}"
            raise SparseCompileError(f"{name} must be an integer {bound}, got {value!r}")

    if options.calib_samples is not None:
        whole(options.calib_samples, "--calib-samples", 1)
    whole(options.min_weights, "--min-weights", 0)
    whole(options.max_steps, "--max-steps", 0)
    whole(options.certify_samples, "certify_samples", 1)
    whole(options.error_samples, "error_samples", 1)
    whole(options.seed, "--seed", 0, 2 ** 63 - 1)
    if options.time_budget is not None and not (isinstance(options.time_budget, numbers.Real)
                                                and 0 < options.time_budget < math.inf):
        raise SparseCompileError(f"--time-budget must be a finite number of seconds > 0, got {options.time_budget!r}")
    n_m = tuple(options.pattern)
    if len(n_m) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in n_m) \
            or not 0 < n_m[0] < n_m[1]:
        raise SparseCompileError(f"--pattern must be N:M with integers 0 < N < M (e.g. 2:4), got {options.pattern!r}")
    for shape in options.input_shapes:
        if not shape or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in shape):
            raise SparseCompileError(f"--input-shape {shape!r}: need positive integers (e.g. 1,3,224,224)")
    if options.batch is not None and (
            len(options.batch) != 3 or not all(isinstance(b, numbers.Integral) for b in options.batch)
            or not 1 <= options.batch[0] <= options.batch[1] <= options.batch[2]):
        raise SparseCompileError(f"--batch {options.batch!r}: need integers 1 <= MIN <= OPT <= MAX (e.g. 1,8,32)")
    for key, value in options.learn_options.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise SparseCompileError(f"--learn-option {key}={value}: expected a finite number")
    for pattern in options.exclude:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise SparseCompileError(f"--exclude '{pattern}' is not a valid regular expression ({exc})") from None
    if options.resume and not options.checkpoint:
        raise SparseCompileError("--resume needs --checkpoint FILE (the checkpoint to continue from)")
    if options.resume and not Path(options.checkpoint).is_file():
        raise SparseCompileError(f"--resume: checkpoint '{options.checkpoint}' does not exist")


def _ignored_options(options: BuildOptions, target, sparsify_layers: bool, learned: bool, method_name: str) -> list[str]:
    """Options the user set that this build would silently not use: one message per reason (warned and
    kept in the report's notes). Options left at their defaults are not named."""
    defaults = BuildOptions()
    learning = [flag for flag, used in (
        (f"--max-steps {options.max_steps}", options.max_steps != defaults.max_steps),
        (f"--time-budget {options.time_budget:g}" if options.time_budget else "", options.time_budget is not None),
        (f"--objective {options.objective}", options.objective != defaults.objective),
        ("--labels", options.labels is not None), ("--checkpoint", options.checkpoint is not None),
        ("--resume", options.resume), ("--learn-option", bool(options.learn_options)),
    ) if used]
    messages = []
    if not sparsify_layers:
        masking = [flag for flag, used in (
            (f"--method {options.method}", options.method != defaults.method and options.masks is None),
            ("--update-weights", bool(options.update_weights)),
            (f"--correct {options.correct}", options.correct != defaults.correct),
            ("--one-shot", not options.sequential),
            (f"--max-drop {options.max_drop}", options.max_drop not in (defaults.max_drop, None, "none")),
            (f"--on-damage {options.on_damage}", options.on_damage != defaults.on_damage),
            ("--masks", options.masks is not None),
            ("--sparse-only-if-faster", options.sparse_only_if_faster),
        ) if used] + learning
        if masking:
            why = (f"target '{target.name}' has no sparse tensor cores, so no masks are chosen"
                   if options.sparsify is None else "--no-sparsify: no masks are chosen")
            hint = " (pass --sparsify to mask anyway)" if options.sparsify is None else ""
            messages.append(f"{why}: {', '.join(masking)} {'has' if len(masking) == 1 else 'have'} no effect{hint}")
    elif learning and not learned:
        messages.append(f"{', '.join(learning)} only steer learned methods (gumbel, proxsparse): "
                        f"{'it has' if len(learning) == 1 else 'they have'} no effect with --method {method_name}")
    if options.batch is not None and target.kind != "gpu":
        messages.append(f"--batch sets the TensorRT profile of GPU targets: no effect on target '{target.name}'")
    return messages


def _check_options(state: BuildState) -> None:
    """Check every option and settle what they mean for this build (method, permutation, precision, the
    accuracy guard), before any work and any stage line: one line per problem, cheap checks first."""
    options, progress, notes = state.options, state.progress, state.notes
    _check_option_values(options)

    target = get_target(options.target)
    n, m = options.pattern
    # --method auto picks among AUTO_METHODS after the graph is ready; magnitude stands in until then
    # (it also gives the channel permutation its |w| importance, as every calibrated method does).
    auto_method = options.method == "auto" and options.masks is None
    method = get_method("magnitude" if options.method == "auto" else options.method, n=n, m=m)
    if auto_method and not options.calib:
        auto_method = False
        notes.append("no --calib given: magnitude masks (--method auto needs calibration data to compare methods)")
    guard = _guard_settings(options)
    saved = None
    if options.masks is not None:
        saved = load_masks(options.masks)
        if saved.pattern != (n, m):
            raise SparseCompileError(f"--masks were saved for pattern {saved.pattern[0]}:{saved.pattern[1]}; "
                                     f"pass --pattern {saved.pattern[0]}:{saved.pattern[1]}")
        method = SavedMaskMethod(saved)
    if options.save_masks is not None and not Path(options.save_masks).resolve().parent.is_dir():
        raise SparseCompileError(f"--save-masks: directory '{Path(options.save_masks).parent}' does not exist")
    out = Path(options.output)
    check_output_dir(out, options.force, inputs=(options.model, options.weights, options.calib, options.masks,
                                                 options.labels, options.checkpoint, options.save_masks))
    removed, left = remove_stale_staging(out)
    for stale in removed:
        progress.info(f"removed '{stale}', left by an interrupted build")
    for stale in left:
        notes.append(f"'{stale}' looks like an interrupted build's staging folder; delete it if no build is running")
    # Cheap checks first, so a typo fails before any work or progress output.
    if options.model is not None:
        check_readable(Path(options.model))
    if options.weights is not None:
        check_readable(Path(options.weights), "weights file")
    if options.calib is not None and Path(options.calib).suffix in (".npy", ".npz"):
        check_readable(Path(options.calib), "calibration file")
    preprocess = parse_preprocess(options.preprocess)
    if options.preprocess and not (options.calib and Path(options.calib).is_dir()):
        raise SparseCompileError("--preprocess applies to a --calib directory of images")
    if options.correct not in ("auto", "none", *CORRECTION_MODES):
        raise SparseCompileError(f"unknown --correct '{options.correct}'; valid: auto, none, {', '.join(CORRECTION_MODES)}")
    if options.update_weights and not method.can_update_weights and not auto_method:
        raise SparseCompileError(f"--update-weights needs a method that can update weights (hessian), not '{method.name}'")
    if options.lower_conv not in ("none", "im2col"):
        raise SparseCompileError(f"unknown --lower-conv '{options.lower_conv}'; valid: none, im2col")
    if not options.permute_budget > 0:  # also refuses NaN
        raise SparseCompileError("--permute-budget must be positive (seconds per channel group)")
    if not 0 < options.permute_effort < float("inf"):
        raise SparseCompileError("--permute-effort must be a positive number (millions of scores per channel group)")
    sparsify_layers = target.sparse_tensor_cores if options.sparsify is None else options.sparsify
    permute = (sparsify_layers and target.sparse_tensor_cores) if options.permute is None else options.permute
    if permute and not sparsify_layers:
        notes.append("--permute has no effect without masks (--no-sparsify or a target without sparse tensor cores)")
        permute = False
    accelerated = (n, m) == (2, 4) and target.sparse_tensor_cores and sparsify_layers
    if sparsify_layers and target.sparse_tensor_cores and (n, m) != (2, 4):
        notes.append(f"pattern {n}:{m} is not accelerated on {target.name}: NVIDIA sparse tensor cores run 2:4 only. "
                     "The artifact is dense-with-zeros (smaller compressed weights, no speed-up): an accuracy/size study")
    if permute and m != 4:
        notes.append(f"channel permutation searches M=4 patterns only; skipped for {n}:{m}")
        permute = False
    if saved is not None:
        if saved.permutations and options.permute is False:
            raise SparseCompileError("--masks were chosen on permuted channels and only fit that channel order: "
                                     "drop --no-permute (the saved order is replayed, not searched)")
        permute = bool(saved.permutations) and sparsify_layers
    weights_dtype_name = target.default_precision if options.weights_dtype == "auto" else options.weights_dtype
    if weights_dtype_name not in _DTYPES:
        raise SparseCompileError(f"unknown --weights-dtype '{weights_dtype_name}'; valid: auto, {', '.join(_DTYPES)}")
    engine_precision = weights_dtype_name if options.precision == "auto" else options.precision
    # --precision int8 with --calib: the build quantizes the sparse ONNX itself (Q/DQ, 2:4 kept exact); on a
    # CPU target that is the ONNX Runtime INT8 fallback, on a GPU target TensorRT's explicit-quantization input.
    quantize_int8 = options.precision == "int8" and bool(options.calib)
    if options.precision == "int8" and target.kind != "gpu" and not options.calib:
        raise SparseCompileError(f"--precision int8 on target '{target.name}' quantizes for ONNX Runtime and needs "
                                 "--calib (activation ranges and the accuracy check come from it)")
    if target.kind == "gpu" or (options.precision != "auto" and not quantize_int8):
        check_precision(target, engine_precision)
    if quantize_int8:
        from sparsecompile.quantize import CALIBRATIONS

        if options.int8_calibration not in CALIBRATIONS:
            raise SparseCompileError(f"unknown --int8-calibration '{options.int8_calibration}'; "
                                     f"valid: {', '.join(CALIBRATIONS)}")

    if options.auto_learned is not None:
        learned_names = sorted(name for name, cls in MASK_METHODS.items() if cls.learned)
        if options.auto_learned not in learned_names:
            raise SparseCompileError(f"unknown --auto-learned '{options.auto_learned}'; valid: "
                                     f"{', '.join(learned_names)}")
    for message in _ignored_options(options, target, sparsify_layers, method.learned or (
            auto_method and options.auto_learned is not None), options.method if saved is None else "(saved masks)"):
        state.warn(message)
    if options.auto_learned is not None and not auto_method and sparsify_layers:
        state.warn(f"--auto-learned {options.auto_learned} only adds a candidate to --method auto with --calib: "
                   "no effect here" + ("" if options.calib else " (no --calib)"))

    state.target, state.n, state.m = target, n, m
    state.method, state.auto_method, state.learned, state.saved = method, auto_method, method.learned, saved
    state.guard, state.out, state.preprocess = guard, out, preprocess
    state.sparsify_layers, state.permute, state.accelerated = sparsify_layers, permute, accelerated
    state.weights_dtype_name, state.engine_precision = weights_dtype_name, engine_precision
    state.quantize_int8 = quantize_int8


def _load(state: BuildState) -> None:
    """Load the model and the calibration data; hold back samples to check the masks on."""
    options, progress, notes = state.options, state.progress, state.notes
    calib = (load_calibration(options.calib, options.calib_samples, state.preprocess, progress)
             if options.calib else None)
    loaded = load_model(
        options.model, factory=options.model_factory, weights=options.weights,
        trust_pickle=options.trust_pickle, input_shapes=options.input_shapes or None,
        calib_example=calib.first_batch(min(8, calib.num_samples)) if calib else None,
    )
    notes.extend(loaded.notes)
    if calib is not None:
        calib = match_to_model(calib, loaded.example_inputs, loaded.input_names)
        for warning in check_informative(calib):  # refuses constant data: it cannot tell masks apart
            state.warn(warning)
    else:
        calib = random_calibration(loaded.example_inputs, seed=options.seed)
        notes.append("no --calib given: verification used 32 random inputs, so agreement numbers "
                     "say nothing about accuracy on real data")
    batch_size = 64 if loaded.dynamic_batch else loaded.batch_size
    if not loaded.dynamic_batch and calib.num_samples < batch_size:
        raise SparseCompileError(
            f"the model has a static batch of {batch_size} but the calibration data has only "
            f"{calib.num_samples} samples"
        )
    if not loaded.dynamic_batch and options.batch and options.batch != (batch_size,) * 3:
        raise SparseCompileError(f"--batch {','.join(map(str, options.batch))}: the model has a static batch "
                                 f"of {batch_size}; export it with a dynamic batch to build a batch range")
    progress.detail(f"{loaded.source_kind} model, inputs {loaded.input_names}, "
                    f"{'dynamic' if loaded.dynamic_batch else 'static'} batch, {calib.num_samples} calibration samples")
    # Masks, corrections and sensitivities are fitted on `fit_calib`; the guard, --method auto and the
    # reported damage are measured on `check_calib`, samples that chose nothing.
    fit_calib = check_calib = calib
    fit_index = None
    if options.calib:
        split = holdout_split(calib.num_samples, seed=options.seed,
                              multiple=1 if loaded.dynamic_batch else batch_size)
        if split is None:
            state.warn(f"only {calib.num_samples} calibration samples: none could be held back, so the accuracy "
                       "check measures on the samples the masks were chosen on (optimistic); pass a few hundred")
        else:
            fit_index, check_index = split
            fit_calib, check_calib = calib.select(fit_index), calib.select(check_index)
            progress.detail(f"{fit_calib.num_samples} samples fit the masks, "
                            f"{check_calib.num_samples} held back to check them")
    state.calib, state.loaded, state.batch_size = calib, loaded, batch_size
    state.fit_calib, state.check_calib, state.fit_index = fit_calib, check_calib, fit_index


def _normalize(state: BuildState) -> None:
    """Remove identities, fold batch norm, propagate shapes (the loaded model's outputs kept to check it)."""
    state.context = PassContext(example_inputs=state.loaded.example_inputs)
    state.reference_outputs = run_batches(state.loaded.module, state.batches(state.calib))
    manager = PassManager([RemoveIdentity(), FoldBatchNorm(), ShapePropagation()], on_pass=state.on_pass)
    state.gm = manager.run(state.loaded.module, state.context)
    state.folded_params = manager.outputs(FoldBatchNorm.name)
    state.pass_records = manager.records


def _permute(state: BuildState) -> None:
    """Search channel permutations (before lowering: groups are found on convolution nodes)."""
    options, progress, saved = state.options, state.progress, state.saved
    candidates = find_layers(state.gm, n=state.n, m=state.m, alignment=state.target.reduction_alignment,
                             min_weights=options.min_weights, exclude=options.exclude)
    state.unpermuted = copy.deepcopy(state.gm)
    permute_pass = PermuteChannels(
        candidates, {layer.node_name for layer in candidates if layer.reason is None}, n=state.n, m=state.m,
        budget_s=options.permute_budget, max_work=round(options.permute_effort * 1e6), seed=options.seed,
        importance=state.method.permutation_importance, importance_name=state.method.permutation_importance_name,
        on_group=progress.detail,
        iterate=lambda groups: progress.bar(groups, "channel groups", length=len(groups)),
        given=saved.permutations if saved is not None else None,
    )
    permute_manager = PassManager([permute_pass], on_pass=state.on_pass)
    state.gm = permute_manager.run(state.gm, state.context)
    state.permutation = permute_manager.outputs(PermuteChannels.name)
    state.pass_records.extend(permute_manager.records)


def _check_normalization(state: BuildState, outputs, compared=None):
    """Fail (internal error) when normalization changed the model's function; returns the comparison
    (``compared``: already made for ``outputs``)."""
    compared = compare_outputs(state.reference_outputs, outputs) if compared is None else compared
    worst_error = max((o["relative_error"] for o in compared), default=0.0)
    if worst_error > NORMALIZATION_TOLERANCE:
        raise SparseCompileError(
            f"internal error: graph normalization changed the model's outputs (relative error {worst_error:.2e}); "
            "please report this with the model"
        )
    return compared


def _lower_and_check(state: BuildState) -> None:
    """After normalization and permutation: say when the permutation search hit its time cap, lower
    convolutions (--lower-conv im2col), and check the graph still computes the loaded model's function,
    building without the permutation if that is what changed it."""
    options, target, permutation = state.options, state.target, state.permutation
    if permutation is not None:
        capped = permutation.time_capped()
        if capped:  # the one nondeterministic way out of the search: say so loudly
            state.warn(f"{len(capped)} channel group(s) hit the --permute-budget {options.permute_budget:g}s time cap "
                       f"before the --permute-effort {options.permute_effort:g} work limit "
                       f"({', '.join('g' + str(g['id']) for g in capped)}): their channel order depends on machine "
                       "speed, so this build is not reproducible; raise --permute-budget (or lower --permute-effort)")
    lowering = _lowering_passes(options, target.reduction_alignment)
    if lowering:
        lower_manager = PassManager(lowering, on_pass=state.on_pass)
        state.gm = lower_manager.run(state.gm, state.context)
        state.pass_records.extend(lower_manager.records)

    if permutation is None and not state.auto_method and options.calib:
        # The dense model's outputs on the calibration set come from the masks stage's reference stream when it
        # runs over every sample (checked there), saving a forward; otherwise they are computed there.
        dense_outputs = normalization = None
    else:
        dense_outputs = run_batches(state.gm, state.batches(state.calib))
        normalization = compare_outputs(state.reference_outputs, dense_outputs)
    worst = max((o["relative_error"] for o in normalization or []), default=0.0)
    if worst > NORMALIZATION_TOLERANCE and permutation is not None:
        # never ship a wrong network: undo the permutation and say so
        message = (f"channel permutation changed the model's outputs (relative error {worst:.2e}); "
                   "built without it - please report this with the model")
        state.warn(message)
        state.permutation = permutation = permutation.discarded(message)
        state.gm = state.unpermuted
        if lowering:
            state.gm = PassManager(_lowering_passes(options, target.reduction_alignment)).run(state.gm, state.context)
        dense_outputs = run_batches(state.gm, state.batches(state.calib))
        normalization = compare_outputs(state.reference_outputs, dense_outputs)
    if dense_outputs is not None:
        _check_normalization(state, dense_outputs, normalization)
    state.dense_outputs, state.normalization = dense_outputs, normalization
    state.unpermuted = None
    if permutation is not None:  # folded BN parameters are per output channel: reorder them too
        state.folded_params = permutation.reindexed(state.folded_params)


def _select_masks(state: BuildState) -> None:
    """Find the layers, say which can go sparse and why not, and choose and apply their masks (--method
    auto: the least damaging candidate); a learned method's masks come from the learn stage."""
    options, progress, notes, target, saved = state.options, state.progress, state.notes, state.target, state.saved
    gm, n, m = state.gm, state.n, state.m
    layers = find_layers(gm, n=n, m=m, alignment=target.reduction_alignment,
                         min_weights=options.min_weights, exclude=options.exclude)
    for pattern in unmatched_patterns(layers, options.exclude):
        progress.warn(f"--exclude '{pattern}' matches no layer")
        notes.append(f"--exclude '{pattern}' matched no layer")
    if saved is not None and state.sparsify_layers:
        check_against(saved, [layer for layer in layers if layer.reason is None],
                      lambda target: get_tensor(gm, target))
        for layer in layers:
            if layer.reason is None:
                layer.extra["mask_reuse"] = update_norms(saved, layer.weight_target,
                                                         get_tensor(gm, layer.weight_target), layer.reduction_axis)
    loaded = state.loaded
    _layer_macs(gm, layers, loaded.batch_size)
    speed_notes = _predict_speed(gm, layers, target, options, loaded.batch_size if not loaded.dynamic_batch else None)
    notes.extend(speed_notes)
    eligible = [layer for layer in layers if layer.reason is None]
    if not state.sparsify_layers:
        for layer in eligible:
            layer.reason = f"target '{target.name}' has no sparse tensor cores (pass --sparsify to mask anyway)"
        notes.append(f"target '{target.name}' has no sparse tensor cores: built a dense artifact")
        eligible = []
    elif not target.sparse_tensor_cores:
        notes.append(f"--sparsify on '{target.name}': masks applied, but this target runs them dense "
                     "(no speedup; smaller compressed weights only)")
    if not layers or (state.sparsify_layers and not eligible):
        notes.append("no layer is eligible for 2:4 sparsity: the model is built dense")
        progress.warn("no layer is eligible for 2:4 sparsity; building a dense artifact (see report)")
    for layer in layers:
        progress.detail(f"{layer.name} ({layer.op}): " + (f"dense - {layer.reason}" if layer.reason else "sparse"))
    state.layers, state.eligible = layers, eligible
    state.dense_gm = copy.deepcopy(gm)
    state.correct = options.correct
    if state.correct == "auto":  # measured best on real data; without real data it would fit noise
        # Learned methods too: they learn their masks under it (learned/correction.py), and
        # --correct none keeps their weights bit for bit.
        state.correct = DEFAULT_CORRECTION if options.calib else "none"
    if state.learned and eligible:
        return  # the learn stage learns the masks and applies them
    if state.learned:
        _learning_config(state.method, options, loaded)  # nothing to learn; still refuse bad --learn-option values
    _apply_masks(state)


def _learn(state: BuildState) -> None:
    """Learn the masks of every eligible layer at once (gumbel, proxsparse), then apply them."""
    state.learning = _learn_masks(state.method, state.gm, state.layers, state.fit_calib, state.options, state.loaded,
                                  state.progress, lambda: list(state.batches(state.fit_calib)), state.correct,
                                  state.folded_params, state.fit_index, state.calib.num_samples)
    _apply_masks(state)


def _auto_learner(state: BuildState):
    """``--auto-learned METHOD``: the function ``_choose_method`` calls to learn masks on a copy of the graph,
    started from the best heuristic's masks (Gumbel's ``init``, unless ``--learn-option init=`` says otherwise);
    returns (the learned MaskMethod holding its masks, the learning record). None without ``--auto-learned``."""
    options = state.options
    if options.auto_learned is None:
        return None
    from sparsecompile.learned.gumbel import INITS

    def learn(work, correct: str, best_name: str):
        method = get_method(options.auto_learned, n=state.n, m=state.m)
        learn_options = dict(options.learn_options)
        if method.name == "gumbel" and "init" not in learn_options and best_name in INITS:
            learn_options["init"] = best_name
        record = _learn_masks(method, work, state.layers, state.fit_calib,
                              dataclasses.replace(options, learn_options=learn_options), state.loaded, state.progress,
                              lambda: list(state.batches(state.fit_calib)), correct, state.folded_params,
                              state.fit_index, state.calib.num_samples, own_stage=False)
        return method, record

    return learn


def _damage_setup(state: BuildState, outputs) -> None:
    """Output kinds, the damage measure and the dense outputs on the check samples."""
    guard = state.guard
    kinds = output_kinds(outputs, guard["kinds"])
    state.kinds = kinds
    state.assess = lambda dense, sparse: measure_damage(dense, sparse, kinds,  # noqa: E731
                                                        guard["max_drop"], guard["max_error"])
    state.check_dense = (run_batches(state.dense_gm, state.batches(state.check_calib))
                         if state.check_calib is not state.calib else outputs)


def _apply_masks(state: BuildState) -> None:
    """Choose the masks (or take the learned or saved ones) and apply them to ``state.gm`` with the statistics
    correction; the dense model's outputs come from the same lockstep run where they can."""
    options, progress, method, calib, fit_calib = state.options, state.progress, state.method, state.calib, state.fit_calib
    eligible, layers, loaded = state.eligible, state.layers, state.loaded
    correct = state.correct
    if not eligible:
        correct = "none"
    uses_calibration = bool(method.needs) or correct != "none"
    if uses_calibration and calib.source == "random":
        progress.warn(f"--method {method.name} / --correct {options.correct} without --calib: statistics come "
                      "from random inputs and will not help accuracy")
    from_lockstep = (state.dense_outputs is None and not state.learned and uses_calibration and fit_calib is calib
                     and (correct != "none" or not options.sequential or "hessian" in method.needs))
    if state.dense_outputs is None and not from_lockstep:
        state.dense_outputs = run_batches(state.dense_gm, state.batches(calib))
        state.normalization = _check_normalization(state, state.dense_outputs)
    state.method_choice = None
    if state.dense_outputs is not None:
        _damage_setup(state, state.dense_outputs)
    if state.auto_method and eligible:
        if options.auto_learned is not None:  # a bad --learn-option fails now, not after the heuristics
            _learning_config(get_method(options.auto_learned, n=state.n, m=state.m), options, loaded)
        state.gm, state.method, correct, outcome, state.method_choice = _choose_method(
            state.gm, eligible, layers, lambda: list(state.batches(fit_calib)),
            lambda: list(state.batches(state.check_calib)), state.check_dense, state.assess, options,
            state.folded_params, state.n, state.m, progress, learn=_auto_learner(state))
        state.learning = state.method_choice.pop("learning", None)
    else:
        outcome = sparsify(
            state.gm, eligible, layers, method, list(state.batches(fit_calib)) if uses_calibration else [],
            sequential=options.sequential, correct=correct, update_weights=bool(options.update_weights),
            folded_batchnorm=state.folded_params, progress=progress,
            # verify's per-layer errors, measured on the dense activations the lockstep run has anyway,
            # when they are the very samples verify would use
            layer_errors=fit_calib is calib and _sample_count(options.error_samples, calib.num_samples, loaded,
                                                              state.batch_size) == calib.num_samples,
            # the dense copy made above is the reference stream's weights: no second copy of every tensor
            reference_state=None if state.learned else dict(list(state.dense_gm.named_parameters())
                                                            + list(state.dense_gm.named_buffers())),
            reference_outputs=from_lockstep,
        )
        if from_lockstep:
            state.dense_outputs = outcome.reference_outputs
            if state.dense_outputs is None:  # no reference stream ran after all
                state.dense_outputs = run_batches(state.dense_gm, state.batches(calib))
            state.normalization = _check_normalization(state, state.dense_outputs)
            _damage_setup(state, state.dense_outputs)
    state.correct, state.outcome, state.masks = correct, outcome, outcome.masks
    state.sparse_gm = state.gm
    for name, why in outcome.fallbacks.items():
        state.warn(f"{name}: {why}")


def _enforce_accuracy(state: BuildState) -> None:
    """The accuracy guard on the held-back samples: restore the most damaging layers to dense (or fail, or
    warn, per --on-damage) until the sparse model is within budget."""
    options, progress, outcome, masks = state.options, state.progress, state.outcome, state.masks
    correct, n, m = state.correct, state.n, state.m

    def refit_all_but(dense_names: set[str]):
        """The dense model with the other masked layers masked (and updated) again and the correction
        refitted."""
        work = copy.deepcopy(state.dense_gm)
        keep = [layer for layer in state.eligible
                if layer.weight_target in masks and layer.name not in dense_names]
        fixed = FixedMasks(masks, n, m, outcome.updated if outcome.updated_weights else None)
        return work, sparsify(work, keep, state.layers, fixed, list(state.batches(state.fit_calib)),
                              sequential=options.sequential, correct=correct,
                              update_weights=outcome.updated_weights,
                              folded_batchnorm=state.folded_params)

    # nothing to refit without a correction, or with updated weights the build no longer has
    refit = refit_all_but if correct != "none" and (not outcome.updated_weights or outcome.updated) else None
    check_sparse = run_batches(state.sparse_gm, state.batches(state.check_calib))
    budget = _enforce_budget(state.sparse_gm, state.dense_gm, state.eligible, masks, state.assess,
                             lambda: list(state.batches(state.check_calib)), state.check_dense,
                             lambda: list(state.batches(state.fit_calib)), options, state.guard, progress, refit,
                             check_sparse=check_sparse)
    if not ((budget.initial.within or budget.signal == "none") and budget.graph is None and not budget.reverted):
        check_sparse = None  # the guard changed the model: those outputs are stale
    if budget.graph is not None:  # the refitted model replaces the sparse one, with its corrections
        state.sparse_gm = budget.graph
        outcome.corrections = budget.refit_outcome.corrections
        outcome.batchnorm_reestimated = budget.refit_outcome.batchnorm_reestimated
    for entry in budget.reverted:
        outcome.corrections.pop(entry["layer"], None)
    worst = budget.initial.worst
    if budget.reverted:
        state.notes.append(f"accuracy guard: with every eligible layer sparse, {worst.describe()}; "
                           f"{len(budget.reverted)} layer(s) went back to dense to stay within budget"
                           + (f"; {len(budget.skipped)} more stayed sparse (restoring them did not lower it)"
                              if budget.skipped else ""))
    if not masks:
        state.warn("every eligible layer went back to dense to meet the accuracy budget: this build is "
                   f"the dense model; try {'a learned method (--method gumbel)' if state.method.name == 'hessian' else '--method hessian or auto'}"
                   ", more calibration data, or a looser --max-drop / --max-error")
    state.budget, state.check_sparse = budget, check_sparse


def _verify(state: BuildState) -> None:
    """Check every sparse weight is N:M, compare the sparse model with the dense one (agreement, damage,
    per-layer output errors), and refuse NaN/Inf outputs before anything is written."""
    options, calib, check_calib, masks = state.options, state.calib, state.check_calib, state.masks
    dense_gm, sparse_gm, layers = state.dense_gm, state.sparse_gm, state.layers
    layer_records = _verify_layers(layers, state.outcome, dense_gm, sparse_gm, state.n, state.m)
    if state.permutation is not None:
        for record in layer_records:
            if record["name"] in state.permutation.layer_stats:
                record["permutation"] = state.permutation.layer_stats[record["name"]]
    # One forward of the sparse model over the calibration set serves agreement, the damage check (when
    # nothing was held back) and the ONNX Runtime check (when it covers the whole set).
    if not masks:
        sparse_outputs = state.dense_outputs
    elif state.check_sparse is not None and check_calib is calib:  # the guard measured this very model
        sparse_outputs = state.check_sparse
    else:
        sparse_outputs = run_batches(sparse_gm, state.batches(calib))
    state.agreement = compare_outputs(state.dense_outputs, sparse_outputs)
    # A model that outputs NaN/Inf is broken whatever the agreement says: fail before anything is written.
    check_outputs_finite(state.dense_outputs, sparse_outputs, "the sparse model")
    if state.budget is not None:  # the guard measured this very model on the held-back samples
        final_damage = state.budget.final
    else:
        final_damage = state.assess(state.check_dense, (sparse_outputs if check_calib is calib else
                                                        run_batches(sparse_gm, state.batches(check_calib)))
                                    if masks else state.check_dense)
    if not final_damage.within:
        state.warn(f"WARNING: the sparse model is over the accuracy budget on {final_damage.samples} "
                   f"{'held-back ' if check_calib is not calib else ''}samples: {final_damage.worst.describe()}"
                   + ("" if options.calib else " (random inputs: this says little about real data)"))
    if masks:
        masked_names = [layer.name for layer in layers if layer.weight_target in masks]
        measured = state.outcome.layer_errors or {}
        if all(name in measured for name in masked_names):  # sparsify measured them on these samples
            errors = {name: measured[name] for name in masked_names}
        else:
            subset = calib.subset(_sample_count(options.error_samples, calib.num_samples, state.loaded,
                                                state.batch_size))
            errors = layer_output_errors(dense_gm, layers, masks, state.batches(subset))
        for record in layer_records:
            if record["name"] in errors:
                record["output_error"] = errors[record["name"]]
    state.references = ({target: get_tensor(dense_gm, target).detach().clone() for target in masks}
                        if options.save_masks else {})
    if options.spectra or options.budget_signal == "mp":
        _spectra(dense_gm, layers, layer_records)
    state.layer_records, state.sparse_outputs, state.final_damage = layer_records, sparse_outputs, final_damage


def _certify_predictions(state: BuildState) -> None:
    """Margin certificates of the sparse model's predictions on calibration samples (--certify)."""
    calib = state.calib
    subset = calib.subset(_sample_count(state.options.certify_samples, calib.num_samples, state.loaded,
                                        state.batch_size))
    state.certificate, state.dense_values = _certify(state.dense_gm, state.sparse_gm, state.layers,
                                                     list(state.batches(subset)))


def _export(state: BuildState) -> None:
    """model.onnx (dense layout, sparse values) and model.pt2."""
    state.dense_gm = None  # not needed past verification and certification: free it before the export
    staging = state.staging
    state.onnx_info = export_onnx(state.sparse_gm, state.loaded.example_inputs, staging / "model.onnx",
                                  state.loaded.input_names, program_path=staging / "model.pt2",
                                  output_count=len(state.sparse_outputs))


def _check_onnxruntime(state: BuildState) -> None:
    """Run model.onnx on ONNX Runtime and compare it with the sparse torch model."""
    calib = state.calib
    check_data = calib.subset(_sample_count(16, calib.num_samples, state.loaded, state.batch_size))
    with OrtRunner(state.staging / "model.onnx") as runner:
        ort_outputs = [[] for _ in state.onnx_info["outputs"]]
        for batch in state.batches(check_data):
            for bucket, array in zip(ort_outputs, runner.infer([t.numpy() for t in batch])):
                bucket.append(torch.from_numpy(np.asarray(array)))
    ort_outputs = [torch.cat([b.reshape(1) if b.dim() == 0 else b for b in bucket]) for bucket in ort_outputs]
    torch_outputs = (state.sparse_outputs if state.masks and check_data.num_samples == calib.num_samples
                     else run_batches(state.sparse_gm, state.batches(check_data)))
    state.ort_check = compare_outputs(torch_outputs, ort_outputs)
    ort_worst = max((o["relative_error"] for o in state.ort_check), default=0.0)
    if ort_worst > ORT_TOLERANCE:
        raise SparseCompileError(
            f"ONNX Runtime outputs differ from the sparse torch model (relative error {ort_worst:.2e})"
        )


def _compress(state: BuildState) -> None:
    """weights.safetensors: the sparse layers' values and in-group indices (docs/format.md)."""
    state.compression = _write_weights(state.staging / "weights.safetensors", state.sparse_gm, state.layer_records,
                                       state.weights_dtype_name, state.n, state.m, state.target)
    state.compression["onnx_bytes"] = (state.staging / "model.onnx").stat().st_size


def _write_certificate(state: BuildState) -> None:
    write_certificate(state.staging, state.certificate, state.dense_values)


def _quantize(state: BuildState) -> None:
    """model.int8.onnx (--precision int8 with --calib), checked N:M and held to the accuracy budget."""
    state.quantization = _quantize_int8(state.staging, state.onnx_info, state.batches, state.fit_calib,
                                        state.check_calib, state.check_dense, state.sparse_gm, state.kinds,
                                        state.assess, state.guard, state.target, state.options,
                                        state.layer_records, state.progress, state.notes,
                                        pattern=(state.n, state.m))


def _write_engine_recipe(state: BuildState) -> None:
    """GPU targets: the TensorRT build recipe (the engine itself is built on the target: sparsecompile engine)."""
    target, staging, engine_precision = state.target, state.staging, state.engine_precision
    state.engine_info = {"status": "none", "note": f"target {target.name} runs the ONNX Runtime CPU fallback"}
    if target.kind != "gpu":
        return
    if engine_precision in QUANTIZED and state.quantization is None and not has_qdq(staging / "model.onnx"):
        raise SparseCompileError(
            f"--precision {engine_precision} needs calibration data (--calib: the build quantizes the sparse "
            "model itself) or an explicitly quantized model (QuantizeLinear/DequantizeLinear in the ONNX)")
    recipe = make_recipe(target, engine_precision, state.onnx_info["inputs"], state.onnx_info["dynamic_batch"],
                         state.options.batch, sparse_weights=(state.n, state.m) == (2, 4))
    if state.quantization is not None:  # TensorRT builds from the Q/DQ model the build wrote
        recipe["onnx"] = f"../{INT8_ONNX}"
    write_recipe(staging / ENGINE_DIR, recipe)
    state.engine_info = {"status": "recipe", "recipe": f"{ENGINE_DIR}/recipe.json", "precision": recipe["precision"],
                         "profile": recipe["profile"], "trtexec": trtexec_command(recipe),
                         "note": "build the engine on the target: sparsecompile engine BUILD_DIR"}


def _write_report(state: BuildState) -> None:
    """report.json, report.md and the manifest that hashes every file of the build."""
    options, target, saved, method = state.options, state.target, state.saved, state.method
    layer_records, outcome, guard, masks = state.layer_records, state.outcome, state.guard, state.masks
    permutation, onnx_info, calib, loaded, n, m = state.permutation, state.onnx_info, state.calib, state.loaded, state.n, state.m
    staging = state.staging
    sparse_count = sum(1 for r in layer_records if r["status"] == "sparse")
    total_weights = sum(r["weights"] for r in layer_records)
    sparse_weights = sum(r["weights"] for r in layer_records if r["status"] == "sparse")
    report = {
        "sparsecompile_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": options.source_label or loaded.source,
                   "kind": "in-memory" if options.source_label else loaded.source_kind,
                   "sha256": loaded.source_sha256},
        "target": target.to_json(),
        "method": method.name if saved is None else f"saved masks ({saved.method})",
        "method_choice": state.method_choice,
        "masks_file": ({"path": saved.path, "method": saved.method, "options": saved.options,
                        "chosen_on_sha256": saved.source_sha256} if saved is not None else None),
        "pattern": f"{n}:{m}",
        "pattern_accelerated": bool(state.accelerated and masks),
        "sparsified": bool(masks),
        "options": {
            "correct": state.correct, "sequential": options.sequential, "update_weights": outcome.updated_weights,
            "exclude": options.exclude, "min_weights": options.min_weights,
            "lower_conv": options.lower_conv, "weights_dtype": state.weights_dtype_name,
            "permute": permutation is not None, "permute_budget": options.permute_budget,
            "permute_effort": options.permute_effort,
            "preprocess": options.preprocess, "sparse_only_if_faster": options.sparse_only_if_faster,
            "max_drop": guard["max_drop"] if guard["on"] else None, "max_error": guard["max_error"],
            "on_damage": guard["on_damage"], "budget_signal": options.budget_signal,
            "max_steps": options.max_steps if state.learned else None,
            "precision": options.precision,
            "int8_calibration": options.int8_calibration if state.quantize_int8 else None,
        },
        "permutation": permutation.report() if permutation is not None else {"enabled": False},
        "inputs": onnx_info["inputs"],
        "outputs": onnx_info["outputs"],
        "notes": state.notes,
        "summary": {
            "layers": len(layer_records), "sparse_layers": sparse_count,
            "dense_layers": len(layer_records) - sparse_count,
            "gemm_weights": total_weights, "sparse_layer_weights": sparse_weights,
            "zeroed_weights": int(sum(r["weights"] * r.get("zero_fraction", 0.0) for r in layer_records)),
            "gemm_macs": sum(r.get("macs", 0) for r in layer_records),
            "sparse_layer_macs": sum(r.get("macs", 0) for r in layer_records if r["status"] == "sparse"),
        },
        "layers": layer_records,
        "batchnorm_reestimated": outcome.batchnorm_reestimated,
        "verification": {
            "calibration": {"source": calib.source, "samples": calib.num_samples,
                            "fit_samples": state.fit_calib.num_samples,
                            "held_back_samples": (state.check_calib.num_samples
                                                  if state.check_calib is not calib else 0)},
            "nm_check": "passed" if masks else "no sparse layers",
            "normalization_vs_original": state.normalization,
            "sparse_vs_dense": state.agreement,
            "damage": state.final_damage.to_json(),
            "onnxruntime_vs_torch": state.ort_check,
        },
        "compression": state.compression,
        "quantization": state.quantization,
        "engine": state.engine_info,
        "budget": state.budget.to_json() if state.budget is not None else None,
        "learning": state.learning,
        "certificate": certificate_summary(state.certificate) if state.certificate is not None else None,
        "passes": [
            {"name": r.name, "modified": r.modified, "seconds": round(r.seconds, 3), "stats": r.stats}
            for r in state.pass_records
        ],
        "timings": state.timings,
        # What the build cost until its report: wall time, peak resident memory of this process, threads.
        "resources": {"seconds": round(time.perf_counter() - state.started, 3),
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "torch_threads": torch.get_num_threads()},
        "environment": {
            "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(),
        },
    }
    write_reports(staging, report)
    files = {p.relative_to(staging).as_posix(): file_sha256(p) for p in sorted(staging.rglob("*")) if p.is_file()}
    manifest = {
        "format": BUILD_FORMAT, "version": BUILD_FORMAT_VERSION,
        "sparsecompile_version": __version__, "created": report["created"],
        "source": report["source"], "target": target.name, "pattern": f"{n}:{m}",
        "inputs": onnx_info["inputs"], "outputs": onnx_info["outputs"],
        "dynamic_batch": onnx_info["dynamic_batch"], "files": files,
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    state.report = report


def _save_masks(state: BuildState) -> None:
    """--save-masks: the chosen masks and the dense weights they were chosen on (after the build is in place)."""
    options, masks, saved = state.options, state.masks, state.saved
    if not masks:
        state.progress.warn("--save-masks: this build masked no layer; nothing saved")
        return
    save_masks(options.save_masks, masks, state.layers, state.references, (state.n, state.m),
               saved.method if saved is not None else state.method.name,
               {"correct": state.correct, "sequential": options.sequential, "min_weights": options.min_weights,
                "exclude": options.exclude},
               state.loaded.source_sha256, state.permutation.permutations if state.permutation is not None else {})
    state.progress.info(f"saved the masks of {len(masks)} layer(s) to {options.save_masks}")


def _host_builds_engine(state: BuildState) -> bool:
    """Whether this machine is the target GPU and has TensorRT (asked only once the build is in place)."""
    from sparsecompile.hardware import detect_host

    state.host = detect_host()
    return state.host.gpu_capability == state.target.compute_capability and state.host.tensorrt


def _build_engine(state: BuildState) -> None:
    """Build the TensorRT engine right away where this machine is the target (NOT RUN here: no GPU).

    The build is complete without it; a failure is a warning, and ``sparsecompile engine`` can retry.
    """
    from sparsecompile.engine.run import build_engine, engine_lines

    try:
        summary = build_engine(state.out, host=state.host)
    except SparseCompileError as exc:
        state.progress.warn(f"TensorRT engine not built ({exc}); the recipe is in {state.out}/engine/")
        return
    for line in engine_lines(summary):
        state.progress.info(line)


def _masks_title(state: BuildState) -> str:
    return f"selecting {state.n}:{state.m} masks ({'auto' if state.auto_method else state.method.name})"


# The build, in order (see Stage: a None title is a step without a progress line of its own).
STAGES = (
    Stage("load", "loading model", _load),
    Stage("normalize", "normalizing graph (remove identity, fold batch norm, shapes)", _normalize),
    Stage("permute", "permuting channels", _permute, enabled=lambda state: state.permute),
    Stage("lower", None, _lower_and_check),
    Stage("masks", _masks_title, _select_masks),
    # _learn_masks opens its line itself, after its checks and initial masks
    Stage("learn", None, _learn, own_line=True, enabled=lambda state: state.learned,
          needed=lambda state: bool(state.eligible)),
    Stage("budget", lambda state: f"checking accuracy on {state.check_calib.num_samples} held-back samples",
          _enforce_accuracy, enabled=lambda state: state.guard["on"], needed=lambda state: bool(state.masks)),
    Stage("verify", "verifying", _verify),
    Stage("certify", "certifying predictions on the calibration set", _certify_predictions,
          enabled=lambda state: state.options.certify, needed=lambda state: bool(state.masks)),
    Stage("onnx", "exporting ONNX", _export, writes=True),
    Stage("onnxruntime", "checking ONNX Runtime against torch", _check_onnxruntime, writes=True),
    Stage("compress", "compressing weights", _compress, writes=True),
    Stage("certificate", None, _write_certificate, writes=True, needed=lambda state: state.certificate is not None),
    Stage("int8", "quantizing to INT8 (ONNX Runtime Q/DQ)", _quantize, writes=True,
          enabled=lambda state: state.quantize_int8),
    Stage("recipe", None, _write_engine_recipe, writes=True),
    Stage("report", "writing report", _write_report, writes=True),
    Stage("save masks", None, _save_masks, enabled=lambda state: state.options.save_masks is not None),
    # counted only when it runs: whether this host can build the engine is asked once the build is in place
    Stage("engine", lambda state: f"building the TensorRT engine on this {state.host.gpu_name}", _build_engine,
          enabled=lambda state: state.target.kind == "gpu" and state.options.engine,
          needed=_host_builds_engine, expected=False),
)


def build(options: BuildOptions, progress: Progress | None = None) -> BuildResult:
    """Build ``options.model`` into ``options.output`` (see the README's build section)."""
    if options.threads is None:
        return _build(options, progress)
    if not isinstance(options.threads, int) or options.threads < 1:
        raise SparseCompileError(f"--threads must be a whole number >= 1, got {options.threads!r}")
    with torch_threads(options.threads):  # set once, for every stage (learning included), and restored after
        return _build(options, progress)


def _build(options: BuildOptions, progress: Progress | None = None) -> BuildResult:
    state = BuildState(options, progress or Progress(quiet=True))
    _check_options(state)
    _run_stages(STAGES, state)
    state.report["timings"]["total"] = round(time.perf_counter() - state.started, 3)
    return BuildResult(state.out, state.report)


def _run_stages(stages, state: BuildState) -> None:
    """Run the enabled ``stages`` in order: their progress lines, their count N, their timings (see Stage)."""
    progress = state.progress
    planned = [stage for stage in stages if stage.enabled(state)]
    progress.total = sum(1 for stage in planned if stage.counted and stage.expected)
    with contextlib.ExitStack() as build_dir:
        for stage in planned:
            if stage.writes and state.staging is None:
                state.staging = build_dir.enter_context(atomic_build_dir(state.out))
            elif not stage.writes and state.staging is not None:
                build_dir.close()  # the stages that write are done: the build directory goes in place
                state.staging = None
            if not stage.needed(state):
                if stage.counted and stage.expected:
                    progress.total -= 1  # nothing to do: off the count before the next line
                continue
            if stage.counted and not stage.expected:
                progress.total += 1  # runs after all: on the count from its own line on
            if not stage.counted:
                stage.run(state)
            elif stage.own_line:
                with _timed(state.timings, stage.name):
                    stage.run(state)
            else:
                title = stage.title(state) if callable(stage.title) else stage.title
                with progress.stage(title), _timed(state.timings, stage.name):
                    stage.run(state)


def _quantize_int8(staging: Path, onnx_info, batches, fit_calib, check_calib, check_dense, sparse_gm, kinds, assess,
                   guard, target, options, layer_records, progress, notes, pattern=(2, 4)) -> dict:
    """Quantize the sparse ``model.onnx`` to ``model.int8.onnx`` (sparsecompile/quantize.py) and report it.

    Activation ranges come from the fitting samples; layers that quantize badly stay float until the
    INT8 model is within the accuracy budget *against the dense model* on the held-back samples (one
    budget for sparsity and quantization together). The damage of sparsity alone (sparse fp32 vs
    dense), of quantization alone (INT8 vs sparse fp32) and of both (INT8 vs dense) is reported.
    Every sparse layer's int8 weight must still be 2:4 and keep every zero, or the build fails.
    Its weights go to ``weights.int8.safetensors``: sparse layers' int8 values compressed with their
    scales (docs/format.md), read back and compared with the Q/DQ model before the build goes on.
    """
    from sparsecompile import quantize
    from sparsecompile.builddir import INT8_WEIGHTS

    names = [spec["name"] for spec in onnx_info["inputs"]]

    def feeds(data):
        return [{name: tensor.numpy() for name, tensor in zip(names, batch)} for batch in batches(data)]

    fp32, out = staging / "model.onnx", staging / INT8_ONNX
    # uint8 activations for ONNX Runtime's x86 integer kernels; symmetric int8 for TensorRT (quantize.py).
    activations = "s8" if target.kind == "gpu" else "u8"
    held = feeds(check_calib)
    ranges = quantize.calibrate(fp32, feeds(fit_calib), options.int8_calibration)
    dense_reference = [tensor.numpy() for tensor in check_dense]
    if guard["on"]:
        info = quantize.keep_float(fp32, out, None, held, ranges=ranges, reference=dense_reference, kinds=kinds,
                                   max_drop=guard["max_drop"], max_error=guard["max_error"], activations=activations)
    else:
        info = quantize.quantize_onnx(fp32, out, ranges=ranges, activations=activations)
    sparse_weights = [r["weight"] for r in layer_records if r["status"] == "sparse"]
    n, m = pattern
    check = quantize.check_qdq_sparsity(out, sparse_weights, fp32_onnx=fp32, polygraphy=False, n=n, m=m)
    if not check["passed"]:
        raise SparseCompileError(f"INT8 quantization broke the {n}:{m} pattern: " + "; ".join(check["failures"][:3]))
    weights = quantize.write_int8_weights(out, staging / INT8_WEIGHTS, sparse_weights, n, m,
                                          {"target": target.name, "pattern": f"{n}:{m}", "dtype": "int8",
                                           "onnx": INT8_ONNX})
    int8_outputs = [torch.from_numpy(np.asarray(a)) for a in quantize.run_onnx(out, held, threads=None)]
    sparse_outputs = run_batches(sparse_gm, batches(check_calib))
    damage = {"sparsity": assess(check_dense, sparse_outputs).to_json(),
              "quantization": assess(sparse_outputs, int8_outputs).to_json(),
              "both": assess(check_dense, int8_outputs).to_json()}
    if not damage["both"]["within_budget"]:
        message = ("WARNING: the INT8 model is over the accuracy budget on the held-back samples even with "
                   f"{len(info.kept_float)} layer(s) kept float; ship model.onnx (fp32) or loosen --max-drop")
        progress.warn(message)
        notes.append(message)
    if info.kept_float:
        notes.append(f"INT8: {len(info.kept_float)} layer(s) kept in float: {', '.join(sorted(info.kept_float)[:5])}"
                     + (" ..." if len(info.kept_float) > 5 else ""))
    record = info.to_json()
    record["path"] = INT8_ONNX
    record["activations"] = activations
    record["bytes"] = out.stat().st_size
    record["sparsity_check"] = {k: check[k] for k in ("pattern", "passed", "failures", "required")}
    record["weights"] = {"path": INT8_WEIGHTS, **weights}
    record["damage"] = damage
    return record


def _guard_settings(options: BuildOptions) -> dict:
    """The accuracy guard's budgets from the options, checked before any work."""
    max_drop = options.max_drop
    if isinstance(max_drop, str):
        if max_drop.strip().lower() == "auto":
            max_drop = DEFAULT_MAX_DROP if options.calib else None
        elif max_drop.strip().lower() == "none":
            max_drop = None
        else:
            try:
                max_drop = float(max_drop)
            except ValueError:
                raise SparseCompileError(f"--max-drop '{options.max_drop}' is not a number of points, "
                                         "'auto' or 'none'") from None
    if max_drop is not None and not 0 <= max_drop < float("inf"):
        raise SparseCompileError(f"--max-drop must be a finite number of points >= 0, got {max_drop}")
    if not 0 < options.max_error < float("inf"):
        raise SparseCompileError(f"--max-error must be a finite percentage > 0, got {options.max_error}")
    if options.on_damage not in ON_DAMAGE:
        raise SparseCompileError(f"unknown --on-damage '{options.on_damage}'; valid: {', '.join(ON_DAMAGE)}")
    if not 0 < options.auto_time_cap < float("inf"):
        raise SparseCompileError(f"--auto-time-cap must be a positive number of seconds, got {options.auto_time_cap}")
    return {"on": max_drop is not None, "max_drop": DEFAULT_MAX_DROP if max_drop is None else max_drop,
            "max_error": options.max_error, "on_damage": options.on_damage,
            "kinds": parse_output_kinds(options.output_kind)}


def _enforce_budget(sparse_gm, dense_gm, eligible, masks, assess, check_batches, check_dense, fit_batches,
                    options, guard, progress, refit=None, check_sparse=None):
    """The accuracy guard: restore layers to dense (``--on-damage restore``), or measure and fail/warn.

    ``check_sparse``: ``sparse_gm``'s outputs on the check samples (computed once by the caller)."""
    if check_sparse is None:
        check_sparse = run_batches(sparse_gm, check_batches())
    if guard["on_damage"] != "restore":
        damage = assess(check_dense, check_sparse)
        result = BudgetResult(guard["max_drop"], guard["max_error"], damage, damage, signal="none")
        if not damage.within and guard["on_damage"] == "fail":
            errors = layer_output_errors(dense_gm, eligible, masks, fit_batches()[:2])
            worst_layers = sorted(errors, key=errors.get, reverse=True)[:3]
            raise SparseCompileError(
                f"the sparse model is over the accuracy budget on {damage.samples} held-back samples: "
                f"{damage.worst.describe()}; layers with the largest output error: {', '.join(worst_layers)}. "
                "Use --on-damage restore to keep the most sensitive layers dense, --method hessian or auto, "
                "or --max-drop none to build it anyway")
        return result
    priors = benefit = None
    if options.budget_signal == "mp":
        from sparsecompile.analysis.spectral import layer_spectrum, mp_sensitivity

        with torch_threads(1):
            priors = {layer.name: mp_sensitivity(layer_spectrum(get_tensor(dense_gm, layer.weight_target)))
                      for layer in eligible if layer.weight_target in masks}
    speeds = {layer.name: layer.extra.get("speed") for layer in eligible if layer.weight_target in masks}
    if speeds and all(speeds.values()):  # the target's speed model: time saved per layer
        benefit = {name: s["dense_us"] - s["sparse_us"] for name, s in speeds.items()}
    reason = ("the accuracy guard" if options.max_drop == "auto" else f"--max-drop {guard['max_drop']:g}")
    return enforce_budget(sparse_gm, dense_gm, eligible, masks, assess=assess, check_batches=check_batches,
                          check_dense=check_dense, fit_batches=fit_batches,
                          max_drop=guard["max_drop"], max_error=guard["max_error"], signal=options.budget_signal,
                          priors=priors, benefit=benefit, reason=reason, progress=progress, refit=refit,
                          initial_outputs=check_sparse)


def _choose_method(gm, eligible, layers, fit_batches, check_batches, check_dense, assess, options, folded_batchnorm,
                   n, m, progress, learn=None):
    """``--method auto``: build every candidate's masks and keep the least damaging on held-back samples.

    Candidates are AUTO_METHODS x {statistics correction, none} (only the asked correction when
    ``--correct`` is given), hessian both with weights unchanged and OBS-updated (only one of them
    with ``--update-weights`` / ``--keep-weights``), tried cheapest first on copies of the graph. The score is the accuracy
    guard's (largest damage / budget over the outputs); ties go to the earlier, cheaper candidate.
    ``--auto-time-cap`` stops trying further candidates, and the report says which were skipped. Equal
    scores (common: a few dozen held-back samples often show no changed prediction) go to the smaller
    relative error of the outputs.
    When even the best candidate is over the guard's budget and ``learn`` is given (``--auto-learned METHOD``,
    see ``_auto_learner``), masks are also learned with the best candidate's statistics correction, started from
    its masks, and kept if they measure less damaging (the record's ``learning`` is the learning record then).
    Returns (graph, method, correction, sparsify outcome, report record).
    """
    corrections = ([DEFAULT_CORRECTION, "none"] if options.correct == "auto" else [options.correct])
    # hessian both with surviving weights unchanged and OBS/SparseGPT-updated, unless --update-weights /
    # --keep-weights says which; the other methods cannot update.
    updates = {None: (False, True), True: (True,), False: (False,)}[options.update_weights]
    candidates = [(name, correct, update) for name in AUTO_METHODS
                  for update in (updates if name == "hessian" else (False,)) for correct in corrections]
    fit = fit_batches()
    started = time.perf_counter()
    tried, best, ranked = [], None, {}
    for name, correct, update in candidates:
        elapsed = time.perf_counter() - started
        entry = {"method": name, "correct": correct, **({"update_weights": True} if update else {})}
        if elapsed > options.auto_time_cap:
            tried.append({**entry, "skipped": f"--auto-time-cap {options.auto_time_cap:g}s reached after {elapsed:.0f}s"})
            continue
        candidate_method = get_method(name, n=n, m=m)
        work = copy.deepcopy(gm)
        began = time.perf_counter()
        progress.detail(f"--method auto: trying {_candidate_name(entry)}")
        try:
            outcome = sparsify(work, eligible, layers, candidate_method, fit if (candidate_method.needs
                                                                               or correct != "none") else [],
                               sequential=options.sequential, correct=correct, update_weights=update,
                               folded_batchnorm=folded_batchnorm)
        except (SparseCompileError, torch.linalg.LinAlgError) as exc:  # one candidate failing is not the build's end
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            tried.append({**entry, "failed": first, "seconds": round(time.perf_counter() - began, 2)})
            progress.warn(f"--method auto: {_candidate_name(entry)} failed ({first}); trying the others")
            continue
        damage = assess(check_dense, run_batches(work, check_batches()))
        record = {**entry, "score": round(damage.score, 4) if damage.score < float("inf") else None,
                  "worst": damage.worst.describe() if damage.worst else "",
                  "seconds": round(time.perf_counter() - began, 2)}
        tried.append(record)
        progress.info(f"      auto: {_candidate_name(entry):<40}  {record['worst'] or 'no outputs'}")
        # The guard's score first; the outputs' relative error breaks ties. On a few dozen held-back samples many
        # candidates change no prediction (score 0), and the first of them is not the best: measured on the OCR
        # line classifier, activation + bias also showed 0 there but lost 1.5 points on 800 evaluation images
        # where hessian + bias lost none.
        key = damage.order_key
        record["relative_error"] = round(key[1], 6)
        item = (key, work, candidate_method, correct, outcome, record)
        if best is None or key < best[0]:
            best = item
        # The per-layer choice (below) mixes only candidates with the best one's statistics correction: masks
        # chosen for a bias-corrected layer ignore its mean shift and are disastrous without the correction
        # (measured on the OCR recognizer: a mix across corrections lost 52.6 points where the best single
        # candidate lost 3.4). So the best few graphs of each correction are kept until the best is known.
        if options.per_layer:
            same = ranked.setdefault(correct, [])
            same.append(item)
            same.sort(key=lambda entry: entry[0])  # stable: equal keys keep the cheaper, earlier candidate first
            del same[PER_LAYER_CANDIDATES:]
    skipped = [t for t in tried if "skipped" in t]
    if skipped:
        progress.warn(f"--method auto: {len(skipped)} candidate(s) not tried: --auto-time-cap "
                      f"{options.auto_time_cap:g}s reached (the choice may differ on a faster machine)")
    if best is None:
        failures = "; ".join(f"{_candidate_name(t)}: {t['failed']}" for t in tried if "failed" in t)
        raise SparseCompileError(f"every --method auto candidate failed or was skipped ({failures or 'none tried'})")
    over_budget = not best[0][0] <= 1.0
    learned_item = None
    if learn is not None:
        learned_item = _learned_candidate(gm, eligible, layers, fit, check_batches, check_dense, assess, options,
                                          folded_batchnorm, progress, learn, best, over_budget, started, tried)
        if learned_item is not None and learned_item[0] < best[0]:
            best = learned_item
    elif over_budget:
        progress.info("      auto: every candidate is over the budget; the guard restores layers to dense. "
                      "--auto-learned gumbel also tries learned masks (slow on a CPU)")
    _, work, chosen, correct, outcome, record = best[:6]
    runner_up = min((t["score"] for t in tried if t is not record and t.get("score") is not None), default=None)
    choice = {"chosen": {"method": chosen.name, "correct": correct,
                         **({"update_weights": True} if outcome.updated_weights else {})}, "tried": tried,
              "measured_on": "held-back calibration samples",
              "margin_to_next": None if runner_up is None or record["score"] is None
              else round(runner_up - record["score"], 4), "skipped": len(skipped)}
    if learned_item is not None:
        choice["learning"] = learned_item[6] if best is learned_item else None
        if best is learned_item:
            choice["chosen"]["learned"] = True
    same = ranked.get(correct, [])
    ranked.clear()
    if options.per_layer and best is not learned_item and not best[0][0] <= 1.0 and len(same) > 1:
        mixed = _mix_per_layer(gm, eligible, layers, same, fit, check_batches, check_dense, assess, options,
                               folded_batchnorm, n, m, progress)
        choice["per_layer"] = mixed["record"]
        if mixed.get("graph") is not None:
            work, chosen, outcome = mixed["graph"], mixed["method"], mixed["outcome"]
            choice["chosen"] = {"method": chosen.name, "correct": correct,
                                **({"update_weights": True} if mixed["updated"] else {}),
                                "per_layer": mixed["record"]["layers_from"]}
    choice["seconds"] = round(time.perf_counter() - started, 2)
    return work, chosen, correct, outcome, choice


def _learned_candidate(gm, eligible, layers, fit, check_batches, check_dense, assess, options, folded_batchnorm,
                       progress, learn, best, over_budget, started, tried):
    """``--auto-learned``: learn masks (weights frozen) with the best heuristic candidate's statistics correction,
    started from its masks, and measure them like the other candidates. Only when that candidate is over budget
    (within it there is no damage for learning to win back) and within ``--auto-time-cap``; otherwise the
    record says why it was not tried. Returns the candidate's item (key, graph, method, correction, outcome,
    record, learning record) or None."""
    _, _, best_method, correct, _, best_record = best
    entry = {"method": options.auto_learned, "correct": correct, "learned": True, "from": _candidate_name(best_record)}
    elapsed = time.perf_counter() - started
    if not over_budget:
        tried.append({**entry, "skipped": f"not needed: {_candidate_name(best_record)} is within the budget"})
        return None
    if elapsed > options.auto_time_cap:
        tried.append({**entry, "skipped": f"--auto-time-cap {options.auto_time_cap:g}s reached after {elapsed:.0f}s"})
        progress.warn(f"--method auto: --auto-learned {options.auto_learned} not tried: --auto-time-cap "
                      f"{options.auto_time_cap:g}s reached")
        return None
    began = time.perf_counter()
    work = copy.deepcopy(gm)
    try:
        method, learning = learn(work, correct, best_method.name)
        outcome = sparsify(work, eligible, layers, method, fit if (method.needs or correct != "none") else [],
                           sequential=options.sequential, correct=correct, update_weights=False,
                           folded_batchnorm=folded_batchnorm)
    except SparseCompileError as exc:  # e.g. the loss diverged: the heuristic candidates stand
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        tried.append({**entry, "failed": first, "seconds": round(time.perf_counter() - began, 2)})
        progress.warn(f"--method auto: --auto-learned {options.auto_learned} failed ({first}); "
                      "keeping the heuristic candidates")
        return None
    damage = assess(check_dense, run_batches(work, check_batches()))
    key = damage.order_key
    record = {**entry, "init": (learning.get("options") or {}).get("init"), "steps": learning.get("steps"),
              "best_step": learning.get("best_step"), "stop_reason": learning.get("stop_reason"),
              "score": round(damage.score, 4) if damage.score < float("inf") else None,
              "worst": damage.worst.describe() if damage.worst else "", "relative_error": round(key[1], 6),
              "seconds": round(time.perf_counter() - began, 2)}
    tried.append(record)
    progress.info(f"      auto: {options.auto_learned + ' (learned) --correct ' + correct:<40}  "
                  f"{record['worst'] or 'no outputs'}"
                  f"{'' if key < best[0] else '  (not better than ' + _candidate_name(best_record) + ')'}")
    return key, work, method, correct, outcome, record, learning


def _mix_per_layer(dense_gm, eligible, layers, ranked, fit, check_batches, check_dense, assess, options,
                   folded_batchnorm, n, m, progress) -> dict:
    """Per-layer choice for ``--method auto``: each layer takes the mask of whichever of the best candidates
    damages the model least *with that layer alone sparse*, and the mix is kept only when it measures less
    damaging than the best single candidate on the held-back samples.

    Runs only when the best candidate is over the guard's budget (within it, there is no damage to win back).
    ``ranked``: the best candidates with the best one's statistics correction (key, graph, method, correction,
    outcome, record), best first. Each layer is
    judged like the guard's sensitivity (budget.py): the dense model with only that layer's sparse weight (and
    corrected bias) from the candidate, on the first SENSITIVITY_SAMPLES fitting samples, by the guard's score
    and then the outputs' relative error; ties keep the best candidate's mask. The mix is then rebuilt from the
    dense model with those masks (and each candidate's OBS-updated weights where it had them) and the best
    candidate's statistics correction fitted again, so later layers' corrections see the mixed earlier ones.
    Returns ``{"record": ..., "graph", "method", "outcome", "updated"}`` (all but the record only when the mix
    won; ``updated``: whether any layer took OBS-updated weights).
    """
    from sparsecompile.budget import damage_alone, layer_params, sensitivity_samples

    began = time.perf_counter()
    best_key, correct = ranked[0][0], ranked[0][3]
    names = [_candidate_name(item[5]) for item in ranked]
    sample = sensitivity_samples(fit)
    reference = run_batches(dense_gm, sample)
    masked_layers = [layer for layer in eligible if all(layer.weight_target in item[4].masks for item in ranked)]
    source: dict[str, int] = {}
    progress.detail(f"--method auto: per-layer choice among {', '.join(names)} ({len(masked_layers)} layers)")
    for layer in progress.bar(masked_layers, "per-layer choice"):
        params = layer_params(ranked[0][1], layer)
        keys = [damage_alone(dense_gm, {p: get_tensor(graph, p) for p in params}, assess, sample, reference).order_key
                for _, graph, *_rest in ranked]
        source[layer.weight_target] = min(range(len(ranked)), key=lambda i: (keys[i], i))
    counts = {names[i]: sum(1 for v in source.values() if v == i) for i in range(len(ranked))}
    record = {"candidates": names, "layers_from": {k: v for k, v in counts.items() if v}}
    if not any(source.values()):
        record.update(adopted=False, why="every layer did least damage with the best candidate's mask",
                      seconds=round(time.perf_counter() - began, 2))
        progress.info("      auto: per-layer choice: every layer kept the best candidate's mask")
        return {"record": record}
    masks, weights = {}, {}
    for layer in masked_layers:
        item = ranked[source[layer.weight_target]]
        outcome_i = item[4]
        masks[layer.weight_target] = outcome_i.masks[layer.weight_target]
        weights[layer.weight_target] = (outcome_i.updated[layer.weight_target] if outcome_i.updated_weights
                                        else get_tensor(dense_gm, layer.weight_target).clone())
    fixed = FixedMasks(masks, n, m, weights)
    fixed.name, fixed.description = "per-layer", "per-layer choice among --method auto's best candidates"
    work = copy.deepcopy(dense_gm)
    outcome = sparsify(work, [layer for layer in eligible if layer.weight_target in masks], layers, fixed,
                       fit if (correct != "none") else [], sequential=options.sequential, correct=correct,
                       update_weights=True, folded_batchnorm=folded_batchnorm)
    damage = assess(check_dense, run_batches(work, check_batches()))
    key = damage.order_key
    record.update(score=round(damage.score, 4) if damage.score < float("inf") else None,
                  worst=damage.worst.describe() if damage.worst else "", relative_error=round(key[1], 6),
                  best_single_score=round(best_key[0], 4) if best_key[0] < float("inf") else None,
                  adopted=key < best_key, seconds=round(time.perf_counter() - began, 2))
    progress.info(f"      auto: {'per-layer mix':<40}  {record['worst'] or 'no outputs'}"
                  f"{'' if record['adopted'] else '  (not better: kept the best single candidate)'}")
    if not record["adopted"]:
        record["why"] = "the mix measured no less damaging than the best single candidate on the held-back samples"
        return {"record": record}
    updated = any(ranked[index][4].updated_weights for index in source.values())
    if not updated:  # plain masks of the dense weights, as far as the report and the guard's refit are concerned
        outcome.updated_weights, outcome.updated = False, {}
    return {"record": record, "graph": work, "method": fixed, "outcome": outcome, "updated": updated}



def _candidate_name(entry: dict) -> str:
    """``hessian --update-weights --correct bias``: how a --method auto candidate reads in lines."""
    return f"{entry['method']}{' --update-weights' if entry.get('update_weights') else ''} --correct {entry['correct']}"


class SecondaryRank(Exception):
    """Raised on ranks other than 0 of a data-parallel (torchrun) build once the masks are learned:
    rank 0 alone writes the build directory."""

    def __init__(self, rank: int):
        super().__init__(f"rank {rank}: masks learned; rank 0 writes the build")
        self.rank = rank


def _init_distributed() -> tuple[int, int, bool]:
    """Join the torchrun process group if launched by torchrun (gloo on CPU, nccl on GPUs).

    Returns (world size, rank, whether this call created the group and so must destroy it).
    """
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 1, 0, False
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_world_size(), dist.get_rank(), created


def _leave_distributed(created: bool) -> None:
    """All ranks are done with collectives: wait for each other, then tear the group down (if ours).

    Without this, rank 1 leaves while rank 0 still writes the build and each process's communicator
    is torn down at interpreter exit, in whatever order; an explicit barrier and destroy is the
    documented clean shutdown.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        if created:
            dist.destroy_process_group()


# --learn-option keys that set the shared training loop (TrainConfig) rather than the method.
LOOP_OPTIONS = ("feature_weight", "lr", "batch_size", "patience", "eval_every", "holdout_fraction", "optimizer",
                "lr_schedule", "warmup_fraction", "min_lr_fraction")


def _learn_masks(method, gm, layers, calib, options, loaded, progress, chunks, correct: str,
                 folded_batchnorm: dict, fit_index: list[int] | None = None,
                 total_samples: int | None = None, own_stage: bool = True) -> dict:
    """Learn the masks of every eligible layer at once (weights frozen); returns the report's record.

    ``chunks()`` gives the calibration batches, for initial masks from a data-driven heuristic. The masks
    are learned under the statistics correction ``correct`` that the build applies after them
    (``learned/correction.py``).
    """
    from sparsecompile.learned import learn_masks
    from sparsecompile.learned.gumbel import HEURISTIC_INITS

    if calib.source == "random":
        raise SparseCompileError(f"--method {method.name} learns from data: pass --calib (a few hundred to a few "
                                 "thousand unlabelled inputs)")
    if options.resume and not options.checkpoint:
        raise SparseCompileError("--resume needs --checkpoint FILE (the checkpoint to continue from)")
    labels = None
    if options.labels is not None:
        from sparsecompile.calibration import load_labels

        labels = load_labels(options.labels)  # no pickle, header checked, integers only
        total = total_samples or calib.num_samples  # the whole calibration set, held-back samples included
        if labels.ndim != 1 or len(labels) != total:
            raise SparseCompileError(f"--labels must hold one integer label per calibration sample "
                                     f"({total}), got shape {tuple(labels.shape)}")
        if fit_index is not None:  # the held-back samples check the masks; they do not train them
            labels = labels[torch.as_tensor(fit_index, dtype=torch.long)]
    config, method_options = _learning_config(method, options, loaded)
    config.correct = correct
    every = max(1, options.max_steps // 10)
    clock = {"start": None, "last": 0.0}

    def report_progress(step, loss, agreement, held_out, info):
        now = time.perf_counter()
        if clock["start"] is None:  # timed from the first step, so resumed runs estimate from this run's pace
            clock["start"], clock["first"] = now, step
        elapsed = now - clock["start"]
        # Every tenth of the run, and at least every 30 s, so a slow run shows its pace early.
        if step % every == 0 or step == options.max_steps or elapsed - clock["last"] >= 30.0:
            clock["last"] = elapsed
            done = step - clock["first"]
            eta = elapsed / done * (options.max_steps - step) if done > 0 else None
            if eta is not None and options.time_budget:
                eta = min(eta, max(0.0, options.time_budget - elapsed))
            pace = f", {elapsed:.0f}s elapsed" + (f", ETA {eta:.0f}s" if eta is not None and step < options.max_steps
                                                   else "")
            agree = "" if agreement is None else f", held-out agreement with dense {100 * agreement:.1f}%"
            progress.info(f"      step {step}/{options.max_steps}: loss {loss:.4g}{agree}{_mask_state(info)}{pace}")

    world, rank, created = _init_distributed()
    if rank != 0:
        progress.quiet = True
    init_masks = None
    init = getattr(method_options, "init", None)  # Gumbel only
    if init in HEURISTIC_INITS:
        init_masks = _initial_masks(init, gm, layers, chunks, options, method, progress, world)
    title = (f"learning {method.n}:{method.m} masks ({method.name}, at most {options.max_steps} steps"
             + (f" or {options.time_budget:g}s" if options.time_budget else "") + ")")
    if not own_stage:  # a --method auto candidate: inside the masks stage's line
        progress.info(f"      auto: {title}" + (f", started from the {init} masks" if init in HEURISTIC_INITS else ""))
    with progress.stage(title) if own_stage else contextlib.nullcontext():
        result = learn_masks(method.name, gm, calib.inputs, layers=layers, options=method_options,
                             config=config, labels=labels, callback=report_progress,
                             checkpoint_path=options.checkpoint, folded_batchnorm=folded_batchnorm,
                             **({"init_masks": init_masks} if init_masks else {}),
                             resume=options.checkpoint if options.resume else None)
    method.masks = result.masks
    if world > 1:
        _leave_distributed(created)
    if rank != 0:
        raise SecondaryRank(rank)
    return {"method": result.method, "steps": result.steps, "data_parallel_ranks": world, "best_step": result.best_step,
            "best_held_out": result.best_held_out, "stop_reason": result.stop_reason,
            "wall_time_s": round(result.wall_time_s, 2), "held_out": result.held_out,
            "objective": result.objective, "options": dict(options.learn_options),
            "feature_weight": config.feature_weight, "correct_in_loop": correct,
            "max_steps": options.max_steps, "time_budget_s": options.time_budget}


def _learning_config(method, options, loaded):
    """(TrainConfig, the method's options dataclass) from the build options; a one-line error for a bad
    --learn-option."""
    from sparsecompile.learned import TrainConfig, typed_options
    from sparsecompile.learned import method_options as learned_method_options

    method_values = {k: v for k, v in options.learn_options.items() if k not in LOOP_OPTIONS}
    loop_options = {k: (None if v == "none" else v) for k, v in options.learn_options.items() if k in LOOP_OPTIONS}
    if "batch_size" in loop_options and not loaded.dynamic_batch:
        raise SparseCompileError(f"--learn-option batch_size: this model takes batches of exactly {loaded.batch_size}")
    config = TrainConfig(max_steps=options.max_steps, time_budget_s=options.time_budget, seed=options.seed,
                         objective=options.objective, static_batch=not loaded.dynamic_batch,
                         batch_size=None if loaded.dynamic_batch else loaded.batch_size,  # None: the method's
                         checkpoint_every=50 if options.checkpoint else None)
    for key, value in typed_options(TrainConfig, loop_options, "--learn-option").items():
        setattr(config, key, value)
    method_options = learned_method_options(method.name, method_values,
                                            unknown_hint=f"; training-loop options: {', '.join(LOOP_OPTIONS)}")
    config.validate()
    return config, method_options


def _initial_masks(name, gm, layers, chunks, options, method, progress, world: int) -> dict:
    """``name``'s masks for the learned layers (weights unchanged, no correction), to initialise the logits.

    Computed like a ``--method name --correct none`` build (sequential calibration unless ``--one-shot``)
    on a copy of ``gm``; with several ranks, rank 0's masks are sent to all so every rank starts alike.
    """
    heuristic = get_method(name, method.n, method.m)
    eligible = [layer for layer in layers if layer.reason is None]
    progress.detail(f"initialising the Gumbel logits from {name} masks")
    started = time.perf_counter()
    outcome = sparsify(copy.deepcopy(gm), eligible, layers, heuristic, chunks(), sequential=options.sequential,
                       correct="none")
    masks = outcome.masks
    if world > 1:
        import torch.distributed as dist

        device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # nccl sends CUDA tensors only
        for target in sorted(masks):
            values = masks[target].to(device=device, dtype=torch.uint8)
            dist.broadcast(values, src=0)
            masks[target] = values.bool().to(masks[target].device)
    progress.detail(f"{name} masks in {time.perf_counter() - started:.1f}s")
    return masks


def _mask_state(info: dict) -> str:
    """How far the learned masks have settled, for the progress line (the learner's progress_info)."""
    if "fraction_2to4" in info:  # ProxSparse: groups whose regularised weights are already exactly 2:4
        return f", groups already N:M {100 * info['fraction_2to4']:.1f}%"
    if "mean_max_probability" in info:  # Gumbel: how sure the pattern distributions are; moves away from init
        return (f", pattern confidence {100 * info['mean_max_probability']:.1f}%, "
                f"patterns changed from init {100 * info.get('changed_from_init', 0.0):.1f}%")
    return ""


def _spectra(dense_gm, layers, layer_records) -> dict:
    """Marchenko-Pastur diagnostics of every layer's dense weight, into the layer records (and returned)."""
    from sparsecompile.analysis.spectral import layer_spectrum, mp_sensitivity

    result = {}
    by_name = {record["name"]: record for record in layer_records}
    with torch_threads(1):  # small SVDs: many threads on a shared machine are far slower
        for layer in layers:
            if layer.weight_target is None or len(layer.weight_shape) < 2:
                continue
            spectrum = layer_spectrum(get_tensor(dense_gm, layer.weight_target))
            spectrum["mp_sensitivity"] = mp_sensitivity(spectrum)
            result[layer.name] = spectrum
            if layer.name in by_name:
                by_name[layer.name]["spectrum"] = {k: spectrum[k] for k in (
                    "q", "sigma2", "edge", "spikes", "bulk_energy_fraction", "mp_sensitivity", "reliable")}
    return result


def _certify(dense_gm, sparse_gm, layers, batches) -> tuple[dict, dict]:
    """The certificate on calibration batches, and the dense values of every tensor the build changed
    (what ``sparsecompile certify`` needs to rebuild the dense model from model.pt2)."""
    from sparsecompile.analysis.certify import certify

    with torch_threads(1):
        result = certify(dense_gm, sparse_gm, layers, batches)
    dense_state = dict(dense_gm.named_parameters()) | dict(dense_gm.named_buffers())
    changed = {}
    for name, value in list(sparse_gm.named_parameters()) + list(sparse_gm.named_buffers()):
        before = dense_state.get(name)
        if before is None:
            changed[name] = torch.zeros_like(value.detach())
        elif before.shape != value.shape or not torch.equal(before, value):
            changed[name] = before.detach().clone()
    return result, changed


def _layer_macs(gm, layers, example_batch: int) -> None:
    """Multiply-accumulates per sample of every layer (``layer.extra['macs']``), from its GEMM shape."""
    nodes = {node.name: node for node in gm.graph.nodes}
    for layer in layers:
        node = nodes.get(layer.node_name)
        if node is None or layer.reduction_axis is None:
            continue
        dims = gemm_dims(node, layer.weight_shape, layer.reduction_axis, example_batch)
        if dims is not None:
            layer.extra["macs"] = dims.m_per_sample * dims.n * dims.k


def _predict_speed(gm, layers, target, options, static_batch: int | None) -> list[str]:
    """Speed-model prediction per eligible layer (``layer.extra['speed']``); with
    ``--sparse-only-if-faster`` the layers not predicted faster stay dense. Returns notes."""
    if not target.sparse_tensor_cores or target.name not in DEVICES or tuple(options.pattern) != (2, 4):
        return []
    batch = static_batch or (options.batch[1] if options.batch else 8)
    nodes = {node.name: node for node in gm.graph.nodes}
    flagged = []
    for layer in layers:
        if layer.reason is not None or layer.node_name not in nodes:
            continue
        dims = gemm_dims(nodes[layer.node_name], layer.weight_shape, layer.reduction_axis, batch)
        prediction = predict(dims, target.name, batch) if dims else None
        if prediction is None:
            continue
        layer.extra["speed"] = prediction
        reason = not_faster_reason(prediction, target.name)
        if reason:
            flagged.append(layer.name)
            if options.sparse_only_if_faster:
                layer.reason = reason
    if not flagged:
        return []
    shown = ", ".join(flagged[:6]) + (f" and {len(flagged) - 6} more" if len(flagged) > 6 else "")
    if options.sparse_only_if_faster:
        return [f"--sparse-only-if-faster: {len(flagged)} layer(s) left dense, not predicted faster on "
                f"{target.name} (speed model, uncalibrated): {shown}"]
    return [f"speed model (uncalibrated): {len(flagged)} layer(s) will likely stay dense in TensorRT on {target.name} "
            f"(under {MIN_CHANNELS} channels, or no predicted gain): {shown}; --sparse-only-if-faster leaves them dense"]


def _verify_layers(layers, outcome, dense_gm, sparse_gm, n: int, m: int) -> list[dict]:
    """Per-layer report records; checks every sparse weight independently (N:M, kept values)."""
    weights_changed = outcome.updated_weights or bool(outcome.corrections)
    records = []
    for layer in layers:
        record = {
            "name": layer.name, "op": layer.op, "node": layer.node_name, "weight": layer.weight_target,
            "shape": list(layer.weight_shape), "reduction_axis": layer.reduction_axis,
            "weights": layer.numel, "status": "dense", "reason": layer.reason,
        }
        if "speed" in layer.extra:
            record["speed"] = layer.extra["speed"]
        if "macs" in layer.extra:
            record["macs"] = layer.extra["macs"]
        if "mask_reuse" in layer.extra:
            record["mask_reuse"] = layer.extra["mask_reuse"]
        mask = outcome.masks.get(layer.weight_target)
        if mask is not None:
            dense_weight = get_tensor(dense_gm, layer.weight_target)
            sparse_weight = get_tensor(sparse_gm, layer.weight_target)
            violations = count_nm_violations(sparse_weight, layer.reduction_axis, n, m)
            if violations:
                raise SparseCompileError(
                    f"internal error: layer '{layer.name}' is not {n}:{m} along axis {layer.reduction_axis} "
                    f"({violations} bad groups); please report this"
                )
            # Elementwise, no gathers: a kept weight that differs (NaN included, as torch.equal had it).
            kept = not bool(((sparse_weight != dense_weight) & mask).any())
            if not kept and not weights_changed:
                raise SparseCompileError(f"internal error: kept weights of '{layer.name}' changed value")
            # float32 values summed into a float64 accumulator: no float64 copy of the weight (25M weights on
            # ResNet-50 made that the slowest part of verification).
            magnitude = dense_weight.abs()
            total = float(magnitude.sum(dtype=torch.float64))
            kept_magnitude = float(torch.where(mask, magnitude, 0).sum(dtype=torch.float64))
            record.update(
                status="sparse", reason=None,
                kept_weights="unchanged" if kept else (
                    "updated (--update-weights)" if outcome.updated_weights else "rescaled per output row (--correct)"),
                retained_magnitude=kept_magnitude / total if total else 1.0,
                zero_fraction=(sparse_weight.numel() - int(torch.count_nonzero(sparse_weight))) / max(sparse_weight.numel(), 1),
            )
        if layer.name in outcome.fallbacks:
            record["mask_note"] = outcome.fallbacks[layer.name]
        if layer.name in outcome.corrections:
            record["correction"] = outcome.corrections[layer.name]
        records.append(record)
    return records


def _write_weights(path: Path, gm, layer_records: list[dict], dtype_name: str, n: int, m: int, target) -> dict:
    """weights.safetensors: sparse layers compressed, everything else plain; returns the size summary."""
    dtype = _DTYPES[dtype_name]
    sparse_entries, dense_entries = {}, {}
    by_target = {r["weight"]: r for r in layer_records}
    for name, tensor in list(gm.named_parameters()) + list(gm.named_buffers()):
        value = tensor.detach()
        if value.is_floating_point():
            value = value.to(dtype)
        record = by_target.get(name)
        if record is not None and record["status"] == "sparse":
            entry = compress(value, record["reduction_axis"], n, m)
            sparse_entries[name] = entry
            record["compressed_bytes"] = entry.nbytes
            record["dense_fp16_bytes"] = entry.dense_nbytes(torch.float16)
        else:
            dense_entries[name] = value.contiguous()
    save_weights(path, sparse_entries, dense_entries, {"target": target.name, "pattern": f"{n}:{m}", "dtype": dtype_name})
    compression = size_summary(sparse_entries) if sparse_entries else {}
    compression["weights_dtype"] = dtype_name
    compression["file_bytes"] = path.stat().st_size
    return compression


def _sample_count(wanted: int, available: int, loaded, batch_size: int) -> int:
    """Samples for a check: ``wanted`` (capped by what exists); a static batch needs one full batch."""
    count = min(wanted, available)
    return count if loaded.dynamic_batch else max(count, batch_size)


class _BuildModule(types.ModuleType):
    """``sparsecompile.build`` is this module and, called, the Python entry point:
    ``sparsecompile.build(model, "build/", calib=x, target="a100", **options)`` runs
    :func:`sparsecompile.api.build_model` (a model in memory or a path; any BuildOptions field)."""

    def __call__(self, model, output: str | Path = "build", **kwargs) -> BuildResult:
        from sparsecompile.api import build_model

        return build_model(model, output, **kwargs)


sys.modules[__name__].__class__ = _BuildModule
