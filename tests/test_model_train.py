"""The model (offline Hub MobileNetV2, head, mixed precision, save/reload), training end to end
on both pipelines, the feature cache's equivalence, and the command line."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flowers_fast import baseline, data, engine, train
from flowers_fast import model as models
from flowers_fast.config import RunConfig
from flowers_fast.tfkeras import hub, keras, tf

SIZE = 96
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cfg(small_model):
    return RunConfig(num_images=20, image_size=SIZE, epochs=1, batch_size=8, model_handle=str(small_model),
                     breakdown=False)


@pytest.fixture(scope="module")
def frozen(cfg, cache):
    """The fp32 backbone as training builds it: hub.KerasLayer on the exported SavedModel, frozen."""
    keras.utils.set_random_seed(0)
    return models.build_backbone(cfg, cache)


@pytest.fixture(scope="module")
def images(cfg, cache):
    """16 synthetic flowers (all classes, several frame sizes) as uint8 RGB at 96 px, and labels."""
    ds = data.resolve(cfg, cache)
    x, kept, _ = baseline.load_images(ds.files[:16], SIZE, rgb=True, progress=False)
    return x, np.asarray(ds.labels)[:16][kept]


def _features(layer, x_uint8, **kwargs) -> np.ndarray:
    out = layer(tf.constant(x_uint8.astype(np.float32) / 255.0), **kwargs)
    return tf.cast(out, tf.float32).numpy()


def _snapshot(weights) -> list[np.ndarray]:
    return [np.array(w.numpy(), copy=True) for w in weights]


# --- the exported offline MobileNetV2 ------------------------------------------------------------

def test_exported_model_loads_through_hub_keras_layer(frozen, small_model, images):
    assert isinstance(frozen.layer, hub.KerasLayer)
    assert frozen.handle == str(small_model)
    assert frozen.weights == "random"
    assert frozen.feature_dim == 1280
    assert frozen.compute_dtype == "float32"
    symbolic = frozen.layer(keras.Input((SIZE, SIZE, 3), dtype="float32"))
    assert symbolic.shape.as_list() == [None, 1280]
    assert symbolic.dtype == tf.float32
    x, _ = images
    out = frozen.layer(tf.constant(x.astype(np.float32) / 255.0))
    assert out.shape == (len(x), 1280) and out.dtype == tf.float32
    # Frozen, the layer ignores training=True (batch norm stays in inference mode).
    np.testing.assert_array_equal(_features(frozen.layer, x, training=True), out.numpy())


def test_exported_model_has_a_training_argument(fine_tuned, images):
    """The SavedModel traced both modes: trainable, training=True uses batch statistics."""
    x, _ = images
    inference = _features(fine_tuned.layer, x, training=False)
    training = _features(fine_tuned.layer, x, training=True)
    assert np.isfinite(training).all()
    assert np.abs(training - inference).mean() > 1e-3


def test_features_are_not_collapsed(frozen, images):
    x, _ = images
    f = _features(frozen.layer, x)
    assert np.isfinite(f).all()
    std_across_images = f.std(axis=0)
    assert std_across_images.mean() > 1e-2, std_across_images.mean()
    # Most feature channels vary across images, not just a handful.
    assert (std_across_images > 1e-3).mean() > 0.5
    # Different images -> different feature vectors.
    assert np.linalg.norm(f[0] - f[1]) > 1e-2 * np.linalg.norm(f[0])


# --- training the head only, and fine-tuning ------------------------------------------------------

def _fit(model, x, y, epochs=1):
    return model.fit(x, y, batch_size=8, epochs=epochs, verbose=0, shuffle=False)


def test_head_only_training_leaves_backbone_unchanged(frozen, cfg, images):
    x, y = images
    keras.utils.set_random_seed(0)
    clf = models.build_classifier(frozen, 5, cfg, input_kind="uint8")
    models.compile_classifier(clf, cfg)
    head = clf.get_layer("head")
    assert {id(w) for w in clf.trainable_weights} == {id(w) for w in head.trainable_weights}
    backbone_before = _snapshot(frozen.layer.weights)  # kernels and batch-norm statistics
    head_before = _snapshot(head.weights)
    assert len(backbone_before) > 100
    _fit(clf, x, y)
    for before, w in zip(backbone_before, frozen.layer.weights):
        np.testing.assert_array_equal(before, w.numpy(), err_msg=w.name)
    assert any(not np.array_equal(b, w.numpy()) for b, w in zip(head_before, head.weights))


@pytest.fixture(scope="module")
def fine_tuned(cfg, cache):
    keras.utils.set_random_seed(0)
    return models.build_backbone(cfg.replace(fine_tune=True), cache)


def test_fine_tune_trains_the_backbone(fine_tuned, cfg, images):
    x, y = images
    ft_cfg = cfg.replace(fine_tune=True)
    layer = fine_tuned.layer
    assert layer.trainable
    assert len(layer.trainable_weights) > 100
    keras.utils.set_random_seed(0)
    clf = models.build_classifier(fine_tuned, 5, ft_cfg, input_kind="uint8")
    models.compile_classifier(clf, ft_cfg)
    assert len(clf.trainable_weights) == len(layer.trainable_weights) + 2
    before = _snapshot(layer.trainable_weights)
    _fit(clf, x, y)
    changed = [not np.array_equal(b, w.numpy()) for b, w in zip(before, layer.trainable_weights)]
    assert sum(changed) > len(changed) // 2, f"only {sum(changed)}/{len(changed)} backbone weights changed"
    assert all(np.isfinite(w.numpy()).all() for w in layer.trainable_weights)


# --- save and reload -------------------------------------------------------------------------------

def test_trained_classifier_saves_and_reloads_with_same_logits(frozen, cfg, images, tmp_path):
    x, y = images
    keras.utils.set_random_seed(1)
    clf = models.build_classifier(frozen, 5, cfg, input_kind="uint8")
    models.compile_classifier(clf, cfg)
    _fit(clf, x, y)
    expected = clf.predict(x, verbose=0)
    path = tmp_path / "classifier"
    clf.save(str(path))
    assert (path / "saved_model.pb").exists()
    reloaded = keras.models.load_model(str(path), custom_objects={"KerasLayer": hub.KerasLayer})
    import tf_keras

    assert keras is tf_keras  # the test loads the way the brief's users do: tf_keras.models.load_model
    got = reloaded.predict(x, verbose=0)
    assert got.shape == (len(x), 5)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert np.abs(expected).max() > 1e-3  # not trivially zero logits


# --- feature cache equivalence ----------------------------------------------------------------------

def test_featcache_gives_same_logits_as_the_classifier(frozen, cfg, images):
    x, y = images
    clf = models.build_classifier(frozen, 5, cfg, input_kind="uint8")
    direct = clf.predict(x, batch_size=8, verbose=0)
    # Batch of 5: an uneven last batch goes through the same signature.
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    out = engine.make("tf", models.feature_function(frozen, SIZE)).run((images, y.numpy()) for images, y in ds)
    feats, labels = np.concatenate([f for f, _ in out]), np.concatenate([y for _, y in out])
    assert feats.shape == (len(x), 1280) and feats.dtype == np.float32
    np.testing.assert_array_equal(labels, y)
    via_cache = clf.get_layer("head")(tf.constant(feats)).numpy()
    np.testing.assert_allclose(via_cache, direct, atol=1e-4)
    # The featcache pipeline trains model.head_model: same initial head as the classifier's.
    head = models.head_model(5, frozen.feature_dim, cfg)
    np.testing.assert_allclose(head.predict(feats, verbose=0), direct, atol=1e-4)
    assert direct.std(axis=0).max() > 1e-3  # logits depend on the image


# --- mixed precision -----------------------------------------------------------------------------------

def test_mixed_precision_backbone_computes_in_bfloat16(frozen, cfg, cache, images):
    mixed = models.build_backbone(cfg.replace(precision="mixed"), cache)
    assert mixed.compute_dtype == "bfloat16"
    assert models.conv_compute_dtype(mixed.layer, SIZE).split(",") == ["bfloat16"]
    assert models.conv_compute_dtype(frozen.layer, SIZE).split(",") == ["float32"]
    x, _ = images
    f32 = _features(frozen.layer, x)
    mixed_out = mixed.layer(tf.constant(x.astype(np.float32) / 255.0))
    assert mixed_out.shape == (len(x), 1280)
    fmixed = tf.cast(mixed_out, tf.float32).numpy()
    rel = np.linalg.norm(fmixed - f32) / np.linalg.norm(f32)
    assert rel < 0.3, rel
    assert rel > 0.0  # really a different (reduced-precision) computation


# --- one short training run per pipeline ------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("pipeline_name", ["naive", "tfdata"])
def test_short_training_beats_chance(pipeline_name, tiny_cfg, cache):
    cfg = tiny_cfg(pipeline=pipeline_name, naive_rgb=True, num_images=200, epochs=3, learning_rate=1e-2)
    result = train.run(cfg, cache, progress=False)
    row = result.row
    assert row["train_images"] + row["test_images"] == 200
    assert row["test_images"] == math.ceil(0.25 * 200)
    assert row["skipped_files"] == 0
    assert len(row["epoch_times_s"].split()) == 3
    assert row["classes"] == 5
    assert row["channel_order"] == "RGB"
    # Chance is 0.2; measured on 2 CPU cores: naive 0.74, tfdata 0.86 (seed 0).
    assert row["test_accuracy"] >= 0.5, row["test_accuracy"]
    assert len(result.y_true) == len(result.y_pred) == 50


# --- command line ---------------------------------------------------------------------------------------

def _cli(args, cache, timeout=300):
    env = dict(os.environ, FLOWERS_FAST_CACHE=str(cache), PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="-1")
    return subprocess.run([sys.executable, "-m", "flowers_fast", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_cli_train_prints_a_table(small_model, cache):
    proc = _cli(["train", "--num-images", "40", "--image-size", str(SIZE), "--epochs", "1", "--model-handle",
                 str(small_model), "--pipeline", "tfdata", "--quiet"], cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^\s*test_accuracy\s+[0-9.]+\s*$", proc.stdout, re.M), proc.stdout
    assert re.search(r"^\s*train_images\s+30\s*$", proc.stdout, re.M), proc.stdout
    assert re.search(r"^\s*test_images\s+10\s*$", proc.stdout, re.M), proc.stdout
    assert "Traceback" not in proc.stderr


def test_cli_rejects_zero_epochs(cache):
    proc = _cli(["train", "--epochs", "0"], cache, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if ": error:" in line]
    assert len(errors) == 1, proc.stderr
    assert "--epochs" in errors[0]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_cli_missing_data_dir_exits_3(cache):
    proc = _cli(["train", "--data-dir", "/nonexistent", "--image-size", str(SIZE), "--quiet"], cache, timeout=180)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if ": error:" in line]
    assert len(errors) == 1, proc.stderr
    assert "--data-dir" in errors[0] and "/nonexistent" in errors[0]
