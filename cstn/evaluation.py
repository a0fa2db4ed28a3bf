"""The distributed evaluation loop: every rank evaluates its shards, one gather at the end.

Contract (DESIGN.md section 5): no collective inside the loop; each rank keeps
per-image results keyed by the global sample index; one ``all_gather_object`` at the
end; rank 0 keeps each index once, checks the merged count against the manifest
total (failing loudly, naming both numbers), computes the metrics and writes
``metrics.json``, the predictions file and the plots. Results do not depend on the
world size.

Boxes: the model predicts on the square input grid; they are mapped to original
pixels with :func:`pipeline.schema.boxes_to_original` before any IoU, so every metric
is computed in the frame of the ground truth.

CAM-family models are scored through the same box metrics (boxes from the class map
of the predicted class / true class at ``eval.cam_fixed_threshold``) plus MaxBoxAcc and
MaxBoxAccV2 over the maps of the true class in the input frame (Choe et al.).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from cstn import dist
from cstn.config import Config
from pipeline.schema import boxes_to_input, boxes_to_original


def _autocast(device: torch.device, precision: str):
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return torch.autocast("cpu", enabled=False)


def normalised_class_maps(cams: torch.Tensor, classes: torch.Tensor, size: int, cell_map=None) -> torch.Tensor:
    """(B, C, h, w) CAMs -> (B, size, size) maps of the given classes, bilinear, min-max to [0, 1].

    ``cell_map`` None resamples as ``cv2.resize`` does (Choe et al.'s protocol: map cell ``c``
    centred at input pixel ``(c + 0.5) size / h``); a :class:`~cstn.models.geometry.CellMap`
    centres cell ``c`` where the network's cell looks, ``stride c + offset``
    (``eval.cam_upsample=aligned``, the measurement of the protocol's half-cell bias)."""
    maps = cams[torch.arange(cams.shape[0], device=cams.device), classes].float().unsqueeze(1)
    if cell_map is None:
        maps = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
    else:
        h, w = maps.shape[-2:]
        pixel = torch.arange(size, dtype=torch.float32, device=maps.device) + 0.5
        cells = (pixel - cell_map.offset) / cell_map.stride                         # cell-index coordinates

        def norm(c, n):
            return 2 * c / max(n - 1, 1) - 1
        gy, gx = torch.meshgrid(norm(cells, h), norm(cells, w), indexing="ij")
        grid = torch.stack([gx, gy], dim=-1).expand(maps.shape[0], -1, -1, -1)
        maps = F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=True)
    maps = maps.squeeze(1)
    flat = maps.flatten(1)
    lo = flat.min(dim=1).values[:, None, None]
    hi = flat.max(dim=1).values[:, None, None]
    return (maps - lo) / (hi - lo).clamp_min(1e-12)


@dataclass
class Scored:
    """One batch's decoded predictions, the same fields for every model family (input pixels).

    topk_classes, topk_scores: (B, k). top1, known: (B, 4) boxes of the predicted and of the true
    class; known_topk: (B, m, 4). ref_top1, ref_known: (B, 4) the same without the transform, or
    None. levels, known_levels: (B,) FPN levels of the chosen locations, or None. true_maps: (B, S, S)
    float maps of the true class for MaxBoxAcc, or None (map-free decodings).
    """

    topk_classes: torch.Tensor
    topk_scores: torch.Tensor
    top1: torch.Tensor
    known: torch.Tensor
    known_topk: torch.Tensor
    ref_top1: Optional[torch.Tensor] = None
    ref_known: Optional[torch.Tensor] = None
    levels: Optional[torch.Tensor] = None
    known_levels: Optional[torch.Tensor] = None
    true_maps: Optional[np.ndarray] = None


def _threshold_boxes(maps: np.ndarray, threshold: float) -> torch.Tensor:
    """The box around the largest region of each (S, S) map at ``threshold`` (Choe et al.)."""
    from cstn.metrics import cam_boxes

    return torch.as_tensor(np.stack([cam_boxes(m, threshold)[0] for m in maps]), dtype=torch.float64)


def score_cam(model, output, labels: torch.Tensor, cfg: Config) -> Scored:
    """CAM family: class scores from the pooled maps; boxes by thresholding the normalised class map
    at ``eval.cam_fixed_threshold``; the true class's maps go to MaxBoxAcc."""
    size = cfg.data.image_size
    probs = output.logits.float().softmax(dim=1)
    topk_scores, topk_classes = probs.topk(min(cfg.eval.topk, probs.shape[1]), dim=1)
    cell_map = getattr(model, "cell_map", None) if cfg.eval.cam_upsample == "aligned" else None
    pred_maps = normalised_class_maps(output.cams, topk_classes[:, 0], size, cell_map).cpu().numpy()
    true_maps = normalised_class_maps(output.cams, labels, size, cell_map).cpu().numpy()
    thr = cfg.eval.cam_fixed_threshold
    known = _threshold_boxes(true_maps, thr)
    return Scored(topk_classes, topk_scores, _threshold_boxes(pred_maps, thr), known, known[:, None, :],
                  true_maps=true_maps)


def score_cstn(output, labels: torch.Tensor, cfg: Config) -> Scored:
    """CSTN family: the MAP (or box-voting) location of p(c, l, s) and its box. With
    ``eval.box_decoding`` ``scoremap`` or ``logitmap`` the Top-1 and GT-known boxes threshold a
    class map at ``eval.cam_fixed_threshold`` like CAM's, and the true class's maps go to
    MaxBoxAcc: the window score map (:func:`cstn.inference.window_score_maps`; without transform: the
    same from the reference windows) or the joint scores read as a map
    (:func:`cstn.inference.location_score_maps`; it has no reference version). Top-k boxes and levels
    are the MAP locations' in every decoding."""
    from cstn.inference import location_score_maps, predict, window_score_maps

    e = cfg.eval
    pred = predict(output, labels=labels, topk=e.topk, use_transform=e.use_transform,
                   level_choice=e.level_choice, decoding=e.box_decoding)
    scored = Scored(pred.topk_classes, pred.topk_scores, pred.top1_box, pred.gt_known_box, pred.gt_known_topk_boxes,
                    pred.top1_ref_box, pred.gt_known_ref_box, pred.top1_level, pred.gt_known_level)
    if e.box_decoding not in ("scoremap", "logitmap"):
        return scored
    joint = output.joint_log_probs()
    size = (cfg.data.image_size, cfg.data.image_size)
    thr = e.cam_fixed_threshold

    def maps(classes, boxes=None):
        row = joint.gather(1, classes[:, None, None].to(joint.device).expand(-1, 1, joint.shape[2]))[:, 0]
        if e.box_decoding == "logitmap":
            return location_score_maps(row, output, size, e.logitmap_levels or None).cpu().numpy()
        return window_score_maps(row, boxes, size, e.scoremap_temperature).cpu().numpy()

    labels = labels.to(joint.device).long()
    top1_class = pred.topk_classes[:, 0]
    boxes = output.boxes if e.use_transform else output.ref_boxes
    true_maps = maps(labels, boxes)
    scored.top1, scored.known = _threshold_boxes(maps(top1_class, boxes), thr), _threshold_boxes(true_maps, thr)
    if e.box_decoding == "scoremap":
        scored.ref_top1 = _threshold_boxes(maps(top1_class, output.ref_boxes), thr)
        scored.ref_known = _threshold_boxes(maps(labels, output.ref_boxes), thr)
    else:
        scored.ref_top1 = scored.ref_known = None
    scored.true_maps = true_maps
    return scored


def box_predictions(scored: Scored, batch, gt_boxes: list, size: int):
    """One batch's :class:`Scored` (input pixels) as the localization evaluator's record, every box
    mapped to original pixels (:func:`pipeline.schema.boxes_to_original`)."""
    from cstn.metrics import BoxPredictions

    w64, h64 = batch.sizes[:, 0].double().cpu(), batch.sizes[:, 1].double().cpu()

    def original(boxes):  # (B, ..., 4) input pixels -> numpy original pixels, None stays None
        if boxes is None:
            return None
        flat = boxes.double().cpu()
        return boxes_to_original(flat if flat.dim() == 3 else flat[:, None, :], w64, h64, size).reshape(
            boxes.shape).numpy()

    def numpy(t):
        return None if t is None else t.cpu().numpy()

    return BoxPredictions(
        indices=numpy(batch.indices), labels=numpy(batch.labels), topk_classes=numpy(scored.topk_classes),
        top1_box=original(scored.top1), gt_known_box=original(scored.known),
        gt_known_topk_boxes=original(scored.known_topk), gt_boxes=gt_boxes,
        top1_ref_box=original(scored.ref_top1), gt_known_ref_box=original(scored.ref_known),
        levels=numpy(scored.levels), gt_known_levels=numpy(scored.known_levels),
        keys=getattr(batch, "keys", None), topk_scores=numpy(scored.topk_scores.float()),
        sizes=numpy(batch.sizes))


def choe_frame_boxes(gt_boxes: list, batch, size: int) -> list:
    """Ground-truth boxes in Choe et al.'s frame for MaxBoxAcc: scaled to the ``size`` map and
    truncated to integers (:func:`cstn.metrics.wsol_resize_boxes`)."""
    from cstn.metrics import wsol_resize_boxes

    sizes = batch.sizes.cpu().numpy()
    return [wsol_resize_boxes(b, float(w), float(h), size) for b, (w, h) in zip(gt_boxes, sizes)]


def collect_viz(viz: dict[str, list], batch, gt_boxes: list, scored: Scored, size: int, limit: int) -> None:
    """Keep the first ``limit`` images with their ground truth and GT-known boxes (input pixels) for
    the ``boxes.png`` grid."""
    take = min(len(batch), limit - len(viz["images"]))
    if take <= 0:
        return
    images = batch.images[:take].permute(0, 2, 3, 1).cpu().numpy()
    sizes = batch.sizes.cpu().numpy()
    for j in range(take):
        viz["images"].append(images[j])
        viz["gt"].append(boxes_to_input(np.asarray(gt_boxes[j], np.float64).reshape(-1, 4),
                                        float(sizes[j, 0]), float(sizes[j, 1]), size))
        viz["pred"].append(scored.known[j:j + 1].double().cpu().numpy())
        viz["ref"].append(None if scored.ref_known is None else scored.ref_known[j:j + 1].double().cpu().numpy())
        viz["titles"].append(f"#{int(batch.indices[j])} y={int(batch.labels[j])}")


def uses_maps(cfg: Config) -> bool:
    """Whether the evaluation thresholds maps (CAM family, or CSTN with ``box_decoding`` ``scoremap``
    or ``logitmap``): then MaxBoxAcc/V2 and the best thresholds are reported too."""
    from cstn.models import is_cam_family

    return is_cam_family(cfg.model.arch) or cfg.eval.box_decoding in ("scoremap", "logitmap")


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, cfg: Config, max_batches: int | None = None,
             out_dir: str | Path | None = None, expected_total: int | None = None,
             expected_boxes: int | None = None, precision: str = "fp32",
             log_every: int = 50, split_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluate ``model`` over this rank's part of ``loader``; returns the merged metrics on every rank.

    Args:
        model: the bare module (``engine.module`` under DeepSpeed).
        loader: an evaluation loader (``build_loader(cfg, split, rank, world, train=False)``).
        max_batches: stop early (dry runs); the count check is skipped then.
        out_dir: where rank 0 writes ``metrics.json``, ``predictions.csv`` and the plots (None: nowhere).
        expected_total: the manifest's sample count; the merged count must equal it.
        expected_boxes: the manifest's box count; the merged box count must equal it.
        log_every: rank 0 prints a progress line (img/s, ETA) every this many batches (0 = never).
        split_dir: the evaluated split's directory; its sample keys fill the predictions table's
            ``key`` column (read from its DALI indexes by :func:`pipeline.dali_index.split_keys`).
    """
    from cstn.models import is_cam_family
    from cstn.metrics import LocalizationEvaluator, MaxBoxAccEvaluator
    from cstn.progress import Progress

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    size = cfg.data.image_size
    if is_cam_family(cfg.model.arch):
        score = lambda output, labels: score_cam(model, output, labels, cfg)  # noqa: E731
    else:
        score = lambda output, labels: score_cstn(output, labels, cfg)  # noqa: E731
    loc = LocalizationEvaluator.from_config(cfg)
    maxbox = MaxBoxAccEvaluator.from_config(cfg) if uses_maps(cfg) else None
    viz: dict[str, list] = {"images": [], "gt": [], "ref": [], "pred": [], "titles": []}
    t_data = t_model = t_metric = 0.0
    t_last = time.perf_counter()
    seen = 0
    progress = Progress(len(loader), dist.world_size(), header="eval")
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        t0 = time.perf_counter()
        t_data += t0 - t_last
        progress.data_ready()
        batch = batch.to(device)
        with _autocast(device, precision):
            output = model(batch.images)
        t1 = time.perf_counter()
        t_model += t1 - t0
        gt_boxes = batch.gt_boxes_list()
        scored = score(output, batch.labels)
        if maxbox is not None:
            maxbox.accumulate(scored.true_maps, choe_frame_boxes(gt_boxes, batch, size),
                              indices=batch.indices.cpu().numpy())
        loc.accumulate(box_predictions(scored, batch, gt_boxes, size))
        if dist.is_main():
            collect_viz(viz, batch, gt_boxes, scored, size, cfg.eval.viz_samples)
        seen += len(batch)
        t_last = time.perf_counter()
        progress.step_done(len(batch), {})
        if dist.is_main() and log_every and (i + 1) % log_every == 0:
            print(progress.line(i + 1), flush=True)
        t_metric += t_last - t1

    # -- the single gather -----------------------------------------------------
    states = dist.all_gather_object({"loc": loc.state(), "maxbox": maxbox.state() if maxbox else None,
                                     "times": (t_data, t_model, t_metric, seen)})
    metrics: dict[str, Any] = {}
    if dist.is_main():
        try:
            metrics = _merge_and_compute(states, cfg, maxbox is not None, viz, out_dir,
                                         expected_total if max_batches is None else None,
                                         expected_boxes if max_batches is None else None, split_dir)
        except (ValueError, RuntimeError) as exc:  # every rank must learn of it, or they wait forever
            metrics = {"__error__": str(exc)}
    metrics = dist.broadcast_object(metrics)
    model.train(was_training)
    if "__error__" in metrics:
        raise RuntimeError(metrics["__error__"])
    return metrics


def _merge_and_compute(states, cfg: Config, with_maxbox: bool, viz, out_dir, expected_total, expected_boxes,
                       split_dir=None):
    """Rank 0: keep each index once, check the counts, compute, write the outputs."""
    from cstn.metrics import LocalizationEvaluator, MaxBoxAccEvaluator

    merged = LocalizationEvaluator.merge([s["loc"] for s in states])
    metrics = merged.compute(expected_total=expected_total, expected_boxes=expected_boxes, contiguous=True)
    if with_maxbox:
        mb = MaxBoxAccEvaluator.merge([s["maxbox"] for s in states])
        metrics.update({f"cam_{k}": v for k, v in mb.compute().items() if isinstance(v, (int, float))})
    times = np.array([s["times"] for s in states], np.float64)
    metrics["eval_images_read"] = int(times[:, 3].sum())  # with DALI's padding duplicates, if any
    metrics["eval_time_data_s"] = float(times[:, 0].max())
    metrics["eval_time_model_s"] = float(times[:, 1].max())
    metrics["eval_time_metrics_s"] = float(times[:, 2].max())
    if out_dir is not None:
        write_outputs(merged, metrics, viz, Path(out_dir), cfg, split_dir)
    return metrics


def write_outputs(merged, metrics: dict[str, Any], viz: dict[str, list], out_dir: Path, cfg: Config,
                  split_dir=None) -> None:
    """``predictions.csv``, the per-level area histograms, the box picture grid, then ``metrics.json``.

    ``metrics.json`` is written last and atomically (temporary file + rename): when it exists, the
    evaluation that wrote it completed; an evaluation killed on the way leaves none (re-run it).
    """
    from cstn import viz as plots

    out_dir.mkdir(parents=True, exist_ok=True)
    stale = out_dir / "metrics.json"
    if stale.exists():  # from an earlier evaluation into this directory: not valid for this one until rewritten
        stale.unlink()
    keys = None
    if split_dir is not None:
        from pipeline.dali_index import split_keys

        keys = split_keys(split_dir)
    merged.write_predictions(out_dir / "predictions.csv", keys)
    for level, rows in merged.area_histograms(bins=cfg.eval.hist_bins).items():
        name = "all" if level is None else f"P{level}"
        plots.plot_area_histogram(rows, out_dir / f"area_hist_{name}.png", out_dir / f"area_hist_{name}.csv",
                                  title=f"localization by GT box area ({name})")
    if viz["images"]:
        plots.draw_boxes_grid(viz["images"], viz["gt"], viz["ref"], viz["pred"], out_dir / "boxes.png",
                              titles=viz["titles"])
    tmp = out_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    os.replace(tmp, out_dir / "metrics.json")
