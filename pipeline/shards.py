"""Convert a dataset split into WebDataset tar shards, one DALI index per shard and a manifest.

Output, under ``out_dir/<split>/``::

    <split>-000000.tar, <split>-000001.tar, ...   samples as in :mod:`pipeline.schema`
    <split>-000000.idx, ...                       DALI index (written by DALI's ``wds2idx``)
    manifest.json                                 see "Manifest" below

Order and indices
    Training splits are shuffled across all shards by a permutation drawn from ``seed``
    (``numpy.random.default_rng(seed).permutation``); DALI and webdataset only shuffle inside a
    small buffer. Validation and test splits keep source order. A sample's global ``index`` (the
    ``gid`` member and ``json["index"]``) is its 0-based position among the written samples of
    the split, so it is stable for a given source, seed and options.

Images
    Every input is checked in worker processes. A JPEG whose header reads and whose whole entropy
    stream decodes without a libjpeg warning (a strict, DCT-scaled 1/8 decode: cheap but complete)
    and which is baseline/extended/progressive YCbCr is stored byte for byte. Grey, CMYK/YCCK and
    other colour spaces, other JPEG frame types (arithmetic, lossless) and non-JPEG data under an
    image name (PNG, GIF, BMP, TIFF, WebP: ILSVRC holds a few) are decoded with OpenCV (EXIF
    orientation ignored, so sizes and boxes keep referring to the stored pixels) and re-encoded as
    RGB JPEG (``reencode_quality``), counted per kind. Unreadable, corrupt or truncated files, and
    files missing on disk, are skipped and listed with the reason; ``strict`` turns the first such
    file into an error. An image whose size differs from the size its annotation states is skipped
    too (its boxes would not fit).

Boxes
    Clipped to ``[0, width] x [0, height]`` (counted as ``boxes_clipped`` when a coordinate moved);
    a box left without area (x1 <= x0 or y1 <= y0, including boxes wholly outside) is dropped and
    counted as ``boxes_dropped``.

Crash safety and resume
    A shard is written as ``<name>.tar.tmp``, indexed into ``<name>.idx.tmp``, and both are renamed
    when complete; ``manifest.json`` is rewritten after every shard with ``"complete": false`` and
    gets ``"complete": true`` at the end. A rerun with the same source fingerprint and content
    options keeps every listed shard whose size and sha256 match, rebuilds a missing or mismatching
    index, rewrites the other listed shards from their recorded input range (the output is
    byte-identical: tar members carry fixed mtimes and owners), and continues after the last listed
    shard. With a different source or different options everything is rewritten. Stale shards and
    temporary files of the split are removed at the end.

Manifest (``manifest.json``)
    ``format``, ``complete``, ``dataset``, ``split``, ``total`` (samples), ``shards`` (per shard:
    ``name``, ``index_file``, ``count``, ``first_index``, ``bytes``, ``sha256``, ``idx_sha256``,
    ``inputs`` (its range of the ordered input list), and its ``skipped``/re-encode/box counts),
    ``classes`` (``index``, ``id`` = wnid or CUB folder, ``name``), ``skipped`` (every input not in a
    shard: ``file``, ``key``, ``reason``), ``counts`` (inputs, samples, skipped, re-encoded per kind,
    boxes, clipped, dropped), ``source`` (root, fingerprint, number of inputs) and ``converter``
    (package version, format, options, library versions). ``counts.inputs == total + len(skipped)``.

Readers use :func:`load_manifest`, which checks that the manifest is complete and every listed
shard and index exists.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from . import schema
from .sources.base import SourceError, SourceItem, SourceListing

__all__ = ["FORMAT", "ShardOptions", "ShardingError", "ConversionResult", "ShardManifest", "BadImage",
           "normalize_image", "clip_boxes", "check_item", "list_source", "convert", "write_dali_index",
           "load_manifest", "sha256_file", "DEFAULT_SHARD_SIZE_MB"]

#: layout version of shards + manifest written by this module (bumped when their bytes change)
FORMAT = "cstn-wds-1"
MANIFEST = "manifest.json"
DEFAULT_SHARD_SIZE_MB = 256.0
#: JPEG frame types stored as they are: SOF0 baseline, SOF1 extended sequential, SOF2 progressive
_PLAIN_FRAMES = (0xC0, 0xC1, 0xC2)
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "png"), (b"GIF87a", "gif"), (b"GIF89a", "gif"), (b"BM", "bmp"),
               (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"))


class ShardingError(RuntimeError):
    """The conversion cannot go on; the message names the file, shard or manifest at fault."""


class BadImage(ValueError):
    """An input that cannot become a sample (corrupt, truncated, not an image)."""


@dataclass
class ShardOptions:
    """How to convert. ``samples_per_shard`` and ``shard_size_mb`` are exclusive (default: 256 MB)."""

    samples_per_shard: int | None = None
    """Samples per shard (the last one may hold fewer)."""
    shard_size_mb: float | None = None
    """Close a shard once its payload reaches this many MB (10^6 bytes)."""
    seed: int = 0
    """Seed of the training-split permutation."""
    workers: int = 2
    """Processes checking / re-encoding images (0: in the calling process)."""
    strict: bool = False
    """Fail on the first input that would be skipped."""
    reencode_quality: int = 95
    """JPEG quality of re-encoded images."""
    progress: bool = True
    """Show a tqdm bar (images/s, MB/s) on stderr."""

    def __post_init__(self):
        if self.samples_per_shard is not None and self.shard_size_mb is not None:
            raise ValueError("give samples_per_shard or shard_size_mb, not both")
        if self.samples_per_shard is None and self.shard_size_mb is None:
            self.shard_size_mb = DEFAULT_SHARD_SIZE_MB
        if self.samples_per_shard is not None and self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.shard_size_mb is not None and not self.shard_size_mb > 0:
            raise ValueError(f"shard_size_mb must be > 0, got {self.shard_size_mb}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if not 1 <= self.reencode_quality <= 100:
            raise ValueError(f"reencode_quality must be in 1..100, got {self.reencode_quality}")

    def content(self) -> dict[str, Any]:
        """The options that decide the bytes of the shards (compared on resume)."""
        return {"samples_per_shard": self.samples_per_shard, "shard_size_mb": self.shard_size_mb,
                "seed": self.seed, "reencode_quality": self.reencode_quality}


# ---------------------------------------------------------------------------------------------
# Per-image work (runs in worker processes)
# ---------------------------------------------------------------------------------------------

def _jpeg_frame_marker(data: bytes) -> int | None:
    """The SOFn marker byte of a JPEG stream (0xC0 baseline, 0xC2 progressive, ...), None if absent."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _reencode(data: bytes, quality: int, kind: str) -> tuple[bytes, int, int, str]:
    import cv2
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise BadImage(f"{kind} data that OpenCV cannot decode")
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise BadImage(f"re-encoding {kind} data as JPEG failed")
    return buf.tobytes(), int(img.shape[1]), int(img.shape[0]), kind


def normalize_image(data: bytes, quality: int = 95) -> tuple[bytes, int, int, str | None]:
    """Check one image file's bytes and return ``(jpeg_bytes, width, height, reencoded_kind)``.

    ``reencoded_kind`` is None when the bytes are stored as they are, else one of ``grey``, ``cmyk``,
    ``colorspace_<name>``, ``jpeg_sof<hex>``, ``png``, ``gif``, ``bmp``, ``tiff``, ``webp``.
    Raises :class:`BadImage` with the reason for anything that cannot be stored.
    """
    import simplejpeg
    if data[:3] == b"\xff\xd8\xff":
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError as e:
            raise BadImage(f"unreadable JPEG header ({e})") from None
        decode_as = {"Gray": "GRAY", "CMYK": "CMYK", "YCCK": "CMYK"}.get(colorspace, "RGB")
        try:  # strict: any libjpeg warning (premature end, corrupt data) is an error
            simplejpeg.decode_jpeg(data, colorspace=decode_as, min_height=1, min_width=1, strict=True)
        except ValueError as e:
            raise BadImage(f"corrupt or truncated JPEG ({e})") from None
        frame = _jpeg_frame_marker(data)
        if colorspace == "Gray":
            kind = "grey"
        elif colorspace in ("CMYK", "YCCK"):
            kind = "cmyk"
        elif colorspace != "YCbCr":
            kind = f"colorspace_{colorspace.lower()}"
        elif frame not in _PLAIN_FRAMES:
            kind = f"jpeg_sof{frame:x}" if frame is not None else "jpeg_without_frame_header"
        else:
            return data, int(width), int(height), None
        return _reencode(data, quality, kind)
    for signature, kind in _SIGNATURES:
        if data.startswith(signature):
            return _reencode(data, quality, kind)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _reencode(data, quality, "webp")
    raise BadImage("not an image (no JPEG, PNG, GIF, BMP, TIFF or WebP signature)" if data else "empty file")


def clip_boxes(boxes: np.ndarray | Sequence, width: int, height: int) -> tuple[np.ndarray, int, int]:
    """Clip ``xyxy`` boxes to the image and drop those left without area.

    Args:
        boxes: (n, 4) ``xyxy`` original pixels.
        width, height: image size in pixels.
    Returns ``(kept (m, 4) float32, n_clipped, n_dropped)``: ``n_clipped`` counts kept boxes that moved,
    ``n_dropped`` the boxes with x1 <= x0 or y1 <= y0 after clipping (or a NaN).
    """
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    c = b.copy()
    c[:, 0::2] = np.clip(c[:, 0::2], 0, width)
    c[:, 1::2] = np.clip(c[:, 1::2], 0, height)
    valid = (c[:, 2] > c[:, 0]) & (c[:, 3] > c[:, 1])
    moved = np.any(c != b, axis=1)
    return c[valid].astype(np.float32), int((moved & valid).sum()), int((~valid).sum())


@dataclass
class Checked:
    """Result of :func:`check_item`: either a sample (``jpeg`` set) or a skip (``reason`` set)."""

    jpeg: bytes | None = None
    width: int = 0
    height: int = 0
    boxes: np.ndarray | None = None
    reencoded: str | None = None
    boxes_clipped: int = 0
    boxes_dropped: int = 0
    reason: str | None = None
    input_bytes: int = 0


def check_item(item: SourceItem, quality: int = 95) -> Checked:
    """Read, check and (if needed) re-encode one input; clip its boxes. Never raises for bad input."""
    try:
        with open(item.path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return Checked(reason="file not found")
    except OSError as e:
        return Checked(reason=f"unreadable file ({e.strerror or e})")
    try:
        jpeg, width, height, kind = normalize_image(data, quality)
    except BadImage as e:
        return Checked(reason=str(e), input_bytes=len(data))
    if item.size is not None and tuple(item.size) != (width, height):
        return Checked(reason=f"the annotation says {item.size[0]}x{item.size[1]} but the image is "
                              f"{width}x{height}", input_bytes=len(data))
    boxes, clipped, dropped = clip_boxes(item.boxes, width, height)
    return Checked(jpeg=jpeg, width=width, height=height, boxes=boxes, reencoded=kind, boxes_clipped=clipped,
                   boxes_dropped=dropped, input_bytes=len(data))


def _check_chunk(items: list[SourceItem], quality: int) -> list[Checked]:
    return [check_item(it, quality) for it in items]


def _worker_init() -> None:
    import cv2
    cv2.setNumThreads(1)


class _Checker:
    """Ordered, bounded-memory map of :func:`check_item` over worker processes (or inline).

    Workers are started with ``spawn`` (no state inherited from a parent that may run DALI or torch
    threads); at most ``4 * workers`` chunks are in flight, so memory stays flat on any dataset size.
    """

    def __init__(self, workers: int, quality: int, chunk: int = 32):
        self.quality, self.chunk = quality, chunk
        self.max_pending = 4 * max(1, workers)
        self.pool = None
        if workers:
            from concurrent.futures import ProcessPoolExecutor
            self.pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init)

    def map(self, items: Sequence[SourceItem]) -> Iterator[Checked]:
        if self.pool is None:
            for it in items:
                yield check_item(it, self.quality)
            return
        from concurrent.futures.process import BrokenProcessPool
        pending: deque = deque()
        try:
            for start in range(0, len(items), self.chunk):
                pending.append(self.pool.submit(_check_chunk, list(items[start:start + self.chunk]), self.quality))
                if len(pending) >= self.max_pending:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        except BrokenProcessPool as e:
            raise ShardingError(f"an image-checking worker process died ({e}); rerun with --workers 0 to "
                                f"check images in the main process") from e
        finally:
            for f in pending:
                f.cancel()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def write_dali_index(tar_path: str | Path, idx_path: str | Path) -> None:
    """Write the DALI index of ``tar_path`` with the ``wds2idx`` tool shipped in nvidia-dali."""
    try:
        from wds2idx import IndexCreator  # the module behind DALI's ``wds2idx`` command
    except ImportError:
        tool = shutil.which("wds2idx") or str(Path(sys.executable).with_name("wds2idx"))
        if not os.access(tool, os.X_OK):
            raise ShardingError("DALI's wds2idx tool is not installed (pip install nvidia-dali-cuda*)") from None
        done = subprocess.run([tool, str(tar_path), str(idx_path)], capture_output=True, text=True)
        if done.returncode:
            raise ShardingError(f"wds2idx failed on {tar_path}: {done.stderr.strip()}")
        return
    with IndexCreator(str(tar_path), str(idx_path), verbose=False) as creator:
        creator.create_index()


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


class _HashingFile:
    """Write-through file wrapper computing sha256 and size of what passes (the tar stream)."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        return self.f.write(data)


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------

def list_source(dataset: str, root: str | Path, split: str, annotations: str | Path | None = None,
                synsets: str | Path | None = None) -> SourceListing:
    """List a split of ``dataset`` (``ilsvrc`` or ``cub``; the synthetic set is ``cub``)."""
    if dataset == "ilsvrc":
        from .sources import ilsvrc
        return ilsvrc.list_split(root, split, annotations=annotations, synsets=synsets)
    if dataset == "cub":
        from .sources import cub
        if annotations is not None or synsets is not None:
            raise SourceError("--annotations and --synsets apply to ILSVRC only; CUB reads its own metadata files")
        return cub.list_split(root, split)
    raise SourceError(f"unknown dataset {dataset!r}: use 'ilsvrc' or 'cub'")


@dataclass
class ConversionResult:
    """What :func:`convert` did: the final manifest, the split directory, the shard names written,
    kept (checksum matched) and re-indexed in this run, wall seconds (all, and of the shard-writing
    loop alone, i.e. without start-up, listing checks and clean-up) and input bytes read."""

    manifest: dict[str, Any]
    split_dir: Path
    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    reindexed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    write_seconds: float = 0.0
    input_bytes: int = 0


class _Stream:
    """Checked inputs of ``ordered[start:stop]`` in order, with one-item look-ahead."""

    def __init__(self, checker: _Checker, ordered: list[SourceItem], start: int, stop: int):
        self.pos, self.ordered = start, ordered
        self._results = checker.map(ordered[start:stop])
        self._head: Checked | None = None

    def peek(self) -> Checked | None:
        if self._head is None:
            self._head = next(self._results, None)
        return self._head

    def pop(self) -> tuple[int, SourceItem, Checked]:
        head = self.peek()
        assert head is not None
        self._head = None
        self.pos += 1
        return self.pos - 1, self.ordered[self.pos - 1], head


def _package_version() -> str:
    try:
        from importlib.metadata import version
        return version("cstn-wsol")
    except Exception:  # running from a checkout that is not installed
        return "unknown"


def _library_versions() -> dict[str, str]:
    import cv2
    import simplejpeg
    return {"opencv": cv2.__version__, "simplejpeg": simplejpeg.__version__, "numpy": np.__version__}


class _Converter:
    def __init__(self, listing: SourceListing, out_dir: Path, options: ShardOptions):
        self.listing, self.options = listing, options
        self.split = listing.split
        self.dir = Path(out_dir) / self.split
        self.manifest_path = self.dir / MANIFEST
        if listing.split == "train":
            perm = np.random.default_rng(options.seed).permutation(len(listing.items))
            self.ordered = [listing.items[i] for i in perm]
        else:
            self.ordered = list(listing.items)
        self.fingerprint = ""
        self.result = ConversionResult(manifest={}, split_dir=self.dir)
        self.records: list[dict[str, Any]] = []
        self.bar = None
        self._last_postfix = 0.0
        self._t0 = time.time()

    # -- bookkeeping ------------------------------------------------------------------------

    def shard_name(self, number: int) -> str:
        return f"{self.split}-{number:06d}"

    def previous_records(self) -> list[dict[str, Any]]:
        """Shard records of an earlier run with the same source and content options, else []."""
        if not self.manifest_path.is_file():
            return []
        try:
            prev = json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            return []
        same = (prev.get("format") == FORMAT and prev.get("dataset") == self.listing.dataset
                and prev.get("split") == self.split
                and prev.get("source", {}).get("fingerprint") == self.fingerprint
                and prev.get("converter", {}).get("content_options") == self.options.content())
        return list(prev.get("shards", [])) if same else []

    def manifest(self, complete: bool) -> dict[str, Any]:
        source_skips = [{"file": r.relpath, "key": None, "reason": r.reason} for r in self.listing.rejected]
        skipped = source_skips + [s for r in self.records for s in r["skipped"]]
        reencoded = Counter()
        for r in self.records:
            reencoded.update(r["reencoded"])
        total = sum(r["count"] for r in self.records)
        counts = {
            "inputs": len(self.listing.items) + len(self.listing.rejected),
            "samples": total,
            "skipped": len(skipped),
            "reencoded": dict(sorted(reencoded.items())),
            "reencoded_total": sum(reencoded.values()),
            **{k: sum(r[k] for r in self.records)
               for k in ("boxes", "boxes_clipped", "boxes_dropped", "images_all_boxes_dropped", "input_bytes")},
        }
        return {
            "format": FORMAT,
            "complete": complete,
            "dataset": self.listing.dataset,
            "split": self.split,
            "total": total,
            "num_shards": len(self.records),
            "shards": self.records,
            "classes": [asdict(c) for c in self.listing.classes],
            "skipped": skipped,
            "counts": counts,
            "source": {"root": str(self.listing.root), "fingerprint": self.fingerprint,
                       "num_inputs": counts["inputs"]},
            "converter": {"module": __name__, "version": _package_version(), "format": FORMAT,
                          "options": asdict(self.options), "content_options": self.options.content(),
                          "libraries": _library_versions()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def save(self, complete: bool) -> dict[str, Any]:
        manifest = self.manifest(complete)
        _write_json(self.manifest_path, manifest)
        return manifest

    def tick(self, checked: Checked) -> None:
        self.result.input_bytes += checked.input_bytes
        if self.bar is None:
            return
        self.bar.update(1)
        now = time.time()
        if now - self._last_postfix > 0.5:
            self._last_postfix = now
            rate = self.result.input_bytes / 1e6 / max(now - self._t0, 1e-9)
            self.bar.set_postfix_str(f"{rate:.1f} MB/s", refresh=False)

    # -- verification of an earlier run's shard --------------------------------------------------

    def keep_if_intact(self, record: dict[str, Any]) -> bool:
        tar = self.dir / record["name"]
        idx = self.dir / record["index_file"]
        try:
            if tar.stat().st_size != record["bytes"] or sha256_file(tar) != record["sha256"]:
                return False
        except FileNotFoundError:
            return False
        if not idx.is_file() or sha256_file(idx) != record.get("idx_sha256"):
            tmp = idx.with_name(idx.name + ".tmp")
            write_dali_index(tar, tmp)
            os.replace(tmp, idx)
            record["idx_sha256"] = sha256_file(idx)
            self.result.reindexed.append(record["name"])
        return True

    # -- writing ---------------------------------------------------------------------------------

    def write_shard(self, stream: _Stream, number: int, first_index: int, bounded: bool) -> dict[str, Any]:
        """Write the next shard from ``stream``. ``bounded``: take every input the stream holds (a redo
        of a recorded range); else stop before the first sample that does not fit."""
        import webdataset as wds
        name = self.shard_name(number)
        tar, idx = self.dir / f"{name}.tar", self.dir / f"{name}.idx"
        tmp_tar, tmp_idx = tar.with_name(tar.name + ".tmp"), idx.with_name(idx.name + ".tmp")
        opts = self.options
        start, count, payload = stream.pos, 0, 0
        skipped: list[dict[str, Any]] = []
        reencoded: Counter = Counter()
        stats = Counter()
        with open(tmp_tar, "wb") as raw:
            hashing = _HashingFile(raw)
            writer = wds.TarWriter(hashing, encoder=False, mtime=0, user="cstn", group="cstn")
            try:
                while (head := stream.peek()) is not None:
                    full = (count >= opts.samples_per_shard if opts.samples_per_shard is not None
                            else payload >= opts.shard_size_mb * 1e6)
                    if head.jpeg is not None and full and not bounded:
                        break
                    pos, item, checked = stream.pop()
                    self.tick(checked)
                    if checked.jpeg is None:
                        if opts.strict:
                            raise ShardingError(f"{item.path}: {checked.reason} (--strict: no input may be skipped)")
                        skipped.append({"file": item.relpath, "key": item.key, "reason": checked.reason})
                        continue
                    cls = self.listing.classes[item.label]
                    meta = {"synset": cls.id, "name": cls.name, "file": item.relpath}
                    if checked.reencoded:
                        meta["reencoded"] = checked.reencoded
                        reencoded[checked.reencoded] += 1
                    sample = schema.encode_sample(item.key, checked.jpeg, item.label, first_index + count,
                                                  checked.width, checked.height, checked.boxes, meta)
                    payload += writer.write(sample)
                    count += 1
                    stats["boxes"] += len(checked.boxes)
                    stats["boxes_clipped"] += checked.boxes_clipped
                    stats["boxes_dropped"] += checked.boxes_dropped
                    stats["images_all_boxes_dropped"] += int(len(item.boxes) > 0 and len(checked.boxes) == 0)
                    stats["input_bytes"] += checked.input_bytes
            except BaseException:
                writer.close()
                raw.close()
                os.unlink(tmp_tar)
                raise
            writer.close()
        if count == 0:
            os.unlink(tmp_tar)
            return {"count": 0, "inputs": [start, stream.pos], "skipped": skipped}
        write_dali_index(tmp_tar, tmp_idx)
        record = {
            "name": tar.name, "index_file": idx.name, "count": count, "first_index": first_index,
            "bytes": hashing.bytes, "sha256": hashing.sha.hexdigest(), "idx_sha256": sha256_file(tmp_idx),
            "inputs": [start, stream.pos], "skipped": skipped, "reencoded": dict(sorted(reencoded.items())),
            **{k: stats[k] for k in ("boxes", "boxes_clipped", "boxes_dropped", "images_all_boxes_dropped",
                                     "input_bytes")},
        }
        os.replace(tmp_idx, idx)
        os.replace(tmp_tar, tar)
        self.result.written.append(tar.name)
        return record

    def run(self) -> ConversionResult:
        from tqdm import tqdm
        self.dir.mkdir(parents=True, exist_ok=True)
        n = len(self.ordered)
        checker = _Checker(self.options.workers, self.options.reencode_quality)  # workers start meanwhile
        try:
            import webdataset  # noqa: F401  (slow first import: pulls in torch)
            self.fingerprint = self.listing.fingerprint()
            previous = self.previous_records()
            todo = n
            kept_flags = []
            for rec in previous:  # verify before counting work, so the bar's total is right
                kept_flags.append(self.keep_if_intact(rec))
                if kept_flags[-1]:
                    todo -= rec["inputs"][1] - rec["inputs"][0]
            self.bar = tqdm(total=todo, unit="img", desc=f"{self.listing.dataset}/{self.split}", file=sys.stderr,
                            disable=not self.options.progress, mininterval=0.5, dynamic_ncols=True)
            pos, next_index = 0, 0
            t_write = time.time()
            for rec, keep in zip(previous, kept_flags):
                if keep:
                    self.records.append(rec)
                    self.result.kept.append(rec["name"])
                else:  # redo exactly this range; same inputs and options give the same bytes
                    start, stop = rec["inputs"]
                    new = self.write_shard(_Stream(checker, self.ordered, start, stop), len(self.records),
                                           next_index, bounded=True)
                    if new["count"] != rec["count"]:
                        raise ShardingError(
                            f"{self.dir / rec['name']}: rewriting it gave {new['count']} samples where the "
                            f"manifest lists {rec['count']}; the source changed without changing its "
                            f"fingerprint. Delete {self.dir} and convert again.")
                    self.records.append(new)
                next_index += self.records[-1]["count"]
                pos = self.records[-1]["inputs"][1]
                self.save(complete=False)
            tail = _Stream(checker, self.ordered, pos, n)
            while tail.peek() is not None:
                rec = self.write_shard(tail, len(self.records), next_index, bounded=False)
                if rec["count"] == 0:  # only skipped inputs were left: they belong to the last shard
                    if not self.records:
                        raise ShardingError(f"no usable image among the {n} inputs of {self.listing.root} "
                                            f"({self.split}); first reason: {rec['skipped'][0]['reason']}")
                    self.records[-1]["inputs"][1] = rec["inputs"][1]
                    self.records[-1]["skipped"].extend(rec["skipped"])
                else:
                    self.records.append(rec)
                    next_index += rec["count"]
                self.save(complete=False)
            if not self.records:
                raise ShardingError(f"{self.listing.root}: split {self.split!r} has no inputs")
            self.result.write_seconds = time.time() - t_write
        finally:
            checker.close()
            if self.bar is not None:
                self.bar.close()
        manifest = self.manifest(complete=True)
        counts = manifest["counts"]
        if counts["inputs"] != manifest["total"] + counts["skipped"]:  # every input in a shard or skipped
            raise ShardingError(f"internal error: {counts['inputs']} inputs but {manifest['total']} samples "
                                f"+ {counts['skipped']} skipped")
        self.remove_stale()
        _write_json(self.manifest_path, manifest)
        self.result.manifest = manifest
        self.result.seconds = time.time() - self._t0
        return self.result

    def remove_stale(self) -> None:
        keep = {r["name"] for r in self.records} | {r["index_file"] for r in self.records}
        for p in self.dir.iterdir():
            if p.name.startswith(f"{self.split}-") and p.name not in keep and (
                    p.suffix in (".tar", ".idx", ".tmp")):
                p.unlink()


def convert(listing: SourceListing, out_dir: str | Path, options: ShardOptions | None = None) -> ConversionResult:
    """Write ``out_dir/<split>/`` shards, indexes and manifest for ``listing`` (see the module docstring).

    Resumes an interrupted or damaged earlier conversion in the same place. Raises
    :class:`ShardingError` (``strict`` and a bad input, or nothing usable).
    """
    return _Converter(listing, Path(out_dir), options or ShardOptions()).run()


# ---------------------------------------------------------------------------------------------
# Reader side
# ---------------------------------------------------------------------------------------------

@dataclass
class ShardManifest:
    """A validated ``manifest.json``: ``data`` is the parsed JSON, ``split_dir`` its folder."""

    split_dir: Path
    data: dict[str, Any]

    @property
    def split(self) -> str:
        return self.data["split"]

    @property
    def total(self) -> int:
        """Number of samples in the split."""
        return int(self.data["total"])

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.data["shards"]

    @property
    def tar_paths(self) -> list[Path]:
        return [self.split_dir / s["name"] for s in self.shards]

    @property
    def index_paths(self) -> list[Path]:
        """DALI index files, in the order of :attr:`tar_paths`."""
        return [self.split_dir / s["index_file"] for s in self.shards]

    @property
    def classes(self) -> list[dict[str, Any]]:
        """``[{"index", "id", "name"}]``; ``classes[i]["index"] == i``."""
        return self.data["classes"]

    @property
    def num_classes(self) -> int:
        return len(self.data["classes"])

    @property
    def skipped(self) -> list[dict[str, Any]]:
        return self.data["skipped"]


def load_manifest(split_dir: str | Path, verify_checksums: bool = False) -> ShardManifest:
    """Read and check ``split_dir/manifest.json`` (``split_dir`` may also be the manifest file itself).

    Raises :class:`ShardingError` naming the path when the manifest is missing, unreadable, of another
    format or incomplete (an interrupted conversion), when its counts do not add up, or when a listed
    shard or ``.idx`` is missing; with ``verify_checksums`` also when a shard's sha256 differs.
    """
    path = Path(split_dir)
    if path.name == MANIFEST or path.is_file():
        path, split_dir = path, path.parent
    else:
        path, split_dir = path / MANIFEST, path
    if not path.is_file():
        raise ShardingError(f"{path}: manifest not found; convert the split first "
                            f"(python launch/make_shards.py ... --out {split_dir.parent})")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ShardingError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise ShardingError(f"{path}: manifest format {found!r}, expected {FORMAT!r}; convert the split again")
    missing = [k for k in ("complete", "split", "total", "shards", "classes", "skipped") if k not in data]
    if missing:
        raise ShardingError(f"{path}: manifest lacks {missing}")
    if not data["complete"]:
        raise ShardingError(f"{path}: the conversion did not finish (manifest is incomplete); run the same "
                            f"make_shards command again to resume it")
    counted = sum(int(s["count"]) for s in data["shards"])
    if counted != data["total"]:
        raise ShardingError(f"{path}: shard counts add up to {counted}, the manifest total is {data['total']}")
    for s in data["shards"]:
        for member in ("name", "index_file"):
            p = split_dir / s[member]
            if not p.is_file():
                raise ShardingError(f"{p}: listed in {path} but missing")
        if verify_checksums and sha256_file(split_dir / s["name"]) != s["sha256"]:
            raise ShardingError(f"{split_dir / s['name']}: sha256 differs from {path}; the shard is damaged "
                                f"(rerun make_shards to rewrite it)")
    return ShardManifest(split_dir=split_dir, data=data)
