"""Data-parallel scaling of `launch/train.py`: training img/s with 1 rank and with 2 ranks, one run.

Same model (``configs/synthetic_cstn.yaml``: ResNet-10 x0.5, 112 px, CSTN head), same
shards, same per-rank batch (weak scaling, as data parallelism is used), one thread
per rank, fp32 over gloo on this CPU machine. Each launch trains ``--steps`` steps;
the figure is the median of the trainer's own img/s readings (all ranks) after the
first ``--skip`` progress lines (start-up). The two launches alternate ``--rounds`` times
so that load from other processes hits both alike.

    .venv/bin/python bench/scaling.py [--steps 40] [--rounds 2]

Last line JSON with ``img_s_1_rank``, ``img_s_2_ranks`` and ``speedup_2_ranks`` (target >= 1.7).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
RATE = re.compile(r"train epoch \d+ step (\d+)/\d+ .* ([0-9.]+) img/s")


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def make_shards(tmp: Path) -> Path:
    raw, shards = tmp / "raw", tmp / "shards"
    subprocess.run([PY, "-m", "pipeline.sources.synthetic", "--out", str(raw), "--num-train", "1280",
                    "--num-test", "64", "--image-size", "112"], cwd=ROOT, env=env(), check=True,
                   capture_output=True)
    for split in ("train", "test"):
        subprocess.run([PY, "launch/make_shards.py", "--dataset", "cub", "--root", str(raw), "--split", split,
                        "--out", str(shards), "--samples-per-shard", "320", "--workers", "2", "--no-progress"],
                       cwd=ROOT, env=env(), check=True, capture_output=True)
    return shards


def train_rate(ranks: int, shards: Path, out: Path, steps: int, skip: int) -> float:
    cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(29700 + ranks), "launch/train.py",
           "--config", "configs/synthetic_cstn.yaml", f"data.root={shards}", f"train.out_dir={out}",
           f"train.max_steps={steps}", "train.log_every_steps=2", "log.mlflow=false", "train.epochs=2"]
    res = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{ranks}-rank training failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    rates = [float(m.group(2)) for m in RATE.finditer(res.stdout)]
    if len(rates) <= skip:
        raise SystemExit(f"too few progress lines ({len(rates)}) in the {ranks}-rank run")
    return statistics.median(rates[skip:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--skip", type=int, default=3, help="progress lines dropped as start-up")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = make_shards(tmp)
        one, two = [], []
        for r in range(args.rounds):
            one.append(train_rate(1, shards, tmp / f"one{r}", args.steps, args.skip))
            two.append(train_rate(2, shards, tmp / f"two{r}", args.steps, args.skip))
            print(f"round {r}: 1 rank {one[-1]:.1f} img/s, 2 ranks {two[-1]:.1f} img/s", flush=True)
    load = os.getloadavg()[0]
    result = {"img_s_1_rank": round(statistics.median(one), 1), "img_s_2_ranks": round(statistics.median(two), 1),
              "speedup_2_ranks": round(statistics.median(two) / statistics.median(one), 3), "target": 1.7,
              "rounds": args.rounds, "steps": args.steps, "load_avg_1min_after": round(load, 2)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
