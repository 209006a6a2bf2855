"""featcache: the frozen backbone's features computed once, streamed from the files by an engine
(or loaded from ``featurestore``), then only the head trained on them."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .. import cluster, distribute, engine, featurestore, metrics, mobilenet, pipeline, profiling, quantize, shard
from .. import train
from .. import model as models
from ..tfkeras import keras


@dataclass
class Features:
    """One part's features from the feature pass, in file order, and what it cost."""

    features: np.ndarray
    labels: np.ndarray
    files: tuple  # the files that decoded, aligned with the rows
    seconds: float  # this task's pass
    passed: int = -1  # images this task ran through the pass (-1: all of ``files``)
    shared_s: float = 0.0  # --strategy multiworker: sharing the tasks' shards, after this task's pass
    first_s: float = 0.0  # of ``seconds``, until the stream's first batch was decoded (tf.data's start-up)
    first_images: int = 0  # images in that batch

    def steady_rate(self) -> float:
        """Images/s after the first batch (metrics.rate_after_first)."""
        return metrics.rate_after_first(self.passed, self.seconds, self.first_images, self.first_s)

    def __post_init__(self):
        if self.passed < 0:
            self.passed = len(self.files)


def _feature_engine(ctx: train.RunContext) -> tuple[engine.Engine, float]:
    """The engine that runs the frozen backbone, warmed up on one in-memory batch (tracing, XLA
    compile, OpenVINO's first inference): (engine, warm-up seconds); its setup is ``setup_s``."""
    cfg = ctx.cfg
    fn = models.feature_function(ctx.backbone, cfg.image_size, cfg.xla_backbone)
    if cfg.precision == "int8":
        eng = _int8_engine(ctx, fn)
    else:
        eng = engine.make(cfg.engine, fn, cfg.precision, ctx.backbone.compute_dtype, streams=cfg.engine_streams,
                          threads=cfg.engine_threads)
    start = time.perf_counter()
    eng(np.zeros((cfg.feature_batch, cfg.image_size, cfg.image_size, 3), np.uint8))
    return eng, time.perf_counter() - start


def _int8_engine(ctx: train.RunContext, fn) -> engine.Engine:
    """OpenVINO on NNCF's int8 model of ``fn``, calibrated on a seeded sample of the training
    images (or taken from the store), then checked on other training images against TensorFlow
    float32: below ``--int8-min-cosine`` the run stops with a skipped row, never labelled int8.
    Calibration and quantization count in the engine's setup (so in ``total_s``) and on their own."""
    cfg, split = ctx.cfg, ctx.split
    calibrate, held_out = quantize.sample(split.train_files, cfg.calibration_images, cfg.seed)

    def decoded(files):
        stream = pipeline.feature_stream(files, np.zeros(len(files), np.int32), cfg, cfg.feature_batch)
        return [images.numpy() for images, _, _ in stream]

    q = quantize.quantized_model(lambda: engine.convert(fn), cfg, ctx.cache,
                                 featurestore.model_fingerprint(ctx.backbone.handle), calibrate,
                                 lambda: decoded(calibrate))
    check_s = []  # the check is timed on its own (0 when the store kept its cosine)

    def least_cosine(eng):
        start = time.perf_counter()
        cosine = feature_cosine(ctx, eng, images=np.concatenate(decoded(held_out)))
        check_s.append(time.perf_counter() - start)
        return cosine

    where = f"{len(held_out)} held-out training images"
    eng, cosine = quantize.checked_engine(q, fn, ctx.cache, least_cosine, cfg.int8_min_cosine, "features", where,
                                          "calibrate on more images (--calibration-images) or use --precision mixed "
                                          "or fp32", streams=cfg.engine_streams, threads=cfg.engine_threads)
    eng.setup_s += q.seconds
    ctx.row.update(quantize_s=q.seconds, quantized_reused=q.reused, calibration_files=len(calibrate),
                   feature_cosine_vs_fp32=cosine, feature_cosine_on=where, feature_check_s=sum(check_s))
    return eng


def stream_features(ctx: train.RunContext, eng: engine.Engine, files, labels, part: str, check: bool = True,
                    row_shape: tuple | None = None, dtype=np.float32, views: bool = False) -> Features:
    """Decode ``files`` and run them through ``eng`` in one overlapped stream (see
    pipeline.feature_stream): nothing but the features is kept. ``check=False``: the files that did
    not decode are the caller's to check (a shard's); ``row_shape``/``dtype``: of one output (for an
    empty result). ``views``: --augment-views augmented views of each file, in a row; each file's
    features are then (views, *row_shape)."""
    cfg = ctx.cfg
    k = cfg.augment_views if views else 1
    stream = pipeline.feature_stream(files, labels, cfg, cfg.feature_batch,
                                     models.augmentation(cfg.seed) if views else None)
    if ctx.cfg.pipeline == "featcache" and cfg.data_service:  # decoded on the service's workers
        member = cluster.current() if cfg.strategy == "multiworker" else None
        stream = distribute.maybe_data_service(stream, cfg, f"{part}-pass" + (f"-{member.rank}" if member else ""))
    steps = -(-len(files) * k // cfg.feature_batch)
    first = []  # (seconds until the first batch was decoded, its images)

    def batches():
        for images, y, paths in tqdm(stream, desc=f"{part}: features", total=steps, unit="batch",
                                     disable=not ctx.progress, leave=False):
            if not first:
                first.append((time.perf_counter() - start, len(y)))
            yield images, (y.numpy(), paths.numpy())

    start = time.perf_counter()
    out = eng.run(batches())
    seconds = time.perf_counter() - start
    kept = tuple(pipeline.path_str(p) for _, (_, paths) in out for p in paths)[::k]  # a file's views are in a row
    if check:
        pipeline.undecodable(files, kept, cfg.strict, part)
    shape = row_shape or (ctx.backbone.feature_dim,)
    feats = np.concatenate([f for f, _ in out]) if out else np.zeros((0, *shape), dtype)
    y = np.concatenate([y for _, (y, _) in out])[::k] if out else np.zeros(0, np.int32)
    if views:  # (files x views, ...) -> (files, views, ...), an empty result too
        feats = feats.reshape(len(kept), k, *feats.shape[1:])
    # In the files' order (the tf.data service's workers hand batches back in any order).
    where = {f: i for i, f in enumerate(files)}
    order = np.argsort([where[f] for f in kept], kind="stable")
    first_s, first_images = first[0] if first else (0.0, 0)
    return Features(feats[order], y[order], tuple(kept[i] for i in order), seconds, passed=len(kept) * k,
                    first_s=first_s, first_images=first_images)


def pass_features(ctx: train.RunContext, eng: engine.Engine, files, labels, part: str,
                  row_shape: tuple | None = None, dtype=np.float32, views: bool = False) -> Features:
    """``stream_features`` over the whole part; under ``--strategy multiworker`` each task streams
    only its shard (``shard.positions``) and the tasks then share their rows (``--shard-store``'s
    folder, else the strategy's all-gather), so that every task ends with all of the part's
    features in file order, as one process would have them."""
    if ctx.cfg.strategy != "multiworker":
        return stream_features(ctx, eng, files, labels, part, row_shape=row_shape, dtype=dtype, views=views)
    cfg, member = ctx.cfg, cluster.current()
    files, labels = list(files), np.asarray(labels)
    tasks, index, n = member.workers, member.rank, len(files)
    mine = shard.positions(n, tasks, index)
    how = f"the shared folder {cfg.shard_store}" if cfg.shard_store else "all-gather"
    print(f"flowers_fast: {member.label}: {part} feature pass over {len(mine)} of {n} images (shard {index} of "
          f"{tasks}), then shared by {how}", file=sys.stderr, flush=True)
    own = stream_features(ctx, eng, shard.take(files, tasks, index), labels[mine], part, check=False,
                          row_shape=row_shape, dtype=dtype, views=views)
    start = time.perf_counter()
    decoded = set(own.files)
    kept = np.asarray([files[p] in decoded for p in mine], bool)
    if cfg.shard_store:
        run = cluster.run_id
        featurestore.save_shard(cfg.shard_store, run, part, index, tasks, mine[kept], own.features)
        agree(ctx, True)  # every task has written its shard (or a peer's loss ends this as one line)
        rows, where = shard.merge(featurestore.load_shards(cfg.shard_store, run, part, tasks, cfg.peer_timeout), n)
        agree(ctx, True)  # every task has read them all
        if member.is_chief:
            featurestore.remove_run(cfg.shard_store, run)
    else:
        block, mask = shard.block(own.features, kept, n, tasks)
        rows, where = shard.unblock(distribute.all_gather(ctx.strategy, block),
                                    distribute.all_gather(ctx.strategy, mask), n, tasks)
    shared_s = time.perf_counter() - start
    got = tuple(files[p] for p in where)
    pipeline.undecodable(files, got, cfg.strict, part)  # on the whole part, the same on every task
    print(f"flowers_fast: {member.label}: {part} features of {len(got)} images shared in {shared_s:.1f} s",
          file=sys.stderr, flush=True)
    return Features(rows, labels[where].astype(np.int32), got, own.seconds, passed=own.passed, shared_s=shared_s,
                    first_s=own.first_s, first_images=own.first_images)


def agree(ctx: train.RunContext, flag: bool) -> bool:
    """Whether ``flag`` holds on every task (a collective: each task must call it at the same point);
    outside a multiworker run, ``flag``."""
    if ctx.cfg.strategy != "multiworker":
        return flag
    return bool(distribute.all_gather(ctx.strategy, np.asarray([int(flag)], np.int32)).min())


def stored_features(stored: dict, files, labels, strict: bool, part: str) -> Features:
    """One part's features from a ``featurestore`` file: the files it lacks did not decode."""
    kept = tuple(f for f in files if f in stored)
    pipeline.undecodable(files, kept, strict, part)
    label_of = dict(zip(files, labels))
    return Features(np.stack([stored[f] for f in kept]), np.asarray([label_of[f] for f in kept], np.int32), kept, 0.0)


def run(ctx: train.RunContext) -> train.RunResult:
    """Frozen backbone, no augmentation: compute each image's features once, streamed straight
    from the files, then train the head on them. The train images' pass counts towards a trained
    model, the test images' towards evaluation; the engine's setup and warm-up are timed apart.
    With ``reuse_features``, features stored by an earlier run with the same key are loaded instead."""
    cfg, row, split = ctx.cfg, ctx.row, ctx.split
    digest, parts, stored = "", {}, None
    views = cfg.augment_views > 0
    if cfg.reuse_features:
        digest, parts = featurestore.key(cfg, ctx.backbone.handle, ctx.backbone.compute_dtype,
                                         split.train_files + split.test_files)
        start = time.perf_counter()
        stored = featurestore.load(ctx.cache, digest)
        if not agree(ctx, stored is not None):  # a multiworker run's tasks all load, or all run the pass
            stored = None
    if stored is not None:
        train_f = stored_features(stored[0], split.train_files, split.train_labels, cfg.strict, "train")
        test_f = stored_features(stored[0], split.test_files, split.test_labels, cfg.strict, "test")
        # No pass ran: its cost is reading the file; its rate is not measured.
        train_f.seconds = time.perf_counter() - start
        eng, warm, precision, pass_rate = None, 0.0, stored[1], float("nan")
        row["engine_setup_s"] = 0.0
        # Another engine's cosine is the one stored with its features (NaN in a store from before it
        # was kept: the breakdown measures it); TensorFlow's is the backbone's, unless one was stored.
        if cfg.engine != "tf" or not math.isnan(stored[2]):
            row["feature_cosine_vs_fp32"] = stored[2]
    else:
        eng, warm = _feature_engine(ctx)
        train_f = pass_features(ctx, eng, split.train_files, split.train_labels, "train", views=views)
        test_f = pass_features(ctx, eng, split.test_files, split.test_labels, "test")
        precision, pass_rate = eng.precision, train_f.steady_rate()
        row.update(engine_setup_s=eng.setup_s, engine_settings=engine.settings_text(eng))
    skipped = sorted(set(split.train_files) - set(train_f.files)) + sorted(set(split.test_files) - set(test_f.files))
    # Decoding happens inside the feature pass: there is no separate preparation step.
    train._record_prep(ctx, 0.0, len(train_f.files), len(test_f.files), skipped, "RGB")
    feature_pass = row["engine_setup_s"] + warm + train_f.seconds + train_f.shared_s
    passed = (0, 0) if stored is not None else (train_f.passed, test_f.passed)
    row.update(compute_dtype=precision, feature_batch=cfg.feature_batch, feature_pass_warmup_s=warm,
               feature_pass_s=train_f.seconds, feature_pass_images=passed[0], test_feature_pass_images=passed[1],
               feature_share_s=train_f.shared_s, test_feature_share_s=test_f.shared_s,
               feature_pass_img_s=pass_rate, feature_pass_first_batch_s=train_f.first_s,
               test_feature_pass_s=test_f.seconds, features_reused=stored is not None,
               features_key=digest, feature_cache_mb=(train_f.features.nbytes + test_f.features.nbytes) / 2**20)
    train_ds, test_ds = pipeline.feature_datasets(train_f.features, train_f.labels, test_f.features, test_f.labels,
                                                  cfg, ctx.global_batch, cfg.augment_views)

    def build():
        keras.utils.set_random_seed(cfg.seed)
        return models.head_model(ctx.num_classes, ctx.backbone.feature_dim, cfg)

    model = train._compiled(ctx, build)
    n_train, n_test = len(train_f.files), len(test_f.files)
    ctx.profile_extra = lambda: profiling.feature_slice(eng or _feature_engine(ctx)[0], split.train_files,
                                                        split.train_labels, cfg)
    y_true, y_pred = train._fit_evaluate(ctx, model, train_ds, test_ds, n_train, n_test, 0.0, "head",
                                         extra_s=feature_pass)
    if eng is not None and stored is None:
        if eng.name != "tf" and "feature_cosine_on" not in row:
            # Every row of another engine says how far it moved the features (bf16 most of all). A
            # check, not the job: after evaluation (outside peak_rss_mb, since its float32 reference
            # model costs memory the job does not need) and timed on its own, outside total_s.
            start = time.perf_counter()
            row.update(feature_cosine_vs_fp32=feature_cosine(ctx, eng), feature_cosine_on="8 synthetic flowers",
                       feature_check_s=time.perf_counter() - start)
        if digest:
            featurestore.save(ctx.cache, digest, parts, train_f.files + test_f.files,
                              np.concatenate([train_f.features, test_f.features]), precision,
                              row.get("feature_cosine_vs_fp32", float("nan")))
    # End to end, an image costs its feature pass plus its head epochs.
    row["end_to_end_img_s"] = n_train * cfg.epochs / (feature_pass + row["train_s"])
    # Evaluating from images includes computing the test images' features.
    row["eval_s"] += test_f.seconds + test_f.shared_s
    row["eval_img_s"] = n_test / row["eval_s"]
    row["decode_img_s"] = float("nan")
    if cfg.breakdown:
        if eng is None:  # features were reused: the engine is built only to be measured
            eng, _ = _feature_engine(ctx)
        rate, warm_s = _engine_rates(ctx, eng)
        sample = split.train_files[:8 * cfg.feature_batch]
        input_rate = metrics.input_only_rate(
            pipeline.feature_stream(sample, split.train_labels[:len(sample)], cfg, cfg.feature_batch),
            cfg.feature_batch)
        row["decode_img_s"] = input_rate
        # The stage that the backbone limits is the feature pass, not the head's epochs.
        train._breakdown(ctx, rate, warm_s, input_rate=input_rate,
                         e2e_rate=None if stored is not None else row["feature_pass_img_s"])
    return train.RunResult(row, model, y_true=y_true, y_pred=y_pred, test_files=test_f.files)


def _engine_rates(ctx: train.RunContext, eng: engine.Engine) -> tuple[float, float]:
    """The feature engine's forward images/s on one in-memory batch (and its warm-up seconds),
    measured in turns with TensorFlow float32 on the same batch in this process unless the engine
    is that already: ``tf_fp32_forward_img_s``, ``engine_speedup_vs_tf_fp32`` and, for another engine,
    ``feature_cosine_vs_fp32`` go into the row."""
    cfg = ctx.cfg
    x = np.random.default_rng(0).integers(0, 256, (cfg.feature_batch, cfg.image_size, cfg.image_size, 3),
                                          dtype=np.uint8)
    # Several batches per call, so that an engine with several streams keeps them all busy.
    steps = {"engine": lambda: eng.run([(x, None)] * 4)}
    # (A grappler rewrite is process-wide: no float32 TensorFlow function is left to compare with.)
    if (eng.name != "tf" or eng.precision != "float32") and not ctx.backbone.mixed_route.startswith("grappler"):
        fp32 = dataclasses.replace(ctx.backbone, layer=ctx.backbone.hub_layer)
        reference = engine.make("tf", models.feature_function(fp32, cfg.image_size))
        steps["tf_fp32"] = lambda: reference.run([(x, None)] * 4)
    floats = _float_openvino(ctx) if eng.precision == "int8" else {}
    steps.update({name: (lambda e=e: e.run([(x, None)] * 4)) for name, e in floats.items()})
    rates, warm, ratio = metrics.interleaved_rates(steps, 4 * cfg.feature_batch, rounds=3,
                                                   min_seconds=cfg.rate_seconds / 3)
    if floats:  # int8 against the float routes of the same engine, measured in the same turns
        fastest = max(floats, key=rates.get)
        ctx.row.update({f"{name}_forward_img_s": rates[name] for name in floats})
        ctx.row.update(int8_speedup_vs_float=rates["engine"] / rates[fastest], int8_fastest_float=fastest)
    if "tf_fp32" in steps and eng.name != "tf" and math.isnan(ctx.row.get("feature_cosine_vs_fp32", math.nan)):
        ctx.row["feature_cosine_vs_fp32"] = feature_cosine(ctx, eng, reference)  # not kept with reused features
    same = eng.name == "tf" and eng.precision == "float32"
    ctx.row.update(tf_fp32_forward_img_s=rates["engine"] if same else rates.get("tf_fp32", float("nan")),
                   engine_speedup_vs_tf_fp32=1.0 if same else ratio)
    return rates["engine"], warm["engine"]


def _float_openvino(ctx: train.RunContext) -> dict:
    """OpenVINO float32 and, where the CPU has it, bfloat16 on the backbone, with this run's
    streams and threads: what int8's backbone rate is compared with."""
    cfg = ctx.cfg
    fn = models.feature_function(ctx.backbone, cfg.image_size)
    model = engine.convert(fn)
    precisions = {"openvino_fp32": "fp32"} | ({"openvino_bf16": "mixed"} if engine.cpu_has_bf16() else {})
    return {name: engine.make("openvino", fn, p, model=model, streams=cfg.engine_streams, threads=cfg.engine_threads)
            for name, p in precisions.items()}


def feature_cosine(ctx: train.RunContext, eng: engine.Engine, reference: engine.Engine | None = None,
                    images: np.ndarray | None = None) -> float:
    """The least cosine similarity between ``eng``'s outputs and ``reference``'s (default TensorFlow
    float32's backbone) on uint8 ``images`` (default 8 synthetic flowers): how far this engine (and
    its precision) moves the features, or cutcache's activations at the cut."""
    cfg = ctx.cfg
    if reference is None:
        fp32 = dataclasses.replace(ctx.backbone, layer=ctx.backbone.hub_layer)
        reference = engine.make("tf", models.feature_function(fp32, cfg.image_size))
    if images is None:
        images = np.round((mobilenet.calibration_images(8, cfg.image_size, seed=123) + 1.0) * 127.5).astype(np.uint8)
    return float(models.cosine(eng(images), reference(images)).min())
