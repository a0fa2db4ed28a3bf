"""Box geometry (hand-computed) and decoding: Top-1 / GT-Known / top-k boxes, Table I swap."""
import pytest
import torch

from cstn.inference import Predictions, predict
from cstn.models.geometry import (identity_theta, reference_boxes, transformed_boxes, window_centres)
from cstn.models.output import ModelOutput


def level_geometry(height, width, k, p, stride):
    centres = window_centres(height, width, k, p) * stride
    half = torch.full((centres.shape[0],), k / 2 * stride)
    return centres, half


def test_reference_windows_by_hand():
    # P4 of a 64 px input: 4x4 cells of 16 px; k = 3, padding 1 -> 4x4 locations.
    centres, half = level_geometry(4, 4, 3, 1, 16)
    boxes = reference_boxes(centres, half, (64, 64))
    assert boxes.shape == (16, 4)
    # location (row 0, col 0): window cells [-1, 2) -> pixels [-16, 32), clipped at 0
    torch.testing.assert_close(boxes[0], torch.tensor([0.0, 0.0, 32.0, 32.0]))
    # location (row 1, col 2): cells x [1, 4), y [0, 3) -> [16, 64) x [0, 48)
    torch.testing.assert_close(boxes[1 * 4 + 2], torch.tensor([16.0, 0.0, 64.0, 48.0]))
    # no padding, k = 5 on a 7x7 P4 of a 112 px input: 3x3 locations, the centre one is 80 px wide
    centres, half = level_geometry(7, 7, 5, 0, 16)
    boxes = reference_boxes(centres, half, (112, 112))
    assert boxes.shape == (9, 4)
    torch.testing.assert_close(boxes[4], torch.tensor([16.0, 16.0, 96.0, 96.0]))
    torch.testing.assert_close(boxes[0], torch.tensor([0.0, 0.0, 80.0, 80.0]))


def test_identity_theta_gives_the_reference_boxes():
    centres, half = level_geometry(4, 4, 3, 1, 16)
    theta = identity_theta(2, 16)
    torch.testing.assert_close(transformed_boxes(theta, centres, half, (64, 64)),
                               reference_boxes(centres, half, (64, 64)).expand(2, -1, -1))


def test_translation_and_scale_move_the_box_by_hand():
    # One window centred at (40, 56) px with half side 24 px in a 100 x 120 (H x W) image.
    centres = torch.tensor([[40.0, 56.0]])
    half = torch.tensor([24.0])
    # half width, shift right by half a half-window (12 px); height doubled, shifted up 6 px
    theta = torch.tensor([[[[0.5, 0.0, 0.5], [0.0, 2.0, -0.25]]]])
    box = transformed_boxes(theta, centres, half, (100, 120))[0, 0]
    # x: 40 + 24 * 0.5 = 52 +- 24 * 0.5 -> [40, 64]; y: 56 - 6 = 50 +- 48 -> [2, 98]
    torch.testing.assert_close(box, torch.tensor([40.0, 2.0, 64.0, 98.0]))
    # shear: x reach = |theta00| + |theta01| = 1.25 -> half width 30
    theta = torch.tensor([[[[1.0, -0.25, 0.0], [0.0, 1.0, 0.0]]]])
    box = transformed_boxes(theta, centres, half, (100, 120))[0, 0]
    torch.testing.assert_close(box, torch.tensor([10.0, 32.0, 70.0, 80.0]))
    # a mirrored window (negative scale) has the same hull
    theta = torch.tensor([[[[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]]])
    box = transformed_boxes(theta, centres, half, (100, 120))[0, 0]
    torch.testing.assert_close(box, torch.tensor([16.0, 32.0, 64.0, 80.0]))


def test_boxes_clip_at_the_image_border():
    centres = torch.tensor([[8.0, 8.0]])
    half = torch.tensor([24.0])
    theta = torch.tensor([[[[3.0, 0.0, 2.0], [0.0, 3.0, -2.0]]]])
    box = transformed_boxes(theta, centres, half, (64, 48))[0, 0]
    # x: 8 + 48 = 56 +- 72 -> [-16, 128] -> [0, 48]; y: 8 - 48 = -40 +- 72 -> [-112, 32] -> [0, 32]
    torch.testing.assert_close(box, torch.tensor([0.0, 0.0, 48.0, 32.0]))


def make_output(logits, grids=((4, 2, 2), (5, 1, 1))):
    """A cstn ModelOutput with distinct boxes per location: box l = [l, 0, l + 10, 10] (+100 for ref)."""
    batch, _, locations = logits.shape
    index = torch.arange(locations, dtype=torch.float32)
    boxes = torch.stack([index, torch.zeros_like(index), index + 10, torch.full_like(index, 10)], 1)
    level = torch.cat([torch.full((h * w,), lv) for lv, h, w in grids])
    return ModelOutput(kind="cstn", logits=logits, theta=identity_theta(batch, locations),
                       boxes=boxes.expand(batch, -1, -1), ref_boxes=(boxes + 100).expand(batch, -1, -1),
                       level=level, grids=grids)


def test_predict_top1_gt_known_and_topk():
    logits = torch.zeros(2, 3, 5)
    # image 0: class 2 wins overall (two strong locations), its best location is 4 (level 5);
    # the true class 0 is best at location 1, then 3, then 0.
    logits[0, 2, 4] = 6.0
    logits[0, 2, 2] = 5.0
    logits[0, 0, 1] = 4.0
    logits[0, 0, 3] = 3.0
    logits[0, 0, 0] = 2.0
    # image 1: class 1 wins and is the true class, best at location 0
    logits[1, 1, 0] = 5.0
    logits[1, 1, 2] = 4.5
    preds = predict(make_output(logits), labels=torch.tensor([0, 1]), topk=2)
    assert preds.topk_classes[0].tolist() == [2, 0]
    assert preds.topk_classes[1, 0] == 1                 # classes 0 and 2 tie for the second place
    assert preds.top1_location.tolist() == [4, 0]
    assert preds.top1_level.tolist() == [5, 4]
    torch.testing.assert_close(preds.top1_box, torch.tensor([[4.0, 0, 14, 10], [0, 0, 10, 10]]))
    torch.testing.assert_close(preds.top1_ref_box, preds.top1_box + 100)
    assert preds.gt_known_location.tolist() == [1, 0]
    assert preds.gt_known_level.tolist() == [4, 4]
    torch.testing.assert_close(preds.gt_known_box, torch.tensor([[1.0, 0, 11, 10], [0, 0, 10, 10]]))
    assert preds.gt_known_topk_boxes.shape == (2, 2, 4)
    assert preds.gt_known_topk_boxes[0, :, 0].tolist() == [1.0, 3.0]
    assert preds.gt_known_topk_boxes[1, :, 0].tolist() == [0.0, 2.0]
    torch.testing.assert_close(preds.gt_known_topk_ref_boxes, preds.gt_known_topk_boxes + 100)
    # scores: p(c) = sum over locations of the joint, best first, and the top-1 joint score
    joint = torch.softmax(logits.flatten(1), 1).view(2, 3, 5)
    torch.testing.assert_close(preds.topk_scores, joint.sum(2).topk(2, dim=1).values)
    torch.testing.assert_close(preds.top1_score, torch.stack([joint[0, 2, 4], joint[1, 1, 0]]))


def test_without_transform_swaps_only_the_boxes():
    torch.manual_seed(0)
    output = make_output(torch.randn(3, 4, 5))
    labels = torch.tensor([0, 3, 1])
    with_t = predict(output, labels, topk=3, use_transform=True)
    without = predict(output, labels, topk=3, use_transform=False)
    for name in ("topk_classes", "topk_scores", "top1_location", "top1_level", "top1_score",
                 "gt_known_location", "gt_known_level", "top1_ref_box", "gt_known_ref_box"):
        torch.testing.assert_close(getattr(without, name), getattr(with_t, name))
    torch.testing.assert_close(without.top1_box, with_t.top1_ref_box)
    torch.testing.assert_close(without.gt_known_box, with_t.gt_known_ref_box)
    torch.testing.assert_close(without.gt_known_topk_boxes, with_t.gt_known_topk_ref_boxes)


def test_topk_is_clamped_to_classes_and_locations():
    output = make_output(torch.randn(1, 3, 5))
    preds = predict(output, torch.tensor([2]), topk=10)
    assert preds.topk_classes.shape == (1, 3)
    assert preds.gt_known_topk_boxes.shape == (1, 5, 4)
    assert preds.gt_known_topk_levels.shape == (1, 5)


def test_predict_without_labels_has_no_gt_known_fields():
    preds = predict(make_output(torch.randn(2, 3, 5)))
    assert preds.gt_known_box is None and preds.top1_box.shape == (2, 4)


def test_predict_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels must lie"):
        predict(make_output(torch.randn(2, 3, 5)), torch.tensor([0, 3]))


def test_predict_cam_gives_classes_scores_and_maps():
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    cams = torch.randn(1, 3, 4, 4)
    preds = predict(ModelOutput(kind="cam", logits=logits, cams=cams), torch.tensor([1]), topk=2)
    assert preds.topk_classes.tolist() == [[1, 2]]
    torch.testing.assert_close(preds.topk_scores, torch.softmax(logits, 1).topk(2).values)
    assert preds.cams is cams and preds.top1_box is None
    moved = preds.to("cpu")
    assert isinstance(moved, Predictions) and moved.top1_box is None


def test_level_first_picks_the_level_of_largest_mass_then_its_best_location():
    # one class; P4 (4 locations) holds the single most probable location but little mass,
    # P5 (2 locations) most of the mass: joint MAP -> P4 location 0, level first -> P5 location 5
    probs = torch.tensor([[[0.34, 0.01, 0.01, 0.01, 0.30, 0.33]]])
    out = make_output(probs.log(), grids=((4, 2, 2), (5, 1, 2)))
    labels = torch.tensor([0])
    joint = predict(out, labels=labels, topk=2)
    first = predict(out, labels=labels, topk=2, level_choice="level_first")
    assert joint.top1_location.tolist() == [0] and joint.top1_level.tolist() == [4]
    assert first.top1_location.tolist() == [5] and first.top1_level.tolist() == [5]
    assert first.gt_known_location.tolist() == [5] and first.gt_known_level.tolist() == [5]
    assert first.top1_box.tolist() == [[5.0, 0.0, 15.0, 10.0]]
    assert first.top1_score.item() == pytest.approx(0.33, rel=1e-5)
    assert torch.equal(first.gt_known_topk_boxes, joint.gt_known_topk_boxes)  # top-k keeps the joint order
    with pytest.raises(ValueError, match="eval.level_choice"):
        predict(out, level_choice="best")
