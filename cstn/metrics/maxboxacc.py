"""Choe et al.'s MaxBoxAcc / MaxBoxAccV2 for score-map methods, their conventions, and the CAM helpers.

:class:`MaxBoxAccEvaluator` (the conventions are listed, one by one, in its docstring) and the
functions that turn a class map into boxes the way their code does (:func:`cam_boxes`,
:func:`choose_cam_threshold`, :func:`normalize_scoremap`, :func:`prepare_scoremaps`,
:func:`wsol_resize_boxes`). All-contour boxes come from :mod:`cstn.metrics.component_tree`.
About 450 lines: the conventions and the evaluator that applies them are read together (each
convention is written once, in the helper the evaluator and ``cam_boxes`` share).
"""

from __future__ import annotations

from typing import Any, Sequence

import cv2
import numpy as np

from cstn.metrics.component_tree import scoremap_best_ious_all_contours
from cstn.metrics.rows import as_numpy, check_thresholds, exactly_once, iou_suffix
from pipeline.schema import boxes_to_input

__all__ = ["MaxBoxAccEvaluator", "cam_boxes", "choose_cam_threshold", "normalize_scoremap", "prepare_scoremaps",
           "scoremap_best_ious", "wsol_resize_boxes"]

# OpenCV 3 returned (image, contours, hierarchy); 4 and later return (contours, hierarchy).
_CONTOURS_AT = 1 if cv2.__version__.split(".")[0] == "3" else 0


def normalize_scoremap(cam) -> np.ndarray:
    """Min-max normalisation of one map to [0, 1] in float64, as Choe et al.

    ``(cam - min) / max(cam - min)``; a map holding a NaN, or a constant map, becomes all
    zeros. Returns a new (H, W) float64 array.
    """
    cam = np.array(as_numpy(cam), dtype=np.float64, copy=True)
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
    cams = as_numpy(cams, np.float64)
    return np.stack([normalize_scoremap(cv2.resize(c, (width, height), interpolation=cv2.INTER_CUBIC))
                     for c in cams]) if len(cams) else np.zeros((0, height, width))


def wsol_resize_boxes(boxes, width: float, height: float, map_size: int = 224) -> np.ndarray:
    """Original-pixel boxes -> the ``map_size`` square map frame with Choe et al.'s rounding.

    Each coordinate is scaled by ``map_size / width`` (x) or ``/ height`` (y) and
    truncated to an integer, as their ``resize_bbox``; use it for the ground truth given
    to :class:`MaxBoxAccEvaluator` when comparing with published tables.

    Returns (n, 4) int64.
    """
    boxes = as_numpy(boxes, np.float64).reshape(-1, 4)
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
    u8 = _quantise(as_numpy(score_map))
    gt = as_numpy(gt_boxes, np.float64).reshape(-1, 4)
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
        self.iou_thresholds = check_thresholds(iou_thresholds, "iou_thresholds")
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
        maps = as_numpy(score_maps, np.float64)
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
        maps = as_numpy(score_maps, np.float64)
        if maps.ndim == 2:
            maps = maps[None]
        n = len(maps)
        if indices is None:
            indices = np.arange(self._next_index, self._next_index + n, dtype=np.int64)
        indices = as_numpy(indices, np.int64).reshape(-1)
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
            gt = as_numpy(gt_boxes[i], np.float64).reshape(-1, 4)
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
        rows = exactly_once({"index": np.concatenate([s["index"] for s in states]),
                             "bits": np.concatenate([s["bits"] for s in states])}, "MaxBoxAccEvaluator")
        merged._indices, merged._bits = [rows["index"]], [rows["bits"]]
        return merged

    def _unique(self) -> dict[str, np.ndarray]:
        state = self.state()
        rows = exactly_once({"index": state["index"], "bits": state["bits"]}, "MaxBoxAccEvaluator")
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

    def compute(self, expected_total: int | None = None, contiguous: bool = False) -> dict[str, float]:
        """``MaxBoxAcc``, ``MaxBoxAccV2``, the per-IoU maxima and best thresholds (see the class docstring).

        ``expected_total`` (the manifest's image count) and ``contiguous``: checked by
        :func:`cstn.metrics.rows.exactly_once`; a different merged set raises ValueError.
        """
        curves = self.accuracy_curves()
        n = len(exactly_once(self._unique(), "MaxBoxAccEvaluator", expected_total, contiguous,
                             what="score maps")["index"])
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
    u8 = _quantise(as_numpy(score_map))
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
