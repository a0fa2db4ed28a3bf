"""The shortened demo (CI): the whole chain for CSTN and CAM through MLflow, and results.json complete."""
import json
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
ROWS = ["CSTN", "CSTN without transform", "CAM (threshold from held-out set)", "CAM (fixed threshold)"]
METRICS = ["top1_cls", "top1_loc", "gt_known_loc", "gt_known_top5_loc"]


def test_tiny_demo_end_to_end(tmp_path):
    res = subprocess.run([sys.executable, "launch/demo.py", "--tiny", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in rows] == ROWS
    for r in rows:
        assert set(METRICS) <= set(r), r
        for key in ("top1_cls", "top1_loc", "gt_known_loc"):
            assert 0.0 <= r[key] <= 100.0
    assert rows[0]["gt_known_top5_loc"] >= rows[0]["gt_known_loc"]  # top-5 boxes include the top-1 box
    assert 0.0 <= rows[2]["cam_threshold"] < 1.0 and "MaxBoxAccV2" in rows[2]
    assert "mlflow ui --backend-store-uri" in res.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"cstn", "cam"}
    assert "eval_test/gt_known_loc" in by_name["cstn"].data.metrics
    assert "eval_test/cam_MaxBoxAccV2" in by_name["cam"].data.metrics
    assert "train/loss" in by_name["cam"].data.metrics


def test_tiny_sweep_collects_every_variant(tmp_path):
    res = subprocess.run([sys.executable, "launch/sweep.py", "--tiny", "--sweep", "head", "--seeds", "0",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["variant"] for r in rows] == ["base", "conv_head"]
    for r in rows:
        assert 0 <= r["gt_known_loc"] <= 100 and r["gt_known_loc_sd"] == 0.0 and r["seeds"] == [0]
    # the plain conv head learns no transform: its boxes are the reference boxes
    assert rows[1]["gt_known_loc"] == rows[1]["gt_known_loc_ref"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    assert {r.info.run_name for r in runs} == {"base_seed0", "conv_head_seed0"}
    assert {r.data.params["model.head"] for r in runs} == {"cstn", "conv"}
