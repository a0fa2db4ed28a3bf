"""Shards beyond one disk: a split under a URL, read through a verified node-local cache.

``data.root`` may be ``s3://bucket/prefix``, ``gs://...``, ``http(s)://host/prefix`` (or any URL
``fsspec`` opens; ``s3fs`` / ``gcsfs`` are optional extras, HTTP is built in). Credentials come
from each backend's standard places (environment, config files, instance roles); nothing here
reads or logs them.

What the readers see does not change: a local split directory with ``manifest.json``, the DALI
indexes and the tars. :class:`ShardCache` makes it under ``data.cache_dir`` (default
``$TMPDIR/cstn-shard-cache``, node-local), one folder per root URL:

* at open, ``manifest.json`` and every ``.idx`` (small) are fetched; each index must match the
  manifest's ``idx_sha256``;
* a tar is fetched when a reader first needs it (:meth:`ShardCache.ensure`): once per node (an
  ``flock`` per shard, so the ranks and workers of one node never fetch the same shard twice),
  into a temporary name, hashed while it streams, checked against the manifest's sha256 and only
  then renamed into place. A mismatch is fetched once more, then the run stops naming the shard
  and both checksums;
* while a reader reads shard ``i``, :meth:`ShardCache.prefetch` fetches the next shards of its
  order in a background thread;
* ``data.cache_max_gb`` bounds the cache: after a fetch the least recently used shards are
  evicted, never one a reader holds (readers keep a shared ``flock`` on the tar while they read it);
* network errors are retried (``RETRIES`` times, backing off), then the run stops naming the URL;
  a full cache disk stops it naming the cache directory; a partial file is never left in place.

The DALI backend reads all of a rank's shards at pipeline build: they are fetched (in parallel)
before it starts, and the cache must hold them. Measured by ``bench/remote.py``.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional

from pipeline import schema

__all__ = ["is_remote", "ShardCache", "RemoteShardError", "REMOTE_SCHEMES", "default_cache_dir"]

REMOTE_SCHEMES = ("s3://", "s3a://", "gs://", "gcs://", "http://", "https://", "az://", "abfs://")
RETRIES = 3
TIMEOUT_S = 60.0
PREFETCH = 2


class RemoteShardError(RuntimeError):
    """A shard (or the manifest) that cannot be fetched or verified; the message names the URL."""


def is_remote(root: str | os.PathLike) -> bool:
    return str(root).startswith(REMOTE_SCHEMES)


def default_cache_dir() -> Path:
    return Path(os.environ.get("TMPDIR", tempfile.gettempdir())) / "cstn-shard-cache"


def _filesystem(url: str):
    """``(fsspec filesystem, path within it)`` with timeouts, so a dead server is an error, not a hang."""
    import fsspec

    protocol = url.split("://", 1)[0]
    options: dict = {}
    if protocol in ("http", "https"):
        import aiohttp

        options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=TIMEOUT_S,
                                                                     sock_read=TIMEOUT_S)}
    elif protocol in ("s3", "s3a"):
        options["config_kwargs"] = {"connect_timeout": TIMEOUT_S, "read_timeout": TIMEOUT_S,
                                    "retries": {"max_attempts": 1}}
        if os.environ.get("AWS_ENDPOINT_URL"):  # an S3-compatible store (MinIO, moto, ...)
            options["client_kwargs"] = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    return fsspec.core.url_to_fs(url, **options)


class ShardCache:
    """The node-local copy of the splits under ``root_url`` (picklable: workers re-open the filesystem).

    Args:
        root_url: ``data.root`` (the URL holding one folder per split).
        cache_dir: ``data.cache_dir`` (empty: :func:`default_cache_dir`).
        max_bytes: bound of the cached tars (None: unbounded).
    """

    def __init__(self, root_url: str, cache_dir: str | Path | None = None, max_bytes: Optional[int] = None):
        self.root_url = root_url.rstrip("/")
        base = Path(cache_dir) if cache_dir else default_cache_dir()
        self.dir = base / hashlib.sha1(self.root_url.encode()).hexdigest()[:12]
        self.max_bytes = max_bytes
        self._fs = None
        self._threads: list[threading.Thread] = []

    def __getstate__(self):
        return {"root_url": self.root_url, "dir": self.dir, "max_bytes": self.max_bytes}

    def __setstate__(self, state):
        self.__dict__.update(state, _fs=None, _threads=[])

    @property
    def fs(self):
        if self._fs is None:
            self._fs, _ = _filesystem(self.root_url)
        return self._fs

    def url(self, split: str, name: str) -> str:
        return f"{self.root_url}/{split}/{name}"

    # -- fetching ---------------------------------------------------------------------------------

    def _fetch(self, url: str, dest: Path, want_sha256: Optional[str]) -> str:
        """Stream ``url`` into ``dest`` (temporary name, then rename); returns the sha256 of what came."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(f"{dest.name}.part.{os.getpid()}.{threading.get_ident()}")
        last: Optional[BaseException] = None
        for attempt in range(RETRIES + 1):
            digest = hashlib.sha256()
            try:
                with self.fs.open(url, "rb", block_size=1 << 22) as src, open(part, "wb") as out:
                    while True:
                        block = src.read(1 << 22)
                        if not block:
                            break
                        digest.update(block)
                        out.write(block)
                got = digest.hexdigest()
                if want_sha256 is None or got == want_sha256:
                    os.replace(part, dest)
                else:
                    part.unlink(missing_ok=True)
                return got
            except FileNotFoundError as exc:
                part.unlink(missing_ok=True)
                if _answers(url):
                    raise RemoteShardError(f"{url} does not exist (listed in the manifest of {self.root_url})") from None
                last = exc  # fsspec's HTTP reports a server that does not answer as a missing file
            except OSError as exc:
                part.unlink(missing_ok=True)
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    free = shutil.disk_usage(self.dir).free / 2 ** 20
                    raise RemoteShardError(f"no space left on the shard cache {self.dir} ({free:.1f} MiB free) "
                                           f"while fetching {url}: bound it with data.cache_max_gb or point "
                                           f"data.cache_dir at a larger disk") from None
                last = exc
            except Exception as exc:  # the backends' own errors (aiohttp, botocore) are not OSErrors
                part.unlink(missing_ok=True)
                last = exc
            if attempt < RETRIES:
                time.sleep(min(8.0, 0.5 * 2 ** attempt))
        raise RemoteShardError(f"cannot fetch {url} after {RETRIES + 1} attempts: {type(last).__name__}: "
                               f"{str(last)[:300]}")

    def prepare(self, split: str) -> Path:
        """Fetch ``manifest.json`` and every ``.idx`` of ``split`` into the cache; returns the local split dir.

        When the store does not answer but an earlier job of this node cached the split's manifest and
        indexes, those are used (with a warning): each tar is still checked against that manifest when
        fetched, and a job whose shards are all cached runs through a short outage."""
        local = self.dir / split
        local.mkdir(parents=True, exist_ok=True)
        with _locked(local / ".meta.lock"):
            try:
                self._fetch(self.url(split, "manifest.json"), local / "manifest.json.new", None)
                os.replace(local / "manifest.json.new", local / "manifest.json")
            except RemoteShardError as exc:
                if "does not exist" in str(exc) or not (local / "manifest.json").is_file():
                    raise
                print(f"data warning: using the cached manifest of {self.url(split, '')} ({exc})", flush=True)
            manifest = json.loads((local / "manifest.json").read_text())
            for shard in manifest.get("shards", []):
                idx = local / shard["index_file"]
                want = shard.get("idx_sha256")
                if idx.is_file() and want and schema.sha256_file(idx) == want:
                    continue
                got = self._fetch(self.url(split, shard["index_file"]), idx, want)
                if want and got != want:
                    raise RemoteShardError(f"{self.url(split, shard['index_file'])}: sha256 {got}, the manifest "
                                           f"lists {want}: the remote split changed after conversion")
        return local

    def ensure(self, split: str, name: str, sha256: Optional[str]) -> Path:
        """The local path of tar ``name`` of ``split``, fetched and verified once per node."""
        dest = self.dir / split / name
        with _locked(dest.with_name(f"{name}.lock")):
            if dest.is_file():
                os.utime(dest)  # most recently used
                return dest
            got = self._fetch(self.url(split, name), dest, sha256)
            if sha256 and got != sha256:  # once more: a transfer can go wrong
                second = self._fetch(self.url(split, name), dest, sha256)
                if second != sha256:
                    raise RemoteShardError(
                        f"shard {self.url(split, name)}: fetched twice, sha256 {got} then {second}, the manifest "
                        f"lists {sha256}: the remote copy changed after conversion")
        self.evict(keep=dest)
        return dest

    def prefetch(self, split: str, shards: Iterable[tuple[str, Optional[str]]]) -> None:
        """Fetch ``(name, sha256)`` shards in a background thread (errors surface when a reader ensures them)."""
        todo = [s for s in shards if not (self.dir / split / s[0]).is_file()]
        if not todo:
            return

        def run():
            for name, sha in todo:
                try:
                    self.ensure(split, name, sha)
                except Exception:
                    return

        thread = threading.Thread(target=run, name="shard-prefetch", daemon=True)
        thread.start()
        self._threads.append(thread)

    def ensure_all(self, split: str, shards: list[tuple[str, Optional[str]]], workers: int = 4) -> None:
        """Fetch every shard now, ``workers`` at a time (the DALI backend opens them all at build)."""
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for future in [pool.submit(self.ensure, split, name, sha) for name, sha in shards]:
                future.result()

    # -- bounding -------------------------------------------------------------------------------

    def evict(self, keep: Optional[Path] = None) -> None:
        """Delete least recently used tars until the cache fits ``max_bytes``; a tar a reader holds (shared
        ``flock``) and ``keep`` stay."""
        if self.max_bytes is None:
            return
        tars = sorted((p for p in self.dir.glob("*/*.tar") if p.is_file()), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in tars)
        for tar in tars:
            if total <= self.max_bytes:
                return
            if keep is not None and tar == keep:
                continue
            try:
                with open(tar, "rb") as f:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a reader holds it
                    size = tar.stat().st_size
                    tar.unlink()
                    total -= size
            except (BlockingIOError, FileNotFoundError):
                continue


class _locked:
    """An exclusive ``flock`` on ``path`` (created) for the ``with`` block: one fetcher per shard per node."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _answers(url: str, timeout_s: float = 5.0) -> bool:
    """Whether the host of an ``http(s)://`` URL accepts a connection (other schemes: assumed so)."""
    if not url.startswith(("http://", "https://")):
        return True
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False
