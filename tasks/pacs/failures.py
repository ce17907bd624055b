"""What can go wrong with one study or instance on a PACS, as data: a kind and a one-line detail.

Until the project's shared reject kinds land (issue 10's `Reject(kind, detail, rows)`),
PACS failures keep their own small kind enum; each becomes one reject row whose reason
is its detail, so the rejects report and QC read them like any other.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import Enum
from typing import Sequence

import pandas as pd

from tasks.ingest import REJECT_COLUMNS


class FailureKind(str, Enum):
    NO_KEY = "no key"  # a label export row without its accession number or Study Instance UID
    NOT_ON_PACS = "not on the PACS"  # no such study, or an instance gone between search and retrieve
    NO_IMAGE = "no image"  # the study is there, with no image instance the query selects
    DUPLICATE_KEY = "duplicate key"  # label export rows that name the same study
    REFUSED = "refused"  # the PACS refused the request for this instance
    BAD_RESPONSE = "bad response"  # an answer that is not one DICOM instance


@dataclass(frozen=True)
class Failure:
    kind: FailureKind
    detail: str  # one line, no identifiers


class RetrieveFailed(Exception):
    """One instance could not be retrieved; the run goes on without it."""

    def __init__(self, failure: Failure):
        super().__init__(failure.detail)
        self.failure = failure


@dataclass(frozen=True)
class SourceReject:
    """A label export row, or one instance of its study, that the PACS could not give."""

    path: str  # "label export row 7", or "pacs:<instance key>" for one instance
    failure: Failure
    rows: tuple[int, ...]  # the label export lines it concerns

    @property
    def reason(self) -> str:
        """As ingest words its rejects: the rows first, so that QC counts equal problems together."""
        prefix = "row" if len(self.rows) == 1 else "rows"
        return f"{prefix} {', '.join(map(str, self.rows))}: {self.failure.detail}"


def rejects_frame(rejects: Sequence[SourceReject]) -> pd.DataFrame:
    return pd.DataFrame([(r.path, r.reason) for r in rejects], columns=REJECT_COLUMNS)


def count_kinds(failures: Sequence[Failure]) -> dict[str, int]:
    """{"failed_not_on_the_PACS": 2, ...} for reports."""
    kinds = Counter(failure.kind.value for failure in failures)
    return {f"failed_{kind.replace(' ', '_')}": n for kind, n in sorted(kinds.items())}
