"""Evaluate on the held-out test split: metrics from scikit-learn, plots from matplotlib."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt  # falls back to the Agg backend with no display
import numpy as np
import torch
from sklearn import metrics as skm

from configs import TaskKind
from tasks.preprocess import to_model_input

CLASSIFICATION_METRIC = "roc_auc"
REGRESSION_METRIC = "mae"


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
    if outputs.shape[1] == 2:
        auc = skm.roc_auc_score(y_true == positive_index, outputs[:, positive_index])
    else:
        auc = skm.roc_auc_score(y_true, outputs, multi_class="ovr", labels=range(outputs.shape[1]))
    positive_true, positive_pred = y_true == positive_index, y_pred == positive_index
    return {
        "roc_auc": float(auc),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "sensitivity": float(skm.recall_score(positive_true, positive_pred, zero_division=0)),
        "specificity": float(skm.recall_score(~positive_true, ~positive_pred, zero_division=0)),
        "f1": float(skm.f1_score(positive_true, positive_pred, zero_division=0)),
    }


@dataclass
class Evaluation:
    metrics: dict[str, float]
    plots: list[Path] = field(default_factory=list)
    confusion: list[list[int]] | None = None  # rows: true class, columns: predicted

    def markdown(self, title: str, label_names: list[str]) -> str:
        lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value:.4f} |" for name, value in self.metrics.items()]
        if self.confusion is not None:
            lines += ["", "Confusion matrix (rows: true, columns: predicted)", "",
                      "| | " + " | ".join(label_names) + " |", "|---" * (len(label_names) + 1) + "|"]
            lines += [f"| **{name}** | " + " | ".join(map(str, row)) + " |"
                      for name, row in zip(label_names, self.confusion)]
        return "\n".join(lines)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_roc(targets: np.ndarray, positive_scores: np.ndarray, auc: float, positive_label: str, path: Path) -> Path:
    fpr, tpr, _ = skm.roc_curve(targets, positive_scores)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label=f"AUC {auc:.3f}")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC, positive = {positive_label}")
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_predicted_vs_true(targets: np.ndarray, predictions: np.ndarray, mae: float, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(targets, predictions, s=8, alpha=0.6)
    low, high = float(min(targets.min(), predictions.min())), float(max(targets.max(), predictions.max()))
    ax.plot([low, high], [low, high], linestyle="--", color="grey")
    ax.set(xlabel="true age (years)", ylabel="predicted age (years)", title=f"MAE {mae:.2f} years")
    return _save(fig, path)


def evaluate_predictions(task: TaskKind, targets: np.ndarray, outputs: np.ndarray, plot_dir: Path,
                         label_names: list[str], positive_index: int = 1) -> Evaluation:
    """Metrics and plots for test-set outputs."""
    metrics = compute_metrics(task, targets, outputs, positive_index)
    if task is TaskKind.REGRESSION:
        plot = plot_predicted_vs_true(targets, outputs, metrics["mae"], plot_dir / "predicted_vs_true.png")
        return Evaluation(metrics, [plot])
    y_true = targets.astype(int)
    confusion = skm.confusion_matrix(y_true, outputs.argmax(axis=1), labels=range(len(label_names)))
    plot = plot_roc(y_true == positive_index, outputs[:, positive_index], metrics["roc_auc"],
                    label_names[positive_index], plot_dir / "roc_curve.png")
    return Evaluation(metrics, [plot], confusion.tolist())
