"""Scaling out with TensorFlow's own engines: tf.distribute strategies and tf.data service."""

from __future__ import annotations

from .config import RunConfig
from .tfkeras import tf


def strategy(cfg: RunConfig) -> "tf.distribute.Strategy":
    if cfg.strategy == "mirrored":
        return tf.distribute.MirroredStrategy()
    if cfg.strategy == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def maybe_data_service(ds: "tf.data.Dataset", cfg: RunConfig) -> "tf.data.Dataset":
    return ds
