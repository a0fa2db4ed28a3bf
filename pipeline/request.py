"""What both input backends share: the loader request, the split as they see it, the errors, the rank arithmetic.

A leaf module: it imports only :mod:`pipeline.schema`, so :mod:`pipeline.dali` and
:mod:`pipeline.torch_reader` depend on it (and on :mod:`pipeline.dali_index`) and never on the
backend choice in :mod:`pipeline.loader`.

Contracts shared by both backends (so they deliver the same samples to the same rank):

* Rank split: the split's samples, concatenated in shard order, are cut into ``world_size``
  contiguous ranges, rank ``r`` reading ``[floor(r N / W), floor((r + 1) N / W))`` -- DALI's own
  ``shard_id`` / ``num_shards`` rule (:func:`rank_range`).
* Evaluation (``train=False``): every sample exactly once over all ranks, in file order; ranks may
  differ by one sample; the last batch of a rank may be short. ``Batch.indices`` carries the global
  sample index, so a merge keeps each index once.
* Training (``train=True``): every rank runs ``(N // W) // batch_size`` full batches per epoch
  (:func:`train_steps_per_epoch`, the same on all ranks, so collectives never wait for a rank that
  ran out). See each backend for how the rest of its range is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Protocol

from pipeline.batch import Batch

__all__ = ["ShardError", "CorruptSampleError", "ShardInfo", "SplitInfo", "LoaderRequest", "BatchLoader",
           "rank_range", "train_steps_per_epoch", "ANTIALIAS_ABOVE", "CROP_RATIO"]

#: Resizes that shrink a side by more than this factor are antialiased (OpenCV ``INTER_AREA`` in the
#: torch reader, ``antialias=True`` in DALI); below it both use plain bilinear interpolation, which
#: already reads every source pixel and costs a fraction of an antialiased filter.
ANTIALIAS_ABOVE = 2.0

#: aspect-ratio range of the random-resized crop (torchvision's), both backends
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


class ShardError(RuntimeError):
    """A shard (tar or its ``.idx``) is missing, truncated or does not match its index; names the file."""


class CorruptSampleError(RuntimeError):
    """A sample inside a shard cannot be decoded; the message names the shard and the sample key."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard of a split.

    Attributes:
        name: file name of the tar inside the split directory.
        tar: path of the tar.
        index: path of its DALI ``.idx`` (same stem).
        count: samples in the shard (from the manifest).
        nbytes: tar size in bytes when the manifest records it, else None.
        first_index: global index of its first sample, sha256 and idx_sha256 of the tar and the
            ``.idx``, first_key and last_key of its samples, when the manifest records them (the
            shard-identity checks of :func:`check_shard`).
    """

    name: str
    tar: Path
    index: Path
    count: int
    nbytes: Optional[int] = None
    first_index: Optional[int] = None
    sha256: Optional[str] = None
    idx_sha256: Optional[str] = None
    first_key: Optional[str] = None
    last_key: Optional[str] = None


@dataclass(frozen=True)
class SplitInfo:
    """A split directory's manifest, as the loaders need it.

    Attributes:
        name: split name (``train``, ``val``, ``test``).
        directory: ``<data.root>/<split>``.
        shards: shards in manifest order (the order sample ranges are cut in).
        total: samples in the split (sum of the shard counts).
        classes: class names or ids, index = label, when the manifest lists them.
    """

    name: str
    directory: Path
    shards: tuple[ShardInfo, ...]
    total: int
    classes: tuple[str, ...] = ()


def rank_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of the split's samples (shard order) read by ``rank``: DALI's sharding rule."""
    return total * rank // world_size, total * (rank + 1) // world_size


def train_steps_per_epoch(total: int, world_size: int, batch_size: int) -> int:
    """Full batches every rank runs per training epoch: the smallest rank range, whole batches."""
    return (total // world_size) // batch_size


@dataclass(frozen=True)
class LoaderRequest:
    """Everything a backend needs, resolved once by :func:`build_loader`.

    Attributes:
        split: the split's manifest and shards (all checked).
        rank, world_size: this process's rank and the number of ranks.
        local_rank: GPU of this process on its node (DALI ``device_id`` when CUDA is available).
        train: training mode (shuffle, flip/crop, equal steps) or evaluation (exactly once, in order).
        with_boxes: deliver ``boxes``/``num_boxes``/``sizes`` (always in evaluation).
        batch_size: samples per batch.
        image_size: side of the square network input in pixels.
        num_workers: decode processes (torch) or threads (DALI); 0 = decode in the calling process.
        random_flip, random_resized_crop, crop_scale: training augmentation.
        shuffle_buffer: samples held for in-reader shuffling in training.
        on_corrupt: ``fail`` or ``skip`` for an undecodable sample.
        seed: base seed (``cfg.train.seed``); each rank, worker and epoch derives its own.
        cache: the node-local shard cache of a remote ``data.root`` (see the field).
    """

    split: SplitInfo
    rank: int
    world_size: int
    local_rank: int
    train: bool
    with_boxes: bool
    batch_size: int
    image_size: int
    num_workers: int
    random_flip: bool
    random_resized_crop: bool
    crop_scale: tuple[float, float]
    shuffle_buffer: int
    on_corrupt: str
    seed: int
    cache: Optional[object] = None
    """A :class:`pipeline.remote.ShardCache` when ``data.root`` is a URL: tars are fetched into the split
    directory (``split.directory``, in the cache) before they are read; None for a local root."""

    @property
    def rank_range(self) -> tuple[int, int]:
        return rank_range(self.split.total, self.rank, self.world_size)


class BatchLoader(Protocol):
    """What every backend factory returns."""

    backend: str
    num_samples: int
    """This rank's real samples per pass (training: ``num_batches * batch_size``)."""
    num_batches: int
    """Batches per pass (training: the same on every rank)."""
    total_samples: int
    """Samples in the whole split (the manifest total)."""

    def __iter__(self) -> Iterator[Batch]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...
