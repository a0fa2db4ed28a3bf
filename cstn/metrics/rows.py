"""Per-image rows keyed by the global sample index, and the exactly-once contract over them.

Both evaluators (:mod:`cstn.metrics.localization`, :mod:`cstn.metrics.maxboxacc`) store per-image
rows (a dict of equal-length numpy arrays with an ``index`` column), not running sums, so that the
distributed merge can keep each image once (DESIGN.md section 5). :func:`exactly_once` is the one
place that merge and the count check happen; the evaluation loop reaches it through the
evaluators' ``compute``. The small array and threshold helpers both evaluators share live here too.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

__all__ = ["as_numpy", "check_thresholds", "concat_rows", "exactly_once", "iou_suffix"]


def iou_suffix(threshold: float) -> str:
    """Metric-name suffix of an IoU threshold: ``0.3 -> "_iou30"``, ``0.5 -> "_iou50"``."""
    return f"_iou{int(round(threshold * 100)):02d}"


def as_numpy(value, dtype=None) -> np.ndarray:
    """A numpy copy-free view of a numpy array, torch tensor (any device) or sequence."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    return array.astype(dtype, copy=False) if dtype is not None else array


def check_thresholds(values: Iterable[float], what: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if not out:
        raise ValueError(f"{what} is empty")
    if any(not (0.0 <= v <= 1.0) for v in out):
        raise ValueError(f"{what} must lie in [0, 1], got {list(out)}")
    if len(set(out)) != len(out):
        raise ValueError(f"{what} has repeated values: {list(out)}")
    return out


def concat_rows(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
    """The parts' rows one after the other (None for no part)."""
    if not parts:
        return None
    if len(parts) == 1:
        return dict(parts[0])
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def exactly_once(rows: dict[str, np.ndarray], owner: str, expected_total: int | None = None,
                 contiguous: bool = False, what: str = "images") -> dict[str, np.ndarray]:
    """``rows`` sorted by ``index`` with each index once, checked against the expected count.

    A repeated index with identical values (the loader's padding, or an image two ranks both
    read) is kept once; the same index with different values raises ValueError naming it (and its
    sample key when the rows carry one). With ``expected_total`` the number of distinct indices must
    equal it; with ``contiguous`` too, they must be exactly ``0 .. expected_total - 1`` (the
    loader's global indices over a split), and the error lists the first missing and unexpected
    ones, which lead to their shard through the split's manifest.
    """
    index = rows["index"]
    order = np.argsort(index, kind="stable")
    sorted_index = index[order]
    first = np.ones(len(index), bool)
    first[1:] = sorted_index[1:] != sorted_index[:-1]
    if not first.all():
        dup = np.flatnonzero(~first)
        group_first = np.maximum.accumulate(np.where(first, np.arange(len(index)), 0))[dup]
        a, b = order[dup], order[group_first]
        for name, values in rows.items():
            if name == "index":
                continue
            x, y = values[a], values[b]
            if values.dtype == object:
                same = x == y
            else:
                same = (x == y) | (np.isnan(x) & np.isnan(y)) if values.dtype.kind == "f" else x == y
            same = same.reshape(len(dup), -1).all(axis=1)
            if not same.all():
                bad = int(np.flatnonzero(~same)[0])
                key = rows.get("key")
                name_key = f" (key {key[a[bad]]})" if key is not None and key[a[bad]] else ""
                raise ValueError(f"{owner}: global index {int(index[a[bad]])}{name_key} was evaluated twice with "
                                 f"different '{name}' values; the loader must give each index one sample")
    keep = order[first]
    if len(keep) == len(index) and (np.diff(index) > 0).all():  # already unique and sorted: no copy
        unique = dict(rows)
    else:
        unique = {name: values[keep] for name, values in rows.items()}
    if expected_total is not None:
        _check_count(unique["index"], int(expected_total), contiguous, what)
    return unique


def _check_count(indices: np.ndarray, expected_total: int, contiguous: bool, what: str, show: int = 10) -> None:
    n = len(indices)
    in_range = n == 0 or (indices[0] >= 0 and indices[-1] < expected_total)  # indices are sorted and unique
    if n == expected_total and (in_range or not contiguous):
        return
    head = f"merged evaluation holds {n} distinct {what} but the manifest total is {expected_total}"
    if not contiguous:
        raise ValueError(f"{head}: images were lost or added between the loader and the evaluator")
    missing = np.setdiff1d(np.arange(expected_total, dtype=np.int64), indices)
    extra = indices[(indices < 0) | (indices >= expected_total)]
    parts = [head]
    if len(missing):
        parts.append(f"{len(missing)} missing, first indices {missing[:show].tolist()}")
    if len(extra):
        parts.append(f"{len(extra)} outside 0..{expected_total - 1}, first {extra[:show].tolist()}")
    raise ValueError("; ".join(parts) + " (a skipped corrupt sample is named with its shard in the reader's "
                     "warnings; data.on_corrupt=fail stops at it instead)")
