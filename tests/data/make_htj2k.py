"""Rebuild the HTJ2K test files from real images in pydicom's and pydicom-data's test files.

pydicom-data has no HTJ2K file, and pylibjpeg-openjpeg (OpenJPEG) decodes HTJ2K
but cannot encode it, so these were encoded losslessly with OpenJPH through
imagecodecs (2026.3.6, OpenJPH 0.26.3), which the project does not depend on;
only the results are kept.

- MR_small_htj2k.dcm: pydicom's MR_small.dcm (MIT licence; downsized to 64x64
  from NEMA's WG04 MR1_UNC test image, see pydicom/data/test_files/README.txt),
  signed 16-bit.
- RG1_crop_htj2k.dcm: a 256x256 crop of pydicom-data's RG1_UNCR.dcm (MIT), the
  chest CR, unsigned; its BitsStored says 16 because the encoder writes a 16-bit
  codestream, and the stored values (under 2**15) are the same either way.

To rebuild them:

    pip install --target /tmp/imagecodecs imagecodecs
    PYTHONPATH=/tmp/imagecodecs python tests/data/make_htj2k.py
"""

from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import HTJ2KLossless

HERE = Path(__file__).parent


def save_as_htj2k(ds: pydicom.Dataset, pixels: np.ndarray, name: str) -> None:
    ds.PixelData = encapsulate([imagecodecs.htj2k_encode(pixels, reversible=True)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    ds.save_as(HERE / name)


mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
save_as_htj2k(mr, mr.pixel_array, "MR_small_htj2k.dcm")

cr = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
crop = np.ascontiguousarray(cr.pixel_array[800:1056, 800:1056])  # lung, ribs and heart border
cr.Rows, cr.Columns = crop.shape
cr.BitsStored, cr.HighBit = 16, 15
save_as_htj2k(cr, crop, "RG1_crop_htj2k.dcm")
