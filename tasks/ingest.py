"""Ingest: a folder of images plus a CSV manifest -> usable samples, rejects and splits.

Every file found under the data root and every file the manifest names is
"discovered"; each ends up either usable or rejected with a kind and a reason,
so discovered = usable + rejected always holds. Each file is examined inside
its own fault boundary: whatever one file raises makes it a reject, and the
run goes on.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import math
import os
import re
import stat
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.uid import UID, MediaStorageDirectoryStorage
from sklearn.model_selection import StratifiedGroupKFold

from configs import DataConfig, TaskKind
from tasks.dicom import code_string, element_value, header_int, read_dataset, syntax_description
from tasks.formats import ImageFormat, detect_format, open_image
from tasks.rejects import REJECT_COLUMNS, Reject, RejectKind, UnreadableImage, exception_detail, rejects_frame

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
# No column holds a name, id, date, UID or institution: patients, studies and
# instances appear only as salted hashes, and the rest is what the QC report counts.
MANIFEST_COLUMNS = ["path", "format", "patient_key", "study_key", "instance_key", "split", "target",
                    "label", "sha256", "pixel_sha256", "modality", "photometric", "transfer_syntax",
                    "image_size", "frames", "sop_class", "body_part"]
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
    """Too few usable samples (of some class) to split or train on; the message names the class
    and gives the counts. `rejects`, as for ManifestError, when ingest raised it."""

    rejects: pd.DataFrame | None = None


@dataclass
class IngestResult:
    manifest: pd.DataFrame  # MANIFEST_COLUMNS, one row per usable sample
    rejects: pd.DataFrame  # REJECT_COLUMNS (tasks.rejects)
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
    if element_value(ds, "PatientAge"):
        age = parse_dicom_age(ds.PatientAge)
        if age is not None:
            return age
    birth = _parse_da(element_value(ds, "PatientBirthDate", ""))
    study = _parse_da(element_value(ds, "StudyDate", ""))
    if birth and study and study >= birth:
        return (study - birth).days / 365.25
    return None


def read_dicom_header(data: bytes, fmt: ImageFormat, *, pixels: bool = True) -> pydicom.Dataset | None:
    """The DICOM data set of a file's bytes (pixel data included unless `pixels` is False:
    duplicates are found by it), None for PNG and JPEG. Raises UnreadableImage when a DICOM
    header does not parse."""
    if not fmt.is_dicom:
        return None
    return read_dataset(data, raw=fmt is ImageFormat.RAW_DICOM, stop_before_pixels=not pixels)


def image_facts(data: bytes, fmt: ImageFormat, header: pydicom.Dataset | None) -> dict[str, object]:
    """What the QC report counts and the domain check compares (no patient data): the
    `header_facts` and a hash of the stored pixels. Raises UnreadableImage when the header
    cannot give them (a damaged transfer syntax, a size that is no number). Only headers are
    read: decoding checks the pixel limits."""
    facts = header_facts(data, fmt, header)
    if header is None:
        return facts | {"pixel_sha256": hashlib.sha256(data).hexdigest()}
    pixels = element_value(header, "PixelData")
    # Stored pixels plus their geometry: a re-exported copy with edited tags still matches.
    geometry = f"{facts['image_size']}x{facts['frames']}"
    pixel_hash = hashlib.sha256(geometry.encode() + bytes(pixels)).hexdigest() if pixels else ""
    return facts | {"pixel_sha256": pixel_hash}


def header_facts(data: bytes, fmt: ImageFormat, header: pydicom.Dataset | None) -> dict[str, object]:
    """`image_facts` without the pixel hash, what a single request is checked on: format,
    modality, photometric interpretation (PNG/JPEG: image mode), transfer syntax, size,
    frames, SOP class and body part. Raises UnreadableImage as `image_facts` does."""
    if header is None:
        with open_image(data, fmt, max_pixels=None) as img:
            size, mode, kind = img.size, img.mode, img.format or ""
        return {"format": "image", "modality": "", "photometric": mode, "transfer_syntax": kind,
                "image_size": f"{size[1]}x{size[0]}", "frames": 1, "sop_class": "", "body_part": ""}
    rows, columns = header_int(header, "Rows", 0), header_int(header, "Columns", 0)
    return {"format": "dicom",
            "modality": code_string(header, "Modality"),
            "photometric": code_string(header, "PhotometricInterpretation"),
            "transfer_syntax": syntax_description(header),
            "image_size": f"{rows}x{columns}", "frames": header_int(header, "NumberOfFrames", 1),
            "sop_class": sop_class_name(header),
            "body_part": code_string(header, "BodyPartExamined")}


def sop_class_name(header: pydicom.Dataset) -> str:
    """The standard's name of the SOP class (a public constant, not an instance UID); an
    unknown class by its UID, a value that is no UID as "(invalid)"."""
    value = element_value(header, "SOPClassUID", "")
    if not value:
        return ""
    if not isinstance(value, str) or not UID(value).is_valid:
        return "(invalid)"
    return UID(value).name


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


def file_problem(path: Path) -> Reject | None:
    """Why `path` cannot be read as an image file; None when it can be opened and has bytes."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return Reject(RejectKind.NOT_FOUND, "broken symlink: its target does not exist" if path.is_symlink()
                      else "file not found")
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return Reject(RejectKind.UNREADABLE, "symlink loop: the link leads back to itself")
        return Reject(RejectKind.UNREADABLE, f"cannot read the file: {exc.strerror}")
    if stat.S_ISDIR(info.st_mode):
        try:
            os.scandir(path).close()
        except OSError as exc:
            return Reject(RejectKind.UNREADABLE, f"cannot read folder: {exc.strerror}")
        if path.is_symlink():
            return Reject(RejectKind.UNREADABLE, "symlink loop: a folder link to a folder that is already scanned")
        return Reject(RejectKind.NOT_AN_IMAGE, "a folder, not a file")
    if not stat.S_ISREG(info.st_mode):
        return Reject(RejectKind.UNREADABLE, "not a regular file (a device, pipe or socket)")
    if info.st_size == 0:
        return Reject(RejectKind.EMPTY, "empty file (0 bytes)")
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        return Reject(RejectKind.UNREADABLE, f"cannot read the file: {exc.strerror} (check its permissions)")
    return None


def is_dicomdir(header: pydicom.Dataset | None) -> bool:
    """A DICOMDIR: the index of a DICOM CD or folder, which holds no image itself."""
    if header is None:
        return False
    meta = getattr(header, "file_meta", None)
    try:
        sop_class = element_value(meta, "MediaStorageSOPClassUID") if meta is not None else None
    except UnreadableImage:  # a damaged file meta element this check can do without
        sop_class = None
    return sop_class == MediaStorageDirectoryStorage or "DirectoryRecordSequence" in header


DICOMDIR = Reject(RejectKind.NOT_AN_IMAGE, "DICOMDIR: the index of a DICOM CD or folder, not an image")


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


def _class_target(row: pd.Series, data: DataConfig) -> tuple[float | None, Reject | None]:
    label = row["label"].strip()
    if label not in data.label_names:
        return None, Reject(RejectKind.BAD_LABEL, f"label {label!r} is not one of {data.label_names}")
    return float(data.label_names.index(label)), None


def _age_target(row: pd.Series, header: pydicom.Dataset | None, data: DataConfig) -> tuple[float | None, Reject | None]:
    text = str(row.get("age", "")).strip()
    if text:
        try:
            age = float(text)
        except ValueError:
            return None, Reject(RejectKind.BAD_LABEL, f"age {text!r} is not a number")
    else:
        age = dicom_age(header) if header is not None else None
        if age is None:
            return None, Reject(RejectKind.BAD_LABEL, "no age in the manifest or the DICOM header")
    low, high = data.age_range
    if not (math.isfinite(age) and low <= age <= high):
        return None, Reject(RejectKind.BAD_LABEL, f"age {age:g} is outside the plausible range {low:g}-{high:g}")
    return age, None


def _split_value(row: pd.Series) -> tuple[str | None, Reject | None]:
    raw = str(row.get("split", "")).strip().lower()
    if not raw:
        return None, None
    if raw not in SPLIT_ALIASES:
        return None, Reject(RejectKind.BAD_SPLIT, f"split {raw!r} is not one of {list(SPLITS)}")
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


def _folds(fraction: float) -> int:
    """How many folds a held-out split of `fraction` takes (one of them is held out)."""
    return max(2, round(1 / fraction))


def patients_needed(data: DataConfig) -> int:
    """The fewest patients a class needs for generated splits: its share of the test folds,
    and then a full set of validation folds from the rest."""
    test_folds = _folds(data.split.test_fraction)
    val_folds = _folds(data.split.val_fraction / (1 - data.split.test_fraction))
    return next(n for n in range(test_folds, 10 * test_folds * val_folds)
                if n - math.ceil(n / test_folds) >= val_folds)


def check_splittable(groups: pd.Series, strata: pd.Series, names: dict, data: DataConfig) -> None:
    """Raise NotEnoughData, naming each short class, when a class has fewer patients (groups of
    samples linked by patient, study or duplicate) than `patients_needed`: it could not be held
    out in test and val and still be trained on. `names`: stratum -> what the message calls it."""
    needed = patients_needed(data)
    per_class = pd.DataFrame({"group": groups, "stratum": strata}).groupby("stratum")["group"].nunique()
    per_class = per_class.reindex(list(names), fill_value=0)
    short = per_class[per_class < needed]
    if not short.empty:
        found = ", ".join(f"{names[stratum]}: {count}" for stratum, count in short.items())
        raise NotEnoughData(f"{data.manifest}: too few patients to split by class; generated splits need at "
                            f"least {needed} patients per class (test fraction {data.split.test_fraction:g}, "
                            f"val fraction {data.split.val_fraction:g}): {found}; see the rejects report for "
                            "what was dropped")


def assign_splits(keys: pd.Series, strata: pd.Series, data: DataConfig, seed: int) -> pd.Series:
    """Group-disjoint train/val/test (`keys`: patient, or leakage_groups), stratified by
    `strata`, deterministic for a seed. `check_splittable` first: it says which class is short."""
    def holdout(index: pd.Index, fraction: float, salt: int) -> pd.Index:
        splitter = StratifiedGroupKFold(n_splits=_folds(fraction), shuffle=True, random_state=seed + salt)
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
                                           rejects: list[tuple[str, Reject]], row_of: dict[str, int]) -> pd.DataFrame:
    """Given splits are the site's own: a copy filed under another split than its original is
    rejected (it would leak), and a copy in the same split is kept. `row_of`: path -> CSV line."""
    split_of = dict(zip(manifest["path"], manifest["split"]))
    crosses = [split_of[p] != split_of[o] for p, o in zip(duplicates["path"], duplicates["duplicate_of"])]
    leaking = duplicates.loc[np.array(crosses, dtype=bool)]
    for path, original, same in leaking.itertuples(index=False):
        rejects.append((path, Reject(RejectKind.LEAK, f"duplicate of {original} (row {row_of[original]}, same "
                                                      f"{same}), which is in the {split_of[original]!r} split",
                                     (row_of[path],))))
    return manifest[~manifest["path"].isin(leaking["path"])]


def _check_given_splits(manifest: pd.DataFrame, source: Path) -> None:
    for column, what in (("patient_key", "patients"), ("study_key", "studies")):
        keyed = manifest[manifest[column] != ""]
        shared = int((keyed.groupby(column)["split"].nunique() > 1).sum())
        if shared:
            raise ManifestError(f"{source}: the split column puts {shared} {what} in more than one "
                                "split; fix it, or drop the column to let medxfer make patient-disjoint splits")


def _strata(manifest: pd.DataFrame, data: DataConfig) -> tuple[pd.Series, dict]:
    """What generated splits are stratified by (class index, or age quintile) and each one's name."""
    if data.task is TaskKind.CLASSIFICATION:
        return manifest["target"].astype(int), dict(enumerate(data.label_names))
    bins, edges = pd.qcut(manifest["target"], q=AGE_BINS, labels=False, retbins=True, duplicates="drop")
    names = {i: f"ages {edges[i]:.0f}-{edges[i + 1]:.0f}" for i in range(len(edges) - 1)}
    return pd.Series(bins, index=manifest.index), names


def _split_samples(manifest: pd.DataFrame, rejects: list[tuple[str, Reject]], data: DataConfig, seed: int,
                   row_of: dict[str, int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The usable samples with their splits, and their duplicates; a copy that would leak across
    given splits moves to `rejects`. Raises ManifestError when the splits cannot be used, and
    NotEnoughData when a class has too few patients to be split."""
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
        strata, names = _strata(manifest, data)
        groups = leakage_groups(manifest)
        check_splittable(groups, strata, names, data)
        manifest["split"] = assign_splits(groups, strata, data, seed)

    for split in SPLITS:
        in_split = manifest[manifest["split"] == split]
        if in_split.empty:
            raise ManifestError(f"{data.manifest}: the {split!r} split is empty")
        # AUC, sensitivity and early stopping are undefined without every class present.
        missing = set(data.label_names) - set(in_split["label"]) if data.label_names else set()
        if missing:
            raise ManifestError(f"{data.manifest}: the {split!r} split has no {sorted(missing)} samples")
    return manifest, duplicates


def _examine(row: pd.Series, data: DataConfig, salt: str) -> dict | Reject:
    """One listed file: its manifest row as a usable sample, or why not. Raises UnreadableImage
    when its bytes or header cannot be read."""
    problem = file_problem(row["full"])
    if problem:
        return problem
    content = row["full"].read_bytes()
    fmt = detect_format(content)
    header = read_dicom_header(content, fmt)
    if is_dicomdir(header):
        return DICOMDIR
    if data.task is TaskKind.CLASSIFICATION:
        target, problem = _class_target(row, data)
    else:
        target, problem = _age_target(row, header, data)
    split, split_problem = _split_value(row)
    if problem or split_problem:
        return problem or split_problem
    sha = hashlib.sha256(content).hexdigest()
    facts = image_facts(content, fmt, header)
    patient_id = str(row.get("patient_id", "")).strip()
    if not patient_id and header is not None:
        patient_id = str(element_value(header, "PatientID", "")).strip()
    study_uid = str(element_value(header, "StudyInstanceUID", "")).strip() if header is not None else ""
    instance_uid = str(element_value(header, "SOPInstanceUID", "")).strip() if header is not None else ""
    return {
        "path": row["rel"],
        # No patient id: each file is its own patient (counted by the caller).
        "patient_key": patient_key(patient_id or f"file:{sha}", salt),
        "study_key": patient_key(f"study:{study_uid}", salt) if study_uid else "",
        "instance_key": patient_key(f"instance:{instance_uid}", salt) if instance_uid else "",
        "split": split,
        "target": target,
        "label": data.label_names[int(target)] if data.task is TaskKind.CLASSIFICATION else "",
        "sha256": sha,
        "patient_from_file": not patient_id,
        **facts,
    }


def _examine_unlisted(path: Path) -> Reject:
    """A file under the root that the manifest does not name: why it is not used. Only what
    says more than "not listed" is added: a problem reading it, or that it is a DICOMDIR."""
    problem = file_problem(path)
    if problem is None:
        content = path.read_bytes()
        try:
            fmt = detect_format(content)
            if fmt.is_dicom and is_dicomdir(read_dicom_header(content, fmt)):
                problem = DICOMDIR
        except UnreadableImage:  # not an image, or a damaged one: not listed says enough
            pass
    detail = f"{problem.detail}; not listed in the manifest" if problem else "not listed in the manifest"
    return Reject(RejectKind.NOT_IN_MANIFEST, detail)


def _bounded(examine, *args) -> dict | Reject:
    """`examine(*args)` inside one file's fault boundary: whatever it raises is that file's
    reject (an unexpected error as kind `unexpected`, its traceback at DEBUG only)."""
    try:
        return examine(*args)
    except UnreadableImage as exc:
        return exc.reject()
    except Exception as exc:
        log.debug("unexpected error examining a file", exc_info=True)
        return Reject(RejectKind.UNEXPECTED, exception_detail(exc))


def ingest_dataset(data: DataConfig, seed: int, salt: str) -> IngestResult:
    """Match manifest rows to files, read DICOM headers, find duplicates, and split so that no
    patient, study or duplicated image spans two splits. The entry point for any source of
    files: a folder (`data.root`) and a manifest that names files under it."""
    root = Path(data.root)
    table = read_manifest(data.manifest, data)
    on_disk = set(discover_files(root, data.manifest))
    rejects: list[tuple[str, Reject]] = []
    rows: list[dict] = []

    table["full"] = [root / p.strip() for p in table["path"]]
    table["rel"] = [f.relative_to(root).as_posix() if f.is_relative_to(root) else str(f) for f in table["full"]]
    rows_per_file = table.groupby("rel")["row"].agg(list)
    duplicated = rows_per_file[rows_per_file.map(len) > 1]
    for rel, line_numbers in duplicated.items():
        rejects.append((rel, Reject(RejectKind.DUPLICATE, "the manifest names this file on more than one row",
                                    tuple(line_numbers))))
    listed = set(table["rel"])

    for _, row in table[~table["rel"].isin(duplicated.index)].iterrows():
        examined = _bounded(_examine, row, data, salt)
        if isinstance(examined, Reject):
            rejects.append((row["rel"], replace(examined, rows=(row["row"],))))
        else:
            rows.append(examined)
    for rel in sorted(on_disk - listed):
        unlisted = _bounded(_examine_unlisted, root / rel)
        if unlisted.kind is not RejectKind.NOT_IN_MANIFEST:  # it raised: still a file the manifest lacks
            unlisted = Reject(RejectKind.NOT_IN_MANIFEST, f"{unlisted.detail}; not listed in the manifest")
        rejects.append((rel, unlisted))
    for reject in rejects:
        log.info("rejected %s (%s): %s", reject[0], reject[1].kind.value, reject[1].message())

    samples = pd.DataFrame(rows, columns=[*MANIFEST_COLUMNS, "patient_from_file"])
    no_patient = int(samples["patient_from_file"].sum())
    try:
        manifest, duplicates = _split_samples(samples.drop(columns="patient_from_file"), rejects, data, seed,
                                              dict(zip(table["rel"], table["row"])))
    except (ManifestError, NotEnoughData) as exc:
        # The rejects often say why (every file unreadable, a class lost to bad files): the flow reports them.
        exc.rejects = rejects_frame(rejects)
        raise
    if no_patient:
        log.warning("%d samples have no patient id in the manifest or header; each is treated "
                    "as its own patient, so splits cannot guard against same-patient leakage", no_patient)
    return IngestResult(manifest=manifest.reset_index(drop=True),
                        rejects=rejects_frame(rejects),
                        discovered=len(on_disk | listed),
                        patients_from_files=no_patient,
                        duplicates=duplicates.reset_index(drop=True))
