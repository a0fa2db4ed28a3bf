"""Cost of the CSTN head: forward + backward of the whole model, CSTN head vs plain conv head.

The paper says the convolutional STN layer "is not much more expensive than a normal
convolution". This measures, in one run and on this machine, one training step's forward and
backward pass (loss included, no optimizer step) of the same model with ``model.head=cstn``
(``fast`` and ``reference`` implementations) and with ``model.head=conv`` (same kernel sizes, no
transform), for

* ``demo``: the CPU demo setting, ResNet-10 at width 0.5, 112 px input, 10 classes, batch 16,
  P = Q = 128 FPN/filter-bank channels, 64 localisation channels; windows k = [5, 3] without
  padding on P4 (7x7 cells, 3x3 locations, 80 px windows) and P5 (4x4 cells, 2x2 locations,
  96 px windows);
* ``ilsvrc``: the paper's setting at small batch, ResNet-50, 320 px, 1000 classes, batch 2,
  P = Q = 256, 128 localisation channels, k = [13, 7] without padding (authors' code).

Repetitions of the variants are interleaved (A B C A B C ...) so that load from other processes
hits them alike; the figure is the ratio of median step times. The last line is JSON with
``ratio_demo`` and ``ratio_ilsvrc`` (fast CSTN / conv; target <= 1.15) and the details.

    .venv/bin/python bench/head.py [--threads 2] [--repeats-demo 12] [--repeats-ilsvrc 6] [--budget-s 75]

About a minute on an idle 2-core machine. With other processes on the cores, multi-threaded steps
stall and the figures are noise: the JSON carries the 1-minute load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

import torch

from cstn.config import load_config
from cstn.losses import compute_loss
from cstn.models import build_model

SETTINGS = {
    "demo": dict(batch=16, overrides=[
        "data.image_size=112", "model.backbone=resnet10", "model.width=0.5", "model.num_classes=10",
        "model.fpn_channels=128", "model.head_channels=128", "model.loc_hidden=64",
        "model.levels=[4,5]", "model.kernel_sizes=[5,3]", "model.paddings=[0,0]"]),
    "ilsvrc": dict(batch=2, overrides=[
        "data.image_size=320", "model.backbone=resnet50", "model.width=1.0", "model.num_classes=1000",
        "model.fpn_channels=256", "model.head_channels=256", "model.loc_hidden=128",
        "model.levels=[4,5]", "model.kernel_sizes=[13,7]", "model.paddings=[0,0]"]),
}

VARIANTS = {
    "cstn_fast": ["model.head=cstn", "model.head_impl=fast"],
    "cstn_reference": ["model.head=cstn", "model.head_impl=reference"],
    "conv": ["model.head=conv"],
}


def step_seconds(model, cfg, images, labels) -> float:
    start = time.perf_counter()
    losses = compute_loss(model(images), labels, cfg.loss)
    losses["loss"].backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measure(name: str, repeats: int, budget_s: float, warmup: int = 2, min_repeats: int = 3) -> dict:
    setting = SETTINGS[name]
    torch.manual_seed(0)
    models, cfgs = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")           # random-init warning: weights do not matter here
        for variant, extra in VARIANTS.items():
            cfgs[variant] = load_config(None, setting["overrides"] + extra)
            models[variant] = build_model(cfgs[variant]).train()
    size = cfgs["conv"].data.image_size
    images = torch.randint(0, 256, (setting["batch"], 3, size, size), dtype=torch.uint8)
    labels = torch.randint(0, cfgs["conv"].model.num_classes, (setting["batch"],))
    times = {variant: [] for variant in VARIANTS}
    start = time.perf_counter()
    for round_index in range(warmup + repeats):
        for variant, model in models.items():
            seconds = step_seconds(model, cfgs[variant], images, labels)
            if round_index >= warmup:
                times[variant].append(seconds)
        if round_index + 1 >= warmup + min_repeats and time.perf_counter() - start > budget_s:
            break                                  # a loaded machine: keep the runtime bounded
    median = {variant: statistics.median(values) for variant, values in times.items()}
    result = {
        "batch": setting["batch"], "image_size": size, "repeats": len(times["conv"]),
        "median_s": {variant: round(value, 4) for variant, value in median.items()},
        "ratio_fast": round(median["cstn_fast"] / median["conv"], 3),
        "ratio_reference": round(median["cstn_reference"] / median["conv"], 3),
        "images_per_s": {variant: round(setting["batch"] / value, 2) for variant, value in median.items()},
    }
    print(f"{name}: " + json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeats-demo", type=int, default=12)
    parser.add_argument("--repeats-ilsvrc", type=int, default=6)
    parser.add_argument("--budget-s", type=float, default=75.0,
                        help="per setting: stop repeating (after 3 rounds) once this many seconds passed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # Other processes on the same cores stall multi-threaded steps (each parallel region waits for a
    # descheduled thread): the ratios are meaningful only when the load stays below the core count.
    load_before = os.getloadavg()[0]
    demo = measure("demo", args.repeats_demo, args.budget_s)
    ilsvrc = measure("ilsvrc", args.repeats_ilsvrc, args.budget_s)
    print(json.dumps({
        "ratio_demo": demo["ratio_fast"], "ratio_ilsvrc": ilsvrc["ratio_fast"],
        "ratio_demo_reference": demo["ratio_reference"], "ratio_ilsvrc_reference": ilsvrc["ratio_reference"],
        "target": 1.15, "threads": args.threads, "device": "cpu",
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }))


if __name__ == "__main__":
    main()
