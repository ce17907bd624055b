"""The QC report: counts by header fact and label, rejects by kind, duplicates, split sizes."""

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from tasks.decode import load_grey
from tasks.ingest import DUPLICATE_COLUMNS, MANIFEST_COLUMNS
from tasks.qc import qc_report
from tasks.rejects import Reject, RejectKind, UnreadableImage, rejects_frame

from tests.conftest import qc_section


def _reject(data: bytes) -> Reject:
    """What preprocessing rejects `data` with."""
    with pytest.raises(UnreadableImage) as info:
        load_grey(Path("file"), data=data)
    return info.value.reject()


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_rejects_count_by_kind_whatever_each_files_detail(tmp_path):
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    j2k = Path(get_testdata_file("JPEG2000.dcm")).read_bytes()
    rle = Path(get_testdata_file("emri_small_RLE.dcm")).read_bytes()
    image = Image.fromarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64))
    jpeg = io.BytesIO()
    image.save(jpeg, "JPEG")
    # Real files cut short or undecodable: each detail names this one file's damage.
    rejects = {
        "cut_pixels_a.dcm": _reject(ct[:-500]),  # "... holds 32268 of the 32768 bytes ..."
        "cut_pixels_b.dcm": _reject(ct[:len(ct) // 2]),  # "... holds 13303 of the 32768 bytes ..."
        "cut_header_a.dcm": _reject(j2k[:892]),  # inside the header: it does not parse
        "cut_rle.dcm": _reject(rle[:len(rle) // 2]),
        "cut_a.jpg": _reject(jpeg.getvalue()[:300]),
        # pydicom's decoders fail with a message of several lines.
        "lossy_12bit.dcm": _reject(Path(get_testdata_file("JPEG-lossy.dcm")).read_bytes()),
        "copy_a.dcm": Reject(RejectKind.LEAK, "duplicate of train/a.dcm (row 2, same SOPInstanceUID), which is in "
                                              "the 'train' split", (7,)),
        "copy_b.dcm": Reject(RejectKind.LEAK, "duplicate of val/c.dcm (row 4, same stored pixels), which is in "
                                              "the 'val' split", (9,)),
        "gone_a.dcm": Reject(RejectKind.NOT_FOUND, "file not found", (10,)),
        "gone_b.dcm": Reject(RejectKind.NOT_FOUND, "file not found", (11,)),
    }
    table = rejects_frame(rejects.items())
    manifest = pd.DataFrame([{"path": "train/a.dcm", "split": "train", "label": "benign"}], columns=MANIFEST_COLUMNS)
    report = qc_report("t", manifest.fillna(""), table, pd.DataFrame(columns=DUPLICATE_COLUMNS))
    assert {kind: int(count) for kind, count in qc_section(report, "Rejects by kind")} == {
        "truncated": 4, "corrupt": 1, "decoder limitation": 1, "leak": 2, "not found": 2}
    # rejects.csv keeps each file's rows and one-line detail.
    assert table["rows"].tolist()[-4:] == ["7", "9", "10", "11"]
    assert table["reason"].tolist() == [r.detail for r in rejects.values()]
    assert not table["reason"].str.contains("\n").any()
    section = report.split("## Rejects by kind\n", 1)[1].split("\n## ", 1)[0]
    assert "| kind | files |" in section
    assert all(line.count("|") == 3 for line in section.splitlines() if line.startswith("|"))


def test_duplicates_rejected_after_ingest_are_not_listed_as_kept():
    manifest = pd.DataFrame({"path": ["a.dcm", "copy.dcm"], "split": "train", "label": "benign"},
                            columns=MANIFEST_COLUMNS).fillna("")
    duplicates = pd.DataFrame([["copy.dcm", "a.dcm", "stored pixels"], ["broken.dcm", "a.dcm", "SOPInstanceUID"]],
                              columns=DUPLICATE_COLUMNS)
    rejects = rejects_frame([("broken.dcm", Reject(RejectKind.NO_PIXEL_DATA, "DICOM has no pixel data"))])
    report = qc_report("t", manifest, rejects, duplicates)
    assert qc_section(report, "Duplicates (kept in their original's split)") == [
        ["copy.dcm", "a.dcm", "stored pixels"]]
