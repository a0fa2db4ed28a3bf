"""ILSVRC-2012 fixtures: a tree in the real on-disk layout from the real validation geometry, with synthetic pixels.

For tests and benchmarks, never read by the reader itself (:mod:`pipeline.sources.ilsvrc`).
:func:`make_fixture` writes ``val/``, optionally ``train/``, ``LOC_synset_mapping.txt``,
``LOC_val_solution.csv`` and ``val_annotations/*.xml`` from the real validation geometry (50,000
ids, sizes, labels, 80,477 boxes, synset list: ``CSTN_ILSVRC_VAL_BOXES``, by default
``shared/data/ilsvrc2012_val_boxes`` beside the repository), with flat-colour pixels (fast,
small) or textured ones (realistic file sizes, for benchmarks).
``python -m pipeline.sources.ilsvrc_fixture --out DIR [--count N]`` runs it from the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import SourceError
from .ilsvrc import SYNSET_FILE, VAL_CSV, VAL_XML_DIR

__all__ = ["make_fixture", "read_val_reference", "ValReference", "DEFAULT_VAL_BOXES_DIR"]

#: the real validation geometry shipped beside the repository (override with ``CSTN_ILSVRC_VAL_BOXES``)
DEFAULT_VAL_BOXES_DIR = Path(os.environ.get(
    "CSTN_ILSVRC_VAL_BOXES", Path(__file__).resolve().parents[3] / "shared" / "data" / "ilsvrc2012_val_boxes"))


@dataclass
class ValReference:
    """The real validation geometry: per key, ``label`` (int), ``size`` ``(width, height)`` and
    ``boxes`` (n, 4) float64 ``xyxy``; ``keys`` in id order and ``synset_lines`` (the mapping file)."""

    keys: list[str]
    labels: dict[str, int]
    sizes: dict[str, tuple[int, int]]
    boxes: dict[str, np.ndarray]
    synset_lines: list[str]


def read_val_reference(boxes_dir: str | Path = DEFAULT_VAL_BOXES_DIR) -> ValReference:
    """Read ``image_ids.txt``, ``class_labels.txt``, ``image_sizes.txt``, ``localization.txt`` and
    ``LOC_synset_mapping.txt`` (wsolevaluation's metadata format) from ``boxes_dir``."""
    d = Path(boxes_dir)
    if not d.is_dir():
        raise SourceError(f"{d}: ILSVRC-2012 validation geometry not found (set CSTN_ILSVRC_VAL_BOXES)")
    stem = lambda p: Path(p).stem  # noqa: E731
    keys = [stem(l) for l in (d / "image_ids.txt").read_text().split()]
    labels, sizes, boxes = {}, {}, {k: [] for k in keys}
    for line in (d / "class_labels.txt").read_text().split():
        p, c = line.split(",")
        labels[stem(p)] = int(c)
    for line in (d / "image_sizes.txt").read_text().split():
        p, w, h = line.split(",")
        sizes[stem(p)] = (int(w), int(h))
    for line in (d / "localization.txt").read_text().split():
        p, *b = line.split(",")
        boxes[stem(p)].append([float(v) for v in b])
    return ValReference(keys=keys, labels=labels, sizes=sizes,
                        boxes={k: np.asarray(v, np.float64).reshape(-1, 4) for k, v in boxes.items()},
                        synset_lines=(d / SYNSET_FILE).read_text().splitlines())


def _palette(n: int = 16) -> list[tuple[int, int, int]]:
    import colorsys
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.7, 0.9)) for k in range(n)]


def _photo_canvas(seed: int, side: int = 2048) -> np.ndarray:
    """A large smooth random image plus pixel noise (side x side x 3 uint8); crops of it compress like
    photos (~130 KB at 500 x 375, quality 90)."""
    import cv2
    rng = np.random.default_rng([seed, 0x5EED])
    low = rng.uniform(0, 255, size=(side // 16, side // 16, 3)).astype(np.float32)
    img = cv2.resize(low, (side, side), interpolation=cv2.INTER_CUBIC)
    img += rng.normal(0, 22, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _photo_crop(canvas: np.ndarray, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    side = canvas.shape[0]
    if width > side or height > side:  # the few very large ILSVRC images: tile the canvas
        reps = (-(-height // side), -(-width // side), 1)
        return np.ascontiguousarray(np.tile(canvas, reps)[:height, :width])
    x0, y0 = int(rng.integers(0, side - width + 1)), int(rng.integers(0, side - height + 1))
    return np.ascontiguousarray(canvas[y0:y0 + height, x0:x0 + width])


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def make_fixture(out: str | Path, count: int | None = None, ids: list[str] | None = None, *,
                 xml: bool = True, csv_file: bool = True, texture: str = "flat", train_per_class: int = 0,
                 train_classes: int = 0, boxes_dir: str | Path = DEFAULT_VAL_BOXES_DIR, seed: int = 0,
                 quality: int = 90) -> Path:
    """Write an ILSVRC-2012 tree in the real layout from the real validation geometry.

    Args:
        out: root to create (``val/``, ``train/``, ``LOC_synset_mapping.txt``, ``LOC_val_solution.csv``,
            ``val_annotations/*.xml``).
        count: the first ``count`` validation ids (all 50,000 when both ``count`` and ``ids`` are None).
        ids: explicit validation keys instead of ``count``.
        xml, csv_file: which annotation forms to write.
        texture: ``flat`` (one of three colours, by class: tiny files, each size and colour encoded once) or
            ``photo`` (textured, realistic file sizes, for benchmarks).
        train_per_class, train_classes: also write ``train/<wnid>/<wnid>_<n>.JPEG`` for the first
            ``train_classes`` synsets, ``train_per_class`` images each, sizes cycling through the real ones.
        boxes_dir: the real geometry (see :func:`read_val_reference`).
        seed: seed of the textured pixels.
        quality: JPEG quality of the written images.
    Returns ``Path(out)``. Pixels are synthetic; sizes, labels and boxes are the real ones.
    """
    import cv2
    if texture not in ("flat", "photo"):
        raise ValueError(f"texture must be 'flat' or 'photo', got {texture!r}")
    ref = read_val_reference(boxes_dir)
    keys = list(ids) if ids is not None else ref.keys[:count] if count is not None else ref.keys
    unknown = [k for k in keys if k not in ref.labels]
    if unknown:
        raise SourceError(f"{boxes_dir}: unknown validation ids {unknown[:5]}")
    out = Path(out)
    (out / "val").mkdir(parents=True, exist_ok=True)
    (out / SYNSET_FILE).write_text("\n".join(ref.synset_lines) + "\n")
    wnids = [line.split()[0] for line in ref.synset_lines]
    palette = _palette(3)  # few colours: flat images of one size and colour are encoded once
    cache: dict[tuple[int, int, int], bytes] = {}
    params = [cv2.IMWRITE_JPEG_QUALITY, quality]

    canvas = None

    def encode(width: int, height: int, label: int, rng_key: int) -> bytes:
        nonlocal canvas
        if texture == "flat":
            colour = label % len(palette)
            if (width, height, colour) not in cache:
                img = np.empty((height, width, 3), np.uint8)
                img[:] = palette[colour]
                cache[(width, height, colour)] = cv2.imencode(".jpg", img, params)[1].tobytes()
            return cache[(width, height, colour)]
        if canvas is None:
            canvas = _photo_canvas(seed)
        img = _photo_crop(canvas, np.random.default_rng([seed, rng_key]), width, height)
        return cv2.imencode(".jpg", img, params)[1].tobytes()

    csv_rows = []
    if xml:
        (out / VAL_XML_DIR).mkdir(exist_ok=True)
    val_dir = str(out / "val")
    for key in keys:
        (w, h), label, boxes = ref.sizes[key], ref.labels[key], ref.boxes[key]
        with open(os.path.join(val_dir, f"{key}.JPEG"), "wb") as f:
            f.write(encode(w, h, label, int(key.rsplit("_", 1)[1])))
        wnid = wnids[label]
        if csv_file:
            csv_rows.append(f"{key}," + " ".join(f"{wnid} " + " ".join(_fmt(v) for v in b) for b in boxes) + " ")
        if xml:
            objects = "".join(
                f"\t<object>\n\t\t<name>{wnid}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
                f"\t\t<difficult>0</difficult>\n\t\t<bndbox>\n\t\t\t<xmin>{_fmt(b[0])}</xmin>\n"
                f"\t\t\t<ymin>{_fmt(b[1])}</ymin>\n\t\t\t<xmax>{_fmt(b[2])}</xmax>\n\t\t\t<ymax>{_fmt(b[3])}</ymax>\n"
                f"\t\t</bndbox>\n\t</object>\n" for b in boxes)
            (out / VAL_XML_DIR / f"{key}.xml").write_text(
                f"<annotation>\n\t<folder>val</folder>\n\t<filename>{key}</filename>\n\t<source>\n"
                f"\t\t<database>ILSVRC_2012</database>\n\t</source>\n\t<size>\n\t\t<width>{w}</width>\n"
                f"\t\t<height>{h}</height>\n\t\t<depth>3</depth>\n\t</size>\n\t<segmented>0</segmented>\n"
                f"{objects}</annotation>\n")
    if csv_file:
        (out / VAL_CSV).write_text("ImageId,PredictionString\n" + "\n".join(csv_rows) + "\n")

    sizes = [ref.sizes[k] for k in ref.keys[:max(1, train_per_class * train_classes)]]
    for c in range(train_classes):
        folder = out / "train" / wnids[c]
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(train_per_class):
            w, h = sizes[(c * train_per_class + i) % len(sizes)]
            (folder / f"{wnids[c]}_{i + 1}.JPEG").write_bytes(encode(w, h, c, 10_000_000 + c * 100_000 + i))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.sources.ilsvrc_fixture",
                                description="Write an ILSVRC-2012 fixture in the real layout from the real "
                                            "validation geometry (synthetic pixels, real sizes and boxes).")
    p.add_argument("--out", required=True, help="root to create")
    p.add_argument("--count", type=int, default=None, help="first N validation ids (default: all 50,000)")
    p.add_argument("--texture", choices=("flat", "photo"), default="flat")
    p.add_argument("--no-xml", action="store_true", help="write only LOC_val_solution.csv")
    p.add_argument("--no-csv", action="store_true", help="write only the XML directory")
    p.add_argument("--train-classes", type=int, default=0)
    p.add_argument("--train-per-class", type=int, default=0)
    p.add_argument("--boxes-dir", default=str(DEFAULT_VAL_BOXES_DIR))
    args = p.parse_args(argv)
    t0 = time.time()
    try:
        out = make_fixture(args.out, count=args.count, xml=not args.no_xml, csv_file=not args.no_csv,
                           texture=args.texture, train_per_class=args.train_per_class,
                           train_classes=args.train_classes, boxes_dir=args.boxes_dir)
    except SourceError as e:
        print(f"ilsvrc fixture: error: {e}", file=sys.stderr)
        return 2
    print(f"ilsvrc fixture: wrote {out} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
