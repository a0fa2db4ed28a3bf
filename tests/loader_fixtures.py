"""Helpers of the loader tests. The shards themselves come from ``tests.conftest.tiny_shards``
(synthetic generator -> CUB converter -> ``launch/make_shards.py``: the path real data takes)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cstn.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(root: Path, **data):
    """``configs/tiny.yaml`` pointed at ``root``, with ``data.*`` overrides (keyword = field name)."""
    overrides = [f"data.root={root}"] + [f"data.{k}={json.dumps(v)}" for k, v in data.items()]
    return load_config(ROOT / "configs" / "tiny.yaml", overrides)


def collect(loader, epochs=(0,)) -> dict:
    """Concatenate a loader's batches over ``epochs``: numpy arrays keyed by Batch field, plus ``steps``."""
    out: dict = {"steps": []}
    fields = ("images", "labels", "indices", "flipped", "boxes", "num_boxes", "sizes")
    parts: dict = {k: [] for k in fields}
    for epoch in epochs:
        loader.set_epoch(epoch)
        steps = 0
        for batch in loader:
            steps += 1
            for k in fields:
                v = getattr(batch, k)
                if v is not None:
                    parts[k].append(v.contiguous().cpu().numpy() if k != "boxes" else v.cpu().numpy())
        out["steps"].append(steps)
    for k, v in parts.items():
        if not v:
            continue
        if k == "boxes":  # pad to the largest box count over batches
            most = max(b.shape[1] for b in v)
            v = [np.pad(b, ((0, 0), (0, most - b.shape[1]), (0, 0))) for b in v]
        out[k] = np.concatenate(v)
    return out
