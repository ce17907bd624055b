"""A model's answer as DICOM for the patient record: a Comprehensive SR written with highdicom.

In the spirit of IHE AI Results (AIR): a TID 1500 Measurement Report whose observer is the
algorithm as a device, with one measurement group (TID 1501) that references the scored
image and holds the algorithm's identification (TID 4019: the registry model and version),
the probability of the positive class or the estimated age, the operating threshold and
the decision, the input-domain check's verdict (the in-domain flag, novelty score and threshold,
and each reason), and a "not for diagnostic use" statement. The SR joins the source's study (patient and study
identifiers copied from it, as the record needs) in a series of its own per model version.
Its UIDs are derived from the scored instance and the model version, so scoring the same
image with the same model again gives the same SR, which a PACS stores once.
"""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

from configs import TaskKind
from tasks.champion import Prediction
from tasks.domain import NOT_CHECKED, DomainVerdict

LOCAL_SCHEME = "99MEDXFER"  # a local coding scheme: DICOM reserves designators starting "99" for these
MANUFACTURER = "medxfer"
NOT_FOR_DIAGNOSTIC_USE = ("NOT FOR DIAGNOSTIC USE. Output of a machine-learning model trained by medxfer "
                          "at this site; not reviewed by a clinician and not a medical device.")
SERIES_DESCRIPTION = "medxfer AI result - not for diagnostic use"
SR_SERIES_NUMBER = 9901  # high, out of the way of the modality's own series
UID_NAMESPACE = uuid.UUID("5b0f3c52-2a44-4b7e-9a63-6d0c5e1f7a21")  # medxfer's results, for uuid5

IMAGING = hd.sr.CodedConcept("363679005", "SCT", "Imaging")
PROBABILITY = "PROBABILITY"
THRESHOLD = hd.sr.CodedConcept("THRESHOLD", LOCAL_SCHEME, "Operating threshold")
DECISION = hd.sr.CodedConcept("DECISION", LOCAL_SCHEME, "Class at the operating threshold")
ESTIMATED_AGE = hd.sr.CodedConcept("ESTIMATED-AGE", LOCAL_SCHEME, "Estimated age")
IN_DOMAIN = hd.sr.CodedConcept("IN-DOMAIN", LOCAL_SCHEME, "Input within the training domain")
DOMAIN_SCORE = hd.sr.CodedConcept("DOMAIN-SCORE", LOCAL_SCHEME, "Input novelty score")
DOMAIN_THRESHOLD = hd.sr.CodedConcept("DOMAIN-THRESHOLD", LOCAL_SCHEME, "Input novelty threshold")
DOMAIN_REASON = hd.sr.CodedConcept("DOMAIN-REASON", LOCAL_SCHEME, "Input domain reason")
NO_UNITS, YEARS = codes.UCUM.NoUnits, codes.UCUM.Year


@dataclass(frozen=True)
class ModelIdentity:
    name: str  # the registered model name
    version: str  # its registry version
    variant: str = "fp32"


@dataclass(frozen=True)
class AiResult:
    """One prediction, as the service and scoring give it: the body's values and the domain verdict."""

    task: TaskKind
    label: str | None = None
    label_names: tuple[str, ...] = ()
    positive_label: str | None = None
    positive_probability: float | None = None
    threshold: float | None = None
    age_years: float | None = None
    domain: DomainVerdict = NOT_CHECKED

    @classmethod
    def of(cls, prediction: Prediction) -> AiResult:
        body = prediction.body
        return cls(task=TaskKind(body["task"]), label=body.get("label"),
                   label_names=tuple(body.get("probabilities", {})), positive_label=body.get("positive_label"),
                   positive_probability=body.get("positive_probability"), threshold=body.get("threshold"),
                   age_years=body.get("age_years"), domain=prediction.domain)


def _uid(*parts: str) -> str:
    """A UID that is the same for the same parts: 2.25 and a name-based UUID (PS3.5 B.2). pydicom's
    generate_uid(prefix=None) would ignore its entropy sources and give a random one."""
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, chr(0).join(parts)).int}"


# Patient and study attributes an SR must carry (Type 2: present, may be empty); highdicom reads them
# off the evidence, and not every modality writes them all.
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "AccessionNumber")


def _as_evidence(source: pydicom.Dataset) -> pydicom.Dataset:
    evidence = pydicom.Dataset(source)  # a shallow copy: the caller's header is left as it was
    for keyword in TYPE2_COPIED:
        if keyword not in evidence:
            setattr(evidence, keyword, None)
    return evidence


def _class_code(result: AiResult, label: str) -> hd.sr.CodedConcept:
    index = result.label_names.index(label) if label in result.label_names else 0
    return hd.sr.CodedConcept(f"CLASS-{index}", LOCAL_SCHEME, label[:64])


def _measurements(result: AiResult, algorithm: hd.sr.AlgorithmIdentification) -> list[hd.sr.Measurement]:
    if result.task is TaskKind.REGRESSION:
        values = [(ESTIMATED_AGE, result.age_years, YEARS)]
    else:
        probability = hd.sr.CodedConcept(PROBABILITY, LOCAL_SCHEME, f"Probability of {result.positive_label}"[:64])
        values = [(probability, result.positive_probability, NO_UNITS), (THRESHOLD, result.threshold, NO_UNITS)]
    values += [(DOMAIN_SCORE, result.domain.score, NO_UNITS), (DOMAIN_THRESHOLD, result.domain.threshold, NO_UNITS)]
    return [hd.sr.Measurement(name=name, value=float(value), unit=unit, algorithm_id=algorithm)
            for name, value, unit in values if value is not None]


def _evaluations(result: AiResult) -> list[hd.sr.QualitativeEvaluation]:
    evaluations = []
    if result.task is TaskKind.CLASSIFICATION and result.label is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(DECISION, _class_code(result, result.label)))
    if result.domain.in_domain is not None:  # None: the model version carries no check (its reason says so)
        evaluations.append(hd.sr.QualitativeEvaluation(IN_DOMAIN, codes.SCT.Yes if result.domain.in_domain
                                                       else codes.SCT.No))
    return evaluations


def _image_library(source: pydicom.Dataset) -> list[pydicom.Dataset]:
    """The scored image as a TID 1600 image library entry, or no library: it is optional, and
    highdicom's descriptors for projection radiographs and cross-sectional images need spacing and
    geometry attributes that not every image has (a CR without ImagerPixelSpacing, say). The
    measurement group and the evidence sequence reference the image either way."""
    try:
        hd.sr.ImageLibraryEntryDescriptors(source)
    except AttributeError:
        return []
    return [source]


def result_sr(source: pydicom.Dataset, result: AiResult, model: ModelIdentity) -> hd.sr.ComprehensiveSR:
    """The SR for `result` on `source` (the scored image's header; pixel data not needed)."""
    source = _as_evidence(source)
    algorithm = hd.sr.AlgorithmIdentification(name=model.name, version=model.version, manufacturer=MANUFACTURER,
                                              parameters=[f"variant {model.variant}"])
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=_uid(model.name, model.version, "device"), name=f"{MANUFACTURER} {model.name}"[:64],
        manufacturer_name=MANUFACTURER, model_name=model.name[:64], serial_number=model.version)
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    source_uid = str(source.SOPInstanceUID)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=_uid(source_uid, model.name, model.version, "tracking"),
                                                     identifier=f"{model.name} v{model.version}"[:64]),
        algorithm_id=algorithm, measurements=_measurements(result, algorithm),
        qualitative_evaluations=_evaluations(result),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)])
    texts = [(DOMAIN_REASON, reason) for reason in result.domain.messages()] + [(codes.DCM.Comment,
                                                                                 NOT_FOR_DIAGNOSTIC_USE)]
    group[0].ContentSequence.extend(hd.sr.TextContentItem(name=name, value=text[:1024],
                                                          relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
                                    for name, text in texts)
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=IMAGING,
                                     imaging_measurements=[group], referenced_images=_image_library(source))
    sr = hd.sr.ComprehensiveSR(
        evidence=[source], content=report[0],
        series_instance_uid=_uid(str(source.StudyInstanceUID), model.name, model.version, "series"),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=_uid(source_uid, model.name, model.version, "sr"),
        instance_number=int(source.get("InstanceNumber") or 1), manufacturer=MANUFACTURER, is_complete=True)
    sr.SeriesDescription = SERIES_DESCRIPTION
    sr.ManufacturerModelName = model.name[:64]
    sr.SoftwareVersions = f"{model.name} v{model.version}"[:64]
    return sr


class NotReferenceable(ValueError):
    """A request whose header an SR cannot reference: it lacks the UIDs (SOP class and instance,
    study, series), or highdicom refuses it as a source (an RT dose, a segmentation)."""


REFERENCED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def result_sr_for(header: pydicom.Dataset | None, prediction: Prediction, model: ModelIdentity) -> bytes:
    """The SR file for `prediction` on a request's DICOM `header` (the service's
    `Accept: application/dicom` answer)."""
    missing = [keyword for keyword in REFERENCED if header is None or not header.get(keyword)]
    if missing:
        raise NotReferenceable(f"the DICOM header has no {', '.join(missing)} for a result to reference")
    try:
        sr = result_sr(header, AiResult.of(prediction), model)
    except ValueError as exc:  # highdicom's own checks: e.g. an RT dose or a segmentation as the source
        raise NotReferenceable(str(exc)) from None
    return dicom_bytes(sr)


def dicom_bytes(ds: pydicom.Dataset) -> bytes:
    """A data set as a DICOM file, with the 128-byte preamble (pydicom 3 leaves it out for a data
    set made in memory, and such a file reads back only with force=True)."""
    ds.preamble = b"\0" * 128
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def read_result(sr: pydicom.Dataset) -> dict:
    """What a receiving system reads back from one of these SRs (highdicom's parser): the model,
    the scored image, and the measurement and evaluation values by concept meaning."""
    parsed = hd.sr.ComprehensiveSR.from_dataset(sr)
    (group,) = parsed.content.get_image_measurement_groups()
    (source,) = group.source_images
    algorithm = {item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue for item in group[0].ContentSequence
                 if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodingSchemeDesignator == "DCM"
                 and item.ConceptNameCodeSequence[0].CodeValue in ("111001", "111003")}
    texts = [(item.ConceptNameCodeSequence[0].CodeMeaning, item.TextValue) for item in group[0].ContentSequence
             if item.ValueType == "TEXT"]
    return {
        "algorithm": (algorithm.get("Algorithm Name"), algorithm.get("Algorithm Version")),
        "source": (source.referenced_sop_class_uid, source.referenced_sop_instance_uid),
        "measurements": {m.name.meaning: m.value for m in group.get_measurements()},
        "evaluations": {e.name.meaning: e.value.meaning for e in group.get_qualitative_evaluations()},
        "texts": texts,
    }
