"""featcache: the feature pass streamed from the files (no cache of decoded images, file order
kept, undecodable files counted), on either engine."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from flowers_fast import data, engine, featurestore, pipeline, synthetic, train
from flowers_fast import model as models
from flowers_fast.runners import featcache
from flowers_fast.config import RunConfig
from flowers_fast.errors import DataError
from flowers_fast.tfkeras import tf

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.fixture(scope="module")
def bad_cfg(with_bad_files, small_model):
    return RunConfig(pipeline="featcache", data_dir=str(with_bad_files), dataset="flowers", image_size=96, epochs=2,
                     batch_size=4, feature_batch_size=4, model_handle=str(small_model), breakdown=False)


@pytest.fixture(scope="module")
def on_tf(bad_cfg, cache):
    return train.run(bad_cfg, cache, progress=False)


@pytest.fixture(scope="module")
def on_ov_stored(bad_cfg, cache):
    """OpenVINO, storing its features; then the same run again, which reuses them."""
    cfg = bad_cfg.replace(engine="openvino", reuse_features=True)
    first = train.run(cfg, cache, progress=False).row
    # The second also measures the breakdown: the engine is built for that alone.
    return first, train.run(cfg.replace(breakdown=True), cache, progress=False).row


def test_featcache_streams_counts_skips_and_keeps_labels_aligned(on_tf):
    row = on_tf.row
    # The truncated JPEG decodes (grey below the cut), as cv2 reads it; the empty file does not.
    assert row["skipped_files"] == 1
    assert {Path(p).name for p in row["skipped_list"].split(";")} == {"zero.jpg"}
    assert row["train_images"] + row["test_images"] == 17
    assert row["feature_pass_s"] > 0 and row["feature_pass_img_s"] > 0 and row["feature_pass_warmup_s"] > 0
    assert row["total_s"] >= row["feature_pass_s"] + row["train_s"]
    assert 0 < row["feature_pass_first_batch_s"] < row["feature_pass_s"]  # the stream's start-up, apart
    assert row["engine_setup_s"] == 0 and row["compute_dtype"] == "float32"
    assert not row["features_reused"] and row["features_key"] == ""  # nothing stored unless asked
    # Predictions line up with their files: each test file's label is its class folder.
    assert len(on_tf.test_files) == len(on_tf.y_true) == row["test_images"]
    assert [on_tf.classes[y] for y in on_tf.y_true] == [Path(f).parent.name for f in on_tf.test_files]


def test_strict_fails_on_an_undecodable_file_streamed_or_stored(bad_cfg, cache):
    ds = data.resolve(bad_cfg, cache)
    bad = {f for f in ds.files if Path(f).name == "zero.jpg"}  # the truncated JPEG decodes, as in cv2
    fake = engine.Engine("fake", "float32", 0.0, None, lambda batches: [(np.zeros((len(b), 3)), m) for b, m in batches])

    def stream(strict):
        ctx = train.RunContext(bad_cfg.replace(strict=strict), cache, False, None, 4, {},
                               backbone=models.Backbone(None, "", "random", "float32", 3))
        return featcache.stream_features(ctx, fake, ds.files, ds.labels, "train")

    with pytest.raises(DataError, match="cannot be decoded"):
        stream(strict=True)
    kept = stream(strict=False)
    assert set(ds.files) - set(kept.files) == bad and kept.features.shape == (17, 3)
    stored = {f: np.zeros(3, np.float32) for f in kept.files}
    with pytest.raises(DataError, match="cannot be decoded"):
        featcache.stored_features(stored, ds.files, ds.labels, True, "train")
    assert len(featcache.stored_features(stored, ds.files, ds.labels, False, "train").files) == 17


def test_featcache_on_openvino_matches_tensorflow(on_tf, on_ov_stored):
    tf_row, (ov_row, _) = on_tf.row, on_ov_stored
    assert ov_row["compute_dtype"] == "float32" and ov_row["engine_setup_s"] > 0
    assert (ov_row["train_images"], ov_row["test_images"]) == (tf_row["train_images"], tf_row["test_images"])
    # Same features to about 1e-5, the same head initialisation: at most one test image apart.
    assert abs(ov_row["test_accuracy"] - tf_row["test_accuracy"]) <= 1.0 / tf_row["test_images"] + 1e-9
    assert ov_row["total_s"] > ov_row["engine_setup_s"] + ov_row["feature_pass_s"]


def test_reused_features_skip_the_pass_and_say_so(on_ov_stored, cache):
    first, again = on_ov_stored
    assert not first["features_reused"] and again["features_reused"]
    assert first["features_key"] == again["features_key"]
    assert featurestore.path(cache, first["features_key"]).is_file()
    assert again["engine_setup_s"] == 0 and math.isnan(again["feature_pass_img_s"])
    assert again["feature_pass_s"] < first["feature_pass_s"] and again["total_s"] < first["total_s"]
    # The same features, the same skipped files, the same trained head.
    assert again["skipped_list"] == first["skipped_list"] and again["compute_dtype"] == first["compute_dtype"]
    assert again["test_accuracy"] == first["test_accuracy"] and again["test_loss"] == pytest.approx(first["test_loss"])


def test_the_engine_is_measured_in_turns_with_tensorflow_float32(on_ov_stored):
    _, row = on_ov_stored
    assert row["model_only_img_s"] > 0 and row["tf_fp32_forward_img_s"] > 0
    # A ratio of rates measured in the same rounds (not of the two columns' medians), so only bounded.
    assert 0.1 < row["engine_speedup_vs_tf_fp32"] < 10
    assert row["feature_cosine_vs_fp32"] > 0.9999
    assert row["bottleneck"] in ("input-bound", "compute-bound") and row["decode_img_s"] > 0


def test_the_key_changes_with_anything_that_changes_the_features(bad_cfg, small_model, tmp_path):
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.jpg")
        files[-1].write_bytes(b"x" * (10 + i))

    def key(cfg=bad_cfg, dtype="float32"):
        return featurestore.key(cfg, str(small_model), dtype, [str(f) for f in files])[0]

    base = key()
    assert key() == base
    changed = [key(bad_cfg.replace(engine="openvino")), key(bad_cfg.replace(precision="mixed")),
               key(dtype="bfloat16"), key(bad_cfg.replace(image_size=64)), key(bad_cfg.replace(dct_decode=True))]
    assert len(set(changed) | {base}) == len(changed) + 1
    os.utime(files[0], ns=(0, 0))  # the same bytes, touched
    assert key() != base
    touched = key()
    before = os.stat(files[1])
    files[1].write_bytes(b"y" * 20)  # a new size, with the old modification time put back
    os.utime(files[1], ns=(before.st_atime_ns, before.st_mtime_ns))
    assert key() != touched


# --- in the sweep ---------------------------------------------------------------------------------

def test_cpu_only_configurations_are_left_out_on_a_gpu_with_the_reason():
    import argparse

    from bench import configs, run

    cfgs = [configs.CONFIGS["featcache"], configs.CONFIGS["featcache-ov"]]
    args = argparse.Namespace(repeats=2, preset="quick")
    jobs, not_here = run.sweep_jobs(args, configs.PRESETS["quick"], cfgs, ["cpu", "gpu"],
                                    done={("featcache", "cpu", 0)})
    assert [(c.name, c.device, k) for c, k in jobs] == [
        ("featcache-ov", "cpu", 0), ("featcache", "gpu", 0), ("featcache", "cpu", 1), ("featcache-ov", "cpu", 1),
        ("featcache", "gpu", 1)]
    assert len(not_here) == 1 and "featcache-ov on gpu" in not_here[0] and "CPU only" in not_here[0]


@pytest.mark.slow
def test_sweep_row_for_openvino_bf16_runs_or_says_why_not(tmp_path, small_model):
    import pandas as pd

    res = subprocess.run([sys.executable, "-m", "bench", "run", "--preset", "smoke", "--configs",
                          "featcache-ov-bf16", "--no-breakdown", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]  # a skipped row does not fail the sweep
    bf16 = pd.read_csv(tmp_path / "latest.csv").set_index("name").loc["featcache-ov-bf16"]
    assert bf16["engine"] == "openvino" and bf16["precision"] == "mixed"
    if engine.cpu_has_bf16():
        assert bf16["status"] == "ok" and bf16["compute_dtype"] == "bfloat16" and bf16["feature_pass_img_s"] > 0
        assert bf16["mixed_route"] == "openvino-bf16" and bf16["feature_cosine_vs_fp32"] >= 0.99
    else:  # a row that says why, not a float32 run labelled bf16
        assert bf16["status"] == "skipped" and "no native bfloat16" in bf16["error"]
        assert pd.isna(bf16.get("feature_pass_img_s"))  # nothing measured


def test_hardware_row_holds_featcache_engines_to_the_faster_matmul_peak(monkeypatch):
    from bench import worker
    from flowers_fast import metrics
    from flowers_fast.tfkeras import keras

    monkeypatch.setattr(metrics, "matmul_peak_flops", lambda device, dtype: 50e9)
    monkeypatch.setattr(engine, "matmul_peak_flops", lambda dtype: 80e9)
    layer = keras.Sequential([keras.layers.Conv2D(4, 3), keras.layers.GlobalAveragePooling2D()])  # FLOPs counted
    row = dict(compute_dtype="float32", model_only_img_s=200.0, feature_pass_img_s=100.0)
    cfg = RunConfig(pipeline="featcache", engine="openvino", image_size=96)
    out = worker.hardware_row(cfg, layer, row)
    assert out["matmul_peak_source"] == "openvino" and out["matmul_peak_gflops"] == 80
    assert out["matmul_peak_tensorflow_gflops"] == 50 and out["matmul_dtype"] == "float32"
    flops = out["backbone_gflops_per_image"] * 1e9
    assert out["model_flops_utilization"] == pytest.approx(flops * 200 / 80e9)
    assert out["feature_pass_flops_utilization"] == pytest.approx(flops * 100 / 80e9)
    # bf16 where OpenVINO would silently run float32: TensorFlow's bf16 peak only.
    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: False)
    out = worker.hardware_row(cfg, layer, dict(row, compute_dtype="bfloat16"))
    assert out["matmul_peak_source"] == "tensorflow" and "matmul_peak_openvino_gflops" not in out
    assert out["matmul_dtype"] == "bfloat16"
    # Other pipelines keep TensorFlow's peak.
    out = worker.hardware_row(RunConfig(pipeline="tfdata", image_size=96), layer, row)
    assert out["matmul_peak_source"] == "tensorflow" and "feature_pass_flops_utilization" in out


@pytest.mark.parametrize("stream,verdict", [(950.0, "PASS"), (500.0, "FAIL")])
def test_gpu_check_judges_the_feature_stream_against_its_slower_stage(stream, verdict):
    import pandas as pd

    from bench import gpu_check, results

    df = results.normalise(pd.DataFrame([dict(name="featcache", device="gpu", status="ok", test_accuracy=0.9,
                                              steady_epoch_s=0.1, total_s=10, train_img_s=1e4,
                                              feature_pass_img_s=stream, model_only_img_s=3000.0,
                                              input_only_img_s=1000.0)]))
    (label, ok, detail), = [c for c in gpu_check.checks(df, "gpu") if c[0].startswith("featcache: streamed")]
    assert ok == (verdict == "PASS") and "vs 1000 img/s" in detail


def test_pass_rate_leaves_out_the_streams_start_up():
    from flowers_fast.runners.featcache import Features

    empty = np.zeros((0, 4), np.float32)
    # 100 images in 3 s, of which 1 s until the first batch of 10 was decoded: 90 images in 2 s.
    assert Features(empty, empty, (), 3.0, passed=100, first_s=1.0, first_images=10).steady_rate() == 45.0
    # One batch (or no start-up measured): the whole pass.
    assert Features(empty, empty, (), 2.0, passed=10, first_s=1.0, first_images=10).steady_rate() == 5.0
    assert Features(empty, empty, (), 2.0, passed=10).steady_rate() == 5.0
