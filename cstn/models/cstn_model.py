"""The CSTN model (paper Fig. 4): ResNet trunk -> extra conv + FPN -> one head per level -> p(c, l, s).

``model.head = "cstn"`` learns theta per location; ``"conv"`` is the Table II baseline, the same
architecture with a plain k x k conv (theta fixed to the identity, boxes = reference windows).

Boxes: every location's window is mapped to input pixels by its level's
:class:`~cstn.models.geometry.CellMap`, derived once from the trunk and the neck at construction
(:func:`~cstn.models.geometry.derive_cell_maps`). Only the box mapping depends on it: the heads
sample in cell coordinates, so a checkpoint trained before the map was derived (when cell ``c``
was taken to cover ``[t c, t (c + 1))``) evaluates unchanged except that its boxes move
``t/2 - 0.5`` px up-left, onto what its windows see.

Options beyond the paper's text (``model.*``, each with its authors' value in
``configs/cub_cstn_r101.yaml``): ``shared_classifier`` (one 1x1 class conv for every level, the
authors'), ``level_prior`` (``balanced``: each level's logits offset by ``-log(H' W')``, so every
level holds the same prior mass in the joint softmax whatever its number of locations),
``input_method`` (Hide-and-Seek or CutMix training inputs, as the CAM-family methods use them),
``window_span`` and ``loc_net`` (:mod:`cstn.models.cstn_head`), the neck's ``fpn_upsample``,
``extra_relu`` and ``p5_smooth`` (:mod:`cstn.models.fpn`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .backbone import PixelNormaliser, build_trunk
from .cstn_head import LevelHead, _like_weight
from .fpn import PyramidNeck
from .geometry import derive_cell_maps, output_grid_size, reference_boxes, transformed_boxes, window_centres
from .output import ModelOutput

__all__ = ["CSTNModel", "feature_size", "LEVEL_PRIORS", "INPUT_METHODS"]

LEVEL_PRIORS = ("none", "balanced")
INPUT_METHODS = ("none", "has", "cutmix")


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
        fpn_upsample, extra_relu, p5_smooth: the neck (:class:`PyramidNeck`).
        shared_classifier, loc_net, window_span, level_prior: see the module docstring.
        input_method: ``none``, ``has`` or ``cutmix``; ``input_options`` their settings
            (``grid``/``hide_prob`` or ``beta``/``prob``).

    Parameters are grouped for the optimizer by :meth:`param_role`.
    """

    def __init__(self, *, backbone: str, width: float, backbone_weights, num_classes: int, fpn_channels: int,
                 levels: list[int], kernel_sizes: list[int], paddings: list[int], loc_hidden: int,
                 head_channels: int, head: str, head_impl: str, mean: list[float], std: list[float],
                 fpn_upsample: str = "aligned", extra_relu: bool = True, p5_smooth: bool = True,
                 shared_classifier: bool = False, loc_net: str = "kxk_1x1", window_span: str = "cells",
                 level_prior: str = "none", input_method: str = "none", input_options: Optional[dict] = None):
        super().__init__()
        if head not in ("cstn", "conv"):
            raise ValueError(f"model.head={head!r} must be 'cstn' or 'conv'")
        if not (len(levels) == len(kernel_sizes) == len(paddings)):
            raise ValueError(f"model.levels {levels}, model.kernel_sizes {kernel_sizes} and model.paddings "
                             f"{paddings} need one entry per level")
        if level_prior not in LEVEL_PRIORS:
            raise ValueError(f"model.level_prior={level_prior!r} must be one of {list(LEVEL_PRIORS)}")
        if input_method not in INPUT_METHODS:
            raise ValueError(f"model.input_method={input_method!r} must be one of {list(INPUT_METHODS)}")
        self.normaliser = PixelNormaliser(mean, std)
        self.backbone = build_trunk(backbone, width, backbone_weights)
        self.neck = PyramidNeck(self.backbone.channels, fpn_channels, levels, upsample=fpn_upsample,
                                extra_relu=extra_relu, p5_smooth=p5_smooth)
        self.cell_maps = derive_cell_maps(self.backbone, self.neck)
        spec = sorted(zip(levels, kernel_sizes, paddings))
        self.levels = [level for level, _, _ in spec]
        self.window = {level: (k, p) for level, k, p in spec}
        self.level_prior = level_prior
        self.classifier = nn.Conv2d(head_channels, num_classes, 1) if shared_classifier else None
        self.heads = nn.ModuleDict({
            f"p{level}": LevelHead(fpn_channels, head_channels, None if shared_classifier else num_classes, k, p,
                                   loc_hidden, transform=head == "cstn", impl=head_impl, window_span=window_span,
                                   loc_net=loc_net)
            for level, k, p in spec
        })
        self.input_method = input_method
        self.input_options = dict(input_options or {})
        if input_method != "none":
            from .wsol_methods import check_input_method

            check_input_method(input_method, self.input_options)

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

    def training_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[tuple]]:
        """The normalised training batch as the network should see it, and CutMix's label mix
        (``ModelOutput.mix``); unchanged with ``input_method = none``."""
        if self.input_method == "none":
            return x, None
        from .wsol_methods import apply_input_method

        return apply_input_method(self.input_method, x, self.input_options)

    def forward(self, images: torch.Tensor, labels=None) -> ModelOutput:
        """``labels`` is accepted (and unused) so every model takes the trainer's call."""
        image_hw = (int(images.shape[-2]), int(images.shape[-1]))
        x = self.normaliser(images, like=self.backbone.conv1.weight)
        mix = None
        if self.training:
            x, mix = self.training_inputs(x)
        pyramid = self.neck(*self.backbone(x))
        logits, thetas, boxes, refs, level_ids, grids, all_centres = [], [], [], [], [], [], []
        for level in self.levels:
            features = pyramid[level]
            head = self.heads[f"p{level}"]
            level_logits, theta = head(features)
            if self.classifier is not None:
                level_logits = self.classifier(_like_weight(level_logits, self.classifier.weight))
            batch, _, out_h, out_w = level_logits.shape
            k, p = self.window[level]
            cells = self.cell_maps[level]
            # Geometry is float32 whatever the network's precision (float64 only for a float64 model).
            geo_dtype = torch.float64 if level_logits.dtype == torch.float64 else torch.float32
            centres = cells.from_edge(window_centres(features.shape[-2], features.shape[-1], k, p, dtype=geo_dtype,
                                                     device=images.device))
            half = torch.full((centres.shape[0],), head.half_span * cells.extent, dtype=geo_dtype,
                              device=images.device)
            ref = reference_boxes(centres, half, image_hw).expand(batch, -1, -1)
            theta = theta.to(geo_dtype)
            box = transformed_boxes(theta.detach(), centres, half, image_hw) if head.transform else ref
            level_logits = level_logits.flatten(2).to(geo_dtype)
            if self.level_prior == "balanced":  # equal prior mass per level: -log(number of locations)
                level_logits = level_logits - math.log(out_h * out_w)
            logits.append(level_logits)
            thetas.append(theta)
            boxes.append(box)
            refs.append(ref)
            level_ids.append(torch.full((out_h * out_w,), level, dtype=torch.int64, device=images.device))
            grids.append((level, out_h, out_w))
            all_centres.append(centres.float())
        return ModelOutput(
            kind="cstn",
            logits=torch.cat(logits, dim=2),
            theta=torch.cat(thetas, dim=1),
            boxes=torch.cat(boxes, dim=1),
            ref_boxes=torch.cat(refs, dim=1),
            level=torch.cat(level_ids),
            grids=tuple(grids),
            centres=torch.cat(all_centres),
            mix=mix,
        )
