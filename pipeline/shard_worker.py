"""The converter's per-image and per-shard work, run in worker processes: check inputs, write a shard.

:func:`write_shard` produces one whole shard in one pass over its input files: each file is read
once, checked (:func:`normalize_image`), matched with its annotation (:func:`accept`) and written
(:class:`pipeline.tarshard.ShardTarWriter`: tar members, sha256 and DALI index as it goes). The
calling process (:mod:`pipeline.shards`) only decides where each shard starts and commits finished
shards in order.

Where a shard ends depends on its inputs (skipped files, re-encoded sizes), so the calling process
starts shards ahead on a guess and :func:`write_shard` reports where its shard really ended: see
"Parallel writing" in :mod:`pipeline.shards`.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from . import schema
from .jpeg_check import HUFFMAN_DCT_FRAMES, JpegError, JpegInfo, is_jpeg, parse_jpeg
from .sources.base import SourceItem
from .tarshard import ShardTarWriter

__all__ = ["ShardingError", "BadImage", "VERIFY_MODES", "FileCheck", "Checked", "normalize_image", "check_file",
           "clip_boxes", "accept", "check_item", "InputRef", "ShardJob", "write_shard"]

#: how thoroughly JPEG inputs are checked, cheapest first: segments up to the first scan and the end marker;
#: every marker inside the scans too; a full strict decode on top
VERIFY_MODES = ("structure", "markers", "decode")
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "png"), (b"GIF87a", "gif"), (b"GIF89a", "gif"), (b"BM", "bmp"),
               (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"))
_STAT_KEYS = ("boxes", "boxes_clipped", "boxes_dropped", "images_all_boxes_dropped", "input_bytes")


class ShardingError(RuntimeError):
    """The conversion cannot go on; the message names the file, shard or manifest at fault."""


class BadImage(ValueError):
    """An input that cannot become a sample (corrupt, truncated, not an image)."""


# ---------------------------------------------------------------------------------------------
# One image
# ---------------------------------------------------------------------------------------------

def _reencode(data: bytes, quality: int, kind: str) -> tuple[bytes, int, int, str]:
    import cv2
    cv2.setNumThreads(1)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise BadImage(f"{kind} data that OpenCV cannot decode")
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise BadImage(f"re-encoding {kind} data as JPEG failed")
    return buf.tobytes(), int(img.shape[1]), int(img.shape[0]), kind


def _jpeg_reencode_kind(info: JpegInfo) -> str | None:
    """Why a structurally valid JPEG must be re-encoded (``grey``, ``cmyk``, ...); None to store it as it is."""
    if info.colorspace == "Gray":
        return "grey"
    if info.colorspace in ("CMYK", "YCCK"):
        return "cmyk"
    if info.colorspace != "YCbCr":
        return f"colorspace_{info.colorspace.lower()}"
    if info.frame not in HUFFMAN_DCT_FRAMES:
        return f"jpeg_sof{info.frame:x}"
    if info.precision != 8:
        return f"jpeg_{info.precision}bit"
    return None


def normalize_image(data: bytes, quality: int = 95, verify: str = "structure") -> tuple[bytes, int, int, str | None]:
    """Check one image file's bytes and return ``(jpeg_bytes, width, height, reencoded_kind)``.

    ``verify`` (see :func:`pipeline.jpeg_check.parse_jpeg`): ``structure`` checks a JPEG's segments up
    to the first scan and its end-of-image marker (a few microseconds; catches truncation, not bytes
    overwritten inside the scan data); ``markers`` also walks every marker inside the scan data
    (about 40 us for an ILSVRC photo; catches overwritten data with near certainty); ``decode`` also
    decodes the image completely with libjpeg in strict mode (a DCT-scaled 1/8 decode, about 1 ms),
    which catches damaged entropy-coded data whose markers are intact too. No image is decoded
    otherwise: width and height come from the frame header.
    ``reencoded_kind`` is None when the bytes are stored as they are (8-bit baseline, extended or
    progressive Huffman JPEG in YCbCr), else one of ``grey``, ``cmyk``, ``colorspace_<name>``,
    ``jpeg_sof<hex>``, ``jpeg_<n>bit``, ``png``, ``gif``, ``bmp``, ``tiff``, ``webp``: decoded with
    OpenCV (EXIF orientation ignored, so sizes and boxes keep referring to the stored pixels) and
    re-encoded as an RGB JPEG of ``quality``. Raises :class:`BadImage` with the reason for anything
    that cannot be stored.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    if is_jpeg(data):
        try:
            info = parse_jpeg(data, scan_data=verify != "structure")
        except JpegError as e:
            raise BadImage(f"{'unreadable JPEG header' if e.in_header else 'corrupt or truncated JPEG'} "
                           f"({e})") from None
        kind = _jpeg_reencode_kind(info)
        if verify == "decode" and info.frame in HUFFMAN_DCT_FRAMES and info.precision == 8:
            import simplejpeg
            decode_as = {"Gray": "GRAY", "CMYK": "CMYK", "YCCK": "CMYK"}.get(info.colorspace, "RGB")
            try:  # strict: any libjpeg warning (corrupt data, premature end) is an error
                simplejpeg.decode_jpeg(data, colorspace=decode_as, min_height=1, min_width=1, strict=True)
            except ValueError as e:
                raise BadImage(f"corrupt or truncated JPEG (libjpeg: {e})") from None
        if kind is None:
            return data, info.width, info.height, None
        return _reencode(data, quality, kind)
    for signature, kind in _SIGNATURES:
        if data.startswith(signature):
            return _reencode(data, quality, kind)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _reencode(data, quality, "webp")
    raise BadImage("not an image (no JPEG, PNG, GIF, BMP, TIFF or WebP signature)" if data else "empty file")


@dataclass(slots=True)
class FileCheck:
    """The verdict on one input file.

    Attributes:
        reason: why the file cannot be stored, None when it can.
        jpeg: the bytes to store (the file's own, or the re-encoded image); None when ``reason`` is set.
        width, height: image size in pixels.
        reencoded: kind of re-encoded input (see :func:`normalize_image`), None for stored bytes.
        input_bytes: size of the file as read.
    """

    reason: str | None = None
    jpeg: bytes | None = None
    width: int = 0
    height: int = 0
    reencoded: str | None = None
    input_bytes: int = 0

    @property
    def ok(self) -> bool:
        return self.reason is None


def _read(path: str | Path) -> bytes:
    """The bytes of a file, in one ``read`` when it has the size ``fstat`` gives (cheaper than ``open``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size + 1)
        if len(data) == size:
            return data
        chunks = [data]  # the file changed size, or is too large for one read
        while chunk := os.read(fd, 1 << 24):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def check_file(path: str | Path, quality: int = 95, verify: str = "structure") -> FileCheck:
    """Read and check one input file (re-encoding it if needed). Never raises for bad input."""
    try:
        data = _read(path)
    except FileNotFoundError:
        return FileCheck(reason="file not found")
    except OSError as e:
        return FileCheck(reason=f"unreadable file ({e.strerror or e})")
    try:
        jpeg, width, height, kind = normalize_image(data, quality, verify)
    except BadImage as e:
        return FileCheck(reason=str(e), input_bytes=len(data))
    return FileCheck(jpeg=jpeg, width=width, height=height, reencoded=kind, input_bytes=len(data))


def clip_boxes(boxes: np.ndarray | Sequence, width: int, height: int) -> tuple[np.ndarray, int, int]:
    """Clip ``xyxy`` boxes to the image and drop those left without area.

    Args:
        boxes: (n, 4) ``xyxy`` original pixels.
        width, height: image size in pixels.
    Returns ``(kept (m, 4) float32, n_clipped, n_dropped)``: ``n_clipped`` counts kept boxes that moved,
    ``n_dropped`` the boxes with x1 <= x0 or y1 <= y0 after clipping (or a NaN).
    """
    rows = boxes.reshape(-1, 4).tolist() if isinstance(boxes, np.ndarray) else boxes
    kept, clipped, dropped = [], 0, 0
    for row in rows:  # plain floats: a handful of boxes per image, where numpy calls cost more than the work
        x0, y0, x1, y1 = (float(v) for v in row)
        c = (min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height))
        if c[2] > c[0] and c[3] > c[1]:  # False for NaN too
            kept.append(c)
            clipped += c != (x0, y0, x1, y1)
        else:
            dropped += 1
    return np.array(kept, np.float32).reshape(-1, 4), clipped, dropped


@dataclass
class Checked:
    """An input's verdict with its boxes: a sample to store (``reason`` None) or an input to skip.

    ``file`` is the :class:`FileCheck`; ``reason`` is its reason, or a disagreement with the
    annotation (image size); ``boxes`` (m, 4) float32 are the item's boxes clipped to the image.
    """

    file: FileCheck
    reason: str | None = None
    boxes: np.ndarray | None = None
    boxes_clipped: int = 0
    boxes_dropped: int = 0

    @property
    def ok(self) -> bool:
        return self.reason is None


def accept(item: SourceItem, file: FileCheck) -> Checked:
    """Match a file's verdict with its annotation: skip it when the sizes disagree (its boxes would not
    fit), else clip the boxes to the image."""
    if not file.ok:
        return Checked(file=file, reason=file.reason)
    if item.size is not None and tuple(item.size) != (file.width, file.height):
        return Checked(file=file, reason=f"the annotation says {item.size[0]}x{item.size[1]} but the image is "
                                         f"{file.width}x{file.height}")
    boxes, clipped, dropped = clip_boxes(item.boxes, file.width, file.height)
    return Checked(file=file, boxes=boxes, boxes_clipped=clipped, boxes_dropped=dropped)


def check_item(item: SourceItem, quality: int = 95, verify: str = "structure") -> Checked:
    """Read, check and (if needed) re-encode one input and clip its boxes. Never raises for bad input."""
    return accept(item, check_file(item.path, quality, verify))


# ---------------------------------------------------------------------------------------------
# One shard
# ---------------------------------------------------------------------------------------------

class InputRef(NamedTuple):
    """What a worker needs of a :class:`~pipeline.sources.base.SourceItem` (cheaper to send: no ``Path``)."""

    path: str
    relpath: str
    key: str
    label: int
    boxes: tuple
    size: tuple[int, int] | None

    @classmethod
    def of(cls, item: SourceItem) -> "InputRef":
        return cls(str(item.path), item.relpath, item.key, item.label, item.boxes, item.size)


@dataclass
class ShardJob:
    """One shard to write, starting at input ``start`` of the split's ordered inputs.

    Attributes:
        name: shard name without extension (``val-000003``); tar_tmp, idx_tmp: files to write.
        start: position of ``items[0]`` among the ordered inputs; first_index: global index of the
            shard's first sample.
        items: the inputs from ``start`` on that the shard may use (the ones it does not need belong to
            the next shard).
        at_range_end: True when no input follows ``items`` (end of the split or of a recorded range).
        bounded: take every input of ``items`` (a redo of a recorded range); else stop before the first
            good input once the shard is full.
        samples_per_shard, image_mb: the shard is full at this many samples / once its images reach this
            many MB (one of them is None).
        classes: ``label -> (id, name)`` for the labels of ``items``.
        strict, quality, verify: as in ``ShardOptions``.
    """

    name: str
    tar_tmp: Path
    idx_tmp: Path
    start: int
    first_index: int
    items: list[InputRef]
    at_range_end: bool
    bounded: bool
    samples_per_shard: int | None
    image_mb: float | None
    classes: dict[int, tuple[str, str]]
    strict: bool = False
    quality: int = 95
    verify: str = "structure"


def write_shard(job: ShardJob) -> dict[str, Any]:
    """Check ``job``'s inputs in order and write the shard under its temporary names.

    Returns ``end`` (position after the shard's last input), ``count``, ``skipped`` (``file``, ``key``,
    ``reason`` per skipped input), ``reencoded`` (kind -> count), the box and byte counts, and for a
    shard with samples ``bytes``, ``sha256``, ``idx_sha256`` and its ``first_key`` / ``last_key``; or ``{"needs_more": True}`` when the
    shard is not full at the end of ``items`` and more inputs follow (many skipped inputs: the caller
    retries with more). Raises :class:`ShardingError` naming the file in ``strict`` mode. A failure
    while adding samples removes both files.
    """
    limit = job.image_mb * 1e6 if job.image_mb is not None else None
    count, image_bytes, end = 0, 0, None
    first_key = last_key = None
    skipped: list[dict[str, Any]] = []
    reencoded: Counter = Counter()
    stats: Counter = Counter({k: 0 for k in _STAT_KEYS})
    writer: ShardTarWriter | None = None
    try:
        for i, item in enumerate(job.items):
            checked = check_item(item, job.quality, job.verify)
            stats["input_bytes"] += checked.file.input_bytes
            if not checked.ok:
                if job.strict:
                    raise ShardingError(f"{item.path}: {checked.reason} (--strict: no input may be skipped)")
                skipped.append({"file": item.relpath, "key": item.key, "reason": checked.reason})
                continue
            full = count >= job.samples_per_shard if limit is None else image_bytes >= limit
            if full and not job.bounded:  # bad inputs after a full shard stay with it; this good one starts the next
                stats["input_bytes"] -= checked.file.input_bytes
                end = job.start + i
                break
            file = checked.file
            class_id, class_name = job.classes[item.label]
            meta = {"synset": class_id, "name": class_name, "file": item.relpath}
            if file.reencoded:
                meta["reencoded"] = file.reencoded
                reencoded[file.reencoded] += 1
            if writer is None:
                writer = ShardTarWriter(job.tar_tmp, job.idx_tmp)
            writer.write(schema.encode_sample(item.key, file.jpeg, item.label, job.first_index + count, file.width,
                                              file.height, checked.boxes, meta))
            first_key = item.key if count == 0 else first_key
            last_key = item.key
            count += 1
            image_bytes += len(file.jpeg)
            stats["boxes"] += len(checked.boxes)
            stats["boxes_clipped"] += checked.boxes_clipped
            stats["boxes_dropped"] += checked.boxes_dropped
            stats["images_all_boxes_dropped"] += int(len(item.boxes) > 0 and len(checked.boxes) == 0)
        else:
            if not job.at_range_end and not job.bounded:
                if writer is not None:
                    writer.abort()
                return {"needs_more": True}
            end = job.start + len(job.items)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    result = {"needs_more": False, "end": end, "count": count, "skipped": skipped,
              "reencoded": dict(sorted(reencoded.items())), **stats}
    if writer is not None:
        writer.close()
        result.update(bytes=writer.bytes, sha256=writer.sha256, idx_sha256=writer.index_sha256, first_key=first_key,
                      last_key=last_key)
    return result
