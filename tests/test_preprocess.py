"""Behaviour of preprocessing (decode, transforms, cache, the stage) on real DICOM files from pydicom-data (offline)."""

from __future__ import annotations

import copy
import errno
import hashlib
import io
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, convert_color_space
from pydicom.uid import JPEG2000, JPEG2000Lossless
from torchvision.transforms.v2 import functional as TF

from configs import Fit, FramePolicy, PreprocessConfig
from sample_data.breastmnist import BUNDLED_NPZ, ultrasound_dicom
from tasks import cache, decode
from tasks import preprocess as pp
from tasks.cache import ImageCache
from tasks.decode import load_grey
from tasks.j2k import ReducedDecodeFloor, decode_j2k_reduced
from tasks.preprocess import preprocess_file
from tasks.rejects import RejectKind, UnreadableImage
from tasks.transforms import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec, to_model_input
from tasks.voi import IndexedGrey, expanded
from tests import damaged
from tests.conftest import MIXED_REJECTS


SPEC = PreprocessSpec()  # short side 256, centre crop 224


def data_file(name: str) -> Path:
    return Path(get_testdata_file(name))


# Made by tests/data/make_htj2k.py: pydicom-data has no HTJ2K file.
HTJ2K_FILE = Path(__file__).parent / "data" / "MR_small_htj2k.dcm"
HTJ2K_CR_CROP = Path(__file__).parent / "data" / "RG1_crop_htj2k.dcm"  # unsigned, 256 x 256


def edited(tmp_path: Path, name: str, **elements) -> Path:
    """pydicom's test file `name` with the given elements (keyword=value) set, saved as a new file."""
    ds = pydicom.dcmread(data_file(name))
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    path = tmp_path / f"edited_{name}"
    ds.save_as(path)
    return path


def percentile_window(values: np.ndarray) -> np.ndarray:
    """The contract's VOI when the header has none: 0.5th-99.5th percentile onto [0, 1]."""
    lo, hi = np.percentile(values.astype(np.float64), [0.5, 99.5])
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def linear_window(values: np.ndarray, c: float, w: float) -> np.ndarray:
    """DICOM LINEAR window (PS3.3 C.11.2.1.2.1) onto [0, 1]: 0 at c - 0.5 - (w - 1)/2, 1 at c - 0.5 + (w - 1)/2."""
    return np.clip((values - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)


def bt601(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of RGB in [0, 1]."""
    return rgb @ np.array([0.299, 0.587, 0.114])


def region_mean(grey: np.ndarray, rows: tuple[float, float], cols: tuple[float, float]) -> float:
    h, w = grey.shape
    return float(grey[int(rows[0] * h) : int(rows[1] * h), int(cols[0] * w) : int(cols[1] * w)].mean())


# The full-size chest CR (1955x1841) takes ~0.5 s to decode: decode it once.
@pytest.fixture(scope="module")
def rg1_uncr():
    return load_grey(data_file("RG1_UNCR.dcm"))


@pytest.fixture(scope="module")
def rg1_j2kr():
    return load_grey(data_file("RG1_J2KR.dcm"))


@pytest.fixture
def config(tmp_path) -> PreprocessConfig:
    return PreprocessConfig(resize=256, crop=224, cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------- chest CR


def test_chest_cr_monochrome1_is_bone_bright_air_dark(rg1_uncr):
    grey, provenance = rg1_uncr
    assert grey.dtype == np.float32 and grey.shape == (1955, 1841)
    assert 0.0 <= grey.min() and grey.max() <= 1.0
    # Regions picked from the rendered image: spine/mediastinum in the middle
    # column, upper lung fields either side, air above the shoulders in the
    # top corners (below the bright collimator strip at the very top).
    mediastinum = region_mean(grey, (0.30, 0.60), (0.46, 0.55))
    lungs = [region_mean(grey, (0.14, 0.28), (0.18, 0.36)), region_mean(grey, (0.14, 0.28), (0.60, 0.76))]
    air = [region_mean(grey, (0.03, 0.08), (0.0, 0.10)), region_mean(grey, (0.03, 0.08), (0.90, 1.0))]
    assert mediastinum > max(lungs) + 0.2
    assert min(lungs) > max(air) + 0.15
    assert provenance[1:] == ["voi:window(c=15000,w=30000)", "invert:MONOCHROME1"]


def test_window_maps_linearly_to_unit_range(rg1_uncr):
    # DICOM LINEAR window, then MONOCHROME1 inversion, from the stored values.
    grey, _ = rg1_uncr
    stored = pydicom.dcmread(data_file("RG1_UNCR.dcm")).pixel_array.astype(np.float64)
    np.testing.assert_allclose(grey, 1.0 - linear_window(stored, 15000.0, 30000.0), atol=1e-5)


def test_jpeg2000_lossless_matches_uncompressed(rg1_uncr, rg1_j2kr):
    a = SPEC.to_uint8(rg1_uncr[0])[0].astype(np.float64)
    b = SPEC.to_uint8(rg1_j2kr[0])[0].astype(np.float64)
    assert np.abs(a - b).mean() / 255 < 0.01
    assert rg1_j2kr[1][0] == "decode:dicom(JPEG 2000 Image Compression (Lossless Only))"
    assert rg1_j2kr[1][1:] == rg1_uncr[1][1:]


@pytest.mark.parametrize("name, reduced_shape", [("RG1_J2KR.dcm", (978, 921)), ("RG3_J2KR.dcm", (880, 880))])
def test_jpeg2000_reduced_resolution_decode_matches_full_decode(name, reduced_shape, config):
    # preprocess_file decodes these full-size CRs at 1/2 resolution (the most
    # that keeps the short side >= 2 x 256). Its crop must match the crop made
    # from every pixel: the only difference allowed is the anti-alias filter
    # (the wavelet's low-pass, then the resize's, against the resize's alone),
    # which shows at sharp edges (collimator borders, lead markers) only.
    # Measured: mean 0.14 / 0.35 levels, 99th percentile 1 / 4, max 5 / 14.
    path = data_file(name)
    reduced, _, provenance, _ = preprocess_file(path, config)
    full_grey, full_provenance = load_grey(path)
    full = PreprocessSpec.from_config(config).to_uint8(full_grey)[0].astype(np.float64)
    diff = np.abs(reduced.astype(np.float64) - full)
    assert diff.mean() < 0.5 and np.percentile(diff, 99) <= 5 and diff.max() <= 20
    assert abs(reduced.mean() - full.mean()) < 0.5 and abs(reduced.std() - full.std()) < 0.5
    # Orientation: a flipped or un-inverted image would be far off, not a level off.
    assert np.abs(reduced - full[::-1]).mean() > 20 * diff.mean()
    assert np.abs(reduced - full[:, ::-1]).mean() > 20 * diff.mean()
    assert np.corrcoef(reduced.ravel(), full.ravel())[0, 1] > 0.999
    # Same steps, plus the reduced decode, in the provenance.
    decode, reduction, *rest = provenance
    assert decode == full_provenance[0]
    height, width = load_grey(path, floor=ReducedDecodeFloor(short_side=512))[0].shape
    assert (height, width) == reduced_shape
    assert reduction.startswith("decode:reduced_resolution(1/2,") and reduction.endswith(f"->{height}x{width})")
    assert rest[:len(full_provenance) - 1] == full_provenance[1:]


@pytest.mark.parametrize("name", ["RG1_J2KR.dcm", "RG3_J2KR.dcm"])
def test_jpeg2000_reduced_decode_keeps_stored_values(name):
    # The reduced decode must give stored values (BitsStored bits, unsigned as
    # the header says), not Pillow's up-scaled 16-bit samples: compare with a
    # 2x2 mean of the full decode, which is what the wavelet's LL band is close to.
    ds = pydicom.dcmread(data_file(name))
    reduced, level = decode_j2k_reduced(ds, ds.file_meta.TransferSyntaxUID, ReducedDecodeFloor(short_side=512))
    full = ds.pixel_array.astype(np.float64)
    full = np.pad(full, ((0, full.shape[0] % 2), (0, full.shape[1] % 2)), mode="edge")
    box = full.reshape(full.shape[0] // 2, 2, full.shape[1] // 2, 2).mean(axis=(1, 3))
    assert level == 1 and reduced.shape == box.shape
    assert reduced.max() < 2**ds.BitsStored
    assert np.abs(reduced - box).mean() < 0.02 * box.mean()


@pytest.mark.parametrize("name", [
    "693_J2KR.dcm",  # 512 px: no level keeps the short side >= 512 after halving
    "J2K_pixelrep_mismatch.dcm",  # signed pixel data: the full decode handles the sign
    "US1_J2KR.dcm",  # colour
])
def test_jpeg2000_falls_back_to_full_decode(name, config):
    _, _, provenance, _ = preprocess_file(data_file(name), config)
    assert provenance[0].startswith("decode:dicom(JPEG 2000")
    assert not any(step.startswith("decode:reduced_resolution") for step in provenance)


def test_png_export_gives_same_tensor_as_dicom(rg1_uncr, tmp_path, config):
    png = tmp_path / "rg1.png"
    Image.fromarray(np.round(rg1_uncr[0] * 255).astype(np.uint8)).save(png)
    from_png, key_png, prov_png, _ = preprocess_file(png, config)
    from_dcm, key_dcm, _, _ = preprocess_file(data_file("RG1_UNCR.dcm"), config)
    assert from_png.shape == from_dcm.shape == (224, 224) and from_png.dtype == np.uint8
    assert np.abs(from_png.astype(int) - from_dcm.astype(int)).max() <= 2
    assert key_png != key_dcm  # different bytes, different entries
    assert prov_png[0] == "decode:png(mode=L)"
    # ...and as a model batch the two agree to within 2/255 of a pixel.
    batch = to_model_input(torch.from_numpy(np.stack([from_png, from_dcm])))
    assert (batch[0] - batch[1]).abs().max() <= 2 / 255 / min(IMAGENET_STD) + 1e-6


# ---------------------------------------------------------------- other formats


def test_sixteen_bit_png_is_scaled_to_unit_range(tmp_path):
    values = np.array([[0, 16384, 32768, 65535]] * 4, dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    grey, provenance = load_grey(path)
    np.testing.assert_allclose(grey, values / 65535.0, atol=1e-6)
    assert "scale:/65535" in provenance


def test_jpeg_is_read_as_grey(rg1_uncr, tmp_path):
    path = tmp_path / "rg1.jpg"
    Image.fromarray(np.round(rg1_uncr[0] * 255).astype(np.uint8)).save(path, quality=95)
    grey, _ = load_grey(path)
    assert grey.shape == rg1_uncr[0].shape
    assert np.abs(grey - rg1_uncr[0]).mean() < 0.01


def test_jpeg_exif_orientation_is_applied(tmp_path):
    # EXIF Orientation 6: the stored pixels are shown turned 90 degrees
    # clockwise (how cameras and phones store portrait pictures).
    stored = np.zeros((64, 96), np.uint8)
    stored[:32, :48] = 255  # bright top-left quadrant
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "portrait.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    grey, provenance = load_grey(path)
    assert grey.shape == (96, 64)
    assert np.abs(grey - np.rot90(stored, k=-1) / 255).mean() < 0.01  # bright quadrant now top right
    assert provenance == ["decode:jpeg(mode=L)", "exif_transpose(orientation=6)", "scale:/255"]


@pytest.mark.parametrize("fmt, orientation", [("PNG", None), ("JPEG", None), ("JPEG", 1)])
def test_no_exif_transpose_is_recorded_where_none_was_done(tmp_path, rg1_uncr, fmt, orientation):
    # Pillow's exif_transpose returns a copy even for Orientation 1 or none: only 2-8 turn the image.
    pixels = np.round(rg1_uncr[0][:300, :400] * 255).astype(np.uint8)
    path = tmp_path / f"image.{fmt.lower()}"
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, fmt, exif=exif)
    grey, provenance = load_grey(path)
    assert grey.shape == (300, 400)
    assert not any(step.startswith("exif_transpose") for step in provenance)


@pytest.mark.parametrize("name", ["SC_rgb.dcm", "SC_rgb_rle.dcm", "SC_rgb_jpeg_gdcm.dcm"])
def test_rgb_dicom_becomes_bt601_luminance(name):
    expected = bt601(pydicom.dcmread(data_file("SC_rgb.dcm")).pixel_array / 255)
    grey, provenance = load_grey(data_file(name))
    np.testing.assert_allclose(grey, expected, atol=1e-5)
    assert provenance[-1] == "colour:luminance(BT.601)"


def test_ybr_full_422_is_converted_to_rgb_first():
    rgb, _ = load_grey(data_file("SC_rgb.dcm"))
    ybr, provenance = load_grey(data_file("SC_ybr_full_422_uncompressed.dcm"))
    assert np.abs(rgb - ybr).max() < 6 / 255  # YCbCr round-trip rounding only
    assert "colour:YBR_FULL_422->RGB(decoder)" in provenance


def test_ybr_full_is_converted_to_rgb_before_luminance():
    path = data_file("SC_ybr_full_uncompressed.dcm")
    ds = pydicom.dcmread(path)  # 8-bit, 3 samples, PlanarConfiguration 0
    ybr = np.frombuffer(ds.PixelData, np.uint8).reshape(ds.Rows, ds.Columns, 3)
    grey, provenance = load_grey(path)
    np.testing.assert_allclose(grey, bt601(convert_color_space(ybr, "YBR_FULL", "RGB") / 255), atol=1e-6)
    assert provenance[1:] == ["colour:YBR_FULL->RGB(decoder)", "scale:/255", "colour:luminance(BT.601)"]
    # ...which is the RGB original's picture, up to the rounding of the stored
    # YCbCr (measured 1.9 8-bit levels at most; unconverted YCbCr is 65 off on average).
    original, _ = load_grey(data_file("SC_rgb.dcm"))
    assert np.abs(grey - original).max() < 3 / 255


# OT-PAL-8-face.dcm has neither the 128-byte preamble nor file meta.
@pytest.mark.parametrize("name", ["OT-PAL-8-face.dcm", "examples_palette.dcm"])
def test_palette_colour_is_the_luminance_of_its_colour_table(name):
    ds = pydicom.dcmread(data_file(name), force=True)
    indices = np.frombuffer(ds.PixelData, np.uint8).reshape(ds.Rows, ds.Columns)  # 8-bit native
    assert ds.RedPaletteColorLookupTableDescriptor[2] == 16  # 16-bit table entries
    expected = bt601(apply_color_lut(indices, ds) / 65535)
    grey, provenance = load_grey(data_file(name))
    np.testing.assert_allclose(grey, expected, atol=1e-6)
    assert provenance[-3:] == ["colour:palette_lut", "scale:/65535", "colour:luminance(BT.601)"]


@pytest.mark.parametrize(
    "name",
    [
        "emri_small_RLE.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
        "emri_small_big_endian.dcm",
    ],
)
def test_multiframe_middle_frame_same_across_transfer_syntaxes(name):
    # 10-frame MR: the middle frame (index 5, frame 6 as DICOM numbers them from 1), percentile
    # window, and the same pixels whatever the encoding.
    ds = pydicom.dcmread(data_file("emri_small.dcm"))
    reference, ref_prov = load_grey(data_file("emri_small.dcm"))
    np.testing.assert_allclose(reference, percentile_window(ds.pixel_array[5]), atol=1e-6)
    assert ref_prov[1:] == ["frame:middle(6 of 10)", "voi:percentile(0.5,99.5)"]
    grey, provenance = load_grey(data_file(name))
    np.testing.assert_array_equal(grey, reference)
    assert provenance[1:] == ref_prov[1:]


def test_dicom_detected_by_content_not_name(tmp_path):
    original = data_file("CT_small.dcm")
    reference, _ = load_grey(original)
    no_suffix = tmp_path / "image"
    shutil.copyfile(original, no_suffix)
    no_preamble = tmp_path / "no_preamble.bin"
    no_preamble.write_bytes(original.read_bytes()[132:])  # drop preamble + "DICM"
    for path in (no_suffix, no_preamble):
        grey, provenance = load_grey(path)
        np.testing.assert_array_equal(grey, reference)
        assert provenance[1] == "modality_lut:rescale(slope=1,intercept=-1024)"


def test_monochrome1_is_the_inverse_of_monochrome2(tmp_path):
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    path = tmp_path / "mono1.dcm"
    ds.save_as(path)
    mono2, _ = load_grey(data_file("CT_small.dcm"))
    mono1, provenance = load_grey(path)
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    assert provenance[-1] == "invert:MONOCHROME1"


@pytest.mark.parametrize("elements, step", [
    ({"PresentationLUTShape": "INVERSE"}, "invert:PresentationLUTShape=INVERSE"),
    # DX/MG pair MONOCHROME1 with INVERSE to describe one inversion, not two.
    ({"PhotometricInterpretation": "MONOCHROME1", "PresentationLUTShape": "INVERSE"},
     "invert:MONOCHROME1+PresentationLUTShape=INVERSE"),
], ids=["MONOCHROME2+INVERSE", "MONOCHROME1+INVERSE"])
def test_presentation_lut_shape_inverse_inverts_once(tmp_path, elements, step):
    original, provenance = load_grey(data_file("MR_small.dcm"))
    inverted, inverted_provenance = load_grey(edited(tmp_path, "MR_small.dcm", **elements))
    np.testing.assert_array_equal(inverted, 1.0 - original)
    assert inverted_provenance == [*provenance, step]


def test_presentation_lut_shape_identity_changes_nothing(tmp_path):
    original, provenance = load_grey(data_file("MR_small.dcm"))
    grey, identity_provenance = load_grey(edited(tmp_path, "MR_small.dcm", PresentationLUTShape="IDENTITY"))
    np.testing.assert_array_equal(grey, original)
    assert identity_provenance == provenance


@pytest.mark.parametrize("voi_window", [0, 1])
def test_voi_lut_sequence_is_chosen_and_scaled_by_its_output_range(tmp_path, voi_window):
    # vlut_04's own LUT (item 0) is a 16-bit ramp over 8-bit input. Item 1,
    # added here, holds 12-bit values in a LUT that declares 16 bits, as many
    # files do: it must be the one `voi_window` picks, applied, and scaled by
    # what it outputs, not by its nominal depth.
    seq = pydicom.dcmread(data_file("vlut_04.dcm")).VOILUTSequence
    seq.append(copy.deepcopy(seq[0]))
    seq[1].LUTData = [round(4095 * (i / 255) ** 2) for i in range(256)]
    path = edited(tmp_path, "vlut_04.dcm", VOILUTSequence=seq)
    ds = pydicom.dcmread(path)
    table = np.asarray(ds.VOILUTSequence[voi_window].LUTData, dtype=np.float64)
    expected = (apply_voi_lut(ds.pixel_array, ds, index=voi_window) - table.min()) / (table.max() - table.min())
    grey, provenance = load_grey(path, voi_window=voi_window)
    np.testing.assert_allclose(grey, expected, atol=1e-6)
    assert provenance == ["decode:dicom(Explicit VR Little Endian)", f"voi:lut_sequence({voi_window})"]


@pytest.mark.parametrize("lut", ["file", "squared"])
def test_modality_lut_sequence_is_applied_before_the_window(tmp_path, lut):
    # mlut_18: 12-bit signed pixels through a 4096-entry LUT starting at -2048.
    # Its LUT is linear, which the percentile window after it would hide; the
    # squared curve shows the LUT is applied.
    path = data_file("mlut_18.dcm")
    if lut == "squared":
        seq = pydicom.dcmread(path).ModalityLUTSequence
        seq[0].LUTData = [round(65535 * (i / 4095) ** 2) for i in range(4096)]
        path = edited(tmp_path, "mlut_18.dcm", ModalityLUTSequence=seq)
    ds = pydicom.dcmread(path)
    grey, provenance = load_grey(path)
    np.testing.assert_allclose(grey, percentile_window(apply_modality_lut(ds.pixel_array, ds)), atol=1e-6)
    assert provenance == ["decode:dicom(Explicit VR Little Endian)", "modality_lut:lut_sequence",
                          "voi:percentile(0.5,99.5)"]


@pytest.mark.parametrize("name, fill", [
    ("MR2_UNCI.dcm", "ones"),  # unsigned, 12 of 16 bits
    # Signed, 12 of 16 bits; the file stores negative values without sign
    # extension (4095 for -1): written sign-extended, or with junk above HighBit.
    ("mlut_18.dcm", "sign"),
    ("mlut_18.dcm", "junk"),
])
def test_bits_above_bits_stored_are_ignored(tmp_path, name, fill):
    # PS3.5 8.1.1: only the BitsStored bits up to HighBit are the value (bit
    # HighBit its sign when signed); the bits above may hold anything.
    ds = pydicom.dcmread(data_file(name))
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11)
    words = np.frombuffer(ds.PixelData, "<u2")
    value = words & 0x0FFF
    high = {"ones": 0xF000, "sign": np.where(value & 0x0800, 0xF000, 0), "junk": 0x5000}[fill]
    changed = (value | high).astype("<u2")
    assert np.count_nonzero(changed != words) > words.size // 4
    original, provenance = load_grey(data_file(name))
    grey, changed_provenance = load_grey(edited(tmp_path, name, PixelData=changed.tobytes()))
    np.testing.assert_array_equal(grey, original)
    assert changed_provenance == provenance


def test_pixel_padding_excluded_from_window_and_shown_dark(tmp_path):
    ds = pydicom.dcmread(data_file("CT_small.dcm"))  # PixelPaddingValue -2000
    arr = ds.pixel_array.copy()
    arr[:10, :10] = -2000
    ds.PixelData = arr.tobytes()
    path = tmp_path / "padded.dcm"
    ds.save_as(path)
    grey, provenance = load_grey(path)
    assert (grey[:10, :10] == 0).all()
    assert "padding:zeroed(100px)" in provenance
    # The window comes from the real pixels only.
    real = arr.astype(np.float64)[arr != -2000] - 1024
    lo, hi = np.percentile(real, [0.5, 99.5])
    inside = np.clip((arr[20:, 20:] - 1024 - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(grey[20:, 20:], inside, atol=1e-6)


def _without_window(name: str) -> pydicom.Dataset:
    """A real file with its header window removed: the percentile window applies."""
    ds = pydicom.dcmread(data_file(name))
    del ds.WindowCenter, ds.WindowWidth
    return ds


def _saved(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path)
    return path


def test_padding_of_a_lossy_ct_is_excluded_within_a_band_and_matches_its_lossless_twin(tmp_path):
    # 693_UNCR: a real 512 x 512 CT with 55,772 padding pixels (-2000) around its circular field of
    # view. Compressed here 40:1 with pylibjpeg-openjpeg's JPEG 2000 encoder (the lossy syntax),
    # fewer than 10 % of them still equal -2000: the rest used to enter the percentile window and
    # pull its low end down by a thousand HU, leaving the lungs mid-grey, 83 levels off.
    lossless = _saved(_without_window("693_UNCR.dcm"), tmp_path / "lossless.dcm")
    ds = _without_window("693_UNCR.dcm")
    ds.compress(JPEG2000, j2k_cr=[40], encoding_plugin="pylibjpeg")
    lossy = _saved(ds, tmp_path / "lossy.dcm")
    padding = pydicom.dcmread(lossless).pixel_array == -2000
    assert padding.sum() == 55772 and (pydicom.dcmread(lossy).pixel_array[padding] == -2000).mean() < 0.1

    twin, twin_provenance = load_grey(lossless)
    grey, provenance = load_grey(lossy)
    levels = np.abs(SPEC.to_uint8(grey)[0].astype(float) - SPEC.to_uint8(twin)[0].astype(float))
    assert levels.mean() < 2 and np.median(levels) <= 1
    assert np.abs(grey[~padding] - twin[~padding]).mean() * 255 < 2  # the tissue, not just the air
    assert (grey[padding] == 0).mean() > 0.99  # shown as air
    band = [step for step in provenance if step.startswith("padding:lossy_band(")]
    assert band == ["padding:lossy_band(<=-1794)"]  # 10 % of the way from -2000 to the median
    assert not any(step.startswith("padding:lossy_band") for step in twin_provenance)


def test_a_lossless_file_keeps_the_exact_padding_value(tmp_path):
    # The same CT under a lossless syntax: only pixels equal to PixelPaddingValue are padding.
    ds = _without_window("693_UNCR.dcm")
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    _, provenance = load_grey(_saved(ds, tmp_path / "lossless_j2k.dcm"))
    assert "padding:zeroed(55772px)" in provenance and not any("lossy_band" in step for step in provenance)


# ---------------------------------------------------------------- transfer syntaxes


def test_deflated_explicit_vr_is_the_inflated_data_sets_pixels():
    # image_dfl.dcm's data set is raw deflate (RFC 1951) after the file meta.
    # Inflate it with zlib and take the 8-bit pixels straight from the inflated
    # Pixel Data bytes, so neither pydicom's inflate nor its decoder makes the reference.
    data = data_file("image_dfl.dcm").read_bytes()
    inflated = zlib.decompress(damaged.without_preamble_and_meta(data), -zlib.MAX_WBITS)
    ds = pydicom.dcmread(io.BytesIO(inflated), force=True)
    stored = np.frombuffer(ds.PixelData, np.uint8).reshape(ds.Rows, ds.Columns)
    grey, provenance = load_grey(data_file("image_dfl.dcm"))
    np.testing.assert_allclose(grey, percentile_window(stored), atol=1e-6)
    assert provenance == ["decode:dicom(Deflated Explicit VR Little Endian)", "voi:percentile(0.5,99.5)"]


def test_implicit_vr_gives_the_explicit_vr_files_pixels():
    explicit, explicit_provenance = load_grey(data_file("MR_small.dcm"))
    implicit, provenance = load_grey(data_file("MR_small_implicit.dcm"))
    np.testing.assert_array_equal(implicit, explicit)
    assert provenance == ["decode:dicom(Implicit VR Little Endian)", *explicit_provenance[1:]]
    # Both are the header window (600/1600) of the signed 16-bit words in the file.
    ds = pydicom.dcmread(data_file("MR_small.dcm"))
    stored = np.frombuffer(ds.PixelData, "<i2").reshape(ds.Rows, ds.Columns)
    np.testing.assert_allclose(explicit, linear_window(stored, 600.0, 1600.0), atol=1e-5)


def test_jpeg_baseline_is_close_to_the_uncompressed_original():
    # SC_rgb_jpeg_dcmtk.dcm is SC_rgb.dcm through dcmtk's JPEG baseline (YCbCr,
    # IJG quality 90). SC_rgb is flat colour bars, so the loss sits at the bar
    # edges: measured 0.30 mean and 1.9 max 8-bit levels of luminance. A decode
    # or colour error is far larger: YCbCr taken as RGB is 65 mean, 141 max.
    grey, provenance = load_grey(data_file("SC_rgb_jpeg_dcmtk.dcm"))
    original, _ = load_grey(data_file("SC_rgb.dcm"))
    error = np.abs(grey - original) * 255
    assert error.mean() < 0.5 and error.max() < 3
    assert provenance == ["decode:dicom(JPEG Baseline (Process 1))", "colour:YBR_FULL->RGB(decoder)",
                          "scale:/255", "colour:luminance(BT.601)"]


def test_jpeg_extended_12_bit_is_pydicoms_decode_windowed():
    ds = pydicom.dcmread(data_file("JPGExtended.dcm"))
    stored = ds.pixel_array
    # Values pydicom's own reference tests pin for this file (JPGE_16_12_1_0_1F_M2):
    # the decode, and which way up it is, are right before we window it.
    assert (stored[420, 140], stored[230, 120]) == (244, 95)
    grey, provenance = load_grey(data_file("JPGExtended.dcm"))
    np.testing.assert_allclose(grey, percentile_window(stored), atol=1e-6)
    assert provenance == ["decode:dicom(JPEG Extended (Process 2 and 4))", "voi:percentile(0.5,99.5)"]


def test_htj2k_lossless_gives_the_uncompressed_pixels():
    # A real HTJ2K codestream, not a relabelled JPEG 2000 one: SIZ's Rsiz has
    # the Part 15 bit and a CAP marker follows SIZ (ISO/IEC 15444-15 A.2, A.3).
    codestream = next(generate_frames(pydicom.dcmread(HTJ2K_FILE).PixelData, number_of_frames=1))
    siz_end = 4 + struct.unpack(">H", codestream[4:6])[0]
    assert struct.unpack(">H", codestream[6:8])[0] & 0x4000 and codestream[siz_end:siz_end + 2] == b"\xff\x50"
    grey, provenance = load_grey(HTJ2K_FILE)
    reference, reference_provenance = load_grey(data_file("MR_small.dcm"))
    np.testing.assert_array_equal(grey, reference)
    assert provenance == ["decode:dicom(High-Throughput JPEG 2000 Image Compression (Lossless Only))",
                          *reference_provenance[1:]]


def test_htj2k_decodes_at_reduced_resolution_exactly_as_jpeg_2000_does():
    # HTJ2K changes only JPEG 2000's block coder: losslessly coded, both keep
    # the same wavelet coefficients, so their 1/2-resolution LL bands must be
    # identical. The Part 1 reference is the same real pixels coded by OpenJPEG.
    ds = pydicom.dcmread(HTJ2K_CR_CROP)
    stored = ds.pixel_array
    part1 = io.BytesIO()
    Image.frombytes("I;16", stored.shape[::-1], stored.astype("<u2").tobytes()).save(
        part1, "JPEG2000", irreversible=False, no_jp2=True)
    with Image.open(io.BytesIO(part1.getvalue())) as reference:
        reference.reduce = 1
        expected = np.asarray(reference)
    reduced, level = decode_j2k_reduced(ds, ds.file_meta.TransferSyntaxUID, ReducedDecodeFloor(short_side=128))
    assert level == 1
    np.testing.assert_array_equal(reduced, expected)
    _, provenance = load_grey(HTJ2K_CR_CROP, floor=ReducedDecodeFloor(short_side=128))
    assert provenance[:2] == ["decode:dicom(High-Throughput JPEG 2000 Image Compression (Lossless Only))",
                              "decode:reduced_resolution(1/2,256x256->128x128)"]


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm"])
def test_dicom_without_preamble_or_file_meta_gives_the_same_pixels(tmp_path, name):
    # No file meta, so no transfer syntax: it is inferred from the data set's
    # own encoding (explicit or implicit VR, little or big endian), and the
    # provenance says so.
    bare = tmp_path / "bare"
    bare.write_bytes(damaged.without_preamble_and_meta(data_file(name).read_bytes()))
    grey, provenance = load_grey(bare)
    reference, reference_provenance = load_grey(data_file(name))
    np.testing.assert_array_equal(grey, reference)
    syntax = pydicom.dcmread(data_file(name)).file_meta.TransferSyntaxUID.name
    assert provenance == [f"transfer_syntax:inferred({syntax})", *reference_provenance]


# ---------------------------------------------------------------- rejects


def rejected(path: Path, **kwargs) -> UnreadableImage:
    """The UnreadableImage load_grey raises for `path`: it names the file, and its detail is one line."""
    with pytest.raises(UnreadableImage) as info:
        load_grey(path, **kwargs)
    assert info.value.path == path and str(info.value) == f"{path}: {info.value.detail}"
    assert "\n" not in info.value.detail and " object at 0x" not in info.value.detail
    return info.value


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
@pytest.mark.parametrize("name, detail", [
    ("CT_small.dcm", "the pixel data holds 13303 of the 32768 bytes its header declares (128x128, 1 sample of 16 bits)"),
    ("emri_small_jpeg_2k_lossless.dcm", "the file ends inside its pixel data"),  # encapsulated: cut inside a fragment
])
def test_rejects_truncated_dicom(tmp_path, name, detail):
    data = data_file(name).read_bytes()
    path = tmp_path / f"half_{name}"
    path.write_bytes(data[: len(data) // 2])
    reject = rejected(path)
    assert (reject.kind, reject.detail) == (RejectKind.TRUNCATED, detail)


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_rejects_a_compressed_stream_cut_before_its_delimiter():
    # pydicom-data's own J2K file that ends inside its last fragment.
    reject = rejected(data_file("emri_small_jpeg_2k_lossless_too_short.dcm"))
    assert reject.kind is RejectKind.TRUNCATED


def _overwrite_pixel_bytes(start: int, fill: bytes):
    def damage(ds: pydicom.Dataset) -> None:
        data = bytearray(ds.PixelData)
        data[start:start + len(fill)] = fill
        ds.PixelData = bytes(data)
    return damage


@pytest.mark.parametrize("name, damage, kind, detail", [
    # The header promises more pixels than the file holds: a wrong Rows, not a short file.
    ("CT_small.dcm", lambda ds: setattr(ds, "Rows", 1024), RejectKind.TRUNCATED,
     "the pixel data holds 32768 of the 262144 bytes its header declares (1024x128, 1 sample of 16 bits)"),
    # Bytes overwritten in place, the file keeps its length: the RLE header's segment offsets...
    ("MR_small_RLE.dcm", _overwrite_pixel_bytes(20, b"\xff" * 20), RejectKind.CORRUPT,
     "cannot decode the RLE Lossless pixel data: RuntimeError: Unable to decode as exceptions were raised by all "
     "available plugins: pylibjpeg: Invalid segment offset found in the RLE header pydicom: "),
    # ... and a JPEG stream's quantisation tables: two installed decoders both fail on it.
    ("SC_rgb_jpeg_dcmtk.dcm", _overwrite_pixel_bytes(40, bytes(20)), RejectKind.CORRUPT,
     "cannot decode the JPEG Baseline (Process 1) pixel data: RuntimeError: Unable to decode as exceptions were "
     "raised by all available plugins: "),
])
def test_rejects_damaged_dicom_of_full_length(tmp_path, name, damage, kind, detail):
    ds = pydicom.dcmread(data_file(name))
    damage(ds)
    path = tmp_path / name
    ds.save_as(path)
    reject = rejected(path)
    assert reject.kind is kind and reject.detail.startswith(detail)


def test_a_stream_only_one_installed_decoder_takes_is_a_decoder_limitation_naming_the_other():
    # pydicom-data's JPEG-lossy.dcm: 12-bit JPEG Extended, which Pillow's plugin does not take
    # and pylibjpeg-libjpeg refuses (a marker where its strict reading wants none); GDCM decodes it.
    # pydicom's decoders fail with a multi-line message: the detail is one line.
    reject = rejected(data_file("JPEG-lossy.dcm"))
    assert reject.kind is RejectKind.DECODER_LIMITATION
    assert reject.detail.startswith("pylibjpeg cannot decode this 12-bit JPEG Extended (Process 2 and 4) image; "
                                    "not installed: gdcm - requires gdcm>=")


def test_rejects_compressed_dicom_without_file_meta(tmp_path):
    # The data set's encoding says nothing about which codec compressed the
    # pixels, so no transfer syntax can be inferred: reject, do not guess.
    bare = tmp_path / "bare_j2k"
    bare.write_bytes(damaged.without_preamble_and_meta(data_file("MR_small_jp2klossless.dcm").read_bytes()))
    reject = rejected(bare)
    assert (reject.kind, reject.detail) == (RejectKind.UNSUPPORTED_SYNTAX,
                                            "compressed pixel data but no transfer syntax in the file meta")


def test_rejects_text_file(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("patient,label\n1,normal\n")
    reject = rejected(path)
    assert (reject.kind, reject.detail) == (RejectKind.NOT_AN_IMAGE, "not a DICOM, PNG or JPEG file")


def test_rejects_empty_and_truncated_png(tmp_path, rg1_uncr):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert rejected(empty).kind is RejectKind.EMPTY
    full = tmp_path / "full.png"
    Image.fromarray(np.round(rg1_uncr[0][:400, :400] * 255).astype(np.uint8)).save(full)
    half = tmp_path / "half.png"
    half.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    reject = rejected(half)
    assert reject.kind is RejectKind.TRUNCATED and reject.detail.startswith("the PNG does not decode (it ends early): ")


def test_rejects_dicom_without_pixel_data(tmp_path):
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    del ds.PixelData
    path = tmp_path / "no_pixels.dcm"
    ds.save_as(path)
    reject = rejected(path)
    assert (reject.kind, reject.detail) == (RejectKind.NO_PIXEL_DATA, "DICOM has no pixel data")


def test_missing_decoder_names_transfer_syntax(monkeypatch):
    class NoPlugins:
        is_available = False
        missing_dependencies = ["pylibjpeg - requires pylibjpeg-openjpeg"]

    monkeypatch.setattr(decode, "get_decoder", lambda uid: NoPlugins())
    reject = rejected(data_file("JPEG2000.dcm"))
    assert reject.kind is RejectKind.UNSUPPORTED_SYNTAX
    assert reject.detail == ("no decoder for transfer syntax JPEG 2000 Image Compression "
                             "(install pylibjpeg - requires pylibjpeg-openjpeg)")


# ---------------------------------------------------------------- geometry


def test_crop_fit_takes_the_short_side_then_the_centre():
    grey = np.zeros((1000, 500), dtype=np.float32)
    grey[:500] = 1.0  # top half bright
    out, steps = SPEC.to_uint8(grey)
    assert out.shape == (224, 224) and out.dtype == np.uint8
    # 1000x500 -> 512x256; the centre 224 rows are rows 144..367, so the
    # bright/dark edge (row 256) sits at crop row 112.
    assert (out[:110] == 255).all() and (out[114:] == 0).all()
    assert steps == ["resize:short_side(256,bilinear,antialias)", "crop:centre(224)", "quantize:uint8"]
    flat, steps = SPEC.to_uint8(np.full((256, 400), 0.4, np.float32))
    assert (flat == 102).all()  # 0.4 * 255 = 102, no drift from the filter
    assert steps == ["crop:centre(224)", "quantize:uint8"]  # the short side is 256 already: no resize


@pytest.fixture(scope="module")
def landscape_chest(rg1_uncr) -> np.ndarray:
    """A landscape chest radiograph: the upper third of the real RG1 CR, shoulder to shoulder
    (567 x 1841 pixels), lung apices and lateral chest walls at its left and right."""
    grey = rg1_uncr[0]
    return grey[int(0.12 * grey.shape[0]):int(0.41 * grey.shape[0])]


def test_pad_fit_keeps_the_lateral_lung_fields_a_centre_crop_cuts_off(landscape_chest):
    height, width = landscape_chest.shape
    cropped, crop_steps = SPEC.to_uint8(landscape_chest)
    padded, pad_steps = PreprocessSpec(fit=Fit.PAD).to_uint8(landscape_chest)
    # Crop: short side to 256 makes it 831 wide, and the centre 224 columns are a quarter of the
    # chest: both lateral lung fields (the outer 18-36 % on each side) are gone.
    wide = 256 * width // height
    resized = TF.resize(torch.from_numpy(landscape_chest)[None], [256, wide], antialias=True)[0]
    start = round((wide - 224) / 2)
    np.testing.assert_array_equal(cropped, np.round(resized[16:240, start:start + 224].clamp(0, 1).numpy() * 255))
    assert (height, width, wide) == (567, 1841, 831) and start / wide > 0.36
    # Pad: the whole chest, 224 wide, between bands of air.
    band = 224 * height // width
    above = (224 - band) // 2
    assert (padded[:above] == 0).all() and (padded[above + band:] == 0).all()
    whole = TF.resize(torch.from_numpy(landscape_chest)[None], [band, 224], antialias=True)[0]
    np.testing.assert_array_equal(padded[above:above + band], np.round(whole.clamp(0, 1).numpy() * 255))
    lungs = [padded[above:above + band, int(0.18 * 224):int(0.36 * 224)],
             padded[above:above + band, int(0.64 * 224):int(0.82 * 224)]]
    assert all(abs(lung.mean() / 255 - region_mean(landscape_chest, (0, 1), cols)) < 0.02
               for lung, cols in zip(lungs, [(0.18, 0.36), (0.64, 0.82)]))
    assert crop_steps[:2] == ["resize:short_side(256,bilinear,antialias)", "crop:centre(224)"]
    assert pad_steps == ["resize:long_side(224,bilinear,antialias)", "pad:centre(224,air)", "quantize:uint8"]


def test_pad_fit_of_a_square_image_pads_nothing(rg1_uncr):
    square = rg1_uncr[0][:1800, :1800]
    assert PreprocessSpec(fit=Fit.PAD).to_uint8(square)[1] == ["resize:long_side(224,bilinear,antialias)",
                                                              "quantize:uint8"]


def test_slivers_are_refused_by_either_fit():
    sliver = np.full((10, 2000), 0.5, np.float32)
    for fit in Fit:
        with pytest.raises(UnreadableImage, match="^10x2000 pixels: an aspect ratio over 8:1") as info:
            PreprocessSpec(fit=fit).to_uint8(sliver)
        assert info.value.kind is RejectKind.BAD_GEOMETRY


def _ultrasound_8bit(tmp_path: Path) -> Path:
    """A real 8-bit ultrasound (BreastMNIST, bundled) as DICOM, as the 256 px BUSI benchmark writes them."""
    path = tmp_path / "ultrasound.dcm"
    ultrasound_dicom(np.load(BUNDLED_NPZ)["test_images"][0], 0).save_as(path, enforce_file_format=True)
    return path


def _mr_cut_to_64x48(tmp_path: Path) -> Path:
    ds = pydicom.dcmread(data_file("MR_small.dcm"))
    return edited(tmp_path, "MR_small.dcm", Columns=48, PixelData=ds.pixel_array[:, :48].tobytes())


def _ct_padded_at_its_lowest_value(tmp_path: Path) -> Path:
    lowest = int(pydicom.dcmread(data_file("CT_small.dcm")).pixel_array.min())
    return edited(tmp_path, "CT_small.dcm", PixelPaddingValue=lowest)


@pytest.mark.parametrize("make, frames, indexed", [
    (lambda tmp: data_file("MR_small.dcm"), FramePolicy.MIDDLE, True),  # 16-bit signed, header window
    (lambda tmp: edited(tmp, "MR_small.dcm", PhotometricInterpretation="MONOCHROME1"), FramePolicy.MIDDLE, True),
    (_mr_cut_to_64x48, FramePolicy.MIDDLE, True),  # not square: the crop cuts one side only
    (lambda tmp: data_file("vlut_04.dcm"), FramePolicy.MIDDLE, True),  # VOI LUT sequence
    (lambda tmp: data_file("emri_small.dcm"), FramePolicy.ALL, True),  # every frame, percentile window
    (_ultrasound_8bit, FramePolicy.MIDDLE, True),  # 8-bit, percentile window
    (lambda tmp: data_file("CT_small.dcm"), FramePolicy.MIDDLE, True),  # a padding value no pixel has
    (_ct_padded_at_its_lowest_value, FramePolicy.MIDDLE, False),  # padding pixels: expanded to zero them
], ids=["window", "monochrome1", "not-square", "voi-lut", "all-frames", "ultrasound-8bit", "no-padding-pixels",
        "padding"])
def test_crop_of_indexed_grey_is_the_crop_of_the_expanded_image(tmp_path, make, frames, indexed):
    # With the short side already at `resize`, nothing is interpolated: preprocessing crops
    # indices into the grey levels and quantises each level once. Same pixels, same steps.
    path = make(tmp_path)
    grey, provenance = load_grey(path, frames=frames, indexed=True)
    assert isinstance(grey, IndexedGrey) is indexed
    expanded_grey, expanded_provenance = load_grey(path, frames=frames)
    assert provenance == expanded_provenance
    np.testing.assert_array_equal(expanded(grey), expanded_grey)
    short = min(grey.shape[-2:])
    spec = PreprocessSpec(resize=short, crop=short * 3 // 4)
    image, steps = spec.to_uint8(grey)
    expected, expected_steps = spec.to_uint8(expanded_grey)
    assert image.dtype == np.uint8 and image.shape[-2:] == (spec.crop, spec.crop)
    np.testing.assert_array_equal(image, expected)
    assert steps == expected_steps == [f"crop:centre({spec.crop})", "quantize:uint8"]
    config = PreprocessConfig(resize=spec.resize, crop=spec.crop, frames=frames, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(preprocess_file(path, config).image, expected)


def test_indexed_grey_still_resizes_and_pads_as_the_expanded_image():
    grey, _ = load_grey(data_file("MR_small.dcm"), indexed=True)  # 64 x 64: resized up, or padded
    for spec in (PreprocessSpec(resize=80, crop=72), PreprocessSpec(fit=Fit.PAD, crop=72),
                 PreprocessSpec(resize=64, crop=64)):
        np.testing.assert_array_equal(spec.to_uint8(grey)[0], spec.to_uint8(expanded(grey))[0])
        assert spec.to_uint8(grey)[1] == spec.to_uint8(expanded(grey))[1]


def test_unit_range_maps_nan_to_black_and_infinities_to_the_ends():
    grey = np.array([[np.nan, np.inf, -np.inf], [-0.5, 0.25, 7.0]], dtype=np.float32)
    np.testing.assert_array_equal(decode.unit_range(grey), [[0.0, 1.0, 0.0], [0.0, 0.25, 1.0]])
    frozen = np.array([2.0, 0.5], dtype=np.float64)
    frozen.flags.writeable = False
    out = decode.unit_range(frozen)
    assert out.dtype == np.float32 and out.tolist() == [1.0, 0.5] and frozen.tolist() == [2.0, 0.5]


# ---------------------------------------------------------------- cache


def _keys(config: PreprocessConfig) -> list[str]:
    """The keys a fresh reader of the cache finds (of `config.crop` images)."""
    return sorted(ImageCache(config.cache_dir, config.crop).index)


def _shards(config: PreprocessConfig) -> list[Path]:
    return sorted(config.cache_dir.rglob(f"*{cache.SHARD_SUFFIX}"))


def test_cache_hit_does_not_decode(tmp_path, config, monkeypatch):
    src = data_file("CT_small.dcm")
    first, key, provenance, first_hit = preprocess_file(src, config)
    assert not first_hit
    assert _keys(config) == [key] and len(_shards(config)) == 1
    assert provenance[-3:] == ["resize:short_side(256,bilinear,antialias)", "crop:centre(224)", "quantize:uint8"]

    def no_decoding(*args, **kwargs):
        raise AssertionError("cache hit must not decode")

    monkeypatch.setattr(pp, "load_grey", no_decoding)
    second, key2, provenance2, second_hit = preprocess_file(src, config)
    assert second_hit
    np.testing.assert_array_equal(second, first)
    assert (key2, provenance2) == (key, provenance)
    # Keyed by content: the same bytes under another name are a hit too.
    renamed = tmp_path / "renamed_without_suffix"
    shutil.copyfile(src, renamed)
    assert preprocess_file(renamed, config)[1] == key


def test_cache_key_depends_on_settings(config):
    src = data_file("CT_small.dcm")
    _, key, _, _ = preprocess_file(src, config)
    key_resize = preprocess_file(src, config.model_copy(update={"resize": 288})).cache_key
    key_crop = preprocess_file(src, config.model_copy(update={"crop": 192})).cache_key
    assert len({key, key_resize, key_crop}) == 3
    assert len(_shards(config)) == 3
    assert _keys(config) == sorted([key, key_resize])  # a 192 crop is never served for a 224 one


def test_cache_key_depends_on_pipeline_version(config, monkeypatch):
    src = data_file("CT_small.dcm")
    _, key, _, _ = preprocess_file(src, config)
    monkeypatch.setattr(cache, "PIPELINE_VERSION", cache.PIPELINE_VERSION + 1)
    assert preprocess_file(src, config)[1] != key


def test_a_chunk_of_misses_is_one_shard_and_each_entry_reads_back(mixed_folder, config):
    root, manifest = mixed_folder
    paths = [root / rel for rel in manifest["path"]]
    results = pp.preprocess_files(paths, config)
    decoded = [r for r in results if isinstance(r, pp.Preprocessed)]
    assert len(decoded) == len(paths) - len(MIXED_REJECTS)  # rejects are never cached
    (shard,) = _shards(config)
    assert sorted(cache.read_index(shard)) == sorted(r.cache_key for r in decoded) == _keys(config)
    reader = ImageCache(config.cache_dir, config.crop)
    for result in decoded:
        image, provenance = reader.get(result.cache_key)
        np.testing.assert_array_equal(image, result.image)
        assert provenance == result.provenance
    # A warm run reads every entry from the shard and decodes nothing.
    warm = pp.preprocess_dataset(manifest, root, config.model_copy(update={"workers": 1}))
    assert warm.cache_hits == len(decoded) and _shards(config) == [shard]
    np.testing.assert_array_equal(warm.images, np.stack([r.image for r in decoded]))


@pytest.mark.parametrize("workers", [1, 2])  # in process, and the process pool (fork: the patch goes along)
def test_a_shard_that_cannot_be_written_costs_only_the_caching(mixed_folder, config, monkeypatch, caplog, workers):
    root, manifest = mixed_folder
    config = config.model_copy(update={"workers": workers})
    expected = pp.preprocess_dataset(manifest, root, config.model_copy(update={"cache_dir": config.cache_dir.parent / "working"}))

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(cache, "write_bytes_atomic", disk_full)
    full = pp.preprocess_dataset(manifest, root, config)
    # Every file still has its crop or its reject, as with a working cache; nothing was stored.
    pd.testing.assert_frame_equal(full.manifest, expected.manifest)
    pd.testing.assert_frame_equal(full.rejects, expected.rejects)
    np.testing.assert_array_equal(full.images, expected.images)
    assert len(full.manifest) + len(full.rejects) == len(manifest) and full.cache_hits == 0
    assert _shards(config) == []
    if workers == 1:  # a pool worker's warning goes to its own stderr
        assert "could not store" in caplog.text and "No space left on device" in caplog.text


def test_stale_tmp_file_is_never_read(config):
    src = data_file("CT_small.dcm")
    expected = PreprocessSpec.from_config(config).to_uint8(load_grey(src)[0])[0]
    key = cache.cache_key(hashlib.sha256(src.read_bytes()).hexdigest(), PreprocessSpec.from_config(config).cache_token(),
                          config.frames, config.voi_window)
    # What a killed writer leaves beside the shard it was writing: a complete-looking but
    # wrong temp file, and a half-written one.
    stale = ImageCache(config.cache_dir / "stale", config.crop).put([(key, np.zeros((224, 224), np.uint8), ["bogus"])])
    folder = config.cache_dir / stale.parent.name
    folder.mkdir(parents=True)
    stale.rename(folder / f".{stale.name}.abc123.tmp")
    (folder / f".{stale.name}.def456.tmp").write_bytes(cache.SHARD_MAGIC + b"\x40\0\0\0\0\0\0\0{\"entries\": [[")
    shutil.rmtree(config.cache_dir / "stale")
    image, _, provenance, hit = preprocess_file(src, config)
    assert not hit and "bogus" not in provenance
    np.testing.assert_array_equal(image, expected)
    assert _keys(config) == [key]


def test_killed_write_leaves_no_entry(config, monkeypatch):
    src = data_file("CT_small.dcm")

    class DiesMidWrite:
        """The temp file's handle, killed after writing half of the shard."""

        def __init__(self, handle, mode):
            self.file = open(handle, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.file.close()

        def write(self, data):
            self.file.write(data[: len(data) // 2])
            self.file.flush()
            raise KeyboardInterrupt

    monkeypatch.setattr("tasks.io.os.fdopen", DiesMidWrite)
    with pytest.raises(KeyboardInterrupt):
        preprocess_file(src, config)
    monkeypatch.undo()
    assert _shards(config) == []
    assert list(config.cache_dir.rglob("*.tmp")) == []
    image, _, _, _ = preprocess_file(src, config)
    assert image.shape == (224, 224)


@pytest.mark.parametrize("damage", ["truncated", "garbage index"])
def test_a_damaged_shard_is_removed_and_its_entries_rebuilt(config, caplog, damage):
    src = data_file("CT_small.dcm")
    image, key, _, _ = preprocess_file(src, config)
    (shard,) = _shards(config)
    data = shard.read_bytes()
    index_start = len(cache.SHARD_MAGIC) + 8  # after the index's length
    shard.write_bytes(data[:-50] if damage == "truncated" else data[:index_start] + b"}" + data[index_start + 1:])
    assert ImageCache(config.cache_dir, config.crop).get(key) is None
    assert "is damaged" in caplog.text and not shard.exists()
    again, _, _, hit = preprocess_file(src, config)
    assert not hit
    np.testing.assert_array_equal(again, image)
    assert _keys(config) == [key]


# ---------------------------------------------------------------- model input


def test_to_model_input_shape_and_normalisation():
    images = torch.zeros((2, 224, 224), dtype=torch.uint8)
    images[1, 10, 20] = 200
    x = to_model_input(images)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    for c in range(3):
        assert x[1, c, 10, 20].item() == pytest.approx((200 / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], abs=1e-6)
        assert x[0, c, 0, 0].item() == pytest.approx(-IMAGENET_MEAN[c] / IMAGENET_STD[c], abs=1e-6)
    single = to_model_input(images[1])
    assert single.shape == (1, 3, 224, 224)
    torch.testing.assert_close(single[0], x[1])
    with pytest.raises(TypeError):
        to_model_input(images.float())


# ---------------------------------------------------------------- whole dataset


def test_parallel_preprocessing_matches_serial_in_order(mixed_folder, config):
    root, manifest = mixed_folder
    serial = pp.preprocess_dataset(manifest, root, config.model_copy(update={"workers": 1}))
    shutil.rmtree(config.cache_dir)  # the parallel run must decode, not read the serial run's cache
    parallel = pp.preprocess_dataset(manifest, root, config.model_copy(update={"workers": 2}))
    assert parallel.cache_hits == 0
    # Each chunk of misses went to one worker and became one shard: no two hold the same entry.
    shards = [set(cache.read_index(shard)) for shard in _shards(config)]
    assert sum(map(len, shards)) == len(set().union(*shards)) == len(serial.manifest)
    pd.testing.assert_frame_equal(parallel.manifest, serial.manifest)
    pd.testing.assert_frame_equal(parallel.rejects, serial.rejects)
    np.testing.assert_array_equal(parallel.images, serial.images)
    assert list(parallel.manifest["path"]) == [p for p in manifest["path"] if p not in MIXED_REJECTS]
    assert dict(zip(parallel.rejects["path"], parallel.rejects["kind"])) == MIXED_REJECTS


def test_cache_hits_are_read_here_and_only_misses_are_submitted_in_order(mixed_folder, config):
    root, manifest = mixed_folder
    serial = pp.preprocess_dataset(manifest, root, config.model_copy(update={"workers": 1}))
    shutil.rmtree(config.cache_dir)
    warm = ["CT_small.dcm", "SC_rgb.dcm", "JPEG2000.dcm"]
    pp.preprocess_dataset(manifest[manifest["path"].isin(warm)], root, config.model_copy(update={"workers": 1}))

    class Done:  # a future that has already run
        def __init__(self, value):
            self.value = value

        def result(self):
            return self.value

    submitted = []

    def submit(chunk):
        submitted.append([path.name for path in chunk])
        return Done(pp.preprocess_files(chunk, config))

    mixed = pp.preprocess_dataset(manifest, root, config.model_copy(update={"workers": 2}), submit=submit)
    assert mixed.cache_hits == len(warm)
    assert [name for chunk in submitted for name in chunk] == [p for p in manifest["path"] if p not in warm]
    pd.testing.assert_frame_equal(mixed.manifest, serial.manifest)
    pd.testing.assert_frame_equal(mixed.rejects, serial.rejects)
    np.testing.assert_array_equal(mixed.images, serial.images)


def test_chunks_give_every_worker_several_and_stay_small():
    assert pp.chunk_size(10, 2) == 1
    assert pp.chunk_size(780, 2) == 48
    assert pp.chunk_size(100_000, 16) == 64


def test_workers_default_to_every_usable_core():
    assert pp.resolve_workers(None) == len(os.sched_getaffinity(0))
    assert pp.resolve_workers(3) == 3


def test_symlink_loop_is_an_unreadable_image_not_a_crash(tmp_path, config):
    loop = tmp_path / "loop.dcm"
    loop.symlink_to(loop)
    with pytest.raises(UnreadableImage, match="cannot read the file: Too many levels of symbolic links") as info:
        preprocess_file(loop, config)
    assert info.value.kind is RejectKind.UNREADABLE


def test_run_killed_part_way_resumes_from_cache_to_the_same_result(mixed_folder, config, monkeypatch):
    root, manifest = mixed_folder
    config = config.model_copy(update={"workers": 1})
    decode, decoded = pp.load_grey, []

    def killed_on_fourth_file(*args, **kwargs):
        if len(decoded) == 3:
            raise KeyboardInterrupt  # what Ctrl-C or a SIGINT from the scheduler raises
        decoded.append(args[0])
        return decode(*args, **kwargs)

    monkeypatch.setattr(pp, "load_grey", killed_on_fourth_file)
    with pytest.raises(KeyboardInterrupt):
        pp.preprocess_dataset(manifest, root, config)
    monkeypatch.setattr(pp, "load_grey", decode)
    resumed = pp.preprocess_dataset(manifest, root, config)
    assert resumed.cache_hits == 2  # CT_small and MR_small; cut.dcm is a reject, never cached
    assert not list(config.cache_dir.rglob("*.tmp"))

    shutil.rmtree(config.cache_dir)
    fresh = pp.preprocess_dataset(manifest, root, config)
    assert fresh.cache_hits == 0
    pd.testing.assert_frame_equal(resumed.manifest, fresh.manifest)
    pd.testing.assert_frame_equal(resumed.rejects, fresh.rejects)
    np.testing.assert_array_equal(resumed.images, fresh.images)


# ---------------------------------------------------------------- frames and VOI choices


def test_first_frame_policy_takes_frame_zero():
    stored = pydicom.dcmread(data_file("emri_small.dcm")).pixel_array[0]
    grey, provenance = load_grey(data_file("emri_small.dcm"), frames=FramePolicy.FIRST)
    np.testing.assert_allclose(grey, percentile_window(stored), atol=1e-6)
    assert provenance[1] == "frame:first(1 of 10)"


def test_every_frame_policy_gives_one_sample_per_frame_sharing_the_patient(tmp_path, config):
    root = tmp_path / "mf"
    root.mkdir()
    shutil.copyfile(data_file("emri_small_RLE.dcm"), root / "cine.dcm")
    shutil.copyfile(data_file("CT_small.dcm"), root / "ct.dcm")
    manifest = pd.DataFrame({"path": ["cine.dcm", "ct.dcm"], "patient_key": ["p1", "p2"], "split": "train"})
    prepared = pp.preprocess_dataset(manifest, root, config.model_copy(update={"frames": FramePolicy.ALL}))
    rows = prepared.manifest
    assert rows["path"].tolist() == ["cine.dcm"] * 10 + ["ct.dcm"]
    assert rows["frame"].tolist() == list(range(1, 11)) + [1]  # numbered from 1, as DICOM numbers frames
    assert set(rows.loc[rows["path"] == "cine.dcm", "patient_key"]) == {"p1"}
    assert rows.loc[3, "provenance"].endswith("frame:all(4 of 10)")
    # One window for the whole loop, so frames keep their relative brightness.
    stored = pydicom.dcmread(data_file("emri_small.dcm")).pixel_array
    expected = SPEC.to_uint8(percentile_window(stored).astype(np.float32))[0]
    np.testing.assert_array_equal(prepared.images[:10], expected)
    assert not np.array_equal(prepared.images[0], prepared.images[9])


def test_voi_window_chosen_by_index():
    # A real MR with two header windows: 450/790 (first) and 200/443.
    path = data_file("MR-SIEMENS-DICOM-WithOverlays.dcm")
    stored = pydicom.dcmread(path).pixel_array.astype(np.float64)
    for index, (c, w) in enumerate([(450.0, 790.0), (200.0, 443.0)]):
        grey, provenance = load_grey(path, voi_window=index)
        np.testing.assert_allclose(grey, linear_window(stored, c, w), atol=1e-5)
        assert f"voi:window(#{index},c={c:g},w={w:g})" in provenance
    # A file with fewer windows than asked for uses its first.
    assert "voi:window(c=15000,w=30000)" in load_grey(data_file("RG1_UNCR.dcm"), voi_window=1)[1]


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_voi_lut_function_is_honoured(tmp_path, function):
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    c, w = 40.0, 400.0
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = c, w, function
    path = tmp_path / f"{function}.dcm"
    ds.save_as(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    grey, provenance = load_grey(path)
    if function == "LINEAR_EXACT":  # PS3.3 C.11.2.1.3.2
        expected = np.clip((hu - c) / w + 0.5, 0.0, 1.0)
    else:  # PS3.3 C.11.2.1.3.1
        expected = 1.0 / (1.0 + np.exp(-4.0 * (hu - c) / w))
    np.testing.assert_allclose(grey, expected, atol=1e-5)
    assert provenance[2] == f"voi:window(c=40,w=400,{function})"
    # Soft tissue (about 40 HU) mid-grey, bone bright, air black, for both functions.
    assert grey[hu < -500].max() < 0.05 and grey[hu > 500].min() > 0.95
