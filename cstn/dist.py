"""Process-group helpers: DeepSpeed-launched or single process, CUDA or CPU.

Everything here works without a process group (rank 0 of 1), so the same code
runs as ``python launch/evaluate.py`` and under ``deepspeed --num_gpus N``.
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import Any

import torch
import torch.distributed as torch_dist


def cuda_available() -> bool:
    return torch.cuda.is_available()


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_initialized() else env_rank()


def world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else env_world_size()


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """This rank's compute device: its local GPU when CUDA exists, else the CPU."""
    if cuda_available():
        return torch.device("cuda", local_rank() % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def choose_backend(name: str = "auto") -> str:
    if name == "auto":
        return "nccl" if cuda_available() else "gloo"
    if name == "nccl" and not cuda_available():
        raise RuntimeError("dist.backend=nccl needs CUDA; this machine has no GPU (use gloo or auto)")
    return name


def configure_threads() -> None:
    """One compute thread per rank unless the user set OMP_NUM_THREADS: ranks share the cores."""
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(max(1, threads))


def _skip_deepspeed_shm_build() -> None:
    """DeepSpeed JIT-builds a shared-memory all-reduce op on CPU at init (minutes on a fresh machine).

    It only serves inference all-reduce; training uses gloo collectives. Replace the builder by a no-op.
    The module is looked up in ``sys.modules``: ``deepspeed.comm.torch`` as an attribute is the torch
    package itself.
    """
    import deepspeed.comm.torch  # noqa: F401  (registers the module)
    module = sys.modules["deepspeed.comm.torch"]
    module.build_shm_op = lambda: None


def _single_process_env() -> None:
    """Environment of a one-rank group for a plain ``python`` start (DeepSpeed's engine needs a group)."""
    import socket

    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)


def init(backend: str = "auto", timeout_s: int = 600, require_group: bool = False) -> None:
    """Initialise the process group through DeepSpeed when launched with several ranks.

    A single process (``WORLD_SIZE`` unset or 1) gets no process group, so collectives below
    become identity operations -- unless ``require_group`` (training: DeepSpeed's engine needs
    one), which makes a one-rank group.
    """
    configure_threads()
    if is_initialized():
        return
    if env_world_size() <= 1:
        if not require_group:
            return
        _single_process_env()
    if cuda_available():
        torch.cuda.set_device(device())
    import deepspeed

    if not cuda_available():
        _skip_deepspeed_shm_build()
    deepspeed.init_distributed(dist_backend=choose_backend(backend),
                               timeout=datetime.timedelta(seconds=timeout_s))


def barrier() -> None:
    if is_initialized():
        torch_dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (the single gather at the end of evaluation)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_max(value: float) -> float:
    if not is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device() if cuda_available() else "cpu")
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_sum(values: list[float]) -> list[float]:
    if not is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device() if cuda_available() else "cpu")
    torch_dist.all_reduce(t)
    return t.tolist()


def destroy() -> None:
    if is_initialized():
        torch_dist.destroy_process_group()


class RankPrefix:
    """A stream wrapper prefixing every line with ``[rank r]`` (only when world > 1)."""

    def __init__(self, stream, prefix: str):
        self._stream = stream
        self._prefix = prefix
        self._at_line_start = True

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            if self._at_line_start:
                out.append(self._prefix)
            out.append(piece)
            self._at_line_start = piece.endswith("\n")
        self._stream.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def prefix_output_with_rank() -> None:
    if env_world_size() > 1:
        prefix = f"[rank {env_rank()}] "
        sys.stdout = RankPrefix(sys.stdout, prefix)
        sys.stderr = RankPrefix(sys.stderr, prefix)
