"""Instances retrieved from a PACS: kept by content hash, indexed by salted SOPInstanceUID.

`root/objects/ab/<sha256>.dcm` holds each instance's bytes, written atomically (a killed
download leaves at most a hidden temporary file, swept at the next open), and
`root/index.sqlite` maps the instance's salted key (ingest's `instance_key`) to its hash.
`put` indexes an instance and `commit` makes the rows put so far last: a retrieval commits a
batch at a time (`tasks.pacs.retrieve`), since a commit per instance cost about as much as
checking it, and closing commits what is left. A killed process loses only the rows put after
its last commit; the next run fetches those instances again (their object files, already there,
are not rewritten). Commits are not flushed to disk one by one (WAL, `synchronous=NORMAL`): a
power cut may lose the last few too, like the object files, which are not flushed either. One
retrieval holds the store at a time (an exclusive lock on `root/.lock`).
"""

from __future__ import annotations

import fcntl
import hashlib
import sqlite3
import threading
from pathlib import Path

from tasks.ingest import patient_key
from tasks.io import write_bytes_atomic

SCHEMA = "CREATE TABLE IF NOT EXISTS instances (instance_key TEXT PRIMARY KEY, sha256 TEXT NOT NULL, bytes INTEGER NOT NULL)"


class StoreBusy(RuntimeError):
    """Another retrieval holds the store."""


def instance_key(sop_uid: str, salt: str) -> str:
    """The salted key ingest writes as `instance_key` for this SOPInstanceUID."""
    return patient_key(f"instance:{sop_uid}", salt)


class InstanceStore:
    def __init__(self, root: Path, salt: str):
        self.root, self._salt = Path(root), salt
        self.objects = self.root / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.root / ".lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise StoreBusy(f"{self.root} is in use by another retrieval; wait for it to finish") from None
        for stale in self.objects.glob("*/.*.tmp"):  # left by a killed download; the lock says no writer is live
            stale.unlink(missing_ok=True)
        self._db = sqlite3.connect(self.root / "index.sqlite", check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(SCHEMA)
        self._mutex = threading.Lock()

    def path(self, sha256: str) -> Path:
        return self.objects / sha256[:2] / f"{sha256}.dcm"

    def held(self, sop_uid: str) -> Path | None:
        """The stored file of this instance, if a previous retrieval finished it."""
        with self._mutex:
            row = self._db.execute("SELECT sha256, bytes FROM instances WHERE instance_key = ?",
                                   (instance_key(sop_uid, self._salt),)).fetchone()
        if row is None:
            return None
        path = self.path(row[0])
        return path if path.is_file() and path.stat().st_size == row[1] else None

    def put(self, sop_uid: str, data: bytes) -> Path:
        """Store `data` under its sha256 (atomically), then index it (until `commit`, in this
        process only); its path."""
        sha = hashlib.sha256(data).hexdigest()
        path = self.path(sha)
        if not path.is_file():
            write_bytes_atomic(path, data)
        with self._mutex:
            self._db.execute("INSERT OR REPLACE INTO instances VALUES (?, ?, ?)",
                             (instance_key(sop_uid, self._salt), sha, len(data)))
        return path

    def commit(self) -> None:
        """Make every instance put so far last beyond this process."""
        with self._mutex:
            self._db.commit()

    def close(self) -> None:
        self.commit()
        self._db.close()
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()

    def __enter__(self) -> InstanceStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
