"""The two-stream graph walk of :mod:`sparsecompile.analysis.certify`: ``_Certifier`` runs every node on the
dense and the sparse model side by side, applies the node's gain rule (:mod:`.rules`), carries one bound column
per changed node, computes the exact local terms, self-checks each bound against the observed change and drives
the Taylor boxes and CROWN records; and the calibration batching (static batch sizes, padding)."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.fx
from torch.fx.node import map_aggregate

from sparsecompile.analysis.certify.bounds import conv_operator_norm_bound, matrix_norm_bound
from sparsecompile.analysis.certify.rules import (
    _CONV, _CONV_TRANSPOSE, _GEMM_LIKE, _RULES, _UNARY, NotCertifiable, _act_args, _Ctx, _op_name,
)
from sparsecompile.analysis.crown import CrownModel
from sparsecompile.analysis.taylor import TaylorModel
from sparsecompile.graph import conv_params, get_tensor

aten = torch.ops.aten

# A bound that an observed change exceeds by more than this is reported as a violation (a bug).
CHECK_RTOL, CHECK_ATOL = 1e-4, 1e-5

# The gain an op without a bound rule gets (see ``_Certifier._unbounded``).
_UNBOUNDED = object()


# ----------------------------------------------------------------------------------------------------------
# the runner


def _mutates(target) -> bool:
    schema = getattr(target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def _fresh(values):
    """Copies of the tensors in (nested) ``values``, for an op that writes into its inputs."""
    return map_aggregate(values, lambda v: v.clone() if isinstance(v, torch.Tensor) else v)


def _per_sample_norm(value: torch.Tensor, n: int) -> torch.Tensor:
    """l2 norm of each sample (axis 0), accumulated in float64."""
    if value.numel() == 0:
        return torch.zeros(n, dtype=torch.float64)
    flat = value.detach().reshape(n, -1)
    if not flat.is_floating_point():
        flat = flat.double()
    return torch.linalg.vector_norm(flat, dim=1, dtype=torch.float64)


def _diff_norm(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """Per-sample ||a - b||; the difference is taken in the values' own dtype (exact when they are close)."""
    if a.dtype != b.dtype or not a.is_floating_point():
        return _per_sample_norm(a.double() - b.double(), n)
    return _per_sample_norm(a - b, n)


def _same_value(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and bool(torch.equal(a, b)))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001
        return False


def _ancestors(graph: torch.fx.Graph) -> set[str]:
    output = next(n for n in graph.nodes if n.op == "output")
    seen, stack = set(), [output]
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        stack.extend(node.all_input_nodes)
    return seen


def _classify(gm: torch.fx.GraphModule, needed: set[str]) -> tuple[set[str], set[str]]:
    """(activation node names, parameter node names) among ``needed``: an activation depends on an input."""
    activations, params = set(), set()
    for node in gm.graph.nodes:
        if node.name not in needed or node.op == "output":
            continue
        if node.op == "placeholder" or any(a.name in activations for a in node.all_input_nodes):
            activations.add(node.name)
        else:
            params.add(node.name)
    return activations, params


def _evaluate_params(gm: torch.fx.GraphModule, names: set[str]) -> dict[str, object]:
    values: dict[str, object] = {}
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.name not in names:
                continue
            if node.op == "get_attr":
                values[node.name] = get_tensor(gm, node.target)
            elif node.op == "call_function":
                args, kwargs = map_aggregate((node.args, node.kwargs),
                                             lambda a: values[a.name] if isinstance(a, torch.fx.Node) else a)
                values[node.name] = node.target(*args, **kwargs)
            else:
                raise NotCertifiable(f"node '{node.name}': {node.op} nodes are not modelled")
    return values


@dataclass
class _LayerStats:
    node: str
    op: str
    local: list[torch.Tensor] = field(default_factory=list)
    weight_term: list[torch.Tensor] = field(default_factory=list)
    bias_term: list[torch.Tensor] = field(default_factory=list)
    gain: float | None = None


class _Certifier:
    def __init__(self, dense_gm, sparse_gm, iterations: int):
        self.dense_gm, self.sparse_gm = dense_gm, sparse_gm
        self.iterations = iterations
        self.cache: dict = {}
        self.sparse_nodes = [n for n in sparse_gm.graph.nodes]
        self.dense_by_name = {n.name: n for n in dense_gm.graph.nodes}
        self.needed = _ancestors(sparse_gm.graph)
        dense_needed = _ancestors(dense_gm.graph)
        self.activation_names, sparse_params = _classify(sparse_gm, self.needed)
        dense_activations, dense_params = _classify(dense_gm, dense_needed)
        if dense_activations != self.activation_names:
            only = sorted(dense_activations ^ self.activation_names)
            raise NotCertifiable(f"dense and sparse graphs differ in their computation nodes ({', '.join(only[:5])})")
        self.sparse_params = _evaluate_params(sparse_gm, sparse_params)
        self.dense_params = _evaluate_params(dense_gm, dense_params)
        self.changed: set[str] = set()
        self.unruled: set[str] = set()
        self.unmodelled: dict[str, str] = {}  # node -> op, tensor ops that got the fallback rule
        self.gemm_nodes: list[str] = []
        self.max_unary_lip = 1.0
        self.chain = True
        self.keep = 0
        for node in self.sparse_nodes:
            if node.name not in self.activation_names or node.op == "placeholder":
                continue
            self._match(node)
            if node.target in _GEMM_LIKE:
                self.gemm_nodes.append(node.name)
            if node.target in _UNARY and not callable(_UNARY[node.target]):
                self.max_unary_lip = max(self.max_unary_lip, _UNARY[node.target])
            tensor_inputs = [a for a in node.all_input_nodes if a.name in self.activation_names
                             and not isinstance(a.meta.get("val"), (int, torch.SymInt))]
            if len(tensor_inputs) > 1:
                self.chain = False
        self._check_in_place()
        placeholders_s = [n.name for n in self.sparse_nodes if n.op == "placeholder"]
        placeholders_d = [n.name for n in dense_gm.graph.nodes if n.op == "placeholder"]
        if placeholders_s != placeholders_d:
            raise NotCertifiable("dense and sparse graphs have different inputs")
        self.placeholders = placeholders_s
        self.sources = [n.name for n in self.sparse_nodes if n.name in self.changed]
        self.source_index = {name: i for i, name in enumerate(self.sources)}
        self.conv_geometry: dict[str, dict] = {}  # conv node -> stride/padding/... and input spatial size
        self.input_norms: dict[str, list[torch.Tensor]] = {}  # GEMM node -> per-sample ||x_(j-1)||
        self.network_input_norms: list[torch.Tensor] = []
        # per batch state
        self.dense_env: dict[str, object] = {}
        self.sparse_env: dict[str, object] = {}
        self.contrib: dict[str, object] = {}

    # -- structure -------------------------------------------------------------------------------------
    def _check_in_place(self) -> None:
        """An in-place op runs on copies here (its rules relax around its input's value); that is only the
        graph's meaning if nothing reads the mutated input afterwards. Refuse the rare graph where something does.
        """
        order = {node.name: i for i, node in enumerate(self.sparse_nodes)}
        for node in self.sparse_nodes:
            schema = getattr(node.target, "_schema", None)
            if node.op != "call_function" or schema is None or not schema.is_mutable:
                continue
            for index, argument in enumerate(schema.arguments):
                if argument.alias_info is None or not argument.alias_info.is_write:
                    continue
                value = node.args[index] if index < len(node.args) else node.kwargs.get(argument.name)
                if not isinstance(value, torch.fx.Node) or value.name not in self.activation_names:
                    continue
                later = [u.name for u in value.users if u is not node and order.get(u.name, -1) > order[node.name]]
                if later:
                    raise NotCertifiable(f"node '{node.name}' ({_op_name(node.target)}) writes into '{value.name}', "
                                         f"which '{later[0]}' reads afterwards: in-place aliasing is not modelled")


    def _match(self, node: torch.fx.Node) -> None:
        if node.op != "call_function":
            raise NotCertifiable(f"node '{node.name}': {node.op} '{node.target}' is not modelled")
        dense = self.dense_by_name.get(node.name)
        if dense is None or dense.op != node.op or dense.target != node.target:
            raise NotCertifiable(f"node '{node.name}' differs between the dense and sparse graphs")
        if node.target not in _RULES:
            # no bound rule: shape arithmetic (sym_size, ...) needs none; a tensor op gets the sound fallback
            # (unbounded wherever its input may have changed) and is named in the report, see _run_node
            self.unruled.add(node.name)
        changed = False

        def compare(s, d):
            nonlocal changed
            s_act = isinstance(s, torch.fx.Node) and s.name in self.activation_names
            d_act = isinstance(d, torch.fx.Node) and d.name in self.activation_names
            if s_act or d_act:
                if not (s_act and d_act and s.name == d.name):
                    raise NotCertifiable(f"node '{node.name}': inputs differ between the dense and sparse graphs")
                return
            s_val = self.sparse_params[s.name] if isinstance(s, torch.fx.Node) else s
            d_val = self.dense_params[d.name] if isinstance(d, torch.fx.Node) else d
            if isinstance(s, torch.fx.Node) or isinstance(d, torch.fx.Node):
                if not _same_value(s_val, d_val):
                    changed = True
                return
            if isinstance(s, (list, tuple)) and isinstance(d, (list, tuple)) and len(s) == len(d):
                for a, b in zip(s, d):
                    compare(a, b)
                return
            if isinstance(s, dict) and isinstance(d, dict) and s.keys() == d.keys():
                for key in s:
                    compare(s[key], d[key])
                return
            if not _same_value(s, d):
                raise NotCertifiable(f"node '{node.name}': arguments differ between the dense and sparse graphs")

        s_args = list(node.args) + [None] * max(0, len(dense.args) - len(node.args))
        d_args = list(dense.args) + [None] * max(0, len(node.args) - len(dense.args))
        compare(s_args, d_args)
        keys = set(node.kwargs) | set(dense.kwargs)
        compare({k: node.kwargs.get(k) for k in keys}, {k: dense.kwargs.get(k) for k in keys})
        if changed:
            self.changed.add(node.name)

    # -- values ----------------------------------------------------------------------------------------
    def cross_value(self, value):
        if isinstance(value, torch.fx.Node):
            if value.name in self.activation_names:
                return self.dense_env[value.name]
            return self.sparse_params[value.name]
        return value

    def is_tensor_activation(self, value) -> bool:
        if not isinstance(value, torch.fx.Node) or value.name not in self.activation_names:
            return False
        return isinstance(self.dense_env.get(value.name), (torch.Tensor, list, tuple))

    def substitute(self, node: torch.fx.Node, replace: dict[str, object]):
        """The node's (args, kwargs) with cross values, some activations replaced."""
        def lookup(a):
            if isinstance(a, torch.fx.Node):
                return replace[a.name] if a.name in replace else self.cross_value(a)
            return a
        return map_aggregate((node.args, node.kwargs), lookup)

    def delta_of(self, node: torch.fx.Node) -> torch.Tensor:
        c = self.contrib[node.name]
        if c is None or isinstance(c, list):
            raise NotCertifiable(f"node '{node.name}': its value is not modelled")
        return c.sum(1)

    # -- gemm ------------------------------------------------------------------------------------------
    def gemm_operator(self, ctx: _Ctx):
        """(activation input node, operator-norm bound of the sparse op in that input, operator matrix)."""
        node = ctx.node
        target = node.target
        key = ("gemm", node.name)
        if target in _CONV or target in _CONV_TRANSPOSE:
            if target in _CONV:
                p = conv_params(node)
                x, w_node = p["input"], p["weight"]
                transposed, groups = p["transposed"], p["groups"]
                stride, padding, dilation = p["stride"], p["padding"], p["dilation"]
            else:
                x, w_node = node.args[0], node.args[1]
                dims = self.cross_value(w_node).dim() - 2
                lit = lambda i, d: node.args[i] if len(node.args) > i else d  # noqa: E731
                stride, padding = lit(3, [1] * dims), lit(4, [0] * dims)
                groups, dilation = lit(6, 1), lit(7, [1] * dims)
                transposed = True
            if not ctx.is_act(x) or ctx.is_act(w_node):
                ctx.fail("only convolutions of an activation by a constant weight are modelled")
            if ctx.is_act(p["bias"] if target in _CONV else (node.args[2] if len(node.args) > 2 else None)):
                ctx.fail("bias computed from activations")
            weight = self.cross_value(w_node)
            x_value = self.cross_value(x)
            spatial = tuple(ctx.out_dense.shape[2:]) if transposed else tuple(x_value.shape[2:])
            key = key + (spatial,)
            self.conv_geometry[node.name] = dict(spatial=spatial, stride=stride, padding=padding,
                                                 dilation=dilation, groups=int(groups), transposed=transposed)
            if key not in self.cache:
                # a transposed convolution is the adjoint of the convolution with the same weight on its output grid
                self.cache[key] = conv_operator_norm_bound(weight, spatial, stride, padding, dilation, int(groups))
            return x, self.cache[key], weight.detach().reshape(weight.shape[0], -1)
        if target == aten.linear.default:
            x, w_node = node.args[0], node.args[1]
            if not ctx.is_act(x) or ctx.is_act(w_node) or ctx.is_act(node.args[2] if len(node.args) > 2 else None):
                ctx.fail("only linear layers of an activation by constant weights are modelled")
            if self.cross_value(x).dim() < 2:
                ctx.fail("a 1-D input has no batch axis")
            weight = self.cross_value(w_node)
            if key not in self.cache:
                self.cache[key] = matrix_norm_bound(weight)
            return x, self.cache[key], weight.detach()
        if target == aten.addmm.default:
            bias, left, right = node.args[0], node.args[1], node.args[2]
            beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
            if ctx.is_act(bias) or not ctx.is_act(left) or ctx.is_act(right) or beta != 1:
                ctx.fail("only addmm(constant bias, activation, constant weight) is modelled")
            weight = self.cross_value(right)
            if key not in self.cache:
                self.cache[key] = abs(float(alpha)) * matrix_norm_bound(weight)
            return left, self.cache[key], weight.detach().t()
        # mm / matmul / bmm
        left, right = node.args[0], node.args[1]
        if ctx.is_act(left) and ctx.is_act(right):
            ctx.fail("product of two activations is not modelled")
        if ctx.is_act(left):
            weight = self.cross_value(right)
            if weight.dim() < 2 or self.cross_value(left).dim() < 2:
                ctx.fail("only matrix weights are modelled")
            if key not in self.cache:
                self.cache[key] = matrix_norm_bound(weight)
            return left, self.cache[key], (weight.detach().t() if weight.dim() == 2 else weight.detach())
        weight = self.cross_value(left)
        if self.cross_value(right).dim() < 3 or weight.dim() < 2:
            ctx.fail("a constant left operand would contract the batch axis")
        if key not in self.cache:
            self.cache[key] = matrix_norm_bound(weight)
        return right, self.cache[key], weight.detach()

    def weight_only_term(self, node: torch.fx.Node, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per sample ``||(W_s - W_d) x_d||`` (bias off) and ``||b_s - b_d||`` broadcast, for GEMM nodes."""
        target = node.target
        dense = self.dense_by_name[node.name]

        def value_d(a):
            if isinstance(a, torch.fx.Node):
                return self.dense_env[a.name] if a.name in self.activation_names else self.dense_params[a.name]
            return a

        try:
            if target in _CONV:
                ps, pd = conv_params(node), conv_params(dense)
                if ps["transposed"]:
                    return None
                w_s, w_d = self.cross_value(ps["weight"]), value_d(pd["weight"])
                b_s, b_d = self.cross_value(ps["bias"]), value_d(pd["bias"])
                x = self.dense_env[ps["input"].name]
                # a diagnostic split of the exact local term: the model's dtype is precise enough (float64
                # convolutions are slow on CPU)
                dw = (w_s.double() - w_d.double()).to(x.dtype)
                dims = dw.dim() - 2
                conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d,
                        3: torch.nn.functional.conv3d}[dims]
                y = conv(x, dw, None, ps["stride"], ps["padding"], ps["dilation"], ps["groups"])
                positions = math.prod(y.shape[2:])
            elif target in (aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default):
                if target == aten.linear.default:
                    x_node, w_pos, b_pos, transpose = node.args[0], 1, 2, True
                elif target == aten.addmm.default:
                    x_node, w_pos, b_pos, transpose = node.args[1], 2, 0, False
                else:
                    if not (isinstance(node.args[0], torch.fx.Node) and node.args[0].name in self.activation_names):
                        return None
                    x_node, w_pos, b_pos, transpose = node.args[0], 1, None, False
                get = lambda nd, i: nd.args[i] if len(nd.args) > i else None  # noqa: E731
                w_s, w_d = self.cross_value(get(node, w_pos)), value_d(get(dense, w_pos))
                b_s = self.cross_value(get(node, b_pos)) if b_pos is not None else None
                b_d = value_d(get(dense, b_pos)) if b_pos is not None else None
                dw = w_s.double() - w_d.double()
                x = self.dense_env[x_node.name].double()
                y = x @ (dw.t() if transpose else dw)
                positions = y.numel() // max(1, n * y.shape[-1])
            else:
                return None
        except Exception:  # noqa: BLE001 - a diagnostic; the bound itself does not depend on it
            return None
        weight_term = _per_sample_norm(y, n)
        db = (b_s.double() if isinstance(b_s, torch.Tensor) else 0.0) - (b_d.double() if isinstance(b_d, torch.Tensor) else 0.0)
        bias_norm = float(torch.as_tensor(db).norm()) * math.sqrt(positions)
        return weight_term, torch.full((n,), bias_norm, dtype=torch.float64)

    def _propagate(self, node, element_gains, n: int, s_count: int) -> torch.Tensor:
        """sum_i G_i * contrib(a_i), one column per changed node (an unbounded parent stays unbounded)."""
        c = torch.zeros(n, s_count, dtype=torch.float64)
        for a, gain in element_gains:
            parent = self.contrib.get(a.name)
            if parent is None or isinstance(parent, list):
                raise NotCertifiable(f"node '{node.name}': input '{a.name}' is not modelled")
            # an infinite gain (e.g. a product with an unbounded input) is sound, only useless
            g = torch.nan_to_num(torch.as_tensor(gain, dtype=torch.float64), nan=math.inf, posinf=math.inf)
            g = g.reshape(-1, 1) if g.dim() else g
            # where the input cannot change the output cannot either (0 * inf is 0 here); else inf stays inf
            c = c + torch.where(parent == 0, torch.zeros_like(parent), g * parent)
        return torch.nan_to_num(c, nan=math.inf, posinf=math.inf)

    def _unbounded(self, acts: set[str], n: int, s_count: int) -> torch.Tensor:
        """The fallback for an op without a bound rule (any Lipschitz constant, any mixing of samples):
        exactly 0 where no input of the op can differ between the models (same inputs, same op), else
        unbounded -- for every sample of the batch, since the op might mix samples. The infinite part is
        charged to the changed nodes upstream that caused it."""
        c = torch.zeros(n, s_count, dtype=torch.float64)
        for name in acts:
            parent = self.contrib.get(name)
            if parent is None or isinstance(parent, list):
                raise NotCertifiable(f"node '{name}': its value is not modelled")
            c[:, (parent != 0).any(0)] = math.inf
        return c

    # -- one batch -------------------------------------------------------------------------------------
    def run_batch(self, inputs: tuple[torch.Tensor, ...], stats: dict[str, _LayerStats], checks: dict,
                  keep: int | None = None) -> list:
        """One batch; only its first ``keep`` samples are real (the rest pads a static batch) and counted."""
        if len(inputs) != len(self.placeholders):
            raise NotCertifiable(f"the model takes {len(self.placeholders)} inputs, a batch has {len(inputs)}")
        n = int(inputs[0].shape[0])
        if any(not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != n for t in inputs):
            raise NotCertifiable("every input must be a tensor with the batch on axis 0")
        s_count = len(self.sources)
        keep = n if keep is None else keep
        self.keep = keep
        self.dense_env, self.sparse_env, self.contrib = {}, {}, {}
        previous = getattr(self, "taylor", None)
        self.taylor = TaylorModel(self)
        self.crown = CrownModel(self)
        if previous is not None:  # the self-check counts over all batches
            self.taylor.violations, self.taylor.worst = previous.violations, previous.worst
            self.taylor.worst_node = previous.worst_node
        last_use: dict[str, int] = {}
        order = {node.name: i for i, node in enumerate(self.sparse_nodes)}
        for node in self.sparse_nodes:
            for a in node.all_input_nodes:
                last_use[a.name] = max(last_use.get(a.name, -1), order[node.name])
        self.network_input_norms.append(_per_sample_norm(inputs[0], n)[:keep])
        for name, value in zip(self.placeholders, inputs):
            # separate copies: an in-place op on an input must not run twice on one tensor
            self.dense_env[name], self.sparse_env[name] = value, value.clone()
            self.contrib[name] = torch.zeros(n, s_count, dtype=torch.float64)
            self.taylor.placeholder(name)
        outputs = None
        with torch.no_grad():
            for node in self.sparse_nodes:
                if node.op == "output":
                    outputs = node.args[0]
                    break
                if node.name not in self.activation_names or node.op == "placeholder":
                    continue
                try:
                    self._run_node(node, n, s_count, stats, checks)
                except NotCertifiable:
                    raise
                except Exception as exc:  # noqa: BLE001 - never a crash: name the node and what went wrong
                    first = (str(exc).strip().splitlines() or [""])[0][:200]
                    raise NotCertifiable(f"node '{node.name}' ({_op_name(node.target)}) failed: "
                                         f"{type(exc).__name__}: {first}") from exc
                for a in node.all_input_nodes:
                    if last_use.get(a.name) == order[node.name] and a.name in self.dense_env:
                        if a.name in self.placeholders:
                            continue
                        del self.dense_env[a.name], self.sparse_env[a.name]
                        self.contrib.pop(a.name, None)
                        self.taylor.boxes.pop(a.name, None)
        flat = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        self.output_names = [out.name if isinstance(out, torch.fx.Node) else None for out in flat]
        results = []
        for out in flat:
            if not isinstance(out, torch.fx.Node) or out.name not in self.activation_names:
                results.append(None)
                continue
            c = self.contrib[out.name]
            if c is None or isinstance(c, list):
                raise NotCertifiable(f"output '{out.name}' is not modelled")
            box = self.taylor.boxes.get(out.name)
            z = self.dense_env[out.name]
            if box is None and isinstance(z, torch.Tensor):  # nothing upstream changed
                box = (torch.zeros(z.shape, dtype=torch.float64), torch.zeros(z.shape, dtype=torch.float64))
            if isinstance(box, tuple):
                box = (box[0][:keep], box[1][:keep])
            results.append(tuple(v[:keep] for v in (self.dense_env[out.name], self.sparse_env[out.name], c))
                           + (box,))
        return results

    def _run_node(self, node, n: int, s_count: int, stats: dict, checks: dict) -> None:
        dense = self.dense_by_name[node.name]

        def lookup_dense(a):
            if isinstance(a, torch.fx.Node):
                return self.dense_env[a.name] if a.name in self.activation_names else self.dense_params[a.name]
            return a

        def lookup_sparse(a):
            if isinstance(a, torch.fx.Node):
                return self.sparse_env[a.name] if a.name in self.activation_names else self.sparse_params[a.name]
            return a

        if node.target is operator.getitem:
            source, index = node.args[0], node.args[1]
            self.dense_env[node.name] = self.dense_env[source.name][index]
            self.sparse_env[node.name] = self.sparse_env[source.name][index]
            parent = self.contrib[source.name]
            picked = parent[index] if isinstance(parent, list) else None
            self.contrib[node.name] = picked
            self.taylor.getitem(node)
            self.crown.getitem(node)
            return

        d_args, d_kwargs = map_aggregate((dense.args, dense.kwargs), lookup_dense)
        s_args, s_kwargs = map_aggregate((node.args, node.kwargs), lookup_sparse)
        if _mutates(node.target):
            # an in-place op (relu_, hardswish_, add_ ...) must not overwrite its input's recorded value: the
            # Taylor and CROWN rules relax the op around that (pre-activation) dense value afterwards
            d_args, d_kwargs = _fresh((d_args, d_kwargs))
            s_args, s_kwargs = _fresh((s_args, s_kwargs))
        v_dense = node.target(*d_args, **d_kwargs)
        v_sparse = node.target(*s_args, **s_kwargs)
        self.dense_env[node.name], self.sparse_env[node.name] = v_dense, v_sparse

        tensors_d = list(v_dense) if isinstance(v_dense, (list, tuple)) else [v_dense]
        if not any(isinstance(t, torch.Tensor) for t in tensors_d):
            # shape arithmetic (sym sizes): must agree; carries no perturbation
            if not _same_value(v_dense, v_sparse):
                raise NotCertifiable(f"node '{node.name}': a non-tensor value differs between the models")
            self.contrib[node.name] = None
            self.taylor.boxes[node.name] = None
            return

        ctx = _Ctx(node, self, v_dense)
        tuple_out = isinstance(v_dense, (list, tuple))
        if node.target in _RULES:
            gains = _RULES[node.target](ctx)
        else:
            self.unmodelled.setdefault(node.name, _op_name(node.target))
            gains = [_UNBOUNDED] * len(v_dense) if tuple_out else _UNBOUNDED
        per_output = gains if tuple_out else [gains]
        if tuple_out and len(per_output) != len(v_dense):
            raise NotCertifiable(f"node '{node.name}': internal rule mismatch")
        tensors_s = list(v_sparse) if tuple_out else [v_sparse]
        acts = {a.name for a in _act_args(ctx)}
        local_parts = None
        local_vectors: list = [None] * len(tensors_d)
        if node.name in self.changed:
            x_args, x_kwargs = self.substitute(node, {})
            if _mutates(node.target):
                x_args, x_kwargs = _fresh((x_args, x_kwargs))
            cross = node.target(*x_args, **x_kwargs)
            cross_list = list(cross) if tuple_out else [cross]
            local_vectors = [((c.double() - d.double()) if isinstance(c, torch.Tensor) and isinstance(d, torch.Tensor)
                              and c.shape == d.shape and c.is_floating_point() else None)
                             for c, d in zip(cross_list, tensors_d)]
            local_parts = [(_diff_norm(c, d, n)
                            if isinstance(c, torch.Tensor) and isinstance(d, torch.Tensor) and c.shape == d.shape
                            and c.dim() > 0 and c.shape[0] == n else None) for c, d in zip(cross_list, tensors_d)]
        contributions = []
        for k, element_gains in enumerate(per_output):
            if element_gains is None:  # e.g. pooling indices, saved statistics: consumers will be refused
                contributions.append(None)
                continue
            t = tensors_d[k]
            if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != n:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise NotCertifiable(f"node '{node.name}' ({_op_name(node.target)}): output shape {shape} "
                                     f"does not keep the batch of {n} on axis 0")
            if element_gains is _UNBOUNDED:
                c = self._unbounded(acts, n, s_count)
                covered = acts
            else:
                covered = {a.name for a, _ in element_gains}
            if covered != acts:
                missing = sorted(acts - covered)
                raise NotCertifiable(f"node '{node.name}' ({_op_name(node.target)}): activation input(s) "
                                     f"{', '.join(missing)} are not modelled in this position")
            if element_gains is not _UNBOUNDED:
                c = self._propagate(node, element_gains, n, s_count)
            if local_parts is not None:
                if local_parts[k] is None:
                    raise NotCertifiable(f"node '{node.name}': changed parameters change an output's shape")
                c[:, self.source_index[node.name]] += local_parts[k]
            contributions.append(c)
            if t.is_floating_point():  # self-check against the actual sparse execution
                actual = _diff_norm(tensors_s[k], t, n)
                excess = actual - c.sum(1) * (1 + CHECK_RTOL) - CHECK_ATOL * (1 + _per_sample_norm(t, n))
                excess = excess[: self.keep]
                worst = float(excess.max())
                if worst > checks.get("worst_excess", 0.0):
                    checks["worst_excess"], checks["worst_node"] = worst, node.name
                checks["violations"] = checks.get("violations", 0) + int((excess > 0).sum())
        self.contrib[node.name] = contributions if tuple_out else contributions[0]
        l2_bounds = [c.sum(1) if isinstance(c, torch.Tensor) else None for c in contributions]
        actual = [((s.double() - d.double()) if isinstance(s, torch.Tensor) and isinstance(d, torch.Tensor)
                   and d.is_floating_point() and s.shape == d.shape else None) for s, d in zip(tensors_s, tensors_d)]
        self.taylor.run(node, v_dense, tuple_out, per_output, local_vectors, _UNBOUNDED, l2_bounds, actual)
        try:
            self.crown.record(node, v_dense, tuple_out, local_vectors)
        except Exception as exc:  # noqa: BLE001 - the margin bound then stops at this node's box (sound)
            self.crown.fallback(node, f"{type(exc).__name__}: {str(exc)[:120]}")
        if node.target in _GEMM_LIKE:
            x_node, _, _ = self.gemm_operator(ctx)
            norms = self.input_norms.setdefault(node.name, [])
            norms.append(_per_sample_norm(self.dense_env[x_node.name], n)[: self.keep])
        if local_parts is not None:
            record = stats.setdefault(node.name, _LayerStats(node.name, _op_name(node.target)))
            local = local_parts[0] if local_parts[0] is not None else torch.zeros(n, dtype=torch.float64)
            record.local.append(local[: self.keep])
            if node.target in _GEMM_LIKE:
                terms = self.weight_only_term(node, n)
                if terms is not None:
                    record.weight_term.append(terms[0][: self.keep])
                    record.bias_term.append(terms[1][: self.keep])
                _, record.gain, _ = self.gemm_operator(ctx)


# ----------------------------------------------------------------------------------------------------------
# calibration batches


def _as_batches(batches) -> Iterable[tuple[torch.Tensor, ...]]:
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    for batch in batches:
        if isinstance(batch, torch.Tensor):
            yield (batch,)
        else:
            yield tuple(batch)


def _limit(batches, max_samples: int | None) -> Iterable[tuple[torch.Tensor, ...]]:
    seen = 0
    for batch in _as_batches(batches):
        if max_samples is not None:
            if seen >= max_samples:
                return
            batch = tuple(t[: max_samples - seen] for t in batch)
        seen += int(batch[0].shape[0]) if batch and batch[0].dim() else 0
        yield batch


def static_batch_size(gm: torch.fx.GraphModule) -> int | None:
    """The batch size baked into a graph exported without a dynamic batch (from its inputs' recorded
    shapes), or None (dynamic, or not recorded). Such a graph may hold the size in its ops too
    (``view(x, [8, 1280])``), so it only runs on batches of exactly that size."""
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        value = node.meta.get("val", node.meta.get("example_value"))
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            size = value.shape[0]
            return int(size) if isinstance(size, int) else None
    return None


def _rebatch(batches: Iterable[tuple[torch.Tensor, ...]], size: int | None):
    """(batch, real samples) pairs; for a static batch ``size``, batches of exactly that size, the last one
    padded by repeating its last sample (the padding's results are dropped; samples never mix: the
    certificate refuses ops that mix them)."""
    if size is None:
        for batch in batches:
            yield batch, int(batch[0].shape[0])
        return
    pending: list[tuple[torch.Tensor, ...]] = []
    count = 0
    for batch in batches:
        pending.append(batch)
        count += int(batch[0].shape[0])
        while count >= size:
            joined = tuple(torch.cat(parts) for parts in zip(*pending))
            yield tuple(t[:size] for t in joined), size
            rest = tuple(t[size:] for t in joined)
            count -= size
            pending = [rest] if count else []
    if count:
        joined = tuple(torch.cat(parts) for parts in zip(*pending))
        pad = size - count
        yield tuple(torch.cat([t, t[-1:].expand(pad, *t.shape[1:])]) for t in joined), count
