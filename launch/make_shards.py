"""Convert ILSVRC-2012 or CUB-200-2011 (and the synthetic set, which uses the CUB layout) into
WebDataset shards with DALI indexes and a manifest.

    python launch/make_shards.py --dataset ilsvrc --root /data/imagenet --split val \\
        --annotations /data/imagenet/LOC_val_solution.csv --out data/imagenet/shards
    python launch/make_shards.py --dataset cub --root data/CUB_200_2011 --split train \\
        --out data/cub/shards --samples-per-shard 1000

Writes ``OUT/<split>/<split>-000000.tar`` ..., one ``.idx`` per shard and ``OUT/<split>/manifest.json``.
Running the same command again resumes an interrupted conversion (complete shards whose checksum
matches are kept). Exit status: 0 done, 2 bad arguments or bad input (the message names the file).
See :mod:`pipeline.shards` for the sample layout, the image checks and the manifest.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# No BLAS threads: the converter does no linear algebra, and a process with a single thread can fork its
# workers (cheap) instead of spawning them (a fresh interpreter each). Set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pipeline.shards import (DEFAULT_SHARD_SIZE_MB, VERIFY_MODES, ShardingError, ShardOptions,  # noqa: E402
                             convert, list_source)
from pipeline.sources.base import SourceError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="make_shards.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=("ilsvrc", "cub"),
                   help="source layout (the synthetic set is 'cub')")
    p.add_argument("--root", required=True, help="dataset root (ILSVRC: holds train/ and val/; CUB: images.txt ...)")
    p.add_argument("--split", required=True, choices=("train", "val", "test"),
                   help="ILSVRC: train or val; CUB: train or test")
    p.add_argument("--out", required=True, help="output directory, or a URL (s3://, gs://, ...): shards go to OUT/<split>/ "
                                                "(a URL gets them through a local temporary directory, manifest last)")
    p.add_argument("--staging", default=None, help="with a URL --out: the local directory to convert into first "
                                                   "(default: a temporary one, removed after the upload)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=int, default=None, metavar="N", help="samples per shard")
    size.add_argument("--shard-size", type=float, default=None, metavar="MB",
                      help=f"close a shard once its images reach this many MB (default {DEFAULT_SHARD_SIZE_MB:g})")
    p.add_argument("--workers", type=int, default=2,
                   help="processes checking images and writing shards (0: all in this process; default 2)")
    p.add_argument("--verify", choices=VERIFY_MODES, default="structure",
                   help="JPEG check, no decoding but for 'decode': 'structure' (default) reads the segments up to "
                        "the first scan and requires the end marker (catches truncated files); 'markers' also "
                        "walks every marker inside the scan data (catches overwritten data); 'decode' also "
                        "decodes every image with libjpeg in strict mode (catches damaged Huffman data, ~1 ms "
                        "an image)")
    p.add_argument("--strict", action="store_true", help="fail on the first input that would be skipped")
    p.add_argument("--annotations", default=None, metavar="PATH",
                   help="ILSVRC val boxes: a directory of PASCAL-VOC XML files or LOC_val_solution.csv")
    p.add_argument("--synsets", default=None, metavar="PATH",
                   help="ILSVRC synset list (LOC_synset_mapping.txt); default: looked up in ROOT and its parent")
    p.add_argument("--seed", type=int, default=0, help="seed of the training-split shuffle (default 0)")
    p.add_argument("--reencode-quality", type=int, default=95, metavar="Q",
                   help="JPEG quality for images that must be re-encoded (default 95)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        options = ShardOptions(samples_per_shard=args.samples_per_shard, shard_size_mb=args.shard_size,
                               seed=args.seed, workers=args.workers, strict=args.strict, verify=args.verify,
                               reencode_quality=args.reencode_quality, progress=not args.no_progress)
    except ValueError as e:
        print(f"make_shards.py: error: {e}", file=sys.stderr)
        return 2
    from pipeline.remote import is_remote

    remote = is_remote(args.out)
    staging = None
    if remote:
        import tempfile

        staging = Path(args.staging) if args.staging else Path(tempfile.mkdtemp(prefix="cstn-shards-"))
    try:
        listing = list_source(args.dataset, args.root, args.split, annotations=args.annotations,
                              synsets=args.synsets)
        result = convert(listing, staging if remote else args.out, options)
    except (SourceError, ShardingError) as e:
        print(f"make_shards.py: error: {e}", file=sys.stderr)
        return 2
    if remote:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from upload_shards import upload_split

        try:
            upload_split(result.split_dir, args.out, log=lambda text: None)
        except Exception as e:  # the storage backend's errors: one line, the converted split stays in staging
            print(f"make_shards.py: error: upload to {args.out} failed ({type(e).__name__}: {str(e)[:300]}); the "
                  f"converted split is in {result.split_dir}: upload it with launch/upload_shards.py", file=sys.stderr)
            return 2
        if not args.staging:
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
    m, c = result.manifest, result.manifest["counts"]
    mb = result.input_bytes / 1e6
    kinds = f" {c['reencoded']}" if c["reencoded"] else ""
    where = f"{args.out.rstrip('/')}/{m['split']}" if remote else result.split_dir
    print(f"{m['dataset']}/{m['split']}: {m['total']} samples in {m['num_shards']} shards under {where} "
          f"({len(result.written)} written, {len(result.kept)} kept, {len(result.reindexed)} re-indexed); "
          f"{c['skipped']} skipped, {c['reencoded_total']} re-encoded{kinds}, "
          f"{c['boxes']} boxes ({c['boxes_clipped']} clipped, {c['boxes_dropped']} dropped); "
          f"{result.seconds:.1f}s, {mb / max(result.seconds, 1e-9):.1f} MB/s, --verify {args.verify}"
          + (f"; {result.redone} shards started on a wrong guess were redone" if result.redone else ""))
    for s in m["skipped"][:10]:
        print(f"  skipped {s['file']}: {s['reason']}")
    if len(m["skipped"]) > 10:
        print(f"  ... {len(m['skipped']) - 10} more in {result.split_dir / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
