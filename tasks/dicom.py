"""Reading a DICOM header the same way wherever it is read: ingest (facts, patient keys) and
decoding (pixels) must agree on what a file is, how it is encoded and what its header says.

Every value taken from a header is checked before use: a damaged file raises
`UnreadableImage` with a kind, never a ValueError from deep inside, and no
header value is ever quoted in a message (a damaged header can hold a name
where a number belongs). Only pydicom here: ingest runs without importing torch.
"""

from __future__ import annotations

import io
import re
import struct
from typing import NamedTuple

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import (UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, HTJ2K, ImplicitVRLittleEndian,
                         JPEG2000, JPEG2000MC, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless)

from tasks.phi import install_filters
from tasks.rejects import RejectKind, UnreadableImage, exception_detail

# Every DICOM reader of the project imports this module, so the header-value filter on
# pydicom's logs and warnings is in place wherever a header can be read: a flow, a
# process-pool or Dask worker, the service, a CLI.
install_filters()

PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Transfer syntaxes whose codecs may discard information (JPEG 2000 and HTJ2K under
# these UIDs may also be coded reversibly; LossyImageCompression says which).
LOSSY_SYNTAXES = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000, JPEG2000MC, HTJ2K})
_CODE_STRING = re.compile(r"^[A-Z0-9_ ]{0,16}$")  # VR CS: upper case, digits, space, underscore


def read_dataset(data: bytes, *, raw: bool, stop_before_pixels: bool = False) -> pydicom.Dataset:
    """The data set in `data` (`raw`: no preamble; read with force). Raises UnreadableImage:
    not an image when forced reading finds no DICOM, corrupt when the header does not parse."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=raw, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as exc:
        raise UnreadableImage(RejectKind.NOT_AN_IMAGE, "not a DICOM, PNG or JPEG file") from exc
    except Exception as exc:  # pydicom raises many types on malformed input
        raise UnreadableImage(RejectKind.CORRUPT, f"the DICOM header does not parse: {exception_detail(exc)}") from exc
    if raw and not any(k in ds for k in ("SOPClassUID", "Rows", "Modality", *PIXEL_DATA_KEYWORDS)):
        raise UnreadableImage(RejectKind.NOT_AN_IMAGE, "not a DICOM, PNG or JPEG file")
    return ds


def element_value(ds: pydicom.Dataset, keyword: str, default=None):
    """An element's value, with pydicom's failures to convert it (an unknown VR, bytes that
    are not text) as a corrupt-header reject that names the element."""
    try:
        return ds.get(keyword, default)
    except Exception as exc:
        raise UnreadableImage(RejectKind.CORRUPT, f"the DICOM header's {keyword} cannot be read: "
                                                  f"{type(exc).__name__}") from exc


def header_int(ds: pydicom.Dataset, keyword: str, default: int | None = None) -> int | None:
    """An integer element (IS, US, UL...), `default` when absent or empty; a value that is not
    one whole number is a corrupt header."""
    value = element_value(ds, keyword)
    if value is None or value == "":
        return default
    try:
        number = float(value)
        if number != int(number):
            raise ValueError
        return int(number)
    except (TypeError, ValueError, OverflowError) as exc:
        raise UnreadableImage(RejectKind.CORRUPT, f"the DICOM header's {keyword} is not a whole number") from exc


def header_float(ds: pydicom.Dataset, keyword: str, index: int = 0) -> float | None:
    """The `index`-th number of a decimal element (DS, FD...), None when absent; a value that
    is not a number is a corrupt header."""
    value = element_value(ds, keyword)
    if value is None or value == "":
        return None
    values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    try:
        return float(values[min(index, len(values) - 1)])
    except (TypeError, ValueError, IndexError) as exc:
        raise UnreadableImage(RejectKind.CORRUPT, f"the DICOM header's {keyword} is not a number") from exc


def code_string(ds: pydicom.Dataset, keyword: str) -> str:
    """A code string (Modality, PhotometricInterpretation...) stripped and upper-cased, or
    "(invalid)" when the value is not a well-formed CS: reports never carry a damaged
    header's bytes, which could be another element's text."""
    value = element_value(ds, keyword, "")
    text = str(value).strip().upper() if isinstance(value, str) else "(invalid)"
    return text if _CODE_STRING.match(text) else "(invalid)"


def transfer_syntax(ds: pydicom.Dataset) -> tuple[UID, bool]:
    """The transfer syntax the pixels are encoded in, and whether it was inferred (the file
    names none). Raises UnreadableImage: unsupported transfer syntax for a damaged, unknown
    or mislabelled one (the UID itself is never quoted)."""
    meta = getattr(ds, "file_meta", None)
    value = element_value(meta, "TransferSyntaxUID") if meta is not None else None
    if not value:
        inferred = inferred_transfer_syntax(ds)
        if inferred is None:
            raise UnreadableImage(RejectKind.UNSUPPORTED_SYNTAX,
                                  "compressed pixel data but no transfer syntax in the file meta")
        return inferred, True
    if not isinstance(value, str) or isinstance(value, MultiValue) or not UID(value).is_valid:
        raise UnreadableImage(RejectKind.UNSUPPORTED_SYNTAX, "the file meta's transfer syntax is not a valid UID")
    syntax = UID(value)
    if syntax.is_private or not syntax.is_transfer_syntax:
        raise UnreadableImage(RejectKind.UNSUPPORTED_SYNTAX, "unknown transfer syntax (not one DICOM defines)")
    pixel_element = next((ds[k] for k in PIXEL_DATA_KEYWORDS if k in ds), None)
    if pixel_element is not None and pixel_element.is_undefined_length != syntax.is_encapsulated:
        actual = "compressed (encapsulated)" if pixel_element.is_undefined_length else "not compressed"
        raise UnreadableImage(RejectKind.UNSUPPORTED_SYNTAX,
                              f"mislabelled transfer syntax: the file meta says {syntax.name}, "
                              f"but the pixel data is {actual}")
    return syntax, False


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


def syntax_description(ds: pydicom.Dataset) -> str:
    """The transfer syntax as the QC report shows it: its name, marked "(inferred)" when the
    file names none. Raises UnreadableImage as `transfer_syntax` does."""
    syntax, inferred = transfer_syntax(ds)
    return f"{syntax.name} (inferred)" if inferred else syntax.name


class PixelGeometry(NamedTuple):
    """The Image Pixel module's sizes, checked: what the pixel data must hold."""

    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int
    photometric: str

    @property
    def expected_bytes(self) -> int:
        """Native (uncompressed) pixel data length, as PS3.5 8.1.1 and PS3.3 C.7.6.3.1.2 give it."""
        values = self.rows * self.columns * self.samples * self.frames
        if self.bits_allocated == 1:
            return -(-values // 8)
        length = values * (self.bits_allocated // 8)
        return length // 3 * 2 if self.photometric == "YBR_FULL_422" else length


def pixel_geometry(ds: pydicom.Dataset) -> PixelGeometry:
    """The header's image size, frames, samples and bit depth; corrupt when one is missing,
    not a whole number, or impossible (no rows, a bit depth that is not 1 or a multiple of 8)."""
    values = {keyword: header_int(ds, keyword, default)
              for keyword, default in (("Rows", None), ("Columns", None), ("NumberOfFrames", 1),
                                       ("SamplesPerPixel", 1), ("BitsAllocated", None))}
    for keyword, value in values.items():
        if value is None:
            raise UnreadableImage(RejectKind.CORRUPT, f"the DICOM header has no {keyword}")
        if value < 1:
            raise UnreadableImage(RejectKind.CORRUPT, f"the DICOM header's {keyword} is not a positive number")
    bits = values["BitsAllocated"]
    if bits != 1 and (bits % 8 or bits > 64):
        raise UnreadableImage(RejectKind.CORRUPT, "the DICOM header's BitsAllocated is not 1 or a multiple of 8")
    if values["SamplesPerPixel"] not in (1, 3, 4):
        raise UnreadableImage(RejectKind.CORRUPT, "the DICOM header's SamplesPerPixel is not 1, 3 or 4")
    return PixelGeometry(values["Rows"], values["Columns"], values["NumberOfFrames"], values["SamplesPerPixel"],
                         bits, code_string(ds, "PhotometricInterpretation"))


def is_lossy(ds: pydicom.Dataset, syntax: UID) -> bool:
    """Whether the stored pixels may differ from the original's: LossyImageCompression "01",
    or a transfer syntax whose codec may discard information."""
    return code_string(ds, "LossyImageCompression") == "01" or syntax in LOSSY_SYNTAXES


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
