"""``python -m bench compare BASE.csv NEW.csv [--metric total_s] [--fail-if 10%]``: did a change
make things slower? Per configuration and device, the ratio of NEW's median to BASE's and a
verdict; exit 1 when any configuration regressed (or stopped finishing), for CI, like
pytest-benchmark's ``--benchmark-compare-fail``.

The verdict uses the spread of the repeats, not just the medians. For a metric where lower is
better (times, memory), NEW is a **regression** only when its *best* repeat is worse than
BASE's *worst* by more than the threshold (``min(NEW) > max(BASE) x (1 + t)``), and an
**improvement** only when its worst repeat beats BASE's best by more than the threshold
(``max(NEW) x (1 + t) < min(BASE)``); throughput and accuracy mirror this. Everything else is
**within noise**. Why ranges and not a test statistic: sweeps have 1 to 5 repeats, and with 3
against 3 a permutation test cannot go below p = 0.05 whatever the data, while timings on a
shared machine drift rather than scatter independently. The range rule is conservative (every
NEW repeat must be worse than every BASE repeat, by the margin) and needs no distributional
assumption; with a single repeat on both sides it reduces to the threshold on the ratio, and
the output says that there was no spread to judge by.
"""

from __future__ import annotations

import argparse
import math

import pandas as pd

from flowers_fast.errors import REGRESSION_EXIT_CODE, UserError

from .results import HIGHER_IS_BETTER, METRICS, compatible, data_key, data_label, differences, load, medians, ordered, \
    values

DEFAULT_METRIC = "total_s"
NOT_COMPARED = "not compared"  # the metric does not exist for this configuration on either side


def parse_threshold(text: str) -> float:
    """``10%`` or ``10`` -> 0.10; a UserError naming --fail-if otherwise."""
    raw = str(text).strip()
    number = raw[:-1] if raw.endswith("%") else raw
    try:
        value = float(number) / 100.0
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 0:
        raise UserError(f"--fail-if {text!r}: expected a percentage of 0 or more, e.g. 10%")
    return value


def _column(metric: str) -> str:
    if metric in ("test_accuracy", "accuracy", "acc_pct"):
        return "acc_pct"  # percent, normalised per file
    if metric not in METRICS:
        raise UserError(f"--metric {metric}: not a compared metric; one of {', '.join(METRICS)}")
    return metric


def verdict(base: tuple[float, float, float], new: tuple[float, float, float], threshold: float,
            higher_is_better: bool) -> str:
    """"regression", "improvement" or "within noise" from (median, min, max) of each side."""
    _, b_lo, b_hi = base
    _, n_lo, n_hi = new
    if higher_is_better:
        if n_hi * (1 + threshold) < b_lo:
            return "regression"
        if n_lo > b_hi * (1 + threshold):
            return "improvement"
    else:
        if n_lo > b_hi * (1 + threshold):
            return "regression"
        if n_hi * (1 + threshold) < b_lo:
            return "improvement"
    return "within noise"


def compare(base: pd.DataFrame, new: pd.DataFrame, metric: str = DEFAULT_METRIC,
            threshold: float = 0.10) -> pd.DataFrame:
    """One row per (device, configuration) of either side: BASE and NEW median, min–max and
    repeat count, the ratio NEW/BASE of medians and the verdict."""
    col = _column(metric)
    higher = col in HIGHER_IS_BETTER
    mb, mn = medians(base).set_index(["device", "name"]), medians(new).set_index(["device", "name"])
    keys = list(dict.fromkeys(list(mb.index) + list(mn.index)))
    order = {d: ordered([n for dd, n in keys if dd == d], list(dict.fromkeys(n for _, n in keys))) for d, _ in keys}
    # Each configuration's data keys on each side: a ratio across different data is said in its verdict.
    data = {side: {k: list(dict.fromkeys(data_key(r) for _, r in rows.iterrows()))
                   for k, rows in df.groupby(["device", "name"], sort=False)}
            for side, df in (("BASE", base), ("NEW", new))}
    rows = []
    for device in dict.fromkeys(d for d, _ in keys):
        for name in order[device]:
            b = mb.loc[(device, name)] if (device, name) in mb.index else None
            n = mn.loc[(device, name)] if (device, name) in mn.index else None
            row = {"device": device, "config": name}
            for side, m in (("BASE", b), ("NEW", n)):
                if m is None or not m[col + "_n"]:
                    row[side] = ""
                    row[side + " n"] = 0 if m is None else int(m[col + "_n"])
                    continue
                row[side] = _cell(m[col], m[col + "_lo"], m[col + "_hi"])
                row[side + " n"] = int(m[col + "_n"])
            if b is None:
                row.update(ratio=float("nan"), verdict="new configuration")
            elif n is None:
                row.update(ratio=float("nan"), verdict="missing in NEW")
            elif b[col + "_n"] and not n[col + "_n"]:
                row.update(ratio=float("nan"), verdict="failed in NEW" if n["n_failed"] else f"no {col} in NEW")
            elif not b[col + "_n"] and not n[col + "_n"]:
                # Failing before and after is no regression; a model-only probe has no total_s at all.
                both = b["n_failed"] and n["n_failed"] and not n["n_ok"]
                row.update(ratio=float("nan"), verdict="failed in both" if both else NOT_COMPARED)
            elif not b[col + "_n"]:
                row.update(ratio=float("nan"), verdict=f"n/a (no {col} in BASE)")
            else:
                sides = [(m[col], m[col + "_lo"], m[col + "_hi"]) for m in (b, n)]
                row["ratio"] = n[col] / b[col] if b[col] else float("nan")
                row["verdict"] = verdict(sides[0], sides[1], threshold, higher)
                if b[col + "_n"] < 2 and n[col + "_n"] < 2:
                    row["verdict"] += " (1 run each: no spread, the threshold alone)"
            changed = data_changes(data["BASE"].get((device, name), []), data["NEW"].get((device, name), []))
            if changed:
                row["verdict"] += f" (different data: {changed[0]})"
            rows.append(row)
    out = pd.DataFrame(rows)
    out.attrs.update(metric=col, higher_is_better=higher, threshold=threshold)
    return out


def data_changes(base_keys, new_keys) -> list[str]:
    """How the data or weights of one configuration differ between BASE and NEW (bench.results.DATA)."""
    return list(dict.fromkeys(d for b in base_keys for n in new_keys if not compatible(b, n)
                              for d in differences(b, n)))


def _cell(median: float, lo: float, hi: float) -> str:
    def f(v):
        return f"{v:.4g}"
    return f(median) if lo == hi else f"{f(median)} ({f(lo)}–{f(hi)})"


def failing(table: pd.DataFrame) -> list[str]:
    """Configurations that regressed or stopped finishing."""
    bad = table[table["verdict"].str.startswith(("regression", "failed in NEW"))]
    return [f"{c} on {d}" for d, c in zip(bad["device"], bad["config"])]


def cmd_compare(args) -> int:
    threshold = parse_threshold(args.fail_if)
    base, new = load(args.base), load(args.new)
    table = compare(base, new, args.metric, threshold)
    col = table.attrs["metric"]
    better = "higher" if table.attrs["higher_is_better"] else "lower"
    print(f"{col}: NEW {args.new} vs BASE {args.base}; medians (min–max) over ok repeats; {better} is better; "
          f"threshold {threshold:.0%} beyond the other side's range")
    mids = (values(base, "machine_id"), values(new, "machine_id"))
    if "?" not in mids and mids[0] != mids[1]:
        print(f"note: BASE ran on machine {mids[0]}, NEW on {mids[1]}: the ratios mix hardware and code")
    if table["verdict"].str.contains("(different data: ", regex=False).any():
        print(f"note: BASE and NEW were measured on different data or weights (BASE: {data_label(base)}; NEW: "
              f"{data_label(new)}): the ratios mix data and code; rerun one side on the other's data to compare")
    absent = table[table["verdict"] == NOT_COMPARED]
    shown = table[table["verdict"] != NOT_COMPARED]
    shown = shown.assign(ratio=[f"{r:.3f}" if r == r else "n/a" for r in shown["ratio"]])
    print(shown.to_string(index=False) if len(shown) else f"(no configuration has {col} on both sides)")
    if len(absent):
        print(f"not compared (no {col} on either side): {', '.join(absent['config'])}")
    bad = failing(table)
    if bad:
        print(f"\nregression beyond {threshold:.0%}: {', '.join(bad)}")
        return REGRESSION_EXIT_CODE
    print(f"\nno regression beyond {threshold:.0%}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("compare", help="compare two result CSVs per configuration; exit 1 on a regression",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("base", metavar="BASE", help="the reference results CSV")
    p.add_argument("new", metavar="NEW", help="the results CSV to judge")
    p.add_argument("--metric", default=DEFAULT_METRIC, help="column to compare (times and memory: lower is better; "
                                                            "*_img_s and test_accuracy: higher is better)")
    p.add_argument("--fail-if", default="10%", metavar="PCT",
                   help="a regression is NEW's whole range worse than BASE's by more than this")
    p.set_defaults(func=cmd_compare)
    return p
