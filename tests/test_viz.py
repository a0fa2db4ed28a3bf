"""Evaluation plots: files written, PNGs readable, CSVs holding exactly the rows given."""

import csv

import cv2
import numpy as np
import pytest

from cstn import viz
from cstn.metrics import BoxPredictions, LocalizationEvaluator
from pipeline.sources.synthetic import SyntheticSpec, render


def _read_png(path):
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"{path} is not a readable image"
    return image


def _histogram_rows():
    sides = [10, 20, 30, 40, 50, 60]
    gts = [np.array([[0, 0, s, s]], float) for s in sides]
    top1 = np.array([[0, 0, 20, 20]] * 6, float)
    ref = np.array([[0, 0, s, s] for s in sides], float)
    ev = LocalizationEvaluator(hist_bins=4)
    ev.accumulate(BoxPredictions(np.arange(6), np.zeros(6, int), np.zeros((6, 1), int), top1, top1, top1[:, None], gts,
                  top1_ref_box=ref, gt_known_ref_box=ref, sizes=np.full((6, 2), 100), levels=[4, 5, 4, 5, 4, 5]))
    return ev


def test_area_histogram_png_and_csv(tmp_path):
    ev = _histogram_rows()
    rows = ev.area_histogram()
    png, csv_path = viz.plot_area_histogram(rows, tmp_path / "h.png", tmp_path / "h.csv", title="synthetic")
    assert _read_png(png).shape[2] == 3
    with open(csv_path, newline="") as f:
        back = list(csv.DictReader(f))
    assert len(back) == len(rows) == 12  # all, P4, P5 x 4 bins
    for got, want in zip(back, rows):
        assert got["level"] == want["level"] and int(got["bin"]) == want["bin"]
        assert int(got["count"]) == want["count"]
        assert float(got["area_lo"]) == want["area_lo"] and float(got["area_hi"]) == want["area_hi"]
        for key in ("loc_pct", "loc_ref_pct"):
            assert (np.isnan(want[key]) and got[key] == "nan") or float(got[key]) == want[key]
    # one level only, and rows without reference figures, still draw
    single = [r for r in rows if r["level"] == "all"]
    for r in single:
        r["loc_ref_pct"] = float("nan")
    png, _ = viz.plot_area_histogram(single, tmp_path / "one.png", tmp_path / "one.csv")
    _read_png(png)
    with pytest.raises(ValueError, match="no histogram rows"):
        viz.plot_area_histogram([], tmp_path / "x.png", tmp_path / "x.csv")


def test_boxes_grid_from_synthetic_images(tmp_path):
    spec = SyntheticSpec(image_size=64, num_classes=4)
    samples = [render(spec, i) for i in range(5)]
    images = [s.image for s in samples]
    gts = [np.array([s.box], float) for s in samples]
    refs = [g + 3 for g in gts]
    preds = [g - 2 for g in gts[:4]] + [None]
    path = viz.draw_boxes_grid(images, gts, refs, preds, tmp_path / "grid.png",
                               titles=[f"#{i} y={s.label}" for i, s in enumerate(samples)], columns=3)
    grid = _read_png(path)
    assert grid.shape[0] > 64 and grid.shape[1] > 3 * 64
    # the boxes are drawn in the paper's colours: some pure-ish green, blue and red pixels exist
    rgb = grid[..., ::-1].astype(int)
    for colour in (viz.GT_COLOUR, viz.REF_COLOUR, viz.PRED_COLOUR):
        want = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(rgb - want).sum(axis=-1) < 40).any(), colour
    viz.draw_boxes_grid(images[:1], gts[:1], None, None, tmp_path / "gt_only.png")
    with pytest.raises(ValueError, match="pred_boxes has 2 entries for 5 images"):
        viz.draw_boxes_grid(images, gts, refs, preds[:2], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        viz.draw_boxes_grid([images[0].astype(np.float32)], gts[:1], None, None, tmp_path / "bad.png")


def test_size_bars(tmp_path):
    ev = _histogram_rows()
    metrics = ev.compute()
    png = viz.plot_size_bars(metrics, tmp_path / "sizes.png", tmp_path / "sizes.csv",
                             keys=("top1_loc", "gt_known_loc", "gt_known_top1_loc"))
    _read_png(png)
    with open(tmp_path / "sizes.csv", newline="") as f:
        back = list(csv.DictReader(f))
    got = {(r["metric"], r["size"]): float(r["value"]) for r in back}
    assert got[("top1_loc", "small")] == metrics["top1_loc_small"]
    assert got[("top1_loc_ref", "large")] == metrics["top1_loc_ref_large"]
    assert ("gt_known_top1_loc", "middle") in got and len(back) == 5 * 3
    with pytest.raises(ValueError, match="hold none of"):
        viz.plot_size_bars({}, tmp_path / "none.png")
