"""Evaluation pictures: the box-area histogram (paper Fig. 6/8), box grids (Fig. 5) and per-size bars.

Everything renders off-screen with matplotlib's Agg backend and closes its figure.
Colours follow the paper: ground truth green, reference box (no transform) blue,
transformed (predicted) box red; in the histogram grey bars count the images.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from cstn.metrics.localization import SIZE_GROUPS  # noqa: E402

GT_COLOUR = "#1a9641"
REF_COLOUR = "#2b83ba"
PRED_COLOUR = "#d7191c"
COUNT_COLOUR = "#bdbdbd"



def write_rows_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write dict rows to CSV (columns in first-seen order); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_area_histogram(hist_rows: Sequence[Mapping[str, Any]], path_png: str | Path, path_csv: str | Path,
                        title: str = "") -> tuple[Path, Path]:
    """The paper's Fig. 6/8: images per ground-truth box-area bin and the share localized per bin.

    Args:
        hist_rows: rows of :meth:`cstn.metrics.LocalizationEvaluator.area_histogram`
            (keys ``bin, area_lo, area_hi, count, loc_pct, loc_ref_pct`` and optionally
            ``level``, ``area_unit``, ``metric``); rows of several levels give one panel each.
        path_png, path_csv: outputs; the CSV holds exactly the rows given.
        title: figure title.
    Returns:
        ``(path_png, path_csv)``.

    Per bin, side by side: grey, the number of images (left axis); blue, the percent of
    them localized without the transform (reference boxes, when the rows carry
    ``loc_ref_pct`` values); red, with it (right axis).
    """
    rows = list(hist_rows)
    if not rows:
        raise ValueError("no histogram rows to plot")
    path_png, path_csv = Path(path_png), Path(path_csv)
    write_rows_csv(rows, path_csv)
    levels = list(dict.fromkeys(str(r.get("level", "all")) for r in rows))
    fig, axes = plt.subplots(1, len(levels), figsize=(6.4 * len(levels), 4.2), squeeze=False)
    for ax, level in zip(axes[0], levels):
        part = sorted((r for r in rows if str(r.get("level", "all")) == level), key=lambda r: r["bin"])
        x = np.arange(len(part))
        with_ref = any(_finite(r.get("loc_ref_pct")) for r in part)
        width = 0.27 if with_ref else 0.4
        ax.bar(x - width if with_ref else x - width / 2, [r["count"] for r in part], width=width,
               color=COUNT_COLOUR, label="images")
        ax.set_ylabel("images")
        unit = part[0].get("area_unit", "")
        ax.set_xticks(x)
        ax.set_xticklabels([_area_label(r["area_lo"], r["area_hi"], unit) for r in part], rotation=45,
                           ha="right", fontsize=7)
        ax.set_xlabel("ground-truth box area" + (" (fraction of image)" if unit == "fraction_of_image" else
                                                 " (pixels)" if unit == "pixels" else ""))
        right = ax.twinx()
        loc = [_zero_nan(r.get("loc_pct")) for r in part]
        if with_ref:
            right.bar(x, [_zero_nan(r.get("loc_ref_pct")) for r in part], width=width, color=REF_COLOUR,
                      label="% localized, without transform")
            right.bar(x + width, loc, width=width, color=PRED_COLOUR, label="% localized, with transform")
        else:
            right.bar(x + width / 2, loc, width=width, color=PRED_COLOUR, label="% localized")
        right.set_ylim(0, 100)
        right.set_ylabel("% of the bin localized")
        handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
        right.legend(handles, [h.get_label() for h in handles], loc="lower center", bbox_to_anchor=(0.5, 1.0),
                     ncol=len(handles), fontsize=7, frameon=False)
        metric = part[0].get("metric")
        ax.set_title(" ".join(s for s in (title, "" if level == "all" and len(levels) == 1 else level,
                                          f"[{metric}]" if metric else "") if s), fontsize=9, pad=16)
    fig.tight_layout()
    path_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path_png, dpi=110)
    plt.close(fig)
    return path_png, path_csv


def draw_boxes_grid(images: Sequence[np.ndarray], gt_boxes: Sequence, ref_boxes: Sequence | None,
                    pred_boxes: Sequence | None, path: str | Path, titles: Sequence[str] | None = None,
                    columns: int = 4) -> Path:
    """Images with their boxes, as the paper's figures: ground truth green, reference blue, transformed red.

    Args:
        images: HxWx3 uint8 RGB images (any sizes).
        gt_boxes, ref_boxes, pred_boxes: per image an (n, 4) ``xyxy`` array in that
            image's pixels (x1/y1 exclusive), or None; ``ref_boxes``/``pred_boxes`` may be
            None altogether.
        path: PNG written.
        titles: one caption per image, or None.
        columns: images per row.
    """
    n = len(images)
    if n == 0:
        raise ValueError("no image to draw")
    for name, boxes in (("gt_boxes", gt_boxes), ("ref_boxes", ref_boxes), ("pred_boxes", pred_boxes),
                        ("titles", titles)):
        if boxes is not None and len(boxes) != n:
            raise ValueError(f"{name} has {len(boxes)} entries for {n} images")
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.0 * columns, 3.1 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        ax = axes[i // columns][i % columns]
        image = np.asarray(images[i])
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image {i} must be HxWx3 uint8, got {image.dtype} {image.shape}")
        ax.imshow(image)
        for boxes, colour, style in ((gt_boxes, GT_COLOUR, "-"), (ref_boxes, REF_COLOUR, "--"),
                                     (pred_boxes, PRED_COLOUR, "-")):
            if boxes is None or boxes[i] is None:
                continue
            for x0, y0, x1, y1 in np.asarray(boxes[i], np.float64).reshape(-1, 4):
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour,
                                       linewidth=1.8, linestyle=style))
        ax.set_xlim(-0.5, image.shape[1] - 0.5)
        ax.set_ylim(image.shape[0] - 0.5, -0.5)
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=8)
    legend = [Rectangle((0, 0), 1, 1, fill=False, edgecolor=GT_COLOUR, label="ground truth")]
    if ref_boxes is not None:
        legend.append(Rectangle((0, 0), 1, 1, fill=False, edgecolor=REF_COLOUR, linestyle="--",
                                label="reference (no transform)"))
    if pred_boxes is not None:
        legend.append(Rectangle((0, 0), 1, 1, fill=False, edgecolor=PRED_COLOUR, label="transformed"))
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_size_bars(metrics: Mapping[str, float], path_png: str | Path, path_csv: str | Path | None = None,
                   keys: Sequence[str] = ("top1_loc", "gt_known_loc", "gt_known_top5_loc"), title: str = "") -> Path:
    """Loc figures per object-size third (``<key>_small/_middle/_large`` of ``compute()``) as grouped bars.

    With the reference figures present (``<key>_ref_small``...) a hatched bar shows them
    beside each. ``path_csv`` (optional) gets one row per (metric, size). Keys absent
    from ``metrics`` are skipped; none present is an error.
    """
    series = []
    for key in keys:
        for variant in (key, f"{key}_ref"):
            values = [metrics.get(f"{variant}_{size}") for size in SIZE_GROUPS]
            if all(v is not None for v in values):
                series.append((variant, [float(v) for v in values]))
    if not series:
        raise ValueError(f"metrics hold none of {[f'{k}_small' for k in keys]}")
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(series), 3.8))
    x = np.arange(len(SIZE_GROUPS))
    width = 0.8 / len(series)
    cmap = plt.get_cmap("tab10")
    for i, (name, values) in enumerate(series):
        base = name[:-4] if name.endswith("_ref") else name
        colour = cmap([k for k in keys].index(base) % 10)
        ax.bar(x - 0.4 + width * (i + 0.5), values, width=width, color=colour,
               hatch="//" if name.endswith("_ref") else None, edgecolor="white", label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(SIZE_GROUPS)
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    ax.set_xlabel("object size third (ground-truth box area)")
    path_png = _finish_bar_chart(fig, ax, title, path_png)
    if path_csv is not None:
        write_rows_csv([{"metric": name, "size": size, "value": v}
                        for name, values in series for size, v in zip(SIZE_GROUPS, values)], path_csv)
    return path_png


def plot_mean_sd_bars(rows: Sequence[Mapping[str, Any]], label_key: str, keys: Sequence[str], path_png: str | Path,
                      title: str = "") -> Path:
    """Grouped bars of ``row[key]`` with ``row[key + "_sd"]`` error bars, one group per row (a method or an
    ablation variant, named by ``row[label_key]``), one bar per key present. Values in percent."""
    present = [k for k in keys if any(k in r for r in rows)]
    if not rows or not present:
        raise ValueError(f"no row holds any of {list(keys)}")
    fig, ax = plt.subplots(figsize=(2.0 + 0.9 * len(rows) * max(1, len(present)) / 2, 3.8))
    x = np.arange(len(rows))
    width = 0.8 / len(present)
    cmap = plt.get_cmap("tab10")
    for i, key in enumerate(present):
        values = [float(r.get(key, np.nan)) for r in rows]
        errors = [float(r.get(key + "_sd", 0.0)) for r in rows]
        ax.bar(x - 0.4 + width * (i + 0.5), values, width=width, yerr=errors, capsize=2, color=cmap(i % 10), label=key)
    ax.set_xticks(x)
    ax.set_xticklabels([str(r[label_key]) for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("% (mean ± sd over seeds)")
    path_png = _finish_bar_chart(fig, ax, title, path_png)
    return path_png


def _finish_bar_chart(fig, ax, title: str, path_png: str | Path) -> Path:
    """Legend, optional title, tight layout; save as PNG (parents created) and close the figure."""
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path_png = Path(path_png)
    path_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path_png, dpi=110)
    plt.close(fig)
    return path_png


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def _zero_nan(value) -> float:
    return float(value) if _finite(value) else 0.0


def _area_label(lo: float, hi: float, unit: str) -> str:
    if unit == "fraction_of_image":
        return f"{lo:.2f}-{hi:.2f}"
    return f"{lo:.3g}-{hi:.3g}"
