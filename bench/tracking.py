"""A sweep's rows where TensorFlow users look for them: TensorBoard (``--tensorboard DIR``: one
HParams run per configuration and repeat, epoch curves as scalars) and MLflow (``--mlflow [URI]``:
one MLflow run per row). ``bench run`` writes both after its report; ``bench report CSV...`` writes
them for existing CSVs. Both read rows through ``bench.results.load``, so a CSV written before these
columns existed exports too.

Machine and run identity travel with every run (in its folder or run name, and as hparams or tags),
so two machines' runs never look like repeats of one another. Every destination is checked before
the sweep starts (``check_tensorboard``, ``mlflow_target``); a tracking server that cannot be reached
at the end is reported once, and the sweep's own files are written already.
"""

from __future__ import annotations

import math
import os
import re
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from flowers_fast.config import RunConfig
from flowers_fast.errors import OutputError, UserError, invoked, one_line

from .results import METRICS

# Figures shown in TensorBoard's HParams table and parallel-coordinates view, first those the
# issue asks for, then every other metric a row has (bench.results.METRICS).
HEADLINE = ("total_s", "test_accuracy", "train_img_s", "peak_rss_mb")
# Who and where a row is: always hparams (TensorBoard) and tags (MLflow), whether or not they differ.
IDENTITY = ("name", "device", "repeat", "run_id", "machine_id", "cpu_brand", "dataset", "weights", "status")
# Knobs that never make a configuration different (where its trace went).
NOT_HPARAMS = ("profile",)
# Per-epoch columns (space-separated values) -> scalar tags.
CURVES = {"epoch_times_s": "epoch/time_s", "epoch_loss": "epoch/loss", "epoch_accuracy": "epoch/accuracy"}
EXPERIMENT = "flowers_fast"
MLFLOW_STATUS = {"ok": "FINISHED", "skipped": "FINISHED", "interrupted": "KILLED"}  # else FAILED
_URI = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<rest>.*)$", re.I)


# --- names ---------------------------------------------------------------------------------

def sweep_folder(run_id, machine_id) -> str:
    """A sweep's folder name: its run id and machine (the same run id on two machines stays two folders)."""
    return f"{_safe(run_id)}-{_safe(machine_id)}" if str(machine_id or "").strip() else _safe(run_id)


def row_name(row) -> str:
    """``<config>-<device>-r<repeat>``: the name bench run gives a row's log, figures and trace."""
    return f"{_safe(row.get('name'))}-{_safe(row.get('device'))}-r{_int(row.get('repeat'))}"


def _safe(value) -> str:
    text = "" if _missing(value) else str(value)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "unknown"


def _int(value) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return 0


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and
                                                                                 not value.strip())


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _curve(value) -> list[float]:
    if _missing(value):
        return []
    values = [_number(v) for v in str(value).split()]
    return [v for v in values if v is not None]


def _epoch_ms(value) -> int | None:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(str(value)).timestamp() * 1000)
    except ValueError:
        return None


def _plain(value):
    """A CSV cell as an hparam/param value: bool, int, float or text."""
    if isinstance(value, str) and value in ("True", "False"):
        return value == "True"
    if isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else value  # a whole-number column read as float (blanks in it)
    return str(value)


def _records(df: pd.DataFrame) -> list[dict]:
    return [{k: v for k, v in row.items() if not _missing(v)} for row in df.to_dict("records")]


def varying_knobs(rows: list[dict]) -> list[str]:
    """The knobs whose values differ across ``rows``: what tells their configurations apart."""
    out = []
    for name in RunConfig.field_names():
        if name in NOT_HPARAMS or name in IDENTITY:
            continue
        if len({str(r.get(name, "")) for r in rows}) > 1:
            out.append(name)
    return out


def figures(row: dict) -> dict[str, float]:
    """The row's finite metrics, headline figures first."""
    names = list(HEADLINE) + [m for m in METRICS if m not in HEADLINE]
    return {m: v for m in names if (v := _number(row.get(m))) is not None}


# --- TensorBoard ---------------------------------------------------------------------------

def check_tensorboard(path, flag: str = "--tensorboard") -> Path:
    """Before the sweep: ``path`` is a folder that can be written, and TensorBoard is installed."""
    _need("tensorboard", flag, "tensorboard")
    from flowers_fast.profiling import check_dir

    return check_dir(path, flag)


def write_tensorboard(df: pd.DataFrame, logdir) -> list[Path]:
    """One TensorBoard run per row under ``logdir/<run_id>-<machine_id>/<config>-<device>-r<repeat>``:
    its hparams (identity and the knobs that differ across ``df``), its figures as scalars at step 0
    (the HParams dashboard's metrics) and its epoch curves as scalars by epoch. Returns the run folders."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow only writes files here: not its CUDA probe's error
    from tensorboard.plugins.hparams import api as hp

    from flowers_fast.tfkeras import tf

    rows = _records(df)
    varying = varying_knobs(rows)
    written = []
    for row in rows:
        folder = Path(logdir) / sweep_folder(row.get("run_id"), row.get("machine_id")) / row_name(row)
        hparams = {k: _plain(row[k]) for k in IDENTITY + tuple(varying) if k in row}
        hparams["repeat"] = _int(row.get("repeat"))
        trial = f"{sweep_folder(row.get('run_id'), row.get('machine_id'))}/{row_name(row)}"  # unique: never pooled
        try:
            writer = tf.summary.create_file_writer(str(folder))
            with writer.as_default():
                hp.hparams(hparams, trial_id=trial)
                for name, value in figures(row).items():
                    tf.summary.scalar(name, value, step=0)
                for column, tag in CURVES.items():
                    for epoch, value in enumerate(_curve(row.get(column)), start=1):
                        tf.summary.scalar(tag, value, step=epoch)
                if row.get("error"):
                    tf.summary.text("error", str(row["error"]), step=0)
            writer.close()
        except (OSError, tf.errors.OpError) as exc:
            raise OutputError(f"--tensorboard {logdir}: cannot write {folder} ({one_line(getattr(exc, 'message', exc))}"
                              "); free disk space or pass another folder") from None
        written.append(folder)
    return written


# --- MLflow --------------------------------------------------------------------------------

@dataclass(frozen=True)
class MlflowTarget:
    uri: str  # the tracking URI handed to MlflowClient
    artifacts: str | None  # where a new experiment keeps artifacts (local stores only; a server decides its own)
    server: bool

    def __str__(self) -> str:
        return self.uri


def mlflow_target(given: str | None, out: Path, flag: str = "--mlflow") -> MlflowTarget:
    """What ``--mlflow [URI]`` means, checked before the sweep: no URI is a local SQLite store in
    ``out`` (``out/mlflow.db``, artifacts in ``out/mlartifacts``: no server needed; MLflow 3 refuses
    its old file store unless told); ``http(s)://HOST[:PORT]`` a tracking server; ``sqlite:///PATH``
    another local database; ``file:PATH`` (or a plain folder) MLflow's file store."""
    _need("mlflow", flag, "mlflow")
    if given is None or given == "":
        return _local_db(Path(out) / "mlflow.db", flag)
    m = _URI.match(given)
    if m and m["scheme"].lower() in ("http", "https"):
        host = re.match(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:(\d{1,5}))?(/.*)?$", m["rest"])
        if not host or (host[3] and not 1 <= int(host[3]) <= 65535):
            raise UserError(f"{flag} {given}: not a tracking server address; expected e.g. http://127.0.0.1:5000 "
                            f"(start one with: mlflow server --host 127.0.0.1 --port 5000)")
        return MlflowTarget(given.rstrip("/"), None, True)
    if m and m["scheme"].lower() == "sqlite":
        if not m["rest"].startswith("/") or len(m["rest"]) < 2:
            raise UserError(f"{flag} {given}: expected sqlite:///PATH/mlflow.db (three slashes, then the file)")
        return _local_db(Path(m["rest"][1:]), flag)  # sqlite:///rel.db, sqlite:////abs.db (SQLAlchemy's form)
    if given.lower().endswith(".csv"):  # bench report --mlflow a.csv: argparse took the CSV as the URI
        raise UserError(f"{flag} {given}: a CSV, not a tracking URI; put the CSVs before {flag}, or give {flag} "
                        "its URI")
    if re.match(r"^[A-Za-z0-9.-]+:\d{1,5}$", given):
        raise UserError(f"{flag} {given}: a server address needs its scheme; pass http://{given}")
    if given.startswith("file:") or not m:
        folder = Path(urllib.parse.urlparse(given).path if given.startswith("file:") else given).expanduser()
        _writable(folder, given, flag)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store only on request
        return MlflowTarget(folder.resolve().as_uri(), None, False)
    raise UserError(f"{flag} {given}: not a tracking URI this harness writes to; pass http(s)://HOST:PORT (a server), "
                    "sqlite:///PATH (a local database), a folder (a file store), or nothing (out/mlflow.db)")


def _local_db(path: Path, flag: str) -> MlflowTarget:
    path = path.expanduser()
    if path.is_dir():
        raise OutputError(f"{flag} {path}: a folder, where the MLflow database file goes; pass sqlite:///FILE.db")
    _writable(path.parent, str(path), flag)
    artifacts = path.parent.resolve() / "mlartifacts"
    return MlflowTarget(f"sqlite:///{path.resolve()}", artifacts.as_uri(), False)


def _writable(folder: Path, given: str, flag: str) -> None:
    from flowers_fast.outputs import Outputs

    try:
        Outputs().folder(folder, flag)
    except OutputError as exc:
        raise OutputError(str(exc).replace(f"{flag} {folder}:", f"{flag} {given}:", 1)) from None


def _need(module: str, flag: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(f"{flag}: the {module} package is not installed; pip install 'flowers_fast[{extra}]'")


def log_mlflow(df: pd.DataFrame, target: MlflowTarget, artifacts=(), experiment: str = EXPERIMENT) -> tuple[int, int]:
    """One MLflow run per row in ``experiment``: params = the knobs, metrics = the figures (epoch
    curves by step), tags = identity, machine, git commit, data, weights, status and reason;
    artifacts = ``artifacts`` (the report, plots) and the row's worker log (``logs/<run_id>/`` beside its CSV).
    A row logged before (same machine, run and name) is not logged again. Returns (logged, already there).
    Raises MlflowUnreachable when the store cannot be reached or written."""
    for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")):
        os.environ.setdefault(name, value)  # an unreachable server: one quick failure, not minutes of retries
    try:
        return _log_mlflow(_records(df), target, [Path(a) for a in artifacts], experiment)
    except Exception as exc:  # noqa: BLE001 - MLflow, requests, SQLAlchemy and OS errors alike
        if isinstance(exc, UserError):
            raise
        first = one_line(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)[:300]
        raise MlflowUnreachable(f"--mlflow {target}: cannot log to it ({type(exc).__name__}: {first})") from None


class MlflowUnreachable(OutputError):
    """The tracking store failed at the end of a sweep: reported once; the sweep's files are written."""


def _log_mlflow(rows, target, artifacts, experiment) -> tuple[int, int]:
    import time

    import logging

    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its INFO lines (a new database's set-up)

    client = MlflowClient(tracking_uri=target.uri)
    found = client.get_experiment_by_name(experiment)
    exp_id = found.experiment_id if found else client.create_experiment(experiment, artifact_location=target.artifacts)
    knobs = set(RunConfig.field_names())
    logged = already = 0
    for row in rows:
        key = f"{row.get('machine_id', '')}/{row.get('run_id', '')}/{row_name(row)}"
        if client.search_runs([exp_id], filter_string=f"tags.`flowers_fast.row` = '{key}'", max_results=1):
            already += 1
            continue
        tags = {k: str(row[k]) for k in IDENTITY + ("preset", "git_commit", "data_dir", "model_handle", "handle",
                                                    "tf_version", "device_name", "cpu_vendor", "os") if k in row}
        tags.update({"flowers_fast.row": key, "reason": str(row.get("error", "")),
                     "mlflow.source.git.commit": str(row.get("git_commit", "")), "mlflow.runName": row_name(row)})
        if "profile_trace" in row:
            tags["profile_trace"] = str(row["profile_trace"])
        # The run's times are the configuration's (started at its timestamp, as long as its worker ran),
        # not those of this export.
        start = _epoch_ms(row.get("timestamp")) or int(time.time() * 1000)
        stamp = start + int(1000 * (_number(row.get("subprocess_s")) or 0.0))
        run = client.create_run(exp_id, start_time=start, run_name=row_name(row), tags=tags)
        run_id = run.info.run_id
        params = [Param(k, str(_plain(row[k]))[:6000]) for k in sorted(knobs) if k in row]
        metrics = [Metric(k, v, stamp, 0) for k, v in figures(row).items()]
        for column, tag in CURVES.items():
            metrics += [Metric(tag.replace("/", "_"), v, stamp, e) for e, v in enumerate(_curve(row.get(column)), 1)]
        client.log_batch(run_id, metrics=metrics, params=params, tags=[RunTag("repeat", str(_int(row.get("repeat"))))])
        for path in artifacts:
            if path.is_file():
                client.log_artifact(run_id, str(path), "report")
        log = Path(str(row.get("source", ""))).parent / "logs" / str(row.get("run_id", "")) / f"{row_name(row)}.log"
        if row.get("source") and log.is_file():
            client.log_artifact(run_id, str(log), "log")
        client.set_terminated(run_id, MLFLOW_STATUS.get(str(row.get("status", "")), "FAILED"), end_time=stamp)
        logged += 1
    return logged, already


def export(df: pd.DataFrame, tensorboard=None, mlflow: MlflowTarget | None = None, artifacts=()) -> int:
    """What ``bench run``/``bench report`` call after writing their own files: the TensorBoard runs and
    the MLflow runs, each said on stdout. Returns 0, or OutputError's exit code when the tracking
    store could not be reached (said once on stderr, with how to log the rows later)."""
    if tensorboard is not None:
        written = write_tensorboard(df, tensorboard)
        print(f"tensorboard: {len(written)} runs in {tensorboard} (view: tensorboard --logdir {tensorboard})")
    if mlflow is not None:
        try:
            logged, already = log_mlflow(df, mlflow, artifacts)
        except MlflowUnreachable as exc:
            sources = sorted({str(s) for s in df.get("source", pd.Series(dtype=str)) if s}) or ["the CSV"]
            print(f"bench: {exc}; the results are written ({', '.join(sources)}); log them later with: "
                  f"{invoked('bench')} report {' '.join(sources)} --mlflow {mlflow}", file=sys.stderr)
            return MlflowUnreachable.exit_code
        view = f"mlflow ui --backend-store-uri {mlflow.uri}" if not mlflow.server else mlflow.uri
        print(f"mlflow: {logged} runs logged to experiment {EXPERIMENT}"
              + (f" ({already} logged before)" if already else "") + f" (view: {view})")
    return 0


# --- the flags -----------------------------------------------------------------------------

# bench run's flags that name where results are copied, not what the sweep is: not saved with the
# run, so a --resume may add or change them.
OUTPUT_FLAGS = ("tensorboard", "mlflow")


def add_flags(group) -> None:
    """``--tensorboard DIR`` and ``--mlflow [URI]`` (bench run, bench report)."""
    group.add_argument("--tensorboard", metavar="DIR",
                       help="also write one TensorBoard HParams run per configuration and repeat (figures, epoch "
                            "curves) under DIR/<run>-<machine>/; view with: tensorboard --logdir DIR "
                            "(pip install 'flowers_fast[tensorboard]')")
    group.add_argument("--mlflow", nargs="?", const="", metavar="URI",
                       help="also log one MLflow run per row: to URI (http://HOST:PORT, sqlite:///FILE, a folder), "
                            "or without URI to a local database beside the results (mlflow.db); "
                            "pip install 'flowers_fast[mlflow]'")


def check_flags(args, out: Path) -> tuple[Path | None, MlflowTarget | None]:
    """Every destination of ``args`` checked before any long work: ``--profile`` (a knob),
    ``--tensorboard`` and ``--mlflow`` (the local store's default is in ``out``)."""
    if getattr(args, "profile", None):
        from flowers_fast.profiling import check_dir

        check_dir(args.profile)
    tb = check_tensorboard(args.tensorboard) if getattr(args, "tensorboard", None) else None
    given = getattr(args, "mlflow", None)
    return tb, mlflow_target(given, out) if given is not None else None
