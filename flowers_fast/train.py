"""Train and evaluate one configuration, every pipeline through the same model builder.

``run`` returns a flat dict of metrics (one CSV row) plus what later steps need (the model,
test predictions). Times are wall seconds on this process; the first epoch (tracing,
compilation, cache fill) is reported on its own and excluded from steady-state figures.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import baseline, data, distribute, metrics, pipeline
from . import model as models
from .config import RunConfig
from .errors import DataError
from .tfkeras import keras, tf


@dataclass
class RunResult:
    row: dict
    model: object = None
    classes: tuple = ()
    y_true: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    y_pred: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    test_files: tuple = ()  # aligned with y_true / y_pred
    backbone: object = None


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
        if self.bar is not None:
            self.bar.close()


def _fit(model, x, cfg, steps, progress, label, y=None, batch_size=None):
    timer = metrics.EpochTimer()
    callbacks = [timer, _Progress(steps, label, progress)]
    history = model.fit(x, y, epochs=cfg.epochs, batch_size=batch_size, verbose=0, callbacks=callbacks)
    return timer.times, history.history


def _evaluate(model, x, n_images, y=None, batch_size=None):
    start = time.perf_counter()
    loss, acc = model.evaluate(x, y, batch_size=batch_size, verbose=0)
    seconds = time.perf_counter() - start
    return {"test_accuracy": float(acc), "test_loss": float(loss), "eval_s": seconds,
            "eval_img_s": n_images / seconds}


def _predict(model, x, batch_size=None):
    return np.argmax(model.predict(x, batch_size=batch_size, verbose=0), axis=-1)


def _first_pass(decoded, files, strict: bool, progress: bool, label: str):
    """Iterate the (image, label, path) dataset once: fills the cache and finds undecodable files."""
    seen = set()
    for _, _, paths in tqdm(decoded.batch(256), desc=f"{label}: decode+cache", unit="batch", disable=not progress,
                            leave=False):
        seen.update(p.decode() for p in paths.numpy())
    skipped = sorted(set(files) - seen)
    if skipped and strict:
        raise DataError(f"{skipped[0]}: cannot be decoded as an image ({len(skipped)} such files); remove them or "
                        "drop --strict to skip them")
    if len(seen) == 0:
        raise DataError("no image in the dataset could be decoded; check --data-dir")
    return skipped


def _tfdata(cfg, split, progress):
    """Decoded, cached train/test datasets of (uint8 image, label), the kept image counts, prep
    seconds and the skipped files."""
    start = time.perf_counter()
    out, counts, skipped = [], [], []
    for part, files, labels in (("train", split.train_files, split.train_labels),
                                ("test", split.test_files, split.test_labels)):
        decoded = pipeline.cached(pipeline.decode_dataset(files, labels, cfg, with_path=True), cfg, part)
        part_skipped = _first_pass(decoded, files, cfg.strict, progress, part)
        skipped += part_skipped
        counts.append(len(files) - len(part_skipped))
        out.append(decoded.map(lambda image, label, path: (image, label)))
    return out[0], out[1], counts[0], counts[1], time.perf_counter() - start, skipped


def _tfdata_prep(cfg, split, progress, row):
    """``_tfdata``, its preparation figures recorded in ``row``."""
    train_dec, test_dec, n_train, n_test, prep, skipped = _tfdata(cfg, split, progress)
    row.update(data_prep_s=prep, train_images=n_train, test_images=n_test, skipped_files=len(skipped),
               skipped_list=";".join(skipped), channel_order="RGB")
    return train_dec, test_dec, n_train, n_test, prep, skipped


def run(cfg: RunConfig, cache: Path, progress: bool = True, keep_model: bool = False) -> RunResult:
    """Train and evaluate ``cfg``; the process-global setup (runtime.setup) must be done first."""
    t_start = time.perf_counter()
    if cfg.pipeline == "modelonly":
        return _run_modelonly(cfg, cache, t_start)
    dataset = data.resolve(cfg, cache)
    split = data.split(dataset, cfg.test_fraction, cfg.seed)
    strategy = distribute.strategy(cfg)
    replicas = strategy.num_replicas_in_sync
    global_batch = cfg.batch_size * replicas
    num_classes = len(dataset.classes)
    row: dict = {"classes": num_classes, "replicas": replicas, "global_batch": global_batch,
                 "ignored_files": len(dataset.ignored)}

    t0 = time.perf_counter()
    with strategy.scope():
        keras.utils.set_random_seed(cfg.seed)
        backbone = models.build_backbone(cfg, cache)
    row.update(handle=backbone.handle, weights=backbone.weights, compute_dtype=backbone.compute_dtype,
               feature_dim=backbone.feature_dim, model_build_s=time.perf_counter() - t0)

    runner = {"naive": _run_naive, "tutorial": _run_tutorial, "tfdata": _run_tfdata,
              "featcache": _run_featcache}[cfg.pipeline]
    result = runner(cfg, dataset, split, backbone, strategy, global_batch, num_classes, progress, row)
    # One-time preparation rate (naive: cv2 load into arrays; tf.data: first pass, decode + cache fill).
    row["decode_img_s"] = (row["train_images"] + row["test_images"]) / row["data_prep_s"]
    row["peak_rss_mb"] = metrics.peak_rss_mb()
    row["peak_gpu_mb"] = metrics.peak_gpu_mb()
    row["wall_s"] = time.perf_counter() - t_start
    result.classes = dataset.classes
    if keep_model:
        result.backbone = backbone
    else:
        result.model = None
    return result


def _finish_epochs(row, times, n_train, prep_s, extra_s=0.0):
    row.update(first_epoch_s=times[0], **metrics.steady(times), train_s=sum(times))
    row["train_img_s"] = n_train / row["steady_epoch_s"] if len(times) > 1 else n_train / times[0]
    row["end_to_end_img_s"] = row["train_img_s"]
    row["total_s"] = prep_s + extra_s + sum(times)
    row["epoch_times_s"] = " ".join(f"{t:.3f}" for t in times)


def _breakdown(row, cfg, model, input_rate, input_dtype, num_classes, global_batch):
    """Input-only vs model-only vs end-to-end, and how close the model runs to the hardware."""
    if not cfg.breakdown:
        return
    model_rate, warm = metrics.model_only_train_rate(model, cfg.image_size, global_batch, num_classes, input_dtype)
    row["input_only_img_s"] = input_rate
    row["model_only_img_s"] = model_rate
    row["model_only_warmup_s"] = warm
    row["e2e_fraction_of_model"] = row["end_to_end_img_s"] / model_rate
    row["bottleneck"] = "input-bound" if input_rate < model_rate else "compute-bound"


def _run_naive(cfg, dataset, split, backbone, strategy, global_batch, num_classes, progress, row):
    start = time.perf_counter()
    X_train, y_train, X_test, y_test, skipped = baseline.prepare(dataset, split, cfg.image_size, cfg.naive_rgb,
                                                                 progress, cfg.strict)
    prep = time.perf_counter() - start
    row.update(data_prep_s=prep, train_images=len(X_train), test_images=len(X_test), skipped_files=len(skipped),
               skipped_list=";".join(skipped), channel_order="RGB" if cfg.naive_rgb else "BGR")
    with strategy.scope():
        model = models.build_classifier(backbone, num_classes, cfg, input_kind="unit")
        models.compile_classifier(model, cfg)
    steps = -(-len(X_train) // global_batch)
    times, _ = _fit(model, X_train, cfg, steps, progress, "naive", y=y_train, batch_size=global_batch)
    _finish_epochs(row, times, len(X_train), prep)
    row.update(_evaluate(model, X_test, len(X_test), y=y_test, batch_size=global_batch))
    y_pred = _predict(model, X_test, batch_size=global_batch)
    # The naive input path: decoding is the load above; an in-memory array feeds at memory speed.
    row["input_only_img_s"] = (len(X_train) + len(X_test)) / prep
    _breakdown(row, cfg, model, row["input_only_img_s"], tf.float32, num_classes, global_batch)
    return RunResult(row, model, y_true=np.asarray(y_test), y_pred=y_pred, test_files=_kept(split.test_files, skipped))


def _run_tutorial(cfg, dataset, split, backbone, strategy, global_batch, num_classes, progress, row):
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flowers_fast_tutorial_") as work:
        train_ds, test_ds = pipeline.tutorial_datasets(split, dataset.classes, cfg, global_batch, Path(work))
        # Fill the cache (the tutorial's first epoch would); counts as data preparation.
        try:
            n_train = sum(int(tf.shape(x)[0]) for x, _ in train_ds)
            n_test = sum(int(tf.shape(x)[0]) for x, _ in test_ds)
        except tf.errors.InvalidArgumentError as exc:
            # The tutorial's loader stops at the first undecodable file; ours skips and counts.
            raise DataError(f"--pipeline tutorial: an image cannot be decoded ({str(exc).splitlines()[0][:120]}); "
                            "remove it, or use --pipeline tfdata, which skips and counts such files") from None
        prep = time.perf_counter() - start
        row.update(data_prep_s=prep, train_images=n_train, test_images=n_test,
                   skipped_files=len(split.train_files) + len(split.test_files) - n_train - n_test,
                   skipped_list="", channel_order="RGB")
        return _train_on_datasets(cfg, backbone, strategy, global_batch, num_classes, progress, row, train_ds,
                                  test_ds, n_train, n_test, prep, "float255")


def _run_tfdata(cfg, dataset, split, backbone, strategy, global_batch, num_classes, progress, row):
    train_dec, test_dec, n_train, n_test, prep, skipped = _tfdata_prep(cfg, split, progress, row)
    train_ds = pipeline.train_dataset(train_dec, cfg, global_batch)
    test_ds = pipeline.eval_dataset(test_dec, cfg, global_batch)
    train_ds = distribute.maybe_data_service(train_ds, cfg)
    result = _train_on_datasets(cfg, backbone, strategy, global_batch, num_classes, progress, row, train_ds, test_ds,
                                n_train, n_test, prep, "uint8")
    result.test_files = _kept(split.test_files, skipped)
    return result


def _train_on_datasets(cfg, backbone, strategy, global_batch, num_classes, progress, row, train_ds, test_ds,
                       n_train, n_test, prep, input_kind):
    """Fit, evaluate, predict and break down: shared by the tutorial's and our tf.data pipelines."""
    with strategy.scope():
        model = models.build_classifier(backbone, num_classes, cfg, input_kind=input_kind)
        models.compile_classifier(model, cfg)
    steps = -(-n_train // global_batch)
    times, _ = _fit(model, train_ds, cfg, steps, progress, cfg.pipeline)
    _finish_epochs(row, times, n_train, prep)
    row.update(_evaluate(model, test_ds, n_test))
    y_true = np.concatenate([y.numpy() for _, y in test_ds])
    y_pred = _predict(model, test_ds)
    input_rate = metrics.input_only_rate(train_ds, global_batch)
    _breakdown(row, cfg, model, input_rate, tf.uint8 if input_kind == "uint8" else tf.float32, num_classes,
               global_batch)
    return RunResult(row, model, y_true=y_true, y_pred=y_pred)


def _kept(files, skipped):
    gone = set(skipped)
    return tuple(f for f in files if f not in gone)


def feature_function(backbone, image_size: int, jit: bool = False):
    """uint8 images -> float32 features, traced once for any batch size."""
    @tf.function(jit_compile=jit, input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.uint8)])
    def features(images):
        return tf.cast(backbone.layer(tf.cast(images, tf.float32) / 255.0, training=False), tf.float32)

    return features


def extract_features(backbone, images_ds, image_size: int, jit: bool = False, fn=None):
    """One batched pass of (uint8 image, label) batches through the backbone -> (features, labels)."""
    fn = fn or feature_function(backbone, image_size, jit)
    feats, labels = [], []
    for images, y in images_ds:
        feats.append(fn(images).numpy())
        labels.append(y.numpy())
    return np.concatenate(feats), np.concatenate(labels)


def _feature_pass(backbone, train_dec, test_dec, cfg, row):
    """The one-time feature pass: its first batch (tracing, XLA compile) timed on its own; the
    train images' pass counts towards a trained model, the test images' towards evaluation."""
    fn = feature_function(backbone, cfg.image_size, cfg.xla_backbone)
    batch = cfg.feature_batch_size
    start = time.perf_counter()
    extract_features(backbone, pipeline.eval_dataset(train_dec.take(batch), cfg, batch), 0, fn=fn)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    f_train, y_train = extract_features(backbone, pipeline.eval_dataset(train_dec, cfg, batch), 0, fn=fn)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    f_test, y_test = extract_features(backbone, pipeline.eval_dataset(test_dec, cfg, batch), 0, fn=fn)
    test_s = time.perf_counter() - start
    row.update(feature_pass_warmup_s=warm, feature_pass_s=train_s, feature_pass_img_s=len(f_train) / train_s,
               test_feature_pass_s=test_s, feature_cache_mb=(f_train.nbytes + f_test.nbytes) / 2**20)
    return f_train, y_train, f_test, y_test, warm + train_s, test_s


def head_model(num_classes: int, feature_dim: int, cfg: RunConfig):
    """The classifier's head alone, initialised exactly as in build_classifier (same seed)."""
    inputs = keras.Input((feature_dim,), dtype="float32", name="features")
    return keras.Model(inputs, models.build_head(num_classes, cfg.seed)(inputs), name="head_on_features")


def _run_featcache(cfg, dataset, split, backbone, strategy, global_batch, num_classes, progress, row):
    """Frozen backbone, no augmentation: compute each image's features once, train the head on them."""
    if cfg.fine_tune:
        raise DataError("--pipeline featcache needs a frozen backbone; drop --fine-tune or use --pipeline tfdata")
    train_dec, test_dec, n_train, n_test, prep, skipped = _tfdata_prep(cfg, split, progress, row)
    f_train, y_train, f_test, y_test, feature_pass, test_pass = _feature_pass(backbone, train_dec, test_dec, cfg, row)
    train_ds = tf.data.Dataset.from_tensor_slices((f_train, y_train)).shuffle(len(f_train), seed=cfg.seed)
    train_ds = train_ds.batch(global_batch).prefetch(pipeline.AUTOTUNE)
    test_ds = tf.data.Dataset.from_tensor_slices((f_test, y_test)).batch(global_batch)
    with strategy.scope():
        keras.utils.set_random_seed(cfg.seed)
        model = head_model(num_classes, backbone.feature_dim, cfg)
        models.compile_classifier(model, cfg)
    steps = -(-n_train // global_batch)
    times, _ = _fit(model, train_ds, cfg, steps, progress, "head")
    _finish_epochs(row, times, n_train, prep, extra_s=feature_pass)
    # End to end, an image costs its feature pass plus its head epochs.
    row["end_to_end_img_s"] = n_train * cfg.epochs / (feature_pass + sum(times))
    row.update(_evaluate(model, test_ds, n_test))
    # Evaluating from images includes computing the test images' features.
    row["eval_s"] += test_pass
    row["eval_img_s"] = n_test / row["eval_s"]
    y_pred = _predict(model, test_ds)
    if cfg.breakdown:
        fwd = tf.function(lambda x: backbone.layer(x, training=False), jit_compile=cfg.xla_backbone)
        rate, warm = metrics.forward_rate(fwd, cfg.image_size, cfg.feature_batch_size)
        row.update(input_only_img_s=metrics.input_only_rate(pipeline.eval_dataset(train_dec, cfg, global_batch),
                                                            global_batch),
                   model_only_img_s=rate, model_only_warmup_s=warm)
        row["e2e_fraction_of_model"] = row["feature_pass_img_s"] / rate
        row["bottleneck"] = "input-bound" if row["input_only_img_s"] < rate else "compute-bound"
    return RunResult(row, model, y_true=y_test, y_pred=y_pred, test_files=_kept(split.test_files, skipped))


def _run_modelonly(cfg: RunConfig, cache: Path, t_start: float) -> RunResult:
    """tf_cnn_benchmarks' synthetic mode: train steps on one in-memory batch, no dataset at all.

    It isolates the model (and XLA's compile time) from the input, in a few steps instead of
    epochs: on a CPU, XLA runs MobileNetV2 too slowly to train a whole set within a sweep."""
    strategy = distribute.strategy(cfg)
    global_batch = cfg.batch_size * strategy.num_replicas_in_sync
    t0 = time.perf_counter()
    with strategy.scope():
        keras.utils.set_random_seed(cfg.seed)
        backbone = models.build_backbone(cfg, cache)
        model = models.build_classifier(backbone, 5, cfg, input_kind="uint8")
        models.compile_classifier(model, cfg)
    row = {"classes": 5, "replicas": strategy.num_replicas_in_sync, "global_batch": global_batch,
           "handle": backbone.handle, "weights": backbone.weights, "compute_dtype": backbone.compute_dtype,
           "feature_dim": backbone.feature_dim, "model_build_s": time.perf_counter() - t0, "dataset": "in-memory"}
    rate, warm = metrics.model_only_train_rate(model, cfg.image_size, global_batch, 5, tf.uint8, min_seconds=5.0,
                                               min_calls=2)
    row.update(model_only_img_s=rate, model_only_warmup_s=warm, train_img_s=rate, end_to_end_img_s=rate,
               bottleneck="compute-bound", peak_rss_mb=metrics.peak_rss_mb(), peak_gpu_mb=metrics.peak_gpu_mb(),
               wall_s=time.perf_counter() - t_start)
    return RunResult(row, model, backbone=backbone)
