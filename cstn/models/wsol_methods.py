"""The paper's comparison methods (Tables IV and V) as CAM-family models on the same ResNet trunks.

Every model here returns ``ModelOutput(kind="cam")``: class scores for training and per-class maps
for the evaluator (threshold boxes, MaxBoxAccV2), exactly like :class:`~cstn.models.cam.CAMModel`.
What differs is training only:

==========  ====================================================================================
``has``     Hide-and-Seek (Singh & Lee, ICCV 2017): the normalised input is cut into a
            ``has_grid`` x ``has_grid`` grid and each cell is hidden (set to the dataset mean, i.e.
            0 after normalisation) with probability ``has_hide_prob``.
``acol``    ACoL (Zhang et al., CVPR 2018): classifier A on the features; the features where A's map
            of the true class (min-max normalised per image) is >= ``acol_threshold`` are erased
            and classifier B learns from the rest. Loss CE(A) + CE(B); the evaluated map is the
            element-wise max of both branches' min-max normalised maps (B erases with the top-1
            class at inference); class scores are A's.
``spg``     SPG (Zhang et al., ECCV 2018): self-produced guidance. The classifier's normalised map
            of the true class gives a mask (foreground >= high, background < low, the rest ignored)
            that supervises side branch B2 on ``layer3``; B2's own map guides B1 (``layer3``), and
            the mean of both guides C (``layer4``). Loss CE + three masked BCE terms; thresholds
            ``spg_thresholds`` = (h1, l1, h2, l2, h3, l3). The evaluated map is the classifier's.
``adl``     ADL (Choe & Shim, CVPR 2019): after ``layer3`` and ``layer4``, the self-attention
            map (channel mean) gives a drop mask (0 where attention >= ``adl_gamma`` x its
            maximum) and an importance map (its sigmoid); in training one of them, the drop mask
            with probability ``adl_drop_rate``, multiplies the features. Identity at inference.
``cutmix``  CutMix (Yun et al., ICCV 2019): with probability ``cutmix_prob`` a box of area
            ``1 - lam`` (``lam ~ Beta(cutmix_beta, cutmix_beta)``) is pasted from another image of
            the batch; the loss mixes the two labels by the pasted area.
==========  ====================================================================================

The random draws use torch's global generator (seeded per rank by the trainer and saved in its
checkpoints), so a resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .cam import CAMModel, cam_output
from .output import ModelOutput

__all__ = ["hide_patches", "cutmix_images", "erase_confident", "guidance_mask", "masked_bce", "ADLayer",
           "normalise_maps", "check_input_method", "apply_input_method", "HaSModel", "ACoLModel", "SPGModel", "ADLModel", "CutMixModel", "METHODS"]


def _check_fraction(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{key}={value} must lie in [0, 1]")


def _check_has(grid: int, hide_prob: float) -> None:
    if grid < 1:
        raise ValueError(f"model.has_grid={grid} must be >= 1")
    _check_fraction("model.has_hide_prob", hide_prob)


def _check_cutmix(beta: float, prob: float) -> None:
    if beta <= 0:
        raise ValueError(f"model.cutmix_beta={beta} must be > 0")
    _check_fraction("model.cutmix_prob", prob)


def _check_guidance(high: float, low: float) -> None:
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"SPG thresholds need 0 <= low ({low}) <= high ({high}) <= 1 (model.spg_thresholds)")


# ---------------------------------------------------------------------------
# The distinctive operations, each usable and tested on its own
# ---------------------------------------------------------------------------

def hide_patches(images: torch.Tensor, grid: int, hide_prob: float,
                 generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hide-and-Seek: hide whole grid cells.

    Args:
        images: (B, 3, H, W) float normalised images (0 is the dataset mean).
        grid: cells per side; pixel row r lies in cell row ``r * grid // H`` (the same for columns), so every
            pixel belongs to exactly one cell.
        hide_prob: probability that a cell is hidden, drawn independently per image and cell.
    Returns:
        The images with hidden cells set to 0 (a new tensor), and the (B, grid, grid) bool mask of
        hidden cells.
    """
    _check_has(grid, hide_prob)
    b, _, h, w = images.shape
    hidden = torch.rand((b, grid, grid), generator=generator, device=images.device) < hide_prob
    rows = (torch.arange(h, device=images.device) * grid) // h        # cell row of every pixel row
    cols = (torch.arange(w, device=images.device) * grid) // w
    pixel_hidden = hidden[:, rows][:, :, cols]                        # (B, H, W)
    return images.masked_fill(pixel_hidden[:, None], 0.0), hidden


def cutmix_images(images: torch.Tensor, beta: float, prob: float):
    """CutMix: paste a random box of a shuffled copy of the batch (torch's global generator).

    Args:
        images: (B, 3, H, W) float.
        beta: parameter of the Beta(beta, beta) law of ``lam``.
        prob: probability that the batch is mixed at all.
    Returns:
        ``(mixed, perm, lam, box)``: ``mixed`` (B, 3, H, W); ``perm`` (B,) int64, the image each one
        took its patch from; ``lam`` the fraction of pixels kept from the image itself (float,
        computed from the clipped box); ``box`` ``(x0, y0, x1, y1)`` ints, input pixels, exclusive
        ends. When the batch is not mixed: the input itself, None, 1.0 and None.
    """
    _check_cutmix(beta, prob)
    if float(torch.rand(())) >= prob:
        return images, None, 1.0, None
    b, _, h, w = images.shape
    lam = float(torch.distributions.Beta(float(beta), float(beta)).sample())
    cut = (1.0 - lam) ** 0.5
    cut_h, cut_w = int(h * cut), int(w * cut)
    cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    perm = torch.randperm(b).to(images.device)
    mixed = images.clone()
    mixed[:, :, y0:y1, x0:x1] = images[perm, :, y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    return mixed, perm, lam, (x0, y0, x1, y1)


def check_input_method(method: str, options: dict) -> None:
    """Validate the settings of an input-side method (``has``: ``grid``, ``hide_prob``; ``cutmix``:
    ``beta``, ``prob``), naming the config key of a bad value."""
    if method == "has":
        _check_has(options["grid"], options["hide_prob"])
    elif method == "cutmix":
        _check_cutmix(options["beta"], options["prob"])
    else:
        raise ValueError(f"unknown input method {method!r} (has or cutmix)")


def apply_input_method(method: str, x: torch.Tensor, options: dict) -> tuple[torch.Tensor, Optional[tuple]]:
    """A training batch through Hide-and-Seek or CutMix: the new batch and CutMix's label mix
    ``(perm, lam)`` for :class:`ModelOutput` (None when nothing is mixed). Used by the CAM-family
    models below and by the CSTN model's ``model.input_method``."""
    if method == "has":
        return hide_patches(x, options["grid"], options["hide_prob"])[0], None
    if method == "cutmix":
        x, perm, lam, _ = cutmix_images(x, options["beta"], options["prob"])
        return x, None if perm is None else (perm, lam)
    raise ValueError(f"unknown input method {method!r} (has or cutmix)")


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each (h, w) map of (B, K, h, w) to [0, 1] (a constant map becomes 0)."""
    low = maps.amin(dim=(2, 3), keepdim=True)
    span = maps.amax(dim=(2, 3), keepdim=True) - low
    return (maps - low) / span.clamp_min(1e-12)


def erase_confident(features: torch.Tensor, attention: torch.Tensor, threshold: float) -> torch.Tensor:
    """ACoL's erasing: zero ``features`` (B, K, h, w) where ``attention`` (B, 1, h, w), already in
    [0, 1], is >= ``threshold``."""
    _check_fraction("model.acol_threshold", threshold)
    return features * (attention < threshold).to(features.dtype)


def guidance_mask(attention: torch.Tensor, high: float, low: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SPG's self-produced guidance from a (B, 1, h, w) map in [0, 1].

    Foreground (1) where ``attention >= high``, background (0) where ``attention < low``, the rest
    ignored. An image with no foreground pixel takes its maximum as foreground, so every image gives
    a positive seed. Returns ``(target, valid)``, both (B, 1, h, w) float.
    """
    _check_guidance(high, low)
    foreground = attention >= high
    peak = attention >= attention.amax(dim=(2, 3), keepdim=True)
    foreground = torch.where(foreground.flatten(1).any(1)[:, None, None, None], foreground, peak)
    background = (attention < low) & ~foreground
    return foreground.to(attention.dtype), (foreground | background).to(attention.dtype)


def masked_bce(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over the valid pixels only (mean); 0 when none is valid."""
    logits = logits.float()
    if logits.shape[-2:] != target.shape[-2:]:
        target = F.interpolate(target, size=logits.shape[-2:], mode="nearest")
        valid = F.interpolate(valid, size=logits.shape[-2:], mode="nearest")
    per_pixel = F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none")
    return (per_pixel * valid).sum() / valid.sum().clamp_min(1.0)


class ADLayer(nn.Module):
    """Attention-based dropout layer (no parameters, identity in eval mode).

    ``forward(x (B, K, h, w)) -> (B, K, h, w)``. In training, the attention map ``a`` = channel mean
    of ``x``; the drop mask is ``a < gamma * max(a)`` per image and the importance map is
    ``sigmoid(a)``. One draw per call picks the drop mask (probability ``drop_rate``) or the
    importance map, which multiplies every channel. The last draw is kept in ``last_choice``
    (``"drop"`` / ``"importance"``) for inspection.
    """

    def __init__(self, drop_rate: float, gamma: float):
        super().__init__()
        _check_fraction("model.adl_drop_rate", drop_rate)
        _check_fraction("model.adl_gamma", gamma)
        self.drop_rate, self.gamma = drop_rate, gamma
        self.last_choice: Optional[str] = None

    def drop_mask(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, h, w) 0/1 mask: 0 where the channel-mean attention is >= gamma x its per-image maximum."""
        attention = x.mean(dim=1, keepdim=True)
        limit = self.gamma * attention.amax(dim=(2, 3), keepdim=True)
        return (attention < limit).to(x.dtype)

    def importance_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, h, w) sigmoid of the channel-mean attention."""
        return torch.sigmoid(x.mean(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        use_drop = float(torch.rand(())) < self.drop_rate
        self.last_choice = "drop" if use_drop else "importance"
        return x * (self.drop_mask(x) if use_drop else self.importance_map(x))

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate}, gamma={self.gamma}"


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------

def _side_branch(in_channels: int, depth: int) -> nn.Sequential:
    """``depth`` 3x3 conv + ReLU layers then a 1x1 conv to one foreground logit per pixel."""
    hidden = max(8, in_channels // 2)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, padding=1), nn.ReLU(inplace=True)]
    layers.append(nn.Conv2d(hidden, 1, 1))
    return nn.Sequential(*layers)


class HaSModel(CAMModel):
    """CAM trained on inputs with randomly hidden grid cells (``model.has_grid``, ``model.has_hide_prob``)."""

    def __init__(self, *, grid: int, hide_prob: float, **cam):
        super().__init__(**cam)
        self.options = {"grid": grid, "hide_prob": hide_prob}
        check_input_method("has", self.options)

    def training_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return apply_input_method("has", x, self.options)


class CutMixModel(CAMModel):
    """CAM trained on CutMix batches; ``ModelOutput.mix = (perm, lam)`` tells the loss how to mix labels."""

    def __init__(self, *, beta: float, prob: float, **cam):
        super().__init__(**cam)
        self.options = {"beta": beta, "prob": prob}
        check_input_method("cutmix", self.options)

    def training_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[tuple]]:
        return apply_input_method("cutmix", x, self.options)


class ADLModel(CAMModel):
    """CAM with an :class:`ADLayer` at the end of ``layer3`` and of ``layer4`` (parameter names unchanged,
    so torchvision weights still load)."""

    def __init__(self, *, drop_rate: float, gamma: float, **cam):
        super().__init__(**cam)
        self.backbone.layer3.append(ADLayer(drop_rate, gamma))
        self.backbone.layer4.append(ADLayer(drop_rate, gamma))


class ACoLModel(CAMModel):
    """Two 1x1 class convs: A (``classifier``) on the features, B (``classifier_b``) on them with A's
    confident region erased (``model.acol_threshold``). Needs the labels in training; B's
    cross-entropy is returned in ``aux_losses["acol_b"]``."""

    def __init__(self, *, threshold: float, **cam):
        super().__init__(**cam)
        _check_fraction("model.acol_threshold", threshold)
        self.threshold = threshold
        self.classifier_b = nn.Conv2d(self.classifier.in_channels, self.classifier.out_channels, kernel_size=1)

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> ModelOutput:
        x = self.normaliser(images, like=self.backbone.conv1.weight)
        features = self.backbone(x)[1]
        maps_a = self.classifier(features)
        if self.training and labels is None:
            raise ValueError("ACoL needs the labels in training: call model(images, labels=labels)")
        guide = labels if self.training else maps_a.mean(dim=(2, 3)).argmax(1)
        guide = guide.to(maps_a.device).long().reshape(-1)
        attention = normalise_maps(maps_a.detach()[torch.arange(len(guide), device=guide.device), guide][:, None])
        maps_b = self.classifier_b(erase_confident(features, attention, self.threshold))
        if self.training:
            logits_b = maps_b.float().mean(dim=(2, 3))
            return cam_output(maps_a, aux_losses={"acol_b": F.cross_entropy(logits_b, guide)})
        # each branch's maps min-max normalised before the max, so neither branch's scale dominates
        return cam_output(torch.maximum(normalise_maps(maps_a), normalise_maps(maps_b)), score_maps=maps_a)


class SPGModel(CAMModel):
    """CAM with SPG's side branches B1, B2 (on ``layer3``) and C (on ``layer4``) trained on self-produced
    guidance masks (``model.spg_thresholds``). Needs the labels in training."""

    def __init__(self, *, thresholds: list[float], **cam):
        super().__init__(**cam)
        if len(thresholds) != 6:
            raise ValueError(f"model.spg_thresholds needs 6 values (h1, l1, h2, l2, h3, l3), got {list(thresholds)}")
        for high, low in zip(thresholds[0::2], thresholds[1::2]):
            _check_guidance(high, low)
        self.thresholds = [float(t) for t in thresholds]
        mid, last = self.backbone.channels
        self.branch_b1 = _side_branch(mid, 1)
        self.branch_b2 = _side_branch(mid, 2)
        self.branch_c = _side_branch(last, 1)

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> ModelOutput:
        x = self.normaliser(images, like=self.backbone.conv1.weight)
        c4, c5 = self.backbone(x)
        maps = self.classifier(c5)
        if not self.training:
            return cam_output(maps)
        if labels is None:
            raise ValueError("SPG needs the labels in training: call model(images, labels=labels)")
        labels = labels.to(maps.device).long().reshape(-1)
        h1, l1, h2, l2, h3, l3 = self.thresholds
        attention = normalise_maps(maps.detach()[torch.arange(len(labels), device=maps.device), labels][:, None])
        b1, b2, c = self.branch_b1(c4), self.branch_b2(c4), self.branch_c(c5)
        b2_map = torch.sigmoid(b2.detach().float())
        fused = (torch.sigmoid(b1.detach().float()) + b2_map) / 2
        aux = {
            "spg_b2": masked_bce(b2, *guidance_mask(_resize(attention, b2), h1, l1)),
            "spg_b1": masked_bce(b1, *guidance_mask(b2_map, h2, l2)),
            "spg_c": masked_bce(c, *guidance_mask(_resize(fused, c), h3, l3)),
        }
        return cam_output(maps, aux_losses=aux)


def _resize(maps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if maps.shape[-2:] == like.shape[-2:]:
        return maps
    return F.interpolate(maps, size=like.shape[-2:], mode="bilinear", align_corners=False)


METHODS = {"has": HaSModel, "acol": ACoLModel, "spg": SPGModel, "adl": ADLModel, "cutmix": CutMixModel}
"""``model.arch`` values of the comparison methods and their classes."""
