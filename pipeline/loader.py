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

Contracts shared by both backends (so they deliver the same samples to the same rank):

* Rank split: the split's samples, concatenated in shard order, are cut into ``world_size``
  contiguous ranges, rank ``r`` reading ``[floor(r N / W), floor((r + 1) N / W))`` -- DALI's own
  ``shard_id`` / ``num_shards`` rule (:func:`rank_range`).
* Evaluation (``train=False``): every sample exactly once over all ranks, in file order; ranks may
  differ by one sample; the last batch of a rank may be short. ``Batch.indices`` carries the global
  sample index, so a merge keeps each index once.
* Training (``train=True``): every rank runs ``(N // W) // batch_size`` full batches per epoch (the
  same on all ranks, so collectives never wait for a rank that ran out). See each backend for how
  the rest of its range is dropped.
* Shards are checked when the loader is built (:func:`check_shard`): a missing tar or ``.idx``, a
  truncated tar, or an index that does not describe its tar (stale) raises :class:`ShardError`
  naming the shard, before any worker or DALI thread starts.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol

from pipeline import schema
from pipeline.batch import Batch
from pipeline.remote import is_remote

__all__ = [
    "ShardError", "CorruptSampleError", "ShardInfo", "SplitInfo", "LoaderRequest", "BatchLoader",
    "build_loader", "make_request", "choose_backend", "backends", "read_split", "check_shard", "read_index",
    "rank_range", "train_steps_per_epoch", "ANTIALIAS_ABOVE", "split_keys", "VERIFY_SHARDS", "split_dir",
]

log = logging.getLogger(__name__)

#: Resizes that shrink a side by more than this factor are antialiased (OpenCV ``INTER_AREA`` in the
#: torch reader, ``antialias=True`` in DALI); below it both use plain bilinear interpolation, which
#: already reads every source pixel and costs a fraction of an antialiased filter.
ANTIALIAS_ABOVE = 2.0

#: members a sample must have for the loaders (the binary twins of the schema)
REQUIRED_MEMBERS = (schema.IMAGE, schema.LABEL, schema.INDEX, schema.SIZE, schema.BOXES)


class ShardError(RuntimeError):
    """A shard (tar or its ``.idx``) is missing, truncated or does not match its index; names the file."""


class CorruptSampleError(RuntimeError):
    """A sample inside a shard cannot be decoded; the message names the shard and the sample key."""


# ---------------------------------------------------------------------------
# The split on disk: manifest, shards, DALI index files
# ---------------------------------------------------------------------------

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


def split_dir(data, split: str) -> Path:
    """The local directory of ``split`` under ``data.root`` (a ``cfg.data``): for a URL root, its folder in the
    node cache with a fresh ``manifest.json`` and indexes (:meth:`pipeline.remote.ShardCache.prepare`)."""
    if is_remote(data.root):
        from pipeline.remote import ShardCache

        return ShardCache(str(data.root), data.cache_dir or None).prepare(split)
    return Path(data.root) / split


def read_split(root: str | Path, split: str, fetched: bool = True) -> SplitInfo:
    """Read ``<root>/<split>/manifest.json`` through :func:`pipeline.shards.load_manifest` (which checks
    that the conversion completed, that the counts add up and that every listed tar and ``.idx``
    exists; with ``fetched=False`` the tars may still be missing: a remote split's cache) into a
    :class:`SplitInfo`. No shard is opened here."""
    from pipeline.shards import load_manifest

    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"split directory {split_dir} does not exist (data.root={root!s}, split={split!r}); "
                                f"convert it with launch/make_shards.py")
    manifest = load_manifest(split_dir, require_shards=fetched)
    shards = []
    for entry in manifest.shards:
        tar = split_dir / entry["name"]
        index = split_dir / entry.get("index_file", tar.with_suffix(".idx").name)
        shards.append(ShardInfo(name=tar.name, tar=tar, index=index, count=int(entry["count"]),
                                nbytes=int(entry["bytes"]) if "bytes" in entry else None,
                                first_index=int(entry["first_index"]) if "first_index" in entry else None,
                                sha256=entry.get("sha256"), idx_sha256=entry.get("idx_sha256"),
                                first_key=entry.get("first_key"), last_key=entry.get("last_key")))
    if not shards:
        raise ShardError(f"{split_dir / 'manifest.json'}: lists no shards")
    classes = tuple(str(c.get("name", c.get("id", ""))) if isinstance(c, dict) else str(c) for c in manifest.classes)
    return SplitInfo(name=split, directory=split_dir, shards=tuple(shards), total=manifest.total, classes=classes)


@dataclass(frozen=True)
class IndexedSample:
    """One sample's members as the DALI index lists them: ``members[ext] = (offset, size)``,
    offsets of the member DATA (after its tar header) in bytes from the start of the tar."""

    key: str
    members: dict

    @property
    def start(self) -> int:
        return min(off for off, _ in self.members.values())

    @property
    def end(self) -> int:
        return max(off + size for off, size in self.members.values())


def _parse_index_line(line: str, with_names: bool, where: str) -> IndexedSample:
    parts = line.split()
    step = 4 if with_names else 3
    if not parts or len(parts) % step:
        raise ShardError(f"{where}: malformed index line {line[:120]!r}")
    members, key = {}, None
    for i in range(0, len(parts), step):
        ext, offset, size = parts[i], int(parts[i + 1]), int(parts[i + 2])
        members[ext] = (offset, size)
        if with_names and key is None:
            name = parts[i + 3]
            key = name[: name.find(".", name.rfind("/") + 1)]
    return IndexedSample(key=key or "", members=members)


def _index_header(line: str, where: str) -> tuple[bool, int]:
    parts = line.split()
    if len(parts) != 2 or not parts[0].startswith("v1."):
        raise ShardError(f"{where}: not a DALI webdataset index (header {line[:60]!r})")
    return parts[0] != "v1.0" and parts[0] != "v1.1", int(parts[1])


def read_index(path: str | Path) -> list[IndexedSample]:
    """All samples of a DALI ``.idx`` file (``wds2idx`` format v1.2: ``ext offset size name`` groups)."""
    path = Path(path)
    with open(path) as f:
        with_names, count = _index_header(f.readline(), str(path))
        samples = [_parse_index_line(line, with_names, str(path)) for line in f if line.strip()]
    if len(samples) != count:
        raise ShardError(f"{path}: header promises {count} samples, the file lists {len(samples)}")
    return samples


def split_keys(split_dir: str | Path) -> list[str]:
    """Every sample's ``__key__`` of a split, by global index (``keys[i]`` is sample ``i``), read from
    the DALI indexes the manifest lists (no image bytes are read). For the predictions table."""
    split_dir = Path(split_dir)
    manifest = json.loads((split_dir / "manifest.json").read_text())
    keys: list[str] = [""] * int(manifest["total"])
    for shard in manifest["shards"]:
        for offset, sample in enumerate(read_index(split_dir / shard["index_file"])):
            keys[int(shard["first_index"]) + offset] = sample.key
    return keys


def _last_line(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        block = 1 << 16
        while True:
            start = max(0, size - block)
            f.seek(start)
            lines = [ln for ln in f.read().splitlines() if ln.strip()]
            if len(lines) >= 2 or start == 0:
                return lines[-1].decode() if lines else ""
            block *= 4


def _tar_member_name(f, data_offset: int) -> str:
    """Name in the ustar header right before a member's data (the header that data belongs to).

    A name longer than the header holds is cut there (PAX keeps the full one in a header before).
    """
    if data_offset < 512:
        return ""
    f.seek(data_offset - 512)
    header = f.read(512)
    name = header[:100].split(b"\0", 1)[0].decode(errors="replace")
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0].decode(errors="replace")
        if prefix:
            name = f"{prefix}/{name}"
    return name


VERIFY_SHARDS = ("off", "cheap", "full")


def check_shard(shard: ShardInfo, required: tuple[str, ...] = REQUIRED_MEMBERS, mode: str = "cheap") -> None:
    """Consistency and identity check of a shard against its index and the manifest (``data.verify_shards``).

    ``cheap`` (the default; no image is read): raises :class:`ShardError` naming the file when the tar
    or the ``.idx`` is missing, the tar is shorter than the index needs (truncated) or than the
    manifest recorded, the index lists a different number of samples than the manifest, lacks a
    required member, is not the index the converter wrote (its sha256 differs from the manifest's),
    its first/last sample's tar headers do not carry the names it lists (stale), or those samples'
    keys or global indices are not the ones the manifest records for this shard (a shard of another
    split or another position copied over this one, with its index or a rebuilt one). Costs a few small reads per shard, so it runs
    for every shard at build time. ``full`` also checks the tar's sha256 against the manifest, once
    per shard and file version (cached, see :func:`_verified_digest`). ``off`` checks nothing.
    """
    if mode not in VERIFY_SHARDS:
        raise ValueError(f"data.verify_shards={mode!r} is not one of {list(VERIFY_SHARDS)}")
    if mode == "off":
        return
    if not shard.tar.is_file():
        raise ShardError(f"shard {shard.tar} is missing")
    if not shard.index.is_file():
        raise ShardError(f"index {shard.index} of shard {shard.tar} is missing; write it with "
                         f"`wds2idx {shard.tar} {shard.index}` or re-run launch/make_shards.py")
    size = shard.tar.stat().st_size
    if shard.nbytes is not None and size != shard.nbytes:
        kind = "truncated" if size < shard.nbytes else "changed"
        raise ShardError(f"shard {shard.tar} is {size} bytes, the manifest recorded {shard.nbytes}: {kind} "
                         f"after conversion; re-run launch/make_shards.py")
    with open(shard.index) as f:
        first_line = f.readline()
        with_names, count = _index_header(first_line, str(shard.index))
        first = f.readline()
    if count != shard.count:
        raise ShardError(f"index {shard.index} lists {count} samples, the manifest says {shard.count} for "
                         f"{shard.tar}: stale index or manifest")
    if count == 0:
        return
    last = _last_line(shard.index)
    samples = [_parse_index_line(first, with_names, str(shard.index)),
               _parse_index_line(last, with_names, str(shard.index))]
    for sample in samples:
        missing = [m for m in required if m not in sample.members]
        if missing:
            raise ShardError(f"shard {shard.tar}: sample {sample.key!r} has no {missing} member(s) in {shard.index}")
    if samples[-1].end > size:
        raise ShardError(f"shard {shard.tar} is truncated: {size} bytes, its index {shard.index} needs "
                         f"{samples[-1].end}")
    keys = [samples[0].key, samples[-1].key]
    if shard.first_key is not None and keys != [shard.first_key, shard.last_key]:
        raise ShardError(f"shard {shard.tar} holds samples {keys[0]!r}..{keys[1]!r}, the manifest lists "
                         f"{shard.first_key!r}..{shard.last_key!r}: a swapped or stale shard; re-run "
                         f"launch/make_shards.py")
    if shard.idx_sha256 and _sha256(shard.index) != shard.idx_sha256:
        raise ShardError(f"index {shard.index} is not the one the manifest lists for {shard.tar} (its sha256 "
                         f"differs): the shard or its index was replaced; re-run launch/make_shards.py")
    with open(shard.tar, "rb") as f:
        if with_names:
            for sample in samples:
                ext, (offset, _) = next(iter(sample.members.items()))
                expected = f"{sample.key}.{ext}"
                found = _tar_member_name(f, offset)
                if not found or not expected.startswith(found):
                    raise ShardError(f"index {shard.index} is stale: it puts {expected!r} at byte {offset} of "
                                     f"{shard.tar}, where the tar holds {found!r}; re-create it with wds2idx")
        if shard.first_index is not None and all(schema.INDEX in s.members for s in samples):
            held = []
            for sample in samples:
                offset, size = sample.members[schema.INDEX]
                f.seek(offset)
                held.append(int.from_bytes(f.read(min(size, 8)), "little", signed=True))
            want = [shard.first_index, shard.first_index + shard.count - 1]
            if held != want:
                raise ShardError(f"shard {shard.tar} holds samples {held[0]}..{held[1]} of a split, the manifest "
                                 f"puts samples {want[0]}..{want[1]} there: a swapped or stale shard; re-run "
                                 f"launch/make_shards.py")
    if mode == "full" and shard.sha256 and _verified_digest(shard.tar) != shard.sha256:
        raise ShardError(f"shard {shard.tar} does not match its sha256 in the manifest: changed after conversion")


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _verified_digest(path: Path) -> str:
    """sha256 of ``path``, computed once per file version: cached in ``$XDG_CACHE_HOME/cstn/shard_sha256.json``
    (default ``~/.cache``) under the real path, size, mtime and inode, so the data directory may be read-only
    and a rewritten file is hashed again."""
    cache_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cstn"
    cache = cache_dir / "shard_sha256.json"
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    digest = _sha256(path)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            known = json.loads(cache.read_text())
        except (OSError, ValueError):
            known = {}
        known[key] = digest
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, cache)
    except OSError:
        pass  # no writable cache: the digest is simply computed again next time
    return digest


# ---------------------------------------------------------------------------
# Rank ranges and epoch lengths (shared by both backends)
# ---------------------------------------------------------------------------

def rank_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of the split's samples (shard order) read by ``rank``: DALI's sharding rule."""
    return total * rank // world_size, total * (rank + 1) // world_size


def train_steps_per_epoch(total: int, world_size: int, batch_size: int) -> int:
    """Full batches every rank runs per training epoch: the smallest rank range, whole batches."""
    return (total // world_size) // batch_size


# ---------------------------------------------------------------------------
# The request every backend factory receives, and what it returns
# ---------------------------------------------------------------------------

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
        :class:`ShardError` (or :class:`pipeline.shards.ShardingError` from the manifest check)
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
