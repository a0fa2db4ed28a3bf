"""The MLflow tracker against a real `mlflow server` on 127.0.0.1: batching, outage, spool, resume."""
import json

import pytest
from mlflow.tracking import MlflowClient

from cstn.run_records import resolve_tracking_uri
from cstn.tracking import PENDING_FILE, MlflowTracker, Tracker, TrackingUnavailable
from tests.mlflow_server import MlflowServer, free_port


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield srv
    srv.stop()


def history(uri, run_id, key):
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_default_store_is_inside_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri("", tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri("", tmp_path) == "http://127.0.0.1:1"
    assert resolve_tracking_uri("http://h:2", tmp_path) == "http://h:2"  # config wins


def test_noop_tracker_does_nothing(tmp_path):
    t = Tracker()
    t.log_metrics({"a": 1.0}, 0)
    assert t.flush() and t.run_id is None


def test_unreachable_server_is_a_clear_error(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingUnavailable, match=f"{uri} is unreachable.*log.mlflow=false"):
        MlflowTracker(uri, "exp", "r", tmp_path)


def test_metrics_survive_an_outage_and_resume_continues_the_run(server, tmp_path):
    t = MlflowTracker(server.uri, "outage", "r1", tmp_path, flush_interval_s=0.2)
    t.log_params({"model.levels": [4, 5], "optim.lr": 0.1})
    for step in range(5):
        t.log_metrics({"loss": float(step)}, step)
    assert t.flush(timeout_s=30)
    server.stop()
    for step in range(5, 10):  # logged while the server is down: queued, training not blocked
        t.log_metrics({"loss": float(step)}, step)
    assert not t.flush(timeout_s=1)
    server.start()
    assert t.flush(timeout_s=60)
    assert history(server.uri, t.run_id, "loss") == [(s, float(s)) for s in range(10)]
    # end of job while the server is down: the values are spooled, then a resumed tracker sends them
    server.stop()
    t.log_metrics({"loss": 10.0}, 10)
    t.close()
    spool = tmp_path / PENDING_FILE
    assert [json.loads(l)["step"] for l in spool.read_text().splitlines()] == [10]
    server.start()
    t2 = MlflowTracker(server.uri, "outage", "ignored", tmp_path, run_id=t.run_id, flush_interval_s=0.2)
    t2.log_params({"optim.lr": 0.1})  # already there: skipped, not an error
    t2.log_metrics({"loss": 11.0}, 11)
    t2.close()
    assert not spool.exists()
    assert history(server.uri, t.run_id, "loss") == [(s, float(s)) for s in range(12)]
    run = MlflowClient(server.uri).get_run(t.run_id)
    assert run.data.params["optim.lr"] == "0.1" and run.info.status == "FINISHED"


def test_a_split_is_a_dataset_whose_digest_follows_its_shards(tmp_path):
    """Same shards, other folder: same digest (the source differs); one shard changed: another digest."""
    import shutil

    from cstn.run_records import manifest_dataset

    manifest = {"dataset": "cub", "split": "test", "total": 3, "num_shards": 2,
                "shards": [{"name": "test-000000.tar", "sha256": "a" * 64}, {"name": "test-000001.tar", "sha256": "b" * 64}],
                "classes": [{"index": 0, "id": "001.x"}, {"index": 1, "id": "002.y"}],
                "counts": {"boxes": 4, "skipped": 1}}
    first = tmp_path / "one" / "test"
    first.mkdir(parents=True)
    (first / "manifest.json").write_text(json.dumps(manifest))
    second = tmp_path / "two" / "test"
    shutil.copytree(first, second)
    a, b = manifest_dataset(first / "manifest.json"), manifest_dataset(second / "manifest.json")
    assert a.name == "cub/test" and a.digest == b.digest and len(a.digest) == 16 and a.source != b.source
    assert json.loads(a.source)["uri"] == str(first.resolve())
    profile = json.loads(a.profile)
    assert (profile["samples"], profile["shards"], profile["boxes"], profile["skipped_inputs"]) == (3, 2, 4, 1)
    assert profile["classes"] == ["0:001.x", "1:002.y"]
    manifest["shards"][1]["sha256"] = "c" * 64
    (second / "manifest.json").write_text(json.dumps(manifest))
    assert manifest_dataset(second / "manifest.json").digest != a.digest


def test_source_tags_name_the_script_commit_and_command(tmp_path):
    import subprocess
    from pathlib import Path

    from cstn.run_records import source_tags

    script = Path(__file__).resolve().parents[1] / "launch" / "train.py"
    tags = source_tags(script, 4)
    assert tags["mlflow.source.name"] == str(script) and tags["world_size"] == "4" and tags["mlflow.source.type"] == "LOCAL"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=script.parent, capture_output=True, text=True)
    if head.returncode == 0:
        assert tags["mlflow.source.git.commit"] == head.stdout.strip()
    outside = tmp_path / "x.py"
    outside.write_text("")
    assert "mlflow.source.git.commit" not in source_tags(outside, 1)
