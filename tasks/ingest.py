"""Ingest: a folder of images plus a CSV manifest -> usable samples, rejects and splits.

Every file found under the data root and every file the manifest names is
"discovered"; each ends up either usable or rejected with a reason, so
discovered = usable + rejected always holds.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import math
import os
import re
import stat
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import MediaStorageDirectoryStorage
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import StratifiedGroupKFold

from configs import DataConfig, TaskKind
from tasks.dicom import inferred_transfer_syntax, looks_like_raw_dicom

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
# No column holds a name, id, date, UID or institution: patients, studies and
# instances appear only as salted hashes, and the rest is what the QC report counts.
MANIFEST_COLUMNS = ["path", "format", "patient_key", "study_key", "instance_key", "split", "target",
                    "label", "sha256", "pixel_sha256", "modality", "photometric", "transfer_syntax",
                    "image_size", "frames", "sop_class", "body_part"]
REJECT_COLUMNS = ["path", "reason"]
DUPLICATE_COLUMNS = ["path", "duplicate_of", "same"]
# Samples that share any of these must share a split (the QC report names the last two).
LEAKAGE_KEYS = {"patient_key": "patient", "study_key": "study",
                "instance_key": "SOPInstanceUID", "pixel_sha256": "stored pixels"}
AGE_BINS = 5  # regression splits are stratified on age quintiles
_AGE_PATTERN = re.compile(r"^(\d{1,3})([DWMY]?)$")
_DAYS_PER_UNIT = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25, "": 365.25}


class ManifestError(ValueError):
    """A manifest that cannot be used at all; the message names the file and column or row.
    `rejects` (REJECT_COLUMNS): the files rejected before it was raised, once files were examined."""

    rejects: pd.DataFrame | None = None


class NotEnoughData(ValueError):
    """Too few usable samples (of some class) to train on; the message gives the counts."""


@dataclass
class IngestResult:
    manifest: pd.DataFrame  # MANIFEST_COLUMNS, one row per usable sample
    rejects: pd.DataFrame  # REJECT_COLUMNS
    discovered: int
    patients_from_files: int  # samples with no patient id: each file is its own patient
    duplicates: pd.DataFrame  # DUPLICATE_COLUMNS: usable copies, each in its original's split

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


def read_dicom_header(source: Path | bytes) -> pydicom.Dataset | None:
    """A DICOM data set (from a path, pixel data left unread), or None if it is not DICOM."""
    try:
        if isinstance(source, bytes):
            # A file without the preamble needs force=True, and preprocess
            # decodes such files, so read their header (PatientID, facts) too;
            # anything else is read unforced, where junk cannot pass as DICOM.
            return pydicom.dcmread(io.BytesIO(source), force=looks_like_raw_dicom(source))
        return pydicom.dcmread(source, defer_size=1024)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, AttributeError, KeyError):
        return None


def image_facts(data: bytes, header: pydicom.Dataset | None) -> dict[str, object]:
    """What the QC report counts and the domain check compares (no patient data): modality,
    photometric interpretation, transfer syntax, size, frames, SOP class, body part, and a
    hash of the stored pixels."""
    facts = header_facts(data, header)
    if header is None:
        return facts | {"pixel_sha256": hashlib.sha256(data).hexdigest()}
    pixels = header.get("PixelData")
    # Stored pixels plus their geometry: a re-exported copy with edited tags still matches.
    geometry = f"{header.get('Rows')}x{header.get('Columns')}x{header.get('NumberOfFrames', 1)}"
    pixel_hash = hashlib.sha256(geometry.encode() + bytes(pixels)).hexdigest() if pixels else ""
    return facts | {"pixel_sha256": pixel_hash}


def header_facts(data: bytes, header: pydicom.Dataset | None) -> dict[str, object]:
    """`image_facts` without the pixel hash: what a single request is checked on."""
    if header is None:
        try:
            with Image.open(io.BytesIO(data)) as img:
                size, mode, kind = img.size, img.mode, img.format or ""
        except (UnidentifiedImageError, OSError, ValueError):
            size, mode, kind = (0, 0), "", ""
        return {"format": "image", "modality": "", "photometric": mode, "transfer_syntax": kind,
                "image_size": f"{size[1]}x{size[0]}", "frames": 1, "sop_class": "", "body_part": ""}
    syntax = getattr(header, "file_meta", pydicom.Dataset()).get("TransferSyntaxUID")
    if syntax:
        syntax_name = syntax.name
    else:  # what preprocess will decode it as, marked as a guess
        inferred = inferred_transfer_syntax(header)
        syntax_name = f"{inferred.name} (inferred)" if inferred else "none in file"
    sop_class = header.get("SOPClassUID")
    return {"format": "dicom",
            "modality": str(header.get("Modality", "")),
            "photometric": str(header.get("PhotometricInterpretation", "")),
            "transfer_syntax": syntax_name,
            "image_size": f"{header.get('Rows', 0)}x{header.get('Columns', 0)}",
            "frames": int(header.get("NumberOfFrames") or 1),
            # The standard's name of the class (a public constant, not an instance UID).
            "sop_class": str(getattr(sop_class, "name", sop_class or "")),
            "body_part": str(header.get("BodyPartExamined", "")).strip()}


def discover_files(root: Path, manifest_path: Path) -> list[str]:
    """Files under root, as sorted POSIX paths relative to root; hidden files and the manifest skipped.

    Folder links are followed, except to a folder already scanned (a symlink
    loop, or a second link to the same folder): such a link is listed itself,
    so it is rejected with its reason rather than silently skipped or walked forever.
    A folder that cannot be read is listed itself too, for the same reason.
    """
    manifest_path = os.path.realpath(manifest_path)
    scanned = {os.path.realpath(root)}
    found = []

    def unreadable(exc: OSError) -> None:
        found.append(Path(exc.filename).relative_to(root).as_posix())

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unreadable):
        descend = []
        for name in sorted(d for d in dirnames if not d.startswith(".")):
            real = os.path.realpath(Path(dirpath) / name)
            if real in scanned:
                found.append((Path(dirpath) / name).relative_to(root).as_posix())
            else:
                scanned.add(real)
                descend.append(name)
        dirnames[:] = descend
        for name in filenames:
            full = Path(dirpath) / name
            # realpath, not Path.resolve: a symlink loop must be listed, not raise.
            if name.startswith(".") or os.path.realpath(full) == manifest_path:
                continue
            found.append(full.relative_to(root).as_posix())
    return sorted(found)


def file_problem(path: Path) -> str | None:
    """Why `path` cannot be read as an image file, in words; None when it can be opened and has bytes."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return "broken symlink: its target does not exist" if path.is_symlink() else "file not found"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop: the link leads back to itself"
        return f"cannot read the file: {exc.strerror}"
    if stat.S_ISDIR(info.st_mode):
        try:
            os.scandir(path).close()
        except OSError as exc:
            return f"cannot read folder: {exc.strerror}"
        if path.is_symlink():
            return "symlink loop: a folder link to a folder that is already scanned"
        return "a folder, not a file"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file (a device, pipe or socket)"
    if info.st_size == 0:
        return "empty file (0 bytes)"
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        return f"cannot read the file: {exc.strerror} (check its permissions)"
    return None


def is_dicomdir(header: pydicom.Dataset | None) -> bool:
    """A DICOMDIR: the index of a DICOM CD or folder, which holds no image itself."""
    if header is None:
        return False
    meta = getattr(header, "file_meta", None)
    return (meta is not None and meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage) \
        or "DirectoryRecordSequence" in header


DICOMDIR_REASON = "DICOMDIR: the index of a DICOM CD or folder, not an image"


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


def check_enough_samples(manifest: pd.DataFrame, data: DataConfig) -> None:
    """Raise NotEnoughData when a class (or, for regression, the whole set) has fewer than
    `data.min_usable_per_class` usable samples."""
    minimum = data.min_usable_per_class
    if data.task is TaskKind.CLASSIFICATION:
        counts = manifest["label"].value_counts().reindex(data.label_names, fill_value=0)
    else:
        counts = pd.Series({"all ages": len(manifest)})
    short = counts[counts < minimum]
    if not short.empty:
        found = ", ".join(f"{name}: {count}" for name, count in short.items())
        raise NotEnoughData(f"{data.manifest}: fewer usable samples than data.min_usable_per_class "
                            f"({minimum}): {found}; see the rejects report for what was dropped")


def assign_splits(keys: pd.Series, strata: pd.Series, data: DataConfig, seed: int) -> pd.Series:
    """Group-disjoint train/val/test (`keys`: patient, or leakage_groups), stratified by
    `strata`, deterministic for a seed."""
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


def leakage_groups(manifest: pd.DataFrame) -> pd.Series:
    """A group id per sample: samples that share a patient, study, SOPInstanceUID or stored
    pixels (directly or through others) share a group, and a group must stay in one split."""
    parent = list(range(len(manifest)))

    def root_of(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for column in LEAKAGE_KEYS:
        first: dict[str, int] = {}
        for i, value in enumerate(manifest[column]):
            if value:
                parent[root_of(i)] = root_of(first.setdefault(value, i))
    return pd.Series([root_of(i) for i in range(len(manifest))], index=manifest.index)


def find_duplicates(manifest: pd.DataFrame) -> pd.DataFrame:
    """Each later sample with the same SOPInstanceUID or stored pixels as an earlier one."""
    found = {}
    for column in ("instance_key", "pixel_sha256"):
        keyed = manifest[manifest[column] != ""]
        originals = keyed.groupby(column)["path"].transform("first")
        for path, original in zip(keyed["path"], originals):
            if path != original and path not in found:
                found[path] = (original, LEAKAGE_KEYS[column])
    return pd.DataFrame([(path, *found[path]) for path in found], columns=DUPLICATE_COLUMNS)


def _reject_duplicates_across_given_splits(manifest: pd.DataFrame, duplicates: pd.DataFrame,
                                           rejects: list[tuple[str, str]], row_of: dict[str, int]) -> pd.DataFrame:
    """Given splits are the site's own: a copy filed under another split than its original is
    rejected (it would leak), and a copy in the same split is kept. `row_of`: path -> CSV line."""
    split_of = dict(zip(manifest["path"], manifest["split"]))
    crosses = [split_of[p] != split_of[o] for p, o in zip(duplicates["path"], duplicates["duplicate_of"])]
    leaking = duplicates.loc[np.array(crosses, dtype=bool)]
    for path, original, same in leaking.itertuples(index=False):
        rejects.append((path, f"row {row_of[path]}: duplicate of {original} (row {row_of[original]}, "
                              f"same {same}), which is in the {split_of[original]!r} split"))
    return manifest[~manifest["path"].isin(leaking["path"])]


def _check_given_splits(manifest: pd.DataFrame, source: Path) -> None:
    for column, what in (("patient_key", "patients"), ("study_key", "studies")):
        keyed = manifest[manifest[column] != ""]
        shared = int((keyed.groupby(column)["split"].nunique() > 1).sum())
        if shared:
            raise ManifestError(f"{source}: the split column puts {shared} {what} in more than one "
                                "split; fix it, or drop the column to let medxfer make patient-disjoint splits")


def _split_samples(manifest: pd.DataFrame, rejects: list[tuple[str, str]], data: DataConfig, seed: int,
                   row_of: dict[str, int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The usable samples with their splits, and their duplicates; a copy that would leak across
    given splits moves to `rejects`. Raises ManifestError when the splits cannot be used."""
    if manifest.empty:
        raise ManifestError(f"{data.manifest}: no usable samples ({len(rejects)} rejected)")
    duplicates = find_duplicates(manifest)
    given = manifest["split"].notna()
    if given.all():
        manifest = _reject_duplicates_across_given_splits(manifest, duplicates, rejects, row_of)
        duplicates = duplicates[duplicates["path"].isin(manifest["path"])]
        _check_given_splits(manifest, data.manifest)
    else:
        if given.any():
            log.warning("split column is filled on only some rows; making new splits for all")
        if data.task is TaskKind.CLASSIFICATION:
            strata = manifest["target"].astype(int)
        else:
            strata = pd.Series(pd.qcut(manifest["target"], q=AGE_BINS, labels=False, duplicates="drop"),
                               index=manifest.index)
        manifest["split"] = assign_splits(leakage_groups(manifest), strata, data, seed)

    for split in SPLITS:
        in_split = manifest[manifest["split"] == split]
        if in_split.empty:
            raise ManifestError(f"{data.manifest}: the {split!r} split is empty")
        # AUC, sensitivity and early stopping are undefined without every class present.
        missing = set(data.label_names) - set(in_split["label"]) if data.label_names else set()
        if missing:
            raise ManifestError(f"{data.manifest}: the {split!r} split has no {sorted(missing)} samples")
    return manifest, duplicates


def ingest_dataset(data: DataConfig, seed: int, salt: str) -> IngestResult:
    """Match manifest rows to files, read DICOM headers, find duplicates, and split so that no
    patient, study or duplicated image spans two splits."""
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
        problem = file_problem(full)
        if problem:
            rejects.append((rel, f"row {row['row']}: {problem}"))
            continue
        content = full.read_bytes()
        header = read_dicom_header(content)
        if is_dicomdir(header):
            rejects.append((rel, f"row {row['row']}: {DICOMDIR_REASON}"))
            continue
        if data.task is TaskKind.CLASSIFICATION:
            target, problem = _class_target(row, data)
        else:
            target, problem = _age_target(row, header, data)
        split, split_problem = _split_value(row)
        problem = problem or split_problem
        if problem:
            rejects.append((rel, problem))
            continue
        sha = hashlib.sha256(content).hexdigest()
        patient_id = str(row.get("patient_id", "")).strip()
        if not patient_id and header is not None:
            patient_id = str(header.get("PatientID", "")).strip()
        if not patient_id:
            no_patient += 1
            patient_id = f"file:{sha}"
        study_uid = str(header.get("StudyInstanceUID", "")).strip() if header is not None else ""
        instance_uid = str(header.get("SOPInstanceUID", "")).strip() if header is not None else ""
        rows.append({
            "path": rel,
            "patient_key": patient_key(patient_id, salt),
            "study_key": patient_key(f"study:{study_uid}", salt) if study_uid else "",
            "instance_key": patient_key(f"instance:{instance_uid}", salt) if instance_uid else "",
            "split": split,
            "target": target,
            "label": data.label_names[int(target)] if data.task is TaskKind.CLASSIFICATION else "",
            "sha256": sha,
            **image_facts(content, header),
        })

    for rel in sorted(on_disk - listed):
        full = root / rel
        problem = file_problem(full) or (DICOMDIR_REASON if is_dicomdir(read_dicom_header(full)) else None)
        rejects.append((rel, f"{problem}; not listed in the manifest" if problem else "not listed in the manifest"))

    try:
        manifest, duplicates = _split_samples(pd.DataFrame(rows, columns=MANIFEST_COLUMNS), rejects, data, seed,
                                              dict(zip(table["rel"], table["row"])))
    except ManifestError as exc:
        # The rejects often say why (every file unreadable, a class lost to bad files): the flow reports them.
        exc.rejects = pd.DataFrame(rejects, columns=REJECT_COLUMNS)
        raise
    if no_patient:
        log.warning("%d samples have no patient id in the manifest or header; each is treated "
                    "as its own patient, so splits cannot guard against same-patient leakage", no_patient)
    return IngestResult(manifest=manifest.reset_index(drop=True),
                        rejects=pd.DataFrame(rejects, columns=REJECT_COLUMNS),
                        discovered=len(on_disk | listed),
                        patients_from_files=no_patient,
                        duplicates=duplicates.reset_index(drop=True))
