"""The PACS a config names, over DICOMweb or DIMSE: one interface for search, retrieve and results."""

from __future__ import annotations

from typing import Protocol, Sequence

import pydicom

from configs import PacsConfig, PacsProtocol, PacsQuery
from tasks.pacs.dicomweb import DicomWebPacs
from tasks.pacs.dimse import DimsePacs
from tasks.pacs.query import InstanceRef
from tasks.pacs.retry import RetryPolicy


class Pacs(Protocol):
    name: str  # how messages name the server: its DICOMweb URL, or AE@host:port

    def find(self, study: dict[str, str], query: PacsQuery) -> list[InstanceRef]:
        """Instances of the studies matching the study-level keys that the query selects."""

    def study_exists(self, study: dict[str, str]) -> bool:
        """Whether any study matches the study-level keys."""

    def fetch(self, ref: InstanceRef) -> bytes:
        """One instance's DICOM file bytes; RetrieveFailed for this instance alone, PacsUnavailable
        once retries are spent, PacsRefused when the PACS refuses medxfer itself."""

    def send(self, datasets: Sequence[pydicom.Dataset]) -> dict[str, str]:
        """Store results (STOW-RS or C-STORE): the SOPInstanceUID of each one the PACS refused, with
        why (none: all stored). PacsUnavailable or PacsRefused when it takes none of them."""

    def close(self) -> None: ...


def connect(config: PacsConfig, protocol: PacsProtocol | None = None) -> Pacs:
    """A client for `protocol` (default: the config's own) with its timeouts and retries."""
    protocol = protocol or config.protocol
    retry = RetryPolicy.from_config(config.retry)
    if protocol is PacsProtocol.DICOMWEB:
        return DicomWebPacs(config.dicomweb, config.timeout_seconds, retry, config.max_parallel)
    return DimsePacs(config.dimse, config.timeout_seconds, retry, config.max_parallel)
