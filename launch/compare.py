"""The methods side by side over seeds: ``make compare`` (or ``python launch/compare.py runs/demo_seed0 ...``).

Reads the ``results.json`` of several demo runs (``launch/demo.py --seed S --methods all
--out runs/demo_seedS``: CSTN, CSTN without transform, CAM and the comparison methods HaS, ACoL,
SPG, ADL and CutMix on the synthetic set), and prints and writes the mean and standard deviation
of each metric per method over the runs (``--out``, default ``runs/compare/results.json``, and a
bar chart with the spread beside it, ``results.png``).
A method missing from some run is averaged over the runs that have it, and its seed count says so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from cstn.viz import plot_mean_sd_bars

METRICS = [("top1_cls", "Top-1 Class"), ("top1_loc", "Top-1 Loc"), ("gt_known_loc", "GT-Known Loc"),
           ("MaxBoxAccV2", "MaxBoxAccV2")]


def mean_and_spread(samples: list[dict], keys) -> dict:
    """``<key>`` (mean) and ``<key>_sd`` (sample standard deviation, 0 for one sample), rounded to
    2 decimals, for each key some sample holds with a value; keys no sample holds are left out."""
    out = {}
    for key in keys:
        values = [float(s[key]) for s in samples if s.get(key) is not None]
        if values:
            out[key] = round(statistics.mean(values), 2)
            out[key + "_sd"] = round(statistics.stdev(values), 2) if len(values) > 1 else 0.0
    return out


def aggregate(results: list[list[dict]]) -> list[dict]:
    """Rows of several ``results.json`` files -> one row per method (first-seen order) with
    ``<metric>`` (mean), ``<metric>_sd`` (sample standard deviation, 0 for one run) and ``runs``."""
    by_method: dict[str, list[dict]] = {}
    for rows in results:
        for r in rows:
            by_method.setdefault(r["method"], []).append(r)
    return [{"method": method, "runs": len(rows), **mean_and_spread(rows, [k for k, _ in METRICS])}
            for method, rows in by_method.items()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="demo output directories (each with results.json)")
    p.add_argument("--out", default="runs/compare/results.json")
    args = p.parse_args(argv)
    results = []
    for run in args.runs:
        path = Path(run) / "results.json"
        if not path.is_file():
            print(f"data error: {path} is missing (run launch/demo.py --out {run} --methods all first)", file=sys.stderr)
            return 2
        results.append(json.loads(path.read_text()))
    rows = aggregate(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    width = max(len(r["method"]) for r in rows)
    print(f"Synthetic set, test split, IoU 0.5, mean ± sd over {len(args.runs)} run(s):")
    print("  " + "method".ljust(width) + "  runs" + "".join(f"  {title:>14}" for _, title in METRICS))
    for r in rows:
        cells = (f"{r[k]:.1f} ± {r[k + '_sd']:.1f}" if k in r else "-" for k, _ in METRICS)
        print("  " + r["method"].ljust(width) + f"  {r['runs']:>4}" + "".join(f"  {c:>14}" for c in cells))
    plot = plot_mean_sd_bars(rows, "method", [k for k, _ in METRICS[1:]], out.with_suffix(".png"),
                             title=f"synthetic set, IoU 0.5, {len(args.runs)} run(s)")
    print(f"wrote {out} and {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
