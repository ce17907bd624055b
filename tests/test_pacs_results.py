"""DICOM results back into the record: SRs over STOW-RS and C-STORE into a real Orthanc, read back and
parsed with highdicom; the inference service's `Accept: application/dicom` answer."""

from __future__ import annotations

import copy
import io
from dataclasses import replace

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.errors import InvalidDicomError

from configs import PacsConfig, PacsProtocol, ServeConfig
from serve.app import Settings, create_app
from tasks.champion import Prediction
from tasks.dicom_results import (NOT_FOR_DIAGNOSTIC_USE, SERIES_DESCRIPTION, AiResult, ModelIdentity, read_result,
                                 result_sr)
from tasks.domain import NOT_CHECKED, DomainReason, DomainVerdict, Fact, ReasonKind
from tasks.pacs.client import connect
from tests.live_server import LiveServer
from stack.settings import free_port
from tests.pacs_fixtures import pacs_section, start_orthanc

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
PREDICTION = {"task": "classification", "label": "malignant", "probabilities": {"benign": 0.27, "malignant": 0.73},
              "positive_label": "malignant", "positive_probability": 0.73, "threshold": 0.41}
OUTSIDE = DomainVerdict(False, 8.3, 3.1, (DomainReason(ReasonKind.UNSEEN_VALUE, Fact.MODALITY, "CR", ("US",)),
                                           DomainReason(ReasonKind.NOVELTY_ABOVE_THRESHOLD, value=8.3, expected=(3.1,))))
MODEL = ModelIdentity("breast-ultrasound-resnet18", "7")


def _result(verdict: DomainVerdict) -> AiResult:
    """What the service or scoring answers: the body (which carries the verdict too) and the verdict."""
    return AiResult.of(Prediction(PREDICTION | verdict.as_json(), verdict))


def _source(pacs, config):
    (ref,) = pacs.find({"AccessionNumber": "BMNA00004"}, config.query)
    return pydicom.dcmread(io.BytesIO(pacs.fetch(ref)))


def _results_on(config, sop_uids: set[str]) -> list[bytes]:
    """The SRs with these SOPInstanceUIDs on the PACS, as raw WADO-RS bytes."""
    pacs = connect(config, PacsProtocol.DICOMWEB)
    try:
        found = pacs.find({}, config.query.model_copy(update={"modality": "SR"}))
        return [pacs.fetch(ref) for ref in found if ref.sop_uid in sop_uids]
    finally:
        pacs.close()


@pytest.fixture(scope="module")
def results_pacs(tmp_path_factory, pacs_sample):
    """An Orthanc of this module's own, that its tests write results into."""
    orthanc = start_orthanc(tmp_path_factory.mktemp("results-pacs"), free_port())
    orthanc.upload_folder(pacs_sample.folder)
    yield replace(pacs_sample, orthanc=orthanc)
    orthanc.stop()


@pytest.mark.parametrize("transport", ["stow-rs", "c-store"])
def test_an_sr_goes_into_the_record_and_reads_back_with_highdicom(tmp_path, results_pacs, transport):
    config = PacsConfig.model_validate(pacs_section(results_pacs, tmp_path, scoring={"send_results": transport}))
    web = connect(config, PacsProtocol.DICOMWEB)
    source = _source(web, config)
    sender = connect(config, PacsProtocol.DICOMWEB if transport == "stow-rs" else PacsProtocol.DIMSE)
    model = replace(MODEL, version=transport)  # each transport its own SR
    sr = result_sr(source, _result(OUTSIDE), model)
    sender.send([sr])
    sender.send([result_sr(source, _result(OUTSIDE), model)])  # again: the same SR
    sender.close()
    web.close()

    # Stored once (its UIDs come from the image and the model version), in one series per model version.
    (stored,) = _results_on(config, {sr.SOPInstanceUID})
    assert stored[128:132] == b"DICM"  # the preamble, so it reads back without force
    back = pydicom.dcmread(io.BytesIO(stored))
    assert back.SOPClassUID == COMPREHENSIVE_SR and back.SOPInstanceUID == sr.SOPInstanceUID
    # In the patient's record: the source's patient and study, a series of its own.
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyInstanceUID"):
        assert back[keyword].value == source[keyword].value
    assert back.SeriesInstanceUID != source.SeriesInstanceUID and back.SeriesDescription == SERIES_DESCRIPTION
    assert back.VerificationFlag == "UNVERIFIED" and back.CompletionFlag == "COMPLETE"
    evidence = back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID

    result = read_result(back)
    assert result["algorithm"] == ("breast-ultrasound-resnet18", transport)
    assert result["source"] == (source.SOPClassUID, source.SOPInstanceUID)
    assert result["measurements"] == {"Probability of malignant": pytest.approx(0.73),
                                      "Operating threshold": pytest.approx(0.41),
                                      "Input novelty score": pytest.approx(8.3),
                                      "Input novelty threshold": pytest.approx(3.1)}
    assert result["evaluations"] == {"Class at the operating threshold": "malignant",
                                     "Input within the training domain": "No"}
    assert ("Comment", NOT_FOR_DIAGNOSTIC_USE) in result["texts"]
    assert _reasons(result) == ["Modality CR not seen in training (US)", "image novelty 8.3 above threshold 3.1"]


def _reasons(result: dict) -> list[str]:
    return [text for name, text in result["texts"] if name == "Input domain reason"]


def test_a_model_without_a_domain_check_gets_an_sr_without_the_flag_that_says_why(results_pacs, tmp_path):
    config = PacsConfig.model_validate(pacs_section(results_pacs, tmp_path))
    web = connect(config)
    result = read_result(result_sr(_source(web, config), _result(NOT_CHECKED), MODEL))
    web.close()
    assert set(result["evaluations"]) == {"Class at the operating threshold"}
    assert set(result["measurements"]) == {"Probability of malignant", "Operating threshold"}
    assert _reasons(result) == ["this model version carries no domain check"]


def test_the_preamble_trap_medxfer_stows_what_plain_dicomweb_client_stores_unreadable(tmp_path, results_pacs):
    """pydicom 3 writes a data set made in memory without the 128-byte preamble; Orthanc accepts
    it over STOW-RS, and the file it then serves does not read as DICOM."""
    config = PacsConfig.model_validate(pacs_section(results_pacs, tmp_path))
    web = connect(config)
    sr = result_sr(_source(web, config), _result(NOT_CHECKED), replace(MODEL, version="trap"))
    in_memory = []
    for suffix in ("1", "2"):  # two plain data sets, as code that builds one with pydicom has
        ds = pydicom.Dataset(copy.deepcopy(sr))  # a plain Dataset (no preamble) with elements of its own
        ds.file_meta = copy.deepcopy(sr.file_meta)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{sr.SOPInstanceUID}.{suffix}"
        in_memory.append(ds)
    assert getattr(in_memory[0], "preamble", None) is None
    DICOMwebClient(results_pacs.orthanc.dicomweb_url).store_instances([in_memory[0]])  # accepted...
    web.send([in_memory[1]])
    web.close()
    stored = {pydicom.dcmread(io.BytesIO(raw), force=True).SOPInstanceUID: raw
              for raw in _results_on(config, {ds.SOPInstanceUID for ds in in_memory})}
    with pytest.raises(InvalidDicomError):  # ...and unreadable without force
        pydicom.dcmread(io.BytesIO(stored[in_memory[0].SOPInstanceUID]))
    ours = pydicom.dcmread(io.BytesIO(stored[in_memory[1].SOPInstanceUID]))
    assert ours.SOPInstanceUID == in_memory[1].SOPInstanceUID


@pytest.fixture(scope="module")
def service_url(champion_registry):
    config, _, _ = champion_registry
    server = LiveServer(create_app(Settings(config.registry.tracking_uri, config.registry.model_name, ServeConfig(),
                                            api_key=None)))
    yield server.url
    server.stop()


def test_the_service_answers_accept_application_dicom_with_the_sr(service_url, pacs_sample):
    body = (sorted(pacs_sample.folder.rglob("*.dcm"))[0]).read_bytes()
    source = pydicom.dcmread(io.BytesIO(body))
    with httpx.Client(base_url=service_url, timeout=60) as client:
        as_json = client.post("/v1/predict", content=body, headers={"Content-Type": "application/dicom"}).json()
        answer = client.post("/v1/predict", content=body, headers={"Content-Type": "application/dicom",
                                                                   "Accept": "application/dicom"})
        png = client.post("/v1/predict", content=b"\x89PNG\r\n\x1a\n", headers={"Content-Type": "image/png",
                                                                                 "Accept": "application/dicom"})
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/dicom"
    sr = pydicom.dcmread(io.BytesIO(answer.content))
    result = read_result(sr)
    assert result["source"] == (source.SOPClassUID, source.SOPInstanceUID)
    assert result["algorithm"] == (as_json["model"]["name"], as_json["model"]["version"])
    assert result["measurements"]["Probability of malignant"] == pytest.approx(as_json["positive_probability"])
    assert result["evaluations"]["Class at the operating threshold"] == as_json["label"]
    assert sr.PatientID == source.PatientID and sr.StudyInstanceUID == source.StudyInstanceUID
    assert png.status_code == 406 and "answers a DICOM request only" in png.json()["detail"]
    # The domain check's verdict, as the JSON answer gives it: this is one of the champion's own images.
    assert as_json["in_domain"] is True and result["evaluations"]["Input within the training domain"] == "Yes"
    assert result["measurements"]["Input novelty score"] == pytest.approx(as_json["domain_score"])
    assert _reasons(result) == []


def test_the_service_sr_of_an_out_of_domain_image_says_so_with_the_reasons(service_url):
    """A real chest CR (pydicom-data) sent to the breast ultrasound champion: the SR carries the same
    verdict and reasons as the JSON answer."""
    body = open(get_testdata_file("RG1_UNCR.dcm"), "rb").read()
    with httpx.Client(base_url=service_url, timeout=60) as client:
        as_json = client.post("/v1/predict", content=body, headers={"Content-Type": "application/dicom"}).json()
        answer = client.post("/v1/predict", content=body, headers={"Content-Type": "application/dicom",
                                                                   "Accept": "application/dicom"})
    assert answer.status_code == 200 and as_json["in_domain"] is False
    result = read_result(pydicom.dcmread(io.BytesIO(answer.content)))
    assert result["evaluations"]["Input within the training domain"] == "No"
    assert result["measurements"]["Input novelty score"] == pytest.approx(as_json["domain_score"])
    assert _reasons(result) == [reason["message"] for reason in as_json["domain_reasons"]]
    assert _reasons(result)[0] == "Modality CR not seen in training (US)"


def test_the_service_answers_422_where_no_sr_can_reference_the_image(service_url):
    """An RT dose (pydicom-data) is scored as JSON, but DICOM does not let a measurement reference it."""
    body = open(get_testdata_file("rtdose.dcm"), "rb").read()
    with httpx.Client(base_url=service_url, timeout=60) as client:
        as_json = client.post("/v1/predict", content=body, headers={"Content-Type": "application/dicom"})
        answer = client.post("/v1/predict", content=body, headers={"Content-Type": "application/dicom",
                                                                   "Accept": "application/dicom"})
    assert as_json.status_code == 200 and as_json.json()["in_domain"] is False
    assert answer.status_code == 422 and answer.json()["detail"].startswith("cannot answer with a DICOM result: ")
    assert "RTDOSE" in answer.json()["detail"]
