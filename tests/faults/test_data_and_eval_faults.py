"""Corrupt data found mid-run (after conversion, manifest unchanged) and an evaluation killed and re-run."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import schema
from pipeline.dali_index import read_index
from pipeline.manifest import read_split
from tests.faults.common import ROOT, Job, env, train_args

pytestmark = pytest.mark.slow

EXIT_BOUND_S = 90  # a failed job must be gone this long after the fault (generous: the machine is shared)
TIMING = ("eval_time", "eval_images_read")


def corrupt_one_jpeg(shards: Path, out: Path, split: str, shard_number: int = 2, sample: int = 3) -> dict:
    """A copy of ``shards`` where one JPEG inside one tar has its first 256 bytes zeroed in place (as a
    disk error would): tar size, index and manifest unchanged, so only decoding the image finds it.
    Returns the shard path, sample key and global index."""
    shutil.copytree(shards, out)
    shard = read_split(out, split).shards[shard_number]
    entry = read_index(shard.index)[sample]
    offset, size = entry.members[schema.IMAGE]
    gid_offset, gid_size = entry.members[schema.INDEX]
    with open(shard.tar, "r+b") as f:
        f.seek(gid_offset)
        index = int(np.frombuffer(f.read(gid_size), np.int64)[0])
        f.seek(offset)
        f.write(b"\0" * min(256, size))
    return {"shard": str(shard.tar), "key": entry.key, "index": index}


@pytest.fixture(scope="module")
def bad_train(tiny_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_train") / "shards"
    return root, corrupt_one_jpeg(tiny_shards, root, "train")


@pytest.fixture(scope="module")
def bad_test(tiny_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_test") / "shards"
    return root, corrupt_one_jpeg(tiny_shards, root, "test")


@pytest.mark.timeout(400)
def test_corrupt_training_shard_fails_clearly_when_on_corrupt_fail(bad_train, tmp_path):
    shards, bad = bad_train
    job = Job("launch/train.py", train_args(shards, tmp_path / "run", "log.mlflow=false", "data.on_corrupt=fail"))
    try:
        line = job.wait_for(r"data error: shard ").string
        seen_at = time.time()
        code = job.wait(timeout=EXIT_BOUND_S + 30)
        elapsed = time.time() - seen_at
    finally:
        job.kill()
    assert code != 0
    assert elapsed < EXIT_BOUND_S, f"the job took {elapsed:.0f}s to end after the data error"
    assert bad["shard"] in line and repr(bad["key"]) in line, line
    assert "done: " not in job.output


@pytest.mark.timeout(400)
def test_corrupt_training_shard_is_counted_when_on_corrupt_skip(bad_train, tmp_path):
    shards, bad = bad_train
    job = Job("launch/train.py", train_args(shards, tmp_path / "run", "log.mlflow=false", "data.on_corrupt=skip"))
    try:
        code = job.wait()
    finally:
        job.kill()
    assert code == 0, job.tail()
    summary = json.loads(job.wait_for(r"done: (\{.*\})").group(1))
    assert summary["step"] == 10
    assert summary["skipped_samples"] == 2  # the bad image is met once per epoch, on whichever rank reads it
    warnings = [l for l in job.lines if "skipping corrupt sample" in l]
    assert len(warnings) == 2 and all(repr(bad["key"]) in l and bad["shard"] in l for l in warnings), warnings


def evaluate_cmd(shards: Path, reference_run: Path, out: Path, *extra: str) -> list[str]:
    return ["launch/evaluate.py", "--config", "configs/tiny.yaml", f"data.root={shards}",
            "--checkpoint", str(reference_run / "checkpoints"), "--out", str(out), "log.mlflow=false", *extra]


@pytest.mark.timeout(700)  # includes the shared reference run
def test_corrupt_evaluation_image(bad_test, reference, tmp_path):
    """``skip``: the exactly-once check fails naming both counts and the missing index; ``fail``: the
    error names the shard and the sample."""
    shards, bad = bad_test
    procs = {mode: subprocess.Popen([sys.executable, *evaluate_cmd(shards, reference.out_dir, tmp_path / mode,
                                                                   f"data.on_corrupt={mode}")],
                                    cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for mode in ("skip", "fail")}
    try:
        results = {mode: (p.communicate(timeout=240), p.returncode) for mode, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()
    (_, err), code = results["skip"]
    assert code == 1, err[-3000:]
    assert (f"merged evaluation holds 21 distinct images but the manifest total is 22; 1 missing, "
            f"first indices [{bad['index']}]") in err, err[-3000:]
    assert not (tmp_path / "skip" / "metrics.json").exists()
    (_, err), code = results["fail"]
    assert code == 1, err[-3000:]
    error = [l for l in err.splitlines() if l.startswith("evaluation error:")]
    assert error and bad["shard"] in error[0] and repr(bad["key"]) in error[0], err[-3000:]


def without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith(TIMING)}


@pytest.mark.timeout(800)  # includes the shared reference run
def test_evaluation_killed_and_rerun(tiny_shards, reference, tmp_path):
    """Rank 0 of a 2-rank evaluation is killed while writing its outputs: the job ends non-zero, no
    ``metrics.json`` is left to be mistaken for a result, and a re-run into the same directory gives
    the metrics and predictions of an uninterrupted evaluation of the same checkpoint."""
    assert reference.returncode == 0, reference.job.tail()
    out = tmp_path / "eval"
    args = evaluate_cmd(tiny_shards, reference.out_dir, out)
    job = Job(args[0], args[1:], faults=[{"point": "eval_outputs"}])
    try:
        pid = int(job.wait_for(r"FAULT-PAUSE eval_outputs rank=0 pid=(\d+)").group(1))
        assert (out / "predictions.csv").is_file()
        code, elapsed = job.kill_rank(pid, timeout=EXIT_BOUND_S + 30)
    finally:
        job.kill()
    assert code != 0 and elapsed < EXIT_BOUND_S, (code, elapsed)
    assert not (out / "metrics.json").exists()

    clean = tmp_path / "uninterrupted"
    procs = [subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for cmd in (args, evaluate_cmd(tiny_shards, reference.out_dir, clean))]
    try:
        results = [(p.communicate(timeout=240), p.returncode) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for (_, err), code in results:
        assert code == 0, err[-3000:]
    rerun = json.loads((out / "metrics.json").read_text())
    uninterrupted = json.loads((clean / "metrics.json").read_text())
    assert rerun["num_images"] == 22
    assert without_timing(rerun) == without_timing(uninterrupted)
    assert (out / "predictions.csv").read_text() == (clean / "predictions.csv").read_text()
