"""Faults an operator meets (issue 16): a damaged checkpoint, a missing manifest, two jobs in one run
directory, a swapped shard, a full disk, a damaged image, a killed rank's readers, another world size.

Each test injects the fault into a real run (2 DeepSpeed ranks on the CPU where training is involved)
and asserts the one-line answer and that nothing was lost.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cstn.checkpoint import META
from tests.faults.common import ROOT, Job, env, final_weights, latest_tag, max_difference, train_args

pytestmark = pytest.mark.slow


def run(cmd: list[str], timeout: float = 300, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env(**extra), capture_output=True, text=True, timeout=timeout)


def last_line(text: str) -> str:
    """The last non-empty line (the error a script ends with; warnings may come before it)."""
    return [line for line in text.splitlines() if line.strip()][-1]


def copy_run(reference, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference.out_dir, out, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    return out


def evaluate(shards: Path, checkpoint: Path | str, out: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, "launch/evaluate.py", "--config", "configs/tiny.yaml", f"data.root={shards}",
                "data.num_workers=0", "log.mlflow=false", "--checkpoint", str(checkpoint), "--out", str(out)])


@pytest.mark.timeout(900)
@pytest.mark.parametrize("damage", ["truncate_weights", "overwrite_rng", "break_meta"])
def test_damaged_checkpoint_falls_back_to_the_previous_one(reference, tiny_shards, tmp_path, damage):
    """The latest tag (step 10) damaged three ways: evaluation of the run's checkpoints/ uses step 8 and
    says why step 10 was skipped; the tag given explicitly is a one-line error naming the file. (A damaged
    RNG file does not concern evaluation, which reads the weights only.)"""
    assert reference.returncode == 0, reference.job.tail()
    out = copy_run(reference, tmp_path)
    tag = out / "checkpoints" / "step00000010"
    victim = {"truncate_weights": tag / "mp_rank_00_model_states.pt", "overwrite_rng": tag / "rng_rank1.pt",
              "break_meta": tag / META}[damage]
    if damage == "truncate_weights":
        victim.write_bytes(victim.read_bytes()[:1000])
    elif damage == "overwrite_rng":
        victim.write_bytes(b"\0" * victim.stat().st_size)          # same size: only the sha256 sees it
    else:
        victim.write_text('{"tag": "step00000010", "step": 1')
    res = evaluate(tiny_shards, out / "checkpoints", tmp_path / "eval")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    if damage == "overwrite_rng":  # evaluation reads the weights only: that tag is still good for it (resume is not)
        assert "checkpoint warning" not in res.stdout and "(step00000010)" in res.stdout
    else:
        assert "checkpoint warning: skipped step00000010" in res.stdout and str(victim) in res.stdout
        assert f"using {out / 'checkpoints' / 'step00000008'}" in res.stdout
    res = evaluate(tiny_shards, tag, tmp_path / "eval_explicit")
    if damage == "overwrite_rng":
        assert res.returncode == 0, res.stderr[-3000:]
    else:
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
        assert last_line(res.stderr).startswith("checkpoint error: ") and str(victim) in last_line(res.stderr)


@pytest.mark.timeout(900)
def test_resume_skips_a_damaged_latest_and_loses_nothing(reference, tiny_shards, tmp_path):
    """--resume auto with the latest tag's rank-1 RNG file overwritten: the job resumes from step 8,
    says so, and ends with exactly the uninterrupted run's weights."""
    assert reference.returncode == 0, reference.job.tail()
    out = copy_run(reference, tmp_path)
    rng = out / "checkpoints" / "step00000010" / "rng_rank1.pt"
    rng.write_bytes(b"\0" * rng.stat().st_size)
    job = Job("launch/train.py", train_args(tiny_shards, out, "log.mlflow=false", "--resume", "auto"))
    try:
        code = job.wait()
    finally:
        job.kill()
    assert code == 0, job.tail()
    assert "checkpoint warning: skipped step00000010" in job.output and str(rng) in job.output
    assert f"resumed from {out / 'checkpoints' / 'step00000008'}" in job.output
    assert latest_tag(out) == "step00000010"
    assert max_difference(final_weights(out), final_weights(reference.out_dir)) <= 1e-6


@pytest.mark.timeout(300)
def test_no_checkpoint_verifies_is_an_error_not_a_fresh_start(reference, tiny_shards, tmp_path):
    assert reference.returncode == 0, reference.job.tail()
    out = copy_run(reference, tmp_path)
    for tag in (out / "checkpoints").glob("step*"):
        states = tag / "mp_rank_00_model_states.pt"
        states.write_bytes(states.read_bytes()[:100])
    res = run([sys.executable, "launch/train.py", *train_args(tiny_shards, out, "log.mlflow=false"),
               "--resume", "auto"])
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "checkpoint error: no checkpoint under" in res.stderr and "step00000002" in res.stderr


@pytest.mark.timeout(300)
def test_training_without_its_manifest_is_a_data_error(tiny_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    (shards / "train" / "manifest.json").unlink()
    res = run([sys.executable, "launch/train.py", *train_args(shards, tmp_path / "out", "log.mlflow=false")])
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert last_line(res.stderr).startswith("data error: ") and str(shards / "train") in res.stderr


@pytest.mark.timeout(600)
def test_a_second_job_in_the_same_run_directory_is_refused(tiny_shards, tmp_path):
    """While a job holds the run directory (paused after step 2), a second job into it stops at once naming
    the holder, touching nothing; the first job finishes unharmed and leaves no lock; a stale lock (a
    dead pid) is taken over."""
    from tests.faults.common import touch

    out = tmp_path / "run"
    gate = tmp_path / "gate"
    first = Job("launch/train.py", train_args(tiny_shards, out, "log.mlflow=false"),
                faults=[{"point": "step", "step": 2, "where": "after", "ranks": [0, 1], "gate": str(gate)}])
    try:
        first.wait_for("FAULT-PAUSE step2-after rank=0")
        holder = json.loads((out / "job.lock").read_text())
        before = sorted(p.name for p in (out / "checkpoints").iterdir())
        res = run([sys.executable, "launch/train.py", *train_args(tiny_shards, out, "log.mlflow=false")], timeout=120)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
        assert last_line(res.stderr).startswith(f"run directory error: {out} is in use by another training job: host "
                                     f"{holder['host']}, pid {holder['pid']}, started {holder['started_at']}")
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before and not (out / "mlflow.db").exists()
        touch(gate)
        assert first.wait() == 0, first.tail()
    finally:
        first.kill()
    assert not (out / "job.lock").exists() and latest_tag(out) == "step00000010"
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "job.lock").write_text(json.dumps({"host": holder["host"], "pid": 2 ** 22 - 7, "started": 0,
                                                "started_at": "long ago", "command": "launch/train.py"}))
    res = run([sys.executable, "launch/train.py", *train_args(tiny_shards, stale, "log.mlflow=false",
                                                              "train.max_steps=1")])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "took over the stale lock of job pid 4194297" in res.stdout and not (stale / "job.lock").exists()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("swap", ["other_split", "other_position", "other_split_reindexed"])
def test_a_swapped_shard_is_refused_naming_it(tiny_shards, tmp_path, swap):
    """A shard of another split (or another position) copied over a test shard with its index, or with an index
    rebuilt by wds2idx: evaluation stops before reading an image, naming the shard."""
    from pipeline.dali_index import write_dali_index

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    victim = shards / "test" / "test-000001.tar"
    source = {"other_split": shards / "train" / "train-000001.tar", "other_position": shards / "test" / "test-000000.tar",
              "other_split_reindexed": shards / "train" / "train-000001.tar"}[swap]
    shutil.copyfile(source, victim)
    if swap == "other_split_reindexed":
        write_dali_index(victim, victim.with_suffix(".idx"))
    else:
        shutil.copyfile(source.with_suffix(".idx"), victim.with_suffix(".idx"))
    res = run([sys.executable, "launch/evaluate.py", "--config", "configs/tiny.yaml", f"data.root={shards}",
               "log.mlflow=false", "--checkpoint", "init", f"train.out_dir={tmp_path / 'out'}"])
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert last_line(res.stderr).startswith("data error: ") and str(victim) in last_line(res.stderr)
    assert "swapped or stale shard" in res.stderr or "not the one the manifest lists" in res.stderr
    assert not (tmp_path / "out" / "eval").exists()


@pytest.mark.timeout(300)
def test_predict_skips_damaged_images_and_keeps_every_picture(reference, tiny_shards, tmp_path):
    """A folder with a truncated JPEG, an empty file and two images of the same name in two subfolders:
    the damaged ones are skipped and listed with their reason, exit 1; the others are predicted, and
    both same-named pictures are kept."""
    assert reference.returncode == 0, reference.job.tail()
    raw = sorted((tiny_shards.parent / "raw" / "images").rglob("*.jpg"))
    folder = tmp_path / "images"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    shutil.copyfile(raw[0], folder / "a" / "same.jpg")
    shutil.copyfile(raw[1], folder / "b" / "same.jpg")
    (folder / "truncated.jpg").write_bytes(raw[2].read_bytes()[:-400])
    (folder / "empty.jpg").write_bytes(b"")
    shutil.copyfile(raw[3], folder / "fine.jpg")
    res = run([sys.executable, "launch/predict.py", "--config", "configs/tiny.yaml", f"data.root={tiny_shards}",
               "--checkpoint", str(reference.out_dir / "checkpoints"), "--images", str(folder),
               "--out", str(tmp_path / "pred"), "--viz"])
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stdout[-2000:] + res.stderr[-2000:]
    skipped = {Path(r["file"]).name: r["reason"] for r in map(json.loads, (tmp_path / "pred" / "skipped.jsonl")
                                                              .read_text().splitlines())}
    assert set(skipped) == {"truncated.jpg", "empty.jpg"}
    assert "damaged JPEG" in skipped["truncated.jpg"] and skipped["empty.jpg"] == "empty file"
    assert f"skipped {folder / 'truncated.jpg'}: damaged JPEG" in res.stderr
    rows = [json.loads(line) for line in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()]
    assert sorted(Path(r["file"]).relative_to(folder).as_posix() for r in rows) == ["a/same.jpg", "b/same.jpg", "fine.jpg"]
    viz = tmp_path / "pred" / "viz"
    assert (viz / "a" / "same_boxes.jpg").is_file() and (viz / "b" / "same_boxes.jpg").is_file()
    assert (viz / "fine_boxes.jpg").is_file()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [0, 2])
def test_converter_on_a_full_disk_says_so_and_resumes(tiny_shards, tmp_path, workers):
    """The output filesystem fills up three quarters of the way (tests/faults/diskfull: writes under the output directory fail
    with ENOSPC past a byte budget): one line naming the directory and the free space, exit 2, no .tmp
    left; the same command with room resumes, keeping the shards already written."""
    raw = tiny_shards.parent / "raw"
    cmd = [sys.executable, "launch/make_shards.py", "--dataset", "cub", "--root", str(raw), "--split", "train",
           "--samples-per-shard", "8", "--workers", str(workers), "--no-progress"]
    full = run([*cmd, "--out", str(tmp_path / "roomy")])
    assert full.returncode == 0, full.stderr[-2000:]
    needed = sum(p.stat().st_size for p in (tmp_path / "roomy").rglob("*") if p.is_file())
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    diskfull = str(Path(__file__).resolve().parent / "diskfull")
    res = run([*cmd, "--out", str(out)], CSTN_FAULT_DISK_DIR=str(out), CSTN_FAULT_DISK_BYTES=str(needed * 3 // 4),
              PYTHONPATH=diskfull + os.pathsep + os.environ.get("PYTHONPATH", ""))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith(f"make_shards.py: error: no space left on the device of {out / 'train'} (")
    assert "MiB free" in res.stderr and "run the same command again to resume" in res.stderr
    assert not list(out.rglob("*.tmp"))
    written = sorted(p.name for p in (out / "train").glob("*.tar"))
    # three quarters of the room (5 shards): more than the 3 that can be in flight at once with 2 workers,
    # so whatever the interleaving some shards were finished before the disk filled (half the room failed
    # this on a loaded machine: 3 shards at 83% each)
    assert written
    res = run([*cmd, "--out", str(out)])
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"{len(written)} kept" in res.stdout
    roomy = json.loads((tmp_path / "roomy" / "train" / "manifest.json").read_text())
    resumed = json.loads((out / "train" / "manifest.json").read_text())
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in roomy["shards"]]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_no_reader_process_outlives_its_rank(tiny_shards, tmp_path, signal_name):
    """An evaluation job whose launcher is killed first, then its ranks (SIGTERM or SIGKILL) while their
    decode workers run: a few seconds later no process of the job is left."""
    import signal
    import time

    import psutil

    job = Job("launch/evaluate.py", ["--config", "configs/tiny.yaml", f"data.root={tiny_shards}", "data.num_workers=2",
                                     "data.eval_batch_size=4", "log.mlflow=false", "--checkpoint", "init",
                                     f"train.out_dir={tmp_path / 'out'}"],
              faults=[{"point": "eval_batch", "batch": 2, "ranks": [0, 1]}])
    try:
        job.wait_for("FAULT-PAUSE eval_batch2 rank=0")
        job.wait_for("FAULT-PAUSE eval_batch2 rank=1")
        launcher = job.launcher()
        ranks = [psutil.Process(pid) for pid in job.rank_pids().values()]
        family = {p.pid: p for r in ranks for p in [r, *r.children(recursive=True)]}
        assert len(family) > len(ranks), "the decode workers should be running"
        launcher.kill()
        launcher.wait(10)
        for rank in ranks:
            rank.send_signal(getattr(signal, signal_name))
        deadline = time.time() + 15
        while time.time() < deadline and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                                             for p in family.values()):
            time.sleep(0.2)
        left = [f"{p.pid} {' '.join(p.cmdline())[:80]}" for p in family.values()
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, left
    finally:
        job.kill()


def parameters_only(weights: dict) -> dict:
    """The model's parameters (BatchNorm running statistics are buffers, averaged over ranks after each
    step in one world and updated in sequence under accumulation in another: not what the optimizer sees)."""
    return {k: v for k, v in weights.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


@pytest.mark.timeout(900)
def test_a_two_rank_run_resumes_on_one_rank_and_ends_with_the_same_weights(reference, tiny_shards, tmp_path):
    """The reference run's step-4 checkpoint (2 ranks) resumed by one process: accumulation 2 keeps the global
    batch, each step trains on the same micro-batches, and step 10 matches the uninterrupted 2-rank run."""
    assert reference.returncode == 0, reference.job.tail()
    out = copy_run(reference, tmp_path)
    ckpt = out / "checkpoints"
    for tag in ckpt.glob("step*"):
        if tag.name > "step00000004":
            shutil.rmtree(tag)
    (ckpt / "latest").write_text("step00000004")
    (ckpt / "best").unlink(missing_ok=True)
    res = run([sys.executable, "launch/train.py", *train_args(tiny_shards, out, "log.mlflow=false"), "--resume", "auto"],
              timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resume: the checkpoint was written by 2 rank(s) with a global batch of 8" in res.stdout
    assert "gradient accumulation 2 keeps the global batch" in res.stdout
    assert f"resumed from {ckpt / 'step00000004'}" in res.stdout and latest_tag(out) == "step00000010"
    ours, theirs = parameters_only(final_weights(out)), parameters_only(final_weights(reference.out_dir))
    worst = max_difference(ours, theirs)
    assert worst <= 1e-5, f"the 1-rank resume differs from the 2-rank run by {worst}"


@pytest.mark.timeout(600)
def test_resumes_that_cannot_keep_the_run_are_refused_naming_both_worlds(reference, tiny_shards, tmp_path):
    """3 ranks cannot split 2 micro-batches per step; a changed micro-batch changes the run; a ZeRO 1 checkpoint
    keeps its optimizer state per rank. Each is one line naming both world sizes and what to pass."""
    assert reference.returncode == 0, reference.job.tail()
    out = copy_run(reference, tmp_path)
    job = Job("launch/train.py", train_args(tiny_shards, out, "log.mlflow=false", "--resume", "auto"), ranks=3)
    try:
        code = job.wait(timeout=300)
    finally:
        job.kill()
    assert code != 0 and "resume error: the checkpoint was written by 2 rank(s)" in job.output, job.tail()
    assert "3 ranks cannot share its 2 micro-batches per step evenly: use 1 or 2 ranks" in job.output
    assert "Traceback" not in job.output
    res = run([sys.executable, "launch/train.py", *train_args(tiny_shards, out, "log.mlflow=false", "data.batch_size=2"),
               "--resume", "auto"])
    assert res.returncode == 2 and "pass data.batch_size=4" in last_line(res.stderr), res.stderr[-2000:]
    zero = tmp_path / "zero1"
    job = Job("launch/train.py", train_args(tiny_shards, zero, "log.mlflow=false", "train.zero_stage=1",
                                             "train.halt_after_steps=2"))
    try:
        assert job.wait() == 0, job.tail()
    finally:
        job.kill()
    res = run([sys.executable, "launch/train.py", *train_args(tiny_shards, zero, "log.mlflow=false", "train.zero_stage=1"),
               "--resume", "auto"])
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    line = last_line(res.stderr)
    assert line.startswith("resume error: the checkpoint was written by 2 rank(s)") and "ZeRO stage 1" in line
    assert "resume it on 2 ranks" in line
