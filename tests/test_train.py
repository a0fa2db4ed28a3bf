"""`launch/train.py` under real DeepSpeed launches (CPU, gloo): dry run, exact resume, multi-node, MLflow."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from tests.mlflow_server import MlflowServer, free_port

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))


def env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", **extra}


def run(cmd, timeout=300, **extra):
    res = subprocess.run(cmd, cwd=ROOT, env=env(**extra), capture_output=True, text=True, timeout=timeout)
    return res


def common(shards, out_dir, *more):
    return ["--config", "configs/tiny.yaml", f"data.root={shards}", f"train.out_dir={out_dir}",
            "train.max_steps=0", "train.epochs=2", "train.deterministic=true", *more]


def final_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = out_dir / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    return torch.load(ckpt / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def test_dry_run_and_config_errors(tiny_shards, tmp_path):
    out = tmp_path / "dry"
    res = run([sys.executable, "launch/train.py", "--config", "configs/tiny.yaml", "--dry-run",
               f"data.root={tiny_shards}", f"train.out_dir={out}"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "step 2/2" in res.stdout and "eval top1_cls" in res.stdout
    assert "model:" in res.stdout  # the resolved config is printed
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    res = run([sys.executable, "launch/train.py", "--config", "configs/tiny.yaml", "optim.lrr=0.1"])
    assert res.returncode == 2 and "optim.lrr" in res.stderr and "optim.lr" in res.stderr


def test_resume_is_exact_multinode_and_tracked(tiny_shards, tmp_path):
    """One run as a 2-node job (two launches, one rank each); the same run on one node with 2 ranks,
    halted after step 3 and resumed; both end with the same weights; MLflow holds one run for the
    resumed job with every step."""
    server = MlflowServer(tmp_path / "mlflow").start()
    try:
        uri = {"MLFLOW_TRACKING_URI": server.uri}
        # -- A: two launches on this machine form one 2-node job -------------------------------
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("nodeA slots=1\nnodeB slots=1\n")
        port = str(free_port())
        args_a = common(tiny_shards, tmp_path / "A", "log.experiment=A")
        launches = [subprocess.Popen([DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", f"--node_rank={n}",
                                      "--master_addr=127.0.0.1", f"--master_port={port}", "launch/train.py",
                                      *args_a], cwd=ROOT, env=env(**uri), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True) for n in (0, 1)]
        outs = [p.communicate(timeout=400)[0] for p in launches]
        assert all(p.returncode == 0 for p in launches), outs[0][-3000:] + outs[1][-3000:]
        assert "world size 2" in outs[0]
        # -- B: one node, 2 ranks, halted after step 3, then resumed -----------------------------
        port_b = str(free_port())
        args_b = common(tiny_shards, tmp_path / "B", "log.experiment=B", "train.log_every_steps=1")
        res = run([DEEPSPEED, "--num_gpus", "2", f"--master_port={port_b}", "launch/train.py", *args_b,
                   "train.halt_after_steps=3"], **uri)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert (tmp_path / "B" / "checkpoints" / "latest").read_text().strip() == "step00000003"
        res = run([DEEPSPEED, "--num_gpus", "2", f"--master_port={port_b}", "launch/train.py", *args_b,
                   "--resume", "auto"], **uri)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "resumed from" in res.stdout and "step00000003" in res.stdout

        a, b = final_weights(tmp_path / "A"), final_weights(tmp_path / "B")
        assert a.keys() == b.keys()
        worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
        assert worst <= 1e-6, f"resumed run differs from the uninterrupted one by {worst}"
        assert (tmp_path / "B" / "config.yaml").is_file()

        # The evaluation at the end of training (2 ranks, each its own shards) equals a later
        # single-process evaluation of the saved checkpoint: ranks share one model, BatchNorm included.
        res = run([sys.executable, "launch/evaluate.py", "--config", "configs/tiny.yaml", f"data.root={tiny_shards}",
                   "--checkpoint", str(tmp_path / "B" / "checkpoints"), "--out", str(tmp_path / "B_eval"),
                   "log.mlflow=false"])
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        timing = ("eval_time", "eval_images_read")
        strip = lambda m: {k: v for k, v in m.items() if not k.startswith(timing)}
        in_training = json.loads((tmp_path / "B" / "eval" / "epoch002" / "metrics.json").read_text())
        afterwards = json.loads((tmp_path / "B_eval" / "metrics.json").read_text())
        assert strip(in_training) == strip(afterwards)

        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name("B")
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == 1, "a resumed job must continue its MLflow run"
        steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss"))
        assert steps == list(range(1, 11))
        assert runs[0].data.params["model.backbone"] == "resnet10"
        assert "eval/train_loop/gt_known_loc" in runs[0].data.metrics
        artifacts = [f.path for f in client.list_artifacts(runs[0].info.run_id)]
        assert "config.yaml" in artifacts and "eval" in artifacts
        run_a = client.search_runs([client.get_experiment_by_name("A").experiment_id])[0]
        assert run_a.data.tags["world_size"] == "2"
    finally:
        server.stop()
