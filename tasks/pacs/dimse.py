"""A PACS over DIMSE: C-FIND, then C-GET or C-MOVE to medxfer's own storage SCP; C-STORE for results.

pynetdicom throughout. Searches go down the Study Root hierarchy (study, then its series,
then their instances), which every PACS answers. Each thread keeps its own association for
the requests it sends; the storage SCP that receives C-MOVE sub-operations accepts
associations only from the AE titles configured in `dimse.accept_from` (the PACS's own by default).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence, TypeVar

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, StoragePresentationContexts, _config, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelFind,
                                  StudyRootQueryRetrieveInformationModelGet,
                                  StudyRootQueryRetrieveInformationModelMove)

from configs import DimseConfig, DimseRetrieve, PacsQuery
from tasks.pacs.failures import RetrieveFailed
from tasks.rejects import Reject, RejectKind
from tasks.pacs.query import InstanceRef, series_keys
from tasks.pacs.retry import PacsRefused, RetryPolicy, Transient, with_retries

log = logging.getLogger(__name__)
T = TypeVar("T")
# pynetdicom logs every C-FIND request and answer identifier (names, IDs, accession numbers, UIDs) at
# INFO unless told not to: these are its switches for that.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
FIND, GET, MOVE = (StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelGet,
                   StudyRootQueryRetrieveInformationModelMove)
PENDING = (0xFF00, 0xFF01)
SUCCESS, WARNING_SOME_FAILED = 0x0000, 0xB000
# C-STORE warnings (PS3.4 B.2.3: elements coerced or discarded, data set unlike its SOP class): stored all the same.
STORED_WITH_WARNING = (0xB000, 0xB006, 0xB007)
NOT_AUTHORISED = 0x0124  # C-STORE of an instance medxfer did not ask for
REJECTED_TRANSIENT = 0x02
STORAGE_CLASSES = [context.abstract_syntax for context in StoragePresentationContexts]


def _no_delay(event) -> None:
    """TCP_NODELAY on every association's socket: a DIMSE message goes out as a command and a data
    set in separate writes, and Nagle's algorithm held the second back for the peer's delayed ACK
    (about 40 ms per message on loopback, measured). pynetdicom has no socket-option setting."""
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _park_reactor(assoc: Association) -> Association:
    """Pause the association's reactor for sure before a request; returns `assoc`.

    pynetdicom pauses it itself, but trusts a flag its reactor sets just before waiting: a
    reactor already past the wait can still take the first answer off the queue and drop it
    ("Received unexpected C-FIND service message", pynetdicom issue #875, unfixed in 3.0.4),
    and the request then waits out dimse_timeout. With answers arriving within a millisecond
    (TCP_NODELAY) that hit 2 C-FINDs in 150 here. Once cleared, the reactor parks at the end of
    its current pass (its loop sleeps 1 ms): give it that pass before sending.
    """
    assoc._reactor_checkpoint.clear()
    time.sleep(0.003)
    return assoc


class _DroppedAnswers(logging.Handler):
    """pynetdicom's own report of an answer its reactor took off the queue and dropped
    ("Received unexpected ... service message", issue #875), counted per association thread.
    A C-FIND that lost a pending answer still ends in success, one match short: the count lets
    it search again instead (`_park_reactor` makes the race rare, not impossible: under load
    its 3 ms may not be enough)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._counts: dict[int, int] = {}  # thread ident -> reports; each thread writes only its own

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Received unexpected"):
            self._counts[record.thread] = self._counts.get(record.thread, 0) + 1

    def reported(self, assoc: Association) -> int:
        return self._counts.get(assoc.ident, 0)


_DROPPED = _DroppedAnswers()
logging.getLogger("pynetdicom.association").addHandler(_DROPPED)  # where pynetdicom reports it


def _find_identifier(level: str, **keys: str | None) -> Dataset:
    """A C-FIND/C-GET/C-MOVE identifier; None or "": a return key (universal matching)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value or None)
    return ds


@dataclass
class _Lent:
    """An open association, lent to one request at a time."""

    purpose: str  # find, get or move
    assoc: Association
    classes: frozenset[str] = frozenset()  # C-GET: the storage SOP classes it negotiated
    received: list[bytes] = field(default_factory=list)  # C-GET: what its C-STORE sub-operations delivered


class DimsePacs:
    """One PACS AE. Thread-safe: each request borrows an association of its purpose. Idle
    associations are kept for the next request of the same purpose and released when another
    purpose begins (searching, then retrieving) or at close: a PACS serves few associations at a
    time (Orthanc: 4 by default), and idle ones held its slots and slowed every C-GET to 1 s."""

    def __init__(self, config: DimseConfig, timeout: float, retry: RetryPolicy, max_parallel: int):
        self.config, self.retry, self.timeout = config, retry, timeout
        self.name = f"{config.called_ae}@{config.host}:{config.port}"
        self._lock = threading.Lock()
        self._idle: list[_Lent] = []
        self._purpose = ""
        self._classes: frozenset[str] = frozenset()  # C-GET: every SOP class asked for so far
        self._received: dict[str, bytes] = {}  # C-MOVE: SOPInstanceUID -> bytes, until fetch takes them
        self._expected: set[str] = set()
        self._max_parallel = max_parallel
        self._scp = None  # C-MOVE's storage SCP, started by the first C-MOVE

    # -- associations ---------------------------------------------------------------------

    def _ae(self) -> AE:
        ae = AE(ae_title=self.config.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = self.timeout
        return ae

    def _associate(self, contexts, ext_neg=None, handlers=None) -> Association:
        ae = self._ae()
        assoc = ae.associate(self.config.host, self.config.port, contexts=contexts, ae_title=self.config.called_ae,
                             ext_neg=ext_neg, evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay), *(handlers or [])])
        if assoc.is_established:
            return assoc
        if assoc.is_rejected:
            primitive = assoc.acceptor.primitive
            words = f"{primitive.result_str}, {primitive.source_str}: {primitive.reason_str}"
            if primitive.result == REJECTED_TRANSIENT:
                raise Transient(f"association rejected ({words})")
            raise PacsRefused(f"PACS {self.name} rejected medxfer's association as {self.config.calling_ae} "
                              f"({words}): the PACS must register AE {self.config.calling_ae} and its address")
        raise Transient("no association: connection refused, aborted or timed out")

    def _open(self, purpose: str, classes: frozenset[str]) -> _Lent:
        if purpose == "find":
            return _Lent(purpose, self._associate([build_context(FIND)]))
        if purpose == "move":
            return _Lent(purpose, self._associate([build_context(MOVE)]))

        def store(event, received: list[bytes]) -> int:  # runs on the association's own thread
            received.append(event.encoded_dataset())
            return SUCCESS
        # One storage context per SOP class, every transfer syntax, in the SCP role.
        received: list[bytes] = []
        contexts = [build_context(GET)] + [build_context(c, ALL_TRANSFER_SYNTAXES) for c in sorted(classes)]
        roles = [build_role(c, scp_role=True) for c in sorted(classes)]
        assoc = self._associate(contexts, ext_neg=roles, handlers=[(evt.EVT_C_STORE, store, [received])])
        return _Lent(purpose, assoc, classes, received)

    @contextmanager
    def _lend(self, purpose: str, sop_class: str = "") -> Iterator[_Lent]:
        """An association for `purpose` (C-GET: one that negotiated `sop_class`); a failed request's
        association is aborted, not lent again."""
        with self._lock:
            stale = [lent for lent in self._idle if lent.purpose != purpose]
            self._purpose = purpose
            if sop_class:
                self._classes |= {sop_class}
            usable = [lent for lent in self._idle if lent.purpose == purpose and sop_class in lent.classes | {""}]
            lent = usable[0] if usable else None
            self._idle = [other for other in self._idle if other is not lent and other not in stale]
            classes = self._classes
        for other in stale:
            other.assoc.release()
        if lent is None or not lent.assoc.is_established:
            lent = self._open(purpose, classes if purpose == "get" else frozenset())
        try:
            yield lent
        except BaseException:
            lent.assoc.abort()
            raise
        with self._lock:
            self._idle.append(lent)

    def _request(self, what: str, call: Callable[[], T]) -> T:
        return with_retries(call, self.retry, self.name, what)

    # -- search ---------------------------------------------------------------------------

    def _c_find(self, identifier: Dataset) -> list[Dataset]:
        def call() -> list[Dataset]:
            with self._lend("find") as lent:
                found, status, dropped = [], None, _DROPPED.reported(lent.assoc)
                for status, answer in _park_reactor(lent.assoc).send_c_find(identifier, FIND):
                    if status and status.Status in PENDING and answer is not None:
                        found.append(answer)
                if not status:
                    raise Transient("C-FIND got no answer in time")
                if _DROPPED.reported(lent.assoc) != dropped:
                    raise Transient("pynetdicom dropped a C-FIND answer (its issue #875)")
            if status.Status != SUCCESS:
                raise PacsRefused(f"PACS {self.name} refused a C-FIND with status 0x{status.Status:04X}")
            return found
        return self._request("a C-FIND", call)

    def _studies(self, study: dict[str, str]) -> list[Dataset]:
        keys = {"StudyInstanceUID": "", "AccessionNumber": "", "StudyDate": ""} | study
        return self._c_find(_find_identifier("STUDY", **keys))

    def find(self, study: dict[str, str], query: PacsQuery) -> list[InstanceRef]:
        """Instances of the studies matching `study` that the query selects: study, series,
        then instance level."""
        refs = []
        instance_keys = {"SOPClassUID": "\\".join(query.sop_classes)}  # DIMSE UID list matching
        for found_study in self._studies(study):
            study_uid = str(found_study.StudyInstanceUID)
            series = self._c_find(_find_identifier(
                "SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID="", **series_keys(query)))
            for found_series in series:
                instances = self._c_find(_find_identifier(
                    "IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID=str(found_series.SeriesInstanceUID),
                    SOPInstanceUID="", Rows=None, **instance_keys))
                refs += [InstanceRef(study_uid=study_uid, series_uid=str(found_series.SeriesInstanceUID),
                                     sop_uid=str(item.SOPInstanceUID), sop_class=str(item.get("SOPClassUID", "")),
                                     accession=str(found_study.get("AccessionNumber", "")),
                                     study_date=str(found_study.get("StudyDate", "")),
                                     is_image=bool(item.get("Rows"))) for item in instances]
        return refs

    def study_exists(self, study: dict[str, str]) -> bool:
        return bool(self._studies(study))

    # -- retrieve -------------------------------------------------------------------------

    def fetch(self, ref: InstanceRef) -> bytes:
        """The instance's data set as the PACS sent it (in the transfer syntax it stores, since
        medxfer accepts them all), with file meta written by pynetdicom."""
        if self.config.retrieve is DimseRetrieve.MOVE:
            return self._move(ref)
        return self._get(ref)

    def _retrieve_identifier(self, ref: InstanceRef) -> Dataset:
        return _find_identifier("IMAGE", StudyInstanceUID=ref.study_uid, SeriesInstanceUID=ref.series_uid,
                                SOPInstanceUID=ref.sop_uid)

    def _get(self, ref: InstanceRef) -> bytes:
        def call() -> bytes:
            with self._lend("get", ref.sop_class) as lent:
                lent.received.clear()
                status = None
                for status, _ in _park_reactor(lent.assoc).send_c_get(self._retrieve_identifier(ref), GET):
                    pass
                return self._one_instance("C-GET", status, list(lent.received))
        return self._request("a C-GET", call)

    def _move(self, ref: InstanceRef) -> bytes:
        with self._lock:
            if self._scp is None:
                self._scp = self._start_storage_scp(self._max_parallel)

        def call() -> bytes:
            with self._lock:
                self._expected.add(ref.sop_uid)
            status = None
            try:
                with self._lend("move") as lent:
                    for status, _ in _park_reactor(lent.assoc).send_c_move(
                            self._retrieve_identifier(ref), self.config.calling_ae, MOVE):
                        pass
            finally:
                with self._lock:
                    self._expected.discard(ref.sop_uid)
                    received = [self._received.pop(ref.sop_uid)] if ref.sop_uid in self._received else []
            return self._one_instance("C-MOVE", status, received)
        return self._request("a C-MOVE", call)

    def _one_instance(self, what: str, status: Dataset | None, received: list[bytes]) -> bytes:
        if not status:
            raise Transient(f"{what} got no answer in time")
        if status.Status in (SUCCESS, WARNING_SOME_FAILED) and len(received) == 1:
            return received[0]
        if status.Status in (SUCCESS, WARNING_SOME_FAILED):
            raise RetrieveFailed(Reject(RejectKind.NOT_FOUND if not received else RejectKind.CORRUPT,
                                         f"{what} ended with status 0x{status.Status:04X} and {len(received)} instances"))
        raise RetrieveFailed(Reject(RejectKind.UNREADABLE, f"{what} failed with status 0x{status.Status:04X}"))

    def _start_storage_scp(self, max_parallel: int):
        """The storage SCP that C-MOVE sends to: calling_ae at storage_host:storage_port."""
        def store(event) -> int:
            uid = str(event.request.AffectedSOPInstanceUID)
            with self._lock:
                if uid not in self._expected:  # nothing medxfer asked for is kept
                    return NOT_AUTHORISED
                self._received[uid] = event.encoded_dataset()
            return SUCCESS

        ae = self._ae()
        ae.maximum_associations = max_parallel + 2
        ae.require_calling_aet = self.config.accept_from or [self.config.called_ae]
        contexts = [build_context(c, ALL_TRANSFER_SYNTAXES) for c in STORAGE_CLASSES]
        return ae.start_server((self.config.storage_host, self.config.storage_port), block=False,
                               evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay), (evt.EVT_C_STORE, store)],
                               contexts=contexts)

    # -- results --------------------------------------------------------------------------

    def send(self, datasets: Sequence[pydicom.Dataset]) -> dict[str, str]:
        """C-STORE each data set on one association; those the PACS answered with a failure status."""
        classes = sorted({str(ds.SOPClassUID) for ds in datasets})

        def call() -> dict[str, str]:
            refused = {}
            assoc = self._associate([build_context(c) for c in classes])
            try:
                for ds in datasets:
                    status = _park_reactor(assoc).send_c_store(ds)
                    if not status:
                        raise Transient("C-STORE got no answer in time")
                    if status.Status != SUCCESS and status.Status not in STORED_WITH_WARNING:
                        refused[str(ds.SOPInstanceUID)] = f"C-STORE status 0x{status.Status:04X}"
            finally:
                assoc.release()
            return refused
        return with_retries(call, self.retry, self.name, "a C-STORE")

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for lent in idle:
            lent.assoc.release()
        if self._scp is not None:
            self._scp.shutdown()
