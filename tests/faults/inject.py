"""Run a launch script with fault-injection pause points, for the fault tests (never used in production).

``deepspeed --num_gpus 2 tests/faults/inject.py --config ...`` with ``CSTN_FAULT_TARGET=launch/train.py``
runs ``launch/train.py`` unchanged in every rank, after wrapping a few functions so a rank can be
held at an exact point of the run while the test injects the fault from outside (SIGKILL, SIGTERM,
stopping the tracking server). Nothing in ``cstn/``, ``pipeline/`` or ``launch/`` knows about it.

``CSTN_FAULTS`` is a JSON list of pause points::

    {"point": "step", "step": 3, "ranks": [1], "where": "forward"}
        in training step 3 (counted from the resumed step), on the listed ranks: "forward" pauses
        inside the loss computation (the step is half done), "after" once the step is complete
        (before the trainer decides to checkpoint);
    {"point": "meta", "tag": "step00000004"}
        rank 0 of a checkpoint save, after every rank's files are on disk and before ``meta.json``
        (the moment that makes the checkpoint count) is written;
    {"point": "eval_outputs"}
        rank 0 of an evaluation, after ``predictions.csv`` is written and before the plots;
    {"point": "tracker"}
        every rank, right before the experiment tracker is created (the test can start a tracking
        server while the job spends its first seconds importing and building the engine);
    {"point": "eval_batch", "batch": 2, "ranks": [0, 1]}
        inside the evaluation loop, when the listed ranks score their batch ``batch`` (1-based): the
        readers' worker processes are running.

Each point may carry ``"gate": PATH``: the pause ends when that file exists. Without a gate the
rank waits (up to ``max_s``, default 600 s) for the test to kill it. Reaching a point prints
``FAULT-PAUSE <name> rank=<r> pid=<pid>``; the script's exit prints ``FAULT-EXIT rank=<r> code=<c>``,
so a test can read each rank's own exit status even when the launcher's differs.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time
from pathlib import Path

RANK = int(os.environ.get("RANK", "0"))


def _say(text: str) -> None:
    sys.__stdout__.write(f"[rank {RANK}] {text}\n")
    sys.__stdout__.flush()


def _pause(name: str, spec: dict) -> None:
    _say(f"FAULT-PAUSE {name} rank={RANK} pid={os.getpid()}")
    gate = spec.get("gate")
    deadline = time.time() + float(spec.get("max_s", 600))
    while time.time() < deadline:
        if gate and Path(gate).exists():
            _say(f"FAULT-RESUME {name} rank={RANK}")
            return
        time.sleep(0.05)  # short sleeps: a signal handler (SIGTERM) runs between them
    _say(f"FAULT-TIMEOUT {name} rank={RANK}")


def install(plan: list[dict]) -> None:
    import cstn.checkpoint
    import cstn.progress
    import cstn.losses
    import cstn.tracking
    import cstn.viz

    state = {"base": 0, "loss_calls": 0, "steps_done": 0, "plots": 0}

    def step_points(where: str, step: int) -> None:
        for spec in plan:
            if (spec["point"] == "step" and spec.get("where", "forward") == where and spec["step"] == step
                    and RANK in spec.get("ranks", [0])):
                _pause(f"step{step}-{where}", spec)

    original_load = cstn.checkpoint.load

    def load(*args, **kwargs):
        client_state = original_load(*args, **kwargs)
        state["base"] = int(client_state["step"])
        return client_state

    cstn.checkpoint.load = load

    original_loss = cstn.losses.compute_loss

    def compute_loss(*args, **kwargs):
        state["loss_calls"] += 1
        step_points("forward", state["base"] + state["loss_calls"])
        return original_loss(*args, **kwargs)

    cstn.losses.compute_loss = compute_loss

    original_step_done = cstn.progress.Progress.step_done

    def step_done(self, *args, **kwargs):
        original_step_done(self, *args, **kwargs)
        state["steps_done"] += 1
        step_points("after", state["base"] + state["steps_done"])

    cstn.progress.Progress.step_done = step_done

    original_write = cstn.checkpoint._atomic_write

    def atomic_write(path, text):
        path = Path(path)
        for spec in plan:
            if spec["point"] == "meta" and path.name == cstn.checkpoint.META and path.parent.name == spec["tag"]:
                _pause(f"meta-{spec['tag']}", spec)
        return original_write(path, text)

    cstn.checkpoint._atomic_write = atomic_write

    original_plot = cstn.viz.plot_area_histogram

    def plot_area_histogram(*args, **kwargs):
        state["plots"] += 1
        if state["plots"] == 1:
            for spec in plan:
                if spec["point"] == "eval_outputs":
                    _pause("eval_outputs", spec)
        return original_plot(*args, **kwargs)

    cstn.viz.plot_area_histogram = plot_area_histogram

    import cstn.evaluation

    for name in ("score_cstn", "score_cam"):
        original_score = getattr(cstn.evaluation, name)

        def score(*args, _original=original_score, **kwargs):
            state["eval_batches"] = state.get("eval_batches", 0) + 1
            for spec in plan:
                if (spec["point"] == "eval_batch" and spec.get("batch", 1) == state["eval_batches"]
                        and RANK in spec.get("ranks", [0])):
                    _pause(f"eval_batch{state['eval_batches']}", spec)
            return _original(*args, **kwargs)

        setattr(cstn.evaluation, name, score)

    original_make_tracker = cstn.tracking.make_tracker

    def make_tracker(*args, **kwargs):
        for spec in plan:
            if spec["point"] == "tracker":
                _pause("tracker", spec)
        return original_make_tracker(*args, **kwargs)

    cstn.tracking.make_tracker = make_tracker


def main() -> None:
    target = os.environ["CSTN_FAULT_TARGET"]
    install(json.loads(os.environ.get("CSTN_FAULTS", "[]")))
    sys.argv = [target, *sys.argv[1:]]
    code = 0
    try:
        runpy.run_path(target, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        raise
    except BaseException:
        code = 1
        raise
    finally:
        _say(f"FAULT-EXIT rank={RANK} code={code}")


if __name__ == "__main__":
    main()
