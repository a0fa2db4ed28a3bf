"""Boxes and classes for a folder of images: ``python launch/predict.py --config X.yaml --checkpoint PATH --images DIR``.

Writes ``<out>/predictions.jsonl`` (one line per image: file, width, height, top-5 classes
with names and scores, the Top-1 box and its reference box in original pixels ``xyxy``,
and the FPN level it came from), decoded exactly as the evaluator decodes (``eval.*``: the MAP
box, box voting or a thresholded map for CSTN; the thresholded class map for CAM), and, with
``--viz``, one picture per image under ``<out>/viz/`` at the image's path relative to the folder
it was found in (so two ``a.jpg`` in different subfolders never overwrite each other), with the
reference box in blue and the predicted box in red.

Images are decoded strictly: a truncated or damaged JPEG (which libjpeg would otherwise decode
into grey rows with a warning) or an unreadable file is skipped, named on stderr with its reason
and listed in ``<out>/skipped.jsonl``; the others are processed. Exit status: 0 when every image
was processed, 1 when some were skipped, 2 for a configuration, checkpoint or input error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from cstn import checkpoint
from cstn.config import add_config_args, config_from_args
from pipeline.schema import boxes_to_original

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def list_images(items: list[str]) -> list[tuple[Path, Path]]:
    """``(file, name)`` of every image: ``name`` is the path relative to the directory it was found in
    (a file given directly keeps its own name)."""
    files: list[tuple[Path, Path]] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files.extend((p, p.relative_to(path)) for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append((path, Path(path.name)))
        else:
            raise FileNotFoundError(f"no such image or directory: {path}")
    if not files:
        raise FileNotFoundError(f"no images found in {items}")
    return files


def decode_strict(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB, or ValueError with the reason. JPEGs go through libjpeg-turbo with warnings as
    errors (simplejpeg ``strict=True``: a truncated file fails instead of decoding into grey rows);
    other formats through OpenCV."""
    import simplejpeg

    data = path.read_bytes()
    if not data:
        raise ValueError("empty file")
    if data[:2] == b"\xff\xd8":
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
        except ValueError as exc:
            raise ValueError(f"damaged JPEG ({exc})") from None
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("not a readable image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def class_names(cfg) -> list[str] | None:
    from pipeline.manifest import split_dir

    try:
        manifest = split_dir(cfg.data, cfg.data.train_split) / "manifest.json"
    except Exception:  # no reachable split: predictions name class indices only
        return None
    if not manifest.is_file():
        return None
    classes = json.loads(manifest.read_text()).get("classes")
    if not classes:
        return None
    return [c.get("name") or c.get("synset") or str(i) if isinstance(c, dict) else str(c)
            for i, c in enumerate(classes)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(p)
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint tag directory, a run's checkpoints/ dir, or an MLflow model (models:/NAME/VERSION, "
                        "runs:/RUN_ID/model; its plain weights and config only)")
    p.add_argument("--images", nargs="+", required=True, help="image files and/or directories")
    p.add_argument("--out", default="runs/predict")
    p.add_argument("--viz", action="store_true", help="also draw the boxes on each image")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_intermixed_args(argv)
    cfg = config_from_args(args)
    if cfg is None:
        return 2
    from cstn.evaluation import score_cam, score_cstn
    from cstn.models import build_model, is_cam_family

    model = build_model(cfg)
    try:
        from cstn.run_records import is_model_uri, load_logged_model

        if is_model_uri(args.checkpoint):
            load_logged_model(model, cfg, args.checkpoint)
        else:
            checkpoint.load_weights(model, cfg, args.checkpoint)
    except (checkpoint.CheckpointMismatch, checkpoint.CheckpointError, FileNotFoundError) as exc:
        print(f"checkpoint error: {exc}", file=sys.stderr)
        return 2
    try:
        files = list_images(args.images)
    except FileNotFoundError as exc:
        print(f"input error: {exc}", file=sys.stderr)
        return 2
    model.eval()
    names = class_names(cfg)
    size = cfg.data.image_size
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, skipped = [], []
    for start in range(0, len(files), args.batch_size):
        originals, tensors = [], []
        for f, name in files[start:start + args.batch_size]:
            try:
                rgb = decode_strict(f)
            except (OSError, ValueError) as exc:
                print(f"skipped {f}: {exc}", file=sys.stderr)
                skipped.append({"file": str(f), "reason": str(exc)})
                continue
            originals.append((f, name, rgb))
            tensors.append(torch.from_numpy(cv2.resize(rgb, (size, size), interpolation=cv2.INTER_LINEAR)))
        if not tensors:
            continue
        images = torch.stack(tensors).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad():
            output = model(images)
            classes = output.class_log_probs().argmax(dim=1)
            scored = score_cam(model, output, classes, cfg) if is_cam_family(cfg.model.arch) \
                else score_cstn(output, classes, cfg)
        wh = torch.tensor([[rgb.shape[1], rgb.shape[0]] for _, _, rgb in originals], dtype=torch.float64)
        box = boxes_to_original(scored.top1.double()[:, None], wh[:, 0], wh[:, 1], size)[:, 0]
        ref = box if scored.ref_top1 is None else \
            boxes_to_original(scored.ref_top1.double()[:, None], wh[:, 0], wh[:, 1], size)[:, 0]
        level = [None] * len(originals) if scored.levels is None else scored.levels.tolist()
        for j, (f, name, rgb) in enumerate(originals):
            cls = scored.topk_classes[j].tolist()
            rows.append({"file": str(f), "width": rgb.shape[1], "height": rgb.shape[0],
                         "top5_classes": cls, "top5_names": [names[c] for c in cls] if names else None,
                         "top5_scores": [round(float(s), 6) for s in scored.topk_scores[j]],
                         "box": [round(float(v), 2) for v in box[j]], "ref_box": [round(float(v), 2) for v in ref[j]],
                         "level": level[j]})
            if args.viz:
                canvas = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
                for b, colour in ((ref[j], (255, 0, 0)), (box[j], (0, 0, 255))):
                    x0, y0, x1, y1 = (int(round(float(v))) for v in b)
                    cv2.rectangle(canvas, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), colour, 2)
                label = names[cls[0]] if names else str(cls[0])
                cv2.putText(canvas, label, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1)
                picture = out / "viz" / name.parent / f"{name.stem}_boxes.jpg"
                picture.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(picture), canvas)
    with open(out / "predictions.jsonl", "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    with open(out / "skipped.jsonl", "w") as fh:
        for row in skipped:
            fh.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} predictions to {out / 'predictions.jsonl'}"
          + (f"; skipped {len(skipped)} unreadable image(s), listed in {out / 'skipped.jsonl'}" if skipped else ""))
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
