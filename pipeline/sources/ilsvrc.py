"""ILSVRC-2012 (ImageNet-1k) in its real on-disk layout, and fixtures in that layout.

Layout read (``--root``, e.g. the Kaggle ``ILSVRC/Data/CLS-LOC`` folder)::

    train/<wnid>/<wnid>_<n>.JPEG             training images, class from the directory
    val/ILSVRC2012_val_%08d.JPEG             validation images (class sub-folders ``val/<wnid>/`` allowed)
    LOC_synset_mapping.txt                   optional here; ``--synsets`` names it elsewhere

Validation boxes and labels come from ``--annotations``: either a directory of per-image
PASCAL-VOC XML files (``ILSVRC2012_val_00000001.xml``: ``<size>`` and one ``<object>`` with
``<name>wnid</name>`` and ``<bndbox>`` per box) or Kaggle's ``LOC_val_solution.csv``
(``ImageId,PredictionString``, the string repeating ``wnid x0 y0 x1 y1``). Without
``--annotations``, ``<root>/LOC_val_solution.csv`` and then ``<root>/val_annotations/`` are tried.
Coordinates are taken as written (0-based pixels) and read as ``xyxy`` with x1/y1 exclusive,
the convention of clovaai/wsolevaluation's ImageNet metadata; the writer clips them to the image.

Class index = position of the wnid in the synset list, which must be sorted (the usual 0..999,
``LOC_synset_mapping.txt`` order). Without a synset file the training split uses its sorted
class directories; the validation split needs the file (its indices would otherwise depend on
which classes happen to be annotated). Training samples carry no boxes (training never reads them).

:func:`make_fixture` writes this layout from the real validation geometry in
``../shared/data/ilsvrc2012_val_boxes`` (50,000 ids, sizes, labels, 80,477 boxes, synset list)
with synthetic pixels: flat colour (fast, small) or textured (realistic file sizes, for benchmarks).
``python -m pipeline.sources.ilsvrc --out DIR [--count N]`` runs it from the command line.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import (ClassInfo, Rejected, SourceError, SourceItem, SourceListing, check_key, check_unique_keys,
                   file_size)

__all__ = ["read_synsets", "read_val_annotations", "list_split", "ValAnnotation", "ValReference",
           "read_val_reference", "make_fixture", "DEFAULT_VAL_BOXES_DIR", "SYNSET_FILE"]

SYNSET_FILE = "LOC_synset_mapping.txt"
VAL_CSV = "LOC_val_solution.csv"
VAL_XML_DIR = "val_annotations"
#: the real validation geometry shipped beside the repository (override with ``CSTN_ILSVRC_VAL_BOXES``)
DEFAULT_VAL_BOXES_DIR = Path(os.environ.get(
    "CSTN_ILSVRC_VAL_BOXES", Path(__file__).resolve().parents[3] / "shared" / "data" / "ilsvrc2012_val_boxes"))


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------

def read_synsets(path: str | Path) -> list[ClassInfo]:
    """Read a synset list: one class per line, ``wnid``, ``wnid name`` or ``wnid : name``.

    Line k (0-based, blank lines ignored) is class k. Raises :class:`SourceError` naming the file and
    line for a duplicate wnid or a list that is not sorted (ILSVRC's indices follow sorted order).
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: synset list not found")
    classes: list[ClassInfo] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, rest = line.strip().partition(" ")
        name = rest.strip().lstrip(":").strip() or wnid
        if wnid in seen:
            raise SourceError(f"{path}:{lineno}: duplicate synset {wnid!r} (first on line {seen[wnid]})")
        if classes and wnid < classes[-1].id:
            raise SourceError(f"{path}:{lineno}: synset list is not sorted ({wnid!r} after {classes[-1].id!r}); "
                              f"ILSVRC class indices follow the sorted wnid order")
        seen[wnid] = lineno
        classes.append(ClassInfo(index=len(classes), id=wnid, name=name))
    if not classes:
        raise SourceError(f"{path}: synset list is empty")
    return classes


@dataclass(frozen=True)
class ValAnnotation:
    """Annotation of one validation image: its wnid, boxes (``xyxy`` as written), the size the
    annotation claims (``None`` for the CSV) and where it was read (``file`` or ``file:line``)."""

    wnid: str
    boxes: tuple[tuple[float, float, float, float], ...]
    size: tuple[int, int] | None
    where: str


def _xml_text(node: ET.Element, tag: str, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise SourceError(f"{where}: missing <{tag}>")
    return child.text.strip()


def _number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise SourceError(f"{where}: {text!r} is not a number") from None


def _read_val_xml(path: Path) -> ValAnnotation:
    where = str(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise SourceError(f"{path}: malformed XML ({e})") from None
    size_node = root.find("size")
    size = None
    if size_node is not None:
        size = (int(_number(_xml_text(size_node, "width", where), where)),
                int(_number(_xml_text(size_node, "height", where), where)))
    wnids, boxes = [], []
    for obj in root.iter("object"):
        wnids.append(_xml_text(obj, "name", where))
        bb = obj.find("bndbox")
        if bb is None:
            raise SourceError(f"{path}: <object> without <bndbox>")
        boxes.append(tuple(_number(_xml_text(bb, t, where), where) for t in ("xmin", "ymin", "xmax", "ymax")))
    if not wnids:
        raise SourceError(f"{path}: no <object> (a validation image needs its class)")
    if len(set(wnids)) > 1:
        raise SourceError(f"{path}: objects of different classes {sorted(set(wnids))} in one image")
    return ValAnnotation(wnid=wnids[0], boxes=tuple(boxes), size=size, where=where)


def _read_val_csv(path: Path) -> dict[str, ValAnnotation]:
    out: dict[str, ValAnnotation] = {}
    with open(path, newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise SourceError(f"{path}:1: expected the header 'ImageId,PredictionString', got {header!r}")
        for lineno, row in enumerate(rows, 2):
            if not row or not "".join(row).strip():
                continue
            where = f"{path}:{lineno}"
            if len(row) != 2:
                raise SourceError(f"{where}: expected 2 columns, got {len(row)}")
            key, tokens = row[0].strip(), row[1].split()
            if not tokens or len(tokens) % 5:
                raise SourceError(f"{where}: PredictionString must repeat 'wnid x0 y0 x1 y1', "
                                  f"got {len(tokens)} tokens")
            groups = [tokens[i:i + 5] for i in range(0, len(tokens), 5)]
            wnids = {g[0] for g in groups}
            if len(wnids) > 1:
                raise SourceError(f"{where}: objects of different classes {sorted(wnids)} in one image")
            if key in out:
                raise SourceError(f"{where}: duplicate key {key!r} (first at {out[key].where})")
            boxes = tuple(tuple(_number(v, where) for v in g[1:]) for g in groups)
            out[key] = ValAnnotation(wnid=groups[0][0], boxes=boxes, size=None, where=where)
    return out


def read_val_annotations(path: str | Path) -> tuple[dict[str, ValAnnotation], list[Path]]:
    """Read validation annotations from a directory of XML files or a ``LOC_val_solution.csv``.

    Returns ``({key: annotation}, files read)``; the key is the XML file stem / the CSV ``ImageId``.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".xml" and not p.name.startswith("."))
        if not files:
            raise SourceError(f"{path}: no .xml annotation files in this directory")
        return {p.stem: _read_val_xml(p) for p in files}, files
    if path.is_file():
        return _read_val_csv(path), [path]
    raise SourceError(f"{path}: annotations not found (give a directory of XML files or LOC_val_solution.csv)")


# ---------------------------------------------------------------------------------------------
# Listing
# ---------------------------------------------------------------------------------------------

def _find_synsets(root: Path, synsets: str | Path | None) -> Path | None:
    if synsets is not None:
        return Path(synsets)
    for candidate in (root / SYNSET_FILE, root.parent / SYNSET_FILE):
        if candidate.is_file():
            return candidate
    return None


def _walk_files(folder: Path) -> list[Path]:
    """All entries below ``folder`` (files, and directories only where they hold nothing), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        out.extend(Path(dirpath) / n for n in sorted(filenames))
    return out


def _list_train(root: Path, synset_path: Path | None) -> SourceListing:
    train = root / "train"
    if not train.is_dir():
        raise SourceError(f"{train}: training image folder not found (expected train/<wnid>/<wnid>_<n>.JPEG)")
    entries = sorted(os.scandir(train), key=lambda e: e.name)
    class_dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    rejected = [Rejected(os.path.relpath(e.path, root), "not a class directory")
                for e in entries if not (e.is_dir() and not e.name.startswith("."))]
    if synset_path is not None:
        classes = read_synsets(synset_path)
        metadata = [synset_path]
    else:
        classes = [ClassInfo(i, e.name, e.name) for i, e in enumerate(class_dirs)]
        metadata = []
    by_id = {c.id: c for c in classes}
    items: list[SourceItem] = []
    for d in class_dirs:
        cls = by_id.get(d.name)
        if cls is None:
            raise SourceError(f"{d.path}: class {d.name!r} is not in the synset list {synset_path}")
        for p in _walk_files(Path(d.path)):
            rel = os.path.relpath(p, root)
            if p.name.startswith("."):
                rejected.append(Rejected(rel, "hidden file"))
                continue
            if p.parent != Path(d.path):
                rejected.append(Rejected(rel, "file in a sub-folder of a class directory"))
                continue
            items.append(SourceItem(key=check_key(p.stem, p), path=p, relpath=rel, label=cls.index,
                                    file_size=file_size(p)))
    if not items:
        raise SourceError(f"{train}: no training images found")
    check_unique_keys(items)
    return SourceListing("ilsvrc", "train", root, classes, items, rejected, metadata)


def _list_val(root: Path, synset_path: Path | None, annotations: str | Path | None) -> SourceListing:
    val = root / "val"
    if not val.is_dir():
        raise SourceError(f"{val}: validation image folder not found (expected val/ILSVRC2012_val_%08d.JPEG)")
    if synset_path is None:
        raise SourceError(f"{root}: no {SYNSET_FILE} here or in its parent; pass --synsets PATH "
                          f"(validation class indices need the full sorted synset list)")
    classes = read_synsets(synset_path)
    by_id = {c.id: c for c in classes}
    if annotations is None:
        for candidate in (root / VAL_CSV, root / VAL_XML_DIR):
            if candidate.exists():
                annotations = candidate
                break
        else:
            raise SourceError(f"{root}: no {VAL_CSV} or {VAL_XML_DIR}/ found; pass --annotations PATH "
                              f"(a directory of XML files or LOC_val_solution.csv)")
    table, annotation_files = read_val_annotations(annotations)
    for key, ann in table.items():
        if ann.wnid not in by_id:
            raise SourceError(f"{ann.where}: class {ann.wnid!r} of {key} is not in the synset list {synset_path}")

    items: list[SourceItem] = []
    rejected: list[Rejected] = []
    for p in _walk_files(val):
        rel = os.path.relpath(p, root)
        if p.name.startswith("."):
            rejected.append(Rejected(rel, "hidden file"))
            continue
        if p.suffix.lower() == ".xml":  # annotations kept beside the images are not inputs
            continue
        key = check_key(p.stem, p)
        ann = table.get(key)
        if ann is None:
            raise SourceError(f"{p}: validation image without annotation (no entry {key!r} in {annotations})")
        if p.parent != val and p.parent.name != ann.wnid:
            raise SourceError(f"{p}: lies in class folder {p.parent.name!r} but {ann.where} says {ann.wnid!r}")
        items.append(SourceItem(key=key, path=p, relpath=rel, label=by_id[ann.wnid].index, boxes=ann.boxes,
                                size=ann.size, file_size=file_size(p)))
    check_unique_keys(items)
    # annotated images that are not on disk: listed (the writer skips them as missing), never silently lost
    present = {it.key for it in items}
    for key in sorted(set(table) - present):
        ann = table[key]
        p = val / f"{key}.JPEG"
        items.append(SourceItem(key=check_key(key, ann.where), path=p, relpath=os.path.relpath(p, root),
                                label=by_id[ann.wnid].index, boxes=ann.boxes, size=ann.size, file_size=None))
    items.sort(key=lambda it: it.key)
    return SourceListing("ilsvrc", "val", root, classes, items, rejected, [synset_path, *annotation_files])


def list_split(root: str | Path, split: str, annotations: str | Path | None = None,
               synsets: str | Path | None = None) -> SourceListing:
    """List one ILSVRC-2012 split (``train`` or ``val``); see the module docstring for the layout.

    Args:
        root: folder holding ``train/`` and ``val/``.
        split: ``train`` or ``val`` (the test split has no public labels).
        annotations: validation boxes: XML directory or ``LOC_val_solution.csv``.
        synsets: synset list (``LOC_synset_mapping.txt``); default: looked up in ``root`` and its parent.
    """
    root = Path(root).resolve()
    synset_path = _find_synsets(root, synsets)
    if split == "train":
        return _list_train(root, synset_path)
    if split == "val":
        return _list_val(root, synset_path, annotations)
    raise SourceError(f"ILSVRC-2012 split {split!r} is not supported: use 'train' or 'val' "
                      f"(the test split has no public labels)")


# ---------------------------------------------------------------------------------------------
# Fixtures in the real layout
# ---------------------------------------------------------------------------------------------

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
    p = argparse.ArgumentParser(prog="python -m pipeline.sources.ilsvrc",
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
