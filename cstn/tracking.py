"""Experiment tracking: a no-op tracker for ranks > 0 and an MLflow tracker for rank 0.

Only ``launch/`` scripts create a tracker (``make_tracker``); the model and input
pipeline never see it. MLflow is imported lazily, inside this module's functions.

Where the run goes: ``log.tracking_uri`` when set, else ``MLFLOW_TRACKING_URI``,
else a SQLite store inside the run directory (``<out_dir>/mlflow.db``), so nothing
lands in the working directory. A SQLite store keeps its artifacts beside the database
(``<dir of mlflow.db>/mlartifacts/<experiment id>/<run id>/``): every run has its own
folder, whichever run created the experiment (one shared store for several runs, as the
demo's, no longer puts one run's artifacts inside another run's directory).

What a run carries besides metrics and parameters:

- evaluations under their own names (``eval/<name>/<metric>``; see ``launch/evaluate.py``);
- its data as MLflow dataset inputs (:func:`cstn.run_records.manifest_dataset`: name, a
  digest of the shards' sha256, the source root, counts and classes), with context
  ``training`` or ``evaluation``;
- where it came from: MLflow's ``mlflow.source.*`` tags (script, git commit), the command
  line and the world size (:func:`cstn.run_records.source_tags`);
- system metrics (CPU, memory, disk, network; GPU utilisation and memory when NVML is
  there) from MLflow's own monitor (``log.system_metrics``);
- the trained model (:meth:`MlflowTracker.log_model`): an ``mlflow.pytorch`` model with an
  input example, plus the plain weights and the resolved config as extra files, which is
  all :func:`cstn.run_records.download_model` and the launch scripts read back (weights only: nothing
  pickled is ever loaded from the store).

Failure behaviour, chosen for long runs:

- unreachable tracking server at start: :class:`TrackingUnavailable`, naming the URI
  (the caller exits with a clear message; ``log.mlflow=false`` runs without tracking);
- failure mid-run: metrics stay queued in memory and a background thread retries
  (a warning is printed once per outage and once on recovery); training never waits
  on the server; artifacts that failed to upload are retried the same way (they stay
  files in the run directory when the server is still down at the end);
- still unsent at the end (server down when the job finishes): the queue is written to
  ``<out_dir>/mlflow_pending.jsonl``; ``python launch/sync_mlflow.py --run-dir DIR``
  (or the next resume of the run) sends it.
"""

from __future__ import annotations

import json
import os
import queue
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cstn.run_records import resolve_tracking_uri

PENDING_FILE = "mlflow_pending.jsonl"
_PARAM_LIMIT = 6000  # MLflow's maximum parameter value length
_BATCH = 900  # metrics per log_batch call (MLflow accepts 1,000)


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached when the run starts."""


class Tracker:
    """The interface; this base class does nothing (ranks > 0, ``log.mlflow=false``)."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_dataset(self, manifest_path: str | Path, context: str, source: str | None = None) -> None:
        pass

    def start_system_metrics(self, interval_s: float = 10.0) -> None:
        pass

    def log_model(self, module, cfg, weights: dict, name: str = "model", register_as: str = "") -> str | None:
        return None

    def flush(self, timeout_s: float = 30.0) -> bool:
        return True

    def close(self, status: str = "FINISHED") -> None:
        pass


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Raise :class:`TrackingUnavailable` when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            if resp.status != 200:
                raise TrackingUnavailable(f"MLflow tracking server {uri} answered {resp.status} on /health")
    except (urllib.error.URLError, OSError) as exc:
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} is unreachable ({exc}); start it, point MLFLOW_TRACKING_URI "
            f"elsewhere, or run with log.mlflow=false") from None


class MlflowTracker(Tracker):
    """Rank 0's tracker. Metrics are queued and sent in batches by a background thread.

    Args:
        tracking_uri: resolved URI (see :func:`cstn.run_records.resolve_tracking_uri`).
        experiment: experiment name (created when missing).
        run_name: name of a new run.
        out_dir: the run directory (artifact root of a local store, pending spool).
        run_id: continue this run (resume) instead of creating one.
        flush_interval_s: how often the thread sends queued metrics.
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, out_dir: str | Path,
                 run_id: str | None = None, flush_interval_s: float = 2.0):
        # Fail fast on a dead server instead of MLflow's default minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        check_reachable(tracking_uri)
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        self.out_dir = Path(out_dir)
        self._client = MlflowClient(tracking_uri)
        try:
            exp = self._client.get_experiment_by_name(experiment)
            if exp is None:
                artifact_location = None
                if tracking_uri.startswith("sqlite:"):  # beside the database: every run gets its own folder
                    store = Path(tracking_uri[len("sqlite:///"):]).parent
                    artifact_location = (store / "mlartifacts").resolve().as_uri()
                exp_id = self._client.create_experiment(experiment, artifact_location=artifact_location)
            else:
                exp_id = exp.experiment_id
            if run_id:
                self._client.get_run(run_id)  # raises when the run is not in this store
                self._client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
            else:
                self.run_id = self._client.create_run(exp_id, run_name=run_name or None).info.run_id
        except Exception as exc:  # any store error at start is fatal and named
            raise TrackingUnavailable(f"MLflow store {tracking_uri}: {type(exc).__name__}: {exc}") from None

        self._queue: "queue.Queue[tuple[str, float, int, int]]" = queue.Queue()
        self._pending: list[tuple[str, float, int, int]] = []
        self._pending_artifacts: list[tuple[str, str | None]] = []  # (local path, artifact_path) to retry
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._stop = threading.Event()
        self._interval = flush_interval_s
        self._load_spool()
        self._thread = threading.Thread(target=self._run, name="mlflow-flush", daemon=True)
        self._thread.start()

    # -- public API --------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_PARAM_LIMIT]) for k, v in params.items()]
        existing = self._client.get_run(self.run_id).data.params
        items = [p for p in items if p.key not in existing]  # resume: params are immutable
        for i in range(0, len(items), 100):
            self._call(lambda chunk=items[i:i + 100]: self._client.log_batch(self.run_id, params=chunk))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            self._queue.put((key, float(value), now, int(step)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload now; on failure the upload is queued and retried with the metrics."""
        if not self._call(lambda: self._client.log_artifact(self.run_id, str(path), artifact_path)):
            with self._lock:
                self._pending_artifacts.append((str(path), artifact_path))

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self._call(lambda k=k, v=v: self._client.set_tag(self.run_id, k, str(v)))

    def log_dataset(self, manifest_path: str | Path, context: str, source: str | None = None) -> None:
        """Log a split (its ``manifest.json``) as a dataset input of the run (``context``: ``training``
        or ``evaluation``; ``source``: where the split lives, default the manifest's folder). Logging the
        same dataset twice (a resume) is harmless."""
        from mlflow.entities import DatasetInput, InputTag

        from cstn.run_records import manifest_dataset

        dataset = manifest_dataset(manifest_path, source)
        self._call(lambda: self._client.log_inputs(
            self.run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])]))

    def start_system_metrics(self, interval_s: float = 10.0) -> None:
        """MLflow's own system-metrics monitor on this run (``system/...`` metrics) until :meth:`close`."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s,
                                                 samples_before_logging=1, tracking_uri=self.uri)
            self._monitor.start()
        except Exception as exc:  # never stop training for it
            print(f"mlflow: warning: no system metrics ({type(exc).__name__}: {str(exc)[:200]})", flush=True)

    def log_model(self, module, cfg, weights: dict, name: str = "model", register_as: str = "") -> str | None:
        """Log ``module`` (e.g. a :class:`cstn.predictor.BoxPredictor`; copied to the CPU) as an
        ``mlflow.pytorch`` model ``name`` of this run, with a uint8 input example at the config's input
        size and, as extra files, ``weights`` (``weights.pt``, the model's plain state dict) and the
        resolved config (``config.yaml``). Registered as ``register_as`` when given. Returns the model
        URI (``runs:/<run id>/<name>``), or None (with a warning) when it could not be logged."""
        import copy

        import numpy as np
        import torch

        from cstn.config import dump_yaml

        try:
            import mlflow
            import mlflow.pytorch
            from mlflow.models import infer_signature

            cpu = copy.deepcopy(module).cpu().float().eval()
            size = int(cfg.data.image_size)
            example = np.random.default_rng(0).integers(0, 256, (2, 3, size, size), dtype=np.uint8)
            with torch.no_grad():
                prediction = cpu(torch.from_numpy(example)).numpy()
            with tempfile.TemporaryDirectory() as tmp:
                weights_file, config = Path(tmp) / "weights.pt", Path(tmp) / "config.yaml"
                torch.save({k: v.detach().cpu() for k, v in weights.items()}, weights_file)
                config.write_text(dump_yaml(cfg))
                mlflow.set_tracking_uri(self.uri)
                with mlflow.start_run(run_id=self.run_id):
                    mlflow.pytorch.log_model(cpu, name=name, input_example=example,
                                             signature=infer_signature(example, prediction),
                                             extra_files=[str(weights_file), str(config)],
                                             registered_model_name=register_as or None, export_model=False,
                                             serialization_format="pickle",
                                             pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
                self._client.update_run(self.run_id, status="RUNNING")  # start_run's exit ended it
            return f"runs:/{self.run_id}/{name}"
        except Exception as exc:
            print(f"mlflow: warning: model {name!r} not logged ({type(exc).__name__}: {str(exc)[:300]})", flush=True)
            return None

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Send everything queued; True when nothing is left pending."""
        deadline = time.time() + timeout_s
        while True:
            if self._send_pending():
                return True
            if time.time() >= deadline:
                return False
            time.sleep(min(1.0, max(0.0, deadline - time.time())))

    def close(self, status: str = "FINISHED") -> None:
        monitor = getattr(self, "_monitor", None)
        if monitor is not None:
            self._call(monitor.finish)
        self._stop.set()
        self._thread.join(timeout=5)
        if not self.flush(timeout_s=20):
            if self._pending_artifacts:
                print(f"mlflow: {len(self._pending_artifacts)} artifact(s) could not be uploaded to {self.uri}; "
                      f"they stay in the run directory: " + ", ".join(p for p, _ in self._pending_artifacts),
                      flush=True)
            self._write_spool()
            print(f"mlflow: {len(self._pending)} metric values could not be sent to {self.uri}; kept in "
                  f"{self.out_dir / PENDING_FILE} (send with: python launch/sync_mlflow.py --run-dir "
                  f"{self.out_dir})", flush=True)
            return
        self._call(lambda: self._client.set_terminated(self.run_id, status=status))

    # -- internals ---------------------------------------------------------
    def _call(self, fn) -> bool:
        try:
            fn()
            return True
        except Exception as exc:  # the tracker must never stop training
            print(f"mlflow: warning: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            return False

    def _drain(self) -> None:
        while True:
            try:
                self._pending.append(self._queue.get_nowait())
            except queue.Empty:
                return

    def _send_pending(self) -> bool:
        from mlflow.entities import Metric

        with self._lock:
            self._drain()
            while self._pending:
                chunk = self._pending[:_BATCH]
                try:
                    self._client.log_batch(self.run_id, metrics=[Metric(k, v, ts, st) for k, v, ts, st in chunk])
                except Exception as exc:
                    if self._down_since is None:
                        self._down_since = time.time()
                        print(f"mlflow: warning: cannot log to {self.uri} ({type(exc).__name__}); "
                              f"training goes on, {len(self._pending)} values queued for retry", flush=True)
                    return False
                del self._pending[:len(chunk)]
            while self._pending_artifacts:
                path, artifact_path = self._pending_artifacts[0]
                try:
                    self._client.log_artifact(self.run_id, path, artifact_path)
                except Exception:
                    self._down_since = self._down_since or time.time()
                    return False
                del self._pending_artifacts[0]
            if self._down_since is not None:
                print(f"mlflow: tracking server back after {time.time() - self._down_since:.0f}s; "
                      f"queued values sent", flush=True)
                self._down_since = None
            return True

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._send_pending()

    def _write_spool(self) -> None:
        path = self.out_dir / PENDING_FILE
        with open(path, "a") as f:
            for key, value, ts, step in self._pending:
                f.write(json.dumps({"run_id": self.run_id, "key": key, "value": value, "timestamp": ts,
                                    "step": step}) + "\n")
        self._pending.clear()

    def _load_spool(self) -> None:
        """Values a previous process could not send (same run) go out first."""
        path = self.out_dir / PENDING_FILE
        if not path.is_file():
            return
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        mine = [r for r in rows if r["run_id"] == self.run_id]
        self._pending.extend((r["key"], r["value"], r["timestamp"], r["step"]) for r in mine)
        others = [r for r in rows if r["run_id"] != self.run_id]
        if others:
            path.write_text("".join(json.dumps(r) + "\n" for r in others))
        else:
            path.unlink()


def make_tracker(cfg, out_dir: str | Path, is_main: bool, run_id: str | None = None) -> Tracker:
    """The tracker for this rank: MLflow on rank 0 when ``cfg.log.mlflow``, else a no-op."""
    if not is_main or not cfg.log.mlflow:
        return Tracker()
    uri = resolve_tracking_uri(cfg.log.tracking_uri, out_dir)
    return MlflowTracker(uri, cfg.log.experiment, cfg.log.run_name or Path(out_dir).name, out_dir, run_id=run_id)
