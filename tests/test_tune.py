"""bench tune: the search space from the knob declarations, pruning and the budget on a fake
worker (tests/fake_tune_worker.py: no TensorFlow), resume, and the config file round trip."""

import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench import cli as bench_cli
from bench import run as bench_run
from bench import tune
from flowers_fast import cli as ff_cli
from flowers_fast.config import RunConfig, knob, knobs
from flowers_fast.errors import UserError

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


class Chooser:
    """A stand-in for an Optuna trial: records what is suggested, answers from ``picks`` (else the first)."""

    def __init__(self, **picks):
        self.picks, self.asked = picks, {}

    def suggest_categorical(self, name, choices):
        self.asked[name] = list(choices)
        return self.picks.get(name.split("[")[0], choices[0])


BASE = RunConfig(name="base", **tune.TRIAL_SETTINGS)


def test_search_space_is_the_knobs_declared_tune():
    names = [f.name for f in tune.space()]
    assert {"pipeline", "engine", "precision", "batch_size", "feature_batch_size", "cache", "onednn"} <= set(names)
    assert "epochs" not in names and "seed" not in names  # they change what is computed
    assert all(f.metadata["tune"] for f in tune.space())


def test_a_new_knob_joins_the_search_by_its_declaration(monkeypatch):
    @dataclass(frozen=True)
    class Wider(RunConfig):
        prefetch_depth: int = knob(2, "a new speed knob", minimum=1, tune=(1, 2, 8))

    monkeypatch.setattr(tune, "knobs", lambda: dataclasses.fields(Wider))
    trial = Chooser(prefetch_depth=8)
    cfg = tune.sample(trial, Wider(name="base"))
    assert trial.asked["prefetch_depth"] == [1, 2, 8] and cfg.prefetch_depth == 8


def test_conditional_knobs_follow_the_configs_own_checks():
    tfdata = Chooser(pipeline="tfdata")
    cfg = tune.sample(tfdata, BASE)
    assert cfg.pipeline == "tfdata" and cfg.engine == "tf"
    assert "engine" not in tfdata.asked and "feature_batch_size" not in tfdata.asked  # featcache's only
    assert tfdata.asked["precision[fp32|mixed]"] == ["fp32", "mixed"]  # int8 needs OpenVINO
    assert "cache" in tfdata.asked

    ov = Chooser(pipeline="featcache", engine="openvino", precision="int8", calibration_images=64)
    cfg = tune.sample(ov, BASE)
    assert ov.asked["precision"] == ["fp32", "mixed", "int8"] and "cache" not in ov.asked
    assert (cfg.engine, cfg.precision, cfg.calibration_images) == ("openvino", "int8", 64)
    assert "calibration_images" not in Chooser(pipeline="featcache").asked  # only for int8
    cfg.replace()  # every sampled configuration passes RunConfig's checks


def test_a_knob_given_as_a_flag_is_not_searched():
    trial = Chooser(pipeline="featcache")
    cfg = tune.sample(trial, BASE.replace(batch_size=64), fixed={"batch_size"})
    assert "batch_size" not in trial.asked and cfg.batch_size == 64


def test_known_configurations_are_enqueued_with_the_params_that_reach_them():
    featcache_ov = RunConfig(name="featcache-ov", pipeline="featcache", engine="openvino", **tune.TRIAL_SETTINGS)
    params = tune.params_of(featcache_ov, BASE)
    assert params["pipeline"][0] == "featcache" and params["engine"][0] == "openvino"
    assert tune.walk(BASE, lambda name, valid, f: params[name][0]).replace(name="x") == featcache_ov.replace(name="x")
    naive = RunConfig(name="naive", pipeline="naive", **tune.TRIAL_SETTINGS)
    assert tune.params_of(naive, BASE) == {}  # outside the space: teaches the sampler nothing


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("10m", 600), ("1h", 3600), ("45", 45), ("1.5m", 90)])
def test_budget_forms(text, seconds):
    assert tune.parse_budget(text) == seconds


@pytest.mark.parametrize("bad", ["ten", "0", "-1m", "10x", "", "5 minutes"])
def test_bad_budget_is_one_line_naming_the_flag(bad, capsys, tmp_path):
    code = bench_cli.main(["tune", f"--budget={bad}", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "--budget" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_estimate_and_pruner():
    import optuna

    assert tune.estimate_total({"prep_s": 2.0, "epoch_times_s": [3.0], "epochs": 5}) == 5.0  # a lower bound
    assert tune.estimate_total({"prep_s": 2.0, "epoch_times_s": [3.0, 1.0], "epochs": 5}) == 2 + 4 + 3 * 1.0
    pruner = tune.pruner_class()(0.25)
    study = optuna.create_study(pruner=pruner)
    trial = study.ask()
    trial.report(12.0, 1)
    assert not trial.should_prune()  # nothing to compare with yet
    pruner.best = 10.0
    assert not trial.should_prune()  # within the margin
    trial.report(13.0, 2)
    assert trial.should_prune()


def test_run_one_stops_a_worker_its_watch_prunes(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]), FAKE_TUNE_EPOCH_S="0.5")
    seen = []

    def watch(known):
        seen.append(len(known["epoch_times_s"]))
        return "too slow" if len(known["epoch_times_s"]) >= 2 else None

    start = time.monotonic()
    row = bench_run.run_one(RunConfig(epochs=20), 60, tmp_path / "w.log", env, worker="fake_tune_worker",
                            watch=watch)
    assert row["status"] == "pruned" and row["error"] == "too slow"
    assert seen[:2] == [1, 2] and time.monotonic() - start < 8  # 20 epochs would take 10 s


@pytest.fixture
def fake_worker(monkeypatch):
    monkeypatch.setattr(tune, "WORKER", "fake_tune_worker")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(ROOT)]))
    monkeypatch.setenv("FAKE_TUNE_EPOCH_S", "0.25")


def _tune(tmp_path, capsys, *extra):
    code = bench_cli.main(["tune", "--preset", "smoke", "--epochs", "4", "--out", str(tmp_path), *extra])
    out = capsys.readouterr()
    folder = sorted(tmp_path.glob("tune-*"))[-1]
    return code, out.out, out.err, folder


def _rows(folder):
    import pandas as pd

    return pd.read_csv(folder / "trials.csv")


def test_tune_on_a_fake_worker_prunes_keeps_the_budget_and_writes_the_winner(fake_worker, tmp_path, capsys):
    code, out, err, folder = _tune(tmp_path, capsys, "--budget", "16s", "--configs", "tfdata,featcache")
    assert code == 0, err
    rows = _rows(folder)
    # Every trial is a row with bench run's columns and its trial number and state.
    assert {"trial", "state", "phase", "total_s", "test_accuracy", "pipeline"} <= set(rows.columns)
    assert rows["subprocess_s"].sum() <= 16  # nothing started that could not finish
    assert set(rows[rows["phase"] == "reference"]["name"]) == {"default", "featcache"}  # tfdata is the default
    assert (rows["phase"] == "search").sum() >= 2
    finalists = rows[rows["phase"] == "finalist"]
    assert len(finalists) and set(finalists["repeat"]) <= {1, 2}
    assert "featcache" in set(finalists["name"])  # the best named configuration is measured again too
    pruned = rows[rows["state"] == "PRUNED"]
    assert (pruned["status"] == "pruned").all() and (pruned["phase"] == "search").all()
    # int8's accuracy in the fake is 20 points lower: never the winner.
    winner = re.search(r"^winner: (\S+)", out, re.M)[1]
    best = json.loads((folder / "best.json").read_text())
    assert best.get("precision") != "int8" and best["name"] == "tuned"
    assert "gain over the default configuration" in out and "gain over the best named configuration" in out
    assert (folder / "best-so-far.png").stat().st_size > 1000
    assert f"--config {folder / 'best.json'}" in out

    # The round trip: the file gives train and bench run the winner's configuration.
    import optuna

    study = optuna.load_study(study_name=tune.STUDY, storage=f"sqlite:///{folder / 'study.db'}")
    config = next(t.user_attrs["config"] for t in study.trials if t.user_attrs.get("row", {}).get("name") == winner)
    expected = RunConfig(**config).replace(name="tuned")
    train_args = ff_cli.build_parser().parse_args(["train", "--config", str(folder / "best.json")])
    assert ff_cli.train_config(train_args) == expected
    for preset in ("smoke", "quick"):
        run_args = bench_cli.build_parser().parse_args(["run", "--preset", preset, "--config",
                                                        str(folder / "best.json")])
        assert bench_run.sweep_configs(run_args)[1] == [expected]
    # Flags given with the file override it.
    train_args = ff_cli.build_parser().parse_args(["train", "--config", str(folder / "best.json"), "--epochs", "7"])
    assert ff_cli.train_config(train_args) == expected.replace(epochs=7)


def test_resume_keeps_every_finished_trial(fake_worker, tmp_path, capsys):
    code, _, err, folder = _tune(tmp_path, capsys, "--budget", "5s", "--configs", "featcache", "--finalists", "1",
                                 "--finalist-repeats", "1")
    assert code == 0, err
    before = _rows(folder)
    code, _, err, again = _tune(tmp_path, capsys, "--resume", str(folder), "--budget", "9s")
    assert code == 0, err and again == folder
    after = _rows(folder)
    assert len(after) > len(before)
    assert list(after["trial"][:len(before)]) == list(before["trial"])
    assert list(after["total_s"][:len(before)].fillna(-1)) == list(before["total_s"].fillna(-1))
    assert (after["phase"] == "reference").sum() == (before["phase"] == "reference").sum()  # not run again


def test_resume_refuses_a_changed_setting(fake_worker, tmp_path, capsys):
    code, _, err, folder = _tune(tmp_path, capsys, "--budget", "3s", "--configs", "featcache")
    code = bench_cli.main(["tune", "--resume", str(folder), "--preset", "full", "--budget", "1s"])
    err = capsys.readouterr().err
    assert code == 2 and "--preset" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("content,names", [
    ('{"batch_sise": 64}', "'batch_sise'"),
    ('{"batch_size": 0}', "'batch_size'"),
    ('{"pipeline": "fast"}', "'pipeline'"),
    ('{"epochs": "5"}', "'epochs'"),
    ('{"engine": "openvino"}', "--engine openvino"),  # across knobs: tfdata cannot run OpenVINO
    ('{"batch_size": 64', "not valid JSON"),
    ('[1, 2]', "JSON object"),
])
@pytest.mark.parametrize("command", ["train", "run"])
def test_bad_config_file_is_one_line_naming_the_file_and_key(tmp_path, capsys, content, names, command):
    path = tmp_path / "cfg.json"
    path.write_text(content)
    main = ff_cli.main if command == "train" else bench_cli.main
    argv = ["train", "--config", str(path)] if command == "train" else \
        ["run", "--config", str(path), "--out", str(tmp_path / "out")]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and str(path) in err and names in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_missing_config_file_is_one_line(tmp_path, capsys):
    assert ff_cli.main(["train", "--config", str(tmp_path / "nope.json")]) == 2
    err = capsys.readouterr().err
    assert "nope.json" in err and "cannot read" in err and len(err.strip().splitlines()) == 1


def test_tune_declarations_are_valid_values():
    for f in knobs():
        for value in f.metadata.get("tune") or ():
            from flowers_fast.config import check_value

            assert check_value(f, value) is None, (f.name, value)
        for other in (f.metadata.get("tune_when") or {}):
            assert other in RunConfig.field_names()


def test_ctrl_c_then_resume_loses_no_finished_trial(fake_worker, tmp_path, capsys):
    import signal
    import subprocess
    import sys

    code = ("import sys; from bench import cli, tune; tune.WORKER = 'fake_tune_worker'; "
            f"sys.exit(cli.main(['tune', '--preset', 'smoke', '--epochs', '4', '--budget', '60s', '--out', "
            f"{str(tmp_path)!r}]))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    csv = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(tmp_path.glob("tune-*/trials.csv"))
        if found and len(found[0].read_text().splitlines()) >= 4:  # header and 3 trials
            csv = found[0]
            break
        time.sleep(0.2)
    assert csv is not None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "--resume" in err, err
    before = _rows(csv.parent)
    assert len(before) >= 3
    code, _, err, folder = _tune(tmp_path, capsys, "--resume", str(csv.parent), "--budget", "1s")
    assert code == 0, err
    after = _rows(folder)
    assert folder == csv.parent and list(after["trial"][:len(before)]) == list(before["trial"])
    assert list(after["name"][:len(before)]) == list(before["name"])
