"""Benchmark: the project's tar writer against webdataset's ``TarWriter`` on the same samples, one process.

Why it exists: ``pipeline/tarshard.py`` hand-writes tar headers instead of using ``tarfile`` through
``webdataset.TarWriter``; issue 17 asked that it be dropped unless it earns its place by a measured
margin. Both writers get the same ``--count`` samples as the converter builds them
(:func:`pipeline.schema.encode_sample`: the JPEG plus six small members), write them to a file in a
temporary directory (page cache, no fsync), and must produce identical bytes; ours also hashes the
stream (sha256) and writes the DALI index, which webdataset's writer does not. Fastest of
``--repeats`` rounds, alternating. The last line is JSON with ``ratio`` = ours samples/s /
webdataset samples/s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def samples(count: int, jpeg_bytes: int) -> list[dict]:
    """``count`` converter samples with ``jpeg_bytes`` of (random) image data each."""
    import numpy as np

    from pipeline import schema

    rng = np.random.default_rng(0)
    jpeg = rng.integers(0, 256, jpeg_bytes, dtype=np.uint8).tobytes()
    return [schema.encode_sample(f"ILSVRC2012_val_{i:08d}", jpeg, i % 1000, i, 500, 375,
                                 [[10.0, 20.0, 300.0, 200.0]], {"synset": "n01440764"}) for i in range(count)]


def write_ours(batch: list[dict], folder: Path) -> Path:
    from pipeline.tarshard import ShardTarWriter

    writer = ShardTarWriter(folder / "ours.tar", folder / "ours.idx")
    for sample in batch:
        writer.write(sample)
    writer.close()
    return folder / "ours.tar"


def write_webdataset(batch: list[dict], folder: Path) -> Path:
    import webdataset as wds

    with open(folder / "wds.tar", "wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=0, user="cstn", group="cstn", mode=0o444)
        for sample in batch:
            writer.write(sample)
        writer.close()
    return folder / "wds.tar"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=3000, help="samples (default 3000)")
    p.add_argument("--jpeg-kb", type=int, default=136, help="image bytes per sample in KB (ILSVRC val: ~136)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    batch = samples(args.count, args.jpeg_kb * 1000)
    best = {"ours": float("inf"), "webdataset": float("inf")}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for _ in range(args.repeats):
            for name, fn in (("ours", write_ours), ("webdataset", write_webdataset)):
                start = time.perf_counter()
                fn(batch, folder)
                best[name] = min(best[name], time.perf_counter() - start)
        digests = {name: hashlib.sha256((folder / f"{'ours' if name == 'ours' else 'wds'}.tar").read_bytes()).hexdigest()
                   for name in best}
    if digests["ours"] != digests["webdataset"]:
        print(f"tarwriter: the two writers produced different bytes: {digests}", file=sys.stderr)
        return 1
    rate = {name: args.count / seconds for name, seconds in best.items()}
    print(f"ours {rate['ours']:.0f} samples/s (with sha256 and DALI index), webdataset TarWriter "
          f"{rate['webdataset']:.0f} samples/s; identical bytes")
    print(json.dumps({"bench": "tarwriter", "samples": args.count, "members_per_sample": len(batch[0]) - 1,
                      "ours_samples_s": round(rate["ours"], 1), "webdataset_samples_s": round(rate["webdataset"], 1),
                      "ratio": round(rate["ours"] / rate["webdataset"], 2), "identical_bytes": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
