"""The inference engines (TensorFlow, OpenVINO) on the offline 96 px model: same features, input
order kept, bf16 only where the CPU has it, OpenVINO imported without its telemetry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flowers_fast import engine
from flowers_fast import model as models
from flowers_fast.config import RunConfig
from flowers_fast.errors import UnsupportedError

SIZE = 96
ROOT = Path(__file__).resolve().parents[1]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def feature_fn(small_model, cache):
    backbone = models.build_backbone(RunConfig(image_size=SIZE, model_handle=str(small_model)), cache)
    return models.feature_function(backbone, SIZE)


@pytest.fixture(scope="module")
def ov_fp32(feature_fn):
    return engine.make("openvino", feature_fn, "fp32")


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (37, SIZE, SIZE, 3), dtype=np.uint8)


def batches(x, size):
    return [(x[i:i + size], i) for i in range(0, len(x), size)]


def test_openvino_fp32_gives_tensorflows_features_in_input_order(feature_fn, ov_fp32, images):
    assert ov_fp32.name == "openvino" and ov_fp32.precision == "float32"
    assert ov_fp32.setup_s > 0
    tf_out = engine.make("tf", feature_fn).run(batches(images, 16))
    ov_out = ov_fp32.run(batches(images, 16))  # 16, 16 and a short last batch of 5, in flight together
    assert [meta for _, meta in ov_out] == [0, 16, 32]
    reference = np.concatenate([f for f, _ in tf_out])
    got = np.concatenate([f for f, _ in ov_out])
    assert got.shape == (37, 1280) and got.dtype == np.float32
    assert cosine(got, reference).min() >= 0.9999
    # Each image's own features, not a neighbour's: rows differ from one another.
    assert cosine(got[:1], got[1:2])[0] < 0.9999
    np.testing.assert_allclose(ov_fp32(images[:3]), reference[:3], rtol=1e-3, atol=1e-3)


def test_bf16_runs_only_where_the_cpu_has_it(feature_fn):
    if engine.cpu_has_bf16():
        assert engine.make("openvino", feature_fn, "mixed").precision == "bfloat16"
    else:
        with pytest.raises(UnsupportedError, match="no native bfloat16.*use --precision fp32"):
            engine.make("openvino", feature_fn, "mixed")


@pytest.mark.parametrize("capabilities,fails", [(["FP32", "INT8"], True), (["FP32", "BF16", "INT8"], False)])
def test_bf16_check_reads_openvinos_capabilities(monkeypatch, capabilities, fails):
    monkeypatch.setattr(engine, "cpu_capabilities", lambda: capabilities)
    engine.check_precision("fp32")
    if fails:
        with pytest.raises(UnsupportedError, match="FP32, INT8"):
            engine.check_precision("mixed")
    else:
        engine.check_precision("mixed")


def test_openvino_is_imported_without_telemetry(tmp_path):
    code = ("import sys; from flowers_fast import engine; engine.cpu_capabilities(); "
            "print(sys.modules['openvino_telemetry'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "None"
    assert not (tmp_path / "intel").exists()  # where OpenVINO's telemetry keeps its client id


def test_openvino_matmul_peak_is_measured():
    assert engine.matmul_peak_flops("float32", n=512, repeats=1) > 1e8


def test_flops_are_counted_without_tensorflows_private_freezing_function(small_model, cache, monkeypatch):
    """The FLOP count's private TensorFlow import is guarded: where it is gone, OpenVINO's conversion
    counts the convolutions and matmuls, within a few percent of TensorFlow's profiler."""
    from flowers_fast import metrics

    backbone = models.build_backbone(RunConfig(image_size=SIZE, model_handle=str(small_model)), cache)
    profiled = metrics.forward_flops_per_image(backbone.layer, SIZE)
    monkeypatch.setitem(sys.modules, "tensorflow.python.framework.convert_to_constants", None)  # import fails
    counted = metrics.forward_flops_per_image(backbone.layer, SIZE)
    assert counted != profiled and counted == pytest.approx(profiled, rel=0.05)


@pytest.mark.parametrize("streams,threads,hint,want_streams,want_threads", [
    (0, 0, "THROUGHPUT", None, None), (1, 0, "LATENCY", "1", None), (2, 0, "THROUGHPUT", "2", None),
    (0, 1, "THROUGHPUT", None, "1")])
def test_streams_and_threads_reach_openvino_and_the_row(feature_fn, images, streams, threads, hint, want_streams,
                                                        want_threads):
    eng = engine.make("openvino", feature_fn, "fp32", streams=streams, threads=threads)
    d = eng.details
    assert d["PERFORMANCE_HINT"] == hint
    if want_streams:
        assert d["NUM_STREAMS"] == want_streams
    if want_threads:
        assert d["INFERENCE_NUM_THREADS"] == want_threads
    assert engine.settings_text(eng).startswith(f"{hint}: {d['NUM_STREAMS']} streams, ")
    out = eng.run(batches(images, 16))  # every setting still gives every batch back, in order
    assert [meta for _, meta in out] == [0, 16, 32]
    assert engine.settings_text(engine.make("tf", feature_fn)) == ""


@pytest.mark.parametrize("flag", ["engine_streams", "engine_threads"])
def test_streams_and_threads_are_openvinos_only(flag):
    from flowers_fast.errors import UserError

    with pytest.raises(UserError, match=f"--{flag.replace('_', '-')} sets OpenVINO's CPU plugin; add --engine openvino"):
        RunConfig(pipeline="featcache", **{flag: 1})
    RunConfig(pipeline="featcache", engine="openvino", **{flag: 1})
