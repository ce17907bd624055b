"""Scoring's PACS mode: which studies are new, and what was already scored.

New studies are found by StudyDate: from the watermark (the latest study date scored,
never later than today) minus `lookback_days`, so studies filed a little late are still
found, or on the dates a push from the PACS names. A ledger of salted instance keys keeps
an instance from being scored twice; instances that cannot be decoded are recorded too,
so a scan does not try them again. Both live in one SQLite file in the run folder.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

from configs import PacsQuery
from tasks.pacs.client import Pacs
from tasks.pacs.query import InstanceRef, dicom_date
from tasks.pacs.store import instance_key

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
