"""The PACS settings and the scoring watermark, without a server."""

from __future__ import annotations

from datetime import date

import pytest
import requests

from configs import CONFIG_DIR, ConfigError, DicomWebConfig, load_config
from serve.app import wants_dicom_result
from tasks.pacs.dicomweb import multipart_parts, session_for
from tasks.pacs.query import InstanceRef
from tasks.pacs.retry import RetryPolicy
from tasks.pacs.scoring import REJECTED, SCORED, ScoringLedger, scan_window
from tests.conftest import write_config


def test_the_shipped_pacs_config_validates():
    config = load_config(CONFIG_DIR / "breast_ultrasound_pacs.yaml", check_paths=False)
    assert config.data.source == "pacs" and config.pacs.labels.column == "AccessionNumber"
    assert config.pacs.dicomweb.verify_tls and config.pacs.scoring.send_results.value == "stow-rs"


@pytest.mark.parametrize("change, message", [
    ({"data": {"source": "pacs"}}, "pacs.labels: data.source pacs needs a pacs section with a label export"),
    ({"pacs": {"protocol": "dimse", "dicomweb": {"url": "http://pacs/dicom-web"}}}, "dimse: protocol dimse needs this section"),
    ({"pacs": {"dimse": {"host": "pacs", "port": 104, "called_ae": "PACS", "retrieve": "c-move"}, "protocol": "dimse",
               "scoring": {"send_results": "c-store"}}}, "storage_port: c-move needs the port of medxfer's storage SCP"),
    ({"pacs": {"dicomweb": {"url": "http://pacs/dicom-web"}, "scoring": {"send_results": "c-store"}}},
     "scoring.send_results: c-store needs the dimse section"),
])
def test_pacs_settings_that_cannot_work_are_named(tmp_path, breast_dicom_dir, change, message):
    with pytest.raises(ConfigError) as error:
        load_config(write_config(tmp_path, breast_dicom_dir, **change))
    assert message in str(error.value)


def test_a_pacs_source_needs_its_label_export_not_the_local_copy(tmp_path, breast_dicom_dir):
    path = write_config(tmp_path, tmp_path / "not-yet", data={"source": "pacs"},
                        pacs={"dicomweb": {"url": "http://pacs/dicom-web"}, "labels": {"path": str(tmp_path / "x.csv")}})
    with pytest.raises(ConfigError, match=r"pacs\.labels\.path: path does not exist"):
        load_config(path)
    (tmp_path / "x.csv").write_text("AccessionNumber,label\n")
    assert load_config(path).data.source == "pacs"  # data.root is made by the retrieval


def test_the_watermark_window_lookback_and_pushed_dates(tmp_path):
    ledger = ScoringLedger(tmp_path / "ledger.sqlite", "salt")
    today = date(2026, 3, 10)
    assert scan_window(ledger, None, 1, today).study_dates == ("20260309-",)
    assert scan_window(ledger, date(2026, 1, 1), 2, today).study_dates == ("20251230-",)
    # A mistyped future date cannot move the watermark past today; a later real one does.
    assert ledger.advance(["20990101", "20260305", ""], today) == date(2026, 3, 5)
    assert ledger.advance(["20260301"], today) == date(2026, 3, 5)  # never backwards
    assert scan_window(ledger, date(2026, 1, 1), 1, today).study_dates == ("20260304-",)
    # Pushed dates replace the scan; an empty one (it would match every study) is dropped.
    assert scan_window(ledger, None, 1, today, ["20260101", "", "20260101"]).study_dates == ("20260101",)
    assert scan_window(ledger, None, 1, today, [""]).study_dates == ("20260304-",)


def test_the_ledger_skips_what_was_scored_or_rejected(tmp_path):
    ledger = ScoringLedger(tmp_path / "ledger.sqlite", "salt")
    refs = [InstanceRef("1.2.3", "1.2.3.4", f"1.2.3.4.{i}") for i in range(5)]
    ledger.record(refs[:2], SCORED, "3")
    ledger.record(refs[2:3], REJECTED, "3")
    assert ledger.unseen(refs) == refs[3:]
    assert ledger.counts() == {SCORED: 2, REJECTED: 1}
    assert "1.2.3.4" not in (tmp_path / "ledger.sqlite").read_bytes().decode("latin-1")  # salted keys only


def test_backoff_doubles_up_to_its_cap():
    assert RetryPolicy(5, 1.0, 3.0).delays() == [1.0, 2.0, 3.0, 3.0]


@pytest.mark.parametrize("accept, dicom", [("application/dicom", True), ("application/json", False), ("", False),
                                           ("application/dicom, application/json", False),
                                           ('application/dicom; transfer-syntax="*"', True)])
def test_the_service_answers_an_sr_only_when_asked(accept, dicom):
    assert wants_dicom_result(accept) is dicom


def test_the_dicomweb_session_reads_the_environment_once_and_keeps_its_proxy(monkeypatch, tmp_path):
    """Proxies come from the environment when the session is made (NO_PROXY honoured), not per request;
    a ~/.netrc is not read: credentials come only from the variables the config names."""
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.site:3128")
    monkeypatch.setenv("NO_PROXY", "pacs.local")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".netrc").write_text("machine pacs.hospital login someone password secret\n")
    outside = session_for(DicomWebConfig(url="https://pacs.hospital/dicom-web"), 2)
    assert not outside.trust_env and outside.proxies["https"] == "http://proxy.site:3128"
    prepared = outside.prepare_request(requests.Request("GET", "https://pacs.hospital/dicom-web/studies"))
    assert "Authorization" not in prepared.headers
    assert session_for(DicomWebConfig(url="https://pacs.local/dicom-web"), 2).proxies == {}


def test_a_multipart_answer_splits_into_its_parts_without_their_headers():
    body = (b"a preamble to ignore\r\n--b0und\r\nContent-Type: application/dicom\r\n\r\nfirst\r\n--x not a delimiter"
            b"\r\n--b0und  \r\n\r\nsecond, no headers\r\n--b0und--\r\nan epilogue\r\n--b0und\r\n\r\nignored")
    parts = multipart_parts('multipart/related; type="application/dicom"; boundary="b0und"', body)
    assert parts == [b"first\r\n--x not a delimiter", b"second, no headers"]
    # No preamble, an unquoted boundary, a part that ends in CR LF of its own.
    assert multipart_parts("Multipart/Related; boundary=b0und",
                           b"--b0und\r\nX: y\r\n\r\n\x00\r\n\r\n--b0und--") == [b"\x00\r\n"]
    assert multipart_parts("multipart/related", b"DICM...") == [b"DICM..."]  # no boundary: one part, as sent


@pytest.mark.parametrize("content_type, body, message", [
    ("application/json", b"{}", "not multipart/related"),
    ("multipart/related; boundary=b", b"--b\r\nContent-Type: application/dicom\r\nDICM\r\n--b--", "blank line"),
])
def test_an_answer_that_is_not_multipart_dicom_is_named(content_type, body, message):
    with pytest.raises(ValueError, match=message):
        multipart_parts(content_type, body)
