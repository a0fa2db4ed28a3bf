"""Helpers of the fault tests: DeepSpeed launches whose output is watched live, rank processes, weights."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

from tests.mlflow_server import free_port

ROOT = Path(__file__).resolve().parents[2]
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
INJECT = "tests/faults/inject.py"


def env(**extra) -> dict[str, str]:
    base = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    base.pop("MLFLOW_TRACKING_URI", None)
    return {**base, **extra}


def train_args(shards: Path, out_dir: Path, *more: str) -> list[str]:
    """The run every training fault uses: tiny model, 2 epochs x 5 steps on 2 ranks, a checkpoint every
    2 steps and at each epoch end (steps 2, 4, 5, 6, 8, 10), deterministic so weights compare exactly."""
    return ["--config", "configs/tiny.yaml", f"data.root={shards}", f"train.out_dir={out_dir}",
            "train.max_steps=0", "train.epochs=2", "train.deterministic=true", "train.checkpoint_every_steps=2",
            "train.keep_last=10", *more]


class Job:
    """A ``deepspeed`` launch in its own session, its merged stdout/stderr collected by a thread.

    ``target`` is the launch script each rank runs (through :mod:`tests.faults.inject` when
    ``faults`` is given: a list of pause points, see that module).
    """

    def __init__(self, target: str, args: list[str], ranks: int = 2, faults: list[dict] | None = None,
                 **extra_env: str):
        cmd = [DEEPSPEED, "--num_gpus", str(ranks), f"--master_port={free_port()}", INJECT, *args]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env(CSTN_FAULT_TARGET=target, CSTN_FAULTS=json.dumps(faults or []), **extra_env),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.lines[-n:])

    def wait_for(self, pattern: str, timeout: float = 240) -> re.Match:
        """The first output line matching ``pattern`` (regex), waiting up to ``timeout`` seconds."""
        regex = re.compile(pattern)
        deadline = time.time() + timeout
        seen = 0
        while True:
            lines = self.lines[seen:]
            for line in lines:
                m = regex.search(line)
                if m:
                    return m
            seen += len(lines)
            if self.proc.poll() is not None and seen >= len(self.lines) and not self._reader.is_alive():
                raise AssertionError(f"job exited ({self.proc.returncode}) before printing {pattern!r}:\n"
                                     + self.tail())
            if time.time() > deadline:
                raise AssertionError(f"no {pattern!r} within {timeout}s:\n" + self.tail())
            time.sleep(0.05)

    def wait(self, timeout: float = 300) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"job still running after {timeout}s:\n" + self.tail()) from None
        self._reader.join(timeout=10)
        return code

    def kill_rank(self, pid: int, timeout: float) -> tuple[int, float]:
        """SIGKILL rank process ``pid``; wait up to ``timeout`` s for the whole job to end.
        Returns the job's exit code and the seconds it took to end after the kill."""
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)
        code = self.wait(timeout=timeout)
        return code, time.time() - killed_at

    def launcher(self) -> psutil.Process:
        """The ``deepspeed.launcher.launch`` process (the runner's child) that starts and watches the ranks."""
        deadline = time.time() + 60
        while time.time() < deadline:
            for child in psutil.Process(self.proc.pid).children():
                if "deepspeed.launcher.launch" in " ".join(child.cmdline()):
                    return child
            time.sleep(0.1)
        raise AssertionError("no deepspeed.launcher.launch process under the runner")

    def rank_pids(self) -> dict[int, int]:
        """``{local_rank: pid}`` of the rank processes, found as the launcher's children by their command line."""
        out = {}
        for child in self.launcher().children():
            m = re.search(r"--local_rank=(\d+)", " ".join(child.cmdline()))
            if m:
                out[int(m.group(1))] = child.pid
        return out

    def rank_exit_codes(self) -> dict[int, int]:
        """Each rank's own exit status, as the injection wrapper printed it."""
        return {int(m.group(1)): int(m.group(2))
                for m in re.finditer(r"FAULT-EXIT rank=(\d+) code=(-?\d+)", self.output)}

    def kill(self) -> None:
        """Clean-up: SIGKILL everything this job started (its own session's process group)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def latest_tag(out_dir: Path) -> str:
    return (out_dir / "checkpoints" / "latest").read_text().strip()


def final_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    tag_dir = out_dir / "checkpoints" / latest_tag(out_dir)
    return torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("go")
