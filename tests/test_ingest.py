import errno
import os
import shutil
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from configs import DataConfig, TaskKind
from tasks import ingest
from tasks.formats import detect_format
from tasks.ingest import (
    DICOMDIR,
    ManifestError,
    NotEnoughData,
    check_enough_samples,
    dicom_age,
    image_facts,
    ingest_dataset,
    parse_dicom_age,
    patient_key,
    read_dicom_header,
)

SALT = "test-salt"


def facts(data: bytes) -> dict:
    """What ingest records about a file's content."""
    fmt = detect_format(data)
    return image_facts(data, fmt, read_dicom_header(data, fmt))


def rejected(result) -> dict[str, tuple[str, str, str]]:
    """An ingest result's rejects as {path: (kind, rows, reason)}."""
    return {row.path: (row.kind, row.rows, row.reason) for row in result.rejects.itertuples()}


def classification_data(root, **extra) -> DataConfig:
    return DataConfig(root=root, manifest=root / "manifest.csv", task=TaskKind.CLASSIFICATION,
                      label_names=["benign", "malignant"], **extra)


def copy_dataset(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_bundled_dicoms_ingest_with_official_splits_and_hashed_patients(breast_dicom_dir):
    result = ingest_dataset(classification_data(breast_dicom_dir), seed=0, salt=SALT)
    manifest = result.manifest
    assert result.discovered == 120 and len(manifest) == 120 and result.rejects.empty
    assert manifest["split"].value_counts().to_dict() == {"train": 40, "val": 40, "test": 40}
    assert set(manifest["label"]) == {"benign", "malignant"}
    assert (manifest["format"] == "dicom").all()
    # Patient ids come from the DICOM header and appear only as salted hashes.
    first = pydicom.dcmread(breast_dicom_dir / manifest.loc[0, "path"])
    assert manifest.loc[0, "patient_key"] == patient_key(first.PatientID, SALT)
    assert not manifest.astype(str).apply(lambda col: col.str.contains("BMN-")).any().any()


def test_bad_rows_and_files_are_rejected_with_reasons(tmp_path, breast_dicom_dir):
    root = copy_dataset(breast_dicom_dir, tmp_path / "data")
    manifest = pd.read_csv(root / "manifest.csv")
    (root / "stray.txt").write_text("not listed anywhere")
    extra = pd.DataFrame([
        {"path": "train/missing.dcm", "label": "benign", "split": "train"},
        {"path": manifest.loc[1, "path"], "label": "malignant", "split": "train"},  # listed twice
        {"path": manifest.loc[2, "path"], "label": "2", "split": "train"},
        {"path": manifest.loc[3, "path"], "label": "benign", "split": "trian"},
    ])
    manifest = manifest.drop(index=[2, 3])  # re-listed above, with a bad label and a bad split
    pd.concat([manifest, extra]).to_csv(root / "manifest.csv", index=False)

    result = ingest_dataset(classification_data(root), seed=0, salt=SALT)
    # CSV lines: the header is 1, the 118 rows kept are 2-119 (index 1 is line 3), the extra rows 120-123.
    assert result.rejects.values.tolist() == [
        [manifest.loc[1, "path"], "duplicate", "3 121", "the manifest names this file on more than one row"],
        ["train/missing.dcm", "not found", "120", "file not found"],
        [extra.loc[2, "path"], "bad label", "122", "label '2' is not one of ['benign', 'malignant']"],
        [extra.loc[3, "path"], "bad split", "123", "split 'trian' is not one of ['train', 'val', 'test']"],
        ["stray.txt", "not in manifest", "", "not listed in the manifest"],
    ]
    assert result.discovered == len(result.manifest) + len(result.rejects) == 120 + 2  # + stray, missing
    assert len(result.manifest) == 120 - 3  # the file listed twice, the bad label, the bad split


def test_image_facts_name_the_transfer_syntax_preprocess_infers():
    # File meta without (0002,0010): the QC report shows the syntax the data set
    # is read and decoded as, marked as inferred, not just "none".
    data = Path(get_testdata_file("meta_missing_tsyntax.dcm")).read_bytes()
    assert facts(data)["transfer_syntax"] == "Implicit VR Little Endian (inferred)"
    # A syntax the file names is shown as it is.
    data = Path(get_testdata_file("MR_small_bigendian.dcm")).read_bytes()
    assert facts(data)["transfer_syntax"] == "Explicit VR Big Endian"


def test_dicom_without_preamble_is_read_as_dicom(tmp_path):
    # preprocess decodes DICOM without the 128-byte preamble (with or without
    # file meta), so ingest must read its header too: its patient, study and
    # facts, not "an image" with no patient that could land in any split.
    stripped = Path(get_testdata_file("CT_small.dcm")).read_bytes()[132:]  # preamble and "DICM"
    header = read_dicom_header(stripped, detect_format(stripped))
    assert header is not None and header.PatientID == "1CT1"
    assert facts(stripped)["transfer_syntax"] == "Explicit VR Little Endian"
    bare = Path(get_testdata_file("OT-PAL-8-face.dcm")).read_bytes()  # no preamble, no file meta
    bare_facts = facts(bare)
    assert (bare_facts["photometric"], bare_facts["image_size"], bare_facts["transfer_syntax"]) == (
        "PALETTE COLOR", "480x640", "Implicit VR Little Endian (inferred)")


def test_dicom_age_from_header_dates_and_patient_age():
    rg1 = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"), stop_before_pixels=True)
    assert rg1.get("PatientAge") is None
    assert dicom_age(rg1) == pytest.approx(64.47, abs=0.01)  # 1940-03-05 to 2004-08-26
    assert parse_dicom_age("064Y") == 64
    assert parse_dicom_age("006M") == pytest.approx(0.5)
    assert parse_dicom_age("081") == 81
    assert parse_dicom_age("0x4Y") is None


def test_regression_ages_from_header_and_bad_ages_rejected(tmp_path):
    root = tmp_path / "cr"
    root.mkdir()
    files = ["RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG3_UNCR.dcm", "US1_UNCR.dcm", "MR_small.dcm", "CT_small.dcm"]
    for name in files:
        shutil.copy(get_testdata_file(name), root / name)
    pd.DataFrame({"path": files, "age": ["", "", "", "40", "sixty", "200"],
                  "split": ["train", "train", "val", "test", "test", "test"]}).to_csv(root / "manifest.csv", index=False)
    data = DataConfig(root=root, manifest=root / "manifest.csv", task=TaskKind.REGRESSION)
    result = ingest_dataset(data, seed=0, salt=SALT)
    ages = dict(zip(result.manifest["path"], result.manifest["target"]))
    assert ages == pytest.approx({"RG1_UNCR.dcm": 64.47, "RG1_J2KR.dcm": 64.47, "RG3_UNCR.dcm": 25.38,
                                  "US1_UNCR.dcm": 40.0}, abs=0.01)
    assert rejected(result) == {"MR_small.dcm": ("bad label", "6", "age 'sixty' is not a number"),
                                "CT_small.dcm": ("bad label", "7", "age 200 is outside the plausible range 0-120")}
    # One patient (RG1) in two files gets one key.
    keys = dict(zip(result.manifest["path"], result.manifest["patient_key"]))
    assert keys["RG1_UNCR.dcm"] == keys["RG1_J2KR.dcm"] != keys["RG3_UNCR.dcm"]


def test_given_split_missing_a_split_is_an_error(tmp_path, breast_dicom_dir):
    root = copy_dataset(breast_dicom_dir, tmp_path / "data")
    manifest = pd.read_csv(root / "manifest.csv")
    manifest.loc[manifest["split"] == "test", "split"] = "val"
    manifest.to_csv(root / "manifest.csv", index=False)
    with pytest.raises(ManifestError, match="'test' split is empty"):
        ingest_dataset(classification_data(root), seed=0, salt=SALT)


def test_generated_splits_are_patient_disjoint_stratified_and_deterministic(tmp_path, breast_dicom_dir):
    root = copy_dataset(breast_dicom_dir, tmp_path / "data")
    manifest = pd.read_csv(root / "manifest.csv").drop(columns="split")
    manifest["patient_id"] = [f"P{i // 3}" for i in range(len(manifest))]  # 3 images per patient
    manifest.to_csv(root / "manifest.csv", index=False)
    data = classification_data(root)
    first = ingest_dataset(data, seed=7, salt=SALT).manifest
    again = ingest_dataset(data, seed=7, salt=SALT).manifest
    other = ingest_dataset(data, seed=8, salt=SALT).manifest
    assert first["split"].tolist() == again["split"].tolist()
    assert first["split"].tolist() != other["split"].tolist()
    assert (first.groupby("patient_key")["split"].nunique() == 1).all()
    for split in ("train", "val", "test"):
        assert set(first.loc[first["split"] == split, "label"]) == {"benign", "malignant"}
    test_share = (first["split"] == "test").mean()
    assert 0.1 < test_share < 0.3


def test_given_splits_that_share_a_patient_fail_loudly(tmp_path, breast_dicom_dir):
    root = copy_dataset(breast_dicom_dir, tmp_path / "data")
    manifest = pd.read_csv(root / "manifest.csv")
    manifest["patient_id"] = "same-person"
    manifest.to_csv(root / "manifest.csv", index=False)
    with pytest.raises(ManifestError, match="puts 1 patients in more than one split"):
        ingest_dataset(classification_data(root), seed=0, salt=SALT)


def test_split_without_a_class_is_an_error(tmp_path, breast_dicom_dir):
    root = copy_dataset(breast_dicom_dir, tmp_path / "data")
    manifest = pd.read_csv(root / "manifest.csv")
    manifest = manifest[~((manifest["split"] == "val") & (manifest["label"] == "malignant"))]
    manifest.to_csv(root / "manifest.csv", index=False)
    with pytest.raises(ManifestError, match=r"'val' split has no \['malignant'\] samples"):
        ingest_dataset(classification_data(root), seed=0, salt=SALT)


def test_manifest_without_label_column_is_an_error(tmp_path, breast_dicom_dir):
    root = copy_dataset(breast_dicom_dir, tmp_path / "data")
    pd.read_csv(root / "manifest.csv").drop(columns="label").to_csv(root / "manifest.csv", index=False)
    with pytest.raises(ManifestError, match="needs a 'label' column"):
        ingest_dataset(classification_data(root), seed=0, salt=SALT)


def test_unreadable_files_are_rejected_in_words_and_the_run_goes_on(tmp_path, breast_dicom_dir, monkeypatch):
    root = copy_dataset(breast_dicom_dir, tmp_path / "data")
    manifest = pd.read_csv(root / "manifest.csv")
    (root / "train" / "empty.dcm").write_bytes(b"")
    locked = root / "train" / "locked.dcm"
    shutil.copyfile(root / manifest.loc[0, "path"], locked)
    locked.chmod(0)
    if os.geteuid() == 0:
        # root reads a mode-000 file anyway, so the permission error chmod gives
        # other users is raised by hand here, for this one file only.
        def denied(path, *args, **kwargs):
            if Path(path) == locked:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return open(path, *args, **kwargs)
        monkeypatch.setattr(ingest, "open", denied, raising=False)
    (root / "train" / "ring_a.dcm").symlink_to("ring_b.dcm")
    (root / "train" / "ring_b.dcm").symlink_to("ring_a.dcm")
    (root / "train" / "back_to_root").symlink_to(root, target_is_directory=True)
    shutil.copyfile(get_testdata_file("DICOMDIR"), root / "DICOMDIR")
    shutil.copyfile(get_testdata_file("DICOMDIR"), root / "train" / "index")
    listed = ["train/empty.dcm", "train/locked.dcm", "train/ring_a.dcm", "train/index"]
    extra = pd.DataFrame({"path": listed, "label": "benign", "split": "train"})
    pd.concat([manifest, extra]).to_csv(root / "manifest.csv", index=False)

    result = ingest_dataset(classification_data(root), seed=0, salt=SALT)
    rejects = rejected(result)
    first_extra_row = len(manifest) + 2
    assert rejects["train/empty.dcm"] == ("empty", str(first_extra_row), "empty file (0 bytes)")
    assert rejects["train/locked.dcm"] == ("unreadable", str(first_extra_row + 1),
                                           "cannot read the file: Permission denied (check its permissions)")
    assert rejects["train/ring_a.dcm"] == ("unreadable", str(first_extra_row + 2),
                                           "symlink loop: the link leads back to itself")
    assert rejects["train/index"] == ("not an image", str(first_extra_row + 3), DICOMDIR.detail)
    assert rejects["train/ring_b.dcm"] == ("not in manifest", "", "symlink loop: the link leads back to itself; "
                                                                  "not listed in the manifest")
    assert rejects["train/back_to_root"] == ("not in manifest", "", "symlink loop: a folder link to a folder that "
                                                                    "is already scanned; not listed in the manifest")
    assert rejects["DICOMDIR"] == ("not in manifest", "", f"{DICOMDIR.detail}; not listed in the manifest")
    assert len(result.manifest) == 120 and len(result.rejects) == 7
    assert result.discovered == len(result.manifest) + len(result.rejects)


def test_a_folder_that_cannot_be_read_is_rejected_not_skipped(tmp_path, breast_dicom_dir, monkeypatch):
    root = copy_dataset(breast_dicom_dir, tmp_path / "data")
    locked = root / "train" / "more"
    locked.mkdir()
    shutil.copyfile(root / "train" / "img0000.dcm", locked / "unlisted.dcm")
    locked.chmod(0)
    if os.access(locked, os.R_OK):
        # root lists a mode-000 folder anyway, so the error chmod gives other
        # users is raised by hand here, for this one folder only (os.walk lists through os.scandir).
        real_scandir = os.scandir

        def denied(path=".", *args, **kwargs):
            if Path(path) == locked:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_scandir(path, *args, **kwargs)
        monkeypatch.setattr(os, "scandir", denied)
    try:
        result = ingest_dataset(classification_data(root), seed=0, salt=SALT)
    finally:
        monkeypatch.undo()
        locked.chmod(0o700)  # so that the folder can be cleaned up
    assert result.rejects.values.tolist() == [
        ["train/more", "not in manifest", "", "cannot read folder: Permission denied; not listed in the manifest"]]
    assert result.discovered == len(result.manifest) + len(result.rejects) == 121


def test_too_few_usable_samples_of_a_class_is_an_error(breast_dicom_dir):
    result = ingest_dataset(classification_data(breast_dicom_dir), seed=0, salt=SALT)
    counts = result.manifest["label"].value_counts()
    check_enough_samples(result.manifest, classification_data(breast_dicom_dir,
                                                              min_usable_per_class=int(counts.min())))
    with pytest.raises(NotEnoughData, match=rf"malignant: {counts['malignant']}"):
        check_enough_samples(result.manifest, classification_data(breast_dicom_dir,
                                                                  min_usable_per_class=counts["malignant"] + 1))


def _relabelled_copy(src: Path, dst: Path, *, new_instance: bool, new_study: bool, patient: str) -> None:
    """A copy of a real file under another patient id (and optionally new study/instance UIDs)."""
    ds = pydicom.dcmread(src)
    ds.PatientID = patient
    if new_instance:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if new_study:
        ds.StudyInstanceUID = generate_uid()
    ds.save_as(dst)


@pytest.fixture
def dataset_with_copies(tmp_path, breast_dicom_dir):
    """The real subset plus: a re-export of image 0 under another patient (same SOPInstanceUID),
    image 1's pixels as a new instance of another patient, and another patient (image 50
    mirrored) in image 2's study."""
    root = copy_dataset(breast_dicom_dir, tmp_path / "data")
    manifest = pd.read_csv(root / "manifest.csv")
    src = [root / p for p in manifest["path"][:3]]
    _relabelled_copy(src[0], root / "sop_copy.dcm", new_instance=False, new_study=True, patient="P-A")
    _relabelled_copy(src[1], root / "pixel_copy.dcm", new_instance=True, new_study=True, patient="P-B")
    other = pydicom.dcmread(root / manifest.loc[50, "path"])
    other.PatientID, other.StudyInstanceUID = "P-C", pydicom.dcmread(src[2]).StudyInstanceUID
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    other.PixelData = other.pixel_array[:, ::-1].tobytes()  # mirrored: linked by the study alone
    other.save_as(root / "same_study.dcm")
    extra = pd.DataFrame({"path": ["sop_copy.dcm", "pixel_copy.dcm", "same_study.dcm"],
                          "label": manifest["label"][[0, 1, 50]].tolist(), "split": ["test", "train", "val"]})
    pd.concat([manifest, extra]).to_csv(root / "manifest.csv", index=False)
    return root, list(manifest["path"][:3])


def test_duplicates_and_studies_never_span_generated_splits(dataset_with_copies):
    root, (first, second, third) = dataset_with_copies
    result = ingest_dataset(classification_data(root, use_manifest_split=False), seed=0, salt=SALT)
    split = dict(zip(result.manifest["path"], result.manifest["split"]))
    assert len(result.manifest) == 123 and result.rejects.empty
    assert split["sop_copy.dcm"] == split[first]
    assert split["pixel_copy.dcm"] == split[second]
    assert split["same_study.dcm"] == split[third]
    assert result.duplicates.values.tolist() == [["sop_copy.dcm", first, "SOPInstanceUID"],
                                                 ["pixel_copy.dcm", second, "stored pixels"]]
    # The manifest carries salted keys and header facts, never the identifiers themselves.
    text = result.manifest.to_csv()
    for ds in (pydicom.dcmread(root / first), pydicom.dcmread(root / "same_study.dcm")):
        for identifier in (ds.PatientID, str(ds.PatientName), ds.StudyInstanceUID, ds.SOPInstanceUID,
                           ds.PatientBirthDate):
            assert identifier not in text
    assert set(result.manifest["modality"]) == {"US"} and set(result.manifest["image_size"]) == {"28x28"}


def test_given_splits_reject_a_copy_in_another_split_and_refuse_a_shared_study(dataset_with_copies):
    root, (first, second, _) = dataset_with_copies
    manifest = pd.read_csv(root / "manifest.csv")
    manifest.loc[manifest["path"] == "same_study.dcm", "split"] = "train"  # with its study
    manifest.to_csv(root / "manifest.csv", index=False)
    result = ingest_dataset(classification_data(root), seed=0, salt=SALT)
    assert result.rejects.values.tolist() == [  # the copy is CSV line 122, its original line 2
        ["sop_copy.dcm", "leak", "122", f"duplicate of {first} (row 2, same SOPInstanceUID), which is in the 'train' split"]]
    # A copy in its original's split does not leak: kept, and reported.
    assert result.duplicates.values.tolist() == [["pixel_copy.dcm", second, "stored pixels"]]
    assert result.discovered == len(result.manifest) + len(result.rejects) == 123

    manifest.loc[manifest["path"] == "same_study.dcm", "split"] = "val"
    manifest.to_csv(root / "manifest.csv", index=False)
    with pytest.raises(ManifestError, match="puts 1 studies in more than one split"):
        ingest_dataset(classification_data(root), seed=0, salt=SALT)
