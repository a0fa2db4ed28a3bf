"""`make eval-scale`: the distributed evaluator over all 50,000 ILSVRC-2012 val entries, end to end.

1. an ILSVRC tree in the real layout from ``../shared/data/ilsvrc2012_val_boxes`` (real sizes, labels
   and 80,477 boxes; flat-colour pixels that encode fast), via ``pipeline.sources.ilsvrc_fixture``;
2. shards through ``launch/make_shards.py`` (LOC_val_solution.csv annotations);
3. ``deepspeed --num_gpus 2 launch/evaluate.py --config configs/eval_scale.yaml --checkpoint init``
   (an untrained small model), into MLflow;
4. checks the merged count is exactly 50,000 images and 80,477 boxes and prints wall time, img/s
   and the shares of waiting for data (decode + resize in the loader), model and metrics; last line JSON.

Not part of CI (about 10 minutes here). Steps whose output exists are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def step(cmd, **kw):
    print("$ " + " ".join(map(str, cmd)), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    t0 = time.time()
    subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, check=True, **kw)
    return time.time() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/eval_scale")
    p.add_argument("--ranks", type=int, default=2)
    args = p.parse_args(argv)
    out = ROOT / args.out
    fixture, shards = out / "ilsvrc", out / "shards"
    times = {}
    if not (fixture / "LOC_val_solution.csv").is_file():
        times["fixture_s"] = step([PY, "-m", "pipeline.sources.ilsvrc_fixture", "--out", fixture, "--no-xml"])
    if not (shards / "val" / "manifest.json").is_file():
        times["shards_s"] = step([PY, "launch/make_shards.py", "--dataset", "ilsvrc", "--root", fixture, "--split",
                                  "val", "--annotations", fixture / "LOC_val_solution.csv", "--out", shards,
                                  "--samples-per-shard", "5000", "--workers", "2"])
    eval_dir = out / "eval"
    times["evaluate_s"] = step([DEEPSPEED, "--num_gpus", str(args.ranks), "--master_port", free_port(),
                                "launch/evaluate.py", "--config",
                                "configs/eval_scale.yaml", f"data.root={shards}", f"train.out_dir={out / 'run'}",
                                "--checkpoint", "init", "--out", eval_dir])
    m = json.loads((eval_dir / "metrics.json").read_text())
    assert m["num_images"] == 50_000, f"merged {m['num_images']} images, expected 50,000"
    assert m["num_gt_boxes"] == 80_477, f"merged {m['num_gt_boxes']} boxes, expected 80,477"
    busy = m["eval_time_data_s"] + m["eval_time_model_s"] + m["eval_time_metrics_s"]
    result = {"images": int(m["num_images"]), "boxes": int(m["num_gt_boxes"]), "ranks": args.ranks,
              "evaluate_wall_s": round(times["evaluate_s"], 1),
              "img_s": round(50_000 / times["evaluate_s"], 1),
              "share_data_wait": round(m["eval_time_data_s"] / busy, 3),
              "share_model": round(m["eval_time_model_s"] / busy, 3),
              "share_metrics": round(m["eval_time_metrics_s"] / busy, 3),
              **{k: round(v, 1) for k, v in times.items() if k != "evaluate_s"}}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
