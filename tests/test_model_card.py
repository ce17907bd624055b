"""The model card: counts that reconcile, the weights really used, intervals and limits."""

import numpy as np
import pandas as pd

from configs import EvaluateConfig, FreezeStrategy, PipelineConfig, TaskKind
from models.resnet import TransferResNet, WeightsInfo
from tasks.evaluate import evaluate_predictions
from tasks.model_card import CardContext, limits, model_card
from tasks.register import Registration
from tasks.train import TrainResult
from tasks.transforms import PreprocessSpec


def manifest() -> pd.DataFrame:
    rows = [("train", "benign", "p1"), ("train", "benign", "p1"), ("train", "malignant", "p2"),
            ("val", "benign", "p3"), ("val", "malignant", "p4"),
            ("test", "benign", "p5"), ("test", "malignant", "p6"), ("test", "malignant", "p6")]
    frame = pd.DataFrame(rows, columns=["split", "label", "patient_key"])
    frame["target"] = (frame["label"] == "malignant").astype(float)
    return frame


def trained_with(weights: WeightsInfo) -> TrainResult:
    model = TransferResNet("resnet18", 2, TaskKind.CLASSIFICATION)
    return TrainResult(model, weights, FreezeStrategy.FULL, "no pretrained weights: a random backbone must train",
                       "cpu", "roc_auc", best_epoch=2, best_metric=0.81)


CHAMPION_V3 = Registration("breast-ultrasound-resnet18", "3", "run3", True,
                           "test roc_auc 0.8100 beats champion v2 (0.7000)", "runs:/run3/onnx/model.onnx",
                           "roc_auc", 0.81)


def card_for(breast_config, tmp_path, weights: WeightsInfo, registration: Registration = CHAMPION_V3) -> str:
    targets = np.array([0, 1, 1, 0, 1, 0, 1, 1])
    scores = np.array([0.2, 0.7, 0.9, 0.6, 0.4, 0.1, 0.8, 0.55])
    evaluation = evaluate_predictions(
        TaskKind.CLASSIFICATION, targets, np.stack([1 - scores, scores], 1), tmp_path, ["benign", "malignant"], 1,
        EvaluateConfig(bootstrap_samples=200), validation=(np.array([0, 1, 0, 1]), np.array(
            [[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]])))
    context = CardContext(manifest(), discovered=10, rejected=2, registration=registration,
                          plots=["plots/roc_curve.png", "gradcam/gradcam_0001.png"],
                          spec=PreprocessSpec.from_config(breast_config.preprocess))
    return model_card(breast_config, trained_with(weights), evaluation, context)


def test_card_of_a_random_init_model_says_so_and_never_claims_imagenet(breast_config, tmp_path):
    card = card_for(breast_config, tmp_path, WeightsInfo("none", None, False))
    assert card.startswith("# Model card: breast-ultrasound-resnet18 version 3 (champion)")
    assert "random initialisation (no pretrained weights)" in card and "imagenet" not in card.lower().replace(
        "imagenet mean/std", "")
    assert "10 files found, 8 usable, 2 rejected" in card
    # The input line is the preprocessing spec's own wording.
    assert f"- Input: one grey image; {PreprocessSpec.from_config(breast_config.preprocess).describe()}." in card
    # split rows: images, distinct patients, benign and malignant counts
    assert "| train | 3 | 2 | 2 | 1 |" in card and "| test | 3 | 2 | 1 | 2 |" in card
    assert "| roc_auc |" in card and "95% CI (bootstrap)" in card and "Operating threshold" in card
    assert "`gradcam/gradcam_0001.png`" in card and "## Intended use" in card and "## Limits" in card
    assert "p1" not in card.split("## Data")[1]  # patient keys are counted, never listed


def test_card_says_champion_or_challenger_and_why(breast_config, tmp_path):
    champion = card_for(breast_config, tmp_path, WeightsInfo("none", None, False))
    status = champion.split("## Registry status\n\n", 1)[1].split("\n\n", 1)[0]
    assert status == ("**Champion.** This version is the one served (alias `champion`): "
                      "test roc_auc 0.8100 beats champion v2 (0.7000).")
    challenger = Registration("breast-ultrasound-resnet18", "4", "run4", False,
                              "test roc_auc 0.6500 does not beat champion v3 (0.8100)", "runs:/run4/onnx/model.onnx",
                              "roc_auc", 0.65)
    card = card_for(breast_config, tmp_path, WeightsInfo("none", None, False), challenger)
    assert card.startswith("# Model card: breast-ultrasound-resnet18 version 4 (challenger)\n")
    assert ("**Challenger, not served.** This version has the alias `challenger` only; the `champion` alias stays "
            "where it was (with no version, if none earned it yet): test roc_auc 0.6500 does not beat champion v3 "
            "(0.8100).") in card
    assert "**Champion.**" not in card


def test_card_names_the_pretrained_weights_file_and_hash(breast_config, tmp_path):
    card = card_for(breast_config, tmp_path, WeightsInfo("pneumonia_source.pt", "ab12", True))
    assert "Backbone weights: pneumonia_source.pt (sha256 ab12)" in card
    assert "random initialisation" not in card


def test_regression_card_reports_ages_and_mae_interval(tmp_path):
    config = PipelineConfig.model_validate({
        "name": "age", "data": {"root": str(tmp_path), "manifest": str(tmp_path), "task": "regression"},
        "registry": {"model_name": "chest-age"}})
    frame = pd.DataFrame({"split": ["train", "train", "val", "test", "test"], "label": "",
                          "patient_key": ["a", "b", "c", "d", "e"], "target": [30.0, 50.0, 44.0, 61.0, 79.0]})
    evaluation = evaluate_predictions(TaskKind.REGRESSION, np.array([61.0, 79.0]), np.array([58.0, 70.0]),
                                      tmp_path, [], settings=EvaluateConfig(bootstrap_samples=200))
    trained = TrainResult(TransferResNet("resnet18", 1, TaskKind.REGRESSION), WeightsInfo("none", None, False),
                          FreezeStrategy.FULL, "set in config", "cpu", "mae", best_epoch=1, best_metric=9.5)
    card = model_card(config, trained, evaluation, CardContext(frame, 5, 0, CHAMPION_V3, ["plots/predicted_vs_true.png"],
                                                                PreprocessSpec.from_config(config.preprocess)))
    assert "output: age in years" in card and "| train | 2 | 2 | 40.0 (30-50) |" in card
    assert "| mae | 6.0000 | 3.000 to 9.000 |" in card and "Operating threshold" not in card


def test_card_warns_first_when_the_model_is_not_shown_better_than_no_skill(breast_config, tmp_path):
    rng = np.random.default_rng(0)
    targets = np.array([0, 1] * 20)
    trained = trained_with(WeightsInfo("none", None, False))
    spec = PreprocessSpec.from_config(breast_config.preprocess)

    def first_limit(scores: np.ndarray) -> str:
        evaluation = evaluate_predictions(TaskKind.CLASSIFICATION, targets, np.stack([1 - scores, scores], 1),
                                          tmp_path, ["benign", "malignant"], 1, EvaluateConfig(bootstrap_samples=200))
        return limits(trained, evaluation, len(targets), spec)[0]

    separated = np.clip(targets * 0.5 + rng.uniform(0.1, 0.45, len(targets)), 0, 1)  # AUC 1
    assert "Not shown to be better" not in first_limit(separated)
    noise = rng.uniform(0, 1, len(targets))  # no relation to the labels: the AUC interval holds 0.5
    assert first_limit(noise).startswith("- **Not shown to be better than a model without skill**: test roc_auc ")
