"""Checkpoints on top of DeepSpeed's engine: complete-only ``latest``, keep-last-K and best, exact resume.

Layout under ``<out_dir>/checkpoints``::

    step00000120/                 one DeepSpeed tag (written by every rank)
        mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed's files
        rng_rank{r}.pt            each rank's RNG states (torch, numpy, python, cuda)
        meta.json                 written last by rank 0: step, epoch, metric, model config, and
                                  every other file of the tag with its size and sha256
    latest                        tag of the newest COMPLETE checkpoint (atomic replace)
    best                          tag of the best checkpoint by ``train.best_metric``

A checkpoint counts only once ``meta.json`` exists, and ``latest`` moves only after it:
a job killed while saving leaves the previous checkpoint as ``latest``. A checkpoint damaged
afterwards (a file truncated, overwritten or missing, ``meta.json`` unreadable) fails
:func:`verify`: ``--resume auto`` and a checkpoints directory given as ``--checkpoint`` fall
back to the newest complete tag that verifies, naming each tag skipped and why; a tag directory
given explicitly that fails is a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cstn import dist
from cstn.config import LEGACY_MODEL_VALUES, Config, config_hash, flatten, to_dict
from pipeline.schema import sha256_file

META = "meta.json"


class CheckpointMismatch(RuntimeError):
    """A checkpoint from another model configuration."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: damaged, incomplete or unreadable (the message names the file)."""


class IncompleteCheckpointError(CheckpointError, FileNotFoundError):
    """A tag directory without ``meta.json``: a save that never completed (also a FileNotFoundError,
    as a missing checkpoint is)."""


def _inventory(tag_dir: Path) -> dict[str, dict[str, Any]]:
    """Every file of a tag except ``meta.json``: name -> ``{"bytes", "sha256"}``."""
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(Path(tag_dir).iterdir()) if p.is_file() and p.name != META and not p.name.endswith(".tmp")}


def verify(tag_dir: str | Path, names: list[str] | None = None, hashes: bool = True) -> str | None:
    """Why the checkpoint ``tag_dir`` cannot be used, or None when it verifies.

    ``meta.json`` must parse; every file it lists (or only ``names``) must exist with its size and,
    with ``hashes``, its sha256. Checkpoints written before files were listed verify by their
    ``meta.json`` alone.
    """
    tag_dir = Path(tag_dir)
    try:
        meta = json.loads((tag_dir / META).read_text())
    except FileNotFoundError:
        return f"{tag_dir / META} is missing (the checkpoint was never completed)"
    except (OSError, ValueError) as exc:
        return f"{tag_dir / META} is unreadable ({type(exc).__name__}: {str(exc)[:120]})"
    files = meta.get("files") or {}
    for name, expected in files.items():
        if names is not None and name not in names:
            continue
        path = tag_dir / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{path} has {size} bytes, meta.json lists {expected['bytes']} (truncated or overwritten)"
        if hashes and sha256_file(path) != expected["sha256"]:
            return f"{path} does not match its sha256 in meta.json (overwritten or corrupted)"
    return None


def checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.train.out_dir) / "checkpoints"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def preflight(cfg: Config, model: torch.nn.Module) -> None:
    """Fail before training when checkpoints cannot be written (unwritable dir, too little space).

    Space needed is estimated as 4 x the fp32 parameter bytes (weights + two optimizer moments + slack),
    times ``keep_last + 1`` checkpoints.
    """
    ckpt = checkpoint_dir(cfg)
    try:
        ckpt.mkdir(parents=True, exist_ok=True)
        probe = ckpt / f".write_probe_rank{dist.rank()}"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as exc:
        raise RuntimeError(f"checkpoint directory {ckpt} is not writable: {exc}") from None
    param_bytes = sum(p.numel() for p in model.parameters()) * 4
    need = param_bytes * 4 * (cfg.train.keep_last + 1)
    free = shutil.disk_usage(ckpt).free
    if free < need:
        raise RuntimeError(f"checkpoint directory {ckpt} has {free / 2**20:.1f} MiB free; checkpoints need "
                           f"about {need / 2**20:.1f} MiB (keep_last={cfg.train.keep_last})")


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, cfg: Config, client_state: dict[str, Any], metric: float | None = None,
         is_best: bool = False) -> str:
    """Save on ALL ranks (DeepSpeed requires it); returns the tag. Collective.

    ``client_state`` needs ``step`` and ``epoch``; ``metric`` is the evaluation figure of this
    checkpoint (if any) and ``is_best`` marks it as the run's best so far.
    """
    ckpt = checkpoint_dir(cfg)
    tag = f"step{client_state['step']:08d}"
    state = dict(client_state, config_hash=config_hash(cfg), model_config=to_dict(cfg.model))
    engine.save_checkpoint(str(ckpt), tag=tag, client_state=state, save_latest=False)
    torch.save(_rng_state(), ckpt / tag / f"rng_rank{dist.rank()}.pt")
    dist.barrier()  # every rank's files are on disk before the checkpoint is declared complete
    if dist.is_main():
        meta = {"tag": tag, "step": client_state["step"], "epoch": client_state["epoch"],
                "batch_in_epoch": client_state.get("batch_in_epoch", 0), "metric": metric,
                "config_hash": config_hash(cfg), "model_config": to_dict(cfg.model),
                "world_size": dist.world_size(), "mlflow_run_id": client_state.get("mlflow_run_id"),
                "data_world": client_state.get("data_world", dist.world_size()),
                "data_accum": client_state.get("data_accum", cfg.train.grad_accum),
                "micro_batch": cfg.data.batch_size, "zero_stage": cfg.train.zero_stage,
                "files": _inventory(ckpt / tag)}
        _atomic_write(ckpt / tag / META, json.dumps(meta, indent=2))
        _atomic_write(ckpt / "latest", tag)
        if is_best:
            _atomic_write(ckpt / "best", tag)
        prune(ckpt, cfg.train.keep_last)
    dist.barrier()
    return tag


def complete_tags(ckpt: Path) -> list[str]:
    """Tags with ``meta.json``, oldest first."""
    if not ckpt.is_dir():
        return []
    return sorted(p.parent.name for p in ckpt.glob(f"*/{META}"))


def prune(ckpt: Path, keep_last: int) -> None:
    """Delete complete checkpoints beyond the last ``keep_last``, never ``latest`` or ``best``."""
    keep = set(complete_tags(ckpt)[-max(1, keep_last):])
    for name in ("latest", "best"):
        if (ckpt / name).is_file():
            keep.add((ckpt / name).read_text().strip())
    for tag in complete_tags(ckpt):
        if tag not in keep:
            shutil.rmtree(ckpt / tag, ignore_errors=True)


def find_resume(cfg: Config, resume: str | None, hashes: bool = True, names: list[str] | None = None) -> Path | None:
    """The checkpoint to load, verified (:func:`verify`; ``names`` limits which files must verify).

    ``auto``: the run's ``latest`` complete checkpoint, or the newest one that verifies when it does
    not (each skipped tag is named with its reason on stdout); None when the run has none; a
    :class:`CheckpointError` listing every tag when none verifies (starting over would silently
    lose the run). A checkpoints directory behaves like ``auto`` on it. A tag directory must
    verify itself.
    """
    if not resume:
        return None
    if resume == "auto":
        return _newest_verified(checkpoint_dir(cfg), hashes, names)
    path = Path(resume)
    if path.is_dir() and not (path / META).exists() and ((path / "latest").is_file() or complete_tags(path)):
        found = _newest_verified(path, hashes, names)
        if found is None:
            raise CheckpointError(f"{path} holds no complete checkpoint")
        return found
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint (a tag directory or a run's checkpoints/ directory)")
    problem = verify(path, names, hashes)
    if problem and not (path / META).exists():
        raise IncompleteCheckpointError(f"{path} is not a complete checkpoint: {problem}")
    if problem:
        raise CheckpointError(f"checkpoint {path} cannot be used: {problem}")
    return path


def _newest_verified(ckpt: Path, hashes: bool, names: list[str] | None) -> Path | None:
    tags = complete_tags(ckpt)
    latest = ckpt / "latest"
    if latest.is_file() and latest.read_text().strip() in tags:  # `latest` first, then newest to oldest
        tags.remove(latest.read_text().strip())
        tags.append(latest.read_text().strip())
    if not tags:
        return None
    skipped = []
    for tag in reversed(tags):
        problem = verify(ckpt / tag, names, hashes)
        if problem is None:
            for reason in skipped:
                print(f"checkpoint warning: skipped {reason}; using {ckpt / tag}", flush=True)
            return ckpt / tag
        skipped.append(f"{tag} ({problem})")
    raise CheckpointError(f"no checkpoint under {ckpt} verifies: " + "; ".join(skipped))


def read_meta(tag_dir: Path) -> dict[str, Any]:
    return json.loads((Path(tag_dir) / META).read_text())


def check_compatible(cfg: Config, meta: dict[str, Any], source: str) -> None:
    """Refuse a checkpoint trained with another model configuration, naming the differences."""
    if meta.get("config_hash") == config_hash(cfg):
        return
    theirs = flatten(meta.get("model_config", {}), "model.")
    ours = flatten(to_dict(cfg.model), "model.")
    # A field added to ModelConfig after the checkpoint was written is absent from its config: the
    # checkpoint was made with that field's default (or, where the default changed the network, with
    # its legacy value), so only another value is a difference.
    defaults = flatten({**to_dict(type(cfg.model)()), **LEGACY_MODEL_VALUES}, "model.")
    theirs = {**{k: v for k, v in defaults.items() if k not in theirs}, **theirs}
    diffs = [f"{k}: checkpoint {theirs.get(k)!r} vs config {ours.get(k)!r}"
             for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
    if not diffs:
        return
    raise CheckpointMismatch(f"checkpoint {source} was trained with another model configuration: "
                             + "; ".join(diffs))


def load(engine, cfg: Config, tag_dir: Path) -> dict[str, Any]:
    """Restore engine (weights, optimizer, scheduler) and this rank's RNG; returns the client state."""
    tag_dir = Path(tag_dir)
    check_compatible(cfg, read_meta(tag_dir), str(tag_dir))
    try:
        _, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except Exception as exc:  # DeepSpeed's own errors name neither the tag nor the file
        raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}: {type(exc).__name__}: "
                              f"{str(exc)[:300]}") from None
    if client_state is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}")
    rng_file = tag_dir / f"rng_rank{dist.rank()}.pt"
    if rng_file.is_file():
        try:
            _set_rng_state(torch.load(rng_file, weights_only=False))
        except Exception as exc:
            raise CheckpointError(f"{rng_file} is unreadable ({type(exc).__name__}: {str(exc)[:200]})") from None
    return client_state


def load_exported(model: torch.nn.Module, cfg: Config, folder: str | Path, source: str) -> dict[str, Any]:
    """Load a logged model's weights (``folder``: its ``weights.pt`` and ``config.yaml``, e.g. from
    :func:`cstn.run_records.download_model`) into ``model`` after checking the model configs agree.
    The weights file is read with ``weights_only=True``. Returns ``{"model_config": ...}``."""
    import yaml

    folder = Path(folder)
    logged = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    meta = {"model_config": logged.get("model", {}), "config_hash": None}
    check_compatible(cfg, meta, source)
    state = torch.load(folder / "weights.pt", map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return meta


def load_weights(model: torch.nn.Module, cfg: Config, path: str | Path) -> dict[str, Any]:
    """Load weights only (evaluation, prediction) from a tag dir or a checkpoints dir, no engine needed."""
    tag_dir = find_resume(cfg, str(path), names=[META, "mp_rank_00_model_states.pt"])
    meta = read_meta(tag_dir)
    check_compatible(cfg, meta, str(tag_dir))
    states = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not states:
        raise FileNotFoundError(f"{tag_dir} holds no mp_rank_*_model_states.pt")
    try:
        blob = torch.load(states[0], map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{states[0]} is unreadable ({type(exc).__name__}: {str(exc)[:200]})") from None
    weights = {k: v.float() if v.is_floating_point() else v for k, v in blob["module"].items()}
    model.load_state_dict(weights)
    return {**meta, "__tag_dir__": str(tag_dir)}
