"""Several hosts, one training run: ``--strategy multiworker`` with every failure bounded.

TensorFlow's MultiWorkerMirroredStrategy (MWMS) trains one model on every task of a cluster.
Left alone (TF 2.21, measured on loopback, see docs/scaling.md): a peer that never starts blocks
the others forever inside the strategy's constructor, where TensorFlow holds the GIL, so no
Python timeout or signal handler can run; SIGTERM is swallowed (the constructor installs
TensorFlow's own handler, a preemption notice that does not stop training); a peer that dies is
noticed by the coordination service's heartbeats within about 10 s, but its error reads
"Graph execution error:" plus a page of text. Here:

* :func:`find`: the cluster from ``TF_CONFIG`` or, when that is unset, from SLURM's job-step
  variables via TensorFlow's ``SlurmClusterResolver`` (turned into a ``TF_CONFIG``).
* :func:`setup` (from ``runtime.setup``, before any TensorFlow op): SIGTERM and SIGINT end the
  process at once with one line, at any stage; the coordination service is configured so that
  its registration gives up after ``--peer-timeout`` (the backstop for a peer that passes the
  rendezvous but dies before registering).
* :func:`strategy`: wait for the peers in Python first (``rendezvous.py``, bounded by
  ``--peer-timeout``), then build MWMS (about a second, once all peers are up), then take
  SIGTERM back from TensorFlow.
* :func:`failure`: a cluster error raised by TensorFlow, as one line (a ``ClusterError``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass

from . import rendezvous
from .errors import ClusterError, UserError

SLURM_STEP_VARS = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST", "SLURM_STEP_TASKS_PER_NODE")
_ADDRESS = re.compile(r"^(?:grpc://)?(?P<host>[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,5})$")
_TF_CONFIG_EXAMPLE = ('{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                      '"task": {"type": "worker", "index": 0}}')
# Knobs a task may set for itself: paths and addresses as this host sees them, and how long it waits.
LOCAL_KNOBS = ("data_dir", "model_handle", "data_service", "peer_timeout", "profile", "shard_store")


@dataclass(frozen=True)
class Cluster:
    source: str  # "TF_CONFIG" or "SLURM"
    task: tuple  # (job, index) of this process
    workers: int  # tasks that train: chief + workers
    chief: tuple  # the task that writes results (TensorFlow's chief)
    conf: dict | None = None  # the TF_CONFIG; None when only the task was looked up (see find)

    @property
    def is_chief(self) -> bool:
        return self.task == self.chief

    @property
    def trainers(self) -> list[tuple]:
        """The tasks that train, (job, index) each, the chief first."""
        cluster = self.conf["cluster"]
        return [(job, i) for job in ("chief", "worker") for i in range(len(cluster.get(job, [])))]

    @property
    def rank(self) -> int:
        """This task's place among the tasks that train, the chief first (its shard of a sharded pass)."""
        return self.trainers.index(self.task)

    @property
    def folder(self) -> str:
        return f"{self.task[0]}-{self.task[1]}"

    @property
    def label(self) -> str:
        return f"{self.task[0]} {self.task[1]} of {self.workers}"


# Set by setup(), read by strategy(), failure() and the tf.data service's job name.
_current: Cluster | None = None
run_id: str | None = None


def current() -> Cluster | None:
    return _current


# --- discovery --------------------------------------------------------------------------------

def tf_config() -> dict:
    """TF_CONFIG, parsed and checked: a UserError naming TF_CONFIG if it is missing or malformed."""
    text = os.environ.get("TF_CONFIG", "").strip()
    if not text:
        raise UserError("--strategy multiworker needs the TF_CONFIG environment variable on every host, e.g. "
                        f"TF_CONFIG='{_TF_CONFIG_EXAMPLE}' (task index 0, 1, ... per host), or a SLURM job step "
                        "(srun)")
    try:
        conf = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"TF_CONFIG is not valid JSON ({exc.msg} at character {exc.pos}); expected e.g. "
                        f"{_TF_CONFIG_EXAMPLE}") from None
    return check_tf_config(conf)


def check_tf_config(conf, what: str = "TF_CONFIG") -> dict:
    def bad(why: str) -> UserError:
        return UserError(f"{what}: {why}; expected e.g. {_TF_CONFIG_EXAMPLE}")

    if not isinstance(conf, dict):
        raise bad("must be a JSON object")
    cluster, task = conf.get("cluster"), conf.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise bad('no "cluster" object listing the hosts')
    for job, hosts in cluster.items():
        if job not in ("chief", "worker"):
            raise bad(f'cluster job {job!r} is not used by --strategy multiworker (only "chief" and "worker")')
        if not isinstance(hosts, list) or not hosts:
            raise bad(f'cluster "{job}" must be a non-empty list of "host:port"')
        for host in hosts:
            m = _ADDRESS.match(host) if isinstance(host, str) else None
            if not m or not 1 <= int(m["port"]) <= 65535:
                raise bad(f'cluster "{job}" entry {host!r} is not "host:port"')
    if not isinstance(task, dict):
        raise bad('no "task" object saying which host this is')
    kind, index = task.get("type"), task.get("index")
    if not isinstance(kind, str) or kind not in cluster:
        raise bad(f'task type {kind!r} is not a job of the cluster ({", ".join(cluster)})')
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(cluster[kind]):
        raise bad(f'task index {index!r} is not 0..{len(cluster[kind]) - 1} for "{kind}"')
    all_hosts = [h for hosts in cluster.values() for h in hosts]
    if len(set(all_hosts)) != len(all_hosts):
        raise bad(f"an address is listed twice ({next(h for h in all_hosts if all_hosts.count(h) > 1)}): each task "
                  "needs its own host:port")
    return conf


def _from_conf(conf: dict, source: str) -> Cluster:
    cluster = conf["cluster"]
    return Cluster(source, (conf["task"]["type"], conf["task"]["index"]), sum(len(h) for h in cluster.values()),
                   rendezvous.chief_of(cluster), conf)


def in_slurm_step() -> bool:
    return bool(os.environ.get("SLURM_PROCID"))


def find(slurm_port: int = 8888, resolve: bool = True) -> Cluster:
    """This process's task: TF_CONFIG when set, else the SLURM job step it runs in (srun).

    ``resolve=False`` only reads who this task is (no TensorFlow import; ``conf`` stays None
    under SLURM): what ``bench run`` needs to know whether it is the chief."""
    if os.environ.get("TF_CONFIG", "").strip() or not in_slurm_step():
        return _from_conf(tf_config(), "TF_CONFIG")
    missing = [v for v in SLURM_STEP_VARS if not os.environ.get(v, "").strip()]
    if missing:
        raise UserError(f"--strategy multiworker under SLURM: {', '.join(missing)} not set; start one task per "
                        "host with srun (or set TF_CONFIG)")
    try:
        rank, tasks = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_STEP_NUM_TASKS"])
    except ValueError:
        raise UserError("--strategy multiworker under SLURM: SLURM_PROCID and SLURM_STEP_NUM_TASKS must be "
                        "whole numbers") from None
    if not resolve:
        # SlurmClusterResolver makes every task a "worker" and task i = rank i (see _slurm_conf).
        return Cluster("SLURM", ("worker", rank), tasks, ("worker", 0))
    return _from_conf(check_tf_config(_slurm_conf(slurm_port), "SLURM"), "SLURM")


def _slurm_conf(port_base: int) -> dict:
    """The cluster of this SLURM job step, by TensorFlow's SlurmClusterResolver, as a TF_CONFIG.

    It reads SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_STEP_NODELIST and SLURM_STEP_TASKS_PER_NODE
    (no scontrol) and lists the tasks node by node (nodes sorted, ports ``port_base``,
    ``port_base + 1``, ... on each), which matches SLURM's default block distribution of ranks."""
    from .tfkeras import tf

    try:
        resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(
            port_base=port_base,
            # GPUs are srun's business (e.g. srun --gpus-per-task=1): left on, the resolver rewrites
            # CUDA_VISIBLE_DEVICES. The two GPU counts then only feed that allocation, but TF 2.21 still
            # steps a range by gpus_per_task (0 on a CPU node: ValueError) and zips a node's tasks with
            # range(gpus_per_node): these values keep both harmless.
            auto_set_gpu=False, gpus_per_node=4096, gpus_per_task=1)
        spec = resolver.cluster_spec().as_dict()
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UserError(f"--strategy multiworker under SLURM: cannot work out the cluster from "
                        f"{', '.join(SLURM_STEP_VARS)} ({str(exc).splitlines()[0]}); or set TF_CONFIG") from None
    return {"cluster": spec, "task": {"type": resolver.task_type, "index": resolver.task_id}}


# --- signals ----------------------------------------------------------------------------------

_EXIT_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_label = "flowers_fast"
_wakeup: tuple | None = None


def _leave(signum: int) -> None:
    os.write(2, f"{_label}: stopped by {signal.Signals(signum).name}\n".encode())
    # Not sys.exit: TensorFlow's destructors can wait on the cluster. 143 / 130, like a shell reports.
    os._exit(128 + signum)


def _handler(signum, frame) -> None:
    _leave(signum)


def _watch(sock: socket.socket) -> None:
    while True:
        data = sock.recv(1)
        if data and data[0] in _EXIT_SIGNALS:
            _leave(data[0])


def exit_on_signals(label: str) -> None:
    """SIGTERM and SIGINT end this process at once with one line (exit 143 / 130), at any stage.

    A Python handler runs only when the main thread runs Python, not while it waits inside a
    TensorFlow call (a step blocked in an all-reduce on a stalled peer). Python's C-level
    handler also writes the signal number to the wakeup fd at once, and a thread reading it
    exits the process: that thread runs as soon as TensorFlow releases the GIL."""
    global _label, _wakeup
    _label = label
    if _wakeup is None:
        r, w = socket.socketpair()
        w.setblocking(False)
        signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=_watch, args=(r,), name="signal-exit", daemon=True).start()
        _wakeup = (r, w)  # the sockets live as long as the process
    for s in _EXIT_SIGNALS:
        signal.signal(s, _handler)


# --- the strategy -----------------------------------------------------------------------------

def setup(cfg) -> Cluster:
    """Process start (runtime.setup), before any TensorFlow op: find the cluster, exit on signals,
    bound the coordination service's registration. Idempotent."""
    global _current
    if _current is not None:
        return _current
    found = find(cfg.slurm_port)
    exit_on_signals(f"flowers_fast: {found.label}")
    if found.source == "SLURM":
        os.environ["TF_CONFIG"] = json.dumps(found.conf)  # what MWMS reads
    configure_coordination(found.conf, cfg.peer_timeout)
    _current = found
    return found


def configure_coordination(conf: dict, register_timeout_s: float) -> None:
    """The coordination service MWMS would set up, plus a bounded registration.

    ``cluster_register_timeout_in_ms`` alone does not end the leader's wait (measured);
    with ``cluster_register_with_barrier`` every task gives up after the timeout. There is no
    public API for either in TF 2.21: MWMS keeps a configuration that is already there."""
    try:
        from tensorflow.python.distribute import multi_worker_util
        from tensorflow.python.eager import context

        from .tfkeras import tf

        spec = tf.train.ClusterSpec(conf["cluster"])
        jobs = [context.coordination_config_pb2.CoordinatedJob(name=job, num_tasks=spec.num_tasks(job))
                for job in ("chief", "worker") if job in spec.jobs]
        ctx = context.context()
        ctx.configure_coordination_service(service_type="standalone",
                                           service_leader=multi_worker_util.coordination_leader(spec),
                                           coordinated_jobs=jobs,
                                           cluster_register_timeout_in_ms=int(register_timeout_s * 1000))
        ctx.coordination_service.cluster_register_with_barrier = True
    except (ImportError, AttributeError, TypeError):
        pass  # another TensorFlow version: the rendezvous still bounds the usual case (a peer that never starts)


def shared_settings(cfg) -> dict:
    """What every task of a run must agree on: the configuration, minus what is local to a host
    (but whether there is a --shard-store: the tasks share their shards one way or the other)."""
    shared = {k: v for k, v in cfg.to_dict().items() if k not in LOCAL_KNOBS}
    return {**shared, "shard_store": "a folder" if cfg.shard_store else None}


def strategy(cfg):
    """MultiWorkerMirroredStrategy over the cluster, once every peer is up (see the module doc)."""
    global run_id
    from .tfkeras import tf

    found = setup(cfg)
    print(f"flowers_fast: {found.label} (cluster from {found.source}): waiting up to {cfg.peer_timeout:g} s for "
          "the other tasks", file=sys.stderr, flush=True)
    try:
        met = rendezvous.rendezvous(found.conf["cluster"], found.task, cfg.peer_timeout, shared_settings(cfg))
    except ClusterError as exc:
        raise ClusterError(f"--strategy multiworker: {found.label}: {exc}") from None
    run_id = met.run_id
    try:
        made = tf.distribute.MultiWorkerMirroredStrategy()
    except tf.errors.OpError as exc:
        raise failure(exc) or exc
    exit_on_signals(_label)  # the constructor installed TensorFlow's SIGTERM handler: take it back
    print(f"flowers_fast: {found.label}: all {found.workers} tasks up after {met.waited_s:.1f} s; training",
          file=sys.stderr, flush=True)
    return made


# --- failures ---------------------------------------------------------------------------------

def _task(match) -> str:
    return f"{match[1]} {match[2]}"


def _only_peer() -> str | None:
    """The other task of a two-task cluster (TensorFlow's message may not name the one it lost)."""
    if _current is None or not _current.conf:
        return None
    others = [f"{job} {i}" for job, i in _current.trainers if (job, i) != tuple(_current.task)]
    return others[0] if len(others) == 1 else None


def describe(exc: BaseException) -> str:
    """One line for a cluster error (TensorFlow's first line is often just "Graph execution error:").

    The messages it knows were recorded on loopback (tests/test_cluster.py keeps them)."""
    text, kind = str(exc), type(exc).__name__
    task = r"/job:(\w+)/replica:\d+/task:(\d+)"
    m = re.search(r"unhealthy \(stopped sending heartbeats\):\s*" + task, text)
    if m:
        return f"{kind}: {_task(m)} stopped sending heartbeats: it crashed, was killed or is unreachable"
    if "Barrier timed out" in text and "register" in text:
        m = re.search(r"timed out task names:\s*" + task, text)
        return f"{kind}: not every task joined within --peer-timeout" + (f" ({_task(m)} did not)" if m else "")
    if "CoordinationService/RegisterTask" in text:
        return f"{kind}: could not register with the chief (task 0) within --peer-timeout: is it still running?"
    if "Collective has timed out" in text:
        return f"{kind}: an all-reduce timed out: a peer is stuck or much slower"
    if "CoordinationService/Heartbeat" in text or "Failed to send RPC to coordination service" in text:
        return f"{kind}: the chief (task 0, which runs the coordination service) stopped answering"
    lost = re.search(r"(Socket closed|Connection reset by peer|Connection refused|Broken pipe|"
                     r"failed to connect to all addresses)", text)
    if lost:
        m = re.search(r"remote target " + task, text)
        peer = _task(m) if m else _only_peer() or "a peer"
        m = re.search(r"ipv[46]:([^ ]+?): Failed to connect", text)
        where = f" at {m[1]}" if m else ""
        return f"{kind}: lost the connection to {peer}{where} ({lost[1]}): it exited, was killed or is unreachable"
    m = re.search(r"Collective ops is aborted by: (.*)", text)
    first = (m[1] if m else next((line for line in text.splitlines()
                                  if line.strip() and line.strip() != "Graph execution error:"), "")).strip()
    return f"{kind}: {first[:200]}"


def failure(exc: BaseException) -> ClusterError | None:
    """A ClusterError for an error that comes from the cluster (a peer gone, a timeout), else None."""
    from .tfkeras import tf

    if not isinstance(exc, tf.errors.OpError):
        return None
    text = str(exc)
    from_cluster = isinstance(exc, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                                    tf.errors.AbortedError, tf.errors.CancelledError)) \
        or "Collective ops is aborted" in text or "oordination service" in text
    if not from_cluster:
        return None
    where = f"{_current.label}: " if _current else ""
    return ClusterError(f"--strategy multiworker: {where}{describe(exc)}")


@contextmanager
def one_line_failures(active: bool):
    """Inside, with ``active`` (a multiworker run), a cluster error becomes one ClusterError line."""
    try:
        yield
    except Exception as exc:
        lost = failure(exc) if active else None
        if lost is None:
            raise
        raise lost from None
