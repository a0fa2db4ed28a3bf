"""One training job per run directory: a lock file held by rank 0 of the job.

``<train.out_dir>/job.lock`` is created exclusively (``O_CREAT | O_EXCL``) and holds the holder's
host, pid, start time and command line. A second job meets it before it touches anything (no
checkpoint, no ``mlflow.db``) and stops with a message naming the holder. The lock is removed when
the job exits (normally, on an error, or on SIGTERM through the trainer's own exit path); a lock
whose process is gone (same host, pid not running, or running another program) is stale and
taken over with a note, so no ``--force`` is needed after a crash. A lock held from another host
cannot be checked from here: the message says so and names the file to delete once that job is
known to be dead.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

__all__ = ["RunLock", "RunDirectoryBusy", "LOCK_FILE"]

LOCK_FILE = "job.lock"


class RunDirectoryBusy(RuntimeError):
    """Another live job holds the run directory."""


def _alive(pid: int, started: float) -> bool:
    """Whether ``pid`` runs and is the process that took the lock (not a recycled pid)."""
    try:
        import psutil

        proc = psutil.Process(pid)
        return proc.create_time() <= started + 1.0
    except Exception:  # no such process, or psutil cannot tell: treat a vanished pid as dead
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


class RunLock:
    """``with RunLock(out_dir): ...`` or :meth:`acquire` / :meth:`release`."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK_FILE
        self.held = False

    def holder(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a note when a stale lock was taken over. Raises :class:`RunDirectoryBusy`."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        note = None
        for _ in range(3):
            me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                  "started_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)[:2000]}
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self.holder()
                if other is None:  # a lock being written right now, or left half-written: look again
                    time.sleep(0.5)
                    other = self.holder()
                    if other is None:
                        self.path.unlink(missing_ok=True)
                        continue
                same_host = other.get("host") == socket.gethostname()
                if same_host and not _alive(int(other.get("pid", -1)), float(other.get("started", 0))):
                    note = (f"took over the stale lock of job pid {other.get('pid')} (started "
                            f"{other.get('started_at')}, no longer running)")
                    self.path.unlink(missing_ok=True)
                    continue
                where = "" if same_host else (f"; it is held from another host, which this one cannot check: "
                                              f"delete {self.path} once that job is known to be dead")
                raise RunDirectoryBusy(
                    f"{self.path.parent} is in use by another training job: host {other.get('host')}, pid "
                    f"{other.get('pid')}, started {other.get('started_at')} ({other.get('command', '')[:200]}){where}")
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return note
        raise RunDirectoryBusy(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            other = self.holder()
            if other is None or other.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
