"""The shard sample contract: member names, their encodings, the one box conversion, and the one
file digest (sha256) every check of a shard or index uses.

One sample in a WebDataset shard is a group of tar members sharing ``__key__``:

=========  ===========================================================================
member     content
=========  ===========================================================================
``jpg``    baseline/progressive RGB or grey JPEG bytes (re-encoded RGB when the source was not)
``cls``    class index, ASCII decimal (what generic WebDataset tools expect)
``json``   metadata: ``id``, ``index``, ``label``, ``synset``, ``name``, ``width``, ``height``,
           ``boxes`` (list of ``[x0, y0, x1, y1]``, original pixels, x1/y1 exclusive, float)
``lab``    int32[1]   class index      -- binary twins DALI reads without Python
``gid``    int64[1]   global sample index within the split (stable, 0-based)
``wh``     int32[2]   original width, height in pixels
``box``    float32[4n] the boxes of ``json`` flattened (n may be 0: empty member)
=========  ===========================================================================

DALI's ``fn.readers.webdataset`` calls everything after the first dot of a member
name its extension, so keys never contain dots and extensions are single tokens.

Boxes are ``xyxy`` in original pixels everywhere; :func:`boxes_to_input` and
:func:`boxes_to_original` are the only conversion to and from the network's square
input grid (a plain, aspect-changing resize, as the paper's 320 x 320 input).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

IMAGE = "jpg"
LABEL_TEXT = "cls"
META = "json"
LABEL = "lab"
INDEX = "gid"
SIZE = "wh"
BOXES = "box"
#: every member of a sample, in the order DALI's reader is asked for them
MEMBERS = (IMAGE, LABEL_TEXT, META, LABEL, INDEX, SIZE, BOXES)
#: the members the DALI pipelines read
DALI_EXTS = (IMAGE, LABEL, INDEX, SIZE, BOXES)


def encode_sample(key: str, jpeg: bytes, label: int, index: int, width: int, height: int,
                  boxes: np.ndarray | list, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build the member dict for ``webdataset.ShardWriter.write``.

    Args:
        key: stable id without dots (e.g. ``ILSVRC2012_val_00000001``).
        jpeg: the JPEG bytes.
        label: class index.
        index: global 0-based sample index within the split.
        width, height: original image size in pixels.
        boxes: (n, 4) ``xyxy`` original pixels (n may be 0).
        meta: extra JSON fields (``synset``, ``name``, ``id``...).
    """
    if "." in key:
        raise ValueError(f"sample key {key!r} contains a dot; DALI would split its extension there")
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    record = {"id": key, "index": int(index), "label": int(label), "width": int(width), "height": int(height),
              "boxes": [[float(v) for v in b] for b in boxes]}
    if meta:
        record.update({k: v for k, v in meta.items() if k not in record})
    return {
        "__key__": key,
        IMAGE: jpeg,
        LABEL_TEXT: str(int(label)).encode(),
        META: json.dumps(record, sort_keys=True).encode(),
        LABEL: np.array([label], np.int32).tobytes(),
        INDEX: np.array([index], np.int64).tobytes(),
        SIZE: np.array([width, height], np.int32).tobytes(),
        BOXES: boxes.astype(np.float32).tobytes(),
    }


def decode_binary(sample: dict[str, bytes]) -> tuple[int, int, tuple[int, int], np.ndarray]:
    """``(label, index, (width, height), boxes (n, 4) float32)`` from a raw sample's binary twins."""
    label = int(np.frombuffer(sample[LABEL], np.int32)[0])
    index = int(np.frombuffer(sample[INDEX], np.int64)[0])
    w, h = (int(v) for v in np.frombuffer(sample[SIZE], np.int32))
    boxes = np.frombuffer(sample[BOXES], np.float32).reshape(-1, 4).copy()
    return label, index, (w, h), boxes


def boxes_to_input(boxes, width, height, input_size: int):
    """Original-pixel ``xyxy`` boxes -> the ``input_size`` x ``input_size`` network grid.

    Args:
        boxes: numpy array or torch tensor, (n, 4) for one image or (b, n, 4) for a batch.
        width, height: original size, scalars for one image or shape (b,) for a batch.
    Returns the same type, dtype and shape as ``boxes``.
    """
    return _scale(boxes, input_size / _as_array(width, boxes), input_size / _as_array(height, boxes))


def boxes_to_original(boxes, width, height, input_size: int):
    """Inverse of :func:`boxes_to_input` (same argument shapes)."""
    return _scale(boxes, _as_array(width, boxes) / input_size, _as_array(height, boxes) / input_size)


def _as_array(value, like):
    if hasattr(like, "new_tensor"):  # torch, kept on the boxes' device in float64 for exactness
        import torch
        return torch.as_tensor(value, dtype=torch.float64, device=like.device)
    return np.asarray(value, np.float64)


def _scale(boxes, sx, sy):
    if hasattr(boxes, "new_tensor"):
        import torch
        scale = torch.stack(torch.broadcast_tensors(sx, sy, sx, sy), dim=-1)
        if scale.dim():  # one scale per image, shared by its boxes
            scale = scale.unsqueeze(-2)
        return (boxes.double() * scale).to(boxes.dtype)
    scale = np.stack(np.broadcast_arrays(sx, sy, sx, sy), axis=-1)
    if scale.ndim:
        scale = scale[..., None, :]
    boxes = np.asarray(boxes)
    return (boxes.astype(np.float64) * scale).astype(boxes.dtype)


def flip_boxes(boxes, width):
    """Horizontal flip of ``xyxy`` boxes in an image of the given width (x1 exclusive)."""
    if hasattr(boxes, "new_tensor"):
        out = boxes.clone()
    else:
        out = np.array(boxes, copy=True)
    out[..., 0] = width - boxes[..., 2]
    out[..., 2] = width - boxes[..., 0]
    return out


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (the manifest's ``sha256`` and ``idx_sha256``)."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            sha.update(block)
    return sha.hexdigest()
