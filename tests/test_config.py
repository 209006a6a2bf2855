"""One knob, one place: RunConfig's declarations drive the flags of both command lines, the
sweep overrides, the checks and the CSV columns. No TensorFlow here: these run in milliseconds."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import pytest

from bench import cli as bench_cli
from bench import run as bench_run
from flowers_fast import cli, config
from flowers_fast.clikit import given_knobs
from flowers_fast.config import PREDICT, SWEEP, TRAIN, RunConfig, flag_of, knobs
from flowers_fast.errors import UserError, invoked


def _flags(parser: argparse.ArgumentParser, command: str) -> dict[str, argparse.Action]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {opt: action for action in sub._actions for opt in action.option_strings}


def test_every_knob_has_a_help_text_and_a_place():
    for f in dataclasses.fields(RunConfig):
        assert f.metadata["help"], f.name
        assert set(f.metadata["where"]) <= {TRAIN, SWEEP, PREDICT}, f.name
    # Only the configuration's name is set by bench alone (it names a configuration).
    assert [f.name for f in knobs() if not f.metadata["where"]] == ["name"]


def test_train_has_a_flag_per_train_knob_with_the_dataclass_default_in_its_help():
    flags = _flags(cli.build_parser(), "train")
    for f in knobs(TRAIN):
        action = flags[flag_of(f)]
        assert action.dest == f.name
        assert action.default is argparse.SUPPRESS  # absent flag = the dataclass default
        assert "default: None" not in action.help
    assert "--xla" in flags and "--rgb" in flags and "--no-breakdown" in flags


def test_bench_run_offers_exactly_the_sweep_knobs():
    flags = _flags(bench_cli.build_parser(), "run")
    knob_dests = {a.dest for a in flags.values()} & set(RunConfig.field_names()) - {"device"}
    assert knob_dests == {f.name for f in knobs(SWEEP)}
    assert flags["--device"].choices == ("cpu", "gpu", "all")  # the sweep's own: devices to run on
    # Knobs that define a configuration stay with the configuration.
    for name in ("pipeline", "precision", "xla_step", "naive_rgb", "dct_decode"):
        assert name not in knob_dests


def test_predict_offers_the_engine_knobs_with_their_declared_choices():
    flags = _flags(cli.build_parser(), "predict")
    assert {f.name for f in knobs(PREDICT)} == {"engine", "precision", "calibration_images", "int8_min_cosine",
                                                "reuse_quantized",  # int8's, for predict --precision int8
                                                "engine_streams", "engine_threads"}  # OpenVINO's
    for f in knobs(PREDICT):
        assert flags[flag_of(f)].choices == f.metadata["choices"] and flags[flag_of(f)].dest == f.name


def test_given_flags_become_the_config_and_absent_ones_keep_defaults():
    args = cli.build_parser().parse_args(["train", "--epochs", "3", "--no-breakdown", "--rgb", "--data-dir", "/x"])
    cfg = RunConfig.from_flags(**given_knobs(args, TRAIN))
    assert (cfg.epochs, cfg.breakdown, cfg.naive_rgb, cfg.data_dir) == (3, False, True, "/x")
    assert cfg.dataset == "flowers"  # --data-dir alone means the flowers set
    assert cfg.batch_size == RunConfig().batch_size


def test_sweep_overrides_apply_to_every_configuration(tmp_path):
    args = bench_cli.build_parser().parse_args(["run", "--configs", "naive,featcache", "--epochs", "2",
                                                "--learning-rate", "0.01", "--out", str(tmp_path)])
    _, cfgs = bench_run.sweep_configs(args)
    assert [(c.name, c.pipeline, c.epochs, c.learning_rate) for c in cfgs] == [
        ("naive", "naive", 2, 0.01), ("featcache", "featcache", 2, 0.01)]
    assert cfgs[0].num_images == 400  # the quick preset's, not overridden


@pytest.mark.parametrize("argv,needle", [
    (["--learning-rate", "nan"], "--learning-rate: must be a finite number"),
    (["--learning-rate", "inf"], "--learning-rate: must be a finite number"),
    (["--test-fraction", "nan"], "--test-fraction: must be a finite number"),
    (["--seed", "-1"], "--seed: must be at least 0"),
    (["--seed", "99999999999"], "--seed: must be at most"),
    (["--epochs", "0"], "--epochs: must be a positive integer"),
    (["--epochs", "two"], "--epochs: expected a whole number"),
    (["--image-size", "16"], "--image-size: must be at least 32"),
    (["--cache", "disk"], "--cache: 'disk' is not one of memory, file, none"),
])
def test_bad_values_are_one_line_usage_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.build_parser().parse_args(["train", *argv])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("changes,needle", [
    (dict(learning_rate=float("nan")), "--learning-rate"),
    (dict(epochs=2.5), "--epochs"),
    (dict(strict="yes"), "--strict"),
    (dict(pipeline="featcache", fine_tune=True), "featcache needs a frozen backbone"),
    (dict(pipeline="naive", data_service="grpc://h:1"), "--data-service works with --pipeline tfdata .* featcache"),
    (dict(data_service="h:5050"), "grpc://HOST:PORT"),
    (dict(engine="onnx"), "--engine 'onnx' is not one of tf, openvino"),
    (dict(engine="openvino"), "--engine openvino runs featcache's frozen feature pass"),
    (dict(pipeline="featcache", engine="openvino", device="gpu"), "--engine openvino runs on the CPU only"),
    (dict(pipeline="featcache", engine="openvino", xla_backbone=True), "drop it with --engine openvino"),
])
def test_the_dataclass_checks_the_same_things_for_python_callers(changes, needle):
    with pytest.raises(UserError, match=needle) as err:
        RunConfig(**changes)
    assert err.value.exit_code == 2  # usage, not a data error


def test_a_config_survives_the_json_hand_off():
    cfg = RunConfig(name="x", pipeline="featcache", epochs=2, data_dir="/d", learning_rate=0.5)
    assert RunConfig.from_json(cfg.to_json()) == cfg
    assert set(json.loads(cfg.to_json())) == set(RunConfig.field_names())


def test_runners_exist_for_every_pipeline_and_nothing_else():
    from flowers_fast.runners import RUNNERS

    assert set(RUNNERS) == set(config.PIPELINES)


def test_messages_name_the_command_as_invoked(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/flowers-bench", "run"])
    assert invoked("bench") == "flowers-bench"
    assert bench_cli.build_parser().prog == "flowers-bench"
    monkeypatch.setattr(sys, "argv", ["/repo/bench/__main__.py", "run"])
    assert invoked("bench") == "python -m bench"


def test_the_feature_batch_follows_the_device_unless_given():
    assert RunConfig().feature_batch == 16
    assert RunConfig(device="gpu").feature_batch == 128
    assert RunConfig(device="gpu", feature_batch_size=8).feature_batch == 8
