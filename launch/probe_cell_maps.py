"""Where a trained CSTN's cells really look, and whether boxes placed there localize better.

``python launch/probe_cell_maps.py --config X.yaml --checkpoint RUN/checkpoints --heldout ROOT --test ROOT``

The analytic cell map (:func:`cstn.models.geometry.derive_cell_maps`: cell ``c`` of a stride-``t``
level centred at pixel ``t c + 0.5``) holds for cells whose receptive field lies inside the image.
Near the border of a small image the field is clipped and the effective centre moves inward. This
tool measures it on the trained model and tests a correction learned from it:

1. On the held-out images (never the test split), for every cell of every level, the centroid of
   ``|d sum_channels feature[cell] / d input|`` averaged over the images: the cell's effective centre.
2. Per level, a least-squares line ``centre = stride' c + offset'`` through those centroids (x
   per column, y per row): a corrected :class:`~cstn.models.geometry.CellMap` per level that moves
   the windows' centres and keeps their size.
3. GT-Known and Top-1 Loc on the held-out set and on the test split with the analytic and with the
   corrected maps (same network, same scores and locations; only the boxes move), one process.

Prints one JSON line (also written to ``--out``): the measured centroids, both maps and the four
evaluations. Which map to keep is decided on the held-out figures alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cstn import checkpoint  # noqa: E402
from cstn.config import add_config_args, config_from_args  # noqa: E402


def effective_centres(model, loader, max_images: int = 512) -> dict[int, np.ndarray]:
    """``{level: (H, W, 2)}`` mean gradient centroid (x, y; input pixels) of every cell over the images."""
    sums: dict[int, np.ndarray] = {}
    seen = 0
    model.eval()
    for batch in loader:
        x = model.normaliser(batch.images, like=model.backbone.conv1.weight).detach().requires_grad_(True)
        pyramid = model.neck(*model.backbone(x))
        size = x.shape[-1]
        pix = torch.arange(size, dtype=torch.float64) + 0.5
        for level, features in pyramid.items():
            h, w = features.shape[-2:]
            out = sums.setdefault(level, np.zeros((h, w, 2)))
            for row in range(h):
                for col in range(w):
                    (grad,) = torch.autograd.grad(features[:, :, row, col].sum(), x, retain_graph=True)
                    weight = grad.abs().sum(1).double()                           # (B, S, S)
                    total = weight.sum(dim=(1, 2))
                    cx = (weight.sum(1) * pix).sum(1) / total
                    cy = (weight.sum(2) * pix).sum(1) / total
                    out[row, col] += np.stack([cx.numpy(), cy.numpy()], 1).sum(0)
        seen += len(batch)
        if seen >= max_images:
            break
    return {level: s / seen for level, s in sums.items()}


def fit_map(centres: np.ndarray, analytic):
    """Least-squares ``pixel = stride c + offset`` through the per-column x and per-row y centroids;
    windows keep the analytic cell size (only where they sit is corrected)."""
    from cstn.models.geometry import CellMap

    h, w, _ = centres.shape
    cells = np.concatenate([np.arange(w), np.arange(h)])
    pixels = np.concatenate([centres[:, :, 0].mean(0), centres[:, :, 1].mean(1)])
    stride, offset = np.polyfit(cells, pixels, 1)
    return CellMap(stride=float(stride), offset=float(offset), cell_size=analytic.extent)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--heldout", required=True, help="data root of the held-out set (its test split is read)")
    p.add_argument("--test", required=True, help="data root of the test split")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_intermixed_args(argv)
    cfg = config_from_args(args)
    if cfg is None:
        return 2
    torch.set_num_threads(2)
    from cstn.evaluation import evaluate
    from cstn.models import build_model
    from pipeline.loader import build_loader

    model = build_model(cfg)
    try:
        checkpoint.load_weights(model, cfg, args.checkpoint)
    except (checkpoint.CheckpointError, checkpoint.CheckpointMismatch, FileNotFoundError) as exc:
        print(f"checkpoint error: {exc}", file=sys.stderr)
        return 2
    analytic = dict(model.cell_maps)

    def loader(root):
        cfg.data.root = root
        return build_loader(cfg, cfg.data.eval_split, 0, 1, train=False, backend="torch")

    try:
        held = loader(args.heldout)
        loader(args.test)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"data error: {exc}", file=sys.stderr)
        return 2
    centres = effective_centres(model, held)
    corrected = {level: fit_map(c, analytic[level]) for level, c in centres.items()}
    result = {"centres": {f"P{lv}": np.round(c, 2).tolist() for lv, c in centres.items()},
              "analytic": {f"P{lv}": vars(m) for lv, m in analytic.items()},
              "corrected": {f"P{lv}": vars(m) for lv, m in corrected.items()}}
    keys = ["gt_known_loc", "gt_known_loc_ref", "top1_loc", "gt_known_loc_small", "gt_known_loc_middle",
            "gt_known_loc_large"]
    for name, maps in (("analytic", analytic), ("corrected", corrected)):
        model.cell_maps = maps
        for split, root in (("heldout", args.heldout), ("test", args.test)):
            metrics = evaluate(model, loader(root), cfg, log_every=0)
            result[f"{split}_{name}"] = {k: round(float(metrics[k]), 2) for k in keys if k in metrics}
    line = json.dumps(result)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
