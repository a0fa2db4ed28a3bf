"""Geometry of the convolutional STN: reference windows, sampling offsets, boxes.

Conventions (shared by the heads, the boxes and the tests):

* A feature map of a level with stride ``t`` (16 for P4, 32 for P5) has cells
  that tile the input: cell ``(row, col)`` covers input pixels
  ``[col * t, (col + 1) * t) x [row * t, (row + 1) * t)``. "Cell-edge
  coordinates" measure positions in cells from the map's top-left corner, so
  the centre of cell ``c`` is at ``c + 0.5``.
* A head with window size ``k`` and zero padding ``p`` has an output grid of
  ``(H + 2p - k + 1) x (W + 2p - k + 1)`` locations, exactly like
  ``nn.Conv2d(kernel_size=k, padding=p)``. Output location ``(i, j)`` has the
  reference window ``[j - p, j - p + k) x [i - p, i - p + k)`` (cells), centred
  at ``(j - p + k/2, i - p + k/2)``.
* ``theta`` of a location is a 2x3 affine map, rows ``[x; y]`` as in
  :func:`torch.nn.functional.affine_grid`: a point ``(u, v)`` of the window's
  normalised square ``[-1, 1]^2`` goes to
  ``centre + (k/2) * theta @ [u, v, 1]`` (cells). The identity
  ``[[1, 0, 0], [0, 1, 0]]`` gives back the reference window; ``theta[:, 2]``
  translates in units of half a window; ``theta[0, 0]`` scales the width.
* The k x k sampling points use ``u, v`` at the k bin centres of ``[-1, 1]``
  (``(2b + 1) / k - 1``), so under the identity they fall exactly on cell
  centres and the head is exactly a ``k x k`` convolution.
* A location's box is the hull of its transformed window corners
  (``u, v = +-1``), times the stride, clipped to the input image; boxes are
  ``xyxy`` in input pixels, float32.
"""

from __future__ import annotations

import torch

__all__ = [
    "output_grid_size", "tap_offsets", "window_centres", "reference_boxes", "transformed_boxes",
    "theta_to_offsets", "identity_theta", "offset_basis",
]


def output_grid_size(height: int, width: int, kernel_size: int, padding: int) -> tuple[int, int]:
    """Output locations ``(H', W')`` of a level: ``H + 2p - k + 1`` (as a stride-1 conv)."""
    return height + 2 * padding - kernel_size + 1, width + 2 * padding - kernel_size + 1


def tap_offsets(kernel_size: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Offsets of the k sampling taps from the window centre, in cells: ``b + 0.5 - k/2``.

    Returns (k,) tensor, e.g. ``[-1, 0, 1]`` for k = 3 and ``[-0.5, 0.5]`` for k = 2. They equal
    ``(k/2) * u_b`` with ``u_b`` the bin centres of ``[-1, 1]`` (exact in floating point).
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
        centres: (L, 2) window centres in input pixels (cell-edge centre x stride).
        half_size: (L,) half window side in input pixels (``k/2 * stride``).
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
        half_size: (L,) half window side, input pixels.
        image_hw: input ``(height, width)``.
    Returns:
        (B, L, 4) ``xyxy`` input pixels, dtype of ``theta``.
    """
    half = half_size[None, :, None]                        # (1, L, 1)
    reach = theta[..., :2].abs().sum(-1)                   # (B, L, 2): x and y half extents (in windows)
    shift = theta[..., 2]                                  # (B, L, 2)
    centre = centres[None] + half * shift
    return _clip(torch.cat([centre - half * reach, centre + half * reach], dim=-1), image_hw)


def identity_theta(*shape: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The identity affine map expanded to ``(*shape, 2, 3)``."""
    eye = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=dtype, device=device)
    return eye.expand(*shape, 2, 3)


def offset_basis(kernel_size: int, dtype=torch.float64) -> torch.Tensor:
    """Linear map from ``theta - identity`` (6 numbers) to the k*k tap offsets.

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
    half = torch.full_like(ox, k / 2)
    zero = torch.zeros_like(ox)
    dy = torch.stack([zero, zero, zero, ox, oy, half], dim=1)   # theta10 u + theta11 v + theta12, scaled
    dx = torch.stack([ox, oy, half, zero, zero, zero], dim=1)
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
