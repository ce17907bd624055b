"""Evaluate on the held-out test split: metrics from scikit-learn, plots from matplotlib.

Besides point metrics: percentile-bootstrap confidence intervals over test cases,
an operating threshold chosen on the validation split and reported on test,
calibration (expected calibration error and a reliability plot), and the no-skill
baseline a model has to beat: the training split's mean age, or its class frequencies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import matplotlib.pyplot as plt  # falls back to the Agg backend with no display
import numpy as np
import torch
from sklearn import metrics as skm

from configs import EvaluateConfig, TaskKind, ThresholdRule
from tasks.io import atomic_path
from tasks.transforms import to_model_input

CLASSIFICATION_METRIC = "roc_auc"
REGRESSION_METRIC = "mae"
# What says, for each primary metric, that a model has skill, and the value a model without
# skill (a constant answer: the training mean age, or the training class frequencies) gets.
SKILL_MEASURE = {CLASSIFICATION_METRIC: ("roc_auc", 0.5), REGRESSION_METRIC: ("mae_skill", 0.0)}


def primary_metric(task: TaskKind) -> tuple[str, bool]:
    """The metric early stopping and champion choice use, and whether higher is better."""
    if task is TaskKind.CLASSIFICATION:
        return CLASSIFICATION_METRIC, True
    return REGRESSION_METRIC, False


@torch.inference_mode()
def predict(model: torch.nn.Module, images: np.ndarray, batch_size: int,
            device: torch.device | str = "cpu") -> np.ndarray:
    """Class probabilities (N, C) or ages in years (N,) for uint8 images (N, H, W)."""
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.asarray(images[start:start + batch_size]))
        out = model(to_model_input(batch).to(device)).float().cpu()
        outputs.append(out.softmax(dim=1) if out.ndim == 2 else out)
    return torch.cat(outputs).numpy()


def _roc_auc(y_true: np.ndarray, outputs: np.ndarray, positive_index: int) -> float:
    """Binary AUC of the positive class, or one-vs-rest AUC for more classes."""
    if outputs.shape[1] == 2:
        return float(skm.roc_auc_score(y_true == positive_index, outputs[:, positive_index]))
    return float(skm.roc_auc_score(y_true, outputs, multi_class="ovr", labels=range(outputs.shape[1])))


def primary_value(task: TaskKind, targets: np.ndarray, outputs: np.ndarray, positive_index: int = 1) -> float:
    """The primary metric alone (`primary_metric`): cheap enough to recompute thousands of times in a bootstrap."""
    if task is TaskKind.REGRESSION:
        return float(skm.mean_absolute_error(targets, outputs))
    return _roc_auc(targets.astype(int), outputs, positive_index)


def compute_metrics(task: TaskKind, targets: np.ndarray, outputs: np.ndarray,
                    positive_index: int = 1) -> dict[str, float]:
    if task is TaskKind.REGRESSION:
        return {
            "mae": float(skm.mean_absolute_error(targets, outputs)),
            "rmse": float(np.sqrt(skm.mean_squared_error(targets, outputs))),
            "r2": float(skm.r2_score(targets, outputs)),
        }
    y_true = targets.astype(int)
    y_pred = outputs.argmax(axis=1)
    positive_true, positive_pred = y_true == positive_index, y_pred == positive_index
    return {
        "roc_auc": _roc_auc(y_true, outputs, positive_index),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "sensitivity": float(skm.recall_score(positive_true, positive_pred, zero_division=0)),
        "specificity": float(skm.recall_score(~positive_true, ~positive_pred, zero_division=0)),
        "f1": float(skm.f1_score(positive_true, positive_pred, zero_division=0)),
    }


def no_skill_outputs(task: TaskKind, train_targets: np.ndarray, count: int, classes: int) -> np.ndarray:
    """The answer of a model without skill, for `count` images: the training split's mean age,
    or its class frequencies as probabilities (which rank nothing: AUC 0.5)."""
    if task is TaskKind.REGRESSION:
        return np.full(count, float(np.mean(train_targets)))
    frequencies = np.bincount(train_targets.astype(int), minlength=classes) / len(train_targets)
    return np.tile(frequencies, (count, 1))


def skill_metrics(task: TaskKind, targets: np.ndarray, outputs: np.ndarray, no_skill: np.ndarray,
                  positive_index: int = 1) -> dict[str, float]:
    """The no-skill baseline's metric and how far the model is from it: for ages the MAE of the
    training mean and `mae_skill`, the fraction of that error the model removes (1 - MAE / it);
    for classes the accuracy of always answering the training split's most frequent class."""
    baseline = compute_metrics(task, targets, no_skill, positive_index)
    if task is TaskKind.REGRESSION:
        mae = float(skm.mean_absolute_error(targets, outputs))
        return {"no_skill_mae": baseline["mae"], "mae_skill": 1 - mae / baseline["mae"]}
    return {"no_skill_accuracy": baseline["accuracy"]}


def no_skill_value(metric: str, metrics: Mapping[str, float]) -> float | None:
    """What a model without skill scores on the primary `metric`: AUC 0.5, or the training
    mean's MAE from `metrics` (`skill_metrics`; None where it was not measured)."""
    if metric == REGRESSION_METRIC:
        return metrics.get("no_skill_mae")
    return SKILL_MEASURE[metric][1]


@dataclass(frozen=True)
class Skill:
    """A model's skill measure on test, with its interval, beside what a model without skill scores."""

    name: str
    value: float
    low: float
    high: float
    none_value: float

    @classmethod
    def from_metrics(cls, test_metrics: Mapping[str, float], metric: str) -> Skill | None:
        """From a run's flat test metrics; None for a run that logged no interval."""
        name, none_value = SKILL_MEASURE[metric]
        keys = [f"test_{name}{suffix}" for suffix in ("", "_ci_low", "_ci_high")]
        if not all(key in test_metrics for key in keys):
            return None
        return cls(name, *(test_metrics[key] for key in keys), none_value)


def shown_without_skill(test_metrics: Mapping[str, float], metric: str) -> str | None:
    """Why a model is shown to be no better than one without skill (the upper end of its skill
    interval at the no-skill value or below); None when it is not shown to be."""
    skill = Skill.from_metrics(test_metrics, metric)
    if skill is None or skill.high > skill.none_value:
        return None
    return (f"test {skill.name} {skill.value:.4f} is no better than a model without skill "
            f"({skill.none_value:g}): its interval ends at {skill.high:.4f}")


def skill_not_shown(test_metrics: Mapping[str, float], metric: str) -> str | None:
    """Why a model is not shown to be better than one without skill (its skill interval starts at
    the no-skill value or below); None when it is shown to be, or logged no interval."""
    skill = Skill.from_metrics(test_metrics, metric)
    if skill is None or skill.low > skill.none_value:
        return None
    return (f"test {skill.name} {skill.value:.4f}, interval {skill.low:.4f} to {skill.high:.4f}, reaches "
            f"{skill.none_value:g}, what a model without skill scores")


Interval = tuple[float, float]


def _percentile_interval(values: np.ndarray, confidence: float) -> Interval:
    tail = 100 * (1 - confidence) / 2
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _decision_rates(positive_true: np.ndarray, positive_pred: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, sensitivity, specificity along the last axis (NaN where a class is absent)."""
    positives, negatives = positive_true.sum(-1), (~positive_true).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "accuracy": (positive_true == positive_pred).mean(-1),
            "sensitivity": (positive_true & positive_pred).sum(-1) / positives,
            "specificity": (~positive_true & ~positive_pred).sum(-1) / negatives,
        }


def bootstrap_intervals(task: TaskKind, targets: np.ndarray, outputs: np.ndarray, positive_index: int = 1,
                        samples: int = 1000, seed: int = 0, confidence: float = 0.95,
                        threshold: float | None = None, no_skill: np.ndarray | None = None) -> dict[str, Interval]:
    """Percentile-bootstrap intervals, resampling test cases with replacement.

    Classification: roc_auc, accuracy, sensitivity, specificity (argmax decisions) and,
    with `threshold`, the same three at that operating threshold (`*_at_threshold`).
    Resamples that miss a class are left out of AUC/sensitivity/specificity, as those
    are undefined there. Regression: mae and, with `no_skill` (`no_skill_outputs`),
    mae_skill on the same resamples.
    """
    draws = np.random.default_rng(seed).integers(0, len(targets), size=(samples, len(targets)))
    if task is TaskKind.REGRESSION:
        errors = np.abs(np.asarray(outputs, float) - np.asarray(targets, float))
        intervals = {"mae": _percentile_interval(errors[draws].mean(axis=1), confidence)}
        if no_skill is not None:
            no_skill_mae = np.abs(no_skill - np.asarray(targets, float))[draws].mean(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):  # a resample all at the mean: left out
                skill = np.where(no_skill_mae > 0, 1 - errors[draws].mean(axis=1) / no_skill_mae, np.nan)
            intervals["mae_skill"] = _percentile_interval(skill, confidence)
        return intervals
    y_true = targets.astype(int)
    positive_true = y_true == positive_index
    replicates = _decision_rates(positive_true[draws], (outputs.argmax(axis=1) == positive_index)[draws])
    if threshold is not None:
        at_threshold = _decision_rates(positive_true[draws], (outputs[:, positive_index] >= threshold)[draws])
        replicates |= {f"{name}_at_threshold": values for name, values in at_threshold.items()}
    every_class = [d for d in draws if len(np.unique(y_true[d])) == outputs.shape[1]]
    replicates["roc_auc"] = np.array([_roc_auc(y_true[d], outputs[d], positive_index) for d in every_class])
    return {name: _percentile_interval(values, confidence) for name, values in replicates.items()}


@dataclass(frozen=True)
class OperatingPoint:
    """A decision threshold on the positive-class probability, chosen on validation."""

    threshold: float
    rule: str  # how it was chosen, in words
    validation: dict[str, float]  # sensitivity, specificity at the threshold on validation
    test: dict[str, float]  # accuracy, sensitivity, specificity at the threshold on test


def choose_threshold(positive_true: np.ndarray, positive_scores: np.ndarray, rule: ThresholdRule,
                     target_sensitivity: float = 0.9) -> tuple[float, str]:
    """Threshold (predict positive when score >= threshold) and the rule in words."""
    if positive_true.all() or not positive_true.any():
        raise ValueError("choosing a threshold needs both classes in the validation split")
    fpr, tpr, thresholds = skm.roc_curve(positive_true, positive_scores, drop_intermediate=False)
    thresholds = np.minimum(thresholds, 1.0)  # roc_curve's first threshold is +inf
    if rule is ThresholdRule.YOUDEN:
        best = int(np.argmax(tpr - fpr))
        return float(thresholds[best]), "Youden's J (max sensitivity + specificity - 1) on validation"
    best = int(np.argmax(tpr >= target_sensitivity))  # tpr rises as the threshold falls
    return (float(thresholds[best]),
            f"highest threshold with validation sensitivity >= {target_sensitivity:g}")


def rates_at_threshold(positive_true: np.ndarray, positive_scores: np.ndarray, threshold: float) -> dict[str, float]:
    return {name: float(value) for name, value in
            _decision_rates(positive_true, positive_scores >= threshold).items()}


@dataclass(frozen=True)
class Calibration:
    """Reliability of the positive-class probability in equal-width bins."""

    ece: float  # expected calibration error: sum over bins of (n_bin / n) |observed - predicted|
    observed: list[float]  # fraction positive, per non-empty bin
    predicted: list[float]  # mean predicted probability, per non-empty bin
    counts: list[int]


def calibration(positive_true: np.ndarray, positive_scores: np.ndarray, bins: int = 10) -> Calibration:
    # Binned here rather than with sklearn's calibration_curve: ECE needs the bin sizes,
    # which it does not return (and its edge handling differs between versions).
    bin_of = np.minimum((positive_scores * bins).astype(int), bins - 1)  # [k/bins, (k+1)/bins), 1.0 in the last
    counts = np.bincount(bin_of, minlength=bins)
    filled = counts > 0
    observed = np.bincount(bin_of, weights=positive_true.astype(float), minlength=bins)[filled] / counts[filled]
    predicted = np.bincount(bin_of, weights=positive_scores, minlength=bins)[filled] / counts[filled]
    counts = counts[filled]
    ece = float(np.sum(counts / counts.sum() * np.abs(observed - predicted)))
    return Calibration(ece, observed.tolist(), predicted.tolist(), counts.tolist())


@dataclass
class Evaluation:
    metrics: dict[str, float]
    plots: list[Path] = field(default_factory=list)
    confusion: list[list[int]] | None = None  # rows: true class, columns: predicted
    intervals: dict[str, Interval] = field(default_factory=dict)
    confidence: float = 0.95
    operating_point: OperatingPoint | None = None
    calibration: Calibration | None = None

    def mlflow_metrics(self) -> dict[str, float]:
        """Flat `test_*` metrics: values, interval bounds, threshold results, ECE."""
        flat = {f"test_{name}": value for name, value in self.metrics.items()}
        for name, (low, high) in self.intervals.items():
            flat[f"test_{name}_ci_low"], flat[f"test_{name}_ci_high"] = low, high
        if self.operating_point is not None:
            flat["operating_threshold"] = self.operating_point.threshold
            flat |= {f"test_{name}_at_threshold": v for name, v in self.operating_point.test.items()}
            flat |= {f"val_{name}_at_threshold": v for name, v in self.operating_point.validation.items()}
        if self.calibration is not None:
            flat["test_ece"] = self.calibration.ece
        return flat

    def _row(self, name: str, value: float) -> str:
        low, high = self.intervals.get(name, (float("nan"), float("nan")))
        interval = "" if np.isnan(low) else f"{low:.3f} to {high:.3f}"
        return f"| {name} | {value:.4f} | {interval} |"

    def _no_skill_lines(self) -> list[str]:
        m = self.metrics
        if "mae_skill" in m:
            low, high = self.intervals.get("mae_skill", (float("nan"), float("nan")))
            return ["", f"No-skill baseline: answering every image with the training split's mean age gives MAE "
                        f"{m['no_skill_mae']:.2f}; this model removes **{m['mae_skill']:.1%}** of that error "
                        f"[{low:.1%}, {high:.1%}] (`mae_skill`, 1 - MAE / the baseline's)."]
        if "no_skill_accuracy" in m:
            return ["", f"No-skill baseline: always answering the training split's most frequent class gives "
                        f"accuracy {m['no_skill_accuracy']:.4f} on this test split, and AUC 0.5."]
        return []

    def markdown(self, title: str, label_names: list[str]) -> str:
        return f"# {title}\n\n{self.body(label_names)}"

    def body(self, label_names: list[str]) -> str:
        """The metric tables, threshold, calibration and confusion matrix, without a title."""
        level = f"{self.confidence:.0%} CI (bootstrap)"
        lines = [f"| metric | value | {level} |", "|---|---|---|"]
        lines += [self._row(name, value) for name, value in self.metrics.items()]
        lines += self._no_skill_lines()
        if self.operating_point is not None:
            point = self.operating_point
            lines += ["", f"Operating threshold **{point.threshold:.4f}** on the probability of the positive "
                      f"class ({point.rule}); validation sensitivity {point.validation['sensitivity']:.3f}, "
                      f"specificity {point.validation['specificity']:.3f}. On test:", "",
                      f"| metric at threshold | value | {level} |", "|---|---|---|"]
            lines += [self._row(f"{name}_at_threshold", value) for name, value in point.test.items()]
        if self.calibration is not None:
            lines += ["", f"Calibration: expected calibration error {self.calibration.ece:.4f} "
                      f"({len(self.calibration.counts)} non-empty bins)."]
        if self.confusion is not None:
            lines += ["", "Confusion matrix (rows: true, columns: predicted)", "",
                      "| | " + " | ".join(label_names) + " |", "|---" * (len(label_names) + 1) + "|"]
            lines += [f"| **{name}** | " + " | ".join(map(str, row)) + " |"
                      for name, row in zip(label_names, self.confusion)]
        return "\n".join(lines)


def save_figure(fig: plt.Figure, path: Path) -> Path:
    """Write `fig` as PNG (atomically) and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def plot_roc(targets: np.ndarray, positive_scores: np.ndarray, auc: float, positive_label: str, path: Path) -> Path:
    fpr, tpr, _ = skm.roc_curve(targets, positive_scores)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label=f"AUC {auc:.3f}")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC, positive = {positive_label}")
    ax.legend(loc="lower right")
    return save_figure(fig, path)


def plot_reliability(result: Calibration, positive_label: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.plot(result.predicted, result.observed, marker="o", label=f"model (ECE {result.ece:.3f})")
    for x, y, n in zip(result.predicted, result.observed, result.counts):
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set(xlabel=f"predicted probability of {positive_label}", ylabel=f"observed fraction {positive_label}",
           xlim=(0, 1), ylim=(0, 1), title="Reliability (labels: cases per bin)")
    ax.legend(loc="upper left")
    return save_figure(fig, path)


def plot_predicted_vs_true(targets: np.ndarray, predictions: np.ndarray, mae: float, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(targets, predictions, s=8, alpha=0.6)
    low, high = float(min(targets.min(), predictions.min())), float(max(targets.max(), predictions.max()))
    ax.plot([low, high], [low, high], linestyle="--", color="grey")
    ax.set(xlabel="true age (years)", ylabel="predicted age (years)", title=f"MAE {mae:.2f} years")
    return save_figure(fig, path)


def operating_point(val_targets: np.ndarray, val_outputs: np.ndarray, test_targets: np.ndarray,
                    test_outputs: np.ndarray, positive_index: int, settings: EvaluateConfig) -> OperatingPoint:
    """Choose the threshold on validation outputs and report it on test outputs."""
    val_true, val_scores = val_targets.astype(int) == positive_index, val_outputs[:, positive_index]
    threshold, rule = choose_threshold(val_true, val_scores, settings.threshold, settings.target_sensitivity)
    validation = rates_at_threshold(val_true, val_scores, threshold)
    test = rates_at_threshold(test_targets.astype(int) == positive_index, test_outputs[:, positive_index], threshold)
    return OperatingPoint(threshold, rule, validation, test)


def evaluate_predictions(task: TaskKind, targets: np.ndarray, outputs: np.ndarray, plot_dir: Path,
                         label_names: list[str], positive_index: int = 1,
                         settings: EvaluateConfig = EvaluateConfig(), seed: int = 0,
                         validation: tuple[np.ndarray, np.ndarray] | None = None,
                         train_targets: np.ndarray | None = None) -> Evaluation:
    """Metrics with bootstrap intervals and plots for test-set outputs.

    With `validation` (targets, outputs) for a two-class task, an operating threshold
    is chosen there and reported on test; calibration is reported for two classes.
    With `train_targets`, the no-skill baseline they give (`skill_metrics`).
    """
    metrics = compute_metrics(task, targets, outputs, positive_index)
    no_skill = None
    if train_targets is not None:
        no_skill = no_skill_outputs(task, train_targets, len(targets), len(label_names))
        metrics |= skill_metrics(task, targets, outputs, no_skill, positive_index)
    if task is TaskKind.REGRESSION:
        plot = plot_predicted_vs_true(targets, outputs, metrics["mae"], plot_dir / "predicted_vs_true.png")
        intervals = bootstrap_intervals(task, targets, outputs, samples=settings.bootstrap_samples, seed=seed,
                                        confidence=settings.confidence, no_skill=no_skill)
        return Evaluation(metrics, [plot], intervals=intervals, confidence=settings.confidence)
    y_true = targets.astype(int)
    positive_true, positive_scores = y_true == positive_index, outputs[:, positive_index]
    positive_label = label_names[positive_index]
    confusion = skm.confusion_matrix(y_true, outputs.argmax(axis=1), labels=range(len(label_names)))
    plots = [plot_roc(positive_true, positive_scores, metrics["roc_auc"], positive_label, plot_dir / "roc_curve.png")]
    point = reliability = None
    if outputs.shape[1] == 2:
        if validation is not None:
            point = operating_point(*validation, targets, outputs, positive_index, settings)
        reliability = calibration(positive_true, positive_scores, settings.calibration_bins)
        plots.append(plot_reliability(reliability, positive_label, plot_dir / "reliability.png"))
    intervals = bootstrap_intervals(task, targets, outputs, positive_index, settings.bootstrap_samples, seed,
                                    settings.confidence, point.threshold if point else None)
    return Evaluation(metrics, plots, confusion.tolist(), intervals, settings.confidence, point, reliability)
