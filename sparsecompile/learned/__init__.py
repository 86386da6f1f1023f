"""Learned N:M masks: Gumbel-softmax pattern logits and ProxSparse (proximal 2:4 regulariser).

Both methods share one training loop (:mod:`sparsecompile.learned.train`):
label-free by default (match the dense model's outputs on calibration
inputs), Adam with a decaying learning rate, early stopping on a held-out
slice, seeded and resumable from safetensors + JSON checkpoints. Neither
changes the module's weights; both return masks (``dict[weight_target,
bool tensor]``, exactly N:M along each layer's reduction axis) and the
matching sparse weights ``where(mask, W0, 0)``.

    from sparsecompile.learned import learn_gumbel_masks, TrainConfig
    result = learn_gumbel_masks(gm, calib_images, config=TrainConfig(max_steps=400))
    result.masks        # {weight_target: bool mask}
"""

from sparsecompile.learned.gumbel import GumbelMaskLearner, GumbelOptions, learn_gumbel_masks
from sparsecompile.learned.patterns import keep_patterns, mask_to_patterns, num_patterns, patterns_to_mask
from sparsecompile.learned.proxsparse import (
    ProxSparseLearner, ProxSparseOptions, enum_alm, enum_pgd, learn_proxsparse_masks,
)
from sparsecompile.learned.train import (
    MaskLearner, MaskTrainer, TrainConfig, TrainingInterrupted, TrainResult, masked_weights, train_masks,
    typed_options,
)

def learned_methods() -> dict:
    """``{name: MaskMethod class}`` of the learned methods: those of ``sparsecompile.masks.MASK_METHODS``
    with ``learned = True`` (the one registry; each class names its learn function and options)."""
    from sparsecompile.masks import MASK_METHODS

    return {name: cls for name, cls in MASK_METHODS.items() if cls.learned}


def _learned_method(method: str):
    from sparsecompile.errors import SparseCompileError

    methods = learned_methods()
    if method not in methods:
        raise SparseCompileError(f"unknown learned mask method '{method}'; valid: {', '.join(sorted(methods))}")
    return methods[method]


def method_options(method: str, values: dict | None = None, unknown_hint: str = ""):
    """The options dataclass of ``method`` from a dict (unknown keys are an error naming the valid ones,
    followed by ``unknown_hint``)."""
    from dataclasses import fields

    from sparsecompile.errors import SparseCompileError

    _, cls = _learned_method(method).learner()
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values or {}) - known)
    if unknown:
        raise SparseCompileError(f"unknown {method} option(s): {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
                                 + unknown_hint)
    options = cls(**typed_options(cls, values or {}, f"{method} option"))
    options.validate()
    return options


def learn_masks(method: str, gm, inputs, *, options=None, **kwargs) -> TrainResult:
    """Dispatch to the learn function of ``method`` (:func:`learn_gumbel_masks`, :func:`learn_proxsparse_masks`).

    ``options`` is the method's options dataclass or a dict of its fields; ``kwargs`` go to the method
    (``layers``, ``config``, ``labels``, ``callback``, ``checkpoint_path``, ``resume``, and for Gumbel
    ``n``, ``m``, ``init_masks``).
    """
    learn, options_class = _learned_method(method).learner()
    if options is None or isinstance(options, dict):
        options = method_options(method, options)
    elif not isinstance(options, options_class):
        raise TypeError(f"{type(options).__name__} given for method '{method}'")
    return learn(gm, inputs, options=options, **kwargs)

__all__ = [
    "GumbelMaskLearner", "GumbelOptions", "MaskLearner", "MaskTrainer", "ProxSparseLearner",
    "ProxSparseOptions", "TrainConfig", "TrainResult", "TrainingInterrupted", "enum_alm", "enum_pgd",
    "keep_patterns", "learn_gumbel_masks", "learn_masks", "learned_methods", "learn_proxsparse_masks", "mask_to_patterns",
    "masked_weights", "method_options", "typed_options",
    "num_patterns", "patterns_to_mask", "train_masks",
]
