"""Upload a converted split to object storage or any fsspec URL, manifest last.

``python launch/upload_shards.py --split-dir data/imagenet/shards/train --to s3://bucket/imagenet``
copies every tar and ``.idx`` the manifest lists (checking each tar's sha256 before it goes), then
``manifest.json``: a reader finds a split only once its manifest is there, so a half-uploaded split
is never readable as complete. Shards already at the destination with the right size are skipped,
so a rerun after a failure finishes the job. ``launch/make_shards.py --out URL`` converts into a
temporary directory and calls this. Credentials come from the backend's standard places
(environment, config files, instance roles).
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def upload_split(split_dir: str | Path, dest_root: str, workers: int = 4, log=print) -> str:
    """Copy ``split_dir`` (holding ``manifest.json``) to ``<dest_root>/<split>``; returns that URL."""
    from pipeline.remote import _filesystem
    from pipeline.manifest import load_manifest, sha256_file

    split_dir = Path(split_dir)
    manifest = load_manifest(split_dir)
    fs, base = _filesystem(dest_root.rstrip("/"))
    target = f"{base.rstrip('/')}/{split_dir.name}"
    url = f"{dest_root.rstrip('/')}/{split_dir.name}"
    fs.makedirs(target, exist_ok=True)
    if fs.exists(f"{target}/manifest.json"):  # a new upload over an old split: readers wait for the new manifest
        fs.rm(f"{target}/manifest.json")

    def send(entry: dict) -> str:
        tar, idx = split_dir / entry["name"], split_dir / entry["index_file"]
        if sha256_file(tar) != entry["sha256"]:
            raise RuntimeError(f"{tar}: sha256 differs from its manifest; re-convert before uploading")
        for path in (tar, idx):
            remote = f"{target}/{path.name}"
            if fs.exists(remote) and fs.size(remote) == path.stat().st_size:
                continue
            fs.put_file(str(path), remote)
        return entry["name"]

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for i, name in enumerate(pool.map(send, manifest.data["shards"]), 1):
            log(f"uploaded {name} ({i}/{len(manifest.data['shards'])})")
    fs.put_file(str(split_dir / "manifest.json"), f"{target}/manifest.json")  # last: the split is complete
    log(f"uploaded {split_dir} to {url} ({manifest.data['total']} samples, {len(manifest.data['shards'])} shards)")
    return url


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split-dir", required=True, help="a converted split (the folder holding manifest.json)")
    p.add_argument("--to", required=True, help="destination root URL (s3://bucket/prefix, gs://..., or a path)")
    p.add_argument("--workers", type=int, default=4, help="parallel uploads")
    args = p.parse_args(argv)
    from pipeline.shards import ShardingError

    try:
        upload_split(args.split_dir, args.to, args.workers)
    except (ShardingError, FileNotFoundError, RuntimeError) as exc:
        print(f"upload error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the storage backend's own errors: name them on one line
        print(f"upload error: {args.to}: {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
