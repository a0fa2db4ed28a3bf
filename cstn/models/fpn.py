"""Neck of the CSTN model: an extra 3x3 conv + BatchNorm after the last stage, then an FPN.

Paper §IV-A: "removed the last average pooling and fully connected layer and added an additional
convolution (3x3, padding 1) and batch norm"; the feature pyramid is built over the last two
stages (P4 at stride 16 from ``layer3``, P5 at stride 32 from the extra layer) with
:class:`torchvision.ops.FeaturePyramidNetwork`'s layers (1x1 inner convs, 3x3 output convs).

Where this departs from torchvision's FPN, and from the authors' code (``model_multiscale.py``):

* ``upsample`` (``model.fpn_upsample``), how P5 reaches P4 on the top-down path.
  ``aligned`` (default): P4 cell ``i`` reads P5 at exactly ``i / 2`` (bilinear), which is where a
  ResNet's stride-2 layers centre it, so both paths of P4 look at the same pixels
  (:func:`cstn.models.geometry.derive_cell_maps`). torchvision's ``nearest`` reads
  ``floor(i / 2)`` and the authors' ``bilinear`` (``align_corners=False``) ``i/2 - 1/4``: their
  top-down path centres 8 px up-left of the lateral path at P4. A receptive-field probe of
  ResNet-50 at 512 px put P4's centre 9.5 px off with ``nearest`` and on it with ``aligned``.
  ``nearest`` is what checkpoints written before this option used.
* ``extra_relu`` (``model.extra_relu``): a ReLU after the extra conv-BN pair (default; a conv-BN
  pair in a ResNet has one). The authors feed the BN output straight to the FPN: ``false``.
* ``p5_smooth`` (``model.p5_smooth``): the 3x3 output conv on P5 (torchvision's FPN, default).
  The authors use the 1x1 inner conv's output as P5 and smooth only P4: ``false``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

__all__ = ["PyramidNeck", "UPSAMPLES", "upsample_aligned"]

UPSAMPLES = ("aligned", "nearest", "bilinear")


def upsample_aligned(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """2x bilinear upsampling that maps output cell ``i`` to input cell ``i / 2`` exactly.

    Args:
        x: (B, P, h, w) coarse map.
        size: the fine map's ``(H, W)``, each ``2 n - 1`` or ``2 n`` for a coarse side ``n`` (as a
            padded stride-2 layer makes them).
    Returns:
        (B, P, H, W). ``interpolate(align_corners=True)`` to ``2 n - 1`` puts output ``i`` at
        input ``i (n - 1) / (2 n - 2) = i / 2``; an even ``H`` repeats the last row (the clamped
        read at ``n - 1/2``).
    """
    (h, w), (out_h, out_w) = x.shape[-2:], size
    for fine, coarse in ((out_h, h), (out_w, w)):
        if fine not in (2 * coarse - 1, 2 * coarse):
            raise ValueError(f"aligned upsampling: a side of {coarse} cells cannot become {fine} (2n-1 or 2n)")
    up = F.interpolate(x, size=(2 * h - 1, 2 * w - 1), mode="bilinear", align_corners=True)
    return F.pad(up, (0, out_w - (2 * w - 1), 0, out_h - (2 * h - 1)), mode="replicate")


class _FPN(FeaturePyramidNetwork):
    """torchvision's FPN (same layers and parameter names) with a choice of top-down upsampling
    and an optional P5 output conv."""

    def __init__(self, in_channels_list: list[int], out_channels: int, upsample: str, top_smooth: bool):
        super().__init__(in_channels_list, out_channels)
        self.upsample = upsample
        if not top_smooth:
            self.layer_blocks[-1] = nn.Identity()

    def _up(self, x: torch.Tensor, size) -> torch.Tensor:
        if self.upsample == "aligned":
            return upsample_aligned(x, tuple(size))
        if self.upsample == "nearest":
            return F.interpolate(x, size=size, mode="nearest")
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def forward(self, x: "OrderedDict[str, torch.Tensor]") -> "OrderedDict[str, torch.Tensor]":
        names, feats = list(x.keys()), list(x.values())
        last_inner = self.inner_blocks[-1](feats[-1])
        results = [self.layer_blocks[-1](last_inner)]
        for idx in range(len(feats) - 2, -1, -1):
            lateral = self.inner_blocks[idx](feats[idx])
            last_inner = lateral + self._up(last_inner, lateral.shape[-2:])
            results.insert(0, self.layer_blocks[idx](last_inner))
        return OrderedDict(zip(names, results))


class PyramidNeck(nn.Module):
    """``forward(c4, c5) -> {level: (B, P, H_s, W_s)}`` for the requested levels (4 and/or 5).

    Args:
        in_channels: channels of ``c4`` (stride 16) and ``c5`` (stride 32).
        out_channels: P, channels of every pyramid level.
        levels: the levels to return; when only 5 is asked for, the FPN is built over ``c5`` alone
            (the top-down path does not reach P5 anyway).
        upsample, extra_relu, p5_smooth: see the module docstring.
    """

    def __init__(self, in_channels: tuple[int, int], out_channels: int, levels: list[int],
                 upsample: str = "aligned", extra_relu: bool = True, p5_smooth: bool = True):
        super().__init__()
        if upsample not in UPSAMPLES:
            raise ValueError(f"model.fpn_upsample={upsample!r} must be one of {list(UPSAMPLES)}")
        c4_channels, c5_channels = in_channels
        self.levels = sorted(levels)
        self.upsample = upsample
        extra = [nn.Conv2d(c5_channels, c5_channels, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(c5_channels)]
        self.extra = nn.Sequential(*extra, *([nn.ReLU(inplace=True)] if extra_relu else []))
        self.uses_c4 = 4 in self.levels
        in_list = [c4_channels, c5_channels] if self.uses_c4 else [c5_channels]
        self.fpn = _FPN(in_list, out_channels, upsample, top_smooth=p5_smooth)

    def forward(self, c4: torch.Tensor, c5: torch.Tensor) -> dict[int, torch.Tensor]:
        inputs = OrderedDict()
        if self.uses_c4:
            inputs["4"] = c4
        inputs["5"] = self.extra(c5)
        pyramid = self.fpn(inputs)
        return {level: pyramid[str(level)] for level in self.levels}
