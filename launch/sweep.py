"""The paper's ablations on the synthetic set, one command: ``python launch/sweep.py --sweep all --seeds 0 1 2``.

Variants (each an overriding YAML in ``configs/ablations/`` on top of
``configs/synthetic_cstn.yaml``, or the base itself):

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
=========  ===========================================================================

With and without transform (Table I) is an evaluation switch: every row carries both
(``*_ref``: the same scores and locations with the reference boxes). Every variant and seed
is trained (2 DeepSpeed ranks) and evaluated (2 ranks) on the demo's data (made when
missing), logged into one MLflow store ``<out>/mlflow.db``, and summarised as mean and
standard deviation over the seeds in ``<out>/results.json`` (and ``results_<sweep>.json``, kept when
another sweep kind runs into the same directory), a bar chart ``results_<sweep>.png`` and a printed table. Finished
runs are skipped, so an interrupted sweep continues where it stopped.
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
BASE = "configs/synthetic_cstn.yaml"
SWEEPS = {
    "head": ["base", "conv_head"],
    "levels": ["base", "level4_only", "level5_only", "level_first"],
    "lambda": ["lambda_0", "lambda_1e5", "base", "lambda_1e3", "lambda_1e2"],
    "probes": ["base", "probe_alpha5", "probe_theta_lr1", "probe_k5"],
}
COLUMNS = ["top1_cls", "top1_loc", "gt_known_loc", "gt_known_loc_ref", "gt_known_top5_loc",
           "gt_known_loc_small", "gt_known_loc_middle", "gt_known_loc_large", "p5_share"]


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
    if name == "base":
        return []
    data = yaml.safe_load((ROOT / "configs" / "ablations" / f"{name}.yaml").read_text())
    out = []
    for section, values in data.items():
        for key, value in values.items():
            text = yaml.safe_dump(value, default_flow_style=True).strip()
            out.append(f"{section}.{key}={text.removesuffix('...').strip()}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", choices=[*SWEEPS, "all"], default="all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--data", default=None, help="demo output dir whose data/ to reuse (default: <out>)")
    p.add_argument("--tiny", action="store_true", help="a few images and steps (CI)")
    args = p.parse_args(argv)
    size = demo.TINY if args.tiny else demo.FULL
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shards, _ = demo.make_data(Path(args.data).resolve() if args.data else out, size, seed=0)
    names = list(dict.fromkeys(v for s in (SWEEPS if args.sweep == "all" else [args.sweep])
                               for v in SWEEPS[s]))
    t0 = time.time()
    rows = []
    for name in names:
        changes = variant_overrides(name)
        # an evaluation switch: the base's trained runs, evaluated once more with the switch
        eval_only = bool(changes) and all(c.startswith("eval.") for c in changes)
        per_seed = []
        for seed in args.seeds:
            seeded = [f"train.seed={seed}", "log.experiment=sweep"]
            if eval_only:
                run, eval_name, extra = f"base_seed{seed}", f"test_{name}", changes
                overrides = [*size["overrides"], *seeded]
            else:
                run, eval_name, extra = f"{name}_seed{seed}", "test", []
                overrides = [*size["overrides"], *changes, *seeded]
            demo.train(BASE, run, out, shards, overrides)
            metrics = demo.evaluate(BASE, run, out, shards, overrides, eval_name, extra=extra)
            per_seed.append({**metrics, **level_shares(out / run / f"eval_{eval_name}" / "predictions.csv")})
        rows.append({"variant": name, "seeds": args.seeds, **mean_and_spread(per_seed, COLUMNS)})
        for name_ in ("results.json", f"results_{args.sweep}.json"):  # the latest sweep, and per sweep kind
            (out / name_).write_text(json.dumps(rows, indent=2))

    print(f"\nSweep on the synthetic set, test split, IoU 0.5, seeds {args.seeds} "
          f"({time.time() - t0:.0f}s):")
    print("  " + "variant".ljust(14) + "".join(f"{c:>22}" for c in COLUMNS))
    for r in rows:
        cells = (f"{r[c]:.1f} ± {r[c + '_sd']:.1f}" if c in r else "-" for c in COLUMNS)
        print("  " + r["variant"].ljust(14) + "".join(f"{c:>22}" for c in cells))
    if rows:
        from cstn.viz import plot_mean_sd_bars

        plot_mean_sd_bars(rows, "variant", ["gt_known_loc", "gt_known_loc_ref", "gt_known_loc_small",
                                            "gt_known_loc_large"], out / f"results_{args.sweep}.png",
                          title=f"sweep {args.sweep}, seeds {args.seeds}")
    print(f"\nwrote {out / 'results.json'}; MLflow: mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
