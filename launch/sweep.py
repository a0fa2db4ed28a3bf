"""The paper's ablations and issue 14's variants on the synthetic set, one command: ``python launch/sweep.py --sweep all --seeds 0 1 2``.

Variants (each an overriding YAML in ``configs/ablations/`` on top of
``configs/synthetic_cstn_base.yaml``, the base itself, or a whole config of :data:`CONFIGS`):

=========  ===========================================================================
sweep      variants
=========  ===========================================================================
head       ``cstn`` (base) vs ``conv_head`` (Table II)
levels     ``level4_only``, ``level5_only`` vs the base's P4+P5 (Fig. 6), and ``level_first``: the
           base's runs with the top-1 level chosen by its mass before the location
           (``eval.level_choice``, an evaluation switch: no extra training)
lambda     ``lambda_0``, ``lambda_1e5``, base (1e-4), ``lambda_1e3``, ``lambda_1e2`` (Table III)
probes     ``probe_alpha5`` (the paper's level hinge), ``probe_theta_lr1`` (theta layers at the
           full rate), ``probe_k5`` (80 px windows on P4): why the transform does not help here
fidelity   ``legacy_fpn`` (the model before issue 14, scored with the corrected boxes), ``authors``
           (``configs/synthetic_cstn_authors.yaml``, the authors' recipe at this scale), the paper's
           level hinge (``probe_alpha5``), and CAM with its maps resampled as Choe et al. do and
           aligned with where its cells look (``cam@cam_aligned``: the protocol's half-cell bias)
claims     what the paper's claims need after the geometry fix: the conv head (Table II), single
           levels (Fig. 6) and lambda 0 (Table III) beside the base
variants   issue 14's attempts to make the levels compete and the box be the object: level balance,
           the shared classifier, Hide-and-Seek and CutMix inputs, combinations, and the evaluation
           switches box voting (``@expected_iou``), the window score map (``@scoremap``) and the
           joint scores read as a class map (``@logitmap_p4``, ``@logitmap``)
=========  ===========================================================================

A name ``A@B`` trains variant ``A`` and evaluates it with the evaluation-only overrides of ``B``
(a YAML with only ``eval:`` keys); such a ``B`` alone means ``base@B``. With and without transform
(Table I) is an evaluation switch: every row carries both (``*_ref``: the same scores and
locations with the reference boxes). Every variant and seed is trained (2 DeepSpeed ranks) on the
demo's data (made when missing) and evaluated (2 ranks) on the held-out set (training
distribution, another seed: ``heldout_*`` columns, the only figures anything is chosen by) and on
the test split; when boxes come from thresholded maps (CAM, or ``eval.box_decoding=scoremap``)
the test threshold is the one best on the held-out set, as in the demo. Everything is logged into one MLflow store ``<out>/mlflow.db`` and
summarised as mean and standard deviation over the seeds in ``<out>/results.json`` (and
``results_<sweep>.json``, kept when another sweep kind runs into the same directory), a bar chart
``results_<sweep>.png`` and a printed table. Finished runs are skipped, so an interrupted sweep
continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo  # noqa: E402  (the demo's data, train and evaluate steps)
from compare import mean_and_spread  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = "configs/synthetic_cstn_base.yaml"
CONFIGS = {"authors": "configs/synthetic_cstn_authors.yaml", "recommended": "configs/synthetic_cstn.yaml",
           "cam": "configs/synthetic_cam.yaml"}
"""Variants trained from a whole config instead of an overlay on :data:`BASE`."""
SWEEPS = {
    "head": ["base", "conv_head"],
    "levels": ["base", "level4_only", "level5_only", "level_first"],
    "lambda": ["lambda_0", "lambda_1e5", "base", "lambda_1e3", "lambda_1e2"],
    "probes": ["base", "probe_alpha5", "probe_theta_lr1", "probe_k5"],
    "fidelity": ["base", "legacy_fpn", "probe_alpha5", "authors", "cam", "cam@cam_aligned"],
    "claims": ["base", "conv_head", "level4_only", "level5_only", "lambda_0"],
    "variants": ["base@expected_iou", "base@scoremap", "base@logitmap_p4", "balanced", "balanced@logitmap_p4",
                 "shared_classifier", "balanced_shared", "has_inputs", "has_inputs@expected_iou",
                 "has_inputs@scoremap", "has_inputs@logitmap_p4", "has_inputs@logitmap", "has_conv_head@logitmap_p4",
                 "cutmix_inputs", "cutmix_inputs@logitmap_p4", "balanced_has", "balanced_has@scoremap",
                 "alpha5_has", "alpha5_has@logitmap_p4"],
}
COLUMNS = ["top1_cls", "top1_loc", "gt_known_loc", "gt_known_loc_ref", "gt_known_top5_loc",
           "gt_known_loc_small", "gt_known_loc_middle", "gt_known_loc_large", "p5_share", "MaxBoxAccV2",
           "heldout_gt_known_loc", "heldout_top1_loc", "heldout_best"]


def level_shares(predictions_csv: Path) -> dict:
    """``p5_share``: percent of test images whose ground-truth-class MAP location lies on P5 (the
    coarse level), from the evaluator's ``predictions.csv``; empty when the run has no level column."""
    import csv

    with open(predictions_csv, newline="") as f:
        levels = [row["gt_known_level"] for row in csv.DictReader(f) if row.get("gt_known_level") not in (None, "")]
    if not levels:
        return {}
    return {"p5_share": 100.0 * sum(int(float(v)) == 5 for v in levels) / len(levels)}


def variant_overrides(name: str) -> list[str]:
    """The ablation YAML flattened to ``key=value`` overrides (values re-dumped as YAML)."""
    if name == "base" or name in CONFIGS:
        return []
    data = yaml.safe_load((ROOT / "configs" / "ablations" / f"{name}.yaml").read_text())
    out = []
    for section, values in data.items():
        for key, value in values.items():
            text = yaml.safe_dump(value, default_flow_style=True).strip()
            out.append(f"{section}.{key}={text.removesuffix('...').strip()}")
    return out


def plan(name: str) -> tuple[str, str, list[str], list[str], str]:
    """``name`` -> (config, trained variant, training overrides, evaluation overrides, evaluation suffix).

    ``A@B`` trains ``A`` and evaluates with ``B``'s (evaluation-only) overrides; a name whose YAML
    holds only ``eval.`` keys means ``base@name``."""
    trained, _, evaluated = name.partition("@")
    if not evaluated and all(c.startswith("eval.") for c in variant_overrides(trained) or ["x"]):
        trained, evaluated = "base", trained
    changes = variant_overrides(trained)
    eval_changes = [c for c in changes if c.startswith("eval.")]
    if evaluated:
        extra = variant_overrides(evaluated)
        if not all(c.startswith("eval.") for c in extra):
            raise SystemExit(f"sweep: {evaluated!r} after '@' must hold only eval.* keys, got {extra}")
        eval_changes += extra
    config = CONFIGS.get(trained, BASE)
    return config, trained, [c for c in changes if not c.startswith("eval.")], eval_changes, \
        (f"_{evaluated}" if evaluated else "")


def run_variant(name: str, seed: int, out: Path, shards: Path, heldout: Path, size: dict) -> dict:
    """Train (once) and evaluate one variant and seed on the held-out set and the test split."""
    config, trained, changes, eval_changes, suffix = plan(name)
    run = f"{trained}_seed{seed}"
    overrides = [*size["overrides"], *changes, f"train.seed={seed}", "log.experiment=sweep"]
    demo.train(config, run, out, shards, overrides)
    held = demo.evaluate(config, run, out, heldout, overrides, f"heldout{suffix}", extra=eval_changes)
    if demo.thresholds_maps(config, [*overrides, *eval_changes]):  # the map threshold comes from the held-out set
        eval_changes = [*eval_changes, f"eval.cam_fixed_threshold={float(held['cam_best_threshold_iou50'])}"]
    metrics = demo.evaluate(config, run, out, shards, overrides, f"test{suffix}", extra=eval_changes)
    # what variants are chosen by: GT-Known Loc on the held-out set, at the best map threshold there for
    # map decodings (MaxBoxAcc: the box accuracy at IoU 0.5 of the best threshold, Choe et al.)
    best = held["cam_MaxBoxAcc"] if "cam_MaxBoxAcc" in held else held["gt_known_loc"]
    metrics = {**metrics, **level_shares(out / run / f"eval_test{suffix}" / "predictions.csv"),
               "heldout_gt_known_loc": held["gt_known_loc"], "heldout_top1_loc": held["top1_loc"],
               "heldout_best": best}
    if "cam_MaxBoxAccV2" in metrics:
        metrics["MaxBoxAccV2"] = metrics["cam_MaxBoxAccV2"]
    return metrics


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", choices=[*SWEEPS, "all"], default="all")
    p.add_argument("--variants", nargs="+", default=None, help="run these variants instead of a --sweep list")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--data", default=None, help="demo output dir whose data/ to reuse (default: <out>)")
    p.add_argument("--tiny", action="store_true", help="a few images and steps (CI)")
    args = p.parse_args(argv)
    size = demo.use_size(demo.TINY if args.tiny else demo.FULL)
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shards, heldout = demo.make_data(Path(args.data).resolve() if args.data else out, size, seed=0)
    label = "custom" if args.variants else args.sweep
    names = args.variants or list(dict.fromkeys(v for s in (SWEEPS if args.sweep == "all" else [args.sweep])
                                                for v in SWEEPS[s]))
    t0 = time.time()
    rows = []
    for name in names:
        per_seed = [run_variant(name, seed, out, shards, heldout, size) for seed in args.seeds]
        rows.append({"variant": name, "seeds": args.seeds, **mean_and_spread(per_seed, COLUMNS)})
        for name_ in ("results.json", f"results_{label}.json"):  # the latest sweep, and per sweep kind
            (out / name_).write_text(json.dumps(rows, indent=2))

    print(f"\nSweep on the synthetic set, test split, IoU 0.5, seeds {args.seeds} "
          f"({time.time() - t0:.0f}s):")
    width = max([len("variant")] + [len(r["variant"]) for r in rows])
    print("  " + "variant".ljust(width) + "".join(f"{c:>22}" for c in COLUMNS))
    for r in rows:
        cells = (f"{r[c]:.1f} ± {r[c + '_sd']:.1f}" if c in r else "-" for c in COLUMNS)
        print("  " + r["variant"].ljust(width) + "".join(f"{c:>22}" for c in cells))
    if rows:
        from cstn.viz import plot_mean_sd_bars

        plot_mean_sd_bars(rows, "variant", ["gt_known_loc", "gt_known_loc_ref", "gt_known_loc_small",
                                            "gt_known_loc_large"], out / f"results_{label}.png",
                          title=f"sweep {label}, seeds {args.seeds}")
    print(f"\nwrote {out / 'results.json'}; MLflow: mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
