"""Every branch that depends on the CPU's instruction set, run on any CPU by faking the check.

CI runs on whichever machine it gets: an AVX2-only CPU (no bf16, TensorFlow's oneDNN off by
default) or one with AVX-512 BF16, VNNI and AMX (oneDNN on). A branch that only one kind of CPU
takes is otherwise tested on the other kind never (a bf16-only assertion once failed only on a
bf16 CPU). Here each check is faked both ways, and each test asserts what holds on every CPU.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from flowers_fast import engine, runtime, train
from flowers_fast import model as models
from flowers_fast.config import RunConfig
from flowers_fast.errors import UnsupportedError

WITH_BF16 = ["FP32", "BF16", "INT8", "BIN", "EXPORT_IMPORT"]  # OpenVINO's answer on an AVX-512 BF16 / AMX CPU
WITHOUT_BF16 = ["FP32", "INT8", "BIN", "EXPORT_IMPORT"]  # ... and on an AVX2 one


@pytest.fixture
def ov_cfg(tiny_cfg):
    return tiny_cfg(pipeline="featcache", engine="openvino", precision="mixed", num_images=20, epochs=1,
                    feature_batch_size=4)


# --- OpenVINO bf16: asked, refused, or run and read back ------------------------------------------

def test_without_bf16_the_worker_writes_a_skipped_row_that_says_why(ov_cfg, cache, tmp_path, monkeypatch):
    from bench import worker

    monkeypatch.setattr(engine, "cpu_capabilities", lambda: WITHOUT_BF16)
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"config": ov_cfg.to_dict(), "result": str(tmp_path / "row.json"), "cache": str(cache)}))
    assert worker.main([str(job)]) == UnsupportedError.exit_code
    row = json.loads((tmp_path / "row.json").read_text())
    assert row["status"] == "skipped" and "no native bfloat16" in row["error"] and "FP32, INT8" in row["error"]
    assert "feature_pass_img_s" not in row  # nothing measured: not a float32 run labelled bf16


def test_with_bf16_the_row_says_what_openvino_ran_and_how_far_it_moved_the_features(ov_cfg, cache,
                                                                                     monkeypatch):
    """Faked bf16 on any CPU: the run goes ahead, and the row's precision is the one read back from
    OpenVINO's executed graph (bfloat16 on a bf16 CPU, float32 where OpenVINO fell back), never the
    one asked for; the feature cosine is in the row without the breakdown."""
    monkeypatch.setattr(engine, "cpu_capabilities", lambda: WITH_BF16)
    read_back = []
    real = engine.runtime_precision
    monkeypatch.setattr(engine, "runtime_precision", lambda compiled: read_back.append(real(compiled)) or read_back[-1])
    row = train.run(ov_cfg, cache, progress=False).row
    assert read_back and row["compute_dtype"] == read_back[0] in ("bfloat16", "float32")
    assert row["mixed_route"] == models.OPENVINO_BF16
    assert 0.9 <= row["feature_cosine_vs_fp32"] <= 1.0 + 1e-6 and row["feature_check_s"] > 0
    # The check is timed apart: not part of the time to a trained model.
    assert row["total_s"] < row["wall_s"] - row["feature_check_s"] + 1e-6


class _Op:
    def __init__(self, layer, precision):
        self._info = {"layerType": np.str_(layer), "runtimePrecision": np.str_(precision)}

    def get_rt_info(self):
        return {k: SimpleNamespace(astype=lambda _t, v=v: str(v)) for k, v in self._info.items()}


class _Compiled:
    def __init__(self, ops, hint="f32"):
        self.ops, self.hint = ops, hint

    def get_runtime_model(self):
        return SimpleNamespace(get_ops=lambda: self.ops)

    def get_property(self, name):
        assert name == "INFERENCE_PRECISION_HINT"
        return self.hint


@pytest.mark.parametrize("ops,hint,expected", [
    ([_Op("Convolution", "bf16"), _Op("Convolution", "bf16"), _Op("FullyConnected", "f32")], "bf16", "bfloat16"),
    # bf16 asked, float32 run (a CPU without it): the graph says so, whatever the hint was
    ([_Op("Convolution", "f32"), _Op("MatMul", "f32"), _Op("Eltwise", "bf16")], "bf16", "float32"),
    ([_Op("Convolution", "i8"), _Op("Convolution", "u8")], "f32", "int8"),  # NNCF's quantized model
    ([_Op("Eltwise", "f32")], "bf16", "bfloat16"),  # no convolution to read: the compiled hint
])
def test_openvinos_precision_is_read_back_from_the_executed_graph(ops, hint, expected):
    assert engine.runtime_precision(_Compiled(ops, hint)) == expected


@pytest.mark.parametrize("capabilities,openvino_peak", [(WITH_BF16, True), (WITHOUT_BF16, False)])
def test_the_bf16_matmul_peak_comes_from_openvino_only_where_it_runs_bf16(monkeypatch, capabilities, openvino_peak):
    from bench import worker
    from flowers_fast import metrics
    from flowers_fast.tfkeras import keras

    monkeypatch.setattr(engine, "cpu_capabilities", lambda: capabilities)
    monkeypatch.setattr(metrics, "matmul_peak_flops", lambda device, dtype: 50e9)
    monkeypatch.setattr(engine, "matmul_peak_flops", lambda dtype: 80e9)
    layer = keras.Sequential([keras.layers.Conv2D(4, 3), keras.layers.GlobalAveragePooling2D()])
    cfg = RunConfig(pipeline="featcache", engine="openvino", precision="mixed", image_size=96)
    out = worker.hardware_row(cfg, layer, dict(compute_dtype="bfloat16", feature_pass_img_s=100.0))
    assert out["matmul_dtype"] == "bfloat16"
    assert out["matmul_peak_source"] == ("openvino" if openvino_peak else "tensorflow")
    assert ("matmul_peak_openvino_gflops" in out) is openvino_peak


# --- TensorFlow's oneDNN: on, off, or unknown ------------------------------------------------------

@pytest.mark.parametrize("enabled", [True, False, None])
def test_onednn_choice_after_tensorflow_loaded_is_checked_against_what_runs(monkeypatch, enabled):
    from flowers_fast.tfkeras import tf  # noqa: F401  (loaded: the choice can only be checked)

    monkeypatch.setattr(runtime, "onednn_enabled", lambda: enabled)
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    runtime.set_onednn("auto")
    for choice, wanted in (("on", True), ("off", False)):
        if enabled in (wanted, None):
            runtime.set_onednn(choice)
        else:
            with pytest.raises(RuntimeError, match=f"--onednn {choice}: TensorFlow is already loaded"):
                runtime.set_onednn(choice)


@pytest.mark.parametrize("choice,env", [("on", "1"), ("off", "0")])
def test_onednn_choice_before_tensorflow_loads_sets_its_variable(monkeypatch, choice, env):
    monkeypatch.delitem(sys.modules, "tensorflow")
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "unset")
    runtime.set_onednn(choice)
    import os

    assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == env


@pytest.mark.parametrize("enabled", [True, False])
def test_tensorflows_bf16_route_only_with_onednn(tiny_cfg, cache, monkeypatch, enabled):
    """TensorFlow mixed precision on a Hub model it cannot rebuild: grappler's bf16 rewrite with
    oneDNN, else a usage error that names the ways out. With oneDNN faked on, the row's dtype is
    bfloat16 only if the rewrite moved the output."""
    from flowers_fast.tfkeras import tf

    monkeypatch.setattr(runtime, "onednn_enabled", lambda: enabled)
    cfg = tiny_cfg(precision="mixed")
    fp32 = models.build_backbone(cfg.replace(precision="fp32"), cache)
    if not enabled:
        with pytest.raises(UnsupportedError, match="needs its oneDNN kernels.*--onednn on.*--engine openvino"):
            models.graph_mixed(cfg, fp32.layer, fp32.handle, fp32.weights, fp32.feature_dim, "not mappable")
        return
    try:
        got = models.graph_mixed(cfg, fp32.layer, fp32.handle, fp32.weights, fp32.feature_dim, "not mappable")
    finally:  # process-global: undo
        tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": False})
    assert got.mixed_route == models.GRAPPLER_BF16
    assert got.compute_dtype in ("bfloat16", "float32")
    if got.compute_dtype == "float32":
        assert got.cosine_vs_fp32 > 0.99999  # the rewrite did not act: the row must not say bf16


# --- AVX-512, VNNI, AMX: what the machine facts say -------------------------------------------------

@pytest.mark.parametrize("flags,isa", [
    (["sse4_2", "avx", "avx2", "fma"], "avx2 fma"),  # the AVX2-only EPYC
    (["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"], "avx2 fma avx512f avx512_vnni avx512_bf16"),  # Zen 5
    (["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"],
     "avx2 fma avx512f avx512_vnni avx512_bf16 avx512_fp16 amx_tile amx_bf16 amx_int8"),  # Sapphire Rapids
    (["sse2"], "none of avx2/fma/avx512f"),
])
def test_machine_facts_name_the_isa_extensions_the_cpu_has(monkeypatch, flags, isa):
    import cpuinfo

    from bench import machine

    monkeypatch.setattr(cpuinfo, "get_cpu_info", lambda: {"flags": flags, "brand_raw": "Test CPU"})
    assert machine._cpu()["cpu_isa"] == isa


# --- --max-isa: oneDNN's instruction set capped, in TensorFlow and OpenVINO ------------------------

MAX_ISA_SCRIPT = r"""
import collections, json, os, sys
from flowers_fast import runtime
from flowers_fast.config import RunConfig
runtime.set_max_isa(sys.argv[1])  # before TensorFlow and OpenVINO load, as runtime.setup does
from flowers_fast import engine
import numpy as np
import openvino.opset13 as ops
ov = engine.import_openvino()
x = ops.parameter([1, 16, 16, 32], ov.Type.f32)
w = ops.constant(np.random.default_rng(0).random((64, 32, 1, 1), dtype=np.float32))
y = ops.convolution(ops.transpose(x, ops.constant(np.array([0, 3, 1, 2]))), w, [1, 1], [0, 0], [0, 0], [1, 1])
compiled = engine.core().compile_model(ov.Model([y], [x]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
kinds = [op.get_rt_info()["primitiveType"].astype(str) for op in compiled.get_runtime_model().get_ops()
         if op.get_rt_info()["layerType"].astype(str) == "Convolution"]
print("OUT " + json.dumps({"env": os.environ.get("ONEDNN_MAX_CPU_ISA"), "kinds": kinds, "bf16": engine.cpu_has_bf16()}))
"""


def _max_isa_run(choice):
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    res = subprocess.run([sys.executable, "-c", MAX_ISA_SCRIPT, choice], capture_output=True, text=True, timeout=120,
                         env=env)
    lines = [line for line in res.stdout.splitlines() if line.startswith("OUT ")]
    assert res.returncode == 0 and lines, res.stderr[-2000:]
    return json.loads(lines[-1][4:])


def test_max_isa_avx2_makes_openvino_pick_avx2_kernels_and_refuse_bf16():
    """On any CPU with AVX2 (every CPU this project runs on): capped at avx2, OpenVINO's convolution
    runs an AVX2 kernel (no AVX-512, no AMX) and bf16 is not offered, whatever the CPU has."""
    capped = _max_isa_run("avx2")
    assert capped["env"] == "AVX2" and capped["kinds"] and not capped["bf16"]
    assert all("avx512" not in k and "amx" not in k for k in capped["kinds"]), capped["kinds"]
    assert any("avx2" in k for k in capped["kinds"]), capped["kinds"]
    free = _max_isa_run("all")
    assert free["env"] is None  # nothing set: the CPU's own instruction set


@pytest.mark.parametrize("cap,below_bf16", [("avx2", True), ("avx512_core_vnni", True), ("avx512_core_bf16", False),
                                            ("avx512_core_amx", False), ("ALL", False), ("bogus", False)])
def test_a_cap_below_bf16_means_no_bf16_even_where_openvino_reports_it(cap, below_bf16, monkeypatch):
    monkeypatch.setattr(engine, "cpu_capabilities", lambda: WITH_BF16)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert engine.cpu_has_bf16() is not below_bf16


def test_max_isa_after_tensorflow_loaded_is_refused(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert "tensorflow" in sys.modules  # this test process has it loaded
    with pytest.raises(RuntimeError, match="--max-isa avx2: tensorflow.*already loaded"):
        runtime.set_max_isa("avx2")
    runtime.set_max_isa("all")  # nothing asked: nothing to refuse


@pytest.mark.parametrize("enabled", [True, False])
def test_featcache_mixed_on_a_cpu_takes_grapplers_rewrite_where_onednn_is_on(tiny_cfg, cache, monkeypatch, enabled):
    """featcache's pass is inference: with oneDNN on it runs the Hub graph rewritten to bf16 (faster
    than the Keras mixed policy); with oneDNN off there is no such rewrite, so the native rebuild."""
    from flowers_fast.tfkeras import tf

    monkeypatch.setattr(runtime, "onednn_enabled", lambda: enabled)
    try:
        got = models.build_backbone(tiny_cfg(pipeline="featcache", precision="mixed"), cache)
    finally:  # process-global: undo
        tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": False})
    assert got.mixed_route == (models.GRAPPLER_BF16 if enabled else models.NATIVE)
    tfdata = models.build_backbone(tiny_cfg(pipeline="tfdata", precision="mixed"), cache)
    assert tfdata.mixed_route == models.NATIVE  # training keeps the Keras policy
