"""Train and evaluate one configuration: one runner per pipeline, all called the same way.

``run`` builds a :class:`RunContext` (configuration, data, split, strategy, backbone, the row
being filled) and hands it to the pipeline's runner from ``RUNNERS``. Every runner fits and
evaluates through ``_fit_evaluate`` and records its per-stage breakdown through
``_breakdown``. The result is a flat dict of metrics (one CSV row) plus what later steps need
(the model, test predictions). Times are wall seconds in this process; the first epoch
(tracing, compilation, cache fill) is reported on its own and excluded from steady-state figures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from . import baseline, cluster, data, distribute, engine, featurestore, metrics, mobilenet, pipeline, profiling
from . import quantize, runtime
from . import model as models
from .config import RunConfig
from .errors import DataError, UnsupportedError, UserError, printable
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
    loads): featcache trained only a head on features, so its model is the frozen backbone
    (``result.backbone``, kept with ``keep_model``) with that head on top, fed uint8 like tfdata's."""
    if cfg.pipeline != "featcache":
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

    @property
    def num_classes(self) -> int:
        return len(self.dataset.classes) if self.dataset else MODELONLY_CLASSES


@dataclass(frozen=True)
class Runner:
    run: Callable[[RunContext], RunResult]
    needs_data: bool = True


def run(cfg: RunConfig, cache: Path, progress: bool = True, keep_model: bool = False,
        predictions: bool = True) -> RunResult:
    """Train and evaluate ``cfg``; the process-global setup (runtime.setup) must be done first.
    ``predictions=False`` skips predicting the test set a second time after evaluation (the
    result's ``y_pred`` stays empty): a sweep's rows need only the evaluation's metrics."""
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
                     predictions=predictions)
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
                  label: str, train_y=None, test_y=None, batch_size=None, extra_s: float = 0.0):
    """Fit for the configured epochs, evaluate, predict: epoch times, steady state, totals and
    test metrics go into the row; returns (y_true, y_pred). ``x`` is a dataset, or an array with
    ``y`` and ``batch_size`` (the naive way)."""
    cfg, row = ctx.cfg, ctx.row
    timer = metrics.EpochTimer()
    bar = _Progress(-(-n_train // ctx.global_batch), label, ctx.progress)
    try:
        with _files_stay(ctx):
            _fit(model, cfg, train_x, train_y, batch_size,
                 [timer, bar, _StopOnDivergence(cfg.learning_rate, ctx.num_classes)])
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
            with _files_stay(ctx):
                n_train = sum(int(tf.shape(x)[0]) for x, _ in train_ds)
                n_test = sum(int(tf.shape(x)[0]) for x, _ in test_ds)
        except tf.errors.InvalidArgumentError:
            # The tutorial's loader stops at the first undecodable file (ours skips and counts);
            # TensorFlow does not say which file, so find them.
            raise _tutorial_decode_error(ctx.dataset, split.train_files + split.test_files) from None
        prep = time.perf_counter() - start
        # TF's loader uses the pixels as stored: EXIF orientation ignored, unlike cv2 and our tf.data.
        _record_prep(ctx, prep, n_train, n_test, [], "RGB", exif="ignored")
        ctx.row["skipped_files"] = len(split.train_files) + len(split.test_files) - n_train - n_test
        return _train_on_datasets(ctx, train_ds, test_ds, n_train, n_test, prep, "float255")


def _tutorial_decode_error(dataset: data.ImageFolder, files) -> DataError:
    """Which of ``files`` the tutorial's loader (``tf.io.decode_image``) cannot decode, as one
    error (a class none of whose images decode is named as that)."""
    bad = []
    for path in files:
        try:
            tf.io.decode_image(tf.io.read_file(os.fsencode(path)), channels=3, expand_animations=False)
        except (tf.errors.OpError, ValueError):
            bad.append(path)
    data.check_classes(dataset, bad)
    first = bad[0] if bad else "an image"
    return DataError(f"{first}: cannot be decoded as an image by the tutorial's loader ({len(bad)} such files), "
                     "which stops at them; remove them, or use --pipeline tfdata, which skips and counts them")


def _run_tfdata(ctx: RunContext) -> RunResult:
    cfg = ctx.cfg
    dec = pipeline.prepare(cfg, ctx.split, ctx.progress)
    _record_prep(ctx, dec.seconds, dec.n_train, dec.n_test, dec.skipped, "RGB", dec.oriented)
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


@dataclass
class Features:
    """One part's features from the feature pass, in file order, and what it cost."""

    features: np.ndarray
    labels: np.ndarray
    files: tuple  # the files that decoded, aligned with the rows
    seconds: float


def _feature_engine(ctx: RunContext) -> tuple[engine.Engine, float]:
    """The engine that runs the frozen backbone, warmed up on one in-memory batch (tracing, XLA
    compile, OpenVINO's first inference): (engine, warm-up seconds); its setup is ``setup_s``."""
    cfg = ctx.cfg
    fn = models.feature_function(ctx.backbone, cfg.image_size, cfg.xla_backbone)
    if cfg.precision == "int8":
        eng = _int8_engine(ctx, fn)
    else:
        eng = engine.make(cfg.engine, fn, cfg.precision, ctx.backbone.compute_dtype)
    start = time.perf_counter()
    eng(np.zeros((cfg.feature_batch, cfg.image_size, cfg.image_size, 3), np.uint8))
    return eng, time.perf_counter() - start


def _int8_engine(ctx: RunContext, fn) -> engine.Engine:
    """OpenVINO on NNCF's int8 model of ``fn``, calibrated on a seeded sample of the training
    images (or taken from the store), then checked on other training images against TensorFlow
    float32: below ``--int8-min-cosine`` the run stops with a skipped row, never labelled int8.
    Calibration and quantization count in the engine's setup (so in ``total_s``) and on their own."""
    cfg, split = ctx.cfg, ctx.split
    calibrate, held_out = quantize.sample(split.train_files, cfg.calibration_images, cfg.seed)

    def decoded(files):
        stream = pipeline.feature_stream(files, np.zeros(len(files), np.int32), cfg, cfg.feature_batch)
        return [images.numpy() for images, _, _ in stream]

    q = quantize.quantized_model(lambda: engine.convert(fn), cfg, ctx.cache,
                                 featurestore.model_fingerprint(ctx.backbone.handle), calibrate,
                                 lambda: decoded(calibrate))
    eng = engine.make("openvino", fn, "int8", model=q.model)
    eng.setup_s += q.seconds
    if eng.precision != "int8":
        raise UnsupportedError(f"--precision int8: OpenVINO ran the quantized model's convolutions in {eng.precision}"
                               ", not int8; use --precision fp32")
    start = time.perf_counter()
    cosine = q.info.get("cosine")
    if cosine is None:
        cosine = _feature_cosine(ctx, eng, images=np.concatenate(decoded(held_out)))
    ctx.row.update(quantize_s=q.seconds, quantized_reused=q.reused, calibration_files=len(calibrate),
                   feature_cosine_vs_fp32=cosine, feature_cosine_on=f"{len(held_out)} held-out training images",
                   feature_check_s=time.perf_counter() - start)
    if cosine < cfg.int8_min_cosine:
        raise UnsupportedError(f"--precision int8: the quantized features moved too far from float32's (least cosine "
                               f"{cosine:.4f} on {len(held_out)} held-out training images, below --int8-min-cosine "
                               f"{cfg.int8_min_cosine}); calibrate on more images (--calibration-images) or use "
                               "--precision mixed or fp32")
    if not q.reused:
        quantize.save(ctx.cache, q.info["digest"], q.model, dict(q.info, cosine=cosine))
    return eng


def _stream_features(ctx: RunContext, eng: engine.Engine, files, labels, part: str) -> Features:
    """Decode ``files`` and run them through ``eng`` in one overlapped stream (see
    pipeline.feature_stream): nothing but the features is kept."""
    cfg = ctx.cfg
    stream = pipeline.feature_stream(files, labels, cfg, cfg.feature_batch)
    steps = -(-len(files) // cfg.feature_batch)
    batches = ((images, (y.numpy(), paths.numpy())) for images, y, paths in
               tqdm(stream, desc=f"{part}: features", total=steps, unit="batch", disable=not ctx.progress, leave=False))
    start = time.perf_counter()
    out = eng.run(batches)
    seconds = time.perf_counter() - start
    kept = tuple(pipeline.path_str(p) for _, (_, paths) in out for p in paths)
    pipeline.undecodable(files, kept, cfg.strict, part)
    dim = ctx.backbone.feature_dim
    feats = np.concatenate([f for f, _ in out]) if out else np.zeros((0, dim), np.float32)
    y = np.concatenate([y for _, (y, _) in out]) if out else np.zeros(0, np.int32)
    return Features(feats, y, kept, seconds)


def _stored_features(stored: dict, files, labels, strict: bool, part: str) -> Features:
    """One part's features from a ``featurestore`` file: the files it lacks did not decode."""
    kept = tuple(f for f in files if f in stored)
    pipeline.undecodable(files, kept, strict, part)
    label_of = dict(zip(files, labels))
    return Features(np.stack([stored[f] for f in kept]), np.asarray([label_of[f] for f in kept], np.int32), kept, 0.0)


def _run_featcache(ctx: RunContext) -> RunResult:
    """Frozen backbone, no augmentation: compute each image's features once, streamed straight
    from the files, then train the head on them. The train images' pass counts towards a trained
    model, the test images' towards evaluation; the engine's setup and warm-up are timed apart.
    With ``reuse_features``, features stored by an earlier run with the same key are loaded instead."""
    cfg, row, split = ctx.cfg, ctx.row, ctx.split
    digest, parts, stored = "", {}, None
    if cfg.reuse_features:
        digest, parts = featurestore.key(cfg, ctx.backbone.handle, ctx.backbone.compute_dtype,
                                         split.train_files + split.test_files)
        start = time.perf_counter()
        stored = featurestore.load(ctx.cache, digest)
    if stored is not None:
        train_f = _stored_features(stored[0], split.train_files, split.train_labels, cfg.strict, "train")
        test_f = _stored_features(stored[0], split.test_files, split.test_labels, cfg.strict, "test")
        # No pass ran: its cost is reading the file; its rate is not measured.
        train_f.seconds = time.perf_counter() - start
        eng, warm, precision, pass_rate = None, 0.0, stored[1], float("nan")
        row["engine_setup_s"] = 0.0
        # Another engine's cosine is the one stored with its features (NaN in a store from before it
        # was kept: the breakdown measures it); TensorFlow's is the backbone's, unless one was stored.
        if cfg.engine != "tf" or not math.isnan(stored[2]):
            row["feature_cosine_vs_fp32"] = stored[2]
    else:
        eng, warm = _feature_engine(ctx)
        train_f = _stream_features(ctx, eng, split.train_files, split.train_labels, "train")
        test_f = _stream_features(ctx, eng, split.test_files, split.test_labels, "test")
        precision, pass_rate = eng.precision, len(train_f.files) / train_f.seconds
        row.update(engine_setup_s=eng.setup_s)
        if eng.name != "tf" and "feature_cosine_on" not in row:
            # Every row of another engine says how far it moved the features (bf16 most of all);
            # a check, not part of the job: timed on its own, outside total_s.
            start = time.perf_counter()
            row.update(feature_cosine_vs_fp32=_feature_cosine(ctx, eng), feature_cosine_on="8 synthetic flowers",
                       feature_check_s=time.perf_counter() - start)
        if digest:
            featurestore.save(ctx.cache, digest, parts, train_f.files + test_f.files,
                              np.concatenate([train_f.features, test_f.features]), precision,
                              row.get("feature_cosine_vs_fp32", float("nan")))
    skipped = sorted(set(split.train_files) - set(train_f.files)) + sorted(set(split.test_files) - set(test_f.files))
    # Decoding happens inside the feature pass: there is no separate preparation step.
    _record_prep(ctx, 0.0, len(train_f.files), len(test_f.files), skipped, "RGB")
    feature_pass = row["engine_setup_s"] + warm + train_f.seconds
    row.update(compute_dtype=precision, feature_batch=cfg.feature_batch, feature_pass_warmup_s=warm,
               feature_pass_s=train_f.seconds,
               feature_pass_img_s=pass_rate, test_feature_pass_s=test_f.seconds, features_reused=stored is not None,
               features_key=digest, feature_cache_mb=(train_f.features.nbytes + test_f.features.nbytes) / 2**20)
    train_ds, test_ds = pipeline.feature_datasets(train_f.features, train_f.labels, test_f.features, test_f.labels,
                                                  cfg, ctx.global_batch)

    def build():
        keras.utils.set_random_seed(cfg.seed)
        return models.head_model(ctx.num_classes, ctx.backbone.feature_dim, cfg)

    model = _compiled(ctx, build)
    n_train, n_test = len(train_f.files), len(test_f.files)
    ctx.profile_extra = lambda: profiling.feature_slice(eng or _feature_engine(ctx)[0], split.train_files,
                                                        split.train_labels, cfg)
    y_true, y_pred = _fit_evaluate(ctx, model, train_ds, test_ds, n_train, n_test, 0.0, "head", extra_s=feature_pass)
    # End to end, an image costs its feature pass plus its head epochs.
    row["end_to_end_img_s"] = n_train * cfg.epochs / (feature_pass + row["train_s"])
    # Evaluating from images includes computing the test images' features.
    row["eval_s"] += test_f.seconds
    row["eval_img_s"] = n_test / row["eval_s"]
    row["decode_img_s"] = float("nan")
    if cfg.breakdown:
        if eng is None:  # features were reused: the engine is built only to be measured
            eng, _ = _feature_engine(ctx)
        rate, warm_s = _engine_rates(ctx, eng)
        sample = split.train_files[:8 * cfg.feature_batch]
        input_rate = metrics.input_only_rate(
            pipeline.feature_stream(sample, split.train_labels[:len(sample)], cfg, cfg.feature_batch),
            cfg.feature_batch)
        row["decode_img_s"] = input_rate
        # The stage that the backbone limits is the feature pass, not the head's epochs.
        _breakdown(ctx, rate, warm_s, input_rate=input_rate,
                   e2e_rate=None if stored is not None else row["feature_pass_img_s"])
    return RunResult(row, model, y_true=y_true, y_pred=y_pred, test_files=test_f.files)


def _engine_rates(ctx: RunContext, eng: engine.Engine) -> tuple[float, float]:
    """The feature engine's forward images/s on one in-memory batch (and its warm-up seconds),
    measured in turns with TensorFlow float32 on the same batch in this process unless the engine
    is that already: ``tf_fp32_forward_img_s``, ``engine_speedup_vs_tf_fp32`` and, for another engine,
    ``feature_cosine_vs_fp32`` go into the row."""
    cfg = ctx.cfg
    x = np.random.default_rng(0).integers(0, 256, (cfg.feature_batch, cfg.image_size, cfg.image_size, 3),
                                          dtype=np.uint8)
    # Several batches per call, so that an engine with several streams keeps them all busy.
    steps = {"engine": lambda: eng.run([(x, None)] * 4)}
    # (A grappler rewrite is process-wide: no float32 TensorFlow function is left to compare with.)
    if (eng.name != "tf" or eng.precision != "float32") and not ctx.backbone.mixed_route.startswith("grappler"):
        fp32 = dataclasses.replace(ctx.backbone, layer=ctx.backbone.hub_layer)
        reference = engine.make("tf", models.feature_function(fp32, cfg.image_size))
        steps["tf_fp32"] = lambda: reference.run([(x, None)] * 4)
    rates, warm, ratio = metrics.interleaved_rates(steps, 4 * cfg.feature_batch, rounds=3,
                                                   min_seconds=cfg.rate_seconds / 3)
    if "tf_fp32" in steps and eng.name != "tf" and math.isnan(ctx.row.get("feature_cosine_vs_fp32", math.nan)):
        ctx.row["feature_cosine_vs_fp32"] = _feature_cosine(ctx, eng, reference)  # not kept with reused features
    same = eng.name == "tf" and eng.precision == "float32"
    ctx.row.update(tf_fp32_forward_img_s=rates["engine"] if same else rates.get("tf_fp32", float("nan")),
                   engine_speedup_vs_tf_fp32=1.0 if same else ratio)
    return rates["engine"], warm["engine"]


def _feature_cosine(ctx: RunContext, eng: engine.Engine, reference: engine.Engine | None = None,
                    images: np.ndarray | None = None) -> float:
    """The least cosine similarity between ``eng``'s features and TensorFlow float32's on uint8
    ``images`` (default 8 synthetic flowers): how far this engine (and its precision) moves them."""
    cfg = ctx.cfg
    if reference is None:
        fp32 = dataclasses.replace(ctx.backbone, layer=ctx.backbone.hub_layer)
        reference = engine.make("tf", models.feature_function(fp32, cfg.image_size))
    if images is None:
        images = np.round((mobilenet.calibration_images(8, cfg.image_size, seed=123) + 1.0) * 127.5).astype(np.uint8)
    return float(models.cosine(eng(images), reference(images)).min())


def _run_modelonly(ctx: RunContext) -> RunResult:
    """tf_cnn_benchmarks' synthetic mode: train steps on one in-memory batch, no dataset at all.

    It isolates the model (and XLA's compile time) from the input, in a few steps instead of
    epochs: on a CPU, XLA runs MobileNetV2 too slowly to train a whole set within a sweep."""
    model = _compiled(ctx, lambda: models.build_classifier(ctx.backbone, ctx.num_classes, ctx.cfg, "uint8"))
    rate, warm = metrics.model_only_train_rate(model, ctx.cfg.image_size, ctx.global_batch, ctx.num_classes,
                                               tf.uint8, min_seconds=ctx.cfg.rate_seconds, min_calls=2)
    ctx.row.update(train_img_s=rate, end_to_end_img_s=rate)
    _breakdown(ctx, rate, warm)
    ctx.profile_steps = profiling.Steps(model, profiling.batch_steps, ctx.cfg.image_size, ctx.global_batch,
                                        ctx.num_classes)
    return RunResult(ctx.row, model)


RUNNERS = {
    "naive": Runner(_run_naive),
    "tutorial": Runner(_run_tutorial),
    "tfdata": Runner(_run_tfdata),
    "featcache": Runner(_run_featcache),
    "modelonly": Runner(_run_modelonly, needs_data=False),
}
