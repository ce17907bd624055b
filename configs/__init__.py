"""Typed pipeline configuration, loaded from the YAML files in this folder.

Every section forbids unknown keys, so a typo fails before any work starts with
the file and the dotted key named.
"""

from __future__ import annotations

import copy
import os
import secrets
from datetime import date
from enum import Enum
from pathlib import Path
from typing import Annotated, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_DIR = Path(__file__).resolve().parent
SALT_ENV_VAR = "MEDXFER_PATIENT_SALT"
# Set, it replaces every config's registry.tracking_uri: the same configs run against a
# tracking server (the production stack) with no edit. Credentials stay in MLflow's own
# MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
TRACKING_URI_ENV = "MEDXFER_TRACKING_URI"


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskKind(str, Enum):
    CLASSIFICATION = "classification"
    REGRESSION = "regression"


class FreezeStrategy(str, Enum):
    HEAD = "head"  # backbone frozen, only the new head trains
    PARTIAL = "partial"  # stem and the first `frozen_stages` residual stages frozen
    FULL = "full"  # everything trains
    AUTO = "auto"  # head below `auto_full_threshold` training images, full above


class ClassBalance(str, Enum):
    NONE = "none"
    WEIGHTED_LOSS = "weighted_loss"  # cross-entropy weighted by inverse class frequency
    BALANCED_SAMPLER = "balanced_sampler"  # every class drawn equally often, with replacement


class Precision(str, Enum):
    # bf16 where it is native (CUDA with bf16 units, CPUs with avx512_bf16 or AMX), fp32
    # elsewhere: read from the hardware by tasks.hardware.training_precision
    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"  # torch.autocast to bfloat16 (CPU and CUDA); weights and optimizer stay fp32


class SplitConfig(Strict):
    """Fractions used when the manifest has no `split` column."""

    val_fraction: Annotated[float, Field(gt=0, lt=0.5)] = 0.15
    test_fraction: Annotated[float, Field(gt=0, lt=0.5)] = 0.2


def _check_labels(kind: TaskKind, label_names: Sequence[str], positive_label: str | None) -> None:
    if kind is TaskKind.CLASSIFICATION:
        if len(label_names) < 2:
            raise ValueError("label_names: classification needs at least two class names")
        if positive_label is not None and positive_label not in label_names:
            raise ValueError(f"positive_label: {positive_label!r} is not in label_names")
    elif label_names:
        raise ValueError("label_names: only used for classification")


class TaskSpec(Strict):
    """What a model predicts, as training, evaluation and export need it: the kind of task,
    the class names in output order, and the class that AUC, sensitivity and F1 refer to."""

    kind: TaskKind
    label_names: tuple[str, ...] = ()
    positive_label: str | None = None  # classification: default the last class

    @model_validator(mode="after")
    def _labels_fit_task(self) -> "TaskSpec":
        _check_labels(self.kind, self.label_names, self.positive_label)
        return self

    @property
    def classification(self) -> bool:
        return self.kind is TaskKind.CLASSIFICATION

    @property
    def num_outputs(self) -> int:
        """Width of the model's head: one logit per class, or one age."""
        return len(self.label_names) if self.classification else 1

    @property
    def positive_index(self) -> int:
        """The output the positive-class metrics read: `positive_label`, else the last class; 0 (the
        only output) for regression, so every caller can pass it without a task-kind branch."""
        if not self.classification:
            return 0
        if self.positive_label is None:
            return len(self.label_names) - 1
        return self.label_names.index(self.positive_label)


class DataConfig(Strict):
    root: Path  # folder that holds the images (source pacs: the local copy of the selected instances)
    manifest: Path  # CSV: path, label | age, optional patient_id, split (source pacs: written from the label export)
    task: TaskKind
    # folder: root + manifest as given; pacs: retrieved from the `pacs` section's server into root,
    # labelled from its label export (see tasks/pacs/source.py)
    source: Literal["folder", "pacs"] = "folder"
    label_names: list[str] = []  # classification: class names, in output order
    positive_label: str | None = None  # classification: the class ROC AUC etc. refer to
    age_range: tuple[float, float] = (0.0, 120.0)  # regression: plausible ages, years
    # Our column name -> the CSV's, for manifests that name things their own way.
    columns: dict[Literal["path", "label", "age", "patient_id", "split"], str] = {}
    use_manifest_split: bool = True  # False: ignore a `split` column and make new splits
    split: SplitConfig = SplitConfig()
    patient_salt: str | None = None  # else read from $MEDXFER_PATIENT_SALT
    # The flow stops when a class (regression: the whole set) has fewer usable samples.
    min_usable_per_class: Annotated[int, Field(ge=1)] = 10

    @model_validator(mode="after")
    def _labels_fit_task(self) -> "DataConfig":
        _check_labels(self.task, self.label_names, self.positive_label)
        return self

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(kind=self.task, label_names=tuple(self.label_names), positive_label=self.positive_label)

    @property
    def positive_index(self) -> int:
        """Index of the positive class: `positive_label`, else the last class (0 for regression)."""
        return self.spec.positive_index


class FramePolicy(str, Enum):
    """Which frames of a multi-frame DICOM become samples."""

    MIDDLE = "middle"
    FIRST = "first"
    ALL = "all"  # every frame its own sample, all sharing the file's patient and split


class Fit(str, Enum):
    """How an image of any shape becomes the model's square input."""

    CROP = "crop"  # short side to `resize`, centre crop `crop`: the edges of a long image are cut off
    PAD = "pad"  # long side to `crop`, padded to a square with air: the whole image, smaller


class PreprocessConfig(Strict):
    resize: Annotated[int, Field(gt=0)] = 256  # fit crop: short side, before the centre crop
    crop: Annotated[int, Field(gt=0)] = 224  # the model's input side
    fit: Fit = Fit.CROP
    cache_dir: Path = Path(".cache/medxfer/preprocessed")
    workers: Annotated[int, Field(ge=1)] | None = None  # decode processes; None: all cores
    # Preprocess on a Dask cluster instead (Prefect tasks on prefect-dask's DaskTaskRunner):
    # a scheduler address ("tcp://host:8786"), or "local" for a temporary LocalCluster on this
    # machine; None keeps the local process pool.
    dask_address: str | None = None
    frames: FramePolicy = FramePolicy.MIDDLE
    voi_window: Annotated[int, Field(ge=0)] = 0  # which header window / VOI LUT; the first if absent
    # Checked from the header before decoding (the service and scoring too): rows x columns x
    # the frames decoded (all under `frames: all`, else one), and frames in a file. 50 million
    # is a 7000 x 7000 film scan, twice the largest mammogram; decoding one takes about 1 GB.
    max_pixels: Annotated[int, Field(gt=0)] = 50_000_000
    max_frames: Annotated[int, Field(gt=0)] = 5_000

    @model_validator(mode="after")
    def _crop_fits(self) -> "PreprocessConfig":
        if self.fit is Fit.CROP and self.crop > self.resize:
            raise ValueError("crop: must not exceed resize")
        return self


class ModelConfig(Strict):
    arch: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"
    # "imagenet" (torchvision weights API, TORCH_HOME cache), "none", a checkpoint path,
    # or a registered source model "mlflow:/<name>@<alias>" (see flows/pretrain.py)
    weights: str = "imagenet"
    weights_sha256: str | None = None  # checked when `weights` is a file or an MLflow source model
    freeze: FreezeStrategy = FreezeStrategy.AUTO
    frozen_stages: Annotated[int, Field(ge=0, le=4)] = 2  # for `partial`
    # `full` beat `head` from 50 images up on both benchmark datasets (benchmarks/RESULTS.md, issue 4 run 2)
    auto_full_threshold: Annotated[int, Field(gt=0)] = 50  # training images

    @model_validator(mode="after")
    def _sha_needs_file(self) -> "ModelConfig":
        if self.weights_sha256 and self.weights in ("imagenet", "none"):
            raise ValueError("weights_sha256: only used when weights is a file or an MLflow source model")
        return self


class AugmentConfig(Strict):
    """Training-only augmentation for medical images: small, anatomy-preserving changes."""

    enabled: bool = False
    rotation_degrees: Annotated[float, Field(ge=0, le=30)] = 10.0
    translate_fraction: Annotated[float, Field(ge=0, le=0.2)] = 0.05
    crop_scale: tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]] = (0.85, 1.0)
    crop_ratio: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (0.9, 1.1)
    # Off by default: left and right are not interchangeable in most anatomy (a chest's heart).
    allow_flip: bool = False

    @model_validator(mode="after")
    def _ranges_ordered(self) -> "AugmentConfig":
        for key in ("crop_scale", "crop_ratio"):
            low, high = getattr(self, key)
            if low > high:
                raise ValueError(f"{key}: lower bound {low} exceeds upper bound {high}")
        return self


class TrainConfig(Strict):
    epochs: Annotated[int, Field(gt=0)] = 10
    batch_size: Annotated[int, Field(gt=0)] = 32
    lr: Annotated[float, Field(gt=0)] = 1e-3  # the head's learning rate
    # partial/full: backbone lr = lr * backbone_lr_factor (discriminative learning rates)
    backbone_lr_factor: Annotated[float, Field(gt=0, le=1)] = 0.1
    # partial/full: train only the head for this many epochs, then unfreeze per the strategy
    warmup_head_epochs: Annotated[int, Field(ge=0)] = 0
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    # head: the L2 strengths tried when fitting the head on cached features (mean loss +
    # l2/2 * ||W||^2 on standardised features); the best on validation is kept.
    head_l2: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1)] = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
    patience: Annotated[int, Field(gt=0)] = 3  # epochs without val improvement
    class_balance: ClassBalance = ClassBalance.NONE  # classification only
    augment: AugmentConfig = AugmentConfig()
    precision: Precision = Precision.AUTO
    channels_last: bool | None = None  # NHWC; unset: on when training in bf16
    compile: bool = False  # torch.compile the model; CUDA only, ignored (with a log line) on CPU
    resume: bool = True  # continue from the run's last checkpoint when one matches
    num_workers: Annotated[int, Field(ge=0)] = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"


class RegistryConfig(Strict):
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "medxfer"
    model_name: str
    # Where a new experiment keeps artifacts; None: `output_dir/mlartifacts` for a
    # local (sqlite/file) store, the tracking server's default otherwise.
    artifact_location: str | None = None
    # The stages that only talk to the registry and its object store (register, model card,
    # scoring's load-champion) are tried again this many times on a connection or 5xx error,
    # after io_retry_delay_seconds, then twice as long each time: a tracking server that
    # restarts costs a wait, not the run. (MLflow's client first retries each request itself.)
    io_retries: Annotated[int, Field(ge=0)] = 3
    io_retry_delay_seconds: Annotated[float, Field(gt=0)] = 10.0
    # A version whose test interval shows it no better than a model without skill (AUC 0.5,
    # or the MAE of answering the training mean age) is never made champion, even the first.
    require_skill: bool = True
    # The MLflow UI's address, for the links on Prefect flow runs and model versions; None:
    # the tracking URI when it is an MLflow server (http/https), else no links.
    ui_url: str | None = None

    def mlflow_ui_url(self) -> str | None:
        if self.ui_url:
            return self.ui_url.rstrip("/")
        return self.tracking_uri.rstrip("/") if self.tracking_uri.startswith(("http://", "https://")) else None


class ExportConfig(Strict):
    opset: Annotated[int, Field(ge=17)] = 18
    max_abs_diff: Annotated[float, Field(gt=0)] = 1e-4  # normalised graph vs PyTorch
    # Self-contained graph vs PyTorch's preprocessing: ONNX Resize and torchvision's
    # antialiased resize can round a rare pixel to the neighbouring 8-bit level.
    self_contained_max_abs_diff: Annotated[float, Field(gt=0)] = 1e-3
    parity_samples: Annotated[int, Field(gt=0)] = 32
    int8: bool = True  # also write model_int8.onnx (static quantisation, for CPUs)
    # int8 is calibrated on this many training crops (spread evenly over the split) and kept only
    # if its test-set loss against model.onnx stays within these tolerances (else dropped, with why).
    int8_calibration_images: Annotated[int, Field(gt=0)] = 256
    # Calibration methods tried; the one closest to float32 on the validation crops is kept.
    int8_calibration_methods: Annotated[list[Literal["minmax", "percentile"]], Field(min_length=1)] = [
        "minmax", "percentile"]
    int8_max_auc_loss: Annotated[float, Field(ge=0)] = 0.005
    int8_min_decision_agreement: Annotated[float, Field(ge=0, le=1)] = 0.99  # same decision as fp32
    int8_max_mae_increase: Annotated[float, Field(ge=0)] = 0.1  # regression, in the target's unit (years)
    fp16: bool = True  # also write model_fp16.onnx (half precision, for GPUs)
    fp16_max_abs_diff: Annotated[float, Field(gt=0)] = 1e-2
    # domain_score vs PyTorch, as a fraction of its threshold: float32 graphs, then int8 and fp16
    domain_max_rel_diff: Annotated[float, Field(gt=0)] = 1e-3
    variant_domain_max_rel_diff: Annotated[float, Field(gt=0)] = 5e-2


class ServeConfig(Strict):
    """The inference service (serve/): where it listens and how it batches."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(gt=0, lt=65536)] = 8000
    max_body_bytes: Annotated[int, Field(gt=0)] = 64 * 1024 * 1024  # larger bodies get 413
    max_batch: Annotated[int, Field(gt=0)] = 16  # micro-batch size limit
    # Request bodies decoded at once (None: one per core). A decode of preprocess.max_pixels
    # takes about a gigabyte; waiting requests hold only their bodies, batches only crops.
    decode_slots: Annotated[int, Field(ge=1)] | None = None
    batch_window_ms: Annotated[float, Field(ge=0)] = 5.0  # how long a batch waits to fill
    # Batches run at once; on a CPU each gets cores // concurrent_batches ONNX Runtime threads.
    # On 2 cores two made no measurable difference once the session stopped spinning (service
    # at the same requests/s, benchmarks/RESULTS.md, issue 16), so one is the default; a CPU
    # with many cores, where one batch does not scale over all of them, may gain from more.
    concurrent_batches: Annotated[int, Field(ge=1)] = 1
    reload_seconds: Annotated[float, Field(gt=0)] = 30.0  # how often the champion alias is polled
    variant: Literal["fp32", "int8", "fp16"] = "fp32"  # which registered ONNX file to serve
    # The API key itself is a secret and never in YAML: it is read from this
    # environment variable; unset or empty means no key is required.
    api_key_env: str = "MEDXFER_API_KEY"


class ThresholdRule(str, Enum):
    YOUDEN = "youden"  # maximise sensitivity + specificity - 1 on validation
    SENSITIVITY = "sensitivity"  # highest threshold whose validation sensitivity reaches the target


class EvaluateConfig(Strict):
    """How the test set is reported: intervals, operating threshold, calibration, Grad-CAM."""

    threshold: ThresholdRule = ThresholdRule.YOUDEN
    target_sensitivity: Annotated[float, Field(gt=0, le=1)] = 0.9  # for threshold: sensitivity
    bootstrap_samples: Annotated[int, Field(ge=100)] = 1000  # percentile bootstrap over test cases
    confidence: Annotated[float, Field(gt=0.5, lt=1)] = 0.95
    calibration_bins: Annotated[int, Field(ge=2, le=50)] = 10
    gradcam_images: Annotated[int, Field(ge=0, le=32)] = 6


class NoveltyMethod(str, Enum):
    """How far an image's penultimate features lie from the training images' (tasks/domain.py)."""

    MAHALANOBIS = "mahalanobis"  # to the training mean, under a Ledoit-Wolf shrunk covariance
    KNN = "knn"  # cosine distance to the k-th nearest training image


class DomainPolicy(str, Enum):
    """What the service and batch scoring do with an input outside the training domain."""

    FLAG = "flag"  # answer, with in_domain false and the reasons
    REFUSE = "refuse"  # no prediction: 422 (service) or a reject (batch scoring), with the reasons


class OutOfDomainGroup(str, Enum):
    """How an evaluation image differs from the training data; AUROC is reported per group."""

    OTHER_MODALITY = "other_modality"
    SAME_MODALITY_OTHER_ANATOMY = "same_modality_other_anatomy"


class OutOfDomainSource(Strict):
    """Real images the model was not trained for, held out to evaluate the domain check.

    Exactly one of: `pydicom` (pydicom-data files of these Modality values, see
    tasks.domain_eval.PYDICOM_IMAGES), `folder` (DICOM/PNG/JPEG files), `npz` (a
    MedMNIST-style `{split}_images` array, sent as PNG the way a caller would).
    Missing paths are skipped with a log line (CI has no ../shared)."""

    group: OutOfDomainGroup
    pydicom: list[str] | None = None
    body_parts: list[str] | None = None  # pydicom: only files with these BodyPartExamined values
    folder: Path | None = None
    npz: Path | None = None
    split: str = "test"  # npz: which `{split}_images`
    limit: Annotated[int, Field(gt=0)] | None = None  # at most this many images, a seeded random subset

    @model_validator(mode="after")
    def _one_source(self) -> "OutOfDomainSource":
        given = [key for key in ("pydicom", "folder", "npz") if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of pydicom, folder, npz")
        if self.body_parts is not None and self.pydicom is None:
            raise ValueError("body_parts: only used with pydicom")
        return self


class DomainConfig(Strict):
    """The input-domain check fitted at training time and shipped in the ONNX file (tasks/domain.py)."""

    method: NoveltyMethod = NoveltyMethod.MAHALANOBIS
    knn_k: Annotated[int, Field(gt=0)] = 5  # method knn
    # The novelty threshold: this quantile of the in-domain validation images' scores (split conformal's rank).
    quantile: Annotated[float, Field(gt=0.5, lt=1)] = 0.99
    # Image rows and columns may lie this fraction outside the range seen in training.
    size_margin: Annotated[float, Field(ge=0)] = 0.25
    policy: DomainPolicy = DomainPolicy.FLAG
    out_of_domain: list[OutOfDomainSource] = []


class ScheduleConfig(Strict):
    cron: str = "0 2 * * 0"  # weekly retraining, Sunday 02:00
    timezone: str = "UTC"


class SearchParam(Strict):
    """One dimension of a hyperparameter search: a range (`low`, `high`; `log` for a log scale,
    `step` to discretise; whole-number bounds search integers) or a list of `choices`."""

    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list[bool | int | float | str] | None = None

    @model_validator(mode="after")
    def _range_or_choices(self) -> "SearchParam":
        if (self.choices is None) == (self.low is None or self.high is None):
            raise ValueError("give either low and high, or choices")
        if self.choices is not None and (not self.choices or self.log or self.step is not None):
            raise ValueError("choices: a non-empty list, without log or step")
        if self.choices is None and self.low > self.high:
            raise ValueError(f"low {self.low} exceeds high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError("log: needs low > 0")
        return self

    @property
    def integer(self) -> bool:
        return self.choices is None and all(isinstance(v, int) for v in (self.low, self.high))

    def values(self) -> list:
        """The values a grid covers: the choices, or every step of a discretised range."""
        if self.choices is not None:
            return list(self.choices)
        if self.step is None:
            raise ValueError("a grid needs choices, or a range with a step")
        count = int(round((self.high - self.low) / self.step)) + 1
        values = [self.low + i * self.step for i in range(count)]
        return [int(v) for v in values] if self.integer else values

    def extremes(self) -> list:
        return list(self.choices) if self.choices is not None else [self.low, self.high]


# Search keys that are not one config field: `resolution` sets preprocess.crop (and resize in the
# config's proportion); `augment_strength` in [0, 1] scales train.augment (0: off). See apply_params.
RESOLUTION, AUGMENT_STRENGTH = "resolution", "augment_strength"
SEARCHABLE_SECTIONS = ("train", "model")  # other search keys: train.<field>, model.<field>, dotted


def augment_at_strength(strength: float, allow_flip: bool) -> dict:
    """train.augment at `strength` in [0, 1]; 0.5 is about the AugmentConfig defaults."""
    return {"enabled": strength > 0, "allow_flip": allow_flip, "rotation_degrees": 20.0 * strength,
            "translate_fraction": 0.1 * strength, "crop_scale": [1.0 - 0.4 * strength, 1.0],
            "crop_ratio": [1.0 - 0.2 * strength, 1.0 + 0.2 * strength]}


def apply_params(raw: dict, params: dict) -> dict:
    """A copy of the raw config mapping (YAML, or a model dump) with a trial's search params set.

    The one place search keys become config keys, used for trial configs and for the best
    config a search writes out, so the pipeline trains exactly what the trial did.
    """
    raw = copy.deepcopy(raw)
    for key, value in params.items():
        if key == RESOLUTION:
            pre = raw.setdefault("preprocess", {})
            defaults = PreprocessConfig(**{k: v for k, v in pre.items() if k in ("resize", "crop")})
            pre["resize"], pre["crop"] = round(value * defaults.resize / defaults.crop), int(value)
        elif key == AUGMENT_STRENGTH:
            train = raw.setdefault("train", {})
            allow_flip = train.get("augment", {}).get("allow_flip", AugmentConfig().allow_flip)
            train["augment"] = augment_at_strength(float(value), allow_flip)
        else:
            *sections, field = key.split(".")
            if not sections or sections[0] not in SEARCHABLE_SECTIONS:
                raise ValueError(f"{key}: searchable keys are {RESOLUTION}, {AUGMENT_STRENGTH}, "
                                 f"or fields of {' and '.join(SEARCHABLE_SECTIONS)} (e.g. train.lr)")
            target = raw
            for section in sections:
                target = target.setdefault(section, {})
            target[field] = value
    return raw


class SamplerKind(str, Enum):
    TPE = "tpe"  # Optuna's tree-structured Parzen estimator
    GRID = "grid"  # every combination (choices or stepped ranges only): the exhaustive baseline


class PrunerKind(str, Enum):
    MEDIAN = "median"  # stop a trial whose epoch metric is worse than the median of earlier trials there
    SUCCESSIVE_HALVING = "successive_halving"  # asynchronous successive halving
    NONE = "none"


def _default_space() -> dict[str, SearchParam]:
    """A space for a CPU that fits either task (classification configs may add train.class_balance)."""
    return {
        "train.lr": SearchParam(low=1e-4, high=3e-3, log=True),
        "train.weight_decay": SearchParam(low=1e-5, high=1e-1, log=True),
        "train.epochs": SearchParam(choices=[10, 20, 30]),
        "model.freeze": SearchParam(choices=["head", "partial", "full"]),
        "model.frozen_stages": SearchParam(low=1, high=3),
        "train.backbone_lr_factor": SearchParam(low=0.03, high=1.0, log=True),
        "train.warmup_head_epochs": SearchParam(choices=[0, 1, 2]),
        AUGMENT_STRENGTH: SearchParam(low=0.0, high=1.0),
        RESOLUTION: SearchParam(choices=[64, 128]),
        "train.batch_size": SearchParam(choices=[16, 32]),
    }


class TuneConfig(Strict):
    """flows/tune.py: the search space and how the search runs."""

    space: dict[str, SearchParam] = Field(default_factory=_default_space)
    trials: Annotated[int, Field(gt=0)] = 40  # finished (complete or pruned) trials the study should hold
    timeout_minutes: Annotated[float, Field(gt=0)] | None = 60.0  # per run; running trials stop at it
    parallel_trials: Annotated[int, Field(gt=0)] = 2  # trials in flight at once on the flow's task runner
    sampler: SamplerKind = SamplerKind.TPE
    startup_trials: Annotated[int, Field(ge=0)] = 8  # TPE: random trials before the model takes over
    pruner: PrunerKind = PrunerKind.MEDIAN
    warmup_epochs: Annotated[int, Field(ge=0)] = 2  # no pruning before a trial has run this many epochs
    # Where the study lives (any SQLAlchemy URL: PostgreSQL in the stack); None: SQLite in output_dir.
    storage: str | None = None
    study_name: str | None = None  # None: "<name>-tune"
    train_best: bool = True  # then run flows/pipeline on the best config (train, evaluate on test, register)

    @model_validator(mode="after")
    def _grid_is_finite(self) -> "TuneConfig":
        if RESOLUTION in self.space and self.space[RESOLUTION].choices is None:
            raise ValueError(f"space.{RESOLUTION}: a list of choices (each is one preprocessing pass)")
        if self.sampler is SamplerKind.GRID:
            for key, param in self.space.items():
                if param.choices is None and param.step is None:
                    raise ValueError(f"space.{key}: a grid needs choices, or a range with a step")
        return self


class LearningCurveConfig(Strict):
    """flows/learning_curve.py: training-set sizes, repeats, and what counts as flat."""

    sizes: Annotated[list[Annotated[int, Field(gt=0)]], Field(min_length=1)] = [25, 50, 100, 200, 400]
    seeds: Annotated[int, Field(gt=0)] = 3  # nested subsets (and initialisations) per size; all images too
    bootstrap_samples: Annotated[int, Field(ge=100)] = 1000
    # The curve counts as flat where doubling the labels gains less than this (units of the primary
    # metric: AUC, or years of MAE for ages).
    flat_gain: Annotated[float, Field(gt=0)] = 0.01
    mark: Annotated[int, Field(gt=0)] | None = 50  # a size to mark on the plot (the "50 images" claim)
    parallel: Annotated[int, Field(gt=0)] = 2  # models trained at once on the flow's task runner


class RunConfig(Strict):
    """What every run config has: a name, a seed and where its outputs go."""

    name: str
    seed: int = 42
    output_dir: Path = Path("outputs")


class PacsProtocol(str, Enum):
    DICOMWEB = "dicomweb"  # QIDO-RS search, WADO-RS retrieve (dicomweb-client)
    DIMSE = "dimse"  # C-FIND, then C-GET or C-MOVE (pynetdicom)


class DicomWebAuth(str, Enum):
    NONE = "none"
    BASIC = "basic"  # username and password from the environment
    BEARER = "bearer"  # a token from the environment


class DicomWebConfig(Strict):
    url: str  # the DICOMweb root, e.g. https://pacs.example.org/dicom-web
    auth: DicomWebAuth = DicomWebAuth.NONE
    # Secrets are never in YAML: these name the environment variables that hold them.
    username_env: str = "MEDXFER_PACS_USERNAME"
    password_env: str = "MEDXFER_PACS_PASSWORD"
    token_env: str = "MEDXFER_PACS_TOKEN"
    verify_tls: bool = True  # off only for a test server; prefer ca_bundle for a site's own CA
    ca_bundle: Path | None = None  # PEM file of the CA that signed the PACS's certificate


class DimseRetrieve(str, Enum):
    GET = "c-get"  # the PACS sends the instances back on medxfer's own association
    MOVE = "c-move"  # the PACS opens an association to medxfer's storage SCP


class DimseConfig(Strict):
    host: str
    port: Annotated[int, Field(gt=0, lt=65536)]
    called_ae: str  # the PACS's AE title
    calling_ae: str = "MEDXFER"  # medxfer's AE title, registered at the PACS
    retrieve: DimseRetrieve = DimseRetrieve.GET
    # C-MOVE: medxfer's storage SCP, which the PACS knows as calling_ae at this host and port.
    storage_host: str = "127.0.0.1"  # the address the SCP listens on
    storage_port: Annotated[int, Field(gt=0, lt=65536)] | None = None
    # AE titles the storage SCP accepts associations from; empty: the PACS's called_ae only.
    accept_from: list[str] = []

    @model_validator(mode="after")
    def _move_needs_scp(self) -> "DimseConfig":
        if self.retrieve is DimseRetrieve.MOVE and self.storage_port is None:
            raise ValueError("storage_port: c-move needs the port of medxfer's storage SCP")
        return self


class RetryConfig(Strict):
    """A PACS that is down or slow: each request is tried `attempts` times, waiting
    backoff_seconds, then twice that, and so on (at most max_backoff_seconds), then the run
    stops with an error naming the server."""

    attempts: Annotated[int, Field(ge=1)] = 5
    backoff_seconds: Annotated[float, Field(ge=0)] = 1.0
    max_backoff_seconds: Annotated[float, Field(ge=0)] = 30.0


class PacsQuery(Strict):
    """Which instances the model is for: QIDO-RS / C-FIND matching keys (None: any)."""

    modality: str | None = None  # e.g. US
    study_date_from: date | None = None  # training only; scoring selects by its watermark
    study_date_to: date | None = None
    body_part: str | None = None  # BodyPartExamined, e.g. BREAST
    series_description: str | None = None  # wildcards * and ? as in DICOM matching
    sop_classes: list[str] = []  # SOP Class UIDs, e.g. 1.2.840.10008.5.1.4.1.1.6.1 (US Image Storage)


class LabelKey(str, Enum):
    ACCESSION_NUMBER = "accession_number"
    STUDY_INSTANCE_UID = "study_instance_uid"


class LabelExportConfig(Strict):
    """A RIS or pathology export: one row per study, keyed by accession number or Study
    Instance UID; label/age/split columns named as in data.columns."""

    path: Path
    key: LabelKey = LabelKey.ACCESSION_NUMBER
    key_column: str | None = None  # default: AccessionNumber or StudyInstanceUID

    @property
    def column(self) -> str:
        default = "AccessionNumber" if self.key is LabelKey.ACCESSION_NUMBER else "StudyInstanceUID"
        return self.key_column or default


class ResultTransport(str, Enum):
    STOW_RS = "stow-rs"
    C_STORE = "c-store"
    NONE = "none"  # results are written locally only


class PacsScoringConfig(Strict):
    """Scoring's PACS mode (flows/pacs_score.py): new studies since the watermark."""

    since: date | None = None  # the first watermark (StudyDate); None: the day of the first run
    lookback_days: Annotated[int, Field(ge=0)] = 1  # studies filed up to this many days late are still found
    send_results: ResultTransport = ResultTransport.STOW_RS
    cron: str = "*/15 * * * *"  # the scheduled QIDO scan
    timezone: str = "UTC"


class PacsConfig(Strict):
    """Where a hospital's images live, and where results go back (see README, "Connecting to a
    hospital's PACS")."""

    protocol: PacsProtocol = PacsProtocol.DICOMWEB
    dicomweb: DicomWebConfig | None = None
    dimse: DimseConfig | None = None
    query: PacsQuery = PacsQuery()
    labels: LabelExportConfig | None = None  # needed when data.source is pacs
    # Retrieved instances, stored by content hash and indexed by salted SOPInstanceUID.
    store_dir: Path = Path(".cache/medxfer/pacs")
    max_parallel: Annotated[int, Field(ge=1, le=32)] = 4  # concurrent retrievals (a PACS is shared)
    timeout_seconds: Annotated[float, Field(gt=0)] = 30.0  # per request: connect, and each read
    retry: RetryConfig = RetryConfig()
    scoring: PacsScoringConfig = PacsScoringConfig()

    @model_validator(mode="after")
    def _sections_present(self) -> "PacsConfig":
        if getattr(self, self.protocol.value) is None:
            raise ValueError(f"{self.protocol.value}: protocol {self.protocol.value} needs this section")
        needs = {ResultTransport.STOW_RS: "dicomweb", ResultTransport.C_STORE: "dimse"}.get(self.scoring.send_results)
        if needs and getattr(self, needs) is None:
            raise ValueError(f"scoring.send_results: {self.scoring.send_results.value} needs the {needs} section")
        return self


class ModelRunConfig(RunConfig):
    """A run that trains a model: its model and train settings, where it is tracked and how it is
    evaluated. Subclasses say what the model predicts (`task_spec`)."""

    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    registry: RegistryConfig
    evaluate: EvaluateConfig = EvaluateConfig()

    @property
    def task_spec(self) -> TaskSpec:
        raise NotImplementedError

    @model_validator(mode="after")
    def _balance_needs_classes(self) -> "ModelRunConfig":
        if self.train.class_balance is not ClassBalance.NONE and not self.task_spec.classification:
            raise ValueError("train.class_balance: only used for classification")
        return self

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.name

    def artifact_location(self) -> str | None:
        if self.registry.artifact_location:
            return self.registry.artifact_location
        if self.registry.tracking_uri.startswith(("sqlite:", "file:")):
            return (self.output_dir / "mlartifacts").resolve().as_uri()
        return None


class PipelineConfig(ModelRunConfig):
    data: DataConfig
    preprocess: PreprocessConfig = PreprocessConfig()
    export: ExportConfig = ExportConfig()
    serve: ServeConfig = ServeConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    domain: DomainConfig = DomainConfig()
    tune: TuneConfig = TuneConfig()
    learning_curve: LearningCurveConfig = LearningCurveConfig()
    pacs: PacsConfig | None = None  # a PACS to train from (data.source: pacs) or to score and report to

    @property
    def task_spec(self) -> TaskSpec:
        return self.data.spec

    @model_validator(mode="after")
    def _pacs_source_needs_labels(self) -> "PipelineConfig":
        if self.data.source == "pacs" and (self.pacs is None or self.pacs.labels is None):
            raise ValueError("pacs.labels: data.source pacs needs a pacs section with a label export")
        return self

    @model_validator(mode="after")
    def _search_space_fits(self) -> "PipelineConfig":
        """Every search key, at each end of its range or choice, gives a valid config."""
        base = self.model_dump(mode="json")
        base["tune"]["space"] = {}  # the check itself must not recurse into the space
        for key, param in self.tune.space.items():
            for value in param.extremes():
                try:
                    PipelineConfig.model_validate(apply_params(base, {key: value}))
                except ValidationError as exc:
                    first = exc.errors()[0]
                    problem = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
                    where = ".".join(str(part) for part in first["loc"])
                    raise ValueError(f"tune.space.{key}: {value!r} does not fit: {where}: {problem}") from None
                except ValueError as exc:
                    raise ValueError(f"tune.space.{key}: {value!r} does not fit: {exc}") from None
        return self

    def with_params(self, params: dict) -> "PipelineConfig":
        """This config with a trial's search params set (see apply_params)."""
        return PipelineConfig.model_validate(apply_params(self.model_dump(mode="json"), params))

    def patient_salt(self) -> str:
        """Salt for patient-id hashes: config, else $MEDXFER_PATIENT_SALT, else a random
        salt made once and kept (owner-only) in the output folder. Never logged."""
        configured = self.data.patient_salt or os.environ.get(SALT_ENV_VAR)
        if configured:
            return configured
        salt_file = self.output_dir / ".patient_salt"
        if not salt_file.exists():
            salt_file.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(salt_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_hex(32))
        return salt_file.read_text().strip()


class SourceDataConfig(Strict):
    """A MedMNIST-style .npz: `{train,val,test}_images` (N, H, W) uint8, `{split}_labels` (N,) or (N, 1)."""

    npz: Path
    label_names: list[str]  # class names, in label-index order
    # Images are resized to this square size: pretraining may run below 224 to fit a CPU budget;
    # the backbone is fully convolutional, so the fine-tuned model still takes 224.
    resolution: Annotated[int, Field(ge=32)] = 64
    max_train_samples: Annotated[int, Field(gt=0)] | None = None  # quick runs and tests

    @model_validator(mode="after")
    def _two_classes(self) -> "SourceDataConfig":
        if len(self.label_names) < 2:
            raise ValueError("label_names: classification needs at least two class names")
        return self


class SourceRegistryConfig(RegistryConfig):
    """Where a source model is registered; fine-tunes name it `mlflow:/<model_name>@<alias>`."""

    experiment: str = "medxfer-source-models"
    alias: str = "source"


class PretrainConfig(ModelRunConfig):
    """Train a source model from random initialisation on a larger dataset and register it."""

    source: SourceDataConfig
    model: ModelConfig = ModelConfig(weights="none", freeze=FreezeStrategy.FULL)
    registry: SourceRegistryConfig

    @property
    def task_spec(self) -> TaskSpec:
        return TaskSpec(kind=TaskKind.CLASSIFICATION, label_names=tuple(self.source.label_names))


def _format_errors(path: Path, error: ValidationError) -> str:
    lines = [f"{path}: invalid configuration"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "<top level>"
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def _validated(path: Path, schema: type[Strict]) -> Strict:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    if os.environ.get(TRACKING_URI_ENV) and isinstance(raw.get("registry"), dict):
        raw["registry"]["tracking_uri"] = os.environ[TRACKING_URI_ENV]
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(path, exc)) from None


def _check_exists(path: Path, key: str, value: Path) -> None:
    if not value.exists():
        raise ConfigError(f"{path}: {key}: path does not exist: {value}")


def load_config(path: str | Path, *, check_paths: bool = True) -> PipelineConfig:
    """Read and validate a YAML config; with `check_paths`, the data must exist."""
    path = Path(path)
    config = _validated(path, PipelineConfig)
    if check_paths and config.data.source == "pacs":  # root and manifest are made by the retrieval
        _check_exists(path, "pacs.labels.path", config.pacs.labels.path)
    elif check_paths:
        _check_exists(path, "data.root", config.data.root)
        _check_exists(path, "data.manifest", config.data.manifest)
    return config


def load_pretrain_config(path: str | Path, *, check_paths: bool = True) -> PretrainConfig:
    """Read and validate a pretrain YAML config (see flows/pretrain.py)."""
    path = Path(path)
    config = _validated(path, PretrainConfig)
    if check_paths:
        _check_exists(path, "source.npz", config.source.npz)
    return config
