"""Every launch script answers an expected bad input (data, config, checkpoint, tracking) with one
``... error:`` line and exit 2, never a traceback."""
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mlflow_server import free_port

ROOT = Path(__file__).resolve().parents[1]
MISSING = "/nonexistent/cstn-test"
TINY = ["--config", "configs/tiny.yaml"]

CASES = {
    "train config": (["launch/train.py", *TINY, "optim.lrr=0.1"], "config error: unknown key 'optim.lrr'"),
    "train data": (["launch/train.py", *TINY, f"data.root={MISSING}", "log.mlflow=false"], "data error: split directory"),
    "train checkpoint": (["launch/train.py", *TINY, "log.mlflow=false", "--resume", MISSING], "checkpoint error:"),
    "train tracking": (["launch/train.py", *TINY, "log.tracking_uri=http://127.0.0.1:{port}"], "tracking error:"),
    "evaluate config": (["launch/evaluate.py", *TINY, "eval.topk=x", "--checkpoint", "init"], "config error: eval.topk"),
    "evaluate data": (["launch/evaluate.py", *TINY, f"data.root={MISSING}", "--checkpoint", "init"], "data error:"),
    "evaluate checkpoint": (["launch/evaluate.py", *TINY, "--checkpoint", MISSING], "checkpoint error:"),
    "evaluate tracking": (["launch/evaluate.py", *TINY, "--checkpoint", "init", "log.tracking_uri=http://127.0.0.1:{port}"],
                          "tracking error:"),
    "predict config": (["launch/predict.py", *TINY, "model.levels=[3]", "--checkpoint", MISSING, "--images", MISSING],
                       "config error: model.levels"),
    "predict checkpoint": (["launch/predict.py", *TINY, "--checkpoint", MISSING, "--images", MISSING], "checkpoint error:"),
    "make_shards data": (["launch/make_shards.py", "--dataset", "cub", "--root", MISSING, "--split", "train", "--out",
                          "{tmp}"], "make_shards.py: error:"),
    "probe_cell_maps checkpoint": (["launch/probe_cell_maps.py", *TINY, "--checkpoint", MISSING, "--heldout", MISSING,
                                    "--test", MISSING], "checkpoint error:"),
    "sync_mlflow run directory": (["launch/sync_mlflow.py", "--run-dir", MISSING], "run directory error:"),
    "compare data": (["launch/compare.py", MISSING], "data error:"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_expected_errors_are_one_line(case, tiny_shards, tmp_path):
    args, expected = CASES[case]
    args = [a.format(port=free_port(), tmp=tmp_path / "out") for a in args]
    if args[0] in ("launch/train.py", "launch/evaluate.py", "launch/predict.py") and not any(
            a.startswith("data.root=") for a in args):
        args.append(f"data.root={tiny_shards}")
    if args[0] in ("launch/train.py", "launch/evaluate.py"):
        args.append(f"train.out_dir={tmp_path / 'run'}")
    res = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.strip() and "Warning" not in line
             and "self.backbone" not in line and not line.startswith("[")]
    assert lines and lines[-1].startswith(expected), lines[-3:]
