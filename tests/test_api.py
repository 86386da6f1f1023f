"""sparsecompile.build_model: a model in memory, calibration as an array, the ordinary build behind it."""

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
        sparsecompile.build_model("model.pt2", tmp_path / "d", example_inputs=(torch.zeros(1, 4, 8, 8),))
    with pytest.raises(SparseCompileError, match="array or tensor"):
        sparsecompile.build_model(small_net, tmp_path / "e", calib=[[1, 2, 3]])
