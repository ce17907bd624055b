"""Why a file cannot be used: the kinds of reject, one reject, and the error decoding raises.

Ingest, preprocess, scoring, the QC report and the service all speak of rejects
in these terms: a `RejectKind` that code acts on (QC counts by it, the service
picks its HTTP status from it) and a one-line `detail` for people. Nothing
parses a detail back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from tasks.phi import redact


class RejectKind(str, Enum):
    """What is wrong with a file, in a few words (the value is what reports show)."""

    NOT_FOUND = "not found"  # a manifest row names no file, or a link leads nowhere
    UNREADABLE = "unreadable"  # the system will not give its bytes: permissions, link loops, devices
    EMPTY = "empty"
    NOT_AN_IMAGE = "not an image"  # not DICOM, PNG or JPEG; a DICOMDIR; a folder
    CORRUPT = "corrupt"  # a header or a codestream that does not parse
    TRUNCATED = "truncated"  # less pixel data than the header declares
    NO_PIXEL_DATA = "no pixel data"
    UNSUPPORTED_SYNTAX = "unsupported transfer syntax"  # unknown, mislabelled, or no decoder installed
    DECODER_LIMITATION = "decoder limitation"  # a valid image the installed decoder cannot decode
    TOO_LARGE = "too large"  # more pixels or frames than the configured limits
    BAD_GEOMETRY = "unsupported geometry"  # an aspect ratio no model input can come from
    NOT_IN_MANIFEST = "not in manifest"
    DUPLICATE = "duplicate"  # named on more than one manifest row
    BAD_LABEL = "bad label"  # a label, or an age, that cannot be used
    BAD_SPLIT = "bad split"  # a split value that is not train, val or test
    LEAK = "leak"  # a copy of an image filed under another split than its original
    WORKER_DIED = "worker died"  # the process decoding it was killed (a crash, the OOM killer)
    UNEXPECTED = "unexpected"  # any other error while reading or decoding it
    OUT_OF_DOMAIN = "out of domain"  # a readable image unlike the training data, refused by domain.policy
    NO_RESULT = "no result"  # scored, but no DICOM result can be written for its header (highdicom refuses it)
    RESULT_REFUSED = "result refused"  # scored, but the PACS would not store its DICOM result


_OBJECT_REPR = re.compile(r"<[^<>]*? (?:object )?at 0x[0-9a-fA-F]+>")
MAX_DETAIL = 300  # characters: a reason is a line in a table, not a dump


def one_line(text: str) -> str:
    """`text` as one line: whitespace runs (newlines included) collapsed, Python object reprs
    (`<_io.BytesIO object at 0x...>`, which say nothing to a reader) dropped, cut to MAX_DETAIL
    characters."""
    line = " ".join(_OBJECT_REPR.sub("", str(text)).split())
    return line if len(line) <= MAX_DETAIL else line[:MAX_DETAIL - 1] + "…"


def exception_detail(exc: BaseException) -> str:
    """A library's exception as one line: its type and its message, with any header value it
    quotes redacted (a damaged header can hold a name where a number belongs)."""
    message = one_line(redact(str(exc)))
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


@dataclass(frozen=True)
class Reject:
    """Why one file is not used: its kind, a one-line detail, and the manifest rows
    (CSV line numbers) it concerns, none for a file the manifest does not list."""

    kind: RejectKind
    detail: str
    rows: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "detail", one_line(self.detail))

    def message(self) -> str:
        """The detail with its rows in front, as a person reads it."""
        if not self.rows:
            return self.detail
        return f"row{'s' if len(self.rows) > 1 else ''} {', '.join(map(str, self.rows))}: {self.detail}"


class UnreadableImage(Exception):
    """A file that cannot be turned into an image: `kind` and a one-line `detail`;
    `path` names the file when known, and the message then starts with it."""

    def __init__(self, kind: RejectKind, detail: str, path: Path | str | None = None):
        self.kind, self.detail, self.path = kind, one_line(detail), path
        super().__init__(self.detail)

    def __str__(self) -> str:
        return f"{self.path}: {self.detail}" if self.path is not None else self.detail

    def reject(self, rows: Sequence[int] = ()) -> Reject:
        return Reject(self.kind, self.detail, tuple(rows))


# rejects.csv and the rejects table artifact: one row per file.
REJECT_COLUMNS = ["path", "kind", "rows", "reason"]


def rejects_frame(rejects: Iterable[tuple[str, Reject]]) -> pd.DataFrame:
    """(path, Reject) pairs as a REJECT_COLUMNS table; `rows` as space-separated line numbers."""
    return pd.DataFrame([(path, r.kind.value, " ".join(map(str, r.rows)), r.detail) for path, r in rejects],
                        columns=REJECT_COLUMNS)
