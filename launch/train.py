"""Train a CSTN (or CAM, HaS, ACoL, SPG, ADL, CutMix) model: ``deepspeed [--num_gpus N] [--hostfile H] launch/train.py --config X.yaml``.

Data-parallel over every rank DeepSpeed starts (one node or many), ZeRO 0/1/2 and
bf16/fp16 on GPUs, fp32 on CPUs. Rank 0 prints progress and talks to MLflow; every
rank writes its share of each checkpoint. ``--resume auto`` continues the run in
``train.out_dir`` exactly where its last complete checkpoint left it (same MLflow run).
SIGTERM (preemption) finishes the current step, checkpoints and exits 0.

Examples::

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 launch/train.py --config configs/tiny.yaml
    deepspeed launch/train.py --config configs/cub_cstn_r101.yaml train.epochs=30 --resume auto
    python launch/train.py --config configs/tiny.yaml --dry-run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from pathlib import Path

import torch

from cstn import checkpoint, dist
from cstn.config import add_config_args, config_from_args, flatten, save_config, to_dict
from cstn.data_plan import DataPlan, plan_for
from cstn.progress import Progress
from cstn.train_loop import (all_finite, deepspeed_config, resolve_precision, skip_batches, summarize,
                             sync_buffers)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    parser.add_argument("--resume", default=None,
                        help="'auto' (latest complete checkpoint of train.out_dir, if any) or a checkpoint path")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the config, build everything, run 2 train steps and 1 eval batch; no checkpoint")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                        help="set by the DeepSpeed launcher")
    import deepspeed

    deepspeed.add_config_arguments(parser)
    return parser.parse_intermixed_args(argv)


class Preemption:
    """Remembers a SIGTERM; the loop checks it between steps."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        if not self.requested:
            print("SIGTERM received: finishing the step, then checkpointing and exiting", flush=True)
        self.requested = True


def main(argv=None) -> int:
    args = parse_args(argv)
    dist.prefix_output_with_rank()
    cfg = config_from_args(args)
    if cfg is None:
        return 2
    if args.dry_run:
        cfg.train.max_steps = 2
        cfg.log.mlflow = False

    dist.init(cfg.dist.backend, cfg.dist.timeout_s, require_group=True)
    rank, world = dist.rank(), dist.world_size()
    main_rank = dist.is_main()
    torch.manual_seed(cfg.train.seed + rank)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    out_dir = Path(cfg.train.out_dir)
    precision = resolve_precision(cfg)
    if not args.dry_run:  # one job per run directory, before anything in it is touched
        problem = take_run_lock(out_dir) if main_rank else ""
        problem = dist.broadcast_object(problem)
        if problem:
            print(f"run directory error: {problem}", file=sys.stderr, flush=True)
            return 2

    # Imports that pull heavy dependencies come after argument and config errors are reported.
    import deepspeed
    from cstn.evaluation import evaluate
    from cstn.losses import compute_loss
    from cstn.models import build_model
    from cstn.optim import build_optimizer, build_scheduler
    from cstn.tracking import TrackingUnavailable, make_tracker
    from pipeline.loader import build_loader

    if main_rank:
        print(f"world size {world}, device {dist.device()}, precision {precision}, "
              f"global batch {cfg.data.batch_size * cfg.train.grad_accum * world}", flush=True)
        if args.dry_run:
            sys.stdout.write(__import__("cstn.config", fromlist=["dump_yaml"]).dump_yaml(cfg))

    model = build_model(cfg)
    if not args.dry_run:  # fail now, not after an epoch, when checkpoints cannot be written
        try:
            checkpoint.preflight(cfg, model)
            problem = ""
        except RuntimeError as exc:
            problem = str(exc)
        if dist.all_reduce_max(float(bool(problem))) > 0:  # every rank stops, not only those that failed
            print(f"checkpoint error: {problem or 'the checkpoint preflight failed on another rank'}; "
                  f"no training step was run", file=sys.stderr, flush=True)
            return 2
    # Rank 0 picks (and verifies) the checkpoint to resume, every rank loads that one. Its data layout
    # decides which micro-batches each rank trains on (cstn.data_plan), also on another world size.
    problem = ""
    try:
        tag_dir = checkpoint.find_resume(cfg, args.resume) if main_rank and not args.dry_run else None
    except (checkpoint.CheckpointError, FileNotFoundError) as exc:
        tag_dir, problem = None, str(exc)
    tag_dir, problem = dist.broadcast_object((None if tag_dir is None else str(tag_dir), problem))
    if problem:
        print(f"checkpoint error: {problem}", file=sys.stderr, flush=True)
        return 2
    tag_dir = None if tag_dir is None else Path(tag_dir)
    plan, note, problem = plan_for(world, rank, cfg.data.batch_size, cfg.train.grad_accum, cfg.train.zero_stage,
                                   checkpoint.read_meta(tag_dir) if tag_dir else None)
    if problem:
        print(f"resume error: {problem}", file=sys.stderr, flush=True)
        return 2
    if note and main_rank:
        print(f"resume: {note}", flush=True)
    cfg.train.grad_accum = plan.accum
    try:  # a missing or damaged split is one line naming it, as in launch/evaluate.py
        streams = {v: build_loader(cfg, cfg.data.train_split, v, plan.data_world, train=True) for v in plan.hosted}
        eval_loader = build_loader(cfg, cfg.data.eval_split, rank, world, train=False)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:  # RuntimeError: ShardingError, ShardError
        print(f"data error: {exc}", file=sys.stderr, flush=True)
        return 2
    stream_batches = min(s.num_batches for s in streams.values())  # equal: every data rank runs whole batches
    steps_per_epoch = stream_batches // plan.data_accum
    if steps_per_epoch == 0:
        print(f"data error: split {cfg.data.train_split!r} gives each of {plan.data_world} data rank(s) "
              f"{stream_batches} batch(es) of {cfg.data.batch_size}, fewer than the {plan.data_accum} an optimizer "
              f"step takes", file=sys.stderr, flush=True)
        return 2
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch * cfg.train.epochs, steps_per_epoch)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, world))
    device = engine.device

    # -- resume ---------------------------------------------------------------
    start_epoch, step, batch_in_epoch, best_metric, run_id = 0, 0, 0, -math.inf, None
    if tag_dir is not None:
        try:
            state = checkpoint.load(engine, cfg, tag_dir)
        except (checkpoint.CheckpointError, checkpoint.CheckpointMismatch) as exc:
            print(f"checkpoint error: {exc}", file=sys.stderr, flush=True)
            return 2
        start_epoch, step = state["epoch"], state["step"]
        batch_in_epoch = state.get("batch_in_epoch", 0)
        best_metric = state.get("best_metric", -math.inf)
        run_id = state.get("mlflow_run_id")
        if main_rank:
            print(f"resumed from {tag_dir}: epoch {start_epoch}, step {step}, batch {batch_in_epoch}", flush=True)

    try:
        tracker = make_tracker(cfg, out_dir, main_rank, run_id=run_id)
    except TrackingUnavailable as exc:
        print(f"tracking error: {exc}", file=sys.stderr, flush=True)
        return 2
    if main_rank and not args.dry_run:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        tracker.log_params(flatten(to_dict(cfg)))
        from cstn.run_records import source_tags

        tracker.set_tags({**source_tags(__file__, world), "precision": precision, "device": str(device)})
        tracker.log_artifact(out_dir / "config.yaml")
        root = str(cfg.data.root).rstrip("/")
        tracker.log_dataset(split_manifest(cfg, cfg.data.train_split), "training", source=f"{root}/{cfg.data.train_split}")
        tracker.log_dataset(split_manifest(cfg, cfg.data.eval_split), "evaluation", source=f"{root}/{cfg.data.eval_split}")
        if cfg.log.system_metrics:
            tracker.start_system_metrics(cfg.log.system_metrics_interval_s)
    run_id = tracker.run_id or run_id

    def save(epoch_: int, batch_: int, metric=None, is_best=False):
        client = {"epoch": epoch_, "step": step, "batch_in_epoch": batch_, "best_metric": best_metric,
                  "mlflow_run_id": run_id, "seed": cfg.train.seed, "data_world": plan.data_world,
                  "data_accum": plan.data_accum}
        tag = checkpoint.save(engine, cfg, client, metric=metric, is_best=is_best)
        if main_rank:
            print(f"checkpoint {tag} written", flush=True)

    preempt = Preemption()
    progress = Progress(total_steps, world)
    epoch = start_epoch
    stop = step >= total_steps
    status = "FINISHED"
    # batch_in_epoch: batches each data stream has given this epoch (data_accum per optimizer step)
    while not stop and epoch < cfg.train.epochs:
        for stream in streams.values():
            stream.set_epoch(epoch)
        feeds = {v: skip_batches(stream, batch_in_epoch) for v, stream in streams.items()}
        engine.train()
        while batch_in_epoch + plan.data_accum <= stream_batches:
            images = 0
            for slot in range(plan.slots):  # the step's micro-batches, in the run's order
                feed = feeds.get(DataPlan.stream(slot, plan.data_world))
                if feed is None:
                    continue
                progress.data_ready()
                batch = next(feed, None)
                if batch is None or not plan.mine(slot):
                    continue
                batch = batch.to(device)
                output = engine(batch.images, labels=batch.labels)  # ACoL and SPG use them in training
                losses = compute_loss(output, batch.labels, cfg.loss)
                if not all_finite(losses["loss"]):
                    if main_rank:
                        print(f"non-finite loss at step {step} (epoch {epoch}): "
                              + ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items())
                              + "; stopping. The last good checkpoint is kept.", file=sys.stderr, flush=True)
                    tracker.close(status="FAILED")
                    return 3
                engine.backward(losses["loss"])
                engine.step()
                images += len(batch)
            batch_in_epoch += plan.data_accum
            step += 1
            sync_buffers(engine.module)  # one set of BatchNorm statistics on every rank
            progress.step_done(images, {k: float(v.detach()) for k, v in losses.items()})
            if main_rank and (step % cfg.train.log_every_steps == 0 or step == total_steps):
                lr = scheduler.get_last_lr()[0]
                print(progress.line(step, epoch, lr), flush=True)
                tracker.log_metrics({**{f"train/{k}": m.avg for k, m in progress.meters.items()},
                                     "train/lr": lr, "train/img_s": progress.images_per_s(),
                                     "train/data_time_frac": progress.data_fraction()}, step)
            stop = step >= total_steps
            halt = cfg.train.halt_after_steps and step >= cfg.train.halt_after_steps
            periodic = cfg.train.checkpoint_every_steps and step % cfg.train.checkpoint_every_steps == 0
            # A SIGTERM reaches the ranks at different moments (a launcher signals them one after
            # another): all ranks stop after the same step when any of them has it.
            preempted = dist.all_reduce_max(float(preempt.requested)) > 0
            if preempted or halt:
                save(epoch, batch_in_epoch)
                tracker.close(status="KILLED" if preempted else "RUNNING")
                if main_rank and preempted:
                    print(f"preempted: checkpoint at step {step} written; exiting 0 (resume with --resume auto)",
                          flush=True)
                return 0
            if periodic and not stop and not args.dry_run:
                save(epoch, batch_in_epoch)
            if stop:
                break
        epoch_done = batch_in_epoch + plan.data_accum > stream_batches
        if epoch_done:
            epoch, batch_in_epoch = epoch + 1, 0
        do_eval = args.dry_run or stop or (cfg.train.eval_every_epochs and epoch % cfg.train.eval_every_epochs == 0)
        metric, is_best = None, False
        if do_eval:
            metrics = evaluate(engine.module, eval_loader, cfg, max_batches=1 if args.dry_run else None,
                               out_dir=None if args.dry_run else out_dir / "eval" / f"epoch{epoch:03d}",
                               expected_total=None if args.dry_run else eval_loader.total_samples,
                               split_dir=split_manifest(cfg, cfg.data.eval_split).parent)
            if main_rank:
                print("eval " + summarize(metrics), flush=True)
                tracker.log_metrics({f"eval/{IN_TRAINING}/{k}": v for k, v in metrics.items()
                                     if isinstance(v, (int, float))}, step)
                if not args.dry_run:
                    for f in sorted((out_dir / "eval" / f"epoch{epoch:03d}").iterdir()):
                        tracker.log_artifact(f, artifact_path=f"eval/epoch{epoch:03d}")
            metric = dist.broadcast_object(metrics.get(cfg.train.best_metric) if main_rank else None)
            if metric is not None and metric > best_metric:
                best_metric, is_best = metric, True
        if not args.dry_run:
            save(epoch, batch_in_epoch, metric=metric, is_best=is_best)
        if args.dry_run:
            break
        progress.restart_clock()  # evaluation and checkpoint time is not training time
    # Corrupt samples skipped by the reader (data.on_corrupt=skip), summed over the ranks.
    skipped = int(dist.all_reduce_sum([float(sum(getattr(s, "skipped", 0) for s in streams.values()))])[0])
    if main_rank:
        summary = {"step": step, "epoch": epoch, "best_metric": best_metric, "skipped_samples": skipped}
        if torch.cuda.is_available():  # rank 0's device; bench/gpu_check.py reads it
            summary["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
        if skipped:
            print(f"warning: {skipped} corrupt training sample(s) were skipped (data.on_corrupt=skip); "
                  f"the warnings above name their shards", file=sys.stderr, flush=True)
        tracker.log_metrics({"train/skipped_samples": skipped}, step)
        print("done: " + json.dumps(summary), flush=True)
        if cfg.log.mlflow and cfg.log.log_model and not args.dry_run:
            log_models(tracker, engine.module, cfg, build_model)
    tracker.close(status=status)
    dist.barrier()
    return 0


IN_TRAINING = "train_loop"
"""Name of the evaluations run by the training loop: their metrics are ``eval/train_loop/<metric>``
at the step they ran (``launch/evaluate.py`` names its own, ``eval/<name>/<metric>``)."""


def take_run_lock(out_dir: Path) -> str:
    """Rank 0: hold ``<out_dir>/job.lock`` until this process exits; "" or why not."""
    import atexit

    from cstn.run_lock import RunDirectoryBusy, RunLock

    lock = RunLock(out_dir)
    try:
        note = lock.acquire()
    except RunDirectoryBusy as exc:
        return str(exc)
    except OSError:  # the directory cannot be made: the checkpoint preflight names it, before any step
        return ""
    atexit.register(lock.release)
    if note:
        print(f"run directory: {note}", flush=True)
    return ""


def split_manifest(cfg, split: str) -> Path:
    from pipeline.manifest import split_dir

    return split_dir(cfg.data, split) / "manifest.json"


def log_models(tracker, model, cfg, build_model) -> None:
    """Rank 0, end of training: the final weights as MLflow model ``model`` and, when the run kept a
    best checkpoint, its weights as ``best_model``; ``log.register_model`` registers the best one (the
    final one when there is no best)."""
    import warnings

    from cstn.predictor import BoxPredictor

    warnings.filterwarnings("ignore", message="no model.backbone_weights given")  # said once at the start already
    marker = checkpoint.checkpoint_dir(cfg) / "best"
    best = None
    if marker.is_file() and (marker.parent / marker.read_text().strip()).is_dir():
        best = build_model(cfg)
        checkpoint.load_weights(best, cfg, marker.parent / marker.read_text().strip())
    # a fresh module with the consolidated weights: the engine's module holds DeepSpeed state (hooks, the
    # process group) that neither pickles nor belongs in a deployable model
    final = build_model(cfg)
    final.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    register = cfg.log.register_model
    uri = tracker.log_model(BoxPredictor(final, cfg), cfg, final.state_dict(), name="model",
                            register_as="" if best is not None else register)
    if best is not None:
        best_uri = tracker.log_model(BoxPredictor(best, cfg), cfg, best.state_dict(), name="best_model",
                                     register_as=register)
        uri = f"{uri}, best {best_uri}" if uri and best_uri else uri or best_uri
    if uri:
        print(f"logged MLflow model(s): {uri}" + (f" (registered as {register!r})" if register else ""), flush=True)


def run() -> int:
    """``main`` with unreadable input data reported as one line naming the shard (exit 2)."""
    from pipeline.request import CorruptSampleError, ShardError

    try:
        return main()
    except (CorruptSampleError, ShardError) as exc:
        print(f"data error: {exc} (data.on_corrupt=skip counts and skips undecodable samples)",
              file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(run())
