"""Per-layer time: which parameter belongs to which layer (from a build's report, an ONNX file or an FX
graph), ONNX Runtime's profiler mapped onto those layers, and torch.profiler over labelled FX nodes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from sparsecompile.profile.design import Variant

LAYER_RUNS = 20  # profiled iterations per variant for the per-layer table (after LAYER_WARMUP)
LAYER_WARMUP = 2
_LAYER_OPS = ("conv", "linear", "addmm", "matmul", "mm", "gemm")


def layer_map_from_report(report: dict | None) -> dict[str, dict]:
    """Parameter name (weight and bias) -> ``{"layer", "status", "op"}`` from a build's report.json."""
    mapping: dict[str, dict] = {}
    for layer in (report or {}).get("layers", []):
        weight = layer.get("weight")
        if not weight or not layer.get("name"):
            continue
        info = {"layer": layer["name"], "status": layer.get("status", "?"), "op": layer.get("op", "")}
        mapping[weight] = info
        if weight.endswith(".weight"):
            mapping.setdefault(weight[: -len("weight")] + "bias", info)
    return mapping


def layer_map_from_onnx(onnx_path: Path, status: str = "dense") -> dict[str, dict]:
    """For a model without a report: every Conv/Gemm/MatMul weight initializer ``X.weight`` is layer ``X``."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    mapping: dict[str, dict] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        for name in node.input:
            if name in initializers and name.endswith(".weight"):
                info = {"layer": name[: -len(".weight")], "status": status, "op": node.op_type.lower()}
                mapping.setdefault(name, info)
                mapping.setdefault(name[: -len("weight")] + "bias", info)
    return mapping


def map_ort_nodes(node_names: Sequence[str], original_onnx: Path, optimized_onnx: Path | None,
                  param_map: dict[str, dict]) -> dict[str, dict]:
    """ORT profiler node names -> layer info, for those that belong to a layer.

    Looks at (1) the node's inputs in the optimized graph ORT ran, (2) the
    original node of the same name, (3) for nodes ORT renamed after the
    tensor they produce (``relu_1_nchwc``), the original producer of that
    tensor and, through single-input ops (Relu, Clip, ...), the node before it.
    """
    import onnx

    def graph_nodes(path):
        if path is None or not Path(path).exists():
            return []
        try:
            return list(onnx.load(str(path), load_external_data=False).graph.node)
        except Exception:  # noqa: BLE001 - an optimized graph ORT could not serialize is optional
            return []

    original = graph_nodes(original_onnx)
    optimized = {node.name: node for node in graph_nodes(optimized_onnx)}
    by_name = {node.name: node for node in original}
    producer = {out: node for node in original for out in node.output}

    def from_inputs(node):
        for name in node.input:
            if name in param_map:
                return param_map[name]
        return None

    def walk_back(node, depth=3):
        while node is not None and depth >= 0:
            found = from_inputs(node)
            if found:
                return found
            data_inputs = [i for i in node.input if i in producer]
            if len(data_inputs) != 1:
                return None
            node = producer[data_inputs[0]]
            depth -= 1
        return None

    result = {}
    for name in node_names:
        found = None
        if name in optimized:
            found = from_inputs(optimized[name])
        if found is None and name in by_name:
            found = from_inputs(by_name[name])
        if found is None:
            base = re.sub(r"(_nchwc|_token_\d+)$", "", name)
            if base in producer:
                found = walk_back(producer[base])
        if found is not None:
            result[name] = found
    return result


def _layer_table(per_node_ms: dict[str, float], op_of: dict[str, str], node_layers: dict[str, dict]) -> dict:
    layers: dict[str, dict] = {}
    other_ms, other_ops = 0.0, {}
    for node, ms in per_node_ms.items():
        info = node_layers.get(node)
        if info is None:
            other_ms += ms
            op = op_of.get(node, "?")
            other_ops[op] = other_ops.get(op, 0.0) + ms
            continue
        row = layers.setdefault(info["layer"], {"layer": info["layer"], "status": info["status"], "op": info["op"],
                                                "ms": 0.0, "nodes": []})
        row["ms"] += ms
        row["nodes"].append(node)
    total = sum(per_node_ms.values())
    rows = sorted(layers.values(), key=lambda r: -r["ms"])
    for row in rows:
        row["share"] = row["ms"] / total if total else 0.0
    return {"total_ms": total, "layers": rows, "other_ms": other_ms,
            "other_ops": dict(sorted(other_ops.items(), key=lambda kv: -kv[1]))}


def ort_layer_profile(variant: Variant, arrays: list[np.ndarray], runs: int, *, threads: int,
                      param_map: dict[str, dict], workdir: Path) -> dict:
    """Per-layer mean time per run from ONNX Runtime's profiler (a separate profiling session)."""
    from sparsecompile.backends.onnxruntime_runner import OrtRunner

    workdir.mkdir(parents=True, exist_ok=True)
    # The optimized graph names the fused nodes; a model near protobuf's 2 GiB limit cannot be saved
    # without external data, so large ones map through the original graph only.
    small = Path(variant.artifact).stat().st_size < 2**30
    optimized = workdir / f"{variant.name}.optimized.onnx" if small else None
    runner = OrtRunner(variant.artifact, threads=threads, profile_prefix=workdir / f"{variant.name}.ort",
                       optimized_model_path=optimized).load()
    try:
        for _ in range(LAYER_WARMUP + runs):
            runner.infer(arrays)
        trace_path = runner.end_profiling()
    finally:
        runner.close()
    events = json.loads(Path(trace_path).read_text())
    run_windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                         if e.get("cat") == "Session" and e.get("name") == "model_run")
    kept = run_windows[LAYER_WARMUP:]
    per_node: dict[str, float] = {}
    op_of: dict[str, str] = {}
    starts = [w[0] for w in kept]
    import bisect

    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        index = bisect.bisect_right(starts, event["ts"]) - 1
        if index < 0 or event["ts"] > kept[index][1]:
            continue  # a warm-up run
        node = event["name"][: -len("_kernel_time")]
        per_node[node] = per_node.get(node, 0.0) + event["dur"] / 1000.0
        op_of[node] = event.get("args", {}).get("op_name", "?")
    count = max(1, len(kept))
    per_node = {k: v / count for k, v in per_node.items()}
    node_layers = map_ort_nodes(list(per_node), Path(variant.artifact), optimized, param_map)
    table = _layer_table(per_node, op_of, node_layers)
    table.update({"runs": len(kept), "profiler": "onnxruntime"})
    return table


def torch_layer_map(module) -> dict[str, dict]:
    """For a model without a report: weights ``X.weight`` used by conv/linear/matmul FX nodes are layer ``X``."""
    mapping: dict[str, dict] = {}
    for node in module.graph.nodes:
        if node.op != "call_function":
            continue
        op = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        if not any(key in op for key in _LAYER_OPS):
            continue
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and str(arg.target).endswith(".weight"):
                name = str(arg.target)[: -len(".weight")]
                mapping.setdefault(str(arg.target), {"layer": name, "status": "dense", "op": op})
    return mapping


@contextlib.contextmanager
def _quiet_native_stderr():
    """torch.profiler's native tracer prints start/stop lines to fd 2; keep them out of the user's terminal."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def torch_layer_profile(variant: Variant, arrays: list[np.ndarray], runs: int, *, param_map: dict[str, dict]) -> dict:
    """Per-layer time from torch.profiler: FX nodes using a layer's weight run inside a labelled range."""
    import torch
    import torch.fx

    runner = variant.runner
    module = runner.module
    labels: dict[str, dict] = {}
    for node in module.graph.nodes:
        if node.op == "call_function":
            for arg in node.all_input_nodes:
                if arg.op == "get_attr" and str(arg.target) in param_map:
                    labels[node.name] = param_map[str(arg.target)]
                    break

    class Labelled(torch.fx.Interpreter):
        def run_node(self, node):
            info = labels.get(node.name)
            if info is None:
                return super().run_node(node)
            with torch.profiler.record_function(f"layer::{info['layer']}"):
                return super().run_node(node)

    cuda = variant.device == "cuda"
    tensors = runner.prepare(arrays)
    interpreter = Labelled(module)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad():
        for _ in range(LAYER_WARMUP):
            interpreter.run(*tensors)
        with _quiet_native_stderr():
            prof = torch.profiler.profile(activities=activities)
            prof.start()
        try:
            start = time.perf_counter()
            for _ in range(runs):
                interpreter.run(*tensors)
            if cuda:
                torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - start) * 1000.0 / runs
        finally:
            with _quiet_native_stderr():
                prof.stop()
    per_layer: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key.startswith("layer::"):
            micros = getattr(event, "device_time_total", 0.0) if cuda else event.cpu_time_total
            if cuda and not micros:
                micros = event.cpu_time_total
            per_layer[event.key[len("layer::"):]] = micros / 1000.0 / runs
    by_layer = {info["layer"]: info for info in labels.values()}
    rows = []
    for layer, ms in sorted(per_layer.items(), key=lambda kv: -kv[1]):
        info = by_layer[layer]
        rows.append({"layer": layer, "status": info["status"], "op": info["op"], "ms": ms,
                     "share": ms / wall_ms if wall_ms else 0.0,
                     "nodes": [n for n, i in labels.items() if i["layer"] == layer]})
    other = max(0.0, wall_ms - sum(per_layer.values()))
    return {"total_ms": wall_ms, "layers": rows, "other_ms": other, "other_ops": {}, "runs": runs,
            "profiler": "torch.profiler" + (" (device time)" if cuda else " (CPU time, FX interpreter)")}
