"""cutcache: fine-tuning from a cut at near-featcache speed. The frozen bottom of the native
MobileNetV2 (the layers below the cut) runs once over the files, streamed like featcache's pass,
on TensorFlow or OpenVINO (--engine; bf16 with --precision mixed where the CPU has it); its
activations at the cut are kept in memory (float16), and every epoch of both phases (the
frozen head, then the top from --fine-tune-from up) trains on them instead of on images."""

from __future__ import annotations

import time

import numpy as np

from .. import engine, mobilenet, pipeline, train
from .. import model as models
from .featcache import stream_features


def run(ctx: train.RunContext) -> train.RunResult:
    cfg, row, split = ctx.cfg, ctx.row, ctx.split
    cut = models.cut_parts(ctx.backbone, cfg.image_size)
    eng = engine.make(cfg.engine, cut.bottom, cfg.precision, ctx.backbone.compute_dtype)
    start = time.perf_counter()
    eng(np.zeros((cfg.feature_batch, cfg.image_size, cfg.image_size, 3), np.uint8))  # trace before timing
    warm = time.perf_counter() - start
    if eng.name != "tf":  # how far OpenVINO (bf16 most of all) moved the activations: a check, outside total_s
        start = time.perf_counter()
        images = np.round((mobilenet.calibration_images(8, cfg.image_size, seed=123) + 1.0) * 127.5).astype(np.uint8)
        got, reference = eng(images).reshape(8, -1), engine.make("tf", cut.bottom)(images).reshape(8, -1)
        row.update(cut_cosine_vs_fp32=float(models.cosine(got, reference).min()),
                   cut_check_s=time.perf_counter() - start)
    train_a = stream_features(ctx, eng, split.train_files, split.train_labels, "train")
    test_a = stream_features(ctx, eng, split.test_files, split.test_labels, "test")
    skipped = sorted(set(split.train_files) - set(train_a.files)) + sorted(set(split.test_files) - set(test_a.files))
    train._record_prep(ctx, 0.0, len(train_a.files), len(test_a.files), skipped, "RGB")  # decoded in the pass
    cut_pass = eng.setup_s + warm + train_a.seconds
    row.update(engine_setup_s=eng.setup_s, cut_pass_precision=eng.precision, cut_cache_layer=cut.name,
               cut_cache_shape="x".join(map(str, cut.shape)),
               cut_cache_dtype=str(train_a.features.dtype), feature_batch=cfg.feature_batch,
               cut_cache_mb=(train_a.features.nbytes + test_a.features.nbytes) / 2**20,
               cut_pass_warmup_s=warm, cut_pass_s=train_a.seconds, test_cut_pass_s=test_a.seconds,
               cut_pass_img_s=len(train_a.files) / train_a.seconds)
    train_ds, test_ds = pipeline.feature_datasets(train_a.features, train_a.labels, test_a.features, test_a.labels,
                                                  cfg, ctx.global_batch)
    model = train._compiled(ctx, lambda: models.top_classifier(cut, ctx.num_classes, cfg))
    n_train, n_test = len(train_a.files), len(test_a.files)
    y_true, y_pred = train._fit_evaluate(ctx, model, train_ds, test_ds, n_train, n_test, 0.0, "cutcache",
                                         extra_s=cut_pass)
    # As featcache: an image costs its pass plus its epochs; evaluating from images includes the test pass.
    row["end_to_end_img_s"] = n_train * (cfg.epochs + cfg.fine_tune_epochs) / (cut_pass + row["train_s"])
    row["eval_s"] += test_a.seconds
    row["eval_img_s"] = n_test / row["eval_s"]
    row["decode_img_s"] = float("nan")
    return train.RunResult(row, model, y_true=y_true, y_pred=y_pred, test_files=test_a.files)
