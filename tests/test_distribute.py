"""Scaling out: MirroredStrategy over 2 logical CPU devices, tf.data service on loopback,
MultiWorkerMirroredStrategy's TF_CONFIG checks, and the dataservice command."""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

from bench import dataservice
from flowers_fast import data, distribute, pipeline, synthetic
from flowers_fast.config import RunConfig
from flowers_fast.errors import DeviceError, UserError
from flowers_fast.tfkeras import tf

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds for a subprocess

# --- MirroredStrategy on 2 logical CPU devices (own process: devices are fixed at TF start) -------

MIRRORED_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from flowers_fast import distribute
    distribute.split_cpu(2)  # before anything initialises TensorFlow
    from flowers_fast import runtime, train
    from flowers_fast.config import RunConfig
    from flowers_fast.errors import UserError

    cache, handle = Path(sys.argv[1]), sys.argv[2]
    rows = {}
    # Mirrored at 16 per replica has the same global batch (32) as default at 32; mirrored at 32 doubles it.
    for key, strategy, batch in (("mirrored16", "mirrored", 16), ("default32", "default", 32),
                                 ("mirrored32", "mirrored", 32)):
        cfg = RunConfig(num_images=120, image_size=96, epochs=3, model_handle=handle, learning_rate=1e-2,
                        pipeline="tfdata", breakdown=False, strategy=strategy, batch_size=batch)
        runtime.setup(cfg)
        try:
            row = train.run(cfg, cache, progress=False).row
        except UserError as exc:
            rows[key] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        rows[key] = {k: row[k] for k in ("replicas", "global_batch", "train_images", "test_images",
                                         "test_accuracy", "test_loss")}
    print("ROWS " + json.dumps(rows))
""")


@pytest.fixture(scope="module")
def mirrored_rows(cache, small_model):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "-1", "TF_CPP_MIN_LOG_LEVEL": "3", "FLOWERS_FAST_CACHE": str(cache)}
    env.pop("TF_CONFIG", None)
    res = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT, str(cache), str(small_model)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=TIMEOUT)
    lines = [line for line in res.stdout.splitlines() if line.startswith("ROWS ")]
    assert res.returncode == 0 and lines, res.stderr[-3000:]
    return json.loads(lines[-1][5:])


@pytest.mark.slow
def test_mirrored_on_two_cpu_devices_matches_one_device(mirrored_rows):
    rows = mirrored_rows
    for key, row in rows.items():
        assert "error" not in row, f"{key}: {row['error']}"
    m16, d32, m32 = rows["mirrored16"], rows["default32"], rows["mirrored32"]
    assert (m16["replicas"], m16["global_batch"]) == (2, 32)
    assert (d32["replicas"], d32["global_batch"]) == (1, 32)
    assert (m32["replicas"], m32["global_batch"]) == (2, 2 * 32)
    assert m16["train_images"] == d32["train_images"] == m32["train_images"]
    # Same global batch: the same steps on the same data, gradients summed across replicas, so the
    # same model up to floating-point summation order (measured: loss equal to 1e-6, same accuracy).
    assert abs(m16["test_loss"] - d32["test_loss"]) < 1e-3
    assert abs(m16["test_accuracy"] - d32["test_accuracy"]) <= 1.0 / d32["test_images"] + 1e-6
    # Same per-replica batch (global 64): half the steps, still learns like one device
    # (measured 0.67 vs 0.57 on 30 test images; chance is 0.2).
    for row in (d32, m32):
        assert row["test_accuracy"] >= 0.4
    assert abs(m32["test_accuracy"] - d32["test_accuracy"]) <= 0.15


def test_split_cpu_after_tensorflow_started_is_a_clear_error():
    tf.constant(1.0)  # TensorFlow is initialised in this process now
    have = len(tf.config.list_logical_devices("CPU"))
    distribute.split_cpu(have)  # asking for what is already there is fine
    with pytest.raises(DeviceError, match="first thing in the process"):
        distribute.split_cpu(have + 1)
    with pytest.raises(UserError, match="positive integer"):
        distribute.split_cpu(0)


def test_default_and_mirrored_strategy_in_process():
    assert distribute.strategy(RunConfig()).num_replicas_in_sync == 1
    mirrored = distribute.strategy(RunConfig(strategy="mirrored"))
    assert isinstance(mirrored, tf.distribute.MirroredStrategy)
    assert mirrored.num_replicas_in_sync == len(tf.config.list_logical_devices("GPU")
                                                or tf.config.list_logical_devices("CPU"))


# --- MultiWorkerMirroredStrategy: TF_CONFIG --------------------------------------------------------

@pytest.mark.parametrize("value, needle", [
    (None, "needs the TF_CONFIG environment variable"),
    ("", "needs the TF_CONFIG environment variable"),
    ("{cluster: 1", "TF_CONFIG is not valid JSON"),
    ("[1, 2]", "TF_CONFIG: must be a JSON object"),
    ('{"task": {"type": "worker", "index": 0}}', 'TF_CONFIG: no "cluster"'),
    ('{"cluster": {"worker": "a:1"}, "task": {"type": "worker", "index": 0}}', "non-empty list"),
    ('{"cluster": {"worker": ["nohostport"]}, "task": {"type": "worker", "index": 0}}', "is not \"host:port\""),
    ('{"cluster": {"ps": ["a:1"]}, "task": {"type": "ps", "index": 0}}', "not used by --strategy multiworker"),
    ('{"cluster": {"worker": ["a:1"]}}', 'TF_CONFIG: no "task"'),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}', "not a job of the cluster"),
    ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 2}}', "not 0..1"),
])
def test_multiworker_without_a_valid_tf_config_is_one_user_error(monkeypatch, value, needle):
    if value is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", value)
    with pytest.raises(UserError, match="TF_CONFIG") as info:
        distribute.strategy(RunConfig(strategy="multiworker"))
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_valid_tf_config_parses(monkeypatch):
    conf = {"cluster": {"chief": ["h0:2222"], "worker": ["h1:2222", "[::1]:2222"]},
            "task": {"type": "worker", "index": 1}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(conf))
    assert distribute.tf_config() == conf


# --- tf.data service on loopback -----------------------------------------------------------------

@pytest.fixture(scope="module")
def service():
    """A dispatcher and two workers in this process, on free loopback ports."""
    dispatcher = distribute.dispatcher(0)
    port = int(dispatcher.target.rsplit(":", 1)[1])
    workers = [distribute.worker(0, f"127.0.0.1:{port}", "127.0.0.1:%port%") for _ in range(2)]
    yield f"grpc://127.0.0.1:{port}"
    for w in workers:
        w.stop()
    dispatcher.stop()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """20 synthetic flowers and one corrupt JPEG (dropped by the pipeline, locally and on workers)."""
    root = synthetic.generate(tmp_path_factory.mktemp("svc") / "set", 20, 0)
    (root / "daisy" / "zz_corrupt.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    found = data.discover(root)
    return found.files, found.labels


def _multiset(ds) -> collections.Counter:
    out = collections.Counter()
    for images, labels in ds:
        for image, label in zip(images.numpy(), labels.numpy()):
            out[(int(label), zlib.crc32(image.tobytes()))] += 1
    return out


def _train_ds(files, cfg):
    decoded = pipeline.cached(pipeline.decode_dataset(*files, cfg, with_path=True), cfg, "train")
    return pipeline.train_dataset(decoded.map(lambda image, label, path: (image, label)), cfg, 4)


def test_data_service_yields_the_local_pipeline_each_epoch(service, files):
    cfg = RunConfig(num_images=20, image_size=32, shuffle_buffer=64)
    local = _multiset(_train_ds(files, cfg))
    assert sum(local.values()) == 20  # the corrupt file is dropped
    remote = distribute.maybe_data_service(_train_ds(files, cfg), cfg.replace(data_service=service))
    # distributed_epoch over 2 workers: every image exactly once per epoch, epoch after epoch.
    for _ in range(2):
        assert _multiset(remote) == local
    # A second run against the same dispatcher gets its own job (a reused job name would yield nothing).
    again = distribute.maybe_data_service(_train_ds(files, cfg), cfg.replace(data_service=service))
    assert _multiset(again) == local


def test_training_through_the_data_service(service, tiny_cfg, cache):
    from flowers_fast import train

    cfg = tiny_cfg(pipeline="tfdata", data_service=service, breakdown=True)
    row = train.run(cfg, cache, progress=False).row
    assert row["train_images"] == len(data.split(data.resolve(cfg, cache), cfg.test_fraction, cfg.seed).train_files)
    assert row["replicas"] == 1
    assert 0.0 <= row["test_accuracy"] <= 1.0 and np.isfinite(row["test_loss"])
    assert row["input_only_img_s"] > 0 and row["bottleneck"] in ("input-bound", "compute-bound")


@pytest.mark.parametrize("value", ["localhost:5050", "grpc://localhost", "http://localhost:5050",
                                   "grpc://localhost:99999", "grpc://local host:5050", "grpc://:5050", " "])
def test_malformed_data_service_is_a_user_error(value):
    # Caught when the configuration is made: before any worker starts TensorFlow.
    with pytest.raises(UserError, match="--data-service"):
        RunConfig(data_service=value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_absent_dispatcher_and_shared_job_name_are_user_errors(service, monkeypatch):
    with pytest.raises(UserError, match="no dispatcher answers"):
        distribute.maybe_data_service(tf.data.Dataset.range(3),
                                      RunConfig(data_service=f"grpc://127.0.0.1:{_free_port()}"))
    with pytest.raises(UserError, match="no dispatcher answers"):
        distribute.worker(0, f"127.0.0.1:{_free_port()}")
    monkeypatch.delenv(distribute.JOB_ENV, raising=False)
    multi = RunConfig(strategy="multiworker", data_service=service)
    with pytest.raises(UserError, match=distribute.JOB_ENV):
        distribute.maybe_data_service(tf.data.Dataset.range(3), multi)
    assert distribute.job_name(RunConfig()) != distribute.job_name(RunConfig())
    monkeypatch.setenv(distribute.JOB_ENV, "run-42")
    assert distribute.job_name(multi) == "run-42"


def test_dispatcher_port_in_use_is_a_user_error(service):
    port = int(service.rsplit(":", 1)[1])
    with pytest.raises(UserError, match="already in use"):
        distribute.dispatcher(port)


# --- python -m bench dataservice ----------------------------------------------------------------

def test_dataservice_help_and_one_line_errors(capsys):
    with pytest.raises(SystemExit) as info:
        dataservice.main(["--help"])
    assert info.value.code == 0
    assert "dispatcher" in capsys.readouterr().out
    assert dataservice.main(["worker", "--dispatcher", "nohostport", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--dispatcher 'nohostport'" in err
    with pytest.raises(SystemExit) as info:
        dataservice.main(["dispatcher", "--port", "70000"])
    assert info.value.code == 2


def test_dataservice_servers_run_until_ctrl_c_then_exit_130():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}

    def start(*args):
        # SIGINT is ignored in background jobs of non-interactive shells; a terminal's Ctrl-C is not.
        return subprocess.Popen([sys.executable, "-m", "bench", "dataservice", *args], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    dispatcher = start("dispatcher", "--port", "0")
    worker = None
    try:
        line = dispatcher.stdout.readline()
        assert "listening on port" in line, dispatcher.stderr.read()[-2000:]
        port = int(line.split("listening on port ")[1].split()[0])
        worker = start("worker", "--dispatcher", f"localhost:{port}", "--port", "0")
        line = worker.stdout.readline()
        assert "registered with dispatcher" in line, worker.stderr.read()[-2000:]
        for proc in (worker, dispatcher):
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 130
            assert err.strip().splitlines()[-1].endswith("interrupted")
    finally:
        for proc in (worker, dispatcher):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
