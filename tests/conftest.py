"""Shared fixtures: tiny synthetic shards made through the real path (generator -> CUB converter -> shards)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def make_tiny_shards(out: Path, num_train: int = 40, num_test: int = 22, image_size: int = 64,
                     num_classes: int = 4, seed: int = 0, samples_per_shard: int = 8) -> Path:
    """Synthetic CUB layout -> ``launch/make_shards.py`` for train and test; returns the shards root."""
    raw, shards = out / "raw", out / "shards"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "pipeline.sources.synthetic", "--out", str(raw),
                    "--num-train", str(num_train), "--num-test", str(num_test), "--image-size", str(image_size),
                    "--num-classes", str(num_classes), "--seed", str(seed)],
                   check=True, cwd=ROOT, env=env, capture_output=True)
    for split in ("train", "test"):
        subprocess.run([sys.executable, "launch/make_shards.py", "--dataset", "cub", "--root", str(raw),
                        "--split", split, "--out", str(shards), "--samples-per-shard", str(samples_per_shard),
                        "--workers", "1"], check=True, cwd=ROOT, env=env, capture_output=True)
    return shards


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """40 train / 22 test images, 64 px, 4 classes, 8 samples per shard (22 is not divisible by 2 x 8)."""
    return make_tiny_shards(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def reference():
    """The real ILSVRC-2012 val geometry of ``../shared/data/ilsvrc2012_val_boxes`` (skips when absent)."""
    from pipeline.sources import ilsvrc_fixture

    if not ilsvrc_fixture.DEFAULT_VAL_BOXES_DIR.is_dir():
        pytest.skip(f"{ilsvrc_fixture.DEFAULT_VAL_BOXES_DIR} not present")
    return ilsvrc_fixture.read_val_reference()
