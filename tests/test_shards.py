"""The shard converter: contract, read-back (GNU tar, webdataset, DALI), bad input, resume, manifest."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import simplejpeg

from pipeline import schema
from pipeline.manifest import load_manifest, sha256_file
from pipeline.shard_worker import clip_boxes, normalize_image
from pipeline.shards import ShardingError, ShardOptions, convert, list_source
from pipeline.sources import cub, ilsvrc, ilsvrc_fixture
from pipeline.sources.base import SourceError
from pipeline.sources.synthetic import SyntheticSpec, write_cub_layout
from pipeline.tarshard import ShardTarWriter

ROOT = Path(__file__).resolve().parents[1]
MEMBERS = sorted(schema.MEMBERS)
VAL = [f"ILSVRC2012_val_{i:08d}" for i in range(1, 17)]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def opts(**kw) -> ShardOptions:
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    return ShardOptions(**kw)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    spec = SyntheticSpec(num_train=40, num_test=14, image_size=48, num_classes=5, seed=2)
    return write_cub_layout(spec, tmp_path_factory.mktemp("syn") / "cub", progress=False)


@pytest.fixture(scope="module")
def small_ilsvrc(tmp_path_factory, reference):
    return ilsvrc_fixture.make_fixture(tmp_path_factory.mktemp("ilsvrc") / "root", ids=VAL, train_classes=3,
                               train_per_class=3)


# ---------------------------------------------------------------------------------------------
# Readers used by the tests
# ---------------------------------------------------------------------------------------------

def read_webdataset(manifest) -> list[dict]:
    import webdataset as wds
    return list(wds.WebDataset([str(p) for p in manifest.tar_paths], shardshuffle=False, empty_check=False))


def read_dali(manifest, decode: bool = True) -> dict[str, list[np.ndarray]]:
    """Every sample through DALI's CPU webdataset reader with the .idx files, in shard order."""
    from nvidia.dali import fn, pipeline_def, types
    names = ["jpg", "lab", "gid", "wh", "box"]

    @pipeline_def(batch_size=manifest.total, num_threads=1, device_id=None)
    def pipe():
        jpg, lab, gid, wh, box = fn.readers.webdataset(
            paths=[str(p) for p in manifest.tar_paths], index_paths=[str(p) for p in manifest.index_paths],
            ext=names, dtypes=[types.UINT8, types.INT32, types.INT64, types.INT32, types.FLOAT],
            missing_component_behavior="error", random_shuffle=False, name="reader")
        image = fn.decoders.image(jpg, device="cpu", output_type=types.RGB) if decode else jpg
        return image, lab, gid, wh, box

    p = pipe()
    p.build()
    outs = p.run()
    return {name: [np.array(outs[i][k]) for k in range(manifest.total)]
            for i, name in enumerate(["image", "lab", "gid", "wh", "box"])}


def gnu_tar_list(path: Path) -> list[str]:
    return subprocess.run(["tar", "-tf", str(path)], check=True, capture_output=True, text=True).stdout.split()


def gnu_tar_member(path: Path, member: str) -> bytes:
    return subprocess.run(["tar", "-xOf", str(path), member], check=True, capture_output=True).stdout


# ---------------------------------------------------------------------------------------------
# Contract and read-back
# ---------------------------------------------------------------------------------------------

def test_synthetic_set_through_cub_path_reads_back_with_tar_webdataset_and_dali(synthetic, tmp_path):
    listing = cub.list_split(synthetic, "train")
    result = convert(listing, tmp_path / "shards", opts(samples_per_shard=16, workers=2, seed=7))
    m = load_manifest(tmp_path / "shards" / "train")
    assert m.total == 40 and [s["count"] for s in m.shards] == [16, 16, 8] and not m.skipped
    assert [p.name for p in m.tar_paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [p.name for p in m.index_paths] == ["train-000000.idx", "train-000001.idx", "train-000002.idx"]
    assert result.written == [p.name for p in m.tar_paths] and not result.kept
    assert [c["id"] for c in m.classes] == [c.id for c in listing.classes]
    assert m.data["counts"]["boxes"] == 40 and m.data["source"]["fingerprint"] == listing.fingerprint()
    for s, p in zip(m.shards, m.tar_paths):
        assert sha256_file(p) == s["sha256"] and p.stat().st_size == s["bytes"]

    # deterministic shuffle across shards: the seed's permutation of the source order
    by_key = {it.key: it for it in listing.items}
    expected_order = [listing.items[i].key for i in np.random.default_rng(7).permutation(40)]

    # 1. GNU tar: 7 members per sample, in sample order; the image is the source file, byte for byte
    names = [n for p in m.tar_paths for n in gnu_tar_list(p)]
    assert names == [f"{k}.{e}" for k in expected_order for e in MEMBERS]
    key = expected_order[3]
    assert gnu_tar_member(m.tar_paths[0], f"{key}.jpg") == by_key[key].path.read_bytes()

    # 2. webdataset: every field agrees with the source; gid is the global position
    samples = read_webdataset(m)
    assert [s["__key__"] for s in samples] == expected_order
    for position, s in enumerate(samples):
        item = by_key[s["__key__"]]
        meta = json.loads(s["json"])
        label, index, (w, h), boxes = schema.decode_binary(s)
        assert label == meta["label"] == int(s["cls"]) == item.label
        assert index == meta["index"] == position
        assert (w, h) == (meta["width"], meta["height"]) == (48, 48)
        np.testing.assert_array_equal(boxes, np.asarray(item.boxes, np.float32))
        assert meta["boxes"] == [list(b) for b in item.boxes]
        assert meta["synset"] == listing.classes[item.label].id and meta["file"] == item.relpath
        assert s["jpg"] == item.path.read_bytes()

    # 3. DALI with the .idx files: same labels, indices, sizes and boxes without Python decoding
    dali = read_dali(m)
    assert [int(g[0]) for g in dali["gid"]] == list(range(40))
    for s, lab, wh, box, image in zip(samples, dali["lab"], dali["wh"], dali["box"], dali["image"]):
        label, _, size, boxes = schema.decode_binary(s)
        assert int(lab[0]) == label and tuple(wh) == size and image.shape == (size[1], size[0], 3)
        np.testing.assert_array_equal(box.reshape(-1, 4), boxes)


def test_val_keeps_source_order_and_train_shuffle_depends_only_on_the_seed(synthetic, tmp_path):
    test = convert(cub.list_split(synthetic, "test"), tmp_path / "a", opts(samples_per_shard=5)).manifest
    keys = [s["__key__"] for s in read_webdataset(load_manifest(tmp_path / "a" / "test"))]
    assert keys == [it.key for it in cub.list_split(synthetic, "test").items] and test["total"] == 14

    listing = cub.list_split(synthetic, "train")
    shas = {}
    for name, seed, workers in (("s1", 1, 0), ("s1_again", 1, 2), ("s2", 2, 0)):
        m = convert(listing, tmp_path / name, opts(samples_per_shard=16, seed=seed, workers=workers)).manifest
        shas[name] = [s["sha256"] for s in m["shards"]]
    assert shas["s1"] == shas["s1_again"]  # byte-identical shards, whatever the number of workers
    assert shas["s1"] != shas["s2"]


def test_shard_size_limit(synthetic, tmp_path):
    limit_mb = 0.01
    m = convert(cub.list_split(synthetic, "train"), tmp_path, opts(shard_size_mb=limit_mb)).manifest
    assert m["num_shards"] > 2 and m["total"] == 40 == sum(s["count"] for s in m["shards"])
    for n, shard in enumerate(m["shards"]):
        with tarfile.open(tmp_path / "train" / shard["name"]) as t:
            images = [ti.size for ti in t.getmembers() if ti.name.endswith(".jpg")]
        assert sum(images) - images[-1] < limit_mb * 1e6  # a shard closes once its images reach the limit
        if n < m["num_shards"] - 1:
            assert sum(images) >= limit_mb * 1e6


def test_ilsvrc_train_samples_have_an_empty_box_member_that_dali_reads(small_ilsvrc, tmp_path):
    listing = list_source("ilsvrc", small_ilsvrc, "train")
    convert(listing, tmp_path, opts(samples_per_shard=4))
    m = load_manifest(tmp_path / "train")
    assert m.total == 9 and m.num_classes == 1000
    samples = read_webdataset(m)
    assert all(s["box"] == b"" and json.loads(s["json"])["boxes"] == [] for s in samples)
    dali = read_dali(m, decode=False)
    assert all(b.dtype == np.float32 and b.shape == (0,) for b in dali["box"])
    assert [int(l[0]) for l in dali["lab"]] == [int(s["cls"]) for s in samples]
    for s, wh in zip(samples, dali["wh"]):
        h, w, _, _ = simplejpeg.decode_jpeg_header(s["jpg"])
        assert tuple(wh) == (w, h)


def test_ilsvrc_val_from_xml_and_csv_gives_the_same_shards(small_ilsvrc, reference, tmp_path):
    shas = []
    for form in ("val_annotations", "LOC_val_solution.csv"):
        listing = list_source("ilsvrc", small_ilsvrc, "val", annotations=small_ilsvrc / form)
        m = convert(listing, tmp_path / form, opts(samples_per_shard=10)).manifest
        shas.append([s["sha256"] for s in m["shards"]])
    assert shas[0] == shas[1]
    samples = read_webdataset(load_manifest(tmp_path / "val_annotations" / "val"))
    assert [s["__key__"] for s in samples] == VAL
    for s in samples:
        label, index, size, boxes = schema.decode_binary(s)
        assert label == reference.labels[s["__key__"]] and size == reference.sizes[s["__key__"]]
        np.testing.assert_array_equal(boxes, reference.boxes[s["__key__"]])
        assert json.loads(s["json"])["synset"] == reference.synset_lines[label].split()[0]


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def photo_jpeg(width: int, height: int, seed: int = 0, progressive: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.uniform(0, 255, (8, 8, 3)).astype(np.float32), (width, height))
    img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
    params = [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)]
    return cv2.imencode(".jpg", img, params)[1].tobytes()


def cmyk_jpeg(width: int, height: int) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("CMYK", (width, height), (10, 200, 30, 40)).save(buf, "JPEG")
    return buf.getvalue()


def set_xml_boxes(xml: Path, boxes: list[list[float]] | None = None, size: tuple[int, int] | None = None) -> None:
    import xml.etree.ElementTree as ET
    tree = ET.parse(xml)
    root = tree.getroot()
    if size is not None:
        root.find("size/width").text, root.find("size/height").text = str(size[0]), str(size[1])
    if boxes is not None:
        objects = root.findall("object")
        for obj in objects[1:]:
            root.remove(obj)
        template = ET.tostring(objects[0])
        root.remove(objects[0])
        for b in boxes:
            obj = ET.fromstring(template)
            for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), b):
                obj.find(f"bndbox/{tag}").text = str(v)
            root.append(obj)
    tree.write(xml)


@pytest.fixture
def damaged_val(small_ilsvrc, reference, tmp_path):
    """The 16-image validation fixture with one kind of damage per image (documented in ``cases``)."""
    root = tmp_path / "damaged"
    shutil.copytree(small_ilsvrc, root)
    val, ann = root / "val", root / "val_annotations"
    size = {k: reference.sizes[k] for k in VAL}
    good = {k: photo_jpeg(*size[k], seed=i) for i, k in enumerate(VAL)}
    for k in VAL:
        (val / f"{k}.JPEG").write_bytes(good[k])
    k = VAL
    (val / f"{k[1]}.JPEG").write_bytes(good[k[1]][:len(good[k[1]]) // 2])
    mid = len(good[k[2]]) // 2
    (val / f"{k[2]}.JPEG").write_bytes(good[k[2]][:mid] + bytes(np.random.default_rng(0).integers(
        0, 256, 2000, dtype=np.uint8)) + good[k[2]][mid + 2000:])
    (val / f"{k[3]}.JPEG").write_bytes(cmyk_jpeg(*size[k[3]]))
    grey = cv2.cvtColor(simplejpeg.decode_jpeg(good[k[4]]), cv2.COLOR_RGB2GRAY)
    (val / f"{k[4]}.JPEG").write_bytes(cv2.imencode(".jpg", grey)[1].tobytes())
    png = cv2.imencode(".png", simplejpeg.decode_jpeg(good[k[5]], colorspace="BGR"))[1].tobytes()
    (val / f"{k[5]}.JPEG").write_bytes(png)
    (val / f"{k[6]}.JPEG").write_text("this is not an image\n")
    w7, h7 = size[k[7]]
    set_xml_boxes(ann / f"{k[7]}.xml", [[-10, 5, w7 + 50, h7 - 5], [3, -4, 20, 30]])
    w8 = size[k[8]][0]
    set_xml_boxes(ann / f"{k[8]}.xml", [[10, 10, 10, 50], [5, 5, 60, 40], [30, 40, 80, 40], [w8 + 5, 1, w8 + 9, 4]])
    set_xml_boxes(ann / f"{k[9]}.xml", size=(size[k[9]][0] + 1, size[k[9]][1]))
    (val / f"{k[10]}.JPEG").unlink()
    (val / f"{k[11]}.JPEG").write_bytes(b"")
    (val / f"{k[12]}.JPEG").write_bytes(photo_jpeg(*size[k[12]], seed=12, progressive=True))
    return root


@pytest.mark.parametrize("verify", ["structure", "markers", "decode"])
def test_bad_inputs_are_skipped_reencoded_clipped_dropped_and_counted(damaged_val, reference, tmp_path, verify):
    listing = list_source("ilsvrc", damaged_val, "val", annotations=damaged_val / "val_annotations")
    m = convert(listing, tmp_path, opts(samples_per_shard=5, workers=2, verify=verify)).manifest
    k = VAL
    skipped = {s["key"]: s["reason"] for s in m["skipped"]}
    # k[2] has 2000 random bytes written over its scan data, its end marker intact: the default check
    # (headers and end marker) cannot see that; walking the scan's markers can, before any decoding
    overwritten = {k[2]} if verify != "structure" else set()
    assert set(skipped) == {k[1], k[6], k[9], k[10], k[11]} | overwritten
    assert skipped[k[1]].startswith("corrupt or truncated JPEG (no end-of-image marker: the file ends inside")
    if overwritten:
        assert skipped[k[2]].startswith("corrupt or truncated JPEG (corrupt data in scan 1: marker 0xff")
    assert skipped[k[6]].startswith("not an image")
    assert skipped[k[9]] == (f"the annotation says {reference.sizes[k[9]][0] + 1}x{reference.sizes[k[9]][1]} "
                             f"but the image is {reference.sizes[k[9]][0]}x{reference.sizes[k[9]][1]}")
    assert skipped[k[10]] == "file not found" and skipped[k[11]] == "empty file"
    assert all(s["file"] == f"val/{s['key']}.JPEG" for s in m["skipped"])

    c = m["counts"]
    assert c["inputs"] == 16 == m["total"] + c["skipped"] and m["total"] == 11 - len(overwritten)
    assert c["reencoded"] == {"cmyk": 1, "grey": 1, "png": 1} and c["reencoded_total"] == 3
    assert c["boxes_clipped"] == 2 and c["boxes_dropped"] == 3

    samples = {s["__key__"]: s for s in read_webdataset(load_manifest(tmp_path / "val"))}
    assert set(samples) | set(skipped) == set(VAL)  # every input in a shard or in `skipped`
    for key in (k[3], k[4], k[5]):  # re-encoded: RGB baseline JPEG of the same size
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(samples[key]["jpg"])
        assert colorspace == "YCbCr" and (w, h) == reference.sizes[key]
        assert json.loads(samples[key]["json"])["reencoded"] in ("cmyk", "grey", "png")
    cmyk = simplejpeg.decode_jpeg(samples[k[3]]["jpg"])
    assert abs(cmyk.reshape(-1, 3).mean(0) - [(255 - 10) * (255 - 40) / 255, (255 - 200) * (255 - 40) / 255,
                                              (255 - 30) * (255 - 40) / 255]).max() < 8
    png_source = cv2.imdecode(np.frombuffer((damaged_val / "val" / f"{k[5]}.JPEG").read_bytes(), np.uint8), 1)
    assert np.abs(simplejpeg.decode_jpeg(samples[k[5]]["jpg"], colorspace="BGR").astype(int)
                  - png_source).mean() < 3
    # progressive JPEG is a valid JPEG: stored byte for byte
    assert samples[k[12]]["jpg"] == (damaged_val / "val" / f"{k[12]}.JPEG").read_bytes()
    if not overwritten:  # what --verify structure lets through is stored as it is, never decoded
        assert samples[k[2]]["jpg"] == (damaged_val / "val" / f"{k[2]}.JPEG").read_bytes()
    w7, h7 = reference.sizes[k[7]]
    np.testing.assert_array_equal(schema.decode_binary(samples[k[7]])[3], [[0, 5, w7, h7 - 5], [3, 0, 20, 30]])
    np.testing.assert_array_equal(schema.decode_binary(samples[k[8]])[3], [[5, 5, 60, 40]])
    # indices stay contiguous over the gaps, in source order
    assert [schema.decode_binary(samples[key])[1] for key in VAL if key in samples] == list(range(m["total"]))


@pytest.mark.parametrize("workers", [0, 2])
def test_strict_fails_on_the_first_bad_input_naming_it(damaged_val, tmp_path, workers):
    listing = list_source("ilsvrc", damaged_val, "val", annotations=damaged_val / "val_annotations")
    with pytest.raises(ShardingError, match=rf"{VAL[1]}\.JPEG: corrupt or truncated JPEG .*--strict"):
        convert(listing, tmp_path, opts(strict=True, samples_per_shard=1, workers=workers))
    assert not list((tmp_path / "val").glob("*.tmp"))  # shards started ahead were removed


def entropy_damaged(jpeg: bytes, seed: int = 0, length: int = 600) -> bytes:
    """``jpeg`` with ``length`` bytes of its scan data replaced by random bytes that are never 0xFF: every
    marker stays where it was, only the Huffman-coded data is wrong."""
    mid = len(jpeg) // 2
    while jpeg[mid - 1] == 0xFF:  # do not split a stuffed 0xFF 0x00 pair
        mid += 1
    junk = bytes(np.random.default_rng(seed).integers(0, 255, length, dtype=np.uint8))
    return jpeg[:mid] + junk + jpeg[mid + length:]


def test_image_checks_directly():
    good = photo_jpeg(64, 48)
    for verify in ("structure", "decode"):
        assert normalize_image(good, verify=verify) == (good, 64, 48, None)
        for data, reason in ((good[:-200], r"corrupt or truncated JPEG \(no end-of-image marker"),
                             (b"\xff\xd8\xff" + b"\0" * 50, r"unreadable JPEG header \(unexpected marker 0xff00"),
                             (b"GIF89a" + b"\0" * 20, "gif data that OpenCV cannot decode")):
            with pytest.raises(ValueError, match=reason):
                normalize_image(data, verify=verify)
    # bytes after the end-of-image marker (zero padding, or anything) are accepted and stored as they are
    for verify in ("structure", "markers"):
        assert normalize_image(good + bytes(300), verify=verify) == (good + bytes(300), 64, 48, None)
        assert normalize_image(good + b"trailer", verify=verify) == (good + b"trailer", 64, 48, None)
    # random bytes over the scan data: only the marker walk (or a decode) sees them
    photo = photo_jpeg(400, 300, seed=4)
    overwritten = photo[:len(photo) // 2] + np.random.default_rng(1).bytes(2000) + photo[len(photo) // 2 + 2000:]
    assert normalize_image(overwritten, verify="structure")[1:] == (400, 300, None)
    with pytest.raises(ValueError, match=r"corrupt or truncated JPEG \("):
        normalize_image(overwritten, verify="markers")
    with pytest.raises(ValueError, match="verify must be one of"):
        normalize_image(good, verify="quick")


def test_damaged_scan_data_with_intact_markers_needs_the_decode_check(tmp_path):
    """What ``structure`` cannot see and ``decode`` can: Huffman data overwritten without touching a marker."""
    spec = SyntheticSpec(num_train=6, num_test=4, image_size=160, num_classes=2, seed=5)
    root = write_cub_layout(spec, tmp_path / "cub", progress=False)
    listing = cub.list_split(root, "test")
    victim = listing.items[1]
    victim.path.write_bytes(entropy_damaged(photo_jpeg(160, 160, seed=3)))
    for verify in ("structure", "markers"):  # every marker is where it belongs
        kept = convert(listing, tmp_path / verify, opts(samples_per_shard=3, verify=verify)).manifest
        assert kept["total"] == 4 and not kept["skipped"]
    decode = convert(listing, tmp_path / "d", opts(samples_per_shard=3, verify="decode")).manifest
    assert decode["total"] == 3 and [s["key"] for s in decode["skipped"]] == [victim.key]
    assert decode["skipped"][0]["reason"].startswith("corrupt or truncated JPEG (libjpeg: Corrupt JPEG data")
    assert decode["converter"]["content_options"]["verify"] == "decode"
    kept, clipped, dropped = clip_boxes([[-1, -1, 10, 10], [0, 0, 5, 5], [7, 7, 7, 9], [np.nan, 0, 1, 1]], 8, 8)
    np.testing.assert_array_equal(kept, [[0, 0, 8, 8], [0, 0, 5, 5]])
    assert (clipped, dropped) == (1, 2) and kept.dtype == np.float32


# ---------------------------------------------------------------------------------------------
# Parallel writing
# ---------------------------------------------------------------------------------------------

def test_shards_started_on_wrong_guesses_are_redone_and_match_a_sequential_run(tmp_path):
    root = write_cub_layout(SyntheticSpec(num_train=4, num_test=40, image_size=32, num_classes=2, seed=4),
                            tmp_path / "cub", progress=False)
    items = cub.list_split(root, "test").items  # source order
    for it in items[3:24]:  # 21 bad inputs in a row: more than the slack a guessed range carries (16)
        it.path.write_bytes(it.path.read_bytes()[:-10])
    items[30].path.write_bytes(b"not an image")
    listing = cub.list_split(root, "test")
    sequential = convert(listing, tmp_path / "seq", opts(samples_per_shard=2, workers=0))
    parallel = convert(listing, tmp_path / "par", opts(samples_per_shard=2, workers=2))
    assert parallel.redone > 0  # shards started after the bad run began at the wrong input
    m = parallel.manifest
    assert m["shards"] == sequential.manifest["shards"] and m["skipped"] == sequential.manifest["skipped"]
    assert m["total"] == 18 and len(m["skipped"]) == 22
    # a full shard keeps the bad inputs that follow it; the next good input opens the next shard
    assert [s["inputs"] for s in m["shards"][:3]] == [[0, 2], [2, 25], [25, 27]]
    assert [s["count"] for s in m["shards"][:3]] == [2, 2, 2] and len(m["shards"][1]["skipped"]) == 21
    samples = read_webdataset(load_manifest(tmp_path / "par" / "test"))
    assert [schema.decode_binary(x)[1] for x in samples] == list(range(18))


def test_workers_are_forked_only_from_a_single_threaded_process():
    code = ("import threading; from pipeline.shard_pool import _single_threaded as single; before = single(); "
            "threading.Thread(target=threading.Event().wait, args=(5,), daemon=True).start(); print(before, single())")
    done = subprocess.run([sys.executable, "-c", code], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["True", "False"], done.stderr


# ---------------------------------------------------------------------------------------------
# Errors through the command line
# ---------------------------------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / "make_shards.py"), *args], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=300)


def test_cli_writes_the_layout_of_the_issue(synthetic, tmp_path):
    done = run_cli("--dataset", "cub", "--root", str(synthetic), "--split", "test", "--out", str(tmp_path),
                   "--samples-per-shard", "10", "--workers", "2", "--seed", "3", "--verify", "decode")
    assert done.returncode == 0, done.stderr
    assert "cub/test: 14 samples in 2 shards" in done.stdout
    assert "img/s" in done.stderr and "MB/s" in done.stderr  # the progress bar
    assert sorted(p.name for p in (tmp_path / "test").iterdir()) == [
        "manifest.json", "test-000000.idx", "test-000000.tar", "test-000001.idx", "test-000001.tar"]
    opts_recorded = load_manifest(tmp_path / "test").data["converter"]["options"]
    assert opts_recorded["samples_per_shard"] == 10 and opts_recorded["seed"] == 3 and opts_recorded["workers"] == 2
    assert opts_recorded["verify"] == "decode"
    done = run_cli("--dataset", "cub", "--root", str(synthetic), "--split", "test", "--out", str(tmp_path),
                   "--verify", "quick")
    assert done.returncode == 2 and "invalid choice: 'quick'" in done.stderr


@pytest.mark.parametrize("damage, message", [
    ("no_annotation", r"ILSVRC2012_val_00049000\.JPEG: validation image without annotation"),
    ("unknown_class", r"ILSVRC2012_val_00000004\.xml: class 'n00000000' of ILSVRC2012_val_00000004 is not in the "
                      r"synset list"),
    ("duplicate_key", r"duplicate key 'ILSVRC2012_val_00000001': .*val/ILSVRC2012_val_00000001\.JPEG and "
                      r".*val/ILSVRC2012_val_00000001\.jpeg"),
    ("strict", r"ILSVRC2012_val_00000002\.JPEG: corrupt or truncated JPEG"),
])
def test_cli_errors_name_the_input(small_ilsvrc, tmp_path, damage, message):
    root = tmp_path / "root"
    shutil.copytree(small_ilsvrc, root)
    val = root / "val"
    extra = []
    if damage == "no_annotation":
        shutil.copy(val / f"{VAL[0]}.JPEG", val / "ILSVRC2012_val_00049000.JPEG")
    elif damage == "unknown_class":
        xml = root / "val_annotations" / f"{VAL[3]}.xml"
        text = xml.read_text()
        wnid = text.split("<name>")[1].split("</name>")[0]
        xml.write_text(text.replace(wnid, "n00000000"))
    elif damage == "duplicate_key":
        shutil.copy(val / f"{VAL[0]}.JPEG", val / f"{VAL[0]}.jpeg")
    else:
        data = (val / f"{VAL[1]}.JPEG").read_bytes()
        (val / f"{VAL[1]}.JPEG").write_bytes(data[:len(data) - 100])
        extra = ["--strict"]
    done = run_cli("--dataset", "ilsvrc", "--root", str(root), "--split", "val", "--out", str(tmp_path / "out"),
                   "--annotations", str(root / "val_annotations"), "--workers", "0", *extra)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("make_shards.py: error:")
    assert __import__("re").search(message, done.stderr), done.stderr


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------

def test_rerun_after_an_interruption_keeps_finished_shards_and_matches_a_clean_run(synthetic, tmp_path,
                                                                                  monkeypatch):
    listing = cub.list_split(synthetic, "train")
    clean = convert(listing, tmp_path / "clean", opts(samples_per_shard=8)).manifest

    real_index, calls = ShardTarWriter.write_index, []

    def crash_on_third(writer):  # the tar is complete, its index is not: as if the power went off
        calls.append(writer.tar_path)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        real_index(writer)

    monkeypatch.setattr(ShardTarWriter, "write_index", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert(listing, tmp_path / "run", opts(samples_per_shard=8))
    monkeypatch.setattr(ShardTarWriter, "write_index", real_index)
    split_dir = tmp_path / "run" / "train"
    assert (split_dir / "train-000002.tar.tmp").exists() and not (split_dir / "train-000002.tar").exists()
    with pytest.raises(ShardingError, match=r"manifest\.json: the conversion did not finish"):
        load_manifest(split_dir)

    result = convert(listing, tmp_path / "run", opts(samples_per_shard=8))
    assert result.kept == ["train-000000.tar", "train-000001.tar"]
    assert result.written == ["train-000002.tar", "train-000003.tar", "train-000004.tar"]
    assert [s["sha256"] for s in result.manifest["shards"]] == [s["sha256"] for s in clean["shards"]]
    assert not list(split_dir.glob("*.tmp"))
    load_manifest(split_dir, verify_checksums=True)


def test_rerun_redoes_only_a_damaged_shard_and_rebuilds_a_lost_index(synthetic, tmp_path):
    listing = cub.list_split(synthetic, "train")
    first = convert(listing, tmp_path, opts(samples_per_shard=8)).manifest
    d = tmp_path / "train"
    data = bytearray((d / "train-000001.tar").read_bytes())
    data[5000] ^= 0xFF
    (d / "train-000001.tar").write_bytes(bytes(data))
    with pytest.raises(ShardingError, match=r"train-000001\.tar: sha256 differs"):
        load_manifest(d, verify_checksums=True)
    (d / "train-000003.idx").unlink()
    mtime = (d / "train-000000.tar").stat().st_mtime_ns

    result = convert(listing, tmp_path, opts(samples_per_shard=8))
    assert result.written == ["train-000001.tar"] and result.reindexed == ["train-000003.tar"]
    assert result.kept == ["train-000000.tar", "train-000002.tar", "train-000003.tar", "train-000004.tar"]
    assert (d / "train-000000.tar").stat().st_mtime_ns == mtime
    assert result.manifest["shards"] == first["shards"]
    load_manifest(d, verify_checksums=True)


def test_other_options_rewrite_everything_and_remove_stale_shards(synthetic, tmp_path):
    listing = cub.list_split(synthetic, "train")
    convert(listing, tmp_path, opts(samples_per_shard=8))
    assert not convert(listing, tmp_path, opts(samples_per_shard=8, verify="decode")).kept  # another check
    result = convert(listing, tmp_path, opts(samples_per_shard=20))
    assert not result.kept and len(result.written) == 2
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
        "manifest.json", "train-000000.idx", "train-000000.tar", "train-000001.idx", "train-000001.tar"]


# ---------------------------------------------------------------------------------------------
# Reader-side manifest checks
# ---------------------------------------------------------------------------------------------

def test_load_manifest_names_what_is_missing(synthetic, tmp_path):
    with pytest.raises(ShardingError, match=rf"{tmp_path}/test/manifest\.json: manifest not found"):
        load_manifest(tmp_path / "test")
    convert(cub.list_split(synthetic, "test"), tmp_path, opts(samples_per_shard=5))
    m = load_manifest(tmp_path / "test" / "manifest.json")
    assert m.total == 14 and m.split == "test" and len(m.tar_paths) == 3
    (tmp_path / "test" / "test-000001.idx").unlink()
    with pytest.raises(ShardingError, match=r"test/test-000001\.idx: listed in .*manifest\.json but missing"):
        load_manifest(tmp_path / "test")
    (tmp_path / "test" / "test-000002.tar").unlink()
    with pytest.raises(ShardingError, match=r"test/test-000001\.idx: listed"):
        load_manifest(tmp_path / "test")
    shutil.copy(tmp_path / "test" / "test-000000.idx", tmp_path / "test" / "test-000001.idx")
    with pytest.raises(ShardingError, match=r"test/test-000002\.tar: listed in .*manifest\.json but missing"):
        load_manifest(tmp_path / "test")
    (tmp_path / "test" / "manifest.json").write_text("{not json")
    with pytest.raises(ShardingError, match=r"manifest\.json: unreadable manifest"):
        load_manifest(tmp_path / "test")


def test_sources_reject_wrong_dataset_options(synthetic):
    with pytest.raises(SourceError, match="apply to ILSVRC only"):
        list_source("cub", synthetic, "train", annotations="x.csv")
    with pytest.raises(SourceError, match="unknown dataset 'coco'"):
        list_source("coco", synthetic, "train")


# ---------------------------------------------------------------------------------------------
# All 50,000 validation images of ILSVRC-2012 (real sizes, labels and boxes; flat pixels)
# ---------------------------------------------------------------------------------------------

def idx_keys(idx_path: Path) -> list[str]:
    """Sample keys in shard order, from a DALI index (``v1.2 N`` then per sample: ext offset size name ...)."""
    lines = idx_path.read_text().splitlines()
    assert lines[0].split()[0] == "v1.2" and int(lines[0].split()[1]) == len(lines) - 1
    return [line.split()[3].split(".", 1)[0] for line in lines[1:]]


@pytest.mark.slow
def test_full_ilsvrc_val_counts_labels_and_every_box_exactly(reference, tmp_path):
    from nvidia.dali import fn, pipeline_def, types
    root = ilsvrc_fixture.make_fixture(tmp_path / "ilsvrc", xml=False)
    listing = list_source("ilsvrc", root, "val", annotations=root / "LOC_val_solution.csv")
    result = convert(listing, tmp_path / "shards", opts(samples_per_shard=12_500, workers=2))
    m = result.manifest
    assert result.redone == 0  # nothing bad in the source: every shard started on a guess started right
    assert m["total"] == 50_000 and m["num_shards"] == 4 and not m["skipped"]
    assert m["counts"]["boxes"] == 80_477 and m["counts"]["boxes_clipped"] == m["counts"]["boxes_dropped"] == 0
    manifest = load_manifest(tmp_path / "shards" / "val")
    keys = [k for p in manifest.index_paths for k in idx_keys(p)]
    assert keys == reference.keys  # source order

    batch = 5000

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None)
    def pipe():
        lab, gid, wh, box = fn.readers.webdataset(
            paths=[str(p) for p in manifest.tar_paths], index_paths=[str(p) for p in manifest.index_paths],
            ext=["lab", "gid", "wh", "box"], dtypes=[types.INT32, types.INT64, types.INT32, types.FLOAT],
            random_shuffle=False)
        return lab, gid, wh, box

    p = pipe()
    p.build()
    seen, boxes_seen = 0, 0
    for _ in range(50_000 // batch):
        lab, gid, wh, box = p.run()
        for i in range(batch):
            key = keys[seen]
            assert int(np.array(gid[i])[0]) == seen
            assert int(np.array(lab[i])[0]) == reference.labels[key]
            assert tuple(np.array(wh[i])) == reference.sizes[key]
            boxes = np.array(box[i]).reshape(-1, 4)
            np.testing.assert_array_equal(boxes, reference.boxes[key])
            seen, boxes_seen = seen + 1, boxes_seen + len(boxes)
    assert seen == 50_000 and boxes_seen == 80_477
