"""The paper's localization figures for box-predicting models, exactly once per image.

:class:`LocalizationEvaluator` takes one :class:`BoxPredictions` record per batch and reports
Top-1/Top-5 Class, Top-1 Loc, GT-Known Loc and GT-Known Top-5 box Loc at every IoU threshold,
with and without the transform, per object-size third, the box-area histograms of the paper's
Fig. 6/8 and a per-image predictions file; :func:`best_iou_against_gt` is its IoU. About 500
lines: one class whose figures, histograms and predictions file all read the same per-image
table, kept together so that a reader checks one definition of "correct" against all of them.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torchvision

from cstn.metrics.rows import as_numpy, check_thresholds, concat_rows, exactly_once, iou_suffix

__all__ = ["BoxPredictions", "LocalizationEvaluator", "SIZE_GROUPS", "best_iou_against_gt"]

SIZE_GROUPS = ("small", "middle", "large")

Array = Any
"""A numpy array or a torch tensor on any device (or a sequence numpy can read)."""


@dataclass
class BoxPredictions:
    """One batch of N images for :meth:`LocalizationEvaluator.accumulate`.

    Boxes are ``xyxy`` in ORIGINAL pixels (the caller converts predictions with
    ``pipeline.schema.boxes_to_original``). Optional fields left at None are simply not reported
    (no figure without the transform, no level histograms, no scores in the predictions file).
    """

    indices: Array
    """(N,) int global sample indices: the exactly-once key."""
    labels: Array
    """(N,) int true classes."""
    topk_classes: Array
    """(N, K) int predicted classes, best first."""
    top1_box: Array
    """(N, 4) the Top-1 box (of the predicted top-1 class)."""
    gt_known_box: Array
    """(N, 4) the best box of the true class."""
    gt_known_topk_boxes: Array
    """(N, Kb, 4) the Kb best boxes of the true class."""
    gt_boxes: Sequence[Array]
    """N arrays (n_i, 4) of ground-truth boxes, n_i >= 1."""
    top1_ref_box: Optional[Array] = None
    """(N, 4) the Top-1 location's reference box (without the transform)."""
    gt_known_ref_box: Optional[Array] = None
    """(N, 4) the GT-known location's reference box."""
    levels: Optional[Array] = None
    """(N,) int FPN level of the Top-1 box (4, 5)."""
    gt_known_levels: Optional[Array] = None
    """(N,) int FPN level of the GT-known box."""
    keys: Optional[Sequence[str]] = None
    """N sample keys."""
    topk_scores: Optional[Array] = None
    """(N, K) float scores of ``topk_classes``."""
    sizes: Optional[Array] = None
    """(N, 2) original (width, height); without them size thirds use areas in pixels."""


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
    pred = torch.as_tensor(as_numpy(pred_boxes, np.float64)).reshape(-1, 4)
    gt = torch.as_tensor(as_numpy(gt_boxes, np.float64)).reshape(-1, 4)
    pred_image = as_numpy(pred_image, np.int64)
    gt_image = as_numpy(gt_image, np.int64)
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
        self.iou_thresholds = check_thresholds(iou_thresholds, "iou_thresholds")
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

    def accumulate(self, batch: BoxPredictions) -> None:
        """Record one batch (:class:`BoxPredictions`); shapes are checked, naming the field."""
        b = batch
        indices = as_numpy(b.indices, np.int64).reshape(-1)
        n = len(indices)

        def rows(value, name, shape, dtype):
            array = as_numpy(value, dtype)
            if array.shape != (n,) + shape:
                raise ValueError(f"{name} has shape {array.shape}; expected {(n,) + shape}")
            return array

        labels = rows(b.labels, "labels", (), np.int64)
        topk = as_numpy(b.topk_classes, np.int64)
        if topk.ndim != 2 or topk.shape[0] != n or topk.shape[1] < 1:
            raise ValueError(f"topk_classes has shape {topk.shape}; expected ({n}, K)")
        top1 = rows(b.top1_box, "top1_box", (4,), np.float64)
        known = rows(b.gt_known_box, "gt_known_box", (4,), np.float64)
        known_k = as_numpy(b.gt_known_topk_boxes, np.float64)
        if known_k.ndim != 3 or known_k.shape[0] != n or known_k.shape[2] != 4 or known_k.shape[1] < 1:
            raise ValueError(f"gt_known_topk_boxes has shape {known_k.shape}; expected ({n}, Kb, 4)")
        if len(b.gt_boxes) != n:
            raise ValueError(f"gt_boxes has {len(b.gt_boxes)} entries for {n} images")
        gt_list = [as_numpy(g, np.float64).reshape(-1, 4) for g in b.gt_boxes]
        num_gt = np.array([len(g) for g in gt_list], np.int64)
        keys = None if b.keys is None else [str(k) for k in b.keys]
        if keys is not None and len(keys) != n:
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

        refs = []  # a reference box not given is stored as zeros and flagged as absent
        for name, value in (("top1_ref_box", b.top1_ref_box), ("gt_known_ref_box", b.gt_known_ref_box)):
            refs.append(np.zeros((n, 4)) if value is None else rows(value, name, (4,), np.float64))
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
        iou = best_iou_against_gt(pred.reshape(-1, 4), pred_image, gt_flat, gt_image).reshape(n, columns)

        areas = (gt_flat[:, 2] - gt_flat[:, 0]).clip(min=0) * (gt_flat[:, 3] - gt_flat[:, 1]).clip(min=0)
        starts = np.concatenate([[0], np.cumsum(num_gt)[:-1]]).astype(np.int64)
        max_area = np.maximum.reduceat(areas, starts) if n else np.zeros(0)

        def optional(value, name, shape, dtype):
            """(values, given (N,) bool): zeros and False when the field was not given."""
            if value is None:
                return np.zeros((n,) + shape, dtype), np.zeros(n, bool)
            return rows(value, name, shape, dtype), np.ones(n, bool)

        scores, scores_given = optional(b.topk_scores, "topk_scores", (topk.shape[1],), np.float32)
        sizes, _ = optional(b.sizes, "sizes", (2,), np.int64)
        level, level_given = optional(b.levels, "levels", (), np.int64)
        known_level, known_level_given = optional(b.gt_known_levels, "gt_known_levels", (), np.int64)
        part = {
            "index": indices,
            "key": np.array(keys if keys is not None else [""] * n, dtype=object),
            "label": labels,
            "topk_classes": topk,
            "topk_scores": scores,
            "given_scores": scores_given,
            "top1_box": top1.astype(np.float32),
            "gt_known_box": known.astype(np.float32),
            "gt_known_topk_boxes": known_k.astype(np.float32),
            "top1_ref_box": refs[0].astype(np.float32),
            "gt_known_ref_box": refs[1].astype(np.float32),
            "given_top1_ref": np.full(n, b.top1_ref_box is not None),
            "given_known_ref": np.full(n, b.gt_known_ref_box is not None),
            "iou": iou,
            "num_gt": num_gt,
            "max_gt_area": max_area,
            "image_size": sizes,
            "level": level,
            "given_level": level_given,
            "gt_known_level": known_level,
            "given_known_level": known_level_given,
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
                "rows": concat_rows(self._parts)}

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
            merged._parts = [exactly_once(concat_rows(parts), "LocalizationEvaluator")]
        return merged

    def _table(self) -> dict[str, np.ndarray]:
        if self._table_cache is None:
            if not self._parts:
                raise ValueError("no image was accumulated")
            self._table_cache = exactly_once(concat_rows(self._parts), "LocalizationEvaluator")
            self._parts = [self._table_cache]
        return self._table_cache

    def __len__(self) -> int:
        """Number of distinct images accumulated."""
        return len(self._table()["index"]) if self._parts else 0

    # -- metrics ----------------------------------------------------------------------------------

    def _reference_given(self, table) -> tuple[bool, bool]:
        out = []
        for flag, name in (("given_top1_ref", "top1_ref_box"), ("given_known_ref", "gt_known_ref_box")):
            given = table[flag]
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

    def compute(self, expected_total: int | None = None, expected_boxes: int | None = None,
                contiguous: bool = False) -> dict[str, float]:
        """All figures as a flat ``{name: float}`` dict (percent for accuracies).

        Args:
            expected_total: the manifest's image count; a different merged count raises
                ValueError naming both numbers (:func:`cstn.metrics.rows.exactly_once`).
            expected_boxes: optionally the number of ground-truth boxes the split holds.
            contiguous: the indices must also be exactly ``0 .. expected_total - 1`` (the
                evaluation loop's global indices); the error then lists missing ones.
        """
        t = exactly_once(self._table(), "LocalizationEvaluator", expected_total, contiguous)
        n = len(t["index"])
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
        level_given = t["given_level"] if metric == "top1_loc" else t["given_known_level"]
        selections = [("all", np.ones(len(area), bool))]
        if level_given.all():
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
        (sample keys by global index, e.g. :func:`pipeline.dali_index.split_keys`) fills the keys the
        accumulated rows do not carry."""
        t = self._table()
        has_top1_ref, has_known_ref = self._reference_given(t)
        iou = t["iou"]
        n = len(t["index"])
        scores_given = t["given_scores"]
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
        for name, flag in (("level", "given_level"), ("gt_known_level", "given_known_level")):
            if t[flag].all():
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
