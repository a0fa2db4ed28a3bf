"""Inference: classes from p(c), boxes from the MAP location of p(c, l, s) (paper §III-A, B).

``c* = argmax_c p(c)``; the Top-1 box is the box of the location ``(l, s)`` maximising
``p(c*, l, s)``; GT-Known uses the true class instead of ``c*``; the top-k boxes of a class are
its k most probable locations. ``use_transform=False`` (Table I, "without transform") keeps the
same scores and the same selected locations and only swaps in their reference windows: the
network is never run a second time with identity theta.

All boxes are ``xyxy`` in INPUT pixels (the network's square grid); convert them to original
pixels with ``pipeline.schema.boxes_to_original``. The window geometry lives in
:mod:`cstn.models.geometry`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch

from cstn.models.output import ModelOutput

__all__ = ["Predictions", "predict"]


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


@torch.no_grad()
def predict(output: ModelOutput, labels: Optional[torch.Tensor] = None, topk: int = 5,
            use_transform: bool = True, level_choice: str = "joint") -> Predictions:
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
    """
    if topk < 1:
        raise ValueError(f"topk={topk} must be >= 1")
    if level_choice not in ("joint", "level_first"):
        raise ValueError(f"eval.level_choice={level_choice!r} must be 'joint' or 'level_first'")
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
