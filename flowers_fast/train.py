"""Train and evaluate one configuration: one runner per pipeline, all called the same way.

``run`` builds a :class:`RunContext` (configuration, data, split, strategy, backbone, the row
being filled) and hands it to the pipeline's runner from ``RUNNERS``. Every runner fits and
evaluates through ``_fit_evaluate`` and records its per-stage breakdown through
``_breakdown``. The result is a flat dict of metrics (one CSV row) plus what later steps need
(the model, test predictions). Times are wall seconds in this process; the first epoch
(tracing, compilation, cache fill) is reported on its own and excluded from steady-state figures.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from . import baseline, cluster, data, distribute, metrics, pipeline
from . import model as models
from .config import RunConfig
from .errors import DataError
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

    @property
    def num_classes(self) -> int:
        return len(self.dataset.classes) if self.dataset else MODELONLY_CLASSES


@dataclass(frozen=True)
class Runner:
    run: Callable[[RunContext], RunResult]
    needs_data: bool = True


def run(cfg: RunConfig, cache: Path, progress: bool = True, keep_model: bool = False) -> RunResult:
    """Train and evaluate ``cfg``; the process-global setup (runtime.setup) must be done first."""
    t_start = time.perf_counter()
    runner = RUNNERS[cfg.pipeline]
    strategy = distribute.strategy(cfg)
    replicas = strategy.num_replicas_in_sync
    member = cluster.current() if cfg.strategy == "multiworker" else None
    ctx = RunContext(cfg, cache, progress, strategy, cfg.batch_size * replicas,
                     row={"replicas": replicas, "global_batch": cfg.batch_size * replicas,
                          "workers": member.workers if member else 1,
                          "cluster_task": f"{member.task[0]} {member.task[1]}" if member else ""})
    # A peer that died or timed out: one line instead of TensorFlow's "Graph execution error:" page.
    with cluster.one_line_failures(member is not None):
        return _run(ctx, runner, t_start, keep_model)


def _run(ctx: RunContext, runner: Runner, t_start: float, keep_model: bool) -> RunResult:
    cfg, cache, strategy = ctx.cfg, ctx.cache, ctx.strategy
    if runner.needs_data:
        ctx.dataset = data.resolve(cfg, cache)
        ctx.split = data.split(ctx.dataset, cfg.test_fraction, cfg.seed)
        ctx.row["ignored_files"] = len(ctx.dataset.ignored)
    else:
        ctx.row["dataset"] = "in-memory"
    ctx.row["classes"] = ctx.num_classes

    t0 = time.perf_counter()
    with strategy.scope():
        keras.utils.set_random_seed(cfg.seed)
        ctx.backbone = models.build_backbone(cfg, cache)
    b = ctx.backbone
    ctx.row.update(handle=b.handle, weights=b.weights, compute_dtype=b.compute_dtype, feature_dim=b.feature_dim,
                   model_build_s=time.perf_counter() - t0)

    result = runner.run(ctx)
    row = ctx.row
    if runner.needs_data:
        # One-time preparation rate (naive: cv2 load into arrays; tf.data: first pass, decode + cache fill).
        row["decode_img_s"] = (row["train_images"] + row["test_images"]) / row["data_prep_s"]
    row["peak_rss_mb"] = metrics.peak_rss_mb()
    row["peak_gpu_mb"] = metrics.peak_gpu_mb()
    row["wall_s"] = time.perf_counter() - t_start
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


def _compiled(ctx: RunContext, build) -> "keras.Model":
    """``build()`` under the strategy's scope, compiled for this configuration."""
    with ctx.strategy.scope():
        model = build()
        models.compile_classifier(model, ctx.cfg)
    return model


def _fit_evaluate(ctx: RunContext, model, train_x, test_x, n_train: int, n_test: int, prep_s: float,
                  label: str, train_y=None, test_y=None, batch_size=None, extra_s: float = 0.0):
    """Fit for the configured epochs, evaluate, predict: epoch times, steady state, totals and
    test metrics go into the row; returns (y_true, y_pred). ``x`` is a dataset, or an array with
    ``y`` and ``batch_size`` (the naive way)."""
    cfg, row = ctx.cfg, ctx.row
    timer = metrics.EpochTimer()
    bar = _Progress(-(-n_train // ctx.global_batch), label, ctx.progress)
    try:
        _fit(model, cfg, train_x, train_y, batch_size, [timer, bar])
    finally:
        bar.close()  # an error message then starts on its own line
    times = timer.times
    if len(times) != cfg.epochs:
        raise RuntimeError(f"training ran {len(times)} of {cfg.epochs} epochs: the input ran out of data early "
                           "(Keras stops without an error); every epoch must see the whole training set")
    row.update(first_epoch_s=times[0], **metrics.steady(times), train_s=sum(times))
    row["train_img_s"] = n_train / row["steady_epoch_s"] if len(times) > 1 else n_train / times[0]
    row["end_to_end_img_s"] = row["train_img_s"]
    row["total_s"] = prep_s + extra_s + sum(times)
    row["epoch_times_s"] = " ".join(f"{t:.3f}" for t in times)

    start = time.perf_counter()
    loss, acc = model.evaluate(test_x, test_y, batch_size=batch_size, verbose=0)
    row.update(test_accuracy=float(acc), test_loss=float(loss), eval_s=time.perf_counter() - start)
    row["eval_img_s"] = n_test / row["eval_s"]
    y_pred = np.argmax(model.predict(test_x, batch_size=batch_size, verbose=0), axis=-1)
    y_true = np.asarray(test_y) if test_y is not None else np.concatenate([y.numpy() for _, y in test_x])
    return y_true, y_pred


def _fit(model, cfg: RunConfig, train_x, train_y, batch_size, callbacks) -> None:
    if cfg.data_service:
        # A tf.data service epoch ends when its workers run dry, and with several service workers
        # or trainers the number of steps changes from epoch to epoch. Keras fixes the count after
        # the first epoch, then ends training early ("Your input ran out of data", a warning) or
        # cuts a longer epoch short, silently. One fit call per epoch counts every epoch afresh.
        for epoch in range(cfg.epochs):
            model.fit(train_x, train_y, initial_epoch=epoch, epochs=epoch + 1, batch_size=batch_size, verbose=0,
                      callbacks=callbacks)
    else:
        model.fit(train_x, train_y, epochs=cfg.epochs, batch_size=batch_size, verbose=0, callbacks=callbacks)


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


def _train_rate(ctx: RunContext, model, input_dtype) -> tuple[float, float]:
    return metrics.model_only_train_rate(model, ctx.cfg.image_size, ctx.global_batch, ctx.num_classes, input_dtype)


def _kept(files, skipped):
    gone = set(skipped)
    return tuple(f for f in files if f not in gone)


def _record_prep(ctx: RunContext, seconds: float, n_train: int, n_test: int, skipped, channels: str) -> None:
    ctx.row.update(data_prep_s=seconds, train_images=n_train, test_images=n_test, skipped_files=len(skipped),
                   skipped_list=";".join(skipped), channel_order=channels)


# --- the runners ----------------------------------------------------------------------------

def _run_naive(ctx: RunContext) -> RunResult:
    cfg = ctx.cfg
    start = time.perf_counter()
    X_train, y_train, X_test, y_test, skipped = baseline.prepare(ctx.dataset, ctx.split, cfg.image_size,
                                                                 cfg.naive_rgb, ctx.progress, cfg.strict)
    prep = time.perf_counter() - start
    _record_prep(ctx, prep, len(X_train), len(X_test), skipped, "RGB" if cfg.naive_rgb else "BGR")
    model = _compiled(ctx, lambda: models.build_classifier(ctx.backbone, ctx.num_classes, cfg, input_kind="unit"))
    y_true, y_pred = _fit_evaluate(ctx, model, X_train, X_test, len(X_train), len(X_test), prep, "naive",
                                   train_y=y_train, test_y=y_test, batch_size=ctx.global_batch)
    if cfg.breakdown:
        # The naive input path: decoding is the load above; an in-memory array feeds at memory speed.
        _breakdown(ctx, *_train_rate(ctx, model, tf.float32), input_rate=(len(X_train) + len(X_test)) / prep,
                   e2e_rate=ctx.row["end_to_end_img_s"])
    return RunResult(ctx.row, model, y_true=y_true, y_pred=y_pred, test_files=_kept(ctx.split.test_files, skipped))


def _run_tutorial(ctx: RunContext) -> RunResult:
    cfg, split = ctx.cfg, ctx.split
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flowers_fast_tutorial_") as work:
        train_ds, test_ds = pipeline.tutorial_datasets(split, ctx.dataset.classes, cfg, ctx.global_batch, Path(work))
        # Fill the cache (the tutorial's first epoch would); counts as data preparation.
        try:
            n_train = sum(int(tf.shape(x)[0]) for x, _ in train_ds)
            n_test = sum(int(tf.shape(x)[0]) for x, _ in test_ds)
        except tf.errors.InvalidArgumentError as exc:
            # The tutorial's loader stops at the first undecodable file; ours skips and counts.
            raise DataError(f"--pipeline tutorial: an image cannot be decoded ({str(exc).splitlines()[0][:120]}); "
                            "remove it, or use --pipeline tfdata, which skips and counts such files") from None
        prep = time.perf_counter() - start
        _record_prep(ctx, prep, n_train, n_test, [], "RGB")
        ctx.row["skipped_files"] = len(split.train_files) + len(split.test_files) - n_train - n_test
        return _train_on_datasets(ctx, train_ds, test_ds, n_train, n_test, prep, "float255")


def _run_tfdata(ctx: RunContext) -> RunResult:
    cfg = ctx.cfg
    dec = pipeline.prepare(cfg, ctx.split, ctx.progress)
    _record_prep(ctx, dec.seconds, dec.n_train, dec.n_test, dec.skipped, "RGB")
    train_ds = distribute.maybe_data_service(pipeline.train_dataset(dec.train, cfg, ctx.global_batch), cfg)
    test_ds = pipeline.eval_dataset(dec.test, cfg, ctx.global_batch)
    result = _train_on_datasets(ctx, train_ds, test_ds, dec.n_train, dec.n_test, dec.seconds, "uint8")
    result.test_files = _kept(ctx.split.test_files, dec.skipped)
    return result


def _train_on_datasets(ctx: RunContext, train_ds, test_ds, n_train, n_test, prep, input_kind) -> RunResult:
    """The tutorial's and our tf.data pipelines from here on: fit, evaluate, break down."""
    model = _compiled(ctx, lambda: models.build_classifier(ctx.backbone, ctx.num_classes, ctx.cfg, input_kind))
    y_true, y_pred = _fit_evaluate(ctx, model, train_ds, test_ds, n_train, n_test, prep, ctx.cfg.pipeline)
    if ctx.cfg.breakdown:
        input_dtype = tf.uint8 if input_kind == "uint8" else tf.float32
        _breakdown(ctx, *_train_rate(ctx, model, input_dtype),
                   input_rate=metrics.input_only_rate(train_ds, ctx.global_batch), e2e_rate=ctx.row["end_to_end_img_s"])
    return RunResult(ctx.row, model, y_true=y_true, y_pred=y_pred)


def _feature_pass(ctx: RunContext, dec: pipeline.Decoded):
    """The one-time feature pass: its first batch (tracing, XLA compile) timed on its own; the
    train images' pass counts towards a trained model, the test images' towards evaluation."""
    cfg, batch = ctx.cfg, ctx.cfg.feature_batch_size
    fn = models.feature_function(ctx.backbone, cfg.image_size, cfg.xla_backbone)
    start = time.perf_counter()
    models.extract_features(fn, pipeline.eval_dataset(dec.train.take(batch), cfg, batch))
    warm = time.perf_counter() - start
    start = time.perf_counter()
    f_train, y_train = models.extract_features(fn, pipeline.eval_dataset(dec.train, cfg, batch))
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    f_test, y_test = models.extract_features(fn, pipeline.eval_dataset(dec.test, cfg, batch))
    test_s = time.perf_counter() - start
    ctx.row.update(feature_pass_warmup_s=warm, feature_pass_s=train_s, feature_pass_img_s=len(f_train) / train_s,
                   test_feature_pass_s=test_s, feature_cache_mb=(f_train.nbytes + f_test.nbytes) / 2**20)
    return f_train, y_train, f_test, y_test, warm + train_s, test_s


def _run_featcache(ctx: RunContext) -> RunResult:
    """Frozen backbone, no augmentation: compute each image's features once, train the head on them."""
    cfg, row = ctx.cfg, ctx.row
    dec = pipeline.prepare(cfg, ctx.split, ctx.progress)
    _record_prep(ctx, dec.seconds, dec.n_train, dec.n_test, dec.skipped, "RGB")
    f_train, y_train, f_test, y_test, feature_pass, test_pass = _feature_pass(ctx, dec)
    train_ds, test_ds = pipeline.feature_datasets(f_train, y_train, f_test, y_test, cfg, ctx.global_batch)

    def build():
        keras.utils.set_random_seed(cfg.seed)
        return models.head_model(ctx.num_classes, ctx.backbone.feature_dim, cfg)

    model = _compiled(ctx, build)
    y_true, y_pred = _fit_evaluate(ctx, model, train_ds, test_ds, dec.n_train, dec.n_test, dec.seconds, "head",
                                   extra_s=feature_pass)
    # End to end, an image costs its feature pass plus its head epochs.
    row["end_to_end_img_s"] = dec.n_train * cfg.epochs / (feature_pass + row["train_s"])
    # Evaluating from images includes computing the test images' features.
    row["eval_s"] += test_pass
    row["eval_img_s"] = dec.n_test / row["eval_s"]
    if cfg.breakdown:
        fwd = tf.function(lambda x: ctx.backbone.layer(x, training=False), jit_compile=cfg.xla_backbone)
        rate, warm = metrics.forward_rate(fwd, cfg.image_size, cfg.feature_batch_size)
        input_rate = metrics.input_only_rate(pipeline.eval_dataset(dec.train, cfg, ctx.global_batch), ctx.global_batch)
        # The stage that the backbone limits is the feature pass, not the head's epochs.
        _breakdown(ctx, rate, warm, input_rate=input_rate, e2e_rate=row["feature_pass_img_s"])
    return RunResult(row, model, y_true=y_true, y_pred=y_pred, test_files=_kept(ctx.split.test_files, dec.skipped))


def _run_modelonly(ctx: RunContext) -> RunResult:
    """tf_cnn_benchmarks' synthetic mode: train steps on one in-memory batch, no dataset at all.

    It isolates the model (and XLA's compile time) from the input, in a few steps instead of
    epochs: on a CPU, XLA runs MobileNetV2 too slowly to train a whole set within a sweep."""
    model = _compiled(ctx, lambda: models.build_classifier(ctx.backbone, ctx.num_classes, ctx.cfg, "uint8"))
    rate, warm = metrics.model_only_train_rate(model, ctx.cfg.image_size, ctx.global_batch, ctx.num_classes,
                                               tf.uint8, min_seconds=5.0, min_calls=2)
    ctx.row.update(train_img_s=rate, end_to_end_img_s=rate)
    _breakdown(ctx, rate, warm)
    return RunResult(ctx.row, model)


RUNNERS = {
    "naive": Runner(_run_naive),
    "tutorial": Runner(_run_tutorial),
    "tfdata": Runner(_run_tfdata),
    "featcache": Runner(_run_featcache),
    "modelonly": Runner(_run_modelonly, needs_data=False),
}
