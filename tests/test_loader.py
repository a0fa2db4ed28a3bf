"""Loader behaviour in one process: coverage, backend agreement, flips, crops, backend choice, DALI graph."""
from __future__ import annotations

import json

import numpy as np
import pytest
import webdataset as wds

from pipeline import loader as L
from pipeline import manifest as M
from pipeline.schema import flip_boxes
from tests.loader_fixtures import collect, tiny_config

pytestmark = pytest.mark.timeout(120)
BACKENDS = ("torch", "dali")


@pytest.fixture(scope="module")
def truth(tiny_shards):
    """Per split: global index -> (label, boxes (n, 4), width, height), read from the ``json`` members."""
    out = {}
    for split in ("train", "test"):
        info = M.read_split(tiny_shards, split)
        table = {}
        for sample in wds.WebDataset([str(s.tar) for s in info.shards], shardshuffle=False, empty_check=False):
            meta = json.loads(sample["json"])
            table[meta["index"]] = (meta["label"], np.array(meta["boxes"], np.float32).reshape(-1, 4),
                                    meta["width"], meta["height"])
        out[split] = table
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_delivers_every_sample_once_with_its_ground_truth(tiny_shards, truth, backend):
    cfg = tiny_config(tiny_shards, image_size=48, eval_batch_size=8)
    loader = L.build_loader(cfg, "test", 0, 1, backend=backend)
    got = collect(loader)
    total = len(truth["test"])
    assert loader.backend == backend and loader.total_samples == total == loader.num_samples
    assert got["steps"] == [loader.num_batches] == [len(loader)] == [3]  # 22 = 8 + 8 + 6
    assert sorted(got["indices"].tolist()) == list(range(total))
    assert got["images"].shape == (total, 3, 48, 48) and got["images"].dtype == np.uint8
    for i, index in enumerate(got["indices"]):
        label, boxes, width, height = truth["test"][int(index)]
        assert got["labels"][i] == label
        assert got["num_boxes"][i] == len(boxes)
        np.testing.assert_array_equal(got["boxes"][i, : len(boxes)], boxes)
        assert tuple(got["sizes"][i]) == (width, height)
    # a second pass gives the same again (evaluation is deterministic)
    again = collect(loader)
    np.testing.assert_array_equal(again["indices"], got["indices"])
    np.testing.assert_array_equal(again["images"], got["images"])


@pytest.mark.parametrize("image_size", [48, 24, 80])
def test_backends_agree(tiny_shards, image_size):
    """Same samples -> same labels, indices, boxes and sizes; images close.

    Tolerance (grey levels): both backends decode with libjpeg-turbo (the same pixels on the CPU),
    then resize with different code. Up to a 2x shrink (sizes 48 and 80 from 64 px) both are plain
    bilinear, OpenCV in fixed point and DALI in float: at most 1-2 levels of rounding (measured:
    mean 0.13, max 1). Above 2x (size 24) OpenCV's INTER_AREA (a box filter) meets DALI's
    antialiasing triangle filter, which is wider and blurs edges more: measured mean 2.3, 99th
    percentile 10, against a float box filter 0.25 (torch) and 2.3 (DALI).
    """
    cfg = tiny_config(tiny_shards, image_size=image_size, eval_batch_size=8)
    runs = {b: collect(L.build_loader(cfg, "test", 0, 1, backend=b)) for b in BACKENDS}
    a, b = runs["torch"], runs["dali"]
    for key in ("indices", "labels", "num_boxes", "sizes"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-4)
    diff = np.abs(a["images"].astype(np.int16) - b["images"].astype(np.int16))
    if image_size * 2 >= 64:
        assert diff.mean() < 0.5 and diff.max() <= 2
    else:
        assert diff.mean() < 3.5 and np.percentile(diff, 99) <= 16


@pytest.mark.parametrize("backend", BACKENDS)
def test_flip_mirrors_image_and_boxes(tiny_shards, backend):
    cfg = tiny_config(tiny_shards, image_size=40, batch_size=4, eval_batch_size=8, random_flip=True)
    reference = collect(L.build_loader(cfg, "train", 0, 1, train=False, backend=backend))
    by_index = {int(i): k for k, i in enumerate(reference["indices"])}
    train = L.build_loader(cfg, "train", 0, 1, train=True, with_boxes=True, backend=backend)
    got = collect(train)
    assert got["steps"] == [10] and len(got["indices"]) == 40
    assert 0 < got["flipped"].sum() < 40  # both kinds occur
    for i, index in enumerate(got["indices"]):
        k = by_index[int(index)]
        width = reference["sizes"][k][0]
        n = reference["num_boxes"][k]
        if got["flipped"][i]:
            np.testing.assert_array_equal(got["images"][i], reference["images"][k][:, :, ::-1])
            np.testing.assert_allclose(got["boxes"][i, :n], flip_boxes(reference["boxes"][k, :n], width), atol=1e-3)
        else:
            np.testing.assert_array_equal(got["images"][i], reference["images"][k])
            np.testing.assert_allclose(got["boxes"][i, :n], reference["boxes"][k, :n], atol=1e-3)


def test_torch_training_order_is_seeded_per_epoch_and_ranks_run_equal_steps(tiny_shards):
    cfg = tiny_config(tiny_shards, image_size=32, batch_size=3, num_workers=2, random_flip=False)
    # 22 samples over 3 ranks: ranges of 7, 7 and 8; (22 // 3) // 3 = 2 steps each
    loaders = [L.build_loader(cfg, "test", r, 3, train=True, backend="torch") for r in range(3)]
    epoch0 = [collect(x, epochs=(0,)) for x in loaders]
    assert [g["steps"] for g in epoch0] == [[2], [2], [2]]
    seen = np.concatenate([g["indices"] for g in epoch0])
    assert len(seen) == len(set(seen.tolist())) == 18  # disjoint across ranks within an epoch
    again = collect(loaders[0], epochs=(0,))
    np.testing.assert_array_equal(again["indices"], epoch0[0]["indices"])  # same epoch, same order
    orders = {tuple(collect(loaders[0], epochs=(e,))["indices"].tolist()) for e in range(1, 5)}
    assert len(orders) > 1  # other epochs, other orders


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_resized_crop_trains_and_refuses_boxes(tiny_shards, backend):
    cfg = tiny_config(tiny_shards, image_size=32, batch_size=4, random_resized_crop=True)
    got = collect(L.build_loader(cfg, "train", 0, 1, backend=backend))
    assert got["images"].shape == (40, 3, 32, 32) and got["images"].dtype == np.uint8
    assert got["images"].std() > 10  # real pixels, not a blank crop
    with pytest.raises(ValueError, match="random-resized crop"):
        L.build_loader(cfg, "train", 0, 1, with_boxes=True, backend=backend)


def test_crop_box_sampler_respects_scale_and_ratio():
    rng = np.random.default_rng(0)
    from pipeline.torch_reader import random_resized_crop_box
    for _ in range(200):
        x, y, w, h = random_resized_crop_box(rng, 500, 375, (0.35, 1.0))
        assert 0 <= x and x + w <= 500 and 0 <= y and y + h <= 375
        assert 0.35 * 0.9 <= w * h / (500 * 375) <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1 or (w, h) == (500, 375)


def test_auto_choice_and_its_reasons(monkeypatch):
    monkeypatch.setattr(L, "_cuda_available", lambda: True)
    name, reason = L.choose_backend("auto")
    assert name == "dali" and "CUDA" in reason
    assert L.choose_backend("auto", on_corrupt="skip")[0] == "torch"
    monkeypatch.setattr(L, "_cuda_available", lambda: False)
    name, reason = L.choose_backend("auto")
    assert name == "torch" and "no CUDA" in reason
    assert L.choose_backend("dali") == ("dali", "data.backend=dali")
    with pytest.raises(ValueError, match="skip"):
        L.choose_backend("dali", on_corrupt="skip")
    # without DALI the registry holds only torch, and auto says why
    monkeypatch.setattr(L, "_REGISTRY", {"torch": L.backends()["torch"]})
    monkeypatch.setattr(L, "_DALI_IMPORT_ERROR", ImportError("no module named nvidia.dali"))
    name, reason = L.choose_backend("auto")
    assert name == "torch" and "does not import" in reason
    with pytest.raises(ValueError, match="does not import"):
        L.choose_backend("dali")


def test_auto_is_logged_once_by_rank_zero(tiny_shards, caplog, monkeypatch):
    monkeypatch.setattr(L, "_LOGGED", set())
    monkeypatch.setattr(L, "_cuda_available", lambda: False)
    cfg = tiny_config(tiny_shards, backend="auto")
    with caplog.at_level("INFO", logger="pipeline.loader"):
        for rank in (0, 1):
            for split in ("train", "test"):
                loader = L.build_loader(cfg, split, rank, 2)
                assert loader.backend == "torch"
    messages = [r.getMessage() for r in caplog.records if r.name == "pipeline.loader"]
    assert len(messages) == 1 and "torch" in messages[0] and "no CUDA" in messages[0]


def test_dali_placement_follows_cuda():
    from pipeline.dali import dali_placement
    gpu, cpu = dali_placement(3, cuda_available=True), dali_placement(3, cuda_available=False)
    assert (gpu.decoder, gpu.device_id, gpu.on_gpu) == ("mixed", 3, True)
    assert (cpu.decoder, cpu.device_id, cpu.on_gpu) == ("cpu", None, False)


@pytest.mark.parametrize("crop", [False, True])
def test_gpu_graph_is_the_cpu_graph_with_device_strings_switched(tiny_shards, crop):
    """The GPU pipeline cannot run here; its graph can still be traced (Python side, nothing built).

    Same operators in the same order; only the decoder ('mixed') and the image operators after it
    ('gpu') differ, while the reader, box and metadata operators stay on the CPU.
    """
    from pipeline.dali import wsol_pipeline
    info = M.read_split(tiny_shards, "test")

    def trace(decoder):
        pipe = wsol_pipeline(tars=[str(s.tar) for s in info.shards], indexes=[str(s.index) for s in info.shards],
                             shard_id=0, num_shards=1, train=True, image_size=32, random_flip=True,
                             random_resized_crop=crop, crop_scale=(0.35, 1.0), with_boxes=not crop, decoder=decoder,
                             shuffle_buffer=8, batch_size=4, num_threads=1, device_id=None)
        pipe._build_graph()  # DALI's Python-side graph construction; build() would need CUDA for 'mixed'
        return [(getattr(op._op, "schema_name", type(op._op).__name__), op._op.device) for op in pipe._ops]

    cpu, gpu = trace("cpu"), trace("mixed")
    assert [name for name, _ in cpu] == [name for name, _ in gpu]
    assert {dev for _, dev in cpu} == {"cpu"}
    moved = [(name, dev) for (name, dev), (_, was) in zip(gpu, cpu) if dev != was]
    assert any(name.startswith("decoders__") and dev == "mixed" for name, dev in moved)
    assert {dev for name, dev in moved if not name.startswith("decoders__")} == {"gpu"}
    moved_names = {name for name, _ in moved}
    assert {"Resize", "CropMirrorNormalize"} <= moved_names
    assert not moved_names & {"readers__Webdataset", "BbFlip", "Pad", "random__CoinFlip", "PeekImageShape"}


def test_build_rejects_a_split_too_small_for_one_training_batch(tiny_shards):
    cfg = tiny_config(tiny_shards, batch_size=16)
    with pytest.raises(ValueError, match="fewer than world size"):
        L.build_loader(cfg, "test", 0, 2, train=True, backend="torch")
    with pytest.raises(ValueError, match="outside world size"):
        L.build_loader(cfg, "test", 2, 2, backend="torch")
    with pytest.raises(FileNotFoundError, match="nosuchsplit"):
        L.build_loader(cfg, "nosuchsplit", 0, 1, backend="torch")


@pytest.fixture(scope="module")
def ilsvrc_shards(tmp_path_factory):
    """24 ILSVRC validation images with their real sizes and boxes (several per image for some),
    through the ILSVRC converter: non-square images, padded box batches."""
    from pipeline.shards import ShardOptions, convert, list_source
    from pipeline.sources.ilsvrc_fixture import make_fixture
    work = tmp_path_factory.mktemp("ilsvrc")
    raw = make_fixture(work / "raw", count=24, texture="flat")
    convert(list_source("ilsvrc", raw, "val"), work / "shards", ShardOptions(samples_per_shard=10, workers=0,
                                                                            progress=False))
    return work / "shards"


@pytest.mark.usefixtures("reference")  # skips where ../shared/data/ilsvrc2012_val_boxes is absent
def test_backends_agree_on_real_ilsvrc_geometry(ilsvrc_shards):
    cfg = tiny_config(ilsvrc_shards, image_size=96, eval_batch_size=5, eval_split="val")
    runs = {b: collect(L.build_loader(cfg, "val", 0, 1, train=False, backend=b)) for b in BACKENDS}
    a, b = runs["torch"], runs["dali"]
    assert sorted(a["indices"].tolist()) == list(range(24))
    assert a["num_boxes"].max() > 1  # some images carry several boxes, padded per batch
    for key in ("indices", "labels", "num_boxes", "sizes", "boxes"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert len({tuple(s) for s in a["sizes"]}) > 1  # several real sizes, none square-only
    diff = np.abs(a["images"].astype(np.int16) - b["images"].astype(np.int16))
    assert diff.mean() < 3.5  # > 2x shrinks here: box vs triangle antialiasing (see test_backends_agree)
