"""A split's ``manifest.json``: its format, writing it atomically, reading and checking it, and the split as readers see it.

The converter (:mod:`pipeline.shards`) builds the manifest's content and writes it with
:func:`write_json`; readers go through :func:`load_manifest` (complete, counts adding up, every
listed shard and index present) and :func:`read_split`, which turns it into the
:class:`~pipeline.request.SplitInfo` the backends use; :func:`split_dir` finds a split's local
directory, in the node cache for a remote ``data.root``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.remote import is_remote
from pipeline.schema import sha256_file
from pipeline.request import ShardError, ShardInfo, SplitInfo
from pipeline.shard_worker import ShardingError

__all__ = ["FORMAT", "MANIFEST", "ShardManifest", "load_manifest", "sha256_file", "write_json", "read_split",
           "split_dir"]

#: layout version of shards + manifest written by this module (bumped when their bytes change)
FORMAT = "cstn-wds-1"


MANIFEST = "manifest.json"


def write_json(path: Path, obj: Any, indent: int | None = 1) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent) + "\n")
    os.replace(tmp, path)


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


def load_manifest(split_dir: str | Path, verify_checksums: bool = False, require_shards: bool = True) -> ShardManifest:
    """Read and check ``split_dir/manifest.json`` (``split_dir`` may also be the manifest file itself).

    Raises :class:`ShardingError` naming the path when the manifest is missing, unreadable, of another
    format or incomplete (an interrupted conversion), when its counts do not add up, or when a listed
    shard or ``.idx`` is missing (only an ``.idx`` with ``require_shards=False``: a remote split's cache,
    whose tars are fetched when read); with ``verify_checksums`` also when a shard's sha256 differs.
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
        for member in ("name", "index_file") if require_shards else ("index_file",):
            p = split_dir / s[member]
            if not p.is_file():
                raise ShardingError(f"{p}: listed in {path} but missing")
        if verify_checksums and sha256_file(split_dir / s["name"]) != s["sha256"]:
            raise ShardingError(f"{split_dir / s['name']}: sha256 differs from {path}; the shard is damaged "
                                f"(rerun make_shards to rewrite it)")
    return ShardManifest(split_dir=split_dir, data=data)


def split_dir(data, split: str) -> Path:
    """The local directory of ``split`` under ``data.root`` (a ``cfg.data``): for a URL root, its folder in the
    node cache with a fresh ``manifest.json`` and indexes (:meth:`pipeline.remote.ShardCache.prepare`)."""
    if is_remote(data.root):
        from pipeline.remote import ShardCache

        return ShardCache(str(data.root), data.cache_dir or None).prepare(split)
    return Path(data.root) / split


def read_split(root: str | Path, split: str, fetched: bool = True) -> SplitInfo:
    """Read ``<root>/<split>/manifest.json`` through :func:`load_manifest` (which checks
    that the conversion completed, that the counts add up and that every listed tar and ``.idx``
    exists; with ``fetched=False`` the tars may still be missing: a remote split's cache) into a
    :class:`SplitInfo`. No shard is opened here."""
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
