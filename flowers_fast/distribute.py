"""Scaling out with TensorFlow's own engines: tf.distribute strategies and tf.data service.

* ``strategy(cfg)``: default (one device), mirrored (every visible GPU of this host; on a
  CPU-only host, every logical CPU device, see ``split_cpu``), multiworker (the tasks listed in
  TF_CONFIG or by SLURM, every failure bounded: ``cluster.py``). The caller builds the model under ``strategy.scope()`` and batches globally
  (``cfg.batch_size * strategy.num_replicas_in_sync``).
* ``maybe_data_service(ds, cfg)``: with ``--data-service grpc://HOST:PORT`` the training
  input pipeline runs on tf.data service workers instead of this process.
* ``dispatcher`` / ``worker``: start the tf.data service servers (``python -m bench dataservice``).
"""

from __future__ import annotations

import os
import re
import socket
import uuid

import numpy as np

from . import cluster
from .cluster import tf_config  # noqa: F401  (the TF_CONFIG check lives with the rest of the cluster code)
from .config import RunConfig, data_service_address
from .errors import DeviceError, UserError, invoked
from .tfkeras import tf

# Set it to one new name per training run, the same on every host of a multiworker run.
JOB_ENV = "FLOWERS_FAST_DATA_SERVICE_JOB"

# Sharding of the training set across tf.data service workers: "distributed_epoch".
# The dispatcher hands out the source elements (our file paths, from_tensor_slices) to the
# workers, which decode -> cache -> shuffle -> batch them; every image is seen exactly once
# per epoch however many workers there are, so an epoch means the same as locally and
# adding workers adds throughput, not duplicates. "parallel_epochs" (each worker produces a
# whole epoch) would need no coordination, but with N workers every image comes N times per
# "epoch". Tested with the cached and shuffled train dataset, 1 and 2 workers, several epochs
# (tests/test_distribute.py). The cache then lives in the worker's job, and each epoch is a new
# job: workers decode again every epoch (measured), unlike the local pipeline.
PROCESSING_MODE = "distributed_epoch"

_ADDRESS = re.compile(r"^(?:grpc://)?(?P<host>[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,5})$")


# --- tf.distribute ----------------------------------------------------------------------------

def split_cpu(n: int) -> None:
    """Make ``n`` logical CPU devices, so MirroredStrategy can mirror over them on a CPU-only host.

    TensorFlow fixes its devices the first time it runs anything, so this must be called
    first thing in the process (before any op, dataset or model)."""
    if not isinstance(n, int) or n < 1:
        raise UserError(f"split_cpu: the number of logical CPU devices must be a positive integer, got {n!r}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == n:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have == n:
            return
        raise DeviceError(f"cannot split the CPU into {n} logical devices: TensorFlow already initialised its devices "
                          f"({have} CPU device{'s' if have != 1 else ''}); call split_cpu first thing in the "
                          "process, before any TensorFlow op runs") from None


def strategy(cfg: RunConfig) -> "tf.distribute.Strategy":
    if cfg.strategy == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        if gpus:
            return tf.distribute.MirroredStrategy(devices=[d.name for d in gpus])
        # No GPU: one replica per logical CPU device (one, unless split_cpu made more).
        return tf.distribute.MirroredStrategy(devices=[d.name for d in tf.config.list_logical_devices("CPU")])
    if cfg.strategy == "multiworker":
        return cluster.strategy(cfg)  # waits for the peers, bounded; see cluster.py
    return tf.distribute.get_strategy()


# Bytes per task in one all-gather call: gRPC refuses messages over 2 GB, and every call's result
# (tasks x this) is held twice while it is copied out.
GATHER_CHUNK_BYTES = 64 * 2**20


def all_gather(strategy: "tf.distribute.Strategy", array: np.ndarray,
               chunk_bytes: int = GATHER_CHUNK_BYTES) -> np.ndarray:
    """Every task's ``array`` (the same shape and dtype on each) concatenated along axis 0 in task
    order (the replicas' order: the chief first), on every task: the strategy's collective
    all-gather (``ReplicaContext.all_gather``), in calls of at most ``chunk_bytes`` rows per task.
    A task with several local replicas (GPUs) sends its rows from the first one only."""
    array = np.ascontiguousarray(array)
    local = len(strategy.extended.worker_devices)
    tasks = strategy.num_replicas_in_sync // local
    rows = len(array)
    step = max(1, chunk_bytes // max(1, array[:1].nbytes)) if rows else 1
    out = np.empty((tasks * rows, *array.shape[1:]), array.dtype)

    @tf.function
    def gather(values):
        # tf.identity places the value on the replica's device: all_gather refuses a tensor with no
        # device (what a tf.function's argument is), "destinations can not be empty".
        return strategy.run(lambda v: tf.distribute.get_replica_context().all_gather(tf.identity(v), axis=0),
                            args=(values,))

    for start in range(0, max(rows, 1), step):
        part = array[start:start + step]
        values = strategy.experimental_distribute_values_from_function(
            lambda ctx, part=part: tf.constant(part if ctx.replica_id_in_sync_group % local == 0 else part[:0]))
        got = strategy.experimental_local_results(gather(values))[0].numpy()
        n = len(part)
        for t in range(tasks):
            out[t * rows + start:t * rows + start + n] = got[t * n:(t + 1) * n]
    return out


# --- tf.data service ---------------------------------------------------------------------------

def _reachable(host: str, port: int, timeout: float = 5.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def job_name(cfg: RunConfig) -> str:
    """The tf.data service job of this training run.

    A job name must be new for each run (a finished job read again yields nothing) and, with
    several trainers (multiworker), the same on all of them so that they split one epoch: the
    run id the tasks agreed on in their rendezvous (the chief's), unless JOB_ENV names one."""
    name = os.environ.get(JOB_ENV, "").strip()
    if name:
        return name
    if cfg.strategy == "multiworker":
        if cluster.run_id:
            return f"flowers_fast-{cluster.run_id}"
        raise UserError(f"--data-service with --strategy multiworker: set {JOB_ENV} to the same new name on every "
                        f"host for each run (e.g. {JOB_ENV}=run-$(date +%s)), so the trainers share one epoch")
    return f"flowers_fast-{uuid.uuid4().hex[:12]}"


def maybe_data_service(ds: "tf.data.Dataset", cfg: RunConfig, job: str = "") -> "tf.data.Dataset":
    """Run ``ds`` (the training pipeline, or featcache's feature stream) on tf.data service workers
    when --data-service is set; ``job`` names a job of its own within the run (a feature pass
    shard's: each task reads only its own).

    Everything before this call runs on the workers: they read the files by the same paths
    as this process, so the data must be at the same path on every worker host."""
    if not cfg.data_service:
        return ds
    host, port = data_service_address(cfg.data_service)
    if not _reachable(host, port):
        raise UserError(f"--data-service {cfg.data_service}: no dispatcher answers at {host}:{port}; start one with "
                        f"{invoked('bench')} dataservice dispatcher --port {port}, and at least one worker")
    return ds.apply(tf.data.experimental.service.distribute(
        processing_mode=PROCESSING_MODE, service=cfg.data_service,
        job_name=job_name(cfg) + (f"-{job}" if job else "")))


def _port(port: int, what: str) -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise UserError(f"--port {port!r}: the {what} port must be 0..65535 (0 picks a free one)")
    return port


def _port_free(port: int) -> bool:
    if port == 0:
        return True
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
            return True
        except OSError:
            return False


def dispatcher(port: int = 5050) -> "tf.data.experimental.service.DispatchServer":
    """Start a tf.data service dispatcher on ``port`` (0: a free one); ``.target`` is grpc://localhost:PORT.

    Call ``join()`` on the result to serve until the process ends."""
    port = _port(port, "dispatcher")
    if not _port_free(port):
        raise UserError(f"--port {port}: already in use; stop what listens there or pick another port")
    return tf.data.experimental.service.DispatchServer(tf.data.experimental.service.DispatcherConfig(port=port))


def worker(port: int, dispatcher_address: str, worker_address: str | None = None
           ) -> "tf.data.experimental.service.WorkerServer":
    """Start a tf.data service worker on ``port`` (0: a free one), registered with the dispatcher.

    ``dispatcher_address`` is HOST:PORT (grpc:// optional). ``worker_address`` is the HOST:PORT
    the trainers connect to (``%port%`` is replaced by the bound port); by default
    ``localhost:%port%`` when the dispatcher is on this host, else this machine's host name:
    TensorFlow's own default, localhost, only works when trainers run on the worker's host.
    Call ``join()`` on the result to serve until the process ends."""
    port = _port(port, "worker")
    m = _ADDRESS.match(dispatcher_address or "")
    if not m or not 1 <= int(m["port"]) <= 65535:
        raise UserError(f"--dispatcher {dispatcher_address!r}: expected HOST:PORT of the dispatcher, "
                        "e.g. localhost:5050")
    if not _port_free(port):
        raise UserError(f"--port {port}: already in use; stop what listens there or pick another port")
    address = f"{m['host']}:{m['port']}"
    # TensorFlow would block (uninterruptibly) retrying an absent dispatcher: say so instead.
    if not _reachable(m["host"].strip("[]"), int(m["port"])):
        raise UserError(f"--dispatcher {dispatcher_address}: no dispatcher answers there; start it first with "
                        f"{invoked('bench')} dataservice dispatcher --port {m['port']}")
    if worker_address is None:
        local = m["host"].strip("[]") in ("localhost", "127.0.0.1", "::1")
        worker_address = f"{'localhost' if local else socket.getfqdn()}:%port%"
    config = tf.data.experimental.service.WorkerConfig(dispatcher_address=address, worker_address=worker_address,
                                                       port=port)
    return tf.data.experimental.service.WorkerServer(config)
