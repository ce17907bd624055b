"""The domain check evaluated like the classifier: in-domain test images against real images
the model was not trained for.

The out-of-domain set comes from config (`domain.out_of_domain`): pydicom-data files by
Modality (one encoding of each distinct image, `PYDICOM_IMAGES`), folders of DICOM/PNG/JPEG
files, and MedMNIST-style arrays sent as PNG, as a caller would send them. Each image takes
the path a request takes: its header facts, then decoding and the crop the model sees.
Reported: the AUROC of the novelty score (in-domain test = 0, out-of-domain = 1) per group
with a bootstrap interval, the in-domain false-rejection rate at the threshold, and how many
of each kind of image the whole check (header facts and novelty) flags.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image
from pydicom.data import get_testdata_file
from scipy.stats import binomtest
from sklearn import metrics as skm

from configs import OutOfDomainGroup, OutOfDomainSource, PipelineConfig
from models.resnet import TransferResNet
from tasks.domain import DomainCheck, DomainFit, Fact, ImageFacts, conformal_rank, expected_false_rejection, \
    false_rejection_upper_bound, fit_domain, image_features, images_supporting, novelty_scores, request_facts, verdicts
from tasks.export import ServedDecode
from tasks.ingest import SPLITS
from tasks.io import markdown_table
from tasks.preprocess import PreparedData
from tasks.rejects import UnreadableImage
from tasks.transforms import PreprocessSpec

log = logging.getLogger(__name__)

# pydicom-data images, one file per distinct image (the same pixels in other encodings would
# count one image several times). Their headers say the modality and body part.
PYDICOM_IMAGES = (
    "RG1_UNCR.dcm", "RG3_UNCR.dcm",  # CR: chest, extremity
    "693_UNCR.dcm", "CT_small.dcm", "J2K_pixelrep_mismatch.dcm", "explicit_VR-UN.dcm",  # CT
    "MR2_UNCR.dcm", "MR_small.dcm", "emri_small.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm",  # MR
    "JPEG2000_UNC.dcm",  # NM whole body
    "rtdose_1frame.dcm", "rtdose.dcm",  # RT dose grids
    "liver_1frame.dcm",  # SEG
    "SC_rgb.dcm", "OT-PAL-8-face.dcm", "SC_jpeg_no_color_transform.dcm", "GDCMJ2K_TextGBR.dcm",  # colour
    "image_dfl.dcm", "mlut_18.dcm", "vlut_04.dcm",  # secondary captures
    "US1_UNCR.dcm", "OBXXXX1A.dcm", "examples_rgb_color.dcm", "examples_palette.dcm",  # US
    "examples_ybr_color.dcm", "gdcm-US-ALOKA-16.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "color-pl.dcm",
    "color3d_jpeg_baseline.dcm", "ExplVR_BigEnd.dcm",
)


@dataclass(frozen=True)
class HeldOutImage:
    """One out-of-domain image as a caller would send it. `kind` names what it is (the DICOM
    Modality, or the source's folder or file name), never the file."""

    kind: str
    group: OutOfDomainGroup
    data: bytes


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _subset(items: list, limit: int | None, seed: int) -> list:
    if limit is None or len(items) <= limit:
        return items
    chosen = np.random.default_rng(seed).choice(len(items), size=limit, replace=False)
    return [items[i] for i in sorted(chosen)]


def held_out_images(sources: Sequence[OutOfDomainSource], seed: int) -> tuple[list[HeldOutImage], list[str]]:
    """The configured out-of-domain images, and a line for each source skipped because its
    path is absent (../shared/data is not on every machine)."""
    images, skipped = [], []
    for source in sources:
        if source.pydicom is not None:
            found = []
            for name in PYDICOM_IMAGES:
                path = get_testdata_file(name)
                if path is None:
                    skipped.append(f"{source.group.value}: pydicom-data file {name} is absent")
                    continue
                data = Path(path).read_bytes()
                facts = request_facts(data).values
                modality, body_part = facts[Fact.MODALITY], facts[Fact.BODY_PART]
                if modality in source.pydicom and (source.body_parts is None or body_part in source.body_parts):
                    found.append(HeldOutImage(modality, source.group, data))
            images += _subset(found, source.limit, seed)
        elif source.folder is not None:
            if not source.folder.is_dir():
                skipped.append(f"{source.group.value}: folder {source.folder} is absent")
                continue
            files = sorted(p for p in source.folder.rglob("*")
                           if p.is_file() and not p.name.startswith(".") and p.suffix.lower() != ".csv")
            images += [HeldOutImage(source.folder.name, source.group, p.read_bytes())
                       for p in _subset(files, source.limit, seed)]
        else:
            if not source.npz.is_file():
                skipped.append(f"{source.group.value}: {source.npz} is absent")
                continue
            arrays = np.load(source.npz)[f"{source.split}_images"]
            kind = f"{source.npz.stem} {source.split}"
            images += [HeldOutImage(kind, source.group, _png(pixels))
                       for pixels in _subset(list(arrays), source.limit, seed)]
    return images, skipped


@dataclass
class Prepared:
    """Held-out images as the model sees them: facts, crops; the undecodable ones counted."""

    images: list[HeldOutImage]
    facts: list[ImageFacts]
    crops: np.ndarray  # uint8 (N, crop, crop)
    undecodable: int


def prepare_held_out(images: Sequence[HeldOutImage], decode: ServedDecode, spec: PreprocessSpec) -> Prepared:
    """Each image's header facts and its crop, decoded as a request is and preprocessed by
    training's `spec`; an image that cannot be used is left out and counted (it would be a
    reject, not an answer)."""
    kept, facts, crops, undecodable = [], [], [], 0
    for image in images:
        try:
            crop = spec.to_uint8(decode(Path(image.kind), image.data))[0]
            image_facts = request_facts(image.data)
        except UnreadableImage:
            undecodable += 1
            continue
        kept.append(image)
        facts.append(image_facts)
        crops.append(crop)
    empty = np.zeros((0, spec.crop, spec.crop), dtype=np.uint8)
    return Prepared(kept, facts, np.stack(crops) if crops else empty, undecodable)


def _auroc_interval(inside: np.ndarray, outside: np.ndarray, samples: int, seed: int,
                    confidence: float) -> tuple[float, float]:
    """Percentile bootstrap, resampling each set with replacement."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    values = [skm.roc_auc_score(labels, np.r_[rng.choice(inside, len(inside)), rng.choice(outside, len(outside))])
              for _ in range(samples)]
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class GroupResult:
    group: OutOfDomainGroup
    images: int
    auroc: float
    interval: tuple[float, float]
    flagged_by_novelty: float  # fraction above the threshold
    flagged: float  # fraction the whole check (header facts or novelty) calls out of domain


@dataclass
class DomainEvaluation:
    threshold: float
    quantile: float
    method: str
    test_images: int
    false_rejection_novelty: float  # in-domain test images above the threshold
    false_rejection: float  # in-domain test images the whole check calls out of domain
    false_rejection_interval: tuple[float, float]  # exact (Clopper-Pearson) interval at `confidence`
    val_images: int  # the validation scores the threshold was taken from
    groups: list[GroupResult]
    by_kind: pd.DataFrame  # kind, group, images, flagged, flagged_by_novelty, median_score
    undecodable: int
    skipped: list[str] = field(default_factory=list)
    confidence: float = 0.95

    def mlflow_metrics(self) -> dict[str, float]:
        flat = {"domain_threshold": self.threshold, "domain_test_false_rejection_rate": self.false_rejection,
                "domain_test_false_rejection_rate_ci_low": self.false_rejection_interval[0],
                "domain_test_false_rejection_rate_ci_high": self.false_rejection_interval[1],
                "domain_test_false_rejection_rate_novelty": self.false_rejection_novelty,
                "domain_val_images": self.val_images,
                "domain_expected_false_rejection_bound": self.expected_false_rejection,
                "domain_false_rejection_upper_bound": self.false_rejection_upper_bound,
                "domain_out_of_domain_undecodable": self.undecodable}
        for g in self.groups:
            name = g.group.value
            flat |= {f"domain_auroc_{name}": g.auroc, f"domain_auroc_{name}_ci_low": g.interval[0],
                     f"domain_auroc_{name}_ci_high": g.interval[1], f"domain_images_{name}": g.images,
                     f"domain_flagged_{name}": g.flagged, f"domain_flagged_by_novelty_{name}": g.flagged_by_novelty}
        return flat

    @property
    def expected_false_rejection(self) -> float:
        return expected_false_rejection(self.val_images, self.quantile)

    @property
    def false_rejection_upper_bound(self) -> float:
        return false_rejection_upper_bound(self.val_images, self.quantile, self.confidence)

    def threshold_text(self) -> str:
        rank, n = conformal_rank(self.val_images, self.quantile), self.val_images
        text = (f"threshold **{self.threshold:.4g}** = validation score {rank} of {n} in ascending order (the "
                f"{self.quantile:g} quantile by split conformal's rank): an in-domain image is expected to be "
                f"rejected on novelty with probability at most {self.expected_false_rejection:.1%} on average over "
                f"validation splits, and at most {self.false_rejection_upper_bound:.1%} with {self.confidence:.0%} "
                "confidence for the threshold this split gave (training-conditional bound).")
        if n < images_supporting(self.quantile):
            text += (f" {n} validation images cannot support the {self.quantile:g} quantile (that needs "
                     f"{images_supporting(self.quantile)}), so the largest score is the threshold.")
        return text

    def body(self) -> str:
        """Markdown for the evaluation report and the model card."""
        level = f"{self.confidence:.0%} CI (bootstrap)"
        lines = [f"Novelty score: {self.method} on the penultimate features; {self.threshold_text()} An input "
                 "is out of domain "
                 "when its score is above the threshold or a header fact (file format, Modality, "
                 "PhotometricInterpretation, SOP class, BodyPartExamined, size) was never seen in training.", "",
                 f"In-domain test images ({self.test_images}) falsely called out of domain: "
                 f"**{self.false_rejection:.1%}** [{self.false_rejection_interval[0]:.1%}, "
                 f"{self.false_rejection_interval[1]:.1%}] ({self.confidence:.0%} exact binomial interval; "
                 f"novelty alone {self.false_rejection_novelty:.1%}).", ""]
        if not self.groups:
            lines += ["No out-of-domain images were available, so AUROC was not measured."]
        else:
            lines += [f"| held out against in-domain test | images | novelty AUROC | {level} | flagged by novelty "
                      "| flagged (whole check) |", "|---|---|---|---|---|---|"]
            lines += [f"| {g.group.value.replace('_', ' ')} | {g.images} | {g.auroc:.4f} | {g.interval[0]:.3f} to "
                      f"{g.interval[1]:.3f} | {g.flagged_by_novelty:.1%} | {g.flagged:.1%} |" for g in self.groups]
            lines += ["", markdown_table(self.by_kind)]
        if self.undecodable:
            lines += ["", f"{self.undecodable} held-out files could not be decoded (a request would be rejected)."]
        if self.skipped:
            lines += [""] + [f"Skipped: {line}." for line in self.skipped]
        return "\n".join(lines)


def evaluate_domain(check: DomainCheck, val_images: int, test_scores: np.ndarray, test_facts: Sequence[ImageFacts],
                    held_out: Prepared, held_out_scores: np.ndarray, *, bootstrap_samples: int = 1000,
                    seed: int = 0, confidence: float = 0.95, skipped: Sequence[str] = ()) -> DomainEvaluation:
    """AUROC of the novelty score per group, false rejections on test, flags per kind of image."""
    test_flags = np.array([v.in_domain is False for v in verdicts(test_facts, test_scores, check)])
    out_flags = np.array([v.in_domain is False for v in verdicts(held_out.facts, held_out_scores, check)], dtype=bool)
    groups = []
    for group in OutOfDomainGroup:
        members = np.array([image.group is group for image in held_out.images], dtype=bool)
        if not members.any():
            continue
        scores = held_out_scores[members]
        labels = np.r_[np.zeros(len(test_scores)), np.ones(len(scores))]
        groups.append(GroupResult(
            group, int(members.sum()), float(skm.roc_auc_score(labels, np.r_[test_scores, scores])),
            _auroc_interval(test_scores, scores, bootstrap_samples, seed, confidence),
            float((scores > check.threshold).mean()), float(out_flags[members].mean())))
    table = pd.DataFrame({"kind": [image.kind for image in held_out.images],
                          "group": [image.group.value for image in held_out.images],
                          "flagged": out_flags, "above": held_out_scores > check.threshold,
                          "score": held_out_scores})
    by_kind = (table.groupby(["group", "kind"], sort=True)
               .agg(images=("score", "size"), flagged=("flagged", "sum"), flagged_by_novelty=("above", "sum"),
                    median_score=("score", "median")).reset_index()) if len(table) else table
    if len(by_kind):
        by_kind["median_score"] = by_kind["median_score"].round(3)
    interval = binomtest(int(test_flags.sum()), len(test_flags)).proportion_ci(confidence, method="exact")
    return DomainEvaluation(check.threshold, check.quantile, check.method.value, len(test_scores),
                            float((test_scores > check.threshold).mean()), float(test_flags.mean()),
                            (float(interval.low), float(interval.high)), val_images, groups, by_kind,
                            held_out.undecodable, list(skipped), confidence)


def fit_and_evaluate(config: PipelineConfig, model: TransferResNet,
                     prepared: PreparedData) -> tuple[DomainFit, DomainEvaluation]:
    """The pipeline's domain stage: fit on train, threshold on val, evaluate on test against
    `config.domain.out_of_domain`."""
    pre, manifest, batch = config.preprocess, prepared.manifest, config.train.batch_size
    features = {split: image_features(model, prepared.split(split).images, batch) for split in SPLITS}
    fit = fit_domain(features["train"], features["val"], manifest[manifest["split"] == "train"], config.domain)
    images, skipped = held_out_images(config.domain.out_of_domain, config.seed)
    for line in skipped:
        log.warning("domain evaluation: skipped %s", line)
    held_out = prepare_held_out(images, ServedDecode.for_training(pre), PreprocessSpec.from_config(pre))
    test_facts = [ImageFacts.from_record(row) for row in manifest[manifest["split"] == "test"].to_dict("records")]
    evaluation = evaluate_domain(
        fit.check, len(fit.val_scores), novelty_scores(fit.novelty, features["test"]), test_facts, held_out,
        novelty_scores(fit.novelty, image_features(model, held_out.crops, batch)),
        bootstrap_samples=config.evaluate.bootstrap_samples, seed=config.seed,
        confidence=config.evaluate.confidence, skipped=skipped)
    return fit, evaluation
