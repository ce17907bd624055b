"""The whole flow, for real: Prefect (test harness server), MLflow (SQLite), ONNX Runtime."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pydicom
import pytest
import torch
from mlflow import MlflowClient
from prefect.testing.utilities import prefect_test_harness

from configs import load_config
from flows.pipeline import train_pipeline
from tasks.export import INPUT_NAME
from tasks.preprocess import preprocess_file, to_model_input
from tasks.register import CHALLENGER, CHAMPION

from tests.conftest import write_config


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def dataset_with_bad_files(tmp_path, breast_dicom_dir):
    """The real subset plus a corrupt DICOM, a text file and a DICOM without pixels, all listed."""
    root = tmp_path / "data"
    shutil.copytree(breast_dicom_dir, root)
    manifest = pd.read_csv(root / "manifest.csv")
    good = root / manifest.loc[0, "path"]
    (root / "train" / "corrupt.dcm").write_bytes(good.read_bytes()[:-100])  # cut inside the pixels
    (root / "train" / "notes.dcm").write_text("this is not an image")
    no_pixels = pydicom.dcmread(good)
    del no_pixels.PixelData
    no_pixels.save_as(root / "train" / "nopixels.dcm")
    bad = pd.DataFrame({"path": ["train/corrupt.dcm", "train/notes.dcm", "train/nopixels.dcm"],
                        "label": "benign", "split": "train"})
    pd.concat([manifest, bad]).to_csv(root / "manifest.csv", index=False)
    return root


def test_full_pipeline_registers_champion_and_verified_onnx(prefect_server, tmp_path, dataset_with_bad_files):
    config_path = write_config(tmp_path, dataset_with_bad_files,
                               model={"weights": "none"}, train={"epochs": 2, "batch_size": 16})
    summary = train_pipeline(str(config_path))
    config = load_config(config_path)

    # Counts reconcile and the bad files are quarantined with reasons.
    run_dir = summary.run_dir
    usable = pd.read_csv(run_dir / "manifest.csv")
    rejects = pd.read_csv(run_dir / "rejects.csv")
    assert len(usable) == 120 and len(rejects) == 3
    reasons = dict(zip(rejects["path"], rejects["reason"]))
    assert reasons["train/nopixels.dcm"] == "DICOM has no pixel data"
    assert reasons["train/notes.dcm"] == "not a DICOM, PNG or JPEG file"
    assert reasons["train/corrupt.dcm"].startswith("corrupt DICOM")

    # The registry holds the model with both aliases on the new version.
    client = MlflowClient(config.registry.tracking_uri)
    name = config.registry.model_name
    champion = client.get_model_version_by_alias(name, CHAMPION)
    assert str(champion.version) == summary.registration.version == "1"
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == "1"
    run = client.get_run(champion.run_id)
    assert run.data.params["weights_name"] == "none" and run.data.params["weights_pretrained"] == "False"
    metrics = run.data.metrics
    assert 0.0 <= metrics["test_roc_auc_ci_low"] <= metrics["test_roc_auc"] <= metrics["test_roc_auc_ci_high"] <= 1.0
    assert 0.0 <= metrics["test_ece"] <= 1.0 and 0.0 <= metrics["operating_threshold"] <= 1.0
    assert "patient_salt" not in json.dumps(run.data.params)
    artifacts = config.output_dir / "mlartifacts"
    assert run.info.artifact_uri.startswith(artifacts.resolve().as_uri())
    assert "onnx/model.onnx" in {a.path for a in client.list_artifacts(run.info.run_id, "onnx")}

    # Grad-CAM overlays and the model card are run artifacts; the card says what the backbone really was.
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model_card.md", "gradcam", "plots"} <= logged
    overlays = [a.path for a in client.list_artifacts(run.info.run_id, "gradcam")]
    assert len(overlays) == config.evaluate.gradcam_images and all(p.endswith(".png") for p in overlays)
    card = (run_dir / "model_card.md").read_text()
    assert f"# Model card: {name} version 1" in card and "random initialisation (no pretrained weights)" in card
    assert "plots/reliability.png" in card and "| sensitivity_at_threshold |" in card

    # The ONNX file runs in ONNX Runtime and agrees with PyTorch on held-out images.
    onnx_path = summary.onnx_path
    meta = {p.key: p.value for p in onnx.load(onnx_path).metadata_props}
    assert meta["model_name"] == name and meta["model_version"] == "1"
    assert json.loads(meta["label_names"]) == ["benign", "malignant"] and meta["weights_name"] == "none"
    assert float(meta["operating_threshold"]) == pytest.approx(metrics["operating_threshold"], abs=1e-6)
    parity = json.loads((run_dir / "onnx_parity.json").read_text())
    assert parity["passed"] and parity["max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    test_paths = usable.loc[usable["split"] == "test", "path"][:5]
    images = np.stack([preprocess_file(dataset_with_bad_files / p, config.preprocess).image for p in test_paths])
    probabilities = session.run(None, {INPUT_NAME: to_model_input(torch.from_numpy(images)).numpy()})[0]
    assert probabilities.shape == (5, 2) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
