"""The run configuration: one frozen dataclass holds every knob, and every knob reaches the CSV."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .errors import UserError

PIPELINES = ("naive", "tutorial", "tfdata", "featcache", "modelonly")
DATASETS = ("synthetic", "flowers", "tfds")
DEVICES = ("cpu", "gpu")
PRECISIONS = ("fp32", "mixed")
STRATEGIES = ("default", "mirrored", "multiworker")
CACHES = ("memory", "file", "none")

# The real TF Hub models; "random" means the built-in offline MobileNetV2 exported in Hub format.
HUB_FEATURE_VECTOR = "https://tfhub.dev/google/tf2-preview/mobilenet_v2/feature_vector/4"
HUB_CLASSIFIER = "https://tfhub.dev/google/tf2-preview/mobilenet_v2/classification/4"
RANDOM_HANDLE = "random"


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one run. Field names are CSV column names."""

    name: str = "tfdata"
    pipeline: str = "tfdata"  # naive | tutorial | tfdata | featcache | modelonly (in-memory tensors, no data)
    device: str = "cpu"
    # data
    dataset: str = "synthetic"
    data_dir: str | None = None
    num_images: int = 3670  # synthetic set size (the real set has 3670)
    image_size: int = 224
    test_fraction: float = 0.25
    seed: int = 0
    strict: bool = False  # corrupt images are an error instead of a counted skip
    # model
    model_handle: str = RANDOM_HANDLE
    fine_tune: bool = False
    precision: str = "fp32"  # fp32 | mixed (float16 on GPU, bfloat16 on CPU)
    xla_step: bool = False  # jit_compile the whole train/eval step
    xla_backbone: bool = False  # jit_compile only the backbone forward (feature pass)
    # training
    epochs: int = 5
    batch_size: int = 32  # per replica
    feature_batch_size: int = 128  # featcache's one-time backbone pass: inference only, so bigger is faster
    learning_rate: float = 1e-3
    # input pipeline craft
    naive_rgb: bool = False  # the notebook feeds BGR; True fixes the channel order
    cache: str = "memory"  # memory | file | none: where tf.data caches decoded images
    shuffle_buffer: int = 1024
    dct_decode: bool = False  # decode JPEGs at reduced size when >= 2x the target
    deterministic: bool = False  # tf.data ordering for training (off is faster)
    private_threads: int = 0  # tf.data private thread pool size, 0 = shared pool
    breakdown: bool = True  # also measure input-only and model-only throughput
    # scaling out
    strategy: str = "default"
    logical_cpus: int = 0  # >1: split the CPU into this many devices (mirrored on a CPU-only host)
    data_service: str | None = None

    def __post_init__(self) -> None:
        checks = {
            "pipeline": (self.pipeline, PIPELINES),
            "dataset": (self.dataset, DATASETS),
            "device": (self.device, DEVICES),
            "precision": (self.precision, PRECISIONS),
            "strategy": (self.strategy, STRATEGIES),
            "cache": (self.cache, CACHES),
        }
        for flag, (value, allowed) in checks.items():
            if value not in allowed:
                raise UserError(f"--{flag.replace('_', '-')} {value!r} is not one of {', '.join(allowed)}")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "num_images": self.num_images,
                    "image_size": self.image_size, "feature_batch_size": self.feature_batch_size}
        for flag, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise UserError(f"--{flag.replace('_', '-')} must be a positive integer, got {value!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise UserError(f"--test-fraction must be between 0 and 1, got {self.test_fraction}")
        if self.learning_rate <= 0:
            raise UserError(f"--learning-rate must be positive, got {self.learning_rate}")
        if self.data_service and self.pipeline != "tfdata":
            raise UserError(f"--data-service works with --pipeline tfdata only, not {self.pipeline}")
        if self.logical_cpus < 0:
            raise UserError(f"--logical-cpus must be 0 or more, got {self.logical_cpus}")
        if self.image_size < 32:
            raise UserError(f"--image-size must be at least 32, got {self.image_size}")

    @property
    def mixed_dtype(self) -> str:
        """The reduced precision this device runs fast: float16 on GPU, bfloat16 on CPU."""
        return "float16" if self.device == "gpu" else "bfloat16"

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        return cls(**json.loads(text))

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]
