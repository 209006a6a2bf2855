"""The frozen pass sharded across a multiworker run's tasks (issue 22): which task streams which
files (no TensorFlow), the shards put back in order, the shared folder's shards (never read half
written), and a real 2-task loopback cluster: each task streams half, the gathered features equal
one process's, the heads agree, and a task killed mid-pass ends its peer with one line.

The cluster tests start ``python -m flowers_fast train`` processes at 96 px (the pretrained
stand-in at its 224) on a few dozen synthetic images and kill them all in teardown."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flowers_fast import shard

ROOT = Path(__file__).resolve().parents[1]
PRETRAINED = ROOT.parent / "shared" / "pretrained" / "mobilenet_v2_100_224_feature_vector"


# --- the assignment, without TensorFlow ------------------------------------------------------------

@pytest.mark.parametrize("n, tasks", [(0, 2), (1, 2), (7, 2), (48, 2), (10, 3), (5, 8), (3670, 7)])
def test_every_position_goes_to_exactly_one_task(n, tasks):
    shards = [shard.positions(n, tasks, i) for i in range(tasks)]
    together = np.concatenate(shards)
    assert sorted(together.tolist()) == list(range(n))  # none twice, none missed
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= (1 if n else 0) and max(sizes) == shard.width(n, tasks)
    assert all(np.all(np.diff(s) > 0) for s in shards)  # each shard keeps the split's order
    files = [f"f{p}" for p in range(n)]
    assert [shard.take(files, tasks, i) for i in range(tasks)] == [[files[p] for p in s] for s in shards]
    with pytest.raises(ValueError):
        shard.positions(n, tasks, tasks)


def _gather(blocks):
    """What the all-gather returns: the tasks' blocks concatenated in task order."""
    return np.concatenate([b for b, _ in blocks]), np.concatenate([m for _, m in blocks])


@pytest.mark.parametrize("n, tasks", [(7, 2), (10, 3), (2, 4)])
def test_blocks_gathered_in_task_order_come_back_in_the_split_order(n, tasks):
    full = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    lost = {1, n - 1}  # files that did not decode: no row, and not made up
    blocks = []
    for i in range(tasks):
        mine = shard.positions(n, tasks, i)
        kept = np.asarray([p not in lost for p in mine], bool)
        blocks.append(shard.block(full[mine[kept]], kept, n, tasks))
        assert blocks[-1][0].shape == (shard.width(n, tasks), 3)  # padded: every block the same size
    rows, where = shard.unblock(*_gather(blocks), n, tasks)
    assert where.tolist() == [p for p in range(n) if p not in lost]
    np.testing.assert_array_equal(rows, full[where])
    with pytest.raises(ValueError, match="rows for"):
        shard.block(full[:2], np.ones(3, bool), n, tasks)


def test_store_shards_merge_in_order_and_refuse_overlaps():
    full = np.arange(20, dtype=np.float32).reshape(10, 2)
    shards = [(shard.positions(10, 3, i), full[shard.positions(10, 3, i)]) for i in (2, 0, 1)]
    rows, where = shard.merge(shards, 10)
    assert where.tolist() == list(range(10))
    np.testing.assert_array_equal(rows, full)
    with pytest.raises(ValueError, match="same position"):
        shard.merge(shards + [shards[0]], 10)
    with pytest.raises(ValueError, match="outside"):
        shard.merge([(np.asarray([10]), full[:1])], 10)


# --- the shared folder: a shard counts only once whole ------------------------------------------------

def test_a_half_written_shard_is_never_read_as_complete(tmp_path):
    from flowers_fast import featurestore
    from flowers_fast.errors import ClusterError

    rows = np.ones((3, 4), np.float32)
    featurestore.save_shard(tmp_path, "r1", "train", 0, 2, np.asarray([0, 2, 4]), rows)
    final = featurestore.shard_path(tmp_path, "r1", "train", 1, 2)
    # Task 1 died while writing: atomic_open's temporary file beside the final name, half there.
    whole = featurestore.shard_path(tmp_path, "r1", "train", 0, 2).read_bytes()
    (final.parent / (final.name + ".abc.tmp")).write_bytes(whole[:len(whole) // 2])
    t0 = time.monotonic()
    with pytest.raises(ClusterError) as info:
        featurestore.load_shards(tmp_path, "r1", "train", 2, timeout=0.5)
    assert time.monotonic() - t0 < 5  # bounded
    assert "train shard of task 1 is not complete" in str(info.value) and "\n" not in str(info.value)
    # Even at its final name a cut file (say, copied in by hand) does not count.
    final.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ClusterError, match="task 1 is not complete"):
        featurestore.load_shards(tmp_path, "r1", "train", 2, timeout=0.3)
    # Nor does a whole file with another task's header.
    final.write_bytes(whole)
    with pytest.raises(ClusterError, match="task 1 is not complete"):
        featurestore.load_shards(tmp_path, "r1", "train", 2, timeout=0.3)
    featurestore.save_shard(tmp_path, "r1", "train", 1, 2, np.asarray([1, 3]), 2 * rows[:2])
    got = featurestore.load_shards(tmp_path, "r1", "train", 2, timeout=5)
    merged, where = shard.merge(got, 5)
    assert where.tolist() == [0, 1, 2, 3, 4] and merged[:, 0].tolist() == [1, 2, 1, 2, 1]
    featurestore.remove_run(tmp_path, "r1")
    assert not (tmp_path / "run-r1").exists()


def test_shard_store_needs_multiworker():
    from flowers_fast.config import RunConfig
    from flowers_fast.errors import UserError

    with pytest.raises(UserError, match="--shard-store .* add --strategy multiworker"):
        RunConfig(pipeline="featcache", shard_store="/tmp/x")
    assert RunConfig(pipeline="featcache", strategy="multiworker", shard_store="/tmp/x").shard_store == "/tmp/x"
