"""The bundled sample as a hospital would hold it: images in a PACS, labels in a RIS-style export.

`label_export` writes what a RIS or pathology system gives for the studies of a folder
written by `sample_data.breastmnist`: one row per study, keyed by accession number, with
the finding and the official split. Its accession numbers are the sample's placeholders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import pandas as pd
import pydicom

from tasks.io import write_csv_atomic

KEY_COLUMN, LABEL_COLUMN = "AccessionNumber", "diagnosis"


def label_export(folder: Path, out: Path, paths: Iterable[str] | None = None,
                 extra_rows: list[dict] | None = None) -> Path:
    """AccessionNumber, diagnosis, split for each image in `folder`'s manifest (one study per
    image in the sample; `paths`: only these), then `extra_rows`."""
    manifest = pd.read_csv(Path(folder) / "manifest.csv", dtype=str)
    if paths is not None:
        manifest = manifest[manifest["path"].isin(set(paths))]
    accessions = [str(pydicom.dcmread(Path(folder) / rel, stop_before_pixels=True).AccessionNumber)
                  for rel in manifest["path"]]
    rows = pd.DataFrame({KEY_COLUMN: accessions, LABEL_COLUMN: manifest["label"], "split": manifest["split"]})
    return write_csv_atomic(pd.concat([rows, pd.DataFrame(extra_rows or [])], ignore_index=True), out)
