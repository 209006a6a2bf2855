"""Our tf.data pipeline: decode upright, resize, cache, first pass (``pipeline.prepare``), then fit."""

from __future__ import annotations

from .. import distribute, pipeline, train


def run(ctx: train.RunContext) -> train.RunResult:
    cfg = ctx.cfg
    dec = pipeline.prepare(cfg, ctx.split, ctx.progress)
    train._record_prep(ctx, dec.seconds, dec.n_train, dec.n_test, dec.skipped, "RGB", dec.oriented)
    train_ds = distribute.maybe_data_service(pipeline.train_dataset(dec.train, cfg, ctx.global_batch), cfg)
    test_ds = pipeline.eval_dataset(dec.test, cfg, ctx.global_batch)
    result = train._train_on_datasets(ctx, train_ds, test_ds, dec.n_train, dec.n_test, dec.seconds, "uint8")
    result.test_files = train._kept(ctx.split.test_files, dec.skipped)
    return result
