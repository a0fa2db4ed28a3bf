"""torchvision ResNet trunks (no avgpool / fc), optional channel width, local weights only.

``resnet10`` is ``ResNet(BasicBlock, [1, 1, 1, 1])`` (the CPU demo backbone); ``resnet18/34/50/101``
are torchvision's layouts. Weights are read from a local file (a torchvision state dict, ``fc.*``
ignored) when given; nothing is ever downloaded. Without a file the trunk is randomly initialised
and one warning says that the paper's numbers assume ImageNet-pretrained weights.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["ResNetTrunk", "PixelNormaliser", "build_trunk", "load_trunk_weights", "LAYOUTS"]

LAYOUTS = {
    "resnet10": (BasicBlock, [1, 1, 1, 1]),
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
}

RANDOM_INIT_WARNING = ("no model.backbone_weights given: the backbone starts from random weights; "
                       "the paper's numbers assume ImageNet-pretrained weights")


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _out_channels(stage: nn.Sequential) -> int:
    last = stage[-1]
    return (last.bn3 if isinstance(last, Bottleneck) else last.bn2).num_features


class ResNetTrunk(ResNet):
    """A torchvision ResNet without ``avgpool``/``fc`` whose stage widths are scaled by ``width``.

    The parameter names are torchvision's (``conv1``, ``bn1``, ``layer1`` ... ``layer4``), so
    torchvision state dicts load directly at ``width=1``. ``forward(x)`` returns the outputs of
    ``layer3`` (stride 16) and ``layer4`` (stride 32, or 16 when ``last_stride=1``).

    Args:
        block, layers: torchvision block type and blocks per stage.
        width: multiplier of every stage's channels (stem 64, stages 64/128/256/512 planes).
        last_stride: 2 (standard) or 1 (``layer4`` keeps stride 16, no dilation; the CAM option of
            Choe et al., "Evaluating WSOL right").
    """

    def __init__(self, block, layers: list[int], width: float = 1.0, last_stride: int = 2):
        if width <= 0:
            raise ValueError(f"model.width={width} must be > 0")
        if last_stride not in (1, 2):
            raise ValueError(f"last stride {last_stride} must be 1 or 2")
        if width == 1.0:
            super().__init__(block, layers)
            del self.fc, self.avgpool
        else:
            # torchvision's constructor fixes the stem at 64 channels; build the same layout with scaled
            # widths through its own _make_layer and initialise as it does.
            nn.Module.__init__(self)
            self._norm_layer = nn.BatchNorm2d
            self.inplanes = _scaled(64, width)
            self.dilation, self.groups, self.base_width = 1, 1, 64
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(self.inplanes)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            planes = [_scaled(64 * 2 ** i, width) for i in range(4)]
            self.layer1 = self._make_layer(block, planes[0], layers[0])
            self.layer2 = self._make_layer(block, planes[1], layers[1], stride=2)
            self.layer3 = self._make_layer(block, planes[2], layers[2], stride=2)
            self.layer4 = self._make_layer(block, planes[3], layers[3], stride=2)
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(module, nn.BatchNorm2d):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)
        if last_stride == 1:
            first = self.layer4[0]
            (first.conv2 if isinstance(first, Bottleneck) else first.conv1).stride = (1, 1)
            if first.downsample is not None:
                first.downsample[0].stride = (1, 1)
        self.last_stride = last_stride
        self.channels = (_out_channels(self.layer3), _out_channels(self.layer4))
        """Output channels of ``layer3`` and ``layer4``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c4 = self.layer3(self.layer2(self.layer1(x)))
        return c4, self.layer4(c4)


def load_trunk_weights(trunk: nn.Module, path: str | Path) -> None:
    """Load a torchvision ResNet state dict from a local file into ``trunk`` (``fc.*`` dropped).

    Accepts a plain state dict or one under a ``state_dict``/``model`` key, with or without a
    ``module.`` prefix. Raises ValueError naming the file and the mismatching keys.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.backbone_weights: no such file: {path} (weights are never downloaded)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = trunk.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{path}: does not match the {type(trunk).__name__} backbone: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"wrong shape {wrong_shape[:5]} (check model.backbone and model.width)")
    trunk.load_state_dict(state)


def build_trunk(name: str, width: float = 1.0, weights: Optional[str] = None, last_stride: int = 2) -> ResNetTrunk:
    """The named trunk, with weights from ``weights`` (a local file) or random + one warning."""
    if name not in LAYOUTS:
        raise ValueError(f"model.backbone={name!r} is not one of {sorted(LAYOUTS)}")
    block, layers = LAYOUTS[name]
    trunk = ResNetTrunk(block, layers, width=width, last_stride=last_stride)
    if weights:
        load_trunk_weights(trunk, weights)
    else:
        warnings.warn(RANDOM_INIT_WARNING, stacklevel=2)
    return trunk


class PixelNormaliser(nn.Module):
    """``(images - 255 mean) / (255 std)`` with the config's RGB statistics as buffers.

    Input: (B, 3, H, W) uint8 RGB, or a float tensor on the same 0..255 scale (NOT 0..1).
    Output: the normalised images in the dtype of ``like`` (the first conv's weight), computed in
    float32 (float64 for a float64 model).
    """

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"data.mean={mean} and data.std={std} need 3 values each, std > 0")
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) RGB, got shape {tuple(images.shape)}")
        compute = torch.float64 if like.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=images.device.type, enabled=False):
            x = (images.to(compute) - self.pixel_mean.to(compute)) / self.pixel_std.to(compute)
        return x.to(like.dtype)
