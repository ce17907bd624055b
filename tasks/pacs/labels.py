"""A RIS or pathology export: one row per study, labels keyed by accession number or Study Instance UID.

The key is used to find the study on the PACS and is kept in memory only; what is written
afterwards names a study by its salted key and a row by its line number in the export.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import pandas as pd

from configs import DataConfig, LabelExportConfig, LabelKey, TaskKind
from tasks.ingest import ManifestError

KEY_KEYWORDS = {LabelKey.ACCESSION_NUMBER: "AccessionNumber", LabelKey.STUDY_INSTANCE_UID: "StudyInstanceUID"}
LABEL_COLUMNS = ("label", "age", "split")  # ours; the export's names come from data.columns


@dataclass(frozen=True)
class LabelRow:
    row: int  # line in the export (the header is line 1)
    key: str  # the accession number or Study Instance UID
    values: dict[str, str]  # the export's label / age / split columns, under the export's names


def label_columns(data: DataConfig) -> list[str]:
    """The export's names for our label, age and split columns."""
    return [data.columns.get(ours, ours) for ours in LABEL_COLUMNS]


def read_label_export(config: LabelExportConfig, data: DataConfig) -> list[LabelRow]:
    """Every row of the export, its key stripped; ManifestError when a needed column is missing."""
    try:
        frame = pd.read_csv(config.path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{config.path}: cannot read the label export: {exc}") from exc
    frame.columns = [c.strip() for c in frame.columns]
    if config.column not in frame.columns:
        raise ManifestError(f"{config.path}: the label export has no {config.column!r} column "
                            f"(columns: {list(frame.columns)})")
    label = data.columns.get("label", "label")
    if data.task is TaskKind.CLASSIFICATION and label not in frame.columns:
        raise ManifestError(f"{config.path}: a classification label export needs a {label!r} column")
    kept = [c for c in label_columns(data) if c in frame.columns]
    return [LabelRow(row=line, key=str(record[config.column]).strip(), values={c: record[c] for c in kept})
            for line, record in zip(range(2, len(frame) + 2), frame.to_dict(orient="records"))]


def rows_by_key(rows: list[LabelRow]) -> dict[str, list[LabelRow]]:
    grouped: dict[str, list[LabelRow]] = defaultdict(list)
    for row in rows:
        grouped[row.key].append(row)
    return dict(grouped)
