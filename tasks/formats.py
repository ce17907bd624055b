"""What kind of file a file is, decided from its bytes, not its name: one decision that
ingest (which facts to read) and decoding (which decoder to run) both take from here."""

from __future__ import annotations

import io
import warnings
from enum import Enum

from PIL import Image, UnidentifiedImageError

from tasks.dicom import looks_like_raw_dicom
from tasks.rejects import RejectKind, UnreadableImage, exception_detail

# Pillow warns about images between one and two times its limit; `open_image` sets that limit
# so that Pillow refuses exactly what preprocess.max_pixels refuses: the warning adds nothing.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
# The last bytes of a complete file: PNG's IEND chunk (type and CRC), JPEG's EOI marker.
_END_MARKERS = {"png": b"IEND\xaeB`\x82", "jpeg": b"\xff\xd9"}


class ImageFormat(str, Enum):
    DICOM = "dicom"  # the 128-byte preamble and "DICM": a DICOM file even when the preamble is also TIFF's
    RAW_DICOM = "dicom-no-preamble"  # a data set without preamble (and perhaps without file meta)
    PNG = "png"
    JPEG = "jpeg"

    @property
    def is_dicom(self) -> bool:
        return self in (ImageFormat.DICOM, ImageFormat.RAW_DICOM)


def detect_format(data: bytes) -> ImageFormat:
    """The format of a file's content; raises UnreadableImage (empty, not an image) for
    anything that is not DICOM, PNG or JPEG. "DICM" at byte 128 decides first: a
    dual-personality file (a TIFF header in the DICOM preamble) is DICOM."""
    if not data:
        raise UnreadableImage(RejectKind.EMPTY, "empty file (0 bytes)")
    if len(data) >= 132 and data[128:132] == b"DICM":
        return ImageFormat.DICOM
    if data.startswith(_PNG_MAGIC):
        return ImageFormat.PNG
    if data.startswith(_JPEG_MAGIC):
        return ImageFormat.JPEG
    if looks_like_raw_dicom(data):
        return ImageFormat.RAW_DICOM
    raise UnreadableImage(RejectKind.NOT_AN_IMAGE, "not a DICOM, PNG or JPEG file")


def pillow_failure(data: bytes, fmt: ImageFormat, doing: str, exc: Exception) -> UnreadableImage:
    """Pillow failing on a PNG or JPEG: truncated when the file does not end as its format
    ends (it was cut short), else corrupt (damaged inside)."""
    if data.rstrip(b"\0").endswith(_END_MARKERS[fmt.value]):
        return UnreadableImage(RejectKind.CORRUPT, f"the {fmt.name} {doing}: {exception_detail(exc)}")
    return UnreadableImage(RejectKind.TRUNCATED, f"the {fmt.name} {doing} (it ends early): {exception_detail(exc)}")


def open_image(data: bytes, fmt: ImageFormat, max_pixels: int | None) -> Image.Image:
    """A PNG or JPEG opened by Pillow, its header read and nothing decoded yet, with Pillow's
    decompression-bomb guard refusing what has more than `max_pixels` (None: no guard, for
    reading a header only). Raises UnreadableImage."""
    Image.MAX_IMAGE_PIXELS = max_pixels and max_pixels // 2  # Pillow refuses above twice its limit
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise UnreadableImage(RejectKind.TOO_LARGE, f"more pixels than the limit of {max_pixels} "
                                                    "(preprocess.max_pixels)") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise pillow_failure(data, fmt, "header does not parse", exc) from exc
