"""Benchmark: the shard converter against ``tar -cf`` over the same files, in one run.

Writes ``--count`` ILSVRC-sized validation JPEGs (the real sizes of the first ids in
``image_sizes.txt``, textured pixels so files are photo-sized, ~100 KB at 500 x 375) in the real
ILSVRC layout, then times on the same files, page cache warm for both:

- ``tar -cf`` of the ``val/`` folder (GNU tar; the floor of any converter: read + write once),
- the converter (``pipeline.shards.convert``: listing, strict JPEG check of every file in
  ``--workers`` processes, pass-through since all files are clean JPEGs, shard + index + manifest),
  end to end (``ratio``) and its shard-writing loop alone, without process start-up and the
  one-off imports (``ratio_loop``),
- for reference, webdataset's ``TarWriter`` storing each file as one member with no check at all
  (``python_tar_mb_s``): the cost of writing tar members from Python.

Each is run ``--repeats`` times and the fastest run counts. The last line printed is JSON with the
rates and ``ratio`` = converter MB/s / tar MB/s (target >= 0.5). MB = 10^6 bytes of input files.
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

from pipeline.shards import ShardOptions, convert, list_source  # noqa: E402
from pipeline.sources.ilsvrc import DEFAULT_VAL_BOXES_DIR, make_fixture  # noqa: E402


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def python_tar(folder: Path, out: Path) -> None:
    """Every file of ``folder`` as one tar member, through webdataset's TarWriter, nothing else."""
    import webdataset as wds
    with wds.TarWriter(str(out), encoder=False) as writer:
        for p in sorted(folder.iterdir()):
            writer.write({"__key__": p.stem, "jpg": p.read_bytes()})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=3000, help="number of JPEGs (default 3000)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--samples-per-shard", type=int, default=500)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--boxes-dir", default=str(DEFAULT_VAL_BOXES_DIR))
    p.add_argument("--workdir", default=None, help="keep the files here (default: a temporary directory)")
    args = p.parse_args(argv)

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_shards_"))
    try:
        t0 = time.perf_counter()
        root = make_fixture(work / "ilsvrc", count=args.count, texture="photo", xml=False, csv_file=True,
                            boxes_dir=args.boxes_dir)
        made = time.perf_counter() - t0
        mb = folder_bytes(root / "val") / 1e6
        print(f"wrote {args.count} JPEGs, {mb:.1f} MB ({mb * 1e3 / args.count:.0f} KB each) in {made:.1f}s",
              file=sys.stderr)
        subprocess.run(["tar", "-cf", "/dev/null", "-C", str(root), "val"], check=True)  # warm the page cache

        import webdataset  # noqa: F401  (imported once here, as a long conversion would)
        tar_times, conv_times, loop_times, py_times = [], [], [], []
        for r in range(args.repeats):
            out_tar = work / "plain.tar"
            t = time.perf_counter()
            subprocess.run(["tar", "-cf", str(out_tar), "-C", str(root), "val"], check=True)
            tar_times.append(time.perf_counter() - t)
            out_tar.unlink()
            t = time.perf_counter()
            python_tar(root / "val", out_tar)
            py_times.append(time.perf_counter() - t)
            out_tar.unlink()

            shutil.rmtree(work / "shards", ignore_errors=True)
            t = time.perf_counter()
            listing = list_source("ilsvrc", root, "val")
            result = convert(listing, work / "shards", ShardOptions(samples_per_shard=args.samples_per_shard,
                                                                    workers=args.workers, progress=False))
            conv_times.append(time.perf_counter() - t)
            loop_times.append(result.write_seconds)
            assert result.manifest["total"] == args.count and result.manifest["counts"]["reencoded_total"] == 0
            print(f"run {r}: tar -cf {tar_times[-1]:.2f}s, python TarWriter {py_times[-1]:.2f}s, converter "
                  f"{conv_times[-1]:.2f}s (loop {loop_times[-1]:.2f}s)", file=sys.stderr)

        tar_rate, conv_rate, loop_rate = mb / min(tar_times), mb / min(conv_times), mb / min(loop_times)
        print(json.dumps({"bench": "shards", "images": args.count, "input_mb": round(mb, 1),
                          "workers": args.workers, "cpus": os.cpu_count(),
                          "converter_mb_s": round(conv_rate, 1),
                          "converter_img_s": round(args.count / min(conv_times), 1),
                          "converter_loop_mb_s": round(loop_rate, 1),
                          "python_tar_mb_s": round(mb / min(py_times), 1),
                          "tar_mb_s": round(tar_rate, 1), "ratio_loop": round(loop_rate / tar_rate, 3),
                          "target": 0.5, "ratio": round(conv_rate / tar_rate, 3)}))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
