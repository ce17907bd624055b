"""A PACS that is down, slow, killed mid-download or locked down: real Orthanc processes and sockets."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file
from pynetdicom import AE, build_context
from pynetdicom.sop_class import CTImageStorage

from configs import PacsConfig, load_config
from stack.settings import free_port
from tasks.pacs.client import connect
from tasks.pacs.retry import PacsRefused, PacsUnavailable
from tasks.pacs.source import prepare_pacs_dataset
from tests.conftest import REPO
from tests.pacs_fixtures import (PACS_AE, PIPELINE_AE, TlsRelay, pacs_section, self_signed_certificate, start_orthanc,
                                 write_pacs_config)

SALT = "pacs-test-salt"


def test_a_run_killed_mid_download_resumes_with_only_what_is_missing(tmp_path, pacs_sample):
    config_path = write_pacs_config(tmp_path, pacs_sample)
    # A real SIGKILL of a retrieval process after its 40th instance, other downloads in flight.
    script = f"""
import os, signal
from configs import load_config
from tasks.pacs.source import prepare_pacs_dataset
done = []
def on_retrieved(ref, path):
    done.append(path)
    if len(done) == 40:
        os.kill(os.getpid(), signal.SIGKILL)
prepare_pacs_dataset(load_config({str(config_path)!r}), {SALT!r}, on_retrieved=on_retrieved)
"""
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)},
                            capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    config = load_config(config_path)
    kept = list(config.pacs.store_dir.glob("objects/*/*.dcm"))
    assert len(kept) >= 40 and all(hashlib.sha256(p.read_bytes()).hexdigest() == p.stem for p in kept)
    assert not config.data.manifest.exists()  # the local copy is written only when the retrieval ends

    resumed = prepare_pacs_dataset(config, SALT)
    counts = resumed.retrieval.summary()
    assert counts["found"] == 120 and counts["failed"] == 0 and counts["already_held"] >= 40
    assert counts["already_held"] + counts["retrieved"] == 120 and counts["retrieved"] <= 80
    objects = list(config.pacs.store_dir.glob("objects/*/*.dcm"))
    assert len(objects) == 120 and not list(config.pacs.store_dir.glob("objects/*/.*.tmp"))
    assert len(pd.read_csv(config.data.manifest)) == 120


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_a_pacs_that_is_down_then_back(tmp_path, own_pacs, protocol):
    sample, orthanc = own_pacs, own_pacs.orthanc
    orthanc.stop()
    server = orthanc.dicomweb_url if protocol == "dicomweb" else f"{PACS_AE}@127.0.0.1:{orthanc.dicom_port}"

    # Down: retries with backoff, then an error that names the server and no study.
    config = load_config(write_pacs_config(tmp_path / "down", sample, protocol))
    started = time.monotonic()
    with pytest.raises(PacsUnavailable) as down:
        prepare_pacs_dataset(config, SALT)
    assert time.monotonic() - started < 30
    message = str(down.value)
    assert message.startswith(f"PACS {server} did not answer") and "after 3 attempts" in message
    assert "BMN" not in message and "1.2." not in message

    # Back while the run is still retrying: it carries on and retrieves everything.
    config = load_config(write_pacs_config(tmp_path / "back", sample, protocol,
                                           pacs={"retry": {"attempts": 8, "backoff_seconds": 0.5,
                                                           "max_backoff_seconds": 2}}))
    restart = threading.Timer(1.0, orthanc.start)
    restart.start()
    try:
        selection = prepare_pacs_dataset(config, SALT)
    finally:
        restart.join()
    assert selection.retrieval.summary() == {"found": 120, "already_held": 0, "retrieved": 120, "failed": 0}


def test_a_pacs_that_accepts_connections_and_never_answers_times_out(tmp_path, pacs_sample):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web"
    try:
        section = pacs_section(pacs_sample, tmp_path, dicomweb={"url": url}, timeout_seconds=0.5,
                               retry={"attempts": 2, "backoff_seconds": 0.1})
        pacs = connect(PacsConfig.model_validate(section))
        started = time.monotonic()
        with pytest.raises(PacsUnavailable, match=rf"PACS {url} did not answer a QIDO-RS instance search after "
                                                  r"2 attempts .*: ReadTimeout"):
            pacs.find({"AccessionNumber": "BMNA00000"}, PacsConfig.model_validate(section).query)
        assert time.monotonic() - started < 5
    finally:
        silent.close()


def test_dicomweb_over_tls_with_basic_credentials_from_the_environment(tmp_path, pacs_sample, monkeypatch):
    # A machine-wide CA bundle in the environment must not replace the one the config names.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", requests.certs.where())
    cert, key = self_signed_certificate(tmp_path)
    orthanc = start_orthanc(tmp_path / "orthanc", free_port(), users={"medxfer": "s3cret-pass"})
    relay = TlsRelay(orthanc.http_port, cert, key)
    try:
        orthanc.upload(Path(get_testdata_file("US1_UNCR.dcm")).read_bytes())
        url = f"https://127.0.0.1:{relay.port}/dicom-web"

        def find(**dicomweb):
            config = PacsConfig.model_validate(pacs_section(pacs_sample, tmp_path, dicomweb={"url": url, **dicomweb}))
            return connect(config).find({}, config.query)

        with pytest.raises(PacsRefused, match="its TLS certificate is not trusted"):  # verification is on by default
            find()
        with pytest.raises(PacsRefused, match=r"set \$MEDXFER_PACS_USERNAME and \$MEDXFER_PACS_PASSWORD"):
            find(ca_bundle=str(cert), auth="basic")
        monkeypatch.setenv("MEDXFER_PACS_USERNAME", "medxfer")
        monkeypatch.setenv("MEDXFER_PACS_PASSWORD", "wrong")
        started = time.monotonic()
        with pytest.raises(PacsRefused, match=r"refused a QIDO-RS instance search with HTTP 401 Unauthorized"):
            find(ca_bundle=str(cert), auth="basic")
        assert time.monotonic() - started < 2  # a refusal is not retried
        monkeypatch.setenv("MEDXFER_PACS_PASSWORD", "s3cret-pass")
        (found,) = find(ca_bundle=str(cert), auth="basic")
        assert found.is_image and found.sop_class == "1.2.840.10008.5.1.4.1.1.6.1"
    finally:
        relay.close()
        orthanc.stop()


BEARER_FILTER = '''
import orthanc
def only_bearer(uri, **request):
    return request["headers"].get("authorization") == "Bearer token-4d1f"
orthanc.RegisterIncomingHttpRequestFilter(only_bearer)
'''


def test_dicomweb_bearer_token_from_the_environment(tmp_path, pacs_sample, monkeypatch):
    script = tmp_path / "bearer.py"
    script.write_text(BEARER_FILTER)
    orthanc = start_orthanc(tmp_path / "orthanc", free_port(), python_script=script,
                            http_headers={"Authorization": "Bearer token-4d1f"})
    try:
        section = pacs_section(pacs_sample, tmp_path, dicomweb={"url": orthanc.dicomweb_url, "auth": "bearer"})
        config = PacsConfig.model_validate(section)
        monkeypatch.setenv("MEDXFER_PACS_TOKEN", "wrong")
        with pytest.raises(PacsRefused, match="HTTP 403"):
            connect(config).find({}, config.query)
        monkeypatch.setenv("MEDXFER_PACS_TOKEN", "token-4d1f")
        assert connect(config).find({}, config.query) == []  # allowed in: an empty archive
    finally:
        orthanc.stop()


def test_the_storage_scp_accepts_only_the_configured_ae_titles(tmp_path, pacs_sample):
    section = pacs_section(pacs_sample, tmp_path, "dimse", dimse={"retrieve": "c-move"})
    config = PacsConfig.model_validate(section)
    pacs = connect(config)
    try:
        (ref,) = pacs.find({"AccessionNumber": "BMNA00000"}, config.query)
        assert pydicom.dcmread(io.BytesIO(pacs.fetch(ref))).SOPInstanceUID == ref.sop_uid  # the PACS gets in
        port = section["dimse"]["storage_port"]
        intruder = AE(ae_title="INTRUDER").associate("127.0.0.1", port, [build_context(CTImageStorage)],
                                                     ae_title=PIPELINE_AE)
        assert intruder.is_rejected
        # The PACS's own AE title gets in, but nothing it sends unasked is kept.
        pacs_ae = AE(ae_title=PACS_AE).associate("127.0.0.1", port, [build_context(CTImageStorage)],
                                                ae_title=PIPELINE_AE)
        assert pacs_ae.is_established
        status = pacs_ae.send_c_store(pydicom.dcmread(get_testdata_file("CT_small.dcm")))
        pacs_ae.release()
        assert status.Status == 0x0124
    finally:
        pacs.close()
