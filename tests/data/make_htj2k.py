"""Rebuild MR_small_htj2k.dcm: pydicom's MR_small.dcm with its pixels re-encoded as HTJ2K lossless.

pydicom-data has no HTJ2K file, and pylibjpeg-openjpeg (OpenJPEG) decodes HTJ2K
but cannot encode it, so this one was encoded with OpenJPH through imagecodecs
(2026.3.6, OpenJPH 0.26.3), which the project does not depend on; only the
result is kept. Source image: MR_small.dcm ships with pydicom (MIT licence), downsized
to 64x64 from NEMA's WG04 MR1_UNC test image (pydicom/data/test_files/README.txt).
To rebuild it:

    pip install --target /tmp/imagecodecs imagecodecs
    PYTHONPATH=/tmp/imagecodecs python tests/data/make_htj2k.py
"""

from pathlib import Path

import imagecodecs
import pydicom
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import HTJ2KLossless

ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
codestream = imagecodecs.htj2k_encode(ds.pixel_array, reversible=True)
ds.PixelData = encapsulate([codestream])
ds["PixelData"].VR = "OB"
ds["PixelData"].is_undefined_length = True
ds.file_meta.TransferSyntaxUID = HTJ2KLossless
ds.save_as(Path(__file__).with_name("MR_small_htj2k.dcm"))
