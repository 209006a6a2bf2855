"""PNG charts of a results table (medians over ok repeats), drawn with matplotlib's Agg canvas.

* ``speed.png``: steady epoch time (s) and training throughput (img/s) per configuration,
  one bar per device in each group, test accuracy written on the bars.
* ``stages.png``: per device, input-only vs model-only vs end-to-end images/s for each
  configuration (log scale when the values span more than 20x): which side is the bottleneck.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from flowers_fast.figures import save_figure

from .results import DEVICE_ORDER, ORDER, medians, normalise, ordered, values

DEVICE_COLOURS = {"cpu": "#4C72B0", "gpu": "#55A868"}
STAGE_COLOURS = {"input_only_img_s": "#8172B2", "model_only_img_s": "#C44E52", "end_to_end_img_s": "#DD8452"}
STAGE_LABELS = {"input_only_img_s": "input only", "model_only_img_s": "model only (train step)",
                "end_to_end_img_s": "end to end"}


def _subtitle(df: pd.DataFrame) -> str:
    ok = df[df["status"] == "ok"]
    return f"data: {values(ok, 'dataset')}, weights: {values(ok, 'weights')}"


def write_plots(df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Write the charts into ``out_dir``; returns their paths ([] when no run finished)."""
    if "acc_pct" not in df.columns:
        df = normalise(df)
    med = medians(df)
    med = med[med["n_ok"] > 0]
    if med.empty:
        return []
    out_dir = Path(out_dir)
    subtitle = _subtitle(df)
    return [_speed(med, out_dir / "speed.png", subtitle), _stages(med, out_dir / "stages.png", subtitle)]


def _speed(med: pd.DataFrame, path: Path, subtitle: str) -> Path:
    names = ordered(med["name"], ORDER)
    devs = ordered(med["device"], DEVICE_ORDER)
    x = np.arange(len(names))
    width = 0.8 / len(devs)
    fig = Figure(figsize=(max(8.0, 1.0 * len(names) + 3), 8.5), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    panels = (("steady_epoch_s", "steady epoch time (s)", "lower is better"),
              ("train_img_s", "training throughput (images/s)", "higher is better"))
    for ax, (col, label, better) in zip(axes, panels):
        for i, dev in enumerate(devs):
            d = med[med["device"] == dev].set_index("name").reindex(names)
            pos = x - 0.4 + width * (i + 0.5)
            bars = ax.bar(pos, d[col].to_numpy(dtype=float), width, label=dev,
                          color=DEVICE_COLOURS.get(dev, f"C{i + 2}"))
            for bar, acc in zip(bars, d["acc_pct"]):
                height = bar.get_height()
                if np.isfinite(height) and np.isfinite(acc):
                    ax.annotate(f"{acc:.1f}%", (bar.get_x() + bar.get_width() / 2, height), ha="center",
                                va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        ax.set_ylabel(label)
        ax.set_title(f"{label}, {better}; labels = test accuracy", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
        ax.legend(title="device", fontsize=8)
    axes[-1].set_xticks(x)
    axes[-1].set_xticklabels(names, rotation=30, ha="right")
    axes[-1].set_xlabel("configuration")
    fig.suptitle(f"MobileNetV2 transfer learning: speed per configuration ({subtitle}; medians over repeats)")
    return save_figure(fig, path, dpi=120)


def _stages(med: pd.DataFrame, path: Path, subtitle: str) -> Path:
    devs = ordered(med["device"], DEVICE_ORDER)
    stages = list(STAGE_COLOURS)
    fig = Figure(figsize=(max(8.0, 1.0 * med["name"].nunique() + 3), 4.5 * len(devs)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(devs), 1, squeeze=False)[:, 0])
    for ax, dev in zip(axes, devs):
        d = med[med["device"] == dev].set_index("name")
        d = d.reindex(ordered(d.index, ORDER))
        x = np.arange(len(d))
        width = 0.8 / len(stages)
        rates = d[stages].to_numpy(dtype=float)
        finite = rates[np.isfinite(rates) & (rates > 0)]
        log = finite.size > 0 and finite.max() / finite.min() > 20
        for i, stage in enumerate(stages):
            heights = d[stage].to_numpy(dtype=float)
            ax.bar(x - 0.4 + width * (i + 0.5), np.where(np.isfinite(heights), heights, 0.0), width,
                   label=STAGE_LABELS[stage], color=STAGE_COLOURS[stage])
        if log:
            ax.set_yscale("log")
        ax.set_xticks(x)
        ax.set_xticklabels(list(d.index), rotation=30, ha="right")
        ax.set_xlabel("configuration")
        ax.set_ylabel("images/s" + (" (log scale)" if log else ""))
        ax.set_title(f"{dev} ({values(d.reset_index(), 'device_name')}): where the time goes", fontsize=10)
        ax.grid(axis="y", alpha=0.3, which="both" if log else "major")
        ax.legend(fontsize=8)
    fig.suptitle(f"Per-stage throughput: input pipeline vs model vs end to end ({subtitle})")
    return save_figure(fig, path, dpi=120)
