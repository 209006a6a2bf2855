"""``python -m bench tune``: the fastest configuration for this job on this machine, found by a
search within a wall-time budget, under ``bench recommend``'s accuracy tolerance.

The search space is read from the knob declarations (``knob(..., tune=values, tune_when=...)`` in
flowers_fast/config.py): a knob joins the search by its declaration alone. Knobs are suggested in
declaration order; one whose ``tune_when`` is not met keeps its value, and values the
configuration's own checks refuse with what was chosen so far are never offered (a knob with
fewer valid values is suggested under a name of its own, e.g. ``precision[fp32|mixed]``: Optuna's
way to handle a space that depends on earlier choices).

Why Optuna: its define-by-run trials suggest one knob after another, so conditional spaces
(engine only for featcache, calibration only for int8) need no flattening, and its TPE sampler
models categorical choices and conditional parameters; ``enqueue_trial`` runs known
configurations first (the harness's default and the preset's named configurations, whose results
then seed the model and give the gains from the same run); the ask-and-tell interface fits a
trial that is a separate worker process; a pruner stops slow trials through ``report`` and
``should_prune``; and its RDB storage (SQLite in the run's folder) keeps every finished trial, so
``--resume`` continues an interrupted search.

Each trial is one ``bench run`` worker (``run.run_one``) and one CSV row (bench run's columns plus
``trial``, ``state``, ``phase``). The worker reports each epoch; a trial whose estimate of its total
time (the seconds before training plus the epochs so far, plus the remaining epochs at the
fastest steady epoch) is already beyond the best acceptable total by ``--prune-margin`` is stopped:
a ``pruned`` row, Optuna's PRUNED state. No trial starts that cannot finish in what is left of the
budget by its estimate (the median wall time of finished trials of its pipeline), and part of the
budget is kept to measure the finalists again (``--finalist-repeats``), so that the winner is chosen
on medians by ``recommend.recommend``, not on one lucky run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shlex
import textwrap
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from flowers_fast.clikit import add_knob_flags, finite_float, given_knobs, positive_int
from flowers_fast.config import SWEEP, RunConfig, knobs
from flowers_fast.download import cache_dir
from flowers_fast.errors import INTERRUPTED_EXIT_CODE, DataError, UserError, invoked
from flowers_fast.outputs import Outputs

from . import configs as configs_mod
from . import machine, plots
from . import run as bench_run
from .recommend import accurate_enough, recommend
from .results import normalise, values

WORKER = "bench.worker"  # tests put a fake worker here
# Every trial pays for what it measures: features or a quantized model stored by an earlier trial
# would make later ones look faster. The breakdown's extra rates are not part of the time.
TRIAL_SETTINGS = dict(reuse_features=False, reuse_quantized=False, breakdown=False)
DEFAULTS = dict(preset="quick", device="cpu", budget="10m", out="results", configs=None, finalists=3,
                finalist_repeats=3, prune_margin=0.25, max_acc_drop=1.0, timeout=None, sampler_seed=0)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(s|m|h)?\s*$", re.IGNORECASE)
STUDY = "tune"


def parse_budget(text: str) -> float:
    """``90s``, ``10m``, ``1h`` (a bare number is seconds) -> seconds; else a UserError naming --budget."""
    m = _DURATION.match(str(text))
    seconds = float(m[1]) * {"s": 1, "m": 60, "h": 3600}[(m[2] or "s").lower()] if m else 0.0
    if not m or not seconds > 0 or not math.isfinite(seconds):
        raise UserError(f"--budget {text!r}: expected a positive wall time such as 90s, 10m or 1h")
    return seconds


# --- the search space, from the knob declarations -------------------------------------------

def space() -> list[dataclasses.Field]:
    """The knobs a search may change: those declared with ``tune=``, in declaration order."""
    return [f for f in knobs() if f.metadata.get("tune")]


def _valid(cfg: RunConfig, name: str, value) -> bool:
    try:
        cfg.replace(**{name: value})
    except UserError:
        return False
    return True


def walk(start: RunConfig, choose, fixed=()) -> RunConfig:
    """``start`` with each tunable knob set by ``choose(param_name, valid_values, field)`` (None:
    keep the value), in declaration order, offering only the values valid with what came before;
    knobs in ``fixed`` (given as flags) keep their value."""
    cfg = start
    for f in space():
        if f.name in fixed:
            continue
        when = f.metadata.get("tune_when") or {}
        if any(getattr(cfg, k) not in allowed for k, allowed in when.items()):
            continue
        values = tuple(f.metadata["tune"])
        valid = [v for v in values if _valid(cfg, f.name, v)]
        if not valid:
            continue
        name = f.name if len(valid) == len(values) else f"{f.name}[{'|'.join(map(str, valid))}]"
        value = valid[0] if len(valid) == 1 else choose(name, valid, f)
        if value is not None and value != getattr(cfg, f.name):
            cfg = cfg.replace(**{f.name: value})
    return cfg


def sample(trial, base: RunConfig, fixed=()) -> RunConfig:
    """A configuration Optuna's sampler picks for ``trial``."""
    return walk(base, lambda name, valid, f: trial.suggest_categorical(name, valid), fixed)


def params_of(cfg: RunConfig, base: RunConfig, fixed=()) -> dict:
    """{parameter: (value, valid values)}: the choices the search would have made to reach ``cfg``
    from ``base``, so that a known configuration, enqueued, teaches the sampler what it measured;
    empty when ``cfg`` is outside the space (e.g. the naive pipeline, or another knob differs)."""
    params, outside = {}, []

    def keep(name, valid, f):
        value = getattr(cfg, f.name)
        if value in valid:
            params[name] = (value, valid)
            return value
        outside.append(f.name)
        return None

    reached = walk(base.replace(name=cfg.name), keep, fixed)
    return {} if outside or key(reached) != key(cfg) else params


def key(cfg: RunConfig) -> str:
    """What a configuration computes and how, whatever its name."""
    return cfg.replace(name="-").to_json()


# --- pruning and the budget ----------------------------------------------------------------

def estimate_total(known: dict) -> float:
    """A worker's total time as far as its epochs so far tell: the seconds before training and the
    epochs so far, plus the remaining epochs at the fastest epoch after the first (the first holds
    tracing); after one epoch, only what is already spent (a lower bound)."""
    times = known["epoch_times_s"]
    spent = known["prep_s"] + sum(times)
    if len(times) < 2:
        return spent
    return spent + max(known["epochs"] - len(times), 0) * min(times[1:])


def pruner_class():
    import optuna

    class SlowerThanBest(optuna.pruners.BasePruner):
        """Prune when the trial's latest estimate of its total time is over the best acceptable
        total so far by ``margin`` (``best`` is kept by the search, which knows the accuracy gate)."""

        def __init__(self, margin: float):
            self.margin, self.best = margin, None

        def prune(self, study, trial) -> bool:
            step = trial.last_step
            if step is None or self.best is None:
                return False
            return trial.intermediate_values[step] > self.best * (1.0 + self.margin)

    return SlowerThanBest


class Tuner:
    """One tune run: its folder, study, rows and budget."""

    def __init__(self, args, folder: Path, run_id: str, base: RunConfig, references: list[tuple[list[str], RunConfig]],
                 preset: configs_mod.Preset, budget_s: float):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        self.args, self.folder, self.run_id, self.base, self.references = args, folder, run_id, base, references
        self.preset, self.budget_s = preset, budget_s
        self.fixed = set(given_knobs(args, SWEEP))  # a tunable knob given as a flag is not searched
        self.pruner = pruner_class()(args.prune_margin)
        sampler = optuna.samplers.TPESampler(seed=args.sampler_seed, multivariate=True, group=True, n_startup_trials=4)
        self.study = optuna.create_study(study_name=STUDY, storage=f"sqlite:///{folder / 'study.db'}",
                                         load_if_exists=True, direction="minimize", sampler=sampler,
                                         pruner=self.pruner)
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            self.study.tell(t.number, state=optuna.trial.TrialState.FAIL)  # interrupted: runs again if needed
        self.started = time.monotonic()
        self.csv = folder / "trials.csv"
        self.results = bench_run.ResultsFile(self.csv, None, rows=[t.user_attrs["row"] for t in self.finished()])
        if self.results.rows:
            self.results.flush()
        self.spent_before = sum(float(r.get("subprocess_s") or 0) for r in self.results.rows)
        self.update_best()
        self.facts = machine.host_facts()
        self.common = bench_run.provenance(run_id, args.preset, self.facts)
        self.cache = cache_dir()
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        (folder / "logs").mkdir(exist_ok=True)

    # -- what is known
    def finished(self):
        return [t for t in self.study.get_trials(deepcopy=False) if "row" in t.user_attrs]

    def rows(self, phase: str | None = None) -> list[dict]:
        return [r for r in self.results.rows if phase is None or r.get("phase") == phase]

    def spent(self) -> float:
        """Wall seconds of the budget used: this session's so far, and earlier sessions' trials (--resume)."""
        return self.spent_before + time.monotonic() - self.started

    def ok_frame(self) -> pd.DataFrame:
        ok = [r for r in self.results.rows if r.get("status") == "ok"]
        return normalise(pd.DataFrame(ok)) if ok else pd.DataFrame()

    def acceptable(self) -> list[dict]:
        """The ok rows within the accuracy tolerance of the best one (recommend's gate), fastest first."""
        df = self.ok_frame()
        if df.empty:
            return []
        keep = accurate_enough(df, self.args.device, df, self.args.max_acc_drop)[0].sort_values("total_s",
                                                                                            kind="mergesort")
        names = set(keep["name"])
        rows = [r for r in self.results.rows if r.get("status") == "ok" and r["name"] in names]
        return sorted(rows, key=lambda r: float(r["total_s"]))

    def estimate(self, pipeline: str | None) -> float | None:
        """Seconds a trial of ``pipeline`` takes (the median of finished ones; None: the slowest pipeline's)."""
        walls = {}
        for r in self.results.rows:
            if r.get("status") == "ok":
                walls.setdefault(r["pipeline"], []).append(float(r["subprocess_s"]))
        if not walls:
            return None
        if pipeline in walls:
            return statistics.median(walls[pipeline])
        return max(statistics.median(w) for w in walls.values())

    def candidates(self) -> list[str]:
        """Names of the configurations to measure again as things stand: the fastest acceptable ones, and
        the best named one (so that the gain over it compares medians with medians)."""
        chosen = list(dict.fromkeys(r["name"] for r in self.acceptable()))[:self.args.finalists]
        named = self.best_named()
        return chosen + [named] if named and named not in chosen else chosen

    def finalists(self) -> list[str]:
        """The candidates when the search ended (kept in the study, so that --resume measures the same)."""
        return self.study.user_attrs.get("finalists") or self.candidates()

    def best_named(self) -> str | None:
        """The fastest acceptable named configuration (the harness's default not counted)."""
        for r in self.acceptable():
            if r.get("phase") == "reference" and set(json.loads(r["tune_names"])) - {"default"}:
                return r["name"]
        return None

    def reserve(self) -> float:
        """Seconds the finalists' remeasuring will take, as far as the search so far tells."""
        walls = {r["name"]: float(r["subprocess_s"]) for r in self.acceptable()[::-1]}
        return sum(walls[n] for n in self.candidates()) * (self.args.finalist_repeats - 1)

    # -- running one trial
    def run_trial(self, trial, cfg: RunConfig, phase: str, repeat: int = 0, names=(), timeout_s: float = 0.0) -> dict:
        import optuna

        stem = f"{cfg.name}-{cfg.device}-r{repeat}"
        trial.set_user_attr("config", cfg.to_dict())
        base = {**self.common, **cfg.to_dict(), "repeat": repeat, "repeats": self.args.finalist_repeats,
                "trial": trial.number, "phase": phase, "tune_names": json.dumps(list(names) or [cfg.name]),
                "tune_params": json.dumps(trial.params, sort_keys=True),
                "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}

        def watch(known: dict) -> str | None:
            estimate = estimate_total(known)
            step = len(known["epoch_times_s"])
            trial.report(estimate, step)
            if phase == "search" and trial.should_prune():
                return (f"after epoch {step}: its estimated total {estimate:.1f} s is over the best "
                        f"{self.pruner.best:.1f} s by more than --prune-margin {self.args.prune_margin:g}")
            return None

        try:
            row = bench_run.run_one(cfg, timeout_s, self.folder / "logs" / f"{stem}.log", self.env,
                                    worker=WORKER, cache=self.cache, machine_id=self.facts["machine_id"],
                                    watch=watch)
        except KeyboardInterrupt:
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        status = row.get("status")
        state = "COMPLETE" if status == "ok" else "PRUNED" if status == "pruned" else "FAIL"
        row = {**base, **row, "state": state}
        trial.set_user_attr("row", json.loads(json.dumps(row, default=str)))
        if state == "COMPLETE":
            self.study.tell(trial, float(row["total_s"]))
        else:
            self.study.tell(trial, state=getattr(optuna.trial.TrialState, state))
        self.results.add(trial.user_attrs["row"])
        self.update_best()
        print(f"bench tune: trial {trial.number} {cfg.name} ({phase}{f' #{repeat}' if repeat else ''}): {status}"
              f"{' total %.1f s' % float(row['total_s']) if status == 'ok' else ''}"
              f"{' ' + str(row.get('error')) if status != 'ok' and row.get('error') else ''}", file=sys.stderr)
        return row

    def update_best(self) -> None:
        best = self.acceptable()
        self.pruner.best = float(best[0]["total_s"]) if best else None

    def fits(self, estimate: float | None, reserve: float = 0.0) -> float | None:
        """The timeout for a trial that fits in the rest of the budget, or None when it does not."""
        left = self.budget_s - self.spent() - reserve
        if left <= 0 or (estimate is not None and estimate > left):
            return None
        return min(float(self.args.timeout or self.preset.timeout_s), left)

    # -- the phases
    def run_references(self) -> None:
        done = {n for r in self.rows("reference") for n in json.loads(r["tune_names"])}
        for names, cfg in self.references:
            if set(names) & done:
                continue
            timeout = self.fits(self.estimate(cfg.pipeline))
            if timeout is None:
                print(f"bench tune: no budget left for {cfg.name}", file=sys.stderr)
                return
            fixed = params_of(cfg, self.base, self.fixed)
            self.study.enqueue_trial({name: value for name, (value, _) in fixed.items()})
            trial = self.study.ask()
            for name, (_, valid) in fixed.items():  # the enqueued values come back: the sampler learns from them
                trial.suggest_categorical(name, valid)
            self.run_trial(trial, cfg, "reference", names=names, timeout_s=timeout)

    def search(self) -> None:
        import optuna

        if self.study.user_attrs.get("finalists"):
            return  # the search ended before an interruption (a new --budget on --resume opens it again)
        seen = {key(RunConfig(**r_cfg)) for r_cfg in (t.user_attrs.get("config") for t in self.finished()) if r_cfg}
        repeats_in_a_row = 0
        pipelines = [v for f in space() if f.name == "pipeline" for v in f.metadata["tune"]] or [None]
        while repeats_in_a_row < 50:
            estimate = max((self.estimate(p) or 0.0 for p in pipelines), default=0.0) or None
            timeout = self.fits(estimate, self.reserve())
            if timeout is None:
                return
            trial = self.study.ask()
            number = trial.number
            cfg = sample(trial, self.base, self.fixed).replace(name=f"t{number}")
            if key(cfg) in seen:  # the sampler asked again for a configuration already measured
                repeats_in_a_row += 1
                self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                continue
            repeats_in_a_row = 0
            seen.add(key(cfg))
            self.run_trial(trial, cfg, "search", timeout_s=timeout)
        print("bench tune: the sampler keeps asking for configurations already measured; the search is done",
              file=sys.stderr)

    def remeasure(self) -> list[str]:
        finalists = self.finalists()
        self.study.set_user_attr("finalists", finalists)
        configs = {r["name"]: (r, json.loads(r["tune_names"])) for r in self.rows() if r.get("repeat") in (0, "0")}
        for k in range(1, self.args.finalist_repeats):
            for name in finalists:
                if any(r["name"] == name and int(r["repeat"]) == k for r in self.rows("finalist")):
                    continue
                row, names = configs[name]
                timeout = self.fits(float(row["subprocess_s"]))
                if timeout is None:
                    print(f"bench tune: no budget left to measure {name} again (repeat {k})", file=sys.stderr)
                    continue
                cfg = RunConfig(**self.config_of(name))
                self.run_trial(self.study.ask(), cfg, "finalist", repeat=k, names=names, timeout_s=timeout)
        return finalists

    def config_of(self, name: str) -> dict:
        for t in self.finished():
            if t.user_attrs["row"]["name"] == name:
                return t.user_attrs["config"]
        raise KeyError(name)


# --- results ---------------------------------------------------------------------------------

def config_file_values(cfg: RunConfig, job_keys) -> dict:
    """What a configuration file holds: the knobs that differ from RunConfig's defaults, and the
    job's own (the preset's data and epochs), so that any preset gives back the same configuration."""
    default = RunConfig()
    return {k: v for k, v in cfg.to_dict().items() if k in job_keys or v != getattr(default, k)}


def write_plot(rows: list[dict], finalists: list[str], medians: dict, path: Path, acceptable: set) -> Path:
    """Best-so-far total time (of the configurations within the accuracy tolerance, ``acceptable``)
    against the trial number (references and search), finalists marked with their median and spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    first = sorted((r for r in rows if r.get("phase") != "finalist"), key=lambda r: int(r["trial"]))
    fig, ax = plt.subplots(figsize=(8.5, 5))
    xs, best, bests = [], math.inf, []
    for r in first:
        if r.get("status") == "ok" and r["name"] in acceptable:
            best = min(best, float(r["total_s"]))
        xs.append(int(r["trial"]))
        bests.append(best if math.isfinite(best) else float("nan"))
    ax.step(xs, bests, where="post", color="#4C72B0", label="best so far (within the accuracy tolerance)")
    ok = [r for r in first if r.get("status") == "ok"]
    within = [r for r in ok if r["name"] in acceptable]
    outside = [r for r in ok if r["name"] not in acceptable]
    ax.scatter([int(r["trial"]) for r in within], [float(r["total_s"]) for r in within], s=18, color="#8C8C8C",
               label="trial (one measurement)", zorder=3)
    if outside:  # faster perhaps, but less accurate than the tolerance allows: never the best
        ax.scatter([int(r["trial"]) for r in outside], [float(r["total_s"]) for r in outside], s=22,
                   facecolors="none", edgecolors="#8C8C8C", label="trial outside the accuracy tolerance", zorder=3)
    pruned = [r for r in first if r.get("status") == "pruned"]
    if pruned and bests:
        top = max(float(r["total_s"]) for r in ok) if ok else 1.0
        ax.scatter([int(r["trial"]) for r in pruned], [top] * len(pruned), marker="x", color="#C44E52",
                   label="pruned (stopped early; drawn at the top)", zorder=3)
    for name in finalists:
        r = next((r for r in first if r["name"] == name), None)
        if r is None or name not in medians:
            continue
        med, lo, hi = medians[name]
        ax.errorbar([int(r["trial"])], [med], yerr=[[med - lo], [hi - med]], fmt="D", color="#DD8452", capsize=4,
                    zorder=4, label="finalist: median, min-max" if name == finalists[0] else None)
        ax.annotate(name, (int(r["trial"]), med), textcoords="offset points", xytext=(6, 6), fontsize=8)
    totals = [float(r["total_s"]) for r in ok]
    if totals and max(totals) > 10 * min(totals):
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("time to a trained model, total_s (s)")
    # What it was measured on, as bench run's plots say it: data, weights, CPU and its ISA flags.
    frame = pd.DataFrame(rows)
    ok_rows = frame[frame.get("status", pd.Series(dtype=str)) == "ok"] if "status" in frame else frame
    cpu = plots._cpu_line(ok_rows)  # the subtitle's last line, where the rows have the machine facts
    data = plots._subtitle(frame) if {"status", "pipeline"} <= set(frame.columns) else cpu.lstrip("\n")
    if not cpu:  # rows without the CPU's ISA: what they say of the device
        data += "\n" + " | ".join(values(ok_rows, c) for c in ("device", "cpu_brand") if c in ok_rows)
    lines = [line for part in data.split("\n") for line in textwrap.wrap(part, 100)]
    ax.set_title("\n".join(["bench tune: best so far", *lines]), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary(tuner: Tuner, finalists: list[str]) -> int:
    """The winner by recommend over the finalists' repeats, its file, the command, the gains, the plot."""
    df = tuner.ok_frame()
    if df.empty:
        raise DataError("bench tune: no trial finished (status ok); see the rows in "
                        f"{tuner.csv} and their logs; nothing to recommend")
    med = {}
    for name in finalists:
        totals = df[df["name"] == name]["total_s"].astype(float)
        if len(totals):
            med[name] = (float(totals.median()), float(totals.min()), float(totals.max()))
    pool = df[df["name"].isin(list(med))]
    row, reason, _ = recommend(pool, tuner.args.device, tuner.args.max_acc_drop)
    winner = row["name"]
    cfg = RunConfig(**tuner.config_of(winner)).replace(name="tuned")
    job_keys = set(tuner.preset.overrides) | set(given_knobs(tuner.args, SWEEP))
    best_json = tuner.folder / "best.json"
    bench_run.atomic_text(best_json, json.dumps(config_file_values(cfg, job_keys), indent=1, sort_keys=True) + "\n")
    plot = write_plot(tuner.results.rows, finalists, med, tuner.folder / "best-so-far.png",
                      {r["name"] for r in tuner.acceptable()})

    def median_of(name):
        totals = df[df["name"] == name]["total_s"].astype(float)
        return float(totals.median()) if len(totals) else None

    print("\ntrials (total_s in seconds; acc in %):")
    print(trial_table(tuner.results.rows))
    win = median_of(winner)
    print(f"\nwinner: {winner} ({describe_params(tuner, winner)}), median total {win:.2f} s over "
          f"{len(df[df['name'] == winner])} run(s)")
    print(f"why: {reason}")
    for label, name in (("the default configuration", "default"), ("the best named configuration",
                                                                   tuner.best_named())):
        other = median_of(name) if name else None
        if other:
            print(f"gain over {label} ({name}, median {other:.2f} s): {other / win:.2f}x")
    given = " ".join(shlex.quote(a) for a in _job_flags(tuner.args))
    print(f"\nconfiguration: {best_json}")
    print(f"train it:  {invoked('flowers_fast')} train --config {shlex.quote(str(best_json))}")
    print(f"compare:   {invoked('bench')} run --preset {tuner.args.preset} --device {tuner.args.device} "
          f"--config {shlex.quote(str(best_json))}{' ' + given if given else ''}")
    print(f"rows: {tuner.csv}\nplot: {plot}")
    return 0


def _job_flags(args) -> list[str]:
    from flowers_fast.config import flag_of

    out = []
    for f in knobs(SWEEP):
        if hasattr(args, f.name) and f.name in ("data_dir", "model_handle"):
            out += [flag_of(f), str(getattr(args, f.name))]
    return out


def describe_params(tuner: Tuner, name: str) -> str:
    cfg = RunConfig(**tuner.config_of(name))
    changed = [f"{f.name}={getattr(cfg, f.name)}" for f in space() if getattr(cfg, f.name) != getattr(tuner.base,
                                                                                                      f.name)]
    return ", ".join(changed) or "the default's knobs"


def trial_table(rows: list[dict]) -> str:
    def fmt(v, spec):
        try:
            return format(float(v), spec)
        except (TypeError, ValueError):
            return ""

    out = [f"{'trial':>5} {'name':<18} {'phase':<9} {'r':>1} {'state':<8} {'total_s':>8} {'acc':>5}  knobs"]
    for r in sorted(rows, key=lambda r: int(r["trial"])):
        params = ", ".join(f"{k}={v}" for k, v in json.loads(r.get("tune_params") or "{}").items())
        acc = fmt(float(r["test_accuracy"]) * 100, ".1f") if r.get("status") == "ok" else ""
        out.append(f"{r['trial']:>5} {str(r['name'])[:18]:<18} {r['phase']:<9} {r['repeat']:>1} {r['state']:<8} "
                   f"{fmt(r.get('total_s'), '8.2f') if r.get('status') == 'ok' else '':>8} {acc:>5}  {params}")
    return "\n".join(out)


# --- the command -------------------------------------------------------------------------------

def _references(args, preset, overrides) -> list[tuple[list[str], RunConfig]]:
    """(names, configuration) to run first: the harness's default, then the preset's (or --configs')
    named ones; one that computes the same as an earlier one runs once, under both names."""
    out: dict[str, tuple[list[str], RunConfig]] = {}
    cfgs = [RunConfig(name="default", **overrides)]
    for c in configs_mod.select(args.configs, preset):
        if c.pipeline == "modelonly":  # trains no model
            continue
        try:
            cfgs.append(c.replace(**overrides))
        except UserError as exc:  # e.g. featcache-ov with --device gpu: OpenVINO is CPU-only here
            print(f"bench tune: skipping {c.name} on {args.device}: {exc}", file=sys.stderr)
    for cfg in cfgs:
        entry = out.setdefault(key(cfg), ([], cfg))
        entry[0].append(cfg.name)
    return list(out.values())


def _settings(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("func", "command", "resume")}


def execute(args) -> int:
    # Before anything else: a bad --budget is a usage error. A resumed run keeps its budget unless given.
    budget_s = parse_budget(args.budget) if args.budget is not None else None
    resumed_budget = bool(args.resume and args.budget is not None)
    out = Path(args.out)
    if args.resume:
        folder = _resume_folder(out, args.resume)
        saved = json.loads((folder / "tune.json").read_text(encoding="utf-8"))
        for k, v in vars(args).copy().items():
            if k in ("func", "command", "resume", "budget", "out") or (k in DEFAULTS and v == DEFAULTS[k]) or v is None:
                continue
            if saved.get(k, DEFAULTS.get(k)) != v:
                raise UserError(f"--resume: --{k.replace('_', '-')} {v} differs from the run being resumed "
                                f"({folder / 'tune.json'}: {saved.get(k, 'not set')}); drop it (only --budget may "
                                "change)")
        vars(args).update({k: v for k, v in saved.items() if k != "budget" or args.budget is None})
        run_id = folder.name[len("tune-"):]
    if budget_s is None:
        args.budget = args.budget or DEFAULTS["budget"]
        budget_s = parse_budget(args.budget)
    if args.prune_margin < 0 or args.max_acc_drop < 0:
        flag = "--prune-margin" if args.prune_margin < 0 else "--max-acc-drop"
        raise UserError(f"{flag} must be 0 or more, got {getattr(args, flag[2:].replace('-', '_'))}")
    preset = configs_mod.PRESETS[args.preset]
    overrides = {**TRIAL_SETTINGS, **bench_run.job_overrides(args, preset)}  # flags given override TRIAL_SETTINGS
    base = RunConfig(name="base", device=args.device, **overrides)
    references = _references(args, preset, {**overrides, "device": args.device})
    bench_run.plan(argparse.Namespace(device=args.device))  # --device gpu: a GPU must be there
    if not args.resume:
        with Outputs() as outputs:
            outputs.mkdirs(out, "--out")
            bench_run.check_out_dir(out)
            run_id = datetime.now().strftime("%Y%m%d-%H%M%S")
            folder, k = out / f"tune-{run_id}", 1
            while folder.exists():
                k += 1
                folder = out / f"tune-{run_id}-{k}"
            run_id = folder.name[len("tune-"):]
            folder.mkdir()
            bench_run.atomic_text(folder / "tune.json", json.dumps(_settings(args), indent=1))
    with bench_run.run_lock(folder / "tune.json"):
        tuner = Tuner(args, folder, run_id, base, references, preset, budget_s)
        if resumed_budget:
            tuner.study.set_user_attr("finalists", [])  # more budget: the search goes on, finalists are chosen again
        print(f"bench tune {run_id}: budget {budget_s:.0f} s ({tuner.spent():.0f} s already spent), "
              f"{len(space())} knobs in the search ({', '.join(f.name for f in space())}); results -> {folder}",
              file=sys.stderr)
        try:
            tuner.run_references()
            tuner.search()
            finalists = tuner.remeasure()
        except KeyboardInterrupt as exc:
            how = "stopped by SIGTERM" if hasattr(exc, "exit_code") else "interrupted"
            print(f"\nbench tune: {how}; {len(tuner.results.rows)} finished trials kept in {folder}; continue "
                  f"with: {invoked('bench')} tune --resume {shlex.quote(str(folder))}", file=sys.stderr)
            return getattr(exc, "exit_code", INTERRUPTED_EXIT_CODE)
        return summary(tuner, finalists)


def _resume_folder(out: Path, resume: str) -> Path:
    if resume == "latest":
        runs = sorted((p for p in out.glob("tune-*") if (p / "tune.json").is_file()),
                      key=lambda p: (p / "tune.json").stat().st_mtime)
        if not runs:
            raise UserError(f"--resume: no earlier tune run under {out}; start one with {invoked('bench')} tune")
        return runs[-1]
    folder = Path(resume)
    if not (folder / "tune.json").is_file():
        raise UserError(f"--resume {resume}: not a tune run's folder (no tune.json there); pass a tune-* folder "
                        "that bench tune wrote")
    return folder


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("tune", help="search for the fastest configuration within a wall-time budget")
    g = p.add_argument_group("the search")
    g.add_argument("--budget", metavar="TIME", help="wall time for the whole search, trials and finalists, e.g. "
                   "90s, 10m, 1h (default: 10m; --resume: the run's own, or this new total)")
    g.add_argument("--device", choices=("cpu", "gpu"), default=DEFAULTS["device"], help="(default: cpu)")
    g.add_argument("--preset", choices=tuple(configs_mod.PRESETS), default=DEFAULTS["preset"],
                   help="the job (data, epochs) and the named configurations run first (default: quick)")
    g.add_argument("--configs", metavar="NAME,...", help="named configurations to run first instead of the "
                                                         f"preset's; see {invoked('bench')} list")
    g.add_argument("--finalists", type=positive_int, default=DEFAULTS["finalists"],
                   help="fastest configurations measured again at the end (default: 3; the best named one too)")
    g.add_argument("--finalist-repeats", type=positive_int, default=DEFAULTS["finalist_repeats"],
                   help="measurements of each finalist, the first included (default: 3)")
    g.add_argument("--prune-margin", type=finite_float, default=DEFAULTS["prune_margin"], metavar="FRACTION",
                   help="stop a trial whose estimated total is over the best by this fraction (default: 0.25)")
    g.add_argument("--max-acc-drop", type=finite_float, default=DEFAULTS["max_acc_drop"], metavar="POINTS",
                   help="recommend's accuracy tolerance (default: 1.0; the test set's noise margin if larger)")
    g.add_argument("--timeout", type=positive_int, metavar="S", help="seconds per trial at most (default: the "
                                                                     "preset's)")
    g.add_argument("--sampler-seed", type=int, default=DEFAULTS["sampler_seed"], help="Optuna's sampler's seed (default: 0)")
    g.add_argument("--out", default=DEFAULTS["out"], metavar="DIR",
                   help="where the run's folder tune-<id>/ goes (default: results)")
    g.add_argument("--resume", nargs="?", const="latest", metavar="DIR",
                   help="continue the newest (or the given) tune run; only --budget may change")
    add_knob_flags(p, SWEEP)
    p.set_defaults(func=execute)
    return p
