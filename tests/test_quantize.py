"""--precision int8: NNCF's quantization on training images only, checked against float32, stored
and reused, counted in total_s, and never a row labelled int8 that is not."""

from __future__ import annotations

import pytest

from flowers_fast import data, quantize, train
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
