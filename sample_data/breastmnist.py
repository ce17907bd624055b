"""Write the bundled BreastMNIST sample out as a folder of DICOM files plus a manifest.

BreastMNIST (MedMNIST v2, CC BY 4.0) is real breast ultrasound from the BUSI
dataset, downsampled to 28x28. Its labels run 0 = malignant, 1 = normal or benign;
the manifest names them "malignant" and "benign" so the direction cannot be mixed up.
The DICOM headers carry placeholder patient names, ids, birth dates and accession
numbers so the privacy checks have something real to look for (and a PACS demo has the
key a RIS export uses); they belong to no person.
"""

from __future__ import annotations

import argparse
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid

from tasks.io import atomic_path, write_csv_atomic

BUNDLED_NPZ = Path(__file__).resolve().parent / "breastmnist.npz"
LABEL_NAMES = {0: "malignant", 1: "benign"}  # BreastMNIST's own encoding
OFFICIAL_SPLITS = ("train", "val", "test")
STUDY_DATE = date(2018, 6, 1)


def placeholder_identity(index: int) -> dict[str, str]:
    """Made-up, person-free PHI for sample `index`, stable across runs."""
    birth = date(1950, 1, 1) + timedelta(days=97 * index % 15000)
    return {
        "PatientName": f"Sample^Breast{index:04d}",
        "PatientID": f"BMN-{index:04d}",
        "PatientBirthDate": birth.strftime("%Y%m%d"),
        "AccessionNumber": f"BMNA{index:05d}",
    }


def ultrasound_dicom(pixels: np.ndarray, index: int) -> pydicom.Dataset:
    """An 8-bit MONOCHROME2 ultrasound image with deterministic UIDs."""
    entropy = [f"medxfer-breastmnist-{index}"]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=entropy + ["sop"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=entropy + ["study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=entropy + ["series"])
    ds.Modality = "US"
    ds.StudyDate = STUDY_DATE.strftime("%Y%m%d")
    for key, value in placeholder_identity(index).items():
        setattr(ds, key, value)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    return ds


def write_breastmnist_dicom(out_dir: Path, npz_path: Path = BUNDLED_NPZ,
                            per_split: int | None = None) -> Path:
    """Write DICOMs and `manifest.csv` (path, label, split); returns the manifest path.

    `per_split` keeps the first N images of each official split, for quick tests.
    """
    out_dir = Path(out_dir)
    data = np.load(npz_path)
    rows = []
    index = 0
    for split in OFFICIAL_SPLITS:
        images, labels = data[f"{split}_images"], data[f"{split}_labels"].reshape(-1)
        count = len(images) if per_split is None else min(per_split, len(images))
        for pixels, label in zip(images[:count], labels[:count]):
            rel = f"{split}/img{index:04d}.dcm"
            with atomic_path(out_dir / rel) as tmp:
                ultrasound_dicom(pixels, index).save_as(tmp, enforce_file_format=True)
            # No patient_id column: ingest reads PatientID from the header and hashes it.
            rows.append({"path": rel, "label": LABEL_NAMES[int(label)], "split": split})
            index += 1
    return write_csv_atomic(pd.DataFrame(rows), out_dir / "manifest.csv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--per-split", type=int, default=None)
    args = parser.parse_args()
    manifest = write_breastmnist_dicom(args.out_dir, per_split=args.per_split)
    print(f"wrote {manifest}")


if __name__ == "__main__":
    main()
