"""The pretrain flow for real (Prefect test harness, MLflow SQLite registry) on a small subset of
the real PneumoniaMNIST chest X-rays, and a fine-tune config that names the registered source model."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from configs import ModelConfig, TaskKind, load_config, load_pretrain_config
from flows.pipeline import train_pipeline
from flows.pretrain import pretrain_source_model
from models.resnet import SOURCE_SHA256_TAG, WeightsError, build_model
from tasks.pretrain import load_source_data
from tests.conftest import write_config

PNEUMONIA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pneumoniamnist" / "pneumoniamnist.npz"
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not PNEUMONIA.exists(), reason=f"PneumoniaMNIST not found at {PNEUMONIA}")


@pytest.fixture
def pneumonia_subset(tmp_path) -> Path:
    """The first 12 / 6 / 6 real images of each class in each official split, in the same .npz layout."""
    path = tmp_path / "pneumonia-subset.npz"
    arrays = {}
    with np.load(PNEUMONIA) as full:
        for split, per_class in (("train", 12), ("val", 6), ("test", 6)):
            labels = full[f"{split}_labels"].reshape(-1)
            keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in (0, 1)])
            arrays.update({f"{split}_images": full[f"{split}_images"][keep], f"{split}_labels": full[f"{split}_labels"][keep]})
    np.savez(path, **arrays)
    return path


def pretrain_config(tmp_path, npz: Path) -> Path:
    raw = yaml.safe_load((REPO / "configs" / "pretrain_pneumonia.yaml").read_text())
    raw["output_dir"] = str(tmp_path / "outputs")
    raw["source"].update(npz=str(npz), resolution=32)
    raw["train"].update(epochs=1, batch_size=16)
    raw["registry"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_source_data_keeps_official_splits_at_the_asked_resolution(tmp_path, pneumonia_subset):
    config = load_pretrain_config(pretrain_config(tmp_path, pneumonia_subset)).source
    prepared = load_source_data(config.model_copy(update={"max_train_samples": 10}), seed=0)
    assert prepared.images.shape == (10 + 12 + 12, 32, 32) and prepared.images.dtype == np.uint8
    assert prepared.manifest["split"].value_counts().to_dict() == {"train": 10, "val": 12, "test": 12}
    assert prepared.split("val").targets.tolist() == [0.0] * 6 + [1.0] * 6
    assert set(prepared.split("test").targets) <= {0.0, 1.0}


def test_pretrained_source_is_registered_and_a_fine_tune_loads_exactly_its_backbone(
        prefect_server, tmp_path, pneumonia_subset):
    config_path = pretrain_config(tmp_path, pneumonia_subset)
    source = pretrain_source_model(str(config_path))
    config = load_pretrain_config(config_path)
    uri = config.registry.tracking_uri
    version = MlflowClient(uri).get_model_version_by_alias(config.registry.model_name, "source")
    assert str(version.version) == source.version and version.tags[SOURCE_SHA256_TAG] == source.sha256
    assert MlflowClient(uri).get_run(version.run_id).data.metrics["test_roc_auc"] >= 0  # evaluated

    fine_tune = ModelConfig(weights=f"mlflow:/{config.registry.model_name}@source")
    model, info = build_model(fine_tune, TaskKind.CLASSIFICATION, 2, tracking_uri=uri)
    assert info.pretrained and info.sha256 == source.sha256 and f"(v{source.version})" in info.name
    saved = torch.load(source.backbone_path, weights_only=True)
    assert saved.keys() == model.backbone.state_dict().keys()
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in saved.items())
    assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 2)  # pretrained at 32 px, fine-tuned at 224

    with pytest.raises(WeightsError, match="config expects"):
        build_model(fine_tune.model_copy(update={"weights_sha256": "0" * 64}), TaskKind.CLASSIFICATION, 2,
                    tracking_uri=uri)
    with pytest.raises(WeightsError, match="no source model"):
        build_model(ModelConfig(weights=f"mlflow:/{config.registry.model_name}@missing"),
                    TaskKind.CLASSIFICATION, 2, tracking_uri=uri)


def test_fine_tune_pipeline_from_the_registered_source_fits_a_head_and_exports(
        prefect_server, tmp_path, pneumonia_subset, breast_dicom_dir):
    pretrain_path = pretrain_config(tmp_path, pneumonia_subset)
    source = pretrain_source_model(str(pretrain_path))
    source_uri = f"mlflow:/{load_pretrain_config(pretrain_path).registry.model_name}@source"
    # 40 training images, under auto_full_threshold: `auto` keeps the pretrained backbone frozen.
    config_path = write_config(tmp_path, breast_dicom_dir, model={"weights": source_uri, "freeze": "auto"})
    summary = train_pipeline(str(config_path))

    config = load_config(config_path)
    client = MlflowClient(config.registry.tracking_uri)
    run = client.get_run(client.get_model_version(config.registry.model_name, summary.registration.version).run_id)
    assert run.data.params["freeze_strategy_used"] == "head" and run.data.params["cached_features"] == "True"
    assert run.data.params["weights_sha256"] == source.sha256
    fits = client.get_metric_history(run.info.run_id, "head_l2")
    assert sorted(m.value for m in fits) == sorted(config.train.head_l2)
    assert client.get_metric_history(run.info.run_id, "lr") == []  # L-BFGS: no learning rate to report
    assert summary.onnx_path.exists()
    best_l2 = next(m.value for m in fits if m.step == run.data.metrics["best_epoch"])
    assert f"linear head fitted on cached features, L2 {best_l2:g}" in (summary.run_dir / "model_card.md").read_text()
