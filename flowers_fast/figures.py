"""Figures for one trained configuration: a confusion matrix (CSV + PNG) and a grid of test
images with their true and predicted classes, and a grid of sample images.

The ``*_figure`` functions return matplotlib ``Figure`` objects (a notebook shows them inline);
``confusion_matrix``, ``prediction_grid`` and ``run_figures`` write the same figures to files
(``train --figures``, ``bench run --figures``). No pyplot global state: no display needed."""

from __future__ import annotations

import math
from pathlib import Path
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .errors import OutputError
from .outputs import atomic_open, spreadsheet_safe


def save_figure(fig: Figure, path: Path, dpi: int = 110) -> Path:
    """Render ``fig`` with the Agg canvas (no pyplot state) to ``path``, whole or not at all (a
    symlink there is replaced, not written through); a write failure is one line."""
    FigureCanvasAgg(fig)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    except OSError as exc:
        raise OutputError(f"{path}: cannot write figure ({exc.strerror or exc})") from None
    return path


def _name(classes: Sequence[str], k: int) -> str:
    return str(classes[k]) if 0 <= k < len(classes) else f"class {k}"


def confusion_table(y_true, y_pred, classes: Sequence[str]) -> pd.DataFrame:
    """Counts with rows the true class and columns the predicted one, every class present even if
    never seen (a label beyond ``classes`` gets a ``class k`` row and column)."""
    y_true = np.asarray(y_true).astype(int).ravel()
    y_pred = np.asarray(y_pred).astype(int).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} labels, y_pred {y_pred.size}")
    n = max(len(classes), int(max(y_true.max(initial=-1), y_pred.max(initial=-1))) + 1)
    names = [_name(classes, k) for k in range(n)]
    true = pd.Categorical([names[k] for k in y_true], categories=names)
    pred = pd.Categorical([names[k] for k in y_pred], categories=names)
    table = pd.crosstab(pd.Series(true, name="true"), pd.Series(pred, name="predicted"), dropna=False)
    return table.reindex(index=names, columns=names, fill_value=0)


def confusion_figure(table: pd.DataFrame, title: str) -> Figure:
    """A heatmap of ``confusion_table``'s counts, titled ``title: confusion matrix (...)``."""
    names = list(table.index)
    n = len(names)
    counts = table.to_numpy()
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    fig = Figure(figsize=(1.1 * n + 2.5, 1.0 * n + 2))
    ax = fig.subplots()
    im = ax.imshow(counts, cmap="Blues")
    fig.colorbar(im, ax=ax, label="images")
    ax.set_xticks(range(n))
    ax.set_xticklabels(names, rotation=40, ha="right")
    ax.set_yticks(range(n))
    ax.set_yticklabels(names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = counts.max() / 2 if counts.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=9,
                    color="white" if counts[i, j] > threshold else "black")
    ax.set_title(f"{title}: confusion matrix ({counts.sum()} test images, accuracy {accuracy:.1%})", fontsize=10)
    return fig


def confusion_matrix(y_true, y_pred, classes: Sequence[str], out_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """Write ``{stem}-confusion.csv`` (``confusion_table``) and ``{stem}-confusion.png``
    (``confusion_figure``) into ``out_dir``."""
    table = confusion_table(y_true, y_pred, classes)
    out_dir = Path(out_dir)
    csv_path = out_dir / f"{stem}-confusion.csv"
    # Class names are folder names: one starting with = + - @ would be a formula in a spreadsheet.
    safe = table.rename(index=spreadsheet_safe, columns=spreadsheet_safe)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_open(csv_path, "w", newline="", encoding="utf-8") as f:
            safe.to_csv(f)
    except OSError as exc:
        raise OutputError(f"{csv_path}: cannot write ({exc.strerror or exc})") from None
    png_path = save_figure(confusion_figure(table, stem), out_dir / f"{stem}-confusion.png")
    return csv_path, png_path


def _thumbnail(path, size: int = 160):
    """The image at ``path`` as an RGB array no larger than ``size``, or None if unreadable."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")  # upright, as the model saw it
            img.thumbnail((size, size))
            return np.asarray(img)
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def _pick(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> list[int]:
    """Up to ``n`` indices in test order: mistakes first (up to half), the rest correct ones."""
    wrong = [i for i in range(len(y_true)) if y_true[i] != y_pred[i]]
    right = [i for i in range(len(y_true)) if y_true[i] == y_pred[i]]
    chosen = wrong[: n // 2]
    chosen += right[: n - len(chosen)]
    chosen += wrong[len(wrong[: n // 2]): len(wrong[: n // 2]) + n - len(chosen)]
    return sorted(chosen)


def prediction_figure(files: Sequence[str | Path], y_true, y_pred, classes: Sequence[str], n: int = 16) -> Figure:
    """A grid of up to ``n`` test images titled "true / predicted", wrong predictions in red.
    Shows mistakes (up to half the grid) alongside correct ones, in test-set order."""
    y_true = np.asarray(y_true).astype(int).ravel()
    y_pred = np.asarray(y_pred).astype(int).ravel()
    count = min(len(files), len(y_true), len(y_pred))
    if len(files) != len(y_true) or len(y_true) != len(y_pred):
        raise ValueError(f"prediction_grid: {len(files)} files, {len(y_true)} labels, {len(y_pred)} predictions")
    chosen = _pick(y_true[:count], y_pred[:count], max(n, 0))
    cols = max(1, min(4, len(chosen)))
    rows = max(1, math.ceil(len(chosen) / cols))
    fig = Figure(figsize=(3.0 * cols, 3.2 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, i in zip(axes, chosen):
        image = _thumbnail(files[i])
        if image is None:
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.imshow(image)
        wrong = y_true[i] != y_pred[i]
        ax.set_title(f"{_name(classes, y_true[i])} / {_name(classes, y_pred[i])}", fontsize=9,
                     color="red" if wrong else "black", fontweight="bold" if wrong else "normal")
    shown_wrong = sum(int(y_true[i] != y_pred[i]) for i in chosen)
    fig.suptitle(f"true / predicted ({len(chosen)} of {count} test images, {shown_wrong} wrong shown in red)",
                 fontsize=10)
    return fig


def prediction_grid(files: Sequence[str | Path], y_true, y_pred, classes: Sequence[str], out_path: str | Path,
                    n: int = 16) -> Path:
    """``prediction_figure`` written to ``out_path`` (PNG)."""
    return save_figure(prediction_figure(files, y_true, y_pred, classes, n), Path(out_path))


def sample_figure(images, labels, classes: Sequence[str], n: int = 8, title: str = "") -> Figure:
    """The first ``n`` of ``images`` (uint8, or floats in [0, 1]; [N, H, W, 3]) titled with their
    class. Channels are drawn as RGB: BGR arrays (OpenCV's order) show swapped colours, which is
    what a model fed them sees."""
    images = np.asarray(images)[:n]
    cols = max(1, min(4, len(images)))
    rows = max(1, math.ceil(len(images) / cols))
    fig = Figure(figsize=(2.6 * cols, 2.8 * rows + 0.4))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, label in zip(axes, images, labels):
        ax.imshow(np.clip(image, 0, 1) if image.dtype.kind == "f" else image)
        ax.set_title(_name(classes, int(label)), fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def figure_names(stem: str) -> tuple[str, ...]:
    """The files ``run_figures`` writes for ``stem``, so callers can check them before training."""
    return f"{stem}-confusion.csv", f"{stem}-confusion.png", f"{stem}-predictions.png"


def run_figures(result, folder: str | Path, stem: str) -> list[Path]:
    """The notebook's pictures for one trained run (a ``train.RunResult``): the confusion matrix
    (CSV, PNG) and, when the test files are known, the grid of test predictions."""
    folder = Path(folder)
    written = list(confusion_matrix(result.y_true, result.y_pred, result.classes, folder, stem))
    if result.test_files:
        written.append(prediction_grid(result.test_files, result.y_true, result.y_pred, result.classes,
                                       folder / f"{stem}-predictions.png"))
    return written
