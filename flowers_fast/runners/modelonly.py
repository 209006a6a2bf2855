"""modelonly: train steps on one in-memory batch, no dataset (tf_cnn_benchmarks' synthetic mode)."""

from __future__ import annotations

from .. import metrics, profiling, train
from .. import model as models
from ..tfkeras import tf


def run(ctx: train.RunContext) -> train.RunResult:
    """tf_cnn_benchmarks' synthetic mode: train steps on one in-memory batch, no dataset at all.

    It isolates the model (and XLA's compile time) from the input, in a few steps instead of
    epochs: on a CPU, XLA runs MobileNetV2 too slowly to train a whole set within a sweep."""
    model = train._compiled(ctx, lambda: models.build_classifier(ctx.backbone, ctx.num_classes, ctx.cfg, "uint8"))
    rate, warm = metrics.model_only_train_rate(model, ctx.cfg.image_size, ctx.global_batch, ctx.num_classes,
                                               tf.uint8, min_seconds=ctx.cfg.rate_seconds, min_calls=2)
    ctx.row.update(train_img_s=rate, end_to_end_img_s=rate)
    train._breakdown(ctx, rate, warm)
    ctx.profile_steps = profiling.Steps(model, profiling.batch_steps, ctx.cfg.image_size, ctx.global_batch,
                                        ctx.num_classes)
    return train.RunResult(ctx.row, model)
