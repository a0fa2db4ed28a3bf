"""The CSTN model (paper Fig. 4): ResNet trunk -> extra conv + FPN -> one head per level -> p(c, l, s).

``model.head = "cstn"`` learns theta per location; ``"conv"`` is the Table II baseline, the same
architecture with a plain k x k conv (theta fixed to the identity, boxes = reference windows).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .backbone import PixelNormaliser, build_trunk
from .cstn_head import LevelHead
from .fpn import PyramidNeck
from .geometry import output_grid_size, reference_boxes, transformed_boxes, window_centres
from .output import ModelOutput

__all__ = ["CSTNModel", "feature_size"]

STRIDES = {4: 16, 5: 32}


def feature_size(image_size: int, level: int) -> int:
    """Side of a ResNet feature map at ``level`` (stride 2^level) for an input side ``image_size``.

    Every stride-2 step of a ResNet (7x7 conv, max-pool, 3x3 convs, all padded) maps n to ceil(n/2).
    """
    size = image_size
    for _ in range(level):
        size = math.ceil(size / 2)
    return size


class CSTNModel(nn.Module):
    """``forward(images (B, 3, S, S) uint8) -> ModelOutput(kind="cstn")``.

    Args:
        backbone, width, backbone_weights: the trunk (see :func:`build_trunk`).
        num_classes: C.
        fpn_channels: P.
        levels, kernel_sizes, paddings: the pyramid levels and each one's window k and padding
            (cells), in matching order; stored sorted by level.
        loc_hidden, head_channels: widths of the localisation net and the filter bank.
        head: ``cstn`` (learn theta) or ``conv`` (identity theta, plain conv).
        head_impl: sampling implementation (see :mod:`cstn.models.cstn_head`).
        mean, std: RGB statistics in [0, 1] for the input normalisation.

    Parameters are grouped for the optimizer by :meth:`param_role`.
    """

    def __init__(self, *, backbone: str, width: float, backbone_weights, num_classes: int, fpn_channels: int,
                 levels: list[int], kernel_sizes: list[int], paddings: list[int], loc_hidden: int,
                 head_channels: int, head: str, head_impl: str, mean: list[float], std: list[float]):
        super().__init__()
        if head not in ("cstn", "conv"):
            raise ValueError(f"model.head={head!r} must be 'cstn' or 'conv'")
        if not (len(levels) == len(kernel_sizes) == len(paddings)):
            raise ValueError(f"model.levels {levels}, model.kernel_sizes {kernel_sizes} and model.paddings "
                             f"{paddings} need one entry per level")
        self.normaliser = PixelNormaliser(mean, std)
        self.backbone = build_trunk(backbone, width, backbone_weights)
        self.neck = PyramidNeck(self.backbone.channels, fpn_channels, levels)
        spec = sorted(zip(levels, kernel_sizes, paddings))
        self.levels = [level for level, _, _ in spec]
        self.window = {level: (k, p) for level, k, p in spec}
        self.heads = nn.ModuleDict({
            f"p{level}": LevelHead(fpn_channels, head_channels, num_classes, k, p, loc_hidden,
                                   transform=head == "cstn", impl=head_impl)
            for level, k, p in spec
        })

    @staticmethod
    def param_role(name: str) -> str:
        """Optimizer role of a parameter name: ``backbone`` (pretrained trunk), ``theta``
        (localisation nets) or ``new`` (extra layer, FPN, filter banks, classifiers)."""
        if name.startswith("backbone."):
            return "backbone"
        if ".loc." in name:
            return "theta"
        return "new"

    def check_image_size(self, image_size: int) -> None:
        """Raise ValueError when a level's window does not fit the feature map at ``image_size``."""
        for level in self.levels:
            side = feature_size(image_size, level)
            k, p = self.window[level]
            if min(output_grid_size(side, side, k, p)) < 1:
                raise ValueError(
                    f"model.kernel_sizes/paddings: P{level} is {side}x{side} at data.image_size={image_size}, "
                    f"too small for a {k}x{k} window with padding {p}")

    def forward(self, images: torch.Tensor, labels=None) -> ModelOutput:
        """``labels`` is accepted (and unused) so every model takes the trainer's call."""
        image_hw = (int(images.shape[-2]), int(images.shape[-1]))
        x = self.normaliser(images, like=self.backbone.conv1.weight)
        pyramid = self.neck(*self.backbone(x))
        logits, thetas, boxes, refs, level_ids, grids = [], [], [], [], [], []
        for level in self.levels:
            features = pyramid[level]
            level_logits, theta = self.heads[f"p{level}"](features)
            batch, _, out_h, out_w = level_logits.shape
            k, p = self.window[level]
            stride = STRIDES[level]
            # Geometry is float32 whatever the network's precision (float64 only for a float64 model).
            geo_dtype = torch.float64 if level_logits.dtype == torch.float64 else torch.float32
            centres = window_centres(features.shape[-2], features.shape[-1], k, p, dtype=geo_dtype,
                                     device=images.device) * stride
            half = torch.full((centres.shape[0],), k / 2 * stride, dtype=geo_dtype, device=images.device)
            ref = reference_boxes(centres, half, image_hw).expand(batch, -1, -1)
            theta = theta.to(geo_dtype)
            if self.heads[f"p{level}"].transform:
                box = transformed_boxes(theta.detach(), centres, half, image_hw)
            else:
                box = ref
            logits.append(level_logits.flatten(2).to(geo_dtype))
            thetas.append(theta)
            boxes.append(box)
            refs.append(ref)
            level_ids.append(torch.full((out_h * out_w,), level, dtype=torch.int64, device=images.device))
            grids.append((level, out_h, out_w))
        return ModelOutput(
            kind="cstn",
            logits=torch.cat(logits, dim=2),
            theta=torch.cat(thetas, dim=1),
            boxes=torch.cat(boxes, dim=1),
            ref_boxes=torch.cat(refs, dim=1),
            level=torch.cat(level_ids),
            grids=tuple(grids),
        )
