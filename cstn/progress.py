"""Progress lines of long loops, one helper for training and evaluation (rank 0 prints them).

:class:`Progress` times each step (or evaluation batch) and the share of it spent waiting for data,
and smooths the values given (the loss terms) over a window, in the manner of torchvision's
``MetricLogger``.
"""

from __future__ import annotations

import datetime
import time
from collections import defaultdict, deque

__all__ = ["Progress", "SmoothedValue"]


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
    """Rank-0 progress line of a loop over steps (training) or batches (evaluation): ETA, img/s of all
    ranks (this rank's rate times the world size: the ranks run alike), data-time share, and smoothed
    values (the loss terms in training)."""

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

    def line(self, step: int, epoch: int | None = None, lr: float | None = None) -> str:
        """``<header> [epoch E] step s/total  eta  [smoothed values]  [lr]  img/s (all ranks)  data %``."""
        eta = datetime.timedelta(seconds=int(self.step_time.avg * max(0, self.total_steps - step)))
        parts = [self.header + ("" if epoch is None else f" epoch {epoch}") + f" step {step}/{self.total_steps}",
                 f"eta {eta}"]
        parts += [f"{k} {m.avg:.4f}" for k, m in self.meters.items()]
        if lr is not None:
            parts.append(f"lr {lr:.2e}")
        parts += [f"{self.images_per_s():.1f} img/s", f"data {100 * self.data_fraction():.0f}%"]
        return "  ".join(parts)
