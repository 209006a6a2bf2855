"""The tutorial's fine-tune on the whole-model pipelines: a frozen-head phase, then the backbone
from --fine-tune-from up trained at a lower rate with batch norm in inference mode; --augment.
On the small random export (96 px, the same Keras MobileNetV2 layer indices as at 224)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench import configs
from flowers_fast import train
from flowers_fast import model as models
from flowers_fast.config import TUTORIAL_FINE_TUNE_FROM, RunConfig
from flowers_fast.errors import ModelError, UserError
from flowers_fast.tfkeras import keras, tf

CUT = "block_15"


@pytest.fixture(scope="module")
def ft_cfg(small_model):
    return RunConfig(num_images=40, image_size=96, epochs=1, fine_tune_epochs=1, fine_tune_from=CUT,
                     model_handle=str(small_model), breakdown=False)


PRETRAINED = Path(__file__).resolve().parents[2] / "shared" / "pretrained" / "mobilenet_v2_100_224_feature_vector"


@pytest.fixture(scope="module", params=["random", "pretrained"])
def weights_cfg(request, ft_cfg):
    """The cut's checks on the small random export and on the real ImageNet weights (224 px)."""
    if request.param == "random":
        return ft_cfg
    if not PRETRAINED.is_dir():
        pytest.skip(f"no pretrained weights at {PRETRAINED}")
    return ft_cfg.replace(model_handle=str(PRETRAINED), image_size=224, num_images=20)


def base_layers(backbone) -> list:
    return models.native_base(backbone.layer).layers


def test_gradients_reach_exactly_the_layers_from_the_cut(weights_cfg, cache):
    ft_cfg = weights_cfg
    backbone = models.build_backbone(ft_cfg, cache)
    layers = base_layers(backbone)
    assert layers[backbone.cut].name == "block_15_expand"
    clf = models.build_classifier(backbone, 5, ft_cfg)
    frozen_phase = {w.ref() for w in clf.trainable_weights}
    assert frozen_phase == {w.ref() for w in clf.get_layer("head").weights}  # the head phase: the head only
    models.unfreeze_from(backbone)
    size = ft_cfg.image_size
    x = tf.constant(np.random.default_rng(0).integers(0, 256, (4, size, size, 3)), tf.uint8)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(clf(x, training=True) ** 2)
    grads = tape.gradient(loss, clf.trainable_weights)
    reached = {w.name.split("/")[0] for w, g in zip(clf.trainable_weights, grads)
               if g is not None and float(tf.reduce_max(tf.abs(g))) > 0}
    expected = {layer.name for i, layer in enumerate(layers) if i >= backbone.cut and layer.trainable_weights}
    assert reached == expected | {"head"}
    assert all(not layer.trainable_weights for layer in layers[:backbone.cut])


def test_two_phases_leave_the_frozen_layers_and_every_batch_norm_statistic_unchanged(weights_cfg, cache):
    ft_cfg = weights_cfg
    before = models.build_backbone(ft_cfg, cache)  # the same weights the run starts from
    result = train.run(ft_cfg, cache, progress=False, keep_model=True, predictions=False)
    row, after = result.row, result.backbone
    assert row["fine_tune_first_layer"] == "block_15_expand" and row["fine_tune_layers"] > 0
    assert row["head_phase_s"] > 0 and row["fine_tune_phase_s"] > 0
    assert len(row["epoch_times_s"].split()) == 2
    moved = 0
    for i, (old, new) in enumerate(zip(base_layers(before), base_layers(after))):
        same = all(np.array_equal(a, b) for a, b in zip(old.get_weights(), new.get_weights()))
        if isinstance(new, keras.layers.BatchNormalization):
            assert np.array_equal(old.moving_mean.numpy(), new.moving_mean.numpy()), new.name
            assert np.array_equal(old.moving_variance.numpy(), new.moving_variance.numpy()), new.name
        if i < before.cut:
            assert same, f"frozen layer {new.name} changed"
        elif new.trainable_weights:
            moved += not same
    assert moved > 0  # the top did train


def test_fine_tune_knobs_are_checked_up_front():
    assert RunConfig(fine_tune_epochs=2).fine_tune_from == TUTORIAL_FINE_TUNE_FROM  # the tutorial's default
    assert RunConfig().fine_tune_from is None  # no second phase, no cut
    with pytest.raises(UserError, match="--fine-tune-from 'block 15!': expected a layer index"):
        RunConfig(fine_tune_epochs=1, fine_tune_from="block 15!")
    with pytest.raises(UserError, match="add --fine-tune-epochs"):
        RunConfig(fine_tune_from="100")
    with pytest.raises(UserError, match="use one of them"):
        RunConfig(fine_tune_epochs=1, fine_tune=True)
    for pipeline in ("featcache", "modelonly"):
        with pytest.raises(UserError, match=f"--fine-tune-epochs .*--pipeline {pipeline}.*use --pipeline cutcache "
                                            r"\(a cache at the cut\) or tfdata"):
            RunConfig(pipeline=pipeline, fine_tune_epochs=1)
    for pipeline in ("featcache", "cutcache"):
        ft = int(pipeline == "cutcache")
        with pytest.raises(UserError, match="--augment .*its pass runs once.*add --augment-views K"):
            RunConfig(pipeline=pipeline, augment=True, fine_tune_epochs=ft)
        assert RunConfig(pipeline=pipeline, augment=True, augment_views=2, fine_tune_epochs=ft).augment_how == \
            "2 views of each training image made in the pass, one drawn per epoch"
        with pytest.raises(UserError, match="--augment-views 2 says how many .*add --augment"):
            RunConfig(pipeline=pipeline, augment_views=2, fine_tune_epochs=ft)
    with pytest.raises(UserError, match="--augment-views makes augmented views once.*--pipeline tfdata augments"):
        RunConfig(pipeline="tfdata", augment=True, augment_views=2)
    with pytest.raises(UserError, match="--reuse-features stores each image's un-augmented features"):
        RunConfig(pipeline="featcache", augment=True, augment_views=2, reuse_features=True)
    assert RunConfig(augment=True).augment_how == "every epoch, in the model" and RunConfig().augment_how == "none"
    with pytest.raises(UserError, match="--pipeline cutcache caches the frozen bottom.*add --fine-tune-epochs"):
        RunConfig(pipeline="cutcache")


@pytest.mark.parametrize("where,says", [("block_99", "no such layer or block"), ("900", "layers 0..")])
def test_a_cut_the_model_does_not_have_is_one_line(ft_cfg, cache, where, says):
    with pytest.raises(ModelError, match=f"--fine-tune-from {where}: MobileNetV2 .*{says}") as err:
        models.build_backbone(ft_cfg.replace(fine_tune_from=where), cache)
    assert "\n" not in str(err.value)


def test_a_hub_model_the_rebuild_cannot_carry_names_what_works(ft_cfg, cache, monkeypatch):
    def not_mappable(*args):
        raise models.NotMappable("the native MobileNetV2 rebuild maps only 3/260 of its weights")

    monkeypatch.setattr(models, "native_mobilenet", not_mappable)
    with pytest.raises(ModelError, match="--fine-tune-from block_15: .*maps only 3/260.*use --fine-tune"):
        models.build_backbone(ft_cfg, cache)


def test_augmentation_acts_only_while_training_and_is_seeded(ft_cfg, cache):
    cfg = RunConfig(image_size=96, model_handle=ft_cfg.model_handle, augment=True)
    backbone = models.build_backbone(cfg.replace(augment=False), cache)
    plain = models.build_classifier(backbone, 5, cfg.replace(augment=False))
    x = tf.constant(np.random.default_rng(1).integers(0, 256, (2, 96, 96, 3)), tf.uint8)

    def augmented():  # as train.run seeds a run
        keras.utils.set_random_seed(cfg.seed)
        model = models.build_classifier(backbone, 5, cfg)
        assert [layer.__class__.__name__ for layer in model.get_layer("augment").layers] == [
            "RandomFlip", "RandomRotation", "RandomZoom"]
        return model, model(x, training=True).numpy()

    (a, a_out), (_, b_out) = augmented(), augmented()
    np.testing.assert_allclose(a(x, training=False), plain(x, training=False), rtol=1e-5, atol=1e-5)
    assert not np.allclose(a_out, plain(x, training=True), atol=1e-4)
    np.testing.assert_allclose(a_out, b_out, rtol=1e-5, atol=1e-5)  # the same run twice augments the same way


def test_fine_tune_configurations_end_in_ft_and_stay_out_of_quick():
    tuned = {name for name, cfg in configs.CONFIGS.items() if cfg.fine_tune_epochs or cfg.fine_tune}
    assert {"tfdata-ft", "cutcache-ft", "tfdata-b15-ft", "cutcache-b15-ft"} <= tuned
    assert all(name.endswith("-ft") for name in tuned)
    assert configs.CONFIGS["tfdata-ft"].fine_tune_from == TUTORIAL_FINE_TUNE_FROM
    assert not tuned & set(configs.PRESETS["quick"].configs)


# --- cutcache: the frozen bottom once, the top and head on its activations --------------------

def test_the_cut_cache_is_the_whole_models_activations_and_trains_the_same(weights_cfg, cache):
    """Cut at the tutorial's layer 100 (inside block 11): the cache holds block 11's input, the top
    recomputes the frozen expansion; bottom then top gives the backbone's features, and training
    on the cache follows training through the whole model (same seed, same order)."""
    cfg = weights_cfg.replace(fine_tune_from=TUTORIAL_FINE_TUNE_FROM, deterministic=True)
    size, side = cfg.image_size, -(-cfg.image_size // 16)  # block 11 runs at 1/16 of the input's side
    backbone = models.build_backbone(cfg, cache)
    cut = models.cut_parts(backbone, size)
    assert cut.name == "block_11_expand" and cut.shape == (side, side, 96) and cut.start <= backbone.cut
    x = np.random.default_rng(2).integers(0, 256, (4, size, size, 3)).astype(np.uint8)
    activations = cut.bottom(tf.constant(x))
    assert activations.dtype == tf.float16
    whole = backbone.layer(tf.cast(x, tf.float32) / 255.0, training=False).numpy()
    assert models.cosine(cut.top(tf.cast(activations, tf.float32), training=False).numpy(), whole).min() >= 0.999

    rows = {p: train.run(cfg.replace(pipeline=p), cache, progress=False, predictions=False).row
            for p in ("cutcache", "tfdata")}
    cached = rows["cutcache"]
    assert cached["cut_cache_layer"] == "block_11_expand" and cached["cut_cache_dtype"] == "float16"
    assert cached["cut_cache_shape"] == f"{side}x{side}x96" and cached["cut_cache_mb"] > 0
    losses = {p: np.array(row["epoch_loss"].split(), float) for p, row in rows.items()}
    # float16 activations: the curves agree to a few per cent, not bit for bit.
    np.testing.assert_allclose(losses["cutcache"], losses["tfdata"], rtol=0.05)
    assert abs(cached["test_loss"] - rows["tfdata"]["test_loss"]) <= 0.05 * rows["tfdata"]["test_loss"]


@pytest.mark.parametrize("precision", ["fp32", "mixed"])
def test_the_cut_pass_runs_on_openvino(ft_cfg, cache, precision):
    from flowers_fast import engine

    if precision == "mixed" and not engine.cpu_has_bf16():
        pytest.skip("this CPU has no native bfloat16: OpenVINO bf16 cannot run here")
    cfg = ft_cfg.replace(pipeline="cutcache", engine="openvino", precision=precision, num_images=20)
    row = train.run(cfg, cache, progress=False, predictions=False).row
    assert row["cut_pass_precision"] == {"fp32": "float32", "mixed": "bfloat16"}[precision]
    assert row["cut_cosine_vs_fp32"] >= (0.9999 if precision == "fp32" else 0.99)
    assert row["cut_cache_dtype"] == "float16" and row["compute_dtype"] == "float32"  # the top trains in float32


def test_int8_and_the_cut_pass_is_a_usage_error():
    with pytest.raises(UserError, match="--precision int8 .*cutcache's pass to the cut runs fp32 or mixed"):
        RunConfig(pipeline="cutcache", engine="openvino", precision="int8", fine_tune_epochs=1)


def test_activations_that_would_not_fit_stop_before_the_pass(ft_cfg, cache, monkeypatch):
    import psutil

    from flowers_fast.errors import UnsupportedError

    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {"available": 100_000})())
    with pytest.raises(UnsupportedError, match=r"cutcache: the activations at block_15_expand \(3x3x160 float16\) "
                                               r"for 40 images need 0.1 MB, over half the 0.1 MB available"):
        train.run(ft_cfg.replace(pipeline="cutcache"), cache, progress=False, predictions=False)


# --- --augment-views: augmented views made once in the pass, one drawn per epoch --------------

def test_views_are_augmented_seeded_and_one_is_drawn_afresh_each_epoch(ft_cfg):
    from flowers_fast import pipeline

    cfg = ft_cfg.replace(pipeline="featcache", augment=True, augment_views=3, fine_tune_epochs=0,
                         fine_tune_from=None, image_size=32)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    one = tf.data.Dataset.from_tensors((tf.constant(image), 0, b"x.jpg"))

    def views(seed):
        keras.utils.set_random_seed(seed)
        return next(iter(pipeline._views(one, models.augmentation(seed), 3).batch(3)))

    first, again, other = views(0), views(0), views(1)
    assert first[0].dtype == tf.uint8 and first[0].shape == (3, 32, 32, 3)
    assert list(first[1].numpy()) == [0, 0, 0] and list(first[2].numpy()) == [b"x.jpg"] * 3
    assert np.array_equal(first[0], again[0]) and not np.array_equal(first[0], other[0])  # seeded
    assert len({v.tobytes() for v in first[0].numpy()} | {image.tobytes()}) == 4  # each view differs

    # 50 images x 3 views, each view's "features" its own number: an epoch draws one of each image's.
    stored = np.arange(150, dtype=np.float32).reshape(50, 3, 1)
    train_ds, _ = pipeline.feature_datasets(stored, np.arange(50), stored[:, 0], np.arange(50), cfg, 50, views=3)
    epochs = [dict(zip(*(t.numpy().ravel() for t in reversed(next(iter(train_ds)))))) for _ in range(2)]
    for drawn in epochs:
        assert sorted(drawn) == list(range(50))
        assert all(int(v) // 3 == i for i, v in drawn.items())  # image i's own view
    assert epochs[0] != epochs[1]  # drawn afresh each epoch
    assert len({int(v) % 3 for v in epochs[0].values()}) == 3  # every view gets drawn


@pytest.mark.parametrize("pipeline", ["featcache", "cutcache"])
def test_a_pass_with_views_covers_each_image_k_times_and_says_so(ft_cfg, cache, pipeline):
    ft = pipeline == "cutcache"
    cfg = ft_cfg.replace(pipeline=pipeline, augment=True, augment_views=2, num_images=20,
                         fine_tune_epochs=int(ft), fine_tune_from=CUT if ft else None)
    row = train.run(cfg, cache, progress=False, predictions=False).row
    assert row["feature_pass_images"] == 2 * row["train_images"]
    assert row["augment_how"] == "2 views of each training image made in the pass, one drawn per epoch"
    assert np.isfinite(row["test_loss"])
    if ft:  # the memory the views take is in the row: float16 activations, 2 views per training image
        per_image = np.prod([int(d) for d in row["cut_cache_shape"].split("x")]) * 2 / 2**20
        assert row["cut_cache_mb"] == pytest.approx(per_image * (2 * row["train_images"] + row["test_images"]))
