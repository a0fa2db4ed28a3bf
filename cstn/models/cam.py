"""CAM baseline (Zhou et al. 2016) in the same framework: ResNet trunk -> 1x1 class conv -> GAP.

Training uses the pooled scores (cross-entropy); evaluation reads the per-class maps (the 1x1
conv output before pooling, equivalent to weighting the last features by the fc weights). Boxes
come from the maps in the evaluator (Choe et al.'s protocol). ``model.cam_last_stride = 1`` keeps
the last stage at stride 16 (no dilation), as in Choe et al., "Evaluating WSOL right" (CVPR 2020).
Unlike the CSTN model there is no extra conv layer and no FPN.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .backbone import PixelNormaliser, build_trunk
from .geometry import trunk_cell_map
from .output import ModelOutput

__all__ = ["CAMModel", "cam_output"]


def cam_output(maps: torch.Tensor, score_maps: Optional[torch.Tensor] = None, **extra) -> ModelOutput:
    """The CAM family's output: ``cams`` = ``maps`` (B, C, h, w), class scores = global mean of
    ``score_maps`` (default ``maps``), both float32 (float64 for a float64 model); ``extra`` goes to
    :class:`ModelOutput` (``aux_losses``, ``mix``)."""
    full = torch.float64 if maps.dtype == torch.float64 else torch.float32
    score_maps = maps if score_maps is None else score_maps
    return ModelOutput(kind="cam", logits=score_maps.to(full).mean(dim=(2, 3)), cams=maps.to(full), **extra)


class CAMModel(nn.Module):
    """``forward(images (B, 3, S, S) uint8) -> ModelOutput(kind="cam", logits (B, C), cams (B, C, h, w))``."""

    def __init__(self, *, backbone: str, width: float, backbone_weights, num_classes: int, last_stride: int,
                 mean: list[float], std: list[float]):
        super().__init__()
        self.normaliser = PixelNormaliser(mean, std)
        self.backbone = build_trunk(backbone, width, backbone_weights, last_stride=last_stride)
        self.classifier = nn.Conv2d(self.backbone.channels[1], num_classes, kernel_size=1)
        self.cell_map = trunk_cell_map(self.backbone)
        """Where the map's cells look in the input (``eval.cam_upsample=aligned`` uses it)."""

    @staticmethod
    def param_role(name: str) -> str:
        """``backbone`` for the trunk, ``new`` for the class conv (CAM has no theta layers)."""
        return "backbone" if name.startswith("backbone.") else "new"

    def check_image_size(self, image_size: int) -> None:
        """Any input of at least one pixel gives a map; nothing to check."""

    def training_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[tuple]]:
        """Hook for the input-side methods (HaS, CutMix): the normalised training batch ``x`` as the
        network should see it, and the label mix for the loss (``ModelOutput.mix``). CAM: unchanged."""
        return x, None

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> ModelOutput:
        """``labels`` is accepted (and unused) so every model takes the trainer's call."""
        x = self.normaliser(images, like=self.backbone.conv1.weight)
        mix = None
        if self.training:
            x, mix = self.training_inputs(x)
        _, c5 = self.backbone(x)
        return cam_output(self.classifier(c5), mix=mix)
