"""Which task of a multiworker run streams which files through the frozen pass, and the shards put
back in the split's order. No TensorFlow: plain positions and NumPy.

Position ``p`` of the (already seeded) split goes to task ``p % tasks``: every file to exactly one
task, shards that differ by at most one file, and the same split as in one process. The tasks
share their rows either by the strategy's all-gather (``distribute.all_gather``: equal-sized
blocks, so each shard is padded to ``width`` rows with a mask of the rows that hold a feature) or
through a shared folder (``featurestore.save_shard``: each shard with its global positions).
"""

from __future__ import annotations

import numpy as np


def width(n: int, tasks: int) -> int:
    """Rows of the largest shard: every task's block is padded to this for the all-gather."""
    return -(-n // tasks)


def positions(n: int, tasks: int, index: int) -> np.ndarray:
    """The positions (0..n-1) of the split that task ``index`` of ``tasks`` streams."""
    if not 0 <= index < tasks:
        raise ValueError(f"task {index} is not 0..{tasks - 1}")
    return np.arange(index, n, tasks)


def take(seq, tasks: int, index: int) -> list:
    """Task ``index``'s shard of ``seq`` (files or labels), in order."""
    return [seq[p] for p in positions(len(seq), tasks, index)]


def block(rows: np.ndarray, kept: np.ndarray, n: int, tasks: int) -> tuple[np.ndarray, np.ndarray]:
    """This task's rows as one all-gather block: ``rows`` are the features of the shard's files that
    decoded (``kept``: a bool per shard file), placed at their shard positions and padded with zeros
    to ``width(n, tasks)``; returns (block, mask of the rows that hold a feature, as int32)."""
    w = width(n, tasks)
    kept = np.asarray(kept, bool)
    if kept.sum() != len(rows):
        raise ValueError(f"{len(rows)} rows for {int(kept.sum())} kept files")
    out = np.zeros((w, *rows.shape[1:]), rows.dtype)
    mask = np.zeros(w, np.int32)
    out[:len(kept)][kept] = rows
    mask[:len(kept)][kept] = 1
    return out, mask


def order(n: int, tasks: int) -> np.ndarray:
    """For each position of the split, its row in the blocks gathered in task order
    (task ``t``'s block is rows ``t * width .. (t + 1) * width - 1``)."""
    p = np.arange(n)
    return (p % tasks) * width(n, tasks) + p // tasks


def unblock(gathered: np.ndarray, mask: np.ndarray, n: int, tasks: int) -> tuple[np.ndarray, np.ndarray]:
    """The gathered blocks in the split's order: (rows of the positions that decoded, those positions)."""
    rows = order(n, tasks)
    have = np.asarray(mask)[rows].astype(bool)
    return gathered[rows[have]], np.flatnonzero(have)


def merge(shards: list[tuple[np.ndarray, np.ndarray]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Shards read from a shared folder, each (global positions, rows), in the split's order:
    (rows, their positions). A position claimed twice, or one out of range, is an error."""
    where = np.concatenate([np.asarray(p, np.int64) for p, _ in shards]) if shards else np.zeros(0, np.int64)
    if len(where) and (where.min() < 0 or where.max() >= n):
        raise ValueError(f"a shard holds a position outside 0..{n - 1}")
    if len(np.unique(where)) != len(where):
        raise ValueError("two shards hold the same position")
    rows = np.concatenate([r for _, r in shards])
    by = np.argsort(where, kind="stable")
    return rows[by], where[by]
