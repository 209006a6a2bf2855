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
import subprocess
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


# --- a real 2-task cluster on loopback -------------------------------------------------------------------

LIMIT = 60  # seconds: the bound on every wait for a process to end on its own (as tests/test_cluster.py)


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    """64 synthetic flowers in one folder every process reads (--data-dir): 48 train, 16 test."""
    from flowers_fast import synthetic

    return synthetic.generate(tmp_path_factory.mktemp("flowers") / "set", 64, 0)


def _cluster_and_one(tmp_path, given: dict, task_extra=()) -> dict:
    """``given`` as 2 multiworker tasks and as one process at the same global batch, all at once
    (times mean nothing here), each with its own --cache-dir (where --reuse-features keeps the
    features it ended with); their rows by name."""
    from bench.loopback import _wait, free_ports, start, task_env, tf_config, train_argv

    batch = given["batch_size"]
    procs, logs, argvs = {}, {}, {}
    ports = free_ports(2)
    for name, strategy, b, env in (("worker 0", "multiworker", batch, {"TF_CONFIG": tf_config(ports, 0)}),
                                   ("worker 1", "multiworker", batch, {"TF_CONFIG": tf_config(ports, 1)}),
                                   ("one process", "default", 2 * batch, {})):
        stem = name.replace(" ", "")
        extra = list(task_extra) if strategy == "multiworker" else []
        argvs[name] = train_argv({**given, "strategy": strategy, "batch_size": b}) + extra + \
            ["--cache-dir", str(tmp_path / f"cache-{stem}"), "--json", str(tmp_path / f"{stem}.json")]
        logs[name] = tmp_path / f"{stem}.log"
        procs[name] = start(argvs[name], task_env(env), logs[name], cwd=ROOT)
    _wait(procs, logs, 600)
    rows = {name: json.loads((tmp_path / f"{name.replace(' ', '')}.json").read_text()) for name in procs}
    for name, row in rows.items():
        row["cache"] = tmp_path / f"cache-{name.replace(' ', '')}"
        row["log"] = logs[name].read_text(errors="replace")
    return rows


def _features(row) -> dict:
    from flowers_fast import featurestore

    stored = featurestore.load(row["cache"], row["features_key"])
    assert stored is not None, row["log"][-2000:]
    return stored[0]


def _check_sharded_run(rows, shared_by: str) -> None:
    w0, w1, one = rows["worker 0"], rows["worker 1"], rows["one process"]
    assert (w0["workers"], w0["global_batch"], one["global_batch"]) == (2, 32, 32)
    # Each task ran half of the files through the pass (train and test), one process all of them.
    assert (w0["feature_pass_images"], w1["feature_pass_images"], one["feature_pass_images"]) == (24, 24, 48)
    assert (w0["test_feature_pass_images"], w1["test_feature_pass_images"]) == (8, 8)
    assert w0["train_images"] == w1["train_images"] == one["train_images"] == 48
    for i, row in enumerate((w0, w1)):
        assert f"train feature pass over 24 of 48 images (shard {i} of 2), then shared by {shared_by}" in row["log"]
    # Every task ended with every file's features, equal to one process's (none missed: the same keys).
    base = _features(one)
    for row in (w0, w1):
        got = _features(row)
        assert sorted(got) == sorted(base) and len(base) == 64
        a = np.stack([got[f] for f in sorted(base)]).astype(np.float32)
        b = np.stack([base[f] for f in sorted(base)]).astype(np.float32)
        cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert cosine.min() >= 0.9999
    # The heads trained data-parallel: the tasks agree exactly, and match one process at the same
    # global batch (48 = 32 + 16, split 16+16 and 8+8) within test_cluster.py's tolerance.
    assert (w0["test_loss"], w0["test_accuracy"]) == (w1["test_loss"], w1["test_accuracy"])
    assert w0["test_loss"] == pytest.approx(one["test_loss"], rel=1e-5)
    assert w0["test_accuracy"] == one["test_accuracy"]


def _given(flowers, handle, size: int) -> dict:
    return dict(pipeline="featcache", data_dir=str(flowers), image_size=size, epochs=2, batch_size=16,
                model_handle=str(handle), breakdown=False, reuse_features=True, peer_timeout=120.0)


@pytest.mark.slow
def test_two_tasks_each_pass_half_and_end_with_one_process_features(small_model, flowers, tmp_path):
    rows = _cluster_and_one(tmp_path, _given(flowers, small_model, 96))
    _check_sharded_run(rows, "all-gather")


@pytest.mark.slow
def test_the_shared_folder_way_gives_the_same(small_model, flowers, tmp_path):
    store = tmp_path / "store"
    rows = _cluster_and_one(tmp_path, _given(flowers, small_model, 96), ["--shard-store", str(store)])
    _check_sharded_run(rows, f"the shared folder {store}")
    assert store.is_dir() and not any(store.iterdir())  # the chief removed the run's shards once all had read them


@pytest.mark.slow
@pytest.mark.skipif(not PRETRAINED.is_dir(), reason=f"no pretrained weights at {PRETRAINED}")
def test_two_tasks_on_pretrained_weights(flowers, tmp_path):
    rows = _cluster_and_one(tmp_path, _given(flowers, PRETRAINED, 224))  # its fixed input size
    _check_sharded_run(rows, "all-gather")


@pytest.mark.slow
@pytest.mark.parametrize("killed, store", [(1, False), (0, True)], ids=["all-gather, worker 1 killed",
                                                                         "shared folder, the chief killed"])
def test_a_task_killed_mid_pass_ends_its_peer_with_one_line(small_model, tmp_path, killed, store):
    """SIGKILL one task during its feature pass (one image per inference call keeps the pass a few
    seconds long): the survivor, which goes on to share its shard, ends with one line naming the
    task it lost, within the bound the cluster tests use; the dead task's shard never appears."""
    from bench.loopback import free_ports, start, stop, task_env, tf_config, train_argv

    given = dict(pipeline="featcache", num_images=400, image_size=96, epochs=1, model_handle=str(small_model),
                 breakdown=False, feature_batch_size=1, strategy="multiworker", peer_timeout=120.0)
    extra = ["--shard-store", str(tmp_path / "store")] if store else []
    ports, procs, logs = free_ports(2), [], []
    try:
        for i in range(2):
            logs.append(tmp_path / f"w{i}.log")
            procs.append(start(train_argv(given) + extra, task_env({"TF_CONFIG": tf_config(ports, i)}), logs[i],
                               cwd=ROOT))
        victim, survivor = procs[killed], procs[1 - killed]
        end = time.monotonic() + 240
        while "train feature pass over" not in logs[killed].read_text(errors="replace"):
            assert time.monotonic() < end and victim.poll() is None, logs[killed].read_text()[-2000:]
            time.sleep(0.05)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
        assert "train features of" not in logs[killed].read_text()  # it died before its shard was shared
        t0 = time.monotonic()
        try:
            survivor.wait(timeout=LIMIT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the survivor still runs {LIMIT} s after its peer died:\n"
                        f"{logs[1 - killed].read_text()[-2000:]}")
        text = logs[1 - killed].read_text(errors="replace")
        assert survivor.returncode == 10, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
        lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip()]
        assert f"error: --strategy multiworker: worker {1 - killed} of 2: " in lines[-1], text[-3000:]
        lost = lines[-1].split(" of 2: ", 1)[1]  # names the task it lost (the chief runs the coordination service)
        assert f"worker {killed}" in lost or (killed == 0 and "the chief (task 0" in lost), lost
        print(f"\nsurvivor ended {time.monotonic() - t0:.1f} s after the kill: {lines[-1]}")
        if store:
            assert not list((tmp_path / "store").glob(f"run-*/train-{killed}-of-2.npz"))
    finally:
        stop(procs)


def test_tasks_must_agree_on_sharing_by_folder_but_not_on_its_path():
    from flowers_fast import cluster
    from flowers_fast.config import RunConfig

    base = RunConfig(pipeline="featcache", strategy="multiworker")
    here, there = base.replace(shard_store="/mnt/a"), base.replace(shard_store="/shared/a")
    assert cluster.shared_settings(here) == cluster.shared_settings(there)  # each host's own mount point
    assert cluster.shared_settings(here) != cluster.shared_settings(base)  # all-gather on one, a folder on the other


# --- featcache's stream from the tf.data service -------------------------------------------------------

def test_featcache_pass_from_the_data_service_equals_the_local_one(tiny_cfg, cache):
    """Two service workers decode the feature pass (each hands its batches back in its own time);
    the features come back in the files' order, so the run is the local one: the same files, the
    same head, the same test loss."""
    from flowers_fast import distribute, train

    dispatcher = distribute.dispatcher(0)
    port = int(dispatcher.target.rsplit(":", 1)[1])
    workers = [distribute.worker(0, f"127.0.0.1:{port}", "127.0.0.1:%port%") for _ in range(2)]
    try:
        # Several head steps an epoch, so that a change in the head's batches would show in the loss.
        cfg = tiny_cfg(pipeline="featcache", num_images=40, feature_batch_size=4, batch_size=8, epochs=3)
        local = train.run(cfg, cache, progress=False, predictions=False).row
        remote = train.run(cfg.replace(data_service=f"grpc://127.0.0.1:{port}"), cache, progress=False,
                           predictions=False).row
    finally:
        for w in workers:
            w.stop()
        dispatcher.stop()
    assert remote["feature_pass_images"] == local["feature_pass_images"] == local["train_images"] == 30
    assert remote["test_feature_pass_images"] == local["test_feature_pass_images"] == 10
    assert remote["test_loss"] == pytest.approx(local["test_loss"], rel=1e-5)
    assert remote["test_accuracy"] == local["test_accuracy"]


@pytest.mark.slow
def test_cutcache_shards_its_pass_to_the_cut_too(small_model, flowers, tmp_path):
    given = {**_given(flowers, small_model, 96), "pipeline": "cutcache", "reuse_features": False, "epochs": 1,
             "fine_tune_epochs": 1, "fine_tune_from": "block_16"}
    rows = _cluster_and_one(tmp_path, given)
    w0, w1, one = rows["worker 0"], rows["worker 1"], rows["one process"]
    assert (w0["feature_pass_images"], w1["feature_pass_images"], one["feature_pass_images"]) == (24, 24, 48)
    assert w0["train_images"] == one["train_images"] == 48 and w0["cut_cache_layer"] == one["cut_cache_layer"]
    assert (w0["test_loss"], w0["test_accuracy"]) == (w1["test_loss"], w1["test_accuracy"])
    assert w0["test_loss"] == pytest.approx(one["test_loss"], rel=1e-5)


def test_bench_loopback_reports_each_tasks_share_of_the_pass():
    from bench import loopback

    row = dict(replicas=2, global_batch=32, train_images=48, test_accuracy=0.5, test_loss=1.0, feature_pass_s=1.0,
               feature_share_s=0.5)
    rows = {"worker 0": {**row, "feature_pass_images": 24}, "worker 1": {**row, "feature_pass_images": 24},
            "one process": {**row, "replicas": 1, "feature_pass_images": 48, "feature_share_s": 0.0}}
    text = loopback.report(rows, 2)
    assert [line.split() for line in text.splitlines() if line.startswith("feature_pass_images ")] == \
        [["feature_pass_images", "24", "24", "48"]]
    assert "feature_pass_images" not in loopback.report({n: {k: v for k, v in r.items() if "feature" not in k}
                                                         for n, r in rows.items()}, 2)
