"""--save-masks / --masks: masks chosen once, applied to an updated checkpoint of the same architecture."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TwoInTwoOut, make_small_net, small_input
from sparsecompile.build import BuildOptions, build
from sparsecompile.errors import SparseCompileError
from sparsecompile.masks.saved import inf_norm, load_masks


def _export(model, path):
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(torch.export.export(model, (small_input(),), dynamic_shapes=({0: batch},)), path)
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory, model_files):
    root = tmp_path_factory.mktemp("masks")
    result = build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(root / "first"), min_weights=0,
                                calib=str(model_files / "calib.npy"), save_masks=str(root / "m.safetensors"),
                                permute_budget=0.5, method="magnitude"))
    return root, result


def test_saved_file_holds_masks_orders_and_references(saved):
    root, first = saved
    masks = load_masks(root / "m.safetensors")
    sparse = {r["weight"] for r in first.report["layers"] if r["status"] == "sparse"}
    assert set(masks.masks) == sparse and masks.pattern == (2, 4) and masks.method == "magnitude"
    permuted = first.report["permutation"]["permuted_groups"]
    assert len(masks.permutations) == permuted
    for target, mask in masks.masks.items():
        groups = mask.transpose(0, 1).reshape(-1, 4) if mask.dim() == 4 else mask.reshape(mask.shape[0], -1, 4)
        assert int(groups.sum()) * 2 == mask.numel()


def test_masks_applied_to_an_updated_checkpoint(saved, tmp_path, model_files):
    root, first = saved
    updated = make_small_net()
    with torch.no_grad():
        for param in updated.parameters():
            param.add_(0.01 * torch.randn_like(param))
    path = _export(updated, tmp_path / "updated.pt2")
    result = build(BuildOptions(model=str(path), output=str(tmp_path / "second"), min_weights=0,
                                calib=str(model_files / "calib.npy"), masks=str(root / "m.safetensors"),
                                save_masks=str(tmp_path / "again.safetensors")))
    assert result.report["method"] == "saved masks (magnitude)"
    again, original = load_masks(tmp_path / "again.safetensors"), load_masks(root / "m.safetensors")
    for target in original.masks:
        assert torch.equal(again.masks[target], original.masks[target])  # the same masks, not re-chosen
    assert again.permutations == original.permutations
    for record in result.report["layers"]:
        if record["status"] == "sparse":
            reuse = record["mask_reuse"]
            assert reuse["norm_inf_update"] > 0 and 0 < reuse["relative_update"] < 0.5
            assert reuse["norm_inf_now"] <= reuse["norm_inf_chosen_on"] + reuse["norm_inf_update"] + 1e-9
    # on the very model the masks were chosen on, the update is zero
    same = build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / "same"), min_weights=0,
                              calib=str(model_files / "calib.npy"), masks=str(root / "m.safetensors")))
    assert all(r["mask_reuse"]["norm_inf_update"] == 0 for r in same.report["layers"] if "mask_reuse" in r)
    assert same.report["verification"]["sparse_vs_dense"] == first.report["verification"]["sparse_vs_dense"]


def test_mismatches_are_one_clear_error(saved, tmp_path, model_files):
    root, _ = saved
    masks = str(root / "m.safetensors")
    wrong = TwoInTwoOut().eval()
    torch.export.save(torch.export.export(wrong, (torch.randn(2, 8, 12), torch.randn(2, 12))), tmp_path / "w.pt2")
    with pytest.raises(SparseCompileError, match="same architecture|--masks: no saved mask for layer|has no eligible layer"):
        build(BuildOptions(model=str(tmp_path / "w.pt2"), output=str(tmp_path / "a"), min_weights=0, masks=masks))
    with pytest.raises(SparseCompileError, match="pass --pattern 2:4"):
        build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / "b"), min_weights=0,
                           masks=masks, pattern=(4, 8)))
    with pytest.raises(SparseCompileError, match="drop --no-permute"):
        build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / "c"), min_weights=0,
                           masks=masks, permute=False))
    with pytest.raises(SparseCompileError, match="no saved mask for layer 'fc2'"):
        build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / "d"), min_weights=0,
                           masks=str(_drop_layer(root / "m.safetensors", tmp_path, "fc2.weight"))))
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(SparseCompileError, match="corrupt or truncated|not a sparsecompile masks file"):
        build(BuildOptions(model=str(model_files / "dynamic.pt2"), output=str(tmp_path / "e"),
                           masks=str(tmp_path / "junk.safetensors")))
    for name in "abcde":
        assert not (tmp_path / name).exists()


def _drop_layer(path, tmp_path, target):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["sparsecompile"])
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if not k.startswith(target + ".")}
    del header["weights"][target]
    out = tmp_path / "dropped.safetensors"
    save_file(tensors, str(out), metadata={"sparsecompile": json.dumps(header)})
    return out


def test_inf_norm_is_the_operator_norm():
    w = torch.tensor([[1.0, -2.0], [0.5, 0.5]])
    assert inf_norm(w, 1) == 3.0
    conv = torch.randn(3, 4, 2, 2)
    expected = conv.abs().sum(dim=(1, 2, 3)).max()
    assert inf_norm(conv, 1) == pytest.approx(float(expected))
