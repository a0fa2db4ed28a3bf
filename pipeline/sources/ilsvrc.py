"""ILSVRC-2012 (ImageNet-1k) in its real on-disk layout (the test fixtures are in :mod:`.ilsvrc_fixture`).

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

Fixtures in this layout (real validation geometry, synthetic pixels) are written by
:mod:`pipeline.sources.ilsvrc_fixture`.
"""

from __future__ import annotations

import csv
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from .base import (ClassInfo, Rejected, SourceError, SourceItem, SourceListing, check_key, check_unique_keys,
                   file_size)

__all__ = ["read_synsets", "read_val_annotations", "list_split", "ValAnnotation", "SYNSET_FILE"]

SYNSET_FILE = "LOC_synset_mapping.txt"
VAL_CSV = "LOC_val_solution.csv"
VAL_XML_DIR = "val_annotations"


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
