"""Scoring's PACS mode: which studies are new, and what was already scored.

New studies are found by StudyDate: from the watermark (the latest study date scored,
never later than today) minus `lookback_days`, so studies filed a little late are still
found, or on the dates a push from the PACS names. A ledger of salted instance keys keeps
an instance from being scored twice; instances that cannot be decoded, or whose header no
SR can reference, are recorded too, so a scan does not try them again. Both live in one
SQLite file in the run folder. An instance whose SR the PACS refused stays unrecorded: the
next scan scores it and sends its SR again.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import pydicom

from configs import PacsQuery
from tasks.champion import Prediction
from tasks.dicom_results import AiResult, ModelIdentity, result_sr
from tasks.pacs.client import Pacs
from tasks.pacs.query import InstanceRef, dicom_date
from tasks.pacs.retry import PacsRefused
from tasks.pacs.store import instance_key
from tasks.rejects import Reject, RejectKind, exception_detail

SCHEMA = ("CREATE TABLE IF NOT EXISTS instances (instance_key TEXT PRIMARY KEY, outcome TEXT NOT NULL, "
          "model_version TEXT NOT NULL)",
          "CREATE TABLE IF NOT EXISTS watermark (id INTEGER PRIMARY KEY CHECK (id = 1), study_date TEXT NOT NULL)")
SCORED, REJECTED = "scored", "rejected"


def parse_dicom_date(value: str) -> date | None:
    try:
        return date(int(value[:4]), int(value[4:6]), int(value[6:8])) if len(value) == 8 else None
    except ValueError:
        return None


class ScoringLedger:
    def __init__(self, path: Path, salt: str):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path)
        for statement in SCHEMA:
            self._db.execute(statement)
        self._salt = salt

    def watermark(self) -> date | None:
        row = self._db.execute("SELECT study_date FROM watermark").fetchone()
        return parse_dicom_date(row[0]) if row else None

    def advance(self, study_dates: list[str], today: date) -> date | None:
        """Move the watermark to the latest of `study_dates` (never past today, so one mistyped
        future date cannot hide every study after it); the watermark now."""
        seen = [d for d in map(parse_dicom_date, study_dates) if d is not None and d <= today]
        current = self.watermark()
        if seen and (current is None or max(seen) > current):
            self._db.execute("INSERT OR REPLACE INTO watermark VALUES (1, ?)", (dicom_date(max(seen)),))
            self._db.commit()
            return max(seen)
        return current

    def unseen(self, refs: list[InstanceRef]) -> list[InstanceRef]:
        keys = {instance_key(ref.sop_uid, self._salt): ref for ref in refs}
        seen = set()
        for start in range(0, len(keys), 500):
            chunk = list(keys)[start:start + 500]
            marks = ",".join("?" * len(chunk))
            seen |= {row[0] for row in self._db.execute(
                f"SELECT instance_key FROM instances WHERE instance_key IN ({marks})", chunk)}
        return [ref for key, ref in keys.items() if key not in seen]

    def record(self, refs: list[InstanceRef], outcome: str, model_version: str) -> None:
        self._db.executemany("INSERT OR REPLACE INTO instances VALUES (?, ?, ?)",
                             [(instance_key(ref.sop_uid, self._salt), outcome, model_version) for ref in refs])
        self._db.commit()

    def counts(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT outcome, COUNT(*) FROM instances GROUP BY outcome").fetchall())

    def close(self) -> None:
        self._db.close()


@dataclass(frozen=True)
class Window:
    """The StudyDate matching values a scan asks for, and why (for the report)."""

    study_dates: tuple[str, ...]
    reason: str


def scan_window(ledger: ScoringLedger, since: date | None, lookback_days: int, today: date,
                pushed_dates: list[str] | None = None) -> Window:
    pushed = sorted({d for d in pushed_dates or [] if parse_dicom_date(d)})  # an empty date would match every study
    if pushed:
        return Window(tuple(pushed), "dates pushed by the PACS")
    start = ledger.watermark() or since or today
    start -= timedelta(days=lookback_days)
    return Window((f"{dicom_date(start)}-",), f"StudyDate from {start.isoformat()} (watermark - {lookback_days} days)")


def new_instances(pacs: Pacs, query: PacsQuery, window: Window, ledger: ScoringLedger) -> tuple[list[InstanceRef], int]:
    """Images the query selects in the window's studies that the ledger has not seen; and how many
    it had seen."""
    found = [ref for dates in window.study_dates for ref in pacs.find({"StudyDate": dates}, query) if ref.is_image]
    unique = list({ref.sop_uid: ref for ref in found}.values())
    unseen = ledger.unseen(unique)
    return unseen, len(unique) - len(unseen)


@dataclass(frozen=True)
class ResultsSent:
    sent: int  # SRs the PACS stored
    failed: dict[str, Reject]  # file_sha256 -> why the image's result is not in its record


def send_results(pacs: Pacs, scored: list[tuple[InstanceRef, Path, Prediction]], model: ModelIdentity,
                 ledger: ScoringLedger, salt: str, batch_size: int) -> ResultsSent:
    """One SR per scored image (`path` the stored file, named by its sha256), sent in batches; each
    batch is recorded in the ledger once the PACS has it, so a run that stops part-way sends the rest
    next time (the SRs' UIDs are stable). Each image is its own fault boundary: one whose SR cannot be
    written (a header highdicom refuses) or that the PACS refuses is a reject, and the run goes on."""
    sent, failed = 0, {}
    for start in range(0, len(scored), batch_size):
        batch: dict[str, tuple[InstanceRef, str]] = {}  # SR SOPInstanceUID -> its image (ref, file_sha256)
        srs, unwritable = [], []
        for ref, path, prediction in scored[start:start + batch_size]:
            try:
                sr = result_sr(pydicom.dcmread(path, stop_before_pixels=True), AiResult.of(prediction), model)
            except Exception as exc:
                failed[path.stem] = Reject(RejectKind.NO_RESULT, f"image pacs:{instance_key(ref.sop_uid, salt)}: "
                                                                 f"no SR can reference its header: {exception_detail(exc)}")
                unwritable.append(ref)
                continue
            batch[str(sr.SOPInstanceUID)] = (ref, path.stem)
            srs.append(sr)
        refused = pacs.send(srs) if srs else {}
        if set(refused) - set(batch):
            raise PacsRefused(f"PACS {pacs.name} refused {len(refused)} of {len(srs)} results without naming "
                              "which; none of the batch is recorded, so the next scan sends it again")
        for uid, reason in refused.items():
            ref, key = batch[uid]
            failed[key] = Reject(RejectKind.RESULT_REFUSED, f"image pacs:{instance_key(ref.sop_uid, salt)}: the PACS "
                                                            f"refused its SR ({reason}); sent again at the next scan")
        stored = [ref for uid, (ref, _) in batch.items() if uid not in refused]
        ledger.record(stored, SCORED, model.version)
        ledger.record(unwritable, REJECTED, model.version)
        sent += len(stored)
    return ResultsSent(sent, failed)
