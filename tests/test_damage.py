"""Per-output damage (damage.py): kinds, units, budgets, non-finite outputs, the held-back split."""

from __future__ import annotations

import math

import pytest
import torch

from sparsecompile.damage import (ctc_greedy, edit_distance, holdout_split, infer_kind, measure_damage, output_kinds,
                                  parse_output_kinds)
from sparsecompile.errors import SparseCompileError


def test_kinds_are_inferred_from_shape_and_values():
    logits = torch.randn(8, 10)
    assert infer_kind(logits) == "classes"
    assert infer_kind(torch.randn(8, 1)) == "values"
    assert infer_kind(torch.randn(8, 40, 37).softmax(-1)) == "sequence"
    assert infer_kind(torch.randn(8, 40, 37).log_softmax(-1)) == "sequence"
    # A detector head [N, 4 + classes, anchors] is not a distribution per position: values.
    assert infer_kind(torch.randn(8, 84, 300)) == "values"
    assert infer_kind(torch.randn(8, 3, 16, 16)) == "values"
    assert infer_kind(torch.arange(8).reshape(8, 1)) == "values"
    # Sigmoid class scores per anchor [N, A, C]: in [0, 1], rows not summing to 1.
    assert infer_kind(torch.randn(8, 300, 10).sigmoid()) == "scores"
    assert infer_kind(torch.randn(2, 1, 32, 32).sigmoid()) == "scores"  # a text detector's probability map
    assert infer_kind(torch.randn(2, 3, 32, 32).sigmoid()) == "values"  # an RGB image in [0, 1] is not


def test_classes_damage_is_points_of_top1_agreement():
    dense = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]]).repeat(5, 1)  # 20 samples
    flipped = dense.clone()
    flipped[[0, 2]] = torch.tensor([1.0, 2.0])  # both had argmax 0
    damage = measure_damage([dense], [flipped], ["classes"], max_drop=8.0)
    out = damage.outputs[0]
    assert out.damage == pytest.approx(10.0) and out.detail["top1_agreement"] == 0.9
    assert damage.score == pytest.approx(10.0 / 8.0) and not damage.within
    assert measure_damage([dense], [dense * 1.5], ["classes"]).within


def test_a_budget_finer_than_one_prediction_is_raised_to_it():
    """With 20 samples one flip is 5 points: a 1-point budget would fail any change, however small."""
    dense = torch.randn(20, 3, generator=torch.Generator().manual_seed(0))
    one = dense.clone()
    one[0] = -one[0]
    out = measure_damage([dense], [one], ["classes"], max_drop=1.0).outputs[0]
    assert out.damage == pytest.approx(5.0) and out.budget == pytest.approx(5.0) and out.ratio == pytest.approx(1.0)
    assert out.detail["budget_asked"] == 1.0 and "one changed prediction, 1 pt asked" in out.describe()
    two = one.clone()
    two[1] = -two[1]
    assert measure_damage([dense], [two], ["classes"], max_drop=1.0).outputs[0].ratio == pytest.approx(2.0)


def test_sequence_damage_counts_positions_and_reports_decoded_sequences():
    ids = torch.tensor([[1, 1, 0, 2, 2], [3, 0, 3, 0, 0]])
    dense = torch.nn.functional.one_hot(ids, 4).double().softmax(-1)
    changed_ids = ids.clone()
    changed_ids[1, 1] = 3  # "3 _ 3" -> "3 3 3": the decoding changes from (3, 3) to (3,)
    sparse = torch.nn.functional.one_hot(changed_ids, 4).double().softmax(-1)
    out = measure_damage([dense], [sparse], ["sequence"]).outputs[0]
    assert out.damage == pytest.approx(10.0)  # 1 of 10 positions
    assert out.detail["sequence_agreement"] == 0.5
    assert out.detail["decoded_error"] == pytest.approx(1 / 4)  # one of the dense transcription's 4 characters
    assert "25% of characters differ from dense" in out.describe()
    assert edit_distance((1, 2, 3), (1, 3)) == 1 and edit_distance((), (4, 4)) == 2
    assert ctc_greedy(ids) == [(1, 2), (3, 3)]


def test_values_damage_is_relative_error_percent():
    dense = torch.ones(4, 3)
    out = measure_damage([dense], [dense * 1.02], ["values"], max_error=1.0).outputs[0]
    assert out.damage == pytest.approx(2.0) and out.ratio == pytest.approx(2.0) and out.unit == "%"
    assert out.detail["cosine"] == pytest.approx(1.0)


def test_nan_outputs_are_never_within_budget():
    dense = torch.randn(4, 5)
    broken = dense.clone()
    broken[2, 1] = float("nan")
    for kind in ("classes", "values"):
        damage = measure_damage([dense], [broken], [kind], max_drop=100.0, max_error=1e9)
        assert math.isinf(damage.score) and not damage.within
        assert damage.outputs[0].detail["non_finite_values"] == 1
    # All-NaN on both sides is not agreement either way: NaN dense outputs are the dense model's problem,
    # but a sparse model cannot be judged against them, so they are left out of the comparison.
    nan = torch.full((4, 5), float("nan"))
    assert measure_damage([nan], [nan], ["values"]).outputs[0].detail["relative_error"] == 0.0


def test_worst_output_decides_and_every_output_is_reported():
    dense = [torch.randn(16, 10), torch.ones(16, 4, 2)]
    sparse = [dense[0].clone(), torch.full((16, 4, 2), 1.5)]
    damage = measure_damage(dense, sparse, output_kinds(dense))
    assert [o.kind for o in damage.outputs] == ["classes", "values"]
    assert damage.worst.output == 1 and not damage.within
    assert damage.to_json()["outputs"][0]["within"] is True


def test_output_kind_overrides_are_checked():
    assert parse_output_kinds("0=classes, 1=values") == {0: "classes", 1: "values"}
    for bad in ("0", "x=classes", "0=boxes"):
        with pytest.raises(SparseCompileError, match="INDEX=KIND"):
            parse_output_kinds(bad)
    with pytest.raises(SparseCompileError, match="has 1 output"):
        output_kinds([torch.randn(4, 3)], {1: "values"})
    with pytest.raises(SparseCompileError, match="not \\[N, T, C\\]"):
        output_kinds([torch.randn(4, 3)], {0: "sequence"})


def test_scores_damage_is_agreement_on_what_passes_the_threshold():
    dense = torch.full((4, 100, 10), 0.01)
    dense[:, :5, 0] = 0.9  # 20 detections: 5 anchors per sample above 0.5
    # Background noise moves a lot (a large relative error) but nothing crosses the threshold: no damage.
    noisy = dense.clone()
    noisy[:, 5:, :] = 0.3
    [out] = measure_damage([dense], [noisy], ["scores"]).outputs
    assert out.kind == "scores" and out.damage == 0.0 and out.detail["above_threshold_f1"] == 1.0
    assert measure_damage([dense], [noisy], ["values"]).outputs[0].damage > 100  # relative error calls it broken
    # Two detections lost and two spurious ones: F1 = 2 * 18 / (20 + 20) = 0.9 -> 10 points.
    changed = dense.clone()
    changed[0, :2, 0] = 0.4
    changed[1, 50:52, 3] = 0.7
    [out] = measure_damage([dense], [changed], ["scores"], max_drop=1.0).outputs
    assert out.damage == pytest.approx(10.0) and not out.detail["dense_above"] != 20
    assert out.detail["sparse_above"] == 20 and out.ratio > 1
    assert "above-threshold agreement lost 10 pt" in out.describe()
    # A lower threshold turns the 0.4 scores back into detections.
    [low] = measure_damage([dense], [changed], ["scores@0.3"]).outputs
    assert low.detail["threshold"] == 0.3 and low.damage == pytest.approx(100 * (1 - 2 * 20 / 42))
    assert parse_output_kinds("1=scores@0.3") == {1: "scores@0.3"}
    for bad in ("1=scores@1.5", "1=scores@x", "1=values@0.3"):
        with pytest.raises(SparseCompileError, match="only scores take a threshold"):
            parse_output_kinds(bad)
    with pytest.raises(SparseCompileError, match="outside \\[0, 1\\]"):
        output_kinds([torch.randn(4, 10, 3)], {0: "scores"})


def test_holdout_split_is_seeded_disjoint_and_covers_sorted_data():
    fit, held = holdout_split(400, seed=0)
    assert len(held) == 100 and len(fit) == 300 and not set(fit) & set(held)
    assert holdout_split(400, seed=0) == (fit, held) and holdout_split(400, seed=1) != (fit, held)
    labels = [i // 40 for i in range(400)]  # a file sorted by class: every class is held back
    assert {labels[i] for i in held} == set(range(10))
    fit, held = holdout_split(100, multiple=8)
    assert len(fit) % 8 == 0 and len(held) % 8 == 0
    assert holdout_split(20) is None  # 5 would be held back: too few
