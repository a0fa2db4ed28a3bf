"""Convert a dataset split into WebDataset tar shards, one DALI index per shard and a manifest.

Output, under ``out_dir/<split>/``::

    <split>-000000.tar, <split>-000001.tar, ...   samples as in :mod:`pipeline.schema`
    <split>-000000.idx, ...                       DALI index (the format of DALI's ``wds2idx``)
    manifest.json                                 see "Manifest" below

Order, indices and shard boundaries
    Training splits are shuffled across all shards by a permutation drawn from ``seed``
    (``numpy.random.default_rng(seed).permutation``); DALI and webdataset only shuffle inside a
    small buffer. Validation and test splits keep source order. A sample's global ``index`` (the
    ``gid`` member and ``json["index"]``) is its 0-based position among the written samples of
    the split, so it is stable for a given source, seed and options. A shard is full at
    ``samples_per_shard`` samples, or once its images (``jpg`` members) reach ``shard_size_mb``
    (the other members add a few hundred bytes a sample); skipped inputs that follow a full shard
    are listed with it, and the next usable input opens the next shard.

Images
    Every input is read once and checked (:func:`~pipeline.shard_worker.normalize_image`, with
    :func:`pipeline.jpeg_check.parse_jpeg`); no JPEG is decoded unless it has to be re-encoded or
    ``verify="decode"``. ``verify`` trades time for coverage (times for an ILSVRC photo, one core):

    - ``structure`` (default, ~5 us): segment lengths, frame and scan headers, quantisation tables
      up to the first scan, and the end-of-image marker at the end of the file (zero padding after
      it allowed; other bytes after it make it walk the scans to find it). Rejects every truncated
      file, not bytes overwritten inside the scan data;
    - ``markers`` (~45 us): also every marker inside the entropy-coded data of every scan, which
      rejects data overwritten with random bytes with near certainty;
    - ``decode`` (~1 ms): also a complete strict libjpeg decode (DCT-scaled 1/8), which rejects
      damaged Huffman data whose markers are intact too (libjpeg itself only warns about those and
      returns an image with grey or smeared blocks).

    A baseline/extended/progressive 8-bit YCbCr JPEG that passes is stored byte for byte, with width
    and height from its frame header. Grey, CMYK/YCCK and other colour spaces, other JPEG frame
    types (arithmetic, lossless, 12-bit) and non-JPEG data under an image name (PNG, GIF, BMP, TIFF,
    WebP: ILSVRC holds a few) are decoded with OpenCV (EXIF orientation ignored, so sizes and boxes
    keep referring to the stored pixels) and re-encoded as RGB JPEG (``reencode_quality``), counted
    per kind. Unreadable, corrupt or truncated files, and files missing on disk, are skipped and
    listed with the reason; ``strict`` turns the first such file into an error. An image whose size
    differs from the size its annotation states is skipped too (its boxes would not fit).

Parallel writing
    Each shard is produced by one worker process in one pass (:func:`~pipeline.shard_worker.write_shard`:
    read, check, write tar members, sha256 and DALI index as it goes; :mod:`pipeline.tarshard`), so
    the calling process ships no image bytes. Where a shard starts, and its first ``index``, depend
    on every input before it, so ``workers + 1`` shards are started ahead on a guess: every file
    on disk is a clean JPEG of its listed size (missing and empty files are counted as skipped). The
    calling process commits shards in order; a shard whose real start differs from the guess (an
    earlier input was skipped, or re-encoded to another size under ``shard_size_mb``) is dropped and
    redone from the right place, with everything started after it (``ConversionResult.redone``).
    The output is therefore the same bytes whatever the number of workers; bad inputs only cost
    some rewriting. The worker processes are :mod:`pipeline.shard_pool`'s (forked when the calling
    process has a single thread, else spawned).

Boxes
    Clipped to ``[0, width] x [0, height]`` (counted as ``boxes_clipped`` when a coordinate moved);
    a box left without area (x1 <= x0 or y1 <= y0, including boxes wholly outside) is dropped and
    counted as ``boxes_dropped``.

Crash safety and resume
    A shard is written as ``<name>.tar.tmp`` with its index ``<name>.idx.tmp``, and both are renamed
    when complete and every shard before it is; ``manifest.json`` is rewritten after every shard with ``"complete": false`` and
    gets ``"complete": true`` at the end. A rerun with the same source fingerprint and content
    options keeps every listed shard whose size and sha256 match, rebuilds a missing or mismatching
    index (with DALI's ``wds2idx``), rewrites the other listed shards from their recorded input range (the output is
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

Readers use :func:`pipeline.manifest.load_manifest`, which checks that the manifest is complete and every listed
shard and index exists.

About 540 lines, a fifth of them this description of the output format; the converter's work is
one class (:class:`_Converter`: guess, start, commit in order, redo, resume), read in one place.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .dali_index import write_dali_index
from .manifest import FORMAT, MANIFEST, sha256_file, write_json
from .shard_pool import ShardWorkers
from .shard_worker import VERIFY_MODES, InputRef, ShardingError, ShardJob
from .sources.base import SourceError, SourceListing

__all__ = ["ShardOptions", "ShardingError", "ConversionResult", "list_source", "convert", "DEFAULT_SHARD_SIZE_MB",
           "VERIFY_MODES"]

DEFAULT_SHARD_SIZE_MB = 256.0


@dataclass
class ShardOptions:
    """How to convert. ``samples_per_shard`` and ``shard_size_mb`` are exclusive (default: 256 MB)."""

    samples_per_shard: int | None = None
    """Samples per shard (the last one may hold fewer)."""
    shard_size_mb: float | None = None
    """Close a shard once its images reach this many MB (10^6 bytes)."""
    seed: int = 0
    """Seed of the training-split permutation."""
    workers: int = 2
    """Processes checking images and writing shards (0: all in the calling process)."""
    strict: bool = False
    """Fail on the first input that would be skipped."""
    reencode_quality: int = 95
    """JPEG quality of re-encoded images."""
    progress: bool = True
    """Show a tqdm bar (images/s, MB/s) on stderr."""
    verify: str = "structure"
    """How JPEG inputs are checked: ``structure`` (segments up to the first scan and the end marker:
    catches truncation), ``markers`` (also every marker inside the scan data: catches overwritten
    data; ~10x the time of ``structure``) or ``decode`` (also a full strict libjpeg decode: catches
    damaged Huffman data with intact markers; ~200x). None decodes images it stores as they are."""

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
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {self.verify!r}")

    def content(self) -> dict[str, Any]:
        """The options that decide the bytes of the shards (compared on resume)."""
        return {"samples_per_shard": self.samples_per_shard, "shard_size_mb": self.shard_size_mb,
                "seed": self.seed, "reencode_quality": self.reencode_quality, "verify": self.verify}


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
    loop alone, i.e. without start-up, listing checks and clean-up), input bytes read, the shards
    started on a guess that proved wrong and were redone (``redone``; see "Parallel writing"), and
    how the worker processes were started (``fork``, ``spawn``; None without workers)."""

    manifest: dict[str, Any]
    split_dir: Path
    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    reindexed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    write_seconds: float = 0.0
    input_bytes: int = 0
    redone: int = 0
    start_method: str | None = None


def _package_version() -> str:
    try:
        from importlib.metadata import version
        return version("cstn-wsol")
    except Exception:  # running from a checkout that is not installed
        return "unknown"


def _library_versions() -> dict[str, str]:
    """Versions of the libraries that decide the bytes of re-encoded images (looked up without importing them)."""
    from importlib import metadata
    versions = {"numpy": np.__version__}
    for name, distributions in (("opencv", ("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless",
                                            "opencv-contrib-python")), ("simplejpeg", ("simplejpeg",))):
        for dist in distributions:
            try:
                versions[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
        else:
            versions[name] = "not installed"
    return versions


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
        self._t0 = time.time()
        self._versions: dict[str, Any] = {}
        self._classes = [{"index": c.index, "id": c.id, "name": c.name} for c in listing.classes]

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
        if not self._versions:
            self._versions = {"version": _package_version(), "libraries": _library_versions()}
        return {
            "format": FORMAT,
            "complete": complete,
            "dataset": self.listing.dataset,
            "split": self.split,
            "total": total,
            "num_shards": len(self.records),
            "shards": self.records,
            "classes": self._classes,
            "skipped": skipped,
            "counts": counts,
            "source": {"root": str(self.listing.root), "fingerprint": self.fingerprint,
                       "num_inputs": counts["inputs"]},
            "converter": {"module": __name__, "version": self._versions["version"], "format": FORMAT,
                          "options": asdict(self.options), "content_options": self.options.content(),
                          "libraries": self._versions["libraries"]},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def save(self, complete: bool) -> dict[str, Any]:
        """Write the manifest; an incomplete one (rewritten after every shard) without indentation, which
        makes json several times slower."""
        manifest = self.manifest(complete)
        write_json(self.manifest_path, manifest, indent=1 if complete else None)
        return manifest

    def progress(self, inputs: int, input_bytes: int) -> None:
        self.result.input_bytes += input_bytes
        if self.bar is not None:
            rate = self.result.input_bytes / 1e6 / max(time.time() - self._t0, 1e-9)
            self.bar.set_postfix_str(f"{rate:.1f} MB/s", refresh=False)
            self.bar.update(inputs)

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

    # -- planning, writing, committing -----------------------------------------------------------

    def guess(self, start: int) -> tuple[int, int]:
        """``(end, count)`` of the shard starting at input ``start`` if every file on disk holds a clean JPEG
        of its listed size (missing and empty files are skipped for certain)."""
        opts, ordered, n = self.options, self.ordered, len(self.ordered)
        limit = opts.shard_size_mb * 1e6 if opts.shard_size_mb is not None else None
        count, image_bytes, i = 0, 0, start
        while i < n:
            size = ordered[i].file_size
            if size:
                if (count >= opts.samples_per_shard) if limit is None else (image_bytes >= limit):
                    break
                count += 1
                image_bytes += size
            i += 1
        return i, count

    def job(self, number: int, start: int, first_index: int, stop: int, bounded: bool) -> ShardJob:
        """The job for shard ``number`` starting at input ``start``, given the inputs up to ``stop``."""
        name = self.shard_name(number)
        items = [InputRef.of(it) for it in self.ordered[start:stop]]
        classes = {label: (self.listing.classes[label].id, self.listing.classes[label].name)
                   for label in {it.label for it in items}}
        opts = self.options
        return ShardJob(name=name, tar_tmp=self.dir / f"{name}.tar.tmp", idx_tmp=self.dir / f"{name}.idx.tmp",
                        start=start, first_index=first_index, items=items, at_range_end=stop == len(self.ordered),
                        bounded=bounded, samples_per_shard=opts.samples_per_shard, image_mb=opts.shard_size_mb,
                        classes=classes, strict=opts.strict, quality=opts.reencode_quality, verify=opts.verify)

    def commit(self, job: ShardJob, written: dict[str, Any]) -> None:
        """Give a written shard its final names and record it in the manifest."""
        tar, idx = self.dir / f"{job.name}.tar", self.dir / f"{job.name}.idx"
        os.replace(job.idx_tmp, idx)
        os.replace(job.tar_tmp, tar)
        self.records.append({
            "name": tar.name, "index_file": idx.name, "count": written["count"], "first_index": job.first_index,
            "bytes": written["bytes"], "sha256": written["sha256"], "idx_sha256": written["idx_sha256"],
            "first_key": written.get("first_key"), "last_key": written.get("last_key"),
            "inputs": [job.start, written["end"]], "skipped": written["skipped"], "reencoded": written["reencoded"],
            **{k: written[k] for k in ("boxes", "boxes_clipped", "boxes_dropped", "images_all_boxes_dropped",
                                       "input_bytes")},
        })
        self.result.written.append(tar.name)
        self.progress(written["end"] - job.start, written["input_bytes"])
        self.save(complete=False)

    def run(self) -> ConversionResult:
        """Convert: keep or redo an earlier run's shards, write the new ones, then the manifest."""
        self.dir.mkdir(parents=True, exist_ok=True)
        workers = ShardWorkers(self.options.workers)  # before anything else: the processes start meanwhile
        self.result.start_method = workers.start_method
        self.in_flight: deque[tuple[ShardJob, Any, dict[str, Any] | None]] = deque()
        try:
            self.fingerprint = self.listing.fingerprint()
            previous = self.previous_records()
            kept = [self.keep_if_intact(rec) for rec in previous]  # before counting work: the bar's total
            self.open_bar(len(self.ordered) - sum(rec["inputs"][1] - rec["inputs"][0]
                                                  for rec, keep in zip(previous, kept) if keep))
            t_write = time.time()
            pos, next_index = self.redo_previous(workers, previous, kept)
            self.write_new(workers, pos, next_index)
            if not self.records:
                raise ShardingError(f"{self.listing.root}: split {self.split!r} has no inputs")
            self.result.write_seconds = time.time() - t_write
        except BaseException as exc:
            workers.close()
            for job, _, _ in self.in_flight:  # started but not committed: nothing may look complete
                for p in (job.tar_tmp, job.idx_tmp):
                    p.unlink(missing_ok=True)
            if _disk_full(exc):  # nothing half-written may stay on a full disk (a crash's leftovers are the rerun's)
                self.remove_partial()
                raise self.disk_full_error() from None
            raise
        finally:
            workers.close()
            if self.bar is not None:
                self.bar.close()
        return self.finish()

    @property
    def ahead(self) -> int:
        """How many shards are in flight at once."""
        return self.options.workers + 1 if self.options.workers else 1

    def open_bar(self, todo: int) -> None:
        if self.options.progress:  # (even a disabled tqdm starts its monitor thread, which rules out fork later)
            from tqdm import tqdm
            self.bar = tqdm(total=todo, unit="img", desc=f"{self.listing.dataset}/{self.split}",
                            file=sys.stderr, mininterval=0.5, dynamic_ncols=True)

    def redo_previous(self, workers: ShardWorkers, previous: list[dict[str, Any]], kept: list[bool]) -> tuple[int, int]:
        """The shards of an earlier run: keep the intact ones, rewrite the others from their recorded
        input range (same inputs and options give the same bytes). Returns where new shards start:
        (input position, global index)."""
        def commit_until(limit: int) -> None:
            while len(self.in_flight) > limit:
                job, future, rec = self.in_flight.popleft()
                written = workers.result(future)
                if written["count"] != rec["count"]:
                    raise ShardingError(
                        f"{self.dir / rec['name']}: rewriting it gave {written['count']} samples where the "
                        f"manifest lists {rec['count']}; the source changed without changing its "
                        f"fingerprint. Delete {self.dir} and convert again.")
                self.commit(job, written)

        pos, next_index = 0, 0
        for number, (rec, keep) in enumerate(zip(previous, kept)):
            if keep:
                commit_until(0)
                self.records.append(rec)
                self.result.kept.append(rec["name"])
                self.save(complete=False)
            else:
                job = self.job(number, rec["inputs"][0], next_index, rec["inputs"][1], bounded=True)
                self.in_flight.append((job, workers.submit(job), rec))
                commit_until(self.ahead)
            next_index += rec["count"]
            pos = rec["inputs"][1]
        commit_until(0)
        return pos, next_index

    def write_new(self, workers: ShardWorkers, pos: int, next_index: int) -> None:
        """New shards from input ``pos`` on, started ahead on guessed boundaries and committed in
        order; a wrong guess drops it and everything started after it, and restarts from ``pos``."""
        n = len(self.ordered)
        number, guess_pos, guess_index, extra = len(self.records), pos, next_index, 0
        while True:
            while len(self.in_flight) < self.ahead and guess_pos < n:
                end, count = self.guess(guess_pos)
                slack = max(16, (end - guess_pos) // 8) + extra  # room for inputs that turn out bad
                job = self.job(number + len(self.in_flight), guess_pos, guess_index, min(n, end + slack),
                               bounded=False)
                self.in_flight.append((job, workers.submit(job), None))
                guess_pos, guess_index, extra = end, guess_index + count, 0
            if not self.in_flight:
                return
            job, future, _ = self.in_flight.popleft()
            written = None
            if (job.start, job.first_index) == (pos, next_index):
                written = workers.result(future)
                if written["needs_more"]:  # more skipped inputs than the slack: retry with more
                    extra = 2 * len(job.items)
                    written = None
            else:
                workers.discard(job, future)
            if written is None:  # a wrong guess: everything started after it is wrong too
                self.result.redone += 1 + len(self.in_flight)
                while self.in_flight:
                    workers.discard(*self.in_flight.popleft()[:2])
                guess_pos, guess_index = pos, next_index
                continue
            if written["count"]:
                self.commit(job, written)
                number += 1
            elif not self.records:  # only skipped inputs, and none before them
                raise ShardingError(f"no usable image among the {n} inputs of {self.listing.root} "
                                    f"({self.split}); first reason: {written['skipped'][0]['reason']}")
            else:  # only skipped inputs were left: they belong to the last shard
                last = self.records[-1]
                last["inputs"][1] = written["end"]
                last["skipped"].extend(written["skipped"])
                last["input_bytes"] += written["input_bytes"]
                self.progress(written["end"] - job.start, written["input_bytes"])
                self.save(complete=False)
            pos, next_index = written["end"], next_index + written["count"]

    def finish(self) -> ConversionResult:
        """Check that every input landed or was listed, remove stale files, write the complete manifest."""
        manifest = self.manifest(complete=True)
        counts = manifest["counts"]
        if counts["inputs"] != manifest["total"] + counts["skipped"]:  # every input in a shard or skipped
            raise ShardingError(f"internal error: {counts['inputs']} inputs but {manifest['total']} samples "
                                f"+ {counts['skipped']} skipped")
        self.remove_stale()
        try:
            write_json(self.manifest_path, manifest, indent=1)
        except OSError as exc:
            if _disk_full(exc):  # nothing half-written may stay on a full disk (a crash's leftovers are the rerun's)
                self.remove_partial()
                raise self.disk_full_error() from None
            raise
        self.result.manifest = manifest
        self.result.seconds = time.time() - self._t0
        return self.result

    def remove_partial(self) -> None:
        """Delete every temporary file of this split (shards, indexes, manifest): after a failure nothing
        half-written stays, and the committed shards and the partial manifest let a rerun resume."""
        for p in self.dir.glob("*.tmp"):
            if p.name.startswith(f"{self.split}-") or p.name.startswith("manifest.json"):
                p.unlink(missing_ok=True)

    def disk_full_error(self) -> ShardingError:
        free = shutil.disk_usage(self.dir).free / 2 ** 20
        return ShardingError(f"no space left on the device of {self.dir} ({free:.1f} MiB free) after "
                             f"{len(self.records)} shard(s); they are kept and no partial file is left: free some "
                             f"space and run the same command again to resume")

    def remove_stale(self) -> None:
        keep = {r["name"] for r in self.records} | {r["index_file"] for r in self.records}
        for p in self.dir.iterdir():
            if p.name.startswith(f"{self.split}-") and p.name not in keep and (
                    p.suffix in (".tar", ".idx", ".tmp")):
                p.unlink()


def _disk_full(exc: BaseException) -> bool:
    import errno

    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def convert(listing: SourceListing, out_dir: str | Path, options: ShardOptions | None = None) -> ConversionResult:
    """Write ``out_dir/<split>/`` shards, indexes and manifest for ``listing`` (see the module docstring).

    Resumes an interrupted or damaged earlier conversion in the same place. Raises
    :class:`ShardingError` (``strict`` and a bad input, or nothing usable).
    """
    return _Converter(listing, Path(out_dir), options or ShardOptions()).run()
