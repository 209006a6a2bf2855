"""Bench results as tables: loading result CSVs, normalising their columns and units (per input
file), ordering configurations and devices, grouping rows by machine and run, and medians over
repeats. ``report``, ``plots``, ``compare``, ``recommend`` and ``gpu_check`` all read results
through this module.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import pandas as pd

from flowers_fast.errors import DataError, invoked
from flowers_fast.outputs import spreadsheet_text

from .configs import CONFIGS

DEFAULT_CSV = "results/latest.csv"
ORDER = tuple(CONFIGS)  # configurations in bench/configs.py's order
DEVICE_ORDER = ("cpu", "gpu")
# Leading CSV columns as bench run writes them; the rest follow in the order they first appear.
LEADING = ("run_id", "preset", "name", "device", "repeat", "status", "error", "pipeline", "dataset", "weights",
           "precision", "compute_dtype", "xla_step", "xla_backbone", "channel_order", "test_accuracy", "test_loss",
           "data_prep_s", "first_epoch_s", "steady_epoch_s", "steady_epoch_min_s", "steady_epoch_max_s",
           "total_s", "train_img_s", "end_to_end_img_s", "eval_img_s", "input_only_img_s", "model_only_img_s",
           "e2e_fraction_of_model", "bottleneck", "peak_rss_mb", "peak_gpu_mb")
# Without these a CSV is not a results file; the other contract columns are filled with blanks.
REQUIRED = ("name", "device", "status", "test_accuracy", "steady_epoch_s", "total_s", "train_img_s")
METRICS = ("test_accuracy", "test_loss", "data_prep_s", "first_epoch_s", "steady_epoch_s", "steady_epoch_min_s",
           "steady_epoch_max_s", "total_s", "train_img_s", "end_to_end_img_s", "eval_img_s", "input_only_img_s",
           "model_only_img_s", "e2e_fraction_of_model", "peak_rss_mb", "peak_gpu_mb", "feature_pass_s",
           "feature_pass_warmup_s", "feature_pass_first_batch_s", "feature_pass_img_s", "train_s", "subprocess_s",
           "engine_setup_s", "tf_fp32_forward_img_s", "engine_speedup_vs_tf_fp32", "model_flops_utilization",
           "feature_pass_flops_utilization", "feature_pass_bound_img_s", "feature_pass_shared_cores_img_s",
           "feature_pass_bound_fraction", "head_phase_s", "fine_tune_phase_s")
# Metrics where a larger value is better (the others: smaller is better).
HIGHER_IS_BETTER = ("test_accuracy", "acc_pct", "train_img_s", "end_to_end_img_s", "eval_img_s", "input_only_img_s",
                    "model_only_img_s", "e2e_fraction_of_model", "feature_pass_img_s", "tf_fp32_forward_img_s",
                    "engine_speedup_vs_tf_fp32", "model_flops_utilization", "feature_pass_flops_utilization",
                    "feature_pass_bound_img_s", "feature_pass_shared_cores_img_s", "feature_pass_bound_fraction")
# Units of METRICS (and acc_pct) for labels.
UNITS = {"test_accuracy": "%", "acc_pct": "%", "test_loss": "", "e2e_fraction_of_model": "", "peak_rss_mb": "MB",
         "peak_gpu_mb": "MB"}
# The machine a row ran on (bench.machine.host_facts and the worker's TensorFlow build facts).
MACHINE = ("machine_id", "cpu_brand", "cpu_vendor", "cpu_arch", "cpu_isa", "cpu_logical_cores",
           "cpu_physical_cores", "ram_gb", "os", "kernel", "gpu_names", "gpu_driver", "tf_cuda_build",
           "tf_cudnn_build", "tensorflow_version", "tf_keras_version", "tensorflow_hub_version", "numpy_version",
           "opencv_version", "python_version")
# What a row was measured on besides the machine (MACHINE's machine_id) and the run (run_id): the
# data (its kind, folder, image count, file list) and the weights. Rows that differ in any of these
# are not repeats of one another: report and recommend keep them apart (groups), compare says so,
# and run --resume refuses to add rows on other data to a run (compatible). ``data_images`` is
# derived on loading (normalise); a blank value is unknown (a failed row never loaded its data;
# modelonly has none) and matches any.
DATA = ("dataset", "data_dir", "data_images", "data_fingerprint", "weights", "model_handle")
# Before weights were labelled by what the handle shows, every local or URL handle said this.
LEGACY_PRETRAINED = "pretrained"
TEXT = ("run_id", "preset", "pipeline", "device_name", "dataset", "weights", "precision", "compute_dtype",
        "channel_order", "bottleneck", "error", "tf_version", "model_handle", "data_dir", "data_fingerprint",
        "git_commit", "source", "feature_pass_bound_stage", "feature_pass_limit") + MACHINE
# Per-configuration settings carried into the medians table (first ok repeat's value).
SETTINGS = ("pipeline", "channel_order", "naive_rgb", "preset", "dataset", "data_dir", "model_handle", "epochs",
            "batch_size", "num_images", "image_size", "weights", "device_name", "tf_version", "fine_tune",
            "fine_tune_epochs", "fine_tune_from", "augment")


# --- loading ----------------------------------------------------------------------------------

def load(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Every row of every CSV in ``paths`` (e.g. a CPU run and a GPU run from different
    machines), rows repeated in a later file dropped. Units are normalised per file (accuracy
    as a fraction in one file and in percent in another give the same ``acc_pct``); each row
    keeps its file in ``source``. ``df.attrs["merged"]`` says, per file, what was read.
    Raises DataError naming the file on bad input."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p) for p in paths] or [Path(DEFAULT_CSV)]
    frames = []
    for i, path in enumerate(paths):
        raw = _read_one(path)
        frames.append(raw.assign(source=str(path), acc_pct=accuracy_percent(raw["test_accuracy"]),
                                 _file=i, _unit=accuracy_unit(raw["test_accuracy"])))
    df = pd.concat(frames, ignore_index=True, sort=False) if len(frames) > 1 else frames[0]
    # A row read again from a later file (e.g. a resumed run copied over) counts once.
    dup = df.drop(columns=["source", "_file", "_unit", "acc_pct"]).duplicated(keep="first")
    merged = []
    for i, path in enumerate(paths):
        mine = df["_file"] == i
        dropped = int((mine & dup).sum())
        merged.append(f"{path}: {int(mine.sum()) - dropped} rows"
                      + (f" ({dropped} duplicate rows dropped)" if dropped else "")
                      + f", accuracy read as {df.loc[mine, '_unit'].iloc[0] if mine.any() else 'n/a'}")
    df = normalise(df[~dup].drop(columns=["_file", "_unit"]).reset_index(drop=True))
    df.attrs["merged"] = merged
    return df


def _read_one(path: Path) -> pd.DataFrame:
    if not path.is_file():
        hint = f"; run `{invoked('bench')} run` first" if path == Path(DEFAULT_CSV) else ""
        what = "a folder, not a CSV file" if path.is_dir() else "no such CSV file"
        raise DataError(f"{path}: {what}{hint}")
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file, not a bench results CSV") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a readable CSV ({first})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    # bench run neutralised text a spreadsheet would run as a formula (flowers_fast.outputs): undone here.
    df = df.map(spreadsheet_text)
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise DataError(f"{path}: not a bench results CSV (missing column{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(missing)})")
    if df.empty:
        raise DataError(f"{path}: a header but no result rows; pass a CSV of a run that finished a configuration")
    return df


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Contract columns present (blank if absent), metrics numeric, text columns clean strings."""
    df = df.copy()
    for col in METRICS:
        df[col] = pd.to_numeric(df[col], errors="coerce") if col in df.columns else float("nan")
    for col in TEXT + ("name", "device", "status"):
        if col not in df.columns:
            df[col] = ""
        df[col] = df[col].map(text)
    df["status"] = df["status"].str.lower()
    df["naive_rgb"] = df["naive_rgb"].map(truthy) if "naive_rgb" in df.columns else False
    for col in ("epochs", "batch_size", "num_images", "image_size", "repeat"):
        if col not in df.columns:
            df[col] = pd.NA
    if "acc_pct" not in df.columns:
        df["acc_pct"] = accuracy_percent(df["test_accuracy"])
    df["acc_pct"] = pd.to_numeric(df["acc_pct"], errors="coerce")
    df["data_images"] = data_images(df)
    return df


def data_images(df: pd.DataFrame) -> pd.Series:
    """Images the row's data held, as text: ``data_files`` (recorded since issue 19), else what an
    older row adds up to (train + test + skipped images); blank when unknown or without data."""
    def column(name):
        return pd.to_numeric(df[name], errors="coerce") if name in df.columns else pd.Series(float("nan"),
                                                                                              index=df.index)
    older = column("train_images") + column("test_images") + column("skipped_files").fillna(0)
    count = column("data_files").fillna(older)
    dataset = df["dataset"].map(text) if "dataset" in df.columns else pd.Series("", index=df.index)
    return count.where(dataset != "in-memory").map(lambda v: "" if pd.isna(v) else str(int(v)))


def data_key(row) -> tuple[str, ...]:
    """A row's (or a dict's) DATA values as text; a modelonly row's data fields blank (it has none)."""
    key = tuple(text(row.get(col, "")) for col in DATA)
    if key[0] == "in-memory":
        key = tuple("" if col not in ("weights", "model_handle") else v for col, v in zip(DATA, key))
    return key


def compatible(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Whether two data keys can be the same data and weights: equal where both are known (an
    older row's "pretrained" stands for any weights but the random export)."""
    for col, x, y in zip(DATA, a, b):
        if not x or not y or x == y:
            continue
        if col == "weights" and LEGACY_PRETRAINED in (x, y) and "random" not in (x, y):
            continue
        return False
    return True


def differences(a: tuple[str, ...], b: tuple[str, ...]) -> list[str]:
    """What makes two data keys incompatible, e.g. ["data_images 40 vs 21"]."""
    def only(key, i):
        return tuple(v if j == i else "" for j, v in enumerate(key))
    return [f"{col} {a[i]} vs {b[i]}" for i, col in enumerate(DATA) if not compatible(only(a, i), only(b, i))]


def data_label(rows: pd.DataFrame) -> str:
    """"synthetic, 40 images (files 1a2b3c4d5e6f), weights random", from the rows with data."""
    with_data = rows[rows["dataset"].map(text) != "in-memory"] if "dataset" in rows.columns else rows
    rows = with_data if len(with_data) else rows
    where = values(rows, "data_dir")
    label = values(rows, "dataset") + (f" from {where}" if where != "?" else "")
    count, files = values(rows, "data_images"), values(rows, "data_fingerprint")
    if count != "?":
        label += f", {count} images" + (f" (files {files})" if files != "?" else "")
    handle = values(rows, "model_handle")
    return label + f", weights {values(rows, 'weights')}" + (f" ({handle})" if handle not in ("?", "random") else "")


def text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    return str(value).strip()


# --- display ----------------------------------------------------------------------------------

def num(v) -> str:
    if v is None or pd.isna(v):
        return ""
    v = float(v)
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


FORMATS = {
    "test acc %": lambda v: "" if pd.isna(v) else f"{v:.1f}",
    "speed-up vs naive": lambda v: "" if pd.isna(v) else f"{v:.2f}x",
    "peak RSS MB": lambda v: "" if pd.isna(v) else f"{v:.0f}",
    "ok": lambda v: str(int(v)),
    "errors": lambda v: str(int(v)),
}


def formatted(table: pd.DataFrame) -> pd.DataFrame:
    """The table as display strings (numbers rounded, NaN blank), configuration as a column."""
    out = pd.DataFrame(index=table.index)
    for col in table.columns:
        fmt = FORMATS.get(col, num if pd.api.types.is_numeric_dtype(table[col]) else text)
        out[col] = table[col].map(fmt)
    return out.reset_index()


def truthy(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return bool(value)


def accuracy_unit(acc: pd.Series) -> str:
    """"fraction" when every accuracy of one file is at most 1 (what bench writes), else "percent"."""
    return "fraction" if pd.to_numeric(acc, errors="coerce").dropna().le(1.0).all() else "percent"


def accuracy_percent(acc: pd.Series) -> pd.Series:
    """One file's accuracies in percent: fractions times 100 (a file with values above 1 is percent)."""
    acc = pd.to_numeric(acc, errors="coerce")
    return acc * 100.0 if accuracy_unit(acc) == "fraction" else acc


# --- machines and runs --------------------------------------------------------------------------

def machine_label(rows: pd.DataFrame) -> str:
    """"machine 1a2b3c4d5e (AMD EPYC, 2 logical cores, 23.5 GB)", from the rows' machine facts;
    rows from before machine facts were recorded fall back to their device names."""
    mid = values(rows, "machine_id")
    if mid == "?":
        return f"machine unknown (no machine facts in the CSV; {values(rows, 'device_name')})"
    brand, cores, ram = values(rows, "cpu_brand"), values(rows, "cpu_logical_cores"), values(rows, "ram_gb")
    gpus = values(rows, "gpu_names")
    gpu = f", GPU {gpus}" if gpus not in ("?", "none") and not gpus.startswith("none") else ""
    return f"machine {mid} ({brand}, {int_text(cores)} logical cores, {ram} GB RAM{gpu})"


def int_text(value: str) -> str:
    try:
        return str(int(float(value)))
    except ValueError:
        return value


def groups(df: pd.DataFrame, pool: bool = False) -> list[tuple[str, pd.DataFrame]]:
    """The rows split by machine (``machine_id``), run (``run_id``) and what they were measured on
    (DATA: data and weights), in first-seen order, each with a label: rows of different machines,
    runs or data are never medians of one another. A row whose data is unknown (a failed row, a
    modelonly probe) goes with every part of its run it fits. With ``pool`` every row is one
    group, labelled with what was pooled."""
    if df.empty:
        return []
    machine = df["machine_id"].map(text) if "machine_id" in df.columns else pd.Series("", index=df.index)
    run = df["run_id"].map(text)
    keys = pd.Series([data_key(r) for _, r in df.iterrows()], index=df.index)
    parts = []  # (machine, run, anchor data key), in first-seen order
    for m, r in dict.fromkeys(zip(machine, run)):
        mine = keys[(machine == m) & (run == r)]
        # The most completely known keys first, so that a partly known one joins them.
        anchors: list[tuple] = []
        for key in sorted(dict.fromkeys(mine), key=lambda k: -sum(bool(v) for v in k)):
            if not any(compatible(key, a) for a in anchors):
                anchors.append(key)
        first = {a: min(i for i, k in mine.items() if k == a) for a in anchors}
        parts += [(m, r, a) for a in sorted(anchors, key=first.get)]
    several_data = len({a for _, _, a in parts}) > 1
    if pool or len(parts) == 1:
        runs = list(dict.fromkeys((m, r) for m, r, _ in parts))
        label = (f"{len(runs)} runs on {len(set(m for m, _ in runs))} machine(s)"
                 + (f" with {len(parts)} different data or weights" if several_data else "") + " pooled"
                 if len(parts) > 1 else f"run {run.iloc[0] or '?'}")
        return [(label, df)]
    out = []
    for m, r, anchor in parts:
        rows = df[(machine == m) & (run == r) & keys.map(lambda k: compatible(k, anchor))]
        label = f"{machine_label(rows)}, run {r or '?'}" + (f", data {data_label(rows)}" if several_data else "")
        out.append((label, rows))
    return out


# --- medians over repeats -----------------------------------------------------------------------

def ordered(names: Iterable[str], order: Iterable[str]) -> list[str]:
    names = list(dict.fromkeys(names))
    known = [n for n in order if n in names]
    return known + [n for n in names if n not in known]


def devices(df: pd.DataFrame) -> list[str]:
    return ordered(df["device"], DEVICE_ORDER)


def medians(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (device, name): medians over the ok repeats of every metric, spreads
    (``*_lo``/``*_hi``: min/max over ok repeats), ``n_ok``/``n_failed``, failure statuses, and the
    configuration's settings. Configurations with no ok repeat are kept with blank metrics."""
    if "acc_pct" not in df.columns:
        df = normalise(df)
    rows = []
    for device in devices(df):
        on_device = df[df["device"] == device]
        for name in ordered(on_device["name"], ORDER):
            runs = on_device[on_device["name"] == name]
            ok = runs[runs["status"] == "ok"]
            # A skipped run (the hardware lacks what it needs, e.g. bf16) is not a failure.
            skipped = runs[runs["status"] == "skipped"]
            failed = runs[~runs["status"].isin(("ok", "skipped"))]
            source = ok if len(ok) else runs
            not_ok = runs[runs["status"] != "ok"]
            row = {"device": device, "name": name, "n_ok": len(ok), "n_failed": len(failed),
                   "n_skipped": len(skipped),
                   "failures": "; ".join(f"{s or 'unknown'}: {e}" if e else (s or "unknown")
                                         for s, e in zip(not_ok["status"], not_ok["error"]))}
            for col in METRICS + ("acc_pct",):
                values = ok[col].dropna()
                row[col] = float(values.median()) if len(values) else float("nan")
                row[col + "_lo"] = float(values.min()) if len(values) else float("nan")
                row[col + "_hi"] = float(values.max()) if len(values) else float("nan")
                row[col + "_n"] = len(values)
            modes = ok["bottleneck"][ok["bottleneck"] != ""].mode()
            row["bottleneck"] = str(modes.iloc[0]) if len(modes) else ""
            for col in SETTINGS:
                values = source[col].dropna() if col in source.columns else pd.Series([], dtype=object)
                values = values[values.astype(str) != ""]
                row[col] = values.iloc[0] if len(values) else ""
            rows.append(row)
    return pd.DataFrame(rows)


def values(df: pd.DataFrame, col: str) -> str:
    """The distinct non-blank values of ``col``, comma-separated ("?" when there are none)."""
    if col not in df.columns:
        return "?"
    vals = [v for v in dict.fromkeys(df[col].map(text)) if v]
    return ", ".join(vals) if vals else "?"


def median(df: pd.DataFrame, name: str, column: str, device: str | None = None) -> float:
    """Median of ``column`` over the ok repeats of configuration ``name`` (NaN when none)."""
    rows = df[(df["name"] == name) & (df["status"] == "ok")]
    if device is not None:
        rows = rows[rows["device"] == device]
    values_ = pd.to_numeric(rows[column], errors="coerce").dropna() if column in rows else pd.Series([], dtype=float)
    return float(values_.median()) if len(values_) else float("nan")


def median_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Per (device, name), the ok repeat whose ``total_s`` is the median (the lower middle one for
    an even count): its parts add up to the total shown, which medians of parts would not."""
    ok = df[(df["status"] == "ok") & df["total_s"].notna()]
    picked = []
    for _, runs in ok.groupby(["device", "name"], sort=False):
        runs = runs.sort_values("total_s", kind="mergesort")
        picked.append(runs.iloc[(len(runs) - 1) // 2])
    return pd.DataFrame(picked).reset_index(drop=True) if picked else ok.iloc[0:0]
