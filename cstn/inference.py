"""Inference: classes from p(c), boxes from the MAP location of p(c, l, s) (paper §III-A, B).

``c* = argmax_c p(c)``; the Top-1 box is the box of the location ``(l, s)`` maximising
``p(c*, l, s)``; GT-Known uses the true class instead of ``c*``; the top-k boxes of a class are
its k most probable locations. ``use_transform=False`` (Table I, "without transform") keeps the
same scores and the same selected locations and only swaps in their reference windows: the
network is never run a second time with identity theta.

Two other decodings of the same output (``eval.box_decoding``):

* ``expected_iou`` (box voting): the chosen location is the one whose box ``b`` maximises
  ``sum_j p(c, j) IoU(b, b_j)`` over the boxes of every location of every level, i.e. the box
  with the highest expected IoU against a box drawn from ``p(c, .)``. The MAP box wins when one
  location holds most of the mass; when many windows agree on an object, the box they overlap most
  wins. ``*_ref_box`` stays the reference window of the chosen location.
* ``scoremap``: :func:`window_score_maps` turns the windows into a CAM-like map
  ``S_c(x) = sum_j p(c, j)^(1/T) [x in box_j]`` that the evaluator thresholds like a CAM (see
  :mod:`cstn.evaluation`).
* ``logitmap``: :func:`location_score_maps` reads the class's joint scores on a level's grid as a
  CAM-like map (values at the window centres, bilinear between them), thresholded the same way.

All boxes are ``xyxy`` in INPUT pixels (the network's square grid); convert them to original
pixels with ``pipeline.schema.boxes_to_original``. The window geometry lives in
:mod:`cstn.models.geometry`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch

from cstn.models.output import ModelOutput

__all__ = ["Predictions", "predict", "expected_iou_choice", "window_score_maps", "location_score_maps"]


@dataclass
class Predictions:
    """Per-image predictions of one batch. ``B`` images, ``k`` = min(topk, C) classes,
    ``m`` = min(topk, L) boxes. Box fields are float32 ``xyxy`` input pixels.

    topk_classes: (B, k) int64, most probable classes first.
    topk_scores: (B, k) float32 p(c) of those classes.
    For ``kind == "cstn"`` (None for CAM):
        top1_box / top1_ref_box: (B, 4) box and reference window of ``argmax_{l,s} p(c*, l, s)``.
        top1_location: (B,) int64 index of that location in L; top1_level: (B,) its FPN level.
        top1_score: (B,) float32 ``p(c*, l*, s*)``.
    With labels (cstn only):
        gt_known_box / gt_known_ref_box: (B, 4) the same for the true class.
        gt_known_location, gt_known_level: (B,) int64.
        gt_known_topk_boxes / gt_known_topk_ref_boxes: (B, m, 4) the true class's m most probable
            locations, best first; gt_known_topk_levels: (B, m) int64.
    For ``kind == "cam"``: cams (B, C, h, w) float32 class activation maps (boxes come from them).
    ``use_transform=False`` puts the reference windows into the ``*_box``/``*_boxes`` fields too.
    """

    topk_classes: torch.Tensor
    topk_scores: torch.Tensor
    top1_box: Optional[torch.Tensor] = None
    top1_ref_box: Optional[torch.Tensor] = None
    top1_location: Optional[torch.Tensor] = None
    top1_level: Optional[torch.Tensor] = None
    top1_score: Optional[torch.Tensor] = None
    gt_known_box: Optional[torch.Tensor] = None
    gt_known_ref_box: Optional[torch.Tensor] = None
    gt_known_location: Optional[torch.Tensor] = None
    gt_known_level: Optional[torch.Tensor] = None
    gt_known_topk_boxes: Optional[torch.Tensor] = None
    gt_known_topk_ref_boxes: Optional[torch.Tensor] = None
    gt_known_topk_levels: Optional[torch.Tensor] = None
    cams: Optional[torch.Tensor] = None

    def to(self, device) -> "Predictions":
        """A copy with every tensor moved to ``device`` (e.g. ``"cpu"`` before accumulating)."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


def _pick(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values`` (B, L, 4) at ``index`` (B,) or (B, m) -> (B, 4) or (B, m, 4)."""
    flat = index.reshape(index.shape[0], -1)
    out = torch.gather(values, 1, flat[..., None].expand(-1, -1, values.shape[-1]))
    return out.reshape(*index.shape, values.shape[-1])


def pairwise_iou(boxes: torch.Tensor) -> torch.Tensor:
    """(B, L, 4) ``xyxy`` boxes -> (B, L, L) IoU of every pair (0 for two empty boxes)."""
    lo = torch.maximum(boxes[:, :, None, :2], boxes[:, None, :, :2])
    hi = torch.minimum(boxes[:, :, None, 2:], boxes[:, None, :, 2:])
    inter = (hi - lo).clamp_min(0).prod(-1)
    area = (boxes[..., 2:] - boxes[..., :2]).clamp_min(0).prod(-1)
    union = area[:, :, None] + area[:, None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def expected_iou_choice(log_probs: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Box voting: the location whose box has the highest expected IoU under ``p(c, .)``.

    Args:
        log_probs: (B, L) ``log p(c, j)`` of one class per image.
        boxes: (B, L, 4) every location's box.
    Returns:
        ``(log p of the chosen location (B,), its index (B,))``. Ties go to the lower index.
    """
    weights = (log_probs - log_probs.max(dim=1, keepdim=True).values).exp()       # (B, L), scale-free
    votes = torch.einsum("bij,bj->bi", pairwise_iou(boxes.double()), weights.double())
    index = votes.argmax(dim=1)
    return log_probs.gather(1, index[:, None])[:, 0], index


def window_score_maps(log_probs: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int],
                      temperature: float = 1.0) -> torch.Tensor:
    """The windows as a class score map: ``S(x) = sum_j p(c, j)^(1/T) cover_j(x)``, min-max normalised.

    Args:
        log_probs: (B, L) ``log p(c, j)`` of one class per image.
        boxes: (B, L, 4) the locations' boxes, ``xyxy`` input pixels.
        size: ``(H, W)`` of the map (the input grid).
        temperature: ``T`` (``eval.scoremap_temperature``); 1 weighs each window by its probability,
            a larger T flattens the weights (the joint softmax is peaked: one window often holds
            nearly all the mass, and the map is then that window).
    Returns:
        (B, H, W) float32 in [0, 1]. ``cover_j(x)`` is the fraction of pixel ``x`` (the square
        ``[x, x + 1)``) inside box ``j``, so fractional box edges count exactly.
    """
    if temperature <= 0:
        raise ValueError(f"eval.scoremap_temperature={temperature} must be > 0")
    height, width = size
    weights = ((log_probs - log_probs.max(dim=1, keepdim=True).values) / temperature).exp().float()   # (B, L)
    boxes = boxes.float()

    def cover(lo: torch.Tensor, hi: torch.Tensor, n: int) -> torch.Tensor:               # (B, L) -> (B, L, n)
        pixel = torch.arange(n, dtype=torch.float32, device=boxes.device)
        return (torch.minimum(pixel + 1, hi[..., None]) - torch.maximum(pixel, lo[..., None])).clamp(0, 1)

    maps = torch.einsum("bl,bly,blx->byx", weights, cover(boxes[..., 1], boxes[..., 3], height),
                        cover(boxes[..., 0], boxes[..., 2], width))
    return _minmax(maps)


def location_score_maps(log_probs: torch.Tensor, output: ModelOutput, size: tuple[int, int],
                        levels=None) -> torch.Tensor:
    """The joint scores of one class read as a class map, CAM-style: ``eval.box_decoding=logitmap``.

    Each level's grid of ``log p(c, l, s)`` (the class's logit at each location, up to one constant
    per image) is a map whose values sit at the locations' window centres
    (``ModelOutput.centres``: where the cells look); it is interpolated bilinearly onto the input
    pixels (clamped at the border, as :func:`torch.nn.functional.grid_sample` with
    ``padding_mode="border"``), min-max normalised per level, summed over ``levels`` and
    normalised again. Unlike :func:`window_score_maps` it keeps the spread of the scores before the
    joint softmax sharpens them, and uses no box: the transform acts only through the scores.

    Args:
        log_probs: (B, L) ``log p(c, j)`` of one class per image.
        output: the model output (``grids``, ``level``, ``centres``).
        size: ``(H, W)`` of the map.
        levels: the levels to read (None: all).
    Returns:
        (B, H, W) float32 in [0, 1].
    """
    height, width = size
    chosen = [g for g in output.grids if levels is None or g[0] in levels]
    if not chosen:
        raise ValueError(f"eval.logitmap_levels={list(levels)} selects none of the model's levels "
                         f"{[g[0] for g in output.grids]}")
    total = None
    start = 0
    for level, rows, cols in output.grids:
        count = rows * cols
        if (level, rows, cols) in chosen:
            values = log_probs[:, start:start + count].float().view(-1, 1, rows, cols)
            centres = output.centres[start:start + count].float().view(rows, cols, 2)
            xs, ys = centres[0, :, 0], centres[:, 0, 1]                          # (W',), (H',)

            def grid_coord(pixels: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
                if len(at) == 1:
                    return torch.zeros_like(pixels)
                index = (pixels - at[0]) / (at[1] - at[0])                          # location-index units
                return 2 * index / (len(at) - 1) - 1
            px = torch.arange(width, dtype=torch.float32, device=values.device) + 0.5
            py = torch.arange(height, dtype=torch.float32, device=values.device) + 0.5
            gy, gx = torch.meshgrid(grid_coord(py, ys), grid_coord(px, xs), indexing="ij")
            grid = torch.stack([gx, gy], dim=-1).expand(values.shape[0], -1, -1, -1)
            maps = torch.nn.functional.grid_sample(values, grid, mode="bilinear", padding_mode="border",
                                                   align_corners=True)[:, 0]
            maps = _minmax(maps)
            total = maps if total is None else total + maps
        start += count
    return _minmax(total)


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1)
    lo, hi = flat.min(dim=1).values[:, None, None], flat.max(dim=1).values[:, None, None]
    return (maps - lo) / (hi - lo).clamp_min(1e-12)


@torch.no_grad()
def predict(output: ModelOutput, labels: Optional[torch.Tensor] = None, topk: int = 5,
            use_transform: bool = True, level_choice: str = "joint", decoding: str = "map") -> Predictions:
    """Decode a batch's :class:`ModelOutput` (see :class:`Predictions` for the fields).

    Args:
        output: the model's output (``kind`` ``cstn`` or ``cam``).
        labels: (B,) int64 true classes, for the GT-Known fields; None skips them.
        topk: number of classes and of per-class boxes (clamped to C and L).
        use_transform: False swaps each selected location's transformed box for its reference
            window (Table I), with the same scores and locations.
        level_choice: ``"joint"`` (the paper): the top-1 location maximises ``p(c, l, s)`` over all
            levels. ``"level_first"``: the level maximising its mass ``sum_l p(c, l, s)`` is chosen
            first, then the most probable location within it (a level with more locations no longer
            wins by holding more candidates). Top-k boxes keep the joint order either way.
        decoding: ``"map"`` (the paper) or ``"expected_iou"`` (box voting over every level's boxes;
            ``level_choice`` is then not used). ``"scoremap"`` and ``"logitmap"`` decode like
            ``"map"`` here: their boxes come from maps in the evaluator.
    """
    if topk < 1:
        raise ValueError(f"topk={topk} must be >= 1")
    if level_choice not in ("joint", "level_first"):
        raise ValueError(f"eval.level_choice={level_choice!r} must be 'joint' or 'level_first'")
    if decoding not in ("map", "expected_iou", "scoremap", "logitmap"):
        raise ValueError(f"eval.box_decoding={decoding!r} must be 'map', 'expected_iou', 'scoremap' or 'logitmap'")
    class_probs = output.class_log_probs().exp()
    num_classes = class_probs.shape[1]
    topk_scores, topk_classes = class_probs.topk(min(topk, num_classes), dim=1)
    if output.kind == "cam":
        return Predictions(topk_classes=topk_classes, topk_scores=topk_scores.float(), cams=output.cams)
    if output.kind != "cstn":
        raise ValueError(f"unknown model output kind {output.kind!r}")
    if labels is not None:
        labels = labels.to(output.logits.device).long().reshape(-1)
        if labels.shape[0] != class_probs.shape[0]:
            raise ValueError(f"labels has {labels.shape[0]} entries for a batch of {class_probs.shape[0]}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min().item()}..{labels.max().item()}")

    joint = output.joint_log_probs()                                  # (B, C, L)
    boxes = (output.boxes if use_transform else output.ref_boxes).float()
    refs = output.ref_boxes.float()
    level = output.level

    def class_row(classes: torch.Tensor) -> torch.Tensor:             # (B,) -> (B, L) log p(c, l, s)
        return torch.gather(joint, 1, classes[:, None, None].expand(-1, 1, joint.shape[2]))[:, 0]

    def best_location(row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, L) -> log p, index
        if decoding == "expected_iou":
            return expected_iou_choice(row, boxes)
        if level_choice == "joint":
            return row.max(dim=1)
        levels = torch.unique(level)
        mass = torch.stack([torch.logsumexp(row[:, level == s], dim=1) for s in levels], dim=1)  # (B, S)
        chosen = levels[mass.argmax(dim=1)]                                                       # (B,)
        masked = row.masked_fill(level[None, :] != chosen[:, None], float("-inf"))
        return masked.max(dim=1)

    top1_class = topk_classes[:, 0]
    row = class_row(top1_class)
    top1_log_score, top1_location = best_location(row)
    preds = Predictions(
        topk_classes=topk_classes, topk_scores=topk_scores.float(),
        top1_box=_pick(boxes, top1_location), top1_ref_box=_pick(refs, top1_location),
        top1_location=top1_location, top1_level=level[top1_location], top1_score=top1_log_score.exp().float(),
    )
    if labels is not None:
        row = class_row(labels)
        _, order = row.topk(min(topk, row.shape[1]), dim=1)           # (B, m), best first
        location = best_location(row)[1]
        preds.gt_known_box = _pick(boxes, location)
        preds.gt_known_ref_box = _pick(refs, location)
        preds.gt_known_location = location
        preds.gt_known_level = level[location]
        preds.gt_known_topk_boxes = _pick(boxes, order)
        preds.gt_known_topk_ref_boxes = _pick(refs, order)
        preds.gt_known_topk_levels = level[order]
    return preds
