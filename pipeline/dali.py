"""The DALI input backend: ``fn.readers.webdataset`` over the shards and their ``.idx`` files.

One pipeline definition (:func:`wsol_pipeline`) serves the GPU and the CPU: only the decoder's
device string differs (``"mixed"`` = nvJPEG on the GPU, with ``device_id = local_rank``; or
``"cpu"``, with ``device_id = None``), and every image operator after the decoder runs where its
input lives. :func:`dali_placement` makes that choice from ``torch.cuda.is_available()`` BEFORE
anything is built: DALI raises at build time when asked for ``"mixed"`` without a GPU, so a
CPU-only machine never gets there.

Per sample: the reader returns the ``jpg`` bytes and the binary twins ``lab`` (int32), ``gid``
(int64), ``wh`` (int32 x 2) and ``box`` (float32 x 4n) of :mod:`pipeline.schema` typed by the
reader's ``dtypes``. Images are resized (aspect-changing) to ``S x S`` with bilinear interpolation;
antialiased only where a side shrinks by more than :data:`pipeline.request.ANTIALIAS_ABOVE` (a
per-sample DALI conditional on the crop's size; measured here on 500x375 JPEGs to 320: 504 img/s
antialiased everywhere vs 718 img/s with this rule, DALI CPU, 2 threads), then mirrored (training,
``fn.random.coin_flip``) and transposed to CHW by ``crop_mirror_normalize`` with uint8 output.
Boxes, when carried, are flipped by ``fn.bb_flip(ltrb=True, horizontal=coin)`` with the same coin,
in coordinates normalised by the original size, and zero-padded per batch by ``fn.pad``; they
stay in original pixels (the :class:`~pipeline.batch.Batch` contract).

Sharding: ``shard_id = rank``, ``num_shards = world_size`` (contiguous sample ranges, the rule of
:func:`pipeline.request.rank_range`).

* Evaluation: ``random_shuffle=False``, ``stick_to_shard=True``, ``pad_last_batch=True`` and an
  iterator with ``reader_name`` and ``LastBatchPolicy.PARTIAL``: each sample exactly once, the
  padding dropped.
* Training: ``random_shuffle=True`` with an ``initial_fill = data.shuffle_buffer`` buffer and
  ``stick_to_shard=False`` (a rank moves to the next range every reader epoch). The iterator
  (``LastBatchPolicy.DROP``) runs as an endless stream, and a training epoch is the next ``(N // W)
  // B`` batches of it, so all ranks run the same number of steps even where DALI's ranges differ
  by a sample. DALI's shuffle is seeded once (``cfg.train.seed`` and the rank) and continues
  across epochs; :meth:`DaliLoader.set_epoch` only records the epoch.
* A corrupt JPEG stops the pipeline with DALI's decoder error, re-raised as
  :class:`~pipeline.request.CorruptSampleError` naming this rank's shards; DALI cannot skip a sample,
  so ``data.on_corrupt == "skip"`` is refused for this backend (``auto`` picks torch then).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from pipeline import schema
from pipeline.batch import Batch
from pipeline.request import (ANTIALIAS_ABOVE, CROP_RATIO, CorruptSampleError, LoaderRequest, ShardError,
                              train_steps_per_epoch)

__all__ = ["DaliPlacement", "dali_placement", "wsol_pipeline", "DaliLoader", "make_dali_loader", "READER"]

#: name of the reader operator (the iterator's ``reader_name``)
READER = "shards"
#: reader outputs (the binary twins of the schema, ``schema.DALI_EXTS``) and the dtype DALI gives each
_MEMBERS = schema.DALI_EXTS
_DTYPES = (types.UINT8, types.INT32, types.INT64, types.INT32, types.FLOAT)


@dataclass(frozen=True)
class DaliPlacement:
    """Where the pipeline runs: decoder device string and the pipeline's ``device_id``."""

    decoder: str
    device_id: Optional[int]

    @property
    def on_gpu(self) -> bool:
        return self.decoder == "mixed"


def dali_placement(local_rank: int, cuda_available: Optional[bool] = None) -> DaliPlacement:
    """``mixed`` on GPU ``local_rank`` when CUDA is available, else ``cpu`` with ``device_id=None``."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    return DaliPlacement("mixed", int(local_rank)) if cuda_available else DaliPlacement("cpu", None)


@pipeline_def(enable_conditionals=True)
def wsol_pipeline(tars: list[str], indexes: list[str], shard_id: int, num_shards: int, train: bool,
                  image_size: int, random_flip: bool, random_resized_crop: bool,
                  crop_scale: tuple[float, float], with_boxes: bool, decoder: str, shuffle_buffer: int,
                  antialias_above: float = ANTIALIAS_ABOVE):
    """The one graph of both devices (``antialias_above=0`` antialiases every resize, DALI's default).

    Outputs, per sample:

    images (3, S, S) uint8; labels (1,) int32; indices (1,) int64; then ``flipped`` (1,) int32 when
    ``random_flip``; then boxes (n_max, 4) float32 original pixels zero-padded over the batch,
    num_boxes () int64 and sizes (2,) int32 (width, height) when ``with_boxes``.
    """
    jpegs, labels, indices, sizes, boxes = fn.readers.webdataset(
        paths=tars, index_paths=indexes, ext=list(_MEMBERS), dtypes=list(_DTYPES),
        missing_component_behavior="error", shard_id=shard_id, num_shards=num_shards,
        random_shuffle=train, initial_fill=shuffle_buffer, stick_to_shard=not train,
        pad_last_batch=not train, name=READER)
    original_hw = fn.peek_image_shape(jpegs, dtype=types.INT64)[0:2]
    if random_resized_crop:
        anchor, region_hw = fn.random_crop_generator(original_hw, random_area=list(crop_scale),
                                                     random_aspect_ratio=list(CROP_RATIO), num_attempts=10)
        images = fn.decoders.image_slice(jpegs, anchor, region_hw, axis_names="HW", device=decoder,
                                         output_type=types.RGB)
    else:
        region_hw = original_hw
        images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
    shrink = fn.reductions.max(fn.cast(region_hw, dtype=types.FLOAT)) / float(image_size)
    if shrink > antialias_above:  # per-sample: antialiasing only where bilinear would skip pixels
        images = fn.resize(images, resize_x=image_size, resize_y=image_size, antialias=True,
                           interp_type=types.INTERP_LINEAR)
    else:
        images = fn.resize(images, resize_x=image_size, resize_y=image_size, antialias=False,
                           interp_type=types.INTERP_LINEAR)
    coin = fn.random.coin_flip(probability=0.5) if random_flip else 0
    images = fn.crop_mirror_normalize(images, mirror=coin, dtype=types.UINT8, output_layout="CHW")
    outputs = [images, labels, indices]
    if random_flip:
        outputs.append(coin)
    if with_boxes:
        boxes = fn.reshape(boxes, shape=[-1, 4])
        if random_flip:
            wh = fn.cast(sizes, dtype=types.FLOAT)
            scale = fn.cat(wh, wh)  # (w, h, w, h)
            boxes = fn.bb_flip(boxes / scale, ltrb=True, horizontal=coin) * scale
        outputs += [fn.pad(boxes, fill_value=0.0), boxes.shape(dtype=types.INT64)[0], sizes]
    return tuple(outputs)


def _overlapping(request: LoaderRequest) -> list[str]:
    """Shards holding part of the rank's evaluation range."""
    start, stop = request.rank_range
    out, base = [], 0
    for shard in request.split.shards:
        if base < stop and start < base + shard.count:
            out.append(str(shard.tar))
        base += shard.count
    return out


def _output_names(random_flip: bool, with_boxes: bool) -> list[str]:
    names = ["images", "labels", "indices"]
    if random_flip:
        names.append("flipped")
    if with_boxes:
        names += ["boxes", "num_boxes", "sizes"]
    return names


class DaliLoader:
    """Iterable of :class:`~pipeline.batch.Batch` from a DALI pipeline (see the module docstring).

    ``images`` are contiguous (B, 3, S, S) uint8, on GPU ``local_rank`` when decoding there; the
    other fields are CPU tensors.
    """

    backend = "dali"

    def __init__(self, request: LoaderRequest, placement: Optional[DaliPlacement] = None,
                 antialias_above: float = ANTIALIAS_ABOVE):
        self.placement = placement or dali_placement(request.local_rank)
        if request.cache is not None:  # a remote root: DALI opens every shard at build, so fetch them first
            try:
                request.cache.ensure_all(request.split.name, [(s.name, s.sha256) for s in request.split.shards])
            except RuntimeError as exc:
                raise ShardError(str(exc)) from None
        self.train = request.train
        self.with_boxes = request.with_boxes
        self.random_flip = request.random_flip
        self.shards = [str(s.tar) for s in request.split.shards]
        self.rank = request.rank
        self.read_shards = self.shards if request.train else _overlapping(request)
        self.total_samples = request.split.total
        start, stop = request.rank_range
        if self.train:
            self.num_batches = train_steps_per_epoch(request.split.total, request.world_size, request.batch_size)
            self.num_samples = self.num_batches * request.batch_size
        else:
            self.num_samples = stop - start
            self.num_batches = -(-self.num_samples // request.batch_size)
        self.epoch = 0
        self.pipeline = wsol_pipeline(
            tars=self.shards, indexes=[str(s.index) for s in request.split.shards],
            shard_id=request.rank, num_shards=request.world_size, train=request.train,
            image_size=request.image_size, random_flip=request.random_flip,
            random_resized_crop=request.random_resized_crop, crop_scale=request.crop_scale,
            with_boxes=request.with_boxes, decoder=self.placement.decoder, shuffle_buffer=request.shuffle_buffer,
            antialias_above=antialias_above,
            batch_size=request.batch_size, num_threads=max(1, request.num_workers),
            device_id=self.placement.device_id, seed=request.seed * 1000 + request.rank + 1,
            prefetch_queue_depth=2)
        self._names = _output_names(request.random_flip, request.with_boxes)
        try:
            self.pipeline.build()
            self.iterator = DALIGenericIterator(
                self.pipeline, self._names, reader_name=READER, auto_reset=True,
                last_batch_policy=LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL,
                prepare_first_batch=False)
        except RuntimeError as exc:
            raise self._error(exc) from None
        self._stream: Optional[Iterator[Batch]] = None
        self._pass_open = False  # an evaluation pass was left before its end

    def _error(self, exc: BaseException) -> RuntimeError:
        """DALI's error, shortened to its operator and failure lines, naming the shards this rank reads."""
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        keep = [ln for ln in lines if ("error" in ln.lower() or "failure" in ln.lower() or "invalid" in ln.lower())
                and not ln.lower().startswith(("critical error in pipeline", "current pipeline object"))]
        detail = " ".join(keep or lines[:3]) or type(exc).__name__
        decode = any("decod" in ln.lower() or "codec" in ln.lower() for ln in lines)
        what = "a JPEG in one of its shards cannot be decoded" if decode else "DALI failed reading its shards"
        return CorruptSampleError(f"DALI pipeline of rank {self.rank}: {what} (shards: {', '.join(self.read_shards)}); "
                                  f"{detail}. data.backend=torch names the sample, data.on_corrupt=skip skips it")

    def _to_batch(self, out: dict) -> Batch:
        batch = Batch(images=out["images"], labels=out["labels"].reshape(-1).long(),
                      indices=out["indices"].reshape(-1).long(),
                      flipped=out["flipped"].reshape(-1).bool() if "flipped" in out else None)
        if self.with_boxes:
            batch.boxes = out["boxes"].float()
            batch.num_boxes = out["num_boxes"].reshape(-1).long()
            batch.sizes = out["sizes"].reshape(-1, 2).long()
        return batch

    def _batches(self) -> Iterator[Batch]:
        """One pass of the DALI iterator (one reader epoch of this rank's range)."""
        try:
            for outputs in self.iterator:
                yield self._to_batch(outputs[0])
        except RuntimeError as exc:
            raise self._error(exc) from None

    def _drain(self) -> None:
        """Finish a pass left half-way, so the next one starts at the range's first sample
        (DALI's iterator cannot be reset mid-epoch)."""
        for _ in self._batches():
            pass

    def _endless(self) -> Iterator[Batch]:
        while True:
            yield from self._batches()

    def set_epoch(self, epoch: int) -> None:
        """Records the epoch; DALI's reader reshuffles by itself (its seed is fixed at build)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        if not self.train:
            if self._pass_open:
                self._drain()
            self._pass_open = True
            yield from self._batches()
            self._pass_open = False
            return
        if self._stream is None:
            self._stream = self._endless()
        for _ in range(self.num_batches):
            yield next(self._stream)


def make_dali_loader(request: LoaderRequest) -> DaliLoader:
    """Backend factory (the registry's signature): a DALI loader for ``request``."""
    return DaliLoader(request)
