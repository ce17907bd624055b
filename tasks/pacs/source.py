"""Training from a PACS: the label export's studies, retrieved into a local copy that ingest reads.

The result is the folder source's input, so ingest, preprocessing and QC run unchanged:
`data.root` holds the selected instances (hard links into the store, named by content
hash) and `data.manifest` lists them with the export's label, age and split columns and
the export row each came from. Label rows and instances the PACS could not give become
rejects that the flow adds to ingest's, so discovered = usable + rejected counts them too.
"""

from __future__ import annotations

import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import pandas as pd

from configs import DataConfig, PipelineConfig
from tasks.ingest import IngestResult, ManifestError, ingest_dataset
from tasks.io import atomic_path, write_csv_atomic
from tasks.pacs.client import connect
from tasks.pacs.failures import SourceReject, count_kinds, rejects_frame
from tasks.rejects import Reject, RejectKind
from tasks.pacs.labels import KEY_KEYWORDS, LabelRow, label_columns, read_label_export, rows_by_key
from tasks.pacs.query import InstanceRef, describe, study_keys
from tasks.pacs.retrieve import Retrieval, retrieve
from tasks.pacs.store import InstanceStore, instance_key

EXPORT_ROW_COLUMN = "label_export_row"
VIEW_NAME = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{64}\.dcm$")


@dataclass
class PacsSelection:
    server: str
    label_rows: int
    retrieval: Retrieval
    rejects: list[SourceReject]  # label rows and instances the PACS could not give

    def rejects_frame(self) -> pd.DataFrame:
        return rejects_frame(self.rejects)

    def summary(self) -> dict[str, int]:
        """Label rows, then found = already held + retrieved + failed, then rejects by kind."""
        return {"label_rows": self.label_rows, **self.retrieval.summary(), "source_rejects": len(self.rejects),
                **{f"reject_{k.removeprefix('failed_')}": n
                   for k, n in count_kinds([r.failure for r in self.rejects]).items()}}


def _row_reject(row: LabelRow, kind: RejectKind, detail: str) -> SourceReject:
    return SourceReject(f"label export row {row.row}", Reject(kind, detail), (row.row,))


def _key_rejects(grouped: dict[str, list[LabelRow]], keyword: str) -> list[SourceReject]:
    """Rows with no key, and rows that share one (which of their labels would be true?)."""
    rejects = []
    for key, rows in grouped.items():
        if not key:
            rejects += [_row_reject(r, RejectKind.BAD_LABEL, f"no {keyword}") for r in rows]
        elif len(rows) > 1:
            lines = tuple(r.row for r in rows)
            failure = Reject(RejectKind.DUPLICATE, f"all name the same {keyword}")
            rejects += [SourceReject(f"label export row {r.row}", failure, lines) for r in rows]
    return rejects


def link_view(root: Path, stored: list[Path]) -> dict[Path, str]:
    """Hard-link each stored file into `root` as ab/<sha256>.dcm (a copy across file systems) and
    remove view files no longer selected; stored path -> path relative to root."""
    wanted = {path: f"{path.name[:2]}/{path.name}" for path in stored}
    keep = set(wanted.values())
    for existing in root.glob("??/*.dcm"):
        rel = existing.relative_to(root).as_posix()
        if VIEW_NAME.match(rel) and rel not in keep:
            existing.unlink()
    for source, rel in wanted.items():
        target = root / rel
        if target.exists():
            continue  # named by content: the same bytes
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
    return wanted


def prepare_pacs_dataset(config: PipelineConfig, salt: str,
                         on_retrieved: Callable[[InstanceRef, Path], None] | None = None) -> PacsSelection:
    """Find each label row's study on the PACS, retrieve the images the query selects that the store
    lacks, and write the local copy and its manifest (data.root, data.manifest)."""
    settings, data = config.pacs, config.data
    keyword = KEY_KEYWORDS[settings.labels.key]
    rows = read_label_export(settings.labels, data)
    grouped = rows_by_key(rows)
    rejects = _key_rejects(grouped, keyword)
    unique = [group[0] for key, group in grouped.items() if key and len(group) == 1]
    pacs = connect(settings)
    try:
        with ThreadPoolExecutor(settings.max_parallel, thread_name_prefix="pacs-find") as pool:
            found = list(pool.map(lambda r: pacs.find(study_keys(settings.query, **{keyword: r.key}),
                                                      settings.query), unique))
        chosen: list[tuple[LabelRow, InstanceRef]] = []
        for row, refs in zip(unique, found):
            images = [ref for ref in refs if ref.is_image]
            if images:
                chosen += [(row, ref) for ref in images]
            elif refs or pacs.study_exists({keyword: row.key}):
                rejects.append(_row_reject(row, RejectKind.NO_PIXEL_DATA, "the study has no image on the PACS that "
                                                                      f"the query selects ({describe(settings.query)})"))
            else:
                rejects.append(_row_reject(row, RejectKind.NOT_FOUND, f"no study with this {keyword} on the PACS"))
        with InstanceStore(settings.store_dir, salt) as store:
            retrieval = retrieve(pacs, [ref for _, ref in chosen], store, settings.max_parallel, on_retrieved)
    finally:
        pacs.close()

    failed = {ref.sop_uid: failure for ref, failure in retrieval.failed}
    paths = retrieval.paths()
    view = link_view(Path(data.root), sorted(set(paths.values())))
    manifest = []
    for row, ref in chosen:
        if ref.sop_uid in failed:
            rejects.append(SourceReject(f"pacs:{instance_key(ref.sop_uid, salt)}", failed[ref.sop_uid], (row.row,)))
        else:
            manifest.append({"path": view[paths[ref.sop_uid]], **row.values, EXPORT_ROW_COLUMN: row.row})
    columns = ["path", *[c for c in label_columns(data) if rows and c in rows[0].values], EXPORT_ROW_COLUMN]
    write_csv_atomic(pd.DataFrame(manifest, columns=columns), Path(data.manifest))
    return PacsSelection(pacs.name, len(rows), retrieval, rejects)


def ingest_retrieved(data: DataConfig, seed: int, salt: str, source_rejects: pd.DataFrame) -> IngestResult:
    """ingest_dataset on the local copy, with the PACS's rejects counted in (a ManifestError's too)."""
    try:
        result = ingest_dataset(data, seed, salt)
    except ManifestError as exc:  # an empty manifest is raised before any file is read: report the PACS's rejects
        exc.rejects = source_rejects if exc.rejects is None else pd.concat([source_rejects, exc.rejects],
                                                                           ignore_index=True)
        raise
    return replace(result, rejects=pd.concat([source_rejects, result.rejects], ignore_index=True),
                   discovered=result.discovered + len(source_rejects))
