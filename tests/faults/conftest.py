"""The uninterrupted reference run shared by the fault tests; its tracking server goes down mid-run.

Training never depends on the tracking server, so one launch serves two purposes: its final weights
are what every interrupted-and-resumed run must reproduce, and its MLflow run is checked for the
metric steps logged while the server was down (``test_training_faults.test_tracking_server_outage``).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.faults.common import Job, touch, train_args
from tests.mlflow_server import MlflowServer


@dataclass
class Reference:
    out_dir: Path
    job: Job
    returncode: int
    server: MlflowServer
    outage_steps: tuple[int, int]  # the server was stopped after the first and back after the second


@pytest.fixture(scope="package")
def reference(tiny_shards, tmp_path_factory) -> Reference:
    root = tmp_path_factory.mktemp("reference")
    server = MlflowServer(root / "mlflow")
    out = root / "run"
    gates = root / "gates"
    stop_after, back_after = 3, 7
    # The server starts while the job imports and builds its engine; the job waits for it at the tracker.
    starting = ThreadPoolExecutor(1).submit(server.start)
    job = Job("launch/train.py", train_args(tiny_shards, out, "log.experiment=faults", "train.log_every_steps=1"),
              faults=[{"point": "tracker", "gate": str(gates / "up")},
                      {"point": "step", "step": stop_after, "where": "after", "ranks": [0], "gate": str(gates / "a")},
                      {"point": "step", "step": back_after, "where": "after", "ranks": [0], "gate": str(gates / "b")}],
              MLFLOW_TRACKING_URI=server.uri)
    try:
        starting.result(timeout=180)
        touch(gates / "up")
        job.wait_for(f"FAULT-PAUSE step{stop_after}-after rank=0")
        server.stop()
        touch(gates / "a")  # steps 3..6 and the epoch-1 evaluation are logged while the server is down
        job.wait_for(f"FAULT-PAUSE step{back_after}-after rank=0")
        job.wait_for("mlflow: warning: cannot log to", timeout=60)  # the tracker did meet the outage
        server.start()
        touch(gates / "b")
        code = job.wait(timeout=300)
    except BaseException:
        job.kill()
        server.stop()
        raise
    yield Reference(out, job, code, server, (stop_after, back_after))
    server.stop()
