"""Damaged copies of real files (pydicom-data, the bundled BreastMNIST), as a hospital archive or a
hostile client would bring them: one function per kind of damage, each returning the file's bytes.

Used by the fault tests, the fuzz tests, the console PHI test and benchmarks/fuzz.py.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from pathlib import Path
from typing import Iterator

import pandas as pd
import pydicom
from pydicom.data import get_testdata_file

from configs import DataConfig, TaskKind
from tasks.rejects import RejectKind

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


def unknown_vr_in_sop_class() -> bytes:
    """CT_small with SOPClassUID's VR flipped to "ZZ": decoding never reads it, the domain
    check's header facts (and ingest) do."""
    return with_vr(real("CT_small.dcm"), (0x0008, 0x0016), b"UI", b"ZZ")


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


# Damaged copies of real files as an archive holds them: file name -> (how it is made, the kind it
# must be rejected with; None: the damage is in an element nothing needs, and the file is usable).
# Each of the first six stopped a whole pipeline run once.
ARCHIVE_DAMAGE = {
    "frames_1A.dcm": (frames_not_a_number, RejectKind.CORRUPT),  # ValueError in image_facts
    "meta_vr.dcm": (unknown_vr_in_file_meta, None),  # NotImplementedError in ingest
    "syntax_two_values.dcm": (damaged_transfer_syntax, RejectKind.UNSUPPORTED_SYNTAX),  # AttributeError in ingest
    "palette_without_lut.dcm": (palette_without_lookup_table, RejectKind.CORRUPT),  # AttributeError in a worker
    "slope_not_a_number.dcm": (rescale_slope_not_a_number, RejectKind.CORRUPT),  # UFuncTypeError
    "bomb.png": (png_bomb, RejectKind.TOO_LARGE),  # 140 KB for 12000 x 12000: it was decoded
    "syntax_unknown.dcm": (unknown_transfer_syntax, RejectKind.UNSUPPORTED_SYNTAX),
    "syntax_mislabelled.dcm": (mislabelled_transfer_syntax, RejectKind.UNSUPPORTED_SYNTAX),
    "garbage.png": (png_with_garbage_header, RejectKind.TRUNCATED),  # no IEND chunk: it ends early
    "dual_tiff.dcm": (tiff_preamble_dicom, None),  # DICOM by "DICM", whatever its preamble says
}


# ---------------------------------------------------------------- fuzzing

# Real files of every encoding the decoders handle, each a fuzzing seed: native little and big endian,
# implicit VR, deflate, RLE (multi-frame), JPEG baseline, JPEG 2000, JPEG-LS, no file meta (palette),
# RGB, and a real PNG.
FUZZ_SOURCES = ("CT_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "image_dfl.dcm",
                "emri_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm", "MR_small_jpeg_ls_lossless.dcm",
                "OT-PAL-8-face.dcm", "US1_UNCR.dcm", "693_UNCR.dcm")
# The Image Pixel, VOI/modality LUT, padding and palette elements decoding reads.
PIXEL_TAGS = [(0x0028, element) for element in (0x0002, 0x0004, 0x0006, 0x0008, 0x0010, 0x0011, 0x0100, 0x0101,
                                                0x0102, 0x0103, 0x0120, 0x0121, 0x1050, 0x1051, 0x1052, 0x1053,
                                                0x1055, 0x1056, 0x1101, 0x1102, 0x1103, 0x2110, 0x2114)]
META_TAGS = [(0x0002, element) for element in (0x0000, 0x0001, 0x0002, 0x0003, 0x0010, 0x0012)]
BAD_TEXT = [b"1A", b"-1", b"0", b"65536", b"99999999", b"1\\2", b"abc", b"", b"NaN", b"1e308", b"\xff\xfe", b"MONOCHROME3",
            b"1.2.840.10008.1.2.4.50", b"1.2.840.10008.1.2.5", b"1.2.3.4.5.6.7.8.9"]


def real_png() -> bytes:
    """A real BreastMNIST ultrasound image as a PNG."""
    import numpy as np
    from PIL import Image
    from sample_data.breastmnist import BUNDLED_NPZ

    out = io.BytesIO()
    Image.fromarray(np.load(BUNDLED_NPZ)["test_images"][0]).save(out, "PNG")
    return out.getvalue()


def _source(name: str) -> bytes:
    return real_png() if name == "breastmnist.png" else real(name)


def _value_bytes(rng: random.Random, length: int, text: bool) -> bytes:
    """`length` bytes an element could wrongly hold: a bad string padded or cut, or random bytes."""
    if text and rng.random() < 0.7:
        return rng.choice(BAD_TEXT).ljust(length, b" ")[:length]
    return bytes(rng.randrange(256) for _ in range(length))


def _pixel_data_offset(data: bytes) -> int:
    found = [i for i in (data.find(b"\xe0\x7f\x10\x00"), data.find(b"\x7f\xe0\x00\x10")) if i > 0]
    return min(found) if found else len(data)


def _elements(data: bytes, tags: list[tuple[int, int]]) -> list[tuple[int, int, bool]]:
    """(offset, length, is text) of each of `tags` the data set holds, from pydicom's raw reading."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
    except Exception:
        return []
    found = []
    for tag in tags:
        raw = ds._dict.get(pydicom.tag.Tag(*tag))
        if raw is not None and getattr(raw, "value_tell", None) is not None and raw.length not in (0, 0xFFFFFFFF):
            found.append((raw.value_tell, raw.length, raw.VR in (None, "IS", "DS", "CS", "UI", "LO", "SH")))
    return found


def _meta_elements(data: bytes) -> list[tuple[int, int, bool]]:
    """(offset, length, is text) of the file meta elements, explicit VR little endian by the standard."""
    found = []
    for tag in META_TAGS:
        offset = data.find(struct.pack("<HH", *tag), 132, 400)
        if offset < 0:
            continue
        vr = data[offset + 4:offset + 6]
        if vr in (b"OB", b"UN"):
            length, start = struct.unpack("<I", data[offset + 8:offset + 12])[0], offset + 12
        else:
            length, start = struct.unpack("<H", data[offset + 6:offset + 8])[0], offset + 8
        found.append((start, length, vr == b"UI"))
    return found


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One random damage to a real file: a cut at a random offset, bit flips in its header, an
    invalid value in a pixel-relevant element, or in the file meta; and what was done."""
    how = rng.choice(["truncate", "bit flips", "pixel element", "file meta"])
    if how == "truncate":
        return data[:rng.randrange(len(data))], how
    if how == "bit flips":
        out = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(_pixel_data_offset(data))] ^= 1 << rng.randrange(8)
        return bytes(out), how
    elements = _elements(data, PIXEL_TAGS) if how == "pixel element" else _meta_elements(data)
    if not elements:
        return data[:rng.randrange(len(data))], "truncate"
    offset, length, text = rng.choice(elements)
    return data[:offset] + _value_bytes(rng, length, text) + data[offset + length:], how


def fuzzed(seed: int, count: int) -> Iterator[tuple[str, bytes, str]]:
    """`count` damaged copies of the fuzzing seeds (FUZZ_SOURCES and a real PNG), deterministic for
    `seed`: (name, bytes, what was done)."""
    rng = random.Random(seed)
    sources = {name: _source(name) for name in (*FUZZ_SOURCES, "breastmnist.png")}
    for index in range(count):
        name = rng.choice(sorted(sources))
        data, how = mutate(sources[name], rng)
        suffix = ".png" if name.endswith(".png") else ".dcm"
        yield f"fuzz{index:05d}_{Path(name).stem}{suffix}", data, how


def add_fuzzed_files(root: Path, seed: int, count: int) -> tuple[DataConfig, dict[str, str]]:
    """`count` fuzzed files (`fuzzed`) added under `root/fuzz` to the real classification data set
    at `root` (manifest.csv: path, label, split), as benign training rows so that ingest still
    splits: the data set's config and each fuzzed file's damage, by its manifest path."""
    (root / "fuzz").mkdir()
    cases = {}
    for name, data, how in fuzzed(seed, count):
        (root / "fuzz" / name).write_bytes(data)
        cases[f"fuzz/{name}"] = how
    manifest = pd.read_csv(root / "manifest.csv")
    extra = pd.DataFrame({"path": list(cases), "label": "benign", "split": "train"})
    pd.concat([manifest, extra]).to_csv(root / "manifest.csv", index=False)
    return DataConfig(root=root, manifest=root / "manifest.csv", task=TaskKind.CLASSIFICATION,
                      label_names=["benign", "malignant"]), cases


def without_preamble_and_meta(data: bytes) -> bytes:
    """A DICOM file's data set alone: the 128-byte preamble, "DICM" and the file meta cut off."""
    # The file meta starts with (0002,0000) UL, explicit VR little endian: the
    # group's length in bytes after this 12-byte element.
    assert data[128:140] == b"DICM\x02\x00\x00\x00UL\x04\x00"
    return data[144 + struct.unpack("<I", data[140:144])[0]:]
