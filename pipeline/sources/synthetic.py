"""Synthetic WSOL dataset written in the CUB-200-2011 on-disk layout.

Each image holds one object: a body whose shape and texture are shared by all
classes, carrying a small discriminative *part* (a mark whose colour and shape
tell the class). A classifier can succeed from the part alone -- the failure
WSOL methods fight (CAM shrinking onto the discriminative part). The body
carries weak class evidence too (a faint class tint, ``body_evidence`` of full
strength, default 0.08), as real objects do over their whole extent; 0 gives
the part-only stress case (see DESIGN.md section 7). Distractor bodies with
the same look but no mark and a cluttered background make the task non-trivial.

Ground truth is the tight box of the object's body mask (the part lies inside
it), ``xyxy`` in original pixels with x1/y1 exclusive, written to
``bounding_boxes.txt`` as CUB's ``id x y w h``.

Layout written under ``--out``::

    images/<NNN.class_name>/<file>.jpg
    images.txt              id relative/path.jpg
    image_class_labels.txt  id class_id (1-based)
    train_test_split.txt    id is_training (1/0)
    bounding_boxes.txt      id x y w h
    classes.txt             class_id NNN.class_name

Generation is deterministic: sample ``i`` draws from ``default_rng([seed, i])``.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

MARK_SHAPES = ("disc", "square", "triangle", "cross", "ring", "diamond", "bar", "star")


@dataclass
class SyntheticSpec:
    """Knobs of the generator (all recorded in ``synthetic.json`` beside the layout)."""

    num_train: int = 1000
    num_test: int = 500
    image_size: int = 112
    num_classes: int = 10
    seed: int = 0
    min_area: float = 0.05
    """Smallest object box area, as a fraction of the image."""
    max_area: float = 0.90
    """Largest object box area, as a fraction of the image."""
    body_evidence: float = 0.08
    """Strength of the class tint over the whole body (0 = part-only evidence)."""
    part_scale: float = 0.28
    """Part size as a fraction of the body's shorter side."""
    max_distractors: int = 3
    jpeg_quality: int = 90


@dataclass
class Sample:
    """One rendered image. ``image`` is HxWx3 uint8 RGB; ``mask`` HxW bool (object body);
    ``box`` the tight ``xyxy`` box of ``mask`` in pixels (x1/y1 exclusive)."""

    image: np.ndarray
    mask: np.ndarray
    box: tuple[int, int, int, int]
    label: int


def class_colour(label: int, num_classes: int) -> np.ndarray:
    """Saturated RGB colour of a class (float32 in [0, 255])."""
    hue = (label * 0.61803398875) % 1.0  # golden-ratio spacing keeps neighbours apart
    r, g, b = colorsys.hsv_to_rgb(hue, 0.9, 0.95)
    return np.array([r, g, b], np.float32) * 255.0


def class_names(num_classes: int) -> list[str]:
    """CUB-style directory names, ``001.disc_a`` ..."""
    names = []
    for k in range(num_classes):
        shape = MARK_SHAPES[k % len(MARK_SHAPES)]
        names.append(f"{k + 1:03d}.{shape}_{k // len(MARK_SHAPES)}")
    return names


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    low = rng.uniform(40, 200, size=(4, 4, 3)).astype(np.float32)
    img = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    img += rng.normal(0, 12, size=(size, size, 3)).astype(np.float32)
    for _ in range(rng.integers(3, 8)):  # clutter lines
        p0 = tuple(int(v) for v in rng.integers(0, size, 2))
        p1 = tuple(int(v) for v in rng.integers(0, size, 2))
        colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
        cv2.line(img, p0, p1, colour, int(rng.integers(1, max(2, size // 40) + 1)), cv2.LINE_AA)
    return img


def _body_mask(rng: np.random.Generator, size: int, cx: float, cy: float, w: float, h: float) -> np.ndarray:
    """A blob shared by all classes: an ellipse, or a rounded rectangle, at a small random tilt."""
    mask = np.zeros((size, size), np.uint8)
    angle = float(rng.uniform(-15, 15))
    if rng.random() < 0.6:
        cv2.ellipse(mask, (int(round(cx)), int(round(cy))), (max(1, int(w / 2)), max(1, int(h / 2))),
                    angle, 0, 360, 1, -1)
    else:
        rect = ((cx, cy), (max(2.0, w * 0.9), max(2.0, h * 0.9)), angle)
        pts = cv2.boxPoints(rect).astype(np.int32)
        cv2.fillConvexPoly(mask, pts, 1)
        k = max(1, int(min(w, h) * 0.15)) | 1
        mask = (cv2.GaussianBlur(mask.astype(np.float32), (k, k), 0) > 0.5).astype(np.uint8)
    return mask.astype(bool)


def _body_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Shared body look: grey with diagonal stripes, random phase."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = size / rng.uniform(6, 10)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (xx + yy) / period + rng.uniform(0, 2 * np.pi))
    grey = 110 + 60 * stripes
    return np.repeat(grey[..., None], 3, axis=2)


def _draw_mark(img: np.ndarray, label: int, num_classes: int, cx: int, cy: int, r: int) -> None:
    colour = tuple(float(c) for c in class_colour(label, num_classes))
    shape = MARK_SHAPES[label % len(MARK_SHAPES)]
    t = max(1, r // 3)
    if shape == "disc":
        cv2.circle(img, (cx, cy), r, colour, -1, cv2.LINE_AA)
    elif shape == "square":
        cv2.rectangle(img, (cx - r, cy - r), (cx + r, cy + r), colour, -1)
    elif shape == "triangle":
        pts = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], np.int32)
        cv2.fillConvexPoly(img, pts, colour, cv2.LINE_AA)
    elif shape == "cross":
        cv2.line(img, (cx - r, cy), (cx + r, cy), colour, t)
        cv2.line(img, (cx, cy - r), (cx, cy + r), colour, t)
    elif shape == "ring":
        cv2.circle(img, (cx, cy), r, colour, t, cv2.LINE_AA)
    elif shape == "diamond":
        pts = np.array([[cx, cy - r], [cx + r, cy], [cx, cy + r], [cx - r, cy]], np.int32)
        cv2.fillConvexPoly(img, pts, colour, cv2.LINE_AA)
    elif shape == "bar":
        cv2.rectangle(img, (cx - r, cy - max(1, r // 2)), (cx + r, cy + max(1, r // 2)), colour, -1)
    else:  # star: two crossing triangles
        for sign in (1, -1):
            pts = np.array([[cx, cy - sign * r], [cx - r, cy + sign * r // 2], [cx + r, cy + sign * r // 2]],
                           np.int32)
            cv2.fillConvexPoly(img, pts, colour, cv2.LINE_AA)


def _place(rng: np.random.Generator, size: int, area_frac: float) -> tuple[float, float, float, float]:
    """Centre and size of a box of the given area fraction, aspect ratio in [1/2, 2], inside the image."""
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    area = area_frac * size * size
    w = min(size - 2.0, np.sqrt(area * aspect))
    h = min(size - 2.0, area / w)
    cx = rng.uniform(w / 2 + 1, size - w / 2 - 1)
    cy = rng.uniform(h / 2 + 1, size - h / 2 - 1)
    return cx, cy, w, h


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``xyxy`` tight box of a boolean mask, x1/y1 exclusive."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def render(spec: SyntheticSpec, index: int) -> Sample:
    """Render sample ``index`` deterministically from ``spec.seed``."""
    rng = np.random.default_rng([spec.seed, index])
    size = spec.image_size
    label = int(index % spec.num_classes)
    img = _background(rng, size)

    tint_colours = [class_colour(k, spec.num_classes) for k in range(spec.num_classes)]
    area = rng.uniform(spec.min_area, spec.max_area)
    cx, cy, w, h = _place(rng, size, area)
    mask = _body_mask(rng, size, cx, cy, w, h)
    if not mask.any():  # degenerate tiny shape: keep one pixel so the box exists
        mask[int(cy), int(cx)] = True
    ox0, oy0, ox1, oy1 = tight_box(mask)

    # Distractors: the body's look, no mark, a random class tint so the tint alone never localises the
    # object. They never touch the object's box, so its ground truth stays unambiguous.
    for _ in range(int(rng.integers(0, spec.max_distractors + 1))):
        for _try in range(10):
            dx, dy, dw, dh = _place(rng, size, rng.uniform(0.01, 0.08))
            if (dx + dw / 2 + 2 < ox0 or dx - dw / 2 - 2 > ox1 or
                    dy + dh / 2 + 2 < oy0 or dy - dh / 2 - 2 > oy1):
                break
        else:
            continue
        m = _body_mask(rng, size, dx, dy, dw, dh) & ~mask
        tex = _body_texture(rng, size)
        tint = tint_colours[int(rng.integers(spec.num_classes))]
        tex = (1 - spec.body_evidence) * tex + spec.body_evidence * tint
        img[m] = tex[m]

    tex = _body_texture(rng, size)
    tex = (1 - spec.body_evidence) * tex + spec.body_evidence * tint_colours[label]
    img[mask] = tex[mask]

    # Part: inside the body, at a random position well within the mask (eroded so it stays inside).
    r = max(2, int(spec.part_scale * min(w, h) / 2))
    inner = cv2.erode(mask.astype(np.uint8), np.ones((2 * r + 1, 2 * r + 1), np.uint8)).astype(bool)
    if not inner.any():
        r = max(1, r // 2)
        inner = cv2.erode(mask.astype(np.uint8), np.ones((2 * r + 1, 2 * r + 1), np.uint8)).astype(bool)
    candidates = np.argwhere(inner if inner.any() else mask)
    py, px = candidates[int(rng.integers(len(candidates)))]
    mark_layer = img.copy()
    _draw_mark(mark_layer, label, spec.num_classes, int(px), int(py), r)
    img[mask] = mark_layer[mask]  # the part never leaves the body

    image = np.clip(img, 0, 255).astype(np.uint8)
    return Sample(image=image, mask=mask, box=tight_box(mask), label=label)


def write_cub_layout(spec: SyntheticSpec, out: str | Path, progress: bool = True) -> Path:
    """Write ``spec.num_train + spec.num_test`` images and the CUB metadata files under ``out``."""
    out = Path(out)
    names = class_names(spec.num_classes)
    for name in names:
        (out / "images" / name).mkdir(parents=True, exist_ok=True)
    total = spec.num_train + spec.num_test
    images, labels, split, boxes = [], [], [], []
    t0 = time.time()
    for i in range(total):
        s = render(spec, i)
        rel = f"{names[s.label]}/synth_{i:06d}.jpg"
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(s.image, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, spec.jpeg_quality])
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for sample {i}")
        (out / "images" / rel).write_bytes(buf.tobytes())
        sid = i + 1
        images.append(f"{sid} {rel}")
        labels.append(f"{sid} {s.label + 1}")
        split.append(f"{sid} {1 if i < spec.num_train else 0}")
        x0, y0, x1, y1 = s.box
        boxes.append(f"{sid} {float(x0):.1f} {float(y0):.1f} {float(x1 - x0):.1f} {float(y1 - y0):.1f}")
        if progress and (i + 1) % 500 == 0:
            rate = (i + 1) / (time.time() - t0)
            print(f"synthetic: {i + 1}/{total} images ({rate:.0f} img/s)", file=sys.stderr, flush=True)
    (out / "images.txt").write_text("\n".join(images) + "\n")
    (out / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (out / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (out / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    (out / "classes.txt").write_text("\n".join(f"{k + 1} {n}" for k, n in enumerate(names)) + "\n")
    (out / "synthetic.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.sources.synthetic", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory (CUB-200-2011 layout)")
    p.add_argument("--num-train", type=int, default=SyntheticSpec.num_train)
    p.add_argument("--num-test", type=int, default=SyntheticSpec.num_test)
    p.add_argument("--image-size", type=int, default=SyntheticSpec.image_size)
    p.add_argument("--num-classes", type=int, default=SyntheticSpec.num_classes)
    p.add_argument("--seed", type=int, default=SyntheticSpec.seed)
    p.add_argument("--min-area", type=float, default=SyntheticSpec.min_area)
    p.add_argument("--max-area", type=float, default=SyntheticSpec.max_area)
    p.add_argument("--body-evidence", type=float, default=SyntheticSpec.body_evidence,
                   help="class tint over the whole body, 0..1 (0 = part-only stress case)")
    args = p.parse_args(argv)
    if not 0 < args.min_area <= args.max_area <= 1:
        p.error("need 0 < --min-area <= --max-area <= 1")
    if not 0 <= args.body_evidence <= 1:
        p.error("--body-evidence must be in [0, 1]")
    if args.num_classes < 2 or args.image_size < 16:
        p.error("need --num-classes >= 2 and --image-size >= 16")
    spec = SyntheticSpec(num_train=args.num_train, num_test=args.num_test, image_size=args.image_size,
                         num_classes=args.num_classes, seed=args.seed, min_area=args.min_area,
                         max_area=args.max_area, body_evidence=args.body_evidence)
    t0 = time.time()
    out = write_cub_layout(spec, args.out)
    n = spec.num_train + spec.num_test
    print(f"synthetic: wrote {n} images ({spec.num_train} train, {spec.num_test} test, "
          f"{spec.num_classes} classes, {spec.image_size}px) to {out} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
