"""``python -m bench run``: every configuration x device x repeat in its own subprocess,
results appended to a CSV that is replaced atomically after each row.

A crash or timeout in one configuration becomes a ``status=error``/``timeout`` row and the
sweep goes on; Ctrl-C marks the running one ``interrupted`` and exits 130; a SIGKILL leaves
only complete rows, and ``--resume`` runs what is missing.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from flowers_fast.clikit import given_knobs
from flowers_fast.config import SWEEP, RunConfig, implied
from flowers_fast.download import cache_dir
from flowers_fast.errors import (
    INTERRUPTED_EXIT_CODE,
    RUN_FAILED_EXIT_CODE,
    DeviceError,
    OutputError,
    UserError,
    invoked,
)

from . import configs as configs_mod
from .results import LEADING


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def available_gpus() -> int:
    """GPUs TensorFlow sees, asked in a subprocess so this process never imports TensorFlow."""
    code = "import os; os.environ['TF_CPP_MIN_LOG_LEVEL']='3'; import tensorflow as tf; " \
           "print(len(tf.config.list_physical_devices('GPU')))"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        return int(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError, OSError, subprocess.SubprocessError):
        return 0


class ResultsFile:
    """A CSV rewritten whole to a temporary file and renamed after each row: never half a row."""

    def __init__(self, path: Path, latest: Path | None):
        self.path, self.latest = path, latest
        self.rows: list[dict] = []
        if path.exists():
            self.rows = pd.read_csv(path, keep_default_na=False).to_dict("records")

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.flush()

    def drop(self, keep) -> None:
        self.rows = [r for r in self.rows if keep(r)]

    def flush(self) -> None:
        frame = pd.DataFrame(self.rows)
        columns = [c for c in LEADING if c in frame.columns] + [c for c in frame.columns if c not in LEADING]
        for target in [self.path] + ([self.latest] if self.latest else []):
            _atomic_csv(frame[columns], target)


def _atomic_csv(frame: pd.DataFrame, target: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            frame.to_csv(f, index=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"{target}: cannot write results ({exc.strerror or exc}); free disk space or pass "
                          "another --out") from None


def new_run_path(out: Path) -> tuple[str, Path]:
    """A fresh timestamped file name: a second run never overwrites the first."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_id, k = stamp, 1
    while (out / f"run-{run_id}.csv").exists() or (out / f"run-{run_id}.json").exists():
        k += 1
        run_id = f"{stamp}-{k}"
    return run_id, out / f"run-{run_id}.csv"


def check_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as exc:
        raise OutputError(f"--out {out}: not writable ({exc.strerror or exc}); pass a folder you can write to") \
            from None


def _die_with_parent() -> None:
    """In the worker: if the sweep is SIGKILLed, the kernel kills this worker too (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_one(cfg: RunConfig, timeout_s: float, log_path: Path, env: dict, interactive: bool = False,
            worker: str = "bench.worker", figures: Path | None = None, cache: Path | None = None) -> dict:
    """One configuration in a subprocess; every way it can end becomes a row.

    The worker gets one job document (``bench.worker`` reads it): the configuration, where to
    write its result, whether to draw progress bars, the cache folder, and the figures folder."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        out = Path(tmp) / "result.json"
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"config": cfg.to_dict(), "result": str(out), "progress": interactive,
                                   "cache": str(cache) if cache else None,
                                   "figures": str(figures) if figures else None}))
        cmd = [sys.executable, "-m", worker, str(job)]
        start = time.perf_counter()
        with open(log_path, "w") as log:
            # Its own session: a timeout kills the whole worker tree, not us. On a terminal its
            # progress bars (stderr) show; otherwise everything goes to the log.
            proc = subprocess.Popen(cmd, stdout=log, stderr=None if interactive else log, env=env,
                                    start_new_session=True, preexec_fn=_die_with_parent)
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return {"status": "timeout", "error": f"no result within --timeout {timeout_s:.0f} s; killed",
                        "subprocess_s": time.perf_counter() - start}
            except KeyboardInterrupt:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
        elapsed = time.perf_counter() - start
        if out.exists():
            row = json.loads(out.read_text())
            row["subprocess_s"] = elapsed
            return row
        if code < 0:
            why = {signal.SIGKILL: "killed (out of memory?)", signal.SIGSEGV: "crashed (segfault)"}.get(
                -code, f"killed by signal {-code}")
        else:
            why = f"exited {code} without a result"
        return {"status": "error", "error": f"worker {why}; see {log_path}", "subprocess_s": elapsed}


def plan(args) -> tuple[list[str], list[str]]:
    """Devices to run and devices skipped (with why)."""
    if args.device == "cpu":
        return ["cpu"], []
    gpus = available_gpus()
    if args.device == "gpu":
        if not gpus:
            raise DeviceError("--device gpu: TensorFlow sees no GPU on this machine; use --device cpu or all")
        return ["gpu"], []
    return (["cpu", "gpu"], []) if gpus else (["cpu"], ["gpu (TensorFlow sees no GPU)"])


def sweep_configs(args) -> tuple[configs_mod.Preset, list[RunConfig]]:
    preset = configs_mod.PRESETS[args.preset]
    given = given_knobs(args, SWEEP)
    overrides = {**preset.overrides, **implied(given)}
    if overrides.get("model_handle", "random") != "random" and args.preset == "smoke" and "image_size" not in given:
        overrides["image_size"] = 224  # a real Hub model has a fixed 224 input
    chosen = configs_mod.select(args.configs, preset)
    return preset, [c.replace(**overrides) for c in chosen]


def execute(args) -> int:
    out = Path(args.out)
    if args.resume:
        run_id, path, saved = _resume_target(_own_folder(out) if args.resume == "latest" else out, args.resume)
        out = path.parent  # a resumed run writes only beside the CSV it resumes
        for key, value in saved.items():
            if value is not None and key not in ("out", "resume"):
                setattr(args, key, value)
    # Every mistake is found before anything is written.
    preset, cfgs = sweep_configs(args)
    member = cluster_task(args)
    if member and not member.is_chief and not args.resume:
        out = out / member.folder
    devices, skipped = plan(args)
    check_out_dir(out)
    if not args.resume:
        run_id, path = new_run_path(out)
        (out / f"run-{run_id}.json").write_text(json.dumps(_sweep_args(args), indent=1))
    for s in skipped:
        print(f"bench: skipping device {s}", file=sys.stderr)
    repeats = args.repeats or preset.repeats
    timeout_s = args.timeout or preset.timeout_s
    results = ResultsFile(path, out / "latest.csv")
    # Interrupted rows are re-run on resume; ok and error rows are results and stay.
    results.drop(lambda r: r.get("status") != "interrupted")
    done = {(r["name"], r["device"], int(r["repeat"])) for r in results.rows}
    jobs = [(c.replace(device=d), k) for k in range(repeats) for d in devices for c in cfgs
            if (c.name, d, k) not in done]
    logs = out / "logs" / run_id
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    interactive = sys.stderr.isatty()
    cache = cache_dir()
    figures = out / "figures" / run_id
    common = dict(run_id=run_id, preset=args.preset, git_commit=git_commit(),
                  python_version=platform.python_version(), host_cpu_count=os.cpu_count())
    print(f"bench run {run_id}: {len(jobs)} runs ({len(done)} already done) on {', '.join(devices)}; "
          f"preset {args.preset}; results -> {path}", file=sys.stderr)
    if member:
        role = "the chief: the sweep's results are these" if member.is_chief else \
            f"the chief ({' '.join(map(str, member.chief))}) writes the sweep's results under its --out; these are " \
            "this task's own rows"
        print(f"bench: {member.label} of a multiworker sweep (cluster from {member.source}), {role}; every task "
              "must run the same command", file=sys.stderr)
    bar = tqdm(jobs, desc="sweep", unit="run", disable=not interactive)
    for cfg, k in bar:
        bar.set_postfix_str(f"{cfg.name} on {cfg.device} #{k}")
        stem = f"{cfg.name}-{cfg.device}-r{k}"
        base = {**common, **cfg.to_dict(), "repeat": k,
                "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        try:
            row = run_one(cfg, timeout_s, logs / f"{stem}.log", env, interactive,
                          figures=figures / stem if args.figures else None, cache=cache)
        except KeyboardInterrupt:
            results.add({**base, "status": "interrupted", "error": "Ctrl-C during this configuration"})
            print(f"\nbench: interrupted; {len(results.rows)} rows kept in {path}; "
                  f"continue with: {invoked('bench')} run --resume {path}", file=sys.stderr)
            return INTERRUPTED_EXIT_CODE
        results.add({**base, **row})
        if not interactive:
            print(f"bench: {stem}: {row.get('status')} {row.get('error', '') or ''}".rstrip(), file=sys.stderr)
    bar.close()
    print(summary_table(pd.DataFrame(results.rows)))
    print(f"\nresults: {path} (also {out / 'latest.csv'})")
    return 0 if all(r.get("status") == "ok" for r in results.rows) else RUN_FAILED_EXIT_CODE


def summary_table(df: pd.DataFrame) -> str:
    """The screen table: one row per configuration and device, medians over repeats, speed-up vs naive."""
    from .report import render_console, summarise

    return render_console(summarise(df))


def _sweep_args(args) -> dict:
    """What defines the sweep, saved beside its CSV so that --resume can run the same one."""
    return {k: v for k, v in vars(args).items() if k not in ("func", "command", "resume")}


def cluster_task(args):
    """With --strategy multiworker, this process's task (from TF_CONFIG or SLURM; a one-line error
    without either), else None.

    Every task runs the same sweep in lockstep: each configuration is one cluster run whose
    tasks wait for each other (rendezvous). The chief writes to --out as usual; every other task
    writes its own rows to --out/<job>-<index>, so that on a shared folder nothing is clobbered."""
    if getattr(args, "strategy", None) != "multiworker":
        return None
    from flowers_fast.cluster import find

    return find(resolve=False)


def _own_folder(out: Path) -> Path:
    """Where ``--resume`` alone looks: a non-chief task of a multiworker sweep resumes its own rows."""
    from flowers_fast.cluster import find

    try:
        member = find(resolve=False)
    except UserError:
        return out
    mine = out / member.folder
    return mine if not member.is_chief and mine.is_dir() else out


def _resume_target(out: Path, resume: str) -> tuple[str, Path, dict]:
    """The run to continue: ``--resume`` alone means the newest run under --out."""
    if resume == "latest":
        runs = sorted(out.glob("run-*.json"), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise UserError(f"--resume: no earlier run under {out}; start one with {invoked('bench')} run")
        meta = runs[-1]
    else:
        meta = Path(resume).with_suffix(".json")
        if not meta.exists():
            raise UserError(f"--resume {resume}: no such run (expected {meta} beside the CSV)")
    run_id = meta.stem[len("run-"):]
    return run_id, meta.with_suffix(".csv"), json.loads(meta.read_text())
