"""The README's first CPU run works as written on a fresh directory.

The fenced block under "A first run on CPU" is run line by line with bash, in order, in an empty
directory that sees only the project's code and configs (what a fresh clone has), with the
project's virtual environment first on PATH (``python`` and ``deepspeed`` are its own). Each line
must exit 0; the outputs a user would look for next must exist afterwards.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## A first run on CPU"


def first_run_commands(readme: str) -> list[str]:
    """The non-comment lines of the first ```bash block after :data:`HEADING`."""
    start = readme.index(HEADING)
    block = re.search(r"```bash\n(.*?)```", readme[start:], re.S)
    assert block, f"README: no bash block under {HEADING!r}"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_first_run_block_is_found():
    commands = first_run_commands((ROOT / "README.md").read_text())
    assert any("--dry-run" in c for c in commands) and any("predict.py" in c for c in commands)
    with __import__("pytest").raises(AssertionError):
        first_run_commands("## A first run on CPU\nno block here\n## next\n")


def test_readme_first_run_as_written(tmp_path):
    for name in ("cstn", "pipeline", "launch", "configs"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(ROOT))
    for command in first_run_commands((ROOT / "README.md").read_text()):
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"README command failed ({done.returncode}): {command}\n{done.stderr[-3000:]}"
    shards = json.loads((tmp_path / "data/tiny/shards/train/manifest.json").read_text())
    assert shards["total"] == 40
    assert list((tmp_path / "runs/tiny/checkpoints").iterdir()), "training wrote no checkpoint"
    lines = (tmp_path / "runs/tiny/predict/predictions.jsonl").read_text().splitlines()
    assert len(lines) == 62, f"predict: {len(lines)} predictions for the 62 images of data/tiny/raw/images"
    assert len(list((tmp_path / "runs/tiny/predict/viz").rglob("*_boxes.jpg"))) == 62, "predict --viz drew not every image"
