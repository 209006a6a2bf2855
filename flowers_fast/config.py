"""The run configuration: one frozen dataclass holds every knob, and every knob reaches the CSV.

Each field is declared once, with :func:`knob`: its default, its help text, its command-line
flag and whether ``bench run`` may override it for a whole sweep. The flags of
``python -m flowers_fast train`` and ``python -m bench run``, the sweep overrides, the values
checks and the CSV columns are all derived from these declarations (see ``flowers_fast.clikit``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass

from .errors import UserError, invoked

PIPELINES = ("naive", "tutorial", "tfdata", "featcache", "cutcache", "modelonly")
DATASETS = ("synthetic", "flowers", "tfds")
DEVICES = ("cpu", "gpu")
PRECISIONS = ("fp32", "mixed", "int8")
ENGINES = ("tf", "openvino")
ONEDNN = ("auto", "on", "off")
# oneDNN's instruction-set levels (ONEDNN_MAX_CPU_ISA), lowest first; "all" = what the CPU has.
MAX_ISA = ("all", "avx2", "avx2_vnni", "avx512_core", "avx512_core_vnni", "avx512_core_bf16", "avx512_core_amx")
STRATEGIES = ("default", "mirrored", "multiworker")
CACHES = ("memory", "file", "none")

# The real TF Hub models; "random" means the built-in offline MobileNetV2 exported in Hub format.
HUB_FEATURE_VECTOR = "https://tfhub.dev/google/tf2-preview/mobilenet_v2/feature_vector/4"
HUB_CLASSIFIER = "https://tfhub.dev/google/tf2-preview/mobilenet_v2/classification/4"
RANDOM_HANDLE = "random"
WEIGHTS_MARKER = "flowers_fast_weights.txt"  # hubexport writes it beside its random weights
# What a row's ``weights`` says (weights_label): only what the handle shows.
RANDOM_WEIGHTS, IMAGENET_WEIGHTS = "random", "pretrained (imagenet)"
LOCAL_UNKNOWN, URL_UNKNOWN = "unknown (local)", "unknown (downloaded)"
_GOOGLE_IMAGENET = re.compile(r"^https?://(tfhub\.dev|www\.kaggle\.com/models|kaggle\.com/models)/google/"
                              r"[^?#]*(mobilenet|imagenet)", re.IGNORECASE)

# --fine-tune-epochs without --fine-tune-from: the layer TensorFlow's tutorial unfreezes MobileNetV2 from.
TUTORIAL_FINE_TUNE_FROM = "100"
_LAYER_NAME = re.compile(r"^(\d+|[A-Za-z][A-Za-z0-9_]*)$")

# Where a knob's flag appears: ``train`` (python -m flowers_fast train), ``sweep`` (python -m bench
# run, overriding it for every configuration of the sweep) and/or ``predict`` (python -m flowers_fast predict).
TRAIN, SWEEP, PREDICT = "train", "sweep", "predict"
_DATA_SERVICE = re.compile(r"^grpc://(?P<host>[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,5})$")


def knob(default, help: str, *, flag: str | None = None, choices: tuple | None = None, minimum=None,
         maximum=None, where: tuple[str, ...] = (TRAIN, SWEEP), group: str = "run", metavar: str | None = None,
         tune: tuple | None = None, tune_when: dict | None = None):
    """A RunConfig field with what the command lines and the checks need to know about it.

    ``flag`` defaults to the field name with dashes; ``minimum``/``maximum`` bound numbers (inclusive);
    ``where`` says which command lines offer the flag (empty: set only by configurations).
    ``tune``: the values ``bench tune`` may try, declared only on knobs that change how fast the job
    runs, not what it computes (or only within the accuracy tolerance, like precision); ``tune_when``
    (knob -> values) says when the knob matters at all, e.g. only for one pipeline. Combinations the
    configuration's own checks refuse are never tried."""
    return dataclasses.field(default=default, metadata=dict(
        help=help, flag=flag, choices=choices, minimum=minimum, maximum=maximum, where=where, group=group,
        metavar=metavar, tune=tune, tune_when=tune_when))


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one run. Field names are CSV column names."""

    # Unnamed (``train``), a configuration is named after its pipeline: rows and run.json say what ran.
    name: str | None = knob(None, "configuration name (bench names each configuration; default: the pipeline)",
                            where=())
    pipeline: str = knob("tfdata", "naive (the notebook: OpenCV to NumPy), tutorial (TF's tutorial), tfdata, "
                         "featcache (frozen features once, then the head), cutcache (--fine-tune-epochs: the frozen "
                         "bottom's activations at the cut once, then the top and the head), modelonly (in-memory "
                         "tensors, no data)",
                         choices=PIPELINES, where=(TRAIN,), tune=("tfdata", "featcache"))
    device: str = knob("cpu", "where to train", choices=DEVICES, where=(TRAIN,))
    # data
    dataset: str = knob("synthetic", "synthetic (built-in, offline), flowers (flower_photos.tgz download or "
                        "--data-dir), tfds (tensorflow-datasets tf_flowers); --data-dir alone means flowers",
                        choices=DATASETS, group="data")
    data_dir: str | None = knob(None, "a local class-folder dataset, e.g. an extracted flower_photos",
                                group="data", metavar="PATH")
    num_images: int = knob(3670, "synthetic set size (the real set has 3670; at least 5, one per class)", minimum=5,
                           group="data")
    image_size: int = knob(224, "square input size in pixels (32..1024)", minimum=32, maximum=1024, group="data")
    test_fraction: float = knob(0.25, "share of the images held out for testing (the notebook's 0.25)",
                                group="data")
    seed: int = knob(0, "split, synthetic data and head initialisation seed", minimum=0, maximum=2**32 - 1,
                     group="data")
    strict: bool = knob(False, "undecodable images are an error instead of a counted skip", group="data")
    # model
    model_handle: str = knob(RANDOM_HANDLE, "TF Hub feature-vector URL ('hub' = mobilenet_v2/feature_vector/4), "
                             "a local Hub SavedModel folder, or 'random' (built-in offline MobileNetV2)",
                             group="model", metavar="URL|PATH")
    fine_tune: bool = knob(False, "train the whole backbone too, from the first epoch (default: frozen)",
                           where=(TRAIN,), group="model")
    # The second half of TensorFlow's transfer-learning tutorial: --epochs with the backbone frozen
    # (the head), then --fine-tune-epochs with its top unfrozen at a lower learning rate.
    fine_tune_epochs: int = knob(0, "epochs of a second phase, after --epochs of frozen-head training, that also "
                                 "trains the backbone from --fine-tune-from up (batch norm kept in inference mode); "
                                 "0 = no second phase", minimum=0, where=(TRAIN,), group="model")
    fine_tune_from: str | None = knob(None, f"where --fine-tune-epochs unfreezes the backbone: a layer index of "
                                      f"Keras's MobileNetV2 (0 = all of it) or a block's name (block_15 = from its "
                                      f"first layer, or a layer such as block_15_expand); default "
                                      f"{TUTORIAL_FINE_TUNE_FROM}, the TensorFlow tutorial's (of 154 layers). "
                                      "Needs the native MobileNetV2 rebuild of the Hub model", where=(TRAIN,),
                                      group="model", metavar="N|BLOCK")
    fine_tune_lr_factor: float = knob(0.1, "--fine-tune-epochs: the learning rate is --learning-rate times this "
                                      "(the tutorial's 10x lower)", minimum=1e-6, maximum=1.0, where=(TRAIN,),
                                      group="model")
    augment: bool = knob(False, "random horizontal flip, rotation and zoom (Keras preprocessing layers, seeded) "
                         "inside the model, in front of the backbone, while training: every whole-model pipeline "
                         "augments the same way (featcache and cutcache: with --augment-views)", where=(TRAIN,),
                         group="model")
    augment_views: int = knob(0, "featcache and cutcache with --augment: K augmented views of each training image, "
                              "made once in the pass (K times its cost); every epoch trains on one view of each, "
                              "drawn afresh (seeded). 0 = none", minimum=0, maximum=64, where=(TRAIN,), group="model",
                              metavar="K")
    # Declared before precision: a search picks the engine first, so that int8 (OpenVINO only) can follow.
    engine: str = knob("tf", "what runs the frozen model in featcache's feature pass and in predict: tf (TensorFlow) "
                       "or openvino (OpenVINO, CPU only; with --precision mixed it runs bfloat16, where the CPU has "
                       "native bf16)", choices=ENGINES, where=(TRAIN, PREDICT), group="model",
                       tune=ENGINES)
    precision: str = knob("fp32", "mixed = float16 on GPU, bfloat16 on CPU, in the backbone's convolutions; int8 = "
                          "OpenVINO after NNCF's post-training quantization (--engine openvino), calibrated on "
                          "training images", choices=PRECISIONS, where=(TRAIN, PREDICT), group="model",
                          tune=PRECISIONS)
    calibration_images: int = knob(256, "--precision int8: how many training images (a seeded sample; predict: of "
                                   "--calibration-dir) calibrate "
                                   "the quantization (at most half the training split; up to 64 others check "
                                   "its features)",
                                   minimum=8, maximum=10000, where=(TRAIN, SWEEP, PREDICT), group="model",
                                   tune=(64, 128, 256), tune_when={"precision": ("int8",)})
    reuse_quantized: bool = knob(True, "--precision int8: load the quantized model an earlier run stored under the "
                                 "same key (model, size, versions, calibration files) instead of quantizing again; "
                                 "bench's featcache-ov-int8 turns it off, so that every repeat times its quantization",
                                 where=(TRAIN, SWEEP, PREDICT), group="model")
    int8_min_cosine: float = knob(0.95, "--precision int8: the least feature cosine vs float32, on held-out training "
                                  "images, that a quantized model must keep; below it the run stops (a skipped row)",
                                  minimum=0.0, maximum=1.0, where=(TRAIN, SWEEP, PREDICT), group="model")
    # Measured on the 2-core AMD EPYC (Zen 4), bf16, batch 16, full size, 3 repeats: one stream held
    # 74 MB less than two at the same total time; one engine thread (the other core left to decoding)
    # halved the pass rate.
    engine_streams: int = knob(0, "OpenVINO: inference streams in the frozen pass and predict; 0 = its THROUGHPUT "
                               "hint's choice (2 on 2 cores, 1 thread each), 1 = one request on every thread (its "
                               "LATENCY hint); each stream holds its own activations (one stream instead of two: "
                               "74 MB less at bf16, batch 16, on 2 cores)", minimum=0, maximum=64,
                               where=(TRAIN, SWEEP, PREDICT), group="model",
                               metavar="N", tune=(0, 1), tune_when={"engine": ("openvino",)})
    engine_threads: int = knob(0, "OpenVINO: threads that run inference; 0 = every core; fewer leave the rest to "
                               "decoding (tf.data: --private-threads)", minimum=0, maximum=1024,
                               where=(TRAIN, SWEEP, PREDICT), group="model", metavar="N")
    xla_step: bool = knob(False, "jit_compile the whole train/eval step", flag="xla", where=(TRAIN,), group="model")
    xla_backbone: bool = knob(False, "jit_compile only the backbone forward (featcache's feature pass)",
                              where=(TRAIN,), group="model")
    # training
    epochs: int = knob(5, "training epochs", minimum=1, group="training")
    batch_size: int = knob(32, "training batch per replica", minimum=1, group="training", tune=(16, 32, 64, 128))
    feature_batch_size: int = knob(0, "featcache's feature pass: images per inference call; 0 = 16 on a CPU (on 2 "
                                   "cores 16, 32 and 128 ran as fast, and each doubling held about 300 MB more in "
                                   "OpenVINO), 128 on a GPU", minimum=0, group="training",
                                   tune=(0, 32, 64, 128), tune_when={"pipeline": ("featcache",)})
    reuse_features: bool = knob(False, "featcache: keep the features on disk and skip the feature pass when the "
                                "model, engine, precision, image size and files (sizes, modification times) are "
                                "unchanged; other pipelines ignore it", group="training")
    learning_rate: float = knob(1e-3, "Adam learning rate", group="training")
    # input pipeline craft
    naive_rgb: bool = knob(False, "naive pipeline: fix the notebook's BGR channel order", flag="rgb",
                           where=(TRAIN,), group="input pipeline")
    cache: str = knob("memory", "where tf.data caches decoded images", choices=CACHES, group="input pipeline",
                      tune=CACHES, tune_when={"pipeline": ("tfdata",)})
    shuffle_buffer: int = knob(1024, "tf.data shuffle buffer (images)", minimum=1, group="input pipeline")
    dct_decode: bool = knob(False, "decode JPEGs at reduced size in the DCT when at least 2x the target",
                            where=(TRAIN,), group="input pipeline", tune=(False, True))
    deterministic: bool = knob(False, "deterministic tf.data order for training (off is faster)",
                               group="input pipeline")
    stream_autotune: bool = knob(False, "featcache/cutcache's one-time stream: let tf.data's autotuner set the "
                                 "decode's parallelism (off: one decode per core; on a 2-core AMD EPYC autotuning "
                                 "halved the TensorFlow float32 pass in 7 of 16 passes, where decode and backbone "
                                 "share the cores)", group="input pipeline", tune=(False, True),
                                 tune_when={"pipeline": ("featcache", "cutcache")})
    private_threads: int = knob(0, "tf.data private thread pool size (0 = TensorFlow's shared pool)", minimum=0,
                                group="input pipeline", tune=(0, 1, 2, 4))
    onednn: str = knob("auto", "TensorFlow's oneDNN CPU kernels (TF_ENABLE_ONEDNN_OPTS, set before TensorFlow loads): "
                       "auto = TensorFlow's own choice (on only for CPUs with AVX512-VNNI, AVX512-BF16 or AMX; off on "
                       "e.g. AMD EPYC, where on about doubled MobileNetV2's speed), on, off",
                       choices=ONEDNN, group="measurement", tune=ONEDNN)
    max_isa: str = knob("all", "the highest instruction set oneDNN may use, in TensorFlow and OpenVINO alike "
                        "(ONEDNN_MAX_CPU_ISA, set before either loads): avx2 runs oneDNN's kernels as on an "
                        "AVX2-only CPU (no VNNI, no bf16); the CPU's clock, caches and TensorFlow's own kernels "
                        "stay this machine's", choices=MAX_ISA, group="measurement")
    breakdown: bool = knob(True, "also measure input-only and model-only throughput", group="measurement")
    rate_seconds: float = knob(4.0, "the breakdown's and modelonly's in-memory rates: least seconds of steady-state "
                               "calls behind each (featcache's engines: in 3 turns each); the smoke preset uses 0.5",
                               minimum=0.1, group="measurement")
    profile: str | None = knob(None, "write a TensorFlow Profiler trace of a few steady-state train steps (featcache: "
                               "also a slice of the feature pass), run after the timed epochs, to DIR (bench run: "
                               "DIR/<run id>-<machine id>/<config>-<device>-r<repeat>); view it in TensorBoard's "
                               "Profile tab",
                               group="measurement", metavar="DIR")
    # scaling out
    strategy: str = knob("default", "tf.distribute strategy", choices=STRATEGIES, group="scaling out")
    logical_cpus: int = knob(0, "split the CPU into N logical devices (with --strategy mirrored: N replicas on a "
                             "CPU host)", minimum=0, group="scaling out", metavar="N")
    data_service: str | None = knob(None, "tf.data service dispatcher that decodes for training (tfdata) or for "
                                    "the feature pass (featcache: each task's shard, a job of its own)",
                                    group="scaling out", metavar="grpc://HOST:PORT")
    shard_store: str | None = knob(None, "--strategy multiworker, featcache and cutcache: each task streams its own "
                                   "shard of the files through the frozen pass, then the tasks share them through "
                                   "this folder, which every task must see (a shared filesystem; each shard written "
                                   "atomically), instead of the strategy's all-gather (the default, which holds "
                                   "every shard in each task's memory at once); other pipelines ignore it",
                                   group="scaling out", metavar="DIR")
    peer_timeout: float = knob(300.0, "--strategy multiworker: seconds to wait for every peer to start before "
                               "giving up", minimum=1, group="scaling out", metavar="S")
    slurm_port: int = knob(8888, "--strategy multiworker under SLURM (srun, no TF_CONFIG): port of each node's first "
                           "task; its next tasks take the next ports", minimum=1, maximum=65535, group="scaling out",
                           metavar="PORT")

    def __post_init__(self) -> None:
        if self.name is None:
            object.__setattr__(self, "name", self.pipeline)
        for f in dataclasses.fields(self):
            problem = check_value(f, getattr(self, f.name))
            if problem:
                raise UserError(f"{flag_of(f)} {problem}")
        if not 0.0 < self.test_fraction < 1.0:
            raise UserError(f"--test-fraction must be between 0 and 1, got {self.test_fraction}")
        if not self.learning_rate > 0:
            raise UserError(f"--learning-rate must be positive, got {self.learning_rate}")
        if self.data_service and self.pipeline not in ("tfdata", "featcache"):
            raise UserError(f"--data-service works with --pipeline tfdata (training input) and featcache (its feature "
                            f"pass) only, not {self.pipeline}")
        if self.data_service:
            data_service_address(self.data_service)
        if self.shard_store and self.strategy != "multiworker":
            raise UserError(f"--shard-store shares the feature pass of a --strategy multiworker run's tasks, not of "
                            f"--strategy {self.strategy}; add --strategy multiworker or drop --shard-store")
        if self.engine == "openvino":
            if self.pipeline not in ("featcache", "cutcache"):
                raise UserError(f"--engine openvino runs featcache's frozen feature pass (and cutcache's pass to the "
                                f"cut); use --pipeline featcache, or --engine tf with --pipeline {self.pipeline}")
            if self.device != "cpu":
                raise UserError(f"--engine openvino runs on the CPU only; use --device cpu, or --engine tf on "
                                f"--device {self.device}")
            if self.xla_backbone:
                raise UserError("--xla-backbone compiles TensorFlow's feature pass; drop it with --engine openvino")
        if self.precision == "int8" and self.pipeline == "cutcache":
            raise UserError("--precision int8 quantizes featcache's whole frozen backbone; cutcache's pass to the cut "
                            "runs fp32 or mixed (bf16 on OpenVINO): use one of those, or --pipeline featcache")
        check_openvino_settings(self.engine, self.engine_streams, self.engine_threads)
        if self.precision == "int8" and self.engine != "openvino":
            raise UserError("--precision int8 runs on OpenVINO after NNCF's quantization; add --engine openvino "
                            "(--pipeline featcache)")
        if self.fine_tune and self.pipeline == "featcache":
            raise UserError("--pipeline featcache needs a frozen backbone; drop --fine-tune or use --pipeline tfdata")
        self._check_fine_tune_phase()

    def _check_fine_tune_phase(self) -> None:
        """--fine-tune-epochs / --fine-tune-from / --augment: what they combine with."""
        if self.fine_tune_from is not None and not _LAYER_NAME.match(self.fine_tune_from):
            raise UserError(f"--fine-tune-from {self.fine_tune_from!r}: expected a layer index (e.g. "
                            f"{TUTORIAL_FINE_TUNE_FROM}) or a MobileNetV2 block or layer name (e.g. block_15, "
                            "block_15_expand)")
        if self.fine_tune_from is not None and not self.fine_tune_epochs:
            raise UserError(f"--fine-tune-from {self.fine_tune_from} says where the second phase unfreezes the "
                            "backbone; add --fine-tune-epochs N (its epochs), or drop --fine-tune-from")
        if self.fine_tune_epochs and self.fine_tune_from is None:
            object.__setattr__(self, "fine_tune_from", TUTORIAL_FINE_TUNE_FROM)  # the row says where
        if self.fine_tune_epochs and self.fine_tune:
            raise UserError("--fine-tune trains the whole backbone from the first epoch; --fine-tune-epochs adds a "
                            "second phase after a frozen one: use one of them (--fine-tune-from 0 unfreezes all of "
                            "it in the second phase)")
        whole_model = self.pipeline in ("naive", "tutorial", "tfdata")
        if self.fine_tune_epochs and not whole_model and self.pipeline != "cutcache":
            raise UserError(f"--fine-tune-epochs trains the backbone's top, which --pipeline {self.pipeline} does not "
                            "run every epoch (featcache's cached features are the frozen backbone's output); use "
                            "--pipeline cutcache (a cache at the cut) or tfdata (or naive, tutorial)")
        if self.pipeline == "cutcache" and (not self.fine_tune_epochs or self.fine_tune):
            raise UserError("--pipeline cutcache caches the frozen bottom to train the top in a second phase; add "
                            "--fine-tune-epochs N (and --fine-tune-from), drop --fine-tune, or use --pipeline "
                            "featcache for a frozen backbone")
        cached = self.pipeline in ("featcache", "cutcache")  # the pass runs once: views are made in it
        if self.augment_views and not cached:
            raise UserError(f"--augment-views makes augmented views once, in featcache's or cutcache's pass; "
                            f"--pipeline {self.pipeline} augments every epoch with --augment alone: drop "
                            "--augment-views, or use --pipeline featcache or cutcache")
        if self.augment_views and self.reuse_features:
            raise UserError("--reuse-features stores each image's un-augmented features, not --augment-views' "
                            "views; drop one of them")
        if self.augment_views and not self.augment:
            raise UserError(f"--augment-views {self.augment_views} says how many augmented views the pass makes; "
                            "add --augment (what augments them), or drop --augment-views")
        if self.augment and cached and not self.augment_views:
            raise UserError(f"--augment changes the images every epoch, which --pipeline {self.pipeline} does not "
                            "feed through the model (its pass runs once); add --augment-views K (K augmented views "
                            "made in the pass, one drawn per epoch), or use --pipeline tfdata")
        if self.augment and not whole_model and not cached:
            raise UserError(f"--augment changes the images every epoch, which --pipeline {self.pipeline} does not "
                            "feed through the model; use --pipeline tfdata (or naive, tutorial)")

    @classmethod
    def from_flags(cls, **given) -> "RunConfig":
        """A configuration from the flags a user gave (absent = the default)."""
        return cls(**implied(given))

    @property
    def feature_batch(self) -> int:
        """featcache's inference batch: ``feature_batch_size``, or the device's default for 0."""
        return self.feature_batch_size or (128 if self.device == "gpu" else 16)

    @property
    def augment_how(self) -> str:
        """What --augment did, in a row's words."""
        if not self.augment:
            return "none"
        if self.augment_views:
            return f"{self.augment_views} views of each training image made in the pass, one drawn per epoch"
        return "every epoch, in the model"

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


def check_openvino_settings(engine: str, streams: int, threads: int) -> None:
    """--engine-streams and --engine-threads set OpenVINO only (train's and predict's check)."""
    if (streams or threads) and engine != "openvino":
        flag = "--engine-streams" if streams else "--engine-threads"
        raise UserError(f"{flag} sets OpenVINO's CPU plugin; add --engine openvino, or drop {flag} (TensorFlow's "
                        "threads: --onednn, --private-threads)")


def weights_label(handle: str) -> str:
    """What is known of a resolved model handle's weights, without loading it: ``random`` for this
    project's own export (hubexport's marker file), ``pretrained (imagenet)`` for Google's ImageNet
    models on TF Hub / Kaggle (also as TF Hub cached them: a ``.descriptor`` file beside the
    folder names the URL), else ``unknown (downloaded)`` (another URL) or ``unknown (local)``: a
    folder's weights cannot be told from the folder."""
    from pathlib import Path

    if re.match(r"^https?://", handle):
        return IMAGENET_WEIGHTS if _GOOGLE_IMAGENET.match(handle) else URL_UNKNOWN
    path = Path(handle).expanduser()
    if (path / WEIGHTS_MARKER).exists():
        return RANDOM_WEIGHTS
    try:
        descriptor = path.with_name(path.name + ".descriptor").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return LOCAL_UNKNOWN
    url = next((line.split(":", 1)[1].strip() for line in descriptor.splitlines() if line.startswith("Module:")), "")
    return IMAGENET_WEIGHTS if _GOOGLE_IMAGENET.match(url) else LOCAL_UNKNOWN


def data_service_address(address: str) -> tuple[str, int]:
    """``grpc://HOST:PORT`` -> (host, port), or a UserError naming --data-service."""
    m = _DATA_SERVICE.match(address or "")
    if not m or not 1 <= int(m["port"]) <= 65535:
        raise UserError(f"--data-service {address!r}: expected the dispatcher as grpc://HOST:PORT, e.g. "
                        f"grpc://localhost:5050 (start it with: {invoked('bench')} dataservice dispatcher --port 5050)")
    return m["host"].strip("[]"), int(m["port"])


def implied(given: dict) -> dict:
    """``given`` knob values plus what they imply: ``--data-dir`` alone means the flowers dataset."""
    given = dict(given)
    if given.get("data_dir") and given.get("dataset", "flowers") != "flowers":
        raise UserError(f"--data-dir reads a local folder, but --dataset {given['dataset']} was given too; drop one "
                        "of them (--data-dir alone means --dataset flowers from that folder)")
    if given.get("data_dir") and not given.get("dataset"):
        given["dataset"] = "flowers"
    return given


def knobs(where: str | None = None) -> list[dataclasses.Field]:
    """RunConfig's fields, optionally only those offered as flags ``where`` (TRAIN or SWEEP)."""
    return [f for f in dataclasses.fields(RunConfig) if where is None or where in f.metadata["where"]]


def flag_of(f: dataclasses.Field) -> str:
    return "--" + (f.metadata.get("flag") or f.name).replace("_", "-")


def kind_of(f: dataclasses.Field) -> type:
    """The Python type of a knob's values, read from its default (``None`` defaults are text)."""
    return str if f.default is None else type(f.default)


def check_value(f: dataclasses.Field, value) -> str | None:
    """What is wrong with ``value`` for knob ``f`` (None when it is fine): type, choices, minimum,
    and no NaN or infinity in any number."""
    kind, meta = kind_of(f), f.metadata
    if value is None:
        return None if f.default is None else f"must be given, got {value!r}"
    if kind is bool:
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
        return f"must be a whole number, got {value!r}"
    if kind is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"must be a number, got {value!r}"
        if not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
    if kind is str and not isinstance(value, str):
        return f"must be text, got {value!r}"
    if kind is str and not value.strip():
        return f"must not be empty, got {value!r}"
    if meta["choices"] and value not in meta["choices"]:
        return f"{value!r} is not one of {', '.join(meta['choices'])}"
    if meta["minimum"] is not None and value < meta["minimum"]:
        if meta["minimum"] == 1 and kind is int:
            return f"must be a positive integer, got {value!r}"
        return f"must be at least {meta['minimum']}, got {value!r}"
    if meta["maximum"] is not None and value > meta["maximum"]:
        return f"must be at most {meta['maximum']}, got {value!r}"
    return None


def load_file(path, flag: str = "--config") -> dict:
    """The knob values of a configuration file (a JSON object of RunConfig fields, as ``bench tune``
    writes its winner), each checked as its flag would be: a UserError naming the file and the key
    for an unreadable file, an unknown key or an invalid value. Flags given with it override it."""
    from pathlib import Path

    where = f"{flag} {path}"
    try:
        values = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{where}: cannot read ({getattr(exc, 'strerror', None) or exc}); pass a configuration "
                        "file (JSON) such as bench tune's best.json") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno}); expected an object of knob "
                        'values, e.g. {"pipeline": "featcache"}') from None
    if not isinstance(values, dict):
        raise UserError(f'{where}: expected a JSON object of knob values, e.g. {{"pipeline": "featcache"}}')
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    for key, value in values.items():
        if key not in fields:
            raise UserError(f"{where}: unknown key {key!r}; keys are RunConfig's knobs, e.g. pipeline, batch_size "
                            "(see --help: a flag's name with underscores)")
        problem = check_value(fields[key], value)
        if problem:
            raise UserError(f"{where}: key {key!r} {problem}")
    return values


def from_file(path, given: dict, flag: str = "--config", under: dict | None = None) -> "RunConfig":
    """A configuration from file ``path`` over ``under`` (bench run: the preset's job), with the
    flags ``given`` on top; a check across knobs that fails names the file too."""
    values = {**(under or {}), **load_file(path, flag), **implied(given)}
    try:
        return RunConfig.from_flags(**values)
    except UserError as exc:
        raise UserError(f"{flag} {path} with the flags given: {exc}") from None
