"""--precision int8: NNCF's quantization on training images only, checked against float32, stored
and reused, counted in total_s, and never a row labelled int8 that is not."""

from __future__ import annotations

import pytest

from flowers_fast import data, quantize, synthetic, train
from flowers_fast.config import RunConfig
from flowers_fast.errors import UnsupportedError, UserError


@pytest.fixture(scope="module")
def int8_cfg(small_model):
    return RunConfig(pipeline="featcache", engine="openvino", precision="int8", num_images=60, image_size=96,
                     epochs=2, model_handle=str(small_model), breakdown=False, calibration_images=16,
                     int8_min_cosine=0.0, feature_batch_size=8)


@pytest.fixture(scope="module")
def rows(int8_cfg, tmp_path_factory, cache):
    store = tmp_path_factory.mktemp("int8store")
    first = train.run(int8_cfg, store, progress=False).row
    second = train.run(int8_cfg, store, progress=False).row
    return first, second, store


def test_int8_runs_quantized_and_says_what_it_cost(rows):
    first, _, store = rows
    assert first["compute_dtype"] == "int8" and first["mixed_route"] == "openvino-int8"
    assert first["quantized_reused"] is False and first["calibration_files"] == 16
    # Calibration and quantization are part of the time to a trained model, and shown on their own.
    assert 0 < first["quantize_s"] <= first["engine_setup_s"] and first["total_s"] > first["quantize_s"]
    assert -1.0 <= first["feature_cosine_vs_fp32"] <= 1.0 + 1e-6
    assert first["feature_cosine_on"].endswith("held-out training images")
    assert len(list((store / "quantized").glob("*/model.xml"))) == 1


def test_a_second_run_reuses_the_stored_model(rows):
    first, second, _ = rows
    assert second["quantized_reused"] is True and second["compute_dtype"] == "int8"
    assert second["quantize_s"] < first["quantize_s"]
    assert second["feature_cosine_vs_fp32"] == first["feature_cosine_vs_fp32"]
    assert second["test_accuracy"] == pytest.approx(first["test_accuracy"])


def test_without_reuse_every_run_quantizes(int8_cfg, rows):
    _, _, store = rows
    row = train.run(int8_cfg.replace(reuse_quantized=False), store, progress=False).row
    assert row["quantized_reused"] is False and row["quantize_s"] > 0


def test_features_that_drift_too_far_stop_the_run_and_are_not_stored(int8_cfg, tmp_path):
    with pytest.raises(UnsupportedError, match=r"--int8-min-cosine 1.0.*--calibration-images") as err:
        train.run(int8_cfg.replace(int8_min_cosine=1.0), tmp_path, progress=False)
    assert err.value.exit_code == UnsupportedError.exit_code
    assert not list(tmp_path.glob("quantized/*/model.xml"))


def test_calibration_draws_from_the_training_split_only(int8_cfg, cache):
    ds = data.resolve(int8_cfg, cache)
    split = data.split(ds, int8_cfg.test_fraction, int8_cfg.seed)
    calibrate, held_out = quantize.sample(split.train_files, 256, seed=0)
    assert len(calibrate) == len(split.train_files) // 2  # at most half: the rest checks it
    assert set(calibrate) <= set(split.train_files) and set(held_out) <= set(split.train_files)
    assert not set(calibrate) & set(held_out) and not set(calibrate) & set(split.test_files)
    assert quantize.sample(split.train_files, 256, seed=0) == (calibrate, held_out)  # seeded
    assert quantize.sample(split.train_files, 256, seed=1)[0] != calibrate


def test_int8_needs_openvino():
    with pytest.raises(UserError, match="--precision int8.*--engine openvino"):
        RunConfig(pipeline="featcache", precision="int8")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A `train --save`-like model: uint8 input, a convolution (something to quantize), 3 classes."""
    from flowers_fast.tfkeras import keras, tf

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1.0 / 255)(tf.cast(inputs, tf.float32))
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    path = tmp_path_factory.mktemp("ckpt") / "model"
    model.save(str(path))
    (path / "classes.txt").write_text("alpha\nbeta\ngamma\n")
    return path


def test_predict_int8_quantizes_once_with_trains_quantizer_and_reuses_it(tiny_checkpoint, tmp_path, monkeypatch):
    from flowers_fast import predict, synthetic

    folder = synthetic.generate(tmp_path / "calib", 20, 0)
    images = sorted(folder.rglob("*.jpg"))[:3]
    kwargs = dict(checkpoint=str(tiny_checkpoint), engine="openvino", precision="int8", cache=tmp_path / "cache",
                  calibration_dir=str(folder), calibration_images=8, int8_min_cosine=0.0)
    first = predict.predict(images, **kwargs)
    assert first.precision == "int8" and first.probs.shape == (3, 3)
    assert first.probs.sum(1) == pytest.approx(1.0, abs=1e-4)
    assert len(list((tmp_path / "cache" / "quantized").glob("*/model.xml"))) == 1

    def no_quantizing(*args, **kwargs):
        raise AssertionError("quantized again")

    monkeypatch.setattr(quantize, "quantize", no_quantizing)
    second = predict.predict(images, **kwargs)  # from the store: same model, same answers
    assert second.precision == "int8" and second.probs == pytest.approx(first.probs, abs=1e-6)
    monkeypatch.undo()
    # A check the stored model cannot pass stops predict with one line, not a silent float run.
    with pytest.raises(UnsupportedError, match="--int8-min-cosine 1.0"):
        predict.predict(images, **{**kwargs, "int8_min_cosine": 1.0, "reuse_quantized": False})


@pytest.mark.parametrize("changes,error,needle", [
    (dict(engine="tf"), UserError, "--precision int8: predict runs reduced precision on --engine openvino"),
    (dict(calibration_dir=None), UserError, "needs --calibration-dir DIR"),
    (dict(calibration_dir="FEW"), "DataError", "4 images; int8 needs at least 16"),
    (dict(calibration_dir="/nonexistent"), "DataError", "not a folder"),
])
def test_predict_int8_bad_input_is_one_line(changes, error, needle, tmp_path):
    from flowers_fast import predict
    from flowers_fast.errors import DataError

    few = synthetic.generate(tmp_path / "few", 5, 0)
    for extra in sorted(few.rglob("*.jpg"))[4:]:
        extra.unlink()
    kwargs = dict(model_handle="random", engine="openvino", precision="int8", calibration_dir=str(few))
    kwargs.update(changes)
    if kwargs["calibration_dir"] == "FEW":
        kwargs["calibration_dir"] = str(few)
    with pytest.raises(DataError if error == "DataError" else error, match=needle):
        predict.predict([tmp_path / "absent.jpg"], **kwargs)


@pytest.mark.parametrize("bf16", [False, True])
def test_the_breakdown_compares_int8_with_the_float_routes_in_one_process(int8_cfg, cache, monkeypatch, bf16):
    # Both branches on any CPU: with bf16 faked present, OpenVINO may run it as float32, which is
    # still a rate to compare with.
    from flowers_fast import engine

    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: bf16)
    row = train.run(int8_cfg.replace(breakdown=True, rate_seconds=0.3), cache, progress=False).row
    floats = ["openvino_fp32"] + (["openvino_bf16"] if bf16 else [])
    for name in floats:
        assert row[f"{name}_forward_img_s"] > 0
    assert ("openvino_bf16_forward_img_s" in row) is bf16
    assert row["int8_fastest_float"] in floats
    fastest = row[f"{row['int8_fastest_float']}_forward_img_s"]
    assert row["int8_speedup_vs_float"] == pytest.approx(row["model_only_img_s"] / fastest, rel=1e-6)
