"""LocalizationEvaluator: hand-computed IoUs and accuracies, exactly-once merging, size thirds,
the area histogram and the predictions file."""

import csv
import json
import pickle

import numpy as np
import pytest
import torch
import torchvision

from cstn.metrics import BoxPredictions, LocalizationEvaluator, best_iou_against_gt, iou_suffix

# Three images whose every figure is worked out by hand (IoU on continuous xyxy, x1 exclusive).
#
# image 10: label 3, top-5 [3, 1, 2, 4, 5] (top-1 right). Two GT boxes; only the SECOND,
#   [0, 0, 10, 10], is met: Top-1 box [0, 0, 20, 10] -> 100 / 200 = 0.5 exactly.
#   GT-known box the same (0.5). Top-5 boxes: four misses, the last one 0.5.
#   Reference boxes [0, 0, 10, 10]: IoU 1 (top-1 ref) and 1 (GT-known ref).
# image 11: label 3, top-5 [7, 3, 0, 1, 2] (top-1 wrong, top-5 right). GT [0, 0, 10, 10].
#   Top-1 box equals the GT (IoU 1, but the class is wrong). GT-known [2, 0, 10, 10] -> 0.8.
#   Top-5 boxes all 0.8. Reference: top-1 [0, 0, 10, 10] (1.0, class wrong), GT-known [5, 0, 10, 10] -> 0.5.
# image 12: label 5, top-5 [1, 2, 3, 4, 6] (both wrong). GT [0, 0, 100, 100].
#   GT-known [0, 0, 100, 30] -> 3000 / 10000 = 0.3 exactly. Top-5 boxes best [0, 0, 100, 70] -> 0.7 exactly.
#   Reference: GT-known [0, 0, 10, 10] -> 0.01.
GT = [np.array([[100, 100, 200, 200], [0, 0, 10, 10]], float), np.array([[0, 0, 10, 10]], float),
      np.array([[0, 0, 100, 100]], float)]
MISS = [50, 50, 60, 60]


def hand_batch():
    return dict(
        indices=np.array([10, 11, 12]),
        labels=np.array([3, 3, 5]),
        topk_classes=np.array([[3, 1, 2, 4, 5], [7, 3, 0, 1, 2], [1, 2, 3, 4, 6]]),
        top1_box=np.array([[0, 0, 20, 10], [0, 0, 10, 10], [0, 0, 100, 100]], float),
        gt_known_box=np.array([[0, 0, 20, 10], [2, 0, 10, 10], [0, 0, 100, 30]], float),
        gt_known_topk_boxes=np.array([[MISS] * 4 + [[0, 0, 20, 10]], [[2, 0, 10, 10]] * 5,
                                      [[0, 0, 10, 10], [0, 0, 100, 50], [0, 0, 100, 70], [0, 0, 1, 1],
                                       [0, 0, 1, 1]]], float),
        gt_boxes=GT,
        top1_ref_box=np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], float),
        gt_known_ref_box=np.array([[0, 0, 10, 10], [5, 0, 10, 10], [0, 0, 10, 10]], float),
        keys=["img_a", "img_b", "img_c"],
        topk_scores=np.array([[0.5, 0.2, 0.1, 0.1, 0.1], [0.4, 0.3, 0.1, 0.1, 0.1], [0.3, 0.3, 0.2, 0.1, 0.1]]),
        sizes=np.array([[300, 200], [10, 10], [100, 100]]),
        levels=np.array([4, 5, 5]),
        gt_known_levels=np.array([4, 4, 5]),
    )


THIRD, TWO_THIRDS = 100 / 3, 200 / 3
EXPECTED = {
    "top1_cls": THIRD, "top5_cls": TWO_THIRDS,
    "top1_loc_iou30": THIRD, "top1_loc_iou50": THIRD, "top1_loc_iou70": 0.0,
    "gt_known_loc_iou30": 100.0, "gt_known_loc_iou50": TWO_THIRDS, "gt_known_loc_iou70": THIRD,
    "gt_known_top5_loc_iou30": 100.0, "gt_known_top5_loc_iou50": 100.0, "gt_known_top5_loc_iou70": TWO_THIRDS,
    "top1_loc_ref_iou30": THIRD, "top1_loc_ref_iou50": THIRD, "top1_loc_ref_iou70": THIRD,
    "gt_known_loc_ref_iou30": TWO_THIRDS, "gt_known_loc_ref_iou50": TWO_THIRDS, "gt_known_loc_ref_iou70": THIRD,
}


def test_hand_computed_figures():
    ev = LocalizationEvaluator(iou_thresholds=(0.3, 0.5, 0.7))
    ev.accumulate(BoxPredictions(**hand_batch()))
    m = ev.compute(expected_total=3, expected_boxes=4)
    for key, value in EXPECTED.items():
        assert m[key] == pytest.approx(value), key
    # the unsuffixed names are the IoU 0.5 figures
    for key in ("top1_loc", "gt_known_loc", "gt_known_top5_loc", "top1_loc_ref", "gt_known_loc_ref"):
        assert m[key] == m[key + "_iou50"]
    assert m["num_images"] == 3 and m["num_gt_boxes"] == 4


def test_iou_exactly_at_the_threshold_counts_as_correct():
    flags = _one_image_flags(top1=[0, 0, 20, 10], gt=[[0, 0, 10, 10]])  # IoU exactly 0.5
    assert flags["top1_loc_iou50"] and not flags["top1_loc_iou70"]
    flags = _one_image_flags(top1=[0, 0, 100, 70], gt=[[0, 0, 100, 100]])  # exactly 0.7
    assert flags["top1_loc_iou70"]
    flags = _one_image_flags(top1=[0, 0, 100, 29.999], gt=[[0, 0, 100, 100]])  # just below 0.3
    assert not flags["top1_loc_iou30"]


def _one_image_flags(top1, gt):
    ev = LocalizationEvaluator()
    box = np.array([top1], float)
    ev.accumulate(BoxPredictions([0], [1], [[1]], box, box, box[:, None], [np.array(gt, float)]))
    return {k: bool(v[0]) for k, v in ev.correct_flags().items()}


def test_key_names_follow_the_thresholds_and_k():
    ev = LocalizationEvaluator(iou_thresholds=(0.25, 0.5))
    b = hand_batch()
    b["topk_classes"] = b["topk_classes"][:, :3]
    b["topk_scores"] = b["topk_scores"][:, :3]
    b["gt_known_topk_boxes"] = b["gt_known_topk_boxes"][:, :2]
    ev.accumulate(BoxPredictions(**b))
    m = ev.compute()
    assert iou_suffix(0.25) == "_iou25"
    assert "top3_cls" in m and "gt_known_top2_loc_iou25" in m and "gt_known_top2_loc" in m
    assert "top1_loc_iou30" not in m and "top1_loc_iou70" not in m


def test_duplicates_from_padding_are_kept_once():
    b = hand_batch()
    ev = LocalizationEvaluator()
    ev.accumulate(BoxPredictions(**b))
    ev.accumulate(BoxPredictions(**_rows(b, [2, 0])))  # the loader padded its last batch with images 12 and 10
    assert len(ev) == 3
    single = LocalizationEvaluator()
    single.accumulate(BoxPredictions(**b))
    assert ev.compute(expected_total=3) == single.compute(expected_total=3)


def test_conflicting_duplicate_is_an_error_naming_the_index():
    b = hand_batch()
    ev = LocalizationEvaluator()
    ev.accumulate(BoxPredictions(**b))
    other = _rows(b, [1])
    other["top1_box"] = np.array([[1, 0, 10, 10]], float)
    ev.accumulate(BoxPredictions(**other))
    with pytest.raises(ValueError, match=r"global index 11 \(key img_b\) was evaluated twice"):
        ev.compute()


def test_merge_of_rank_states_equals_one_process():
    b = hand_batch()
    single = LocalizationEvaluator()
    single.accumulate(BoxPredictions(**b))
    rank0, rank1 = LocalizationEvaluator(), LocalizationEvaluator()
    rank0.accumulate(BoxPredictions(**_rows(b, [0, 2])))
    rank1.accumulate(BoxPredictions(**_rows(b, [1, 2])))  # 12 again: padding on the other rank
    states = [pickle.loads(pickle.dumps(r.state())) for r in (rank1, rank0)]
    merged = LocalizationEvaluator.merge(states)
    assert merged.compute(expected_total=3) == single.compute(expected_total=3)
    assert merged.table()["index"].tolist() == [10, 11, 12]
    rank1_conflict = LocalizationEvaluator()
    conflict = _rows(b, [2])
    conflict["labels"] = np.array([6])
    rank1_conflict.accumulate(BoxPredictions(**conflict))
    with pytest.raises(ValueError, match="global index 12"):
        LocalizationEvaluator.merge([rank0.state(), rank1_conflict.state()])


def test_count_mismatch_names_both_numbers():
    ev = LocalizationEvaluator()
    ev.accumulate(BoxPredictions(**hand_batch()))
    with pytest.raises(ValueError, match=r"holds 3 distinct images but the manifest total is 50000"):
        ev.compute(expected_total=50000)
    with pytest.raises(ValueError, match=r"holds 4 ground-truth boxes but 80477 were expected"):
        ev.compute(expected_boxes=80477)


def test_torch_tensors_give_the_numpy_result():
    b = hand_batch()
    ev_np = LocalizationEvaluator()
    ev_np.accumulate(BoxPredictions(**b))
    tb = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in b.items()}
    tb["gt_boxes"] = [torch.as_tensor(g, dtype=torch.float32) for g in b["gt_boxes"]]
    ev_t = LocalizationEvaluator()
    ev_t.accumulate(BoxPredictions(**tb))
    assert ev_t.compute() == ev_np.compute()


def test_size_thirds_by_the_largest_box_relative_area():
    # six 100 x 100 images; largest GT box sides 10..60 -> relative areas .01 .04 .09 .16 .25 .36,
    # given in shuffled index order; image 5 also has a tiny second box (its largest box rules)
    sides = {0: 40, 1: 10, 2: 60, 3: 20, 4: 50, 5: 30}
    gts = [np.array([[0, 0, sides[i], sides[i]]] + ([[0, 0, 2, 2]] if i == 5 else []), float) for i in range(6)]
    good = {1, 3}  # the two smallest are localized, nothing else
    top1 = np.array([gts[i][0] if i in good else [90, 90, 100, 100] for i in range(6)], float)
    ev = LocalizationEvaluator()
    ev.accumulate(BoxPredictions(np.arange(6), np.zeros(6, int), np.zeros((6, 1), int), top1, top1, top1[:, None], gts,
                  sizes=np.full((6, 2), 100)))
    m = ev.compute()
    assert (m["num_small"], m["num_middle"], m["num_large"]) == (2, 2, 2)
    assert m["top1_loc_small"] == 100 and m["top1_loc_middle"] == 0 and m["top1_loc_large"] == 0
    assert m["gt_known_loc_iou30_small"] == 100
    assert m["area_small_max"] == pytest.approx(0.04) and m["area_middle_max"] == pytest.approx(0.16)
    assert m["area_is_relative"] == 1.0
    # without sizes the areas are in pixels
    ev = LocalizationEvaluator()
    ev.accumulate(BoxPredictions(np.arange(6), np.zeros(6, int), np.zeros((6, 1), int), top1, top1, top1[:, None], gts))
    m = ev.compute()
    assert m["area_is_relative"] == 0.0 and m["area_small_max"] == 400 and m["area_middle_max"] == 1600


def test_size_thirds_split_unequal_counts_deterministically():
    ev = LocalizationEvaluator()
    n = 7
    boxes = np.array([[0, 0, 5, 5]] * n, float)  # all the same area: ties broken by index
    ev.accumulate(BoxPredictions(np.arange(n)[::-1], np.zeros(n, int), np.zeros((n, 1), int), boxes, boxes, boxes[:, None],
                  [b[None] for b in boxes]))
    groups, _ = ev.size_groups()
    index = ev.table()["index"]
    assert index[groups["small"]].tolist() == [0, 1, 2]
    assert index[groups["middle"]].tolist() == [3, 4] and index[groups["large"]].tolist() == [5, 6]


def test_area_histogram_rows_by_hand():
    sides = [10, 20, 30, 40, 50, 60]  # relative areas .01 .04 .09 .16 .25 .36 on 100 x 100 images
    gts = [np.array([[0, 0, s, s]], float) for s in sides]
    hit = [0, 0, 20, 20]
    top1 = np.array([hit] * 6, float)  # IoU >= .5 only for sides 20 (1.0) -> and side 10 (100/400 no)
    ref = np.array([[0, 0, s, s] for s in sides], float)  # the reference box is always exact
    labels = np.array([0, 0, 0, 0, 0, 1])  # the last image has the wrong class
    ev = LocalizationEvaluator(hist_bins=5)
    ev.accumulate(BoxPredictions(np.arange(6), labels, np.zeros((6, 1), int), top1, top1, top1[:, None], gts,
                  top1_ref_box=ref, gt_known_ref_box=ref, sizes=np.full((6, 2), 100), levels=[4, 4, 5, 5, 4, 5],
                  gt_known_levels=[4, 4, 4, 4, 4, 4]))
    rows = ev.area_histogram()
    overall = [r for r in rows if r["level"] == "all"]
    # edges linspace(.01, .36, 6): .01 .08 .15 .22 .29 .36 -> bins 0,0,1,2,3,4 (last bin closed)
    assert [r["count"] for r in overall] == [2, 1, 1, 1, 1]
    assert [r["area_lo"] for r in overall] == pytest.approx([0.01, 0.08, 0.15, 0.22, 0.29])
    assert overall[-1]["area_hi"] == pytest.approx(0.36)
    # with transform: only side 20 (bin 0) localized; without: all but the wrong-class image (bin 4)
    assert [r["loc_pct"] for r in overall] == [50.0, 0.0, 0.0, 0.0, 0.0]
    assert [r["loc_ref_pct"] for r in overall] == [100.0, 100.0, 100.0, 100.0, 0.0]
    p4 = [r for r in rows if r["level"] == "P4"]
    p5 = [r for r in rows if r["level"] == "P5"]
    assert [r["count"] for r in p4] == [2, 0, 0, 1, 0] and [r["count"] for r in p5] == [0, 1, 1, 0, 1]
    assert p4[0]["loc_pct"] == 50.0 and np.isnan(p4[1]["loc_pct"])
    by_level = ev.area_histograms()
    assert set(by_level) == {None, 4, 5} and by_level[None] == overall
    known = ev.area_histogram(metric="gt_known_loc")  # GT-known ignores the class; one level only
    assert {r["level"] for r in known} == {"all", "P4"}
    assert [r["loc_ref_pct"] for r in known if r["level"] == "all"] == [100.0] * 5


def test_predictions_file_jsonl_and_csv(tmp_path):
    ev = LocalizationEvaluator()
    b = hand_batch()
    ev.accumulate(BoxPredictions(**_rows(b, [2, 1])))
    ev.accumulate(BoxPredictions(**_rows(b, [0])))
    rows = [json.loads(line) for line in ev.write_predictions(tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [10, 11, 12]
    first = rows[0]
    assert first["key"] == "img_a" and first["label"] == 3 and first["topk_classes"] == [3, 1, 2, 4, 5]
    assert first["topk_scores"] == pytest.approx([0.5, 0.2, 0.1, 0.1, 0.1])
    assert first["top1_box"] == [0, 0, 20, 10] and first["gt_known_topk_boxes"][-1] == [0, 0, 20, 10]
    assert first["iou_top1"] == 0.5 and first["iou_gt_known_topk"] == 0.5 and first["iou_top1_ref"] == 1.0
    assert first["width"] == 300 and first["num_gt"] == 2 and first["level"] == 4
    assert rows[2]["iou_gt_known"] == 0.3 and rows[2]["iou_gt_known_topk"] == 0.7
    with open(ev.write_predictions(tmp_path / "p.csv"), newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["index"]) for r in table] == [10, 11, 12]
    assert json.loads(table[1]["gt_known_box"]) == [2, 0, 10, 10] and table[1]["key"] == "img_b"
    assert float(table[1]["iou_gt_known"]) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="must end in"):
        ev.write_predictions(tmp_path / "p.txt")


def test_bad_input_is_named():
    b = hand_batch()
    b["gt_boxes"] = [GT[0], np.zeros((0, 4)), GT[2]]
    with pytest.raises(ValueError, match=r"image index 11 \(key img_b\) has no ground-truth box"):
        LocalizationEvaluator().accumulate(BoxPredictions(**b))
    b = hand_batch()
    b["top1_box"] = b["top1_box"][:2]
    with pytest.raises(ValueError, match=r"top1_box has shape \(2, 4\); expected \(3, 4\)"):
        LocalizationEvaluator().accumulate(BoxPredictions(**b))
    ev = LocalizationEvaluator()
    ev.accumulate(BoxPredictions(**_rows(hand_batch(), [0])))
    part = _rows(hand_batch(), [1])
    part["top1_ref_box"] = None
    ev.accumulate(BoxPredictions(**part))
    with pytest.raises(ValueError, match="top1_ref_box was given for only 1 of 2 images"):
        ev.compute()
    with pytest.raises(ValueError, match="no image was accumulated"):
        LocalizationEvaluator().compute()
    with pytest.raises(ValueError, match="topk=2"):
        LocalizationEvaluator(topk=2).accumulate(BoxPredictions(**hand_batch()))


def test_best_iou_is_torchvision_box_iou_against_the_own_image_only():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 4, 10)
    gt = rng.uniform(0, 50, (counts.sum(), 2))
    gt = np.concatenate([gt, gt + rng.uniform(1, 30, gt.shape)], axis=1)
    pred = rng.uniform(0, 50, (30, 2))
    pred = np.concatenate([pred, pred + rng.uniform(0, 30, pred.shape)], axis=1)
    pred_image = np.repeat(np.arange(10), 3)
    gt_image = np.repeat(np.arange(10), counts)
    got = best_iou_against_gt(pred, pred_image, gt, gt_image, chunk_images=3)
    for p in range(30):
        mine = gt[gt_image == pred_image[p]]
        want = torchvision.ops.box_iou(torch.tensor(pred[p:p + 1]), torch.tensor(mine)).max().item()
        assert got[p] == want
    # two empty boxes: IoU 0, not NaN
    assert best_iou_against_gt([[1, 1, 1, 1]], [0], [[1, 1, 1, 1]], [0])[0] == 0.0


def _rows(batch, positions):
    """The sub-batch of the given positions."""
    out = {}
    for k, v in batch.items():
        if v is None:
            out[k] = None
        elif isinstance(v, list):
            out[k] = [v[p] for p in positions]
        else:
            out[k] = np.asarray(v)[positions]
    return out


def test_contiguous_count_check_lists_missing_and_outside_indices():
    """Three images with indices 0, 1, 3 of a 3-image split: the count matches, the set does not."""
    b = hand_batch()
    b["indices"] = np.array([0, 1, 3])
    ev = LocalizationEvaluator()
    ev.accumulate(BoxPredictions(**b))
    assert ev.compute(expected_total=3)["num_images"] == 3.0  # the count alone is met
    with pytest.raises(ValueError, match=r"holds 3 distinct images but the manifest total is 3; 1 missing, "
                                         r"first indices \[2\]; 1 outside 0\.\.2, first \[3\]"):
        ev.compute(expected_total=3, contiguous=True)
    b["indices"] = np.array([0, 1, 2])
    ev = LocalizationEvaluator()
    ev.accumulate(BoxPredictions(**b))
    assert ev.compute(expected_total=3, contiguous=True)["num_images"] == 3.0
