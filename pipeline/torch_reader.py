"""The PyTorch input backend: WebDataset shards read through their DALI index, decoded in worker processes.

Per sample: the member bytes are read with one ``read`` at the offsets the shard's ``.idx`` lists
(the same index DALI uses), the JPEG is decoded by libjpeg-turbo (``simplejpeg``), resized by
OpenCV straight into a shared uint8 batch, optionally mirrored; the worker sends whole uint8
batches (never float32) through the DataLoader's shared memory. Each worker process uses one
thread (``cv2.setNumThreads(1)``, ``torch.set_num_threads(1)``); workers start from a fork server
(:func:`worker_context`), never by forking the training process, on a loader's first pass, and stay
for its lifetime (``persistent_workers``; the epoch reaches them through shared memory).

Why the index and not ``tarfile``: on ILSVRC-sized JPEGs Python's ``tarfile`` parsing (as in
``webdataset.tar_file_iterator``) cost ~370 us per 7-member sample here, more than half the
~630 us libjpeg-turbo decode; the index read costs ~40 us. The sample grouping, member names and
the ``__key__`` rule are WebDataset's; the shuffle buffer is ``webdataset.filters.shuffle``.

Resize (aspect-changing, to ``S x S``): bilinear (``cv2.INTER_LINEAR``, not antialiased) when no
side shrinks by more than :data:`pipeline.request.ANTIALIAS_ABOVE` (2x), as on typical ILSVRC / CUB
images at 320 px; above that ``cv2.INTER_AREA`` (an exact box filter). Measured on one core for
a 1000x750 JPEG to 320 (decode included; mean error against a float box filter): full decode +
bilinear 3.4 ms, 1.7 grey levels (aliased); + ``INTER_AREA`` 5.2 ms, 0.24; libjpeg-turbo's
scaled IDCT to >= 320 + bilinear 2.6 ms, 0.9. Where both sides are >= 4 x S the JPEG is first
decoded at a reduced scale (IDCT by >= 2x, keeping >= 2 x S), then ``INTER_AREA``: 2000x1500
to 320 in 9.8 ms instead of 16.4 ms, error 0.36.

Splitting (same rule as DALI, see :func:`pipeline.request.rank_range`): the split's samples in
shard order are cut into contiguous per-rank ranges; a rank's range is cut at batch boundaries
into contiguous per-worker ranges, so every worker reads whole, sequential stretches of tar.

* Evaluation: shards in manifest order, no shuffle, every sample of the rank's range once; only
  the rank's last batch can be short. Ranks may differ by one sample.
* Training: per epoch the shard ORDER is permuted with ``(seed, epoch)`` (identical on all ranks),
  every rank takes the first ``steps * batch_size`` samples of its range in that order (``steps =
  (N // W) // B``, the same for all ranks), and each worker shuffles its stretch through a
  ``data.shuffle_buffer`` buffer seeded by ``(seed, epoch, rank, worker)`` (the first batch leaves
  once ``max(100, 4 x batch)`` samples are in; the buffer keeps filling up to its size). Shards
  are pre-shuffled at conversion, so contiguous stretches of a permuted shard order are random
  subsets; the few samples at the end of a rank's range that do not fill a batch change from
  epoch to epoch.
  :meth:`TorchLoader.set_epoch` must be called per epoch (as with ``DistributedSampler``).
* ``data.on_corrupt == "skip"``: an undecodable sample is logged with its shard and key, counted
  in :attr:`TorchLoader.skipped`, and (training) replaced by re-reading the worker's stretch so the
  step count stays equal on every rank. Recoverable libjpeg warnings are tolerated, as PIL and DALI
  tolerate them (a few ILSVRC files carry extraneous bytes).

About 430 lines, a tenth of them this description: decode-and-crop, the per-worker dataset and the
loader are this backend's one role, and the dataset's range, shuffle and skip rules read best together.
"""

from __future__ import annotations

import fcntl
import logging
import math
import multiprocessing
import random
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional

import cv2
import numpy as np
import simplejpeg
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import schema
from pipeline.batch import Batch
from pipeline.dali_index import read_index
from pipeline.remote import PREFETCH
from pipeline.request import (ANTIALIAS_ABOVE, CROP_RATIO, CorruptSampleError, LoaderRequest, ShardError,
                              train_steps_per_epoch)

__all__ = ["make_torch_loader", "TorchLoader", "ShardRangeDataset", "decode_resize", "random_resized_crop_box"]

log = logging.getLogger(__name__)


class RawSample(NamedTuple):
    """Undecoded sample: ``data`` holds the bytes from its first to its last member; ``members[ext]``
    = ``(start, size)`` inside ``data``."""

    shard: str
    key: str
    data: bytes
    members: dict


# ---------------------------------------------------------------------------
# Image operations (one image; shared by every mode)
# ---------------------------------------------------------------------------

def random_resized_crop_box(rng: np.random.Generator, width: int, height: int,
                            scale: tuple[float, float], ratio: tuple[float, float] = CROP_RATIO
                            ) -> tuple[int, int, int, int]:
    """``(x, y, w, h)`` of a random crop covering ``scale`` of the area with aspect in ``ratio``.

    The standard Inception-style sampler (as torchvision's ``RandomResizedCrop.get_params`` and
    DALI's ``random_area`` / ``random_aspect_ratio``): ten tries, then the whole image cropped to the
    nearest allowed aspect ratio. Drawn from ``rng`` so a worker's crops follow its seed.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def decode_resize(jpeg, size: int, out: np.ndarray, width: int, height: int,
                  crop: Optional[tuple[int, int, int, int]] = None, flip: bool = False) -> None:
    """Decode ``jpeg`` and write it resized to ``out`` ((size, size, 3) uint8 RGB, written in place).

    Args:
        jpeg: the JPEG bytes (bytes-like).
        size: output side S.
        out: destination, C-contiguous (S, S, 3) uint8.
        width, height: the original size the shard records (checked against the JPEG header).
        crop: optional ``(x, y, w, h)`` region in original pixels to resize instead of the whole image.
        flip: mirror horizontally after resizing.
    Raises ValueError when the JPEG cannot be decoded or its size disagrees with the record.
    """
    header_height, header_width = simplejpeg.decode_jpeg_header(jpeg)[:2]
    if (header_width, header_height) != (width, height):
        raise ValueError(f"the JPEG is {header_width}x{header_height} but the sample records {width}x{height}")
    x, y, w, h = crop if crop is not None else (0, 0, width, height)
    reduce = min(w, h) >= 2 * ANTIALIAS_ABOVE * size
    if reduce:  # libjpeg-turbo scaled IDCT by >= 2x, keeping the region >= 2 x size on both sides
        image = simplejpeg.decode_jpeg(jpeg, colorspace="RGB", strict=False,
                                       min_width=math.ceil(2 * size * width / w),
                                       min_height=math.ceil(2 * size * height / h))
    else:
        image = simplejpeg.decode_jpeg(jpeg, colorspace="RGB", strict=False)
    dh, dw = image.shape[:2]
    if crop is not None or reduce:
        sx, sy = dw / width, dh / height
        x0, y0 = int(round(x * sx)), int(round(y * sy))
        x1, y1 = max(x0 + 1, int(round((x + w) * sx))), max(y0 + 1, int(round((y + h) * sy)))
        image = image[y0:y1, x0:x1]
    rh, rw = image.shape[:2]
    shrink = max(rw / size, rh / size)
    interpolation = cv2.INTER_AREA if shrink > ANTIALIAS_ABOVE else cv2.INTER_LINEAR
    if flip:
        cv2.flip(cv2.resize(image, (size, size), interpolation=interpolation), 1, dst=out)
    else:
        cv2.resize(image, (size, size), dst=out, interpolation=interpolation)


# ---------------------------------------------------------------------------
# The dataset a DataLoader worker runs
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _Shard:
    tar: str
    index: str
    count: int
    name: str = ""
    sha256: Optional[str] = None


def _one_thread(_worker_id: int) -> None:
    """Worker init: one thread each, and gone with the fork server (:mod:`pipeline.worker_guard`)."""
    from pipeline.worker_guard import die_with_parent

    die_with_parent()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


_WORKER_CONTEXT = None


def worker_context():
    """The multiprocessing context of the decode workers: ``forkserver`` with this module preloaded.

    Not ``fork``: a process forked from a parent that has run OpenCV's thread pool (any ``cv2``
    resize or encode in the training process, e.g. a picture of boxes) inherits that pool's locks
    mid-use and hangs in its first ``cv2`` call (seen here in ``cv2.setNumThreads``). The fork
    server is a clean process that imports torch, OpenCV and this module once; workers fork from it
    in milliseconds. It and its workers die with the rank (:mod:`pipeline.worker_guard`).
    """
    global _WORKER_CONTEXT
    if _WORKER_CONTEXT is None:
        context = multiprocessing.get_context("forkserver")
        # pipeline.worker_guard: the fork server dies with the rank that started it
        context.set_forkserver_preload([__name__, "pipeline.worker_guard"])
        _WORKER_CONTEXT = context
    return _WORKER_CONTEXT


class ShardRangeDataset(IterableDataset):
    """Yields :class:`~pipeline.batch.Batch` objects for one rank (see the module docstring)."""

    def __init__(self, request: LoaderRequest, skipped=None, epoch=None):
        self.shards = tuple(_Shard(str(s.tar), str(s.index), s.count, s.name, s.sha256) for s in request.split.shards)
        self.cache, self.split_name = request.cache, request.split.name
        self.total = request.split.total
        self.rank, self.world_size = request.rank, request.world_size
        self.train, self.with_boxes = request.train, request.with_boxes
        self.batch_size, self.size = request.batch_size, request.image_size
        self.flip, self.crop = request.random_flip, request.random_resized_crop
        self.crop_scale = request.crop_scale
        self.shuffle_buffer = request.shuffle_buffer
        self.on_corrupt, self.seed = request.on_corrupt, request.seed
        self._skipped = skipped  # multiprocessing.Value shared with the workers, or None
        self._epoch = epoch  # multiprocessing.Value read by persistent workers at each pass, or None
        self._local_epoch = 0
        start, stop = request.rank_range
        if self.train:
            self.num_batches = train_steps_per_epoch(self.total, self.world_size, self.batch_size)
            stop = start + self.num_batches * self.batch_size
        else:
            self.num_batches = math.ceil((stop - start) / self.batch_size)
        self.start, self.stop = start, stop

    @property
    def num_samples(self) -> int:
        return self.stop - self.start

    @property
    def epoch(self) -> int:
        return int(self._epoch.value) if self._epoch is not None else self._local_epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        if self._epoch is not None:
            self._epoch.value = int(value)
        else:
            self._local_epoch = int(value)

    # -- which bytes this worker reads ---------------------------------------
    def shard_order(self, epoch: int) -> list[int]:
        """Shard order of an epoch: manifest order in evaluation, a ``(seed, epoch)`` permutation in training."""
        if not self.train:
            return list(range(len(self.shards)))
        return [int(i) for i in np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))]

    def worker_range(self, worker: int, num_workers: int) -> tuple[int, int]:
        """``[start, stop)`` positions (in the epoch's shard order) of ``worker``: whole batches, contiguous."""
        slots = self.num_batches
        lo, hi = slots * worker // num_workers, slots * (worker + 1) // num_workers
        return min(self.stop, self.start + lo * self.batch_size), min(self.stop, self.start + hi * self.batch_size)

    def _slices(self, order: list[int], start: int, stop: int) -> list[tuple[int, int, int]]:
        """``(shard, first, last)`` sample slices covering positions ``[start, stop)`` of ``order``."""
        out, base = [], 0
        for shard in order:
            count = self.shards[shard].count
            lo, hi = max(start, base), min(stop, base + count)
            if lo < hi:
                out.append((shard, lo - base, hi - base))
            base += count
        return out

    def _read(self, slices: list[tuple[int, int, int]]) -> Iterator[RawSample]:
        for position, (shard_id, first, last) in enumerate(slices):
            shard = self.shards[shard_id]
            if self.cache is not None:  # a remote root: fetch it (once per node), and the next ones meanwhile
                try:
                    self.cache.ensure(self.split_name, shard.name, shard.sha256)
                except RuntimeError as exc:
                    raise ShardError(str(exc)) from None
                upcoming = [self.shards[i] for i, _, _ in slices[position + 1:position + 1 + PREFETCH]]
                self.cache.prefetch(self.split_name, [(s.name, s.sha256) for s in upcoming])
            samples = read_index(shard.index)
            if len(samples) < last:
                raise ShardError(f"index {shard.index} lists {len(samples)} samples, {last} expected")
            with open(shard.tar, "rb") as f:
                if self.cache is not None:
                    fcntl.flock(f, fcntl.LOCK_SH)  # the cache never evicts a shard being read
                for entry in samples[first:last]:
                    start, end = entry.start, entry.end
                    f.seek(start)
                    data = f.read(end - start)
                    if len(data) != end - start:
                        raise ShardError(f"shard {shard.tar} is truncated: sample {entry.key!r} needs bytes "
                                         f"{start}..{end}, the file ends at {start + len(data)}")
                    members = {ext: (off - start, size) for ext, (off, size) in entry.members.items()}
                    yield RawSample(shard.tar, entry.key, data, members)

    # -- decoding into a batch ---------------------------------------------
    def _count_skip(self, raw: RawSample, exc: Exception, bad: set) -> None:
        bad.add((raw.shard, raw.key))
        if self._skipped is not None:
            with self._skipped.get_lock():
                self._skipped.value += 1
        log.warning("skipping corrupt sample %r in shard %s: %s", raw.key, raw.shard, exc)

    def _batches(self, source: Iterator[RawSample], rng: np.random.Generator, limit: Optional[int],
                 bad: set) -> Iterator[Batch]:
        """Decode ``source`` into batches; at most ``limit`` full batches (training) or all (evaluation).
        Skipped samples are added to ``bad`` as ``(shard, key)``."""
        size, bsz = self.size, self.batch_size
        done = 0
        while limit is None or done < limit:
            images = torch.empty((bsz, size, size, 3), dtype=torch.uint8)
            pixels = images.numpy()
            labels, indices = np.empty(bsz, np.int64), np.empty(bsz, np.int64)
            sizes, flipped, boxes = np.empty((bsz, 2), np.int64), np.zeros(bsz, bool), []
            n = 0
            for raw in source:
                view = memoryview(raw.data)
                member = {ext: view[off:off + length] for ext, (off, length) in raw.members.items()}
                try:
                    label, index, (width, height), box = schema.decode_binary(member)
                    crop = random_resized_crop_box(rng, width, height, self.crop_scale) if self.crop else None
                    flip = bool(rng.random() < 0.5) if self.flip else False
                    decode_resize(member[schema.IMAGE], size, pixels[n], width, height, crop=crop, flip=flip)
                except (ValueError, KeyError, IndexError) as exc:
                    if self.on_corrupt != "skip":
                        raise CorruptSampleError(f"shard {raw.shard}: sample {raw.key!r} cannot be decoded: "
                                                 f"{exc}") from None
                    self._count_skip(raw, exc, bad)
                    continue
                labels[n], indices[n], sizes[n], flipped[n] = label, index, (width, height), flip
                if self.with_boxes:
                    boxes.append(schema.flip_boxes(box, width) if flip else box)
                n += 1
                if n == bsz:
                    break
            if n == 0 or (limit is not None and n < bsz):
                return  # source exhausted (training refills from the caller)
            yield self._assemble(images[:n], labels[:n], indices[:n], sizes[:n], flipped[:n], boxes)
            done += 1
            if n < bsz:
                return

    def _assemble(self, images, labels, indices, sizes, flipped, boxes) -> Batch:
        batch = Batch(images=images.permute(0, 3, 1, 2), labels=torch.from_numpy(labels.copy()),
                      indices=torch.from_numpy(indices.copy()),
                      flipped=torch.from_numpy(flipped.copy()) if self.flip else None)
        if self.with_boxes:
            most = max((len(b) for b in boxes), default=0)
            padded = np.zeros((len(boxes), most, 4), np.float32)
            for i, b in enumerate(boxes):
                padded[i, : len(b)] = b
            batch.boxes = torch.from_numpy(padded)
            batch.num_boxes = torch.tensor([len(b) for b in boxes], dtype=torch.int64)
            batch.sizes = torch.from_numpy(sizes.copy())
        return batch

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is None:
            cv2.setNumThreads(1)
        epoch = self.epoch
        start, stop = self.worker_range(worker, num_workers)
        if start >= stop:
            return
        slices = self._slices(self.shard_order(epoch), start, stop)
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker])  # crops and flips
        shuffle_rng = random.Random(int(rng.integers(2 ** 63)))  # webdataset's shuffle wants random.Random
        if not self.train:
            yield from self._batches(self._read(slices), rng, None, set())
            return
        quota = (stop - start) // self.batch_size
        bad: set = set()
        initial = min(self.shuffle_buffer, max(100, 4 * self.batch_size))  # first batch soon, buffer fills on

        def passes() -> Iterator[RawSample]:
            """The stretch, shuffled; again (without known-bad samples) only while skips left a gap."""
            while True:
                good = (raw for raw in self._read(slices) if (raw.shard, raw.key) not in bad)
                count = 0
                for raw in wds.filters.shuffle(bufsize=self.shuffle_buffer, initial=initial, rng=shuffle_rng)(good):
                    count += 1
                    yield raw
                if count == 0:
                    names = sorted({self.shards[s].tar for s, _, _ in slices})
                    raise CorruptSampleError(f"rank {self.rank} worker {worker}: none of its {stop - start} "
                                             f"samples in {names} can be decoded")

        yield from self._batches(passes(), rng, quota, bad)


class TorchLoader:
    """Iterable of :class:`~pipeline.batch.Batch` from the torch backend (see the module docstring).

    ``images`` are (B, 3, S, S) uint8 NCHW tensors whose memory is channels-last (the decoder's
    HWC output, no transposing copy); ``.contiguous()`` gives a dense NCHW copy when needed.
    """

    backend = "torch"

    def __init__(self, request: LoaderRequest):
        context = worker_context()
        self._skipped = context.Value("q", 0)
        self.dataset = ShardRangeDataset(request, self._skipped, context.Value("q", 0))
        self._loader: Optional[DataLoader] = None
        self.num_workers = request.num_workers
        self.train = request.train
        self.batch_size = request.batch_size
        self.total_samples = request.split.total
        self.num_samples = self.dataset.num_samples
        self.num_batches = self.dataset.num_batches

    @property
    def skipped(self) -> int:
        """Corrupt samples skipped so far (``data.on_corrupt == "skip"``), over all workers and epochs."""
        return int(self._skipped.value)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shard order and shuffle seeds (call before iterating the epoch)."""
        self.dataset.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        if self._loader is None:  # workers start on the first pass and stay for the loader's lifetime
            workers = min(self.num_workers, self.num_batches)
            self._loader = DataLoader(self.dataset, batch_size=None, num_workers=workers,
                                      worker_init_fn=_one_thread if workers else None,
                                      multiprocessing_context=worker_context() if workers else None,
                                      persistent_workers=workers > 0, prefetch_factor=2 if workers else None)
        yield from self._loader


def make_torch_loader(request: LoaderRequest) -> TorchLoader:
    """Backend factory (the registry's signature): the torch reader for ``request``."""
    return TorchLoader(request)
