"""Wait for the peers of a multi-worker cluster in plain Python, before TensorFlow builds the strategy.

``MultiWorkerMirroredStrategy()`` waits for missing peers inside a C++ call that holds the GIL:
no signal handler, thread or deadline runs until it returns, and with TensorFlow's defaults it
waits forever. A pre-flight "does each peer's port accept connections?" deadlocks, because a
task opens its port only inside that constructor. So each task listens briefly on *its own*
cluster port (the one TensorFlow binds a moment later) and exchanges one line with every peer:

    -> "FLOWERS-RDV <cluster digest> <job> <index> <nonce> <settings json>"
    <- "FLOWERS-OK  <cluster digest> <job> <index> <nonce> <settings json>"

A task is done when it has reached every peer and every peer has reached it; then it closes its
listener. Every peer has reached it by then, so closing strands nobody. On the way it catches
what would otherwise fail obscurely later: a busy port, cluster lists that differ between hosts,
a cluster list that does not match where the tasks run, and peers started with other settings.
The chief's nonce becomes the run's id (the tf.data service job name, for instance).

A peer whose port answers but not in this protocol is taken to be past its rendezvous already
(its TensorFlow server owns the port); the coordination service's register timeout
(``cluster.configure_coordination``) is the backstop for that case.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from .errors import ClusterError

HELLO, OK = "FLOWERS-RDV", "FLOWERS-OK"

Task = tuple  # (job, index)


@dataclass(frozen=True)
class Result:
    waited_s: float
    run_id: str  # the chief's nonce: the same on every task of this run


def _address(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host.strip("[]"), int(port)


def _read_line(sock: socket.socket) -> list[str]:
    """One protocol line as its 6 fields (anything else, e.g. a TensorFlow server's bytes, gives fewer)."""
    text = sock.makefile("rb").readline(65536).decode("utf-8", "replace").strip()
    return text.split(" ", 5)


def name(task: Task) -> str:
    return f"{task[0]} {task[1]}"


def chief_of(cluster: dict) -> Task:
    """The task TensorFlow makes chief (and coordination leader): chief 0, else worker 0."""
    return ("chief", 0) if "chief" in cluster else ("worker", 0)


def _differences(mine: dict, theirs: dict) -> str:
    keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    return ", ".join(f"{k} {mine.get(k)!r} here, {theirs.get(k)!r} there" for k in keys[:4])


def rendezvous(cluster: dict, me: Task, timeout: float, settings: dict | None = None, log=None,
               poll: float = 0.25) -> Result:
    """Block until every task of ``cluster`` (TF_CONFIG's "cluster") is up and agrees.

    ``settings`` (JSON-able) must be equal on every task, e.g. the run configuration. Raises
    ClusterError (one line) after ``timeout`` seconds, or at once on a disagreement."""
    t0 = time.monotonic()
    me = (me[0], int(me[1]))
    digest = hashlib.sha1(json.dumps(cluster, sort_keys=True).encode()).hexdigest()[:12]
    nonce = uuid.uuid4().hex[:12]
    mine = json.dumps(settings or {}, sort_keys=True, separators=(",", ":"))
    line = f"{digest} {me[0]} {me[1]} {nonce} {mine}\n"
    peers = {(job, i): _address(a) for job, hosts in cluster.items() for i, a in enumerate(hosts) if (job, i) != me}
    chief = chief_of(cluster)
    heard: set = set()
    reached: set = set()
    nonces: dict = {me: nonce}
    problems: list[str] = []
    lock, stop = threading.Lock(), threading.Event()

    def check(peer: Task, fields: list[str], where: str) -> None:
        """Record what ``peer`` said (``fields``: digest, job, index, nonce, settings), or the problem."""
        if fields[0] != digest:
            problems.append(f"the TF_CONFIG cluster of {name(peer)} ({where}) differs from this task's: every task "
                            "needs the same cluster list")
        elif (fields[1], int(fields[2])) != peer:
            problems.append(f"{where} answered as {fields[1]} {fields[2]}, not {name(peer)}: the cluster list does not "
                            "match where the tasks run")
        elif fields[4] != mine:
            diff = _differences(json.loads(mine), json.loads(fields[4]))
            problems.append(f"{name(peer)} was started with other settings ({diff}); start every task with the same "
                            "command")
        else:
            nonces[peer] = fields[3]

    port = _address(cluster[me[0]][me[1]])[1]
    try:
        # Dual-stack where possible: peers may reach this host over IPv6 (TensorFlow's server listens on both).
        if socket.has_dualstack_ipv6():
            listener = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=64)
        else:
            listener = socket.create_server(("", port), backlog=64)
    except OSError as exc:
        raise ClusterError(f"TF_CONFIG {name(me)}: port {port} is in use on this host ({exc.strerror}); stop what "
                           "listens there or give this task another port") from None
    listener.settimeout(0.2)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (socket.timeout, OSError):
                continue
            with conn:
                try:
                    conn.settimeout(2)
                    fields = _read_line(conn)
                    if len(fields) == 6 and fields[0] == HELLO:
                        conn.sendall(f"{OK} {line}".encode())
                        peer = (fields[2], int(fields[3]))
                        with lock:
                            check(peer, fields[1:], "its hello")
                            heard.add(peer)
                        conn.recv(1)  # the client closes first: no TIME_WAIT left on our port for TensorFlow
                except (OSError, ValueError):
                    pass

    server = threading.Thread(target=serve, name="rendezvous", daemon=True)
    server.start()
    try:
        while True:
            for peer, (host, port) in peers.items():
                if peer in reached:
                    continue
                try:
                    with socket.create_connection((host, port), timeout=1) as s:
                        s.settimeout(2)
                        s.sendall(f"{HELLO} {line}".encode())
                        fields = _read_line(s)
                except OSError:
                    continue  # not listening yet
                with lock:
                    if len(fields) == 6 and fields[0] == OK:
                        check(peer, fields[1:], f"{host}:{port}")
                    else:  # something else owns the port: the peer's TensorFlow server, so it is past this point
                        heard.add(peer)
                    reached.add(peer)
            with lock:
                if problems:
                    raise ClusterError(problems[0])
                missing = sorted(p for p in peers if p not in reached or p not in heard)
            if not missing:
                return Result(time.monotonic() - t0, nonces.get(chief) or f"{digest}-{chief[0]}")
            if time.monotonic() - t0 > timeout:
                names = ", ".join(f"{name(p)} at {peers[p][0]}:{peers[p][1]}" for p in missing)
                raise ClusterError(f"no answer within --peer-timeout {timeout:g} s from {names}; start every task, "
                                   "or check the addresses and the firewall")
            time.sleep(poll)
    finally:
        stop.set()
        server.join(2)
        listener.close()
