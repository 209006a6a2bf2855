"""--strategy multiworker: a real cluster of processes on 127.0.0.1 (free ports, own TF_CONFIG each),
its failures, the tf.data service feeding two trainers, bench run on every task, SLURM discovery.

The cluster tests (slow) start ``python -m flowers_fast train`` (or ``bench run``) processes at
96 px on a few dozen images and always kill them in teardown. Times asserted are bounds on
waits (e.g. "the survivor exits within 60 s"), never speeds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from bench import loopback
from bench.loopback import free_ports, start, stop, task_env, tf_config
from flowers_fast import cluster, rendezvous
from flowers_fast.config import RunConfig
from flowers_fast.errors import ClusterError, UserError

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 60  # seconds: the bound on every wait for a process to end on its own


# --- helpers ------------------------------------------------------------------------------------

def wait_for(log: Path, needle: str, timeout: float, proc=None) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if needle in log.read_text(errors="replace"):
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.2)
    return False


def ended_within(proc, seconds: float) -> float | None:
    """Seconds until ``proc`` ended (None if it did not within ``seconds``)."""
    t0 = time.monotonic()
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None
    return time.monotonic() - t0


def last_line(log: Path) -> str:
    """The last line a user sees (progress bars overwrite lines with carriage returns)."""
    lines = [line for line in log.read_text(errors="replace").replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def assert_one_line_end(log: Path, needle: str) -> None:
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    assert needle in last_line(log), text[-3000:]


def train_cmd(model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flowers_fast", "train", "--strategy", "multiworker", "--image-size", "96",
            "--model-handle", str(model), "--no-breakdown", *extra]


# --- one-line errors from TensorFlow's cluster messages (recorded on loopback, TF 2.21) -----------

_TAIL = "The error could be from a previous operation. Restart your program to reset.\n\t [[{{node CollectiveReduceV2_1}}]]"
RECORDED = [
    ("UnavailableError", "Collective ops is aborted by: Error reported from /job:worker/task:1: The following tasks "
     "are unhealthy (stopped sending heartbeats):\n/job:worker/replica:0/task:1\nThe tasks have crashed.",
     "worker 1 stopped sending heartbeats"),
    ("UnavailableError", "Collective ops is aborted by: Socket closed\nAdditional GRPC error information from remote "
     "target /job:worker/replica:0/task:1 while calling /tensorflow.WorkerService/RecvBuf:",
     "lost the connection to worker 1 (Socket closed)"),
    ("UnavailableError", "Collective ops is aborted by: recvmsg:Connection reset by peer\nAdditional GRPC error "
     "information from remote target /job:worker/replica:0/task:0 while calling "
     "/tensorflow.WorkerService/CompleteInstance:", "lost the connection to worker 0 (Connection reset by peer)"),
    ("UnavailableError", "Collective ops is aborted by: failed to connect to all addresses; last error: UNKNOWN: "
     "ipv4:127.0.0.1:33311: Failed to connect to remote host: Connection refused\nAdditional GRPC error information "
     "from remote target /job:worker/replica:0/task:0 while calling /tensorflow.WorkerService/CompleteInstance",
     "worker 0 at 127.0.0.1:33311"),
    ("DeadlineExceededError", "Collective ops is aborted by: Deadline Exceeded\n\nRPC: "
     "/tensorflow.CoordinationService/Heartbeat", "the chief (task 0, which runs the coordination service)"),
    ("DeadlineExceededError", "Barrier timed out. Id: [Init]Wait_for_all_tasks_to_register::0. This usually happens "
     "because a task triggered the barrier too early or too slowly.\n# of tasks that reached the barrier: 1/2.\n"
     "Some timed out task names:\n/job:worker/replica:0/task:1\n", "(worker 1 did not)"),
    ("DeadlineExceededError", "Deadline Exceeded\nAdditional GRPC error information from remote target "
     "/job:worker/replica:0/task:0 while calling /tensorflow.CoordinationService/RegisterTask:",
     "could not register with the chief"),
    ("DeadlineExceededError", "Collective has timed out during execution.", "an all-reduce timed out"),
]


@pytest.mark.parametrize("kind, message, needle", RECORDED)
def test_cluster_errors_become_one_line(kind, message, needle):
    from flowers_fast.tfkeras import tf

    exc = getattr(tf.errors, kind)(None, None, f"Graph execution error:\n\nDetected at node X\n{message}\n{_TAIL}")
    lost = cluster.failure(exc)
    assert isinstance(lost, ClusterError) and lost.exit_code == 10
    assert "\n" not in str(lost) and needle in str(lost) and kind in str(lost)


def test_a_lost_peer_the_message_does_not_name_is_the_other_task_of_two(monkeypatch):
    """Under load TensorFlow may say only "sendmsg: Broken pipe" (seen on loopback): in a cluster of
    two, the peer lost is the other task."""
    from flowers_fast.tfkeras import tf

    conf = {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 1}}
    monkeypatch.setattr(cluster, "_current", cluster.Cluster("TF_CONFIG", ("worker", 1), 2, ("worker", 0), conf))
    exc = tf.errors.UnavailableError(None, None, "Graph execution error:\n\nsendmsg: Broken pipe (32)")
    assert "worker 1 of 2: UnavailableError: lost the connection to worker 0 (Broken pipe)" in str(cluster.failure(exc))


def test_other_errors_are_not_cluster_errors():
    from flowers_fast.tfkeras import tf

    assert cluster.failure(tf.errors.InvalidArgumentError(None, None, "Graph execution error:\nbad shape")) is None
    assert cluster.failure(ValueError("x")) is None


# --- the rendezvous, in threads ----------------------------------------------------------------------

def _cluster(n: int) -> dict:
    return {"worker": [f"127.0.0.1:{p}" for p in free_ports(n)]}


def _meet(clusters: list[dict], timeout: float, settings: list[dict] | None = None) -> list:
    """Run one rendezvous per task in threads; each result is a Result or the exception."""
    results: list = [None] * len(clusters)

    def task(i):
        try:
            results[i] = rendezvous.rendezvous(clusters[i], ("worker", i), timeout,
                                               settings[i] if settings else {"epochs": 1})
        except Exception as exc:  # noqa: BLE001  (the test inspects it)
            results[i] = exc

    threads = [threading.Thread(target=task, args=(i,)) for i in range(len(clusters))]
    for t in threads:
        t.start()
        time.sleep(0.3)  # they need not start together
    for t in threads:
        t.join(timeout + 20)
    return results


def test_rendezvous_meets_and_agrees_on_a_run_id():
    c = _cluster(3)
    results = _meet([c, c, c], timeout=20)
    assert all(isinstance(r, rendezvous.Result) for r in results), results
    assert len({r.run_id for r in results}) == 1  # the chief's nonce, on every task
    assert all(r.waited_s < 20 for r in results)
    again = _meet([c, c, c], timeout=20)  # the ports are free again afterwards, and a new run gets a new id
    assert again[0].run_id != results[0].run_id


def test_rendezvous_without_peer_gives_up_after_the_timeout():
    c = _cluster(2)
    t0 = time.monotonic()
    with pytest.raises(ClusterError) as info:
        rendezvous.rendezvous(c, ("worker", 0), 1.5, {})
    took = time.monotonic() - t0
    assert 1.5 <= took < 10
    port = c["worker"][1].rsplit(":", 1)[1]
    assert "--peer-timeout 1.5 s" in str(info.value) and f"worker 1 at 127.0.0.1:{port}" in str(info.value)


def test_rendezvous_disagreements_are_one_line_errors():
    c = _cluster(2)
    results = _meet([c, c], 10, settings=[{"epochs": 1, "name": "a"}, {"epochs": 2, "name": "a"}])
    assert all(isinstance(r, ClusterError) for r in results), results
    assert "epochs 1 here, 2 there" in str(results[0]) and "epochs 2 here, 1 there" in str(results[1])

    other = {"worker": [c["worker"][0], c["worker"][1], "127.0.0.1:1"]}  # the second host lists a third task
    results = _meet([c, other], 10)
    assert all(isinstance(r, ClusterError) for r in results)
    assert "cluster" in str(results[0]) and "differs" in str(results[0])

    with socket.socket() as busy:
        busy.bind(("", int(c["worker"][0].rsplit(":", 1)[1])))
        busy.listen()
        with pytest.raises(ClusterError, match="is in use"):
            rendezvous.rendezvous(c, ("worker", 0), 5, {})


def test_rendezvous_notices_a_task_at_the_wrong_address():
    c = _cluster(2)
    port = int(c["worker"][1].rsplit(":", 1)[1])

    def impostor():  # answers at worker 1's address, but as worker 5
        with socket.create_server(("127.0.0.1", port)) as srv:
            srv.settimeout(10)
            conn, _ = srv.accept()
            with conn:
                fields = conn.makefile("rb").readline().decode().split(" ", 5)
                conn.sendall(f"{rendezvous.OK} {fields[1]} worker 5 abc {fields[5]}".encode())

    t = threading.Thread(target=impostor)
    t.start()
    time.sleep(0.3)
    with pytest.raises(ClusterError, match="answered as worker 5, not worker 1"):
        rendezvous.rendezvous(c, ("worker", 0), 10, {})
    t.join()


# --- discovery: TF_CONFIG, else SLURM ---------------------------------------------------------------

SLURM = {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "localhost",
         "SLURM_STEP_TASKS_PER_NODE": "2"}


def _env(monkeypatch, **values):
    for key in ("TF_CONFIG", *cluster.SLURM_STEP_VARS):
        monkeypatch.delenv(key, raising=False)
    for key, value in values.items():
        monkeypatch.setenv(key, value)


def test_slurm_step_becomes_a_tf_config(monkeypatch):
    _env(monkeypatch, **SLURM, CUDA_VISIBLE_DEVICES="-1")
    found = cluster.find(slurm_port=23456)
    assert found.source == "SLURM" and found.task == ("worker", 1) and found.workers == 2 and not found.is_chief
    assert found.conf == {"cluster": {"worker": ["localhost:23456", "localhost:23457"]},
                          "task": {"type": "worker", "index": 1}}
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "-1"  # SlurmClusterResolver's auto_set_gpu stays off
    light = cluster.find(resolve=False)  # what bench run reads, without TensorFlow
    assert (light.task, light.workers, light.is_chief) == (found.task, found.workers, found.is_chief)
    # Two nodes, one task each (a CPU-only node: TF 2.21's resolver alone fails there).
    _env(monkeypatch, SLURM_PROCID="0", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NODELIST="node[07-08]",
         SLURM_STEP_TASKS_PER_NODE="1(x2)")
    assert cluster.find().conf["cluster"] == {"worker": ["node07:8888", "node08:8888"]}
    assert cluster.find().is_chief


def test_tf_config_wins_and_missing_slurm_variables_are_named(monkeypatch):
    conf = {"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 0}}
    _env(monkeypatch, **SLURM, TF_CONFIG=json.dumps(conf))
    assert cluster.find().source == "TF_CONFIG"
    _env(monkeypatch, SLURM_PROCID="0", SLURM_STEP_NUM_TASKS="2")
    with pytest.raises(UserError, match="SLURM_STEP_NODELIST, SLURM_STEP_TASKS_PER_NODE not set; start one task"):
        cluster.find()
    _env(monkeypatch, TF_CONFIG=json.dumps({**conf, "cluster": {"worker": ["a:1", "a:1"]}}))
    with pytest.raises(UserError, match="listed twice"):
        cluster.find()


def test_bench_run_multiworker_needs_a_cluster_and_writes_nothing_without(tmp_path, monkeypatch):
    _env(monkeypatch)
    out = tmp_path / "res"
    res = subprocess.run([sys.executable, "-m", "bench", "run", "--strategy", "multiworker", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().count("\n") == 0 and "TF_CONFIG" in res.stderr and "SLURM" in res.stderr
    assert not out.exists() or not any(out.iterdir())


def test_bench_loopback_sets_the_strategy_itself(capsys):
    from bench.cli import main

    assert main(["loopback", "--strategy", "default"]) == 2
    assert "--strategy is set by the loopback run itself" in capsys.readouterr().err


# --- Keras and epochs of changing length (the tf.data service's) --------------------------------------

def test_fit_runs_every_epoch_when_epoch_lengths_change(monkeypatch):
    from flowers_fast import metrics, train
    from flowers_fast.tfkeras import keras, tf

    limit = tf.Variable(40, dtype=tf.int64)
    ds = tf.data.Dataset.range(40).filter(lambda i: i < limit)  # unknown length, like the service's
    ds = ds.map(lambda i: (tf.reshape(tf.cast(i, tf.float32), [1]), i % 2)).batch(4)

    class Shrink(keras.callbacks.Callback):  # epoch 1: 10 steps, later ones: 9
        def on_epoch_end(self, epoch, logs=None):
            limit.assign(36)

    def model():
        m = keras.Sequential([keras.layers.Dense(2, input_shape=(1,))])
        m.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        return m

    # Keras alone stops after 2 of 3 epochs with only a warning: the defect worked around.
    timer = metrics.EpochTimer()
    model().fit(ds, epochs=3, verbose=0, callbacks=[timer, Shrink()])
    assert len(timer.times) == 2
    # With the service, fit runs one call per epoch: every epoch runs, over all its data.
    limit.assign(40)
    timer = metrics.EpochTimer()
    cfg = RunConfig(epochs=3, data_service="grpc://localhost:5050")
    train._fit(model(), cfg, ds, None, None, [timer, Shrink()])
    assert len(timer.times) == 3
    # And a run that still ends early is an error, never a short result.
    limit.assign(40)
    fit = train._fit
    monkeypatch.setattr(train, "_fit", lambda m, c, x, y, b, callbacks: fit(m, c, x, y, b, callbacks + [Shrink()]))
    ctx = train.RunContext(cfg.replace(data_service=None), Path("."), False, tf.distribute.get_strategy(), 4, {})
    with pytest.raises(RuntimeError, match="ran 2 of 3 epochs"):
        train._fit_evaluate(ctx, model(), ds, ds, 40, 40, 0.0, "test")


# --- a real 2-worker cluster on loopback ------------------------------------------------------------

@pytest.mark.slow
def test_two_workers_agree_and_match_one_process(small_model, tmp_path):
    # 64 images: 48 to train in global batches of 32 and 16, which split evenly over 2 workers
    # (16+16, 8+8). Only then does the 2-worker run equal one process to ~1e-5 (Keras weighs
    # each worker's mean loss equally); bench loopback says so when a split is uneven.
    given = dict(num_images=64, image_size=96, epochs=2, batch_size=16, model_handle=str(small_model))
    rows = loopback.run(given, 2, tmp_path, timeout=600, together=True)
    w0, w1, one = rows["worker 0"], rows["worker 1"], rows["one process"]
    assert (w0["workers"], w0["replicas"], w0["global_batch"]) == (2, 2, 32)
    assert (one["workers"], one["replicas"], one["global_batch"]) == (1, 1, 32)
    assert (w0["cluster_task"], w1["cluster_task"]) == ("worker 0", "worker 1")
    assert not loopback.uneven(w0, 2)
    assert w0["model_only_img_s"] > 0 and w1["model_only_img_s"] > 0  # the breakdown's steps stay paired
    # The workers hold one model: bit-identical results.
    assert (w0["test_loss"], w0["test_accuracy"]) == (w1["test_loss"], w1["test_accuracy"])
    assert w0["train_images"] == one["train_images"] == 48
    # The same computation as one process at the same global batch (mirrored meets this too).
    assert w0["test_loss"] == pytest.approx(one["test_loss"], rel=1e-5)
    assert w0["test_accuracy"] == one["test_accuracy"]
    print("\n" + loopback.report(rows, 2))


@pytest.mark.slow
def test_lonely_or_signalled_worker_ends_with_one_line(small_model, tmp_path):
    """Without peers: gives up after --peer-timeout; SIGTERM / Ctrl-C while waiting end it at once.
    A peer that passes the rendezvous but never starts TensorFlow: the registration backstop."""
    args = train_cmd(small_model, "--num-images", "40", "--epochs", "1", "--quiet")
    procs, logs = {}, {}
    fake_peer = textwrap.dedent("""
        import json, sys
        from flowers_fast import cluster, rendezvous
        from flowers_fast.config import RunConfig
        cfg, found = RunConfig(**json.loads(sys.argv[1])), cluster.find()
        rendezvous.rendezvous(found.conf["cluster"], found.task, 60, cluster.shared_settings(cfg))
        print("fake peer: met, leaving", flush=True)
    """)
    backstop_cfg = dict(strategy="multiworker", image_size=96, model_handle=str(small_model), breakdown=False,
                        num_images=40, epochs=1, peer_timeout=10.0)
    try:
        for name, timeout in (("alone", "5"), ("term", "300"), ("int", "300"), ("backstop", "10")):
            ports = free_ports(2)
            logs[name] = tmp_path / f"{name}.log"
            procs[name] = start(args + ["--peer-timeout", timeout], task_env({"TF_CONFIG": tf_config(ports, 0)}),
                                logs[name], cwd=ROOT)
            if name == "backstop":
                logs["fake"] = tmp_path / "fake.log"
                procs["fake"] = start([sys.executable, "-c", fake_peer, json.dumps(backstop_cfg)],
                                      task_env({"TF_CONFIG": tf_config(ports, 1)}), logs["fake"], cwd=ROOT)
        for name in ("alone", "term", "int", "backstop"):
            assert wait_for(logs[name], "waiting up to", 180, procs[name]), logs[name].read_text()[-2000:]
        time.sleep(1)
        procs["term"].send_signal(signal.SIGTERM)
        procs["int"].send_signal(signal.SIGINT)
        for name, code, needle in (("term", 143, "worker 0 of 2: stopped by SIGTERM"),
                                   ("int", 130, "worker 0 of 2: stopped by SIGINT")):
            assert ended_within(procs[name], 10) is not None, f"{name}: still running"
            assert procs[name].returncode == code
            assert_one_line_end(logs[name], needle)
        assert ended_within(procs["alone"], 5 + LIMIT) is not None
        assert procs["alone"].returncode == 10
        assert_one_line_end(logs["alone"], "no answer within --peer-timeout 5 s from worker 1 at 127.0.0.1:")
        assert ended_within(procs["fake"], LIMIT) is not None and "met, leaving" in logs["fake"].read_text()
        assert ended_within(procs["backstop"], 10 + LIMIT) is not None
        assert procs["backstop"].returncode == 10
        assert_one_line_end(logs["backstop"], "not every task joined within --peer-timeout (worker 1 did not)")
    finally:
        stop(procs.values())


@pytest.mark.slow
def test_signalled_worker_ends_at_once_and_its_peer_with_one_line(small_model, tmp_path):
    """Mid-training, worker 1 frozen (SIGSTOP: a hung host), so worker 0 blocks in an all-reduce.
    SIGTERM ends worker 0 at once, which TensorFlow's own SIGTERM handler would swallow. Worker 1,
    resumed, has lost its peer (the chief) and ends with one line within a bounded time. From the
    peer's side a SIGTERM here is a kill: the process is gone at once (os._exit), sockets closed."""
    args = train_cmd(small_model, "--num-images", "200", "--epochs", "200", "--batch-size", "8")
    procs, logs = [], []
    try:
        ports = free_ports(2)
        for i in range(2):
            logs.append(tmp_path / f"w{i}.log")
            procs.append(start(args, task_env({"TF_CONFIG": tf_config(ports, i)}), logs[i], cwd=ROOT))
        for p, log in zip(procs, logs):
            assert wait_for(log, "epoch 2", 240, p), log.read_text()[-2000:]
        procs[1].send_signal(signal.SIGSTOP)
        time.sleep(2)  # worker 0 reaches its next all-reduce and waits there
        procs[0].send_signal(signal.SIGTERM)
        assert ended_within(procs[0], 10) is not None, "SIGTERM did not end a worker blocked in an all-reduce"
        assert procs[0].returncode == 143
        assert_one_line_end(logs[0], "flowers_fast: worker 0 of 2: stopped by SIGTERM")
        procs[1].send_signal(signal.SIGCONT)
        assert ended_within(procs[1], LIMIT) is not None, f"worker 1 still running {LIMIT} s after its peer went"
        assert procs[1].returncode == 10, logs[1].read_text()[-2000:]
        assert_one_line_end(logs[1], "error: --strategy multiworker: worker 1 of 2: ")
        assert "worker 0" in last_line(logs[1]).split("worker 1 of 2: ")[1]  # names the task it lost
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
        stop(procs)


# --- the same cluster fed by the tf.data service -----------------------------------------------------

TRAINER = textwrap.dedent("""
    import json, sys
    from flowers_fast import runtime
    from flowers_fast.config import RunConfig
    service, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    cfg = RunConfig(strategy="multiworker", data_service=service, epochs=3, batch_size=4, peer_timeout=120.0)
    runtime.setup(cfg)
    from flowers_fast import distribute, train
    from flowers_fast.tfkeras import keras, tf

    strategy = distribute.strategy(cfg)

    def example(i):  # index -> (features, index), target
        x = tf.stack([tf.sin(tf.cast(i, tf.float32) * k) for k in (0.1, 0.2, 0.3)], axis=-1)
        return (x, i), tf.reduce_sum(x, axis=-1, keepdims=True)

    # Batched with the global batch on the service workers, like the tfdata pipeline.
    ds = tf.data.Dataset.range(n).shuffle(n, seed=0).batch(4 * strategy.num_replicas_in_sync).map(example)
    ds = distribute.maybe_data_service(ds, cfg)

    class Counting(keras.Model):
        # How often each index is trained on in an epoch, summed over every replica of the cluster.
        def __init__(self):
            super().__init__()
            self.hidden, self.out = keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)
            self.counts = tf.Variable(tf.zeros([n], tf.int64), trainable=False,
                                      synchronization=tf.VariableSynchronization.ON_READ,
                                      aggregation=tf.VariableAggregation.SUM)

        def call(self, x):
            return self.out(self.hidden(x))

        def train_step(self, data):
            (x, i), y = data
            self.counts.assign_add(tf.math.bincount(i, minlength=n, maxlength=n, dtype=tf.int64))
            return super().train_step((x, y))

    epochs = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            epochs.append(self.model.counts.numpy().tolist())
            self.model.counts.assign(tf.zeros([n], tf.int64))

    with strategy.scope():
        model = Counting()
        model.compile(keras.optimizers.SGD(0.05), "mse")
    train._fit(model, cfg, ds, None, None, [Record()])  # what the tfdata runner calls
    json.dump({"epochs": epochs, "weights": [float(w.sum()) for w in model.get_weights()]}, open(out, "w"))
""")


@pytest.mark.slow
def test_data_service_feeds_two_trainers_each_image_once_per_epoch(tmp_path):
    from flowers_fast import distribute

    n = 400
    dispatcher = distribute.dispatcher(0)
    port = int(dispatcher.target.rsplit(":", 1)[1])
    # Two service workers: each ends the epoch on its own partial batch, so epoch lengths vary.
    workers = [distribute.worker(0, f"127.0.0.1:{port}", "127.0.0.1:%port%") for _ in range(2)]
    ports = free_ports(2)
    procs = []
    try:
        for i in range(2):
            procs.append(start([sys.executable, "-c", TRAINER, f"grpc://127.0.0.1:{port}", str(n),
                                str(tmp_path / f"t{i}.json")], task_env({"TF_CONFIG": tf_config(ports, i)}),
                               tmp_path / f"t{i}.log", cwd=ROOT))
        for i, p in enumerate(procs):
            assert ended_within(p, 300) is not None and p.returncode == 0, (tmp_path / f"t{i}.log").read_text()[-3000:]
        t0, t1 = (json.loads((tmp_path / f"t{i}.json").read_text()) for i in range(2))
        assert len(t0["epochs"]) == len(t1["epochs"]) == 3
        for counts in t0["epochs"]:
            assert counts == [1] * n  # every example exactly once per epoch, across both trainers
        assert t0 == t1  # and both trainers hold the same model
    finally:
        stop(procs)
        for w in workers:
            w.stop()
        dispatcher.stop()


# --- bench run on every task, cluster from SLURM --------------------------------------------------------

def _port_pair() -> int:
    """A free port whose successor is free too (SLURM's tasks on a node take consecutive ports)."""
    for _ in range(100):
        base = free_ports(1)[0]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", base + 1))
            return base
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


@pytest.mark.slow
def test_bench_run_on_every_slurm_task_chief_writes_the_csv(small_model, tmp_path):
    out = tmp_path / "results"  # one folder for both, as on a shared file system
    base = _port_pair()
    argv = [sys.executable, "-m", "bench", "run", "--preset", "smoke", "--configs", "tfdata", "--num-images", "40",
            "--image-size", "96", "--epochs", "2", "--model-handle", str(small_model), "--no-breakdown",
            "--strategy", "multiworker", "--slurm-port", str(base), "--out", str(out)]
    procs = []
    try:
        for rank in range(2):
            env = task_env({**SLURM, "SLURM_PROCID": str(rank)})
            procs.append(start(argv, env, tmp_path / f"bench{rank}.log", cwd=ROOT))
        for rank, p in enumerate(procs):
            assert ended_within(p, 600) is not None and p.returncode == 0, \
                (tmp_path / f"bench{rank}.log").read_text()[-3000:]
    finally:
        stop(procs)
    chief, = out.glob("run-*.csv")
    other, = (out / "worker-1").glob("run-*.csv")
    rows = pd.read_csv(chief)
    assert len(rows) == 1 and rows.loc[0, "status"] == "ok", rows.loc[0, "error"]
    assert (rows.loc[0, "workers"], rows.loc[0, "replicas"], rows.loc[0, "cluster_task"]) == (2, 2, "worker 0")
    assert pd.read_csv(out / "latest.csv").loc[0, "cluster_task"] == "worker 0"
    theirs = pd.read_csv(other)
    assert theirs.loc[0, "cluster_task"] == "worker 1" and theirs.loc[0, "test_loss"] == rows.loc[0, "test_loss"]
    assert "the chief (worker 0) writes" in (tmp_path / "bench1.log").read_text()


def test_loopback_names_the_data_it_trains_on():
    assert loopback.data_text({"num_images": 320}) == "320 synthetic images"
    assert loopback.data_text({"num_images": 320, "data_dir": "photos"}) == "the images in photos"
    assert loopback.data_text({"num_images": 320, "dataset": "tfds"}) == "the tfds set"
