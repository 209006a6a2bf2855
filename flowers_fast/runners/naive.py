"""The notebook's way: OpenCV to NumPy arrays (``baseline``), then ``model.fit(X, y)``."""

from __future__ import annotations

import time

from .. import baseline, train
from .. import model as models
from ..tfkeras import tf


def run(ctx: train.RunContext) -> train.RunResult:
    cfg = ctx.cfg
    start = time.perf_counter()
    X_train, y_train, X_test, y_test, skipped = baseline.prepare(ctx.dataset, ctx.split, cfg.image_size,
                                                                 cfg.naive_rgb, ctx.progress, cfg.strict)
    prep = time.perf_counter() - start
    train._record_prep(ctx, prep, len(X_train), len(X_test), skipped, "RGB" if cfg.naive_rgb else "BGR")
    model = train._compiled(ctx, lambda: models.build_classifier(ctx.backbone, ctx.num_classes, cfg, input_kind="unit"))
    y_true, y_pred = train._fit_evaluate(ctx, model, X_train, X_test, len(X_train), len(X_test), prep, "naive",
                                         train_y=y_train, test_y=y_test, batch_size=ctx.global_batch)
    if cfg.breakdown:
        # The naive input path: decoding is the load above; an in-memory array feeds at memory speed.
        train._breakdown(ctx, *train._train_rate(ctx, model, tf.float32),
                         input_rate=(len(X_train) + len(X_test)) / prep, e2e_rate=ctx.row["end_to_end_img_s"])
    return train.RunResult(ctx.row, model, y_true=y_true, y_pred=y_pred,
                           test_files=train._kept(ctx.split.test_files, skipped))
