"""The shortened demo (CI) against a real ``mlflow server``: the whole chain for CSTN, the authors' recipe,
CAM and two comparison methods; what MLflow shows equals results.json; datasets, models, system
metrics and source tags of every run; the sweep and the seed aggregation of ``make compare``."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.mlflow_server import MlflowServer

ROOT = Path(__file__).resolve().parents[1]
METRICS = ["top1_cls", "top1_loc", "gt_known_loc", "gt_known_top5_loc"]
TRAINED = {"cstn", "cstn_authors", "cam", "acol", "cutmix"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A real tracking server on 127.0.0.1 and the tiny demo logged into it (ACoL needs the labels inside
    the DeepSpeed engine's forward, CutMix mixes them in the loss: the two ways a method reaches past
    the plain CAM step; the others are covered in test_wsol_methods)."""
    root = tmp_path_factory.mktemp("demo")
    server = MlflowServer(root / "server").start()
    try:
        res = subprocess.run([sys.executable, "launch/demo.py", "--tiny", "--out", str(root / "out"),
                              "--methods", "acol", "cutmix", "--tracking-uri", server.uri], cwd=ROOT,
                             capture_output=True, text=True, timeout=1200)
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
        client = MlflowClient(server.uri)
        runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
        yield {"out": root / "out", "stdout": res.stdout, "server": server, "client": client,
               "runs": {r.info.run_name: r for r in runs}}
    finally:
        server.stop()


def test_tiny_demo_rows(demo):
    rows = json.loads((demo["out"] / "results.json").read_text())
    names = [r["method"] for r in rows]
    assert names[-4:] == ["CAM (threshold from held-out set)", "CAM (fixed threshold)",
                          "ACoL (threshold from held-out set)", "CutMix (threshold from held-out set)"]
    assert names[0].startswith("CSTN") and "CSTN, authors' recipe" in names
    for r in rows:
        assert set(METRICS) <= set(r), r
        for key in ("top1_cls", "top1_loc", "gt_known_loc"):
            assert 0.0 <= r[key] <= 100.0
    for r in rows:
        if "held-out" in r["method"]:
            assert 0.0 <= r["cam_threshold"] < 1.0 and 0.0 <= r["MaxBoxAccV2"] <= 100.0, r
    assert f"every run is in {demo['server'].uri}" in demo["stdout"]
    assert set(demo["runs"]) == TRAINED


def test_mlflow_shows_every_figure_of_results_json_under_its_evaluation(demo):
    """Every number of the table, read back from the tracking server under the name of the evaluation
    that produced it: nothing overwritten by another evaluation of the same run."""
    rows = json.loads((demo["out"] / "results.json").read_text())
    checked = 0
    for r in rows:
        metrics = demo["runs"][r["run"]].data.metrics
        for key in METRICS:
            if r.get(key) is None:
                continue
            name = f"eval/{r['evaluation']}/{key if key == 'top1_cls' else key + r['suffix']}"
            assert name in metrics, (r["method"], name, sorted(metrics)[:20])
            assert round(metrics[name], 2) == r[key], (r["method"], name, metrics[name], r[key])
            checked += 1
    assert checked >= 3 * len(rows)
    # the CAM row at its held-out threshold and the fixed-threshold row are two names of one run
    cam = demo["runs"]["cam"].data.metrics
    assert "eval/test_tuned/top1_loc" in cam and "eval/test_fixed/top1_loc" in cam and "eval/heldout/top1_loc" in cam


def test_runs_carry_datasets_source_system_metrics_and_their_own_artifacts(demo):
    from cstn.run_records import manifest_dataset

    data = demo["out"] / "data"
    train = manifest_dataset(data / "shards" / "train" / "manifest.json")
    test = manifest_dataset(data / "shards" / "test" / "manifest.json")
    heldout = manifest_dataset(data / "heldout_shards" / "test" / "manifest.json")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    artifact_uris = set()
    for name, run in demo["runs"].items():
        inputs = {(d.dataset.digest, d.tags[0].value) for d in run.inputs.dataset_inputs}
        assert (train.digest, "training") in inputs and (test.digest, "evaluation") in inputs, (name, inputs)
        if name in ("cam", "acol", "cutmix") or name == "cstn" and any("heldout" in k for k in run.data.metrics):
            assert (heldout.digest, "evaluation") in inputs, name
        assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), name
        tags = run.data.tags
        assert tags["mlflow.source.name"].endswith("launch/train.py") and tags["world_size"] == "2"
        assert "launch/train.py" in tags["command"]
        if commit.returncode == 0:
            assert tags["mlflow.source.git.commit"] == commit.stdout.strip()
        # CAM-family runs log only the loss terms they have
        has_theta = "train/theta" in run.data.metrics
        assert has_theta == name.startswith("cstn"), name
        assert run.info.artifact_uri not in artifact_uris
        artifact_uris.add(run.info.artifact_uri)
        assert not any(run.info.artifact_uri.startswith((demo["out"] / other).as_uri())
                       for other in demo["runs"] if other != name)
    # the predictions table names each image by its key
    import csv

    eval_dir = next(d for d in (demo["out"] / "cstn" / "eval_test", demo["out"] / "cstn" / "eval_test_tuned") if d.is_dir())
    with open(eval_dir / "predictions.csv", newline="") as f:
        keys = [row["key"] for row in csv.DictReader(f)]
    assert len(keys) == 24 and all(k.startswith("synth_") for k in keys)


def test_logged_model_predicts_the_checkpoints_boxes(demo, tmp_path):
    """The run's MLflow model loads with mlflow.pytorch and predicts what the checkpoint predicts; it also
    serves as --checkpoint (runs:/ and, registered, models:/) for evaluation and prediction."""
    import mlflow
    import mlflow.pytorch

    from cstn import checkpoint
    from cstn.config import load_config
    from cstn.models import build_model
    from cstn.predictor import BoxPredictor

    run = demo["runs"]["cstn"]
    run_dir = demo["out"] / "cstn"
    cfg = load_config(run_dir / "config.yaml", base=None)
    model = build_model(cfg)
    checkpoint.load_weights(model, cfg, run_dir / "checkpoints")
    mlflow.set_tracking_uri(demo["server"].uri)
    logged = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    images = torch.randint(0, 256, (4, 3, cfg.data.image_size, cfg.data.image_size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logged(images), BoxPredictor(model.eval(), cfg)(images))

    version = mlflow.register_model(f"runs:/{run.info.run_id}/model", "tiny-cstn").version
    common = ["--config", str(run_dir / "config.yaml"), "log.mlflow=false", f"log.tracking_uri={demo['server'].uri}",
              "data.num_workers=0"]
    for name, source in (("registered", f"models:/tiny-cstn/{version}"), ("checkpoint", str(run_dir / "checkpoints"))):
        res = subprocess.run([sys.executable, "launch/evaluate.py", *common, "--checkpoint", source,
                              "--out", str(tmp_path / name)], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ours = json.loads((tmp_path / "registered" / "metrics.json").read_text())
    theirs = json.loads((tmp_path / "checkpoint" / "metrics.json").read_text())
    assert {k: v for k, v in ours.items() if not k.startswith("eval_time")} == \
        {k: v for k, v in theirs.items() if not k.startswith("eval_time")}
    res = subprocess.run([sys.executable, "launch/predict.py", *common, "--checkpoint", f"runs:/{run.info.run_id}/model",
                          "--images", str(demo["out"] / "data" / "raw" / "images"), "--out", str(tmp_path / "pred")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert len((tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()) == 72
    res = subprocess.run([sys.executable, "launch/evaluate.py", *common, "--checkpoint", "models:/no-such-model/1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "checkpoint error: models:/no-such-model/1" in res.stderr, res.stderr[-2000:]


def test_tiny_sweep_collects_every_variant(tmp_path):
    res = subprocess.run([sys.executable, "launch/sweep.py", "--tiny", "--sweep", "head", "--seeds", "0",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["variant"] for r in rows] == ["base", "conv_head"]
    assert json.loads((tmp_path / "results_head.json").read_text()) == rows
    assert (tmp_path / "results_head.png").stat().st_size > 1000
    for r in rows:
        assert 0 <= r["gt_known_loc"] <= 100 and r["gt_known_loc_sd"] == 0.0 and r["seeds"] == [0]
        assert 0 <= r["p5_share"] <= 100  # where the MAP choice lands (the level diagnostic)
        assert 0 <= r["heldout_gt_known_loc"] <= 100  # what variants are chosen by
    # the plain conv head learns no transform: its boxes are the reference boxes
    assert rows[1]["gt_known_loc"] == rows[1]["gt_known_loc_ref"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    assert {r.info.run_name for r in runs} == {"base_seed0", "conv_head_seed0"}
    assert {r.data.params["model.head"] for r in runs} == {"cstn", "conv"}
    assert all("eval/heldout/gt_known_loc" in r.data.metrics and "eval/test/gt_known_loc" in r.data.metrics
               for r in runs)
    # one shared SQLite store: every run's artifacts in a folder of its own beside the database, none
    # inside another run's directory
    uris = [r.info.artifact_uri for r in runs]
    assert len(set(uris)) == 2 and all(u.startswith((tmp_path / "mlartifacts").as_uri()) and r.info.run_id in u
                                       for u, r in zip(uris, runs))


def test_compare_averages_each_method_over_runs(tmp_path):
    sys.path.insert(0, str(ROOT / "launch"))
    import compare

    runs = []
    for i, (loc, box) in enumerate([(50.0, 60.0), (54.0, 64.0)]):
        run = tmp_path / f"seed{i}"
        run.mkdir()
        rows = [{"method": "CAM", "top1_cls": 90.0, "top1_loc": loc, "gt_known_loc": loc + 1, "MaxBoxAccV2": box},
                {"method": "CSTN", "top1_cls": 91.0, "top1_loc": 10.0 + i, "gt_known_loc": 11.0, "MaxBoxAccV2": None}]
        if i == 0:
            rows.append({"method": "ADL", "top1_cls": 80.0, "top1_loc": 40.0, "gt_known_loc": 41.0, "MaxBoxAccV2": 45.0})
        (run / "results.json").write_text(json.dumps(rows))
        runs.append(str(run))
    out = tmp_path / "agg.json"
    assert compare.main([*runs, "--out", str(out)]) == 0
    assert out.with_suffix(".png").stat().st_size > 1000  # the bar chart
    agg = {r["method"]: r for r in json.loads(out.read_text())}
    assert agg["CAM"]["top1_loc"] == 52.0 and agg["CAM"]["top1_loc_sd"] == 2.83 and agg["CAM"]["runs"] == 2
    assert agg["CAM"]["MaxBoxAccV2"] == 62.0
    assert agg["CSTN"]["top1_loc"] == 10.5 and "MaxBoxAccV2" not in agg["CSTN"]
    assert agg["ADL"]["runs"] == 1 and agg["ADL"]["top1_loc_sd"] == 0.0
    assert compare.main([str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert not np.isnan(agg["CAM"]["gt_known_loc"])
