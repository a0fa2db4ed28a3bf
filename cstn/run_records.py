"""What an MLflow run records besides metrics: its datasets, its source, its model (read back).

Kept apart from :mod:`cstn.tracking` (the tracker and its transport: queues, retries, spool):
these helpers build MLflow entities from this project's files and read a logged model back,
and hold no state. MLflow is imported inside each function; only ``launch/`` scripts and
:mod:`cstn.tracking` call them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["manifest_dataset", "source_tags", "is_model_uri", "download_model", "load_logged_model", "MODEL_SCHEMES"]


def manifest_dataset(manifest_path: str | Path, source: str | None = None):
    """The split described by ``manifest_path`` as an MLflow dataset entity.

    name ``<dataset>/<split>``; digest: the first 16 hex digits of the sha256 of the shards'
    ``name:sha256`` lines (the same shards give the same digest wherever they live); source: the
    split's directory (``local``) or URL; profile: samples, shards, boxes, skipped inputs and the
    class list (``index:id``).
    """
    from mlflow.entities import Dataset

    manifest_path = Path(manifest_path)
    manifest = json.loads(manifest_path.read_text())
    lines = "".join(f"{s['name']}:{s['sha256']}\n" for s in manifest["shards"])
    digest = hashlib.sha256(lines.encode()).hexdigest()[:16]
    remote = source is not None and "://" in source
    uri = source if remote else str(manifest_path.parent.resolve())
    counts = manifest.get("counts", {})
    profile = {"samples": manifest["total"], "shards": manifest["num_shards"], "boxes": counts.get("boxes"),
               "skipped_inputs": counts.get("skipped"), "num_classes": len(manifest.get("classes", [])),
               "classes": [f"{c['index']}:{c.get('id', '')}" for c in manifest.get("classes", [])]}
    return Dataset(name=f"{manifest.get('dataset', 'data')}/{manifest.get('split', manifest_path.parent.name)}",
                   digest=digest, source_type=source.split("://")[0] if remote else "local",
                   source=json.dumps({"uri": uri}),
                   profile=json.dumps(profile))


def source_tags(script: str | Path, world_size: int) -> dict[str, str]:
    """MLflow's standard source tags (script, git commit when the code is a git checkout), the
    command line and the world size."""
    script = Path(script).resolve()
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": str(script),
            "command": " ".join([Path(sys.executable).name, *sys.argv])[:5000], "world_size": str(world_size)}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=script.parent, capture_output=True, text=True,
                                timeout=10)
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=script.parent,
                                   capture_output=True, text=True, timeout=10)
            tags["git_dirty"] = str(bool(dirty.stdout.strip())).lower()
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


MODEL_SCHEMES = ("models:/", "runs:/")


def is_model_uri(text: str) -> bool:
    """Whether ``--checkpoint`` names an MLflow model (``models:/NAME/VERSION``, ``runs:/ID/model``)."""
    return str(text).startswith(MODEL_SCHEMES)


def resolve_tracking_uri(configured: str, out_dir: str | Path) -> str:
    """Where a run's records live: ``log.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else the SQLite
    store ``<out_dir>/mlflow.db``."""
    if configured:
        return configured
    env = os.environ.get("MLFLOW_TRACKING_URI", "")
    if env:
        return env
    return f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"


def download_model(uri: str, tracking_uri: str) -> Path:
    """Download a model logged by :meth:`MlflowTracker.log_model` and return the directory holding
    its ``weights.pt`` and ``config.yaml`` (nothing is unpickled here). Raises FileNotFoundError naming
    the URI when it does not resolve or lacks those files."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tempfile.mkdtemp(prefix="cstn-model-")))
    except Exception as exc:
        raise FileNotFoundError(f"{uri}: cannot download from {tracking_uri} ({type(exc).__name__}: {str(exc)[:300]})") from None
    for folder in (local / "extra_files", local):
        if (folder / "weights.pt").is_file() and (folder / "config.yaml").is_file():
            return folder
    raise FileNotFoundError(f"{uri} holds no extra_files/weights.pt and config.yaml (not logged by launch/train.py)")


def load_logged_model(model, cfg, uri: str) -> dict:
    """Weights of a logged MLflow model (``models:/...`` or ``runs:/...``) into ``model``; the returned
    meta carries the run that logged it (results are logged there) and that run's last step."""
    from mlflow.tracking import MlflowClient

    from cstn import checkpoint

    tracking_uri = resolve_tracking_uri(cfg.log.tracking_uri, cfg.train.out_dir)
    meta = checkpoint.load_exported(model, cfg, download_model(uri, tracking_uri), uri)
    client = MlflowClient(tracking_uri)
    if uri.startswith("runs:/"):
        run_id = uri[len("runs:/"):].split("/")[0]
    else:
        name, version = uri[len("models:/"):].split("/")[:2]
        run_id = client.get_model_version(name, version).run_id
    steps = client.get_run(run_id).data.metrics
    meta["mlflow_run_id"] = run_id
    meta["step"] = int(max((m.step for m in client.get_metric_history(run_id, "train/lr")), default=0)) \
        if "train/lr" in steps else 0
    return meta
