"""CUB-200-2011 in its real on-disk layout (also written by :mod:`pipeline.sources.synthetic`).

Layout read (``--root``)::

    images.txt              <image_id> <class_folder>/<file>.jpg
    image_class_labels.txt  <image_id> <class_id>          (1-based)
    train_test_split.txt    <image_id> <is_training>       (1 = train, 0 = test)
    bounding_boxes.txt      <image_id> <x> <y> <width> <height>   (floats, pixels)
    classes.txt             <class_id> <NNN.Class_name>
    images/<class_folder>/<file>.jpg

Splits are ``train`` and ``test`` (CUB has no validation split). Source order is ``images.txt``
order. Class ``k`` (0-based) is ``class_id - 1``; its ``id`` is the class folder name
(``001.Black_footed_Albatross``) and its ``name`` the part after ``NNN.`` with spaces. A box
``x y w h`` becomes ``xyxy = (x, y, x + w, y + h)`` (x1/y1 exclusive); every image has at least one.
The sample key is the image's file stem (unique in CUB, never with a dot). The inputs of a split
are the files ``images.txt`` lists for it (a listed file missing on disk is skipped and listed by
the writer); other files under ``images/`` are not part of the dataset.
"""

from __future__ import annotations

import os
from pathlib import Path

from .base import ClassInfo, SourceError, SourceItem, SourceListing, check_key, check_unique_keys, file_size

__all__ = ["list_split", "read_classes", "SPLITS"]

SPLITS = ("train", "test")
_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt", "classes.txt")


def _rows(path: Path, columns: int, numeric_from: int = 1) -> list[tuple[int, list[str], str]]:
    """``(id, values, 'file:line')`` per non-blank line; the first column is an integer id."""
    if not path.is_file():
        raise SourceError(f"{path}: missing (CUB-200-2011 layout needs {', '.join(_FILES)})")
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        parts = line.split(maxsplit=columns - 1) if columns == 2 else line.split()
        if len(parts) != columns:
            raise SourceError(f"{where}: expected {columns} columns, got {len(parts)}: {line!r}")
        try:
            ident = int(parts[0])
            for v in parts[numeric_from:]:
                float(v)
        except ValueError:
            raise SourceError(f"{where}: expected numbers, got {line!r}") from None
        out.append((ident, parts[1:], where))
    return out


def _table(path: Path, columns: int, numeric_from: int = 1) -> dict[int, tuple[list[str], str]]:
    table: dict[int, tuple[list[str], str]] = {}
    for ident, values, where in _rows(path, columns, numeric_from):
        if ident in table:
            raise SourceError(f"{where}: duplicate id {ident} (first at {table[ident][1]})")
        table[ident] = (values, where)
    return table


def read_classes(root: str | Path) -> list[ClassInfo]:
    """The class list from ``classes.txt``; ids must be 1..C in order."""
    path = Path(root) / "classes.txt"
    classes = []
    for ident, (folder,), where in _rows(path, 2, numeric_from=2):
        if ident != len(classes) + 1:
            raise SourceError(f"{where}: class ids must run 1, 2, ... in order; got {ident} "
                              f"after {len(classes)}")
        name = folder.split(".", 1)[1] if "." in folder else folder
        classes.append(ClassInfo(index=ident - 1, id=folder, name=name.replace("_", " ")))
    if not classes:
        raise SourceError(f"{path}: no classes")
    return classes


def list_split(root: str | Path, split: str) -> SourceListing:
    """List the ``train`` or ``test`` split of a CUB-200-2011 tree at ``root``."""
    if split not in SPLITS:
        raise SourceError(f"CUB-200-2011 split {split!r} is not valid: it has only 'train' and 'test' "
                          f"(train_test_split.txt)")
    root = Path(root).resolve()
    classes = read_classes(root)
    images = _table(root / "images.txt", 2, numeric_from=2)
    labels = _table(root / "image_class_labels.txt", 2)
    is_train = _table(root / "train_test_split.txt", 2)
    boxes: dict[int, list[tuple[float, float, float, float]]] = {}
    for ident, values, where in _rows(root / "bounding_boxes.txt", 5):
        x, y, w, h = (float(v) for v in values)
        boxes.setdefault(ident, []).append((x, y, x + w, y + h))

    want = 1 if split == "train" else 0
    items: list[SourceItem] = []
    for ident, ((rel,), where) in images.items():
        for table, name in ((labels, "image_class_labels.txt"), (is_train, "train_test_split.txt")):
            if ident not in table:
                raise SourceError(f"{root / name}: no entry for image id {ident} ({where}: {rel})")
        flag = int(float(is_train[ident][0][0]))
        if flag not in (0, 1):
            raise SourceError(f"{is_train[ident][1]}: is_training must be 0 or 1, got {flag}")
        if flag != want:
            continue
        class_id = int(float(labels[ident][0][0]))
        if not 1 <= class_id <= len(classes):
            raise SourceError(f"{labels[ident][1]}: class {class_id} of image id {ident} is not in "
                              f"{root / 'classes.txt'} (1..{len(classes)})")
        cls = classes[class_id - 1]
        folder = Path(rel).parent.name
        if folder and folder != cls.id and folder in {c.id for c in classes}:
            raise SourceError(f"{where}: {rel} lies in class folder {folder!r} but "
                              f"{labels[ident][1]} gives class {class_id} ({cls.id})")
        if ident not in boxes:
            raise SourceError(f"{root / 'bounding_boxes.txt'}: no box for image id {ident} ({rel})")
        path = root / "images" / rel
        items.append(SourceItem(key=check_key(Path(rel).stem, f"{where}: {rel}"), path=path,
                                relpath=os.path.relpath(path, root), label=cls.index,
                                boxes=tuple(boxes[ident]), size=None, file_size=file_size(path)))
    if not items:
        raise SourceError(f"{root / 'train_test_split.txt'}: no images in split {split!r}")
    check_unique_keys(items)
    return SourceListing("cub", split, root, classes, items, [],
                         [root / name for name in _FILES])
