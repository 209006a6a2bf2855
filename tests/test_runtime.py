"""Process-global TensorFlow settings: oneDNN on or off as asked, and recorded as it ran."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowers_fast import runtime

ROOT = Path(__file__).resolve().parents[1]


def test_onednn_is_set_before_tensorflow_loads():
    from flowers_fast.tfkeras import tf  # noqa: F401

    # The opposite of TensorFlow's default on this CPU (this process runs the default), so the
    # setting has to act for the check to pass: on for an AMD EPYC, off for a Xeon with AMX.
    choice = "off" if runtime.onednn_enabled() else "on"
    code = ("from flowers_fast import runtime; from flowers_fast.config import RunConfig; "
            f"runtime.setup(RunConfig(onednn={choice!r})); print(runtime.onednn_enabled())")
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(choice == "on")


def test_onednn_cannot_change_once_tensorflow_is_loaded():
    from flowers_fast.tfkeras import tf  # noqa: F401  (loaded, as in any test process)

    now = runtime.onednn_enabled()
    assert now in (True, False)
    runtime.set_onednn("on" if now else "off")  # what already runs: nothing to do
    runtime.set_onednn("auto")
    with pytest.raises(RuntimeError, match="already loaded"):
        runtime.set_onednn("off" if now else "on")


START_UP = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
            "I0000 00:00:1796154916.884226    9499 port.cc:153] oneDNN custom operations are on.\n"
            "I0000 00:00:1796154916.998914    9499 cpu_feature_guard.cc:227] This TensorFlow binary is optimized\n"
            "To enable the following instructions: AVX2 AVX512F AMX_TILE, in other operations, rebuild\n"
            "W0000 00:00:1796154917.000000    9499 some.cc:1] a warning\n"
            "E0000 00:00:1796154917.000000    9499 cuda_dnn.cc:2] an error\n"
            "a line of Python's own\n")


@pytest.mark.parametrize("level,kept", [(0, 7), (1, 3), (2, 2), (3, 1)])
def test_tensorflows_start_up_lines_honour_tf_cpp_min_log_level(level, kept):
    from flowers_fast.tfkeras import startup_lines_kept

    out = startup_lines_kept(START_UP, level).splitlines()
    assert len(out) == kept and out[-1] == "a line of Python's own"
    assert (level >= 1) is not any("InitializeLog" in line or "To enable" in line for line in out)


def test_importing_tensorflow_prints_nothing_at_level_3():
    out = subprocess.run([sys.executable, "-c", "from flowers_fast.tfkeras import tf; print(tf.__version__)"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0 and out.stdout.strip()
    assert out.stderr == ""
