"""Shared fixtures: one cache folder and one small offline model per test session.

Tests use 96x96 images (the offline model is exported at that size) and tiny synthetic
sets so the whole suite stays CI-fast on 2 CPU cores.
"""

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

SMALL = 96


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("ffcache")
    os.environ["FLOWERS_FAST_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def small_model(cache):
    """Path of the offline random MobileNetV2 at 96 px, in TF Hub format."""
    from flowers_fast import hubexport

    return hubexport.export_random_mobilenet(hubexport.default_path(cache, 0, SMALL), seed=0, image_size=SMALL)


@pytest.fixture
def tiny_cfg(small_model):
    """A factory of small, fast run configurations using the offline model."""
    from flowers_fast.config import RunConfig

    def make(**changes):
        base = dict(num_images=60, image_size=SMALL, epochs=2, model_handle=str(small_model), breakdown=False)
        base.update(changes)
        return RunConfig(**base)

    return make
