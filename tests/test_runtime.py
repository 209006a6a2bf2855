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
