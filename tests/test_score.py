"""Batch scoring as a real Prefect flow run, against the champion in a real MLflow store."""

from __future__ import annotations

import hashlib
import json
import shutil

import pandas as pd
import pydicom
import pytest
import yaml
from prefect import get_client
from pydicom.data import get_testdata_file

from configs import DomainPolicy
from flows.score import score_studies
from tasks.champion import open_served_model
from tasks.score import score_files, study_files
from tests.conftest import decoded_as_trained, evaluated_outputs

GOOD = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "US1_J2KR.dcm")
PATIENT_FOLDER = "DOE^JANE 1960-01-01"  # folder names often carry patient data


BREAST = "breast_us.dcm"  # one of the champion's own kind of image (breast ultrasound)


@pytest.fixture
def studies(tmp_path, breast_dicom_dir):
    """Real DICOM files under a patient-named folder, plus three broken ones; the champion was
    trained on breast ultrasound, so only the breast image is in its domain."""
    folder = tmp_path / "incoming" / PATIENT_FOLDER
    folder.mkdir(parents=True)
    for name in GOOD:
        shutil.copy(get_testdata_file(name), folder / name)
    manifest = pd.read_csv(breast_dicom_dir / "manifest.csv")
    shutil.copy(breast_dicom_dir / manifest.loc[manifest["split"] == "train", "path"].iloc[0], folder / BREAST)
    (folder / "truncated.dcm").write_bytes((folder / "CT_small.dcm").read_bytes()[:-2000])
    (folder / "report.txt").write_text("not an image")
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    del ds.PixelData
    ds.save_as(folder / "nopixels.dcm", enforce_file_format=True)
    (folder / ".DS_Store").write_bytes(b"hidden files are skipped")
    return tmp_path / "incoming"


def test_scoring_flow_writes_scores_rejects_and_a_summary(prefect_server, champion_registry, studies, tmp_path):
    config, _, onnx_path = champion_registry
    config_path = tmp_path / "score.yaml"
    raw = config.model_dump(mode="json")
    raw["output_dir"] = str(tmp_path / "out")
    config_path.write_text(yaml.safe_dump(raw))
    summary = score_studies(str(config_path), str(studies))

    assert summary.counts == {"discovered": 8, "scored": 5, "rejected": 3, "out_of_domain": 4}
    scores, rejects = pd.read_csv(summary.scores_csv), pd.read_csv(summary.rejects_csv)
    assert list(scores.columns) == ["file_sha256", "task", "label", "positive_label", "positive_probability",
                                    "threshold", "in_domain", "domain_score", "domain_reasons", "p_benign",
                                    "p_malignant", "model_name", "model_version"]
    breast_key = hashlib.sha256((studies / PATIENT_FOLDER / BREAST).read_bytes()).hexdigest()
    assert scores.set_index("file_sha256")["in_domain"].to_dict() == {
        key: key == breast_key for key in scores["file_sha256"]}
    ct = scores[scores["file_sha256"] == hashlib.sha256(
        (studies / PATIENT_FOLDER / "CT_small.dcm").read_bytes()).hexdigest()]
    reasons = json.loads(ct["domain_reasons"].item())  # data, not a sentence to parse
    assert (reasons[0]["kind"], reasons[0]["fact"], reasons[0]["value"]) == ("unseen_value", "modality", "CT")
    assert sorted(rejects["kind"]) == ["no pixel data", "not an image", "truncated"]
    assert not rejects["reason"].str.contains("\n").any()
    for text in (summary.scores_csv.read_text(), summary.rejects_csv.read_text()):
        assert "DOE" not in text and ".dcm" not in text

    # Each score is the champion's evaluated output for that file.
    for name in GOOD:
        path = studies / PATIENT_FOLDER / name
        expected = evaluated_outputs(onnx_path, [decoded_as_trained(path)])[0, 1]
        row = scores[scores["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()]
        assert row["p_malignant"].item() == pytest.approx(expected, abs=1e-6)

    with get_client(sync_client=True) as client:
        # A plain filter request: this Prefect server answers 422 to the nulls that
        # Artifact.get() and read_artifacts() send for the filters they leave out.
        artifacts = client.request("POST", "/artifacts/filter", json={
            "artifacts": {"key": {"any_": ["champion-test-scores"]}}, "limit": 1, "offset": 0,
            "sort": "UPDATED_DESC"}).json()
    markdown = artifacts[0]["data"]
    assert "Discovered 8 = scored 5 + rejected 3" in markdown and "Out of domain: **4** studies" in markdown
    ct_key = ct["file_sha256"].item()
    assert f"| {ct_key} | {ct['domain_score'].item():.4g} | Modality CT not seen in training (US);" in markdown
    assert breast_key not in markdown


def test_refuse_policy_makes_out_of_domain_studies_rejects_with_the_reasons(champion_registry, studies):
    _, _, onnx_path = champion_registry
    model = open_served_model("serve-test", "1", "fp32", onnx_path)
    result = score_files(study_files(studies), model, DomainPolicy.REFUSE)
    assert result.summary() == {"discovered": 8, "scored": 1, "rejected": 7, "out_of_domain": 4}
    refused = result.rejects[result.rejects["kind"] == "out of domain"]
    assert sorted(refused["file_sha256"]) == sorted(result.out_of_domain["file_sha256"])
    assert sorted(result.rejects["kind"]) == ["no pixel data", "not an image"] + ["out of domain"] * 4 + ["truncated"]
    assert "Modality MR not seen in training (US)" in " ".join(refused["reason"])
    assert result.scores["in_domain"].tolist() == [True]
