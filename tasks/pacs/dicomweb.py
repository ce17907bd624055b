"""A PACS over DICOMweb: QIDO-RS search, WADO-RS retrieve and STOW-RS store.

Searches and stores go through dicomweb-client. The instance retrieval, one request per
image, is the hot path: it goes straight to the urllib3 connection pool that requests
itself would use (same TLS verification, proxy and credentials) and splits the
multipart answer with a boundary scan, which costs the client about half the CPU of a
requests call (benchmarks/RESULTS.md, issue 13). Credentials come from the environment
(basic or bearer), TLS is verified unless the config says otherwise, and every request
has a timeout and goes through `tasks.pacs.retry`: dicomweb-client's own retrying (which
also retries a refused connection for half a minute without a word) is switched off.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Sequence, TypeVar

import pydicom
import requests
import urllib3
from dicomweb_client.api import DICOMwebClient
from requests.adapters import HTTPAdapter

from configs import DicomWebAuth, DicomWebConfig, PacsQuery
from tasks.pacs.query import InstanceRef, series_keys
from tasks.pacs.failures import RetrieveFailed
from tasks.rejects import Reject, RejectKind
from tasks.pacs.retry import PacsRefused, RetryPolicy, Transient, network_cause, with_retries

T = TypeVar("T")
# dicomweb-client's INFO and DEBUG lines quote UIDs, URLs (whose paths hold UIDs) and request headers
# (credentials): none of them may reach a log.
logging.getLogger("dicomweb_client").setLevel(logging.WARNING)
PAGE = 1000  # QIDO-RS results per request
RETRIABLE_STATUS = {408, 429, 500, 502, 503, 504}
# The instance as the PACS stores it: any transfer syntax, so its bytes (and content hash) are the PACS's own.
ACCEPT_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
# Instances come uncompressed over HTTP: pixel data is mostly already compressed or noise-like, and a
# gzipped answer costs the PACS its CPU on every image (Orthanc: 2.0 of its 2.7 ms per 66 KB instance).
INSTANCE_HEADERS = {"Accept": ACCEPT_AS_STORED, "Accept-Encoding": "identity"}
INSTANCE_FIELDS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "AccessionNumber",
                   "StudyDate", "Rows"]
_TAGS = {"StudyInstanceUID": "0020000D", "SeriesInstanceUID": "0020000E", "SOPInstanceUID": "00080018",
         "SOPClassUID": "00080016", "AccessionNumber": "00080050", "StudyDate": "00080020", "Rows": "00280010"}


def _first(item: dict, keyword: str) -> str:
    values = item.get(_TAGS[keyword], {}).get("Value") or [""]
    return str(values[0])


class _ConfiguredTLS(HTTPAdapter):
    """An adapter that verifies TLS as the config says. requests lets REQUESTS_CA_BUNDLE or
    CURL_CA_BUNDLE in the environment override a session's `verify` (requests issue #3829), which
    would silently swap a site's own CA for the system bundle, or verification off for on."""

    def __init__(self, verify: str | bool, **kwargs):
        super().__init__(**kwargs)
        self._verify = verify

    def send(self, request, **kwargs):
        return super().send(request, **(kwargs | {"verify": self._verify}))

    def pool(self, request: requests.PreparedRequest, proxies: dict[str, str]) -> urllib3.HTTPConnectionPool:
        """The urllib3 pool that `send` would use for `request`: the configured TLS verification,
        through the proxy `proxies` names for it, if any."""
        return self.get_connection_with_tls_context(request, self._verify, proxies=proxies)


def multipart_parts(content_type: str, body: bytes) -> list[bytes]:
    """The parts of a multipart/related body (RFC 2046), each without its own headers: what lies
    between the boundary delimiters, preamble and epilogue dropped. ValueError if the media type
    is not multipart/related; a body without a boundary is one part, as dicomweb-client reads it."""
    media_type, *params = [item.strip() for item in content_type.split(";")]
    if media_type.lower() != "multipart/related":
        raise ValueError(f"media type {media_type!r}, not multipart/related")
    boundary = next((value.strip('"') for name, _, value in (p.partition("=") for p in params)
                     if name.strip().lower() == "boundary"), None)
    if not boundary:
        return [body]
    parts = []
    for piece in (b"\r\n" + body).split(b"\r\n--" + boundary.encode())[1:]:
        if piece.startswith(b"--"):  # the close delimiter
            break
        headers_end = piece.find(b"\r\n\r\n")
        if headers_end < 0:
            raise ValueError("a multipart part without the blank line that ends its headers")
        parts.append(piece[headers_end + 4:])
    return parts


def _as_requests_names(exc: urllib3.exceptions.HTTPError) -> str:
    """The name requests gives a urllib3 failure, so that every request's error reads alike."""
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        return "ConnectionError"
    if isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
        return "ConnectTimeout"
    return "ReadTimeout" if isinstance(exc, urllib3.exceptions.ReadTimeoutError) else "ConnectionError"


def session_for(config: DicomWebConfig, max_parallel: int) -> requests.Session:
    """A session with the site's credentials (from the environment), TLS verification and a
    connection pool as large as the parallel retrievals."""
    session = requests.Session()
    # The environment is read here, once: with trust_env (the default) requests looks up proxy variables
    # and ~/.netrc again on every request (benchmarks/RESULTS.md, issue 13). Credentials come only from
    # the variables the config names; a proxy the environment sets for this URL is kept.
    session.trust_env = False
    session.proxies = requests.utils.get_environ_proxies(config.url)
    verify = str(config.ca_bundle) if config.ca_bundle else config.verify_tls
    adapter = _ConfiguredTLS(verify, pool_connections=1, pool_maxsize=max_parallel)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if config.auth is DicomWebAuth.BASIC:
        username, password = os.environ.get(config.username_env), os.environ.get(config.password_env)
        if not username or not password:
            raise PacsRefused(f"pacs.dicomweb.auth is basic: set ${config.username_env} and ${config.password_env}")
        session.auth = (username, password)
    elif config.auth is DicomWebAuth.BEARER:
        token = os.environ.get(config.token_env)
        if not token:
            raise PacsRefused(f"pacs.dicomweb.auth is bearer: set ${config.token_env}")
        session.headers["Authorization"] = f"Bearer {token}"
    return session


class DicomWebPacs:
    """One DICOMweb server. Thread-safe: retrievals share one session and its connection pool."""

    def __init__(self, config: DicomWebConfig, timeout: float, retry: RetryPolicy, max_parallel: int):
        self.config, self.retry = config, retry
        self.name = config.url
        session = session_for(config, max_parallel)
        self.client = DICOMwebClient(config.url, session=session, timeout=(timeout, timeout))
        self.client.set_http_retry_params(retry=False)
        # The instance retrieval's fixed parts, made once: the session's headers and credentials, the
        # adapter with its TLS settings, the URL the pool is asked for (a path, or a whole URL through
        # an HTTP proxy) and the timeouts.
        self._root = session.prepare_request(requests.Request("GET", self.client.base_url))
        self._adapter = session.get_adapter(self.client.base_url)
        self._proxies = session.proxies
        self._instances_url = self._adapter.request_url(self._root, self._proxies).rstrip("/") + "/studies"
        self._instance_headers = dict(self._root.headers) | INSTANCE_HEADERS
        self._timeout = urllib3.Timeout(connect=timeout, read=timeout)

    def _refusal(self, what: str, status: int, reason: str, instance: bool) -> Exception:
        """What an HTTP error status means: medxfer itself refused (PacsRefused), worth a retry
        (Transient), one `instance` that failed (RetrieveFailed), or any other refusal."""
        if status in (401, 403):
            return PacsRefused(f"PACS {self.name} refused {what} with HTTP {status} {reason}: check "
                               f"pacs.dicomweb.auth ({self.config.auth.value}) and its credentials")
        if status in RETRIABLE_STATUS:
            return Transient(f"HTTP {status} {reason}")
        if instance:
            kind = RejectKind.NOT_FOUND if status in (404, 410) else RejectKind.UNREADABLE
            return RetrieveFailed(Reject(kind, f"{what.removeprefix('a ')} answered HTTP {status} {reason}"))
        return PacsRefused(f"PACS {self.name} refused {what} with HTTP {status} {reason}")

    def _request(self, what: str, call: Callable[[], T], instance: bool = False) -> T:
        """`call()` with retries. Refusals of medxfer itself raise PacsRefused; another HTTP error
        status is RetrieveFailed for one `instance` (a 404), else PacsRefused. No message holds the
        URL: its path and query hold UIDs and accession numbers."""
        def attempt() -> T:
            try:
                return call()
            except (requests.exceptions.SSLError, urllib3.exceptions.SSLError):
                raise PacsRefused(f"PACS {self.name}: its TLS certificate is not trusted; name the CA that "
                                  "signed it in pacs.dicomweb.ca_bundle") from None
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise Transient(f"{type(exc).__name__}: {network_cause(exc)}") from None
            except urllib3.exceptions.HTTPError as exc:  # the instance retrieval's, named as requests names them
                raise Transient(f"{_as_requests_names(exc)}: {network_cause(exc)}") from None
            except requests.HTTPError as exc:
                raise self._refusal(what, exc.response.status_code, exc.response.reason, instance) from None
        return with_retries(attempt, self.retry, self.name, what)

    def find(self, study: dict[str, str], query: PacsQuery) -> list[InstanceRef]:
        """Instances of the studies matching `study` (study-level keys) that the query selects,
        in pages of PAGE."""
        filters = {**study, **series_keys(query)}
        if query.sop_classes:
            filters["SOPClassUID"] = ",".join(query.sop_classes)  # QIDO-RS UID list matching
        found: list[InstanceRef] = []
        while True:
            page = self._request("a QIDO-RS instance search", lambda: self.client.search_for_instances(
                search_filters=filters, fields=INSTANCE_FIELDS, limit=PAGE, offset=len(found)))
            found += [InstanceRef(study_uid=_first(item, "StudyInstanceUID"),
                                  series_uid=_first(item, "SeriesInstanceUID"),
                                  sop_uid=_first(item, "SOPInstanceUID"), sop_class=_first(item, "SOPClassUID"),
                                  accession=_first(item, "AccessionNumber"), study_date=_first(item, "StudyDate"),
                                  is_image=bool(_first(item, "Rows"))) for item in page]
            if len(page) < PAGE:
                return found

    def study_exists(self, study: dict[str, str]) -> bool:
        """Whether any study matches `study` (study-level keys), whatever its instances."""
        return bool(self._request("a QIDO-RS study search",
                                  lambda: self.client.search_for_studies(search_filters=study, limit=1)))

    def fetch(self, ref: InstanceRef) -> bytes:
        """The instance's bytes as the PACS stores them (WADO-RS, any transfer syntax): the content
        hash is the PACS's file's, with no decode and re-encode (dicomweb-client's retrieve_instance
        returns a parsed Dataset; the folder-versus-PACS test checks the bytes)."""
        what = "a WADO-RS retrieve"
        url = f"{self._instances_url}/{ref.study_uid}/series/{ref.series_uid}/instances/{ref.sop_uid}"

        def get() -> list[bytes]:
            response = self._adapter.pool(self._root, self._proxies).urlopen(
                "GET", url, headers=self._instance_headers, redirect=False, assert_same_host=False,
                retries=False, timeout=self._timeout, preload_content=True, decode_content=True)
            if response.status >= 300:
                raise self._refusal(what, response.status, response.reason, instance=True)
            content_type = response.headers.get("Content-Type", "")
            if content_type.startswith("application/dicom"):
                return [response.data]  # a single part sent without the multipart envelope
            return multipart_parts(content_type, response.data)

        try:
            parts = self._request(what, get, instance=True)
        except ValueError as exc:  # not multipart/related
            raise RetrieveFailed(Reject(RejectKind.CORRUPT, f"WADO-RS answer is not DICOM: {exc}")) from None
        if len(parts) != 1 or not parts[0]:
            raise RetrieveFailed(Reject(RejectKind.CORRUPT,
                                         f"WADO-RS answered {len(parts)} parts for one instance"))
        return parts[0]

    def send(self, datasets: Sequence[pydicom.Dataset]) -> dict[str, str]:
        """STOW-RS; the results the PACS lists as failed, with their failure reasons. Each data set
        gets the 128-byte preamble first: pydicom 3 writes an in-memory data set without it, Orthanc
        accepts that, and reading it back then fails."""
        for ds in datasets:
            ds.preamble = b"\0" * 128

        def store() -> pydicom.Dataset:
            try:
                return self.client.store_instances(list(datasets))
            except requests.HTTPError as exc:  # 409: none stored; the answer still says why, per instance
                if exc.response.status_code == 409 and exc.response.content:
                    return pydicom.Dataset.from_json(exc.response.json())
                raise
        response = self._request("a STOW-RS store", store)
        return {str(item.get("ReferencedSOPInstanceUID", "")): f"STOW-RS failure reason "
                f"0x{int(item.get('FailureReason', 0)):04X}" for item in response.get("FailedSOPSequence", [])}

    def close(self) -> None:
        self.client._session.close()
