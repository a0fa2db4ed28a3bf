"""Evaluate a checkpoint: ``deepspeed [--num_gpus N] launch/evaluate.py --config X.yaml --checkpoint PATH``.

Also runs as a single process (``python launch/evaluate.py ...``). Every rank evaluates
its shards; rank 0 merges the per-image results (each image once, count checked
against the manifest), writes ``metrics.json``, ``predictions.csv`` and the plots to
``--out`` (default ``<run dir>/eval/<split>-<checkpoint tag>``), and logs them to MLflow:
into the training run when the checkpoint carries its id, else into a new run.

Every evaluation has a name (``--name``, default: the output folder's name); its metrics go
to ``eval/<name>/<metric>`` at the checkpoint's step, so evaluations of one checkpoint
(another split, another threshold, another decoding) never overwrite each other, and the
evaluated split is logged as a dataset input of the run. Flat names in the training run,
rather than a nested run per evaluation, keep every figure of a model on one run page and
comparable across runs in MLflow's table and charts.

``--checkpoint`` also takes a logged MLflow model, ``models:/NAME/VERSION`` or
``runs:/RUN_ID/model`` (resolved with ``log.tracking_uri`` / ``MLFLOW_TRACKING_URI``); only its
plain weights and config are read, and the results go into the run that logged it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from cstn import checkpoint, dist
from cstn.config import add_config_args, config_from_args, flatten, to_dict


def split_box_count(cfg, split: str) -> int:
    """Ground-truth boxes of a split from its manifest; a split without any cannot be evaluated."""
    from pipeline.manifest import split_dir

    manifest_path = split_dir(cfg.data, split) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    boxes = int(manifest.get("counts", {}).get("boxes", 0))
    if boxes == 0:
        raise ValueError(f"split {split!r} ({manifest_path}) has no ground-truth boxes: localization needs an "
                         f"annotated split (ILSVRC val, CUB/synthetic test); training splits carry no boxes")
    return boxes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(p)
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint tag directory, a run's checkpoints/ dir, an MLflow model (models:/NAME/VERSION, "
                        "runs:/RUN_ID/model) or 'init' (the untrained, seeded model: scale and throughput tests; "
                        "results go to train.out_dir)")
    p.add_argument("--split", default=None, help="split to evaluate (default: data.eval_split)")
    p.add_argument("--out", default=None, help="output directory for metrics.json, predictions and plots")
    p.add_argument("--name", default=None,
                   help="name of this evaluation: its metrics are eval/<name>/<metric> (default: the --out folder's name)")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    args = p.parse_intermixed_args(argv)
    dist.prefix_output_with_rank()
    cfg = config_from_args(args)
    if cfg is None:
        return 2
    split = args.split or cfg.data.eval_split

    dist.init(cfg.dist.backend, cfg.dist.timeout_s)
    from cstn.train_loop import resolve_precision, summarize
    from cstn.evaluation import evaluate
    from cstn.models import build_model
    from cstn.run_records import is_model_uri, load_logged_model
    from cstn.tracking import TrackingUnavailable, make_tracker
    from pipeline.loader import build_loader
    from pipeline.manifest import split_dir
    from pipeline.request import ShardError

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    untrained = args.checkpoint == "init"
    try:
        if untrained:
            meta, run_dir, tag_name = {}, Path(cfg.train.out_dir), "init"
        elif is_model_uri(args.checkpoint):
            meta = load_logged_model(model, cfg, args.checkpoint)
            run_dir, tag_name = Path(cfg.train.out_dir), args.checkpoint.rstrip("/").split("/")[-1]
        else:
            meta = checkpoint.load_weights(model, cfg, args.checkpoint)
            tag_dir = Path(meta["__tag_dir__"])
            run_dir, tag_name = tag_dir.parent.parent, tag_dir.name
    except (checkpoint.CheckpointMismatch, checkpoint.CheckpointError, FileNotFoundError) as exc:
        print(f"checkpoint error: {exc}", file=sys.stderr, flush=True)
        return 2
    device = dist.device()
    model.to(device)
    try:
        loader = build_loader(cfg, split, dist.rank(), dist.world_size(), train=False)
        expected_boxes = split_box_count(cfg, split)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"data error: {exc}", file=sys.stderr, flush=True)
        return 2
    out_dir = Path(args.out) if args.out else run_dir / "eval" / f"{split}-{tag_name}"
    name = args.name or out_dir.name
    if dist.is_main():
        print(f"evaluating {args.checkpoint if untrained or is_model_uri(args.checkpoint) else run_dir} ({tag_name}) "
              f"on split '{split}' ({loader.total_samples} images) with {dist.world_size()} rank(s) as {name!r}",
              flush=True)
    try:
        metrics = evaluate(model, loader, cfg, out_dir=out_dir, expected_total=loader.total_samples,
                           expected_boxes=expected_boxes, precision=resolve_precision(cfg),
                           split_dir=split_dir(cfg.data, split))
    except ShardError as exc:  # a shard that cannot be read or fetched: named, exit 2
        print(f"data error: {exc}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as exc:
        print(f"evaluation error: {exc}", file=sys.stderr, flush=True)
        return 1

    if dist.is_main():
        print("eval " + summarize(metrics), flush=True)
        print(f"wrote {out_dir}", flush=True)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            tracker = make_tracker(cfg, run_dir, True, run_id=meta.get("mlflow_run_id"))
        except TrackingUnavailable as exc:
            print(f"tracking error: {exc}; results are in {out_dir}", file=sys.stderr, flush=True)
            return 2
        if meta.get("mlflow_run_id") is None:
            from cstn.run_records import source_tags

            tracker.log_params(flatten(to_dict(cfg)))
            tracker.set_tags(source_tags(__file__, dist.world_size()))
        tracker.log_dataset(split_dir(cfg.data, split) / "manifest.json", "evaluation",
                            source=f"{str(cfg.data.root).rstrip('/')}/{split}")
        tracker.log_metrics({f"eval/{name}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
                            step=int(meta.get("step", 0)))
        for f in sorted(out_dir.iterdir()):
            tracker.log_artifact(f, artifact_path=f"eval/{name}")
        tracker.close()
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
