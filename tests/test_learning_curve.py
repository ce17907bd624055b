"""The learning curve: nested, stratified, patient-disjoint subsets (on the real NIH patients and
ages), the inverse power law and its bootstrap, and the flow for real (Prefect test server, MLflow)
on the small real BreastMNIST subset at 32 px."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from configs import LearningCurveConfig, TaskKind, TaskSpec, load_config
from flows.learning_curve import learning_curve_flow
from tasks.evaluate import compute_metrics, no_skill_outputs, skill_metrics
from tasks.learning_curve import CurvePoint, curve_sizes, fit_power_law, learning_curve, nested_subsets
from tests.conftest import write_config
from tests.test_pipeline import _run_artifacts

NIH_LABELS = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih_cxr_age" / "labels_with_age.csv"


@pytest.mark.skipif(not NIH_LABELS.exists(), reason=f"NIH labels not found at {NIH_LABELS}")
def test_subsets_are_nested_patient_disjoint_and_keep_the_age_mix():
    labels = pd.read_csv(NIH_LABELS)
    labels = labels[labels["split"] == "train"]
    patients, ages = labels["patient_id"].to_numpy(), labels["patient_age"].to_numpy(float)
    assert labels["patient_id"].duplicated().any()  # real patients with several images
    sizes = [25, 50, 100, 200, len(labels)]
    subsets = nested_subsets(patients, ages, TaskKind.REGRESSION, sizes, seed=0)
    for small, large in zip(sizes, sizes[1:]):
        assert set(subsets[small]) < set(subsets[large])
    for size, rows in subsets.items():
        inside = set(patients[rows])
        assert set(np.flatnonzero(np.isin(patients, list(inside)))) == set(rows)  # a patient is all in or out
        assert len(rows) == size
    # Stratified by age: over ten seeds, 100-image subsets' mean age stays within 2.5 years of the
    # split's (about a quarter of its 10-year spread; the patient with 61 images makes exactness impossible).
    drift = [ages[nested_subsets(patients, ages, TaskKind.REGRESSION, [100], seed)[100]].mean() - ages.mean()
             for seed in range(10)]
    assert np.abs(drift).mean() < 2.5, drift
    other = nested_subsets(patients, ages, TaskKind.REGRESSION, sizes, seed=1)
    assert set(other[50]) != set(subsets[50])
    assert set(nested_subsets(patients, ages, TaskKind.REGRESSION, sizes, seed=0)[50]) == set(subsets[50])


def test_classification_subsets_keep_the_class_mix():
    targets = np.array([0.0] * 70 + [1.0] * 30)
    subsets = nested_subsets(np.arange(100), targets, TaskKind.CLASSIFICATION, [10, 20, 50], seed=4)
    assert [int(targets[subsets[n]].sum()) for n in (10, 20, 50)] == [3, 6, 15]
    assert curve_sizes(LearningCurveConfig(sizes=[25, 50, 200]), 150) == [25, 50, 150]


def test_power_law_fit_recovers_a_known_curve_and_where_it_flattens():
    sizes = np.repeat([25, 50, 100, 200, 400], 3).astype(float)
    values = 0.92 - 0.9 * sizes ** -0.6 + np.random.default_rng(0).normal(0, 0.002, len(sizes))
    fit = fit_power_law(sizes, values, higher_is_better=True)
    assert fit.a == pytest.approx(0.92, abs=0.01) and fit.c == pytest.approx(0.6, abs=0.1)
    flat = fit.flat_at(0.01)
    assert fit.predict(2 * flat) - fit.predict(flat) == pytest.approx(0.01, rel=1e-6)
    errors = fit_power_law(sizes, 6 + 40 * sizes ** -0.5, higher_is_better=False)
    assert errors.a == pytest.approx(6, abs=0.05) and errors.predict(1e6) < errors.predict(400)


def test_curve_answer_gives_the_doubled_prediction_with_an_interval():
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 2, 120).astype(float)
    points = []
    for size in (20, 40, 80, 160):
        for seed in range(3):  # scores whose separation grows with the training size, as real models' do
            signal = (1 - 4 / np.sqrt(size)) * (targets - 0.5) + rng.normal(0, 0.35, len(targets))
            positive = 1 / (1 + np.exp(-4 * signal))
            outputs = np.stack([1 - positive, positive], axis=1)
            points.append(CurvePoint(size, seed, size, size, "full", 5, 1.0,
                                     compute_metrics(TaskKind.CLASSIFICATION, targets, outputs), outputs))
    spec = TaskSpec(kind="classification", label_names=("benign", "malignant"))
    curve = learning_curve(points, spec, targets, LearningCurveConfig(bootstrap_samples=100, mark=40), seed=0)
    low, high = curve.doubled[1:]
    assert low < curve.doubled[0] < high and curve.replicates > 80
    answer = curve.answer()
    assert answer.startswith("With 160 labelled training images, test AUC is")
    assert "With 2x the labels (320), expect AUC" in answer and "At 40 images: AUC" in answer
    assert answer.endswith("Without skill (a constant answer): AUC 0.500.")
    assert len(curve.table) == 12


def test_an_age_curve_says_what_answering_the_training_mean_scores():
    rng = np.random.default_rng(3)
    ages = rng.uniform(20, 80, 150)
    points, train_means = [], {}
    for size in (20, 40, 80, 160):
        train = rng.uniform(20, 80, size)  # each subset's own training ages give its no-skill answer
        train_means[size] = train.mean()
        for seed in range(3):
            outputs = ages + rng.normal(0, 40 / np.sqrt(size), len(ages))
            metrics = compute_metrics(TaskKind.REGRESSION, ages, outputs) | skill_metrics(
                TaskKind.REGRESSION, ages, outputs, no_skill_outputs(TaskKind.REGRESSION, train, len(ages), 1))
            points.append(CurvePoint(size, seed, size, size, "full", 5, 1.0, metrics, outputs))
    spec = TaskSpec(kind="regression")
    curve = learning_curve(points, spec, ages, LearningCurveConfig(bootstrap_samples=100, flat_gain=0.25), seed=0)
    expected = np.abs(ages - train_means[160]).mean()  # at all images
    assert curve.no_skill == pytest.approx(expected)
    assert curve.answer().endswith(f"Without skill (answering every image with the training mean age): MAE "
                                   f"{expected:.3f} years.")


def test_a_curve_flat_from_the_smallest_size_says_so_without_a_bend_below_it():
    # As the NIH ages curve came out: the fit's bend lies below the smallest subset, at "about 1 image".
    rng = np.random.default_rng(2)
    targets = rng.integers(0, 2, 120).astype(float)
    points = []
    for size in (20, 40, 80, 160):
        for seed in range(3):  # the same separation at every size
            positive = 1 / (1 + np.exp(-4 * (0.5 * (targets - 0.5) + rng.normal(0, 0.35, len(targets)))))
            outputs = np.stack([1 - positive, positive], axis=1)
            points.append(CurvePoint(size, seed, size, size, "full", 5, 1.0,
                                     compute_metrics(TaskKind.CLASSIFICATION, targets, outputs), outputs))
    spec = TaskSpec(kind="classification", label_names=("benign", "malignant"))
    curve = learning_curve(points, spec, targets, LearningCurveConfig(bootstrap_samples=100), seed=0)
    assert curve.flat[0] < 20
    assert "The curve is flat across the sizes measured (20 to 160 images; a doubling gains less than" in curve.answer()
    assert "at about" not in curve.answer()


def test_learning_curve_flow_trains_every_subset_and_publishes_the_answer(prefect_server, tmp_path,
                                                                          breast_dicom_dir):
    path = write_config(tmp_path, breast_dicom_dir, model={"weights": "none"}, preprocess={"resize": 37, "crop": 32},
                        train={"epochs": 1, "batch_size": 16},
                        learning_curve={"sizes": [10, 20], "seeds": 2, "bootstrap_samples": 100, "mark": 20})
    state = learning_curve_flow(str(path), return_state=True)
    summary = state.result()
    table = pd.read_csv(summary.table)
    assert sorted(zip(table["size"], table["seed"])) == [(n, s) for n in (10, 20, 40) for s in (0, 1)]
    assert (table["images"] >= table["size"]).all() and set(table["strategy"]) == {"full"}
    assert summary.plot.stat().st_size > 10_000 and "With 2x the labels (80)" in summary.answer
    assert "Without skill (a constant answer): AUC 0.500." in summary.answer
    assert table["no_skill_accuracy"].between(0.5, 1).all()  # the subsets' most frequent class, on test

    config = load_config(path)
    run = MlflowClient(config.registry.tracking_uri).get_run(summary.run_id)
    assert {"roc_auc_at_10", "roc_auc_at_40", "roc_auc_doubled", "flat_at_images"} <= set(run.data.metrics)
    assert run.data.tags["answer"] == summary.answer
    artifacts = _run_artifacts(state)
    assert summary.answer in artifacts["breast-ultrasound-learning-curve"].data
    assert len(json.loads(artifacts["breast-ultrasound-learning-curve-points"].data)) == 6
