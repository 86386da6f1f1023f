"""Choose and apply masks, with calibration statistics and correction when asked.

Magnitude masks without correction need no data: each eligible layer is
masked independently. Otherwise one :class:`LockstepRunner` traversal of the
calibration set does everything in graph order:

* before an eligible layer runs, its input statistics are gathered -- from
  the *working* stream (upstream layers already sparse and corrected:
  ``sequential``, SparseGPT's order) or from the *reference* stream (the dense
  model's activations: ``one-shot``) -- and its mask is chosen and applied
  (with the method's weight update under ``--update-weights``);
* after a layer runs, statistics correction (``--correct``) fixes its output
  channels, so the next layer's statistics already see the repair.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx

from sparsecompile.graph import get_tensor, set_tensor
from sparsecompile.masks import MaskContext, MaskMethod, topn_mask
from sparsecompile.masks.statistics import InputStatistics, activation_input, gemm_matrix
from sparsecompile.passes import ApplyMasks, PassContext, PassManager
from sparsecompile.passes.apply_masks import masked
from sparsecompile.passes.correct_statistics import StatisticsCorrector
from sparsecompile.sequential import LockstepRunner, snapshot
from sparsecompile.verify import concat_outputs


# Largest reduction size whose K x K float64 Hessian (plus its Cholesky factors) fits comfortably
# in memory: 12288^2 * 8 B = 1.2 GB.
MAX_HESSIAN_COLUMNS = 12288


@dataclass
class SparsifyResult:
    masks: dict[str, torch.Tensor]  # weight target -> keep-mask
    corrections: dict[str, dict] = field(default_factory=dict)  # layer name -> before/after errors
    batchnorm_reestimated: dict[str, dict] = field(default_factory=dict)  # unfolded BN node -> what changed
    fallbacks: dict[str, str] = field(default_factory=dict)  # layer name -> why it got another method
    updated_weights: bool = False
    updated: dict[str, torch.Tensor] = field(default_factory=dict)  # weight target -> updated weight (pre-correction)
    # layer name -> ||layer(x; W*mask) - layer(x; W)|| / ||layer(x; W)|| on the dense activations x of every chunk
    # (verify.layer_output_errors' number), when asked for (layer_errors=True) and a reference stream ran
    layer_errors: dict[str, float] | None = None
    # the dense model's outputs on ``chunks`` (concatenated as verify.run_batches does), from the reference stream,
    # when asked for (reference_outputs=True) and a reference stream ran
    reference_outputs: list[torch.Tensor] | None = None


def sparsify(
    gm: torch.fx.GraphModule,
    eligible: list,
    all_layers: list,
    method: MaskMethod,
    chunks: list[tuple[torch.Tensor, ...]],
    *,
    sequential: bool = True,
    correct: str = "none",
    update_weights: bool = False,
    folded_batchnorm: dict | None = None,
    progress=None,
    layer_errors: bool = False,
    reference_state: dict[str, torch.Tensor] | None = None,
    reference_outputs: bool = False,
) -> SparsifyResult:
    """Mask ``eligible`` layers of ``gm`` in place; returns the masks and correction records.

    ``layer_errors``: also measure each masked layer's output error on the dense activations of ``chunks``
    while the reference stream has them (saves the dense forward of ``verify.layer_output_errors``); only
    where a reference stream runs anyway (statistics correction, one-shot or Hessian statistics).
    ``reference_state``: the dense parameters and buffers of ``gm`` (by name), when the caller already holds
    an untouched copy (the build's dense model); otherwise they are cloned here.
    ``reference_outputs``: also return the dense model's outputs on ``chunks`` from the reference stream (the
    same operations on the same chunks as a forward of the dense model), where one runs.
    """
    result = SparsifyResult(masks={}, updated_weights=update_weights and method.can_update_weights)
    if not method.needs and correct == "none":
        for layer in eligible:
            weight = get_tensor(gm, layer.weight_target)
            if result.updated_weights:  # e.g. FixedMasks carrying OBS-updated weights: apply them before masking
                mask, new_weight = method.select_and_update(weight, layer, MaskContext())
                result.updated[layer.weight_target] = masked(new_weight, mask).clone()
                set_tensor(gm, layer.weight_target, new_weight)
            else:
                mask = method.select(weight, layer, MaskContext())
            result.masks[layer.weight_target] = mask
        PassManager([ApplyMasks(result.masks)]).run(gm, PassContext())
        return result

    corrector = None
    if correct != "none":
        corrector = StatisticsCorrector(gm, correct, all_layers, folded_batchnorm or {},
                                        {layer.weight_target for layer in eligible})
    # The dense (reference) stream is read by the correction (dense statistics, errors), by one-shot
    # statistics and by the Hessian's dense target; sequential statistics alone never read it.
    need_reference = corrector is not None or (bool(method.needs) and (not sequential or "hessian" in method.needs))
    if not need_reference:
        reference_state = {}
    else:  # a new dict: prepare() adds the zero biases it gives layers to it
        reference_state = dict(reference_state) if reference_state is not None else snapshot(gm)
    if corrector is not None:
        corrector.prepare(reference_state)
    by_node = {layer.node_name: layer for layer in eligible}
    corrected = corrector.node_names if corrector is not None else set()

    def before(node, reference_env, working_env):
        if corrector is not None:
            corrector.before(node, reference_env, working_env)
        layer = by_node.get(node.name)
        if layer is None:
            return
        weight = get_tensor(gm, layer.weight_target)
        # A corrected layer gets its mean shift back through the bias, so only the centered error counts.
        context = MaskContext(options={"centered": correct != "none" and node.name in corrected})
        columns = gemm_matrix(weight, layer.reduction_axis).shape[1]
        if "hessian" in method.needs and columns > MAX_HESSIAN_COLUMNS:
            # A K x K float64 Hessian would not fit in memory: magnitude for this layer, said in the report.
            mask = topn_mask(weight.abs(), layer.reduction_axis, method.n, method.m)
            result.masks[layer.weight_target] = mask
            result.fallbacks[layer.name] = (f"magnitude mask: reduction size {columns} > {MAX_HESSIAN_COLUMNS} "
                                            "is too large for the Hessian")
            set_tensor(gm, layer.weight_target, masked(weight, mask))
            return
        if method.needs:
            source, kind = activation_input(node, layer.weight_target)
            values = (working_env if sequential else reference_env)[source]
            # Sequential Hessian masks aim at the dense layer's output, not at this layer's own dense-weight
            # output on already-sparse inputs: the upstream error enters as a linear term (masks/hessian.py).
            dense_target = sequential and "hessian" in method.needs
            stats = InputStatistics(columns, hessian="hessian" in method.needs,
                                    weight_matrix=gemm_matrix(weight, layer.reduction_axis) if dense_target else None)
            references = reference_env[source] if dense_target else [None] * len(values)
            for value, reference in zip(values, references):
                stats.add_input(node, kind, value, tuple(weight.shape), reference)
            context.options["dense_target"] = dense_target
            context.statistics = stats
        if update_weights and method.can_update_weights:
            mask, new_weight = method.select_and_update(weight, layer, context)
            result.updated[layer.weight_target] = masked(new_weight, mask).clone()
        else:
            mask, new_weight = method.select(weight, layer, context), weight
        result.masks[layer.weight_target] = mask
        set_tensor(gm, layer.weight_target, masked(new_weight, mask))
        if progress is not None:
            progress.detail(f"masked {layer.name}")

    watched = set(by_node) | (corrector.node_names if corrector else set())
    runner = LockstepRunner(gm, reference_state)
    hooks = (before, corrector.after if corrector else None)
    if layer_errors and need_reference:
        hooks = _measuring_layer_errors(runner, result, by_node, reference_state, len(chunks), *hooks)
    dense_outputs, _ = runner.run(
        chunks, watched, before=hooks[0], after=hooks[1],
        show_progress=(lambda nodes: progress.bar(nodes, "calibration")) if progress is not None else None,
        reference=need_reference, outputs=reference_outputs and need_reference,
    )
    if reference_outputs and need_reference:
        result.reference_outputs = concat_outputs(dense_outputs)
    gm.graph.lint()
    gm.recompile()
    if corrector is not None:
        result.corrections = corrector.records
        result.batchnorm_reestimated = corrector.batchnorm_records
    return result


def _measuring_layer_errors(runner, result: SparsifyResult, by_node: dict, reference_state: dict, count: int,
                            before, after):
    """``before``/``after`` hooks that also fill ``result.layer_errors``: once a layer's mask is chosen, the
    layer runs on the reference stream's (dense) inputs with its dense weight masked, and its dense output
    (the reference stream's own) is compared with that; float32 norms summed over chunks in order, as
    ``verify.layer_output_errors`` does on the same chunks."""
    result.layer_errors = {}
    pending: dict[str, list[torch.Tensor]] = {}

    def measuring_before(node, reference_env, working_env):
        before(node, reference_env, working_env)
        layer = by_node.get(node.name)
        if layer is None or layer.weight_target not in result.masks or layer.weight_target not in reference_state:
            return
        dense = reference_state[layer.weight_target]
        masked_dense = torch.where(result.masks[layer.weight_target], dense, torch.zeros((), dtype=dense.dtype))
        pending[node.name] = [runner.execute_with(node, reference_env, i, {layer.weight_target: masked_dense})
                              for i in range(count)]

    def measuring_after(node, reference, working):
        sparse = pending.pop(node.name, None)
        if sparse is not None:
            num = den = 0.0
            for dense_out, sparse_out in zip(reference, sparse):
                num += float(torch.linalg.vector_norm((dense_out - sparse_out).float())) ** 2
                den += float(torch.linalg.vector_norm(dense_out.float())) ** 2
            result.layer_errors[by_node[node.name].name] = (num / den) ** 0.5 if den > 0 else 0.0
        return after(node, reference, working) if after is not None else None

    return measuring_before, measuring_after
