"""`launch/evaluate.py`: identical results on 1, 2 and 3 ranks (gloo), outputs, and clear errors."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.sources.ilsvrc_fixture import make_fixture
from tests.mlflow_server import free_port

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
TIMING = ("eval_time", "eval_images_read")


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def run(cmd, timeout=300):
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tiny_shards, tmp_path_factory):
    """A tiny model trained for 3 steps in one process (its checkpoint is what we evaluate)."""
    out = tmp_path_factory.mktemp("run")
    res = run([sys.executable, "launch/train.py", "--config", "configs/tiny.yaml", f"data.root={tiny_shards}",
               f"train.out_dir={out}", "train.max_steps=3", "log.mlflow=false"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


def evaluate(shards, run_dir, out, ranks, *extra):
    args = ["launch/evaluate.py", "--config", "configs/tiny.yaml", f"data.root={shards}",
            "--checkpoint", str(run_dir / "checkpoints"), "--out", str(out), "log.mlflow=false", *extra]
    if ranks == 1:
        return run([sys.executable, *args])
    return run([DEEPSPEED, "--num_gpus", str(ranks), f"--master_port={free_port()}", *args])


def test_same_metrics_on_1_2_3_ranks(tiny_shards, trained, tmp_path):
    results = {}
    for ranks in (1, 2, 3):  # 22 test images, batch 8: never divisible by world x batch
        res = evaluate(tiny_shards, trained, tmp_path / f"r{ranks}", ranks)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        metrics = json.loads((tmp_path / f"r{ranks}" / "metrics.json").read_text())
        results[ranks] = {k: v for k, v in metrics.items() if not k.startswith(TIMING)}
        rows = list(csv.DictReader(open(tmp_path / f"r{ranks}" / "predictions.csv")))
        assert sorted(int(r["index"]) for r in rows) == list(range(22))  # every image exactly once
    assert results[1]["num_images"] == 22
    assert results[1] == results[2] == results[3]
    out = tmp_path / "r2"
    for name in ("boxes.png", "area_hist_all.png", "area_hist_all.csv"):
        assert (out / name).stat().st_size > 0, name


def test_mismatched_checkpoint_is_refused(tiny_shards, trained, tmp_path):
    res = evaluate(tiny_shards, trained, tmp_path / "x", 1, "model.num_classes=5")
    assert res.returncode == 2
    assert "model.num_classes: checkpoint 4 vs config 5" in res.stderr


def test_missing_shards_named(trained, tmp_path):
    res = evaluate(tmp_path / "nowhere", trained, tmp_path / "x", 1)
    assert res.returncode == 2 and str(tmp_path / "nowhere" / "test") in res.stderr


@pytest.mark.usefixtures("reference")  # the ILSVRC fixture needs the real val geometry (skips when absent)
def test_split_without_boxes_refused(trained, tmp_path):
    src = make_fixture(tmp_path / "ilsvrc", count=0, xml=False, csv_file=False, train_classes=2, train_per_class=3)
    res = run([sys.executable, "launch/make_shards.py", "--dataset", "ilsvrc", "--root", str(src), "--split", "train",
               "--out", str(tmp_path / "shards"), "--workers", "1"])
    assert res.returncode == 0, res.stderr[-2000:]
    res = evaluate(tmp_path / "shards", trained, tmp_path / "x", 1, "--split", "train")
    assert res.returncode == 2 and "has no ground-truth boxes" in res.stderr


def test_predict_writes_boxes_and_pictures(tiny_shards, trained, tmp_path):
    images = tiny_shards.parent / "raw" / "images"
    files = sorted(images.rglob("*.jpg"))[:5]
    res = run([sys.executable, "launch/predict.py", "--config", "configs/tiny.yaml", f"data.root={tiny_shards}",
               "--checkpoint", str(trained / "checkpoints"), "--images", *map(str, files), "--out",
               str(tmp_path / "pred"), "--viz"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == list(map(str, files))
    for r in rows:
        x0, y0, x1, y1 = r["box"]
        assert 0 <= x0 <= x1 <= r["width"] and 0 <= y0 <= y1 <= r["height"]
        assert len(r["top5_classes"]) == 4 and r["top5_names"] is not None  # 4 classes in the tiny set
        assert (tmp_path / "pred" / "viz" / f"{Path(r['file']).stem}_boxes.jpg").stat().st_size > 0
    res = run([sys.executable, "launch/predict.py", "--config", "configs/tiny.yaml", "--checkpoint",
               str(trained / "checkpoints"), "--images", str(tmp_path / "missing")])
    assert res.returncode == 2 and "no such image or directory" in res.stderr
