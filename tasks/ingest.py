"""Ingest: a folder of images plus a CSV manifest -> usable samples, rejects and splits.

Every file found under the data root and every file the manifest names is
"discovered"; each ends up either usable or rejected with a reason, so
discovered = usable + rejected always holds.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.errors import InvalidDicomError
from sklearn.model_selection import StratifiedGroupKFold

from configs import DataConfig, TaskKind
from tasks.io import sha256_file

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
MANIFEST_COLUMNS = ["path", "format", "patient_key", "split", "target", "label", "sha256"]
REJECT_COLUMNS = ["path", "reason"]
AGE_BINS = 5  # regression splits are stratified on age quintiles
_AGE_PATTERN = re.compile(r"^(\d{1,3})([DWMY]?)$")
_DAYS_PER_UNIT = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25, "": 365.25}


class ManifestError(ValueError):
    """A manifest that cannot be used at all; the message names the file and column or row."""


@dataclass
class IngestResult:
    manifest: pd.DataFrame  # MANIFEST_COLUMNS, one row per usable sample
    rejects: pd.DataFrame  # REJECT_COLUMNS
    discovered: int
    patients_from_files: int  # samples with no patient id: each file is its own patient

    def summary(self) -> dict[str, int]:
        counts = {"discovered": self.discovered, "usable": len(self.manifest),
                  "rejected": len(self.rejects)}
        for split in SPLITS:
            counts[f"split_{split}"] = int((self.manifest["split"] == split).sum())
        return counts


def patient_key(patient_id: str, salt: str) -> str:
    """Salted hash of a patient id: stable within a site, meaningless outside it."""
    return hashlib.sha256(f"{salt}\0{patient_id}".encode()).hexdigest()[:16]


def parse_dicom_age(value: str) -> float | None:
    """PatientAge ('064Y', '006M', '012W', '003D', '081') in years, or None."""
    match = _AGE_PATTERN.match(str(value).strip().upper())
    if not match:
        return None
    number, unit = match.groups()
    return int(number) * _DAYS_PER_UNIT[unit] / 365.25


def _parse_da(value: str) -> date | None:
    text = str(value).strip()
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def dicom_age(ds: pydicom.Dataset) -> float | None:
    """Age at the study: PatientAge, else StudyDate - PatientBirthDate."""
    if ds.get("PatientAge"):
        age = parse_dicom_age(ds.PatientAge)
        if age is not None:
            return age
    birth, study = _parse_da(ds.get("PatientBirthDate", "")), _parse_da(ds.get("StudyDate", ""))
    if birth and study and study >= birth:
        return (study - birth).days / 365.25
    return None


def read_dicom_header(path: Path) -> pydicom.Dataset | None:
    """The header of a DICOM file (pixel data left unread), or None if it is not DICOM."""
    try:
        return pydicom.dcmread(path, defer_size=1024)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, AttributeError, KeyError):
        return None


def discover_files(root: Path, manifest_path: Path) -> list[str]:
    """Files under root, as sorted POSIX paths relative to root; hidden files and the manifest skipped."""
    manifest_path = manifest_path.resolve()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            full = Path(dirpath) / name
            if name.startswith(".") or full.resolve() == manifest_path:
                continue
            found.append(full.relative_to(root).as_posix())
    return sorted(found)


def read_manifest(path: Path, data: DataConfig) -> pd.DataFrame:
    """The CSV as strings, its columns checked against the task."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read manifest CSV: {exc}") from exc
    frame.columns = [c.strip() for c in frame.columns]
    frame = frame.rename(columns={theirs: ours for ours, theirs in data.columns.items()})
    if not data.use_manifest_split:
        frame = frame.drop(columns=["split"], errors="ignore")
    if "path" not in frame.columns:
        raise ManifestError(f"{path}: manifest has no 'path' column (columns: {list(frame.columns)})")
    if data.task is TaskKind.CLASSIFICATION and "label" not in frame.columns:
        raise ManifestError(f"{path}: classification manifest needs a 'label' column")
    if data.task is TaskKind.REGRESSION and "label" in frame.columns and "age" not in frame.columns:
        raise ManifestError(f"{path}: regression manifest has 'label' but no 'age' column")
    if frame.empty:
        raise ManifestError(f"{path}: manifest has no rows")
    frame["row"] = np.arange(2, len(frame) + 2)  # CSV line numbers, header is line 1
    return frame


def _class_target(row: pd.Series, data: DataConfig) -> tuple[float | None, str | None]:
    label = row["label"].strip()
    if label not in data.label_names:
        return None, f"row {row['row']}: label {label!r} is not one of {data.label_names}"
    return float(data.label_names.index(label)), None


def _age_target(row: pd.Series, header: pydicom.Dataset | None, data: DataConfig) -> tuple[float | None, str | None]:
    text = str(row.get("age", "")).strip()
    if text:
        try:
            age = float(text)
        except ValueError:
            return None, f"row {row['row']}: age {text!r} is not a number"
    else:
        age = dicom_age(header) if header is not None else None
        if age is None:
            return None, f"row {row['row']}: no age in the manifest or the DICOM header"
    low, high = data.age_range
    if not (math.isfinite(age) and low <= age <= high):
        return None, f"row {row['row']}: age {age:g} is outside the plausible range {low:g}-{high:g}"
    return age, None


def _split_value(row: pd.Series) -> tuple[str | None, str | None]:
    raw = str(row.get("split", "")).strip().lower()
    if not raw:
        return None, None
    if raw not in SPLIT_ALIASES:
        return None, f"row {row['row']}: split {raw!r} is not one of {list(SPLITS)}"
    return SPLIT_ALIASES[raw], None


def assign_splits(keys: pd.Series, strata: pd.Series, data: DataConfig, seed: int) -> pd.Series:
    """Patient-disjoint train/val/test, stratified by `strata`, deterministic for a seed."""
    def holdout(index: pd.Index, fraction: float, salt: int) -> pd.Index:
        n_splits = max(2, round(1 / fraction))
        n_groups = keys[index].nunique()
        if n_groups < n_splits:
            raise ManifestError(f"too few patients ({n_groups}) to hold out a {fraction:.0%} split")
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed + salt)
        _, held = next(splitter.split(np.zeros(len(index)), strata[index], keys[index]))
        return index[held]

    split = pd.Series("train", index=keys.index)
    test = holdout(keys.index, data.split.test_fraction, 0)
    split[test] = "test"
    rest = keys.index.difference(test)
    val = holdout(rest, data.split.val_fraction / (1 - data.split.test_fraction), 1)
    split[val] = "val"
    return split


def _check_given_splits(manifest: pd.DataFrame, source: Path) -> None:
    per_patient = manifest.groupby("patient_key")["split"].nunique()
    shared = int((per_patient > 1).sum())
    if shared:
        raise ManifestError(f"{source}: the split column puts {shared} patients in more than one "
                            "split; fix it, or drop the column to let medxfer make patient-disjoint splits")


def ingest_dataset(data: DataConfig, seed: int, salt: str) -> IngestResult:
    """Match manifest rows to files, read DICOM headers, and split by patient."""
    root = Path(data.root)
    table = read_manifest(data.manifest, data)
    on_disk = set(discover_files(root, data.manifest))
    rejects: list[tuple[str, str]] = []
    rows: list[dict] = []
    no_patient = 0

    table["full"] = [root / p.strip() for p in table["path"]]
    table["rel"] = [f.relative_to(root).as_posix() if f.is_relative_to(root) else str(f) for f in table["full"]]
    rows_per_file = table.groupby("rel")["row"].agg(list)
    duplicated = rows_per_file[rows_per_file.map(len) > 1]
    for rel, line_numbers in duplicated.items():
        rejects.append((rel, f"rows {', '.join(map(str, line_numbers))} all name this file"))
    listed = set(table["rel"])

    for _, row in table[~table["rel"].isin(duplicated.index)].iterrows():
        rel, full = row["rel"], row["full"]
        if not full.is_file():
            rejects.append((rel, f"row {row['row']}: file not found"))
            continue
        header = read_dicom_header(full)
        if data.task is TaskKind.CLASSIFICATION:
            target, problem = _class_target(row, data)
        else:
            target, problem = _age_target(row, header, data)
        split, split_problem = _split_value(row)
        problem = problem or split_problem
        if problem:
            rejects.append((rel, problem))
            continue
        sha = sha256_file(full)
        patient_id = str(row.get("patient_id", "")).strip()
        if not patient_id and header is not None:
            patient_id = str(header.get("PatientID", "")).strip()
        if not patient_id:
            no_patient += 1
            patient_id = f"file:{sha}"
        rows.append({
            "path": rel,
            "format": "dicom" if header is not None else "image",
            "patient_key": patient_key(patient_id, salt),
            "split": split,
            "target": target,
            "label": data.label_names[int(target)] if data.task is TaskKind.CLASSIFICATION else "",
            "sha256": sha,
        })

    for rel in sorted(on_disk - listed):
        rejects.append((rel, "not listed in the manifest"))

    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    if manifest.empty:
        raise ManifestError(f"{data.manifest}: no usable samples ({len(rejects)} rejected)")
    given = manifest["split"].notna()
    if given.all():
        _check_given_splits(manifest, data.manifest)
    else:
        if given.any():
            log.warning("split column is filled on only some rows; making new splits for all")
        if data.task is TaskKind.CLASSIFICATION:
            strata = manifest["target"].astype(int)
        else:
            strata = pd.Series(pd.qcut(manifest["target"], q=AGE_BINS, labels=False, duplicates="drop"),
                               index=manifest.index)
        manifest["split"] = assign_splits(manifest["patient_key"], strata, data, seed)

    for split in SPLITS:
        in_split = manifest[manifest["split"] == split]
        if in_split.empty:
            raise ManifestError(f"{data.manifest}: the {split!r} split is empty")
        # AUC, sensitivity and early stopping are undefined without every class present.
        missing = set(data.label_names) - set(in_split["label"]) if data.label_names else set()
        if missing:
            raise ManifestError(f"{data.manifest}: the {split!r} split has no {sorted(missing)} samples")
    if no_patient:
        log.warning("%d samples have no patient id in the manifest or header; each is treated "
                    "as its own patient, so splits cannot guard against same-patient leakage", no_patient)
    return IngestResult(manifest=manifest.reset_index(drop=True),
                        rejects=pd.DataFrame(rejects, columns=REJECT_COLUMNS),
                        discovered=len(on_disk | listed),
                        patients_from_files=no_patient)
