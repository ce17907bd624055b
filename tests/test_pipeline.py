"""The whole flow, for real: Prefect (test harness server), MLflow (SQLite), ONNX Runtime."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pydicom
import pytest
import torch
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, FlowRunFilter, LogFilter, TaskRunFilter
from prefect.client.schemas.sorting import ArtifactSort
from prefect.logging.handlers import APILogHandler

from configs import load_config
from flows.pipeline import train_pipeline
from tasks.export import GREY_INPUT_NAME, INPUT_NAME, training_data_sha256
from tasks.preprocess import CACHE_SUFFIX, load_grey, preprocess_file, to_model_input
from tasks.register import CHALLENGER, CHAMPION

from tests.conftest import write_config


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

    # The self-contained ONNX file takes decoded grey images of any size and agrees with
    # PyTorch (tasks.preprocess + the network) on held-out images.
    onnx_path = summary.onnx_path
    assert onnx_path.name == "model.onnx"
    meta = {p.key: p.value for p in onnx.load(onnx_path).metadata_props}
    assert meta["model_name"] == name and meta["model_version"] == "1"
    assert json.loads(meta["label_names"]) == ["benign", "malignant"] and meta["weights_name"] == "none"
    assert json.loads(meta["label_map"]) == {"0": "benign", "1": "malignant"}
    assert float(meta["operating_threshold"]) == pytest.approx(metrics["operating_threshold"], abs=1e-6)
    assert meta["threshold_source"] == "validation"
    assert meta["input_name"] == GREY_INPUT_NAME and meta["output_name"] == "probabilities"
    assert json.loads(meta["metrics"])["roc_auc"] == pytest.approx(run.data.metrics["test_roc_auc"], abs=1e-6)
    assert meta["training_data_sha256"] == training_data_sha256(usable)
    assert json.loads(meta["decode"]) == {"voi_window": 0, "frame": "middle"}  # the config's defaults
    parity = json.loads((run_dir / "onnx_parity.json").read_text())
    assert parity["passed"] and {r["graph"] for r in parity["parity"]} == {"normalised", "self-contained", "fp16"}
    assert all(r["passed"] for r in parity["parity"])
    assert sorted(parity["variants"]) == ["fp16", "int8"]
    assert {a["variant"] for a in parity["accuracy"]} == {"int8", "fp16"}
    for tag in ("onnx_uri", "onnx_normalised_uri", "onnx_int8_uri", "onnx_fp16_uri"):
        assert tag in client.get_model_version(name, "1").tags

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    test_paths = usable.loc[usable["split"] == "test", "path"][:5]
    greys = np.stack([load_grey(dataset_with_bad_files / p)[0] for p in test_paths])
    probabilities = session.run(None, {GREY_INPUT_NAME: greys[:, None]})[0]
    assert probabilities.shape == (5, 2) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    normalised = ort.InferenceSession(str(run_dir / "model_normalised.onnx"), providers=["CPUExecutionProvider"])
    crops = np.stack([preprocess_file(dataset_with_bad_files / p, config.preprocess).image for p in test_paths])
    expected = normalised.run(None, {INPUT_NAME: to_model_input(torch.from_numpy(crops)).numpy()})[0]
    np.testing.assert_allclose(probabilities, expected, atol=1e-3)


def _phi_strings(data_root: Path) -> set[str]:
    """Every identifying value in the input DICOMs' headers, as it might be written out."""
    found = set()
    for path in data_root.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName"):
            value = str(ds.get(keyword, "")).strip()
            if value:
                found |= {value, value.replace("^", " ")}
    return found


def _all_prefect_text() -> list[str]:
    """Every log line and artifact the Prefect server holds. The artifacts repeat rejects.csv and
    qc_report.md, which are scanned as files too: under load the test server's SQLite store can
    drop an artifact write ("database is locked"), so their presence is not asserted here."""
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        # Every filter passed explicitly: the sync client sends None for missing ones, which the server refuses.
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(), flow_run_filter=FlowRunFilter(),
                                          task_run_filter=TaskRunFilter(), limit=200, offset=0,
                                          sort=ArtifactSort.CREATED_DESC)
        texts = [json.dumps(a.data) + (a.description or "") for a in artifacts]
        offset = 0
        while batch := client.read_logs(log_filter=LogFilter(), limit=200, offset=offset):
            texts += [log.message for log in batch]
            offset += len(batch)
    return texts


def test_no_patient_data_in_any_output_and_qc_report_written(prefect_server, tmp_path, breast_dicom_dir):
    root = tmp_path / "data"
    shutil.copytree(breast_dicom_dir, root)
    manifest = pd.read_csv(root / "manifest.csv")
    for index, rel in enumerate(manifest["path"]):  # the two identifiers the sample lacks
        ds = pydicom.dcmread(root / rel)
        ds.AccessionNumber, ds.InstitutionName = f"ACC{index:06d}", "St Placeholder Infirmary"
        ds.save_as(root / rel)
    shutil.copyfile(root / manifest.loc[0, "path"], root / "train" / "copy.dcm")  # a same-split duplicate
    extra = pd.DataFrame({"path": ["train/copy.dcm"], "label": [manifest.loc[0, "label"]], "split": "train"})
    pd.concat([manifest, extra]).to_csv(root / "manifest.csv", index=False)
    phi = _phi_strings(root)
    assert len(phi) >= 4 * 120  # name (two spellings), id, birth date and accession per image

    config_path = write_config(tmp_path, root, model={"weights": "none"},
                               train={"epochs": 1, "batch_size": 32}, preprocess={"workers": 2})
    summary = train_pipeline(str(config_path))
    config = load_config(config_path)
    run = MlflowClient(config.registry.tracking_uri).get_run(
        MlflowClient(config.registry.tracking_uri).get_model_version(config.registry.model_name, "1").run_id)
    artifact_dir = Path(run.info.artifact_uri.removeprefix("file://"))

    outputs = [p for p in tmp_path.rglob("*") if p.is_file() and root not in p.parents]
    outputs += [p for p in artifact_dir.rglob("*") if p.is_file() and tmp_path not in p.parents]
    assert summary.onnx_path in outputs and Path(tmp_path / "mlflow.db") in outputs
    assert any(p.suffix == CACHE_SUFFIX for p in outputs) and any(p.name == "qc_report.md" for p in outputs)
    leaks = {(str(p), s) for p in outputs for s in phi if s.encode() in p.read_bytes()}
    leaks |= {("prefect", s) for text in _all_prefect_text() for s in phi if s in text}
    assert not leaks

    qc = (summary.run_dir / "qc_report.md").read_text()
    assert "121 files discovered = 121 usable + 0 rejected" in qc
    assert f"| train/copy.dcm | {manifest.loc[0, 'path']} | SOPInstanceUID |" in qc
    assert "| US | 121 |" in qc and "| Explicit VR Little Endian | 121 |" in qc and "| 28x28 | 121 |" in qc
    usable = pd.read_csv(summary.run_dir / "manifest.csv")
    assert (usable["split"] == "train").sum() == 41  # the copy went with its original
    for split, rows in usable.groupby("split"):
        counts = rows["label"].value_counts()
        assert f"| {split} | {counts.get('benign', 0)} | {counts.get('malignant', 0)} | {len(rows)} |" in qc
