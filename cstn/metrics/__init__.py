"""Localization metrics: the paper's box figures and Choe et al.'s MaxBoxAcc / MaxBoxAccV2.

Both evaluators are built for the exactly-once distributed evaluation of DESIGN.md section 5:
every rank accumulates per-image rows keyed by the global sample index, ``state()`` is a compact
picklable dict of numpy arrays, one gather brings the states to rank 0, ``merge(states)`` keeps
each index once and ``compute(expected_total=...)`` fails naming both numbers when the merged
count is not the manifest total (both through :func:`cstn.metrics.rows.exactly_once`)::

    evaluator = LocalizationEvaluator(iou_thresholds=cfg.eval.iou_thresholds)
    for batch in loader:                      # no collective in the loop
        evaluator.accumulate(BoxPredictions(batch.indices, batch.labels, ...))
    states = gather_to_rank0(evaluator.state())
    if rank == 0:
        metrics = LocalizationEvaluator.merge(states).compute(expected_total=manifest["total"])

Modules, one role each:

* :mod:`~cstn.metrics.localization` -- :class:`LocalizationEvaluator` for box-predicting models
  (CSTN, and the CAM family's thresholded boxes): Top-1/Top-5 Class, Top-1 Loc, GT-Known Loc,
  GT-Known Top-5 box Loc, with and without the transform, per size third, histograms, predictions.
* :mod:`~cstn.metrics.maxboxacc` -- :class:`MaxBoxAccEvaluator` for score maps, Choe et al.'s
  conventions, and the CAM helpers (:func:`cam_boxes`, :func:`choose_cam_threshold`, ...).
* :mod:`~cstn.metrics.component_tree` -- private: all-contour boxes at every cut-off (numba).
* :mod:`~cstn.metrics.rows` -- the exactly-once merge and count check, and shared helpers.
"""

from cstn.metrics.localization import SIZE_GROUPS, BoxPredictions, LocalizationEvaluator, best_iou_against_gt
from cstn.metrics.maxboxacc import (MaxBoxAccEvaluator, cam_boxes, choose_cam_threshold, normalize_scoremap,
                                   prepare_scoremaps, scoremap_best_ious, wsol_resize_boxes)
from cstn.metrics.rows import exactly_once, iou_suffix

__all__ = [
    "BoxPredictions",
    "LocalizationEvaluator",
    "MaxBoxAccEvaluator",
    "SIZE_GROUPS",
    "best_iou_against_gt",
    "cam_boxes",
    "choose_cam_threshold",
    "exactly_once",
    "iou_suffix",
    "normalize_scoremap",
    "prepare_scoremaps",
    "scoremap_best_ious",
    "wsol_resize_boxes",
]
