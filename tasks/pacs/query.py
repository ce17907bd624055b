"""What a PACS search asks for and what it finds, shared by the DICOMweb and DIMSE clients.

Matching keys follow the query/retrieve levels: study (accession number, Study Instance
UID, study date), series (modality, body part, series description), instance (SOP class).
An `InstanceRef` holds UIDs and an accession number: it lives in memory only, and
nothing written to disk, logs or Prefect is taken from it except through a salted hash.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from configs import PacsQuery


@dataclass(frozen=True)
class InstanceRef:
    """One instance on the PACS, as a search found it."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class: str = ""
    accession: str = ""
    study_date: str = ""  # DA: YYYYMMDD
    is_image: bool = True  # has Rows: an image, not a report, a presentation state or a document


def dicom_date(value: date) -> str:
    return value.strftime("%Y%m%d")


def date_range(start: date | None, end: date | None) -> str | None:
    """A DICOM date range ('20240101-20240630', '20240101-', '-20240630'), None for any date."""
    if start is None and end is None:
        return None
    return f"{dicom_date(start) if start else ''}-{dicom_date(end) if end else ''}"


def study_keys(query: PacsQuery, **keys: str) -> dict[str, str]:
    """Study-level matching keys: `keys` (AccessionNumber, StudyInstanceUID or StudyDate) and,
    unless a StudyDate is given, the query's study date range."""
    matching = dict(keys)
    if "StudyDate" not in matching and (dates := date_range(query.study_date_from, query.study_date_to)):
        matching["StudyDate"] = dates
    return matching


def series_keys(query: PacsQuery) -> dict[str, str]:
    """Series-level matching keys set by the query."""
    wanted = {"Modality": query.modality, "BodyPartExamined": query.body_part,
              "SeriesDescription": query.series_description}
    return {keyword: value for keyword, value in wanted.items() if value}


def describe(query: PacsQuery) -> str:
    """The query in words, for messages (no identifiers in it)."""
    parts = [f"{keyword} {value}" for keyword, value in series_keys(query).items()]
    if dates := date_range(query.study_date_from, query.study_date_to):
        parts.append(f"StudyDate {dates}")
    if query.sop_classes:
        parts.append(f"SOPClassUID {', '.join(query.sop_classes)}")
    return ", ".join(parts) or "any instance"
