"""Training-loop pieces: precision, the DeepSpeed config derived from ours, resuming mid-epoch, finite checks.

The loop itself reads top to bottom in ``launch/train.py``.
"""

from __future__ import annotations

import json
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
