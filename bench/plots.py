"""PNG charts that answer "which configuration should I pick, and what does it cost?", drawn
with matplotlib's Agg canvas from one group of rows (one machine and run, or a pool).

* ``<stem>-time.png``: time to a trained model per configuration (``total_s``, what
  ``recommend`` minimises), split into data preparation, feature pass, first epoch, the
  later epochs and a fine-tune phase, with the speed-up vs naive written on each bar. The bar is the median repeat's
  own split (its parts add up to its total; medians of parts would not); the error bar is the
  min-max of ``total_s`` over repeats. The axis stays linear even when totals span more than
  10x: on a log axis stacked parts would not add up visually; every bar carries its number.
* ``<stem>-accuracy.png``: test accuracy vs time to a trained model, one point per
  configuration (circles: frozen backbone; triangles: fine-tuned), min-max error bars, marker
  area = peak RSS, the Pareto front (nothing both
  faster and more accurate) drawn, the accuracy band ``recommend`` chose within shaded and its
  choice marked.
* ``<stem>-stages.png``: images per second through each stage. Rates through the backbone
  (whole-model training, featcache's feature pass, their input pipelines) share one axis;
  featcache's head-only epochs, which never run the backbone, get an axis of their own. Each
  feature pass is drawn beside the rate of its two stages taking turns on the same cores and
  labelled with its fraction of the slower stage (``feature_pass_bound_fraction``).

Log scales where a shared axis spans more than 10x; "n/a" where a value does not exist.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from flowers_fast.errors import UserError
from flowers_fast.figures import save_figure

from .results import DEVICE_ORDER, ORDER, int_text, median_runs, medians, normalise, ordered, values

PARTS = (("prep", "data preparation", "#8172B2"), ("feature", "frozen pass, once (featcache: backbone; cutcache: bottom to the cut, and top)", "#64B5CD"),
         ("first", "epoch 1 (tracing, cache fill)", "#DD8452"), ("later", "epochs 2..N", "#4C72B0"),
         ("fine", "fine-tune phase (top of the backbone trained)", "#C44E52"))
STAGE_COLOURS = {"input": "#8172B2", "model": "#C44E52", "shared": "#BBBBBB", "e2e": "#4C72B0", "head": "#55A868"}
NA = "n/a"
PROBE = "modelonly"  # pipelines that train no model: no time to a trained model, no accuracy


def write_plots(df: pd.DataFrame, out_dir: str | Path, stem: str = "") -> list[Path]:
    """Write the three charts into ``out_dir`` as ``<stem>-time.png`` etc. (``time.png`` without
    a stem); returns their paths ([] when no run finished). ``df`` is one group of rows."""
    if "acc_pct" not in df.columns:
        df = normalise(df)
    med = medians(df)
    if med.empty or not (med["n_ok"] > 0).any():
        return []
    time_png, accuracy_png, stages_png = (Path(out_dir) / name for name in plot_names(stem))
    picks = recommendations(df)
    subtitle = _subtitle(df)
    return [_time_to_model(df, med, picks, time_png, subtitle),
            _accuracy_vs_time(med, picks, accuracy_png, subtitle),
            _stages(med, stages_png, subtitle)]


def plot_names(stem: str = "") -> tuple[str, str, str]:
    """The files :func:`write_plots` writes for ``stem``, so that callers can check them first."""
    prefix = f"{stem}-" if stem else ""
    return f"{prefix}time.png", f"{prefix}accuracy.png", f"{prefix}stages.png"


def recommendations(df: pd.DataFrame) -> dict[str, pd.Series]:
    """{device: recommend's choice (default settings)} for the devices where it can choose."""
    from .recommend import recommend

    picks = {}
    for device in ordered(df["device"], DEVICE_ORDER):
        try:
            picks[device] = recommend(df, device)[0]
        except UserError:
            continue
    return picks


def _subtitle(df: pd.DataFrame) -> str:
    ok = df[(df["status"] == "ok") & (df["pipeline"] != PROBE)]
    ok = ok if len(ok) else df[df["status"] == "ok"]

    def one(col):
        v = values(ok, col)
        return v.replace(".0", "") if v.endswith(".0") else v
    return (f"data {values(ok, 'dataset')} ({one('train_images')} train / {one('test_images')} test images, "
            f"{one('image_size')} px), weights {values(ok, 'weights')}, {one('epochs')} epochs, "
            f"batch {one('batch_size')}, TF {values(ok, 'tf_version')}" + _cpu_line(ok))


def _cpu_line(rows: pd.DataFrame) -> str:
    """The CPU and its ISA flags (machine facts), on a line of its own: the same configuration
    runs at very different rates with and without AVX-512 BF16 or AMX."""
    isa = values(rows, "cpu_isa")
    if isa == "?":
        return ""
    return f"\nCPU {values(rows, 'cpu_brand')}, {int_text(values(rows, 'cpu_logical_cores'))} cores: {isa}"


def _span_over_10x(values_) -> bool:
    v = np.asarray([x for x in values_ if x is not None and np.isfinite(x) and x > 0], dtype=float)
    return v.size > 1 and v.max() / v.min() > 10


def _err(med: pd.DataFrame, col: str) -> np.ndarray | None:
    """Asymmetric min-max error bars for ``col`` (zero where there is one repeat); None if no spread."""
    n = med[col + "_n"].to_numpy(dtype=float)
    lo = np.where(n >= 2, med[col] - med[col + "_lo"], 0.0)
    hi = np.where(n >= 2, med[col + "_hi"] - med[col], 0.0)
    lo, hi = np.nan_to_num(lo), np.nan_to_num(hi)
    return np.vstack([lo, hi]) if (lo > 0).any() or (hi > 0).any() else None


def _device_title(med: pd.DataFrame, device: str) -> str:
    return f"{device} ({values(med[med['device'] == device], 'device_name')})"


def _repeats_note(med: pd.DataFrame) -> str:
    n = sorted({int(v) for v in med.loc[med["n_ok"] > 0, "n_ok"]})
    if not n:
        return "no finished run"
    return ("1 run each (no spread)" if n == [1] else
            f"median of {'/'.join(map(str, n))} runs, error bars min–max")


# --- time to a trained model --------------------------------------------------------------------

def _parts(run: pd.Series) -> dict[str, float]:
    def num(col):
        v = pd.to_numeric(run.get(col, np.nan), errors="coerce")
        return 0.0 if pd.isna(v) else float(v)
    prep = num("data_prep_s")
    # cutcache's pass to the cut (and the frozen top's features of the head phase) runs once, as featcache's.
    feature = num("feature_pass_warmup_s") + num("feature_pass_s") + num("cut_pass_warmup_s") + num("cut_pass_s") \
        + num("cut_top_pass_s")
    first = num("first_epoch_s")
    train = num("train_s") or max(num("total_s") - prep - feature, 0.0)
    fine = min(num("fine_tune_phase_s"), train)  # the second phase's epochs, after the frozen head's
    return {"prep": prep, "feature": feature, "first": first, "later": max(train - first - fine, 0.0), "fine": fine}


def fine_tuned(m: pd.DataFrame) -> np.ndarray:
    """Which rows trained part of the backbone (a fine-tune phase, or --fine-tune from the start)."""
    phase = pd.to_numeric(m.get("fine_tune_epochs", pd.Series(0, index=m.index)), errors="coerce").fillna(0) > 0
    whole = m.get("fine_tune", pd.Series(False, index=m.index)).astype(str).str.lower().isin(("true", "1", "1.0"))
    return (phase | whole).to_numpy()


def _time_to_model(df, med, picks, path: Path, subtitle: str) -> Path:
    trained = med[med["pipeline"] != PROBE]
    devs = ordered(trained["device"], DEVICE_ORDER) or ordered(med["device"], DEVICE_ORDER)
    reps = median_runs(df).set_index(["device", "name"])
    n_rows = max(len(trained[trained["device"] == d]) for d in devs) if len(trained) else 1
    fig = Figure(figsize=(11.5, 1.2 + (0.5 * n_rows + 1.3) * len(devs)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(devs), 1, squeeze=False)[:, 0])
    for ax, dev in zip(axes, devs):
        m = trained[trained["device"] == dev].copy()
        m["_sort"] = m["total_s"].fillna(np.inf)
        m = m.sort_values(["_sort"], kind="mergesort").reset_index(drop=True)
        y = np.arange(len(m))[::-1]  # the fastest on top
        naive = m.loc[m["name"] == "naive", "total_s"]
        naive_total = float(naive.iloc[0]) if len(naive) and np.isfinite(naive.iloc[0]) else np.nan
        pick = picks.get(dev)
        right = float(np.nanmax(m["total_s_hi"].to_numpy(dtype=float))) if m["total_s"].notna().any() else 1.0
        if m.empty:
            ax.text(0.5, 0.5, f"{NA}: no configuration here trains a model (model-only probes: see the stages plot)",
                    ha="center", va="center", transform=ax.transAxes, fontsize=9)
        for yi, (_, r) in zip(y, m.iterrows()):
            if not np.isfinite(r["total_s"]):
                if r.get("n_skipped") and not r["n_failed"]:
                    label = f"{NA}: skipped, this machine lacks what it needs (see the report)"
                else:
                    why = "failed" if r["n_failed"] else "no total"
                    label = f"{NA}: {why} ({r['n_failed']} of {r['n_failed'] + r['n_ok']} runs)"
                ax.text(0.01 * right, yi, label, va="center", fontsize=8, color="#B22222")
                continue
            key = (dev, r["name"])
            parts = _parts(reps.loc[key]) if key in reps.index else {"later": r["total_s"]}
            # The median run's own parts, scaled onto the median total it belongs to.
            scale = r["total_s"] / sum(parts.values()) if sum(parts.values()) > 0 else 1.0
            left = 0.0
            for key_, _, colour in PARTS:
                width = parts.get(key_, 0.0) * scale
                if width > 0:
                    ax.barh(yi, width, left=left, color=colour, height=0.62)
                    left += width
            if r["total_s_n"] >= 2:
                ax.errorbar(r["total_s"], yi, xerr=[[r["total_s"] - r["total_s_lo"]], [r["total_s_hi"] - r["total_s"]]],
                            fmt="none", ecolor="black", capsize=3, lw=1)
            if r["name"] == "naive":
                gain = "baseline"
            elif np.isfinite(naive_total):
                gain = f"{naive_total / r['total_s']:.2f}x vs naive"
            else:
                gain = f"vs naive {NA}"
            end = max(r["total_s"], r["total_s_hi"] if np.isfinite(r["total_s_hi"]) else 0)
            ax.text(end + 0.01 * right, yi, f" {r['total_s']:.3g} s, {gain}", va="center", fontsize=9,
                    fontweight="bold" if pick is not None and r["name"] == pick["name"] else "normal")
        labels = [f"{n}  (recommended)" if pick is not None and n == pick["name"] else n for n in m["name"]]
        ax.set_yticks(y)
        ax.set_yticklabels(labels)
        for tick, n in zip(ax.get_yticklabels(), m["name"]):
            if pick is not None and n == pick["name"]:
                tick.set_fontweight("bold")
        ax.set_xlim(0, right * 1.42)
        ax.set_xlabel("seconds to a trained model (wall clock; lower is better)")
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(f"{_device_title(med, dev)}: {_repeats_note(m)}", fontsize=10)

    fig.legend(handles=[Patch(color=c, label=label) for _, label, c in PARTS], fontsize=8, ncol=len(PARTS),
               loc="outside lower center", frameon=False)
    fig.suptitle(f"Time to a trained model, by part, and speed-up vs naive\n{subtitle}", fontsize=11)
    return save_figure(fig, path, dpi=110)


# --- accuracy vs time ----------------------------------------------------------------------

def pareto(times, accs) -> list[int]:
    """Indices of the points no other point beats on both (less time, at least as accurate, or
    as fast and more accurate), ordered by time."""
    pts = [(t, a, i) for i, (t, a) in enumerate(zip(times, accs)) if np.isfinite(t) and np.isfinite(a)]
    front = [i for t, a, i in pts
             if not any((t2 <= t and a2 >= a) and (t2 < t or a2 > a) for t2, a2, _ in pts)]
    return sorted(front, key=lambda i: (times[i], -accs[i]))


def _accuracy_vs_time(med, picks, path: Path, subtitle: str) -> Path:
    trained = med[(med["pipeline"] != PROBE) & med["total_s"].notna() & med["acc_pct"].notna()]
    devs = ordered(trained["device"], DEVICE_ORDER) or ordered(med["device"], DEVICE_ORDER)
    fig = Figure(figsize=(8.5 * len(devs) + 3.5, 6.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(devs), squeeze=False)[0])
    labels = []  # (axes, times, accuracies, names), labelled once the layout is known
    rss_all = trained["peak_rss_mb"].to_numpy(dtype=float)
    rss_ref = np.nanmax(rss_all) if np.isfinite(rss_all).any() else 1000.0

    def area(mb):
        return 40 + 600 * (mb / rss_ref) if np.isfinite(mb) else 40

    for ax, dev in zip(axes, devs):
        m = trained[trained["device"] == dev].reset_index(drop=True)
        if m.empty:
            ax.text(0.5, 0.5, f"{NA}: no trained configuration finished", ha="center", transform=ax.transAxes)
            continue
        t, a = m["total_s"].to_numpy(dtype=float), m["acc_pct"].to_numpy(dtype=float)
        pick = picks.get(dev)
        if pick is not None and np.isfinite(pick.get("acc_tolerance", np.nan)):
            lo = pick["acc_best"] - pick["acc_tolerance"]
            ax.axhspan(lo, pick["acc_best"], color="#55A868", alpha=0.12, lw=0,
                       label=f"within recommend's accuracy tolerance (best - {pick['acc_tolerance']:.2g} pt)")
        ax.errorbar(t, a, xerr=_err(m, "total_s"), yerr=_err(m, "acc_pct"), fmt="none", ecolor="grey", lw=1,
                    capsize=2, zorder=2)
        tuned = fine_tuned(m)
        sizes_ = np.array([area(v) for v in m["peak_rss_mb"]])
        for mask, marker, colour, label in ((~tuned, "o", "#4C72B0", "frozen backbone"),
                                            (tuned, "^", "#DD8452", "fine-tuned (top of the backbone trained)")):
            if mask.any():
                ax.scatter(t[mask], a[mask], s=sizes_[mask], c=colour, marker=marker, alpha=0.7, edgecolors="black",
                           linewidths=0.6, zorder=3, label=label if tuned.any() else None)
        front = pareto(t, a)
        ax.plot(t[front], a[front], "--", color="#C44E52", lw=1.2, zorder=1, drawstyle="steps-post",
                label="Pareto front (nothing faster and more accurate)")
        if pick is not None:
            i = int(np.flatnonzero(m["name"].to_numpy() == pick["name"])[0])
            ax.scatter([t[i]], [a[i]], s=area(m.loc[i, "peak_rss_mb"]) + 260, facecolors="none",
                       edgecolors="#2CA02C", linewidths=2.2, zorder=4)
            ax.plot([], [], ls="", marker="o", markersize=11, markerfacecolor="none", markeredgecolor="#2CA02C",
                    markeredgewidth=2.2, label=f"recommended: {pick['name']} (bench recommend: least total time)")
        if _span_over_10x(np.concatenate([t, m["total_s_lo"].to_numpy(dtype=float)])):
            ax.set_xscale("log")
            ax.set_xlabel("seconds to a trained model (log scale; left is faster)")
        else:
            ax.set_xlabel("seconds to a trained model (left is faster)")
            ax.set_xlim(left=0, right=np.nanmax(m["total_s_hi"].fillna(m["total_s"])) * 1.15)
        ax.set_ylabel("test accuracy % (up is better)")
        # The data's range (with its error bars) sets the axis, not the tolerance band.
        lo = np.nanmin(m["acc_pct_lo"].fillna(m["acc_pct"]))
        hi = np.nanmax(m["acc_pct_hi"].fillna(m["acc_pct"]))
        pad = max((hi - lo) * 0.25, 1.0)
        ax.set_ylim(max(lo - pad, 0.0), min(hi + pad, 100.0) + 0.5)
        ax.grid(alpha=0.3)
        ax.set_title(f"{_device_title(med, dev)}: {_repeats_note(m)}", fontsize=10)
        ax.autoscale_view()
        labels.append((ax, t, a, list(m["name"])))
        handles, _ = ax.get_legend_handles_labels()
        sizes = [Line2D([], [], ls="", marker="o", markersize=np.sqrt(area(v)), markerfacecolor="#4C72B0",
                        alpha=0.7, markeredgecolor="black", label=f"peak RSS {v:.0f} MB")
                 for v in (rss_ref / 4, rss_ref / 2, rss_ref)]
        ax.legend(handles=handles + sizes, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  labelspacing=1.3, borderpad=0.9)
    fig.suptitle(f"Accuracy vs time to a trained model (marker area = peak memory)\n{subtitle}", fontsize=11)
    # Labels are placed by where the points land on the page: only known once the layout has run.
    fig.draw_without_rendering()
    for args in labels:
        _label_points(*args)
    return save_figure(fig, path, dpi=110)


def _label_points(ax, xs, ys, names) -> None:
    """Name each point; a label that would overlap one already placed (its text box, estimated
    from its length) goes one line further down."""
    to_points = 72.0 / ax.figure.dpi
    placed: list[tuple[float, float, float]] = []  # left edge, baseline, width; in points
    order = sorted(range(len(names)), key=lambda i: (-ys[i], xs[i]))
    for i in order:
        px, py = (v * to_points for v in ax.transData.transform((xs[i], ys[i])))
        left, width, dy = px + 7, 4.8 * len(names[i]), 5
        while any(qx < left + width and left < qx + qw and abs(py + dy - qy) < 11 for qx, qy, qw in placed):
            dy -= 11
        placed.append((left, py + dy, width))
        ax.annotate(names[i], (xs[i], ys[i]), xytext=(7, dy), textcoords="offset points", fontsize=8)


# --- per-stage throughput -------------------------------------------------------------------

# (panel title, pipelines, [(column, label, colour key)])
BACKBONE_PANELS = (
    ("whole model: the backbone runs in every epoch",
     ("naive", "tutorial", "tfdata", "modelonly"),
     [("input_only_img_s", "input pipeline alone", "input"),
      ("model_only_img_s", "train step alone (in-memory batch)", "model"),
      ("train_img_s", "training end to end (steady epochs)", "e2e")]),
    ("featcache: the backbone runs once (feature pass)",
     ("featcache",),
     [("input_only_img_s", "input pipeline alone", "input"),
      ("model_only_img_s", "backbone forward alone (in-memory batch)", "model"),
      ("feature_pass_shared_cores_img_s", "the two taking turns on the same cores", "shared"),
      ("feature_pass_img_s", "feature pass end to end (x: its fraction of the slower stage)", "e2e")]),
)


def _stage_bars(ax, m: pd.DataFrame, stages, log: bool, legend: bool = True) -> None:
    x = np.arange(len(m))
    width = 0.8 / len(stages)
    for i, (col, label, colour) in enumerate(stages):
        pos = x - 0.4 + width * (i + 0.5)
        heights = m[col].to_numpy(dtype=float) if col in m.columns else np.full(len(m), np.nan)
        ok = np.isfinite(heights) & (heights > 0)
        err = _err(m, col) if col + "_n" in m.columns else None
        ax.bar(pos[ok], heights[ok], width, color=STAGE_COLOURS[colour], label=label,
               yerr=None if err is None else err[:, ok], capsize=2, error_kw={"lw": 0.8})
        for p in pos[~ok]:
            ax.text(p, 0.02, NA, rotation=90, ha="center", va="bottom", fontsize=7, color="#555555",
                    transform=ax.get_xaxis_transform())
    ax.set_xticks(x)
    ax.set_xticklabels(list(m["name"]), rotation=30, ha="right")
    ax.set_xlim(-0.6, len(m) - 0.4)  # every slot, also those holding only "n/a"
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3, which="both" if log else "major")
    if legend:
        ax.legend(fontsize=7, loc="upper right")


def _bound_labels(ax, m: pd.DataFrame, stages) -> None:
    """Above each feature pass's bar, the pass's fraction of its slower stage (the bound), from
    the bars drawn (medians: the stage rates come from the breakdown's repeats only)."""
    cols = [c for c, _, _ in stages]
    width = 0.8 / len(stages)
    i = cols.index("feature_pass_img_s")
    rates = m["feature_pass_img_s"].to_numpy(dtype=float)
    bound = np.fmin(m["input_only_img_s"].to_numpy(dtype=float), m["model_only_img_s"].to_numpy(dtype=float))
    for x, (rate, frac) in enumerate(zip(rates, rates / bound)):
        if np.isfinite(rate) and np.isfinite(frac):
            ax.annotate(f"{frac:.2f}x", (x - 0.4 + width * (i + 0.5), rate), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7)


def _stages(med: pd.DataFrame, path: Path, subtitle: str) -> Path:
    med = med[med["n_ok"] > 0].copy()
    if "feature_pass_img_s" not in med.columns:
        med["feature_pass_img_s"] = np.nan
    devs = ordered(med["device"], DEVICE_ORDER)
    fig = Figure(figsize=(15, 5.2 * len(devs) + 0.8), layout="constrained")
    rows = fig.subfigures(len(devs), 1, squeeze=False)[:, 0]
    for sub, dev in zip(rows, devs):
        m = med[med["device"] == dev]
        m = m.set_index("name").loc[ordered(m["name"], ORDER)].reset_index()
        # A model-only probe has no training end to end: its train_img_s is the probe's own rate.
        m.loc[m["pipeline"] == PROBE, "train_img_s"] = np.nan
        panels = [(title, m[m["pipeline"].isin(pipes)], stages) for title, pipes, stages in BACKBONE_PANELS]
        panels = [p for p in panels if len(p[1])]
        head = m[m["pipeline"] == "featcache"]
        widths = [max(len(p[1]), 3.2) for p in panels] + ([max(len(head), 1.6)] if len(head) else [])
        axes = sub.subplots(1, len(widths), squeeze=False, gridspec_kw={"width_ratios": widths})[0]
        rates = np.concatenate([p[1][c].to_numpy(dtype=float) for p in panels for c, _, _ in p[2]]) \
            if panels else np.array([])
        log = _span_over_10x(rates)
        top = np.nanmax(np.where(np.isfinite(rates), rates, np.nan)) if np.isfinite(rates).any() else 1.0
        for i, (ax, (title, mm, stages)) in enumerate(zip(axes, panels)):
            _stage_bars(ax, mm, stages, log)
            if "feature_pass_img_s" in [c for c, _, _ in stages]:
                _bound_labels(ax, mm, stages)
            ax.set_title(title, fontsize=9)
            ax.set_ylim(top=top * (8 if log else 1.25))
            if log:
                ax.set_ylim(bottom=max(np.nanmin(np.where(rates > 0, rates, np.nan)) / 3, 1e-3))
            if i == 0:
                ax.set_ylabel("images/s through the backbone" + (" (log scale)" if log else ""))
            else:
                ax.sharey(axes[0])
        if len(head):
            ax = axes[len(panels)]
            _stage_bars(ax, head, [("train_img_s", "head epochs on cached features", "head")],
                        _span_over_10x(head["train_img_s"]), legend=False)
            ax.set_title("featcache head only: NOT the backbone's rate,\nits own axis", fontsize=9)
            ax.set_ylabel("images/s through the Dense head only")
        n_stage = sorted(set(int(v) for v in m["model_only_img_s_n"] if v > 0)) or [0]
        sub.suptitle(f"{_device_title(med, dev)}: stage rates from {'/'.join(map(str, n_stage))} run(s) per "
                     f"configuration{' (error bars min–max)' if max(n_stage) > 1 else ''}", fontsize=10)
    fig.suptitle(f"Where the time goes: images per second through each stage\n{subtitle}", fontsize=11)
    return save_figure(fig, path, dpi=110)
