"""Reader processes die with the process that started them (Linux ``PR_SET_PDEATHSIG``).

The torch reader's decode workers fork from a fork server that the rank starts. When a rank dies
without cleaning up (SIGKILL, or a SIGTERM after its launcher was killed) the fork server and its
workers would be re-parented to init and keep running (seen for over an hour). Importing this
module in the fork server (``set_forkserver_preload``) makes the kernel send it SIGKILL when the
rank dies, and :func:`die_with_parent` in each worker's init does the same for the worker when the
fork server dies. Not imported by the rank itself: a rank started from a shell must outlive it
(``nohup``). The signal follows the parent *thread* that forked the process; the DataLoader
starts its workers from the thread that iterates, the rank's main thread here.
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel for ``sig`` when the parent dies; exit now if it already has. False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)
    return True


die_with_parent()  # importing this module is the request (the fork server's preload list)
