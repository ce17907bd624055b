"""What can go wrong with one study or instance on a PACS, in the project's terms: a `Reject`
of tasks/rejects.py's kinds (one definition for every stage), and the exception one instance's
retrieval raises so that the run goes on without it.

The PACS's troubles map onto those kinds: no such study, or an instance gone between search
and retrieve, is `not found`; a study with no image the query selects, `no pixel data`; export
rows that name the same study, `duplicate`; a row without its key, `bad label`; a request the
PACS refused for one instance, `unreadable`; an answer that is not that one DICOM instance,
`corrupt`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Sequence

import pandas as pd

from tasks.rejects import Reject
from tasks.rejects import rejects_frame as reject_table


class RetrieveFailed(Exception):
    """One instance could not be retrieved; the run goes on without it."""

    def __init__(self, failure: Reject):
        super().__init__(failure.detail)
        self.failure = failure


@dataclass(frozen=True)
class SourceReject:
    """A label export row, or one instance of its study, that the PACS could not give."""

    path: str  # "label export row 7", or "pacs:<instance key>" for one instance
    failure: Reject
    rows: tuple[int, ...]  # the label export lines it concerns


def rejects_frame(rejects: Sequence[SourceReject]) -> pd.DataFrame:
    """The rejects table (tasks/rejects.py's columns) that ingest's own are added to."""
    return reject_table([(r.path, replace(r.failure, rows=r.rows)) for r in rejects])


def count_kinds(failures: Sequence[Reject]) -> dict[str, int]:
    """{"failed_not_found": 2, ...} for reports."""
    kinds = Counter(failure.kind.value for failure in failures)
    return {f"failed_{kind.replace(' ', '_')}": n for kind, n in sorted(kinds.items())}
