"""Dataset sources: ILSVRC-2012 (real layout, real validation geometry) and CUB-200-2011 (synthetic set)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import simplejpeg

from pipeline.sources import cub, ilsvrc, ilsvrc_fixture
from pipeline.sources.base import SourceError
from pipeline.sources.synthetic import SyntheticSpec, write_cub_layout

needs_val_geometry = pytest.mark.skipif(not ilsvrc_fixture.DEFAULT_VAL_BOXES_DIR.is_dir(),
                                        reason=f"{ilsvrc_fixture.DEFAULT_VAL_BOXES_DIR} not present")
FIRST = [f"ILSVRC2012_val_{i:08d}" for i in range(1, 25)]


@pytest.fixture(scope="module")
def small_ilsvrc(tmp_path_factory, reference):
    """24 validation images (XML + CSV) and 3 classes x 4 training images, real layout."""
    return ilsvrc_fixture.make_fixture(tmp_path_factory.mktemp("ilsvrc") / "root", ids=FIRST, train_classes=3,
                               train_per_class=4)


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# ILSVRC
# ---------------------------------------------------------------------------------------------

def test_reference_geometry_is_the_documented_one(reference):
    assert len(reference.keys) == 50_000 and len(reference.synset_lines) == 1000
    assert sum(len(b) for b in reference.boxes.values()) == 80_477
    k = "ILSVRC2012_val_00000001"
    assert reference.labels[k] == 65 and reference.sizes[k] == (500, 375)
    np.testing.assert_array_equal(reference.boxes[k], [[111, 108, 441, 193]])


def test_fixture_has_real_layout_and_sizes(small_ilsvrc, reference):
    for key in FIRST[:6]:
        data = (small_ilsvrc / "val" / f"{key}.JPEG").read_bytes()
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        assert (w, h) == reference.sizes[key] and colorspace == "YCbCr"
        assert (small_ilsvrc / "val_annotations" / f"{key}.xml").is_file()
    assert sorted(p.name for p in (small_ilsvrc / "train").iterdir()) == ["n01440764", "n01443537", "n01484850"]
    assert (small_ilsvrc / "train" / "n01443537" / "n01443537_4.JPEG").is_file()
    assert (small_ilsvrc / "LOC_val_solution.csv").read_text().startswith("ImageId,PredictionString\n")


@pytest.mark.parametrize("form", ["val_annotations", "LOC_val_solution.csv"])
def test_val_listing_matches_the_real_annotations(small_ilsvrc, reference, form):
    listing = ilsvrc.list_split(small_ilsvrc, "val", annotations=small_ilsvrc / form)
    assert [it.key for it in listing.items] == FIRST  # source order = id order
    assert len(listing.classes) == 1000 and listing.classes[65].id == "n01751748"
    assert listing.classes[65].name.startswith("sea snake")
    for it in listing.items:
        assert it.label == reference.labels[it.key]
        np.testing.assert_array_equal(np.asarray(it.boxes), reference.boxes[it.key])
        assert it.size == (reference.sizes[it.key] if form == "val_annotations" else None)
        assert it.relpath == f"val/{it.key}.JPEG" and it.file_size == it.path.stat().st_size
    assert not listing.rejected


def test_train_listing_labels_from_sorted_synsets_and_no_boxes(small_ilsvrc):
    listing = ilsvrc.list_split(small_ilsvrc, "train")  # LOC_synset_mapping.txt found in root
    assert len(listing.items) == 12 and len(listing.classes) == 1000
    assert {it.label for it in listing.items} == {0, 1, 2}
    for it in listing.items:
        assert it.key.startswith(listing.classes[it.label].id + "_") and it.boxes == ()


def test_train_without_synset_file_uses_sorted_directories(small_ilsvrc, tmp_path):
    root = copy_tree(small_ilsvrc, tmp_path / "r")
    (root / "LOC_synset_mapping.txt").unlink()
    listing = ilsvrc.list_split(root, "train")
    assert [c.id for c in listing.classes] == ["n01440764", "n01443537", "n01484850"]


def test_hidden_and_stray_files_are_listed_as_rejected(small_ilsvrc, tmp_path):
    root = copy_tree(small_ilsvrc, tmp_path / "r")
    (root / "train" / "n01440764" / ".DS_Store").write_bytes(b"x")
    (root / "train" / "README").write_text("stray")
    listing = ilsvrc.list_split(root, "train")
    assert {(r.relpath, r.reason) for r in listing.rejected} == {
        ("train/n01440764/.DS_Store", "hidden file"), ("train/README", "not a class directory")}


def test_val_image_without_annotation_is_an_error_naming_it(small_ilsvrc, tmp_path):
    root = copy_tree(small_ilsvrc, tmp_path / "r")
    extra = root / "val" / "ILSVRC2012_val_00049999.JPEG"
    shutil.copy(root / "val" / f"{FIRST[0]}.JPEG", extra)
    for form in ("val_annotations", "LOC_val_solution.csv"):
        with pytest.raises(SourceError, match=r"ILSVRC2012_val_00049999\.JPEG: validation image without annotation"):
            ilsvrc.list_split(root, "val", annotations=root / form)


def test_unknown_class_is_an_error_naming_it(small_ilsvrc, tmp_path):
    root = copy_tree(small_ilsvrc, tmp_path / "r")
    xml = root / "val_annotations" / f"{FIRST[3]}.xml"
    xml.write_text(xml.read_text().replace(">n", ">n99999999_was_n"))
    with pytest.raises(SourceError, match=rf"{FIRST[3]}\.xml: class 'n99999999_was_n\d+' of {FIRST[3]} "
                                          r"is not in the synset list"):
        ilsvrc.list_split(root, "val", annotations=root / "val_annotations")
    csv = root / "LOC_val_solution.csv"
    lines = csv.read_text().splitlines()
    lines[2] = lines[2].split(",")[0] + ",n00000000 1 1 5 5"
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(SourceError, match=r"LOC_val_solution\.csv:3: class 'n00000000'"):
        ilsvrc.list_split(root, "val", annotations=csv)
    (root / "train" / "n99999999").mkdir()
    with pytest.raises(SourceError, match=r"train/n99999999: class 'n99999999' is not in the synset list"):
        ilsvrc.list_split(root, "train")


def test_duplicate_keys_are_errors_naming_both(small_ilsvrc, tmp_path):
    root = copy_tree(small_ilsvrc, tmp_path / "r")
    csv = root / "LOC_val_solution.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines + [lines[1]]) + "\n")
    with pytest.raises(SourceError, match=rf"LOC_val_solution\.csv:{len(lines) + 1}: duplicate key '{FIRST[0]}'"):
        ilsvrc.list_split(root, "val", annotations=csv)
    # the same image name twice in the tree (here: a class folder inside val/)
    (root / "val" / "n01751748").mkdir()
    shutil.copy(root / "val" / f"{FIRST[0]}.JPEG", root / "val" / "n01751748" / f"{FIRST[0]}.JPEG")
    with pytest.raises(SourceError, match=rf"duplicate key '{FIRST[0]}': .*val/{FIRST[0]}\.JPEG and "
                                          rf".*val/n01751748/{FIRST[0]}\.JPEG"):
        ilsvrc.list_split(root, "val", annotations=root / "val_annotations")
    # train: one stem in two class folders
    shutil.copy(root / "train" / "n01440764" / "n01440764_1.JPEG", root / "train" / "n01443537")
    with pytest.raises(SourceError, match="duplicate key 'n01440764_1'"):
        ilsvrc.list_split(root, "train")


def test_malformed_metadata_names_file_and_line(small_ilsvrc, tmp_path):
    root = copy_tree(small_ilsvrc, tmp_path / "r")
    csv = root / "LOC_val_solution.csv"
    lines = csv.read_text().splitlines()
    lines[4] += " n01751748 3"
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(SourceError, match=r"LOC_val_solution\.csv:5: PredictionString must repeat"):
        ilsvrc.list_split(root, "val", annotations=csv)
    xml = root / "val_annotations" / f"{FIRST[1]}.xml"
    xml.write_text(xml.read_text().replace("</annotation>", ""))
    with pytest.raises(SourceError, match=rf"{FIRST[1]}\.xml: malformed XML"):
        ilsvrc.list_split(root, "val", annotations=root / "val_annotations")
    mapping = root / "LOC_synset_mapping.txt"
    syn = mapping.read_text().splitlines()
    syn[10], syn[11] = syn[11], syn[10]
    mapping.write_text("\n".join(syn) + "\n")
    with pytest.raises(SourceError, match=r"LOC_synset_mapping\.txt:12: synset list is not sorted"):
        ilsvrc.list_split(root, "train")


def test_synset_formats(tmp_path):
    f = tmp_path / "s.txt"
    f.write_text("n01 : tench, Tinca tinca\nn02 goldfish\n\nn03\n")
    assert [(c.index, c.id, c.name) for c in ilsvrc.read_synsets(f)] == [
        (0, "n01", "tench, Tinca tinca"), (1, "n02", "goldfish"), (2, "n03", "n03")]
    f.write_text("n01\nn02\nn01\n")
    with pytest.raises(SourceError, match=r"s\.txt:3: duplicate synset 'n01'"):
        ilsvrc.read_synsets(f)


def test_unsupported_splits_and_missing_inputs_are_clear(small_ilsvrc, tmp_path):
    with pytest.raises(SourceError, match="split 'test' is not supported"):
        ilsvrc.list_split(small_ilsvrc, "test")
    root = copy_tree(small_ilsvrc, tmp_path / "r")
    (root / "LOC_synset_mapping.txt").unlink()
    with pytest.raises(SourceError, match="pass --synsets PATH"):
        ilsvrc.list_split(root, "val")
    with pytest.raises(SourceError, match="annotations not found"):
        ilsvrc.list_split(small_ilsvrc, "val", annotations=tmp_path / "nothing.csv")


def test_annotated_image_missing_on_disk_stays_listed(small_ilsvrc, tmp_path):
    root = copy_tree(small_ilsvrc, tmp_path / "r")
    (root / "val" / f"{FIRST[5]}.JPEG").unlink()
    listing = ilsvrc.list_split(root, "val", annotations=root / "LOC_val_solution.csv")
    missing = [it for it in listing.items if it.file_size is None]
    assert [it.key for it in missing] == [FIRST[5]] and [it.key for it in listing.items] == FIRST


# ---------------------------------------------------------------------------------------------
# CUB layout, written by the synthetic generator
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    spec = SyntheticSpec(num_train=18, num_test=9, image_size=48, num_classes=4, seed=5)
    return write_cub_layout(spec, tmp_path_factory.mktemp("syn") / "cub", progress=False)


def test_cub_listing_of_the_synthetic_set(synthetic):
    train, test = cub.list_split(synthetic, "train"), cub.list_split(synthetic, "test")
    assert len(train.items) == 18 and len(test.items) == 9
    assert [c.id for c in train.classes][:2] == ["001.disc_0", "002.square_0"]
    assert train.classes[0].name == "disc 0"
    lines = {int(l.split()[0]): l.split() for l in (synthetic / "bounding_boxes.txt").read_text().splitlines()}
    for n, it in enumerate(train.items + test.items):
        assert it.key == f"synth_{n:06d}" and it.label == n % 4
        x, y, w, h = (float(v) for v in lines[n + 1][1:])
        assert it.boxes == ((x, y, x + w, y + h),)
        assert it.path.is_file() and it.size is None


def test_cub_errors_name_the_file(synthetic, tmp_path):
    with pytest.raises(SourceError, match="split 'val' is not valid"):
        cub.list_split(synthetic, "val")
    root = copy_tree(synthetic, tmp_path / "c")
    labels = root / "image_class_labels.txt"
    original = labels.read_text()
    labels.write_text(original.replace("3 3\n", "3 9\n"))
    with pytest.raises(SourceError, match=r"image_class_labels\.txt:3: class 9 of image id 3 is not in"):
        cub.list_split(root, "train")
    labels.write_text(original + "2 1\n")
    with pytest.raises(SourceError, match=r"image_class_labels\.txt:28: duplicate id 2"):
        cub.list_split(root, "train")
    labels.write_text(original)
    boxes = root / "bounding_boxes.txt"
    boxes.write_text("".join(l + "\n" for l in boxes.read_text().splitlines() if not l.startswith("4 ")))
    with pytest.raises(SourceError, match=r"bounding_boxes\.txt: no box for image id 4"):
        cub.list_split(root, "train")
    (root / "classes.txt").unlink()
    with pytest.raises(SourceError, match=r"classes\.txt: missing"):
        cub.list_split(root, "train")


def test_cub_duplicate_key_and_dotted_names(synthetic, tmp_path):
    root = copy_tree(synthetic, tmp_path / "c")
    images = root / "images.txt"
    lines = images.read_text().splitlines()
    lines[1] = lines[1].split()[0] + " 001.disc_0/synth_000000.jpg"
    images.write_text("\n".join(lines) + "\n")
    labels = root / "image_class_labels.txt"
    labels.write_text(labels.read_text().replace("2 2\n", "2 1\n"))
    with pytest.raises(SourceError, match=r"duplicate key 'synth_000000'"):
        cub.list_split(root, "train")
    lines[1] = lines[1].split()[0] + " 001.disc_0/synth.v2.jpg"
    images.write_text("\n".join(lines) + "\n")
    with pytest.raises(SourceError, match=r"images\.txt:2: 001\.disc_0/synth\.v2\.jpg: cannot make a sample key"):
        cub.list_split(root, "train")


def test_fingerprint_follows_the_source(synthetic, tmp_path):
    a = cub.list_split(synthetic, "train").fingerprint()
    assert a == cub.list_split(copy_tree(synthetic, tmp_path / "moved"), "train").fingerprint()
    root = tmp_path / "moved"
    (root / "bounding_boxes.txt").write_text((root / "bounding_boxes.txt").read_text().replace("\n", " \n", 1))
    assert cub.list_split(root, "train").fingerprint() != a
