"""Remove dropout and identity ops.

At inference dropout is the identity, as are ``clone`` (without a memory
format change), ``alias`` and ``nn.Identity``. Each removed node's users are
rewired to its input, so the function is unchanged exactly (bit for bit).

Kept on purpose (the negative cases):

* dropout with ``train=True``: it is random, removing it would change the
  function; export the model in ``eval()`` mode instead.
* ``clone`` with a ``memory_format``: it changes the layout later ops see.
* ``native_dropout`` whose mask output is used.
"""

from __future__ import annotations

import torch
import torch.fx

from sparsecompile.graph import arg, is_getitem
from sparsecompile.passes.manager import PassContext, PassResult

aten = torch.ops.aten

_DROPOUT_OPS = {
    aten.dropout.default, aten.feature_dropout.default,
    aten.alpha_dropout.default, aten.feature_alpha_dropout.default,
}
_IDENTITY_OPS = {aten.alias.default, aten.lift_fresh_copy.default}


class RemoveIdentity:
    name = "remove_identity"

    def __call__(self, gm: torch.fx.GraphModule, context: PassContext) -> PassResult:
        removed: dict[str, int] = {}
        kept: list[str] = []
        for node in list(gm.graph.nodes):
            replacement = self._replacement(gm, node, kept)
            if replacement is None:
                continue
            if isinstance(replacement, list):  # tuple-returning op: rewire its getitem(0) users
                for user in replacement:
                    user.replace_all_uses_with(node.args[0])
                    gm.graph.erase_node(user)
            else:
                node.replace_all_uses_with(replacement)
            gm.graph.erase_node(node)
            key = str(node.target).split(".")[-2] if node.op == "call_function" else str(node.target)
            removed[key] = removed.get(key, 0) + 1
        if removed:
            gm.graph.eliminate_dead_code()
            gm.delete_all_unused_submodules()
        return PassResult(gm, bool(removed), {"removed": removed, "kept": kept})

    @staticmethod
    def _replacement(gm, node: torch.fx.Node, kept: list[str]):
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, torch.nn.Identity) or (
                isinstance(module, torch.nn.modules.dropout._DropoutNd) and not module.training
            ):
                return node.args[0]
            return None
        if node.op != "call_function":
            return None
        if node.target in _DROPOUT_OPS:
            if arg(node, 2, "train", False):
                kept.append(f"{node.name}: dropout in training mode (export the model after model.eval())")
                return None
            return node.args[0]
        if node.target == aten.native_dropout.default:
            train = arg(node, 2, "train", False)
            if train:
                kept.append(f"{node.name}: dropout in training mode (export the model after model.eval())")
                return None
            users = list(node.users)
            if all(is_getitem(u, 0) for u in users):
                return users
            kept.append(f"{node.name}: dropout mask output is used")
            return None
        if node.target == aten.clone.default:
            if node.kwargs.get("memory_format") not in (None, torch.preserve_format):
                kept.append(f"{node.name}: clone changes memory format")
                return None
            return node.args[0]
        if node.target in _IDENTITY_OPS:
            return node.args[0]
        return None
