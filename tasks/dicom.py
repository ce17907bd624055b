"""How a DICOM file is encoded, when the file does not say: shared by ingest and preprocess.

Ingest reads headers and preprocess decodes pixels from the same files, so
both must recognise the same files as DICOM and infer the same transfer
syntax. Only pydicom here: ingest runs without importing torch.
"""

from __future__ import annotations

import struct

import pydicom
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian


def inferred_transfer_syntax(ds: pydicom.Dataset) -> UID | None:
    """The transfer syntax of a data set whose file meta names none; None when it cannot be inferred.

    Old or hand-made files may have no file meta. The encoding pydicom worked
    out while parsing (implicit or explicit VR, little or big endian) is then
    the transfer syntax, but only for native pixel data: compressed
    (encapsulated) pixel data needs the real UID to say which codec.
    """
    if "PixelData" in ds and ds["PixelData"].is_undefined_length:
        return None
    implicit, little = ds.original_encoding[:2]
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def looks_like_raw_dicom(data: bytes) -> bool:
    """Whether `data` starts like a DICOM data set without the 128-byte preamble and "DICM"."""
    # dcmread(force=True) "succeeds" on almost any bytes, so only use it when
    # the file starts like a DICOM data set without the 128-byte preamble: a
    # first element in the file meta (0002) or identifying (0008) group, little
    # or big endian, whose VR (explicit) or length (implicit) is plausible.
    if len(data) < 8:
        return False
    for endian in "<>":
        group, _element = struct.unpack(endian + "HH", data[:4])
        if group not in (0x0002, 0x0008):
            continue
        vr = data[4:6]
        if vr.isalpha() and vr.isupper():
            return True
        (length,) = struct.unpack(endian + "I", data[4:8])
        if endian == "<" and length < len(data):
            return True
    return False
