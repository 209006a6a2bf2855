"""The one place that chooses the Keras flavour, and imports TensorFlow.

TensorFlow 2.16+ ships Keras 3, but ``tensorflow_hub.KerasLayer`` only works with
Keras 2 (the ``tf_keras`` package). Every module imports ``keras`` and ``hub`` from
here, so switching flavours is a one-line change.

TensorFlow's native libraries log a few lines while they load (oneDNN, cudart, the CPU
feature guard), twice per process, before absl's logging starts and so past
``TF_CPP_MIN_LOG_LEVEL``. The import below honours that variable for them too.
"""

import os
import re
import sys
import tempfile

# Must be set before TensorFlow is imported anywhere, so tf.keras also means Keras 2.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# absl's line format: severity letter, MMDD, time, thread, file:line] message
_ABSL_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ \S+?:\d+\]")
_BEFORE_INIT = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_CONTINUED = "To enable the following instructions"  # the CPU feature guard's second line
_LEVELS = {"I": 0, "W": 1, "E": 2, "F": 3}


def startup_lines_kept(text: str, min_level: int) -> str:
    """``text`` (what TensorFlow's libraries wrote to stderr while loading) without the absl lines
    below ``min_level`` (TF_CPP_MIN_LOG_LEVEL: 1 drops INFO, 2 WARNING, 3 ERROR), their
    continuation lines, and absl's notice about them once they are all gone."""
    kept, dropped = [], False
    for line in text.splitlines(keepends=True):
        match = _ABSL_LINE.match(line)
        if match:
            dropped = _LEVELS[match.group(1)] < min_level
        elif line.startswith(_BEFORE_INIT):
            dropped = min_level >= 1
        elif not (dropped and line.startswith(_CONTINUED)):
            dropped = False  # anything else (Python's own warnings) is kept
        if not dropped:
            kept.append(line)
    return "".join(kept)


def _import_quietly():
    try:
        min_level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        min_level = 0
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)  # the native libraries write to fd 2 itself
        try:
            import tensorflow
            import tensorflow_hub
            import tf_keras
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            sys.stderr.write(startup_lines_kept(caught.read().decode(errors="replace"), min_level))
            sys.stderr.flush()
    return tensorflow, tensorflow_hub, tf_keras


tf, hub, keras = _import_quietly()

__all__ = ["tf", "keras", "hub"]
