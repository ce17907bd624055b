"""The training loop and the test metrics, on real images at a small resolution for speed."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from configs import PipelineConfig, PreprocessConfig, TaskKind
from tasks.evaluate import compute_metrics, evaluate_predictions
from tasks.preprocess import SplitData, preprocess_file
from tasks.train import EarlyStopping, TrainResult, train_model

NIH = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih_cxr_age"


def config_for(tmp_path, task: str, **train) -> PipelineConfig:
    data = {"root": str(tmp_path), "manifest": str(tmp_path / "m.csv"), "task": task}
    if task == "classification":
        data["label_names"] = ["benign", "malignant"]
    return PipelineConfig.model_validate({
        "name": "t", "output_dir": str(tmp_path), "data": data,
        "model": {"weights": "none"}, "registry": {"model_name": "t"},
        "train": {"epochs": 3, "batch_size": 16, "patience": 1, **train},
    })


def fit(config: PipelineConfig, train: SplitData, val: SplitData, **kwargs) -> TrainResult:
    """train_model given the pieces of a pipeline config, as flows.pipeline passes them."""
    return train_model(config.model, config.train, config.task_spec, config.seed, train, val, **kwargs)


def load_split(paths, targets, cache_dir) -> SplitData:
    config = PreprocessConfig(resize=72, crop=64, cache_dir=cache_dir)
    return SplitData(np.stack([preprocess_file(p, config).image for p in paths]), np.asarray(targets, np.float32))


@pytest.fixture(scope="module")
def breast_splits(breast_dicom_dir):
    manifest = pd.read_csv(breast_dicom_dir / "manifest.csv")
    splits = {}
    for name, rows in manifest.groupby("split"):
        targets = (rows["label"] == "malignant").astype(int)
        splits[name] = load_split([breast_dicom_dir / p for p in rows["path"]], targets, breast_dicom_dir.parent / "c64")
    return splits


def test_classifier_trains_keeps_best_epoch_and_reports_each_epoch(tmp_path, breast_splits):
    seen = []
    result = fit(config_for(tmp_path, "classification"), breast_splits["train"], breast_splits["val"],
                         on_epoch_end=seen.append)
    assert [e.epoch for e in seen] == [e.epoch for e in result.history] and 1 <= len(seen) <= 3
    assert result.best_metric == max(e.val_metric for e in result.history)
    assert result.history[result.best_epoch - 1].val_metric == result.best_metric
    assert result.strategy.value == "full" and result.device == "cpu"
    assert not result.model.training


@pytest.mark.parametrize("higher_is_better, values, stops_after", [
    (True, [0.6, 0.7, 0.65, 0.69, 0.8], 4),  # AUC: two epochs without beating 0.7
    (False, [9.0, 8.0, 8.0, 8.5, 7.0], 4),  # MAE: a tie is not a gain
    (True, [0.5, 0.6, 0.7, 0.8, 0.9], None),
])
def test_early_stopping(higher_is_better, values, stops_after):
    stopper = EarlyStopping(patience=2, higher_is_better=higher_is_better)
    stopped = None
    for epoch, value in enumerate(values, start=1):
        if not stopper.improved(value) and stopper.should_stop:
            stopped = epoch
            break
    assert stopped == stops_after


def test_training_is_deterministic_for_a_seed(tmp_path, breast_splits):
    config = config_for(tmp_path, "classification", epochs=1)
    first = fit(config, breast_splits["train"], breast_splits["val"])
    second = fit(config, breast_splits["train"], breast_splits["val"])
    assert first.history[0].train_loss == pytest.approx(second.history[0].train_loss, rel=1e-5)


@pytest.mark.skipif(not NIH.exists(), reason=f"NIH chest X-rays not found at {NIH}")
def test_age_regression_trains_on_real_chest_xrays(tmp_path):
    labels = pd.read_csv(NIH / "labels_with_age.csv")
    train_rows, val_rows = labels[labels["split"] == "train"][:48], labels[labels["split"] == "valid"][:24]
    train = load_split([NIH / p for p in train_rows["path"]], train_rows["patient_age"], tmp_path / "c")
    val = load_split([NIH / p for p in val_rows["path"]], val_rows["patient_age"], tmp_path / "c")
    result = fit(config_for(tmp_path, "regression", epochs=2), train, val)
    assert float(result.model.target_mean) == pytest.approx(train.targets.mean(), rel=1e-5)
    assert result.metric_name == "mae" and result.best_metric == min(e.val_metric for e in result.history)
    with torch.inference_mode():
        ages = result.model(torch.zeros(2, 3, 64, 64))
    assert ages.shape == (2,) and 10 < float(ages.mean()) < 100  # years, not z-scores


def test_classification_metrics_match_hand_counts(tmp_path):
    targets = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    positive = np.array([0.1, 0.2, 0.7, 0.8, 0.9, 0.4, 0.6, 0.3])
    outputs = np.stack([1 - positive, positive], axis=1)
    metrics = compute_metrics(TaskKind.CLASSIFICATION, targets, outputs, positive_index=1)
    # predicted positive: 0.7 (FP), 0.8, 0.9, 0.6 (TP); 0.4 is a FN
    assert metrics["sensitivity"] == 0.75 and metrics["specificity"] == 0.75 and metrics["accuracy"] == 0.75
    assert metrics["roc_auc"] == pytest.approx(14 / 16)
    evaluation = evaluate_predictions(TaskKind.CLASSIFICATION, targets, outputs, tmp_path, ["benign", "malignant"])
    assert evaluation.confusion == [[3, 1], [1, 3]]
    assert evaluation.plots[0].name == "roc_curve.png" and evaluation.plots[0].stat().st_size > 1000
    assert "| roc_auc | 0.8750 |" in evaluation.markdown("t", ["benign", "malignant"])


def test_regression_metrics(tmp_path):
    targets, predictions = np.array([30.0, 50.0, 70.0]), np.array([35.0, 50.0, 60.0])
    evaluation = evaluate_predictions(TaskKind.REGRESSION, targets, predictions, tmp_path, [])
    assert evaluation.metrics["mae"] == pytest.approx(5.0)
    assert evaluation.metrics["rmse"] == pytest.approx(np.sqrt(125 / 3))
    assert evaluation.plots[0].name == "predicted_vs_true.png"
