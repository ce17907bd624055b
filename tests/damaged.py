"""Damaged copies of real files (pydicom-data, the bundled BreastMNIST), as a hospital archive or a
hostile client would bring them: one function per kind of damage, each returning the file's bytes.

Used by the fault tests, the fuzz tests, the console PHI test and benchmarks/fuzz.py.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

# What the PHI tests look for: identifiers put into damaged headers (see `with_marker_identifiers`).
MARKER_PATIENT_ID = "PHIMARKER7731"
MARKER_PATIENT_NAME = "MARKERSON^PHILIPPA"
MARKER_INSTITUTION = "PHIMARKER GENERAL INFIRMARY"
MARKER_ACCESSION = "PHIACC55102"
MARKER_UID_PART = "99173301"  # a SOPInstanceUID made invalid around this run of digits
MARKERS = (MARKER_PATIENT_ID, MARKER_PATIENT_NAME, MARKER_PATIENT_NAME.replace("^", " "), MARKER_INSTITUTION,
           MARKER_ACCESSION, MARKER_UID_PART)


def real(name: str) -> bytes:
    return Path(get_testdata_file(name)).read_bytes()


def _element(data: bytes, tag: tuple[int, int], vr: bytes) -> tuple[int, int]:
    """Offset and value length of the explicit-VR little-endian element `tag` with a 2-byte length."""
    offset = data.index(struct.pack("<HH", *tag) + vr)
    return offset, struct.unpack("<H", data[offset + 6:offset + 8])[0]


def with_value(data: bytes, tag: tuple[int, int], vr: bytes, value: bytes) -> bytes:
    """`data` with the element's value replaced by `value` of the same length (so every offset,
    the file meta's group length too, stays right): damage a reader meets inside a sound file."""
    offset, length = _element(data, tag, vr)
    if len(value) != length:
        raise ValueError(f"value of {len(value)} bytes for an element of {length}")
    return data[:offset + 8] + value + data[offset + 8 + length:]


def with_vr(data: bytes, tag: tuple[int, int], vr: bytes, new_vr: bytes) -> bytes:
    """`data` with the element's VR bytes overwritten (a bit flip in the header)."""
    offset, _ = _element(data, tag, vr)
    return data[:offset + 4] + new_vr + data[offset + 6:]


def frames_not_a_number() -> bytes:
    """A real 10-frame MR whose NumberOfFrames reads "1A"."""
    return with_value(real("emri_small.dcm"), (0x0028, 0x0008), b"IS", b"1A")


def unknown_vr_in_file_meta() -> bytes:
    """CT_small with MediaStorageSOPClassUID's VR flipped to "ZZ", which no reader knows."""
    return with_vr(real("CT_small.dcm"), (0x0002, 0x0002), b"UI", b"ZZ")


def damaged_transfer_syntax() -> bytes:
    """CT_small whose TransferSyntaxUID holds a backslash: two values, neither a UID."""
    data = real("CT_small.dcm")
    offset, length = _element(data, (0x0002, 0x0010), b"UI")
    return with_value(data, (0x0002, 0x0010), b"UI", data[offset + 8:offset + 8 + length].replace(b"840.", b"840\\", 1))


def unknown_transfer_syntax() -> bytes:
    """CT_small under a well-formed DICOM-rooted UID that names no transfer syntax."""
    return with_value(real("CT_small.dcm"), (0x0002, 0x0010), b"UI", b"1.2.840.10008.1.2.99")


def mislabelled_transfer_syntax() -> bytes:
    """CT_small's native pixels filed as RLE Lossless (the meta says compressed, the pixels are not)."""
    return with_value(real("CT_small.dcm"), (0x0002, 0x0010), b"UI", b"1.2.840.10008.1.2.5\0")


def palette_without_lookup_table() -> bytes:
    """A real PALETTE COLOR ultrasound with its palette lookup table removed."""
    ds = pydicom.dcmread(get_testdata_file("examples_palette.dcm"))
    for tag in [t for t in ds.keys() if t.group == 0x0028 and 0x1100 <= t.element <= 0x1223]:
        del ds[tag]
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def rescale_slope_not_a_number() -> bytes:
    """CT_small whose RescaleSlope reads "x"."""
    return with_value(real("CT_small.dcm"), (0x0028, 0x1053), b"DS", b"x ")


def cut(data: bytes, keep: float) -> bytes:
    """The first `keep` fraction of a file: a transfer that stopped."""
    return data[:int(len(data) * keep)]


def png_bomb(side: int = 12000) -> bytes:
    """A PNG of side x side black pixels in about 140 KB (for 12000): a decompression bomb.
    Written row by row through zlib, so making it never holds the pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor, rows = zlib.compressobj(9), []
    row = bytes(side + 1)  # filter byte 0, then the row's pixels
    rows += [compressor.compress(row) for _ in range(side)]
    rows.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(rows)) + chunk(b"IEND", b"")


def png_with_garbage_header() -> bytes:
    """The PNG signature, then bytes that are no PNG: Pillow's message quotes its file object."""
    return b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


def tiff_preamble_dicom() -> bytes:
    """CT_small with a TIFF header in its 128-byte preamble (a dual-personality file, as some
    whole-slide and archive exports write): DICOM by its "DICM" at byte 128."""
    data = real("CT_small.dcm")
    preamble = (b"II*\x00" + struct.pack("<I", 8)).ljust(128, b"\0")
    return preamble + data[128:]


def with_marker_identifiers(name: str = "CT_small.dcm") -> pydicom.Dataset:
    """A real file whose patient, institution, accession and instance carry the markers;
    the SOPInstanceUID is invalid (letters in it), as damaged headers have them."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.PatientID, ds.PatientName = MARKER_PATIENT_ID, MARKER_PATIENT_NAME
    ds.InstitutionName, ds.AccessionNumber = MARKER_INSTITUTION, MARKER_ACCESSION
    ds.SOPInstanceUID = f"1.2.826.0.1.{MARKER_UID_PART}.X{MARKER_PATIENT_ID}"
    return ds


def _saved(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def marker_files() -> dict[str, bytes]:
    """Damaged real files whose headers carry the markers, each damaged so that pydicom
    complains about a value that holds one: the console PHI test's inputs."""
    base = _saved(with_marker_identifiers())
    return {
        # pydicom warns "Invalid value for VR UI: '...'" quoting the UID, when it is read.
        "invalid_uid.dcm": base,
        # PatientID read as a UID and InstitutionName as a decimal: both quoted when validated.
        "patient_id_as_uid.dcm": with_vr(base, (0x0010, 0x0020), b"LO", b"UI"),
        "institution_as_ds.dcm": with_vr(base, (0x0008, 0x0080), b"LO", b"DS"),
        # Cut inside the pixel data, and with its transfer syntax damaged.
        "cut.dcm": cut(base, 0.8),
        "bad_syntax.dcm": with_value(base, (0x0002, 0x0010), b"UI", b"1.2.840\\10008.1.2.1\0"),
        "frames_1A.dcm": with_marker_frames(),
    }


def with_marker_frames() -> bytes:
    """The 10-frame MR with the markers and NumberOfFrames "1A"."""
    ds = pydicom.dcmread(get_testdata_file("emri_small.dcm"))
    ds.PatientID, ds.InstitutionName = MARKER_PATIENT_ID, MARKER_INSTITUTION
    return with_value(_saved(ds), (0x0028, 0x0008), b"IS", b"1A")
