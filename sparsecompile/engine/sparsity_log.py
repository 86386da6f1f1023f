"""Read TensorRT's build log: which layers were eligible for sparse math, which got sparse kernels.

With sparse weights enabled and a verbose (or info) log, TensorRT prints two lines
(in trtexec's format; the Python logger prefixes them differently, which does not matter here)::

    [I] [TRT] (Sparsity) Layers eligible for sparse math: conv_a + relu_a, conv_b, matmul_c
    [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: conv_b

Names are TensorRT layer names: the ONNX node names, joined with `` + `` when TensorRT fused
nodes. TensorRT times sparse and dense kernels and keeps the faster one, so an eligible layer
may still run dense. :func:`layer_sparsity` maps both lists back to our layers through the
ONNX node that consumes each layer's weight.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ELIGIBLE = re.compile(r"\(Sparsity\) Layers eligible for sparse math:(.*)$")
_PICKED = re.compile(r"\(Sparsity\) TRT inference plan picked sparse implementation for layers:(.*)$")


@dataclass
class SparsityLog:
    eligible: list[str]  # TensorRT layer names (fused names kept whole)
    picked: list[str]


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def parse_sparsity_log(text: str) -> SparsityLog | None:
    """The two lists from a TensorRT build log; None when the log has neither (sparsity off, quiet log)."""
    eligible = picked = None
    for line in text.splitlines():
        match = _ELIGIBLE.search(line)
        if match:
            eligible = _names(match.group(1))  # the last build in a log wins
            continue
        match = _PICKED.search(line)
        if match:
            picked = _names(match.group(1))
    if eligible is None and picked is None:
        return None
    return SparsityLog(eligible or [], picked or [])


def _parts(trt_names: list[str]) -> set[str]:
    """Every ONNX node name inside TensorRT layer names (fused layers are 'a + b + c')."""
    parts = set()
    for name in trt_names:
        for part in name.split(" + "):
            part = part.strip()
            parts.add(part)
            # Myelin/foreign nodes wrap their members: {ForeignNode[a...b]}
            parts.update(re.findall(r"[\w./:-]+", part))
    return parts


def weight_consumers(onnx_model) -> dict[str, str]:
    """Initializer name -> name of the ONNX node that consumes it (first consumer)."""
    consumers = {}
    initializers = {i.name for i in onnx_model.graph.initializer}
    for node in onnx_model.graph.node:
        for name in node.input:
            if name in initializers and name not in consumers:
                consumers[name] = node.name
    return consumers


def layer_sparsity(layers: list[dict], log: SparsityLog | None, consumers: dict[str, str]) -> list[dict]:
    """Per build layer: ``engine`` = picked sparse | eligible, stayed dense | not eligible | unknown."""
    eligible, picked = (_parts(log.eligible), _parts(log.picked)) if log else (set(), set())
    rows = []
    for layer in layers:
        node = consumers.get(layer["weight"])
        if log is None or node is None:
            status = "unknown"
        elif node in picked:
            status = "picked sparse"
        elif node in eligible:
            status = "eligible, stayed dense"
        else:
            status = "not eligible"
        rows.append({"name": layer["name"], "onnx_node": node, "mask": layer["status"], "engine": status})
    return rows


def layer_tactics(engine_info: dict, consumers: dict[str, str]) -> dict[str, dict]:
    """ONNX node name -> {"trt_layer", "tactic", "layer_type"} from the engine inspector's JSON.

    The inspector (``layers.json``, profiling verbosity DETAILED) lists ``{"Layers": [{"Name",
    "LayerType", "TacticName", ...}]}``; with a lower verbosity the entries may be bare names, which
    carry no tactic and are skipped.
    """
    nodes = set(consumers.values())
    found = {}
    for entry in engine_info.get("Layers", []):
        if not isinstance(entry, dict) or "Name" not in entry:
            continue
        for part in _parts([entry["Name"]]):
            if part in nodes and part not in found:
                found[part] = {"trt_layer": entry["Name"], "tactic": entry.get("TacticName"),
                               "layer_type": entry.get("LayerType")}
    return found
