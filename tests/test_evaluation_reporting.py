"""Bootstrap intervals, the validation-chosen operating threshold and calibration."""

import numpy as np
import pytest

from configs import EvaluateConfig, TaskKind, ThresholdRule
from tasks.evaluate import bootstrap_intervals, calibration, choose_threshold, evaluate_predictions, shown_without_skill

# Validation scores ranked: 0.9 P, 0.8 P, 0.4 N, 0.35 N, 0.3 P, 0.1 N.
VAL_TRUE = np.array([0, 0, 0, 1, 1, 1], dtype=bool)
VAL_SCORES = np.array([0.1, 0.4, 0.35, 0.8, 0.3, 0.9])


def two_class(scores: np.ndarray) -> np.ndarray:
    return np.stack([1 - scores, scores], axis=1)


def test_youden_threshold_maximises_sensitivity_plus_specificity():
    threshold, rule = choose_threshold(VAL_TRUE, VAL_SCORES, ThresholdRule.YOUDEN)
    assert threshold == 0.8 and "Youden" in rule  # sensitivity 2/3, specificity 1


@pytest.mark.parametrize("target, expected", [(1.0, 0.3), (0.6, 0.8), (0.3, 0.9)])
def test_sensitivity_threshold_is_the_highest_that_reaches_the_target(target, expected):
    threshold, rule = choose_threshold(VAL_TRUE, VAL_SCORES, ThresholdRule.SENSITIVITY, target)
    assert threshold == expected and f"{target:g}" in rule


def test_threshold_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        choose_threshold(np.ones(4, bool), np.linspace(0, 1, 4), ThresholdRule.YOUDEN)


def test_expected_calibration_error_by_hand():
    result = calibration(np.array([0, 1, 1, 1], bool), np.array([0.05, 0.15, 0.95, 0.85]), bins=10)
    # bins 0, 1, 8, 9 hold one case each: |0 - .05|, |1 - .15|, |1 - .85|, |1 - .95|
    assert result.ece == pytest.approx((0.05 + 0.85 + 0.15 + 0.05) / 4)
    assert result.counts == [1, 1, 1, 1] and result.observed == [0.0, 1.0, 1.0, 1.0]


def test_bootstrap_intervals_bracket_the_estimate_and_repeat_for_a_seed():
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 2, 200)
    outputs = two_class(np.clip(0.35 * targets + 0.65 * rng.random(200), 0, 1))
    first = bootstrap_intervals(TaskKind.CLASSIFICATION, targets, outputs, 1, samples=500, seed=3, threshold=0.5)
    assert first == bootstrap_intervals(TaskKind.CLASSIFICATION, targets, outputs, 1, samples=500, seed=3,
                                        threshold=0.5)
    assert set(first) == {"roc_auc", "accuracy", "sensitivity", "specificity", "accuracy_at_threshold",
                          "sensitivity_at_threshold", "specificity_at_threshold"}
    point_accuracy = float(np.mean(outputs.argmax(1) == targets))
    low, high = first["accuracy"]
    assert low < point_accuracy < high and high - low < 0.2
    narrower = bootstrap_intervals(TaskKind.CLASSIFICATION, targets, outputs, 1, samples=500, seed=3,
                                   confidence=0.5)
    assert first["roc_auc"][0] < narrower["roc_auc"][0] < narrower["roc_auc"][1] < first["roc_auc"][1]


def test_bootstrap_of_a_perfect_classifier_and_of_constant_errors_collapses():
    targets = np.array([0, 1] * 10)
    perfect = bootstrap_intervals(TaskKind.CLASSIFICATION, targets, two_class(targets * 0.8 + 0.1), 1, 200)
    assert perfect["roc_auc"] == (1.0, 1.0) and perfect["sensitivity"] == (1.0, 1.0)
    ages = np.array([30.0, 50.0, 70.0, 40.0])
    assert bootstrap_intervals(TaskKind.REGRESSION, ages, ages + 4.0, samples=200) == {"mae": (4.0, 4.0)}


def test_evaluation_reports_threshold_from_validation_on_test(tmp_path):
    test_true = np.array([0, 0, 1, 1, 1, 0, 1, 0])
    test_scores = np.array([0.2, 0.85, 0.9, 0.5, 0.81, 0.1, 0.3, 0.6])
    evaluation = evaluate_predictions(
        TaskKind.CLASSIFICATION, test_true, two_class(test_scores), tmp_path, ["benign", "malignant"], 1,
        EvaluateConfig(bootstrap_samples=200), validation=(VAL_TRUE.astype(int), two_class(VAL_SCORES)))
    point = evaluation.operating_point
    assert point.threshold == 0.8  # from validation, not refitted on test
    # test at >= 0.8: 0.85 (FP), 0.9, 0.81 (TP); 0.5, 0.3 missed
    assert point.test == pytest.approx({"accuracy": 5 / 8, "sensitivity": 0.5, "specificity": 0.75})
    assert point.validation == pytest.approx({"accuracy": 5 / 6, "sensitivity": 2 / 3, "specificity": 1.0})
    logged = evaluation.mlflow_metrics()
    assert logged["operating_threshold"] == 0.8 and logged["test_sensitivity_at_threshold"] == 0.5
    assert logged["test_roc_auc_ci_low"] <= logged["test_roc_auc"] <= logged["test_roc_auc_ci_high"]
    assert "test_ece" in logged
    assert [p.name for p in evaluation.plots] == ["roc_curve.png", "reliability.png"]
    assert evaluation.plots[1].stat().st_size > 1000
    report = evaluation.markdown("t", ["benign", "malignant"])
    assert "Operating threshold **0.8000**" in report and "| sensitivity_at_threshold | 0.5000 |" in report


def test_regression_evaluation_has_an_mae_interval(tmp_path):
    targets, predictions = np.array([30.0, 50.0, 70.0, 60.0]), np.array([35.0, 50.0, 60.0, 61.0])
    evaluation = evaluate_predictions(TaskKind.REGRESSION, targets, predictions, tmp_path, [],
                                      settings=EvaluateConfig(bootstrap_samples=200))
    low, high = evaluation.intervals["mae"]
    assert 0.0 <= low <= evaluation.metrics["mae"] <= high <= 10.0
    assert evaluation.operating_point is None and "test_mae_ci_high" in evaluation.mlflow_metrics()


def test_ages_are_measured_against_answering_the_training_mean(tmp_path):
    targets, predictions = np.array([30.0, 50.0, 70.0, 60.0]), np.array([35.0, 50.0, 60.0, 61.0])
    train = np.array([40.0, 60.0, 50.0])  # mean 50: errors 20, 0, 20, 10
    evaluation = evaluate_predictions(TaskKind.REGRESSION, targets, predictions, tmp_path, [],
                                      settings=EvaluateConfig(bootstrap_samples=500), train_targets=train)
    metrics = evaluation.metrics
    assert metrics["no_skill_mae"] == 12.5 and metrics["mae"] == 4.0
    assert metrics["mae_skill"] == pytest.approx(1 - 4.0 / 12.5)
    low, high = evaluation.intervals["mae_skill"]  # the same resamples for model and baseline
    assert low <= metrics["mae_skill"] <= high <= 1.0
    logged = evaluation.mlflow_metrics()
    assert logged["test_mae_skill_ci_high"] == high and shown_without_skill(logged, "mae") is None
    assert (f"this model removes **68.0%** of that error [{low:.1%}, {high:.1%}]"
            in evaluation.body([]))
    far_off = np.array([90.0, 10.0, 20.0, 100.0])  # MAE 47.5
    worse = evaluate_predictions(TaskKind.REGRESSION, targets, far_off, tmp_path, [],
                                 settings=EvaluateConfig(bootstrap_samples=500), train_targets=train).mlflow_metrics()
    assert worse["test_mae_skill_ci_high"] < 0
    assert shown_without_skill(worse, "mae").startswith("test mae_skill -2.8000 is no better than a model without "
                                                        "skill (0): its interval ends at")


def test_classes_are_measured_against_always_answering_the_most_frequent_training_class(tmp_path):
    test_true = np.array([0, 0, 1, 1, 1, 0, 1, 0, 0, 0])
    scores = np.array([0.2, 0.85, 0.9, 0.5, 0.81, 0.1, 0.3, 0.6, 0.4, 0.1])
    train = np.array([0, 0, 0, 1])  # benign is the most frequent
    evaluation = evaluate_predictions(TaskKind.CLASSIFICATION, test_true, two_class(scores), tmp_path,
                                      ["benign", "malignant"], 1, EvaluateConfig(bootstrap_samples=200),
                                      train_targets=train)
    assert evaluation.metrics["no_skill_accuracy"] == 0.6
    assert "most frequent class gives accuracy 0.6000 on this test split, and AUC 0.5" in evaluation.body(
        ["benign", "malignant"])
    logged = evaluation.mlflow_metrics()
    assert shown_without_skill(logged, "roc_auc") is None
    assert shown_without_skill(logged | {"test_roc_auc_ci_high": 0.5}, "roc_auc") is not None
