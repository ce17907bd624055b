"""The PACS end to end, as `make pacs-demo` runs it and as a hospital would: a real Orthanc, real Prefect
flow runs (the test server), MLflow and ONNX Runtime; and Orthanc's own push through its Python plugin
to the Prefect API, run by a Prefect runner."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import time
from datetime import date
from pathlib import Path

import pandas as pd
import pydicom
import pytest
import yaml
from prefect.client.schemas.objects import FlowRun
from prefect.runner import Runner
from prefect.settings import PREFECT_API_URL

from configs import SALT_ENV_VAR, load_config
from flows.pacs_score import score_pacs
from sample_data.breastmnist import write_breastmnist_dicom
from stack.settings import free_port
from sample_data.pacs_demo import _as_new_study, read_back_results, run_demo
from tasks.dicom_results import SERIES_DESCRIPTION, dicom_bytes, read_result
from tasks.pacs.scoring import ScoringLedger
from tasks.pacs.store import instance_key
from tasks.rejects import RejectKind
from tests.conftest import REPO, phi_strings
from tests.pacs_fixtures import PacsSample, pacs_section, start_orthanc
from tests.test_pipeline import _all_prefect_logs, _artifacts, _prefect_read

SALT = "pacs-flow-salt-81f2"
NEW_STUDIES = 4
# A quick model: the flow's every stage runs, on 56 px crops (the backbone is fully convolutional).
QUICK = {"model": {"weights": "none"}, "train": {"epochs": 1, "batch_size": 16},
         "preprocess": {"resize": 64, "crop": 56, "workers": 1},
         "evaluate": {"bootstrap_samples": 100, "gradcam_images": 2}, "export": {"int8": False, "fp16": False},
         "domain": {"out_of_domain": [{"group": "other_modality", "pydicom": ["CT", "RTDOSE"]}]}}


def _identifiers(folder: Path) -> set[str]:
    """What a leak would look like: names, IDs, birth dates and accession numbers (as the pipeline's
    PHI scan has them) and every study, series and instance UID."""
    found = phi_strings(folder)
    for path in folder.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        found |= {str(ds[k].value) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
    return found


def _found_in(data: bytes, phi: set[str]) -> set[str]:
    """The strings of `phi` in `data`. Grouped by their first 6 bytes, searched once per group: a scan
    of every string over each 45 MB model file took minutes."""
    groups: dict[bytes, list[bytes]] = {}
    for text in phi:
        groups.setdefault(text.encode()[:6], []).append(text.encode())
    return {item.decode() for prefix, items in groups.items() if prefix in data for item in items if item in data}


def _flow_runs() -> list[FlowRun]:
    """Every flow run on the test server, scheduled ones too (a plain filter request: the client's own
    read_flow_runs sends nulls for the filters it leaves out)."""
    def read(client) -> list[FlowRun]:
        found = client.request("POST", "/flow_runs/filter", json={"limit": 200, "offset": 0, "sort": "ID_DESC"})
        return [FlowRun.model_validate(run) for run in found.json()]
    return _prefect_read(read)


def _flow_run_artifacts(state) -> list[dict]:
    """A flow run's artifacts, those made in the flow itself too (the client's read_artifacts, given a
    task-run filter, as it must be, finds only those of its tasks)."""
    run = str(state.state_details.flow_run_id)
    return _prefect_read(lambda client: client.request("POST", "/artifacts/filter", json={
        "artifacts": {"flow_run_id": {"any_": [run]}}, "limit": 200, "offset": 0}).json())


@pytest.fixture(scope="module")
def demo(prefect_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("pacs-demo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SALT_ENV_VAR, SALT)
        result = run_demo(out, per_split=20, new_studies=NEW_STUDIES, overrides=QUICK)
        result.orthanc.start()  # the demo stops it; its storage, SRs included, is kept
        try:
            again = score_pacs(str(result.config))  # a second scan: nothing is new
        finally:
            result.orthanc.stop()
    return out, result, again


def test_the_demo_trains_from_the_pacs_and_scores_new_studies_into_srs(demo):
    out, result, again = demo
    config = load_config(result.config)
    # Trained from the PACS: the label export's 56 studies (60 images less the 4 held back) retrieved.
    retrieval = json.loads((result.trained.run_dir / "pacs_retrieval.json").read_text())
    assert retrieval["found"] == retrieval["retrieved"] == 56 and retrieval["failed"] == 0
    assert result.trained.registration.is_champion and result.trained.registration.version == "1"
    assert len(pd.read_csv(result.trained.run_dir / "manifest.csv")) == 56

    # The new studies scored, one SR each back in its study; the second scan scores nothing.
    scores = pd.read_csv(result.scored.scores_csv).set_index("file_sha256")
    assert result.scored.counts == {"new": NEW_STUDIES, "seen_before": 0, "scored": NEW_STUDIES, "rejected": 0,
                                    "failed": 0, "out_of_domain": int((~scores["in_domain"]).sum()),
                                    "results_sent": NEW_STUDIES}
    assert result.scored.watermark == date.today().isoformat()
    assert again.counts | {"seen_before": 0} == {"new": 0, "seen_before": 0, "scored": 0, "rejected": 0,
                                                 "failed": 0, "out_of_domain": 0, "results_sent": 0}
    assert again.counts["seen_before"] == NEW_STUDIES

    # What the tests read back from Orthanc: the SRs reference the new images and say what scoring said.
    manifest = pd.read_csv(out / "sample" / "manifest.csv")
    new = {pydicom.dcmread(out / "sample" / rel).SOPInstanceUID: rel
           for rel in manifest[manifest["split"] == "test"].tail(NEW_STUDIES)["path"]}
    results = read_back_results(result.orthanc.start())
    try:
        assert len(results) == NEW_STUDIES
        for sr in results:
            said = read_result(sr)
            source_uid = said["source"][1]
            assert source_uid in new and sr.SeriesDescription == SERIES_DESCRIPTION
            assert said["algorithm"] == (config.registry.model_name, "1")
            stored = _as_new_study(out / "sample" / new[source_uid], date.today())  # the bytes the PACS holds
            source = pydicom.dcmread(io.BytesIO(stored))
            assert sr.PatientID == source.PatientID and sr.StudyInstanceUID == source.StudyInstanceUID
            row = scores.loc[hashlib.sha256(stored).hexdigest()]
            assert said["measurements"]["Probability of malignant"] == pytest.approx(row["p_malignant"], abs=1e-9)
            assert said["evaluations"]["Class at the operating threshold"] == row["label"]
            # The domain check's verdict on this image, as scoring recorded it (the model's own check).
            assert said["evaluations"]["Input within the training domain"] == ("Yes" if row["in_domain"] else "No")
            assert said["measurements"]["Input novelty score"] == pytest.approx(row["domain_score"], rel=1e-6)
            assert [t for name, t in said["texts"] if name == "Input domain reason"] == [
                reason["message"] for reason in json.loads(row["domain_reasons"])]
    finally:
        result.orthanc.stop()


def test_nothing_but_the_srs_carries_an_identifier(demo):
    """The PHI scan over a PACS training run and PACS scoring: every file medxfer wrote (the local copy's
    manifest, the store's index, run folders, caches, ledger, MLflow), every Prefect artifact, log line
    and flow-run parameter. Not scanned: the inputs, which are the patient's data (the images, the PACS's
    storage, the local copies of its instances, and the RIS's label export)."""
    out, result, _ = demo
    phi = _identifiers(out / "sample") | {SALT}
    assert len(phi) >= 7 * 60
    inputs = {out / "sample", out / "orthanc", out / "store" / "objects"}  # and the RIS's label export
    written = [p for p in out.rglob("*") if p.is_file() and not any(c in p.parents for c in inputs)
               and not (p.suffix == ".dcm" and out / "images" in p.parents) and p != out / "ris_export.csv"]
    names = {p.name for p in written}
    assert {"manifest.csv", "index.sqlite", "pacs_scoring.sqlite", "scores.csv", "mlflow.db", "model.onnx",
            "pacs_retrieval.json", "qc_report.md"} <= names
    leaks = {(str(path), text) for path in written for text in _found_in(path.read_bytes(), phi)}
    runs = [run for run in _flow_runs() if run.flow_id]
    texts = [json.dumps(a.data) + (a.description or "") for a in _artifacts()]
    texts += [log.message for log in _all_prefect_logs()] + [json.dumps(run.parameters) for run in runs]
    assert any("pacs-retrieval" in (a.key or "") for a in _artifacts())
    leaks |= {("prefect", s) for text in texts for s in phi if s in text}
    assert not leaks
    # The SRs do carry them: they are the patient's record.
    results = read_back_results(result.orthanc.start())
    result.orthanc.stop()
    assert all(str(sr.PatientID) in phi and str(sr.AccessionNumber) in phi for sr in results)


def test_orthanc_pushes_a_stable_study_to_prefect_and_a_runner_scores_it(prefect_server, champion_registry, tmp_path,
                                                                        monkeypatch):
    """Orthanc's Python plugin (tasks/pacs/orthanc_trigger.py) creates a run of the PACS scoring
    deployment when a study becomes stable; a Prefect runner executes it (standing in for the worker
    that runs prefect.yaml's deployment, tests/test_prefect_server.py); the SR lands in the study,
    and does not trigger another run."""
    registry, _, _ = champion_registry
    deployment_config = tmp_path / "pacs.yaml"
    orthanc_home = tmp_path / "orthanc"
    api_url = PREFECT_API_URL.value()
    raw = registry.model_dump(mode="json") | {"name": "push_test", "output_dir": str(tmp_path / "out")}
    orthanc = start_orthanc(orthanc_home, free_port(), python_script=REPO / "tasks" / "pacs" / "orthanc_trigger.py",
                            extra={"Medxfer": {"PrefectApiUrl": api_url, "Deployment": "score-pacs/push_test"}})
    try:
        raw["pacs"] = pacs_section(PacsSample(orthanc, tmp_path, tmp_path, free_port(), 0, 0), tmp_path, labels=None)
        deployment_config.write_text(yaml.safe_dump(raw))
        monkeypatch.setenv(SALT_ENV_VAR, SALT)
        monkeypatch.setenv("PREFECT_API_URL", api_url)
        monkeypatch.setenv("PYTHONPATH", str(REPO))
        monkeypatch.chdir(REPO)
        runner = Runner(name="pacs-push-test", query_seconds=1)
        # As prefect.yaml deploys it: named by the config, its path the only parameter.
        runner.add_deployment(score_pacs.to_deployment(name="push_test",
                                                       parameters={"config_path": str(deployment_config)}))

        folder = tmp_path / "new"
        write_breastmnist_dicom(folder, per_split=1)
        image = _as_new_study(folder / "test/img0002.dcm", date.today())
        orthanc.upload(image)
        deadline = time.monotonic() + 60
        while not (pushed := [r for r in _flow_runs() if "orthanc-stable-study" in r.tags]):
            assert time.monotonic() < deadline, (orthanc_home / "orthanc.log").read_text()[-3000:]
            time.sleep(0.5)
        (run,) = pushed
        assert run.parameters == {"config_path": str(deployment_config), "study_dates": [date.today().strftime("%Y%m%d")]}
        asyncio.run(runner.start(run_once=True))

        done = [r for r in _flow_runs() if r.id == run.id][0]
        assert done.state.is_completed(), done.state
        results = read_back_results(orthanc)
        source = pydicom.dcmread(io.BytesIO(image))
        assert [read_result(sr)["source"][1] for sr in results] == [source.SOPInstanceUID]
        time.sleep(4)  # Orthanc's StableAge (2 s) after the SR arrived: an SR is no image, so no new run
        assert [r.id for r in _flow_runs() if "orthanc-stable-study" in r.tags] == [run.id]
        scored = pd.read_csv(next((tmp_path / "out").rglob("scores.csv")))
        assert list(scored["file_sha256"]) == [hashlib.sha256(image).hexdigest()]
    finally:
        orthanc.stop()



def test_an_image_no_sr_can_reference_is_a_reject_and_the_run_goes_on(prefect_server, champion_registry, tmp_path,
                                                                     monkeypatch):
    """Three new studies of real sample images, one a damaged copy whose PatientSex is "U" (written by
    some modalities; DICOM allows M, F or O, and highdicom refuses to write an SR on it). The run
    completes; the other two get their SRs in Orthanc; the damaged one is a `no result` reject named by
    its salted key, in score_rejects.csv, the artifact and the ledger, so a second scan skips it."""
    registry, _, _ = champion_registry
    orthanc = start_orthanc(tmp_path / "orthanc", free_port())
    try:
        raw = registry.model_dump(mode="json") | {"name": "no_result_test", "output_dir": str(tmp_path / "out")}
        raw["pacs"] = pacs_section(PacsSample(orthanc, tmp_path, tmp_path, free_port(), 0, 0), tmp_path, labels=None)
        config_path = tmp_path / "pacs.yaml"
        config_path.write_text(yaml.safe_dump(raw))
        monkeypatch.setenv(SALT_ENV_VAR, SALT)
        write_breastmnist_dicom(tmp_path / "new", per_split=1)
        images = [_as_new_study(path, date.today()) for path in sorted((tmp_path / "new").rglob("*.dcm"))]
        damaged = pydicom.dcmread(io.BytesIO(images[0]))
        damaged.PatientSex = "U"
        images[0] = dicom_bytes(damaged)
        for image in images:
            orthanc.upload(image)
        state = score_pacs(str(config_path), return_state=True)
        again = score_pacs(str(config_path))
        results = read_back_results(orthanc)
    finally:
        orthanc.stop()

    assert state.is_completed(), state
    summary = state.result()
    sources = [pydicom.dcmread(io.BytesIO(image)) for image in images]
    assert len(images) == 3 and len({s.StudyInstanceUID for s in sources}) == 3
    assert summary.counts["new"] == 3 == summary.counts["scored"] + summary.counts["rejected"] + summary.counts["failed"]
    assert summary.counts | {"out_of_domain": 0} == {"new": 3, "seen_before": 0, "scored": 2, "rejected": 1,
                                                    "failed": 0, "out_of_domain": 0, "results_sent": 2}
    assert sorted(read_result(sr)["source"][1] for sr in results) == sorted(s.SOPInstanceUID for s in sources[1:])

    hashes = [hashlib.sha256(image).hexdigest() for image in images]
    assert sorted(pd.read_csv(summary.scores_csv)["file_sha256"]) == sorted(hashes[1:])
    (reject,) = pd.read_csv(summary.rejects_csv).to_dict("records")
    key = instance_key(sources[0].SOPInstanceUID, SALT)
    assert reject["path"] == hashes[0] and reject["kind"] == RejectKind.NO_RESULT.value
    assert reject["reason"].startswith(f"image pacs:{key}: no SR can reference its header: ValueError: ")
    assert not any(str(s[k].value) in reject["reason"] for s in sources
                   for k in ("SOPInstanceUID", "StudyInstanceUID", "PatientID"))
    (report,) = [a["data"] for a in _flow_run_artifacts(state) if a["key"] == "no-result-test-pacs-scores"]
    assert "rejected 1" in report and "| no result | 1 |" in report

    ledger = ScoringLedger(tmp_path / "out" / "no_result_test" / "pacs_scoring.sqlite", SALT)
    assert ledger.counts() == {"scored": 2, "rejected": 1}
    ledger.close()
    assert again.counts["new"] == 0 and again.counts["seen_before"] == 3
