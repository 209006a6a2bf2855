"""``python -m bench recommend``: pick the configuration to use on a device.

Among the configurations that finished on that device (medians over ok repeats), keep those
whose test accuracy is within ``--max-acc-drop`` percentage points of the most accurate one,
then take the best by the objective: least total time, most training images/s, or least peak
memory. Ties go to the other objectives in turn, then the name, and the reason says so.
"""

from __future__ import annotations

import argparse
import math
import shlex

import pandas as pd

from flowers_fast.clikit import finite_float
from flowers_fast.errors import DataError, UserError, invoked

from .results import DEFAULT_CSV, groups, load, medians, text

# objective -> (column, larger is better, words, unit)
OBJECTIVES = {
    "total-time": ("total_s", False, "total time", "s"),
    "throughput": ("train_img_s", True, "training throughput", "img/s"),
    "memory": ("peak_rss_mb", False, "peak memory", "MB"),
}


def _fmt(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value:.3g} s" if value < 100 else f"{value:.0f} s"
    return f"{value:.0f} {unit}"


def noise_points(df: pd.DataFrame, device: str, accuracies: pd.Series) -> tuple[float, int]:
    """Two standard errors of the difference of two accuracies on this test set, in points, and
    the test-set size: accuracy gaps below it are what the test set cannot resolve."""
    if "test_images" not in df.columns:
        return 0.0, 0
    rows = df[(df["device"] == device) & (df["status"] == "ok")]
    n = pd.to_numeric(rows["test_images"], errors="coerce").median()
    if not n or math.isnan(n):
        return 0.0, 0
    p = min(max(float(accuracies.mean()) / 100.0, 1.0 / n), 1.0 - 1.0 / n)
    return 200.0 * math.sqrt(2.0 * p * (1.0 - p) / n), int(n)


def accurate_enough(df: pd.DataFrame, device: str, rows: pd.DataFrame, max_acc_drop: float = 1.0,
                    noise_margin: bool = True) -> tuple[pd.DataFrame, float, float, int]:
    """(the ``rows`` within the tolerance of their best ``acc_pct``, the tolerance in accuracy points,
    the noise margin, test images): ``recommend``'s accuracy gate, and ``bench tune``'s."""
    noise, n_test = noise_points(df, device, rows["acc_pct"]) if noise_margin else (0.0, 0)
    tolerance = max(max_acc_drop, noise)
    return rows[rows["acc_pct"] >= rows["acc_pct"].max() - tolerance - 1e-9], tolerance, noise, n_test


def recommend(df: pd.DataFrame, device: str, max_acc_drop: float = 1.0,
              objective: str = "total-time", noise_margin: bool = True) -> tuple[pd.Series, str, str]:
    """(medians row of the chosen configuration, why, the ``python -m bench run`` line that
    reproduces it). ``df`` is a results table as from ``report.load``."""
    if objective not in OBJECTIVES:
        raise UserError(f"--objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    if max_acc_drop < 0 or math.isnan(max_acc_drop):
        raise UserError(f"--max-acc-drop must be 0 or more percentage points, got {max_acc_drop}")
    med = medians(df)
    present = list(dict.fromkeys(med["device"])) if len(med) else []
    if device not in present:
        raise UserError(f"--device {device}: no results for this device in the CSV; devices present: "
                        f"{', '.join(present) or 'none'}")
    m = med[med["device"] == device]
    done = m[(m["n_ok"] > 0) & m["acc_pct"].notna()]
    if done.empty:
        raise DataError(f"--device {device}: no configuration finished (status ok) on this device; "
                        f"nothing to recommend")
    column, larger, words, unit = OBJECTIVES[objective]
    best_acc = done["acc_pct"].max()
    top = done.loc[done["acc_pct"].idxmax(), "name"]
    keep, tolerance, noise, n_test = accurate_enough(df, device, done, max_acc_drop, noise_margin)
    dropped = done[~done.index.isin(keep.index)]
    scored = keep[keep[column].notna()]
    if scored.empty:
        raise DataError(f"--objective {objective}: no {column} values for the configurations on {device}")

    order = [objective] + [o for o in OBJECTIVES if o != objective]
    best_value = scored[column].max() if larger else scored[column].min()
    tied = scored[[math.isclose(v, best_value, rel_tol=1e-9, abs_tol=1e-12) for v in scored[column]]]
    ranked = tied.assign(**{f"_k{i}": (-tied[OBJECTIVES[o][0]] if OBJECTIVES[o][1] else tied[OBJECTIVES[o][0]])
                            for i, o in enumerate(order)})
    ranked = ranked.sort_values([f"_k{i}" for i in range(1, len(order))] + ["name"], na_position="last",
                                kind="mergesort")
    row = ranked.iloc[0].drop([c for c in ranked.columns if c.startswith("_k")])
    # What the plots draw: the accuracy band the choice was made in.
    row["acc_best"], row["acc_tolerance"] = best_acc, tolerance
    name = row["name"]

    reason = (f"{name} on {device}: {'highest' if larger else 'lowest'} {words} "
              f"({_fmt(row[column], unit)}) among {len(keep)} of {len(done)} configurations within "
              f"{tolerance:.3g} accuracy points of the best ({top} {best_acc:.1f}%); its accuracy "
              f"{row['acc_pct']:.1f}%")
    if tolerance > max_acc_drop:
        reason += (f" (the tolerance is the larger of --max-acc-drop {max_acc_drop:g} and {noise:.2g} points, two "
                   f"standard errors of an accuracy difference on {n_test} test images: smaller gaps are noise; "
                   "--no-noise-margin turns this off)")
    if name != "naive" and "naive" in set(done["name"]):
        naive = done[done["name"] == "naive"].iloc[0]
        if naive["total_s"] > 0 and row["total_s"] > 0:
            reason += f", {naive['total_s'] / row['total_s']:.1f}x faster than naive in total time"
    reason += "."
    if len(tied) > 1:
        others = [o for o in order[1:]]
        reason += (f" Tie on {words} between {', '.join(sorted(tied['name']))}; broken by "
                   f"{', then '.join(OBJECTIVES[o][2] for o in others)}, then name.")
    if len(dropped):
        reason += " Excluded for accuracy: " + ", ".join(
            f"{n} ({a:.1f}%)" for n, a in zip(dropped["name"], dropped["acc_pct"])) + "."
    unscored = keep[keep[column].isna()]
    if len(unscored):
        reason += f" No {column} for: {', '.join(unscored['name'])}."
    return row, reason, command_for(row, device)


def _text_of(row: pd.Series, col: str) -> str:
    return text(row.get(col, ""))


def command_for(row: pd.Series, device: str) -> str:
    """The ``python -m bench run`` line that reruns configuration ``row`` on ``device``."""
    parts = invoked("bench").split() + ["run", "--device", device, "--configs", str(row["name"])]
    preset = _text_of(row, "preset")
    if preset:
        parts += ["--preset", preset]
    dataset, data_dir = _text_of(row, "dataset"), _text_of(row, "data_dir")
    # --data-dir means the flowers layout from that folder; bench run refuses it with another --dataset.
    if dataset and not data_dir and dataset != "in-memory":
        parts += ["--dataset", dataset]
    for flag, col in (("--epochs", "epochs"), ("--batch-size", "batch_size")):
        value = _text_of(row, col)
        if value:
            parts += [flag, str(int(float(value)))]
    if dataset == "synthetic" and not data_dir:  # it sizes the synthetic set only
        value = _text_of(row, "num_images")
        if value:
            parts += ["--num-images", str(int(float(value)))]
    for flag, col in (("--data-dir", "data_dir"), ("--model-handle", "model_handle")):
        value = _text_of(row, col)
        if value:
            parts += [flag, value]
    return " ".join(shlex.quote(p) for p in parts)


def cmd_recommend(args) -> int:
    """One recommendation per machine, run and data (bench.results.groups, as the report has them):
    medians of rows measured on different data or weights are not pooled into one choice."""
    df = load(args.csv or [DEFAULT_CSV])
    parts = groups(df)
    errors = []
    for label, rows in parts:
        if len(parts) > 1:
            print(f"== {label} ==")
        try:
            row, reason, command = recommend(rows, args.device, args.max_acc_drop, args.objective,
                                             noise_margin=not args.no_noise_margin)
        except UserError as exc:
            if len(parts) == 1:
                raise
            errors.append(exc)
            print(f"n/a: {exc}\n")
            continue
        print(f"recommended: {row['name']}")
        print(reason)
        print(f"reproduce with:\n  {command}" + ("\n" if len(parts) > 1 else ""))
    if len(errors) == len(parts):
        raise errors[0]
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("recommend", help="pick the best configuration for a device from result CSVs",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=("cpu", "gpu"), required=True)
    p.add_argument("--max-acc-drop", type=finite_float, default=1.0, metavar="POINTS",
                   help="keep configurations within this many accuracy percentage points of the best")
    p.add_argument("--objective", choices=tuple(OBJECTIVES), default="total-time",
                   help="total-time: least total s; throughput: most train img/s; memory: least peak RSS MB")
    p.add_argument("--no-noise-margin", action="store_true",
                   help="compare accuracies as they are, even when the test set is too small to tell them apart")
    p.add_argument("csv", nargs="*", metavar="CSV", default=[DEFAULT_CSV], help="result CSVs to read")
    p.set_defaults(func=cmd_recommend)
    return p
