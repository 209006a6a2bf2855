"""cutcache: fine-tuning from a cut at near-featcache speed. The frozen bottom of the native
MobileNetV2 (the layers below the cut) runs once over the files, streamed like featcache's pass,
on TensorFlow or OpenVINO (--engine; bf16 with --precision mixed where the CPU has it); its
activations at the cut are kept in memory (float16), and every epoch of both phases (the
frozen head, then the top from --fine-tune-from up) trains on them instead of on images."""

from __future__ import annotations

import time

import numpy as np
import psutil

from .. import engine, pipeline, train
from .. import model as models
from ..errors import UnsupportedError
from ..tfkeras import tf
from .featcache import feature_cosine, pass_features


def run(ctx: train.RunContext) -> train.RunResult:
    cfg, row, split = ctx.cfg, ctx.row, ctx.split
    cut = models.cut_parts(ctx.backbone, cfg.image_size)
    k = max(cfg.augment_views, 1)  # --augment-views: k activations per training image
    _check_memory(cut, len(split.train_files) * k + len(split.test_files))
    eng = engine.make(cfg.engine, cut.bottom, cfg.precision, ctx.backbone.compute_dtype, streams=cfg.engine_streams,
                      threads=cfg.engine_threads)
    start = time.perf_counter()
    eng(np.zeros((cfg.feature_batch, cfg.image_size, cfg.image_size, 3), np.uint8))  # trace before timing
    warm = time.perf_counter() - start
    if eng.name != "tf":  # how far OpenVINO (bf16 most of all) moved the activations: a check, outside total_s
        start = time.perf_counter()
        row.update(cut_cosine_vs_fp32=feature_cosine(ctx, eng, engine.make("tf", cut.bottom)),
                   cut_check_s=time.perf_counter() - start)
    # Under --strategy multiworker each task streams its shard; the tasks then share the activations.
    views = cfg.augment_views > 0
    train_a = pass_features(ctx, eng, split.train_files, split.train_labels, "train", cut.shape, np.float16,
                            views=views)
    test_a = pass_features(ctx, eng, split.test_files, split.test_labels, "test", cut.shape, np.float16)
    skipped = sorted(set(split.train_files) - set(train_a.files)) + sorted(set(split.test_files) - set(test_a.files))
    train._record_prep(ctx, 0.0, len(train_a.files), len(test_a.files), skipped, "RGB")  # decoded in the pass
    cut_pass = eng.setup_s + warm + train_a.seconds + train_a.shared_s
    row.update(engine_setup_s=eng.setup_s, engine_settings=engine.settings_text(eng),
               cut_pass_precision=eng.precision, cut_cache_layer=cut.name, cut_cache_shape="x".join(map(str, cut.shape)),
               cut_cache_dtype=str(train_a.features.dtype), feature_batch=cfg.feature_batch,
               cut_cache_mb=(train_a.features.nbytes + test_a.features.nbytes) / 2**20,
               cut_pass_warmup_s=warm, cut_pass_s=train_a.seconds, test_cut_pass_s=test_a.seconds,
               cut_pass_img_s=train_a.passed / train_a.seconds, feature_pass_images=train_a.passed,
               test_feature_pass_images=test_a.passed, feature_share_s=train_a.shared_s,
               test_feature_share_s=test_a.shared_s)
    # The head phase: the top is frozen, so its features are computed once (as featcache's) and
    # only the head trains; the fine-tune phase then trains the top and that head on the activations.
    start = time.perf_counter()
    train_f = _features(cut, train_a.features.reshape(-1, *cut.shape), cfg.feature_batch)
    if views:
        train_f = train_f.reshape(len(train_a.files), k, -1)
    row["cut_top_pass_s"] = top_pass = time.perf_counter() - start
    start = time.perf_counter()
    test_f = _features(cut, test_a.features, cfg.feature_batch)
    test_top_pass = time.perf_counter() - start
    head = models.build_head(ctx.num_classes, cfg.seed)
    head_model = train._compiled(ctx, lambda: models.head_model(ctx.num_classes, ctx.backbone.feature_dim, cfg,
                                                                head=head))
    head_ds, head_test_ds = pipeline.feature_datasets(train_f, train_a.labels, test_f, test_a.labels, cfg,
                                                      ctx.global_batch, cfg.augment_views)
    final = {}

    def on_activations():
        final["model"] = train._compiled(ctx, lambda: models.top_classifier(cut, cfg, head))
        return (final["model"], *pipeline.feature_datasets(train_a.features, train_a.labels, test_a.features,
                                                           test_a.labels, cfg, ctx.global_batch, cfg.augment_views))

    n_train, n_test = len(train_a.files), len(test_a.files)
    y_true, y_pred = train._fit_evaluate(ctx, head_model, head_ds, head_test_ds, n_train, n_test, 0.0, "cutcache",
                                         extra_s=cut_pass + top_pass, fine_tune_on=on_activations)
    # As featcache: an image costs its pass plus its epochs; evaluating from images includes the test pass.
    row["end_to_end_img_s"] = n_train * (cfg.epochs + cfg.fine_tune_epochs) / (cut_pass + top_pass + row["train_s"])
    row["eval_s"] += test_a.seconds + test_a.shared_s + test_top_pass
    row["eval_img_s"] = n_test / row["eval_s"]
    row["decode_img_s"] = float("nan")
    return train.RunResult(row, final["model"], y_true=y_true, y_pred=y_pred, test_files=test_a.files)


def _check_memory(cut: models.Cut, images: int) -> None:
    """Before the pass: activations that would take over half the memory available stop the run
    with what they need, instead of the pass swapping or being killed (there is no spill to disk yet)."""
    need = images * int(np.prod(cut.shape)) * np.dtype(np.float16).itemsize
    available = psutil.virtual_memory().available
    if need > available / 2:
        raise UnsupportedError(f"--pipeline cutcache: the activations at {cut.name} ({'x'.join(map(str, cut.shape))} "
                               f"float16) for {images} images need {need / 2**20:.1f} MB, over half the "
                               f"{available / 2**20:.1f} MB available; cut higher (e.g. --fine-tune-from block_15) or "
                               "use --pipeline tfdata")


def _features(cut, activations: np.ndarray, batch: int) -> np.ndarray:
    """The frozen top's features of cached activations (inference mode), float32."""
    ds = tf.data.Dataset.from_tensor_slices(activations).batch(batch).map(lambda a: tf.cast(a, tf.float32))
    return np.asarray(cut.top.predict(ds, verbose=0), np.float32)
