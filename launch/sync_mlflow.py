"""Send metric values a run could not deliver (tracking server down at its end) to MLflow.

``python launch/sync_mlflow.py --run-dir runs/X [--tracking-uri URI]`` reads
``runs/X/mlflow_pending.jsonl`` (written by the trainer or evaluator when the server was
unreachable as they finished), logs every value to its run, and removes the file once
all are sent. Running it twice is harmless: the file is gone after success.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cstn.config import load_config
from cstn.run_records import resolve_tracking_uri
from cstn.tracking import PENDING_FILE, TrackingUnavailable, check_reachable


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True, help="the run directory (train.out_dir)")
    p.add_argument("--tracking-uri", default="", help="default: the run's config, MLFLOW_TRACKING_URI, local store")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        print(f"run directory error: {run_dir} does not exist", file=sys.stderr)
        return 2
    spool = run_dir / PENDING_FILE
    if not spool.is_file():
        print(f"nothing to send: {spool} does not exist")
        return 0
    configured = args.tracking_uri
    if not configured and (run_dir / "config.yaml").is_file():
        configured = load_config(run_dir / "config.yaml", base=None).log.tracking_uri
    uri = resolve_tracking_uri(configured, run_dir)
    try:
        check_reachable(uri)
    except TrackingUnavailable as exc:
        print(f"tracking error: {exc}", file=sys.stderr)
        return 2
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    rows = [json.loads(line) for line in spool.read_text().splitlines() if line.strip()]
    by_run: dict[str, list] = {}
    for r in rows:
        by_run.setdefault(r["run_id"], []).append(Metric(r["key"], r["value"], r["timestamp"], r["step"]))
    for run_id, metrics in by_run.items():
        for i in range(0, len(metrics), 900):
            client.log_batch(run_id, metrics=metrics[i:i + 900])
        print(f"sent {len(metrics)} values to run {run_id} at {uri}")
    spool.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
