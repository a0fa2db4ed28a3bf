"""Benchmark: the shard converter against ``tar -cf`` over the same files, in one run.

Writes ``--count`` ILSVRC-sized validation JPEGs (the real sizes of the first ids in
``image_sizes.txt``, textured pixels so files are photo-sized, ~136 KB at 500 x 375) in the real
ILSVRC layout, then times on the same files, page cache warm for both (every file is read once
before anything is timed; ``tar -cf /dev/null`` would not do: GNU tar does not read the files when
the archive is ``/dev/null``):

- ``tar -cf`` of the ``val/`` folder (GNU tar; the floor of any converter: read + write once),
- the converter (``pipeline.shards.convert``: listing, ``--verify`` check of every file and shard
  writing in ``--workers`` processes, pass-through since all files are clean JPEGs, shards + DALI
  indexes + sha256 + manifest), end to end including process start-up (``ratio``) and its
  shard-writing loop alone (``ratio_loop``),
- both again with the input files dropped from the page cache first (``posix_fadvise``
  DONTNEED, no privileges needed): read from disk, as a real conversion does (``ratio_cold``),
- for reference: webdataset's ``TarWriter`` storing each file as one member with no check at all
  (``python_tar_mb_s``, the cost of writing tar members through Python's ``tarfile``), and the JPEG
  check alone (read + check + box clipping) in one process: ``check_ms_per_image`` for ``--verify``,
  ``check_ms_by_mode`` for every mode.

tar and the converter alternate within each of ``--repeats`` rounds and the fastest round of each
counts. The last line printed is JSON with the rates and ``ratio`` = converter MB/s / tar MB/s, warm
cache (target >= 0.5). MB = 10^6 bytes of input files. The machine's other load counts for both
sides; ``load_avg`` records the 1-minute load average at the end.

Heavy imports happen inside :func:`main`: the converter's worker processes are started with
``spawn`` and import the main module again, so its top level is kept light.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def drop_from_page_cache(folder: Path) -> None:
    """Ask the kernel to forget the cached pages of every file in ``folder`` (written back first: only
    clean pages can be dropped)."""
    for p in folder.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(folder: Path) -> None:
    """Read every file of ``folder`` once (into the page cache)."""
    for p in folder.iterdir():
        with open(p, "rb") as f:
            while f.read(1 << 20):
                pass


def python_tar(folder: Path, out: Path) -> None:
    """Every file of ``folder`` as one tar member, through webdataset's TarWriter, nothing else."""
    import webdataset as wds
    with wds.TarWriter(str(out), encoder=False) as writer:
        for p in sorted(folder.iterdir()):
            writer.write({"__key__": p.stem, "jpg": p.read_bytes()})


def main(argv: list[str] | None = None) -> int:
    from pipeline.shard_worker import check_item
    from pipeline.shards import VERIFY_MODES, ShardOptions, convert, list_source
    from pipeline.sources.ilsvrc_fixture import DEFAULT_VAL_BOXES_DIR, make_fixture

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=3000, help="number of JPEGs (default 3000)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--samples-per-shard", type=int, default=500)
    p.add_argument("--verify", choices=VERIFY_MODES, default="structure", help="converter's JPEG check")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--boxes-dir", default=str(DEFAULT_VAL_BOXES_DIR))
    p.add_argument("--workdir", default=None, help="keep the files here (default: a temporary directory)")
    args = p.parse_args(argv)

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_shards_"))
    try:
        t0 = time.perf_counter()
        root = work / "ilsvrc"
        if not (root / "val").is_dir() or len(list((root / "val").iterdir())) != args.count:
            shutil.rmtree(root, ignore_errors=True)
            # in another process: OpenCV's thread pool must not start here, or the converter could not fork
            # its workers (it forks only from a single-threaded process) and would spawn them instead
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                pool.submit(make_fixture, root, count=args.count, texture="photo", xml=False, csv_file=True,
                            boxes_dir=args.boxes_dir).result()
        made = time.perf_counter() - t0
        val = root / "val"
        mb = folder_bytes(val) / 1e6
        print(f"{args.count} JPEGs, {mb:.1f} MB ({mb * 1e3 / args.count:.0f} KB each), ready in {made:.1f}s",
              file=sys.stderr)

        import webdataset  # noqa: F401  (for python_tar; imported once, outside any timing)
        read_all(val)
        sample = list_source("ilsvrc", root, "val").items[: min(300, args.count)]
        check_ms = {}
        for mode in VERIFY_MODES:
            t = time.perf_counter()
            for item in sample:
                assert check_item(item, verify=mode).ok
            check_ms[mode] = round((time.perf_counter() - t) / len(sample) * 1e3, 3)

        def run_tar() -> float:
            out_tar = work / "plain.tar"
            t = time.perf_counter()
            subprocess.run(["tar", "-cf", str(out_tar), "-C", str(root), "val"], check=True)
            elapsed = time.perf_counter() - t
            out_tar.unlink()
            return elapsed

        start_methods = set()

        def run_converter() -> tuple[float, float]:
            shutil.rmtree(work / "shards", ignore_errors=True)
            t = time.perf_counter()
            listing = list_source("ilsvrc", root, "val")
            result = convert(listing, work / "shards", ShardOptions(samples_per_shard=args.samples_per_shard,
                                                                    workers=args.workers, verify=args.verify,
                                                                    progress=False))
            elapsed = time.perf_counter() - t
            assert result.manifest["total"] == args.count and result.manifest["counts"]["reencoded_total"] == 0
            start_methods.add(result.start_method)
            return elapsed, result.write_seconds

        times: dict[str, list[float]] = {k: [] for k in ("tar", "conv", "loop", "py", "tar_cold", "conv_cold")}
        for r in range(args.repeats):
            read_all(val)  # warm for both, whatever the previous round did
            times["tar"].append(run_tar())
            conv, loop = run_converter()
            times["conv"].append(conv)
            times["loop"].append(loop)
            t = time.perf_counter()
            python_tar(val, work / "plain.tar")
            times["py"].append(time.perf_counter() - t)
            (work / "plain.tar").unlink()
            drop_from_page_cache(val)
            times["tar_cold"].append(run_tar())
            drop_from_page_cache(val)
            times["conv_cold"].append(run_converter()[0])
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), file=sys.stderr)

        rate = {k: mb / min(v) for k, v in times.items()}
        print(json.dumps({"bench": "shards", "images": args.count, "input_mb": round(mb, 1),
                          "workers": args.workers, "worker_start": "/".join(sorted(map(str, start_methods))),
                          "cpus": os.cpu_count(), "verify": args.verify,
                          "load_avg": round(os.getloadavg()[0], 2),
                          "check_ms_per_image": check_ms[args.verify], "check_ms_by_mode": check_ms,
                          "converter_mb_s": round(rate["conv"], 1),
                          "converter_img_s": round(args.count / min(times["conv"]), 1),
                          "converter_loop_mb_s": round(rate["loop"], 1),
                          "python_tar_mb_s": round(rate["py"], 1), "tar_mb_s": round(rate["tar"], 1),
                          "converter_cold_mb_s": round(rate["conv_cold"], 1),
                          "tar_cold_mb_s": round(rate["tar_cold"], 1),
                          "ratio_loop": round(rate["loop"] / rate["tar"], 3),
                          "ratio_cold": round(rate["conv_cold"] / rate["tar_cold"], 3),
                          "target": 0.5, "ratio": round(rate["conv"] / rate["tar"], 3)}))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
