"""The per-run data QC report: what went in, what was rejected and why, duplicates, split sizes.

Built only from manifest columns that hold no patient data (modality, photometric
interpretation, transfer syntax, size, SOP class, body part, label, split) and from file paths.
"""

from __future__ import annotations

import pandas as pd

from tasks.io import markdown_table

# Manifest column -> heading, in report order.
COUNTED_COLUMNS = {
    "modality": "Modality",
    "photometric": "Photometric interpretation (PNG/JPEG: image mode)",
    "transfer_syntax": "Transfer syntax (PNG/JPEG: file format)",
    "image_size": "Image size (rows x columns)",
    "sop_class": "SOP class",
    "body_part": "Body part examined",
    "label": "Label",
}
SPLIT_ORDER = ["train", "val", "test"]


def _counts(values: pd.Series, heading: str, unit: str = "samples") -> str:
    counts = values.replace("", "(none)").value_counts().rename_axis(heading).reset_index(name=unit)
    return markdown_table(counts)


def qc_report(title: str, manifest: pd.DataFrame, rejects: pd.DataFrame, duplicates: pd.DataFrame) -> str:
    """Markdown: counts by header fact and label, rejects by kind, duplicates, split sizes by class."""
    discovered_files = manifest["path"].nunique() + len(rejects)
    lines = [f"# Data QC: {title}", "",
             f"{discovered_files} files discovered = {manifest['path'].nunique()} usable "
             f"+ {len(rejects)} rejected; {len(manifest)} samples.", ""]
    for column, heading in COUNTED_COLUMNS.items():
        if column in manifest and manifest[column].astype(bool).any():
            lines += [f"## {heading}", "", _counts(manifest[column].astype(str), heading), ""]

    lines += ["## Rejects by kind", ""]
    if rejects.empty:
        lines += ["None.", ""]
    else:
        lines += ["rejects.csv has each file's rows and reason.", "", _counts(rejects["kind"], "kind", "files"), ""]

    # Ingest finds duplicates before decoding: a copy rejected since is not kept anywhere.
    kept = duplicates[duplicates["path"].isin(manifest["path"])]
    lines += ["## Duplicates (kept in their original's split)", ""]
    lines += [markdown_table(kept) if not kept.empty else "None.", ""]

    lines += ["## Split sizes by class", ""]
    labels = manifest["label"].replace("", "all samples")
    table = pd.crosstab(manifest["split"], labels).reindex(SPLIT_ORDER, fill_value=0)
    table["total"] = table.sum(axis=1)
    lines += [markdown_table(table.rename_axis("split").reset_index()), ""]
    return "\n".join(lines)
