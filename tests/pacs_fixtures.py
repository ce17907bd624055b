"""A real Orthanc (Debian's package, a plain process on free loopback ports) holding the test images
that the PACS tests retrieve, and configs that point medxfer at it."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from sample_data.orthanc import LocalOrthanc
from stack.settings import free_port
from sample_data.pacs_sample import LABEL_COLUMN, label_export
from tasks.dicom_results import dicom_bytes
from tests.conftest import write_config

PIPELINE_AE, PACS_AE = "MEDXFER", "ORTHANC"
NO_IMAGE_ACCESSION, MISSING_ACCESSION = "NOIMG0001", "MISSING0001"
# Real pydicom-data files besides the sample: other modalities (not selected by `modality: US`),
# an ultrasound study with no row in the label export, and an RT plan (no image) whose study the
# export lists.
OTHER_FILES = ("CT_small.dcm", "MR_small.dcm", "US1_UNCR.dcm")


@dataclass
class PacsSample:
    orthanc: LocalOrthanc
    folder: Path  # the sample's DICOM files and manifest.csv: the folder source of the same images
    labels: Path  # the label export: one row per sample study, then the no-image and the missing study
    scp_port: int  # medxfer's storage SCP, registered at the PACS for C-MOVE
    no_image_row: int
    missing_row: int


def start_orthanc(home: Path, scp_port: int, **kwargs) -> LocalOrthanc:
    """An Orthanc that knows medxfer's AE (C-FIND, C-GET, C-MOVE to its storage SCP)."""
    return LocalOrthanc(home, aet=PACS_AE, modalities={"medxfer": (PIPELINE_AE, "127.0.0.1", scp_port)},
                        **kwargs).start()


def load_test_images(orthanc: LocalOrthanc, folder: Path) -> None:
    orthanc.upload_folder(folder)
    for name in OTHER_FILES:
        orthanc.upload(Path(get_testdata_file(name)).read_bytes())
    plan = pydicom.dcmread(get_testdata_file("rtplan.dcm"))
    plan.AccessionNumber = NO_IMAGE_ACCESSION
    orthanc.upload(dicom_bytes(plan))


@pytest.fixture(scope="session")
def pacs_sample(tmp_path_factory, breast_dicom_dir) -> PacsSample:
    home = tmp_path_factory.mktemp("orthanc")
    scp_port = free_port()
    orthanc = start_orthanc(home / "pacs", scp_port)
    try:
        load_test_images(orthanc, breast_dicom_dir)
        labels = label_export(breast_dicom_dir, home / "ris_export.csv", extra_rows=[
            {"AccessionNumber": NO_IMAGE_ACCESSION, LABEL_COLUMN: "benign", "split": "train"},
            {"AccessionNumber": MISSING_ACCESSION, LABEL_COLUMN: "malignant", "split": "train"}])
        rows = len(labels.read_text().splitlines())
        yield PacsSample(orthanc, breast_dicom_dir, labels, scp_port, no_image_row=rows - 1, missing_row=rows)
    finally:
        orthanc.stop()


@pytest.fixture
def own_pacs(tmp_path, pacs_sample) -> PacsSample:
    """The sample in an Orthanc of its own, which a test may stop, restart or write to."""
    scp_port = free_port()
    orthanc = start_orthanc(tmp_path / "orthanc", scp_port)
    load_test_images(orthanc, pacs_sample.folder)
    yield replace(pacs_sample, orthanc=orthanc, scp_port=scp_port)
    orthanc.stop()


def pacs_section(sample: PacsSample, tmp_path: Path, protocol: str = "dicomweb", **overrides) -> dict:
    """The `pacs` config section for `sample`'s Orthanc: store under tmp_path, quick retries."""
    orthanc = sample.orthanc
    section = {
        "protocol": protocol,
        "dicomweb": {"url": orthanc.dicomweb_url},
        "dimse": {"host": "127.0.0.1", "port": orthanc.dicom_port, "called_ae": PACS_AE,
                  "calling_ae": PIPELINE_AE, "storage_port": sample.scp_port},
        "labels": {"path": str(sample.labels)},
        "query": {"modality": "US"},
        "store_dir": str(tmp_path / "pacs-store"),
        "retry": {"attempts": 3, "backoff_seconds": 0.05, "max_backoff_seconds": 0.2},
        "timeout_seconds": 10,
    }
    for key, value in overrides.items():
        section[key] = section[key] | value if isinstance(value, dict) and key in section else value
    return section


def write_pacs_config(tmp_path: Path, sample: PacsSample, protocol: str = "dicomweb", **overrides) -> Path:
    """A breast_ultrasound config that trains from `sample`'s PACS: the local copy under tmp_path."""
    pacs = pacs_section(sample, tmp_path, protocol, **overrides.pop("pacs", {}))
    tmp_path.mkdir(parents=True, exist_ok=True)
    return write_config(tmp_path, tmp_path / "pacs-images", data={"source": "pacs", "columns": {"label": LABEL_COLUMN}},
                        pacs=pacs, **overrides)



def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (openssl), as a site's own CA would issue."""
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


class TlsRelay:
    """HTTPS in front of a local HTTP port: a real TLS endpoint (Python's ssl) relaying bytes to
    Orthanc, standing in for the hospital's reverse proxy. Orthanc's own HTTPS cannot be used here:
    Debian's 1.10.1 crashes on the first TLS request (civetweb against OpenSSL 3)."""

    def __init__(self, target_port: int, cert: Path, key: Path):
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(cert, key)
        self._target = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            secure = self._context.wrap_socket(client, server_side=True)
        except (ssl.SSLError, OSError):  # a client that does not trust the certificate hangs up
            client.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self._target))

        def pump(source: socket.socket, sink: socket.socket) -> None:
            try:
                while data := source.recv(65536):
                    sink.sendall(data)
            except OSError:
                pass
            finally:
                for end in (source, sink):
                    try:
                        end.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        threading.Thread(target=pump, args=(upstream, secure), daemon=True).start()
        pump(secure, upstream)

    def close(self) -> None:
        self._listener.close()
