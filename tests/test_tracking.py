"""Issue 23: results where TensorFlow users look. What --tensorboard, --profile and --mlflow write is
read back through TensorBoard's event reader, the profiler plugin's own listing and MlflowClient
(a local store, a file store and a real ``mlflow server`` on 127.0.0.1).

Fast on purpose: the sweeps here hand out fake result rows (``bench.run.run_one`` replaced: no
TensorFlow worker starts); one in-process featcache run at 96 px traces a real profile."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from bench import cli as bench_cli
from bench import run as bench_run
from bench import tracking

TB_TAGS = ("total_s", "test_accuracy", "train_img_s", "peak_rss_mb")


def fake_rows(seen: list):
    """A stand-in for bench.run.run_one: tfdata finishes, featcache fails, each with a worker log."""
    def run_one(cfg, timeout_s, log_path, env, interactive=False, worker="bench.worker", figures=None, cache=None,
                machine_id=None):
        seen.append(cfg)
        log_path.write_text(f"worker log of {cfg.name}\n")
        if cfg.pipeline == "featcache":
            return {"status": "error", "error": "MemoryError: simulated out of memory", "subprocess_s": 1.0}
        return {"status": "ok", "error": "", "test_accuracy": 0.5, "test_loss": 1.25, "data_prep_s": 1.0,
                "first_epoch_s": 2.0, "steady_epoch_s": 0.2, "train_s": 2.4, "total_s": 3.4, "train_img_s": 150.0,
                "end_to_end_img_s": 150.0, "peak_rss_mb": 900.0, "weights": "random",
                "epoch_times_s": "2.000 0.200 0.200", "epoch_loss": "1.5 1.25 1", "epoch_accuracy": "0.25 0.375 0.5",
                "subprocess_s": 9.0}
    return run_one


def sweep(tmp_path, monkeypatch, capsys, *flags):
    seen = []
    monkeypatch.setattr(bench_run, "run_one", fake_rows(seen))
    code = bench_cli.main(["run", "--preset", "smoke", "--configs", "tfdata,featcache", "--repeats", "1", "--out",
                           str(tmp_path / "r"), *flags])
    out, err = capsys.readouterr()
    return code, out, err, seen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tb_runs(logdir: Path) -> dict:
    """Every TensorBoard run under ``logdir`` through TensorBoard's own reader: hparams and scalars."""
    from tensorboard.backend.event_processing import event_multiplexer
    from tensorboard.plugins.hparams import metadata as hp_metadata

    mux = event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    runs = {}
    for run in mux.Runs():
        acc = mux.GetAccumulator(run)
        content = acc.PluginTagToContent(hp_metadata.PLUGIN_NAME)[hp_metadata.SESSION_START_INFO_TAG]
        start = hp_metadata.parse_session_start_info_plugin_data(content)
        hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
        import tensorflow as tf

        scalars = {tag: [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
                   for tag in acc.Tags()["tensors"] if not tag.startswith("_hparams_") and tag != "error"}
        runs[run] = (hparams, scalars)
    return runs


def test_bench_run_writes_hparams_scalars_and_mlflow_runs(tmp_path, monkeypatch, capsys):
    code, out, err, seen = sweep(tmp_path, monkeypatch, capsys, "--tensorboard", str(tmp_path / "tb"), "--profile",
                                 str(tmp_path / "prof"), "--mlflow")
    assert code == 9, err  # featcache's row failed; the exports still ran
    csv = next((tmp_path / "r").glob("run-*.csv"))
    rows = pd.read_csv(csv)
    machine, run_id = rows["machine_id"][0], rows["run_id"][0]
    folder = f"{run_id}-{machine}"
    # --profile: each configuration's trace goes to a folder of its own, named like its TensorBoard run.
    assert [c.profile for c in seen] == [str(tmp_path / "prof" / folder / f"{n}-cpu-r0")
                                         for n in ("tfdata", "featcache")]

    runs = tb_runs(tmp_path / "tb")
    assert set(runs) == {f"{folder}/tfdata-cpu-r0", f"{folder}/featcache-cpu-r0"}
    hparams, scalars = runs[f"{folder}/tfdata-cpu-r0"]
    # Identity travels with every run; the knob that differs (pipeline) is an hparam, an equal one is not.
    assert hparams["machine_id"] == machine and hparams["run_id"] == str(run_id) and hparams["name"] == "tfdata"
    assert hparams["pipeline"] == "tfdata" and hparams["repeat"] == 0 and hparams["status"] == "ok"
    assert hparams["cpu_brand"] and "epochs" not in hparams and "profile" not in hparams
    # (TensorBoard keeps scalars as float32.)
    assert scalars["total_s"] == [(0, pytest.approx(3.4))] and scalars["train_img_s"] == [(0, 150.0)]
    assert scalars["test_accuracy"] == [(0, 0.5)] and scalars["peak_rss_mb"] == [(0, 900.0)]
    assert scalars["epoch/time_s"] == [(1, 2.0), (2, pytest.approx(0.2)), (3, pytest.approx(0.2))]
    assert [v for _, v in scalars["epoch/loss"]] == [1.5, 1.25, 1.0]
    failed, failed_scalars = runs[f"{folder}/featcache-cpu-r0"]
    assert failed["status"] == "error" and not set(TB_TAGS) & set(failed_scalars)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'r' / 'mlflow.db').resolve()}")
    exp = client.get_experiment_by_name("flowers_fast")
    got = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(got) == {"tfdata-cpu-r0", "featcache-cpu-r0"}
    ok, bad = got["tfdata-cpu-r0"], got["featcache-cpu-r0"]
    assert ok.info.status == "FINISHED" and ok.data.params["pipeline"] == "tfdata" and ok.data.params["epochs"] == "2"
    assert ok.data.metrics["total_s"] == 3.4 and ok.data.metrics["test_accuracy"] == 0.5
    assert ok.data.tags["machine_id"] == machine and ok.data.tags["git_commit"] == rows["git_commit"][0]
    assert ok.data.tags["dataset"] == "synthetic" and ok.data.tags["weights"] == "random"
    assert [m.value for m in client.get_metric_history(ok.info.run_id, "epoch_loss")] == [1.5, 1.25, 1.0]
    assert bad.info.status == "FAILED" and bad.data.tags["status"] == "error"
    assert bad.data.tags["reason"] == "MemoryError: simulated out of memory"
    names = {a.path for a in client.list_artifacts(ok.info.run_id, "report")}
    assert {f"report/{csv.stem}.md", f"report/{csv.stem}.html", f"report/{csv.stem}-time.png"} <= names
    log = client.download_artifacts(bad.info.run_id, "log/featcache-cpu-r0.log", str(tmp_path))
    assert Path(log).read_text() == "worker log of featcache\n"
    assert "tensorboard --logdir" in out and "mlflow ui --backend-store-uri sqlite:///" in out


def test_unreachable_server_is_reported_once_and_the_results_are_written(tmp_path, monkeypatch, capsys):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.perf_counter()
    code, out, err, _ = sweep(tmp_path, monkeypatch, capsys, "--configs", "tfdata", "--mlflow", url)
    assert time.perf_counter() - start < 60  # no minutes of retries
    assert code == 8, err
    lines = [line for line in err.splitlines() if "--mlflow" in line]
    assert len(lines) == 1 and url in lines[0] and "cannot log" in lines[0] and "report" in lines[0], err
    csv = next((tmp_path / "r").glob("run-*.csv"))
    assert pd.read_csv(csv)["status"].tolist() == ["ok"] and csv.with_suffix(".md").is_file()


@pytest.fixture
def results_csv(tmp_path, monkeypatch, capsys):
    code, *_ = sweep(tmp_path, monkeypatch, capsys)
    assert code == 9
    return next((tmp_path / "r").glob("run-*.csv"))


def test_report_exports_existing_csvs_to_a_file_store_once(results_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store on request only
    store = tmp_path / "mlruns"
    argv = ["report", str(results_csv), "--mlflow", str(store), "--tensorboard", str(tmp_path / "tb")]
    assert bench_cli.main(argv) == 0, capsys.readouterr().err
    assert "mlflow: 2 runs logged" in capsys.readouterr().out
    assert bench_cli.main(argv) == 0
    assert "0 runs logged to experiment flowers_fast (2 logged before)" in capsys.readouterr().out

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    runs = client.search_runs([client.get_experiment_by_name("flowers_fast").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["featcache-cpu-r0", "tfdata-cpu-r0"]  # not logged twice
    ok = next(r for r in runs if r.info.run_name == "tfdata-cpu-r0")
    assert ok.data.metrics["train_img_s"] == 150.0 and ok.data.params["image_size"] == "96"
    assert {a.path for a in client.list_artifacts(ok.info.run_id, "report")} >= {f"report/{results_csv.name}"}
    assert len(tb_runs(tmp_path / "tb")) == 2


def test_mlflow_server_on_loopback_receives_the_runs(results_csv, tmp_path, capsys):
    port = free_port()
    # A file store behind the server: up in seconds (a new SQLite database first runs its migrations, ~15 s).
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", str(tmp_path / "server-store"), "--artifacts-destination",
                               str(tmp_path / "server-artifacts"), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              env={**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        assert bench_cli.main(["report", str(results_csv), "--mlflow", url]) == 0, capsys.readouterr().err

        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=url)
        runs = {r.info.run_name: r for r in client.search_runs(
            [client.get_experiment_by_name("flowers_fast").experiment_id])}
        assert set(runs) == {"tfdata-cpu-r0", "featcache-cpu-r0"}
        assert runs["tfdata-cpu-r0"].data.metrics["total_s"] == 3.4
        assert runs["featcache-cpu-r0"].info.status == "FAILED"
        log = client.download_artifacts(runs["tfdata-cpu-r0"].info.run_id, "log/tfdata-cpu-r0.log", str(tmp_path))
        assert Path(log).read_text() == "worker log of tfdata\n"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


@pytest.mark.parametrize("flags,code,needle", [
    (["--tensorboard", "{file}"], 8, "--tensorboard {file}: is a file"),
    (["--profile", "{file}"], 8, "--profile {file}: is a file"),
    (["--mlflow", "ftp://host/x"], 2, "--mlflow ftp://host/x: not a tracking URI"),
    (["--mlflow", "localhost:5000"], 2, "pass http://localhost:5000"),
    (["--mlflow", "results/latest.csv"], 2, "a CSV, not a tracking URI; put the CSVs before --mlflow"),
    (["--mlflow", "http://127.0.0.1:70000"], 2, "not a tracking server address"),
    (["--mlflow", "sqlite:///{tmp}"], 8, "a folder, where the MLflow database file goes"),
    (["--mlflow", "{file}/store"], 8, "--mlflow {file}/store: cannot be created"),
])
def test_bad_destinations_are_one_line_before_the_sweep(tmp_path, monkeypatch, capsys, flags, code, needle):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    fill = lambda s: s.format(file=blocker, tmp=tmp_path)  # noqa: E731
    got, out, err, seen = sweep(tmp_path, monkeypatch, capsys, *[fill(f) for f in flags])
    assert got == code and not seen, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and fill(needle) in lines[0] and "Traceback" not in err, err
    assert not list((tmp_path / "r").glob("run-*"))  # nothing of the sweep was written


def test_profile_trace_is_listed_by_the_profiler_plugin(tiny_cfg, cache, tmp_path):
    import argparse

    from tensorboard.plugins import base_plugin
    from tensorboard_plugin_profile import profile_plugin

    from flowers_fast import train

    logdir = tmp_path / "prof"
    cfg = tiny_cfg(pipeline="featcache", num_images=40, profile=str(logdir))
    row = train.run(cfg, cache, progress=False, predictions=False).row
    trace = Path(row["profile_trace"])
    assert trace.parent.parent == logdir / "plugins" / "profile" and trace.name.endswith(".xplane.pb")
    assert row["profiled_inside_timing"] is False and row["profile_s"] > 0 and row["profile_feature_batches"] == 2
    assert len(row["epoch_loss"].split()) == 2 and len(row["epoch_accuracy"].split()) == 2
    # The profiler plugin (what TensorBoard's Profile tab runs) lists the run and its tools.
    plugin = profile_plugin.ProfilePlugin(base_plugin.TBContext(
        logdir=str(logdir), flags=argparse.Namespace(master_tpu_unsecure_channel="", logdir=str(logdir))))
    runs = list(plugin.generate_runs())
    assert runs == [trace.parent.name]
    tools = plugin.run_tools_imp(runs[0])
    assert {"trace_viewer@", "input_pipeline_analyzer", "overview_page"} <= set(tools), tools
    # Both parts are in the trace: the head's train steps and the slice of the feature pass.
    data = trace.read_bytes()
    assert b"__inference_train_function" in data and b"__inference_features" in data


def test_profiled_steps_leave_the_trained_model_as_it_was(tmp_path):
    import numpy as np

    from flowers_fast import profiling
    from flowers_fast.tfkeras import keras

    model = keras.Sequential([keras.layers.Dense(3, input_shape=(4,))])
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="sparse_categorical_crossentropy")
    x, y = np.random.default_rng(0).random((16, 4)).astype("float32"), np.arange(16) % 3
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    before = [w.copy() for w in model.get_weights()]
    row = profiling.trace(tmp_path, profiling.Steps(model, profiling.fit_steps, x, y, 4))
    assert Path(row["profile_trace"]).is_file()
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
