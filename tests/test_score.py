"""Batch scoring as a real Prefect flow run, against the champion in a real MLflow store."""

from __future__ import annotations

import hashlib
import shutil

import pandas as pd
import pydicom
import pytest
import yaml
from prefect import get_client
from pydicom.data import get_testdata_file

from flows.score import score_studies
from tests.conftest import decoded_as_trained, evaluated_outputs

GOOD = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "US1_J2KR.dcm")
PATIENT_FOLDER = "DOE^JANE 1960-01-01"  # folder names often carry patient data


@pytest.fixture
def studies(tmp_path):
    """Real DICOM files under a patient-named folder, plus three broken ones."""
    folder = tmp_path / "incoming" / PATIENT_FOLDER
    folder.mkdir(parents=True)
    for name in GOOD:
        shutil.copy(get_testdata_file(name), folder / name)
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

    assert summary.counts == {"discovered": 7, "scored": 4, "rejected": 3}
    scores, rejects = pd.read_csv(summary.scores_csv), pd.read_csv(summary.rejects_csv)
    assert list(scores.columns) == ["file_sha256", "task", "label", "positive_label", "positive_probability",
                                    "threshold", "p_benign", "p_malignant", "model_name", "model_version"]
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
    assert "Discovered 7 = scored 4 + rejected 3" in artifacts[0]["data"]
