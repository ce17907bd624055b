"""What kind of file a file is, decided from its bytes, not its name."""

from __future__ import annotations

from tasks.dicom import looks_like_raw_dicom

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


def sniff(data: bytes) -> str | None:
    """'dicom', 'dicom-no-preamble', 'png', 'jpeg' or None, from the leading bytes."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if looks_like_raw_dicom(data):
        return "dicom-no-preamble"
    return None
