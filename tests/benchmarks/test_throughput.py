"""pytest-benchmark: the naive loader vs tf.data input, and one training step.

Timings are saved as JSON (see pyproject's addopts). The only assertion on speed is a
ratio measured in the same run: tf.data must feed images faster than the naive loader.
"""

import time

import pytest

from flowers_fast import baseline, data, pipeline, synthetic
from flowers_fast.config import RunConfig

pytestmark = pytest.mark.benchmark
N_IMAGES = 96


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = synthetic.generate(tmp_path_factory.mktemp("bench") / "flowers", N_IMAGES, seed=1)
    ds = data.discover(root)
    return list(ds.files), list(ds.labels)


def naive_load(files):
    images, _, _ = baseline.load_images(files, 224, progress=False)
    return len(images)


def tfdata_input(files, labels):
    """Built once, as in training; each iteration decodes every file again (no cache)."""
    cfg = RunConfig(cache="none")
    return pipeline.eval_dataset(pipeline.decode_dataset(files, labels, cfg), cfg, 32)


def iterate(dataset):
    n = 0
    for images, _ in dataset:
        n += int(images.shape[0])
    return n


def test_naive_loader(benchmark, files):
    assert benchmark.pedantic(naive_load, args=(files[0],), rounds=3, warmup_rounds=1) == N_IMAGES


def test_tfdata_input(benchmark, files):
    assert benchmark.pedantic(iterate, args=(tfdata_input(*files),), rounds=3, warmup_rounds=1) == N_IMAGES


def test_train_step(benchmark, tiny_cfg, cache):
    from flowers_fast import model as models
    from flowers_fast.tfkeras import tf

    cfg = tiny_cfg()
    backbone = models.build_backbone(cfg, cache)
    clf = models.build_classifier(backbone, 5, cfg)
    models.compile_classifier(clf, cfg)
    x = tf.zeros([32, cfg.image_size, cfg.image_size, 3], tf.uint8)
    y = tf.zeros([32], tf.int32)
    step = clf.make_train_function()
    iterator = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
    benchmark.pedantic(lambda: step(iterator), rounds=5, warmup_rounds=2)


def _best_in_turns(*fns, repeats=5):
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best
