"""The synthetic WSOL generator: determinism, tight boxes, consistent CUB layout."""
import hashlib
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.sources import synthetic as S

ROOT = Path(__file__).resolve().parents[1]


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_deterministic_for_a_seed(tmp_path):
    spec = S.SyntheticSpec(num_train=12, num_test=6, image_size=64, seed=3)
    a = S.write_cub_layout(spec, tmp_path / "a", progress=False)
    b = S.write_cub_layout(spec, tmp_path / "b", progress=False)
    assert digest(a) == digest(b)
    c = S.write_cub_layout(S.SyntheticSpec(num_train=12, num_test=6, image_size=64, seed=4),
                           tmp_path / "c", progress=False)
    assert digest(a) != digest(c)


@pytest.mark.parametrize("index", range(40))
def test_box_is_tight_around_object(index):
    spec = S.SyntheticSpec(image_size=96, seed=1)
    s = S.render(spec, index)
    x0, y0, x1, y1 = s.box
    ys, xs = np.nonzero(s.mask)
    assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1  # every pixel inside
    # within 1 px: each side of the box touches the object
    assert abs(xs.min() - x0) <= 1 and abs(xs.max() + 1 - x1) <= 1
    assert abs(ys.min() - y0) <= 1 and abs(ys.max() + 1 - y1) <= 1
    assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
    assert s.image.shape == (96, 96, 3) and s.image.dtype == np.uint8


def test_part_carries_the_class_and_body_tint_is_configurable():
    strong = S.render(S.SyntheticSpec(image_size=96, seed=2, body_evidence=0.5), 7)
    none = S.render(S.SyntheticSpec(image_size=96, seed=2, body_evidence=0.0), 7)
    colour = S.class_colour(strong.label, 10)
    # the class colour appears (the part) in both; the tinted body is closer to the class colour on average
    dist = lambda s: np.linalg.norm(s.image[s.mask].astype(float) - colour, axis=1)
    assert (dist(none) < 40).any() and (dist(strong) < 40).any()
    assert np.median(dist(strong)) < np.median(dist(none))


def test_object_area_range_is_respected():
    spec = S.SyntheticSpec(image_size=128, seed=0, min_area=0.05, max_area=0.9)
    areas = []
    for i in range(200):
        x0, y0, x1, y1 = S.render(spec, i).box
        areas.append((x1 - x0) * (y1 - y0) / 128 ** 2)
    areas = np.array(areas)
    # tilted shapes may be clipped by the border, so the extremes are approximate
    assert areas.min() > 0.02 and np.quantile(areas, 0.9) <= 0.95
    assert areas.min() < 0.1 and areas.max() > 0.7   # spans small to large


def test_layout_files_consistent(tmp_path):
    spec = S.SyntheticSpec(num_train=15, num_test=7, image_size=64, num_classes=4, seed=0)
    out = S.write_cub_layout(spec, tmp_path / "cub", progress=False)
    read = lambda name: [l.split() for l in (out / name).read_text().splitlines()]
    images, labels, split, boxes, classes = (read(n) for n in (
        "images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt", "classes.txt"))
    ids = [r[0] for r in images]
    assert ids == [str(i) for i in range(1, 23)]
    for table in (labels, split, boxes):
        assert [r[0] for r in table] == ids
    assert sum(int(r[1]) for r in split) == 15
    class_dirs = {int(r[0]): r[1] for r in classes}
    assert sorted(class_dirs) == [1, 2, 3, 4]
    for (sid, rel), (_, lab), (_, x, y, w, h) in zip(images, labels, boxes):
        assert rel.split("/")[0] == class_dirs[int(lab)]
        img = cv2.imread(str(out / "images" / rel))
        assert img is not None and img.shape == (64, 64, 3)
        x, y, w, h = map(float, (x, y, w, h))
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64


def test_cli_writes_layout_and_rejects_bad_args(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pipeline.sources.synthetic", "--out", str(tmp_path / "d"),
                          "--num-train", "4", "--num-test", "2", "--image-size", "32", "--seed", "9"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert len((tmp_path / "d" / "images.txt").read_text().splitlines()) == 6
    res = subprocess.run([sys.executable, "-m", "pipeline.sources.synthetic", "--out", str(tmp_path / "e"),
                          "--min-area", "0.5", "--max-area", "0.1"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and "--min-area" in res.stderr
