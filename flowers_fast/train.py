"""Train and evaluate one configuration: one runner per pipeline, all called the same way.

``run`` builds a :class:`RunContext` (configuration, data, split, strategy, backbone, the row
being filled) and hands it to the pipeline's runner from ``runners.RUNNERS`` (one module per
runner in ``flowers_fast/runners/``); this module keeps the steps they share. Every runner fits and
evaluates through ``_fit_evaluate`` and records its per-stage breakdown through
``_breakdown``. The result is a flat dict of metrics (one CSV row) plus what later steps need
(the model, test predictions). Times are wall seconds in this process; the first epoch
(tracing, compilation, cache fill) is reported on its own and excluded from steady-state figures.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from . import cluster, data, distribute, engine, metrics, profiling, runtime
from . import model as models
from .config import RunConfig
from .errors import UserError, printable
from .tfkeras import keras, tf

MODELONLY_CLASSES = 5  # modelonly has no dataset: the flowers' five classes


@dataclass
class RunResult:
    row: dict
    model: object = None
    classes: tuple = ()
    y_true: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    y_pred: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    test_files: tuple = ()  # aligned with y_true / y_pred
    backbone: object = None


def image_model(result: RunResult, cfg: RunConfig):
    """The trained model on images (what ``train --save`` writes and ``predict --checkpoint``
    loads): featcache trained only a head on features (cutcache: the top and a head on activations
    at the cut), so its model is the backbone (``result.backbone``, kept with ``keep_model``; the
    top's layers are the backbone's) with that head on top, fed uint8 like tfdata's."""
    if cfg.pipeline not in ("featcache", "cutcache"):
        return result.model
    return models.build_classifier(result.backbone, len(result.classes), cfg, "uint8",
                                   head=result.model.get_layer("head"))


@dataclass
class RunContext:
    """Everything a runner needs; ``row`` is the CSV row being filled."""

    cfg: RunConfig
    cache: Path
    progress: bool
    strategy: object
    global_batch: int
    row: dict
    backbone: models.Backbone | None = None
    dataset: data.ImageFolder | None = None  # None for modelonly
    split: data.Split | None = None
    predictions: bool = True  # predict the test set after evaluating (figures need it; a sweep row does not)
    # --profile: the steady-state steps to trace (set where the model trains) and, for featcache, the feature slice
    profile_steps: Callable | None = None
    profile_extra: Callable | None = None
    # Called after each epoch with what is known so far (bench tune's pruning reads it): the seconds
    # before training (``prep_s``), the epoch times, and how many epochs the run has.
    on_epoch: Callable[[dict], None] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.dataset.classes) if self.dataset else MODELONLY_CLASSES


@dataclass(frozen=True)
class Runner:
    run: Callable[[RunContext], RunResult]
    needs_data: bool = True


def run(cfg: RunConfig, cache: Path, progress: bool = True, keep_model: bool = False,
        predictions: bool = True, on_epoch: Callable[[dict], None] | None = None) -> RunResult:
    """Train and evaluate ``cfg``; the process-global setup (runtime.setup) must be done first.
    ``predictions=False`` skips predicting the test set a second time after evaluation (the
    result's ``y_pred`` stays empty): a sweep's rows need only the evaluation's metrics.
    ``on_epoch``: see ``RunContext.on_epoch``."""
    from .runners import RUNNERS  # here, not at the top: the runners import this module

    t_start = time.perf_counter()
    runner = RUNNERS[cfg.pipeline]
    if cfg.engine == "openvino":
        engine.check_precision(cfg.precision)  # before any work: bf16 where the CPU has none
    strategy = distribute.strategy(cfg)
    replicas = strategy.num_replicas_in_sync
    member = cluster.current() if cfg.strategy == "multiworker" else None
    ctx = RunContext(cfg, cache, progress, strategy, cfg.batch_size * replicas,
                     row={"replicas": replicas, "global_batch": cfg.batch_size * replicas,
                          "workers": member.workers if member else 1,
                          "cluster_task": f"{member.task[0]} {member.task[1]}" if member else ""},
                     predictions=predictions, on_epoch=on_epoch)
    # A peer that died or timed out: one line instead of TensorFlow's "Graph execution error:" page.
    with cluster.one_line_failures(member is not None):
        return _run(ctx, runner, t_start, keep_model)


def _run(ctx: RunContext, runner: Runner, t_start: float, keep_model: bool) -> RunResult:
    cfg, cache, strategy = ctx.cfg, ctx.cache, ctx.strategy
    if runner.needs_data:
        ctx.dataset = data.resolve(cfg, cache)
        ctx.split = data.split(ctx.dataset, cfg.test_fraction, cfg.seed)
        ctx.row.update(ignored_files=len(ctx.dataset.ignored), ignored_images=ctx.dataset.ignored_images)
        data.warn(data.left_out(ctx.dataset), "... and {} more folders with files that are not read")
        # What the row was measured on (bench.results.DATA): the images found, not --num-images
        # (which only sizes the synthetic set), and which files they were.
        ctx.row.update(num_images=len(ctx.dataset), data_files=len(ctx.dataset),
                       data_fingerprint=data.fingerprint(ctx.dataset))
    else:
        ctx.row["dataset"] = "in-memory"
    ctx.row["classes"] = ctx.num_classes
    ctx.row["onednn_enabled"] = runtime.onednn_enabled()  # what ran, whatever --onednn asked
    ctx.row["augment_how"] = cfg.augment_how

    t0 = time.perf_counter()
    with strategy.scope():
        keras.utils.set_random_seed(cfg.seed)
        ctx.backbone = models.build_backbone(cfg, cache)
    b = ctx.backbone
    ctx.row.update(handle=b.handle, weights=b.weights, compute_dtype=b.compute_dtype, feature_dim=b.feature_dim,
                   mixed_route=b.mixed_route, feature_cosine_vs_fp32=b.cosine_vs_fp32,
                   model_build_s=time.perf_counter() - t0)

    result = runner.run(ctx)
    row = ctx.row
    if runner.needs_data and "decode_img_s" not in row:
        # One-time preparation rate (naive: cv2 load into arrays; tf.data: first pass, decode + cache fill).
        row["decode_img_s"] = (row["train_images"] + row["test_images"]) / row["data_prep_s"]
    row.setdefault("peak_rss_mb", metrics.peak_rss_mb())
    row["peak_gpu_mb"] = metrics.peak_gpu_mb()
    row["wall_s"] = time.perf_counter() - t_start
    if cfg.profile and ctx.profile_steps is not None:  # after every timed part and the memory peak
        row.update(profiling.trace(cfg.profile, ctx.profile_steps, ctx.profile_extra))
    result.row = row
    result.classes = ctx.dataset.classes if ctx.dataset else ()
    if keep_model:
        result.backbone = b
    else:
        result.model = None
    return result


# --- shared steps -------------------------------------------------------------------------------

class _Progress(keras.callbacks.Callback):
    """A tqdm bar per epoch (tqdm's own Keras callback targets Keras 3, not tf_keras)."""

    def __init__(self, steps: int, label: str, enabled: bool):
        super().__init__()
        self.steps, self.label, self.enabled, self.bar = steps, label, enabled, None

    def on_epoch_begin(self, epoch, logs=None):
        if self.enabled:
            self.bar = tqdm(total=self.steps, desc=f"{self.label} epoch {epoch + 1}", unit="batch", leave=False)

    def on_train_batch_end(self, batch, logs=None):
        if self.bar is not None:
            self.bar.update(1)

    def on_epoch_end(self, epoch, logs=None):
        self.close()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# Cross-entropy of a uniform guess among K classes is log(K); a head that learned anything, or
# nothing, stays within a few times that. A loss this many times above it has blown up (a
# --learning-rate far too large), finite or not: 1e6 ended at a test loss of 2.6e8, exit 0.
DIVERGED_FACTOR = 100.0


def divergence(loss: float, num_classes: int, where: str, learning_rate: float) -> UserError | None:
    """The error for a loss that diverged (NaN, infinite, or DIVERGED_FACTOR x log K), else None."""
    loss = float(loss)
    chance = math.log(max(num_classes, 2))
    if math.isfinite(loss) and loss <= DIVERGED_FACTOR * chance:
        return None
    how = f"loss {loss} {where}" if not math.isfinite(loss) else \
        f"loss {loss:.3g} {where}, over {DIVERGED_FACTOR:g}x the {chance:.2f} of guessing among {num_classes} classes"
    return UserError(f"--learning-rate {learning_rate:g}: training diverged ({how}); use a smaller --learning-rate, "
                     "e.g. the default 0.001")


class _StopOnDivergence(keras.callbacks.Callback):
    """A loss that diverged (see ``divergence``) is an error, not a model: the run stops at the end
    of that epoch instead of reporting the accuracy of blown-up weights."""

    def __init__(self, learning_rate: float, num_classes: int):
        super().__init__()
        self.learning_rate, self.num_classes = learning_rate, num_classes

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None:
            error = divergence(loss, self.num_classes, f"in epoch {epoch + 1}", self.learning_rate)
            if error:
                raise error


def _compiled(ctx: RunContext, build) -> "keras.Model":
    """``build()`` under the strategy's scope, compiled for this configuration."""
    with ctx.strategy.scope():
        model = build()
        models.compile_classifier(model, ctx.cfg)
    return model


def _fit_evaluate(ctx: RunContext, model, train_x, test_x, n_train: int, n_test: int, prep_s: float,
                  label: str, train_y=None, test_y=None, batch_size=None, extra_s: float = 0.0,
                  fine_tune_on: Callable | None = None):
    """Fit for the configured epochs, evaluate, predict: epoch times, steady state, totals and
    test metrics go into the row; returns (y_true, y_pred). ``x`` is a dataset, or an array with
    ``y`` and ``batch_size`` (the naive way). ``fine_tune_on``: what the fine-tune phase trains
    and is evaluated on instead, ``() -> (model, train_x, test_x)`` (cutcache: the head phase on
    features, the fine-tune phase on activations); by default the same model and data."""
    cfg, row = ctx.cfg, ctx.row
    timer = metrics.EpochTimer()
    bar = _Progress(-(-n_train // ctx.global_batch), label, ctx.progress)
    callbacks = [timer, bar, _StopOnDivergence(cfg.learning_rate, ctx.num_classes)]
    if ctx.on_epoch is not None:  # after the timer, which has then timed the epoch
        epochs = cfg.epochs + cfg.fine_tune_epochs
        callbacks.append(keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: ctx.on_epoch(
            {"prep_s": prep_s + extra_s, "epoch_times_s": list(timer.times), "epochs": epochs})))
    try:
        with _files_stay(ctx):
            _fit(model, cfg, train_x, train_y, batch_size, callbacks)
            if cfg.fine_tune_epochs:
                if fine_tune_on is not None:
                    model, train_x, test_x = fine_tune_on()
                _fine_tune_phase(ctx, model, train_x, train_y, batch_size, callbacks)
    finally:
        bar.close()  # an error message then starts on its own line
    times = timer.times
    if len(times) != cfg.epochs + cfg.fine_tune_epochs:
        raise RuntimeError(f"training ran {len(times)} of {cfg.epochs + cfg.fine_tune_epochs} epochs: the input ran "
                           "out of data early (Keras stops without an error); every epoch must see the whole "
                           "training set")
    if cfg.fine_tune_epochs:  # each phase's own time (the second starts with a new trace)
        row.update(head_phase_s=sum(times[:cfg.epochs]), fine_tune_phase_s=sum(times[cfg.epochs:]),
                   fine_tune_first_epoch_s=times[cfg.epochs],
                   fine_tune_steady_epoch_s=metrics.steady(times[cfg.epochs:])["steady_epoch_s"])
    row.update(first_epoch_s=times[0], **metrics.steady(times[:cfg.epochs]), train_s=sum(times))
    row["train_img_s"] = n_train / row["steady_epoch_s"] if cfg.epochs > 1 else n_train / times[0]
    row["end_to_end_img_s"] = row["train_img_s"]
    row["total_s"] = prep_s + extra_s + sum(times)
    row["epoch_times_s"] = " ".join(f"{t:.3f}" for t in times)
    row.update(epoch_loss=timer.curve("loss"), epoch_accuracy=timer.curve("accuracy"))
    ctx.profile_steps = profiling.Steps(model, profiling.fit_steps, train_x, train_y, batch_size)

    start = time.perf_counter()
    with _files_stay(ctx):
        loss, acc = model.evaluate(test_x, test_y, batch_size=batch_size, verbose=0)
    error = divergence(loss, ctx.num_classes, "on the test set", cfg.learning_rate)
    if error:  # training's last epoch looked sane, the weights it ended with do not
        raise error
    row.update(test_accuracy=float(acc), test_loss=float(loss), eval_s=time.perf_counter() - start)
    row["eval_img_s"] = n_test / row["eval_s"]
    if not ctx.predictions:
        # The job's memory, before the breakdown's measurements (e.g. featcache's TensorFlow reference).
        row["peak_rss_mb"] = metrics.peak_rss_mb()
        return np.zeros(0, int), np.zeros(0, int)
    with _files_stay(ctx):
        y_pred = np.argmax(model.predict(test_x, batch_size=batch_size, verbose=0), axis=-1)
    row["peak_rss_mb"] = metrics.peak_rss_mb()
    y_true = np.asarray(test_y) if test_y is not None else np.concatenate([y.numpy() for _, y in test_x])
    return y_true, y_pred


@contextlib.contextmanager
def _files_stay(ctx: RunContext):
    """Where datasets that read the image files run (with --cache none, every epoch): a file
    deleted meanwhile ends the run as one DataError naming it, not as TensorFlow's error."""
    try:
        yield
    except tf.errors.OpError:
        missing = data.gone(ctx.split.train_files + ctx.split.test_files) if ctx.split else []
        if missing:
            raise data.gone_error(missing) from None
        raise


def _fit(model, cfg: RunConfig, train_x, train_y, batch_size, callbacks,
         epochs: tuple[int, int] | None = None) -> None:
    """Epochs ``epochs`` (first, end), by default 0..--epochs."""
    first, end = epochs or (0, cfg.epochs)
    if cfg.data_service and cfg.pipeline == "tfdata":  # (featcache's service feeds its pass, not the head)
        # A tf.data service epoch ends when its workers run dry, and with several service workers
        # or trainers the number of steps changes from epoch to epoch. Keras fixes the count after
        # the first epoch, then ends training early ("Your input ran out of data", a warning) or
        # cuts a longer epoch short, silently. One fit call per epoch counts every epoch afresh.
        for epoch in range(first, end):
            model.fit(train_x, train_y, initial_epoch=epoch, epochs=epoch + 1, batch_size=batch_size, verbose=0,
                      callbacks=callbacks)
    else:
        model.fit(train_x, train_y, initial_epoch=first, epochs=end, batch_size=batch_size, verbose=0,
                  callbacks=callbacks)


def _fine_tune_phase(ctx: RunContext, model, train_x, train_y, batch_size, callbacks) -> None:
    """The tutorial's second phase: the backbone from --fine-tune-from up unfrozen, compiled again
    (Keras fixes what trains at compile time) at --learning-rate x --fine-tune-lr-factor, then
    --fine-tune-epochs more epochs."""
    cfg = ctx.cfg
    trained = models.unfreeze_from(ctx.backbone)
    ctx.row.update(fine_tune_layers=len(trained), fine_tune_first_layer=trained[0] if trained else "")
    with ctx.strategy.scope():
        models.compile_classifier(model, cfg.replace(learning_rate=cfg.learning_rate * cfg.fine_tune_lr_factor))
    _fit(model, cfg, train_x, train_y, batch_size, callbacks, epochs=(cfg.epochs, cfg.epochs + cfg.fine_tune_epochs))


def _breakdown(ctx: RunContext, model_rate: float, warmup_s: float, input_rate: float | None = None,
               e2e_rate: float | None = None) -> None:
    """Input-only vs model-only vs end to end, and the bottleneck verdict: the one place they
    are recorded. Rates are images/s through the same stage."""
    row = ctx.row
    row.update(model_only_img_s=model_rate, model_only_warmup_s=warmup_s)
    if input_rate is not None:
        row["input_only_img_s"] = input_rate
    if e2e_rate is not None:
        row["e2e_fraction_of_model"] = e2e_rate / model_rate
    row["bottleneck"] = "input-bound" if input_rate is not None and input_rate < model_rate else "compute-bound"
    if ctx.cfg.pipeline == "featcache" and input_rate and e2e_rate:
        row.update(metrics.pass_bound(e2e_rate, input_rate, model_rate, os.cpu_count() or 1))


def _train_rate(ctx: RunContext, model, input_dtype) -> tuple[float, float]:
    return metrics.model_only_train_rate(model, ctx.cfg.image_size, ctx.global_batch, ctx.num_classes, input_dtype,
                                         min_seconds=ctx.cfg.rate_seconds)


def _kept(files, skipped):
    gone = set(skipped)
    return tuple(f for f in files if f not in gone)


def _record_prep(ctx: RunContext, seconds: float, n_train: int, n_test: int, skipped, channels: str,
                 oriented: int | None = None, exif: str = "applied") -> None:
    """Preparation facts for the row. ``oriented``: files whose EXIF orientation asks for a turn
    (counted here, untimed, when the pipeline did not read it itself); ``exif``: whether this
    pipeline turns them upright (``applied``) or uses the pixels as stored (``ignored``)."""
    data.check_kept(ctx.dataset, skipped)  # before training: a whole class gone is an error, skips are said
    if oriented is None:
        oriented = sum(o != 1 for o in data.exif_orientations(ctx.split.train_files + ctx.split.test_files))
    ctx.row.update(data_prep_s=seconds, train_images=n_train, test_images=n_test, skipped_files=len(skipped),
                   skipped_list=";".join(map(printable, skipped)), channel_order=channels, exif_oriented_files=oriented,
                   exif_orientation=exif)


def _train_on_datasets(ctx: RunContext, train_ds, test_ds, n_train, n_test, prep, input_kind) -> RunResult:
    """The tutorial's and our tf.data pipelines from here on: fit, evaluate, break down."""
    model = _compiled(ctx, lambda: models.build_classifier(ctx.backbone, ctx.num_classes, ctx.cfg, input_kind))
    y_true, y_pred = _fit_evaluate(ctx, model, train_ds, test_ds, n_train, n_test, prep, ctx.cfg.pipeline)
    if ctx.cfg.breakdown:
        input_dtype = tf.uint8 if input_kind == "uint8" else tf.float32
        _breakdown(ctx, *_train_rate(ctx, model, input_dtype),
                   input_rate=metrics.input_only_rate(train_ds, ctx.global_batch), e2e_rate=ctx.row["end_to_end_img_s"])
    return RunResult(ctx.row, model, y_true=y_true, y_pred=y_pred)
