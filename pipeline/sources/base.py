"""What every dataset source hands to the shard writer: one record per input image file.

A source (``ilsvrc``, ``cub``) reads a dataset in its own on-disk layout and returns a
:class:`SourceListing`: the class list, one :class:`SourceItem` per input image of the split
in *source order*, and the files it found but could not use (``rejected``, e.g. hidden files),
so that every file of the split ends up either in a shard or in the manifest's ``skipped`` list.

Sources only read metadata and list files; they never decode images. Errors in the metadata
that make the conversion meaningless (a class not in the class list, a duplicate key, a
validation image without annotation, a malformed annotation line) raise :class:`SourceError`
naming the file (and line) at fault.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SourceError", "ClassInfo", "SourceItem", "Rejected", "SourceListing", "check_key", "check_unique_keys",
           "file_size"]


class SourceError(ValueError):
    """Bad dataset metadata; the message names the file (and line, key or class) at fault."""


@dataclass(frozen=True, slots=True)
class ClassInfo:
    """One class: ``index`` (0-based label), ``id`` (ILSVRC wnid such as ``n01440764``, or the CUB
    class directory such as ``001.Black_footed_Albatross``) and a human-readable ``name``."""

    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class SourceItem:
    """One input image of a split.

    Attributes:
        key: sample key (``__key__``): the file stem, e.g. ``ILSVRC2012_val_00000001``; never has a dot.
        path: absolute path of the image file.
        relpath: ``path`` relative to the dataset root (used in the manifest and the fingerprint).
        label: 0-based class index.
        boxes: ground-truth boxes, ``xyxy`` in original pixels (x1/y1 exclusive, float), as annotated:
            they may still lie partly outside the image; the writer clips them. Empty when the split
            carries no boxes (ILSVRC train).
        size: ``(width, height)`` in pixels the annotation claims, or ``None`` when it does not say.
            The writer checks it against the image.
        file_size: size of the file in bytes, ``None`` when the file is missing.
    """

    key: str
    path: Path
    relpath: str
    label: int
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    size: tuple[int, int] | None = None
    file_size: int | None = None


@dataclass(frozen=True, slots=True)
class Rejected:
    """A file found in the split's image folders that is not an input image (e.g. ``.DS_Store``)."""

    relpath: str
    reason: str


@dataclass
class SourceListing:
    """Everything the writer needs from a source.

    Attributes:
        dataset: ``ilsvrc`` or ``cub``.
        split: ``train``, ``val`` or ``test``.
        root: dataset root directory.
        classes: the class list, ``classes[i].index == i``.
        items: the split's images in source order (the writer shuffles training splits).
        rejected: files found beside the images that are not images of the split.
        metadata_files: annotation / list files whose content identifies the source (fingerprint).
    """

    dataset: str
    split: str
    root: Path
    classes: list[ClassInfo]
    items: list[SourceItem]
    rejected: list[Rejected] = field(default_factory=list)
    metadata_files: list[Path] = field(default_factory=list)

    def fingerprint(self) -> str:
        """sha256 over the class list, each item's (relpath, key, label, boxes, size, file size),
        the rejected files and the bytes of the metadata files. Cheap (no image is read) and stable
        under copying the dataset elsewhere (no absolute paths, no modification times)."""
        h = hashlib.sha256()
        h.update(f"{self.dataset}\0{self.split}\0".encode())
        for c in self.classes:
            h.update(f"c\0{c.index}\0{c.id}\0{c.name}\n".encode())
        for it in self.items:
            h.update(f"i\0{it.relpath}\0{it.key}\0{it.label}\0{it.boxes!r}\0{it.size!r}\0{it.file_size}\n".encode())
        for r in self.rejected:
            h.update(f"r\0{r.relpath}\0{r.reason}\n".encode())
        for p in sorted(self.metadata_files):
            h.update(f"m\0{p.name}\0".encode())
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()


def check_key(key: str, path: Path | str) -> str:
    """Return ``key`` if it can name a sample (non-empty, no dot, no slash), else raise naming ``path``."""
    if not key or "." in key or "/" in key or key != key.strip():
        raise SourceError(f"{path}: cannot make a sample key from {key!r} (keys must be non-empty, "
                          f"without dots, slashes or surrounding spaces; DALI splits the extension at "
                          f"the first dot)")
    return key


def file_size(path: Path) -> int | None:
    """Size of ``path`` in bytes, ``None`` when it does not exist."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


def check_unique_keys(items: list[SourceItem]) -> None:
    """Raise :class:`SourceError` naming both files when two items share a key."""
    seen: dict[str, SourceItem] = {}
    for it in items:
        other = seen.setdefault(it.key, it)
        if other is not it:
            raise SourceError(f"duplicate key {it.key!r}: {other.path} and {it.path}")
