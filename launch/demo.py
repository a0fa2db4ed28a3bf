"""The main job end to end on the synthetic set (``make demo``): data -> shards -> train -> evaluate, CSTN and CAM.

Steps (each skipped when its output is already complete, so a rerun resumes):

1. generate the synthetic set (CUB layout) and a held-out set from the training distribution
   (another seed) used only to choose thresholds;
2. shard them with ``launch/make_shards.py``;
3. ``deepspeed --num_gpus 2 launch/train.py --config configs/synthetic_cstn.yaml`` (the recommended
   CSTN) then ``launch/evaluate.py`` on the test split (2 ranks). When its boxes come from a
   thresholded map (``eval.box_decoding`` ``scoremap`` or ``logitmap``) the threshold is the one
   best on the held-out set, and the same checkpoint is also scored with the paper's MAP box,
   with and without the transform (Table I);
4. the authors' recipe at this scale (``configs/synthetic_cstn_authors.yaml``, MAP boxes);
5. ``configs/synthetic_cam.yaml``; CAM is evaluated at the fixed threshold of the classic protocol
   and at the threshold chosen on the held-out set (never on test);
6. with ``--methods`` (``make compare``): the paper's comparison methods HaS, ACoL, SPG, ADL and
   CutMix (``configs/synthetic_<method>.yaml``), each scored like CAM at its own held-out threshold;
7. one table (Top-1 Class, Top-1 Loc, GT-Known Loc, GT-Known Top-5 box Loc at IoU 0.5, and
   MaxBoxAccV2 for map-based rows) written to ``<out>/results.json``; every run is in the MLflow
   store ``<out>/mlflow.db``.

``--tiny`` runs the same chain on a few dozen images for a few steps (CI).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
METHOD_TITLES = {"has": "HaS", "acol": "ACoL", "spg": "SPG", "adl": "ADL", "cutmix": "CutMix"}
"""The paper's comparison methods (``--methods``), each trained like CAM and scored like CAM."""
HEADLINE = [("top1_cls", "Top-1 Class"), ("top1_loc", "Top-1 Loc"), ("gt_known_loc", "GT-Known Loc"),
            ("gt_known_top5_loc", "GT-Known Top-5 box Loc")]

FULL = {"num_train": 4000, "num_test": 1000, "num_heldout": 500, "image_size": 112, "samples_per_shard": 1000,
        "overrides": [], "eval_ranks": 2}
TINY = {"num_train": 48, "num_test": 24, "num_heldout": 16, "image_size": 96, "samples_per_shard": 16,
        "overrides": ["data.image_size=96", "data.batch_size=8", "data.eval_batch_size=8", "model.width=0.25",
                      "train.epochs=1", "train.max_steps=3", "train.log_every_steps=1", "eval.viz_samples=4",
                      "log.system_metrics_interval_s=1"],
        "eval_ranks": 1}
"""``--tiny`` (CI): evaluations run as one process. A 2-rank launch of a 24-image evaluation spends 15 s
where one process spends 8 (the launcher and the second rank start up); the 2-rank evaluation path
is tested on its own (tests/test_evaluate.py: the same metrics on 1, 2 and 3 ranks)."""
EVAL_RANKS = 2
"""Ranks of every evaluation (``eval_ranks`` of the size in use: set by :func:`use_size`)."""


def use_size(size: dict) -> dict:
    """Make ``size`` (:data:`FULL` or :data:`TINY`) the one the steps below use; returns it."""
    global EVAL_RANKS
    EVAL_RANKS = size["eval_ranks"]
    return size


def sh(cmd: list[str], log: Path | None = None) -> None:
    """Run a step; its output goes to the terminal (and ``log``); a failure stops the demo naming the step."""
    print("$ " + " ".join(cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.setdefault("DS_ACCELERATOR", "cuda" if _has_gpu() else "cpu")
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
        lines = []
        for line in p.stdout:
            if "[WARNING]" in line or "[INFO]" in line:  # DeepSpeed launcher chatter
                continue
            sys.stdout.write(line)
            lines.append(line)
        p.wait()
    if log is not None:
        log.write_text("".join(lines))
    if p.returncode != 0:
        raise SystemExit(f"demo: step failed (exit {p.returncode}): {' '.join(cmd)}")


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def make_data(out: Path, size: dict, seed: int, body_evidence: float | None = None) -> tuple[Path, Path]:
    """Generate (once) the train/test set and the held-out set under ``out/data`` and shard them.
    ``body_evidence`` (None: the generator's default) is the class tint of the object's body."""
    data = out / "data"
    raw, heldout_raw = data / "raw", data / "heldout_raw"
    shards, heldout = data / "shards", data / "heldout_shards"
    common = ["--image-size", str(size["image_size"])]
    if body_evidence is not None:
        common += ["--body-evidence", str(body_evidence)]
    if not (raw / "images.txt").is_file():
        sh([PY, "-m", "pipeline.sources.synthetic", "--out", str(raw), "--num-train", str(size["num_train"]),
            "--num-test", str(size["num_test"]), "--seed", str(seed), *common])
    if not (heldout_raw / "images.txt").is_file():  # same distribution, another seed, never trained on
        sh([PY, "-m", "pipeline.sources.synthetic", "--out", str(heldout_raw), "--num-train", "0",
            "--num-test", str(size["num_heldout"]), "--seed", str(seed + 1000), *common])
    for root, dest, split in ((raw, shards, "train"), (raw, shards, "test"), (heldout_raw, heldout, "test")):
        if not (dest / split / "manifest.json").is_file():
            sh([PY, "launch/make_shards.py", "--dataset", "cub", "--root", str(root), "--split", split, "--out",
                str(dest), "--samples-per-shard", str(size["samples_per_shard"]), "--workers", "2"])
    return shards, heldout


def free_port() -> str:
    """A free TCP port for DeepSpeed's rendezvous, so concurrent jobs never collide on 29500."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


TRACKING_URI: str | None = None
"""Where every run of the demo is logged (``--tracking-uri``); None: the SQLite store ``<out>/mlflow.db``."""


def tracking_uri(out: Path) -> str:
    return TRACKING_URI or f"sqlite:///{(out / 'mlflow.db').resolve()}"


def run_args(out: Path, name: str, data_root: Path, overrides: list[str]) -> list[str]:
    return [f"data.root={data_root}", f"train.out_dir={out / name}", f"log.tracking_uri={tracking_uri(out)}",
            f"log.run_name={name}", *overrides]


def train(config: str, name: str, out: Path, shards: Path, overrides: list[str]) -> None:
    """2-rank DeepSpeed training; skipped when finished, resumed when interrupted."""
    run_dir = out / name
    if not (run_dir / "done.json").is_file():
        sh([DEEPSPEED, "--num_gpus", "2", "--master_port", free_port(), "launch/train.py", "--config", config,
            *run_args(out, name, shards, overrides), "--resume", "auto"], log=out / f"{name}_train.log")
        (run_dir / "done.json").write_text(json.dumps({"finished": time.time()}))


def evaluate(config: str, name: str, out: Path, data_root: Path, overrides: list[str], eval_name: str,
             extra: list[str] = ()) -> dict:
    """Evaluation (:data:`EVAL_RANKS` ranks) of the run's latest checkpoint on ``data_root``'s test split, named
    ``eval_name`` (MLflow: ``eval/<eval_name>/<metric>`` in run ``name``).

    Skipped when the same request already produced ``metrics.json`` after the run finished (the
    evaluation of a checkpoint is deterministic), so a rerun with more methods redoes nothing. The
    returned metrics carry ``_source`` (run and evaluation name) for the rows built from them."""
    run_dir = out / name
    eval_dir = run_dir / f"eval_{eval_name}"
    request = json.dumps({"config": config, "data": str(data_root), "overrides": list(overrides), "extra": list(extra)})
    metrics, done, asked = eval_dir / "metrics.json", run_dir / "done.json", eval_dir / "request.json"
    if (metrics.is_file() and asked.is_file() and asked.read_text() == request and done.is_file()
            and metrics.stat().st_mtime >= done.stat().st_mtime):
        print(f"= {name}: evaluation {eval_name!r} already done ({metrics})", flush=True)
    else:
        launcher = [DEEPSPEED, "--num_gpus", str(EVAL_RANKS), "--master_port", free_port()] if EVAL_RANKS > 1 else [PY]
        sh([*launcher, "launch/evaluate.py", "--config", config,
            *run_args(out, name, data_root, overrides), *extra, "--checkpoint", str(run_dir / "checkpoints"),
            "--out", str(eval_dir), "--name", eval_name], log=out / f"{name}_eval_{eval_name}.log")
        asked.write_text(request)
    return {**json.loads(metrics.read_text()), "_source": {"run": name, "evaluation": eval_name}}


def thresholds_maps(config: str, overrides: list[str]) -> bool:
    """Whether ``config`` with ``overrides`` draws its boxes from thresholded maps (the CAM family, or
    CSTN with ``eval.box_decoding=scoremap``): then its threshold is chosen on the held-out set."""
    from cstn.config import load_config
    from cstn.evaluation import uses_maps

    return uses_maps(load_config(ROOT / config, overrides))


def held_out_threshold(config: str, name: str, out: Path, shards: Path, heldout: Path,
                       overrides: list[str]) -> tuple[dict, float]:
    """Train ``config`` as run ``name`` and evaluate it on the test split at the map threshold that
    gives the best box accuracy (IoU 0.5) on the held-out maps (never the test split).
    Returns the test metrics and that threshold."""
    train(config, name, out, shards, overrides)
    held = evaluate(config, name, out, heldout, overrides, "heldout")
    threshold = float(held["cam_best_threshold_iou50"])
    tuned = evaluate(config, name, out, shards, overrides, "test_tuned", extra=[f"eval.cam_fixed_threshold={threshold}"])
    return tuned, threshold


def cam_family(method: str, out: Path, shards: Path, heldout: Path, overrides: list[str]) -> tuple[dict, float]:
    """``configs/synthetic_<method>.yaml`` at its held-out threshold (:func:`held_out_threshold`)."""
    return held_out_threshold(f"configs/synthetic_{method}.yaml", method, out, shards, heldout, overrides)


def cstn_rows(out: Path, shards: Path, heldout: Path, overrides: list[str]) -> list[dict]:
    """The recommended CSTN's rows: at its held-out threshold when it decodes a map, then the paper's
    MAP box of the same checkpoint with and without the transform; and the authors' recipe."""
    config = "configs/synthetic_cstn.yaml"
    if thresholds_maps(config, overrides):
        tuned, threshold = held_out_threshold(config, "cstn", out, shards, heldout, overrides)
        paper = evaluate(config, "cstn", out, shards, overrides, "test_map", extra=["eval.box_decoding=map"])
        rows = [held_out_row("CSTN", tuned, threshold), row("CSTN, MAP box", paper),
                row("CSTN, MAP box without transform", paper, "_ref")]
    else:
        train(config, "cstn", out, shards, overrides)
        paper = evaluate(config, "cstn", out, shards, overrides, "test")
        rows = [row("CSTN", paper), row("CSTN without transform", paper, "_ref")]
    authors = "configs/synthetic_cstn_authors.yaml"
    train(authors, "cstn_authors", out, shards, overrides)
    return rows + [row("CSTN, authors' recipe", evaluate(authors, "cstn_authors", out, shards, overrides, "test"))]


def held_out_row(title: str, tuned: dict, threshold: float) -> dict:
    """A map-thresholded method's row: its test figures at the held-out threshold, and MaxBoxAccV2."""
    return {**row(f"{title} (threshold from held-out set)", tuned), "cam_threshold": threshold,
            "MaxBoxAccV2": round(float(tuned["cam_MaxBoxAccV2"]), 2)}


def row(name: str, metrics: dict, suffix: str = "") -> dict:
    """One table row; with ``suffix="_ref"`` the reference-box figures (classification is shared, and
    the evaluator keeps no reference top-5 boxes, so that cell is None). ``run``, ``evaluation`` and
    ``suffix`` say where MLflow holds each figure: run ``run``, metric ``eval/<evaluation>/<key><suffix>``."""
    out = {"method": name, **metrics.get("_source", {}), "suffix": suffix}
    for key, _ in HEADLINE:
        if key + suffix in metrics:
            out[key] = round(float(metrics[key + suffix]), 2)
        elif key == "top1_cls":
            out[key] = round(float(metrics[key]), 2)
        else:
            out[key] = None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo", help="where data, runs, results.json and mlflow.db go")
    p.add_argument("--tiny", action="store_true", help="a few images and steps (CI): checks the chain, not results")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the training")
    p.add_argument("--methods", nargs="*", default=[], choices=[*METHOD_TITLES, "all"],
                   help="comparison methods to add to the table (configs/synthetic_<method>.yaml); 'all' for every one")
    p.add_argument("--body-evidence", type=float, default=None,
                   help="class tint of the object's body in the generated data (default: the generator's 0.08)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI for every run (default: the SQLite store <out>/mlflow.db)")
    args = p.parse_args(argv)
    global TRACKING_URI
    TRACKING_URI = args.tracking_uri
    if "all" in args.methods:
        args.methods = list(METHOD_TITLES)
    size = use_size(TINY if args.tiny else FULL)
    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    shards, heldout = make_data(out, size, args.seed, args.body_evidence)
    overrides = [*size["overrides"], f"train.seed={args.seed}"]

    rows = cstn_rows(out, shards, heldout, overrides)
    cam_tuned, threshold = cam_family("cam", out, shards, heldout, overrides)
    cam_fixed = evaluate("configs/synthetic_cam.yaml", "cam", out, shards, overrides, "test_fixed")
    rows += [held_out_row("CAM", cam_tuned, threshold),
             {**row("CAM (fixed threshold)", cam_fixed), "cam_threshold": float(cam_fixed_threshold(out))}]
    for method in args.methods:
        rows.append(held_out_row(METHOD_TITLES[method], *cam_family(method, out, shards, heldout, overrides)))
    (out / "results.json").write_text(json.dumps(rows, indent=2))

    width = max(len(r["method"]) for r in rows)
    print(f"\nSynthetic set, test split, IoU 0.5 ({time.time() - t0:.0f}s end to end):")
    columns = [*HEADLINE, ("MaxBoxAccV2", "MaxBoxAccV2")]
    print("  " + "method".ljust(width) + "".join(f"  {title:>22}" for _, title in columns))
    for r in rows:
        cells = ("-" if r.get(key) is None else f"{r[key]:.2f}" for key, _ in columns)
        print("  " + r["method"].ljust(width) + "".join(f"  {c:>22}" for c in cells))
    print(f"\nwrote {out / 'results.json'}")
    if TRACKING_URI:
        print(f"MLflow: every run is in {TRACKING_URI}, experiment 'demo'")
    else:
        print(f"MLflow UI: mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'}   (then open http://127.0.0.1:5000)")
    return 0


def cam_fixed_threshold(out: Path) -> float:
    """The classic protocol's threshold as the CAM run's config resolved it."""
    import yaml

    return float(yaml.safe_load((out / "cam" / "config.yaml").read_text())["eval"]["cam_fixed_threshold"])


if __name__ == "__main__":
    sys.exit(main())
