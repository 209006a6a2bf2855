"""``python -m bench report``: read result CSVs (several machines at once) and report them.

Rows are grouped by machine (``machine_id``) and run (``run_id``): each group gets its own
tables, recommendation and plots, since rows from different machines are not repeats of one
another (``--pool`` merges them on purpose, and says so). Per group, one table per device, one
row per configuration: medians over the repeats that finished (status ok), their min-max
spread, speed-up against ``naive`` on the same device, and how many repeats finished and
failed. Renders as console text, Markdown (``--markdown``) and one self-contained HTML file
(``--html``: bench/htmlreport.py) with the plots (bench/plots.py), the recommendation and its
reproducing command, and the provenance: machine, versions, data, weights, commit, commands.

Accuracy is shown in percent (the CSV holds a fraction in [0, 1]; a file in percent is read as
such), times in seconds, throughput in images/s, memory in MB.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from flowers_fast.errors import OutputError, UserError, invoked
from flowers_fast.outputs import Outputs, add_overwrite_flag, atomic_write

from . import tracking
from .plots import plot_names, write_plots
from .results import (DEFAULT_CSV, ORDER, devices, formatted, groups, load, machine_label, medians, num, ordered, text,
                      truthy, values)

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
        if m["fine_tune_phase_s"].notna().any():  # both phases' time, beside the total they add up into
            table.insert(table.columns.get_loc("total s"), "head phase s", m["head_phase_s"])
            table.insert(table.columns.get_loc("total s"), "fine-tune phase s", m["fine_tune_phase_s"])
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
            elif row.get("n_skipped") and not row["n_ok"]:
                notes.append(f"{name}: skipped on this machine ({_shorten(row['failures'])})")
        notes += int8_notes(df[df["device"] == device])
        if "fine-tune phase s" in table.columns:
            notes.append("head phase s: the frozen-head epochs; fine-tune phase s: the epochs with the top of the "
                         "backbone trained (both within total s)")
        if not math.isnan(naive_total):
            notes.append("speed-up vs naive = naive's total s / this configuration's total s")
        else:
            notes.append("speed-up vs naive: blank, no successful naive run on this device")
        notes.append("medians over the ok column's repeats (status ok); spread = min–max over those repeats "
                     "(epoch spread over one run's steady epochs when there is a single repeat)")
        table.attrs["notes"] = notes
        tables[device] = table
    return tables


def int8_notes(rows: pd.DataFrame) -> list[str]:
    """What int8 paid for its quantized model, per configuration: the seconds of total s spent
    calibrating and quantizing, or that the model came from the store (a first run paid for it)."""
    if "quantize_s" not in rows.columns:
        return []
    notes = []
    ok = rows[(rows["status"] == "ok") & pd.to_numeric(rows["quantize_s"], errors="coerce").notna()]
    for name in ordered(ok["name"], ORDER):
        runs = ok[ok["name"] == name]
        reused = (runs["quantized_reused"].map(truthy) if "quantized_reused" in runs.columns
                  else pd.Series(False, index=runs.index))
        seconds = pd.to_numeric(runs["quantize_s"])
        if reused.all():
            notes.append(f"{name}: int8 model loaded from the store in {len(runs)} of {len(runs)} repeats "
                         f"({seconds.median():.2f} s); quantizing it is a first run's cost")
            continue
        quantized = seconds[~reused]
        note = (f"{name}: {quantized.median():.1f} s of total s calibrating and quantizing (NNCF)")
        if reused.any():
            note += f"; {int(reused.sum())} of {len(runs)} repeats loaded it from the store instead"
        notes.append(note)
    return notes


def _span(lo, hi, digits: int | None = None) -> str:
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return ""
    fmt = (lambda v: f"{v:.{digits}f}") if digits is not None else num
    return f"{fmt(lo)}–{fmt(hi)}"


def _shorten(message: str, limit: int = 160) -> str:
    return message if len(message) <= limit else message[: limit - 1] + "…"


def _header(rows: pd.DataFrame, device: str) -> str:
    ok = rows[rows["status"] == "ok"]
    rows = ok if len(ok) else rows
    return (f"device {device} ({values(rows, 'device_name')}) | data {values(rows, 'dataset')} | "
            f"weights {values(rows, 'weights')} | TF {values(rows, 'tf_version')} | "
            f"machine {values(rows, 'machine_id').replace('?', 'unknown')} | units: {UNITS}")


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

def render_console(tables: dict[str, pd.DataFrame]) -> str:
    parts = []
    for device, table in tables.items():
        body = formatted(table).to_string(index=False)
        notes = "\n".join(f"  {n}" for n in table.attrs.get("notes", []))
        parts.append(f"{table.attrs.get('header', device)}\n{body}" + (f"\n{notes}" if notes else ""))
    return "\n\n".join(parts)


def render_console_report(reports: list["GroupReport"], merged: list[str]) -> str:
    parts = []
    if len(merged) > 1:
        parts.append("merged:\n" + "\n".join(f"  {m}" for m in merged))
    for r in reports:
        body = render_console(r.tables)
        picks = "\n".join(f"  recommended on {p.device}: {p.text}" for p in r.picks)
        parts.append(f"== {r.label} ==\n{body}" + (f"\n{picks}" if picks else "") if len(reports) > 1
                     else body + (f"\n{picks}" if picks else ""))
    return "\n\n".join(parts)


def md_text(value) -> str:
    """User text (a folder name, an error message) in Markdown: ``<``, ``>`` and ``&`` as HTML
    entities, so that a renderer shows ``<script>`` instead of running it, and on one line, so
    that it cannot start a heading, a list or a table of its own."""
    shown = text(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return " ".join(shown.splitlines())


def md_cell(value) -> str:
    """:func:`md_text` in a pipe table's cell, where ``|`` would end the cell."""
    return md_text(value).replace("|", "\\|")


def pipe_table(df: pd.DataFrame) -> str:
    """A DataFrame of strings as a GitHub Markdown pipe table (numbers right-aligned)."""
    cols = [str(c) for c in df.columns]
    numeric = [bool(len(df)) and all(_looks_numeric(v) for v in df[c] if text(v)) for c in df.columns]
    lines = ["| " + " | ".join(md_cell(c) for c in cols) + " |",
             "|" + "|".join("---:" if num else "---" for num in numeric) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(md_cell(v) for v in row) + " |")
    return "\n".join(lines)


def _looks_numeric(value) -> bool:
    shown = text(value).rstrip("x").replace("–", "", 1)
    try:
        float(shown)
        return True
    except ValueError:
        return False




# --- the whole report ------------------------------------------------------------------------

@dataclass
class Pick:
    device: str
    name: str  # "" when nothing can be recommended
    text: str  # the reason, or why there is no recommendation
    command: str = ""


@dataclass
class GroupReport:
    """Everything the report says about one machine and run (or one pool)."""

    label: str
    rows: pd.DataFrame
    tables: dict[str, pd.DataFrame]
    picks: list[Pick]
    provenance: list[tuple[str, str]]
    plots: list[Path] = field(default_factory=list)


def picks_for(rows: pd.DataFrame) -> list[Pick]:
    """``bench recommend``'s default choice (total time, 1 accuracy point) per device."""
    from .recommend import recommend

    out = []
    for device in devices(rows):
        try:
            row, reason, command = recommend(rows, device)
            out.append(Pick(device, str(row["name"]), reason, command))
        except UserError as exc:
            out.append(Pick(device, "", f"n/a: {exc}"))
    return out


def _shown(value: str) -> str:
    return "n/a" if value in ("", "?") else value


def run_command(rows: pd.DataFrame) -> str:
    """The ``bench run`` command(s) of these rows' runs, rebuilt from the run-<id>.json each
    sweep saves beside its CSV (what --resume reads); "n/a" when it is not there."""
    commands = []
    for source, run_id in dict.fromkeys(zip(rows["source"], rows["run_id"])):
        meta = Path(source).parent / f"run-{run_id}.json"
        try:
            saved = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        parts = invoked("bench").split() + ["run"]
        for key, value in saved.items():
            if value is None or value is False or key in ("resume",):
                continue
            flag = "--" + key.replace("_", "-")
            parts += [flag] if value is True else [flag, str(value)]
        commands.append(" ".join(shlex.quote(p) for p in parts))
    return "; ".join(dict.fromkeys(commands)) or "n/a (no run JSON beside the CSV)"


def provenance(rows: pd.DataFrame) -> list[tuple[str, str]]:
    """(what, value) pairs: machine, versions, data, weights, code, commands."""
    ok = rows[rows["status"] == "ok"]
    rows_ = ok if len(ok) else rows
    v = lambda col: _shown(values(rows_, col))  # noqa: E731

    def i(col):  # whole numbers that went through a float column ("450.0")
        return ", ".join(re.sub(r"^(-?\d+)\.0$", r"\1", x) for x in v(col).split(", "))
    tf_version = v("tensorflow_version") if v("tensorflow_version") != "n/a" else v("tf_version")
    times = sorted(t for t in rows.get("timestamp", pd.Series([], dtype=str)).map(text) if t)
    repeats = rows_[rows_["status"] == "ok"].groupby(["device", "name"]).size()
    n = sorted(set(int(x) for x in repeats)) if len(repeats) else []
    return [
        ("machine", machine_label(rows_)),
        ("CPU", f"{v('cpu_brand')} ({v('cpu_vendor')}, {v('cpu_arch')}); {i('cpu_logical_cores')} logical / "
                f"{i('cpu_physical_cores')} physical cores"),
        ("CPU ISA (of those that matter here)", v("cpu_isa")),
        ("RAM GB", v("ram_gb")),
        ("OS", f"{v('os')} (kernel {v('kernel')})"),
        ("GPU", f"{v('gpu_names')}; driver {v('gpu_driver')}; TensorFlow built with CUDA {v('tf_cuda_build')}, "
                f"cuDNN {v('tf_cudnn_build')}"),
        ("devices", v("device_name")),
        ("versions", f"Python {v('python_version')}, tensorflow {tf_version}, tf_keras {v('tf_keras_version')}, "
                     f"tensorflow_hub {v('tensorflow_hub_version')}, numpy {v('numpy_version')}, "
                     f"opencv {v('opencv_version')}"),
        # The images the data held (not --num-images, which sizes only the synthetic set).
        ("data", f"{v('dataset')} (data dir {v('data_dir')}); {v('data_images')} images (file list "
                 f"{v('data_fingerprint')}), {i('train_images')} train / {i('test_images')} test used, "
                 f"{i('image_size')} px"),
        ("weights", f"{v('weights')} ({v('handle') if 'handle' in rows_ else v('model_handle')})"),
        ("training", f"{i('epochs')} epochs, batch {i('batch_size')}, learning rate {v('learning_rate')}, "
                     f"seed {i('seed')}"),
        ("run", f"{v('run_id')}, preset {v('preset')}, {'/'.join(map(str, n)) or 'n/a'} ok repeats per "
                f"configuration, {times[0] if times else 'n/a'} to {times[-1] if times else 'n/a'}"),
        ("code", f"git commit {v('git_commit')}"),
        ("matmul peak measured", v("matmul_peak_measured")),
        ("command", run_command(rows)),
        ("files", ", ".join(dict.fromkeys(rows["source"])) if "source" in rows else "n/a"),
    ]


def _slug(text_: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text_).strip("-")[:60] or "group"


def build(df: pd.DataFrame, pool: bool = False, plot_dir: Path | None = None, stem: str = "") -> list[GroupReport]:
    """One GroupReport per machine and run (one in all with ``pool``); plots written into
    ``plot_dir`` when it is given."""
    parts = groups(df, pool)
    reports = []
    for label, rows in parts:
        r = GroupReport(label, rows, summarise(rows), picks_for(rows), provenance(rows))
        if plot_dir is not None:
            r.plots = write_plots(rows, plot_dir, _plot_stem(parts, rows, stem))
        reports.append(r)
    return reports


def _plot_stem(parts, rows: pd.DataFrame, stem: str) -> str:
    suffix = "" if len(parts) == 1 else "-" + _slug(f"{values(rows, 'machine_id')}-{values(rows, 'run_id')}")
    return f"{stem}{suffix}" if stem else suffix.lstrip("-")


def plot_paths(df: pd.DataFrame, plot_dir: Path, stem: str = "", pool: bool = False) -> list[Path]:
    """The PNGs :func:`build` may write into ``plot_dir``, to check them before drawing."""
    parts = groups(df, pool)
    return [Path(plot_dir) / name for _, rows in parts for name in plot_names(_plot_stem(parts, rows, stem))]


def render_markdown(tables, title: str = "Benchmark results", merged: list[str] | None = None,
                    base: Path | None = None) -> str:
    """Markdown of a report: ``tables`` is {device: table} or a list of GroupReport; plots are
    linked relative to ``base``, the Markdown file's folder."""
    # Every piece of text from the data (names, folders, error messages) goes through md_text or
    # md_cell; the command is in a code block, shown as it is, one code line per line.
    reports = tables if isinstance(tables, list) else [GroupReport("", pd.DataFrame(), tables, [], [])]
    parts = [f"# {md_text(title)}", ""]
    if merged and len(merged) > 1:
        parts += ["Merged files:", ""] + [f"- {md_text(m)}" for m in merged] + [""]
    for r in reports:
        level = "##"
        if len(reports) > 1:
            parts += [f"## {md_text(r.label)}", ""]
            level = "###"
        for p in r.picks:
            parts += [f"**Recommended on {md_text(p.device)}: {md_text(p.name or 'n/a')}.** {md_text(p.text)}", ""]
            if p.command:
                parts += ["Reproduce with:", ""] + [f"    {line}" for line in p.command.splitlines()] + [""]
        for device, table in r.tables.items():
            parts += [f"{level} {md_text(device)}", "", f"*{md_text(table.attrs.get('header', device))}*", "",
                      pipe_table(formatted(table)), ""]
            parts += [f"- {md_text(n)}" for n in table.attrs.get("notes", [])]
            parts.append("")
        for plot in r.plots:
            link = os.path.relpath(plot, base) if base is not None else plot.name
            parts += [f"![{md_text(plot.stem)}]({urllib.parse.quote(Path(link).as_posix())})", ""]
        if r.provenance:
            parts += [f"{level} Provenance", "", "| what | value |", "|---|---|"]
            parts += [f"| {md_cell(k)} | {md_cell(v)} |" for k, v in r.provenance]
            parts.append("")
    return "\n".join(parts)


def _write(target: Path, content: str, flag: str) -> Path:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, content)
    except OSError as exc:
        raise OutputError(f"{flag} {target}: cannot write ({exc.strerror or exc})") from None
    return target


def write_reports(paths: list[Path], markdown: Path | None = None, html: Path | None = None,
                  plot_dir: Path | None = None, stem: str = "", pool: bool = False,
                  title: str = "Benchmark results") -> list[Path]:
    """Load ``paths`` and write what is asked: PNG plots into ``plot_dir``, Markdown, and one
    self-contained HTML file (plots embedded; drawn in a temporary folder when no ``plot_dir``)."""
    from . import htmlreport

    df = load(paths)
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="bench-plots-") as tmp:
        where = plot_dir if plot_dir is not None else (Path(tmp) if html else None)
        reports = build(df, pool, where, stem)
        if plot_dir is not None:
            written += [p for r in reports for p in r.plots]
        if markdown:
            # Plots drawn only for the HTML (a temporary folder) are not linked from the Markdown.
            md_reports = reports if plot_dir is not None else [
                GroupReport(r.label, r.rows, r.tables, r.picks, r.provenance, []) for r in reports]
            written.append(_write(Path(markdown), render_markdown(md_reports, title, df.attrs.get("merged"),
                                                                  base=Path(markdown).parent), "--markdown"))
        if html:
            written.append(_write(Path(html), htmlreport.render(reports, title, df.attrs.get("merged", [])),
                                  "--html"))
    return written


# --- the command --------------------------------------------------------------------------

def cmd_report(args) -> int:
    paths = [Path(p) for p in (args.csv or [DEFAULT_CSV])]
    df = load(paths)
    # Every output is checked before anything is drawn or written: none may exist (unless
    # --overwrite), be one of the CSVs read, a run's files, or another of these outputs.
    with Outputs(args.overwrite, inputs=paths, what_inputs="one of the CSVs being reported") as outputs:
        markdown = outputs.file(args.markdown, "--markdown") if args.markdown else None
        html = outputs.file(args.html, "--html") if args.html else None
        plot_dir = paths[0].parent if args.plot else None
        if plot_dir is not None:
            for png in plot_paths(df, plot_dir, paths[0].stem, args.pool):
                outputs.file(png, "--plot", fix="move it away")
        tb, target = tracking.check_flags(args, paths[0].parent)  # before anything is written
        print(render_console_report(build(df, args.pool), df.attrs.get("merged", [])))
        written = write_reports(paths, markdown=markdown, html=html, plot_dir=plot_dir, stem=paths[0].stem,
                                pool=args.pool)
    if written:
        print("\nwritten: " + ", ".join(str(p) for p in written))
    elif args.plot:
        print("\nplots: none (no successful runs)")
    return tracking.export(df, tb, target, artifacts=written + paths)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("report", help="tabulate result CSVs: per machine and run, one table per device, "
                                             "medians over repeats")
    p.add_argument("csv", nargs="*", metavar="CSV", default=[DEFAULT_CSV],
                   help=f"result CSVs to read, e.g. a CPU and a GPU run (default {DEFAULT_CSV})")
    p.add_argument("--markdown", metavar="PATH", help="also write the report as Markdown to PATH")
    p.add_argument("--html", metavar="PATH", help="also write one self-contained HTML report (plots embedded, "
                                                  "opens offline) to PATH")
    p.add_argument("--plot", action="store_true", help="also write PNG charts beside the first CSV")
    add_overwrite_flag(p, " (--markdown, --html, --plot's PNGs)")
    p.add_argument("--pool", action="store_true", help="treat rows of different machines and runs as repeats of "
                                                       "one another (default: a report per machine and run)")
    tracking.add_flags(p)
    p.set_defaults(func=cmd_report)
    return p
