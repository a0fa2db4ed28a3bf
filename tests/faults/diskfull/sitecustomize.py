"""A disk that fills up, for the converter's full-disk test (never used in production).

Imported at start-up by every Python process whose ``PYTHONPATH`` holds this directory (the test
puts it there for one ``launch/make_shards.py`` run, so worker processes get it too). When
``CSTN_FAULT_DISK_DIR`` is set, a write into a file under that directory raises
``OSError(ENOSPC)`` once the directory's files would exceed ``CSTN_FAULT_DISK_BYTES``: a
filesystem with that much room, as the converter sees it through ordinary ``open``.
"""
import builtins
import errno
import io
import os

_DIR = os.environ.get("CSTN_FAULT_DISK_DIR")
_BYTES = int(os.environ.get("CSTN_FAULT_DISK_BYTES", "0"))


def _used(root: str) -> int:
    total = 0
    for base, _, files in os.walk(root):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(base, name))
            except OSError:
                pass
    return total


class _Limited:
    def __init__(self, raw):
        self._raw = raw

    def write(self, data):
        if _used(_DIR) + len(data) > _BYTES:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), getattr(self._raw, "name", None))
        return self._raw.write(data)

    def __getattr__(self, name):
        return getattr(self._raw, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._raw.close()

    def __iter__(self):
        return iter(self._raw)


if _DIR:
    _open = builtins.open
    _root = os.path.realpath(_DIR)

    _fds: set = set()  # descriptors of files open for writing under the directory (os.write / os.writev)
    _write, _writev = os.write, os.writev

    def _limited_open(file, mode="r", *args, **kwargs):
        handle = _open(file, mode, *args, **kwargs)
        if isinstance(file, (str, bytes, os.PathLike)) and any(m in mode for m in "wax+"):
            if os.path.realpath(os.fsdecode(file)).startswith(_root + os.sep):
                _fds.add(handle.fileno())
                return _Limited(handle)
        return handle

    def _check(fd: int, size: int) -> None:
        if fd in _fds and _used(_DIR) + size > _BYTES:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def _limited_write(fd, data):
        _check(fd, len(data))
        return _write(fd, data)

    def _limited_writev(fd, buffers):
        buffers = list(buffers)
        _check(fd, sum(len(b) for b in buffers))
        return _writev(fd, buffers)

    builtins.open = _limited_open
    io.open = _limited_open
    os.write = _limited_write
    os.writev = _limited_writev
