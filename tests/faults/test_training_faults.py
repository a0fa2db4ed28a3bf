"""Faults injected into real 2-rank DeepSpeed training jobs (CPU, gloo) and a real ``mlflow server``.

Every interrupted job is resumed with ``--resume auto`` and must end with the weights of the
uninterrupted reference run (``conftest.reference``), equal within 1e-6.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from cstn.checkpoint import META
from tests.faults.common import ROOT, Job, env, final_weights, latest_tag, max_difference, touch, train_args

pytestmark = pytest.mark.slow

EXIT_BOUND_S = 90  # a job with a dead rank must be gone this long after the fault (the machine is shared)


def resume_and_compare(shards, out, reference, expect_from: str) -> Job:
    job = Job("launch/train.py", train_args(shards, out, "log.mlflow=false", "--resume", "auto"))
    try:
        code = job.wait()
    finally:
        job.kill()
    assert code == 0, job.tail()
    assert f"resumed from {out / 'checkpoints' / expect_from}" in job.output
    assert latest_tag(out) == "step00000010"
    worst = max_difference(final_weights(out), final_weights(reference.out_dir))
    assert worst <= 1e-6, f"the resumed run differs from the uninterrupted one by {worst}"
    return job


@pytest.mark.timeout(600)
def test_reference_run_completed(reference):
    assert reference.returncode == 0, reference.job.tail()
    assert latest_tag(reference.out_dir) == "step00000010"


@pytest.mark.timeout(700)  # includes the shared reference run
def test_tracking_server_outage(reference):
    """The server stops after step 3 and comes back after step 7: training goes on, and the run ends
    up with every metric step, the evaluation logged during the outage and its artifacts."""
    assert reference.returncode == 0, reference.job.tail()
    out = reference.job.output
    assert "mlflow: warning: cannot log to" in out  # the outage was noticed ...
    assert "done: " in out  # ... and training finished regardless
    client = MlflowClient(reference.server.uri)
    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert [step for step, _ in history] == list(range(1, 11)), history
    printed = {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"step (\d+)/10 .*? loss ([\d.]+)", out)}
    assert {step: round(value, 4) for step, value in history} == printed  # the values training printed
    assert "mlflow: tracking server back after" in out  # the queued values went out once it answered
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval/train_loop/gt_known_loc")) == [5, 10]
    assert run.info.status == "FINISHED"
    epoch1 = [f.path for f in client.list_artifacts(run.info.run_id, "eval/epoch001")]
    assert "eval/epoch001/metrics.json" in epoch1, epoch1  # uploaded while the server was down: retried


@pytest.mark.timeout(1200)  # includes the shared reference run
def test_killed_rank_then_interrupted_checkpoint_write(tiny_shards, reference, tmp_path):
    """SIGKILL of rank 1 after step 3: the job ends non-zero, promptly. The resumed job is then killed
    while writing the step-4 checkpoint (files on disk, meta.json not yet): ``latest`` stays at
    step 2, which loads; a third job finishes with the reference weights."""
    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    # -- 1. a rank dies mid-epoch ----------------------------------------------------------------
    job = Job("launch/train.py", train_args(tiny_shards, out, "log.mlflow=false"),
              faults=[{"point": "step", "step": 3, "where": "after", "ranks": [1]}])
    try:
        pid = int(job.wait_for(r"FAULT-PAUSE step3-after rank=1 pid=(\d+)").group(1))
        pids = job.rank_pids()
        assert pids[1] == pid, (pids, pid)
        code, elapsed = job.kill_rank(pids[1], timeout=EXIT_BOUND_S + 30)
    finally:
        job.kill()
    assert code != 0, job.tail()
    assert elapsed < EXIT_BOUND_S, f"the job took {elapsed:.0f}s to end after a rank died"
    assert latest_tag(out) == "step00000002"

    # -- 2. the resumed job is killed half-way through writing a checkpoint -------------------------
    job = Job("launch/train.py", train_args(tiny_shards, out, "log.mlflow=false", "--resume", "auto"),
              faults=[{"point": "meta", "tag": "step00000004"}])
    try:
        pid = int(job.wait_for(r"FAULT-PAUSE meta-step00000004 rank=0 pid=(\d+)").group(1))
        assert job.rank_pids()[0] == pid
        assert (ckpt / "step00000004" / "mp_rank_00_model_states.pt").is_file()  # DeepSpeed's part is written
        code, elapsed = job.kill_rank(pid, timeout=EXIT_BOUND_S + 30)
    finally:
        job.kill()
    assert code != 0 and elapsed < EXIT_BOUND_S, (code, elapsed)
    assert "resumed from" in job.output and "step00000002" in job.output
    assert not (ckpt / "step00000004" / META).exists()
    assert latest_tag(out) == "step00000002", "a half-written checkpoint must never become latest"

    # -- 3. resume from the last complete checkpoint: same weights as the uninterrupted run ----------
    resume_and_compare(tiny_shards, out, reference, "step00000002")


@pytest.mark.timeout(1200)  # includes the shared reference run
def test_preemption(tiny_shards, reference, tmp_path):
    """SIGTERM, twice, then a resume to the end with the reference weights.

    1. To every rank while they are in the middle of step 3 (how SLURM preempts a job step): the step
       finishes, the step-3 checkpoint is written, every rank exits 0 and so does the launcher.
    2. To the DeepSpeed launcher only, in step 6: it passes SIGTERM to rank 0, waits for it to exit,
       and only then signals rank 1, so the ranks learn of it at different times; they still stop
       after the same step and checkpoint it, and exit 0, while the launcher itself exits 1.
    """
    out = tmp_path / "run"
    gates = tmp_path / "gates"
    # -- 1. every rank signalled mid-step ---------------------------------------------------------
    job = Job("launch/train.py", train_args(tiny_shards, out, "log.mlflow=false"),
              faults=[{"point": "step", "step": 3, "where": "forward", "ranks": [0, 1], "gate": str(gates / "1")}])
    try:
        job.wait_for("FAULT-PAUSE step3-forward rank=0")
        job.wait_for("FAULT-PAUSE step3-forward rank=1")
        for pid in job.rank_pids().values():
            os.kill(pid, signal.SIGTERM)
        job.wait_for("SIGTERM received")
        touch(gates / "1")  # let the interrupted step finish
        code = job.wait()
    finally:
        job.kill()
    assert code == 0, job.tail()
    assert job.rank_exit_codes() == {0: 0, 1: 0}, job.tail()
    assert "preempted: checkpoint at step 3 written" in job.output
    assert latest_tag(out) == "step00000003" and (out / "checkpoints" / "step00000003" / META).is_file()

    # -- 2. the launcher signalled: ranks told one after the other ----------------------------------
    job = Job("launch/train.py", train_args(tiny_shards, out, "log.mlflow=false", "--resume", "auto"),
              faults=[{"point": "step", "step": 6, "where": "forward", "ranks": [0], "gate": str(gates / "2")}])
    try:
        job.wait_for("FAULT-PAUSE step6-forward rank=0")
        job.launcher().send_signal(signal.SIGTERM)
        job.wait_for(r"\[rank 0\] SIGTERM received")
        touch(gates / "2")
        code = job.wait()
    finally:
        job.kill()
    assert code == 1, job.tail()  # DeepSpeed's launcher exits 1 whenever it was signalled
    assert job.rank_exit_codes() == {0: 0, 1: 0}, job.tail()
    assert "preempted: checkpoint at step 6 written" in job.output
    assert latest_tag(out) == "step00000006"

    # -- 3. resume ---------------------------------------------------------------------------------
    resume_and_compare(tiny_shards, out, reference, "step00000006")


@pytest.mark.timeout(300)
def test_checkpoint_dir_unusable_fails_before_training(tiny_shards, tmp_path):
    """Unwritable (a regular file where a parent directory should be: fails for root too) and too
    little space (more checkpoints kept than the disk holds; the real free-space query): a one-line
    error naming the directory, exit 2, and no training step."""
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file in the way")
    unwritable = blocker / "run"
    full = tmp_path / "full"
    cases = {
        "unwritable": (unwritable, ["log.mlflow=false"], "is not writable"),
        "no space": (full, ["log.mlflow=false", "train.keep_last=1000000000"], "MiB free; checkpoints need about"),
    }
    procs = {name: subprocess.Popen([sys.executable, "launch/train.py", *train_args(tiny_shards, out_dir), *extra],
                                    cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (out_dir, extra, _) in cases.items()}
    try:
        outputs = {name: proc.communicate(timeout=240) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.kill()
    for name, proc in procs.items():
        out_dir, _, message = cases[name]
        stdout, stderr = outputs[name]
        assert proc.returncode == 2, (name, stdout[-2000:], stderr[-2000:])
        error = [line for line in stderr.splitlines() if line.startswith("checkpoint error:")]
        assert error and str(out_dir / "checkpoints") in error[0] and message in error[0], (name, stderr[-2000:])
        assert "Traceback" not in stderr and " step 1/" not in stdout
    assert not (full / "checkpoints").exists() or not any(p.name.startswith("step")
                                                          for p in (full / "checkpoints").iterdir())
