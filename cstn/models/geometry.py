"""Geometry of the convolutional STN: where cells look, reference windows, sampling offsets, boxes.

Coordinates (shared by the heads, the boxes and the tests):

* Input pixels are continuous: pixel ``n`` covers ``[n, n + 1)``. Boxes are ``xyxy`` in these
  coordinates, float32, clipped to the image.
* "Cell-edge coordinates" of a level measure positions in cells from the map's top-left corner:
  cell ``c`` spans ``[c, c + 1)``, its centre is ``c + 0.5``. The heads sample in these
  coordinates (``grid_sample`` with ``align_corners=False``).
* Where a cell looks is NOT "cell ``c`` covers pixels ``[t c, t (c + 1))``". In a torchvision
  ResNet every stride-2 layer has padding ``(k - 1) / 2`` and centres its output ``i`` on its
  input ``2 i``, so the receptive field of cell ``c`` of a stride-``t`` level is centred at pixel
  ``t c + 0.5``; the naive ``t (c + 0.5)`` puts every box ``t/2 - 0.5`` px (7.5 on P4, 15.5 on
  P5) right of and below what the window sees, and theta cannot undo it (it moves the sampling
  and the box together). :func:`derive_cell_maps` reads the map off the network itself
  (kernel sizes, strides, paddings and dilations of every conv and pool on each path, the FPN's
  upsampling) as a :class:`CellMap`; a receptive-field probe in ``tests/test_geometry.py``
  checks it against the gradient of the real network.
* A head with window ``k`` and zero padding ``p`` has an output grid of
  ``(H + 2p - k + 1) x (W + 2p - k + 1)`` locations, exactly like ``nn.Conv2d(k, padding=p)``.
  Output location ``(i, j)`` reads cells ``[j - p, j - p + k) x [i - p, i - p + k)``, centred at
  ``(j - p + k/2, i - p + k/2)`` (cell edges).
* ``theta`` of a location is a 2x3 affine map, rows ``[x; y]`` as in
  :func:`torch.nn.functional.affine_grid`: a point ``(u, v)`` of the normalised square
  ``[-1, 1]^2`` goes to ``centre + h * theta @ [u, v, 1]`` (cells), where the half span ``h``
  is :func:`half_span`: ``k/2`` (``window_span="cells"``: the square spans the window's k cells,
  this project's default) or ``(k - 1)/2`` (``"taps"``: it spans the k tap centres, the authors'
  ``affine_grid`` with ``align_corners=True``). Under the identity both put the k x k taps on the
  cell centres ``b + 0.5 - k/2`` (so the head is exactly a k x k convolution) and both give the
  same linear part; they differ in the unit of theta's translation (``h`` cells) and in the box.
* A location's box is the hull of its transformed corners (``u, v = +-1``), mapped to pixels by
  the level's :class:`CellMap`, clipped to the input image.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "CellMap", "derive_cell_maps", "trunk_cell_map", "path_map", "WINDOW_SPANS", "half_span", "output_grid_size", "tap_offsets",
    "window_centres", "reference_boxes", "transformed_boxes", "theta_to_offsets", "identity_theta",
    "offset_basis",
]

WINDOW_SPANS = ("cells", "taps")


# ---------------------------------------------------------------------------------------------
# Where cells look: the cell-to-pixel map, derived from the layers of the network
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CellMap:
    """Cell index -> input pixel of a level: the receptive field of cell ``c`` is centred at pixel
    ``stride * c + offset`` (continuous coordinates). ``top_down_gap`` is how far (px) the FPN's
    top-down path centres from the lateral path on this level: 0 when the upsampling is aligned.
    ``cell_size`` is the side (px) one cell of a window spans, the level's stride unless a
    correction moves only the centres (``launch/probe_cell_maps.py``)."""

    stride: float
    offset: float
    top_down_gap: float = 0.0
    cell_size: float | None = None

    @property
    def extent(self) -> float:
        """Pixels per cell of a window's extent."""
        return self.stride if self.cell_size is None else self.cell_size

    def from_edge(self, cells: torch.Tensor) -> torch.Tensor:
        """Cell-edge coordinates (cell ``c``'s centre at ``c + 0.5``) -> input pixels."""
        return (cells - 0.5) * self.stride + self.offset


def _single(value, what: str) -> float:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(set(values)) != 1:
        raise ValueError(f"{what}: a non-square setting {values} has no single cell map")
    return float(values[0])


def layer_map(module: nn.Module) -> tuple[float, float]:
    """``(a, b)``: output index ``i`` of ``module`` is centred on input index ``a i + b``.

    A conv or pool with kernel ``k``, stride ``s``, padding ``p`` and dilation ``d`` reads inputs
    ``s i - p + d [0 .. k-1]``, centred at ``s i - p + d (k - 1)/2``. Layers that keep positions
    (BatchNorm, ReLU, ...) are the identity ``(1, 0)``.
    """
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        name = type(module).__name__
        kernel = _single(module.kernel_size, f"{name} kernel_size")
        stride = _single(module.stride if module.stride is not None else module.kernel_size, f"{name} stride")
        padding = _single(module.padding, f"{name} padding")
        dilation = _single(getattr(module, "dilation", 1), f"{name} dilation")
        return stride, -padding + dilation * (kernel - 1) / 2
    return 1.0, 0.0


def _compose(outer: tuple[float, float], inner: tuple[float, float]) -> tuple[float, float]:
    """``outer`` maps the current index to the input; ``inner`` maps a new layer's output to the current index."""
    return outer[0] * inner[0], outer[0] * inner[1] + outer[1]


def path_map(module: nn.Module) -> tuple[float, float]:
    """The ``(a, b)`` map of a whole module: output index ``i`` -> input index ``a i + b``.

    Sequential containers compose their children in order; a ResNet block's main path is checked
    against its shortcut (``downsample`` or the identity), and a ValueError names the block when
    they centre differently (no single map would then describe it).
    """
    from torchvision.models.resnet import BasicBlock, Bottleneck

    if isinstance(module, (BasicBlock, Bottleneck)):
        convs = [module.conv1, module.conv2] + ([module.conv3] if isinstance(module, Bottleneck) else [])
        main = (1.0, 0.0)
        for conv in convs:
            main = _compose(main, layer_map(conv))
        skip = path_map(module.downsample) if module.downsample is not None else (1.0, 0.0)
        if not (math.isclose(main[0], skip[0]) and math.isclose(main[1], skip[1], abs_tol=1e-9)):
            raise ValueError(f"{type(module).__name__}: main path {main} and shortcut {skip} centre differently")
        return main
    children = list(module.children())
    if not children:
        return layer_map(module)
    total = (1.0, 0.0)
    for child in children:
        total = _compose(total, path_map(child))
    return total


UPSAMPLE_MAPS = {"aligned": (0.5, 0.0), "nearest": (0.5, -0.25), "bilinear": (0.5, -0.25)}
"""P4 index ``i`` -> P5 index read by the FPN's 2x upsampling: ``aligned`` reads exactly ``i / 2``;
``bilinear`` (``align_corners=False``, the authors') reads ``i/2 - 1/4`` at an exact factor 2, and
``nearest`` (torchvision's FPN) reads ``floor(i / 2)``, ``i/2 - 1/4`` on average."""


def trunk_cell_map(trunk: nn.Module) -> CellMap:
    """The :class:`CellMap` of a ResNet trunk's last stage (``layer4``), e.g. of CAM's class maps."""
    total = (1.0, 0.0)
    for module in (trunk.conv1, trunk.maxpool, trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4):
        total = _compose(total, path_map(module))
    return CellMap(stride=total[0], offset=total[1] + 0.5)


def derive_cell_maps(trunk: nn.Module, neck: nn.Module) -> dict[int, CellMap]:
    """Each pyramid level's :class:`CellMap`, read off the layers of ``trunk`` and ``neck``.

    Args:
        trunk: a :class:`cstn.models.backbone.ResNetTrunk` (``conv1, maxpool, layer1..layer4``).
        neck: a :class:`cstn.models.fpn.PyramidNeck` (``extra``, ``fpn``, ``upsample``, ``levels``).
    Returns:
        ``{level: CellMap}`` for the neck's levels. P5 follows ``layer4``, the extra conv and its
        FPN convs; P4 follows ``layer3`` and its FPN convs (the lateral path). P4's top-down path
        (P5's inner conv, then the upsampling) is derived too: with ``aligned`` upsampling both
        paths centre on the same pixel; otherwise their gap is ``CellMap.top_down_gap`` and one
        warning says so (boxes follow the lateral path; how much each path weighs depends on the
        trained weights, so no fixed map can serve both).
    """
    stem = (1.0, 0.0)
    for module in (trunk.conv1, trunk.maxpool, trunk.layer1, trunk.layer2):
        stem = _compose(stem, path_map(module))
    c4 = _compose(stem, path_map(trunk.layer3))
    c5 = _compose(c4, path_map(trunk.layer4))
    fpn = neck.fpn
    names = ["4", "5"] if neck.uses_c4 else ["5"]
    index = {name: i for i, name in enumerate(names)}
    p5_inner = _compose(_compose(c5, path_map(neck.extra)), path_map(fpn.inner_blocks[index["5"]]))
    maps = {5: _compose(p5_inner, path_map(fpn.layer_blocks[index["5"]]))}
    if neck.uses_c4:
        lateral = _compose(c4, path_map(fpn.inner_blocks[index["4"]]))
        top_down = _compose(p5_inner, UPSAMPLE_MAPS[neck.upsample])
        smooth = path_map(fpn.layer_blocks[index["4"]])
        lateral, top_down = _compose(lateral, smooth), _compose(top_down, smooth)
        gap = top_down[1] - lateral[1]
        if not math.isclose(lateral[0], top_down[0]):
            raise ValueError(f"P4's lateral path (stride {lateral[0]}) and top-down path (stride {top_down[0]}) differ")
        if abs(gap) > 1e-9:
            warnings.warn(f"model.fpn_upsample={neck.upsample!r}: P4's top-down path centres {gap:+.1f} px from its "
                          f"lateral path; boxes follow the lateral path ('aligned' removes the gap)", stacklevel=3)
        maps[4] = (*lateral, gap)
    # index -> pixel: input index n is the pixel [n, n + 1), centred at n + 0.5
    return {level: CellMap(stride=m[0], offset=m[1] + 0.5, top_down_gap=m[2] if len(m) > 2 else 0.0)
            for level, m in maps.items() if level in neck.levels}


# ---------------------------------------------------------------------------------------------
# Windows, taps and boxes
# ---------------------------------------------------------------------------------------------

def half_span(kernel_size: int, window_span: str = "cells") -> float:
    """Half side (cells) of the square that theta's ``[-1, 1]^2`` spans: ``k/2`` or ``(k-1)/2``."""
    if window_span == "cells":
        return kernel_size / 2
    if window_span == "taps":
        if kernel_size < 2:
            raise ValueError("model.window_span='taps' needs windows of at least 2 cells (k = 1 spans nothing)")
        return (kernel_size - 1) / 2
    raise ValueError(f"model.window_span={window_span!r} must be one of {list(WINDOW_SPANS)}")


def output_grid_size(height: int, width: int, kernel_size: int, padding: int) -> tuple[int, int]:
    """Output locations ``(H', W')`` of a level: ``H + 2p - k + 1`` (as a stride-1 conv)."""
    return height + 2 * padding - kernel_size + 1, width + 2 * padding - kernel_size + 1


def tap_offsets(kernel_size: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Offsets of the k sampling taps from the window centre, in cells: ``b + 0.5 - k/2``.

    Returns (k,) tensor, e.g. ``[-1, 0, 1]`` for k = 3 and ``[-0.5, 0.5]`` for k = 2.
    """
    return torch.arange(kernel_size, dtype=dtype, device=device) + 0.5 - kernel_size / 2


def window_centres(height: int, width: int, kernel_size: int, padding: int,
                   dtype=torch.float32, device=None) -> torch.Tensor:
    """Reference-window centres of every output location, in cell-edge coordinates.

    Args:
        height, width: feature map size (cells).
    Returns:
        (H' * W', 2) ``(x, y)`` centres, row-major over the output grid.
    """
    out_h, out_w = output_grid_size(height, width, kernel_size, padding)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"a {kernel_size}x{kernel_size} window with padding {padding} does not fit a "
                         f"{height}x{width} feature map")
    ys = torch.arange(out_h, dtype=dtype, device=device) - padding + kernel_size / 2
    xs = torch.arange(out_w, dtype=dtype, device=device) - padding + kernel_size / 2
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)


def _clip(boxes: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    height, width = image_hw
    x = boxes[..., 0::2].clamp(0, width)
    y = boxes[..., 1::2].clamp(0, height)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def reference_boxes(centres: torch.Tensor, half_size: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """Identity-theta boxes: ``centre +- half_size``, clipped.

    Args:
        centres: (L, 2) window centres in input pixels (see :meth:`CellMap.from_edge`).
        half_size: (L,) half window side in input pixels (``half_span * stride``).
        image_hw: input ``(height, width)`` in pixels.
    Returns:
        (L, 4) ``xyxy`` input pixels.
    """
    half = half_size[:, None]
    return _clip(torch.cat([centres - half, centres + half], dim=1), image_hw)


def transformed_boxes(theta: torch.Tensor, centres: torch.Tensor, half_size: torch.Tensor,
                      image_hw: tuple[int, int]) -> torch.Tensor:
    """Hull of each location's transformed window corners, clipped to the image.

    For corners ``u, v in {-1, 1}``: ``x = cx + h (theta00 u + theta01 v + theta02)``, so the hull is
    ``cx + h (theta02 -+ (|theta00| + |theta01|))`` and likewise for y.

    Args:
        theta: (B, L, 2, 3) affine maps (rows x, y).
        centres: (L, 2) window centres, input pixels.
        half_size: (L,) half span ``h``, input pixels.
        image_hw: input ``(height, width)``.
    Returns:
        (B, L, 4) ``xyxy`` input pixels, dtype of ``theta``.
    """
    half = half_size[None, :, None]                        # (1, L, 1)
    reach = theta[..., :2].abs().sum(-1)                   # (B, L, 2): x and y half extents (in spans)
    shift = theta[..., 2]                                  # (B, L, 2)
    centre = centres[None] + half * shift
    return _clip(torch.cat([centre - half * reach, centre + half * reach], dim=-1), image_hw)


def identity_theta(*shape: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The identity affine map expanded to ``(*shape, 2, 3)``."""
    eye = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=dtype, device=device)
    return eye.expand(*shape, 2, 3)


def offset_basis(kernel_size: int, dtype=torch.float64, half: float | None = None) -> torch.Tensor:
    """Linear map from ``theta - identity`` (6 numbers) to the k*k tap offsets.

    Tap ``b`` sits at ``o_b = b + 0.5 - k/2`` cells from the centre under the identity, i.e. at
    ``u_b = o_b / h`` in theta's square; theta moves it to ``h * (theta @ [u_a, u_b, 1])``, so
    the linear part acts on ``o`` whatever the span and the translation is in units of ``h``.

    Args:
        half: the half span ``h`` (:func:`half_span`); default ``k/2``.
    Returns:
        (2 k^2, 6) matrix; row ``2 t`` gives the y offset and row ``2 t + 1`` the x offset (cells)
        of tap ``t = a k + b`` (kernel row ``a``, column ``b``), the layout of
        :func:`torchvision.ops.deform_conv2d`. Columns follow ``theta.view(6)``:
        ``theta00, theta01, theta02, theta10, theta11, theta12``.
    """
    k = kernel_size
    off = tap_offsets(k, dtype=dtype)
    oy, ox = torch.meshgrid(off, off, indexing="ij")        # tap (a, b): oy = off[a], ox = off[b]
    ox, oy = ox.reshape(-1), oy.reshape(-1)
    unit = torch.full_like(ox, k / 2 if half is None else half)
    zero = torch.zeros_like(ox)
    dy = torch.stack([zero, zero, zero, ox, oy, unit], dim=1)   # theta10 u + theta11 v + theta12, scaled
    dx = torch.stack([ox, oy, unit, zero, zero, zero], dim=1)
    return torch.stack([dy, dx], dim=1).reshape(2 * k * k, 6)


def theta_to_offsets(theta_residual: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Sampling offsets (cells) of every tap from ``theta - identity``.

    Args:
        theta_residual: (B, 6, H', W') ``theta - identity`` per output location.
        basis: (2 k^2, 6) from :func:`offset_basis`.
    Returns:
        (B, 2 k^2, H', W') offsets, ``(dy, dx)`` per tap: the transformed tap position minus the
        regular (identity) one. Zero for the identity.
    """
    return torch.einsum("oc,bchw->bohw", basis.to(theta_residual.dtype), theta_residual)
