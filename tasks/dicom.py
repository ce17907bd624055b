"""What a DICOM data set says about how it is encoded, for ingest's QC facts and preprocess's decode.

Only pydicom here: ingest reads headers without importing torch.
"""

from __future__ import annotations

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
