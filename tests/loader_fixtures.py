"""Tiny shard sets for the loader tests, written by the project's own converter when it is present.

``make_split_root`` is the one place that writes test shards: through ``tests.conftest.make_tiny_shards``
(synthetic generator -> CUB converter -> ``launch/make_shards.py``) when that script exists, else
through a stand-in writer (``webdataset.ShardWriter`` + ``pipeline.schema.encode_sample`` + DALI's
``wds2idx``) that follows the same member contract.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from cstn.config import load_config
from pipeline import schema

ROOT = Path(__file__).resolve().parents[1]


def make_split_root(out: Path, num_train: int = 40, num_test: int = 22, image_size: int = 64,
                    num_classes: int = 4, samples_per_shard: int = 8, seed: int = 0) -> Path:
    """Shards root with ``train`` and ``test`` splits of synthetic images; returns ``<out>/shards``."""
    if (ROOT / "launch" / "make_shards.py").is_file():
        from tests.conftest import make_tiny_shards
        return make_tiny_shards(out, num_train=num_train, num_test=num_test, image_size=image_size,
                                num_classes=num_classes, seed=seed, samples_per_shard=samples_per_shard)
    return _standin_shards(out, num_train, num_test, image_size, num_classes, samples_per_shard, seed)


def _standin_shards(out, num_train, num_test, image_size, num_classes, samples_per_shard, seed) -> Path:
    import webdataset as wds
    from pipeline.sources.synthetic import SyntheticSpec, write_cub_layout
    raw = write_cub_layout(SyntheticSpec(num_train=num_train, num_test=num_test, image_size=image_size,
                                         num_classes=num_classes, seed=seed), out / "raw", progress=False)
    rows = lambda name: [line.split() for line in (raw / name).read_text().splitlines() if line.strip()]
    paths = {r[0]: r[1] for r in rows("images.txt")}
    labels = {r[0]: int(r[1]) - 1 for r in rows("image_class_labels.txt")}
    is_train = {r[0]: r[1] == "1" for r in rows("train_test_split.txt")}
    boxes = {r[0]: [float(v) for v in r[1:]] for r in rows("bounding_boxes.txt")}
    classes = [r[1] for r in rows("classes.txt")]
    shards_root = out / "shards"
    for split, want in (("train", True), ("test", False)):
        ids = [i for i in paths if is_train[i] == want]
        split_dir = shards_root / split
        split_dir.mkdir(parents=True)
        with wds.ShardWriter(str(split_dir / f"{split}-%06d.tar"), maxcount=samples_per_shard, verbose=0) as writer:
            for index, sid in enumerate(ids):
                x, y, w, h = boxes[sid]
                writer.write(schema.encode_sample(Path(paths[sid]).stem, (raw / "images" / paths[sid]).read_bytes(),
                                                  labels[sid], index, image_size, image_size, [[x, y, x + w, y + h]]))
        shards = []
        for tar in sorted(split_dir.glob("*.tar")):
            subprocess.run([str(Path(sys.executable).parent / "wds2idx"), str(tar), str(tar.with_suffix(".idx"))],
                           check=True, capture_output=True)
            count = int(tar.with_suffix(".idx").read_text().split("\n", 1)[0].split()[1])
            shards.append({"name": tar.name, "count": count, "sha256": hashlib.sha256(tar.read_bytes()).hexdigest()})
        (split_dir / "manifest.json").write_text(json.dumps(
            {"split": split, "shards": shards, "total": len(ids), "classes": classes, "skipped": []}, indent=1))
    return shards_root


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
