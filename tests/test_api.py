"""sparsecompile.build(model, ...): a model in memory or a path, calibration as an array or a file, the ordinary
build behind it; BuildOptions is the one list of build options the command line is checked against."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import sparsecompile
from sparsecompile.errors import SparseCompileError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_build_model_from_memory_matches_the_file_build(small_net, tmp_path, model_files):
    calib = np.load(model_files / "calib.npy")
    result = sparsecompile.build_model(small_net, tmp_path / "mem", calib=calib, min_weights=0, permute=False,
                                       method="magnitude")
    report = json.loads((tmp_path / "mem" / "report.json").read_text())
    assert report["source"]["path"] == "<in-memory SmallNet>" and report["source"]["kind"] == "in-memory"
    assert result.report["summary"]["sparse_layers"] > 0 and report["verification"]["damage"] is not None
    # The same model from a file, same options: the same sparse weights.
    from sparsecompile.build import BuildOptions, build

    from_file = build(BuildOptions(model=str(model_files / "dynamic.pt2"), calib=str(model_files / "calib.npy"),
                                   output=str(tmp_path / "file"), min_weights=0, permute=False, method="magnitude"))
    assert [r["status"] for r in from_file.report["layers"]] == [r["status"] for r in report["layers"]]
    assert ((tmp_path / "mem" / "weights.safetensors").read_bytes()
            == (tmp_path / "file" / "weights.safetensors").read_bytes())
    # A tensor works as well as an array, and an ExportedProgram as well as a module.
    program = torch.export.export(small_net.eval(), (torch.from_numpy(calib[:4]),))
    again = sparsecompile.build_model(program, tmp_path / "ep", calib=torch.from_numpy(calib), min_weights=0,
                                      permute=False, method="magnitude")
    assert again.report["source"]["path"] == "<in-memory ExportedProgram>"


def test_build_model_refuses_bad_arguments_with_one_line(small_net, tmp_path):
    with pytest.raises(SparseCompileError, match="needs calib or example_inputs"):
        sparsecompile.build_model(small_net, tmp_path / "a")
    with pytest.raises(SparseCompileError, match="unknown option"):
        sparsecompile.build_model(small_net, tmp_path / "b", calib=np.zeros((8, 4, 8, 8), np.float32), colour="red")
    with pytest.raises(SparseCompileError, match="not an option here"):
        sparsecompile.build_model(small_net, tmp_path / "c", calib=np.zeros((8, 4, 8, 8), np.float32),
                                  trust_pickle=True)
    with pytest.raises(SparseCompileError, match="nn.Module or an ExportedProgram"):
        sparsecompile.build_model(object(), tmp_path / "d", example_inputs=(torch.zeros(1, 4, 8, 8),))
    with pytest.raises(SparseCompileError, match="does not exist"):
        sparsecompile.build(tmp_path / "missing.pt2", tmp_path / "f")
    with pytest.raises(SparseCompileError, match="calib as an array"):
        sparsecompile.build(small_net, tmp_path / "g", calib="calib.npy")
    with pytest.raises(SparseCompileError, match="array or tensor"):
        sparsecompile.build_model(small_net, tmp_path / "e", calib=[[1, 2, 3]])


def test_sparsecompile_build_takes_a_path_and_is_still_the_build_module(model_files, tmp_path):
    from sparsecompile.build import BuildOptions, build

    assert sparsecompile.build.BuildOptions is BuildOptions and sparsecompile.build.build is build
    common = dict(min_weights=0, permute=False, method="magnitude")
    by_path = sparsecompile.build(model_files / "dynamic.pt2", output=tmp_path / "path",
                                  calib=model_files / "calib.npy", **common)
    by_array = sparsecompile.build(str(model_files / "dynamic.pt2"), tmp_path / "array",
                                   calib=np.load(model_files / "calib.npy"), **common)
    reference = build(BuildOptions(model=str(model_files / "dynamic.pt2"), calib=str(model_files / "calib.npy"),
                                   output=str(tmp_path / "options"), **common))
    weights = {r.files["weights.safetensors"].read_bytes() for r in (by_path, by_array, reference)}
    assert len(weights) == 1  # the same build three ways
    manifest = json.loads((tmp_path / "path" / "manifest.json").read_text())
    assert set(by_path.files) == {*manifest["files"], "manifest.json"}
    assert all(path.is_file() for path in by_path.files.values())
    assert by_path.report["source"]["path"] == str(model_files / "dynamic.pt2")


def test_every_build_option_on_the_command_line_is_a_build_options_field_with_its_default():
    import dataclasses

    import click

    from sparsecompile.build import BuildOptions
    from sparsecompile.cli import NOT_ON_THE_COMMAND_LINE, build_options, main

    command = main.commands["build"]
    context = click.Context(command)
    defaults = {}
    for param in command.params:
        value = param.get_default(context)
        if type(value).__name__ == "Sentinel":  # click's "no default": what a command line without it passes
            value = () if getattr(param, "multiple", False) else None
        defaults[param.name] = value
    from_cli = build_options(defaults)  # a click parameter that is no BuildOptions field raises TypeError here
    expected = BuildOptions()
    for field in dataclasses.fields(BuildOptions):
        assert getattr(from_cli, field.name) == getattr(expected, field.name), field.name
    renamed = {"masks_file": "masks", "certify_": "certify"}
    on_cli = {renamed.get(name, name) for name in defaults}
    assert {field.name for field in dataclasses.fields(BuildOptions)} - on_cli == NOT_ON_THE_COMMAND_LINE
