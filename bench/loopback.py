"""``python -m bench loopback``: one configuration trained by N multi-worker tasks on this machine
and by one process with the same global batch, compared side by side.

Each task is the command a host of a real cluster runs, ``python -m flowers_fast train --strategy
multiworker``, with its own ``TF_CONFIG`` listing 127.0.0.1 and free ports. The tasks must agree
exactly; against one process the test loss must match to about 1e-5 when every global batch splits
evenly over the tasks (Keras averages each task's mean loss with equal weight, so an uneven last
batch weighs its images differently: a real difference, about 0.5 % in the loss measured).
The launch helpers are shared with the tests.

On one machine the tasks share its cores: the times show what the cluster costs, not a speed-up.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flowers_fast.clikit import add_knob_flags, given_knobs, positive_int
from flowers_fast.config import TRAIN, flag_of, knobs
from flowers_fast.errors import UserError, invoked
from flowers_fast.outputs import Outputs, add_overwrite_flag

# The tasks of a test or a loopback run: CPU only, quiet TensorFlow, no cluster from the caller.
CLEAN_ENV = {"CUDA_VISIBLE_DEVICES": "-1", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
COLUMNS = ("replicas", "global_batch", "train_images", "test_accuracy", "test_loss", "first_epoch_s",
           "steady_epoch_s", "train_img_s", "wall_s")
# featcache and cutcache: each task's share of the sharded frozen pass (see docs/scaling.md).
PASS_COLUMNS = ("feature_pass_images", "feature_pass_s", "feature_share_s")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on this machine (bound together so they differ, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tf_config(ports: list[int], index: int) -> str:
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def task_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG" and not k.startswith("SLURM_")}
    return {**env, **CLEAN_ENV, **(extra or {})}


def start(argv: list[str], env: dict, log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """A task in its own session (a signal sent to it reaches only it), output in ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def stop(procs) -> None:
    """Kill what is still running (teardown: never leave a task behind)."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def train_argv(given: dict) -> list[str]:
    """``python -m flowers_fast train`` with these knob values as flags."""
    argv = [sys.executable, "-m", "flowers_fast", "train", "--quiet"]
    by_name = {f.name: f for f in knobs(TRAIN)}
    for key, value in given.items():
        flag = flag_of(by_name[key])
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv


def _wait(procs: dict, logs: dict, timeout: float) -> None:
    end = time.monotonic() + timeout
    try:
        for name, p in procs.items():
            try:
                code = p.wait(timeout=max(1.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise UserError(f"loopback: {name} did not finish within --timeout {timeout:g} s; see {logs[name]}") \
                    from None
            if code != 0:
                tail = [line for line in Path(logs[name]).read_text().splitlines() if line.strip()][-1:]
                raise UserError(f"loopback: {name} exited {code}: {tail[0] if tail else ''} (log: {logs[name]})")
    finally:
        stop(procs.values())


def files(workers: int) -> list[str]:
    """What a loopback run writes into its logs folder."""
    return [f"{stem}.{ext}" for stem in [f"worker{i}" for i in range(workers)] + ["single"] for ext in ("log", "json")]


def run(given: dict, workers: int, logdir: Path, timeout: float = 900.0, together: bool = False) -> dict[str, dict]:
    """Train ``given`` as ``workers`` tasks, then as one process at the same global batch (at the
    same time with ``together``: faster, but the times then mean nothing). Returns the rows by
    run name ("worker 0", ..., "one process"). The caller checked ``logdir``'s :func:`files`: the
    tasks replace them."""
    batch = given.get("batch_size", 32)
    rows, procs, logs = {}, {}, {}
    ports = free_ports(workers)
    for i in range(workers):
        name = f"worker {i}"
        logs[name] = logdir / f"worker{i}.log"
        argv = train_argv({**given, "strategy": "multiworker", "batch_size": batch}) + \
            ["--json", str(logdir / f"worker{i}.json"), "--overwrite"]
        procs[name] = start(argv, task_env({"TF_CONFIG": tf_config(ports, i)}), logs[name])
    single = {"one process": None}
    logs["one process"] = logdir / "single.log"
    argv = train_argv({**given, "strategy": "default", "batch_size": batch * workers}) + \
        ["--json", str(logdir / "single.json"), "--overwrite"]
    if together:
        procs["one process"] = start(argv, task_env(), logs["one process"])
    _wait(procs, logs, timeout)
    if not together:
        single["one process"] = start(argv, task_env(), logs["one process"])
        _wait(single, logs, timeout)
    for i in range(workers):
        rows[f"worker {i}"] = json.loads((logdir / f"worker{i}.json").read_text())
    rows["one process"] = json.loads((logdir / "single.json").read_text())
    return rows


def uneven(row: dict, workers: int) -> bool:
    """Does some global batch of this run split unevenly over the workers?"""
    last = row["train_images"] % row["global_batch"]
    return row["global_batch"] % workers != 0 or last % workers != 0


def report(rows: dict[str, dict], workers: int) -> str:
    names = list(rows)
    columns = COLUMNS + (PASS_COLUMNS if "feature_pass_images" in rows["worker 0"] else ())
    width = max(len(c) for c in columns)
    lines = [f"{'':<{width}}  " + "  ".join(f"{n:>12}" for n in names)]
    for c in columns:
        cells = []
        for n in names:
            v = rows[n].get(c, "")
            cells.append(f"{v:>12.6g}" if isinstance(v, float) and not math.isnan(v) else f"{str(v):>12}")
        lines.append(f"{c:<{width}}  " + "  ".join(cells))
    w0, one = rows["worker 0"], rows["one process"]
    agree = all(rows[f"worker {i}"]["test_loss"] == w0["test_loss"] and
                rows[f"worker {i}"]["test_accuracy"] == w0["test_accuracy"] for i in range(workers))
    rel = abs(w0["test_loss"] - one["test_loss"]) / max(abs(one["test_loss"]), 1e-12)
    lines.append(f"workers agree exactly: {'yes' if agree else 'NO'}; test loss vs one process: relative "
                 f"difference {rel:.2g}, accuracy {w0['test_accuracy']:.4f} vs {one['test_accuracy']:.4f}")
    if uneven(w0, workers):
        lines.append(f"note: {w0['train_images']} training images in global batches of {w0['global_batch']} do not "
                     f"split evenly over {workers} workers: expect the loss to differ by about 1e-3, not 1e-5")
    if "feature_pass_images" in w0:
        lines.append("feature_pass_images: the images each task ran through the frozen pass (its shard)")
    lines.append("the tasks share this machine's cores: times show the cluster's overhead, not a speed-up")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("loopback", help="train one configuration as N multiworker tasks on this machine and as "
                                        "one process; compare")
    g = p.add_argument_group("loopback")
    g.add_argument("--workers", type=positive_int, default=2, help="tasks in the cluster (default: 2)")
    g.add_argument("--timeout", type=positive_int, default=900, metavar="S", help="seconds per run (default: 900)")
    g.add_argument("--logs", metavar="DIR", help="keep each run's log and row here (default: a temporary folder)")
    add_overwrite_flag(g, " (the --logs files)")
    add_knob_flags(p, TRAIN)
    # Small enough for a few minutes on 2 cores; 240 training images in global batches of 64 split evenly.
    p.set_defaults(func=cmd_loopback, num_images=320, image_size=96, epochs=5, breakdown=False)


def data_text(given: dict) -> str:
    """What the run trains on, for its first line: --num-images sizes only the synthetic set."""
    if given.get("data_dir"):
        return f"the images in {given['data_dir']}"
    if given.get("dataset", "synthetic") != "synthetic":
        return f"the {given['dataset']} set"
    return f"{given.get('num_images')} synthetic images"


def cmd_loopback(args) -> int:
    given = given_knobs(args, TRAIN)
    for f in knobs(TRAIN):
        if f.name in ("strategy", "data_service", "logical_cpus") and f.name in given:
            raise UserError(f"{invoked('bench')} loopback: {flag_of(f)} is set by the loopback run itself")
    with tempfile.TemporaryDirectory(prefix="flowers_fast_loopback_") as tmp, Outputs(args.overwrite) as outputs:
        logdir = outputs.folder(args.logs, "--logs") if args.logs else Path(tmp)
        for name in files(args.workers) if args.logs else []:
            outputs.file(logdir / name, "--logs", fix="pass another folder")
        print(f"loopback: {args.workers} workers on 127.0.0.1, then one process at the same global batch; "
              f"{data_text(given)} at {given.get('image_size')} px, {given.get('epochs')} epochs",
              file=sys.stderr, flush=True)
        rows = run(given, args.workers, logdir, args.timeout)
    print(report(rows, args.workers))
    return 0
