"""Convert an ONNX model shipped inside a pip wheel to a ``torch.export`` program (``.pt2``).

    python benchmarks/pretrained/convert.py MODEL.onnx OUT.pt2 --shape 3,48,320 [--static-batch N]

``onnx2torch.convert`` turns the ONNX graph into a ``torch.fx.GraphModule``; ``torch.export.export``
traces it at the given input shape (a dynamic batch dimension unless ``--static-batch N`` or the
ONNX input has a fixed batch), and ``torch.export.save`` writes the program. Before conversion the
ONNX graph gets its non-batch input dims fixed, onnxscript's constant folding, and two small
rewrites (``normalize_onnx``). The converted module is checked against ONNX Runtime on seeded random inputs at batch 1 and 3 (or the static batch):
the largest absolute difference of every output is returned / printed.

onnx2torch imports ``torchvision`` at module level for two converters (NonMaxSuppression,
RoiAlign) that none of these models use. torchvision is not installed here (it would pull another
torch), so when it is missing a stub module is registered that fails loudly if either converter is
ever reached.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import torch


def _stub_torchvision() -> None:
    try:
        import torchvision  # noqa: F401
        return
    except ImportError:
        pass

    def unavailable(*_a, **_k):
        raise RuntimeError("torchvision is not installed: this ONNX graph needs NonMaxSuppression/RoiAlign")

    tv = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    ops.roi_align = unavailable
    ops.nms = unavailable
    ops.batched_nms = unavailable
    tv.ops = ops
    sys.modules["torchvision"] = tv
    sys.modules["torchvision.ops"] = ops


def normalize_onnx(model):
    """Two rewrites onnx2torch needs on these Paddle exports; both keep the function identical.

    1. ``Constant`` nodes holding a tensor become initializers (Paddle2ONNX stores conv weights as
       ``Constant`` nodes; onnx2torch's Conv converter only looks weights up among initializers).
    2. ``Reshape(x, Concat(Slice(Shape(x), 0, 1), [-1]))`` -- "keep the batch, flatten the rest" --
       becomes ``Flatten(x, axis=1)``: onnx2torch runs the shape arithmetic through ``.numpy()``,
       which ``torch.export`` cannot trace.
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    keep = []
    for node in graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None and len(node.attribute) == 1:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            keep.append(node)
    producers = {out: n for n in keep for out in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    rewritten = []
    for node in keep:
        if node.op_type == "Reshape" and node.input[1] in producers:
            concat = producers[node.input[1]]
            parts = [producers.get(i) for i in concat.input] if concat.op_type == "Concat" else []
            if (len(parts) == 2 and parts[0] is not None and parts[0].op_type == "Slice"
                    and concat.input[1] in inits and inits[concat.input[1]].tolist() == [-1]):
                sl = parts[0]
                shape = producers.get(sl.input[0])
                starts, ends = inits.get(sl.input[1]), inits.get(sl.input[2])
                if (shape is not None and shape.op_type == "Shape" and shape.input[0] == node.input[0]
                        and starts is not None and ends is not None
                        and starts.tolist() == [0] and ends.tolist() == [1]):
                    rewritten.append(helper.make_node("Flatten", [node.input[0]], list(node.output),
                                                      name=(node.name or node.output[0]) + "_flatten", axis=1))
                    continue
        if node.op_type == "Reshape" and node.input[1] in inits and 0 not in inits[node.input[1]].tolist():
            # allowzero only changes what a 0 in the shape means; without zeros it is a no-op, and
            # onnx2torch refuses allowzero=1 (onnxscript's optimizer sets it on reshapes it rewrites).
            kept = [a for a in node.attribute if a.name != "allowzero"]
            del node.attribute[:]
            node.attribute.extend(kept)
        rewritten.append(node)
    del graph.node[:]
    graph.node.extend(rewritten)
    # Drop nodes whose outputs nobody uses any more (the Shape/Slice/Concat chains).
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        alive = [n for n in graph.node if any(o in used for o in n.output)]
        if len(alive) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(alive)
    return model


def fold_constants(model, shape: tuple[int, ...] | None, batch: int | None = None):
    """Fix the non-batch input dims to ``shape`` and run onnxscript's optimizer (constant folding,
    shape inference, dead-code removal): Paddle exports compute constant reshapes of initializers and
    shape arithmetic at run time, which onnx2torch turns into data-dependent Python ``if``s that
    ``torch.export`` cannot trace."""
    from onnxscript import optimizer

    if shape is not None:
        dims = model.graph.input[0].type.tensor_type.shape.dim
        fixed = ((batch,) if batch else (None,)) + tuple(shape)
        for dim, value in zip(list(dims), fixed):
            if value is None:
                continue
            dim.ClearField("dim_param")
            dim.dim_value = value
    import onnx

    return onnx.shape_inference.infer_shapes(optimizer.optimize(model))


class StaticReshape(torch.nn.Module):
    """ONNX Reshape with a constant target shape (0 = copy that input dim), as Python ints."""

    def __init__(self, shape: list[int]):
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.reshape(x, [x.shape[i] if d == 0 else d for i, d in enumerate(self.shape)])


class StaticResize(torch.nn.Module):
    """ONNX Resize with constant scales or sizes, as Python numbers (what onnx2torch's OnnxResize
    computes with ``.tolist()`` on the tensors at run time)."""

    def __init__(self, resize, scales: list[float] | None, sizes: list[int] | None):
        super().__init__()
        from onnx2torch.node_converters.resize import _onnx_mode_to_torch_mode

        self.mode = _onnx_mode_to_torch_mode(resize.onnx_mode, 2)
        self.align_corners = resize.align_corners
        if scales is not None and scales[:2] != [1, 1]:
            raise NotImplementedError("Resize over batch/channel dims")
        self.scales = scales[2:] if scales else None
        self.sizes = sizes[2:] if sizes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(x, size=self.sizes, scale_factor=self.scales, mode=self.mode,
                                               align_corners=self.align_corners)


class StaticSlice(torch.nn.Module):
    """ONNX Slice with constant starts/ends/axes/steps (onnx2torch's OnnxSlice reads them with
    ``.numpy()`` at run time)."""

    def __init__(self, starts, ends, axes=None, steps=None):
        super().__init__()
        from onnx2torch.node_converters.slice import _get_slices

        as_tensor = (lambda v: None if v is None else torch.tensor(v))
        self.slices = _get_slices(np.array(starts), np.array(ends), as_tensor(axes), as_tensor(steps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from onnx2torch.node_converters.slice import _do_slice

        return _do_slice(x, *self.slices)


def _constant(gm, arg):
    if getattr(arg, "op", None) != "get_attr":
        return None
    value = gm
    for part in arg.target.split("."):
        value = getattr(value, part)
    return value.tolist()


def static_reshapes(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Replace onnx2torch's ``OnnxReshape`` / ``OnnxResize`` / ``OnnxSlice`` fed by constant shapes or scales with
    modules holding them as Python numbers: the originals branch on the tensors' values
    (``torch.any(shape == 0)``, ``scales.tolist()``), which ``torch.export`` cannot trace."""
    from onnx2torch.node_converters.reshape import OnnxReshape
    from onnx2torch.node_converters.resize import OnnxResize
    from onnx2torch.node_converters.slice import OnnxSlice

    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, OnnxReshape):
            shape = _constant(gm, node.args[1])
            if shape is None:
                continue
            replacement = StaticReshape([int(v) for v in shape])
        elif isinstance(module, OnnxResize):
            args = list(node.args) + [None] * (4 - len(node.args))
            consts = [_constant(gm, a) if a is not None else None for a in args[1:4]]
            if any(a is not None and c is None for a, c in zip(args[1:4], consts)):
                continue
            roi, scales, sizes = consts
            if roi and not module.ignore_roi:
                continue
            replacement = StaticResize(module, [float(v) for v in scales] if scales else None,
                                       [int(v) for v in sizes] if sizes else None)
        elif isinstance(module, OnnxSlice):
            consts = [_constant(gm, a) for a in node.args[1:]]
            if any(c is None for c in consts):
                continue
            replacement = StaticSlice(*consts)
        else:
            continue
        name = node.target.replace(".", "_").replace("/", "_") + "_static"
        gm.add_submodule(name, replacement)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def onnx_to_torch(onnx_path: str | Path, shape: tuple[int, ...] | None = None,
                  batch: int | None = None) -> torch.nn.Module:
    _stub_torchvision()
    import onnx
    from onnx2torch import convert

    model = normalize_onnx(fold_constants(onnx.load(str(onnx_path)), shape, batch))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = static_reshapes(convert(model)).eval()
    # onnx2torch leaves some initializers as views sharing storage (e.g. ConvTranspose weights);
    # torch.export.save then fails ("numel: integer multiplication overflow"): give each its own copy.
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            tensor.data = tensor.data.contiguous().clone()
    return module


def onnx_static_batch(onnx_path: str | Path) -> int | None:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    result = []
    for item in out:
        result.extend(_flat(item))
    return result


def compare_with_onnxruntime(onnx_path: str | Path, module, inputs: np.ndarray) -> list[float]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    ref = session.run(None, {session.get_inputs()[0].name: inputs})
    with torch.no_grad():
        got = _flat(module(torch.from_numpy(inputs)))
    if len(ref) != len(got):
        raise RuntimeError(f"{len(got)} outputs in torch, {len(ref)} in ONNX Runtime")
    return [float(np.abs(r - g.numpy()).max()) for r, g in zip(ref, got)]


def convert_onnx(onnx_path: str | Path, out_path: str | Path, shape: tuple[int, ...],
                 static_batch: int | None = None, atol: float = 1e-3) -> dict:
    """Write ``out_path`` (.pt2) from ``onnx_path``; returns what was done (batch, max |diff| per output).

    With ``static_batch`` the ONNX batch dim is fixed to it before constant folding (graphs that do
    shape arithmetic on the batch dim then fold completely) and the program has that static batch.
    """
    module = onnx_to_torch(onnx_path, shape, static_batch)
    fixed = onnx_static_batch(onnx_path) or static_batch
    batch = fixed or 2
    rng = np.random.default_rng(0)
    example = torch.from_numpy(rng.standard_normal((batch, *shape)).astype(np.float32))
    dynamic = None if fixed else ({0: torch.export.Dim("batch", min=1, max=1024)},)
    with torch.no_grad():
        ep = torch.export.export(module, (example,), dynamic_shapes=dynamic)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp.pt2")
    torch.export.save(ep, tmp)
    os.replace(tmp, out_path)
    loaded = torch.export.load(str(out_path)).module()
    diffs = {}
    for n in ([batch] if dynamic is None else [1, 3]):
        x = rng.uniform(-1, 1, (n, *shape)).astype(np.float32)
        diffs[n] = compare_with_onnxruntime(onnx_path, loaded, x)
        if max(diffs[n]) > atol:
            raise RuntimeError(f"{out_path.name}: converted program differs from ONNX Runtime at batch {n}: {diffs[n]}")
    return {"dynamic_batch": dynamic is not None, "batch": batch, "shape": list(shape), "max_abs_diff": diffs,
            "params": sum(p.numel() for p in module.parameters())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("onnx")
    parser.add_argument("out")
    parser.add_argument("--shape", required=True, help="input shape without the batch dim, e.g. 3,48,320")
    parser.add_argument("--static-batch", type=int, default=None,
                        help="fix the batch dim to N (for graphs whose batch-dependent reshapes do not export)")
    args = parser.parse_args(argv)
    info = convert_onnx(args.onnx, args.out, tuple(int(s) for s in args.shape.split(",")), args.static_batch)
    print(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
