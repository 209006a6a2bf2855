"""The one place that chooses the Keras flavour.

TensorFlow 2.16+ ships Keras 3, but ``tensorflow_hub.KerasLayer`` only works with
Keras 2 (the ``tf_keras`` package). Every module imports ``keras`` and ``hub`` from
here, so switching flavours is a one-line change.
"""

import os

# Must be set before TensorFlow is imported anywhere, so tf.keras also means Keras 2.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tensorflow_hub as hub  # noqa: E402
import tf_keras as keras  # noqa: E402

__all__ = ["tf", "keras", "hub"]
