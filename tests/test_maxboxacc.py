"""MaxBoxAcc / MaxBoxAccV2: every convention of Choe et al. (CVPR 2020) on hand-made maps,
the fast paths against the plain per-threshold loop, and exactly-once merging."""

import importlib.util
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cstn.metrics import component_tree
from cstn.metrics import maxboxacc as M
from cstn.metrics import (MaxBoxAccEvaluator, cam_boxes, choose_cam_threshold, normalize_scoremap,
                          prepare_scoremaps, wsol_resize_boxes)

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_evaluator", ROOT / "bench" / "evaluator.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def from_levels(levels) -> np.ndarray:
    """A float64 map whose quantisation ``uint8(map * 255)`` is exactly ``levels`` (255 -> 1.0)."""
    levels = np.asarray(levels, np.float64)
    return np.where(levels >= 255, 1.0, (levels + 0.5) / 255)


def both_modes(score_map, gt, thresholds):
    """(best IoU over all contours, over the largest contour) at each threshold, from the evaluators."""
    multi = MaxBoxAccEvaluator(thresholds, multi_contour_eval=True).best_ious(score_map, [np.asarray(gt, float)])[0]
    single = MaxBoxAccEvaluator(thresholds, multi_contour_eval=False).best_ious(score_map, [np.asarray(gt, float)])[0]
    return multi, single


def test_quantisation_truncates_the_float64_product():
    assert M._quantise(np.array([0.0, 0.2, 0.5, 0.999, 1.0])).tolist() == [0, 51, 127, 254, 255]
    assert M._quantise(from_levels([0, 7, 100, 254, 255])).tolist() == [0, 7, 100, 254, 255]
    # a float32 map is upcast before the product: 0.2f is 0.200000003 -> 51.0000007 -> 51
    assert M._quantise(np.array([0.2], np.float32)).tolist() == [51]


def test_cut_off_is_relative_to_the_map_maximum_and_strict():
    # block of level 100 (rows 2-5, cols 2-6) and one pixel of level 200 at (8, 8): max 200
    levels = np.zeros((10, 10))
    levels[2:6, 2:7] = 100
    levels[8, 8] = 200
    gt = [[2, 2, 6, 5]]  # the block, inclusive pixels
    # t = 0.49: cut-off int(98.0) = 98 keeps the block: its box [2, 2, 7, 6] -> 20 / 30;
    # t = 0.5: cut-off 100 = the block's level, strictly greater needed: only the pixel, IoU 0
    multi, single = both_modes(from_levels(levels), gt, [0.49, 0.5])
    assert multi.tolist() == [20 / 30, 0.0] and single.tolist() == [20 / 30, 0.0]


def test_box_is_clipped_to_w_minus_1():
    # a block touching the right and bottom edges: boundingRect x=6, w=4 -> x + w = 10 -> clipped to 9
    levels = np.zeros((10, 10))
    levels[7:, 6:] = 255
    multi, _ = both_modes(from_levels(levels), [[6, 7, 9, 9]], [0.0])
    assert multi.tolist() == [1.0]  # without the clip it would be 12 / 20
    assert cam_boxes(from_levels(levels), 0.0).tolist() == [[6, 7, 10, 10]]  # cam_boxes: exact extent


def test_no_contour_gives_the_box_0_0_0_0():
    empty = np.zeros((8, 8))
    assert both_modes(empty, [[0, 0, 1, 1]], [0.0, 0.5])[0].tolist() == [0.25, 0.25]  # 1 px / 4 px
    assert both_modes(empty, [[0, 0, 0, 0]], [0.0])[1].tolist() == [1.0]
    assert both_modes(empty, [[2, 2, 5, 5]], [0.0])[0].tolist() == [0.0]
    assert cam_boxes(empty, 0.3).tolist() == [[0, 0, 0, 0]] and cam_boxes(empty, 0.3, all_regions=True).shape == (0, 4)


def ring_map():
    levels = np.zeros((12, 12))
    levels[2:10, 2:10] = 255
    levels[4:8, 4:8] = 0
    return from_levels(levels)


def test_hole_contours_are_candidates():
    # outer contour box [2, 2, 10, 10]; the hole's border (pixels 3..8) gives [3, 3, 9, 9]
    contours, _ = cv2.findContours(M._quantise(ring_map()), cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    assert sorted(cv2.boundingRect(c) for c in contours) == [(2, 2, 8, 8), (3, 3, 6, 6)]
    multi, single = both_modes(ring_map(), [[3, 3, 8, 8]], [0.0])
    assert multi.tolist() == [36 / 49]  # the hole box
    assert single.tolist() == [36 / 81]  # the largest contour is the outer one


def blobs_map():
    levels = np.zeros((20, 20))
    levels[2, 2:14] = 255  # a 1-pixel line: 12 pixels, contour area 0
    levels[10:13, 10:13] = 255  # a 3 x 3 square: 9 pixels, contour area 4
    return from_levels(levels)


def test_largest_contour_is_by_contour_area_not_pixel_count():
    contours, _ = cv2.findContours(M._quantise(blobs_map()), cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    assert sorted(cv2.contourArea(c) for c in contours) == [0.0, 4.0]
    line_box = [[2, 2, 14, 3]]  # Choe et al.'s box of the line
    multi, single = both_modes(blobs_map(), line_box, [0.0])
    assert multi.tolist() == [1.0] and single.tolist() == [0.0]
    assert cam_boxes(blobs_map(), 0.0).tolist() == [[10, 10, 13, 13]]
    assert sorted(cam_boxes(blobs_map(), 0.0, all_regions=True).tolist()) == [[2, 2, 14, 3], [10, 10, 13, 13]]


def test_best_match_over_several_ground_truth_boxes_and_iou_at_the_threshold():
    # square box [10, 10, 13, 13]; only the second GT matches; the third gives exactly 16 / 32
    _, single = both_modes(blobs_map(), [[15, 15, 18, 18], [10, 10, 13, 13]], [0.0])
    assert single.tolist() == [1.0]
    _, single = both_modes(blobs_map(), [[10, 10, 13, 17]], [0.0])
    assert single.tolist() == [0.5]
    ev = MaxBoxAccEvaluator([0.0], iou_thresholds=(0.5,), multi_contour_eval=False)
    ev.accumulate(blobs_map()[None], [np.array([[10, 10, 13, 17]])])
    assert ev.compute()["MaxBoxAcc"] == 100.0  # IoU exactly 0.5 counts


def test_compute_maxima_thresholds_and_v2_mean_by_hand():
    levels = np.zeros((10, 10))
    levels[2:6, 2:7] = 100
    levels[8, 8] = 200
    p = from_levels(levels)  # best IoU [2/3, 0] at thresholds [0.49, 0.5] (see above)
    q_levels = np.zeros((10, 10))
    q_levels[2:6, 2:7] = 255
    q = from_levels(q_levels)  # its own box: IoU 1 at both
    ev = MaxBoxAccEvaluator([0.49, 0.5], iou_thresholds=(0.3, 0.5, 0.7))
    ev.accumulate(np.stack([p, q]), [np.array([[2, 2, 6, 5]]), np.array([[2, 2, 7, 6]])])
    curves = ev.accuracy_curves()
    assert curves["iou30"].tolist() == [100, 50] and curves["iou70"].tolist() == [50, 50]
    m = ev.compute(expected_total=2)
    assert m["MaxBoxAccV2_iou30"] == 100 and m["MaxBoxAccV2_iou50"] == 100 and m["MaxBoxAccV2_iou70"] == 50
    assert m["best_threshold_iou70"] == 0.49  # the lowest threshold on ties
    assert m["MaxBoxAccV2"] == pytest.approx(250 / 3) and m["MaxBoxAcc"] == 100 and m["num_images"] == 2
    assert ev.best_threshold(0.5) == 0.49
    assert choose_cam_threshold(p[None], [np.array([[2, 2, 6, 5]])], [0.49, 0.5]) == 0.49


def test_maxboxacc_is_added_at_iou_half_when_not_listed():
    ev = MaxBoxAccEvaluator([0.0], iou_thresholds=(0.3, 0.7))
    ev.accumulate(ring_map()[None], [np.array([[3, 3, 8, 8]])])
    m = ev.compute()
    assert m["MaxBoxAcc"] == 100.0 and m["MaxBoxAccV2"] == 100.0 and "MaxBoxAccV2_iou50" in m


def test_fast_paths_equal_the_per_threshold_loop_on_smooth_and_noisy_maps():
    bench = _bench()
    maps, boxes = bench.smooth_maps(4, size=96, seed=3)
    rng = np.random.default_rng(1)
    noisy = [rng.integers(0, 256, (rng.integers(3, 25), rng.integers(3, 25))) for _ in range(12)]
    noisy_boxes = [np.sort(rng.integers(0, 3, (2, 4)), axis=0) for _ in noisy]  # small boxes near the origin
    thresholds = MaxBoxAccEvaluator.cam_threshold_list(1000)
    for score_map, gt in list(zip(maps, boxes)) + [(from_levels(n), g) for n, g in zip(noisy, noisy_boxes)]:
        gt = np.asarray(gt, float)
        gt[:, 2:] = np.maximum(gt[:, 2:], gt[:, :2])
        multi, single = both_modes(score_map, gt, thresholds)
        assert np.array_equal(multi, bench.reference_best_ious(score_map, gt, thresholds))
        assert np.array_equal(single, bench.reference_best_ious(score_map, gt, thresholds, largest=True))
    # the batched entry point agrees with the one-map one, and float32 maps with their float64 upcast
    got = component_tree.scoremap_best_ious_all_contours(maps.astype(np.float32), boxes, thresholds)
    want = np.stack([component_tree.scoremap_best_ious_all_contours(m.astype(np.float32).astype(np.float64), g, thresholds)
                     for m, g in zip(maps, boxes)])
    assert np.array_equal(got, want)


def test_merge_keeps_each_index_once_and_checks_the_count():
    maps = np.stack([ring_map(), from_levels(np.pad(np.full((4, 4), 255), 4)), np.zeros((12, 12))])
    gts = [np.array([[3, 3, 8, 8]]), np.array([[4, 4, 8, 8]]), np.array([[0, 0, 1, 1]])]
    single = MaxBoxAccEvaluator()
    single.accumulate(maps, gts, indices=[0, 1, 2])
    r0, r1 = MaxBoxAccEvaluator(), MaxBoxAccEvaluator()
    r0.accumulate(maps[[0, 2]], [gts[0], gts[2]], indices=[0, 2])
    r1.accumulate(torch.as_tensor(maps[[1, 2]]), [gts[1], gts[2]], indices=torch.tensor([1, 2]))  # 2: padding
    merged = MaxBoxAccEvaluator.merge([pickle.loads(pickle.dumps(s)) for s in (r1.state(), r0.state())])
    assert len(merged) == 3 and merged.compute(expected_total=3) == single.compute(expected_total=3)
    with pytest.raises(ValueError, match="holds 3 distinct score maps but the manifest total is 4"):
        merged.compute(expected_total=4)
    bad = MaxBoxAccEvaluator()
    bad.accumulate(maps[[0]], [np.array([[2, 2, 10, 10]])], indices=[2])  # index 2 with other flags
    with pytest.raises(ValueError, match="global index 2 was evaluated twice"):
        MaxBoxAccEvaluator.merge([r0.state(), bad.state()])
    with pytest.raises(ValueError, match="different thresholds"):
        MaxBoxAccEvaluator.merge([r0.state(), MaxBoxAccEvaluator([0.5]).state()])


def test_invalid_maps_and_boxes_are_named():
    ev = MaxBoxAccEvaluator()
    with pytest.raises(ValueError, match=r"index 7 must lie in \[0, 1\]"):
        ev.accumulate(np.full((1, 4, 4), 1.5), [np.array([[0, 0, 1, 1]])], indices=[7])
    with pytest.raises(ValueError, match="without NaN"):
        ev.accumulate(np.full((1, 4, 4), np.nan), [np.array([[0, 0, 1, 1]])])
    with pytest.raises(ValueError, match="x0 <= x1"):
        ev.accumulate(np.zeros((1, 4, 4)), [np.array([[3, 0, 1, 1]])])
    with pytest.raises(ValueError, match="image index 0 has no ground-truth box"):
        ev.accumulate(np.zeros((1, 4, 4)), [np.zeros((0, 4))], indices=[0])
    with pytest.raises(ValueError, match=r"cam_thresholds must be"):
        MaxBoxAccEvaluator([0.5, 1.0])
    # normalize=True accepts raw maps
    ev.accumulate(np.full((1, 4, 4), 7.0), [np.array([[0, 0, 0, 0]])], normalize=True)
    assert ev.compute()["MaxBoxAcc"] == 100.0  # a constant map normalises to zeros: box [0, 0, 0, 0]


def test_normalisation_resizing_and_box_resizing():
    assert normalize_scoremap(np.array([[2.0, 4.0, 6.0]])).tolist() == [[0.0, 0.5, 1.0]]
    assert normalize_scoremap(np.full((2, 2), 3.0)).tolist() == [[0.0, 0.0], [0.0, 0.0]]
    assert normalize_scoremap(np.array([[1.0, np.nan]])).tolist() == [[0.0, 0.0]]
    cams = np.random.default_rng(0).normal(size=(2, 7, 7))
    maps = prepare_scoremaps(cams, 224)
    assert maps.shape == (2, 224, 224) and maps.min() == 0.0 and maps.max() == 1.0
    want = normalize_scoremap(cv2.resize(cams[1], (224, 224), interpolation=cv2.INTER_CUBIC))
    assert np.array_equal(maps[1], want)
    # ILSVRC2012_val_00000001: 500 x 375, box 111,108,441,193 -> their int-truncated 224 x 224 box
    assert wsol_resize_boxes([[111, 108, 441, 193]], 500, 375).tolist() == [[49, 64, 197, 115]]
