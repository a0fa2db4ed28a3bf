"""Write one WebDataset shard: tar members, sha256 of the tar stream and the DALI index, in one pass.

:class:`ShardTarWriter` produces the same bytes as webdataset's ``TarWriter(encoder=False, mtime=0,
user=..., group=...)`` on Python's :mod:`tarfile` (POSIX ustar headers in the default PAX format, a
pax extended header only for names that need one, two zero blocks and zero padding to a multiple of
10240 bytes at the end), at a fraction of the cost: the 512-byte header of an ASCII name of at most
100 bytes is assembled from a fixed template (tarfile builds it from a dict and checks every field,
some 100 microseconds per member), other names go through :meth:`tarfile.TarInfo.tobuf`. Headers, member
data and padding are hashed piece by piece and handed to ``os.writev`` a few MB at a time, so member
data is never copied in Python.

Measured by ``bench/tarwriter.py`` (3,000 converter samples of 7 members, one process): 2.0-3.1x
webdataset's ``TarWriter`` while also hashing the stream and writing the index, identical bytes.

Since it knows where every member's data starts, it also writes the shard's DALI index (the
``v1.2`` text format of DALI's ``wds2idx`` tool: one line per sample, ``ext offset size name`` per
member) without listing the finished tar again.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path
from typing import Any

__all__ = ["ShardTarWriter", "ustar_header", "DALI_INDEX_VERSION"]

BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240: tarfile pads the archive to a multiple of this
DALI_INDEX_VERSION = "v1.2"
_PADDING = [bytes(n) for n in range(BLOCK)]
_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)
_MAX_PIECES = 4 * _IOV_MAX
_LARGE = 16384  # members at least this large are not copied into the joined small pieces


def _octal(value: int, width: int) -> bytes:
    """tarfile's ``itn`` for values that fit: ``width - 1`` octal digits and a NUL."""
    return b"%0*o\0" % (width - 1, value)


class _HeaderTemplate:
    """The constant parts of the ustar header of a regular file with fixed mode, owner and mtime."""

    def __init__(self, mode: int, user: str, group: str, mtime: int):
        self.mode, self.user, self.group, self.mtime = mode, user, group, mtime
        self.after_name = _octal(mode & 0o7777, 8) + _octal(0, 8) + _octal(0, 8)  # mode, uid, gid
        self.mtime_field = _octal(mtime, 12)
        self.tail = (b"0" + bytes(100) + tarfile.POSIX_MAGIC + user.encode("ascii").ljust(32, b"\0")
                     + group.encode("ascii").ljust(32, b"\0") + bytes(8) + bytes(8) + bytes(155) + bytes(12))
        assert 100 + len(self.after_name) + 12 + 12 + 8 + len(self.tail) == BLOCK
        self.constant_sum = sum(self.after_name) + sum(self.mtime_field) + 8 * 32 + sum(self.tail)

    def fast_ok(self, name: str) -> bool:
        return len(name) <= 100 and name.isascii()

    def header(self, name: str, size: int) -> bytes:
        """The header block for ``name`` (ASCII, at most 100 bytes) of ``size`` bytes (< 8 GiB)."""
        name_field = name.encode("ascii")
        size_field = _octal(size, 12)
        checksum = self.constant_sum + sum(name_field) + sum(size_field)
        return b"".join((name_field, bytes(100 - len(name_field)), self.after_name, size_field, self.mtime_field,
                         b"%06o\0 " % checksum, self.tail))

    def tarfile_header(self, name: str, size: int) -> bytes:
        """The header block(s) Python's tarfile writes (pax extended header where ustar cannot hold it)."""
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = size, self.mtime, self.mode, self.user, self.group
        return info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


def ustar_header(name: str, size: int, mode: int = 0o444, user: str = "cstn", group: str = "cstn",
                 mtime: int = 0) -> bytes:
    """The tar header block(s) of a regular file, as :class:`ShardTarWriter` writes them."""
    t = _HeaderTemplate(mode, user, group, mtime)
    return t.header(name, size) if t.fast_ok(name) else t.tarfile_header(name, size)


class ShardTarWriter:
    """Write samples to ``tar_path`` and, on :meth:`close`, the DALI index to ``idx_path``.

    A sample is a dict like webdataset's: ``__key__`` and one ``bytes`` value per extension; members
    are written in sorted extension order as ``<key>.<ext>``, keys starting with ``_`` are left out.
    After :meth:`close`, ``bytes`` is the tar size, ``sha256`` its hex digest, ``index_sha256`` the
    index file's, ``samples`` the number of samples and ``payload`` the sum of member sizes.

    Args:
        tar_path, idx_path: files to create (overwritten).
        mode, user, group, mtime: tar member attributes (fixed, so equal input gives equal bytes).
        flush_bytes: buffer this many bytes before hashing and writing them.
    """

    def __init__(self, tar_path: str | Path, idx_path: str | Path, mode: int = 0o444, user: str = "cstn",
                 group: str = "cstn", mtime: int = 0, flush_bytes: int = 8 << 20):
        self.tar_path, self.idx_path = Path(tar_path), Path(idx_path)
        self._template = _HeaderTemplate(mode, user, group, mtime)
        self._file = open(self.tar_path, "wb", buffering=0)
        self._sha = hashlib.sha256()
        self._pieces: list[bytes] = []  # headers, member data and padding waiting for one writev
        self._pending = 0
        self._flush_bytes = flush_bytes
        self._index_lines: list[str] = []
        self.offset = 0  # bytes of tar stream produced so far (written + pending)
        self.samples = 0
        self.payload = 0
        self.bytes = 0
        self.sha256 = ""
        self.index_sha256 = ""
        self.closed = False

    def write(self, sample: dict[str, Any]) -> int:
        """Append one sample; return the sum of its member sizes (like webdataset's ``TarWriter.write``).
        The member values are referenced, not copied, until the next flush: do not modify them."""
        key = sample["__key__"]
        pieces, template = self._pieces, self._template
        small: list[bytes] = []  # headers, small members and padding, joined into one piece
        fields, total, offset = [], 0, self.offset
        for ext in sorted(k for k in sample if k[0] != "_"):
            data = sample[ext]
            if isinstance(data, str):
                data = data.encode("utf-8")
            elif not isinstance(data, (bytes, bytearray, memoryview)):
                raise ValueError(f"{key}.{ext}: tar members must be bytes, got {type(data).__name__}")
            name = f"{key}.{ext}"
            size = len(data)
            header = template.header(name, size) if template.fast_ok(name) else template.tarfile_header(name, size)
            offset += len(header)
            fields.append(f"{ext} {offset} {size} {name}")
            small.append(header)
            if size >= _LARGE:  # handed to writev as it is, never copied
                pieces.append(b"".join(small))
                pieces.append(data)
                small = []
            elif size:
                small.append(data)
            pad = -size % BLOCK
            if pad:
                small.append(_PADDING[pad])
            offset += size + pad
            total += size
        if small:
            pieces.append(b"".join(small))
        self._pending += offset - self.offset
        self.offset = offset
        self._index_lines.append(" ".join(fields))
        self.samples += 1
        self.payload += total
        if self._pending >= self._flush_bytes or len(pieces) >= _MAX_PIECES:
            self._flush()
        return total

    def _flush(self) -> None:
        """Hash the pending pieces and write them with as few ``writev`` calls as the system allows."""
        pieces, fd = self._pieces, self._file.fileno()
        for piece in pieces:
            self._sha.update(piece)
        start = 0
        while start < len(pieces):
            batch = pieces[start:start + _IOV_MAX]
            want = sum(len(p) for p in batch)
            done = os.writev(fd, batch)
            while done < want:  # partial write (rare on regular files): finish this batch piece by piece
                rest = b"".join(batch)[done:]
                done += os.write(fd, rest)
            start += len(batch)
        self._pieces = []
        self._pending = 0

    def close(self) -> None:
        """End the archive (two zero blocks, padding to a 10240-byte record), close it and write the index."""
        if self.closed:
            return
        end = 2 * BLOCK
        end += -(self.offset + end) % RECORD
        self._pieces.append(bytes(end))
        self._pending += end
        self.offset += end
        self._flush()
        self._file.close()
        self.closed = True
        self.bytes, self.sha256 = self.offset, self._sha.hexdigest()
        if not self.samples:
            raise ValueError(f"{self.tar_path}: no samples written (DALI cannot index an empty shard)")
        self.write_index()

    def write_index(self) -> None:
        """Write the DALI index of the samples written so far to ``idx_path``; sets ``index_sha256``."""
        text = f"{DALI_INDEX_VERSION} {len(self._index_lines)}\n" + "\n".join(self._index_lines) + "\n"
        data = text.encode("utf-8")
        with open(self.idx_path, "wb") as f:
            f.write(data)
        self.index_sha256 = hashlib.sha256(data).hexdigest()

    def abort(self) -> None:
        """Close without finishing and delete what was written."""
        if not self.closed:
            self._file.close()
            self.closed = True
        for p in (self.tar_path, self.idx_path):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
