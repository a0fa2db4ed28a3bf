"""Evaluator benchmark: the paper's metrics at ILSVRC scale, and MaxBoxAccV2 against a plain loop.

(a) The paper's metrics (:class:`cstn.metrics.LocalizationEvaluator`) over the
    50,000 ILSVRC-2012 validation images with their real 80,477 boxes and image
    sizes (``/work/shared/data/ilsvrc2012_val_boxes/``, or ``--boxes DIR``) and
    synthetic predictions (ground-truth boxes jittered, random classes), in batches
    of 100 as a loader gives them, split over two simulated ranks, merged,
    computed, with the area histogram: seconds on one core.
(b) MaxBoxAccV2 over smooth 224 x 224 score maps (Gaussian blobs, rings with holes,
    several blobs, bicubic low-resolution noise) at 1,000 and at 100 CAM
    thresholds: :class:`cstn.metrics.MaxBoxAccEvaluator` against
    :func:`reference_best_ious`, the straightforward per-image, per-threshold
    contour loop written here; the per-threshold accuracies must be identical.

Last line: JSON with ``paper_metrics_s``, ``maxboxacc_speedup_1000``,
``maxboxacc_speedup_100``, ``identical`` (and the raw timings).
Targets (issue 7): paper metrics <= 5 s; speed-up >= 20 at 1,000 thresholds, >= 1.5 at 100.

    python bench/evaluator.py [--maps-1000 200] [--maps-100 400] [--boxes DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cstn.metrics import BoxPredictions, LocalizationEvaluator, MaxBoxAccEvaluator, iou_suffix  # noqa: E402

DEFAULT_BOXES = Path("/work/shared/data/ilsvrc2012_val_boxes")


# ----------------------------------------------------------------------------------------------
# (b) the reference: one threshold, one contour extraction, one IoU at a time
# ----------------------------------------------------------------------------------------------

def _contour_boxes(u8: np.ndarray, threshold: float, largest: bool) -> np.ndarray:
    """Choe et al.'s boxes of one map at one threshold: (k, 4) inclusive ``[x0, y0, x1, y1]``."""
    height, width = u8.shape
    _, binary = cv2.threshold(u8, int(threshold * np.max(u8)), 255, cv2.THRESH_BINARY)
    contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
    if len(contours) == 0:
        return np.zeros((1, 4))
    if largest:
        contours = [max(contours, key=cv2.contourArea)]
    boxes = []
    for c in contours:
        x, y, w, h = cv2.boundingRect(c)
        boxes.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
    return np.array(boxes, np.float64)


def _inclusive_iou(boxes: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(B, G) IoU of inclusive pixel boxes (width ``x1 - x0 + 1``); a union <= 0 gives 0."""
    a, b = boxes[:, None, :], gt[None, :, :]
    inter = (np.maximum(0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
             * np.maximum(0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1))
    union = ((a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
             + (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1) - inter)
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def reference_best_ious(score_map: np.ndarray, gt_boxes, cam_thresholds, largest: bool = False) -> np.ndarray:
    """THE REFERENCE: best IoU per CAM threshold, one threshold at a time.

    For every threshold: quantise, threshold at ``int(t * max)``, find the contours
    (``RETR_TREE``), box them (``cv2.boundingRect`` clipped to ``W - 1``/``H - 1``,
    ``[0, 0, 0, 0]`` without contour; only the largest by ``cv2.contourArea`` when
    ``largest``), IoU on inclusive pixels against every ground-truth box, keep the best.
    """
    u8 = (score_map.astype(np.float64) * 255).astype(np.uint8)
    gt = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    return np.array([_inclusive_iou(_contour_boxes(u8, t, largest), gt).max() for t in cam_thresholds])


def reference_best_ious_batched(score_map: np.ndarray, gt_boxes, cam_thresholds) -> np.ndarray:
    """The same loop with the IoU batched per image, as Choe et al.'s evaluator is organised:
    the boxes of all thresholds first, one IoU over them all, then the best per threshold."""
    u8 = (score_map.astype(np.float64) * 255).astype(np.uint8)
    gt = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    per_threshold = [_contour_boxes(u8, t, False) for t in cam_thresholds]
    best_per_box = _inclusive_iou(np.concatenate(per_threshold), gt).max(axis=1)
    ends = np.cumsum([len(b) for b in per_threshold])
    return np.array([best_per_box[end - len(b):end].max() for b, end in zip(per_threshold, ends)])


def smooth_maps(count: int, size: int = 224, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """CAM-like maps in [0, 1] (float64) and 1-3 ground-truth boxes each (map pixels, inclusive ints).

    Each map sums 1-4 blobs (Gaussian, or rings that leave a hole at some thresholds),
    plus bicubic-upsampled 14 x 14 noise, min-max normalised; the ground truth boxes
    some of the blobs, jittered.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    maps, boxes = [], []
    for _ in range(count):
        m = np.zeros((size, size))
        gt = []
        for _ in range(int(rng.integers(1, 5))):
            cx, cy = rng.uniform(0, size, 2)
            sx, sy = rng.uniform(8, 60, 2)
            r2 = ((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2
            if rng.random() < 0.4:
                m += rng.uniform(0.3, 1.0) * np.exp(-(np.sqrt(r2) - 1.2) ** 2 / 0.3)
                ext = 2.0
            else:
                m += rng.uniform(0.3, 1.0) * np.exp(-r2 / 2)
                ext = 1.8
            if len(gt) < 3:
                jitter = rng.normal(0, 0.1, 4) * [sx, sy, sx, sy]
                box = np.array([cx - ext * sx, cy - ext * sy, cx + ext * sx, cy + ext * sy]) + jitter
                box = np.clip(np.sort(box.reshape(2, 2), axis=0).reshape(4), 0, size - 1)
                gt.append(box.astype(np.int64))
        m += 0.3 * cv2.resize(rng.random((14, 14)) ** 3, (size, size), interpolation=cv2.INTER_CUBIC)
        m -= m.min()
        m /= m.max()
        maps.append(m)
        boxes.append(np.array(gt))
    return np.stack(maps), boxes


def bench_maxboxacc(count: int, cam_thresholds: np.ndarray, seed: int, chunk: int = 10) -> dict:
    """Ours vs the two reference loops on the same maps, interleaved chunk by chunk (CPU time of this process)."""
    maps, boxes = smooth_maps(count, seed=seed)
    iou_thresholds = (0.3, 0.5, 0.7)
    warm = MaxBoxAccEvaluator(cam_thresholds=cam_thresholds, iou_thresholds=iou_thresholds)
    warm.accumulate(maps[:1], boxes[:1])  # numba: load the compiled kernel outside the timing
    ours = MaxBoxAccEvaluator(cam_thresholds=cam_thresholds, iou_thresholds=iou_thresholds)
    ours_s = reference_s = batched_s = 0.0
    reference_counts = np.zeros((len(iou_thresholds), len(cam_thresholds)), np.int64)
    batched_counts = np.zeros_like(reference_counts)
    for start in range(0, count, chunk):
        part = slice(start, start + chunk)
        t = time.process_time()
        ours.accumulate(maps[part], boxes[part], indices=np.arange(count)[part])
        ours_s += time.process_time() - t
        t = time.process_time()
        best = np.stack([reference_best_ious(m, g, cam_thresholds) for m, g in zip(maps[part], boxes[part])])
        reference_s += time.process_time() - t
        t = time.process_time()
        best_batched = np.stack([reference_best_ious_batched(m, g, cam_thresholds)
                                 for m, g in zip(maps[part], boxes[part])])
        batched_s += time.process_time() - t
        for r, iou in enumerate(iou_thresholds):
            reference_counts[r] += (best >= iou).sum(axis=0)
            batched_counts[r] += (best_batched >= iou).sum(axis=0)
    t = time.process_time()
    curves = ours.accuracy_curves()
    metrics = ours.compute(expected_total=count)
    ours_s += time.process_time() - t
    ours_curves = np.stack([curves[iou_suffix(t)[1:]] for t in iou_thresholds])
    identical = (bool(np.array_equal(ours_curves, reference_counts * 100.0 / count))
                 and bool(np.array_equal(reference_counts, batched_counts)))
    return {"maps": count, "thresholds": len(cam_thresholds), "ours_ms_per_map": 1e3 * ours_s / count,
            "reference_ms_per_map": 1e3 * reference_s / count, "batched_ms_per_map": 1e3 * batched_s / count,
            "speedup": reference_s / ours_s, "speedup_vs_batched": batched_s / ours_s,
            "identical": identical, "MaxBoxAccV2": metrics["MaxBoxAccV2"]}


# ----------------------------------------------------------------------------------------------
# (a) the paper's metrics over the 50,000 validation images
# ----------------------------------------------------------------------------------------------

def load_val_boxes(folder: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[np.ndarray]]:
    """``(keys, labels (N,), sizes (N, 2), boxes per image)`` from the wsolevaluation-format metadata."""
    ids = (folder / "image_ids.txt").read_text().split()
    position = {p: i for i, p in enumerate(ids)}
    labels = np.zeros(len(ids), np.int64)
    for line in (folder / "class_labels.txt").read_text().split():
        path, label = line.rsplit(",", 1)
        labels[position[path]] = int(label)
    sizes = np.zeros((len(ids), 2), np.int64)
    for line in (folder / "image_sizes.txt").read_text().split():
        path, w, h = line.split(",")
        sizes[position[path]] = (int(w), int(h))
    table = np.loadtxt(folder / "localization.txt", delimiter=",", dtype=str)
    owner = np.array([position[p] for p in table[:, 0]])
    coords = table[:, 1:].astype(np.float64)
    order = np.argsort(owner, kind="stable")
    owner, coords = owner[order], coords[order]
    splits = np.searchsorted(owner, np.arange(1, len(ids)))
    keys = [Path(p).stem for p in ids]
    return keys, labels, sizes, np.split(coords, splits)


def bench_paper_metrics(folder: Path, batch: int = 100, topk: int = 5, classes: int = 1000, seed: int = 0) -> dict:
    keys, labels, sizes, gt = load_val_boxes(folder)
    n = len(keys)
    rng = np.random.default_rng(seed)

    def jitter(boxes, scale):
        w = (boxes[..., 2] - boxes[..., 0])[..., None]
        h = (boxes[..., 3] - boxes[..., 1])[..., None]
        noise = rng.normal(0, scale, boxes.shape) * np.concatenate([w, h, w, h], axis=-1)
        return boxes + noise

    first_box = np.stack([b[0] for b in gt])
    correct_class = rng.random(n) < 0.6
    topk_classes = rng.integers(0, classes, (n, topk))
    topk_classes[correct_class, 0] = labels[correct_class]
    predictions = {
        "top1": jitter(first_box, 0.15), "known": jitter(first_box, 0.15),
        "known_k": jitter(np.repeat(first_box[:, None], topk, axis=1), 0.25),
        "top1_ref": jitter(first_box, 0.3), "known_ref": jitter(first_box, 0.3),
        "scores": np.sort(rng.random((n, topk)).astype(np.float32), axis=1)[:, ::-1],
        "levels": rng.choice([4, 5], n),
    }
    torch.set_num_threads(1)
    start, wall = time.process_time(), time.perf_counter()
    states = []
    for rank in range(2):  # two simulated ranks, a padded last batch repeating indices on rank 1
        evaluator = LocalizationEvaluator(iou_thresholds=(0.3, 0.5, 0.7))
        mine = np.arange(rank, n, 2)
        if rank == 1:
            mine = np.concatenate([mine, mine[-3:]])
        for s in range(0, len(mine), batch):
            i = mine[s:s + batch]
            evaluator.accumulate(BoxPredictions(
                torch.from_numpy(i), torch.from_numpy(labels[i]), torch.from_numpy(topk_classes[i]),
                predictions["top1"][i], predictions["known"][i], predictions["known_k"][i], [gt[j] for j in i],
                top1_ref_box=predictions["top1_ref"][i], gt_known_ref_box=predictions["known_ref"][i],
                levels=predictions["levels"][i], gt_known_levels=predictions["levels"][i],
                keys=[keys[j] for j in i], topk_scores=predictions["scores"][i], sizes=sizes[i]))
        states.append(evaluator.state())
    accumulate_s = time.process_time() - start
    merged = LocalizationEvaluator.merge(states)
    metrics = merged.compute(expected_total=n, expected_boxes=sum(len(b) for b in gt))
    histogram = merged.area_histogram()
    total_s = time.process_time() - start
    wall_s = time.perf_counter() - wall
    start = time.process_time()
    out = Path(os.environ.get("TMPDIR", "/tmp")) / "bench_evaluator_predictions.jsonl"
    merged.write_predictions(out)
    predictions_s = time.process_time() - start
    out.unlink()
    return {"images": n, "boxes": int(metrics["num_gt_boxes"]), "paper_metrics_s": total_s, "paper_metrics_wall_s": wall_s,
            "accumulate_s": accumulate_s, "predictions_file_s": predictions_s,
            "top1_loc": metrics["top1_loc"], "gt_known_loc": metrics["gt_known_loc"],
            "histogram_rows": len(histogram)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--boxes", type=Path, default=DEFAULT_BOXES, help="wsolevaluation-format ILSVRC val metadata")
    parser.add_argument("--maps-1000", type=int, default=200, help="score maps for the 1,000-threshold comparison")
    parser.add_argument("--maps-100", type=int, default=400, help="score maps for the 100-threshold comparison")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    if not (args.boxes / "localization.txt").exists():
        print(f"error: {args.boxes}/localization.txt not found (pass --boxes DIR)", file=sys.stderr)
        return 2

    paper = bench_paper_metrics(args.boxes)
    print(f"(a) paper metrics: {paper['images']} images, {paper['boxes']} boxes: {paper['paper_metrics_s']:.2f} s "
          f"(accumulate {paper['accumulate_s']:.2f} s; predictions file {paper['predictions_file_s']:.2f} s extra)")
    results = {}
    for count, thresholds in ((args.maps_1000, 1000), (args.maps_100, 100)):
        r = bench_maxboxacc(count, MaxBoxAccEvaluator.cam_threshold_list(thresholds), seed=thresholds)
        results[thresholds] = r
        print(f"(b) MaxBoxAccV2, {thresholds} thresholds, {count} maps: ours {r['ours_ms_per_map']:.2f} ms/map; "
              f"per-threshold loop {r['reference_ms_per_map']:.2f} ms/map (speed-up {r['speedup']:.1f}x); "
              f"loop with per-image IoU {r['batched_ms_per_map']:.2f} ms/map ({r['speedup_vs_batched']:.1f}x); "
              f"identical per-threshold accuracies: {r['identical']}")
    summary = {
        "paper_metrics_s": round(paper["paper_metrics_s"], 3),
        "maxboxacc_speedup_1000": round(results[1000]["speedup"], 2),
        "maxboxacc_speedup_100": round(results[100]["speedup"], 2),
        "identical": results[1000]["identical"] and results[100]["identical"],
        "paper_metrics_wall_s": round(paper["paper_metrics_wall_s"], 3),
        "images": paper["images"], "boxes": paper["boxes"],
        "maxboxacc_speedup_1000_vs_per_image_iou": round(results[1000]["speedup_vs_batched"], 2),
        "maxboxacc_speedup_100_vs_per_image_iou": round(results[100]["speedup_vs_batched"], 2),
        "ours_ms_per_map_1000": round(results[1000]["ours_ms_per_map"], 3),
        "reference_ms_per_map_1000": round(results[1000]["reference_ms_per_map"], 3),
        "ours_ms_per_map_100": round(results[100]["ours_ms_per_map"], 3),
        "reference_ms_per_map_100": round(results[100]["reference_ms_per_map"], 3),
    }
    print(json.dumps(summary))
    return 0 if summary["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
