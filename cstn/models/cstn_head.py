"""The per-level head: convolutional STN (paper §III-C) or the plain-conv baseline (Table II).

One level, feature map ``f`` (B, P, H, W):

1. ``theta = identity + loc(f)``, ``loc = conv1x1(relu(conv_kxk(f)))`` (or the authors' two k x k
   convs, :class:`LocalisationNet`); the last conv starts at zero, so training starts from the
   identity. The k x k conv has the head's padding, so theta lives on the head's output grid and
   reads exactly the location's reference window.
2. The k x k filter bank is applied at the window's taps moved by theta (bilinear sampling,
   zeros outside the map; see :mod:`cstn.models.geometry` for the coordinates), then ReLU and a
   1x1 conv to the classes (per level, or one shared by all levels as in the authors' code):
   logits (B, C, H', W').

Sampling implementations (``model.head_impl``), equal up to float rounding (tests hold them equal
in float64, forward and backward):

* ``reference``: one :func:`torch.nn.functional.grid_sample` gathers the k x k taps of every
  location into a (B, P, H' k, W' k) map, a stride-k conv applies the filter bank. Readable.
* ``im2col``: one ``grid_sample`` gathers the moved taps directly as im2col columns
  (B, P, H' W', k^2), one GEMM applies the filter bank: the deformable-conv algorithm in PyTorch
  ops (multi-threaded on CPU, any dtype).
* ``deform``: :func:`torchvision.ops.deform_conv2d` with per-tap offsets that are a fixed linear
  function of ``theta - identity`` (zero offsets = plain conv).
* ``project``: the filter bank's k^2 taps are applied first as one 1x1 conv (P -> k^2 Q
  channels over the whole map), then each tap's Q-channel projection is sampled at its own point
  and the k^2 samples are summed. Cheap when the output grid is as large as the map (padding
  ``(k-1)/2``) and Q is small; costly without padding (the projection covers all H W cells).
* ``fast``: the one measured fastest by ``bench/head.py`` on CPU: ``im2col``. (In head-only
  measurements here torchvision's CPU ``deform_conv2d``, which loops single-threaded, was 3-7x
  slower than ``im2col``; ``project`` projects all H W cells, 6x the conv's work at k = 13 on a
  20 x 20 P4 without padding; ``reference``'s stride-k conv was slower than one GEMM.)

Tap positions and bilinear sampling are computed in float32 (float64 for a float64 model) also
under autocast and with bf16 weights; the filter-bank product then runs in the autocast or weight
precision. No GPU was available to measure ``deform`` there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import deform_conv2d

from .geometry import half_span, identity_theta, offset_basis, output_grid_size, tap_offsets, theta_to_offsets

__all__ = ["LevelHead", "LocalisationNet", "sample_conv", "SAMPLERS", "LOC_NETS"]

FAST_IMPL = "im2col"
LOC_NETS = ("kxk_1x1", "authors")


def _tap_positions(size: int, out_size: int, kernel_size: int, padding: int, like: torch.Tensor) -> torch.Tensor:
    """Regular (identity) tap positions along one axis, cell-edge coordinates: (out_size, k)."""
    centres = torch.arange(out_size, dtype=like.dtype, device=like.device) - padding + kernel_size / 2
    return centres[:, None] + tap_offsets(kernel_size, dtype=like.dtype, device=like.device)[None, :]


def _normalise(position: torch.Tensor, size: int) -> torch.Tensor:
    """Cell-edge coordinate -> ``grid_sample`` coordinate (``align_corners=False``)."""
    return position * (2.0 / size) - 1.0


def _sampling_grid(features: torch.Tensor, offsets: torch.Tensor, k: int, padding: int, out_h: int,
                   out_w: int) -> torch.Tensor:
    """Where every tap of every output location samples, as ``grid_sample`` coordinates.

    Returns (B, k_a, k_b, H', W', 2): (x, y) in [-1, 1] of tap (a, b) at output (i, j), i.e. the
    regular tap position of the reference window moved by the offsets derived from theta.
    """
    height, width = features.shape[-2:]
    rows = _tap_positions(height, out_h, k, padding, features)                     # (H', k_a)
    cols = _tap_positions(width, out_w, k, padding, features)                      # (W', k_b)
    moved = offsets.view(features.shape[0], k, k, 2, out_h, out_w)
    y = rows.t()[None, :, None, :, None] + moved[:, :, :, 0]                       # (B, k_a, k_b, H', W')
    x = cols.t()[None, None, :, None, :] + moved[:, :, :, 1]
    return torch.stack([_normalise(x, width), _normalise(y, height)], dim=-1)


def _full_precision(tensor: torch.Tensor) -> torch.Tensor:
    """float32 for half/bfloat16 tensors; float32 and float64 pass unchanged."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def _like_weight(columns: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Sampled taps (full precision) cast to a half/bfloat16 weight's dtype for the filter-bank product.

    With float32 weights nothing changes: under autocast the product itself runs in bf16/fp16.
    """
    return columns if weight.dtype in (torch.float32, torch.float64) else columns.to(weight.dtype)


def sample_conv_reference(features: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None, padding: int) -> torch.Tensor:
    """Readable form: gather the moved taps with ``grid_sample``, then a stride-k conv.

    Args:
        features: (B, P, H, W).
        offsets: (B, 2 k^2, H', W') per-tap ``(dy, dx)`` in cells (see ``theta_to_offsets``).
        weight: (Q, P, k, k) filter bank; bias: (Q,) or None.
        padding: the window padding p (cells).
    Returns:
        (B, Q, H', W').
    """
    batch, _, height, width = features.shape
    k = weight.shape[-1]
    out_h, out_w = output_grid_size(height, width, k, padding)
    rows = _tap_positions(height, out_h, k, padding, features)            # (H', k): [i, a]
    cols = _tap_positions(width, out_w, k, padding, features)             # (W', k): [j, b]
    moved = offsets.view(batch, k, k, 2, out_h, out_w)                    # [b, a, b', (dy, dx), i, j]
    dy = moved[:, :, :, 0].permute(0, 3, 1, 4, 2)                         # (B, H', k_a, W', k_b)
    dx = moved[:, :, :, 1].permute(0, 3, 1, 4, 2)
    y = rows[None, :, :, None, None] + dy
    x = cols[None, None, None, :, :] + dx
    grid = torch.stack([_normalise(x, width), _normalise(y, height)], dim=-1)
    grid = grid.reshape(batch, out_h * k, out_w * k, 2)
    taps = F.grid_sample(_full_precision(features), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return F.conv2d(_like_weight(taps, weight), weight, bias, stride=k)


def sample_conv_im2col(features: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None, padding: int) -> torch.Tensor:
    """Deformable im2col with PyTorch ops: one ``grid_sample`` gathers every location's k^2 moved taps
    as columns (B, P, L, k^2), then one GEMM with the filter bank (same arguments as the reference).
    """
    batch, channels, height, width = features.shape
    out_channels, _, k, _ = weight.shape
    out_h, out_w = output_grid_size(height, width, k, padding)
    grid = _sampling_grid(features, offsets, k, padding, out_h, out_w)            # (B, k_a, k_b, H', W', 2)
    grid = grid.permute(0, 3, 4, 1, 2, 5).reshape(batch, out_h * out_w, k * k, 2)
    taps = F.grid_sample(_full_precision(features), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    columns = _like_weight(taps.permute(0, 2, 1, 3).reshape(batch * out_h * out_w, channels * k * k), weight)
    filters = weight.reshape(out_channels, channels * k * k).t()
    out = columns @ filters if bias is None else torch.addmm(bias, columns, filters)
    return out.view(batch, out_h, out_w, out_channels).permute(0, 3, 1, 2)


def sample_conv_deform(features: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None, padding: int) -> torch.Tensor:
    """:func:`torchvision.ops.deform_conv2d` with the theta offsets (same arguments as the reference).

    Runs in float32 for half/bfloat16 inputs (no such CPU kernel) and returns float32.
    """
    with torch.autocast(device_type=features.device.type, enabled=False):
        return deform_conv2d(_full_precision(features), _full_precision(offsets), _full_precision(weight),
                             None if bias is None else _full_precision(bias), padding=(padding, padding))


def sample_conv_project(features: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None, padding: int) -> torch.Tensor:
    """Project channels first (one 1x1 conv per tap), sample each tap's projection, sum the taps."""
    batch, channels, height, width = features.shape
    out_channels, _, k, _ = weight.shape
    out_h, out_w = output_grid_size(height, width, k, padding)
    per_tap = weight.permute(2, 3, 0, 1).reshape(k * k * out_channels, channels, 1, 1)   # tap-major
    projected = F.conv2d(features, per_tap).view(batch * k * k, out_channels, height, width)
    grid = _sampling_grid(features, offsets, k, padding, out_h, out_w)            # (B, k_a, k_b, H', W', 2)
    grid = grid.reshape(batch * k * k, out_h, out_w, 2)
    sampled = F.grid_sample(_full_precision(projected), grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)
    out = sampled.view(batch, k * k, out_channels, out_h, out_w).sum(1)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


SAMPLERS = {
    "reference": sample_conv_reference,
    "im2col": sample_conv_im2col,
    "deform": sample_conv_deform,
    "project": sample_conv_project,
}


def sample_conv(impl: str, features, offsets, weight, bias, padding):
    """Dispatch to one implementation; ``fast`` is :data:`FAST_IMPL`."""
    impl = FAST_IMPL if impl == "fast" else impl
    if impl not in SAMPLERS:
        raise ValueError(f"unknown head implementation {impl!r}; choose one of {['fast', *SAMPLERS]}")
    return SAMPLERS[impl](features, offsets, weight, bias, padding)


class LocalisationNet(nn.Module):
    """Predicts ``theta - identity`` per output location (B, 6, H', W'), entries ``theta00, theta01,
    theta02, theta10, theta11, theta12``; its last conv starts at zero, so training starts from the
    identity. Two forms (``model.loc_net``):

    * ``kxk_1x1`` (default): k x k conv with the head's padding -> ReLU -> 1x1 conv (with bias):
      theta reads exactly the location's k x k reference window.
    * ``authors`` (``Conv2d_STN`` of the authors' ``temp.py``): k x k conv with "same" padding
      ``(k-1)/2`` -> ReLU -> k x k conv with the head's padding (the authors': none), no bias:
      theta reads 2k - 1 cells. Needs an odd k (symmetric "same" padding).
    """

    def __init__(self, in_channels: int, hidden: int, kernel_size: int, padding: int, style: str = "kxk_1x1"):
        super().__init__()
        if style == "kxk_1x1":
            self.read = nn.Conv2d(in_channels, hidden, kernel_size, padding=padding)
            self.to_theta = nn.Conv2d(hidden, 6, 1)
            nn.init.zeros_(self.to_theta.bias)
        elif style == "authors":
            if kernel_size % 2 == 0:
                raise ValueError(f"model.loc_net='authors' needs odd window sizes (same padding), got k={kernel_size}")
            self.read = nn.Conv2d(in_channels, hidden, kernel_size, padding=(kernel_size - 1) // 2)
            self.to_theta = nn.Conv2d(hidden, 6, kernel_size, padding=padding, bias=False)
        else:
            raise ValueError(f"model.loc_net={style!r} must be one of {list(LOC_NETS)}")
        nn.init.zeros_(self.to_theta.weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.to_theta(F.relu(self.read(features)))


class LevelHead(nn.Module):
    """Head of one pyramid level: k x k filter bank (moved by theta or not) -> ReLU -> 1x1 to classes.

    Args:
        in_channels: P, the FPN channels.
        head_channels: Q, channels of the k x k filter bank.
        num_classes: C; None leaves the 1x1 class conv out (``model.shared_classifier``: the model
            applies one class conv to every level) and ``forward`` returns the (B, Q, H', W')
            post-ReLU filter-bank features instead of logits.
        kernel_size, padding: window size k and zero padding p (cells).
        loc_hidden: hidden channels of the localisation net.
        transform: True for the CSTN head, False for the plain-conv baseline (theta = identity,
            no localisation net).
        impl: ``fast``, ``reference``, ``im2col``, ``deform`` or ``project`` (ignored without transform).
        window_span: ``cells`` or ``taps``: the unit of theta's translation (see
            :func:`cstn.models.geometry.half_span`).
        loc_net: ``kxk_1x1`` or ``authors`` (see :class:`LocalisationNet`).

    ``forward(features (B, P, H, W))`` returns ``logits`` (B, C, H', W') and ``theta`` (B, H' W', 2, 3)
    (row-major over the output grid; the identity without transform).
    """

    def __init__(self, in_channels: int, head_channels: int, num_classes: int | None, kernel_size: int,
                 padding: int, loc_hidden: int, transform: bool = True, impl: str = "fast",
                 window_span: str = "cells", loc_net: str = "kxk_1x1"):
        super().__init__()
        if kernel_size < 1 or padding < 0:
            raise ValueError(f"kernel size {kernel_size} must be >= 1 and padding {padding} >= 0")
        if impl != "fast" and impl not in SAMPLERS:
            raise ValueError(f"unknown head implementation {impl!r}; choose one of {['fast', *SAMPLERS]}")
        self.kernel_size = kernel_size
        self.padding = padding
        self.transform = transform
        self.impl = impl
        self.half_span = half_span(kernel_size, window_span)
        self.filter_bank = nn.Conv2d(in_channels, head_channels, kernel_size, padding=padding)
        self.classifier = nn.Conv2d(head_channels, num_classes, 1) if num_classes is not None else None
        self.loc = LocalisationNet(in_channels, loc_hidden, kernel_size, padding, loc_net) if transform else None
        self.register_buffer("basis", offset_basis(kernel_size, half=self.half_span).float(), persistent=False)
        self.register_buffer("identity", identity_theta(dtype=torch.float32).reshape(1, 6, 1, 1).clone(),
                             persistent=False)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, padding={self.padding}, transform={self.transform}, "
                f"impl={self.impl}, half_span={self.half_span}")

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, _, height, width = features.shape
        out_h, out_w = output_grid_size(height, width, self.kernel_size, self.padding)
        if out_h < 1 or out_w < 1:
            raise ValueError(
                f"a {self.kernel_size}x{self.kernel_size} window with padding {self.padding} does not fit the "
                f"{height}x{width} feature map: use a larger data.image_size or smaller model.kernel_sizes")
        if self.loc is None:
            hidden = self.filter_bank(features)
            theta = identity_theta(batch, out_h * out_w, dtype=torch.float32, device=features.device)
        else:
            residual = _full_precision(self.loc(features))                 # (B, 6, H', W')
            # Tap positions and bilinear sampling stay in float32 under autocast and with bf16
            # weights (bf16 positions would be off by up to ~0.05 cell); the filter-bank product
            # that follows runs in the autocast / weight precision.
            with torch.autocast(device_type=features.device.type, enabled=False):
                offsets = theta_to_offsets(residual, self.basis.to(residual.dtype))
            hidden = sample_conv(self.impl, features, offsets, self.filter_bank.weight, self.filter_bank.bias,
                                 self.padding)
            theta = residual + self.identity.to(residual.dtype)
            theta = theta.flatten(2).transpose(1, 2).reshape(batch, -1, 2, 3)
        if self.classifier is None:
            return F.relu(hidden), theta
        logits = self.classifier(F.relu(_like_weight(hidden, self.classifier.weight)))
        return logits, theta
