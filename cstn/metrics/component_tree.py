"""The all-contour boxes of a score map at every cut-off at once: a union-find component tree (numba).

Private to :mod:`cstn.metrics.maxboxacc`, whose MaxBoxAccV2 needs the best IoU over every
``findContours(RETR_TREE)`` box at 100 thresholds per image: one ``findContours`` per threshold
was the slow path (``bench/evaluator.py`` measures both). Compiled once by numba, then cached in
``__pycache__`` (the first call of a fresh install takes a few seconds).
"""

from __future__ import annotations

import numba
import numpy as np

from cstn.metrics.rows import as_numpy

__all__ = ["scoremap_best_ious_all_contours"]


# -- the fast exact path for all contours: a component tree over the 255 cut-offs -------------
#
# The bounding rectangles of ``findContours(mask, RETR_TREE)`` are exactly
#   * the boxes of the 8-connected foreground components (their outer borders), and
#   * the boxes of the holes -- 4-connected background components not reaching the
#     image frame (OpenCV pads the image with background) -- grown by one pixel on
#     every side (a hole border runs through the foreground pixels around the hole).
# Both families are tracked for every cut-off at once with union-find: foreground
# pixels join in decreasing value (the mask of cut-off c is complete once the pixels
# of value c + 1 are in), background pixels in increasing value (the background of
# cut-off c is complete once the pixels of value c are in).


@numba.njit(cache=True, nogil=True, inline="always")
def _find(parent, p):
    """Root of cell ``p`` (``p`` present), compressing the path.

    Cells are handled as unsigned integers, which spares numba's negative-index test.
    """
    p = np.uint64(p)
    root = p
    while np.uint64(parent[root]) != root:
        root = np.uint64(parent[root])
    while np.uint64(parent[p]) != root:
        nxt = np.uint64(parent[p])
        parent[p] = root
        p = nxt
    return np.int64(root)


@numba.njit(cache=True, nogil=True, inline="always")
def _box_best_iou(x0, y0, x1, y1, gt):
    """Best inclusive-pixel IoU of one box with the rows of ``gt`` (same operations as :func:`_inclusive_iou`)."""
    best = 0.0
    for g in range(gt.shape[0]):
        iw = min(x1, gt[g, 2]) - max(x0, gt[g, 0]) + 1
        ih = min(y1, gt[g, 3]) - max(y0, gt[g, 1]) + 1
        inter = max(0.0, iw) * max(0.0, ih)
        denominator = (x1 - x0 + 1) * (y1 - y0 + 1) + (gt[g, 2] - gt[g, 0] + 1) * (gt[g, 3] - gt[g, 1] + 1) - inter
        iou = inter / denominator if denominator > 0 else 0.0
        if iou > best:
            best = iou
    return best


@numba.njit(cache=True, nogil=True, inline="always")
def _link(p, q, x, y, root, parent, box, outside_root):
    """Connect the new pixel ``p`` (at x, y) with its present neighbour ``q``; returns p's root (-1: none yet).

    The first neighbouring component takes ``p`` in (its box grows); a further one is
    merged (``outside_root`` always stays a root, else the first component met).
    """
    p = np.uint64(p)
    q = np.uint64(q)
    pq = parent[q]
    if pq < 0 or pq == root:
        return root
    other = _find(parent, q)
    if other == root:
        return root
    if root < 0:
        parent[p] = other
        box[other, 0] = min(box[other, 0], x)
        box[other, 1] = min(box[other, 1], y)
        box[other, 2] = max(box[other, 2], x)
        box[other, 3] = max(box[other, 3], y)
        return other
    if other == outside_root:
        root, other = other, root
    parent[other] = root
    box[root, 0] = min(box[root, 0], box[other, 0])
    box[root, 1] = min(box[root, 1], box[other, 1])
    box[root, 2] = max(box[root, 2], box[other, 2])
    box[root, 3] = max(box[root, 3], box[other, 3])
    return root


@numba.njit(cache=True, nogil=True, inline="always")
def _best_live_iou(roots, n_roots, parent, box, grow, width, height, gt):
    """Compact ``roots[:n_roots]`` to the current roots; returns (new count, best IoU of their boxes).

    A box is Choe et al.'s ``[x, y, min(x + w, W - 1), min(y + h, H - 1)]`` of the
    component's pixel extent grown by ``grow`` pixels on every side.
    """
    wmax = float(width - 1)
    hmax = float(height - 1)
    kept = 0
    top = 0.0
    for j in range(n_roots):
        r = roots[j]
        if parent[r] != r:
            continue
        roots[kept] = r
        kept += 1
        iou = _box_best_iou(float(box[r, 0] - grow), float(box[r, 1] - grow),
                            min(float(box[r, 2] + 1 + grow), wmax), min(float(box[r, 3] + 1 + grow), hmax), gt)
        if iou > top:
            top = iou
    return kept, top


@numba.njit(cache=True, nogil=True)
def _all_contour_best_ious(u8, gt, needed):
    """Best IoU of all contour boxes at every cut-off c (``u8 > c``) flagged in ``needed`` (256,).

    Pixels enter a union-find forest by value: the foreground pass (8-connected)
    from 255 down, the background pass (4-connected) from 0 up. The map is framed by
    one padding cell per side: never foreground, and in the background pass one
    component, the outside (cell 0, always a root, never listed), so holes are the
    listed background roots. Each component's root holds its pixel extent.

    Returns (256,) float64; -1 where not needed or where the mask is empty.
    """
    height, width = u8.shape
    stride = width + 2
    cells = (height + 2) * stride
    # start[v]: first position of value v in ``packed``, pixels by increasing value as y << 16 | x
    start = np.zeros(257, np.int32)
    for y in range(height):
        for x in range(width):
            start[u8[y, x] + 1] += 1
    for v in range(256):
        start[v + 1] += start[v]
    packed = np.empty(height * width, np.int32)
    fill = start[:256].copy()
    for y in range(height):
        for x in range(width):
            v = u8[y, x]
            packed[fill[v]] = (y << 16) | x
            fill[v] += 1

    parent = np.full(cells, -1, np.int32)
    box = np.empty((cells, 4), np.int32)
    roots = np.empty(height * width, np.int32)
    best_fg = np.full(256, -1.0)
    best_hole = np.full(256, -1.0)

    # foreground: values 255 down to 1; level v completes the mask of cut-off v - 1
    n_roots = 0
    for v in range(255, 0, -1):
        for k in range(start[v], start[v + 1]):
            x = packed[k] & 0xFFFF
            y = packed[k] >> 16
            p = (y + 1) * stride + x + 1
            root = -1
            root = _link(p, p - stride - 1, x, y, root, parent, box, -1)
            root = _link(p, p - stride, x, y, root, parent, box, -1)
            root = _link(p, p - stride + 1, x, y, root, parent, box, -1)
            root = _link(p, p - 1, x, y, root, parent, box, -1)
            root = _link(p, p + 1, x, y, root, parent, box, -1)
            root = _link(p, p + stride - 1, x, y, root, parent, box, -1)
            root = _link(p, p + stride, x, y, root, parent, box, -1)
            root = _link(p, p + stride + 1, x, y, root, parent, box, -1)
            if root < 0:
                parent[p] = p
                box[p, 0] = x
                box[p, 1] = y
                box[p, 2] = x
                box[p, 3] = y
                roots[n_roots] = p
                n_roots += 1
        if needed[v - 1] and start[v] < height * width:
            n_roots, best_fg[v - 1] = _best_live_iou(roots, n_roots, parent, box, 0, width, height, gt)

    # background: values 0 up to 254, the padding is the outside; level v completes cut-off v
    parent[:] = -1
    parent[:stride] = 0
    parent[cells - stride:] = 0
    for y in range(1, height + 1):
        parent[y * stride] = 0
        parent[y * stride + stride - 1] = 0
    n_roots = 0
    for v in range(0, 255):
        for k in range(start[v], start[v + 1]):
            x = packed[k] & 0xFFFF
            y = packed[k] >> 16
            p = (y + 1) * stride + x + 1
            root = -1
            root = _link(p, p - stride, x, y, root, parent, box, 0)
            root = _link(p, p - 1, x, y, root, parent, box, 0)
            root = _link(p, p + 1, x, y, root, parent, box, 0)
            root = _link(p, p + stride, x, y, root, parent, box, 0)
            if root < 0:
                parent[p] = p
                box[p, 0] = x
                box[p, 1] = y
                box[p, 2] = x
                box[p, 3] = y
                roots[n_roots] = p
                n_roots += 1
        if needed[v] and start[v + 1] < height * width and n_roots > 0:
            n_roots, best_hole[v] = _best_live_iou(roots, n_roots, parent, box, 1, width, height, gt)
    return np.maximum(best_fg, best_hole)


@numba.njit(cache=True, nogil=True)
def _batch_all_contour_best_ious(maps, cam_thresholds, gt, gt_start):
    """(N, T) best IoU over all contour boxes for N float64 maps; image i owns ``gt[gt_start[i]:gt_start[i + 1]]``."""
    n, height, width = maps.shape
    out = np.empty((n, cam_thresholds.shape[0]))
    u8 = np.empty((height, width), np.uint8)
    cuts = np.empty(cam_thresholds.shape[0], np.int64)
    for i in range(n):
        top = 0
        for y in range(height):
            for x in range(width):
                value = np.uint8(maps[i, y, x] * 255.0)  # float64 product truncated, as numpy's astype
                u8[y, x] = value
                if value > top:
                    top = value
        needed = np.zeros(256, np.bool_)
        for t in range(cam_thresholds.shape[0]):
            cuts[t] = np.int64(cam_thresholds[t] * float(top))
            needed[cuts[t]] = True
        image_gt = gt[gt_start[i]:gt_start[i + 1]]
        best = _all_contour_best_ious(u8, image_gt, needed)
        empty = _box_best_iou(0.0, 0.0, 0.0, 0.0, image_gt)  # nothing above the cut-off: box [0, 0, 0, 0]
        for t in range(cam_thresholds.shape[0]):
            out[i, t] = best[cuts[t]] if best[cuts[t]] >= 0 else empty
    return out


def scoremap_best_ious_all_contours(score_maps, gt_boxes, cam_thresholds) -> np.ndarray:
    """Best IoU over every contour's box at every CAM threshold (the V2 candidates), for a batch.

    Same result as the ``best_all`` of :func:`scoremap_best_ious` per map, from a
    component tree (above) instead of one ``findContours`` per cut-off.

    Args:
        score_maps: (N, H, W) or (H, W) maps in [0, 1].
        gt_boxes: list of N (k_i, 4) ground-truth boxes (or one (k, 4) array for one map).
        cam_thresholds: (T,) thresholds in [0, 1).
    Returns:
        (N, T) float64, or (T,) for one map.
    """
    maps = as_numpy(score_maps, np.float64)
    single = maps.ndim == 2
    if single:
        maps, gt_boxes = maps[None], [gt_boxes]
    gts = [as_numpy(g, np.float64).reshape(-1, 4) for g in gt_boxes]
    gt_start = np.concatenate([[0], np.cumsum([len(g) for g in gts])]).astype(np.int64)
    gt = np.ascontiguousarray(np.concatenate(gts) if gts else np.zeros((0, 4)))
    out = _batch_all_contour_best_ious(np.ascontiguousarray(maps), np.ascontiguousarray(cam_thresholds, np.float64),
                                       gt, gt_start)
    return out[0] if single else out
