"""Typed params: ``params.yaml`` loaded once into frozen, validated objects.

Every key is declared here with its type and allowed range. An unknown key, a wrong
type or an out-of-range value stops with one line per problem that names the key, the
value and what is allowed (see :func:`load_params`). Configuration has one home: no
stage reads ``params.yaml`` any other way.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from synermix.choices import ARCHITECTURES, DEVICES, INTER_METHODS, MAX_PIXELS, METHODS, PROVIDERS
from synermix.errors import UserError
from synermix.paths import MLFLOW_DB, MONITOR_DIR, ONNX_MODEL, PARAMS_FILE, SERVE_RECORDS, SHADOW_LOG

Severity = Literal["error", "warning", "off"]

#: ELPV's defect classes when decision.defect_classes is null
ELPV_DEFECT_CLASSES = ("likely_defective", "defective")

#: Source kinds accepted by ``data.source``.
SOURCE_KINDS = ("elpv", "folder", "fashion-mnist")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


@dataclass(frozen=True)
class SourceSpec:
    """``data.source`` parsed: ``elpv``, ``folder:<path>`` or ``fashion-mnist[:<dir>]``."""

    kind: str
    path: Path | None = None

    @classmethod
    def parse(cls, text: str) -> SourceSpec:
        kind, sep, rest = text.partition(":")
        kind = kind.strip()
        if kind == "elpv" and not sep:
            return cls("elpv")
        if kind == "fashion-mnist":
            return cls("fashion-mnist", Path(rest) if rest else None)
        if kind == "folder":
            if not rest.strip():
                raise ValueError("folder source needs a path: 'folder:<path to class folders>'")
            return cls("folder", Path(rest.strip()))
        raise ValueError(
            "must be 'elpv', 'folder:<path>' or 'fashion-mnist' (optionally 'fashion-mnist:<dir>')"
        )


class SplitRatios(_Section):
    """Fractions of each class that go to train, val and test (they sum to 1)."""

    train: Annotated[float, Field(gt=0, lt=1)] = 0.7
    val: Annotated[float, Field(gt=0, lt=1)] = 0.15
    test: Annotated[float, Field(gt=0, lt=1)] = 0.15

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitRatios:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1, got {total:g}")
        return self

    def as_dict(self) -> dict[str, float]:
        return {"train": self.train, "val": self.val, "test": self.test}


class DataParams(_Section):
    source: str = "elpv"
    classes: list[str] = Field(default_factory=list)
    image_size: Annotated[int, Field(ge=8, le=8192)] | None = None
    max_per_class: Annotated[int, Field(ge=1)] | None = None
    max_pixels: Annotated[int, Field(ge=64, le=1_000_000_000)] = MAX_PIXELS
    split: SplitRatios = Field(default_factory=SplitRatios)

    @field_validator("source")
    @classmethod
    def _check_source(cls, value: str) -> str:
        SourceSpec.parse(value)
        return value

    @field_validator("classes")
    @classmethod
    def _check_classes(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name.strip() or "/" in name or "\\" in name or name.startswith("."):
                raise ValueError(f"class name {name!r} must be a plain folder name")
        dupes = sorted({n for n in value if value.count(n) > 1})
        if dupes:
            raise ValueError(f"class names must be unique, repeated: {', '.join(dupes)}")
        return value

    @property
    def source_spec(self) -> SourceSpec:
        return SourceSpec.parse(self.source)


class Rule(_Section):
    severity: Severity = "error"


class AllowedModesRule(Rule):
    modes: list[str] = Field(default_factory=lambda: ["L", "RGB"], min_length=1)


class SizeLimitsRule(Rule):
    min_side: Annotated[int, Field(ge=1)] = 16
    max_side: Annotated[int, Field(ge=1)] = 20_000

    @model_validator(mode="after")
    def _ordered(self) -> SizeLimitsRule:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side ({self.min_side}) must be <= max_side ({self.max_side})")
        return self


class ExposureRule(Rule):
    """Blank or saturated frames: mean grey level in [min_mean, max_mean], std >= min_std."""

    min_mean: Annotated[float, Field(ge=0, le=255)] = 5.0
    max_mean: Annotated[float, Field(ge=0, le=255)] = 250.0
    min_std: Annotated[float, Field(ge=0, le=128)] = 2.0

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    @model_validator(mode="after")
    def _ordered(self) -> ExposureRule:
        if self.min_mean >= self.max_mean:
            raise ValueError(f"min_mean ({self.min_mean}) must be < max_mean ({self.max_mean})")
        return self


class MinPerClassRule(Rule):
    """Minimum number of images of every class in each split."""

    train: Annotated[int, Field(ge=0)] = 10
    val: Annotated[int, Field(ge=0)] = 2
    test: Annotated[int, Field(ge=0)] = 2


class ClassImbalanceRule(Rule):
    severity: Severity = "warning"
    max_ratio: Annotated[float, Field(ge=1)] = 20.0

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class DuplicatesRule(Rule):
    severity: Severity = "warning"


class ValidationRules(_Section):
    decodable: Rule = Field(default_factory=Rule)
    allowed_modes: AllowedModesRule = Field(default_factory=AllowedModesRule)
    size_limits: SizeLimitsRule = Field(default_factory=SizeLimitsRule)
    exposure: ExposureRule = Field(default_factory=ExposureRule)
    declared_labels: Rule = Field(default_factory=Rule)
    min_per_class: MinPerClassRule = Field(default_factory=MinPerClassRule)
    class_imbalance: ClassImbalanceRule = Field(default_factory=ClassImbalanceRule)
    split_leakage: Rule = Field(default_factory=Rule)
    conflicting_labels: Rule = Field(default_factory=Rule)
    duplicates: DuplicatesRule = Field(default_factory=DuplicatesRule)


class ValidateParams(_Section):
    on_bad_images: Literal["fail", "quarantine"] = "fail"
    max_quarantined_fraction: Annotated[float, Field(ge=0, le=1)] = 0.05
    max_listed_files: Annotated[int, Field(ge=1, le=10_000)] = 20
    rules: ValidationRules = Field(default_factory=ValidationRules)

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class AugmentParams(_Section):
    """The augmented (inter-class) view. The eval view is never augmented."""

    hflip: bool = True
    vflip: bool = True
    rotate90: bool = True
    crop_scale: Annotated[float, Field(gt=0.1, le=1.0)] = 0.85
    brightness: Annotated[float, Field(ge=0, le=1)] = 0.2
    contrast: Annotated[float, Field(ge=0, le=1)] = 0.2

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class TrainParams(_Section):
    method: Literal[METHODS] = "synermix"
    inter_method: Literal[INTER_METHODS] = "mixup"
    beta: Annotated[float, Field(ge=0, le=1)] = 0.3
    mixup_alpha: Annotated[float, Field(gt=0, le=100)] = 0.2
    arch: Literal[ARCHITECTURES] = "resnet18"
    #: ResNets: channels of the first stage (doubled per stage); null: torchvision's 64
    width: Annotated[int, Field(ge=4, le=256)] | None = 16
    small_input_stem: bool = False
    image_size: Annotated[int, Field(ge=16, le=1024)] = 128
    #: scratch | imagenet[:<torchvision weights name>] | <path to a state_dict file> |
    #: models:/<name>@<alias or version>
    init: str = "scratch"
    #: learning rate of everything but the final linear layer, as a fraction of lr
    #: (a pretrained or warm-started backbone is usually fine-tuned more gently)
    backbone_lr_scale: Annotated[float, Field(gt=0, le=1)] = 1.0
    #: fine-tuning: the first N stages of the backbone keep their starting weights and
    #: BatchNorm statistics (0: everything trains)
    freeze_stages: Annotated[int, Field(ge=0, le=4)] = 0
    #: shuffle: each image once per epoch | balanced: an epoch of as many draws, each
    #: class drawn with probability proportional to count**(1 - balance_power)
    sampling: Literal["shuffle", "balanced"] = "balanced"
    balance_power: Annotated[float, Field(ge=0, le=1)] = 0.5
    #: null | balanced (count**-balance_power, mean 1) | {class name: weight}
    class_weights: Literal["balanced"] | dict[str, Annotated[float, Field(gt=0, le=1000)]] | None = None
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    #: exponential moving average of the weights (e.g. 0.998); null: none. The average
    #: is what is validated and saved.
    ema_decay: Annotated[float, Field(gt=0, lt=1)] | None = None
    #: best: keep the epoch with the highest select_metric on val | last: the last epoch
    keep: Literal["best", "last"] = "best"
    select_metric: Literal["val_macro_recall", "val_accuracy"] = "val_macro_recall"
    channels: Literal["auto", 1, 3] = "auto"
    epochs: Annotated[int, Field(ge=1, le=10_000)] = 24
    batch_size: Annotated[int, Field(ge=2, le=8192)] = 64
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: Annotated[float, Field(gt=0, le=10)] = 0.05
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 5e-4
    schedule: Literal["cosine", "step"] = "cosine"
    step_size: Annotated[int, Field(ge=1)] = 10
    gamma: Annotated[float, Field(gt=0, le=1)] = 0.5
    warmup_epochs: Annotated[float, Field(ge=0)] = 1.0
    augment: AugmentParams = Field(default_factory=AugmentParams)
    device: Literal[DEVICES] = "auto"
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    num_workers: Annotated[int, Field(ge=0, le=64)] = 0
    cache_images: bool = True
    #: single: this process | torchrun: train under `torchrun --nproc_per_node` with
    #: DistributedDataParallel (gloo on CPU, NCCL on CUDA: one process per GPU)
    launcher: Literal["single", "torchrun"] = "single"
    nproc_per_node: Annotated[int, Field(ge=1, le=64)] = 2
    #: under torchrun: BatchNorm statistics over the whole global batch (SyncBatchNorm)
    sync_batchnorm: bool = False

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    @model_validator(mode="after")
    def _warmup_within_epochs(self) -> TrainParams:
        if self.launcher == "torchrun" and self.batch_size < 3 * self.nproc_per_node:
            raise ValueError(
                f"batch_size {self.batch_size} is too small for {self.nproc_per_node} processes: "
                f"at least {3 * self.nproc_per_node} (three images per process)"
            )
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be <= epochs ({self.epochs})")
        if self.width is not None and not self.arch.startswith("resnet"):
            raise ValueError(f"width applies to ResNets only, not {self.arch}; set width: null")
        if not self.init.strip():
            raise ValueError(
                "init is empty: use scratch, imagenet, a state_dict path or models:/<name>@<alias>"
            )
        if self.freeze_stages and self.init == "scratch":
            raise ValueError(
                f"freeze_stages {self.freeze_stages} would keep random weights: freezing is for "
                "a pretrained or warm-started init (imagenet, a file, models:/...); set freeze_stages: 0"
            )
        if self.init.split(":", 1)[0] == "imagenet" and self.width is not None:
            raise ValueError(
                f"init imagenet needs torchvision's own {self.arch} (width null, not {self.width})"
            )
        return self


class FloatRange(_Section):
    """A float search dimension: ``{low, high, log}``; log-scale needs ``low > 0``."""

    low: float
    high: float
    log: bool = False

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low:g}) must be < high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scale range needs low > 0, got {self.low:g}")
        return self


class SearchSpace(_Section):
    """What the tune stage searches. ``beta`` is always searched (a sub-range of [0, 1]);
    every other knob is searched only when given (null: train.* from params.yaml)."""

    beta: FloatRange | None = Field(default_factory=lambda: FloatRange(low=0.0, high=1.0))
    lr: FloatRange | None = Field(default_factory=lambda: FloatRange(low=0.01, high=0.2, log=True))
    weight_decay: FloatRange | None = None
    mixup_alpha: FloatRange | None = None
    inter_method: list[Literal[INTER_METHODS]] | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    @model_validator(mode="after")
    def _check(self) -> SearchSpace:
        if self.beta is None:
            raise ValueError(
                "empty search space: beta is always searched; give beta: {low: 0.0, high: 1.0} "
                "(or set tune.enabled: false to train with train.beta)"
            )
        if self.beta.low < 0 or self.beta.high > 1:
            raise ValueError(
                f"beta range [{self.beta.low:g}, {self.beta.high:g}] leaves [0, 1]: "
                "beta weighs L_intra against L_inter and must lie in [0, 1]"
            )
        for name in ("lr", "weight_decay", "mixup_alpha"):
            dim = getattr(self, name)
            for bound in () if dim is None else (dim.low, dim.high):
                try:  # the range must hold only values train.<name> accepts
                    TrainParams.model_validate({name: bound})
                except ValidationError as exc:
                    reason = exc.errors(include_url=False)[0]["msg"].lower()
                    where = f"{name} range [{dim.low:g}, {dim.high:g}]"
                    raise ValueError(f"{where}: train.{name}: {reason}") from None
        if self.inter_method is not None:
            if not self.inter_method:
                raise ValueError(f"inter_method: give at least one of {', '.join(INTER_METHODS)}, or null")
            if len(set(self.inter_method)) != len(self.inter_method):
                raise ValueError("inter_method: choices must be unique")
        return self

    def searched(self) -> list[str]:
        return [name for name in type(self).model_fields if getattr(self, name) is not None]


class PrunerParams(_Section):
    """Early stopping of poor trials, fed the objective after every epoch."""

    kind: Literal["none", "median", "successive_halving", "hyperband"] = "median"
    #: median: trials completed before any pruning, and epochs before a trial can be pruned
    startup_trials: Annotated[int, Field(ge=0)] = 4
    warmup_epochs: Annotated[int, Field(ge=0)] = 2
    #: successive_halving / hyperband: epochs of the first rung, and 1/fraction kept per rung
    min_epochs: Annotated[int, Field(ge=1)] = 1
    reduction_factor: Annotated[int, Field(ge=2, le=10)] = 2


#: the train.* keys the tune stage can set (one per search-space knob)
TUNABLE_TRAIN_KEYS: tuple[str, ...] = tuple(SearchSpace.model_fields)
#: tuning/best_params.yaml's best_trial when tune kept params.yaml's own values (keep_baseline)
BASELINE_TRIAL = -1


class TuneParams(_Section):
    enabled: bool = True
    objective: Literal["val_accuracy", "val_macro_recall"] = "val_macro_recall"
    n_trials: Annotated[int, Field(ge=1, le=100_000)] = 10
    #: stop starting trials once the study's trials have used this much worker time
    timeout_minutes: Annotated[float, Field(gt=0)] | None = None
    #: short trials: epochs per trial, and a seeded cap on training images per class
    epochs: Annotated[int, Field(ge=1, le=10_000)] = 4
    max_per_class: Annotated[int, Field(ge=1)] | None = 100
    #: TPE trials drawn at random before the model-based search starts
    startup_trials: Annotated[int, Field(ge=1)] = 4
    space: SearchSpace = Field(default_factory=SearchSpace)
    pruner: PrunerParams = Field(default_factory=PrunerParams)
    #: null: a local SQLite file; or a database URL shared by many workers (postgresql://...)
    storage: str | None = None
    #: a worker that has not sent a heartbeat for grace_seconds is dead; its trial is retried
    heartbeat_seconds: Annotated[int, Field(ge=1, le=3600)] = 10
    grace_seconds: Annotated[int, Field(ge=2, le=86_400)] = 60
    max_retry: Annotated[int, Field(ge=0, le=100)] = 2
    #: after the budget: re-run the best rerun_top_k complete trials (0: none) with
    #: rerun_seeds more seeds each, and choose the values with the best mean over the seeds
    rerun_top_k: Annotated[int, Field(ge=0, le=1000)] = 3
    rerun_seeds: Annotated[int, Field(le=100)] = 2
    #: train params.yaml's own values of the searched knobs on the same seeds as the re-run
    #: candidates, and keep them unless the best candidate's mean beats theirs by more than
    #: one seed spread (needs re-runs: rerun_top_k >= 1)
    keep_baseline: bool = True
    #: the search's own random source (sampler, trial seeds, the trial image cap, re-run
    #: seeds); null: the top-level seed. Another value re-runs the search on the same splits.
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    @field_validator("rerun_seeds")
    @classmethod
    def _check_rerun_seeds(cls, value: int) -> int:
        if value < 1:
            raise ValueError(
                "must be at least 1 (seeds per re-run trial besides its own); "
                "set tune.rerun_top_k: 0 to switch re-runs off"
            )
        return value

    @field_validator("space", mode="before")
    @classmethod
    def _space_not_empty(cls, raw: Any) -> Any:
        # only given values reach this (not the default), so `space: {}` means "nothing"
        if not raw:
            raise ValueError(
                "empty search space: give at least beta: {low: 0.0, high: 1.0} "
                "(or set tune.enabled: false to train with train.beta)"
            )
        return raw

    @field_validator("storage")
    @classmethod
    def _check_storage(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if "://" not in value:
            raise ValueError("must be a database URL such as postgresql://user@host/db or sqlite:///file.db")
        if urlsplit(value).password:
            # params.yaml is committed, and DVC copies params into dvc.lock and experiments
            raise ValueError(
                "holds a password, and params.yaml is committed: drop it from the URL and use "
                "PGPASSWORD or ~/.pgpass, or give the whole URL in SYNERMIX_TUNE_STORAGE instead"
            )
        return value

    @model_validator(mode="after")
    def _check(self) -> TuneParams:
        if self.grace_seconds <= self.heartbeat_seconds:
            raise ValueError(
                f"grace_seconds ({self.grace_seconds}) must exceed "
                f"heartbeat_seconds ({self.heartbeat_seconds})"
            )
        return self


Fraction = Annotated[float, Field(ge=0, le=1)]

#: Test metrics the champion gate can compare (names as in reports/evaluation.json).
CHAMPION_METRICS = ("accuracy", "macro_recall", "macro_f1", "recall_min")


class EvaluateParams(_Section):
    """How the evaluate stage scores the model (the gates are in :class:`GateParams`)."""

    batch_size: Annotated[int, Field(ge=1, le=8192)] = 256
    #: equal-width confidence bins of the expected calibration error
    calibration_bins: Annotated[int, Field(ge=1, le=100)] = 15
    #: fit a temperature on val (NLL) and report, export and serve calibrated probabilities
    calibrate: bool = True
    device: Literal[DEVICES] = "auto"
    #: wrongly classified test images listed by name in reports/evaluation.md
    max_listed_errors: Annotated[int, Field(ge=0)] = 20
    #: contact sheet and Grad-CAM overlays: the most confident escapes and overkills (each)
    contact_sheet_images: Annotated[int, Field(ge=1, le=64)] = 8
    #: manifest columns to slice the test split by; auto: ELPV's cell_type, a photo folder's
    #: meta.csv columns (synermix.slices)
    slices: Literal["auto"] | list[str] = "auto"

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class ChampionGate(_Section):
    """Challenger against the model holding ``alias`` in the registry, on the same test images."""

    enabled: bool = True
    alias: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_-]+$")] = "production"
    #: metric -> largest allowed drop (challenger below champion), e.g. {accuracy: 0.01}
    max_drop: dict[Literal[CHAMPION_METRICS], Fraction] = Field(
        default_factory=lambda: {"accuracy": 0.02, "macro_recall": 0.02}
    )

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    @model_validator(mode="after")
    def _something_to_compare(self) -> ChampionGate:
        if self.enabled and not self.max_drop:
            raise ValueError("max_drop is empty: name at least one metric, or set enabled: false")
        return self


class GateParams(_Section):
    """Release gates on the test split; each threshold null switches that gate off."""

    #: false: report every gate but never fail the stage
    enforce: bool = True
    min_accuracy: Fraction | None = 0.5
    min_macro_recall: Fraction | None = 0.4
    #: the lowest per-class recall (the class the model misses most)
    min_class_recall: Fraction | None = 0.2
    #: max - min of per-class recall
    max_recall_spread: Fraction | None = 0.6
    #: mean over classes of W_c / T (see metrics.feature_geometry); 1 = no class structure
    max_intra_class_variance: Annotated[float, Field(gt=0, le=100)] | None = 1.0
    #: expected calibration error of the calibrated test probabilities
    max_ece: Fraction | None = 0.15
    #: the line's rates on test, at the operating point fitted on val (decision:); skipped
    #: while there are no defect classes
    max_escape_rate: Fraction | None = 0.10
    max_overkill_rate: Fraction | None = 0.6
    max_review_rate: Fraction | None = 0.35
    #: the accuracy's 95 % lower bound must exceed the largest class's share of the test split
    beat_majority: bool = True
    #: slices (evaluate.slices) with at least this many test images are gated
    slice_min_images: Annotated[int, Field(ge=1)] = 30
    #: the test accuracy minus that of the worst gated slice
    max_slice_accuracy_gap: Fraction | None = 0.15
    #: the escape rate of the worst gated slice (skipped without defect classes)
    max_slice_escape_rate: Fraction | None = None
    champion: ChampionGate = Field(default_factory=ChampionGate)

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class UnknownParams(_Section):
    """Unknown-part rejection: distance of the penultimate features to every class
    (:mod:`synermix.novelty`)."""

    enabled: bool = True
    #: share of val images (real parts) allowed above the threshold: the false-reject rate
    false_reject: Annotated[float, Field(gt=0, lt=1)] = 0.02
    #: shrinkage of the shared covariance towards its mean variance
    shrinkage: Annotated[float, Field(gt=0, le=10)] = 0.01


class DecisionParams(_Section):
    """The line's decision: accept | review | reject | unknown, fitted on val (:mod:`synermix.decision`)."""

    #: classes whose parts are defective (rejected); every other class is a good part.
    #: Empty: no decisions (class labels only) and the decision gates are skipped. null: the
    #: data source's own (ELPV: likely_defective, defective; any other source: none).
    defect_classes: list[str] | None = None
    #: limits on the val split the fitted thresholds must meet (null: no limit)
    max_escape_rate: Fraction | None = 0.05
    max_overkill_rate: Fraction | None = None
    max_review_rate: Fraction | None = 0.3
    #: false: one threshold, no review band
    review: bool = True
    #: mean cost minimised among the thresholds that meet the limits:
    #: rows good part | defective part; columns accept | review | reject
    costs: list[list[float]] = Field(default_factory=lambda: [[0.0, 0.2, 1.0], [10.0, 0.2, 0.0]])
    #: fixed [accept_below, reject_from] on P(defect) in place of the fit (null: fitted)
    review_band: list[float] | None = None
    unknown: UnknownParams = Field(default_factory=UnknownParams)

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    @field_validator("defect_classes")
    @classmethod
    def _unique_defects(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        if len(set(value)) != len(value):
            raise ValueError("lists a class twice")
        if any(not c.strip() for c in value):
            raise ValueError("holds an empty class name")
        return value

    @field_validator("costs")
    @classmethod
    def _cost_matrix(cls, value: list[list[float]]) -> list[list[float]]:
        if len(value) != 2 or any(len(row) != 3 for row in value):
            shape = f"{len(value)} x {'/'.join(str(len(r)) for r in value) or 0}"
            raise ValueError(
                "must be 2 x 3 (rows: good part, defective part; columns: accept, review, reject), "
                f"not {shape}"
            )
        flat = [float(x) for row in value for x in row]
        if any(not (x >= 0) or x == float("inf") for x in flat):
            raise ValueError("entries must be finite and not negative")
        if value[1][0] <= value[1][2] or value[0][2] <= value[0][0]:
            raise ValueError(
                "accepting a defective part must cost more than rejecting it, and rejecting a good part "
                "more than accepting it"
            )
        return value

    @field_validator("review_band")
    @classmethod
    def _band(cls, value: list[float] | None) -> list[float] | None:
        if value is None:
            return value
        if len(value) != 2:
            raise ValueError("must be [accept_below, reject_from], two probabilities")
        low, high = (float(x) for x in value)
        if not (0 <= low <= 1 and 0 <= high <= 1):
            raise ValueError("bounds must be probabilities in [0, 1]")
        if low > high:
            raise ValueError(f"bounds cross: accept_below {low:g} is above reject_from {high:g}")
        return [low, high]


class ExportParams(_Section):
    """ONNX export, its parity check against PyTorch, and optional FP16 / INT8 variants."""

    #: dynamo: torch.export-based (torch 2.x default); torchscript: the legacy tracer
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    opset: Annotated[int, Field(ge=17, le=23)] = 18
    #: validation images run through both runtimes (from file bytes)
    parity_images: Annotated[int, Field(ge=1)] = 256
    parity_max_abs_diff: Annotated[float, Field(gt=0, le=1)] = 1e-4
    #: FP16 for GPU lines and static INT8 (calibrated on seeded training images); each is
    #: refused when its test-split accuracy is more than max_accuracy_drop below FP32 ONNX
    fp16: bool = False
    int8: bool = False
    calibration_images: Annotated[int, Field(ge=1, le=100_000)] = 256
    max_accuracy_drop: Fraction = 0.01
    #: the graph's monitoring embedding (penultimate features on this many principal
    #: directions of the training images') and the reference profile built from it, which
    #: drift monitoring needs (docs/monitor.md); 0: neither
    embedding_dims: Annotated[int, Field(ge=0, le=256)] = 16

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    @model_validator(mode="after")
    def _opset_for_exporter(self) -> ExportParams:
        if self.exporter == "torchscript" and self.opset > 20:
            raise ValueError(f"opset {self.opset}: the torchscript exporter supports opset 17-20; use dynamo")
        return self


class ProductionGates(_Section):
    """What pilot-line evidence a version needs before ``synermix promote production``."""

    #: labelled pilot images scored by ``synermix pilot-eval`` (at least)
    min_images: Annotated[int, Field(ge=1)] = 100
    min_accuracy: Fraction | None = 0.5
    min_macro_recall: Fraction | None = 0.4
    min_class_recall: Fraction | None = None
    #: the line's rates on the pilot images, at the version's stored operating point
    max_escape_rate: Fraction | None = 0.10
    max_overkill_rate: Fraction | None = 0.6
    max_review_rate: Fraction | None = 0.35
    #: largest drop against the current production version on the same pilot images
    max_drop: dict[Literal["accuracy", "macro_recall"], Fraction] = Field(
        default_factory=lambda: {"accuracy": 0.02, "macro_recall": 0.02}
    )
    #: evidence older than this many days is refused (null: any age)
    max_evidence_age_days: Annotated[float, Field(gt=0)] | None = 30.0

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class RegistryParams(_Section):
    #: the MLflow registered model this pipeline's versions belong to
    model_name: str = "synermix"
    #: the register stage also gives a new version the pilot alias (not only candidate)
    auto_pilot: bool = False
    #: a <class>/<image> folder of the line's trusted images: the register stage scores it
    #: with the version and records the scores with it, which the service compares a model
    #: with before swapping it in (serve.golden_set); null: none recorded
    golden_set: str | None = None
    production_gates: ProductionGates = Field(default_factory=ProductionGates)
    #: an alias move waits at most this long for another one to finish; a lock older than
    #: stale_lock_seconds was left by a crashed command and is broken
    lock_wait_seconds: Annotated[float, Field(gt=0, le=3600)] = 60.0
    stale_lock_seconds: Annotated[float, Field(gt=0, le=86400)] = 300.0

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    @field_validator("model_name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}", value):
            raise ValueError(
                "use letters, digits, '.', '_' and '-' (it becomes part of models:/<name>@<alias>)"
            )
        return value


class ServeParams(_Section):
    """``synermix serve`` defaults (each has a command-line flag that overrides it)."""

    #: a bundle folder, an .onnx file, or models:/<name>@<alias>
    model: str = str(ONNX_MODEL)
    #: a second model scored on the same requests (answers come from model), or null
    shadow: str | None = None
    shadow_log: str | None = str(SHADOW_LOG)
    #: loopback unless told otherwise; 0.0.0.0 exposes the service to the network
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    #: top-class probability below which an image is answered "abstain" (manual inspection)
    abstain: Fraction = 0.0
    max_request_mb: Annotated[float, Field(gt=0, le=1024)] = 20.0
    #: files per /v1/predict/batch request
    max_files: Annotated[int, Field(ge=1, le=10_000)] = 64
    #: how often the model's source (alias, bundle, file) is checked for a new model; 0: never
    poll_seconds: Annotated[float, Field(ge=0, le=86_400, allow_inf_nan=False)] = 30.0
    #: most images per onnxruntime run when requests queue up (micro-batching)
    max_batch: Annotated[int, Field(ge=1, le=1024)] = 32
    provider: Literal[PROVIDERS] = "auto"
    #: onnxruntime intra-op threads (null: all cores)
    threads: Annotated[int, Field(ge=1, le=1024)] | None = None
    #: decompression-bomb guard: the most pixels an uploaded image may decode to
    max_pixels: Annotated[int, Field(ge=64, le=1_000_000_000)] = MAX_PIXELS
    #: memory all images decoding at once may take; each waits for room (an image that could
    #: never fit is refused)
    decode_memory_mb: Annotated[float, Field(gt=0, le=1_048_576, allow_inf_nan=False)] = 512.0
    #: a request's headers must arrive within header_timeout_s and its body within
    #: body_timeout_s (408); an idle keep-alive connection is closed after idle_timeout_s
    header_timeout_s: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)] = 10.0
    body_timeout_s: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)] = 30.0
    idle_timeout_s: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)] = 5.0
    #: open connections at most (more are answered 503 and closed)
    max_connections: Annotated[int, Field(ge=1, le=100_000)] = 256
    #: Host header names served (port ignored); null: loopback names when bound to loopback,
    #: any name otherwise (set it when exposed: it stops DNS-rebinding pages); ["*"]: any
    allowed_hosts: list[Annotated[str, Field(min_length=1, max_length=255)]] | None = None
    #: one JSON line per served image for drift monitoring (synermix monitor), or null; the
    #: file rotates at records_max_mb into records_keep older copies: at most
    #: (records_keep + 1) x records_max_mb on disk
    records: str | None = str(SERVE_RECORDS)
    records_max_mb: Annotated[float, Field(gt=0, le=100_000, allow_inf_nan=False)] = 32.0
    records_keep: Annotated[int, Field(ge=0, le=1000)] = 4
    #: the live drift gauges (/metrics) are recomputed over the last monitor.window records
    #: after every this many records; 0: no live gauges
    monitor_every: Annotated[int, Field(ge=0, le=1_000_000)] = 50
    #: a folder of <class>/<image> the line trusts: every new model scores it before it is
    #: swapped in, and is refused (the old one keeps serving) below golden_min_accuracy, more
    #: than golden_max_drop under the serving model, or with probabilities more than
    #: golden_tolerance from those recorded when the version was registered; null: no check
    golden_set: str | None = None
    golden_min_accuracy: Fraction | None = None
    golden_max_drop: Fraction | None = 0.02
    golden_tolerance: Fraction = 0.02
    #: images to label: review-band answers, unknown parts and shadow disagreements are saved
    #: under <folder>/<predicted class>/ (at most review_per_class_per_day per class and day,
    #: each image once); null: none kept
    review_dir: str | None = None
    review_per_class_per_day: Annotated[int, Field(ge=1, le=1_000_000)] = 100

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class MonitorParams(_Section):
    """Drift monitoring (``synermix monitor`` and the service's live gauges, docs/monitor.md)."""

    #: family-wise significance: an unchanged line raises a false alarm in at most this share
    #: of windows (Bonferroni over every test of every slice)
    alpha: Annotated[float, Field(gt=0, lt=1)] = 0.05
    #: an image statistic alarms only when its shift also matters: a population stability
    #: index of at least this (0.1: the usual "moderate shift" line; 0: any significant shift)
    min_psi: Annotated[float, Field(ge=0, le=10)] = 0.1
    #: the newest records checked, and the fewest a check accepts (also per slice)
    window: Annotated[int, Field(ge=10, le=1_000_000)] = 200
    min_records: Annotated[int, Field(ge=10, le=1_000_000)] = 50
    #: permutations of the feature (MMD) test; its smallest p-value is 1 / (permutations + 1)
    permutations: Annotated[int, Field(ge=19, le=100_000)] = 500
    #: a predicted class needs this many window images for its centroid shift and cohesion
    min_class_images: Annotated[int, Field(ge=2, le=100_000)] = 20
    #: record slice keys tested on their own too (from X-Camera-Id / X-Line-Id)
    slice_by: list[Literal["camera", "line"]] = Field(default_factory=lambda: ["camera", "line"])
    #: report folder and MLflow experiment of synermix monitor
    out: str = str(MONITOR_DIR)
    experiment: str = "synermix-monitor"

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    @model_validator(mode="after")
    def _window_holds_minimum(self) -> MonitorParams:
        if self.min_records > self.window:
            raise ValueError(f"min_records ({self.min_records}) is larger than window ({self.window})")
        return self


class MlflowParams(_Section):
    #: Overridden by the MLFLOW_TRACKING_URI environment variable when set.
    tracking_uri: str = f"sqlite:///{MLFLOW_DB}"
    experiment: str = "synermix"

    @field_validator("tracking_uri")
    @classmethod
    def _no_file_store(cls, value: str) -> str:
        if value.startswith("file:") or "://" not in value:
            raise ValueError(
                "MLflow's file store is not supported; use sqlite:///<file>.db or an http(s):// server"
            )
        check_no_password(value, "mlflow.tracking_uri")
        return value


def check_no_password(uri: str, where: str) -> None:
    """Refuse a tracking URI that carries a password: MLflow writes the URI into run params,
    logs and errors. The password goes where MLflow and libpq read it instead."""
    from urllib.parse import urlsplit

    try:
        password = urlsplit(uri).password
    except ValueError:
        return  # not a URL urllib parses: MLflow will say what is wrong with it
    if password:
        raise ValueError(
            f"{where} holds a password: leave it out of the URI and set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (an MLflow server) or PGPASSWORD / ~/.pgpass (a PostgreSQL store)"
        )


class Params(_Section):
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 123
    data: DataParams = Field(default_factory=DataParams)
    validate_: ValidateParams = Field(default_factory=ValidateParams, alias="validate")
    tune: TuneParams = Field(default_factory=TuneParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    gates: GateParams = Field(default_factory=GateParams)
    decision: DecisionParams = Field(default_factory=DecisionParams)
    export: ExportParams = Field(default_factory=ExportParams)
    registry: RegistryParams = Field(default_factory=RegistryParams)
    serve: ServeParams = Field(default_factory=ServeParams)
    monitor: MonitorParams = Field(default_factory=MonitorParams)
    mlflow: MlflowParams = Field(default_factory=MlflowParams)

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    @property
    def tune_seed(self) -> int:
        """The beta search's seed: tune.seed, or the top-level seed when that is null."""
        return self.seed if self.tune.seed is None else self.tune.seed

    @model_validator(mode="after")
    def _tune_fits_train(self) -> Params:
        if not self.tune.enabled:
            return self
        if self.train.method not in ("synermix", "synermix_intra"):
            raise ValueError(
                f"tune searches beta, which train.method '{self.train.method}' does not use: "
                "set train.method to synermix or synermix_intra, or tune.enabled: false"
            )
        if self.train.warmup_epochs > self.tune.epochs:
            raise ValueError(
                f"tune.epochs ({self.tune.epochs}) is shorter than train.warmup_epochs "
                f"({self.train.warmup_epochs:g}): trials would never leave warm-up"
            )
        return self

    @property
    def defect_classes(self) -> list[str]:
        """decision.defect_classes, or the data source's own when it is null: ELPV's cells rated
        at least 50 % likely defective (as Deitsch et al. 2019 binarise them); none otherwise."""
        if self.decision.defect_classes is not None:
            return list(self.decision.defect_classes)
        return list(ELPV_DEFECT_CLASSES) if self.data.source_spec.kind == "elpv" else []

    @model_validator(mode="after")
    def _defects_declared(self) -> Params:
        declared = self.data.classes
        missing = [c for c in self.defect_classes if declared and c not in declared]
        if missing:
            raise ValueError(
                f"decision.defect_classes names {', '.join(repr(c) for c in missing)}, not in data.classes "
                f"({', '.join(declared)}): fix decision.defect_classes"
            )
        if declared and set(self.defect_classes) >= set(declared):
            raise ValueError(
                "decision.defect_classes lists every class of data.classes: nothing would be accepted"
            )
        return self

    @property
    def validate_params(self) -> ValidateParams:
        return self.validate_


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Walk ``loc`` (without its last element) through nested models to list valid keys."""
    current: Any = model
    for part in loc[:-1]:
        field = next((f for name, f in current.model_fields.items() if (f.alias or name) == part), None)
        if field is None or not isinstance(field.annotation, type):
            return []
        if not issubclass(field.annotation, BaseModel):
            return []
        current = field.annotation
    return [f.alias or name for name, f in current.model_fields.items()]


def _describe(err: dict[str, Any], source: str) -> str:
    loc = tuple(p for p in err["loc"] if p != "[key]")  # pydantic appends "[key]" for a bad dict key
    key = ".".join(str(p) for p in loc) or "(top level)"
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(Params, loc)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"{source}: unknown key '{key}': {hint}allowed here: {', '.join(allowed)}"
    msg = err["msg"].removeprefix("Value error, ")
    if isinstance(value, str) and "://" in value:
        from synermix.tracking import redact_uri  # (config is imported by the tracking layer)

        value = redact_uri(value)  # never echo a password
    shown = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    if err["type"] == "missing":
        return f"{source}: '{key}' is required"
    if not loc:  # a check across sections names its keys itself
        return f"{source}: {msg}"
    return f"{source}: {key} = {shown}: {msg}"


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a mapping (already parsed YAML) into :class:`Params`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of sections at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e, source) for e in exc.errors(include_url=False)]
        raise UserError("\n".join(lines)) from None


#: a params file is a few KB; anything near this is not one (and YAML parsing is slow)
MAX_PARAMS_BYTES = 1 * 2**20
#: nesting deeper than this is not a params file (a 5000-deep list overflows the stack)
MAX_PARAMS_DEPTH = 32


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: object, line: int) -> None:
        super().__init__(f"key '{key}' appears twice in one mapping (line {line}): the last would win")
        self.problem = str(self)
        self.problem_mark = None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last:
    a second ``gates:`` block silently replaced the first) and deep nesting."""

    def compose_node(self, parent, index):  # type: ignore[override]
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_PARAMS_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(
                    f"nested more than {MAX_PARAMS_DEPTH} levels deep at line {mark.line + 1}"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate ``params.yaml``; a bad file raises :class:`UserError`."""
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size > MAX_PARAMS_BYTES:
            raise UserError(
                f"{path}: {path.stat().st_size} bytes is not a params file "
                f"(at most {MAX_PARAMS_BYTES // 2**20} MiB); check the path"
            )
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: params file not found; run from the project root") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a params file") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return parse_params(raw, str(path))
