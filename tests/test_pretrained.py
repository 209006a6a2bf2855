"""Every engine and precision on real ImageNet weights (../shared/pretrained, see its README):
features within cosine 0.99 of TensorFlow float32's on the five real photos; the native rebuild of
a Hub model whose batch norm is folded into its convolutions, and the graph rewrite for models it
cannot rebuild."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flowers_fast import engine, runtime
from flowers_fast import model as models
from flowers_fast.config import RunConfig
from flowers_fast.errors import UnsupportedError

ROOT = Path(__file__).resolve().parents[1]
PRETRAINED = ROOT.parent / "shared" / "pretrained"
FEATURES = PRETRAINED / "mobilenet_v2_100_224_feature_vector"
SIZE = 224
MIN_COSINE = 0.99

pytestmark = pytest.mark.skipif(not FEATURES.is_dir(), reason=f"no pretrained weights at {PRETRAINED}")

# The five photos, decoded and resized as the tf.data pipeline does (uint8, 224 px).
PHOTOS = """
from pathlib import Path
import numpy as np
from flowers_fast import pipeline
from flowers_fast.config import RunConfig
files = sorted(str(p) for p in Path({images!r}).glob("*.jpg"))
photos = np.stack([image for image, _ in pipeline.decode_dataset(files, [0] * len(files),
                   RunConfig(image_size={size})).as_numpy_iterator()])
"""


def load_photos() -> np.ndarray:
    scope: dict = {}
    exec(PHOTOS.format(images=str(PRETRAINED / "images"), size=SIZE), scope)
    assert scope["photos"].shape == (5, SIZE, SIZE, 3)
    return scope["photos"]


@pytest.fixture(scope="module")
def fp32(cache):
    return models.build_backbone(RunConfig(model_handle=str(FEATURES), image_size=SIZE), cache)


@pytest.fixture(scope="module")
def photos():
    return load_photos()


@pytest.fixture(scope="module")
def reference(fp32, photos):
    return models.feature_function(fp32, SIZE)(photos).numpy()


@pytest.mark.parametrize("precision", ["fp32", "mixed"])
def test_openvino_features_match_tensorflow_float32(fp32, photos, reference, precision):
    if precision == "mixed" and not engine.cpu_has_bf16():
        pytest.skip(f"this CPU has no native bfloat16 (OpenVINO capabilities: {', '.join(engine.cpu_capabilities())})"
                    ": OpenVINO bf16 cannot run here")
    eng = engine.make("openvino", models.feature_function(fp32, SIZE), precision)
    assert eng.precision == {"fp32": "float32", "mixed": "bfloat16"}[precision]
    got = eng(photos)
    assert models.cosine(got, reference).min() >= MIN_COSINE
    assert models.cosine(got[:1], got[1:2])[0] < 0.95  # different photos, different features


def test_folded_batch_norm_is_rebuilt_natively_with_identity_batch_norms(fp32, photos, reference):
    """Google's Hub MobileNetV2 has no batch-norm variables (folded into the convolutions, which
    carry biases): the Keras rebuild takes them, its batch norms the identity plus that bias, its
    layers where Keras has them (the tutorial's layer 100), and gives the Hub model's features."""
    from flowers_fast.tfkeras import keras

    native = models.native_mobilenet(fp32.layer, SIZE, "float32")
    got = native(photos.astype(np.float32) / 255.0).numpy()
    assert models.cosine(got, reference).min() >= 0.9999
    assert models.cosine(got[:1], got[1:2])[0] < 0.95  # not one feature for every photo
    base = native.layers[-1]
    bns = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bns) == 52 and all(np.all(bn.gamma.numpy() == 1) and np.all(bn.moving_mean.numpy() == 0) for bn in bns)
    assert base.layers[100].name == "block_11_expand_relu"  # Keras's indexing, as the tutorial counts
    mixed = models.native_mobilenet(fp32.layer, SIZE, "mixed_bfloat16")
    assert models.conv_compute_dtype(mixed, SIZE) == "bfloat16"
    assert models.cosine(mixed(photos.astype(np.float32) / 255.0).numpy(), reference).min() >= MIN_COSINE


def test_mixed_precision_takes_the_native_route_on_the_hub_weights(cache):
    mixed = models.build_backbone(RunConfig(model_handle=str(FEATURES), image_size=SIZE, precision="mixed"), cache)
    assert mixed.mixed_route == models.NATIVE and mixed.compute_dtype == "bfloat16"
    assert MIN_COSINE <= mixed.cosine_vs_fp32 < 1.0


def test_without_onednn_a_cpu_has_no_tensorflow_bf16_route(fp32, monkeypatch):
    monkeypatch.setattr(runtime, "onednn_enabled", lambda: False)
    cfg = RunConfig(model_handle=str(FEATURES), image_size=SIZE, precision="mixed")
    with pytest.raises(UnsupportedError, match="needs its oneDNN kernels.*--onednn on") as err:
        models.graph_mixed(cfg, fp32.layer, str(FEATURES), "pretrained", 1280, "why")
    assert err.value.exit_code == 7


def test_a_graph_rewrite_that_does_not_act_is_recorded_as_float32(fp32):
    """On a CPU, grappler's float16 rewrite (the GPU route) skips the graph: the row must say float32."""
    from flowers_fast.tfkeras import tf

    cfg = RunConfig(model_handle=str(FEATURES), image_size=SIZE, precision="mixed", device="gpu")
    try:
        got = models.graph_mixed(cfg, fp32.layer, str(FEATURES), "pretrained", 1280, "why")
    finally:
        tf.config.optimizer.set_experimental_options({"auto_mixed_precision": False})  # process-global: undo
    assert got.mixed_route == models.GRAPPLER_FP16
    assert got.compute_dtype == "float32" and got.cosine_vs_fp32 > 0.99999


def test_tensorflow_mixed_rewrites_the_hub_graph_to_bfloat16_with_onednn(cache):
    """In its own process (the rewrite is process-global): --onednn on, the grappler bf16 route."""
    script = f"""
import json
from pathlib import Path
from flowers_fast import runtime
from flowers_fast.config import RunConfig
cfg = RunConfig(model_handle={str(FEATURES)!r}, image_size={SIZE}, precision="mixed", onednn="on")
runtime.setup(cfg)  # before TensorFlow loads
from flowers_fast import model as models
""" + PHOTOS.format(images=str(PRETRAINED / "images"), size=SIZE) + f"""
cache = Path({str(cache)!r})
fp32 = models.build_backbone(cfg.replace(precision="fp32"), cache)
reference = models.feature_function(fp32, {SIZE})(photos)
# The route for a Hub model the native rebuild cannot carry (this one it can: asked for directly).
mixed = models.graph_mixed(cfg, fp32.layer, fp32.handle, fp32.weights, fp32.feature_dim, "not mappable")
got = models.feature_function(mixed, {SIZE})(photos).numpy()
print(json.dumps(dict(route=mixed.mixed_route, dtype=mixed.compute_dtype, onednn=runtime.onednn_enabled(),
                      cosine=float(models.cosine(got, reference.numpy()).min()), row=mixed.cosine_vs_fp32)))
"""
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["onednn"] is True and result["route"] == models.GRAPPLER_BF16
    assert result["dtype"] == "bfloat16"  # the rewrite acted: the output moved
    assert MIN_COSINE <= result["cosine"] < 1.0 and MIN_COSINE <= result["row"] < 1.0


# --- predict on the real ImageNet classifier -----------------------------------------------------

EXPECTED_TOP1 = {"bird.jpg": "chickadee", "cat.jpg": "Egyptian cat", "dragonfly.jpg": "dragonfly",
                 "grace_hopper.jpg": "military uniform", "sunflower.jpg": "daisy"}  # the README's


def top1(out: str) -> dict[str, str]:
    lines = [line for line in out.splitlines() if not line.startswith("predict:")]
    return {Path(path.strip()).name: label.split(maxsplit=1)[1] for path, label in zip(lines[::2], lines[1::2])}


@pytest.mark.parametrize("precision", ["fp32", "mixed"])
def test_predict_on_openvino_gives_the_readmes_top1(precision, capsys):
    from flowers_fast.cli import main

    argv = ["predict", *sorted(map(str, (PRETRAINED / "images").glob("*.jpg"))), "--model-handle",
            str(PRETRAINED / "mobilenet_v2_100_224_classification"), "--engine", "openvino", "--precision", precision,
            "--top", "1"]
    if precision == "mixed" and not engine.cpu_has_bf16():
        assert main(argv) == UnsupportedError.exit_code  # bf16 asked where OpenVINO would run float32
        assert "no native bfloat16" in capsys.readouterr().err
        return
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"engine openvino ({'float32' if precision == 'fp32' else 'bfloat16'})" in out
    assert top1(out) == EXPECTED_TOP1


def test_predict_mixed_on_tensorflow_is_a_usage_error(capsys):
    from flowers_fast.cli import main

    image = str(PRETRAINED / "images" / "cat.jpg")
    assert main(["predict", image, "--model-handle", "random", "--precision", "mixed"]) == 2
    assert "--engine openvino" in capsys.readouterr().err


def test_the_cut_cache_holds_the_whole_models_activations_on_real_weights(cache, photos):
    """cutcache at the tutorial's layer 100 on the Hub weights: block 11's 14x14x96 input, stored
    float16, equals the float32 model's intermediate output, and the top on it gives its features."""
    from flowers_fast.tfkeras import keras, tf

    backbone = models.build_backbone(RunConfig(model_handle=str(FEATURES), image_size=SIZE, fine_tune_epochs=1), cache)
    cut = models.cut_parts(backbone, SIZE)
    assert cut.name == "block_11_expand" and cut.shape == (14, 14, 96)
    cached = cut.bottom(tf.constant(photos)).numpy().astype(np.float32)
    base = models.native_base(backbone.layer)
    inner = keras.Model(base.input, base.get_layer("block_10_project_BN").get_output_at(0))
    unit = photos.astype(np.float32) / 255.0
    want = inner(unit * 2.0 - 1.0).numpy()
    assert models.cosine(cached.reshape(5, -1), want.reshape(5, -1)).min() >= 0.999
    features = cut.top(cached, training=False).numpy()
    assert models.cosine(features, backbone.layer(unit, training=False).numpy()).min() >= 0.999
