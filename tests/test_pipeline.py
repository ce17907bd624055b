"""The whole flow, for real: Prefect (test harness server), MLflow (SQLite), ONNX Runtime."""

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar
from uuid import UUID

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pydicom
import pytest
import torch
from mlflow import MlflowClient
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, LogFilter,
                                            TaskRunFilter)
from prefect.client.schemas.objects import Artifact, Log, State
from prefect.client.schemas.sorting import ArtifactSort
from prefect.exceptions import PrefectHTTPStatusError
from prefect.logging.handlers import APILogHandler
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML, generate_uid

from configs import SALT_ENV_VAR, Precision, load_config
from flows.pipeline import train_pipeline
from tasks.champion import open_served_model
from tasks.domain import ReasonKind
from tasks.export import GREY_INPUT_NAME, INPUT_NAME, training_data_sha256
from tasks.hardware import cpu_info, training_precision
from tasks.ingest import DICOMDIR, ManifestError, NotEnoughData, patient_key
from tasks.cache import SHARD_SUFFIX
from tasks.decode import load_grey
from tasks.preprocess import preprocess_file
from tasks.transforms import to_model_input
from tasks.register import CHALLENGER, CHAMPION

from tests.conftest import phi_strings, qc_section, write_config

T = TypeVar("T")
# The Prefect artifacts the flow publishes for configs/breast_ultrasound.yaml.
QC_KEY, REJECTS_KEY = "breast-ultrasound-qc", "breast-ultrasound-rejects"


@pytest.fixture
def dataset_with_bad_files(tmp_path, breast_dicom_dir) -> Iterator[tuple[Path, dict[str, str]]]:
    """The real subset plus a copy of a train image's pixels under a new SOPInstanceUID (usable,
    a same-split duplicate) and one file per reject reason. The manifest lists the extra files
    as rows 122-130; the loop's second link, the DICOMDIR and the unreadable folder are not listed.
    Yields the root and {path: (kind, rows, reason) each bad file must be rejected with}."""
    root = tmp_path / "data"
    shutil.copytree(breast_dicom_dir, root)
    manifest = pd.read_csv(root / "manifest.csv")
    train = root / "train"
    good = root / manifest.loc[0, "path"]
    copy = pydicom.dcmread(root / manifest.loc[1, "path"])
    copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    copy.save_as(train / "pixel_copy.dcm")
    (train / "corrupt.dcm").write_bytes(good.read_bytes()[:-100])  # cut inside the pixels
    (train / "corrupt_b.dcm").write_bytes(good.read_bytes()[:-200])  # the same problem, in other words
    (train / "notes.dcm").write_text("this is not an image")
    no_pixels = pydicom.dcmread(good)
    del no_pixels.PixelData
    no_pixels.save_as(train / "nopixels.dcm")
    video = pydicom.dcmread(good)  # real pixels, filed under a syntax no installed plugin decodes
    video.PixelData = encapsulate([video.PixelData])
    video["PixelData"].VR, video["PixelData"].is_undefined_length = "OB", True
    video.file_meta.TransferSyntaxUID = MPEG2MPML
    video.save_as(train / "video.dcm")
    (train / "empty.dcm").write_bytes(b"")
    (train / "ring_a.dcm").symlink_to("ring_b.dcm")
    (train / "ring_b.dcm").symlink_to("ring_a.dcm")
    shutil.copyfile(get_testdata_file("DICOMDIR"), root / "DICOMDIR")
    listed = ["pixel_copy", "corrupt", "notes", "nopixels", "video", "empty", "ring_a", "corrupt_b"]
    expected = {
        "train/corrupt.dcm": ("truncated", "", "the pixel data holds 684 of the 784 bytes its header declares "
                                               "(28x28, 1 sample of 8 bits)"),
        "train/corrupt_b.dcm": ("truncated", "", "the pixel data holds 584 of the 784 bytes its header declares "
                                                 "(28x28, 1 sample of 8 bits)"),
        "train/notes.dcm": ("not an image", "124", "not a DICOM, PNG or JPEG file"),
        "train/nopixels.dcm": ("no pixel data", "", "DICOM has no pixel data"),
        "train/video.dcm": ("unsupported transfer syntax", "", "no decoder for transfer syntax MPEG2 Main Profile "
                                                               "/ Main Level"),
        "train/empty.dcm": ("empty", "127", "empty file (0 bytes)"),
        "train/ring_a.dcm": ("unreadable", "128", "symlink loop: the link leads back to itself"),
        "train/ring_b.dcm": ("not in manifest", "", "symlink loop: the link leads back to itself; not listed in "
                                                    "the manifest"),
        "DICOMDIR": ("not in manifest", "", f"{DICOMDIR.detail}; not listed in the manifest"),
    }
    locked, locked_folder = train / "locked.dcm", train / "locked_folder"
    shutil.copyfile(good, locked)
    locked_folder.mkdir()
    shutil.copyfile(good, locked_folder / "hidden.dcm")
    for path in (locked, locked_folder):
        path.chmod(0)
    if os.access(locked, os.R_OK):  # root reads mode-000 files and folders: these need a non-root run
        locked.unlink()
        locked_folder.chmod(0o700)
        shutil.rmtree(locked_folder)
    else:
        listed.append("locked")
        expected["train/locked.dcm"] = ("unreadable", "130", "cannot read the file: Permission denied (check its "
                                                             "permissions)")
        expected["train/locked_folder"] = ("not in manifest", "", "cannot read folder: Permission denied; not "
                                                                  "listed in the manifest")
    extra = pd.DataFrame({"path": [f"train/{name}.dcm" for name in listed],
                          "label": manifest.loc[1, "label"], "split": "train"})
    assert manifest.loc[1, "split"] == "train" and len(manifest) == 120  # the rows named above
    pd.concat([manifest, extra]).to_csv(root / "manifest.csv", index=False)
    yield root, expected
    if locked_folder.exists():
        locked_folder.chmod(0o700)  # so that pytest can clean up


def _prefect_read(read: Callable[[SyncPrefectClient], T]) -> T:
    """`read` through the test server's client, again while its SQLite store is locked: the
    server answers 503, which the client itself retries only a few times."""
    for attempt in range(4):
        try:
            with get_client(sync_client=True) as client:
                return read(client)
        except PrefectHTTPStatusError as exc:
            if exc.response.status_code != 503:
                raise
            time.sleep(2 ** attempt)
    with get_client(sync_client=True) as client:  # the last try: its error is the test's
        return read(client)


def _artifacts(flow_run_id: UUID | None = None) -> list[Artifact]:
    """The artifacts of one flow run, or of every run. Every filter passed explicitly: the sync
    client sends None for missing ones, which the server refuses."""
    run = ArtifactFilterFlowRunId(any_=[flow_run_id]) if flow_run_id else None
    return _prefect_read(lambda client: client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=run), flow_run_filter=FlowRunFilter(),
        task_run_filter=TaskRunFilter(), limit=200, offset=0, sort=ArtifactSort.CREATED_DESC))


def _run_artifacts(state: State) -> dict[str, Artifact]:
    """A flow run's artifacts by key, each key published once."""
    artifacts = _artifacts(state.state_details.flow_run_id)
    by_key = {a.key: a for a in artifacts}
    assert len(by_key) == len(artifacts)
    return by_key


def _reasons(table: Artifact) -> dict[str, tuple[str, str, str]]:
    """A rejects table artifact as {path: (kind, rows, reason)}, one row per file."""
    rows = json.loads(table.data)
    reasons = {row["path"]: (row["kind"], str(row["rows"]), row["reason"]) for row in rows}
    assert len(reasons) == len(rows)
    return reasons


def _rejects_reported(state: State, run_dir: Path, expected: dict[str, tuple[str, str, str]]) -> str:
    """Assert that rejects.csv in `run_dir` and the flow run's rejects table artifact both hold
    exactly `expected`; the artifact's description."""
    rejects = pd.read_csv(run_dir / "rejects.csv", dtype=str, keep_default_na=False)
    assert dict(zip(rejects["path"], zip(rejects["kind"], rejects["rows"], rejects["reason"]))) == expected
    assert rejects["path"].is_unique
    table = _run_artifacts(state)[REJECTS_KEY]
    assert _reasons(table) == expected
    return table.description


def test_full_pipeline_registers_champion_and_verified_onnx(prefect_server, tmp_path, dataset_with_bad_files):
    data_root, expected_rejects = dataset_with_bad_files
    config_path = write_config(tmp_path, data_root, model={"weights": "none"},
                               train={"epochs": 2, "batch_size": 16})
    state = train_pipeline(str(config_path), return_state=True)
    summary = state.result()
    config = load_config(config_path)

    # Counts reconcile and every bad file is quarantined with its reason, in rejects.csv and
    # in the Prefect table artifact; the QC markdown artifact is the QC report.
    run_dir = summary.run_dir
    usable = pd.read_csv(run_dir / "manifest.csv")
    assert len(usable) == 121
    discovered = 120 + 1 + len(expected_rejects)  # the subset, the pixel copy, the bad files
    description = _rejects_reported(state, run_dir, expected_rejects)
    assert description == f"Discovered {discovered} = usable 121 + rejected {len(expected_rejects)}"
    qc = (run_dir / "qc_report.md").read_text()
    assert _run_artifacts(state)[QC_KEY].data == qc
    assert f"{discovered} files discovered = 121 usable + {len(expected_rejects)} rejected; 121 samples." in qc
    # Rejects count by kind: both cut files as one, whatever their byte counts.
    kinds = {"truncated": 2, "not an image": 1, "no pixel data": 1, "unsupported transfer syntax": 1, "empty": 1,
             "unreadable": 1, "not in manifest": 2}
    if "train/locked.dcm" in expected_rejects:
        kinds |= {"unreadable": 2, "not in manifest": 3}
    assert {kind: int(n) for kind, n in qc_section(qc, "Rejects by kind")} == kinds
    assert qc_section(qc, "Photometric interpretation (PNG/JPEG: image mode)") == [["MONOCHROME2", "121"]]
    assert qc_section(qc, "Label") == [["benign", "89"], ["malignant", "32"]]  # the pixel copy is benign
    # Only the copy that is kept: the rejected files that share img0000's SOPInstanceUID are not.
    assert qc_section(qc, "Duplicates (kept in their original's split)") == [
        ["train/pixel_copy.dcm", "train/img0001.dcm", "stored pixels"]]

    # The registry holds the model with both aliases on the new version.
    client = MlflowClient(config.registry.tracking_uri)
    name = config.registry.model_name
    champion = client.get_model_version_by_alias(name, CHAMPION)
    assert str(champion.version) == summary.registration.version == "1"
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == "1"
    run = client.get_run(champion.run_id)
    assert run.data.params["weights_name"] == "none" and run.data.params["weights_pretrained"] == "False"
    # train.precision: auto (the default) chose from this machine's CPU flags, and says why.
    chosen = training_precision(Precision.AUTO, None, "cpu", cpu_info())
    assert run.data.params["precision_used"] == chosen.precision.value
    assert run.data.params["precision_reason"] == chosen.reason
    assert run.data.params["channels_last_used"] == str(chosen.channels_last)
    metrics = run.data.metrics
    assert 0.0 <= metrics["test_roc_auc_ci_low"] <= metrics["test_roc_auc"] <= metrics["test_roc_auc_ci_high"] <= 1.0
    assert 0.0 <= metrics["test_ece"] <= 1.0 and 0.0 <= metrics["operating_threshold"] <= 1.0
    # The no-skill baseline: always answering the training split's most frequent class (benign).
    test_labels = usable.loc[usable["split"] == "test", "label"]
    assert usable.loc[usable["split"] == "train", "label"].mode()[0] == "benign"
    assert metrics["test_no_skill_accuracy"] == pytest.approx((test_labels == "benign").mean())
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
    assert "No-skill baseline: always answering the training split's most frequent class" in card
    assert f"Training precision: {chosen.precision.value}" in card and chosen.reason in card

    # The self-contained ONNX file takes decoded grey images of any size and agrees with
    # PyTorch (tasks.transforms + the network) on held-out images.
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
    assert parity["passed"] and {r["graph"] for r in parity["parity"]} == {"normalised", "self-contained", "int8",
                                                                          "fp16"}
    assert all(r["domain_max_rel_diff"] is not None for r in parity["parity"])  # every graph checks domain_score
    assert all(r["passed"] for r in parity["parity"] if r["graph"] != "int8")
    # int8 is kept only when its domain score agrees with PyTorch's (its own outputs are judged by
    # their test-set loss instead), and then only within export.int8_* (with the reason otherwise).
    int8 = next(r for r in parity["parity"] if r["graph"] == "int8")
    assert int8["domain_max_rel_diff"] <= config.export.variant_domain_max_rel_diff or not int8["passed"]
    int8_accuracy = [a for a in parity["accuracy"] if a["variant"] == "int8"]
    assert len(int8_accuracy) == int8["passed"]  # its test-set loss is stated once its domain score passed
    kept = "int8" not in parity["dropped"]
    assert sorted(parity["variants"]) == (["fp16", "int8"] if kept else ["fp16"])
    assert kept == (int8["passed"] and int8_accuracy[0]["lost"]["roc_auc"] <= config.export.int8_max_auc_loss
                    and int8_accuracy[0]["decision_agreement"] >= config.export.int8_min_decision_agreement)
    # int8 is static, calibrated on the training crops with the method recorded.
    train_count = int((usable["split"] == "train").sum())
    calibration = parity["int8_calibration"]
    assert calibration["images"] == min(train_count, config.export.int8_calibration_images)
    assert run.data.params["int8_calibration_method"] == calibration["method"]
    if kept:
        int8_ops = {node.op_type for node in onnx.load(run_dir / "model_int8.onnx").graph.node}
        assert "QuantizeLinear" in int8_ops and "DynamicQuantizeLinear" not in int8_ops
    tags = client.get_model_version(name, "1").tags
    assert {"onnx_uri", "onnx_normalised_uri", "onnx_fp16_uri"} <= set(tags)
    assert ("onnx_int8_uri" in tags) == kept

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    test_paths = usable.loc[usable["split"] == "test", "path"][:5]
    greys = np.stack([load_grey(data_root / p)[0] for p in test_paths])
    probabilities = session.run(None, {GREY_INPUT_NAME: greys[:, None]})[0]
    assert probabilities.shape == (5, 2) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    normalised = ort.InferenceSession(str(run_dir / "model_normalised.onnx"), providers=["CPUExecutionProvider"])
    crops = np.stack([preprocess_file(data_root / p, config.preprocess).image for p in test_paths])
    expected = normalised.run(None, {INPUT_NAME: to_model_input(torch.from_numpy(crops)).numpy()})[0]
    np.testing.assert_allclose(probabilities, expected, atol=1e-3)
    _check_domain(summary, config, run, meta, usable, data_root)


def _check_domain(summary, config, run, meta, usable: pd.DataFrame, data_root: Path) -> None:
    """The domain check was fitted, evaluated, recorded and shipped: a chest CR sent to this breast
    ultrasound model is flagged; its own test images pass the header facts, and the served
    model flags exactly the share of them that the evaluation reported."""
    metrics, params = run.data.metrics, run.data.params
    domain = json.loads(meta["domain"])
    assert domain["threshold"] == pytest.approx(metrics["domain_threshold"]) and domain["quantile"] == 0.99
    assert domain["header_facts"]["seen"]["modality"] == ["US"] and params["domain_seen_modality"] == "US"
    assert params["domain_method"] == "mahalanobis"
    assert 0.0 <= metrics["domain_auroc_other_modality"] <= 1.0  # the tests' CT and RT dose images
    for report in (summary.run_dir / "evaluation.md", summary.run_dir / "model_card.md"):
        text = report.read_text()
        assert "## Input domain" in text and "| other modality |" in text

    served = open_served_model(config.registry.model_name, "1", "fp32", summary.onnx_path)
    cr = Path(get_testdata_file("RG1_UNCR.dcm")).read_bytes()
    cr_prepared = served.prepare(Path("cr"), cr)
    (answer,) = served.predict([cr_prepared.crop], [cr_prepared.facts])
    assert answer.domain.in_domain is False and answer.domain.messages()[0] == "Modality CR not seen in training (US)"
    test = [(data_root / p).read_bytes() for p in usable.loc[usable["split"] == "test", "path"]]
    prepared = [served.prepare(Path("t"), data) for data in test]
    answers = served.predict([one.crop for one in prepared], [one.facts for one in prepared])
    kinds = {r.kind for a in answers for r in a.domain.reasons}
    assert kinds <= {ReasonKind.NOVELTY_ABOVE_THRESHOLD}  # no header fact of its own images is unseen
    flagged = np.mean([a.domain.in_domain is False for a in answers])
    assert flagged == pytest.approx(metrics["domain_test_false_rejection_rate"])


# Files in dataset_with_bad_files that ingest accepts and only decoding rejects.
UNDECODABLE = {"train/corrupt.dcm", "train/corrupt_b.dcm", "train/nopixels.dcm", "train/video.dcm"}


def _failed_run_dir(config_path: Path) -> Path:
    """The one run folder of a flow that failed; its MLflow run is marked FAILED and holds rejects.csv."""
    config = load_config(config_path)
    (run_dir,) = config.run_dir.iterdir()
    client = MlflowClient(config.registry.tracking_uri)
    assert client.get_run(run_dir.name).info.status == "FAILED"
    assert "data/rejects.csv" in {a.path for a in client.list_artifacts(run_dir.name, "data")}
    return run_dir


def test_too_few_usable_samples_fail_the_flow_after_the_rejects_report(prefect_server, tmp_path,
                                                                        dataset_with_bad_files):
    data_root, expected_rejects = dataset_with_bad_files
    config_path = write_config(tmp_path, data_root, data={"min_usable_per_class": 40})
    state = train_pipeline(str(config_path), return_state=True)
    with pytest.raises(NotEnoughData, match=r"\(40\): malignant: 32;"):
        state.result()
    run_dir = _failed_run_dir(config_path)
    assert _rejects_reported(state, run_dir, expected_rejects).endswith(
        f"= usable 121 + rejected {len(expected_rejects)}")
    assert "## Rejects by kind" in _run_artifacts(state)[QC_KEY].data


def test_unusable_splits_fail_the_flow_after_reporting_the_rejects_found_so_far(prefect_server, tmp_path,
                                                                              dataset_with_bad_files):
    data_root, expected_rejects = dataset_with_bad_files
    manifest = pd.read_csv(data_root / "manifest.csv")
    manifest["split"] = manifest["split"].replace("test", "val")
    manifest.to_csv(data_root / "manifest.csv", index=False)
    config_path = write_config(tmp_path, data_root)
    state = train_pipeline(str(config_path), return_state=True)
    with pytest.raises(ManifestError, match="the 'test' split is empty"):
        state.result()
    found_by_ingest = {path: reason for path, reason in expected_rejects.items() if path not in UNDECODABLE}
    description = _rejects_reported(state, _failed_run_dir(config_path), found_by_ingest)
    assert description == f"Ingest stopped: {data_root / 'manifest.csv'}: the 'test' split is empty"


def test_a_class_too_small_to_split_fails_the_flow_after_reporting_the_rejects(prefect_server, tmp_path,
                                                                              dataset_with_bad_files):
    data_root, expected_rejects = dataset_with_bad_files
    manifest = pd.read_csv(data_root / "manifest.csv").drop(columns="split")
    # All but 3 malignant rows mislabelled: the class is lost to bad rows, as it often is.
    typos = manifest.index[manifest["label"] == "malignant"][3:]
    manifest.loc[typos, "label"] = "malignnant"
    manifest.to_csv(data_root / "manifest.csv", index=False)
    state = train_pipeline(str(write_config(tmp_path, data_root)), return_state=True)
    with pytest.raises(NotEnoughData, match=r"per class .*: malignant: 3; see the rejects report"):
        state.result()
    found_by_ingest = {path: reason for path, reason in expected_rejects.items() if path not in UNDECODABLE}
    found_by_ingest |= {manifest.loc[i, "path"]: ("bad label", str(i + 2), "label 'malignnant' is not one of "
                                                  "['benign', 'malignant']") for i in typos}
    description = _rejects_reported(state, _failed_run_dir(tmp_path / "config.yaml"), found_by_ingest)
    assert description.startswith("Ingest stopped: ") and "malignant: 3" in description


def _all_prefect_logs() -> list[Log]:
    """Every log line the Prefect server holds."""
    APILogHandler().flush()

    def read(client: SyncPrefectClient) -> list[Log]:
        logs: list[Log] = []
        while batch := client.read_logs(log_filter=LogFilter(), limit=200, offset=len(logs)):
            logs += batch
        return logs
    return _prefect_read(read)


def test_no_patient_data_in_any_output_and_qc_report_written(prefect_server, tmp_path, breast_dicom_dir,
                                                             monkeypatch):
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
    phi = phi_strings(root)
    assert len(phi) >= 4 * 120  # name (two spellings), id, birth date and accession per image
    salt = "known-salt-5e1d7c"  # from the environment, so no salt file is written to exclude
    monkeypatch.setenv(SALT_ENV_VAR, salt)
    phi.add(salt)

    config_path = write_config(tmp_path, root, model={"weights": "none"},
                               train={"epochs": 1, "batch_size": 32}, preprocess={"workers": 2})
    state = train_pipeline(str(config_path), return_state=True)
    summary = state.result()
    config = load_config(config_path)
    run = MlflowClient(config.registry.tracking_uri).get_run(
        MlflowClient(config.registry.tracking_uri).get_model_version(config.registry.model_name, "1").run_id)
    artifact_dir = Path(run.info.artifact_uri.removeprefix("file://"))

    outputs = [p for p in tmp_path.rglob("*") if p.is_file() and root not in p.parents]
    outputs += [p for p in artifact_dir.rglob("*") if p.is_file() and tmp_path not in p.parents]
    assert summary.onnx_path in outputs and Path(tmp_path / "mlflow.db") in outputs
    assert any(p.suffix == SHARD_SUFFIX for p in outputs) and any(p.name == "qc_report.md" for p in outputs)
    leaks = {(str(p), s) for p in outputs for s in phi if s.encode() in p.read_bytes()}
    # Prefect's copy of the reports and logs: read for real, or the scan below proves nothing.
    artifacts, logs = _artifacts(), _all_prefect_logs()
    this_run = {a.key for a in artifacts if a.flow_run_id == state.state_details.flow_run_id}
    assert {QC_KEY, REJECTS_KEY, "breast-ultrasound-latest-evaluation", "breast-ultrasound-latest-model-card",
            "breast-ultrasound-champion-evaluation", "breast-ultrasound-champion-model-card",
            "breast-ultrasound-latest-weights"} <= this_run
    assert any(log.message.startswith("pipeline finished") for log in logs
               if log.flow_run_id == state.state_details.flow_run_id)
    texts = [json.dumps(a.data) + (a.description or "") for a in artifacts] + [log.message for log in logs]
    leaks |= {("prefect", s) for text in texts for s in phi if s in text}
    assert not leaks

    qc = (summary.run_dir / "qc_report.md").read_text()
    assert "121 files discovered = 121 usable + 0 rejected" in qc
    assert f"| train/copy.dcm | {manifest.loc[0, 'path']} | SOPInstanceUID |" in qc
    assert "| US | 121 |" in qc and "| Explicit VR Little Endian | 121 |" in qc and "| 28x28 | 121 |" in qc
    assert qc_section(qc, "SOP class") == [["Ultrasound Image Storage", "121"]]  # a fact the domain check compares
    usable = pd.read_csv(summary.run_dir / "manifest.csv")
    assert (usable["split"] == "train").sum() == 41  # the copy went with its original
    # The known salt is the one used: the scan above looked for the real secret.
    first = pydicom.dcmread(root / usable.loc[0, "path"], stop_before_pixels=True)
    assert usable.loc[0, "patient_key"] == patient_key(first.PatientID, salt)
    assert not list(tmp_path.rglob(".patient_salt"))
    for split, rows in usable.groupby("split"):
        counts = rows["label"].value_counts()
        assert f"| {split} | {counts.get('benign', 0)} | {counts.get('malignant', 0)} | {len(rows)} |" in qc
