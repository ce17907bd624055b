"""Export parity and the registry's champion/challenger rules, on a real MLflow SQLite store."""

import dataclasses
import json
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
import torch
from mlflow import MlflowClient

from configs import ModelConfig, PipelineConfig, TaskKind
from models.resnet import build_model
from tasks.export import check_parity, export_onnx, read_metadata
from tasks.register import CHALLENGER, CHAMPION, register_model, tracking_run
from tasks.transforms import PreprocessSpec


@pytest.fixture(scope="module")
def real_images(breast_dicom_dir):
    from tasks.preprocess import preprocess_file
    from configs import PreprocessConfig

    paths = sorted(breast_dicom_dir.glob("test/*.dcm"))[:8]
    config = PreprocessConfig(cache_dir=breast_dicom_dir.parent / "cache-export")
    return np.stack([preprocess_file(p, config).image for p in paths])


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory, classifier):
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return export_onnx(classifier, TaskKind.CLASSIFICATION, path, crop=224, opset=18,
                       metadata={"task": "classification", "label_names": json.dumps(["benign", "malignant"])})


def test_onnx_matches_pytorch_on_real_images_with_dynamic_batch(onnx_file, classifier, real_images):
    report = check_parity(onnx_file, classifier, real_images, tolerance=1e-4)
    assert report.passed and report.samples == 8 and report.provider == "CPUExecutionProvider"
    single = check_parity(onnx_file, classifier, real_images[:1], tolerance=1e-4)  # another batch size
    assert single.passed
    assert read_metadata(onnx_file)["task"] == "classification"


def test_parity_fails_for_a_different_model(onnx_file, real_images):
    torch.manual_seed(1)
    other = build_model(ModelConfig(weights="none"), TaskKind.CLASSIFICATION, 2)[0].eval()
    assert not check_parity(onnx_file, other, real_images, tolerance=1e-4).passed


def test_regression_export_outputs_years(tmp_path, real_images):
    torch.manual_seed(0)
    model = build_model(ModelConfig(weights="none"), TaskKind.REGRESSION, 1, target_mean=60.0, target_std=12.0)[0].eval()
    path = export_onnx(model, TaskKind.REGRESSION, tmp_path / "age.onnx", crop=224, opset=18, metadata={})
    report = check_parity(path, model, real_images[:4], tolerance=1e-4)
    assert report.passed


def registry_config(tmp_path) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "name": "registry-test", "output_dir": str(tmp_path / "out"),
        "data": {"root": str(tmp_path), "manifest": str(tmp_path / "m.csv"), "task": "classification",
                 "label_names": ["benign", "malignant"]},
        "registry": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "model_name": "reg-test"},
    })


def run_with_auc(config, classifier, onnx_file, tmp_path, auc, onnx_override=None, interval=None):
    local_onnx = tmp_path / f"model-{auc}.onnx"
    local_onnx.write_bytes(onnx_file.read_bytes())
    with tracking_run(config, "t") as run_id:
        mlflow.log_metric("test_roc_auc", auc)
        if interval is not None:
            mlflow.log_metrics({"test_roc_auc_ci_low": interval[0], "test_roc_auc_ci_high": interval[1]})
        return register_model(config, run_id, classifier, onnx_override or local_onnx, "roc_auc", True,
                              torch.zeros(1, 3, 224, 224))


def test_a_version_shown_to_have_no_skill_is_never_champion_even_the_first(tmp_path, classifier, onnx_file):
    config = registry_config(tmp_path)
    client = MlflowClient(config.registry.tracking_uri)
    useless = run_with_auc(config, classifier, onnx_file, tmp_path, 0.42, interval=(0.33, 0.50))
    assert not useless.is_champion
    assert useless.reason == ("test roc_auc 0.4200 is no better than a model without skill (0.5): "
                              "its interval ends at 0.5000")
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias("reg-test", CHAMPION)
    assert str(client.get_model_version_by_alias("reg-test", CHALLENGER).version) == "1"
    uncertain = run_with_auc(config, classifier, onnx_file, tmp_path, 0.55, interval=(0.38, 0.71))
    assert uncertain.is_champion and uncertain.reason == "no champion yet"  # not shown to lack skill


def test_a_run_that_loses_the_race_to_create_the_experiment_runs_in_it(tmp_path, monkeypatch):
    """Twenty runs queued at once on a new tracking server: each sees no experiment, one creates
    it, and the others' create answers RESOURCE_ALREADY_EXISTS (the stack's load check lost a run
    to it). Here the race is staged: the experiment exists, the lookup says it does not."""
    config = registry_config(tmp_path)
    mlflow.set_tracking_uri(config.registry.tracking_uri)
    experiment_id = mlflow.create_experiment(config.registry.experiment)
    monkeypatch.setattr(mlflow, "get_experiment_by_name", lambda name: None)
    with tracking_run(config, "late") as run_id:
        pass
    assert MlflowClient(config.registry.tracking_uri).get_run(run_id).info.experiment_id == experiment_id


def test_champion_moves_only_when_beaten_and_failures_leave_no_version(tmp_path, classifier, onnx_file):
    config = registry_config(tmp_path)
    client = MlflowClient(config.registry.tracking_uri)
    first = run_with_auc(config, classifier, onnx_file, tmp_path, 0.70)
    assert first.is_champion and first.version == "1"
    assert read_metadata(tmp_path / "model-0.7.onnx")["model_version"] == "1"

    worse = run_with_auc(config, classifier, onnx_file, tmp_path, 0.60)
    assert not worse.is_champion and "does not beat champion v1" in worse.reason
    assert str(client.get_model_version_by_alias("reg-test", CHAMPION).version) == "1"
    assert str(client.get_model_version_by_alias("reg-test", CHALLENGER).version) == "2"

    with pytest.raises(Exception):
        run_with_auc(config, classifier, onnx_file, tmp_path, 0.99, onnx_override=tmp_path / "missing.onnx")
    versions = sorted(int(v.version) for v in client.search_model_versions("name='reg-test'"))
    assert versions == [1, 2]  # the failed registration was removed again

    better = run_with_auc(config, classifier, onnx_file, tmp_path, 0.80)
    assert better.is_champion and better.version == "4"
    assert str(client.get_model_version_by_alias("reg-test", CHAMPION).version) == "4"
    assert client.get_model_version("reg-test", "4").tags["onnx_uri"].endswith("onnx/model-0.8.onnx")


SPEC_METADATA = {"preprocess": PreprocessSpec().to_metadata()}  # the default preprocessing, as exports record it
REAL_SIZES = ("CT_small.dcm", "MR_small.dcm", "RG1_UNCR.dcm", "US1_J2KR.dcm", "JPEG2000.dcm")


def real_greys():
    from pydicom.data import get_testdata_file
    from tasks.decode import load_grey

    return [load_grey(get_testdata_file(name))[0] for name in REAL_SIZES]  # 64x64 up to 1955x1841


@pytest.mark.parametrize("fit", ["crop", "pad"])
def test_preprocessing_graph_matches_the_python_transform_within_one_level(fit):
    import onnxruntime as ort
    from configs import Fit
    from tasks.export import GREY_INPUT_NAME, preprocessing_graph

    spec = PreprocessSpec(fit=Fit(fit))
    session = ort.InferenceSession(preprocessing_graph(spec, 18).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    for grey in real_greys():  # square, portrait and landscape (US1_J2KR is 480 x 640)
        expected = spec.normalise(torch.from_numpy(spec.to_uint8(grey)[0])).numpy()
        actual = session.run(None, {GREY_INPUT_NAME: grey[None, None]})[0]
        levels = np.abs(actual - expected) * np.array([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1) * 255
        assert actual.shape == (1, 3, 224, 224)
        assert levels.max() < 1.01  # ONNX Resize vs torchvision: at most one 8-bit level apart...
        assert (levels > 0.5).mean() < 1e-3  # ...on a rare pixel


def test_self_contained_graph_takes_any_size_and_matches_pytorch(tmp_path, onnx_file, classifier):
    from tasks.export import check_self_contained_parity, export_self_contained

    spec = PreprocessSpec()
    metadata = {"variant": "fp32", "preprocess": spec.to_metadata()}
    path = export_self_contained(onnx_file, tmp_path / "model.onnx", metadata)
    report = check_self_contained_parity(path, classifier, real_greys(), spec, tolerance=1e-3)
    assert report.passed and report.samples == len(REAL_SIZES)
    assert read_metadata(path) == metadata


def test_gate_fails_with_reason_and_makes_no_variants(tmp_path, classifier, real_images):
    from configs import ExportConfig
    from tasks.variants import export_serving_models

    greys = [image.astype(np.float32) / 255 for image in real_images]
    strict = ExportConfig(max_abs_diff=1e-12, self_contained_max_abs_diff=1e-12)
    models = export_serving_models(classifier, tmp_path, SPEC_METADATA, strict, train_crops=real_images,
                                   val_crops=real_images, test_crops=real_images, test_greys=greys,
                                   test_targets=np.zeros(len(greys)), threshold=0.5, positive_index=1)
    assert not models.passed and models.variants == {}
    assert "normalised graph on CPUExecutionProvider" in models.failure_reason()
    assert json.loads(models.report_json())["reason"] == models.failure_reason()


def test_variants_pass_their_checks_and_report_accuracy(tmp_path, classifier, real_images):
    from configs import ExportConfig
    from tasks.variants import export_serving_models

    greys = [image.astype(np.float32) / 255 for image in real_images]
    models = export_serving_models(classifier, tmp_path, {"task": "classification"} | SPEC_METADATA,
                                   ExportConfig(), train_crops=real_images, val_crops=real_images[:4],
                                   test_crops=real_images, test_greys=greys,
                                   test_targets=np.array([0, 1] * (len(greys) // 2)), threshold=0.5,
                                   positive_index=1)
    assert models.passed and sorted(models.variants) == ["fp16", "int8"] and models.dropped == {}
    for name, path in models.variants.items():
        assert read_metadata(path)["variant"] == name
    accuracy = {a.variant: a for a in models.accuracy}
    assert set(accuracy["int8"].metrics) == {"roc_auc", "accuracy", "sensitivity", "specificity", "f1"}
    assert accuracy["int8"].lost["accuracy"] == accuracy["int8"].reference["accuracy"] - accuracy["int8"].metrics["accuracy"]
    assert accuracy["int8"].decision_agreement >= ExportConfig().int8_min_decision_agreement
    # Static QDQ int8: calibrated on the training crops with the method closest to float32 on validation.
    calibration = models.calibration
    assert calibration.images == len(real_images) and set(calibration.validation_mean_abs_diff) == {"minmax", "percentile"}
    assert calibration.validation_mean_abs_diff[calibration.method] == min(calibration.validation_mean_abs_diff.values())
    assert json.loads(models.report_json())["int8_calibration"]["method"] == calibration.method
    graph = onnx.load(models.variants["int8"]).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops and "DynamicQuantizeLinear" not in ops
    weights = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
    conv_weights = [node.input[1] for node in graph.node if node.op_type == "Conv"]
    dequantised = {node.output[0]: node for node in graph.node if node.op_type == "DequantizeLinear"}
    first = dequantised[conv_weights[0]]  # int8 weights, one scale per output channel
    assert weights[first.input[0]].dtype == np.int8 and weights[first.input[1]].shape == (64,)


def test_int8_is_dropped_with_its_reason_when_it_loses_too_much():
    from configs import ExportConfig
    from tasks.variants import ServingModels, VariantAccuracy, int8_loss_verdict

    reference = {"roc_auc": 0.90, "accuracy": 0.85}
    close = VariantAccuracy("int8", "CPUExecutionProvider", 200, {"roc_auc": 0.897, "accuracy": 0.85}, reference, 0.995)
    assert int8_loss_verdict(close, ExportConfig()) is None
    worse = VariantAccuracy("int8", "CPUExecutionProvider", 200, {"roc_auc": 0.89, "accuracy": 0.84}, reference, 0.98)
    verdict = int8_loss_verdict(worse, ExportConfig())
    assert "test AUC loss 0.0100 (tolerance 0.005)" in verdict and "98.00% of 200 test images" in verdict
    assert int8_loss_verdict(worse, ExportConfig(int8_max_auc_loss=0.02, int8_min_decision_agreement=0.95)) is None
    ages = VariantAccuracy("int8", "CPUExecutionProvider", 50, {"mae": 8.3}, {"mae": 8.1}, None)
    assert "test MAE up 0.2000 (tolerance 0.1)" in int8_loss_verdict(ages, ExportConfig())

    models = ServingModels(Path("model.onnx"), Path("model_normalised.onnx"), {}, [], [], {})
    with tempfile.TemporaryDirectory() as tmp:
        kept, dropped = Path(tmp) / "kept.onnx", Path(tmp) / "dropped.onnx"
        kept.write_bytes(b"x")
        dropped.write_bytes(b"x")
        models.keep_or_drop("fp16", kept, dataclasses.replace(close, variant="fp16"), None)
        models.keep_or_drop("int8", dropped, worse, verdict)
        assert models.variants == {"fp16": kept} and models.dropped == {"int8": verdict}
        assert not dropped.exists() and [a.variant for a in models.accuracy] == ["fp16", "int8"]  # both stated