"""A markdown model card per run: what the model is, what it saw, how well it does, and its limits."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from configs import DomainPolicy, PipelineConfig, TaskKind
from tasks.domain_eval import DomainEvaluation
from tasks.evaluate import Evaluation, skill_not_shown
from tasks.ingest import SPLITS
from tasks.register import Registration
from tasks.train import TrainResult
from tasks.transforms import PreprocessSpec


@dataclass(frozen=True)
class CardContext:
    """Facts known only once the flow has run: counts, the registry's verdict, artifact paths."""

    manifest: pd.DataFrame  # usable samples: split, target, label, patient_key
    discovered: int
    rejected: int
    registration: Registration
    plots: list[str]  # artifact paths, relative to the MLflow run's artifact root
    spec: PreprocessSpec  # the preprocessing the model was trained and exported with
    domain: DomainEvaluation | None = None  # the input-domain check's evaluation


def data_table(manifest: pd.DataFrame, config: PipelineConfig) -> list[str]:
    """Per split: images, patients, and class counts or the age distribution."""
    classification = config.data.task is TaskKind.CLASSIFICATION
    extra = " | ".join(config.data.label_names) if classification else "age mean (min-max), years"
    lines = [f"| split | images | patients | {extra} |", "|---|---|---|" + "---|" * (len(config.data.label_names)
                                                                            if classification else 1)]
    for split in SPLITS:
        rows = manifest[manifest["split"] == split]
        if classification:
            counts = rows["label"].value_counts()
            detail = " | ".join(str(int(counts.get(name, 0))) for name in config.data.label_names)
        else:
            ages = rows["target"]
            detail = f"{ages.mean():.1f} ({ages.min():.0f}-{ages.max():.0f})"
        lines.append(f"| {split} | {len(rows)} | {rows['patient_key'].nunique()} | {detail} |")
    return lines


def limits(trained: TrainResult, evaluation: Evaluation, n_test: int, spec: PreprocessSpec,
           domain: DomainEvaluation | None = None) -> list[str]:
    items = [
        f"Tested on {n_test} held-out images from the same source as the training data; the intervals above "
        "show how uncertain that is. Performance on another scanner, site or population is unknown until "
        "measured there.",
        "Retrospective evaluation only; not validated prospectively or in a reader study.",
        f"Images are reduced to {spec.crop} x {spec.crop} grey pixels; findings smaller "
        "than a few pixels at that size cannot be seen by the model.",
        "Grad-CAM maps come from the last residual stage (1/32 of the input size): they show the coarse region "
        "that drove the output, not a segmentation.",
    ]
    if not trained.weights.pretrained:
        items.insert(0, "The backbone was trained from random initialisation (no pretrained weights were "
                        "available), which usually needs more data than a pretrained start.")
    unproven = skill_not_shown(evaluation.mlflow_metrics(), trained.metric_name)
    if unproven is not None:
        items.insert(0, f"**Not shown to be better than a model without skill**: {unproven}. Do not rely on "
                        "its answers until a larger test split or a better model shows it.")
    if evaluation.operating_point is not None:
        items.append("The operating threshold was chosen on the validation split; re-check it on local data "
                     "before relying on its sensitivity.")
    if domain is not None:
        items.append(f"Every answer says whether its input is in the training domain (`in_domain`, "
                     f"`domain_score`, `domain_reasons`); {domain.false_rejection:.1%} of in-domain test images "
                     f"were called out of domain ({domain.confidence:.0%} interval "
                     f"{domain.false_rejection_interval[0]:.1%} to {domain.false_rejection_interval[1]:.1%}). "
                     "The check knows only what the training data covered: an input "
                     "it passes can still be outside the intended use.")
    if evaluation.calibration is not None and evaluation.calibration.ece > 0.05:
        items.append(f"Probabilities are not well calibrated (ECE {evaluation.calibration.ece:.3f}): read them "
                     "as scores, not as risks.")
    return [f"- {item}" for item in items]


def _best_step(trained: TrainResult) -> str:
    """Which epoch, or for `head` which L2 fit, gave the kept weights."""
    if trained.cached_features and trained.history:
        return f"linear head fitted on cached features, L2 {trained.history[trained.best_epoch - 1].head_l2:g}"
    return f"best epoch {trained.best_epoch}"


def registry_status(registration: Registration) -> list[str]:
    """Champion or challenger, and why: the card of a challenger is not the model being served."""
    if registration.is_champion:
        status = (f"**Champion.** This version is the one served (alias `champion`): {registration.reason}.")
    else:
        status = (f"**Challenger, not served.** This version has the alias `challenger` only; the `champion` "
                  f"alias stays where it was (with no version, if none earned it yet): {registration.reason}.")
    return [status, "", "The aliases in the registry are the live state: an alias moved later by hand is not "
            "reflected in this card."]


def _domain_section(config: PipelineConfig, domain: DomainEvaluation | None) -> list[str]:
    if domain is None:
        return []
    policy = ("answered with `in_domain: false` and the reasons" if config.domain.policy is DomainPolicy.FLAG
              else "refused (HTTP 422; a reject in batch scoring) with the reasons")
    return ["", "## Input domain", "", domain.body(), "",
            f"Inputs outside the domain are {policy} (`domain.policy: {config.domain.policy.value}`)."]


def model_card(config: PipelineConfig, trained: TrainResult, evaluation: Evaluation, context: CardContext) -> str:
    """The card, as markdown."""
    data, manifest = config.data, context.manifest
    n_test = int((manifest["split"] == "test").sum())
    if data.task is TaskKind.CLASSIFICATION:
        output = (f"probabilities for {', '.join(data.label_names)}; positive class "
                  f"`{data.label_names[data.positive_index]}`")
    else:
        output = "age in years"
    lines = [
        f"# Model card: {config.registry.model_name} version {context.registration.version} "
        f"({context.registration.role})", "",
        "## Registry status", "",
        *registry_status(context.registration),
        "",
        "## Model", "",
        f"- {config.model.arch}, {data.task.value}; output: {output}.",
        f"- Backbone weights: {trained.weights.describe()}.",
        f"- Strategy: `{trained.strategy.value}` ({trained.strategy_reason}); {_best_step(trained)}, "
        f"validation {trained.metric_name} {trained.best_metric:.4f}; trained on {trained.device}.",
        f"- Training precision: {trained.precision}{', channels_last' if trained.channels_last else ''} "
        f"({trained.precision_reason}); the weights and the exported model are float32.",
        f"- Input: one grey image; {context.spec.describe()}.",
        "", "## Data", "",
        f"- {context.discovered} files found, {len(manifest)} usable, {context.rejected} rejected (see "
        "`data/rejects.csv`). Patients are counted by salted hash; no identifiers are stored.",
        "- Splits are patient-disjoint.", "",
        *data_table(manifest, config),
        "", "## Performance on the held-out test split", "",
        evaluation.body(data.label_names),
        *_domain_section(config, context.domain),
        "", "## Plots", "",
        *[f"- `{plot}`" for plot in context.plots],
        "", "## Intended use", "",
        "- Decision support for trained readers, on images like those it was trained on: a second look or a "
        "work-list priority, with a clinician making every decision.",
        "- Not for standalone diagnosis, screening without a reader, or patient groups and devices absent from "
        "the training data.",
        "", "## Limits", "",
        *limits(trained, evaluation, n_test, context.spec, context.domain),
    ]
    return "\n".join(lines) + "\n"
