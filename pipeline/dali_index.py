"""The DALI ``.idx`` files of the shards: read them, check a shard against its index and the manifest, rebuild one.

The format is DALI's ``wds2idx`` (version 1.2): a header ``v1.2 <samples>``, then one line per sample
of ``ext offset size name`` groups, offsets of the member data in bytes from the start of the tar.
:func:`check_shard` is the shard-identity check both backends run at build time
(``data.verify_shards``); :func:`split_keys` reads every sample's key of a split by global index.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline import schema
from pipeline.request import ShardError, ShardInfo

__all__ = ["IndexedSample", "read_index", "check_shard", "split_keys", "write_dali_index", "VERIFY_SHARDS"]


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


def check_shard(shard: ShardInfo, required: tuple[str, ...] = schema.DALI_EXTS, mode: str = "cheap") -> None:
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
    if shard.idx_sha256 and schema.sha256_file(shard.index) != shard.idx_sha256:
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
    digest = schema.sha256_file(path)
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


def write_dali_index(tar_path: str | Path, idx_path: str | Path) -> None:
    """Write the DALI index of ``tar_path`` with the ``wds2idx`` tool shipped in nvidia-dali (used to rebuild
    a lost index; new shards get theirs from :class:`~pipeline.tarshard.ShardTarWriter`)."""
    from pipeline.shard_worker import ShardingError  # a converter-side failure (the converter rebuilds lost indexes)

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
