"""Training-loop pieces: precision, the DeepSpeed config derived from ours, progress logging.

The loop itself reads top to bottom in ``launch/train.py``.
"""

from __future__ import annotations

import datetime
import json
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any, Iterable

import torch

from cstn import dist
from cstn.config import Config


def resolve_precision(cfg: Config) -> str:
    """``auto`` -> bf16 on CUDA, fp32 on CPU (DeepSpeed's CPU accelerator refuses fp16 and bf16 is
    much slower than fp32 on AVX2 CPUs). fp16/bf16 asked for on a CPU machine are refused loudly."""
    p = cfg.train.precision
    if p == "auto":
        return "bf16" if dist.cuda_available() else "fp32"
    if p == "fp16" and not dist.cuda_available():
        raise ValueError("train.precision=fp16 needs a GPU (DeepSpeed's CPU accelerator refuses fp16); use fp32")
    return p


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The engine config, derived from ours. The batch is defined once: micro x accumulation x world.

    ``train.deepspeed_json`` may name a JSON file of engine-only knobs merged on top (e.g.
    communication bucket sizes); it cannot change the batch, precision or ZeRO stage, which
    come from our config so that checkpoints and logs agree with it.
    """
    precision = resolve_precision(cfg)
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.train.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,  # our own progress line replaces DeepSpeed's
        "wall_clock_breakdown": False,
        # ZeRO 1/2 wrap any torch optimizer (the step runs on each rank's flat partition), but DeepSpeed
        # refuses those not on its list: torch SGD, the authors' optimizer, is not. Found by
        # bench/gpu_check.py's ZeRO 2 run, which tests/test_gpu_check.py runs with SGD on the CPU.
        "zero_allow_untested_optimizer": True,
    }
    if cfg.train.deepspeed_json:
        extra = json.loads(Path(cfg.train.deepspeed_json).read_text())
        fixed = {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                 "bf16", "fp16", "zero_optimization"}
        clash = sorted(fixed & set(extra))
        if clash:
            raise ValueError(f"{cfg.train.deepspeed_json}: keys {clash} come from the YAML config "
                             f"(data.batch_size, train.grad_accum, train.precision, train.zero_stage)")
        ds.update(extra)
    return ds


class SmoothedValue:
    """A windowed average plus a global one (torchvision references style)."""

    def __init__(self, window: int = 20):
        self.values: deque = deque(maxlen=window)
        self.total = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.values.append(value)
        self.total += value * n
        self.count += n

    @property
    def avg(self) -> float:
        return sum(self.values) / max(1, len(self.values))

    @property
    def global_avg(self) -> float:
        return self.total / max(1, self.count)


class Progress:
    """Rank-0 progress line: step, ETA, img/s (all ranks), data-time share, smoothed losses."""

    def __init__(self, total_steps: int, world_size: int, header: str = "train"):
        self.total_steps = total_steps
        self.world_size = world_size
        self.header = header
        self.meters: dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.t_last = time.perf_counter()
        self.data_time = SmoothedValue()
        self.step_time = SmoothedValue()

    def restart_clock(self) -> None:
        self.t_last = time.perf_counter()

    def data_ready(self) -> None:
        now = time.perf_counter()
        self._data_wait = now - self.t_last

    def step_done(self, batch_size: int, values: dict[str, float]) -> None:
        now = time.perf_counter()
        step = now - self.t_last
        self.step_time.update(step)
        self.data_time.update(getattr(self, "_data_wait", 0.0))
        self.t_last = now
        self.batch_size = batch_size
        for k, v in values.items():
            self.meters[k].update(v)

    def images_per_s(self) -> float:
        return self.batch_size * self.world_size / max(1e-9, self.step_time.avg)

    def data_fraction(self) -> float:
        return self.data_time.avg / max(1e-9, self.step_time.avg)

    def line(self, step: int, epoch: int, lr: float) -> str:
        eta = datetime.timedelta(seconds=int(self.step_time.avg * max(0, self.total_steps - step)))
        losses = "  ".join(f"{k} {m.avg:.4f}" for k, m in self.meters.items())
        return (f"{self.header} epoch {epoch} step {step}/{self.total_steps}  eta {eta}  {losses}  "
                f"lr {lr:.2e}  {self.images_per_s():.1f} img/s  data {100 * self.data_fraction():.0f}%")


def skip_batches(iterable: Iterable, n: int):
    """Drop the first ``n`` items (resume in the middle of an epoch; the order is seeded per epoch)."""
    it = iter(iterable)
    for _ in range(n):
        try:
            next(it)
        except StopIteration:
            return
    yield from it


def all_finite(value: torch.Tensor) -> bool:
    """True when the loss is finite on EVERY rank (one tiny all-reduce)."""
    bad = 0.0 if torch.isfinite(value).all() else 1.0
    return dist.all_reduce_max(bad) == 0.0


_DETAIL = ("_iou", "_small", "_middle", "_large", "num_", "area_", "eval_time", "eval_images")


def summarize(metrics: dict[str, Any]) -> str:
    """The headline figures of an evaluation (IoU 0.5, all sizes) on one line."""
    return "  ".join(f"{k} {v:.2f}" for k, v in metrics.items()
                     if isinstance(v, float) and not any(d in k for d in _DETAIL))


def sync_buffers(module: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over the ranks, in place.

    DeepSpeed all-reduces gradients but not buffers, so each rank's BatchNorm statistics drift
    apart; evaluation (each rank scores its own shards) and checkpoints (rank 0's copy) would
    then depend on the world size. Called after every optimizer step, it keeps one set of
    statistics: the running average of the ranks' batch statistics.
    """
    if not dist.is_initialized() or dist.world_size() == 1:
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.detach().reshape(-1).to(torch.float64) for b in buffers])
    torch.distributed.all_reduce(flat)
    flat /= dist.world_size()
    offset = 0
    for b in buffers:
        n = b.numel()
        b.copy_(flat[offset:offset + n].view_as(b).to(b.dtype))
        offset += n
