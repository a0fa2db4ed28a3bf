"""Neck of the CSTN model: an extra 3x3 conv + BatchNorm after the last stage, then an FPN.

Paper §IV-A: "removed the last average pooling and fully connected layer and added an additional
convolution (3x3, padding 1) and batch norm"; the feature pyramid is built over the last two
stages (P4 at stride 16 from ``layer3``, P5 at stride 32 from the extra layer) with
:class:`torchvision.ops.FeaturePyramidNetwork`. The extra layer keeps the last stage's channel
count and is followed by a ReLU (the paper does not say; a conv-BN pair in a ResNet has one).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

__all__ = ["PyramidNeck"]


class PyramidNeck(nn.Module):
    """``forward(c4, c5) -> {level: (B, P, H_s, W_s)}`` for the requested levels (4 and/or 5).

    Args:
        in_channels: channels of ``c4`` (stride 16) and ``c5`` (stride 32).
        out_channels: P, channels of every pyramid level.
        levels: the levels to return; when only 5 is asked for, the FPN is built over ``c5`` alone
            (the top-down path does not reach P5 anyway).
    """

    def __init__(self, in_channels: tuple[int, int], out_channels: int, levels: list[int]):
        super().__init__()
        c4_channels, c5_channels = in_channels
        self.levels = sorted(levels)
        self.extra = nn.Sequential(
            nn.Conv2d(c5_channels, c5_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(c5_channels),
            nn.ReLU(inplace=True),
        )
        self.uses_c4 = 4 in self.levels
        in_list = [c4_channels, c5_channels] if self.uses_c4 else [c5_channels]
        self.fpn = FeaturePyramidNetwork(in_list, out_channels)

    def forward(self, c4: torch.Tensor, c5: torch.Tensor) -> dict[int, torch.Tensor]:
        inputs = OrderedDict()
        if self.uses_c4:
            inputs["4"] = c4
        inputs["5"] = self.extra(c5)
        pyramid = self.fpn(inputs)
        return {level: pyramid[str(level)] for level in self.levels}
