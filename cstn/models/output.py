"""The one model output type and the joint distribution p(c, l, s) (paper eq. 1).

The joint distribution is one softmax over all classes and all locations of all levels
(``L = sum_s H'_s W'_s``): ``log p(c, l) = f[c, l] - logsumexp_{c', l'} f[c', l']`` and
``log p(c) = logsumexp_l f[c, l] - logsumexp_{c', l'} f[c', l']``. Both are computed in float32
with autocast disabled, whatever precision the network ran in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["ModelOutput", "joint_log_probs", "class_log_probs", "float32_region"]


def float32_region(tensor: torch.Tensor):
    """A context that disables autocast on ``tensor``'s device (use with ``.float()`` inputs)."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def joint_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """``log p(c, l)`` from (B, C, L) logits: one log-softmax over C x L. Returns (B, C, L) float32
    (float64 for float64 logits)."""
    with float32_region(logits):
        logits = _full(logits)
        return logits - torch.logsumexp(logits.flatten(1), dim=1)[:, None, None]


def class_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """``log p(c)``: (B, C, L) joint logits marginalised over locations, or (B, C) class logits
    (CAM) through a plain log-softmax. Returns (B, C) float32 (float64 for float64 logits)."""
    with float32_region(logits):
        logits = _full(logits)
        if logits.ndim == 2:
            return torch.log_softmax(logits, dim=1)
        per_class = torch.logsumexp(logits, dim=2)
        return per_class - torch.logsumexp(per_class, dim=1, keepdim=True)


@dataclass
class ModelOutput:
    """What ``model(images)`` returns, for both families (``kind``).

    ``kind == "cstn"`` (CSTN or plain-conv head over FPN levels):
        logits: (B, C, L) float32 scores of every class at every location of every level, levels
            in ascending order (P4 before P5), each level row-major over its output grid.
        theta: (B, L, 2, 3) float32 affine map per location (rows x, y; identity for the conv head).
        boxes: (B, L, 4) float32 transformed boxes, ``xyxy`` input pixels, clipped to the image,
            no gradient.
        ref_boxes: (B, L, 4) float32 reference (identity) windows, input pixels, clipped.
        level: (L,) int64 FPN level (4 or 5) of every location.
        grids: ``((level, H', W'), ...)``: how L splits into per-level output grids.
        centres: (L, 2) float32 ``(x, y)`` input pixel of each location's reference-window centre
            (unclipped; where the level's cells look, :mod:`cstn.models.geometry`).
    ``kind == "cam"`` (class activation maps):
        logits: (B, C) float32 class scores (global average of the maps).
        cams: (B, C, h, w) float32 class activation maps (the 1x1 class conv before pooling).
        aux_losses: training-only extra loss terms of the comparison methods (ACoL's second
            classifier, SPG's guidance terms), name -> scalar, added to the loss as they are.
        mix: CutMix in training: ``(perm (B,) int64, lam float)``; the loss is
            ``lam CE(y) + (1 - lam) CE(y[perm])``.
    Fields a family does not produce are None (empty for ``aux_losses``).
    """

    kind: str
    logits: torch.Tensor
    theta: Optional[torch.Tensor] = None
    boxes: Optional[torch.Tensor] = None
    ref_boxes: Optional[torch.Tensor] = None
    level: Optional[torch.Tensor] = None
    grids: tuple = ()
    centres: Optional[torch.Tensor] = None
    cams: Optional[torch.Tensor] = None
    aux_losses: dict = field(default_factory=dict)
    mix: Optional[tuple] = None

    def joint_log_probs(self) -> torch.Tensor:
        """(B, C, L) ``log p(c, l, s)``; only for ``kind == "cstn"``."""
        if self.kind != "cstn":
            raise ValueError(f"joint_log_probs needs a cstn output, got kind={self.kind!r}")
        return joint_log_probs(self.logits)

    def class_log_probs(self) -> torch.Tensor:
        """(B, C) ``log p(c)`` (marginal over locations for cstn, log-softmax for cam)."""
        return class_log_probs(self.logits)
