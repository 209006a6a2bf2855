"""featcache: the feature pass streamed from the files (no cache of decoded images, file order
kept, undecodable files counted), on either engine."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from flowers_fast import data, pipeline, synthetic, train
from flowers_fast.errors import DataError
from flowers_fast.tfkeras import tf


def dataset_ops(ds: "tf.data.Dataset") -> set[str]:
    """The op names of a tf.data pipeline's graph, nested functions included."""
    graph = tf.compat.v1.GraphDef.FromString(tf.raw_ops.DatasetToGraphV2(input_dataset=ds._variant_tensor).numpy())
    return {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}


def test_feature_stream_decodes_in_file_order_without_a_cache(tiny_cfg, cache):
    cfg = tiny_cfg()
    ds = data.resolve(cfg, cache)
    files, labels = ds.files[:10], ds.labels[:10]
    stream = pipeline.feature_stream(files, labels, cfg, 4)
    ops = dataset_ops(stream)
    assert "ParallelMapDatasetV2" in ops and "PrefetchDataset" in ops
    assert not any("Cache" in op for op in ops)  # each image is read once: nothing is kept
    # ... which the check would see: the tfdata pipeline's cache after decoding.
    assert any("Cache" in op for op in dataset_ops(pipeline.cached(pipeline.decode_dataset(files, labels, cfg), cfg,
                                                                   "train")))
    out = list(stream.as_numpy_iterator())
    assert [len(images) for images, _, _ in out] == [4, 4, 2]
    assert [p.decode() for _, _, paths in out for p in paths] == list(files)
    assert [int(y) for _, ys, _ in out for y in ys] == list(labels)


@pytest.fixture(scope="module")
def with_bad_files(tmp_path_factory):
    """Two classes of good synthetic flowers plus a truncated and an empty file."""
    root = tmp_path_factory.mktemp("featcache_bad")
    for c, name in enumerate(("daisy", "roses")):
        (root / name).mkdir()
        for i in range(8):
            cv2.imwrite(str(root / name / f"{i}.jpg"), synthetic.render(c, np.random.default_rng([c, i])))
    raw = (root / "daisy" / "0.jpg").read_bytes()
    (root / "roses" / "cut.jpg").write_bytes(raw[: len(raw) // 3])
    (root / "daisy" / "zero.jpg").write_bytes(b"")
    return root


def test_featcache_streams_counts_skips_and_keeps_labels_aligned(with_bad_files, tiny_cfg, cache):
    cfg = tiny_cfg(pipeline="featcache", data_dir=str(with_bad_files), dataset="flowers", epochs=2, batch_size=4,
                   feature_batch_size=4)
    result = train.run(cfg, cache, progress=False)
    row = result.row
    assert row["skipped_files"] == 2
    assert {Path(p).name for p in row["skipped_list"].split(";")} == {"cut.jpg", "zero.jpg"}
    assert row["train_images"] + row["test_images"] == 16
    assert row["feature_pass_s"] > 0 and row["feature_pass_img_s"] > 0 and row["feature_pass_warmup_s"] > 0
    assert row["total_s"] >= row["feature_pass_s"] + row["train_s"]
    # Predictions line up with their files: each test file's label is its class folder.
    classes = result.classes
    assert len(result.test_files) == len(result.y_true) == row["test_images"]
    assert [classes[y] for y in result.y_true] == [Path(f).parent.name for f in result.test_files]
    with pytest.raises(DataError, match="cannot be decoded"):
        train.run(cfg.replace(strict=True), cache, progress=False)


def test_featcache_on_openvino_matches_tensorflow(tiny_cfg, cache):
    cfg = tiny_cfg(pipeline="featcache", epochs=2)
    on_tf = train.run(cfg, cache, progress=False).row
    on_ov = train.run(cfg.replace(engine="openvino"), cache, progress=False).row
    assert on_ov["compute_dtype"] == "float32" and on_ov["engine_setup_s"] > 0 and on_tf["engine_setup_s"] == 0
    assert on_ov["test_images"] == on_tf["test_images"]
    # Same features to about 1e-5, the same head initialisation: at most one test image apart.
    assert abs(on_ov["test_accuracy"] - on_tf["test_accuracy"]) <= 1.0 / on_tf["test_images"] + 1e-9
    assert on_ov["total_s"] > on_ov["engine_setup_s"] + on_ov["feature_pass_s"]


# --- in the sweep ---------------------------------------------------------------------------------

def test_cpu_only_configurations_are_left_out_on_a_gpu_with_the_reason():
    from bench import configs, run

    cfgs = [configs.CONFIGS["featcache"], configs.CONFIGS["featcache-ov"]]
    jobs, not_here = run.plan_jobs(cfgs, ["cpu", "gpu"], 2, done={("featcache", "cpu", 0)})
    assert [(c.name, c.device, k) for c, k in jobs] == [
        ("featcache-ov", "cpu", 0), ("featcache", "gpu", 0), ("featcache", "cpu", 1), ("featcache-ov", "cpu", 1),
        ("featcache", "gpu", 1)]
    assert len(not_here) == 1 and "featcache-ov on gpu" in not_here[0] and "CPU only" in not_here[0]
