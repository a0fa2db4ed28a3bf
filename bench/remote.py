"""Benchmark: the training loader reading from an S3-compatible server, against the same loader on the local disk.

In one run: ``--count`` ILSVRC validation images at their real sizes (the project's fixture writer and
converter) are sharded into a temporary directory and uploaded (``launch/upload_shards.py``) to a local
``moto_server`` (S3 API on 127.0.0.1). The torch reader then runs in training mode (batch 32, 224 px,
``--workers`` decode processes) on

1. ``local``: the directory itself;
2. ``cold``: ``s3://`` with an empty node cache (every shard fetched, checked and cached while the
   epoch runs: prefetch has to hide the transfers);
3. ``warm``: ``s3://`` again with the cache the cold pass filled.

Each pass reads one epoch; the fastest of ``--repeats`` passes counts for ``local`` and ``warm``
(other jobs share the cores), ``cold`` gets a fresh cache every time. The last line is JSON with
``ratio_cold = cold / local`` and ``ratio_warm = warm / local``. Targets on this machine:
``ratio_warm >= 0.95``, ``ratio_cold >= 0.7``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_shards(work: Path, count: int) -> Path:
    from pipeline.shards import ShardOptions, convert, list_source
    from pipeline.sources.ilsvrc_fixture import make_fixture

    raw = make_fixture(work / "ilsvrc", count=count, texture="photo", xml=False, csv_file=True)
    convert(list_source("ilsvrc", raw, "val"), work / "shards", ShardOptions(samples_per_shard=64, workers=2,
                                                                             progress=False))
    shutil.rmtree(raw)
    return work / "shards"


def epoch_rate(root: str, cache: Path, workers: int) -> float:
    """img/s of one training epoch of the torch reader (start-up included: a cold cache fetches then)."""
    from cstn.config import load_config
    from pipeline.loader import build_loader

    cfg = load_config(ROOT / "configs" / "base.yaml", [f"data.root={root}", "data.train_split=val", "data.image_size=224",
                                                       "data.batch_size=32", f"data.num_workers={workers}",
                                                       f"data.cache_dir={cache}", "data.backend=torch"])
    start = time.time()
    loader = build_loader(cfg, "val", 0, 1, train=True)
    seen = sum(len(batch) for batch in loader)
    return seen / (time.time() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=640, help="images (default 640, ten shards of 64)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    try:
        import s3fs

        shards = make_shards(work, args.count)
        deadline = time.time() + 60
        while True:
            try:
                s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}).mkdir("bench")
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        sys.path.insert(0, str(ROOT / "launch"))
        from upload_shards import upload_split

        upload_split(shards / "val", "s3://bench/shards", log=lambda text: None)
        url = "s3://bench/shards"
        local = max(epoch_rate(str(shards), work / "unused", args.workers) for _ in range(args.repeats))
        colds = []
        for i in range(args.repeats):
            cache = work / f"cache{i}"
            colds.append(epoch_rate(url, cache, args.workers))
        cold = max(colds)
        warm = max(epoch_rate(url, work / "cache0", args.workers) for _ in range(args.repeats))
        mb = sum(p.stat().st_size for p in (shards / "val").glob("*.tar")) / 1e6
        result = {"images": args.count, "shards_mb": round(mb, 1), "local_img_s": round(local, 1),
                  "cold_img_s": round(cold, 1), "warm_img_s": round(warm, 1), "ratio_cold": round(cold / local, 3),
                  "ratio_warm": round(warm / local, 3)}
        print(f"local {local:.0f} img/s, s3 cold cache {cold:.0f} img/s ({cold / local:.2f}), warm {warm:.0f} img/s "
              f"({warm / local:.2f}); {mb:.0f} MB in {len(list((shards / 'val').glob('*.tar')))} shards")
        print(json.dumps(result))
    finally:
        server.terminate()
        server.wait(timeout=20)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
