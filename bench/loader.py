"""Benchmark: the input backends against raw JPEG decoding and a torchvision reference, in one run.

On the same shards (``--shards DIR``: a split directory holding ``manifest.json``, or a shards root
with ``--split``; without it, ``--count`` ILSVRC validation images with their real sizes and
photo-like pixels are written by ``pipeline.sources.ilsvrc_fixture.make_fixture`` and converted by the
project's converter into a temporary directory), it measures images per second of:

1. ``decode``: the fastest libjpeg-turbo decoder available (simplejpeg, OpenCV, torchvision.io;
   each timed on one core first), run on all cores, full-size RGB output, nothing else;
2. ``torchvision``: the reference ``ImageFolder`` + PIL with ``Resize((S, S))``,
   ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``, ``DataLoader`` with 2 workers, batch 32,
   shuffled, on the same JPEG files unpacked to class folders;
3. every backend of :func:`pipeline.loader.build_loader` in training mode (flip on, batch 32, S x S
   uint8 output), ``--workers`` decode processes/threads; DALI on the CPU twice: as the backend
   runs (antialiasing only above a 2x shrink) and with DALI's default antialiasing everywhere.

Loaders run until ``--images`` images were delivered after their first batch (start-up is not
counted; the clock starts when the first batch arrives). Every measurement runs ``--repeats``
times and the fastest run counts (other jobs share the cores). The last line printed is JSON with
``backend`` (what ``data.backend=auto`` picks here), ``img_s``, ``ratio_to_decode`` and
``ratio_to_torchvision`` for it, and the figures of every other measurement.
Targets for the ``auto`` pick on a CPU machine: ratio_to_decode >= 0.6, ratio_to_torchvision >= 2.5.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cstn.config import load_config  # noqa: E402
from pipeline import loader as L  # noqa: E402
from pipeline import manifest as M  # noqa: E402
from pipeline import dali_index as I  # noqa: E402
from pipeline import request as R  # noqa: E402


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

def make_shards(work: Path, count: int, workers: int) -> Path:
    """ILSVRC-like validation split (real sizes, textured pixels) through the real converter."""
    from pipeline.shards import ShardOptions, convert, list_source
    from pipeline.sources.ilsvrc_fixture import make_fixture
    raw = make_fixture(work / "ilsvrc", count=count, texture="photo", xml=False, csv_file=True)
    convert(list_source("ilsvrc", raw, "val"), work / "shards",
            ShardOptions(samples_per_shard=256, workers=workers, progress=False))
    shutil.rmtree(raw)
    return work / "shards" / "val"


def read_jpegs(split: R.SplitInfo) -> list[tuple[int, str, bytes]]:
    """``(label, key, jpeg bytes)`` of every sample, read through the shards' indexes."""
    out = []
    for shard in split.shards:
        with open(shard.tar, "rb") as f:
            for sample in I.read_index(shard.index):
                label_off, label_size = sample.members["lab"]
                f.seek(label_off)
                label = int(np.frombuffer(f.read(label_size), np.int32)[0])
                offset, size = sample.members["jpg"]
                f.seek(offset)
                out.append((label, sample.key, f.read(size)))
    return out


def unpack(jpegs, folder: Path) -> Path:
    """The same JPEG bytes as ``folder/<label>/<key>.jpg`` (the ImageFolder layout)."""
    for label, key, data in jpegs:
        d = folder / f"{label:04d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{key}.jpg").write_bytes(data)
    return folder


# ---------------------------------------------------------------------------
# 1. Raw decode
# ---------------------------------------------------------------------------

def decoders() -> dict:
    import cv2
    import simplejpeg
    import torch
    from torchvision.io import decode_jpeg
    return {
        "simplejpeg": lambda b: simplejpeg.decode_jpeg(b, colorspace="RGB"),
        "opencv": lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR),
        "torchvision.io": lambda b: decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8)),
    }


def _decode_worker(split_dir: str, name: str, part: int, parts: int, barrier, repeats: int, results) -> None:
    """One core's share: read its JPEGs (untimed), wait for the others, decode them ``repeats`` times."""
    import cv2
    import torch
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    decode = decoders()[name]
    path = Path(split_dir)
    mine = [j[2] for j in read_jpegs(M.read_split(path.parent, path.name))[part::parts]]
    decode(mine[0])
    barrier.wait()
    start = time.perf_counter()
    for _ in range(repeats):
        for data in mine:
            decode(data)
    results.put((start, time.perf_counter(), len(mine) * repeats))


def decode_rates(split_dir: Path, jpegs: list[bytes], cores: int, images: int, repeats: int
                 ) -> tuple[str, dict, float]:
    """Single-core rate of each decoder, then the fastest in ``cores`` fresh processes (spawned: forking a
    process that already ran torch's thread pools can deadlock), started together by a barrier."""
    single = {}
    sample = jpegs[: min(len(jpegs), 300)]
    for name, decode in decoders().items():
        decode(sample[0])
        t = time.perf_counter()
        for data in sample:
            decode(data)
        single[name] = len(sample) / (time.perf_counter() - t)
    best = max(single, key=single.get)
    passes = max(1, -(-images // len(jpegs)))
    ctx = mp.get_context("spawn")
    rates = []
    for _ in range(repeats):
        barrier, results = ctx.Barrier(cores), ctx.Queue()
        procs = [ctx.Process(target=_decode_worker, args=(str(split_dir), best, i, cores, barrier, passes, results))
                 for i in range(cores)]
        for proc in procs:
            proc.start()
        done = [results.get(timeout=600) for _ in procs]
        for proc in procs:
            proc.join()
        start, end = min(r[0] for r in done), max(r[1] for r in done)
        rates.append(sum(r[2] for r in done) / (end - start))
    return best, single, max(rates)


# ---------------------------------------------------------------------------
# 2./3. Loaders
# ---------------------------------------------------------------------------

def time_loader(make_epoch, images: int) -> float:
    """Images per second after the first batch, over at least ``images`` images (epochs repeated)."""
    seen, start, epoch = 0, None, 0
    while seen < images:
        for batch in make_epoch(epoch):
            n = len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch)
            if start is None:
                start = time.perf_counter()
                continue
            seen += n
            if seen >= images:
                break
        epoch += 1
    return seen / (time.perf_counter() - start)


def torchvision_rate(folder: Path, size: int, batch: int, workers: int, images: int, repeats: int) -> float:
    import torch
    from torchvision import datasets, transforms
    tf = transforms.Compose([transforms.Resize((size, size)), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(folder), tf), batch_size=batch, shuffle=True,
                                         num_workers=workers)
    return max(time_loader(lambda epoch: loader, images) for _ in range(repeats))


def backend_rate(cfg, split: str, backend: str, images: int, repeats: int, **dali_options) -> float:
    if dali_options:
        from pipeline.dali import DaliLoader
        loader = DaliLoader(L.make_request(cfg, split, 0, 1, train=True), **dali_options)
    else:
        loader = L.build_loader(cfg, split, 0, 1, train=True, backend=backend)

    def epoch(e):
        loader.set_epoch(e)
        return loader
    try:
        return max(time_loader(epoch, images) for _ in range(repeats))
    finally:
        del loader


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", default=None, help="split directory (with manifest.json) or shards root (see --split)")
    p.add_argument("--split", default="val", help="split under a shards root (default val)")
    p.add_argument("--count", type=int, default=1500, help="images to generate without --shards (default 1500)")
    p.add_argument("--images", type=int, default=3000, help="images timed per loader (default 3000)")
    p.add_argument("--image-size", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="decode processes / DALI threads of the backends")
    p.add_argument("--repeats", type=int, default=2, help="runs of every measurement; the fastest counts (default 2)")
    p.add_argument("--skip", nargs="*", default=[], choices=("torchvision", "torch", "dali"),
                   help="measurements to leave out")
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1

    work = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        if args.shards:
            split_dir = Path(args.shards)
            if not (split_dir / "manifest.json").is_file():
                split_dir = split_dir / args.split
        else:
            t = time.perf_counter()
            split_dir = make_shards(work, args.count, min(2, cores))
            print(f"wrote {args.count} ILSVRC-sized JPEGs into shards in {time.perf_counter() - t:.1f}s",
                  file=sys.stderr)
        info = M.read_split(split_dir.parent, split_dir.name)
        jpegs = read_jpegs(info)
        sizes = [len(j[2]) for j in jpegs]
        print(f"{len(jpegs)} images, {np.mean(sizes) / 1e3:.0f} KB each, {cores} cores", file=sys.stderr)

        decoder, single, decode_img_s = decode_rates(split_dir, [j[2] for j in jpegs], cores, args.images,
                                                    args.repeats)
        print(f"decode, one core: " + ", ".join(f"{k} {v:.0f}" for k, v in single.items())
              + f" img/s; {decoder} on {cores} cores: {decode_img_s:.0f} img/s", file=sys.stderr)

        rates = {}
        if "torchvision" not in args.skip:
            folder = unpack(jpegs, work / "folder")
            rates["torchvision"] = torchvision_rate(folder, args.image_size, args.batch_size, 2, args.images,
                                                    args.repeats)
            print(f"torchvision ImageFolder+PIL, 2 workers: {rates['torchvision']:.0f} img/s", file=sys.stderr)
        del jpegs

        overrides = [f"data.root={split_dir.parent}", f"data.image_size={args.image_size}",
                     f"data.batch_size={args.batch_size}", f"data.num_workers={args.workers}",
                     "data.random_flip=true", "data.random_resized_crop=false"]
        cfg = load_config(ROOT / "configs" / "base.yaml", overrides)
        available = L.backends()
        auto, reason = L.choose_backend("auto", cfg.data.on_corrupt)
        for backend in ("torch", "dali"):
            if backend in args.skip or backend not in available:
                continue
            key = "dali_cpu" if backend == "dali" and not L._cuda_available() else backend
            rates[key] = backend_rate(cfg, split_dir.name, backend, args.images, args.repeats)
            print(f"backend {key}: {rates[key]:.0f} img/s", file=sys.stderr)
            if key == "dali_cpu":
                rates["dali_cpu_antialias"] = backend_rate(cfg, split_dir.name, backend, args.images,
                                                           args.repeats, antialias_above=0.0)
                print(f"backend dali_cpu, antialiased everywhere: {rates['dali_cpu_antialias']:.0f} img/s",
                      file=sys.stderr)

        picked = "dali_cpu" if auto == "dali" and not L._cuda_available() else auto
        ref = rates.get("torchvision")
        result = {"bench": "loader", "backend": auto, "reason": reason,
                  "img_s": round(rates[picked], 1) if picked in rates else None,
                  "ratio_to_decode": round(rates[picked] / decode_img_s, 3) if picked in rates else None,
                  "ratio_to_torchvision": round(rates[picked] / ref, 3) if picked in rates and ref else None,
                  "decode_img_s": round(decode_img_s, 1), "decoder": decoder,
                  "decode_one_core_img_s": {k: round(v, 1) for k, v in single.items()},
                  "torchvision_img_s": round(ref, 1) if ref else None}
        for key, value in rates.items():
            if key == "torchvision":
                continue
            result[f"{key}_img_s"] = round(value, 1)
            result[f"{key}_ratio_to_decode"] = round(value / decode_img_s, 3)
            if ref:
                result[f"{key}_ratio_to_torchvision"] = round(value / ref, 3)
        result.update({"images": len(sizes), "timed_images": args.images, "mean_kb": round(np.mean(sizes) / 1e3, 1),
                       "image_size": args.image_size, "batch_size": args.batch_size, "workers": args.workers,
                       "repeats": args.repeats,
                       "cores": cores, "targets": {"ratio_to_decode": 0.6, "ratio_to_torchvision": 2.5}})
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
