"""Localization metrics: the paper's box metrics and Choe et al.'s MaxBoxAcc / MaxBoxAccV2.

Two evaluators, both built for the exactly-once distributed evaluation of
DESIGN.md section 5: every rank accumulates per-image rows keyed by the global
sample index, :meth:`state` returns a compact picklable dict of numpy arrays,
one gather brings the states to rank 0, ``merge(states)`` keeps each index once
(a duplicate from loader padding is dropped; the same index with different
values is an error), and ``compute(expected_total=...)`` fails naming both
numbers when the merged count is not the manifest total::

    evaluator = LocalizationEvaluator(iou_thresholds=cfg.eval.iou_thresholds)
    for batch in loader:                      # no collective in the loop
        evaluator.accumulate(batch.indices, batch.labels, ...)
    states = gather_to_rank0(evaluator.state())
    if rank == 0:
        metrics = LocalizationEvaluator.merge(states).compute(expected_total=manifest["total"])

* :class:`LocalizationEvaluator` -- box-predicting models (CSTN): Top-1/Top-5
  Class, Top-1 Loc, GT-Known Loc, GT-Known Top-5 box Loc at every IoU
  threshold, with and without the transform, per object-size third, the
  box-area histogram of the paper's Fig. 6/8 and a per-image predictions file.
* :class:`MaxBoxAccEvaluator` -- score-map methods (CAM): MaxBoxAcc and
  MaxBoxAccV2 with the conventions of Choe et al. (CVPR 2020), identical per
  threshold to their per-threshold contour loop; all-contour boxes come from a
  union-find component tree compiled with numba (compiled once, then cached in
  ``__pycache__``; the first call of a fresh install takes a few seconds).
* :func:`cam_boxes`, :func:`choose_cam_threshold`, :func:`normalize_scoremap`,
  :func:`prepare_scoremaps`, :func:`wsol_resize_boxes` -- CAM helpers.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import cv2
import numba
import numpy as np
import torch
import torchvision

from pipeline.schema import boxes_to_input

__all__ = [
    "LocalizationEvaluator",
    "MaxBoxAccEvaluator",
    "best_iou_against_gt",
    "cam_boxes",
    "choose_cam_threshold",
    "iou_suffix",
    "normalize_scoremap",
    "prepare_scoremaps",
    "wsol_resize_boxes",
]

SIZE_GROUPS = ("small", "middle", "large")

# OpenCV 3 returned (image, contours, hierarchy); 4 and later return (contours, hierarchy).
_CONTOURS_AT = 1 if cv2.__version__.split(".")[0] == "3" else 0


def iou_suffix(threshold: float) -> str:
    """Metric-name suffix of an IoU threshold: ``0.3 -> "_iou30"``, ``0.5 -> "_iou50"``."""
    return f"_iou{int(round(threshold * 100)):02d}"


def _numpy(value, dtype=None) -> np.ndarray:
    """A numpy copy-free view of a numpy array, torch tensor (any device) or sequence."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    return array.astype(dtype, copy=False) if dtype is not None else array


def _check_thresholds(values: Iterable[float], what: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if not out:
        raise ValueError(f"{what} is empty")
    if any(not (0.0 <= v <= 1.0) for v in out):
        raise ValueError(f"{what} must lie in [0, 1], got {list(out)}")
    if len(set(out)) != len(out):
        raise ValueError(f"{what} has repeated values: {list(out)}")
    return out


# ----------------------------------------------------------------------------------------------
# Box IoU against the ground truth of each image
# ----------------------------------------------------------------------------------------------

def best_iou_against_gt(pred_boxes, pred_image, gt_boxes, gt_image, chunk_images: int = 64) -> np.ndarray:
    """For every predicted box, its best IoU with any ground-truth box of the same image.

    IoU is :func:`torchvision.ops.box_iou` on continuous ``xyxy`` coordinates
    (x1/y1 exclusive, area ``(x1 - x0) * (y1 - y0)``) in float64, so an IoU that is
    exactly 0.5 compares equal to the threshold 0.5. The work is vectorised over
    blocks of ``chunk_images`` images: one ``box_iou`` call per block, pairs of
    different images masked out (no per-image Python loop). A pair with zero union
    (two empty boxes) has IoU 0.

    Args:
        pred_boxes: (P, 4) predicted boxes.
        pred_image: (P,) int image position (0..N-1) of each predicted box, non-decreasing.
        gt_boxes: (G, 4) ground-truth boxes, the same frame as the predictions.
        gt_image: (G,) int image position of each ground-truth box, non-decreasing;
            every image referenced by ``pred_image`` must own at least one box.
    Returns:
        (P,) float64 best IoU.
    """
    pred = torch.as_tensor(_numpy(pred_boxes, np.float64)).reshape(-1, 4)
    gt = torch.as_tensor(_numpy(gt_boxes, np.float64)).reshape(-1, 4)
    pred_image = _numpy(pred_image, np.int64)
    gt_image = _numpy(gt_image, np.int64)
    out = np.zeros(len(pred), np.float64)
    if len(pred) == 0:
        return out
    last = int(pred_image.max()) + 1
    for start in range(0, last, chunk_images):
        stop = start + chunk_images
        p0, p1 = np.searchsorted(pred_image, [start, stop])
        g0, g1 = np.searchsorted(gt_image, [start, stop])
        if p0 == p1:
            continue
        iou = torchvision.ops.box_iou(pred[p0:p1], gt[g0:g1])
        iou = torch.nan_to_num(iou, nan=0.0)  # 0 / 0 for two empty boxes
        same = torch.as_tensor(pred_image[p0:p1, None] == gt_image[None, g0:g1])
        out[p0:p1] = iou.masked_fill(~same, -1.0).amax(dim=1).numpy()
    return out


# ----------------------------------------------------------------------------------------------
# The paper's metrics for box-predicting models
# ----------------------------------------------------------------------------------------------

_IOU_TOP1, _IOU_GT_KNOWN, _IOU_TOP1_REF, _IOU_GT_KNOWN_REF = 0, 1, 2, 3
_IOU_TOPK = 4  # first of the K columns of the GT-known top-k boxes


class LocalizationEvaluator:
    """Top-1/Top-5 Class and the Loc figures of the paper (DESIGN.md section 4), exactly once per image.

    An image is correctly localized at IoU ``t`` when its box has IoU >= t with ANY
    ground-truth box of the image (continuous ``xyxy``, x1/y1 exclusive, original
    pixels; see :func:`best_iou_against_gt`).

    Metrics (percent over the evaluated images; ``compute`` keys):

    * ``top1_cls``, ``top{K}_cls``: true class at rank 1 / among the K top classes.
    * ``top1_loc``: top-1 class correct AND the Top-1 box correct.
    * ``gt_known_loc``: the box of the true class correct.
    * ``gt_known_top{Kb}_loc``: one of the Kb top boxes of the true class correct.
    * ``top1_loc_ref``, ``gt_known_loc_ref``: the same with the reference boxes (the
      location's box without the transform, Table I), when they were given.
    * Every Loc key at every IoU threshold with the suffix ``_iou30``/``_iou50``/``_iou70``
      (:func:`iou_suffix`); the unsuffixed name is the figure at IoU 0.5.
    * Every Loc key per object-size third: ``<key>_small``, ``<key>_middle``, ``<key>_large``.
      The size of an image is the area of its LARGEST ground-truth box, relative to
      the image area when image sizes were given (else in original pixels,
      ``area_is_relative`` = 0). Images are sorted by that area (ties by global
      index) and split into three equal-count thirds of the evaluated set (the first
      third one image larger when the count is not divisible by 3); ``area_small_max``
      and ``area_middle_max`` give the boundaries, ``num_small``... the counts. The
      split depends only on the merged set, never on the world size.
    * ``num_images``, ``num_gt_boxes``.

    Per-image rows are stored, not running sums: best IoU of each predicted box
    (float64) and the correct flags derived at each threshold when computing.
    """

    def __init__(self, iou_thresholds: Sequence[float] = (0.3, 0.5, 0.7), hist_bins: int = 10,
                 topk: int | None = None):
        """Args:
            iou_thresholds: every Loc figure is also reported at these (``eval.iou_thresholds``);
                0.5, the unsuffixed figure, is always computed.
            hist_bins: equal-width bins of the box-area histogram (``eval.hist_bins``).
            topk: when given (``eval.topk``), the most columns ``topk_classes`` and
                ``gt_known_topk_boxes`` may have (fewer is fine: a model with fewer classes);
                the key names follow the columns actually given.
        """
        self.topk = None if topk is None else int(topk)
        self.iou_thresholds = _check_thresholds(iou_thresholds, "iou_thresholds")
        if hist_bins < 1:
            raise ValueError(f"hist_bins must be >= 1, got {hist_bins}")
        self.hist_bins = int(hist_bins)
        self._parts: list[dict[str, np.ndarray]] = []
        self._table_cache: dict[str, np.ndarray] | None = None

    @classmethod
    def from_config(cls, cfg) -> "LocalizationEvaluator":
        """Evaluator with ``cfg.eval.iou_thresholds``, ``cfg.eval.hist_bins`` and ``cfg.eval.topk``."""
        return cls(iou_thresholds=cfg.eval.iou_thresholds, hist_bins=cfg.eval.hist_bins, topk=cfg.eval.topk)

    # -- accumulation ---------------------------------------------------------------------------

    def accumulate(self, indices, labels, topk_classes, top1_box, gt_known_box, gt_known_topk_boxes,
                   gt_boxes, top1_ref_box=None, gt_known_ref_box=None, levels=None, gt_known_levels=None,
                   keys=None, topk_scores=None, sizes=None) -> None:
        """Record one batch of N images (numpy arrays or torch tensors on any device).

        All boxes are ``xyxy`` in ORIGINAL pixels (the caller converts predictions with
        ``pipeline.schema.boxes_to_original``).

        Args:
            indices: (N,) int global sample indices (the exactly-once key).
            labels: (N,) int true classes.
            topk_classes: (N, K) int predicted classes, best first.
            top1_box: (N, 4) Top-1 box (of the predicted top-1 class).
            gt_known_box: (N, 4) best box of the true class.
            gt_known_topk_boxes: (N, Kb, 4) the Kb best boxes of the true class.
            gt_boxes: list of N (n_i, 4) ground-truth boxes, n_i >= 1.
            top1_ref_box, gt_known_ref_box: (N, 4) the same locations' reference boxes
                (without transform), or None.
            levels: (N,) int FPN level of the Top-1 box (e.g. 4, 5), or None.
            gt_known_levels: (N,) int FPN level of the GT-known box, or None.
            keys: N sample keys (str), or None.
            topk_scores: (N, K) float scores of ``topk_classes``, or None.
            sizes: (N, 2) original (width, height), or None (areas are then in pixels).
        """
        indices = _numpy(indices, np.int64).reshape(-1)
        n = len(indices)

        def rows(value, name, shape, dtype):
            array = _numpy(value, dtype)
            if array.shape != (n,) + shape:
                raise ValueError(f"{name} has shape {array.shape}; expected {(n,) + shape}")
            return array

        labels = rows(labels, "labels", (), np.int64)
        topk = _numpy(topk_classes, np.int64)
        if topk.ndim != 2 or topk.shape[0] != n or topk.shape[1] < 1:
            raise ValueError(f"topk_classes has shape {topk.shape}; expected ({n}, K)")
        top1 = rows(top1_box, "top1_box", (4,), np.float64)
        known = rows(gt_known_box, "gt_known_box", (4,), np.float64)
        known_k = _numpy(gt_known_topk_boxes, np.float64)
        if known_k.ndim != 3 or known_k.shape[0] != n or known_k.shape[2] != 4 or known_k.shape[1] < 1:
            raise ValueError(f"gt_known_topk_boxes has shape {known_k.shape}; expected ({n}, Kb, 4)")
        if len(gt_boxes) != n:
            raise ValueError(f"gt_boxes has {len(gt_boxes)} entries for {n} images")
        gt_list = [_numpy(b, np.float64).reshape(-1, 4) for b in gt_boxes]
        num_gt = np.array([len(b) for b in gt_list], np.int64)
        if keys is not None:
            keys = [str(k) for k in keys]
            if len(keys) != n:
                raise ValueError(f"keys has {len(keys)} entries for {n} images")
        if (num_gt == 0).any():
            i = int(np.flatnonzero(num_gt == 0)[0])
            name = f" (key {keys[i]})" if keys is not None else ""
            raise ValueError(f"image index {indices[i]}{name} has no ground-truth box; "
                             "localization needs a split with boxes")
        gt_flat = np.concatenate(gt_list) if n else np.zeros((0, 4))
        for name, boxes in (("top1_box", top1), ("gt_known_box", known), ("gt_known_topk_boxes", known_k),
                            ("gt_boxes", gt_flat)):
            if not np.isfinite(boxes).all():
                raise ValueError(f"{name} holds non-finite coordinates")

        refs = []
        for name, value in (("top1_ref_box", top1_ref_box), ("gt_known_ref_box", gt_known_ref_box)):
            if value is None:
                refs.append(np.full((n, 4), np.nan))
            else:
                refs.append(rows(value, name, (4,), np.float64))
                if not np.isfinite(refs[-1]).all():
                    raise ValueError(f"{name} holds non-finite coordinates")

        k_boxes = known_k.shape[1]
        if self.topk is not None and (topk.shape[1] > self.topk or k_boxes > self.topk):
            raise ValueError(f"topk_classes has {topk.shape[1]} and gt_known_topk_boxes {k_boxes} columns; "
                             f"the evaluator was made for topk={self.topk}")
        # one IoU pass for every predicted box of the batch: columns top1, gt_known, refs, top-k
        pred = np.concatenate([top1[:, None], known[:, None], refs[0][:, None], refs[1][:, None], known_k], axis=1)
        columns = pred.shape[1]
        pred_image = np.repeat(np.arange(n), columns)
        gt_image = np.repeat(np.arange(n), num_gt)
        iou = best_iou_against_gt(np.nan_to_num(pred.reshape(-1, 4)), pred_image, gt_flat, gt_image)
        iou = iou.reshape(n, columns)
        for col, given in ((_IOU_TOP1_REF, top1_ref_box is not None), (_IOU_GT_KNOWN_REF, gt_known_ref_box is not None)):
            if not given:
                iou[:, col] = np.nan

        areas = (gt_flat[:, 2] - gt_flat[:, 0]).clip(min=0) * (gt_flat[:, 3] - gt_flat[:, 1]).clip(min=0)
        starts = np.concatenate([[0], np.cumsum(num_gt)[:-1]]).astype(np.int64)
        max_area = np.maximum.reduceat(areas, starts) if n else np.zeros(0)

        if topk_scores is None:
            scores = np.full(topk.shape, np.nan, np.float32)
        else:
            scores = rows(topk_scores, "topk_scores", (topk.shape[1],), np.float32)
        sizes = np.zeros((n, 2), np.int64) if sizes is None else rows(sizes, "sizes", (2,), np.int64)
        lv = np.full(n, -1, np.int64) if levels is None else rows(levels, "levels", (), np.int64)
        gk_lv = np.full(n, -1, np.int64) if gt_known_levels is None else rows(gt_known_levels, "gt_known_levels", (), np.int64)
        part = {
            "index": indices,
            "key": np.array(keys if keys is not None else [""] * n, dtype=object),
            "label": labels,
            "topk_classes": topk,
            "topk_scores": scores,
            "top1_box": top1.astype(np.float32),
            "gt_known_box": known.astype(np.float32),
            "gt_known_topk_boxes": known_k.astype(np.float32),
            "top1_ref_box": refs[0].astype(np.float32),
            "gt_known_ref_box": refs[1].astype(np.float32),
            "iou": iou,
            "num_gt": num_gt,
            "max_gt_area": max_area,
            "image_size": sizes,
            "level": lv,
            "gt_known_level": gk_lv,
        }
        if self._parts and (self._parts[0]["topk_classes"].shape[1] != topk.shape[1]
                            or self._parts[0]["gt_known_topk_boxes"].shape[1] != k_boxes):
            raise ValueError("topk_classes / gt_known_topk_boxes changed their K between batches")
        self._parts.append(part)
        self._table_cache = None

    # -- distributed state ------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Compact picklable state of the rows seen so far (numpy arrays + the settings)."""
        return {"kind": "localization", "iou_thresholds": self.iou_thresholds, "hist_bins": self.hist_bins,
                "rows": _concat_parts(self._parts)}

    @classmethod
    def merge(cls, states: Sequence[dict[str, Any]]) -> "LocalizationEvaluator":
        """One evaluator holding the rows of all ``states`` (from :meth:`state`, one per rank).

        Each global index is kept once: a repeated index with identical values (loader
        padding) is dropped; the same index with different values raises ValueError.
        """
        states = list(states)
        if not states:
            raise ValueError("merge needs at least one state")
        for s in states:
            if s.get("kind") != "localization":
                raise ValueError(f"not a LocalizationEvaluator state: kind={s.get('kind')!r}")
            if tuple(s["iou_thresholds"]) != tuple(states[0]["iou_thresholds"]) or s["hist_bins"] != states[0]["hist_bins"]:
                raise ValueError("states were made with different iou_thresholds / hist_bins")
        merged = cls(states[0]["iou_thresholds"], states[0]["hist_bins"])
        parts = [s["rows"] for s in states if s["rows"] is not None and len(s["rows"]["index"])]
        if parts:
            for p in parts[1:]:
                if (p["topk_classes"].shape[1] != parts[0]["topk_classes"].shape[1]
                        or p["gt_known_topk_boxes"].shape[1] != parts[0]["gt_known_topk_boxes"].shape[1]):
                    raise ValueError("states disagree on K of topk_classes / gt_known_topk_boxes")
            merged._parts = [_unique_rows(_concat_parts(parts), "LocalizationEvaluator")]
        return merged

    def _table(self) -> dict[str, np.ndarray]:
        if self._table_cache is None:
            if not self._parts:
                raise ValueError("no image was accumulated")
            self._table_cache = _unique_rows(_concat_parts(self._parts), "LocalizationEvaluator")
            self._parts = [self._table_cache]
        return self._table_cache

    def __len__(self) -> int:
        """Number of distinct images accumulated."""
        return len(self._table()["index"]) if self._parts else 0

    # -- metrics ----------------------------------------------------------------------------------

    def _reference_given(self, table) -> tuple[bool, bool]:
        out = []
        for col, name in ((_IOU_TOP1_REF, "top1_ref_box"), (_IOU_GT_KNOWN_REF, "gt_known_ref_box")):
            given = ~np.isnan(table["iou"][:, col])
            if given.any() and not given.all():
                raise ValueError(f"{name} was given for only {int(given.sum())} of {len(given)} images")
            out.append(bool(given.all()) and len(given) > 0)
        return out[0], out[1]

    def _thresholds_with_half(self) -> tuple[float, ...]:
        return tuple(sorted(set(self.iou_thresholds) | {0.5}))

    def correct_flags(self) -> dict[str, np.ndarray]:
        """Per-image correctness, ``{metric key: (N,) bool}`` in ascending index order.

        Keys are those of :meth:`compute` without the size-third variants; the rows line
        up with :meth:`table` ``["index"]``.
        """
        t = self._table()
        iou = t["iou"]
        label = t["label"]
        topk = t["topk_classes"]
        k, kb = topk.shape[1], t["gt_known_topk_boxes"].shape[1]
        top1_cls = topk[:, 0] == label
        flags = {"top1_cls": top1_cls, f"top{k}_cls": (topk == label[:, None]).any(axis=1)}
        has_top1_ref, has_known_ref = self._reference_given(t)
        for thr in self._thresholds_with_half():
            names = ["top1_loc{}", "gt_known_loc{}", f"gt_known_top{kb}_loc" + "{}"]
            values = [top1_cls & (iou[:, _IOU_TOP1] >= thr), iou[:, _IOU_GT_KNOWN] >= thr,
                      (iou[:, _IOU_TOPK:] >= thr).any(axis=1)]
            if has_top1_ref:
                names.append("top1_loc_ref{}")
                values.append(top1_cls & (iou[:, _IOU_TOP1_REF] >= thr))
            if has_known_ref:
                names.append("gt_known_loc_ref{}")
                values.append(iou[:, _IOU_GT_KNOWN_REF] >= thr)
            for name, value in zip(names, values):
                if thr in self.iou_thresholds:
                    flags[name.format(iou_suffix(thr))] = value
                if thr == 0.5:
                    flags[name.format("")] = value
        return flags

    def image_areas(self) -> tuple[np.ndarray, bool]:
        """``(area (N,) float64, relative)``: the largest ground-truth box area of each image,
        relative to the image area when every image has a known size, else in pixels."""
        t = self._table()
        sizes = t["image_size"].astype(np.float64)
        relative = bool((sizes > 0).all())
        area = t["max_gt_area"] / (sizes[:, 0] * sizes[:, 1]) if relative else t["max_gt_area"].copy()
        return area, relative

    def size_groups(self) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Equal-count size thirds: ``({"small"|"middle"|"large": (N,) bool}, {"area_small_max": .., "area_middle_max": ..})``."""
        t = self._table()
        area, _ = self.image_areas()
        order = np.lexsort((t["index"], area))
        groups, edges = {}, {}
        for name, chunk in zip(SIZE_GROUPS, np.array_split(order, 3)):
            mask = np.zeros(len(area), bool)
            mask[chunk] = True
            groups[name] = mask
            if name != "large":
                edges[f"area_{name}_max"] = float(area[chunk].max()) if len(chunk) else math.nan
        return groups, edges

    def compute(self, expected_total: int | None = None, expected_boxes: int | None = None) -> dict[str, float]:
        """All figures as a flat ``{name: float}`` dict (percent for accuracies).

        Args:
            expected_total: the manifest's image count; a different merged count raises
                ValueError naming both numbers.
            expected_boxes: optionally the number of ground-truth boxes the split holds.
        """
        t = self._table()
        n = len(t["index"])
        if expected_total is not None and n != int(expected_total):
            raise ValueError(f"merged evaluation holds {n} distinct images but the manifest total is "
                             f"{int(expected_total)}: images were lost or added between the loader and the evaluator")
        boxes = int(t["num_gt"].sum())
        if expected_boxes is not None and boxes != int(expected_boxes):
            raise ValueError(f"merged evaluation holds {boxes} ground-truth boxes but {int(expected_boxes)} were expected")
        flags = self.correct_flags()
        out: dict[str, float] = {name: 100.0 * float(v.mean()) for name, v in flags.items()}
        groups, edges = self.size_groups()
        for size, mask in groups.items():
            count = int(mask.sum())
            out[f"num_{size}"] = float(count)
            for name, v in flags.items():
                if "_loc" in name:
                    out[f"{name}_{size}"] = 100.0 * float(v[mask].mean()) if count else math.nan
        out.update(edges)
        out["area_is_relative"] = float(self.image_areas()[1])
        out["num_images"] = float(n)
        out["num_gt_boxes"] = float(boxes)
        return out

    def area_histogram(self, bins: int | None = None, metric: str = "top1_loc",
                       iou_threshold: float = 0.5) -> list[dict[str, Any]]:
        """Box-area histogram of the paper's Fig. 6 and 8, as rows.

        The range of the image areas (:meth:`image_areas`, the largest ground-truth box)
        of the evaluated set is cut into ``bins`` equal-width bins (the last bin closed,
        as ``numpy.histogram``). Per bin: the image count and the percentage of those
        images correctly localized with the transform (``loc_pct``) and with the
        reference boxes (``loc_ref_pct``, NaN when no reference boxes were given).

        ``metric`` is ``"top1_loc"`` (the paper's Table I figure, default) or
        ``"gt_known_loc"``. Rows come for ``level == "all"`` and, when the levels of the
        boxes were given, for every FPN level (``"P4"``...): the images whose box
        (Top-1 box, or GT-known box for ``gt_known_loc``) came from that level, on the same bins.

        Returns:
            list of dicts with keys ``level, bin, area_lo, area_hi, count, loc_count,
            loc_pct, loc_ref_count, loc_ref_pct, metric, iou_threshold, area_unit``.
        """
        if metric not in ("top1_loc", "gt_known_loc"):
            raise ValueError(f"metric must be 'top1_loc' or 'gt_known_loc', got {metric!r}")
        bins = self.hist_bins if bins is None else int(bins)
        t = self._table()
        area, relative = self.image_areas()
        iou = t["iou"]
        ok_cls = t["topk_classes"][:, 0] == t["label"] if metric == "top1_loc" else np.ones(len(area), bool)
        col, col_ref = (_IOU_TOP1, _IOU_TOP1_REF) if metric == "top1_loc" else (_IOU_GT_KNOWN, _IOU_GT_KNOWN_REF)
        ok = ok_cls & (iou[:, col] >= iou_threshold)
        has_ref = self._reference_given(t)[0 if metric == "top1_loc" else 1]
        ok_ref = ok_cls & (iou[:, col_ref] >= iou_threshold) if has_ref else None
        lo, hi = float(area.min()), float(area.max())
        edges = np.linspace(lo, hi, bins + 1) if hi > lo else np.linspace(lo, lo + 1.0, bins + 1)
        which = np.clip(np.searchsorted(edges[1:-1], area, side="right"), 0, bins - 1)
        level_of = t["level"] if metric == "top1_loc" else t["gt_known_level"]
        selections = [("all", np.ones(len(area), bool))]
        if (level_of >= 0).all():
            selections += [(f"P{lv}", level_of == lv) for lv in np.unique(level_of)]
        rows = []
        for name, sel in selections:
            for b in range(bins):
                in_bin = sel & (which == b)
                count = int(in_bin.sum())
                loc = int((ok & in_bin).sum())
                loc_ref = int((ok_ref & in_bin).sum()) if ok_ref is not None else None
                rows.append({
                    "level": name, "bin": b, "area_lo": float(edges[b]), "area_hi": float(edges[b + 1]),
                    "count": count, "loc_count": loc, "loc_pct": 100.0 * loc / count if count else math.nan,
                    "loc_ref_count": loc_ref if loc_ref is not None else math.nan,
                    "loc_ref_pct": 100.0 * loc_ref / count if (count and loc_ref is not None) else math.nan,
                    "metric": metric, "iou_threshold": float(iou_threshold),
                    "area_unit": "fraction_of_image" if relative else "pixels",
                })
        return rows

    def area_histograms(self, bins: int | None = None, metric: str = "top1_loc",
                        iou_threshold: float = 0.5) -> dict[int | None, list[dict[str, Any]]]:
        """:meth:`area_histogram` split by FPN level: ``{None: all images, 4: rows of P4, ...}``."""
        out: dict[int | None, list[dict[str, Any]]] = {}
        for row in self.area_histogram(bins, metric, iou_threshold):
            level = None if row["level"] == "all" else int(row["level"][1:])
            out.setdefault(level, []).append(row)
        return out

    def table(self) -> dict[str, np.ndarray]:
        """The merged per-image rows (ascending index), a dict of numpy arrays."""
        return dict(self._table())

    def predictions(self, keys: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """One dict per image, ascending index: what :meth:`write_predictions` writes. ``keys``
        (sample keys by global index, e.g. :func:`pipeline.loader.split_keys`) fills the keys the
        accumulated rows do not carry."""
        t = self._table()
        has_top1_ref, has_known_ref = self._reference_given(t)
        iou = t["iou"]
        n = len(t["index"])
        scores_given = ~np.isnan(t["topk_scores"]).all(axis=1)
        columns: dict[str, list] = {
            "index": t["index"].tolist(),
            "key": [str(k) if k or keys is None else keys[i] for k, i in zip(t["key"], t["index"])],
            "label": t["label"].tolist(),
            "topk_classes": t["topk_classes"].tolist(),
            "topk_scores": np.round(t["topk_scores"].astype(np.float64), 6).tolist(),
            "top1_box": np.round(t["top1_box"].astype(np.float64), 2).tolist(),
            "gt_known_box": np.round(t["gt_known_box"].astype(np.float64), 2).tolist(),
            "gt_known_topk_boxes": np.round(t["gt_known_topk_boxes"].astype(np.float64), 2).tolist(),
            "iou_top1": np.round(iou[:, _IOU_TOP1], 6).tolist(),
            "iou_gt_known": np.round(iou[:, _IOU_GT_KNOWN], 6).tolist(),
            "iou_gt_known_topk": np.round(iou[:, _IOU_TOPK:].max(axis=1), 6).tolist(),
            "width": t["image_size"][:, 0].tolist(),
            "height": t["image_size"][:, 1].tolist(),
            "num_gt": t["num_gt"].tolist(),
        }
        if has_top1_ref:
            columns["top1_ref_box"] = np.round(t["top1_ref_box"].astype(np.float64), 2).tolist()
            columns["iou_top1_ref"] = np.round(iou[:, _IOU_TOP1_REF], 6).tolist()
        if has_known_ref:
            columns["gt_known_ref_box"] = np.round(t["gt_known_ref_box"].astype(np.float64), 2).tolist()
            columns["iou_gt_known_ref"] = np.round(iou[:, _IOU_GT_KNOWN_REF], 6).tolist()
        for name in ("level", "gt_known_level"):
            if (t[name] >= 0).all():
                columns[name] = t[name].tolist()
        names = list(columns)
        rows = [dict(zip(names, values)) for values in zip(*(columns[k] for k in names))] if n else []
        for row, given in zip(rows, scores_given.tolist()):
            if not given:
                row["topk_scores"] = None
        return rows

    def write_predictions(self, path: str | Path, keys: Sequence[str] | None = None) -> Path:
        """Write the per-image predictions table, one row per image in ascending index.

        Columns: ``index, key, label`` (true class), ``topk_classes``, ``topk_scores``,
        ``top1_box``, ``gt_known_box``, ``gt_known_topk_boxes`` (boxes of the true class),
        ``iou_top1``, ``iou_gt_known``, ``iou_gt_known_topk`` (best IoU with any
        ground-truth box; the last over the top-k boxes), ``width, height, num_gt``, and
        when known for every image ``top1_ref_box, iou_top1_ref, gt_known_ref_box,
        iou_gt_known_ref, level, gt_known_level``. Boxes in original pixels, rounded to
        0.01 px; scores and IoUs to 1e-6.

        ``.jsonl`` (or ``.json``) writes JSON lines; ``.csv`` writes a CSV whose list
        cells are JSON strings (``json.loads`` reads them back).
        """
        path = Path(path)
        rows = self.predictions(keys)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in (".jsonl", ".json"):
            with open(path, "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
        elif path.suffix == ".csv":
            fields = list(dict.fromkeys(k for row in rows for k in row))
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                for row in rows:
                    writer.writerow({k: json.dumps(v) if isinstance(v, list) or v is None else v
                                     for k, v in row.items()})
        else:
            raise ValueError(f"predictions file {path} must end in .jsonl, .json or .csv")
        return path


def _concat_parts(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
    if not parts:
        return None
    if len(parts) == 1:
        return dict(parts[0])
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def _unique_rows(rows: dict[str, np.ndarray], owner: str) -> dict[str, np.ndarray]:
    """Rows sorted by ``index`` with each index once; conflicting duplicates raise ValueError."""
    index = rows["index"]
    order = np.argsort(index, kind="stable")
    sorted_index = index[order]
    first = np.ones(len(index), bool)
    first[1:] = sorted_index[1:] != sorted_index[:-1]
    if not first.all():
        dup = np.flatnonzero(~first)
        group_first = np.maximum.accumulate(np.where(first, np.arange(len(index)), 0))[dup]
        a, b = order[dup], order[group_first]
        for name, values in rows.items():
            if name == "index":
                continue
            x, y = values[a], values[b]
            if values.dtype == object:
                same = x == y
            else:
                same = (x == y) | (np.isnan(x) & np.isnan(y)) if values.dtype.kind == "f" else x == y
            same = same.reshape(len(dup), -1).all(axis=1)
            if not same.all():
                bad = int(np.flatnonzero(~same)[0])
                key = rows.get("key")
                name_key = f" (key {key[a[bad]]})" if key is not None and key[a[bad]] else ""
                raise ValueError(f"{owner}: global index {int(index[a[bad]])}{name_key} was evaluated twice with "
                                 f"different '{name}' values; the loader must give each index one sample")
    keep = order[first]
    return {name: values[keep] for name, values in rows.items()}


# ----------------------------------------------------------------------------------------------
# Score maps (CAM): Choe et al.'s conventions
# ----------------------------------------------------------------------------------------------

def normalize_scoremap(cam) -> np.ndarray:
    """Min-max normalisation of one map to [0, 1] in float64, as Choe et al.

    ``(cam - min) / max(cam - min)``; a map holding a NaN, or a constant map, becomes all
    zeros. Returns a new (H, W) float64 array.
    """
    cam = np.array(_numpy(cam), dtype=np.float64, copy=True)
    if np.isnan(cam).any() or cam.min() == cam.max():
        return np.zeros_like(cam)
    cam -= cam.min()
    cam /= cam.max()
    return cam


def prepare_scoremaps(cams, size: tuple[int, int] | int) -> np.ndarray:
    """Raw class activation maps -> score maps as Choe et al. evaluate them.

    Each (h, w) map is upcast to float64, resized to ``size`` with bicubic interpolation
    (``cv2.resize(..., INTER_CUBIC)``) and min-max normalised (:func:`normalize_scoremap`).

    Args:
        cams: (N, h, w) maps (numpy or torch).
        size: output (width, height), or one int for a square map (224 in their protocol).
    Returns:
        (N, H, W) float64 in [0, 1].
    """
    width, height = (size, size) if isinstance(size, int) else size
    cams = _numpy(cams, np.float64)
    return np.stack([normalize_scoremap(cv2.resize(c, (width, height), interpolation=cv2.INTER_CUBIC))
                     for c in cams]) if len(cams) else np.zeros((0, height, width))


def wsol_resize_boxes(boxes, width: float, height: float, map_size: int = 224) -> np.ndarray:
    """Original-pixel boxes -> the ``map_size`` square map frame with Choe et al.'s rounding.

    Each coordinate is scaled by ``map_size / width`` (x) or ``/ height`` (y) and
    truncated to an integer, as their ``resize_bbox``; use it for the ground truth given
    to :class:`MaxBoxAccEvaluator` when comparing with published tables.

    Returns (n, 4) int64.
    """
    boxes = _numpy(boxes, np.float64).reshape(-1, 4)
    return boxes_to_input(boxes, float(width), float(height), map_size).astype(np.int64)


def _quantise(score_map: np.ndarray) -> np.ndarray:
    """(H, W) float map in [0, 1] -> uint8 ``floor(map * 255)`` computed in float64."""
    return (score_map.astype(np.float64, copy=False) * 255).astype(np.uint8)


def _check_scoremaps(maps: np.ndarray, first_index: np.ndarray | None = None) -> None:
    if maps.ndim != 3:
        raise ValueError(f"score maps must be (N, H, W); got shape {maps.shape}")
    if len(maps) == 0:
        return
    bad_nan = np.isnan(maps).any(axis=(1, 2))
    lo, hi = maps.min(axis=(1, 2)), maps.max(axis=(1, 2))
    bad = bad_nan | (lo < 0) | (hi > 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        where = f"index {int(first_index[i])}" if first_index is not None else f"position {i} of the batch"
        raise ValueError(f"score map at {where} must lie in [0, 1] without NaN (min {lo[i]}, max {hi[i]}); "
                         "normalise it first (normalize_scoremap / prepare_scoremaps)")


def _check_gt_boxes(boxes: np.ndarray, where: str) -> None:
    if len(boxes) == 0:
        raise ValueError(f"{where} has no ground-truth box")
    if not np.isfinite(boxes).all() or (boxes < 0).any():
        raise ValueError(f"{where}: ground-truth boxes must be finite and non-negative, got {boxes.tolist()}")
    if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        raise ValueError(f"{where}: ground-truth boxes must be x0 <= x1 and y0 <= y1, got {boxes.tolist()}")


def _inclusive_iou(boxes: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(B, G) IoU on INCLUSIVE pixel boxes (width ``x1 - x0 + 1``), Choe et al.'s formula.

    The operations and their order are theirs (float64), so ties at a threshold agree;
    a pair whose union is <= 0 has IoU 0.
    """
    a = boxes[:, None, :]
    b = gt[None, :, :]
    inter = (np.maximum(0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
             * np.maximum(0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1))
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    denominator = area_a + area_b - inter
    degenerate = denominator <= 0
    iou = inter / np.where(degenerate, 1, denominator)
    iou[degenerate] = 0
    return iou


def _cutoffs(u8: np.ndarray, cam_thresholds: np.ndarray) -> np.ndarray:
    """Integer cut-off of every CAM threshold: ``int(threshold * max(u8))`` (float64 product, truncated)."""
    return (cam_thresholds * float(u8.max())).astype(np.int64)


def scoremap_best_ious(score_map, gt_boxes, cam_thresholds) -> tuple[np.ndarray, np.ndarray]:
    """Best IoU at every CAM threshold of one map, for all contours and for the largest one.

    The contour path of :class:`MaxBoxAccEvaluator` (conventions in its docstring), used
    for the largest-contour candidates: one ``findContours`` per distinct mask, on the
    mask's tight crop, boxes and contour areas vectorised.

    Args:
        score_map: (H, W) float map in [0, 1].
        gt_boxes: (G, 4) ground-truth boxes in the map's pixel frame (Choe et al.'s inclusive convention).
        cam_thresholds: (T,) float thresholds in [0, 1).
    Returns:
        ``(best_all (T,), best_largest (T,))`` float64: the best IoU over (every contour's
        box) x (every ground-truth box), and over (the largest contour's box) x (every
        ground-truth box).
    """
    u8 = _quantise(_numpy(score_map))
    gt = _numpy(gt_boxes, np.float64).reshape(-1, 4)
    thresholds = np.asarray(cam_thresholds, np.float64)
    height, width = u8.shape
    cuts = _cutoffs(u8, thresholds)
    unique_cuts, threshold_to_cut = np.unique(cuts, return_inverse=True)

    # Masks are nested (u8 > c shrinks as c grows): two cut-offs give the same mask
    # exactly when they keep the same number of pixels.
    histogram = np.bincount(u8.ravel(), minlength=256)
    kept = u8.size - np.cumsum(histogram)  # kept[c] = #pixels with value > c
    kept_at = kept[unique_cuts]
    new_mask = np.ones(len(unique_cuts), bool)
    new_mask[1:] = kept_at[1:] != kept_at[:-1]
    cut_to_mask = np.cumsum(new_mask) - 1
    mask_cuts = unique_cuts[new_mask]
    mask_kept = kept_at[new_mask]

    # tight crop of each mask (findContours on the crop with an offset gives the same
    # contours, in the same order, as on the full map)
    rows_on = u8.max(axis=1)[None, :] > mask_cuts[:, None]
    cols_on = u8.max(axis=0)[None, :] > mask_cuts[:, None]
    y0 = rows_on.argmax(axis=1)
    y1 = height - rows_on[:, ::-1].argmax(axis=1)
    x0 = cols_on.argmax(axis=1)
    x1 = width - cols_on[:, ::-1].argmax(axis=1)

    contours: list[np.ndarray] = []
    counts = np.zeros(len(mask_cuts), np.int64)
    for m in range(len(mask_cuts)):
        if mask_kept[m] == 0:
            continue
        crop = u8[y0[m]:y1[m], x0[m]:x1[m]]
        binary = cv2.threshold(crop, int(mask_cuts[m]), 255, cv2.THRESH_BINARY)[1]
        found = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE,
                                 offset=(int(x0[m]), int(y0[m])))[_CONTOURS_AT]
        counts[m] = len(found)
        contours.extend(found)

    empty_box = np.zeros((1, 4))
    empty_iou = float(_inclusive_iou(empty_box, gt).max())
    best_all = np.full(len(mask_cuts), empty_iou)
    best_largest = np.full(len(mask_cuts), empty_iou)
    if contours:
        lengths = np.fromiter((len(c) for c in contours), np.int64, len(contours))
        points = np.concatenate(contours).reshape(-1, 2).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        xs, ys = points[:, 0], points[:, 1]
        boxes = np.stack([np.minimum.reduceat(xs, starts), np.minimum.reduceat(ys, starts),
                          np.minimum(np.maximum.reduceat(xs, starts) + 1, width - 1),
                          np.minimum(np.maximum.reduceat(ys, starts) + 1, height - 1)], axis=1).astype(np.float64)
        # contour area (shoelace on the chain points, as cv2.contourArea), doubled to stay integral
        following = np.arange(1, len(points) + 1)
        following[starts + lengths - 1] = starts
        twice_area = np.abs(np.add.reduceat(xs * ys[following] - xs[following] * ys, starts))
        box_best = _inclusive_iou(boxes, gt).max(axis=1)

        has = counts > 0
        group_starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[has]
        best_all[has] = np.maximum.reduceat(box_best, group_starts)
        mask_of_contour = np.repeat(np.arange(len(mask_cuts)), counts)
        group_max_area = np.maximum.reduceat(twice_area, group_starts)
        largest_area = np.zeros(len(mask_cuts), np.int64)
        largest_area[has] = group_max_area
        candidates = np.flatnonzero(twice_area == largest_area[mask_of_contour])
        _, first = np.unique(mask_of_contour[candidates], return_index=True)  # first maximal contour, as max()
        best_largest[has] = box_best[candidates[first]]

    per_threshold = cut_to_mask[threshold_to_cut]
    return best_all[per_threshold], best_largest[per_threshold]


# -- the fast exact path for all contours: a component tree over the 255 cut-offs -------------
#
# The bounding rectangles of ``findContours(mask, RETR_TREE)`` are exactly
#   * the boxes of the 8-connected foreground components (their outer borders), and
#   * the boxes of the holes -- 4-connected background components not reaching the
#     image frame (OpenCV pads the image with background) -- grown by one pixel on
#     every side (a hole border runs through the foreground pixels around the hole).
# Both families are tracked for every cut-off at once with union-find: foreground
# pixels join in decreasing value (the mask of cut-off c is complete once the pixels
# of value c + 1 are in), background pixels in increasing value (the background of
# cut-off c is complete once the pixels of value c are in).


@numba.njit(cache=True, nogil=True, inline="always")
def _find(parent, p):
    """Root of cell ``p`` (``p`` present), compressing the path.

    Cells are handled as unsigned integers, which spares numba's negative-index test.
    """
    p = np.uint64(p)
    root = p
    while np.uint64(parent[root]) != root:
        root = np.uint64(parent[root])
    while np.uint64(parent[p]) != root:
        nxt = np.uint64(parent[p])
        parent[p] = root
        p = nxt
    return np.int64(root)


@numba.njit(cache=True, nogil=True, inline="always")
def _box_best_iou(x0, y0, x1, y1, gt):
    """Best inclusive-pixel IoU of one box with the rows of ``gt`` (same operations as :func:`_inclusive_iou`)."""
    best = 0.0
    for g in range(gt.shape[0]):
        iw = min(x1, gt[g, 2]) - max(x0, gt[g, 0]) + 1
        ih = min(y1, gt[g, 3]) - max(y0, gt[g, 1]) + 1
        inter = max(0.0, iw) * max(0.0, ih)
        denominator = (x1 - x0 + 1) * (y1 - y0 + 1) + (gt[g, 2] - gt[g, 0] + 1) * (gt[g, 3] - gt[g, 1] + 1) - inter
        iou = inter / denominator if denominator > 0 else 0.0
        if iou > best:
            best = iou
    return best


@numba.njit(cache=True, nogil=True, inline="always")
def _link(p, q, x, y, root, parent, box, outside_root):
    """Connect the new pixel ``p`` (at x, y) with its present neighbour ``q``; returns p's root (-1: none yet).

    The first neighbouring component takes ``p`` in (its box grows); a further one is
    merged (``outside_root`` always stays a root, else the first component met).
    """
    p = np.uint64(p)
    q = np.uint64(q)
    pq = parent[q]
    if pq < 0 or pq == root:
        return root
    other = _find(parent, q)
    if other == root:
        return root
    if root < 0:
        parent[p] = other
        box[other, 0] = min(box[other, 0], x)
        box[other, 1] = min(box[other, 1], y)
        box[other, 2] = max(box[other, 2], x)
        box[other, 3] = max(box[other, 3], y)
        return other
    if other == outside_root:
        root, other = other, root
    parent[other] = root
    box[root, 0] = min(box[root, 0], box[other, 0])
    box[root, 1] = min(box[root, 1], box[other, 1])
    box[root, 2] = max(box[root, 2], box[other, 2])
    box[root, 3] = max(box[root, 3], box[other, 3])
    return root


@numba.njit(cache=True, nogil=True, inline="always")
def _best_live_iou(roots, n_roots, parent, box, grow, width, height, gt):
    """Compact ``roots[:n_roots]`` to the current roots; returns (new count, best IoU of their boxes).

    A box is Choe et al.'s ``[x, y, min(x + w, W - 1), min(y + h, H - 1)]`` of the
    component's pixel extent grown by ``grow`` pixels on every side.
    """
    wmax = float(width - 1)
    hmax = float(height - 1)
    kept = 0
    top = 0.0
    for j in range(n_roots):
        r = roots[j]
        if parent[r] != r:
            continue
        roots[kept] = r
        kept += 1
        iou = _box_best_iou(float(box[r, 0] - grow), float(box[r, 1] - grow),
                            min(float(box[r, 2] + 1 + grow), wmax), min(float(box[r, 3] + 1 + grow), hmax), gt)
        if iou > top:
            top = iou
    return kept, top


@numba.njit(cache=True, nogil=True)
def _all_contour_best_ious(u8, gt, needed):
    """Best IoU of all contour boxes at every cut-off c (``u8 > c``) flagged in ``needed`` (256,).

    Pixels enter a union-find forest by value: the foreground pass (8-connected)
    from 255 down, the background pass (4-connected) from 0 up. The map is framed by
    one padding cell per side: never foreground, and in the background pass one
    component, the outside (cell 0, always a root, never listed), so holes are the
    listed background roots. Each component's root holds its pixel extent.

    Returns (256,) float64; -1 where not needed or where the mask is empty.
    """
    height, width = u8.shape
    stride = width + 2
    cells = (height + 2) * stride
    # start[v]: first position of value v in ``packed``, pixels by increasing value as y << 16 | x
    start = np.zeros(257, np.int32)
    for y in range(height):
        for x in range(width):
            start[u8[y, x] + 1] += 1
    for v in range(256):
        start[v + 1] += start[v]
    packed = np.empty(height * width, np.int32)
    fill = start[:256].copy()
    for y in range(height):
        for x in range(width):
            v = u8[y, x]
            packed[fill[v]] = (y << 16) | x
            fill[v] += 1

    parent = np.full(cells, -1, np.int32)
    box = np.empty((cells, 4), np.int32)
    roots = np.empty(height * width, np.int32)
    best_fg = np.full(256, -1.0)
    best_hole = np.full(256, -1.0)

    # foreground: values 255 down to 1; level v completes the mask of cut-off v - 1
    n_roots = 0
    for v in range(255, 0, -1):
        for k in range(start[v], start[v + 1]):
            x = packed[k] & 0xFFFF
            y = packed[k] >> 16
            p = (y + 1) * stride + x + 1
            root = -1
            root = _link(p, p - stride - 1, x, y, root, parent, box, -1)
            root = _link(p, p - stride, x, y, root, parent, box, -1)
            root = _link(p, p - stride + 1, x, y, root, parent, box, -1)
            root = _link(p, p - 1, x, y, root, parent, box, -1)
            root = _link(p, p + 1, x, y, root, parent, box, -1)
            root = _link(p, p + stride - 1, x, y, root, parent, box, -1)
            root = _link(p, p + stride, x, y, root, parent, box, -1)
            root = _link(p, p + stride + 1, x, y, root, parent, box, -1)
            if root < 0:
                parent[p] = p
                box[p, 0] = x
                box[p, 1] = y
                box[p, 2] = x
                box[p, 3] = y
                roots[n_roots] = p
                n_roots += 1
        if needed[v - 1] and start[v] < height * width:
            n_roots, best_fg[v - 1] = _best_live_iou(roots, n_roots, parent, box, 0, width, height, gt)

    # background: values 0 up to 254, the padding is the outside; level v completes cut-off v
    parent[:] = -1
    parent[:stride] = 0
    parent[cells - stride:] = 0
    for y in range(1, height + 1):
        parent[y * stride] = 0
        parent[y * stride + stride - 1] = 0
    n_roots = 0
    for v in range(0, 255):
        for k in range(start[v], start[v + 1]):
            x = packed[k] & 0xFFFF
            y = packed[k] >> 16
            p = (y + 1) * stride + x + 1
            root = -1
            root = _link(p, p - stride, x, y, root, parent, box, 0)
            root = _link(p, p - 1, x, y, root, parent, box, 0)
            root = _link(p, p + 1, x, y, root, parent, box, 0)
            root = _link(p, p + stride, x, y, root, parent, box, 0)
            if root < 0:
                parent[p] = p
                box[p, 0] = x
                box[p, 1] = y
                box[p, 2] = x
                box[p, 3] = y
                roots[n_roots] = p
                n_roots += 1
        if needed[v] and start[v + 1] < height * width and n_roots > 0:
            n_roots, best_hole[v] = _best_live_iou(roots, n_roots, parent, box, 1, width, height, gt)
    return np.maximum(best_fg, best_hole)


@numba.njit(cache=True, nogil=True)
def _batch_all_contour_best_ious(maps, cam_thresholds, gt, gt_start):
    """(N, T) best IoU over all contour boxes for N float64 maps; image i owns ``gt[gt_start[i]:gt_start[i + 1]]``."""
    n, height, width = maps.shape
    out = np.empty((n, cam_thresholds.shape[0]))
    u8 = np.empty((height, width), np.uint8)
    cuts = np.empty(cam_thresholds.shape[0], np.int64)
    for i in range(n):
        top = 0
        for y in range(height):
            for x in range(width):
                value = np.uint8(maps[i, y, x] * 255.0)  # float64 product truncated, as numpy's astype
                u8[y, x] = value
                if value > top:
                    top = value
        needed = np.zeros(256, np.bool_)
        for t in range(cam_thresholds.shape[0]):
            cuts[t] = np.int64(cam_thresholds[t] * float(top))
            needed[cuts[t]] = True
        image_gt = gt[gt_start[i]:gt_start[i + 1]]
        best = _all_contour_best_ious(u8, image_gt, needed)
        empty = _box_best_iou(0.0, 0.0, 0.0, 0.0, image_gt)  # nothing above the cut-off: box [0, 0, 0, 0]
        for t in range(cam_thresholds.shape[0]):
            out[i, t] = best[cuts[t]] if best[cuts[t]] >= 0 else empty
    return out


def scoremap_best_ious_all_contours(score_maps, gt_boxes, cam_thresholds) -> np.ndarray:
    """Best IoU over every contour's box at every CAM threshold (the V2 candidates), for a batch.

    Same result as the ``best_all`` of :func:`scoremap_best_ious` per map, from a
    component tree (above) instead of one ``findContours`` per cut-off.

    Args:
        score_maps: (N, H, W) or (H, W) maps in [0, 1].
        gt_boxes: list of N (k_i, 4) ground-truth boxes (or one (k, 4) array for one map).
        cam_thresholds: (T,) thresholds in [0, 1).
    Returns:
        (N, T) float64, or (T,) for one map.
    """
    maps = _numpy(score_maps, np.float64)
    single = maps.ndim == 2
    if single:
        maps, gt_boxes = maps[None], [gt_boxes]
    gts = [_numpy(g, np.float64).reshape(-1, 4) for g in gt_boxes]
    gt_start = np.concatenate([[0], np.cumsum([len(g) for g in gts])]).astype(np.int64)
    gt = np.ascontiguousarray(np.concatenate(gts) if gts else np.zeros((0, 4)))
    out = _batch_all_contour_best_ious(np.ascontiguousarray(maps), np.ascontiguousarray(cam_thresholds, np.float64),
                                       gt, gt_start)
    return out[0] if single else out


class MaxBoxAccEvaluator:
    """MaxBoxAcc and MaxBoxAccV2 exactly as Choe et al., "Evaluating Weakly Supervised
    Object Localization Methods Right" (CVPR 2020), reference code ``clovaai/wsolevaluation``.

    Conventions (theirs; each is checked on hand-made maps in ``tests/test_maxboxacc.py``):

    1. Score maps are (H, W) floats in [0, 1]; a map with a NaN or a value outside
       [0, 1] is rejected. Their pipeline resizes the raw CAM to the image grid (224 x
       224, bicubic) and min-max normalises it: :func:`prepare_scoremaps` /
       :func:`normalize_scoremap`, or ``accumulate(..., normalize=True)`` for the
       normalisation alone.
    2. Quantisation: ``u8 = uint8(map * 255)`` computed in float64 and truncated (1.0 ->
       255, 0.999 -> 254). A float32 map is upcast first (their maps are float64).
    3. Threshold: a CAM threshold ``t`` gives the cut-off ``int(t * max(u8))``
       (relative to the map's quantised maximum) and the mask keeps the pixels with
       ``u8 > cut-off`` (``cv2.threshold(..., THRESH_BINARY)``: strict, a pixel equal to
       the cut-off is background; ``THRESH_TOZERO`` would keep the same pixels).
    4. Contours: ``cv2.findContours(mask, RETR_TREE, CHAIN_APPROX_SIMPLE)``: every outer
       border AND every hole border (the ring of foreground pixels around a hole).
    5. Box of a contour: ``x, y, w, h = cv2.boundingRect(contour)``, then
       ``[x, y, min(x + w, W - 1), min(y + h, H - 1)]``; with no contour the box is
       ``[0, 0, 0, 0]`` (under the inclusive IoU that is the pixel (0, 0)).
    6. IoU on inclusive pixel boxes: width ``x1 - x0 + 1``, height ``y1 - y0 + 1``, the
       intersection clamped at 0, a union <= 0 gives 0. The ground-truth boxes are used
       as given, in the map's frame (:func:`wsol_resize_boxes` reproduces their resizing).
    7. An image is correct at (t, delta) when the best IoU over its candidate boxes and
       ALL its ground-truth boxes is >= delta. Candidates: every contour's box when
       ``multi_contour_eval`` (their V2 setting), else the box of the contour with the
       largest ``cv2.contourArea`` (polygon area of the chain points, the first one on
       ties -- so a 1-pixel-wide line has area 0 and loses to a 2 x 2 square).
    8. Thresholds default to ``np.arange(0, 1, 0.01)`` (their evaluation setting;
       ``np.arange(0, 1, 0.001)`` in their training-time validation);
       :meth:`cam_threshold_list` ``(n)`` gives ``n`` of them.

    Figures (:meth:`compute`, percent):

    * ``MaxBoxAcc``: the best accuracy over thresholds at IoU 0.5. With
      ``multi_contour_eval=False`` this is the CVPR 2020 MaxBoxAcc (largest contour);
      with ``True`` it is what their code reports at IoU 0.5 with all contours.
    * ``MaxBoxAccV2``: the mean over ``iou_thresholds`` (default 0.3, 0.5, 0.7) of the
      best accuracy over thresholds -- with ``multi_contour_eval=True`` (default) the
      published MaxBoxAccV2.
    * ``MaxBoxAccV2_iou30``... the per-IoU maxima, ``best_threshold_iou30``... the CAM
      threshold attaining each (the lowest on ties), ``num_images``.

    Same results, different means:

    * all contours (``multi_contour_eval=True``): no contour extraction at all. The
      rectangles of the ``RETR_TREE`` contours of a mask are exactly the boxes of its
      8-connected components and of its holes (4-connected background components not
      reaching the frame) grown by one pixel; one union-find pass over the pixels in
      decreasing value and one over the background in increasing value give them for
      every cut-off of the map at once (``_all_contour_best_ious``, numba).
    * largest contour (``False``): ``findContours`` once per DISTINCT mask (thresholds
      collapse to at most 255 integer cut-offs; cut-offs keeping the same pixels share
      one mask), on the mask's tight crop, boxes and areas vectorised.
    * storage for distributed evaluation: per image, keyed by its global index, the
      packed correct flags of every (IoU, threshold) pair instead of running counts, so
      :meth:`merge` keeps each index once; accuracies are sums of those flags.
    """

    def __init__(self, cam_thresholds=np.arange(0, 1, 0.01), iou_thresholds=(0.3, 0.5, 0.7),
                 multi_contour_eval: bool = True):
        thresholds = np.asarray(cam_thresholds, np.float64).reshape(-1)
        if len(thresholds) == 0 or np.isnan(thresholds).any() or (thresholds < 0).any() or (thresholds >= 1).any():
            raise ValueError("cam_thresholds must be a non-empty list of values in [0, 1)")
        self.cam_thresholds = thresholds
        self.iou_thresholds = _check_thresholds(iou_thresholds, "iou_thresholds")
        self.multi_contour_eval = bool(multi_contour_eval)
        # one row of flags per IoU threshold, plus 0.5 for MaxBoxAcc when it is not listed
        self._row_ious = tuple(sorted(set(self.iou_thresholds) | {0.5}))
        self._indices: list[np.ndarray] = []
        self._bits: list[np.ndarray] = []
        self._next_index = 0

    @staticmethod
    def cam_threshold_list(count: int) -> np.ndarray:
        """``count`` thresholds ``np.arange(0, 1, 1 / count)`` (100 -> 0.00, 0.01, ..., 0.99)."""
        if count < 1:
            raise ValueError(f"the number of CAM thresholds must be >= 1, got {count}")
        return np.arange(0, 1, 1.0 / count)

    @classmethod
    def from_config(cls, cfg, multi_contour_eval: bool = True) -> "MaxBoxAccEvaluator":
        """Evaluator with ``cfg.eval.cam_thresholds`` thresholds and ``cfg.eval.iou_thresholds``."""
        return cls(cls.cam_threshold_list(cfg.eval.cam_thresholds), cfg.eval.iou_thresholds, multi_contour_eval)

    def best_ious(self, score_maps, gt_boxes) -> np.ndarray:
        """(N, T) best IoU of each map's candidate boxes at every CAM threshold (no recording)."""
        maps = _numpy(score_maps, np.float64)
        if maps.ndim == 2:
            maps = maps[None]
        if self.multi_contour_eval:
            return scoremap_best_ious_all_contours(maps, gt_boxes, self.cam_thresholds).reshape(len(maps), -1)
        return np.stack([scoremap_best_ious(m, g, self.cam_thresholds)[1] for m, g in zip(maps, gt_boxes)]) \
            if len(maps) else np.zeros((0, len(self.cam_thresholds)))

    def accumulate(self, score_maps, gt_boxes, indices=None, normalize: bool = False) -> None:
        """Record N maps.

        Args:
            score_maps: (N, H, W) maps in [0, 1] (numpy or torch), or raw maps with ``normalize=True``.
            gt_boxes: list of N (k_i, 4) ground-truth boxes in the map's pixel frame, k_i >= 1.
            indices: (N,) int global sample indices; default: consecutive numbers in call order.
            normalize: min-max normalise each map first (:func:`normalize_scoremap`).
        """
        maps = _numpy(score_maps, np.float64)
        if maps.ndim == 2:
            maps = maps[None]
        n = len(maps)
        if indices is None:
            indices = np.arange(self._next_index, self._next_index + n, dtype=np.int64)
        indices = _numpy(indices, np.int64).reshape(-1)
        if len(indices) != n or len(gt_boxes) != n:
            raise ValueError(f"{n} score maps, {len(indices)} indices and {len(gt_boxes)} ground-truth lists")
        if n == 0:
            return
        self._next_index = max(self._next_index, int(indices.max()) + 1)
        if normalize:
            maps = np.stack([normalize_scoremap(m) for m in maps])
        _check_scoremaps(maps, indices)
        gts = []
        for i in range(n):
            gt = _numpy(gt_boxes[i], np.float64).reshape(-1, 4)
            _check_gt_boxes(gt, f"image index {int(indices[i])}")
            gts.append(gt)
        best = self.best_ious(maps, gts)
        bits = best[:, None, :] >= np.asarray(self._row_ious)[None, :, None]
        self._indices.append(indices)
        self._bits.append(np.packbits(bits, axis=-1))

    def state(self) -> dict[str, Any]:
        """Compact picklable state: per-image packed correct flags keyed by index, and the settings."""
        flags_bytes = (len(self.cam_thresholds) + 7) // 8
        return {"kind": "maxboxacc", "cam_thresholds": self.cam_thresholds, "iou_thresholds": self.iou_thresholds,
                "multi_contour_eval": self.multi_contour_eval,
                "index": np.concatenate(self._indices) if self._indices else np.zeros(0, np.int64),
                "bits": np.concatenate(self._bits) if self._bits else
                np.zeros((0, len(self._row_ious), flags_bytes), np.uint8)}

    @classmethod
    def merge(cls, states: Sequence[dict[str, Any]]) -> "MaxBoxAccEvaluator":
        """One evaluator from per-rank states; each index once (conflicting duplicates raise ValueError)."""
        states = list(states)
        if not states:
            raise ValueError("merge needs at least one state")
        s0 = states[0]
        for s in states:
            if s.get("kind") != "maxboxacc":
                raise ValueError(f"not a MaxBoxAccEvaluator state: kind={s.get('kind')!r}")
            if (not np.array_equal(s["cam_thresholds"], s0["cam_thresholds"])
                    or tuple(s["iou_thresholds"]) != tuple(s0["iou_thresholds"])
                    or s["multi_contour_eval"] != s0["multi_contour_eval"]):
                raise ValueError("states were made with different thresholds or multi_contour_eval")
        merged = cls(s0["cam_thresholds"], s0["iou_thresholds"], s0["multi_contour_eval"])
        rows = _unique_rows({"index": np.concatenate([s["index"] for s in states]),
                             "bits": np.concatenate([s["bits"] for s in states])}, "MaxBoxAccEvaluator")
        merged._indices, merged._bits = [rows["index"]], [rows["bits"]]
        return merged

    def _unique(self) -> dict[str, np.ndarray]:
        state = self.state()
        rows = _unique_rows({"index": state["index"], "bits": state["bits"]}, "MaxBoxAccEvaluator")
        self._indices, self._bits = [rows["index"]], [rows["bits"]]
        return rows

    def __len__(self) -> int:
        """Number of distinct images accumulated."""
        return len(self._unique()["index"])

    def accuracy_curves(self) -> dict[str, np.ndarray]:
        """Box accuracy (percent) at every CAM threshold: ``{"iou30": (T,), "iou50": (T,), ...}``."""
        rows = self._unique()
        n = len(rows["index"])
        if n == 0:
            raise ValueError("no score map was accumulated")
        counts = np.zeros((len(self._row_ious), len(self.cam_thresholds)), np.int64)
        for start in range(0, n, 4096):  # unpacked in chunks: 50,000 x 4 x 1,000 flags would take 200 MB
            chunk = np.unpackbits(rows["bits"][start:start + 4096], axis=-1, count=len(self.cam_thresholds))
            counts += chunk.sum(axis=0, dtype=np.int64)
        return {iou_suffix(t)[1:]: counts[r] * 100.0 / n for r, t in enumerate(self._row_ious)}

    def compute(self, expected_total: int | None = None) -> dict[str, float]:
        """``MaxBoxAcc``, ``MaxBoxAccV2``, the per-IoU maxima and best thresholds (see the class docstring).

        ``expected_total``: the manifest's image count; a different merged count raises ValueError.
        """
        curves = self.accuracy_curves()
        n = len(self._unique()["index"])
        if expected_total is not None and n != int(expected_total):
            raise ValueError(f"merged evaluation holds {n} distinct score maps but the manifest total is "
                             f"{int(expected_total)}: images were lost or added between the loader and the evaluator")
        out: dict[str, float] = {}
        for t in self._row_ious:
            name = iou_suffix(t)[1:]
            best = int(np.argmax(curves[name]))
            out[f"MaxBoxAccV2_{name}"] = float(curves[name][best])
            out[f"best_threshold_{name}"] = float(self.cam_thresholds[best])
        out["MaxBoxAccV2"] = float(np.mean([out[f"MaxBoxAccV2{iou_suffix(t)}"] for t in self.iou_thresholds]))
        out["MaxBoxAcc"] = out["MaxBoxAccV2_iou50"]
        out["num_images"] = float(n)
        return out

    def best_threshold(self, iou_threshold: float = 0.5) -> float:
        """The CAM threshold of highest box accuracy at ``iou_threshold`` (the lowest on ties)."""
        name = iou_suffix(iou_threshold)[1:]
        curves = self.accuracy_curves()
        if name not in curves:
            raise ValueError(f"IoU {iou_threshold} is not one of {self._row_ious}")
        return float(self.cam_thresholds[int(np.argmax(curves[name]))])


def choose_cam_threshold(score_maps, gt_boxes, cam_thresholds=np.arange(0, 1, 0.01),
                         iou_threshold: float = 0.5, multi_contour_eval: bool = False) -> float:
    """The CAM threshold maximising box accuracy on held-out maps, for the fixed-threshold CAM protocol.

    Args:
        score_maps: (N, H, W) normalised maps of held-out images (e.g. a held-out part of train).
        gt_boxes: their ground-truth boxes in the map frame (list of (k, 4)).
        iou_threshold: the IoU a box must reach.
        multi_contour_eval: score the best of all contours' boxes rather than the largest
            contour's box (the classic protocol, default).
    Returns:
        the threshold (float) of highest accuracy, the lowest on ties.
    """
    evaluator = MaxBoxAccEvaluator(cam_thresholds, (iou_threshold,), multi_contour_eval=multi_contour_eval)
    evaluator.accumulate(score_maps, gt_boxes)
    return evaluator.best_threshold(iou_threshold)


def cam_boxes(score_map, threshold: float, all_regions: bool = False) -> np.ndarray:
    """Boxes of a normalised map at a fixed threshold, continuous ``xyxy`` (x1/y1 exclusive) in map pixels.

    The mask is Choe et al.'s (``u8 > int(threshold * max(u8))``, see
    :class:`MaxBoxAccEvaluator`). ``all_regions=False``: the box of the largest contour
    (``RETR_TREE``, largest ``cv2.contourArea``, as their MaxBoxAcc), ``(1, 4)``;
    ``all_regions=True``: one box per connected region (outer contours, ``RETR_EXTERNAL``:
    a hole's box lies inside its region's box), ``(k, 4)``. The box of a contour is the
    exact pixel extent ``[x, y, x + w, y + h]`` of ``cv2.boundingRect`` -- without
    their clip to ``W - 1`` -- ready for :class:`LocalizationEvaluator` after scaling to
    original pixels. No region: ``[[0, 0, 0, 0]]`` (an empty box, IoU 0 with anything)
    for the largest, ``(0, 4)`` for all regions.

    Returns:
        (k, 4) float64.
    """
    u8 = _quantise(_numpy(score_map))
    cut = int(threshold * float(u8.max()))
    binary = cv2.threshold(u8, cut, 255, cv2.THRESH_BINARY)[1]
    mode = cv2.RETR_EXTERNAL if all_regions else cv2.RETR_TREE
    contours = cv2.findContours(binary, mode, cv2.CHAIN_APPROX_SIMPLE)[_CONTOURS_AT]
    if not contours:
        return np.zeros((0 if all_regions else 1, 4))
    if not all_regions:
        contours = [max(contours, key=cv2.contourArea)]
    rects = np.array([cv2.boundingRect(c) for c in contours], np.float64)
    return np.stack([rects[:, 0], rects[:, 1], rects[:, 0] + rects[:, 2], rects[:, 1] + rects[:, 3]], axis=1)
