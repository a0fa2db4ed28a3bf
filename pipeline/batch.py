"""The one batch type every input backend returns."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch


@dataclass
class Batch:
    """A batch from any backend (DALI or torch), identical in layout.

    Attributes:
        images: (B, 3, S, S) uint8 RGB, NCHW; the model normalises (on the GPU when there is one).
        labels: (B,) int64 class indices.
        indices: (B,) int64 global sample indices within the split (the exactly-once key).
        boxes: (B, N, 4) float32 ``xyxy`` ground-truth boxes in ORIGINAL pixels, zero-padded to the
            largest count in the batch; None in training unless requested.
        num_boxes: (B,) int64 real box count per image; None when ``boxes`` is None.
        sizes: (B, 2) int64 original (width, height); None when not requested.
        flipped: (B,) bool, True where the image (and its boxes) were mirrored; None when no flip.
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    boxes: Optional[torch.Tensor] = None
    num_boxes: Optional[torch.Tensor] = None
    sizes: Optional[torch.Tensor] = None
    flipped: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device, non_blocking: bool = True) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=non_blocking)
        return replace(self, **moved)

    def gt_boxes_list(self) -> list:
        """Per-image (n_i, 4) float32 numpy arrays of real boxes, original pixels."""
        if self.boxes is None:
            raise ValueError("this batch carries no boxes (training batches do not read them)")
        boxes = self.boxes.cpu().numpy()
        counts = self.num_boxes.cpu().numpy()
        return [boxes[i, : counts[i]] for i in range(len(counts))]
