"""Run a graph over the whole calibration set one node at a time, in two streams.

Calibration-aware mask methods and statistics correction need, for each
layer, statistics of its inputs or outputs over *all* calibration samples
before the next layer runs (SparseGPT's sequential order). This runner
executes the graph node by node; every activation is a list with one tensor
per calibration chunk, freed after its last use.

Two streams run in lockstep:

* the **reference** stream uses a snapshot of the dense weights (see
  :func:`snapshot`): the function the user gave us;
* the **working** stream uses whatever the weights are *now*, so a layer that
  a hook masked or corrected affects everything downstream.

Hooks run before a layer (seeing both streams' environments) and after it
(seeing both streams' outputs; it may replace the working outputs). Constant
subgraphs (``get_attr`` and views of weights such as ``permute(W)``) are
evaluated on demand, so a weight a hook just changed is what the layer uses.

Memory. A layer's statistics need all of its input's chunks before it runs, so
a node's value is held for every chunk until its last user has run: what is
live is the graph's frontier times the number of chunks, not the whole graph.
Within a node the chunks stream: chunk ``i`` of an input whose last user is this
node is released as soon as chunk ``i`` of the output exists, so a chain of
layers holds ``chunks + 1`` values per stream, not two full lists. The
reference stream runs only when asked (``reference=True``): a caller whose
hooks never read it (sequential statistics without correction) pays for one
stream. Graph outputs are kept only with ``outputs=True``. ``peak_live_chunks``
counts the most chunk values held at once (both streams), for tests.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.fx

from sparsecompile.graph import get_tensor

Values = list[torch.Tensor]
Env = dict[torch.fx.Node, Values]
BeforeHook = Callable[[torch.fx.Node, Env, Env], None]
AfterHook = Callable[[torch.fx.Node, Values, Values], "Values | None"]


def snapshot(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer: the reference (dense) state."""
    tensors = dict(gm.named_parameters())
    tensors.update(dict(gm.named_buffers()))
    return {name: tensor.detach().clone() for name, tensor in tensors.items()}


class LockstepRunner:
    def __init__(self, gm: torch.fx.GraphModule, reference_state: dict[str, torch.Tensor]):
        self.gm = gm
        self.reference_weights = reference_state
        nodes = list(gm.graph.nodes)
        self.constant: set[torch.fx.Node] = set()
        for node in nodes:
            if node.op == "get_attr" or (
                node.op == "call_function" and node.all_input_nodes
                and all(a in self.constant for a in node.all_input_nodes)
            ):
                self.constant.add(node)
        self.last_use: dict[torch.fx.Node, torch.fx.Node] = {}
        for node in nodes:
            for inp in node.all_input_nodes:
                self.last_use[inp] = node

    def _constant(self, node: torch.fx.Node, reference: bool):
        if node.op == "get_attr":
            if reference and node.target in self.reference_weights:
                return self.reference_weights[node.target]
            return get_tensor(self.gm, node.target)
        args = torch.fx.node.map_arg(node.args, lambda n: self._constant(n, reference))
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: self._constant(n, reference))
        return node.target(*args, **kwargs)

    def execute_with(self, node: torch.fx.Node, env: Env, index: int, weights: dict[str, torch.Tensor]):
        """``node`` on chunk ``index`` of the reference ``env`` with some reference weights replaced by
        ``weights`` (e.g. a layer's dense weight masked): what the layer alone does to the dense activations."""
        saved = {name: self.reference_weights[name] for name in weights if name in self.reference_weights}
        self.reference_weights.update(weights)
        try:
            return self._execute(node, env, index, True)
        finally:
            for name in weights:
                self.reference_weights.pop(name, None)
            self.reference_weights.update(saved)

    def _gather(self, arguments, env, index: int, reference: bool):
        """``arguments`` with every node replaced by its value for chunk ``index``."""
        return torch.fx.node.map_arg(
            arguments, lambda n: self._constant(n, reference) if n in self.constant else env[n][index]
        )

    def _execute(self, node, env, index: int, reference: bool):
        args = self._gather(node.args, env, index, reference)
        kwargs = self._gather(node.kwargs, env, index, reference)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_module":
            return self.gm.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        raise RuntimeError(f"cannot execute node '{node.name}' ({node.op})")

    @torch.no_grad()
    def run(
        self,
        chunks: list[tuple[torch.Tensor, ...]],
        watched_nodes: set[str],
        before: BeforeHook | None = None,
        after: AfterHook | None = None,
        show_progress: Callable[[list], "Iterable"] | None = None,
        *,
        reference: bool = True,
        outputs: bool = True,
    ) -> tuple[list, list]:
        """Run every chunk; returns the (reference, working) graph outputs, one entry per chunk.

        ``reference=False``: only the working stream runs; hooks get an empty reference environment and
        an empty reference list. ``outputs=False``: no graph outputs are kept (both lists come back empty).
        """
        streams = [(True, {}), (False, {})] if reference else [(False, {})]
        reference_env: Env = streams[0][1] if reference else {}
        working_env: Env = streams[-1][1]
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        count = len(chunks)
        self.live_chunks = self.peak_live_chunks = 0
        for position, node in enumerate(placeholders):
            column = [chunk[position] for chunk in chunks]
            for _, env in streams:
                env[node] = list(column)
                self._count(count)
        results: tuple[list, list] = ([], [])
        nodes = list(self.gm.graph.nodes)
        for node in show_progress(nodes) if show_progress else nodes:
            if node.op == "output":
                for is_reference, env in streams:
                    if outputs:
                        out = results[0] if is_reference else results[1]
                        out.extend(self._gather(node.args[0], env, i, is_reference) for i in range(count))
                    for inp in node.all_input_nodes:
                        self._count(-sum(v is not None for v in env.pop(inp, [])))
                continue
            if node.op == "placeholder" or node in self.constant:
                continue
            watched = node.name in watched_nodes
            if watched and before is not None:
                before(node, reference_env, working_env)
            finished = [inp for inp in dict.fromkeys(node.all_input_nodes)
                        if self.last_use.get(inp) is node and inp not in self.constant]
            for _, env in streams:
                env[node] = [None] * count
            for i in range(count):
                for is_reference, env in streams:
                    value = env[node][i] = self._execute(node, env, i, is_reference)
                    self._count(value is not None)
                    for inp in finished:  # streamed: this chunk of the input has had its last use
                        if env[inp][i] is not None:
                            env[inp][i] = None
                            self._count(-1)
            for _, env in streams:
                for inp in finished:
                    del env[inp]
            if watched and after is not None:
                replaced = after(node, reference_env.get(node, []), working_env[node])
                if replaced is not None:
                    working_env[node] = replaced
            if not node.users:  # a value nothing reads (not even the output): release it now
                for _, env in streams:
                    self._count(-sum(v is not None for v in env.pop(node, [])))
        return results

    def _count(self, change: int) -> None:
        self.live_chunks += change
        self.peak_live_chunks = max(self.peak_live_chunks, self.live_chunks)
