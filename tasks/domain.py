"""Answers only what it was trained for: the input-domain check that goes with every prediction.

Fitted at training time from the training split, thresholded on the validation split:

- **header facts**: the file formats, Modality, PhotometricInterpretation (PNG/JPEG: image mode),
  SOP class and BodyPartExamined values seen in training, and the range of image sizes, read
  from the columns ingest already collects (`tasks.ingest.header_facts`);
- **image novelty**: how far an image's penultimate backbone features lie from the training
  images' (`NoveltyMethod`): the Mahalanobis distance to their mean under scikit-learn's
  Ledoit-Wolf shrunk covariance, or the cosine distance to the k-th nearest training image;
- **threshold**: the validation score at `domain.quantile` (0.99) by split conformal's finite-sample
  rank (`conformal_rank`), so that an in-domain image is rejected with probability at most 1 - q
  on average over validation splits; `false_rejection_upper_bound` says how far above that one
  split's threshold may leave the rate.

The novelty score is a torch module, so the exported ONNX graph computes it from the very
features the head reads (output `domain_score`), and the parity gate compares it with PyTorch.
The threshold and the facts travel in the ONNX metadata (`DomainCheck.to_metadata`); the service
and batch scoring read them back and judge each answer (`judge` -> `DomainVerdict`). Reasons are
data (a kind and its values), rendered to text only where they leave the program.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import pydicom
import torch
from scipy import stats
from sklearn.covariance import LedoitWolf
from torch import nn

from configs import DomainConfig, NoveltyMethod, Precision
from models.resnet import TransferResNet
from tasks.formats import detect_format
from tasks.ingest import header_facts, read_dicom_header
from tasks.train import extract_features

DOMAIN_OUTPUT = "domain_score"  # the ONNX output: (batch,) float32, higher = further from training
METADATA_KEY = "domain"


class Fact(str, Enum):
    """A header fact the check compares with training; values are tasks.ingest's column names."""

    FORMAT = "format"
    MODALITY = "modality"
    PHOTOMETRIC = "photometric"  # DICOM PhotometricInterpretation
    IMAGE_MODE = "image_mode"  # PNG/JPEG: the decoder's mode (L, RGB, I;16), same column
    SOP_CLASS = "sop_class"
    BODY_PART = "body_part"


FACT_LABELS = {Fact.FORMAT: "file format", Fact.MODALITY: "Modality",
               Fact.PHOTOMETRIC: "PhotometricInterpretation", Fact.IMAGE_MODE: "image mode",
               Fact.SOP_CLASS: "SOP class", Fact.BODY_PART: "BodyPartExamined"}
FORMAT_LABELS = {"dicom": "DICOM", "image": "PNG/JPEG"}
# Compared only when the file format was seen in training: across formats they do not compare.
WITHIN_FORMAT = (Fact.MODALITY, Fact.PHOTOMETRIC, Fact.IMAGE_MODE, Fact.SOP_CLASS, Fact.BODY_PART)


@dataclass(frozen=True)
class ImageFacts:
    """One image's header facts, from a manifest row or a request (`tasks.ingest.header_facts`)."""

    values: dict[Fact, str]  # empty string: not recorded
    rows: int
    columns: int

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> ImageFacts:
        def text(column: str) -> str:  # a CSV read back holds NaN where the header had nothing
            value = record.get(column)
            return "" if value is None or pd.isna(value) else str(value).strip()

        form = text("format")
        colour = Fact.PHOTOMETRIC if form == "dicom" else Fact.IMAGE_MODE
        values = {Fact.FORMAT: form, colour: text("photometric")}
        values |= {fact: text(fact.value) for fact in (Fact.MODALITY, Fact.SOP_CLASS, Fact.BODY_PART)}
        rows, _, columns = (text("image_size") or "0x0").partition("x")
        return cls(values, int(rows or 0), int(columns or 0))


def request_facts(data: bytes, header: pydicom.Dataset | None = None) -> ImageFacts:
    """A request's header facts, read as ingest reads a training file's. `header`: its DICOM
    data set already parsed, as read before decoding (None: its header is read here, the
    pixel data left unread). Raises UnreadableImage."""
    fmt = detect_format(data)
    if header is None:
        header = read_dicom_header(data, fmt, pixels=False)
    return ImageFacts.from_record(header_facts(data, fmt, header))


@dataclass(frozen=True)
class TrainingFacts:
    """What the training images' headers held: the values seen per fact and the size range."""

    seen: dict[Fact, tuple[str, ...]]  # facts never recorded in training are absent
    rows: tuple[int, int]
    columns: tuple[int, int]

    @classmethod
    def from_manifest(cls, manifest: pd.DataFrame) -> TrainingFacts:
        """From the training split's rows of ingest's manifest."""
        facts = [ImageFacts.from_record(row) for row in manifest.to_dict(orient="records")]
        seen: dict[Fact, set[str]] = {}
        for one in facts:
            for fact, value in one.values.items():
                if value:
                    seen.setdefault(fact, set()).add(value)
        rows, columns = [f.rows for f in facts], [f.columns for f in facts]
        return cls({fact: tuple(sorted(seen[fact])) for fact in Fact if fact in seen},
                   (min(rows), max(rows)), (min(columns), max(columns)))

    def as_dict(self) -> dict:
        return {"seen": {fact.value: list(values) for fact, values in self.seen.items()},
                "rows": list(self.rows), "columns": list(self.columns)}

    @classmethod
    def from_dict(cls, raw: Mapping) -> TrainingFacts:
        return cls({Fact(k): tuple(v) for k, v in raw["seen"].items()}, tuple(raw["rows"]), tuple(raw["columns"]))


class ReasonKind(str, Enum):
    UNSEEN_VALUE = "unseen_value"  # a header fact whose value no training image had
    SIZE_OUT_OF_RANGE = "size_out_of_range"
    NOVELTY_ABOVE_THRESHOLD = "novelty_above_threshold"
    NOT_CHECKED = "not_checked"  # the model carries no domain check (exported before it existed)


@dataclass(frozen=True)
class DomainReason:
    """Why an input is outside the training domain, as data: a kind and its values."""

    kind: ReasonKind
    fact: Fact | None = None
    value: str | float | None = None  # the input's value, size ("1955x1841") or novelty score
    expected: tuple = ()  # the values seen in training, the size range, or (threshold,)

    def text(self) -> str:
        """One line for people: answers, logs, the model card, the DICOM results."""
        if self.kind is ReasonKind.UNSEEN_VALUE:
            labels = FORMAT_LABELS if self.fact is Fact.FORMAT else {}
            seen = ", ".join(labels.get(v, v) for v in self.expected)
            return f"{FACT_LABELS[self.fact]} {labels.get(self.value, self.value)} not seen in training ({seen})"
        if self.kind is ReasonKind.SIZE_OUT_OF_RANGE:
            low_r, high_r, low_c, high_c = self.expected
            return (f"image size {self.value} outside the training range "
                    f"{low_r}-{high_r} rows x {low_c}-{high_c} columns")
        if self.kind is ReasonKind.NOVELTY_ABOVE_THRESHOLD:
            return f"image novelty {self.value:.3g} above threshold {self.expected[0]:.3g}"
        return "this model version carries no domain check"

    def as_dict(self) -> dict:
        return {"kind": self.kind.value, "fact": self.fact.value if self.fact else None,
                "value": self.value, "expected": list(self.expected), "message": self.text()}


@dataclass(frozen=True)
class DomainVerdict:
    """The domain check's answer for one input: what the service, batch scoring and the DICOM
    results carry. `in_domain` is None when the model has no check."""

    in_domain: bool | None
    score: float | None  # the novelty score (`domain_score`)
    threshold: float | None
    reasons: tuple[DomainReason, ...] = ()

    def as_json(self) -> dict:
        return {"in_domain": self.in_domain, "domain_score": self.score,
                "domain_reasons": [reason.as_dict() for reason in self.reasons]}

    def messages(self) -> list[str]:
        return [reason.text() for reason in self.reasons]


NOT_CHECKED = DomainVerdict(None, None, None, (DomainReason(ReasonKind.NOT_CHECKED),))


@dataclass(frozen=True)
class DomainCheck:
    """What ships in the ONNX metadata beside the in-graph score: method, threshold, facts."""

    method: NoveltyMethod
    threshold: float
    quantile: float
    facts: TrainingFacts
    size_margin: float
    parameters: dict = field(default_factory=dict)  # e.g. {"k": 5}, {"shrinkage": 0.1}

    def as_dict(self) -> dict:
        return {"output_name": DOMAIN_OUTPUT, "method": self.method.value, "threshold": self.threshold,
                "quantile": self.quantile, "size_margin": self.size_margin, "parameters": self.parameters,
                "header_facts": self.facts.as_dict()}

    def to_metadata(self) -> dict[str, str]:
        return {METADATA_KEY: json.dumps(self.as_dict())}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> DomainCheck | None:
        """None for a model exported before the domain check existed."""
        if METADATA_KEY not in metadata:
            return None
        raw = json.loads(metadata[METADATA_KEY])
        return cls(NoveltyMethod(raw["method"]), float(raw["threshold"]), float(raw["quantile"]),
                   TrainingFacts.from_dict(raw["header_facts"]), float(raw["size_margin"]), raw["parameters"])


def header_reasons(facts: ImageFacts, training: TrainingFacts, size_margin: float) -> list[DomainReason]:
    """Facts of `facts` that no training image had; a fact not recorded on either side passes."""
    def unseen(fact: Fact) -> DomainReason | None:
        value, seen = facts.values.get(fact, ""), training.seen.get(fact)
        if value and seen and value not in seen:
            return DomainReason(ReasonKind.UNSEEN_VALUE, fact, value, seen)
        return None

    if other_format := unseen(Fact.FORMAT):
        return [other_format]
    reasons = [r for r in map(unseen, WITHIN_FORMAT) if r is not None]
    within = [low / (1 + size_margin) <= size <= high * (1 + size_margin)
              for size, (low, high) in ((facts.rows, training.rows), (facts.columns, training.columns))]
    if facts.rows and facts.columns and not all(within):
        reasons.append(DomainReason(ReasonKind.SIZE_OUT_OF_RANGE, None, f"{facts.rows}x{facts.columns}",
                                    (*training.rows, *training.columns)))
    return reasons


def judge(facts: ImageFacts | None, score: float, check: DomainCheck | None) -> DomainVerdict:
    """The verdict for one input: header facts (None: unknown) and its novelty score."""
    if check is None:
        return NOT_CHECKED
    reasons = header_reasons(facts, check.facts, check.size_margin) if facts is not None else []
    if score > check.threshold:
        reasons.append(DomainReason(ReasonKind.NOVELTY_ABOVE_THRESHOLD, None, float(score), (check.threshold,)))
    return DomainVerdict(not reasons, float(score), check.threshold, tuple(reasons))


# --------------------------------------------------------------------------
# Image novelty: torch modules, so that the ONNX export computes them in-graph


class MahalanobisNovelty(nn.Module):
    """sqrt((f - mean)^T P (f - mean)) with P the shrunk precision, as ||(f - mean) W|| for
    P = W W^T (Cholesky): one matrix product, no inverse at run time."""

    def __init__(self, mean: np.ndarray, whitening: np.ndarray):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("whitening", torch.as_tensor(whitening, dtype=torch.float32))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return ((features - self.mean) @ self.whitening).square().sum(dim=-1).sqrt()


class KnnNovelty(nn.Module):
    """Cosine distance from the unit-normalised features to the k-th nearest training image
    (Sun et al., ICML 2022). The training features ship inside the model."""

    def __init__(self, bank: np.ndarray, k: int):
        super().__init__()
        self.register_buffer("bank", nn.functional.normalize(torch.as_tensor(bank, dtype=torch.float32), dim=1))
        self.k = min(k, len(bank))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # Divided by hand, not F.normalize: its Expand reads the batch size from the graph input,
        # which would tie the exported score to the input rather than to the features alone.
        unit = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return 1.0 - (unit @ self.bank.T).topk(self.k, dim=-1).values[..., -1]


def fit_novelty(train_features: np.ndarray, method: NoveltyMethod, k: int = 5) -> tuple[nn.Module, dict]:
    """The novelty module fitted on the training features, and its parameters for the record."""
    if method is NoveltyMethod.KNN:
        return KnnNovelty(train_features, k), {"k": min(k, len(train_features))}
    estimate = LedoitWolf().fit(np.asarray(train_features, dtype=np.float64))
    whitening = np.linalg.cholesky(estimate.precision_)
    return MahalanobisNovelty(estimate.location_, whitening), {"shrinkage": float(estimate.shrinkage_)}


@torch.inference_mode()
def novelty_scores(novelty: nn.Module, features: np.ndarray | torch.Tensor) -> np.ndarray:
    return novelty(torch.as_tensor(features, dtype=torch.float32)).numpy()


def image_features(model: TransferResNet, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Penultimate (pooled) features of uint8 crops in float32, on the model's device, as the
    export computes them; returned on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    return extract_features(model, images, batch_size, device, Precision.FP32, False).numpy()


@dataclass
class DomainFit:
    """The fitted check, its in-graph novelty module, and the validation scores that set the threshold."""

    check: DomainCheck
    novelty: nn.Module
    val_scores: np.ndarray

    def mlflow_params(self) -> dict[str, object]:
        c = self.check
        params = {"domain_method": c.method.value, "domain_quantile": c.quantile,
                  "domain_size_margin": c.size_margin,
                  "domain_rows_range": "-".join(map(str, c.facts.rows)),
                  "domain_columns_range": "-".join(map(str, c.facts.columns))}
        params |= {f"domain_seen_{fact.value}": ",".join(values) for fact, values in c.facts.seen.items()}
        return params | {f"domain_{k}": v for k, v in c.parameters.items()}


def conformal_rank(n: int, quantile: float) -> int:
    """Which validation score (1-based, ascending, of `n`) thresholds at `quantile`: split
    conformal's ceil((n + 1) q). An exchangeable in-domain image then scores above it with
    probability at most 1 - q, where the plain empirical quantile falls short of q on a small
    split. Past n (fewer than `images_supporting` scores) no score supports q: the largest."""
    return min(math.ceil((n + 1) * quantile - 1e-9), n)  # the epsilon: (n + 1) q in floating point


def images_supporting(quantile: float) -> int:
    """The fewest validation scores whose conformal rank is one of them: q / (1 - q), 99 for 0.99."""
    return math.ceil(quantile / (1 - quantile) - 1e-9)


def expected_false_rejection(n: int, quantile: float) -> float:
    """The rate conformal_rank's threshold guarantees in expectation: an exchangeable in-domain
    image scores above the k-th of n validation scores with probability (n + 1 - k) / (n + 1)."""
    return (n + 1 - conformal_rank(n, quantile)) / (n + 1)


def false_rejection_upper_bound(n: int, quantile: float, confidence: float) -> float:
    """The rate conformal_rank's threshold stays under with probability `confidence` over the draw
    of the validation split (training-conditional validity, Vovk 2012): with the k-th of n scores
    as threshold, the in-domain rate above it is Beta(n + 1 - k, k) distributed."""
    k = conformal_rank(n, quantile)
    return float(stats.beta.ppf(confidence, n + 1 - k, k))


def fit_domain(train_features: np.ndarray, val_features: np.ndarray, train_manifest: pd.DataFrame,
               config: DomainConfig) -> DomainFit:
    """Fit the novelty score on the training features; threshold at `config.quantile` of the
    validation scores (`conformal_rank`); header facts from the training rows of the manifest."""
    novelty, parameters = fit_novelty(train_features, config.method, config.knn_k)
    val_scores = novelty_scores(novelty, val_features)
    threshold = float(np.sort(val_scores)[conformal_rank(len(val_scores), config.quantile) - 1])
    check = DomainCheck(config.method, threshold, config.quantile, TrainingFacts.from_manifest(train_manifest),
                        config.size_margin, parameters)
    return DomainFit(check, novelty, val_scores)


def verdicts(facts: Sequence[ImageFacts | None], scores: np.ndarray, check: DomainCheck | None) -> list[DomainVerdict]:
    return [judge(f, float(s), check) for f, s in zip(facts, scores)]
