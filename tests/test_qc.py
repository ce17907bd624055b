import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from tasks.ingest import DUPLICATE_COLUMNS, MANIFEST_COLUMNS, REJECT_COLUMNS
from tasks.decode import load_grey
from tasks.rejects import UnreadableImage
from tasks.qc import qc_report, reject_reason_kind

from tests.conftest import qc_section


def _reason(path: Path, data: bytes) -> str:
    """What preprocessing rejects `data` with."""
    path.write_bytes(data)
    with pytest.raises(UnreadableImage) as info:
        load_grey(path)
    return str(info.value)


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_reasons_with_file_specific_tails_count_together_by_kind(tmp_path):
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    j2k = Path(get_testdata_file("JPEG2000.dcm")).read_bytes()
    rle = Path(get_testdata_file("emri_small_RLE.dcm")).read_bytes()
    image = Image.fromarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64))
    jpeg = io.BytesIO()
    image.save(jpeg, "JPEG")
    # Real files cut short: each reason below ends in words that name this one file's damage.
    reasons = {
        "cut_pixels_a.dcm": _reason(tmp_path / "a.dcm", ct[:-500]),  # "... (32406 vs 32768 bytes) ..."
        "cut_pixels_b.dcm": _reason(tmp_path / "b.dcm", ct[:len(ct) // 2]),  # "... (13303 vs 32768 bytes) ..."
        "cut_header_a.dcm": _reason(tmp_path / "c.dcm", j2k[:892]),  # "No tag to read at file position 37C"
        "cut_header_b.dcm": _reason(tmp_path / "d.dcm", ct[:3852]),  # "unpack requires a buffer of 4 bytes"
        "cut_rle.dcm": _reason(tmp_path / "e.dcm", rle[:len(rle) // 2]),  # preprocessing's own words
        "cut_a.jpg": _reason(tmp_path / "a.jpg", jpeg.getvalue()[:300]),
        "cut_b.jpg": _reason(tmp_path / "b.jpg", jpeg.getvalue()[:-300]),
        "copy_a.dcm": "row 7: duplicate of train/a.dcm (row 2, same SOPInstanceUID), which is in the 'train' split",
        "copy_b.dcm": "row 8: duplicate of train/b.dcm (row 3, same SOPInstanceUID), which is in the 'train' split",
        "copy_c.dcm": "row 9: duplicate of val/c.dcm (row 4, same stored pixels), which is in the 'val' split",
        "gone_a.dcm": "row 10: file not found",
        "gone_b.dcm": "row 11: file not found",
    }
    assert len(set(reasons.values())) == len(reasons)  # twelve reasons, seven kinds below
    assert reject_reason_kind(reasons["cut_pixels_a.dcm"]) == (
        "corrupt DICOM: cannot decode Explicit VR Little Endian pixel data")
    rejects = pd.DataFrame(reasons.items(), columns=REJECT_COLUMNS)
    manifest = pd.DataFrame([{"path": "train/a.dcm", "split": "train", "label": "benign"}], columns=MANIFEST_COLUMNS)
    report = qc_report("t", manifest.fillna(""), rejects, pd.DataFrame(columns=DUPLICATE_COLUMNS))
    assert {reason: int(count) for reason, count in qc_section(report, "Rejects by reason")} == {
        "corrupt DICOM: cannot decode Explicit VR Little Endian pixel data": 2,
        "corrupt DICOM": 2,
        "corrupt DICOM: pixel data is truncated or unreadable": 1,
        "corrupt JPEG": 2,
        "duplicate of a file in the 'train' split (same SOPInstanceUID)": 2,
        "duplicate of a file in the 'val' split (same stored pixels)": 1,
        "file not found": 2,
    }
    assert rejects["reason"].tolist() == list(reasons.values())  # the full reasons stay for rejects.csv


def test_duplicates_rejected_after_ingest_are_not_listed_as_kept():
    manifest = pd.DataFrame({"path": ["a.dcm", "copy.dcm"], "split": "train", "label": "benign"},
                            columns=MANIFEST_COLUMNS).fillna("")
    duplicates = pd.DataFrame([["copy.dcm", "a.dcm", "stored pixels"], ["broken.dcm", "a.dcm", "SOPInstanceUID"]],
                              columns=DUPLICATE_COLUMNS)
    rejects = pd.DataFrame([["broken.dcm", "DICOM has no pixel data"]], columns=REJECT_COLUMNS)
    report = qc_report("t", manifest, rejects, duplicates)
    assert qc_section(report, "Duplicates (kept in their original's split)") == [
        ["copy.dcm", "a.dcm", "stored pixels"]]
