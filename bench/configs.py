"""Named benchmark configurations and presets.

Each configuration is one value of ``RunConfig``; adding one is one line in CONFIGS.
Sweep-wide settings (dataset, epochs, device, ...) are applied on top by ``bench run``.
"""

from __future__ import annotations

from dataclasses import dataclass

from flowers_fast.config import RunConfig
from flowers_fast.errors import UserError, invoked

_ALL = [
    RunConfig(name="naive", pipeline="naive"),  # the notebook: cv2 -> NumPy float64, BGR
    RunConfig(name="naive-rgb", pipeline="naive", naive_rgb=True),  # the notebook with the channel fix
    RunConfig(name="tutorial", pipeline="tutorial"),  # TF's tutorial: image_dataset_from_directory + cache
    RunConfig(name="tfdata", pipeline="tfdata"),
    RunConfig(name="tfdata-dct", pipeline="tfdata", dct_decode=True),
    RunConfig(name="tfdata-mixed", pipeline="tfdata", precision="mixed"),
    RunConfig(name="tfdata-xla", pipeline="tfdata", xla_step=True),
    RunConfig(name="tfdata-mixed-xla", pipeline="tfdata", precision="mixed", xla_step=True),
    # TensorFlow's tutorial, second half: --epochs frozen, then 5 epochs from its layer 100 at a 10x lower rate.
    RunConfig(name="tfdata-ft", pipeline="tfdata", fine_tune_epochs=5, fine_tune_from="100"),
    # ... with the tutorial's augmentation too (flip, rotation, zoom inside the model, every epoch).
    RunConfig(name="tfdata-aug-ft", pipeline="tfdata", augment=True, fine_tune_epochs=5, fine_tune_from="100"),
    # The same recipe on the cut cache: the bottom once, the activations at block 11's input kept.
    RunConfig(name="cutcache-ft", pipeline="cutcache", fine_tune_epochs=5, fine_tune_from="100"),
    # Its pass to the cut on OpenVINO in bfloat16 (a skipped row where the CPU has no native bf16).
    RunConfig(name="cutcache-ov-bf16-ft", pipeline="cutcache", engine="openvino", precision="mixed",
              fine_tune_epochs=5, fine_tune_from="100"),
    # ... with augmentation: 4 augmented views of each training image made in the pass, one drawn per epoch.
    RunConfig(name="cutcache-aug-ft", pipeline="cutcache", augment=True, augment_views=4, fine_tune_epochs=5,
              fine_tune_from="100"),
    # Only the top two blocks (15, 16) and Conv_1 unfrozen, whole model vs cut cache.
    RunConfig(name="tfdata-b15-ft", pipeline="tfdata", fine_tune_epochs=5, fine_tune_from="block_15"),
    RunConfig(name="cutcache-b15-ft", pipeline="cutcache", fine_tune_epochs=5, fine_tune_from="block_15"),
    RunConfig(name="featcache", pipeline="featcache"),
    # The frozen head on augmented features: 4 views per training image from the pass.
    RunConfig(name="featcache-aug", pipeline="featcache", augment=True, augment_views=4),
    RunConfig(name="featcache-mixed", pipeline="featcache", precision="mixed"),
    RunConfig(name="featcache-xla", pipeline="featcache", xla_backbone=True, xla_step=True),
    # TensorFlow with its oneDNN kernels forced on (its default only on CPUs with AVX512-VNNI/BF16 or AMX).
    RunConfig(name="featcache-onednn", pipeline="featcache", onednn="on"),
    # The feature pass on OpenVINO (CPU only); bf16 only where the CPU has it natively, else a skipped row.
    RunConfig(name="featcache-ov", pipeline="featcache", engine="openvino"),
    RunConfig(name="featcache-ov-bf16", pipeline="featcache", engine="openvino", precision="mixed"),
    # One stream on both cores: as fast on 2 cores, one stream's activations less (about 74 MB at full size).
    RunConfig(name="featcache-ov-bf16-1s", pipeline="featcache", engine="openvino", precision="mixed",
              engine_streams=1),
    # Each repeat quantizes (a stored model would make later repeats skip what the first paid for).
    RunConfig(name="featcache-ov-int8", pipeline="featcache", engine="openvino", precision="int8",
              reuse_quantized=False),
    # A later run's int8: the quantized model loaded from the store (featcache-ov-int8, just before,
    # stored it under the same key), as a user's second training on the same backbone would.
    RunConfig(name="featcache-ov-int8-stored", pipeline="featcache", engine="openvino", precision="int8"),
    # Model alone on in-memory tensors (tf_cnn_benchmarks' synthetic mode): a few steps, no data.
    RunConfig(name="modelonly", pipeline="modelonly"),
    RunConfig(name="modelonly-mixed", pipeline="modelonly", precision="mixed"),
    RunConfig(name="modelonly-xla", pipeline="modelonly", xla_step=True),
    RunConfig(name="modelonly-mixed-xla", pipeline="modelonly", precision="mixed", xla_step=True),
]
CONFIGS: dict[str, RunConfig] = {c.name: c for c in _ALL}


@dataclass(frozen=True)
class Preset:
    description: str
    configs: tuple[str, ...]
    overrides: dict
    repeats: int = 1  # runs of each training configuration (medians and min-max over them)
    timeout_s: int = 900  # per configuration subprocess
    # Runs of each model-only probe (no trained model; many timed steps within one run).
    probe_repeats: int | None = None
    # Per-stage breakdown (input-only, model-only rates, FLOP utilisation) in the first repeat
    # only: it costs seconds per run and does not enter the time to a trained model.
    breakdown_once: bool = False

    def repeats_of(self, cfg: RunConfig) -> int:
        if cfg.pipeline == "modelonly" and self.probe_repeats:
            return self.probe_repeats
        return self.repeats


PRESETS = {
    # In-memory rates measured for 0.5 s, not 4: CI checks that they are measured, not their value.
    "smoke": Preset("seconds per configuration, for CI: 40 synthetic images at 96 px, 2 epochs",
                    ("naive", "tutorial", "tfdata", "featcache"),
                    dict(dataset="synthetic", num_images=40, image_size=96, epochs=2, rate_seconds=0.5),
                    timeout_s=300),
    # 3 repeats (a median and a min-max spread) of the configurations that answer "how to feed it"
    # and "what runs the frozen pass", on 400 images: 8 min 01 s on a 2-core Intel Xeon with AMX
    # (oneDNN on by default, about 130 img/s training), where 62% of each worker's process time is
    # TensorFlow's start, the model's load, evaluation and the first repeat's breakdown. On a 2-core
    # AMD EPYC (AVX2, oneDNN off by default, about 45 img/s) 2 repeats took 9.5 minutes. Left to the full
    # preset (or --configs): naive-rgb trains like naive (its point is accuracy on real photos
    # with real weights), tfdata-dct decodes like tfdata on images this size, the mixed
    # configurations run bf16 on a CPU without native bf16 (a tfdata-mixed epoch took 13.5 s
    # against tfdata's 10.4 s here), and XLA on this kind of CPU costs 30 s of compilation to run
    # MobileNetV2 about 20x slower.
    "quick": Preset("the default: 400 synthetic images with the real set's sizes, 224 px, 5 epochs like the "
                    "notebook, 3 repeats; under 10 minutes on 2 CPU cores",
                    ("naive", "tutorial", "tfdata", "featcache", "featcache-onednn", "featcache-ov",
                     "featcache-ov-bf16"),
                    dict(dataset="synthetic", num_images=400, image_size=224, epochs=5), repeats=3,
                    timeout_s=900, probe_repeats=1, breakdown_once=True),
    "full": Preset("real flower_photos (3670 images) and the TF Hub model, every configuration, 3 repeats",
                   tuple(CONFIGS), dict(dataset="flowers", image_size=224, epochs=5, model_handle="hub"),
                   repeats=3, timeout_s=3600),
}


def select(names: str | None, preset: Preset) -> list[RunConfig]:
    """Configurations named in ``--configs a,b`` (or the preset's), in the given order."""
    if names is None:
        return [CONFIGS[n] for n in preset.configs]
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    if not chosen:
        raise UserError(f"--configs {names!r}: names no configuration; pass e.g. --configs naive,tfdata "
                        f"(see {invoked('bench')} list)")
    unknown = [n for n in chosen if n not in CONFIGS]
    if unknown:
        raise UserError(f"--configs: unknown configuration {', '.join(unknown)}; "
                        f"known: {', '.join(CONFIGS)} (see {invoked('bench')} list)")
    twice = sorted({n for n in chosen if chosen.count(n) > 1})
    if twice:  # same repeat index twice: the second would overwrite the first's log
        raise UserError(f"--configs: {', '.join(twice)} named more than once; use --repeats N to run a "
                        "configuration several times")
    return [CONFIGS[n] for n in chosen]


def describe(cfg: RunConfig) -> str:
    default = RunConfig()
    changed = [f"{k}={v}" for k, v in cfg.to_dict().items() if k != "name" and v != getattr(default, k)]
    return ", ".join(changed) or "defaults"
