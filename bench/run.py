"""``python -m bench run``: every configuration x device x repeat in its own subprocess,
results appended to a CSV that is replaced atomically after each row.

A crash or timeout in one configuration becomes a ``status=error``/``timeout`` row and the
sweep goes on; Ctrl-C (or SIGTERM) marks the running one ``interrupted`` and exits 130 (143);
a SIGKILL leaves only complete rows, and ``--resume`` runs what is missing, with the settings
the run was started with, writing only beside the CSV it resumes.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

try:  # POSIX; elsewhere two sweeps on one run are not prevented
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

import pandas as pd
from tqdm import tqdm

from flowers_fast.clikit import add_knob_flags, given_knobs, positive_int
from flowers_fast.config import SWEEP, RunConfig, from_file, implied
from flowers_fast.download import cache_dir
from flowers_fast.errors import (
    INTERRUPTED_EXIT_CODE,
    RUN_FAILED_EXIT_CODE,
    DataError,
    DeviceError,
    OutputError,
    UserError,
    invoked,
)
from flowers_fast.outputs import Outputs, atomic_open, atomic_write, spreadsheet_safe, spreadsheet_text

from . import configs as configs_mod
from . import machine, tracking
from .results import LEADING, compatible, data_images, data_key, differences, load

# The defaults of bench run's own flags (bench/cli.py); --resume tells given flags from these.
DEFAULTS = dict(device="cpu", preset="quick", configs=None, config=None, repeats=None, timeout=None, figures=False,
                remeasure=False, out="results")


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


STATUSES = ("ok", "skipped", "error", "timeout", "interrupted")
# The columns --resume needs to know which rows are done.
RESUME_COLUMNS = ("name", "device", "repeat", "status")


class ResultsFile:
    """A CSV rewritten whole to a temporary file and renamed after each row: never half a row."""

    def __init__(self, path: Path, latest: Path | None, rows: list[dict] | None = None):
        """``rows``: the rows to start from (bench tune keeps them in its study), instead of the file's."""
        self.path, self.latest = path, latest
        self.rows: list[dict] = list(rows or [])
        self.stale = False  # the file holds rows that are no longer wanted (see drop, read_rows)
        if rows is None and path.exists():
            self.rows, self.stale = read_rows(path)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.flush()

    def drop(self, keep) -> None:
        kept = [r for r in self.rows if keep(r)]
        self.stale = self.stale or len(kept) != len(self.rows)
        self.rows = kept

    def flush(self) -> None:
        frame = pd.DataFrame(self.rows)
        # Every contract column, blank when no row has it yet (e.g. every configuration failed):
        # the file is always a results CSV that report and compare read.
        frame = frame.reindex(columns=list(frame.columns) + [c for c in LEADING if c not in frame.columns])
        columns = list(LEADING) + [c for c in frame.columns if c not in LEADING]
        for target in [self.path] + ([self.latest] if self.latest else []):
            _atomic_csv(frame[columns], target)


def read_rows(path: Path) -> tuple[list[dict], bool]:
    """The finished rows of a run's CSV, as text exactly as written (so rewriting the file changes
    none of them), and whether a row was left out, checked: a DataError naming the file when it is
    not what ``bench run`` writes. A last row cut short (no line break at its end: a copy or edit
    broke off) is not finished: it is left out, said on stderr, and runs again."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text CSV (binary content); pass the run-*.csv that bench run wrote") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not text.strip():
        raise DataError(f"{path}: empty, so not a results CSV written by bench run (it writes whole rows only); "
                        "pass another run, or start a new one")
    try:
        records = list(csv.reader(io.StringIO(text)))
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV ({exc}); pass the run-*.csv that bench run wrote") from None
    header, body = records[0], records[1:]
    missing = [c for c in RESUME_COLUMNS if c not in header]
    if missing:
        raise DataError(f"{path}: not a bench results CSV (missing column{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(missing)})")
    cut = bool(body) and not text.endswith(("\n", "\r"))
    if cut:
        print(f"bench: {path}: its last row is cut short (the file does not end with a line break); that "
              "configuration runs again", file=sys.stderr)
        body = body[:-1]
    rows = []
    for number, values in enumerate(body, start=2):
        if not any(v.strip() for v in values):
            continue  # a blank line
        if len(values) != len(header):
            raise DataError(f"{path}: line {number} has {len(values)} fields, the header {len(header)}; not a CSV "
                            "that bench run wrote (edited?)")
        row = dict(zip(header, map(spreadsheet_text, values)))
        if not row["repeat"].strip().isdigit():
            raise DataError(f"{path}: line {number}: repeat {row['repeat']!r} is not a whole number 0, 1, ...")
        if row["status"] not in STATUSES:
            raise DataError(f"{path}: line {number}: status {row['status']!r} is not one of {', '.join(STATUSES)}")
        if not row["name"].strip() or not row["device"].strip():
            raise DataError(f"{path}: line {number}: blank name or device")
        rows.append(row)
    return rows, cut


def _atomic_csv(frame: pd.DataFrame, target: Path) -> None:
    # Text a spreadsheet would run as a formula (an error message, a folder name) is neutralised;
    # read_rows and bench.results undo it.
    safe = frame.map(spreadsheet_safe)
    try:
        with atomic_open(target, "w", newline="", encoding="utf-8") as f:
            safe.to_csv(f, index=False)
    except OSError as exc:
        raise OutputError(f"{target}: cannot write results ({exc.strerror or exc}); free disk space or pass "
                          "another --out") from None


def atomic_text(target: Path, text: str, flag: str = "--out") -> None:
    """Write ``text`` to ``target`` whole or not at all (a full disk leaves no empty file behind)."""
    try:
        atomic_write(target, text)
    except OSError as exc:
        raise OutputError(f"{target}: cannot write ({exc.strerror or exc}); free disk space or pass another "
                          f"{flag}") from None


def run_files(out: Path, run_id: str) -> list[Path]:
    """Every file a run writes beside its CSV: the CSV, its JSON, the report and the plots."""
    from .plots import plot_names

    stem = f"run-{run_id}"
    return [out / f"{stem}{ext}" for ext in (".csv", ".json", ".md", ".html")] + \
        [out / name for name in plot_names(stem)]


def new_run_path(out: Path) -> tuple[str, Path]:
    """A fresh timestamped file name: a second run never overwrites the first (nor any file that
    has the name of one of its outputs)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_id, k = stamp, 1
    while any(p.exists() or p.is_symlink() for p in run_files(out, run_id)):
        k += 1
        run_id = f"{stamp}-{k}"
    return run_id, out / f"run-{run_id}.csv"


def check_out_dir(out: Path, flag: str = "--out") -> None:
    """Before anything is written: ``out`` is a folder we can write, and what the sweep puts in it
    (``latest.csv``, ``logs/``, ``figures/``) can go there."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as exc:
        raise OutputError(f"{flag} {out}: not writable ({exc.strerror or exc}); pass a folder you can write to") \
            from None
    if (out / "latest.csv").is_dir():
        raise OutputError(f"{flag} {out}: latest.csv there is a folder, where the sweep keeps a copy of the newest "
                          "run; move it away or pass another --out")
    for name in ("logs", "figures"):
        if (out / name).exists() and not (out / name).is_dir():
            raise OutputError(f"{flag} {out}: {name} there is a file, where the sweep keeps its {name}; move it "
                              "away or pass another --out")


def _die_with_parent() -> None:
    """In the worker: if the sweep is SIGKILLed, the kernel kills this worker too (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_one(cfg: RunConfig, timeout_s: float, log_path: Path, env: dict, interactive: bool = False,
            worker: str = "bench.worker", figures: Path | None = None, cache: Path | None = None,
            machine_id: str | None = None, watch=None) -> dict:
    """One configuration in a subprocess; every way it can end becomes a row.

    The worker gets one job document (``bench.worker`` reads it): the configuration, where to
    write its result, whether to draw progress bars, the cache folder, the figures folder, and
    the machine fingerprint its cached per-machine measurements are filed under. Its TMPDIR is
    a folder inside this call's own, so what it leaves there (the tutorial's links, the --cache
    file cache, whose clean-up a kill at --timeout skips) goes when the call ends, however.

    ``watch`` (bench tune): called with the worker's progress after each of its epochs (see
    ``train.RunContext.on_epoch``); a reason it returns stops the worker: a ``pruned`` row."""
    with tempfile.TemporaryDirectory(prefix="bench-", ignore_cleanup_errors=True) as tmp:
        out = Path(tmp) / "result.json"
        job = Path(tmp) / "job.json"
        epochs_file = Path(tmp) / "epochs.json"
        scratch = Path(tmp) / "tmp"
        scratch.mkdir()
        env = {**env, "TMPDIR": str(scratch)}
        job.write_text(json.dumps({"config": cfg.to_dict(), "result": str(out), "progress": interactive,
                                   "cache": str(cache) if cache else None,
                                   "figures": str(figures) if figures else None, "machine_id": machine_id,
                                   "epochs_file": str(epochs_file) if watch else None}))
        cmd = [sys.executable, "-m", worker, str(job)]
        start = time.perf_counter()
        with open(log_path, "w") as log:
            # Its own session: a timeout kills the whole worker tree, not us. On a terminal its
            # progress bars (stderr) show; otherwise everything goes to the log.
            proc = subprocess.Popen(cmd, stdout=log, stderr=None if interactive else log, env=env,
                                    start_new_session=True, preexec_fn=_die_with_parent)
            try:
                code = _wait(proc, timeout_s, watch, epochs_file)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return {"status": "timeout", "error": f"no result within --timeout {timeout_s:.0f} s; killed",
                        "subprocess_s": time.perf_counter() - start}
            except Pruned as stop:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return {"status": "pruned", "error": str(stop), "subprocess_s": time.perf_counter() - start}
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


class Pruned(Exception):
    """``run_one``'s watch stopped the worker (its message says why)."""


def _wait(proc: subprocess.Popen, timeout_s: float, watch, epochs_file: Path) -> int:
    """The worker's exit code; without ``watch`` a plain wait, else polling its epochs file."""
    if watch is None:
        return proc.wait(timeout=timeout_s)
    deadline, seen = time.monotonic() + timeout_s, None
    while True:
        try:
            return proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                raise
        try:
            known = json.loads(epochs_file.read_text())  # written atomically by the worker
        except (OSError, ValueError):
            continue
        if known != seen:
            seen = known
            reason = watch(known)
            if reason:
                raise Pruned(reason)


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


def sweep_jobs(args, preset: configs_mod.Preset, cfgs: list[RunConfig], devices: list[str],
               done: set) -> tuple[list[tuple[RunConfig, int]], list[str]]:
    """(configuration on its device, repeat index) still to run, repeat by repeat so that slow
    drifts of the machine spread over every configuration. ``--repeats`` applies to all; the
    preset's default gives model-only probes their own count, and with ``breakdown_once`` the
    per-stage breakdown (input-only, model-only, FLOP utilisation) runs in the first repeat only.
    Also returns why configurations that cannot run on a device (e.g. featcache-ov on a GPU:
    OpenVINO is CPU-only here) are left out."""
    given = given_knobs(args, SWEEP)
    jobs, not_here = [], {}
    for k in range(max(args.repeats or 0, preset.repeats, preset.probe_repeats or 0)):
        for d in devices:
            for c in cfgs:
                if k >= (args.repeats or preset.repeats_of(c)) or (c.name, d, k) in done:
                    continue
                try:
                    cfg = c.replace(device=d)
                except UserError as exc:
                    not_here[(c.name, d)] = f"{c.name} on {d}: {exc}"
                    continue
                if k > 0 and preset.breakdown_once and "breakdown" not in given and c.pipeline != "modelonly":
                    cfg = cfg.replace(breakdown=False)
                jobs.append((cfg, k))
    return jobs, list(not_here.values())


def job_overrides(args, preset: configs_mod.Preset) -> dict:
    """The knobs a sweep sets for every configuration: the preset's, then the flags given."""
    given = given_knobs(args, SWEEP)
    overrides = {**preset.overrides, **implied(given)}
    if overrides.get("model_handle", "random") != "random" and args.preset == "smoke" and "image_size" not in given:
        overrides["image_size"] = 224  # a real Hub model has a fixed 224 input
    return overrides


def sweep_configs(args) -> tuple[configs_mod.Preset, list[RunConfig]]:
    preset = configs_mod.PRESETS[args.preset]
    given = given_knobs(args, SWEEP)
    overrides = job_overrides(args, preset)
    chosen = [] if getattr(args, "config", None) and args.configs is None else configs_mod.select(args.configs, preset)
    cfgs = [c.replace(**overrides) for c in chosen]
    if getattr(args, "config", None):
        # The file's configuration on top of the preset's job; flags given override both.
        cfg = from_file(args.config, given, under={**preset.overrides, "name": Path(args.config).stem})
        if cfg.name in {c.name for c in cfgs}:
            raise UserError(f"--config {args.config}: its configuration is named {cfg.name!r}, like one of --configs; "
                            "rename it (its \"name\" key) or drop that name from --configs")
        cfgs.append(cfg)
    return preset, cfgs


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="run configurations side by side and write a CSV under --out")
    g = p.add_argument_group("the sweep")
    g.add_argument("--device", choices=("cpu", "gpu", "all"), default=DEFAULTS["device"], help="(default: cpu)")
    g.add_argument("--preset", choices=tuple(configs_mod.PRESETS), default=DEFAULTS["preset"], help="(default: quick)")
    g.add_argument("--configs", metavar="NAME,...", help="configurations to run (default: the preset's); "
                                                         f"see {invoked('bench')} list")
    g.add_argument("--config", metavar="FILE", help="also run the configuration in this JSON file (such as bench "
                   "tune's best.json), on the preset's job; alone, only it runs; the knob flags override it")
    g.add_argument("--repeats", type=positive_int, help="runs of each configuration (default: the preset's)")
    g.add_argument("--timeout", type=positive_int, metavar="S", help="seconds per configuration (default: the "
                                                                     "preset's)")
    g.add_argument("--figures", action="store_true", help="write confusion matrices and prediction grids")
    g.add_argument("--remeasure", action="store_true",
                   help="measure this machine's matmul peak and the model's FLOPs again instead of reusing the "
                        "values cached for this machine and TensorFlow version")
    g.add_argument("--out", default=DEFAULTS["out"], metavar="DIR", help="where results go (default: results)")
    g.add_argument("--resume", nargs="?", const="latest", metavar="RUN_CSV",
                   help="continue the newest (or the given) run: skip rows already there")
    tracking.add_flags(g)
    # Every knob a sweep may override, e.g. --epochs, --num-images, --model-handle.
    add_knob_flags(p, SWEEP)
    p.set_defaults(func=execute)
    return p


@contextmanager
def run_lock(meta: Path):
    """One sweep per run at a time: a second one (say, --resume while the first still runs) would
    interleave rows with it and drop some. The lock is on the run's JSON and goes with the process."""
    with open(meta, "rb") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"--resume {meta.with_suffix('.csv')}: another bench run is still writing this run; "
                                "wait for it, or stop it first") from None
        yield


def execute(args) -> int:
    out = Path(args.out)
    meta = None
    if args.resume:
        run_id, path, meta = _resume_target(_own_folder(out) if args.resume == "latest" else out, args.resume)
        if args.out != DEFAULTS["out"] and args.resume != "latest" and Path(args.out).resolve() != path.parent.resolve():
            raise UserError(f"--out {args.out} and --resume {args.resume} disagree: a resumed run writes only beside "
                            "the CSV it resumes; drop --out")
        out = path.parent  # a resumed run writes only beside the CSV it resumes
        _apply_saved(args, _saved_settings(meta), meta)
    # Every mistake is found before anything is written.
    try:
        preset, cfgs = sweep_configs(args)
    except UserError as exc:
        if meta is None:
            raise
        raise DataError(f"{meta}: the run's saved settings are not valid now ({exc}); start a new run") from None
    member = cluster_task(args)
    if member and not member.is_chief and not args.resume:
        out = out / member.folder
    devices, skipped = plan(args)
    with Outputs() as outputs:  # a folder made for --out goes again if the run fails before writing to it
        outputs.mkdirs(out, "--out")
        check_out_dir(out)
        args.tracking = tracking.check_flags(args, out)  # --profile, --tensorboard, --mlflow: before any work
        cache = cache_dir()
        if meta is None:
            run_id, path = new_run_path(out)
            meta = out / f"run-{run_id}.json"
            atomic_text(meta, json.dumps(_sweep_args(args), indent=1))
    args.run_csv = path  # for sweep(), which returns it (saved settings were written above, without it)
    with run_lock(meta):
        return _sweep(args, preset, cfgs, devices, skipped, out, run_id, path, cache, member)


def _sweep(args, preset, cfgs, devices, skipped, out, run_id, path, cache, member=None) -> int:
    for s in skipped:
        print(f"bench: skipping device {s}", file=sys.stderr)
    timeout_s = args.timeout or preset.timeout_s
    results = ResultsFile(path, out / "latest.csv")
    check_same_data(results.rows, cfgs, path)
    # Interrupted rows are re-run on resume; ok and error rows are results and stay.
    results.drop(lambda r: r.get("status") != "interrupted")
    if results.stale:
        results.flush()  # rows left out (interrupted, cut short) go from the file now, not at the next row
    done = {(r["name"], r["device"], int(r["repeat"])) for r in results.rows}
    jobs, not_here = sweep_jobs(args, preset, cfgs, devices, done)
    for message in not_here:
        print(f"bench: skipping {message}", file=sys.stderr)
    logs = out / "logs" / run_id
    figures = out / "figures" / run_id
    try:
        logs.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--out {out}: cannot create {logs} ({exc.strerror or exc}); free disk space or pass "
                          "another --out") from None
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    interactive = sys.stderr.isatty()
    facts = machine.host_facts()
    if args.remeasure:
        machine.Measured(cache, facts["machine_id"], facts["tensorflow_version"]).forget()
    common = provenance(run_id, args.preset, facts)
    print(f"bench run {run_id}: {len(jobs)} runs ({len(done)} already done) on {', '.join(devices)}; "
          f"preset {args.preset}; results -> {path}", file=sys.stderr)
    if member:
        role = "the chief: the sweep's results are these" if member.is_chief else \
            f"the chief ({' '.join(map(str, member.chief))}) writes the sweep's results under its --out; these are " \
            "this task's own rows"
        print(f"bench: {member.label} of a multiworker sweep (cluster from {member.source}), {role}; every task "
              "must run the same command", file=sys.stderr)
    bar = tqdm(jobs, desc="sweep", unit="run", disable=not interactive)
    base = None
    try:
        for cfg, k in bar:
            bar.set_postfix_str(f"{cfg.name} on {cfg.device} #{k}")
            stem = f"{cfg.name}-{cfg.device}-r{k}"
            if cfg.profile:  # each row's trace in a folder of its own, named like its TensorBoard run
                cfg = cfg.replace(profile=str(Path(cfg.profile) / tracking.sweep_folder(run_id, facts["machine_id"])
                                              / stem))
            base = {**common, **cfg.to_dict(), "repeat": k, "repeats": args.repeats or preset.repeats_of(cfg),
                    "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            row = run_one(cfg, timeout_s, logs / f"{stem}.log", env, interactive,
                          figures=figures / stem if args.figures else None, cache=cache,
                          machine_id=facts["machine_id"])
            results.add({**base, **row})
            base = None
            if not interactive:
                print(f"bench: {stem}: {row.get('status')} {row.get('error', '') or ''}".rstrip(), file=sys.stderr)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (flowers_fast.errors.Terminated)
        how = "stopped by SIGTERM" if hasattr(exc, "exit_code") else "interrupted"
        if base is not None:
            results.add({**base, "status": "interrupted", "error": f"{how} during this configuration"})
        kept = sum(r.get("status") != "interrupted" for r in results.rows)
        print(f"\nbench: {how}; {kept} finished row{'' if kept == 1 else 's'} kept in {path}; continue with: "
              f"{invoked('bench')} run --resume {shlex.quote(str(path.resolve()))}", file=sys.stderr)
        return getattr(exc, "exit_code", INTERRUPTED_EXIT_CODE)
    bar.close()
    if results.rows:
        print(summary_table(pd.DataFrame(results.rows)))
    print(f"\nresults: {path} (also {out / 'latest.csv'})")
    from .report import write_reports

    # The report beside the CSV: Markdown, plots, one self-contained HTML file.
    written = write_reports([path], markdown=path.with_suffix(".md"), html=path.with_suffix(".html"),
                            plot_dir=path.parent, stem=path.stem)
    print("report: " + ", ".join(str(p) for p in written))
    # Copies for TensorBoard and MLflow, from the CSV just written (the chief's rows only).
    tracked = 0 if member and not member.is_chief else \
        tracking.export(load([path]), *getattr(args, "tracking", (None, None)), artifacts=written)
    # A skipped row (the hardware lacks what a configuration needs, e.g. bf16) is a result, not a failure.
    return tracked if all(r.get("status") in ("ok", "skipped") for r in results.rows) else RUN_FAILED_EXIT_CODE


def provenance(run_id: str, preset: str, facts: dict) -> dict:
    """What every row of a run says about where and from what it was measured."""
    return dict(run_id=run_id, preset=preset, git_commit=git_commit(), python_version=platform.python_version(),
                host_cpu_count=os.cpu_count(), **facts)


def data_now(cfg: RunConfig) -> tuple[str, ...]:
    """The data key (bench.results.DATA) a row of ``cfg`` would have if it ran now, as far as it
    can be known without TensorFlow: a --data-dir's images and file list, the weights a local
    handle shows. Cached sets (synthetic, download) follow from the saved settings alone."""
    from flowers_fast import data
    from flowers_fast.config import RANDOM_HANDLE, weights_label

    count = files = ""
    if cfg.data_dir:
        found = data.discover(cfg.data_dir, kind=cfg.dataset)
        count, files = str(len(found)), data.fingerprint(found)
    handle = cfg.model_handle
    local = Path(handle).expanduser().exists() and "://" not in handle
    weights = "random" if handle == RANDOM_HANDLE else weights_label(handle) if "://" in handle or local else ""
    return data_key({"dataset": cfg.dataset, "data_dir": cfg.data_dir or "", "data_images": count,
                     "data_fingerprint": files, "weights": weights, "model_handle": handle})


def check_same_data(rows: list[dict], cfgs: list[RunConfig], path: Path) -> None:
    """--resume: the finished rows were measured on the data and weights the rest of the run would
    use now, else a DataError: rows on a --data-dir that has changed since (images added or
    removed) would be medians and table rows of one run with the others."""
    if not rows:
        return
    frame = pd.DataFrame(rows)
    frame["data_images"] = data_images(frame)
    now = {}
    for cfg in cfgs:
        now.setdefault((cfg.dataset, cfg.data_dir, cfg.model_handle), data_now(cfg))
    for key in dict.fromkeys(data_key(r) for _, r in frame.iterrows()):
        for current in dict.fromkeys(now.values()):
            if not compatible(key, current):
                raise DataError(f"--resume {path}: the data or weights changed since its rows were measured "
                                f"({'; '.join(differences(key, current))}, then vs now): resuming would mix rows on "
                                "different data in one run; start a new run (the same command without --resume)")


def summary_table(df: pd.DataFrame) -> str:
    """The screen table: one row per configuration and device, medians over repeats, speed-up vs naive."""
    from .report import render_console, summarise

    return render_console(summarise(df))


def _sweep_args(args) -> dict:
    """What defines the sweep, saved beside its CSV so that --resume can run the same one."""
    return {k: v for k, v in vars(args).items() if k not in ("func", "command", "resume", "tracking")
            and k not in tracking.OUTPUT_FLAGS}


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


def _resume_target(out: Path, resume: str) -> tuple[str, Path, Path]:
    """(run id, CSV, JSON) of the run to continue: ``--resume`` alone means the newest run under --out."""
    if resume == "latest":
        runs = sorted(out.glob("run-*.json"), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise UserError(f"--resume: no earlier run under {out}; start one with {invoked('bench')} run")
        meta = runs[-1]
    else:
        given = Path(resume)
        if given.name == "latest.csv":
            raise UserError(f"--resume {resume}: latest.csv is a copy of the newest run; pass --resume alone (with "
                            "--out for its folder), or the run-*.csv it copies")
        if given.is_dir():
            raise UserError(f"--resume {resume}: a folder; pass a run-*.csv in it, or --resume alone with --out "
                            f"{resume} for its newest run")
        meta = given.with_suffix(".json")
        if not meta.is_file():
            raise UserError(f"--resume {resume}: no such run (expected {meta} beside the CSV); pass a run-*.csv "
                            "that bench run wrote")
    run_id = meta.stem[len("run-"):] if meta.stem.startswith("run-") else meta.stem
    return run_id, meta.with_suffix(".csv"), meta


def _saved_settings(meta: Path) -> dict:
    """The sweep's settings saved in ``meta`` (run-*.json), checked: a DataError naming the file."""
    def bad(why: str) -> DataError:
        return DataError(f"{meta}: {why}; it is not a run file that bench run wrote (pass another run with "
                         "--resume RUN_CSV, or start a new run)")

    try:
        saved = json.loads(meta.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise bad("binary content") from None
    except json.JSONDecodeError as exc:
        raise bad("empty" if not exc.doc.strip() else f"not valid JSON ({exc.msg} at character {exc.pos})") from None
    except OSError as exc:
        raise DataError(f"{meta}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(saved, dict):
        raise bad("not a JSON object")
    checks = {"device": lambda v: v in ("cpu", "gpu", "all"), "preset": lambda v: v in configs_mod.PRESETS,
              "configs": lambda v: v is None or isinstance(v, str), "config": lambda v: v is None or isinstance(v, str),
              "repeats": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
              "timeout": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
              "figures": lambda v: isinstance(v, bool), "remeasure": lambda v: isinstance(v, bool)}
    for key, ok in checks.items():
        if key in saved and not ok(saved[key]):
            raise bad(f"{key} {saved[key]!r} is not a valid value")
    knob_names = set(RunConfig.field_names())
    unknown = [k for k in saved if k not in checks and k not in knob_names and k != "out"]
    if unknown:
        raise bad(f"unknown setting {unknown[0]!r}")
    return saved


def _apply_saved(args, saved: dict, meta: Path) -> None:
    """Continue the run as it was started: its saved settings replace the flags' defaults, and a
    flag given now that disagrees with them is a usage error (it would be silently ignored)."""
    for key, value in vars(args).copy().items():
        if key in ("func", "command", "resume", "out", "tracking") or key in tracking.OUTPUT_FLAGS:
            continue
        given = value != DEFAULTS.get(key) if key in DEFAULTS else True  # knob flags appear only when given
        if given and saved.get(key, DEFAULTS.get(key)) != value:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"--resume: {flag} {value} differs from the run being resumed ({meta.name}: "
                            f"{saved.get(key, 'not set')}); a resumed run keeps its settings, so drop {flag} or "
                            "start a new run")
    for key, value in saved.items():
        if key != "out":
            setattr(args, key, value)


# --- the same sweep from Python (a notebook) -------------------------------------------------

class SweepResult:
    """What ``sweep`` returns: the run's CSV, the exit code ``bench run`` would have ended with
    (0, or 9 when a row failed), and what it printed when ``quiet``."""

    def __init__(self, csv_path: Path, exit_code: int, output: str = ""):
        self.csv, self.exit_code, self.output = csv_path, exit_code, output

    def rows(self) -> pd.DataFrame:
        """The run's rows as ``bench report`` reads them (``bench.results.load``: units normalised, ``acc_pct``)."""
        from .results import load

        return load([self.csv])

    def plot(self, kind: str = "time") -> Path:
        """The PNG that ``bench run`` wrote beside the CSV: ``time``, ``accuracy`` or ``stages``."""
        return self.csv.with_name(f"{self.csv.stem}-{kind}.png")

    def __repr__(self) -> str:
        return f"SweepResult(csv={str(self.csv)!r}, exit_code={self.exit_code})"


def sweep(configs=None, preset: str = "quick", out: str | Path = DEFAULTS["out"], device: str = "cpu",
          repeats: int | None = None, timeout: int | None = None, figures: bool = False, remeasure: bool = False,
          quiet: bool = False, **knobs) -> SweepResult:
    """``python -m bench run`` from Python: the namespace the CLI's parser builds, with these values,
    through the same ``execute`` (each configuration x repeat in its own subprocess, the CSV, the
    report and plots beside it). ``configs``: names, as a list or "a,b"; ``knobs``: the sweep-wide
    overrides ``bench run`` has flags for (``epochs=2``, ``num_images=100``, ``model_handle=...``).
    Raises UserError subclasses as the CLI reports them; ``quiet`` keeps its printing in
    ``result.output``."""
    import contextlib

    from flowers_fast.clikit import OneLineParser
    from flowers_fast.config import knobs as declared

    parser = OneLineParser(prog="bench")
    args = add_parser(parser.add_subparsers(dest="command")).parse_args([])
    allowed = {f.name for f in declared(SWEEP)}
    for name in knobs:
        if name not in allowed:
            raise UserError(f"sweep: {name!r} is not a setting bench run can override for a sweep; "
                            f"one of {', '.join(sorted(allowed))}")
    if configs is not None and not isinstance(configs, str):
        configs = ",".join(configs)
    # What argparse checks on the command line.
    if preset not in configs_mod.PRESETS:
        raise UserError(f"sweep: preset {preset!r} is not one of {', '.join(configs_mod.PRESETS)}")
    if device not in ("cpu", "gpu", "all"):
        raise UserError(f"sweep: device {device!r} is not one of cpu, gpu, all")
    for name, value in (("repeats", repeats), ("timeout", timeout)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UserError(f"sweep: {name} must be a positive integer, got {value!r}")
    vars(args).update(command="run", configs=configs, preset=preset, out=str(out), device=device,
                      repeats=repeats, timeout=timeout, figures=figures, remeasure=remeasure, **knobs)
    buffer = io.StringIO()
    with contextlib.ExitStack() as stack:
        if quiet:
            stack.enter_context(contextlib.redirect_stdout(buffer))
            stack.enter_context(contextlib.redirect_stderr(buffer))
        code = execute(args)
    return SweepResult(Path(args.run_csv), code, buffer.getvalue())
