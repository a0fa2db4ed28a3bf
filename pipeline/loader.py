"""Input pipeline entry point: one ``build_loader`` for every backend, one :class:`~pipeline.batch.Batch`.

``build_loader(cfg, split, rank, world_size)`` returns an iterable of :class:`~pipeline.batch.Batch`
with ``num_samples`` (this rank's real samples per pass), ``num_batches`` (batches per pass),
``total_samples`` (the split's size from its manifest) and ``set_epoch(epoch)``.

Backends (``cfg.data.backend``):

``dali``
    :mod:`pipeline.dali`: ``fn.readers.webdataset`` with the ``.idx`` files, JPEG decode on the GPU
    (nvJPEG, ``"mixed"``) when CUDA is available, on the CPU otherwise.
``torch``
    :mod:`pipeline.torch_reader`: the shards read through their ``.idx`` offsets, libjpeg-turbo
    decode (simplejpeg), OpenCV resize, uint8 batches from DataLoader worker processes.
``auto``
    DALI with GPU decode when CUDA is available; the torch reader on a CPU-only machine (it
    measured faster there than DALI's CPU operators, see ``bench/loader.py``), and whenever DALI
    does not import or ``data.on_corrupt == "skip"`` (DALI's decoders cannot skip a bad sample).
    The choice depends only on the software and hardware present, so every rank of a homogeneous
    job makes the same one; rank 0 logs it once with the reason.

The backend registry (:func:`backends`) holds ``torch`` always and ``dali`` only when
``nvidia.dali`` imports; every entry has the same factory signature ``factory(request) -> loader``
with a :class:`LoaderRequest`.

This module only chooses and builds. What both backends share (the request, the split, the errors,
the rank arithmetic and the contracts they keep) is :mod:`pipeline.request`; the split's manifest is
:mod:`pipeline.manifest`, its DALI indexes and the shard checks :mod:`pipeline.dali_index`. Shards are
checked when the loader is built (:func:`pipeline.dali_index.check_shard`): a missing, truncated,
stale or swapped shard raises :class:`~pipeline.request.ShardError` naming it, before any worker or
DALI thread starts.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Optional

from pipeline.dali_index import check_shard
from pipeline.manifest import read_split
from pipeline.remote import is_remote
from pipeline.request import BatchLoader, LoaderRequest, train_steps_per_epoch

__all__ = ["build_loader", "make_request", "choose_backend", "backends"]

log = logging.getLogger(__name__)

Factory = Callable[[LoaderRequest], BatchLoader]


_REGISTRY: Optional[dict[str, Factory]] = None


_DALI_IMPORT_ERROR: Optional[BaseException] = None


def backends() -> dict[str, Factory]:
    """The backend registry: ``torch`` always, ``dali`` only when ``nvidia.dali`` imports."""
    global _REGISTRY, _DALI_IMPORT_ERROR
    if _REGISTRY is None:
        from pipeline.torch_reader import make_torch_loader
        registry: dict[str, Factory] = {"torch": make_torch_loader}
        try:
            from pipeline.dali import make_dali_loader
        except ImportError as exc:  # no DALI wheel for this platform / CUDA
            _DALI_IMPORT_ERROR = exc
        else:
            registry["dali"] = make_dali_loader
        _REGISTRY = registry
    return _REGISTRY


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def choose_backend(requested: str, on_corrupt: str = "fail") -> tuple[str, str]:
    """``(backend, reason)`` for ``data.backend = requested``; a deterministic function of what is installed.

    Raises ValueError for ``dali`` when DALI does not import or when ``on_corrupt == "skip"``.
    """
    available = backends()
    if requested == "torch":
        return "torch", "data.backend=torch"
    if requested == "dali":
        if "dali" not in available:
            raise ValueError(f"data.backend=dali but nvidia.dali does not import ({_DALI_IMPORT_ERROR}); "
                             f"install nvidia-dali or use data.backend=torch")
        if on_corrupt == "skip":
            raise ValueError("data.on_corrupt=skip needs per-sample error handling, which DALI's decoders lack; "
                             "use data.backend=torch (or auto) or data.on_corrupt=fail")
        return "dali", "data.backend=dali"
    if requested != "auto":
        raise ValueError(f"data.backend={requested!r} is not one of ['auto', 'dali', 'torch']")
    if "dali" not in available:
        return "torch", f"auto: DALI does not import ({_DALI_IMPORT_ERROR})"
    if on_corrupt == "skip":
        return "torch", "auto: data.on_corrupt=skip, which only the torch reader supports"
    if _cuda_available():
        return "dali", "auto: CUDA available, DALI decodes JPEGs on the GPU (nvJPEG)"
    return "torch", ("auto: no CUDA; on CPU the torch reader (simplejpeg + OpenCV, uint8) measured faster than "
                     "DALI's CPU operators (bench/loader.py)")


_LOGGED: set = set()


def _log_once(message: str) -> None:
    if message in _LOGGED:
        return
    _LOGGED.add(message)
    if not log.hasHandlers():  # nobody configured logging: still show the choice
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    log.info(message)


def _local_rank(rank: int) -> int:
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    import torch
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return rank % count if count else 0


def build_loader(cfg, split: str, rank: int, world_size: int, train: Optional[bool] = None, *,
                 with_boxes: Optional[bool] = None, local_rank: Optional[int] = None,
                 backend: Optional[str] = None) -> BatchLoader:
    """The loader of ``split`` for ``rank`` of ``world_size``.

    Args:
        cfg: a :class:`cstn.config.Config` (reads ``cfg.data`` and ``cfg.train.seed``).
        split: split directory name under ``cfg.data.root``.
        rank, world_size: this process's rank among ``world_size`` (no process group is needed).
        train: training mode; default ``split == cfg.data.train_split``.
        with_boxes: also deliver boxes, box counts and original sizes; default ``not train``
            (weak supervision: training never reads boxes). Not with a random-resized crop.
        local_rank: GPU index for DALI; default ``$LOCAL_RANK`` or ``rank % cuda.device_count()``.
        backend: overrides ``cfg.data.backend`` (``auto``, ``dali``, ``torch``).
    Returns:
        an iterable of :class:`~pipeline.batch.Batch` (uint8 NCHW images) with ``num_samples``,
        ``num_batches``, ``total_samples``, ``backend`` and ``set_epoch(epoch)``.
    Raises:
        ValueError for inconsistent settings, FileNotFoundError for a missing split,
        :class:`~pipeline.request.ShardError` (or :class:`~pipeline.shard_worker.ShardingError` from the manifest check)
        naming the file for a missing, truncated or stale shard or index.
    """
    name, reason = choose_backend(backend or cfg.data.backend, cfg.data.on_corrupt)
    if rank == 0:
        _log_once(f"input backend {name} ({reason})")
    request = make_request(cfg, split, rank, world_size, train, with_boxes=with_boxes, local_rank=local_rank)
    return backends()[name](request)


def make_request(cfg, split: str, rank: int, world_size: int, train: Optional[bool] = None, *,
                 with_boxes: Optional[bool] = None, local_rank: Optional[int] = None) -> LoaderRequest:
    """Validate the settings, read the split's manifest, check every shard, and resolve a :class:`LoaderRequest`
    (arguments as :func:`build_loader`)."""
    data = cfg.data
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    train = (split == data.train_split) if train is None else bool(train)
    with_boxes = (not train) if with_boxes is None else bool(with_boxes)
    if not train and not with_boxes:
        with_boxes = True  # evaluation always needs its ground truth
    if train and with_boxes and data.random_resized_crop:
        raise ValueError("boxes cannot follow a random-resized crop (they would leave the image); "
                         "set data.random_resized_crop=false or with_boxes=False")
    if data.on_corrupt not in ("fail", "skip"):
        raise ValueError(f"data.on_corrupt={data.on_corrupt!r} is not one of ['fail', 'skip']")
    scale = tuple(float(v) for v in data.crop_scale)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"data.crop_scale={list(data.crop_scale)} must be [low, high] with 0 < low <= high <= 1")

    cache = None
    if is_remote(data.root):  # fetch the manifest and indexes into the node cache; tars come when read
        from pipeline.remote import ShardCache

        cache = ShardCache(str(data.root), data.cache_dir or None,
                           int(data.cache_max_gb * 2 ** 30) if data.cache_max_gb else None)
        info = read_split(cache.prepare(split).parent, split, fetched=False)
    else:
        info = read_split(data.root, split)
        for shard in info.shards:  # a fetched tar was checked against its sha256 instead
            check_shard(shard, mode=data.verify_shards)
    batch_size = data.batch_size if train else data.eval_batch_size
    if train and train_steps_per_epoch(info.total, world_size, batch_size) == 0:
        raise ValueError(f"split {split!r} has {info.total} samples: fewer than world size {world_size} x batch "
                         f"{batch_size}, so a training epoch would have no full batch")
    return LoaderRequest(
        split=info, rank=rank, world_size=world_size,
        local_rank=_local_rank(rank) if local_rank is None else local_rank,
        train=train, with_boxes=with_boxes, batch_size=batch_size, image_size=data.image_size, cache=cache,
        num_workers=max(0, data.num_workers), random_flip=bool(data.random_flip) and train,
        random_resized_crop=bool(data.random_resized_crop) and train, crop_scale=scale,
        shuffle_buffer=max(1, data.shuffle_buffer), on_corrupt=data.on_corrupt, seed=int(cfg.train.seed))
