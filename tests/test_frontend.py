"""Frontend: every accepted model kind loads to an equivalent ATen graph; bad files fail in one line."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import TwoInTwoOut, small_input
from sparsecompile.errors import SparseCompileError
from sparsecompile.frontend import load_model, parse_input_shape
from sparsecompile.verify import flat_outputs

aten = torch.ops.aten


def _same(reference, loaded, *inputs):
    with torch.no_grad():
        expected = flat_outputs(reference(*inputs))
        actual = flat_outputs(loaded.module(*inputs))
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def _aten_targets(gm):
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def test_pt2_loads_as_aten_graph_with_dynamic_batch(model_files, small_net):
    loaded = load_model(model_files / "dynamic.pt2")
    assert loaded.source_kind == "pt2"
    assert loaded.dynamic_batch
    assert loaded.input_names == ["x"]
    assert aten.conv2d.default in _aten_targets(loaded.module)
    assert any(n.op == "get_attr" and n.target == "conv1.weight" for n in loaded.module.graph.nodes)
    _same(small_net, loaded, small_input(4))
    _same(small_net, loaded, small_input(7, seed=5))  # another batch size
    assert len(loaded.source_sha256) == 64


def test_static_pt2_keeps_its_batch(model_files, small_net):
    loaded = load_model(model_files / "static.pt2")
    assert not loaded.dynamic_batch
    assert loaded.batch_size == 4
    _same(small_net, loaded, small_input(4))


class _FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(x.view(4, -1))  # hard-coded batch: must stay static


def test_hard_coded_batch_stays_static(tmp_path):
    model = _FixedBatch().eval()
    x = torch.randn(4, 4, 4)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "fixed.pt2")
    loaded = load_model(tmp_path / "fixed.pt2")
    assert not loaded.dynamic_batch
    assert loaded.batch_size == 4
    assert any("static" in note for note in loaded.notes)
    _same(model, loaded, x)


def test_input_shape_overrides_examples(model_files):
    loaded = load_model(model_files / "dynamic.pt2", input_shapes=[(2, 4, 8, 8)])
    assert tuple(loaded.example_inputs[0].shape) == (2, 4, 8, 8)


def test_torchscript_is_converted(model_files, small_net):
    loaded = load_model(model_files / "scripted.ts", input_shapes=[(4, 4, 8, 8)])
    assert loaded.source_kind == "torchscript"
    assert isinstance(loaded.module, torch.fx.GraphModule)
    _same(small_net, loaded, small_input(4))


def test_torchscript_without_shapes_says_what_to_pass(model_files):
    with pytest.raises(SparseCompileError, match="--input-shape"):
        load_model(model_files / "scripted.ts")


@pytest.mark.parametrize("weights", ["state_dict.pt", "weights.safetensors"])
def test_factory_with_weights(model_files, small_net, weights):
    loaded = load_model(factory="conftest:build_factory", weights=model_files / weights,
                        input_shapes=[(4, 4, 8, 8)])
    assert loaded.source_kind == "factory"
    _same(small_net, loaded, small_input(4))


def test_factory_errors(model_files, tmp_path):
    with pytest.raises(SparseCompileError, match="package.module:function"):
        load_model(factory="no_colon_here", input_shapes=[(1, 4, 8, 8)])
    with pytest.raises(SparseCompileError, match="cannot import"):
        load_model(factory="no_such_module_xyz:build", input_shapes=[(1, 4, 8, 8)])
    with pytest.raises(SparseCompileError, match="no callable"):
        load_model(factory="conftest:nothing_here", input_shapes=[(1, 4, 8, 8)])
    bad = tmp_path / "bad.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(SparseCompileError, match="do not match"):
        load_model(factory="conftest:build_factory", weights=bad, input_shapes=[(1, 4, 8, 8)])


def test_pickled_module_needs_trust(model_files, small_net):
    with pytest.raises(SparseCompileError, match="--trust-pickle"):
        load_model(model_files / "pickled.pt", input_shapes=[(4, 4, 8, 8)])
    loaded = load_model(model_files / "pickled.pt", trust_pickle=True, input_shapes=[(4, 4, 8, 8)])
    assert loaded.source_kind == "pickle"
    _same(small_net, loaded, small_input(4))


def test_state_dict_as_model_points_to_factory(model_files):
    with pytest.raises(SparseCompileError, match="--model-factory"):
        load_model(model_files / "state_dict.pt", input_shapes=[(4, 4, 8, 8)])


class _Marker:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_pt2_with_code_in_its_pickles_is_refused(model_files, tmp_path):
    marker = tmp_path / "code-ran"
    payload = io.BytesIO()
    torch.save({"inputs": _Marker(str(marker))}, payload)
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(model_files / "dynamic.pt2") as src, zipfile.ZipFile(evil, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("sample_inputs/model.pt"):
                data = payload.getvalue()
            dst.writestr(info, data)
    with pytest.raises(SparseCompileError, match="--trust-pickle"):
        load_model(evil)
    assert not marker.exists()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(b"definitely not a model\n" * 10), "not a model"),
        (lambda p: p.mkdir(), "directory"),
    ],
)
def test_bad_model_files(tmp_path, make, message):
    path = tmp_path / "model.pt2"
    make(path)
    with pytest.raises(SparseCompileError, match=message):
        load_model(path)


def test_truncated_pt2(model_files, tmp_path):
    data = (model_files / "dynamic.pt2").read_bytes()
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(SparseCompileError, match="truncated"):
        load_model(truncated)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export cannot trace this
            return self.fc(x)
        return x


def test_untraceable_model_names_the_line(tmp_path):
    torch.save(_DataDependent(), tmp_path / "dd.pt")
    with pytest.raises(SparseCompileError) as info:
        load_model(tmp_path / "dd.pt", trust_pickle=True, input_shapes=[(2, 4)])
    message = str(info.value)
    assert "could not trace" in message
    assert "test_frontend.py" in message and "x.sum() > 0" in message
    assert "\n" not in message


def test_wrong_input_shape_is_one_line(model_files):
    with pytest.raises(SparseCompileError, match="does not run on inputs of shape 2x3x8x8"):
        load_model(model_files / "dynamic.pt2", input_shapes=[(2, 3, 8, 8)])


def test_several_inputs_and_outputs(tmp_path):
    model = TwoInTwoOut().eval()
    signal, features = torch.randn(3, 8, 20), torch.randn(3, 12)
    torch.export.save(torch.export.export(model, (signal, features)), tmp_path / "two.pt2")
    loaded = load_model(tmp_path / "two.pt2")
    assert loaded.input_names == ["signal", "features"]
    _same(model, loaded, signal, features)


@pytest.mark.parametrize("text, shape", [("1,3,224,224", (1, 3, 224, 224)), ("2x8", (2, 8))])
def test_parse_input_shape(text, shape):
    assert parse_input_shape(text) == shape


@pytest.mark.parametrize("text", ["", "a,b", "1,-3", "0,4"])
def test_parse_input_shape_rejects(text):
    with pytest.raises(SparseCompileError, match="--input-shape"):
        parse_input_shape(text)


def test_pickle_module_is_not_imported_for_pt2(model_files, monkeypatch):
    """Loading a .pt2 must never fall back to an unrestricted unpickler."""
    calls = []
    original = pickle.Unpickler

    class Spy(original):
        def __init__(self, *args, **kwargs):
            calls.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(pickle, "Unpickler", Spy)
    load_model(model_files / "dynamic.pt2")
    assert calls == []
