"""The entry point and the report of :mod:`sparsecompile.analysis.certify`: :func:`certify` runs the
calibration batches through the graph walk (:mod:`.interpreter`), applies the three margin certificates
(global l2, Taylor box, CROWN back-substitution) and builds the summary, the risky-layer table with its
margin ranking, and the Gumbel-paper quantities per layer."""

from __future__ import annotations

import math

import torch
import torch.fx

from sparsecompile.analysis.certify.bounds import (
    NORM_SAFETY, conv_operator_norm_bound, matrix_norm_bound, power_iteration_norm,
)
from sparsecompile.analysis.certify.interpreter import (
    _Certifier, _diff_norm, _LayerStats, _limit, _rebatch, static_batch_size,
)
from sparsecompile.analysis.certify.rules import _CONV, _CONV_TRANSPOSE, NotCertifiable
from sparsecompile.analysis.crown import certified_margins, crown_certificate
from sparsecompile.analysis.taylor import output_certificate
from sparsecompile.graph import conv_params
from sparsecompile.verify import flat_outputs

aten = torch.ops.aten

SQRT2 = math.sqrt(2.0)
# Margin test slack for float32 rounding between the two executions: 1e-5 * (1 + ||z_d||_inf).
FP_SLACK = 1e-5


# ----------------------------------------------------------------------------------------------------------
# public API


def _median(values: torch.Tensor) -> float | None:
    return float(values.median()) if values.numel() else None


def _inf_norm(matrix: torch.Tensor) -> float:
    """Max absolute row sum (the induced infinity norm the Gumbel paper's Lemmas 3.3/3.6 use)."""
    m = matrix.detach().double()
    return float(m.abs().reshape(m.shape[0], -1).sum(1).max()) if m.numel() else 0.0


def certify(dense_gm: torch.fx.GraphModule, sparse_gm: torch.fx.GraphModule, layers=None, batches=(), *,
            iterations: int = 30, per_sample: bool = False, max_samples: int | None = None,
            output: int | None = None) -> dict:
    """Certify, per calibration sample, that masking cannot change the prediction; rank risky layers.

    ``layers`` (``find_layers`` output, optional) only names the per-layer
    rows. ``iterations`` is the power-iteration count for the reported
    operator-norm *estimates* (the bound uses guaranteed norms). ``output``
    picks the graph output to certify (default: the first 2-D output with
    more than one column, else output 0). Returns JSON-serialisable results:
    ``summary`` (samples, certifiable, certified_fraction,
    observed_unchanged_fraction, median_bound, median_actual_change,
    median_looseness, not_certifiable, self_check), ``layers`` (ranked by
    share of the bound, with the Gumbel-paper quantities under ``gumbel``),
    and with ``per_sample=True`` the per-sample arrays.
    See the module docstring for the math and its limits.
    """
    names = {layer.node_name: layer.name for layer in (layers or [])}
    reasons: list[str] = []
    try:
        runner = _Certifier(dense_gm, sparse_gm, iterations)
    except NotCertifiable as exc:
        runner, reasons = None, [str(exc)]
    except Exception as exc:  # noqa: BLE001 - never a crash: say what failed
        runner, reasons = None, [f"graph analysis failed: {type(exc).__name__}: {str(exc)[:200]}"]
    stats: dict[str, _LayerStats] = {}
    checks: dict = {}
    collected = {"bound": [], "actual": [], "margin": [], "dense_pred": [], "sparse_pred": [], "contrib": [],
                 "z_inf": [], "global_bound": [], "local_bound": [], "local_certified": [],
                 "crown_certified": [], "crown_margin": []}
    crown_errors: list[str] = []
    crown_concretised: dict[str, str] = {}
    crown_space: set[str] = set()
    crown_layers: dict[str, list] = {}  # node -> per batch [n] margin used; "" -> the total
    samples = 0
    chosen = output
    for batch, keep in _rebatch(_limit(batches, max_samples), static_batch_size(sparse_gm)):
        results = None
        if runner is not None and not reasons:
            try:
                results = runner.run_batch(batch, stats, checks, keep)
            except NotCertifiable as exc:
                reasons.append(str(exc))
        if results is None:  # still report what happened, without a bound
            try:
                with torch.no_grad():
                    outs_d, outs_s = flat_outputs(dense_gm(*batch)), flat_outputs(sparse_gm(*batch))
            except Exception as exc:  # noqa: BLE001 - the model itself does not run on this batch
                reasons.append(f"the model does not run on a batch of {int(batch[0].shape[0])}: "
                               f"{type(exc).__name__}: {str(exc)[:200]}")
                break
            results = [(d[:keep], s[:keep], None, None) for d, s in zip(outs_d, outs_s)]
        if chosen is None:
            chosen = next((i for i, r in enumerate(results) if r is not None and r[0].dim() == 2 and r[0].shape[1] > 1), 0)
        if chosen >= len(results) or results[chosen] is None:
            reasons.append(f"output {chosen} is not an input-dependent tensor")
            break
        z_d, z_s, c, box = results[chosen]
        n = z_d.shape[0]
        samples += n
        if c is not None and z_d.dim() == 2 and z_d.shape[1] > 1:
            z_inf_batch = z_d.detach().double().reshape(n, -1).abs().amax(1)
            collected["crown_certified"].append(torch.zeros(n, dtype=torch.bool))
            try:
                out_name = runner.output_names[chosen]
                z_full = runner.dense_env[out_name]
                full_box = runner.taylor.boxes.get(out_name)
                if not isinstance(full_box, tuple):
                    full_box = None
                lower, magnitude, z_ref, start = runner.crown.margins(
                    out_name, z_full, full_box, FP_SLACK * (1 + z_full.detach().double().abs().amax(1)))
                lower, magnitude, z_ref = lower[:n], magnitude[:n], z_ref[:n]
                top = z_d.detach().double().argmax(1)
                slack_ref = FP_SLACK * (1 + z_ref.abs().amax(1))
                collected["crown_certified"][-1] = crown_certificate(lower, magnitude, z_ref, top, slack_ref)
                margins = certified_margins(lower, z_ref, top)
                binding = margins.argmin(1)  # the class that comes closest to overtaking
                collected["crown_margin"].append(margins.gather(1, binding[:, None])[:, 0])
                crown_space.add("output" if start == out_name else f"logits '{start}' (the output is their softmax)")
                batch_layers = {"": -lower.gather(1, binding[:, None])[:, 0]}
                for name in runner.sources:
                    # margin this layer's change takes from the binding class pair (negative: it adds margin)
                    term = runner.crown.local_terms.get(name)
                    batch_layers[name] = (-term.t()[:n].gather(1, binding[:, None])[:, 0] if term is not None
                                          else torch.zeros(n, dtype=torch.float64))
                for name, used in batch_layers.items():
                    crown_layers.setdefault(name, []).append(used)
                crown_concretised.update({k: v for k, v in runner.crown.concretised.items()
                                          if start == out_name or k not in runner.crown.softmax_inputs})
            except Exception as exc:  # noqa: BLE001 - the other bounds still stand; say why this one is missing
                crown_errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
        collected["actual"].append(_diff_norm(z_s, z_d, n))
        z_inf = z_d.detach().double().reshape(n, -1).abs().amax(1)
        collected["z_inf"].append(z_inf)
        if c is not None:
            global_bound = c.sum(1)
            collected["global_bound"].append(global_bound)
            collected["contrib"].append(c)
            local_bound = torch.full_like(global_bound, math.inf)
            if isinstance(box, tuple) and z_d.dim() >= 1:
                local_certified, local_bound = output_certificate(
                    (box[0].reshape(n, -1), box[1].reshape(n, -1)), z_d.reshape(n, -1), FP_SLACK * (1 + z_inf))
                if z_d.dim() == 2 and z_d.shape[1] > 1:
                    collected["local_certified"].append(local_certified)
            collected["local_bound"].append(local_bound)
            collected["bound"].append(torch.minimum(global_bound, local_bound))
        if z_d.dim() == 2 and z_d.shape[1] > 1:
            top = z_d.detach().double().topk(2, dim=1).values
            collected["margin"].append(top[:, 0] - top[:, 1])
            collected["dense_pred"].append(z_d.argmax(1))
            collected["sparse_pred"].append(z_s.argmax(1))
    certifiable = runner is not None and not reasons and samples > 0
    actual = torch.cat(collected["actual"]) if collected["actual"] else torch.zeros(0, dtype=torch.float64)
    classifier = bool(collected["margin"])
    summary: dict = {
        "samples": samples, "output": chosen, "certifiable": certifiable, "not_certifiable": reasons,
        "margin_rule": ("prediction kept if top1 - top2 > sqrt(2) * bound (l2 bound on the output change), or if "
                        "z_i - z_j > (c_j - c_i) + r_i + r_j for every j (elementwise Taylor box c +- r)"),
        "median_actual_change": _median(actual), "max_actual_change": float(actual.max()) if actual.numel() else None,
    }
    if runner is not None and runner.unmodelled:
        summary["unmodelled_ops"] = [
            f"node '{name}' ({op}): no bound rule; bounded as 'anything' wherever its input may change"
            for name, op in runner.unmodelled.items()]
    result: dict = {"summary": summary, "layers": []}
    if classifier:
        dense_pred, sparse_pred = torch.cat(collected["dense_pred"]), torch.cat(collected["sparse_pred"])
        unchanged = dense_pred == sparse_pred
        summary["observed_unchanged_fraction"] = float(unchanged.double().mean())
        margin = torch.cat(collected["margin"])
    if not certifiable:
        summary.update(certified_fraction=0.0 if classifier else None, median_bound=None, median_looseness=None)
        return result
    bound = torch.cat(collected["bound"])
    contrib = torch.cat(collected["contrib"])
    z_inf = torch.cat(collected["z_inf"])
    positive = actual > 0
    looseness = bound[positive] / actual[positive]
    finite = torch.isfinite(bound)
    summary["unbounded_samples"] = int((~finite).sum())
    summary.update(
        median_bound=_median(bound), max_bound=float(bound.max()) if bound.numel() else None,
        median_looseness=_median(looseness),
        median_bound_over_median_actual=(_median(bound) / _median(actual)
                                         if actual.numel() and _median(actual) > 0 else None),
        self_check={"violations": int(checks.get("violations", 0)),
                    "worst_excess": float(checks.get("worst_excess", 0.0)),
                    "worst_node": checks.get("worst_node"),
                    "box_violations": int(runner.taylor.violations) if hasattr(runner, "taylor") else 0,
                    "box_worst_excess": float(runner.taylor.worst) if hasattr(runner, "taylor") else 0.0,
                    "box_worst_node": runner.taylor.worst_node if hasattr(runner, "taylor") else None,
                    "note": "observed per-node changes that exceed the per-node bound, and per-sample node values "
                            "outside the elementwise box (both must be 0)"},
    )
    global_bound, local_bound = torch.cat(collected["global_bound"]), torch.cat(collected["local_bound"])
    summary["bounds"] = {
        "median_global_l2": _median(global_bound), "median_taylor_l2": _median(local_bound),
        "taylor_tighter_fraction": float((local_bound < global_bound).double().mean()) if samples else None,
        "note": "bound = min(global: per-sample l2 norms through operator-norm gains; taylor: elementwise "
                "first-order term + remainder box around the dense activations, see analysis/taylor.py)",
    }
    global_bound_all = torch.cat(collected["global_bound"])
    if classifier:
        slack = FP_SLACK * (1 + z_inf)
        certified = margin > SQRT2 * bound * (1 + NORM_SAFETY) + slack
        taylor_certified = torch.zeros_like(certified)
        if collected["local_certified"]:
            taylor_certified = torch.cat(collected["local_certified"])
        global_certified = margin > SQRT2 * global_bound_all * (1 + NORM_SAFETY) + slack
        certified = certified | taylor_certified
        crown_certified = torch.zeros_like(certified)
        if collected["crown_certified"] and len(torch.cat(collected["crown_certified"])) == len(certified):
            crown_certified = torch.cat(collected["crown_certified"])
        certified = certified | crown_certified
        summary["certified_by"] = {
            "global_l2": float(global_certified.double().mean()), "taylor_box": float(taylor_certified.double().mean()),
            "crown_margins": float(crown_certified.double().mean()),
            "note": "share of samples each bound certifies on its own (a sample counts as certified if any does)"}
        if crown_errors:
            summary["crown_errors"] = crown_errors[:3]
        if crown_concretised:
            summary["crown_concretised"] = [f"node '{k}' ({v}): no linear relaxation; bounded by its box"
                                            for k, v in list(crown_concretised.items())[:10]]
        if collected["crown_margin"]:
            summary["median_certified_margin"] = _median(torch.cat(collected["crown_margin"]))
            summary["certified_margin_of"] = sorted(crown_space)
        if crown_layers and len(torch.cat(crown_layers[""])) == len(certified):
            total_used = torch.cat(crown_layers[""])
            per_layer = {name: torch.cat(parts) for name, parts in crown_layers.items() if name}
            layer_sum = sum(per_layer.values()) if per_layer else torch.zeros_like(total_used)
            summary["margin_used"] = {
                "median_total": _median(total_used),
                "median_by_layers": _median(layer_sum),
                "median_by_nonlinear_ops": _median(total_used - layer_sum),
                "note": "per sample, the margin of the class pair closest to flipping that the bound takes: the "
                        "sum over changed layers of their local term carried linearly to that margin, plus what the "
                        "relaxations of the nonlinear ops (and boxes of ops without one) add (their exact "
                        "curvature where the boxes are tight, so it can be negative)",
            }
            margin_rows = sorted(({"layer": names.get(name, name), "node": name, "median": _median(v),
                                   "max": float(v.max()) if v.numel() else None} for name, v in per_layer.items()),
                                 key=lambda row: -(row["median"] or 0.0))
            result["margin_ranking"] = margin_rows
        summary["certified_fraction"] = float(certified.double().mean())
        summary["certified_but_changed"] = int((certified & ~unchanged).sum())
        summary["median_margin"] = _median(margin)
    else:
        summary["certified_fraction"] = None
    # shares of the bound over the samples with a finite bound (an unmodelled op makes the rest infinite)
    # (the shares split certify's global bound, whose columns follow each changed node through the graph)
    global_finite = torch.isfinite(global_bound)
    total = float(global_bound[global_finite].sum())
    margin_used = ({name: torch.cat(parts) for name, parts in crown_layers.items() if name}
                   if "margin_ranking" in result else None)
    result["layers"] = _layer_table(runner, stats, contrib, total, names, global_finite, margin_used)
    result["graph"] = {"chain": runner.chain, "changed_nodes": len(runner.sources),
                       "gemm_nodes": len(runner.gemm_nodes), "max_activation_lipschitz": runner.max_unary_lip,
                       "gumbel_note": GUMBEL_NOTE}
    if per_sample:
        result["samples"] = {"bound": bound.tolist(), "actual_change": actual.tolist()}
        if classifier:
            result["samples"].update(margin=margin.tolist(), certified=certified.tolist(),
                                     prediction_unchanged=unchanged.tolist())
            if collected["crown_margin"] and len(torch.cat(collected["crown_margin"])) == samples:
                # per sample: min over j != top of z_top - z_j + (lower bound on dz_top - dz_j)
                result["samples"]["crown_margin"] = torch.cat(collected["crown_margin"]).tolist()
    return result


def _layer_table(runner: _Certifier, stats: dict[str, _LayerStats], contrib: torch.Tensor, total: float,
                 names: dict[str, str], finite: torch.Tensor, margin_used: dict | None = None) -> list[dict]:
    # unchanged layers have the same operator in both graphs: reuse the bound the propagation computed
    dense_norms = {name: (_gemm_norm(runner, name, dense=True) if name in runner.changed
                          else _gemm_norm(runner, name, dense=False)) for name in runner.gemm_nodes}
    rows = []
    for name in runner.sources:
        s = stats.get(name)
        if s is None:
            continue
        index = runner.source_index[name]
        local = torch.cat(s.local)
        unbounded = int((~torch.isfinite(contrib[:, index])).sum())
        column = contrib[finite, index]
        local_sum = float(local[finite].sum()) if local.shape == finite.shape else float(local.sum())
        row = {
            "layer": names.get(name, name), "node": name, "op": s.op,
            "local_term": {"median": _median(local), "max": float(local.max()) if local.numel() else None},
            "contribution": {"median": _median(column), "max": float(column.max()) if column.numel() else None},
            "share_of_bound": float(column.sum()) / total if total > 0 else 0.0,
            "downstream_gain": float(column.sum()) / local_sum if local_sum > 0 else None,
        }
        if unbounded:
            row["unbounded_samples"] = unbounded
        used = margin_used.get(name) if margin_used else None
        if used is not None:
            row["margin_used"] = {"median": _median(used), "max": float(used.max()) if used.numel() else None}
        if s.weight_term:
            row["weight_term"] = {"median": _median(torch.cat(s.weight_term))}
            row["bias_term"] = {"median": _median(torch.cat(s.bias_term))}
        if s.gain is not None:
            row["op_norm_bound"] = s.gain
            estimate = _power_estimate(runner, name)
            row["op_norm_estimate"] = estimate
            row.update(_gumbel_quantities(runner, name, dense_norms))
        rows.append(row)
    rows.sort(key=lambda r: -r["share_of_bound"])
    for rank, row in enumerate(rows, 1):
        row["risk_rank"] = rank
    return rows


def _node(runner: _Certifier, name: str, dense: bool = False) -> torch.fx.Node:
    return runner.dense_by_name[name] if dense else next(n for n in runner.sparse_nodes if n.name == name)


def _param(runner: _Certifier, node_arg, dense: bool):
    if not isinstance(node_arg, torch.fx.Node):
        return node_arg
    return (runner.dense_params if dense else runner.sparse_params)[node_arg.name]


def _gemm_weight(runner: _Certifier, name: str, dense: bool):
    """(weight as the op uses it, operator matrix [out, in] or None) of a GEMM node."""
    node = _node(runner, name, dense)
    target = node.target
    if target in _CONV:
        w = _param(runner, conv_params(node)["weight"], dense)
        return w, w.detach().reshape(w.shape[0], -1)
    if target in _CONV_TRANSPOSE:
        w = _param(runner, node.args[1], dense)
        return w, None
    if target == aten.linear.default:
        w = _param(runner, node.args[1], dense)
        return w, w.detach()
    if target == aten.addmm.default:
        w = _param(runner, node.args[2], dense)
        return w, w.detach().t()
    left, right = node.args[0], node.args[1]
    if isinstance(left, torch.fx.Node) and left.name in runner.activation_names:
        w = _param(runner, right, dense)
        return w, (w.detach().t() if isinstance(w, torch.Tensor) and w.dim() == 2 else None)
    w = _param(runner, left, dense)
    return w, (w.detach() if isinstance(w, torch.Tensor) and w.dim() == 2 else None)


def _gemm_norm(runner: _Certifier, name: str, dense: bool, weight: torch.Tensor | None = None) -> float | None:
    """Guaranteed operator-norm bound of a GEMM node's linear part (dense or sparse weights, or ``weight``)."""
    try:
        node = _node(runner, name, dense)
        if weight is None:
            weight, _ = _gemm_weight(runner, name, dense)
            if not dense:
                cached = next((v for k, v in runner.cache.items() if k[:2] == ("gemm", name)), None)
                if cached is not None:
                    return cached
        if node.target in _CONV or node.target in _CONV_TRANSPOSE:
            g = runner.conv_geometry.get(name)
            if g is None:
                return None
            return conv_operator_norm_bound(weight, g["spatial"], g["stride"], g["padding"], g["dilation"],
                                            g["groups"])
        scale = abs(float(node.kwargs.get("alpha", 1))) if node.target == aten.addmm.default else 1.0
        return scale * matrix_norm_bound(weight) if isinstance(weight, torch.Tensor) else None
    except (KeyError, AttributeError, StopIteration, RuntimeError):
        return None


def _power_estimate(runner: _Certifier, name: str) -> float | None:
    """Power-iteration (lower) estimate of the sparse layer's operator norm, to show how tight the bound is."""
    try:
        node = _node(runner, name)
        weight, matrix = _gemm_weight(runner, name, dense=False)
        w = weight.detach().double()
        if node.target in _CONV:
            g = runner.conv_geometry[name]
            if g["transposed"]:
                return None
            conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d,
                    3: torch.nn.functional.conv3d}[w.dim() - 2]
            shape = (1, w.shape[1] * g["groups"], *g["spatial"])
            forward = lambda z: conv(z, w, None, g["stride"], g["padding"], g["dilation"], g["groups"])  # noqa: E731
            return power_iteration_norm(forward, shape, runner.iterations)
        if matrix is None:
            return None
        m = matrix.double()
        return power_iteration_norm(lambda z: z @ m.t(), (1, m.shape[1]), runner.iterations)
    except (KeyError, AttributeError, StopIteration, RuntimeError):
        return None


def _gumbel_quantities(runner: _Certifier, name: str, dense_norms: dict[str, float | None]) -> dict:
    """Quantities of Lemmas 3.3-3.6 of the Gumbel-masks paper for layer j, named as there.

    ``W_j`` is the dense operator matrix ``[out, in]`` (a convolution's GEMM
    matrix ``Cout x Cin*k*k`` for the entrywise quantities), ``B`` the support
    the sparse weight kept, ``mu(B, W_j) = (B - 1) * W_j`` the masking
    perturbation, ``U_j`` what else changed on the kept support (statistics
    correction), ``dW_j = W_sparse - W_j = mu(B, W_j) + U_j``. ``||.||_inf`` is
    the max absolute row sum, as in Lemmas 3.3 and 3.6; ``||.||`` is the
    operator norm (for convolutions our guaranteed bound of the convolution on
    its input tensor).
    """
    try:
        _, w_s = _gemm_weight(runner, name, dense=False)
        _, w_d = _gemm_weight(runner, name, dense=True)
    except (KeyError, AttributeError, StopIteration):
        return {}
    if w_s is None or w_d is None or w_s.shape != w_d.shape:
        return {}
    w_s, w_d = w_s.double(), w_d.double()
    kept = w_s != 0
    mu = torch.where(kept, torch.zeros_like(w_d), -w_d)
    update = w_s - torch.where(kept, w_d, torch.zeros_like(w_d))
    delta = w_s - w_d
    order = list(runner.gemm_nodes)
    j = order.index(name)
    norms = [dense_norms.get(k) for k in order]
    lip = runner.max_unary_lip
    depth = len(order)
    known = all(v is not None for v in norms)
    prod_others = math.prod(v for k, v in zip(order, norms) if k != name) if known else None
    prod_after = math.prod(norms[j + 1:]) if known else None
    x_prev = _median(torch.cat(runner.input_norms[name])) if runner.input_norms.get(name) else None
    x_in = _median(torch.cat(runner.network_input_norms)) if runner.network_input_norms else None
    w_sparse, _ = _gemm_weight(runner, name, dense=False)
    w_dense, _ = _gemm_weight(runner, name, dense=True)
    norm_delta = _gemm_norm(runner, name, dense=False, weight=w_sparse.double() - w_dense.double())
    ok = norm_delta is not None
    eq30 = (lip ** (depth - j) * prod_after * norm_delta * x_prev
            if ok and prod_after is not None and x_prev is not None else None)
    eq32 = (lip ** depth * norm_delta * x_in * prod_others
            if ok and prod_others is not None and x_in is not None else None)
    return {"gumbel": {
        "L": lip, "d": depth, "j": j + 1,
        "norm_dW_j": norm_delta,
        "norm_dW_j_inf": _inf_norm(delta),
        "norm_mu_B_W_j_inf": _inf_norm(mu),
        "norm_W_j_inf": _inf_norm(w_d),
        "norm_U_j_inf": _inf_norm(update),
        "lemma_3_3_holds": _inf_norm(mu) <= _inf_norm(w_d) * (1 + 1e-12),
        "lemma_3_6_factor_inf": _inf_norm(w_d) + _inf_norm(update),
        "norm_W_j": dense_norms.get(name),
        "prod_norm_W_i_after_j": prod_after,
        "prod_norm_W_i_except_j": prod_others,
        "norm_x_j_minus_1_median": x_prev,
        "norm_x_median": x_in,
        "lemma_3_4_eq30": eq30,
        "lemma_3_4_eq32": eq32,
        "chain_formulas_apply": runner.chain,
    }}


GUMBEL_NOTE = (
    "Gumbel-masks paper, Lemma 3.4, for a compositional chain x -> sigma(W_i x + b_i) with L-Lipschitz sigma: "
    "eq. (30) = L^(d-j) prod_(i>j) ||W_i|| ||dW_j|| ||x_(j-1)|| with the measured layer input, eq. (32) = "
    "L^d ||dW_j|| ||x|| prod_(i!=j) ||W_i|| (needs b_i = 0). ||.|| are operator norms of the layers on their "
    "input tensors (guaranteed bounds for convolutions); the _inf quantities are the max-row-sum norms of the "
    "GEMM matrices used in Lemmas 3.3 and 3.6. Other ops (pooling, ...) are assumed L-Lipschitz. With residual "
    "or branching paths (chain_formulas_apply = false) the chain formulas do NOT bound the model; use "
    "'contribution' and 'downstream_gain', which follow the real graph.")
