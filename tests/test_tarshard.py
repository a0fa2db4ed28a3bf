"""ShardTarWriter: the bytes of webdataset's TarWriter and the index of DALI's wds2idx, written in one pass."""
from __future__ import annotations

import hashlib
import subprocess

import numpy as np
import pytest

from pipeline import schema
from pipeline.dali_index import write_dali_index
from pipeline.tarshard import ShardTarWriter, ustar_header


def samples(count: int, seed: int = 0) -> list[dict]:
    """Samples of the shard contract with varied sizes (some exact multiples of 512), and a few awkward keys."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        key = f"img_{i:05d}"
        if i == 3:
            key += "x" * 120  # a member name over 100 bytes: needs a pax header
        if i == 5:
            key += "_é"  # not ASCII: needs a pax header
        size = 512 * 3 if i == 7 else int(rng.integers(1, 20_000))
        boxes = rng.uniform(0, 50, (i % 3, 4))
        out.append(schema.encode_sample(key, rng.bytes(size), i % 7, i, 50, 40, boxes, {"synset": "n0", "name": "x"}))
    return out


def webdataset_bytes(tmp_path, items: list[dict]) -> bytes:
    import webdataset as wds
    path = tmp_path / "reference.tar"
    with open(path, "wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=0, user="cstn", group="cstn")
        for s in items:
            writer.write(s)
        writer.close()
    return path.read_bytes()


@pytest.mark.parametrize("flush_bytes", [1, 30_000, 8 << 20])
def test_same_bytes_as_webdataset_and_same_index_as_wds2idx(tmp_path, flush_bytes):
    items = samples(40)
    writer = ShardTarWriter(tmp_path / "a.tar", tmp_path / "a.idx", flush_bytes=flush_bytes)
    payload = sum(writer.write(s) for s in items)
    writer.close()
    data = (tmp_path / "a.tar").read_bytes()
    assert data == webdataset_bytes(tmp_path, items)
    assert (writer.bytes, writer.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert writer.samples == 40 and payload == writer.payload == sum(
        len(v) for s in items for k, v in s.items() if k != "__key__")
    write_dali_index(tmp_path / "a.tar", tmp_path / "dali.idx")
    assert (tmp_path / "a.idx").read_bytes() == (tmp_path / "dali.idx").read_bytes()
    assert writer.index_sha256 == hashlib.sha256((tmp_path / "a.idx").read_bytes()).hexdigest()
    listed = subprocess.run(["tar", "-tf", str(tmp_path / "a.tar")], check=True, capture_output=True,
                            text=True).stdout.splitlines()
    assert listed == [f"{s['__key__']}.{ext}" for s in items for ext in sorted(schema.MEMBERS)]


def test_headers_match_tarfile_for_plain_names():
    import tarfile
    for name, size in (("a.jpg", 0), ("ILSVRC2012_val_00000001.json", 123456), ("x" * 100, 8 ** 11 - 1)):
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "cstn", "cstn"
        assert ustar_header(name, size) == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def test_abort_removes_the_files_and_an_empty_shard_is_refused(tmp_path):
    writer = ShardTarWriter(tmp_path / "a.tar", tmp_path / "a.idx", flush_bytes=1)
    writer.write(samples(1)[0])
    writer.abort()
    assert not list(tmp_path.iterdir())
    empty = ShardTarWriter(tmp_path / "b.tar", tmp_path / "b.idx")
    with pytest.raises(ValueError, match="no samples written"):
        empty.close()
    with pytest.raises(ValueError, match=r"img\.jpg: tar members must be bytes, got int"):
        ShardTarWriter(tmp_path / "c.tar", tmp_path / "c.idx").write({"__key__": "img", "jpg": 3})
