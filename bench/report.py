"""``python -m bench report``: read result CSVs (several machines at once) and tabulate them.

One table per device, one row per configuration: medians over the repeats that finished
(status ok), their min-max spread, speed-up against ``naive`` on the same device, and how
many repeats failed. Renders as console text and as a GitHub Markdown pipe table; ``--plot``
adds PNG charts (bench/plots.py).

Accuracy is shown in percent (the CSV holds a fraction in [0, 1]; percent values are accepted
too), times in seconds, throughput in images/s, memory in MB.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

from flowers_fast.errors import OutputError

from .plots import write_plots
from .results import DEFAULT_CSV, devices, load, medians, text, truthy, values

UNITS = "accuracy %, times s, throughput img/s, memory MB"


# --- the per-device tables ----------------------------------------------------------------------

def summarise(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """{device: table}. Each table's index is the configuration name; numeric columns hold
    numbers (blank = NaN), spreads are "min–max" strings. ``table.attrs`` holds ``header``
    (device, its name, data, weights, TF version, units) and ``notes`` (RGB-fix gain, failures)."""
    med = medians(df)
    tables = {}
    for device in devices(df):
        m = med[med["device"] == device].set_index("name")
        naive_total = m.loc["naive", "total_s"] if "naive" in m.index else float("nan")
        several = m["n_ok"] >= 2
        # Epoch spread: over repeats when there are several, else over the one run's steady epochs.
        epoch_lo = m["steady_epoch_s_lo"].where(several, m["steady_epoch_min_s"])
        epoch_hi = m["steady_epoch_s_hi"].where(several, m["steady_epoch_max_s"])
        table = pd.DataFrame({
            "test acc %": m["acc_pct"],
            "acc min–max": [_span(lo, hi, 1) for lo, hi in zip(m["acc_pct_lo"], m["acc_pct_hi"])],
            "steady epoch s": m["steady_epoch_s"],
            "epoch min–max": [_span(lo, hi) for lo, hi in zip(epoch_lo, epoch_hi)],
            "total s": m["total_s"],
            "train img/s": m["train_img_s"],
            "speed-up vs naive": naive_total / m["total_s"],
            "peak RSS MB": m["peak_rss_mb"],
            "bottleneck": m["bottleneck"],
            "ok": m["n_ok"].astype(int),
            "errors": m["n_failed"].astype(int),
            "channels": m["channel_order"].map(text),
        }, index=pd.Index(m.index, name="config"))
        table.attrs["device"] = device
        table.attrs["header"] = _header(df[df["device"] == device], device)
        notes = []
        gain = rgb_gain_line(m)
        if gain:
            notes.append(gain)
        for name, row in m.iterrows():
            if row["n_failed"]:
                notes.append(f"{name}: {row['n_failed']} of {row['n_ok'] + row['n_failed']} repeats failed "
                             f"({_shorten(row['failures'])})")
        if not math.isnan(naive_total):
            notes.append("speed-up vs naive = naive's total s / this configuration's total s")
        else:
            notes.append("speed-up vs naive: blank, no successful naive run on this device")
        notes.append("medians over repeats with status ok; spread = min–max over those repeats "
                     "(epoch spread over one run's steady epochs when there is a single repeat)")
        table.attrs["notes"] = notes
        tables[device] = table
    return tables


def _span(lo, hi, digits: int | None = None) -> str:
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return ""
    fmt = (lambda v: f"{v:.{digits}f}") if digits is not None else _num
    return f"{fmt(lo)}–{fmt(hi)}"


def _shorten(message: str, limit: int = 160) -> str:
    return message if len(message) <= limit else message[: limit - 1] + "…"


def _header(rows: pd.DataFrame, device: str) -> str:
    ok = rows[rows["status"] == "ok"]
    rows = ok if len(ok) else rows
    return (f"device {device} ({values(rows, 'device_name')}) | data {values(rows, 'dataset')} | "
            f"weights {values(rows, 'weights')} | TF {values(rows, 'tf_version')} | units: {UNITS}")


def rgb_gain_line(m: pd.DataFrame) -> str:
    """What fixing the naive pipeline's BGR channel order gains in accuracy, from one device's
    medians (indexed by name); empty unless both a BGR and an RGB naive configuration finished."""
    ok = m[(m["n_ok"] > 0) & m["acc_pct"].notna()]
    if "pipeline" in ok.columns and ok["pipeline"].astype(str).ne("").any():
        naive = ok[ok["pipeline"].astype(str) == "naive"]
    else:
        naive = ok[ok.index.isin(["naive", "naive-rgb"])]
    bgr = [n for n in naive.index if not truthy(naive.loc[n, "naive_rgb"]) and n != "naive-rgb"]
    rgb = [n for n in naive.index if truthy(naive.loc[n, "naive_rgb"]) or n == "naive-rgb"]
    if not bgr or not rgb:
        return ""
    b = "naive" if "naive" in bgr else bgr[0]
    r = "naive-rgb" if "naive-rgb" in rgb else rgb[0]
    acc_b, acc_r = naive.loc[b, "acc_pct"], naive.loc[r, "acc_pct"]
    return (f"RGB fix: {r} {acc_r:.1f}% vs {b} (BGR) {acc_b:.1f}% test accuracy: "
            f"{acc_r - acc_b:+.1f} percentage points")


# --- rendering ------------------------------------------------------------------------------

def _num(v) -> str:
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
        fmt = FORMATS.get(col, _num if pd.api.types.is_numeric_dtype(table[col]) else text)
        out[col] = table[col].map(fmt)
    return out.reset_index()


def render_console(tables: dict[str, pd.DataFrame]) -> str:
    parts = []
    for device, table in tables.items():
        body = formatted(table).to_string(index=False)
        notes = "\n".join(f"  {n}" for n in table.attrs.get("notes", []))
        parts.append(f"{table.attrs.get('header', device)}\n{body}" + (f"\n{notes}" if notes else ""))
    return "\n\n".join(parts)


def pipe_table(df: pd.DataFrame) -> str:
    """A DataFrame of strings as a GitHub Markdown pipe table (numbers right-aligned)."""
    def cell(value) -> str:
        return text(value).replace("|", "\\|").replace("\n", " ")

    cols = [str(c) for c in df.columns]
    numeric = [bool(len(df)) and all(_looks_numeric(v) for v in df[c] if text(v)) for c in df.columns]
    lines = ["| " + " | ".join(cell(c) for c in cols) + " |",
             "|" + "|".join("---:" if num else "---" for num in numeric) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)


def _looks_numeric(value) -> bool:
    shown = text(value).rstrip("x").replace("–", "", 1)
    try:
        float(shown)
        return True
    except ValueError:
        return False


def render_markdown(tables: dict[str, pd.DataFrame], title: str = "Benchmark results") -> str:
    parts = [f"# {title}", ""]
    for device, table in tables.items():
        parts += [f"## {device}", "", f"*{table.attrs.get('header', device)}*", "", pipe_table(formatted(table)), ""]
        parts += [f"- {n}" for n in table.attrs.get("notes", [])]
        parts.append("")
    return "\n".join(parts)


# --- the command --------------------------------------------------------------------------

def cmd_report(args) -> int:
    paths = [Path(p) for p in (args.csv or [DEFAULT_CSV])]
    df = load(paths)
    tables = summarise(df)
    print(render_console(tables))
    if args.markdown:
        target = Path(args.markdown)
        if any(target.exists() and target.resolve() == p.resolve() for p in paths):
            raise OutputError(f"--markdown {target}: is one of the CSVs being reported; pass another file name "
                              "(nothing is overwritten)")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(render_markdown(tables), encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"--markdown {target}: cannot write ({exc.strerror or exc})") from None
        print(f"\nmarkdown: {target}")
    if args.plot:
        written = write_plots(df, paths[0].parent)
        if written:
            print("plots: " + ", ".join(str(p) for p in written))
        else:
            print("plots: none (no successful runs)")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("report", help="tabulate result CSVs: one table per device, medians over repeats")
    p.add_argument("csv", nargs="*", metavar="CSV", default=[DEFAULT_CSV],
                   help=f"result CSVs to merge, e.g. a CPU and a GPU run (default {DEFAULT_CSV})")
    p.add_argument("--markdown", metavar="PATH", help="also write the tables as Markdown to PATH")
    p.add_argument("--plot", action="store_true", help="also write PNG charts beside the first CSV")
    p.set_defaults(func=cmd_report)
    return p
