"""The converter's worker processes: where each shard is written (a pool, or inline with ``workers=0``).

Kept apart from :mod:`pipeline.shards`, which decides what each shard holds and commits shards in
order; this module only starts processes, runs :func:`~pipeline.shard_worker.write_shard` in them
and turns a dead worker into a :class:`~pipeline.shard_worker.ShardingError`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from typing import Any

from .shard_worker import ShardingError, ShardJob, write_shard

__all__ = ["ShardWorkers"]


def _single_threaded() -> bool:
    """True when this process runs one OS thread (Linux), i.e. ``fork`` cannot copy a lock held elsewhere."""
    try:
        return "fork" in mp.get_all_start_methods() and len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


class _Finished:
    """A result computed on the spot, with the part of the ``Future`` interface the converter uses."""

    def __init__(self, fn, *args):
        self._value = fn(*args)

    def result(self):
        return self._value

    def cancel(self) -> bool:
        return False


class ShardWorkers:
    """Runs :func:`~pipeline.shard_worker.write_shard` in worker processes (or inline with ``workers=0``).

    The processes are started at once, so that they come up while the caller fingerprints the
    source: forked when the calling process has a single OS thread (``/proc/self/task``: cheap, and
    safe since no other thread can hold a lock), else started with ``spawn`` (nothing inherited from a
    process that may run DALI, torch or tqdm threads).
    """

    def __init__(self, workers: int):
        self.pool = None
        self.start_method = None
        if workers:
            from concurrent.futures import ProcessPoolExecutor
            self.start_method = "fork" if _single_threaded() else "spawn"
            self.pool = ProcessPoolExecutor(workers, mp_context=mp.get_context(self.start_method))
            for _ in range(workers):  # start them now (spawn starts one process per submitted task)
                self.pool.submit(os.getpid)

    def submit(self, job: ShardJob):
        """Start writing ``job``; ``.result()`` of the returned future is that of ``write_shard``."""
        if self.pool is None:
            return _Finished(write_shard, job)
        return self.pool.submit(write_shard, job)

    def result(self, future) -> dict[str, Any]:
        from concurrent.futures.process import BrokenProcessPool
        try:
            return future.result()
        except BrokenProcessPool as e:
            raise ShardingError(f"a worker process died ({e}); rerun with --workers 0 to write the shards in "
                                f"the main process") from e

    def discard(self, job: ShardJob, future) -> None:
        """Drop a job started on a wrong guess: cancel or wait for it, then delete what it wrote."""
        if not future.cancel():
            try:
                future.result()
            except Exception:  # its error does not count: the shard is redone from the right place
                pass
        for p in (job.tar_tmp, job.idx_tmp):
            p.unlink(missing_ok=True)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
