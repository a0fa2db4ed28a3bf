"""Boxes and classes for a folder of images: ``python launch/predict.py --config X.yaml --checkpoint PATH --images DIR``.

Writes ``<out>/predictions.jsonl`` (one line per image: file, width, height, top-5 classes
with names and scores, the Top-1 box and its reference box in original pixels ``xyxy``,
and the FPN level it came from) and, with ``--viz``, one picture per image with the
reference box in blue and the transformed box in red (CAM: the box of the class map).
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


def list_images(items: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such image or directory: {path}")
    if not files:
        raise FileNotFoundError(f"no images found in {items}")
    return files


def class_names(cfg) -> list[str] | None:
    manifest = Path(cfg.data.root) / cfg.data.train_split / "manifest.json"
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
    from cstn.boxes import predict
    from cstn.evaluation import normalised_class_maps
    from cstn.metrics import cam_boxes
    from cstn.models import build_model, is_cam_family

    model = build_model(cfg)
    try:
        from cstn.run_records import is_model_uri, load_logged_model

        if is_model_uri(args.checkpoint):
            load_logged_model(model, cfg, args.checkpoint)
        else:
            checkpoint.load_weights(model, cfg, args.checkpoint)
        files = list_images(args.images)
    except (checkpoint.CheckpointMismatch, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model.eval()
    names = class_names(cfg)
    size = cfg.data.image_size
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for start in range(0, len(files), args.batch_size):
        chunk = files[start:start + args.batch_size]
        originals, tensors = [], []
        for f in chunk:
            bgr = cv2.imread(str(f), cv2.IMREAD_COLOR)
            if bgr is None:
                print(f"skipped {f}: not a readable image", file=sys.stderr)
                continue
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            originals.append((f, rgb))
            tensors.append(torch.from_numpy(cv2.resize(rgb, (size, size), interpolation=cv2.INTER_LINEAR)))
        if not tensors:
            continue
        images = torch.stack(tensors).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad():
            output = model(images)
        wh = torch.tensor([[rgb.shape[1], rgb.shape[0]] for _, rgb in originals], dtype=torch.float64)
        if is_cam_family(cfg.model.arch):
            probs = output.logits.float().softmax(1)
            scores, classes = probs.topk(min(5, probs.shape[1]), dim=1)
            maps = normalised_class_maps(output.cams, classes[:, 0], size).numpy()
            box = torch.tensor(np.stack([cam_boxes(m, cfg.eval.cam_fixed_threshold)[0] for m in maps]))
            ref, level = box, [None] * len(originals)
        else:
            pred = predict(output, topk=5, use_transform=cfg.eval.use_transform,
                           level_choice=cfg.eval.level_choice)
            scores, classes, box, ref = pred.topk_scores, pred.topk_classes, pred.top1_box, pred.top1_ref_box
            level = pred.top1_level.tolist()
        box = boxes_to_original(box.double()[:, None], wh[:, 0], wh[:, 1], size)[:, 0]
        ref = boxes_to_original(ref.double()[:, None], wh[:, 0], wh[:, 1], size)[:, 0]
        for j, (f, rgb) in enumerate(originals):
            cls = classes[j].tolist()
            rows.append({"file": str(f), "width": rgb.shape[1], "height": rgb.shape[0],
                         "top5_classes": cls, "top5_names": [names[c] for c in cls] if names else None,
                         "top5_scores": [round(float(s), 6) for s in scores[j]],
                         "box": [round(float(v), 2) for v in box[j]], "ref_box": [round(float(v), 2) for v in ref[j]],
                         "level": level[j]})
            if args.viz:
                canvas = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
                for b, colour in ((ref[j], (255, 0, 0)), (box[j], (0, 0, 255))):
                    x0, y0, x1, y1 = (int(round(float(v))) for v in b)
                    cv2.rectangle(canvas, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), colour, 2)
                label = names[cls[0]] if names else str(cls[0])
                cv2.putText(canvas, label, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1)
                cv2.imwrite(str(out / f"{f.stem}_boxes.jpg"), canvas)
    with open(out / "predictions.jsonl", "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} predictions to {out / 'predictions.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
