"""Bad shards fail with an error naming the shard (or a counted skip), never a hang."""
from __future__ import annotations

import json
import shutil

import pytest

from pipeline import loader as L
from pipeline import manifest as M
from pipeline import dali_index as I
from pipeline import request as R
from pipeline.shards import ShardingError
from tests.loader_fixtures import collect, tiny_config

pytestmark = pytest.mark.timeout(90)
BACKENDS = ("torch", "dali")


@pytest.fixture
def root(tiny_shards, tmp_path):
    """A private copy of the tiny ``test`` split (22 samples in shards of 8, 8, 6), free to damage."""
    shutil.copytree(tiny_shards / "test", tmp_path / "test")
    return tmp_path


def shard(root, k=0):
    return M.read_split(root, "test").shards[k]


def corrupt_jpeg(root, k=0, position=2) -> str:
    """Overwrite the JPEG bytes of one sample in place (tar and index stay valid); returns its key."""
    target = shard(root, k)
    sample = I.read_index(target.index)[position]
    offset, size = sample.members["jpg"]
    with open(target.tar, "r+b") as f:
        f.seek(offset)
        f.write(b"\x00not a jpeg\xff" * (size // 12) + b"\x00" * (size % 12))
    return sample.key


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_shard_is_named_at_build(root, backend):
    target = shard(root, 1)
    with open(target.tar, "r+b") as f:
        f.truncate(target.tar.stat().st_size // 2)
    with pytest.raises(R.ShardError, match=rf"{target.name}.*truncated"):
        L.build_loader(tiny_config(root), "test", 0, 1, backend=backend)


def test_truncation_is_caught_by_the_index_even_without_recorded_sizes(root):
    manifest = root / "test" / "manifest.json"
    data = json.loads(manifest.read_text())
    for entry in data["shards"]:
        entry.pop("bytes", None)
    manifest.write_text(json.dumps(data))
    target = shard(root, 0)
    last = I.read_index(target.index)[-1]
    with open(target.tar, "r+b") as f:
        f.truncate(last.end - 100)  # into the last sample (the tar's zero padding alone would not count)
    with pytest.raises(R.ShardError, match=rf"{target.name} is truncated"):
        L.build_loader(tiny_config(root), "test", 0, 1, backend="torch")


def test_shard_truncated_while_reading_is_named(root):
    """The torch reader checks every read too (a file that shrank after the loader was built)."""
    cfg = tiny_config(root, num_workers=2, eval_batch_size=4)
    loader = L.build_loader(cfg, "test", 0, 1, backend="torch")
    target = shard(root, 2)
    with open(target.tar, "r+b") as f:
        f.truncate(2048)
    with pytest.raises(R.ShardError, match=rf"{target.name} is truncated"):
        collect(loader)


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_index_is_named(root, backend):
    target = shard(root, 1)
    target.index.unlink()
    with pytest.raises((R.ShardError, ShardingError), match=target.index.name):
        L.build_loader(tiny_config(root), "test", 0, 1, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stale_index_is_named(root, backend):
    """The tar was rewritten after its index (here: another shard of the same count copied over it,
    manifest updated): sizes agree, but the index no longer points at the tar's members."""
    first, second = shard(root, 0), shard(root, 1)
    shutil.copyfile(second.tar, first.tar)
    manifest = root / "test" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["shards"][0]["bytes"] = first.tar.stat().st_size
    manifest.write_text(json.dumps(data))
    with pytest.raises(R.ShardError, match=rf"{first.index.name} is stale"):
        L.build_loader(tiny_config(root), "test", 0, 1, backend=backend)


def test_changed_shard_size_is_named(root):
    target = shard(root, 2)
    with open(target.tar, "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(R.ShardError, match=rf"{target.name} is \d+ bytes, the manifest recorded"):
        L.build_loader(tiny_config(root), "test", 0, 1, backend="torch")


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_jpeg_fails_naming_shard_and_key(root, workers):
    key = corrupt_jpeg(root, k=1)
    loader = L.build_loader(tiny_config(root, num_workers=workers), "test", 0, 1, backend="torch")
    with pytest.raises(R.CorruptSampleError, match=rf"{shard(root, 1).name}.*{key}"):
        collect(loader)


def test_dali_corrupt_jpeg_fails_naming_the_shards_of_the_rank(root):
    """DALI's decoder error does not say which sample; the message names the shards of this rank's
    range (rank 0 of 2 reads samples 0..10: shards 0 and 1) and the operator that failed."""
    corrupt_jpeg(root, k=1, position=2)  # global sample 10
    loader = L.build_loader(tiny_config(root, num_workers=1), "test", 0, 2, backend="dali")
    with pytest.raises(R.CorruptSampleError, match=rf"{shard(root, 1).name}.*decoders") as info:
        collect(loader)
    assert shard(root, 2).name not in str(info.value)


def test_corrupt_jpeg_is_a_counted_skip_when_configured(root, caplog):
    key = corrupt_jpeg(root, k=1)
    cfg = tiny_config(root, num_workers=2, on_corrupt="skip", eval_batch_size=8, batch_size=2)
    evaluation = L.build_loader(cfg, "test", 0, 1, backend="auto")
    assert evaluation.backend == "torch"  # DALI cannot skip, so auto takes the torch reader
    got = collect(evaluation)
    assert len(got["indices"]) == 21 and evaluation.skipped == 1
    # training keeps its step count: the worker re-reads its stretch to fill the missing sample
    train = L.build_loader(cfg, "test", 0, 1, train=True, backend="torch")
    got = collect(train)
    assert got["steps"] == [11] and len(got["indices"]) == 22 and train.skipped == 1
    assert len(set(got["indices"].tolist())) == 21  # one good sample read twice, the bad one never


def test_skip_mode_fails_when_nothing_is_decodable(root):
    """Skipping must not turn into an endless re-read when every sample of a stretch is bad."""
    for k, count in enumerate(s.count for s in M.read_split(root, "test").shards):
        for position in range(count):
            corrupt_jpeg(root, k=k, position=position)
    cfg = tiny_config(root, num_workers=0, on_corrupt="skip", batch_size=2)
    with pytest.raises(R.CorruptSampleError, match="can be decoded"):
        collect(L.build_loader(cfg, "test", 0, 1, train=True, backend="torch"))
