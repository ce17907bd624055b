"""Turn one DICOM, PNG or JPEG file into a cached 8-bit grey image and a model tensor.

The pipeline per file is: detect the format from the bytes, decode to float grey
in [0, 1] with bright = dense (`load_grey`), resize the short side and centre
crop (`resize_and_crop`), and cache the uint8 result on disk keyed by the file's
content and the settings (`preprocess_file`). `to_model_input` turns a batch of
cached images into ImageNet-normalised 3-channel float tensors.

Every step that changes pixel values is recorded as a short string in a
provenance list, so a cached image can be traced back to what was done to it.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import struct
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple, Protocol

import numpy as np
import pandas as pd
import pydicom
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_windowing,
    get_decoder,
)
from pydicom.uid import HTJ2K, HTJ2KLossless, HTJ2KLosslessRPCL, JPEG2000, JPEG2000Lossless
from torchvision.transforms.v2 import functional as TF

from configs import FramePolicy, PreprocessConfig
from tasks.dicom import inferred_transfer_syntax, looks_like_raw_dicom
from tasks.io import write_bytes_atomic

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PIPELINE_VERSION",
    "CACHE_SUFFIX",
    "UnreadableImage",
    "load_grey",
    "reduced_decode_floor",
    "resize_and_crop",
    "Preprocessed",
    "preprocess_file",
    "SplitData",
    "PreparedData",
    "preprocess_dataset",
    "resolve_workers",
    "to_model_input",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Part of every cache key: bump whenever the pixels this module produces for
# the same file and settings could change, so old cache entries stop matching.
PIPELINE_VERSION = 3  # 2: JPEG 2000 decoded at reduced resolution when the resize allows;
# 3: HTJ2K decoded at reduced resolution too; provenance records a transfer syntax
# inferred from the encoding

PERCENTILE_WINDOW = (0.5, 99.5)
# preprocess_file lets JPEG 2000 decode at reduced resolution down to this many
# times the resize, not down to the resize itself: the resize then still halves
# the image at least, so its antialiasing filter, not the wavelet's coarser
# low-pass, shapes the output. On RG3_J2KR the crop differs from the full
# decode's by 0.35 8-bit levels on average at 1/2 resolution, 1.0 at 1/4.
REDUCED_DECODE_MARGIN = 2
BT601_LUMA = (0.299, 0.587, 0.114)

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# (7FE0,0010) Pixel Data tag as it appears in little- and big-endian files.
_PIXEL_DATA_TAG_BYTES = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")
_COLOUR_PIS = ("RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR")
# HTJ2K (Part 15) keeps Part 1's wavelet pyramid and main header; only the block coder differs.
_J2K_SYNTAXES = (JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K)


class UnreadableImage(Exception):
    """A file that cannot be turned into an image; the message says why.

    `reason` is the message; `path` is the file, when known.
    """

    def __init__(self, reason: str, path: Path | None = None):
        super().__init__(reason)
        self.reason = reason
        self.path = path


# --------------------------------------------------------------------------
# Format detection


def _sniff(data: bytes) -> str | None:
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


# --------------------------------------------------------------------------
# Decoding


def load_grey(path: Path, *, data: bytes | None = None, frames: FramePolicy = FramePolicy.MIDDLE,
              voi_window: int = 0, min_short_side: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Decode `path` to float32 HxW grey in [0, 1] (bright = dense) and its provenance.

    `data`, when given, is the file's content already read (so a caller that
    hashed the bytes decodes exactly what it hashed); `path` then only names it.
    `frames` picks the frame of a multi-frame DICOM (`all`: F x H x W, every
    frame); `voi_window` which of several header windows or VOI LUTs to apply
    (the first when the file has fewer). `min_short_side`, when given, lets a
    JPEG 2000 DICOM decode at 1/2, 1/4, ... resolution as long as its short side
    stays at least that many pixels (see `_decode_j2k_reduced`); None decodes
    every pixel.
    Raises UnreadableImage for anything that is not a decodable DICOM, PNG or JPEG.
    """
    path = Path(path)
    if data is None:
        data = path.read_bytes()
    if not data:
        raise UnreadableImage("empty file", path)
    kind = _sniff(data)
    try:
        if kind in ("dicom", "dicom-no-preamble"):
            grey, provenance = _load_dicom(data, kind == "dicom-no-preamble", frames, voi_window,
                                           min_short_side)
        elif kind in ("png", "jpeg"):
            grey, provenance = _load_pil(data, kind)
        else:
            raise UnreadableImage("not a DICOM, PNG or JPEG file")
    except UnreadableImage as exc:
        exc.path = path
        raise
    # fmax/fmin return the number when the other operand is NaN: NaN -> 0,
    # +inf -> 1, -inf -> 0, in two passes over a full-size image where
    # nan_to_num and clip took four.
    grey = np.fmin(np.fmax(np.asarray(grey, dtype=np.float32), 0.0), 1.0)
    return np.ascontiguousarray(grey), provenance


def _load_pil(data: bytes, kind: str) -> tuple[np.ndarray, list[str]]:
    label = kind.upper()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            oriented = ImageOps.exif_transpose(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UnreadableImage(f"corrupt {label}: {exc}") from exc
    provenance = [f"decode:{kind}(mode={img.mode})"]
    if oriented is not img:
        provenance.append("exif_transpose")
    img = oriented

    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale PNG; Pillow reports it as I;16 (or I, int32 storage).
        grey = np.asarray(img).astype(np.float32) / 65535.0
        provenance.append("scale:/65535")
    elif img.mode == "F":
        grey = np.asarray(img, dtype=np.float32)
        provenance.append("scale:none(float)")
    elif img.mode in ("L", "LA", "1"):
        grey = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
        provenance.append("scale:/255")
    else:
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        grey = _luminance(rgb)
        provenance += ["scale:/255", "colour:luminance(BT.601)"]
    return grey, provenance


def _luminance(rgb: np.ndarray) -> np.ndarray:
    r, g, b = BT601_LUMA
    return r * rgb[..., 0] + g * rgb[..., 1] + b * rgb[..., 2]


def _read_dicom(data: bytes, force: bool) -> pydicom.Dataset:
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=force)
    except InvalidDicomError as exc:
        raise UnreadableImage("not a DICOM, PNG or JPEG file") from exc
    except Exception as exc:  # pydicom raises many types on malformed input
        raise UnreadableImage(f"corrupt DICOM: {exc}") from exc
    if force and not any(
        k in ds for k in ("SOPClassUID", "Rows", "Modality", *_PIXEL_DATA_KEYWORDS)
    ):
        raise UnreadableImage("not a DICOM, PNG or JPEG file")
    return ds


def _transfer_syntax(ds: pydicom.Dataset, provenance: list[str]):
    """The file meta's transfer syntax, else the one the data set's encoding implies (recorded)."""
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if tsyntax:
        return tsyntax
    tsyntax = inferred_transfer_syntax(ds)
    if tsyntax is None:
        raise UnreadableImage("corrupt DICOM: compressed pixel data but no transfer syntax")
    ds.file_meta.TransferSyntaxUID = tsyntax  # where pydicom's decoders look for it
    # A guess, however well founded: show it beside the pixels it produced.
    provenance.append(f"transfer_syntax:inferred({tsyntax.name})")
    return tsyntax


def _decode_dicom_frames(ds: pydicom.Dataset, frames: FramePolicy, provenance: list[str],
                         min_short_side: int | None) -> tuple[np.ndarray, str]:
    """Decoded pixels of the frame(s) `frames` picks and the photometric interpretation they are in."""
    tsyntax = _transfer_syntax(ds, provenance)
    reduced = _decode_j2k_reduced(ds, tsyntax, min_short_side) if min_short_side else None
    if reduced is not None:
        arr, level = reduced
        provenance.append(f"decode:dicom({tsyntax.name})")
        provenance.append(f"decode:reduced_resolution(1/{2**level},{ds.Rows}x{ds.Columns}"
                          f"->{arr.shape[0]}x{arr.shape[1]})")
        return arr, str(ds.PhotometricInterpretation).strip().upper()
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise UnreadableImage(f"no decoder for transfer syntax {tsyntax.name}") from exc
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        raise UnreadableImage(f"no decoder for transfer syntax {tsyntax.name} (install {needs})")

    n_frames = int(ds.get("NumberOfFrames") or 1)
    index = {FramePolicy.MIDDLE: n_frames // 2, FramePolicy.FIRST: 0, FramePolicy.ALL: None}[frames]
    try:
        # Decode only the frame we keep: a cine loop can be hundreds of frames.
        # as_rgb: YBR_FULL and YBR_FULL_422 come back as RGB, by the standard's equations.
        arr, props = decoder.as_array(ds, index=index, as_rgb=True)
    except Exception as exc:
        raise UnreadableImage(f"corrupt DICOM: cannot decode {tsyntax.name} pixel data: {exc}") from exc
    provenance.append(f"decode:dicom({tsyntax.name})")
    if n_frames > 1 and index is not None:
        provenance.append(f"frame:{frames.value}({index}/{n_frames})")  # 0-based index
    header_pi = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    pi = str(props.get("photometric_interpretation") or header_pi).strip().upper()
    if pi != header_pi:
        # The decoder already converted (YCbCr JPEG / YBR_FULL_422 -> RGB).
        provenance.append(f"colour:{header_pi}->{pi}(decoder)")
    return arr, pi


class _J2kHeader(NamedTuple):
    """What the main header of a JPEG 2000 codestream says about its first component."""

    width: int
    height: int
    offset: tuple[int, int]  # XOsiz, YOsiz: where the image starts on the reference grid
    components: int
    precision: int  # bits
    signed: bool
    levels: int  # wavelet decomposition levels: how many halvings a decoder can skip


def _j2k_header(codestream: bytes) -> _J2kHeader | None:
    """SIZ and COD (and a COC for component 0) of a raw codestream; None when it is not one."""
    # ISO/IEC 15444-1 Annex A: SOC, then SIZ first, then the other main-header
    # marker segments (each: 2-byte marker, 2-byte length that counts itself)
    # up to the first tile part (SOT).
    if codestream[:4] != b"\xff\x4f\xff\x51":
        return None
    size = levels = None
    pos = 2
    try:
        while pos + 4 <= len(codestream):
            marker, length = struct.unpack(">HH", codestream[pos:pos + 4])
            segment = codestream[pos + 4:pos + 2 + length]
            if marker == 0xFF51:  # SIZ
                width, height, x0, y0 = struct.unpack(">IIII", segment[2:18])
                (components,) = struct.unpack(">H", segment[34:36])
                ssiz = segment[36]
                size = (width - x0, height - y0, (x0, y0), components, (ssiz & 0x7F) + 1, bool(ssiz & 0x80))
            elif marker == 0xFF52:  # COD: Scod, SGcod (4 bytes), then SPcod's levels
                levels = segment[5] if levels is None else levels
            elif marker == 0xFF53 and size is not None and size[3] < 257 and segment[0] == 0:
                levels = segment[2]  # COC for component 0 overrides COD
            elif marker == 0xFF90:  # SOT: end of the main header
                break
            pos += 2 + length
    except (struct.error, IndexError):
        return None
    if size is None or levels is None:
        return None
    return _J2kHeader(*size, levels=levels)


def _decode_j2k_reduced(ds: pydicom.Dataset, tsyntax, min_short_side: int) -> tuple[np.ndarray, int] | None:
    """A single-frame monochrome JPEG 2000 image decoded at 1/2**level resolution, and level.

    A JPEG 2000 codestream is a wavelet pyramid: its LL band after `level`
    halvings is a low-pass, subsampled copy of the image, in the same units,
    and a decoder can stop there without entropy-decoding the finer bands (at
    1/4, about 1/16 of the work). The resize to `min_short_side` would
    discard those details anyway. `level` is the largest whose short side is
    still >= `min_short_side`, so the resize still only shrinks.

    None (decode everything with pydicom) unless every check passes: a raw
    codestream whose size, precision and sign match the header, unsigned
    single-component data (signed or colour J2K, and frames of a multi-frame
    file, take the full path), a level the codestream has, and Pillow's
    OpenJPEG decoding it.
    """
    if tsyntax not in _J2K_SYNTAXES or int(ds.get("NumberOfFrames") or 1) != 1:
        return None
    pi = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if pi not in ("MONOCHROME1", "MONOCHROME2") or int(ds.get("SamplesPerPixel") or 1) != 1:
        return None
    if int(ds.get("PixelRepresentation") or 0) != 0:
        return None
    try:
        codestream = next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception:  # malformed encapsulation: let the full decode report it
        return None
    header = _j2k_header(codestream)
    if (header is None or header.components != 1 or header.signed or header.offset != (0, 0)
            or header.precision != int(ds.get("BitsStored") or 0) or header.precision > 16
            or (header.height, header.width) != (int(ds.Rows), int(ds.Columns))):
        return None
    level = _reduction_level(header, min_short_side)
    if level == 0:
        return None
    try:
        with Image.open(io.BytesIO(codestream)) as img:
            img.reduce = level
            img.load()
            mode, pixels = img.mode, np.asarray(img)
    except (OSError, ValueError, SyntaxError):
        return None
    expected = (-(-header.height // 2**level), -(-header.width // 2**level))
    if mode not in ("L", "I;16") or pixels.shape != expected:
        return None
    # Pillow scales samples up to the mode's full depth (a 15-bit CR becomes
    # 16-bit by a left shift); shift back so the values are the stored values
    # that the modality LUT and window expect.
    depth = 8 if mode == "L" else 16
    return pixels >> (depth - header.precision), level


def _reduction_level(header: _J2kHeader, min_short_side: int) -> int:
    """Largest number of halvings that keeps the short side >= min_short_side and that Pillow decodes."""
    for level in range(header.levels, 0, -1):
        power = 2**level
        if -(-min(header.width, header.height) // power) < min_short_side:
            continue
        # Pillow sizes a reduced image as round(n / 2**level) where OpenJPEG
        # makes ceil(n / 2**level), and fails the decode when they differ
        # (1841 px at 1/4: 460 vs 461), so only take levels where they agree.
        if all((n + power // 2) // power == -(-n // power) for n in (header.width, header.height)):
            return level
    return 0


def _load_dicom(data: bytes, force: bool, frames: FramePolicy, voi_window: int,
                min_short_side: int | None) -> tuple[np.ndarray, list[str]]:
    ds = _read_dicom(data, force)
    if not any(k in ds for k in _PIXEL_DATA_KEYWORDS):
        # pydicom stops quietly at the end of a truncated file, dropping a
        # partial Pixel Data element; if its tag is in the bytes, say so.
        if any(tag in data for tag in _PIXEL_DATA_TAG_BYTES):
            raise UnreadableImage("corrupt DICOM: pixel data is truncated or unreadable")
        raise UnreadableImage("DICOM has no pixel data")
    if not any(ds[k].value for k in _PIXEL_DATA_KEYWORDS if k in ds):
        raise UnreadableImage("DICOM has no pixel data")

    provenance: list[str] = []
    arr, pi = _decode_dicom_frames(ds, frames, provenance, min_short_side)
    if pi in _COLOUR_PIS or (arr.ndim == 3 and arr.shape[-1] in (3, 4)):
        grey = _colour_to_grey(arr, pi, ds, provenance)
    else:
        grey = _monochrome_to_grey(arr, ds, voi_window, provenance)
        invert = []
        if pi == "MONOCHROME1":
            invert.append("MONOCHROME1")
        if str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE":
            invert.append("PresentationLUTShape=INVERSE")
        # One inversion even when both are set: for DX/MG images the standard
        # pairs MONOCHROME1 with INVERSE to describe the same single inversion.
        if invert:
            grey = 1.0 - grey
            provenance.append("invert:" + "+".join(invert))
        padding = _padding_mask(arr, ds)
        if padding is not None and padding.any():
            grey[padding] = 0.0  # padding is "no image": show it as air
            provenance.append(f"padding:zeroed({int(padding.sum())}px)")
    return grey, provenance


def _colour_to_grey(arr: np.ndarray, pi: str, ds: pydicom.Dataset, provenance: list[str]) -> np.ndarray:
    # Colour images (ultrasound, secondary captures) are display-ready: they
    # carry no modality/VOI transform, so scale by the nominal range like a
    # PNG, not by a percentile window, to keep DICOM and PNG exports of the
    # same picture identical.
    if pi == "PALETTE COLOR":
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        try:
            rgb = apply_color_lut(arr, ds)
        except Exception as exc:
            raise UnreadableImage(f"corrupt DICOM: bad palette colour lookup table: {exc}") from exc
        provenance.append("colour:palette_lut")
    else:
        bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
        rgb = arr  # YBR_FULL(_422) arrive as RGB: the decoder converts them (as_rgb)
    rgb = rgb[..., :3].astype(np.float32) / float(2**bits - 1)
    provenance.append(f"scale:/{2**bits - 1}")
    provenance.append("colour:luminance(BT.601)")
    return _luminance(rgb)


def _monochrome_to_grey(arr: np.ndarray, ds: pydicom.Dataset, voi_window: int,
                        provenance: list[str]) -> np.ndarray:
    """Modality LUT, then VOI (LUT, window or percentile), scaled to [0, 1].

    The header transforms are elementwise, so for 8/16-bit integer pixels they
    run once per stored value in arr.min()..arr.max() and the result is looked
    up per pixel: the same numbers, and a 3.6-megapixel CR needs at most 65,536
    evaluations of pydicom's float64 windowing instead of 3.6 million.
    """
    stored, lookup = _stored_value_table(arr)
    values = apply_modality_lut(stored, ds)
    if ds.get("ModalityLUTSequence"):
        provenance.append("modality_lut:lut_sequence")
    elif "RescaleSlope" in ds and "RescaleIntercept" in ds:
        provenance.append(
            f"modality_lut:rescale(slope={float(ds.RescaleSlope):g},"
            f"intercept={float(ds.RescaleIntercept):g})"
        )

    grey = None
    try:
        if _has_voi_lut(ds):
            index = voi_window if voi_window < len(ds.VOILUTSequence) else 0
            grey = _apply_voi_lut_unit(values, ds, index)
            provenance.append(f"voi:lut_sequence({index})")
        elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
            index = voi_window if voi_window < len(_all(ds.WindowCenter)) else 0
            grey, step = _apply_window_unit(values, ds, index)
            provenance.append(step)
    except (ValueError, NotImplementedError, IndexError, KeyError, AttributeError) as exc:
        # A broken VOI header should not lose the image: fall back to the
        # data-driven window and say so.
        provenance.append(f"voi:ignored({exc})")
        grey = None
    if grey is None:
        grey = _percentile_window(values, lookup, _padding_mask(arr, ds))
        provenance.append("voi:percentile({:g},{:g})".format(*PERCENTILE_WINDOW))
    # Clip and cast the table, then look up: the same numbers, without a
    # float64 copy of a full-size image (29 MB for a 1955x1841 CR).
    grey = np.clip(grey, 0.0, 1.0).astype(np.float32)
    return grey if lookup is None else grey[lookup]


def _stored_value_table(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(every value from arr.min() to arr.max(), each pixel's index into it) for 8/16-bit
    integer pixels; (arr, None) otherwise."""
    if arr.dtype.kind not in "iu" or arr.dtype.itemsize > 2 or arr.size == 0:
        return arr, None
    low, high = int(arr.min()), int(arr.max())
    return np.arange(low, high + 1, dtype=np.int64), np.subtract(arr, low, dtype=np.int32)


def _has_voi_lut(ds: pydicom.Dataset) -> bool:
    seq = ds.get("VOILUTSequence")
    return bool(seq) and None not in (seq[0].get("LUTDescriptor"), seq[0].get("LUTData"))


def _apply_voi_lut_unit(values: np.ndarray, ds: pydicom.Dataset, index: int) -> np.ndarray:
    """pydicom's apply_voi (LUT `index`), rescaled from the LUT's own output range to [0, 1]."""
    n_entries, first, _bits = ds.VOILUTSequence[index].LUTDescriptor
    n_entries = n_entries or 2**16
    # The LUT indexes integers; clip first so out-of-range values cannot wrap
    # when pydicom stores them into the LUT's unsigned index array.
    iv = np.clip(np.rint(values), first, first + n_entries - 1).astype(np.int64)
    out = apply_voi(iv, ds, index=index).astype(np.float64)
    # Scale by what the LUT actually outputs, not its nominal bit depth: files
    # that declare 16 bits but hold 12-bit entries are common.
    full = apply_voi(np.arange(first, first + n_entries, dtype=np.int64), ds, index=index)
    lo, hi = float(full.min()), float(full.max())
    if hi <= lo:
        raise ValueError("VOI LUT is constant")
    return (out - lo) / (hi - lo)


def _apply_window_unit(values: np.ndarray, ds: pydicom.Dataset, index: int) -> tuple[np.ndarray, str]:
    """pydicom's apply_windowing (window `index`), rescaled to [0, 1].

    apply_windowing maps the window onto [y_min, y_max], the output range it
    derives from BitsStored, PixelRepresentation and the rescale. Rather than
    re-deriving that range here, ask pydicom: values far below and far above
    any window come out exactly as y_min and y_max (for LINEAR, LINEAR_EXACT
    and SIGMOID alike). Then x -> (x - y_min) / (y_max - y_min) gives [0, 1]
    with 0 at c - w/2 and 1 at c + w/2 (DICOM LINEAR: c - 0.5 -/+ (w - 1)/2).
    """
    out = apply_windowing(values, ds, index=index)
    with np.errstate(over="ignore"):
        y_min, y_max = apply_windowing(np.array([-1e300, 1e300]), ds, index=index)
    if not (np.isfinite(y_min) and np.isfinite(y_max) and y_max > y_min):
        raise ValueError("window output range is empty")
    center, width = _all(ds.WindowCenter)[index], _all(ds.WindowWidth)[index]
    func = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    which = f"#{index}," if len(_all(ds.WindowCenter)) > 1 else ""
    step = f"voi:window({which}c={center:g},w={width:g}" + ("" if func == "LINEAR" else f",{func}") + ")"
    return (out - y_min) / (y_max - y_min), step


def _all(value) -> list[float]:
    """A DICOM value that may be one number or several, as a list of floats."""
    if isinstance(value, (list, tuple, MultiValue)):
        return [float(v) for v in value]
    return [float(value)]


def _first(value) -> float:
    return _all(value)[0]


def _padding_mask(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray | None:
    """Pixels equal to PixelPaddingValue (or in the padding range), on stored values."""
    pad = ds.get("PixelPaddingValue")
    if pad is None:
        return None
    pad = _first(pad)
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is None:
        return arr == pad
    lo, hi = sorted((pad, _first(limit)))
    return (arr >= lo) & (arr <= hi)


def _percentile_window(values: np.ndarray, lookup: np.ndarray | None,
                       padding: np.ndarray | None) -> np.ndarray:
    """`values` windowed to the 0.5th-99.5th percentile of the pixels that are not padding.

    `values` and `lookup` are as `_stored_value_table` gives them: with a
    lookup, the percentiles are those of values[lookup], counted from a
    histogram of the lookup instead of sorting every pixel.
    """
    # Without a window in the header, take the 0.5th-99.5th percentile of the
    # real pixels: robust to a few hot pixels and to burned-in text, and
    # padding would otherwise pull the low end down.
    pixels = values if lookup is None else lookup
    sample = pixels[~padding] if padding is not None and padding.any() else pixels.ravel()
    if sample.size == 0:
        sample = pixels.ravel()
    if lookup is None:
        lo, hi = np.percentile(sample.astype(np.float64), PERCENTILE_WINDOW)
    else:
        lo, hi = _histogram_percentiles(values, np.bincount(sample, minlength=len(values)), PERCENTILE_WINDOW)
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float32)  # a constant image
    return (values.astype(np.float64) - lo) / (hi - lo)


def _histogram_percentiles(values: np.ndarray, counts: np.ndarray, percents: tuple[float, ...]) -> list[float]:
    """np.percentile (its default, linear method) of a sample where values[i] occurs counts[i] times."""
    order = np.argsort(values, kind="stable")
    ranked, cumulative = values[order].astype(np.float64), np.cumsum(counts[order])
    n = int(cumulative[-1])

    def kth(k: int) -> float:  # the k-th smallest (0-based) of the sample
        return float(ranked[np.searchsorted(cumulative, k, side="right")])

    result = []
    for percent in percents:
        position = percent / 100 * (n - 1)
        below = int(np.floor(position))
        low, high = kth(below), kth(min(below + 1, n - 1))
        result.append(low + (high - low) * (position - below))
    return result


# --------------------------------------------------------------------------
# Geometry and storage


def resize_and_crop(grey: np.ndarray, resize: int, crop: int) -> np.ndarray:
    """Short side to `resize` (antialiased bilinear), centre crop `crop`, as uint8 (per frame for F x H x W).

    8 bits are enough here because the VOI step has already mapped the
    clinically relevant range onto [0, 1]: 256 levels give a step of 1/255,
    about 0.017 ImageNet standard deviations after normalisation, well under
    the image noise, and the ImageNet weights were trained on 8-bit images. A
    uint8 crop is a quarter of the float32 size, which keeps the cache small.
    """
    if grey.ndim not in (2, 3):
        raise ValueError(f"expected a 2-D grey image or a stack of them, got shape {grey.shape}")
    if crop > resize:
        raise ValueError("crop must not exceed resize")
    tensor = torch.from_numpy(np.ascontiguousarray(grey, dtype=np.float32))
    tensor = tensor[None] if grey.ndim == 2 else tensor  # frames resize as channels
    if min(grey.shape[-2:]) != resize:  # at the target size already, the resize is the identity
        tensor = TF.resize(tensor, [resize], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    tensor = TF.center_crop(tensor, [crop, crop])
    out = torch.round(tensor.clamp(0.0, 1.0) * 255.0).to(torch.uint8)
    return (out[0] if grey.ndim == 2 else out).numpy()


def _cache_key(digest: str, config: PreprocessConfig) -> str:
    settings = (f"v{PIPELINE_VERSION}:resize={config.resize}:crop={config.crop}"
                f":frames={config.frames.value}:voi_window={config.voi_window}")
    return hashlib.sha256(f"{digest}:{settings}".encode()).hexdigest()


def _cache_path(cache_dir: Path, key: str) -> Path:
    # Two-character shards keep directories small for large datasets.
    return Path(cache_dir) / key[:2] / f"{key}{CACHE_SUFFIX}"


# A cache entry is this line, a JSON line {"shape": [...], "provenance": [...]},
# then the uint8 pixels in C order. An .npz (a zip of two .npy files) cost
# about 0.4 ms to write per image, more than decoding a 256 px ultrasound.
CACHE_SUFFIX = ".u8img"
_CACHE_MAGIC = b"medxfer-cache 1\n"


def _read_entry(entry: Path, crop: int) -> tuple[np.ndarray, list[str]] | None:
    """The cached image and provenance; None for a missing, damaged or foreign entry (rebuilt)."""
    try:
        data = entry.read_bytes()
    except OSError:
        return None
    if not data.startswith(_CACHE_MAGIC):
        return None
    header_end = data.find(b"\n", len(_CACHE_MAGIC))
    if header_end < 0:
        return None
    try:
        header = json.loads(data[len(_CACHE_MAGIC):header_end])
        shape, provenance = tuple(header["shape"]), [str(step) for step in header["provenance"]]
        image = np.frombuffer(data, dtype=np.uint8, offset=header_end + 1).reshape(shape)
    except (ValueError, KeyError, TypeError):  # truncated or damaged: rebuild it
        return None
    if image.shape[-2:] != (crop, crop):
        return None
    return image, provenance


def _write_entry(entry: Path, image: np.ndarray, provenance: list[str]) -> None:
    header = json.dumps({"shape": list(image.shape), "provenance": provenance}).encode()
    # A hidden *.tmp beside the entry, renamed into place: a killed run leaves
    # at most a stray temp file, never a half-written entry.
    write_bytes_atomic(entry, _CACHE_MAGIC + header + b"\n" + np.ascontiguousarray(image, dtype=np.uint8).tobytes())


class Preprocessed(NamedTuple):
    image: np.ndarray  # uint8 crop x crop; frames x crop x crop for `frames: all` on a multi-frame file
    cache_key: str
    provenance: list[str]
    cache_hit: bool


def reduced_decode_floor(resize: int) -> int:
    """The short side a JPEG 2000 may be decoded down to for a model that resizes to `resize`.

    Training, evaluation, export checks, scoring and serving all pass it to `load_grey`,
    so every one of them sees the same pixels for the same file.
    """
    return REDUCED_DECODE_MARGIN * resize


def preprocess_file(path: Path, config: PreprocessConfig) -> Preprocessed:
    """One file as a cached uint8 crop, with its cache key and provenance.

    The key is sha256 of the file's bytes, PIPELINE_VERSION, resize and crop,
    so renamed or moved files still hit and edited files miss. A hit reads one
    small file (about 50 KB) and decodes nothing.
    """
    path = Path(path)
    data, key, hit = _probe_cache(path, config)
    if hit is not None:
        return hit
    grey, provenance = load_grey(path, data=data, frames=config.frames, voi_window=config.voi_window,
                                 min_short_side=reduced_decode_floor(config.resize))
    image = resize_and_crop(grey, config.resize, config.crop)
    provenance = provenance + [
        f"resize:short_side({config.resize},bilinear,antialias)",
        f"crop:centre({config.crop})",
        "quantize:uint8",
    ]
    _write_entry(_cache_path(config.cache_dir, key), image, provenance)
    return Preprocessed(image, key, provenance, cache_hit=False)


def _probe_cache(path: Path, config: PreprocessConfig) -> tuple[bytes, str, Preprocessed | None]:
    """The file's bytes, its cache key, and its cached result when there is one."""
    try:
        data = path.read_bytes()
    except OSError as exc:  # permissions, a symlink loop, a vanished file, disk errors
        raise UnreadableImage(f"cannot read the file: {exc.strerror or exc}", path) from exc
    key = _cache_key(hashlib.sha256(data).hexdigest(), config)
    cached = _read_entry(_cache_path(config.cache_dir, key), config.crop)
    return data, key, None if cached is None else Preprocessed(cached[0], key, cached[1], cache_hit=True)


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N,H,W) or (H,W) -> float32 (N,3,H,W), grey repeated, ImageNet-normalised."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3:
        raise ValueError(f"expected (N,H,W) or (H,W), got shape {tuple(images.shape)}")
    x = images.to(torch.float32).div(255.0)[:, None].expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@dataclass(frozen=True)
class SplitData:
    """One split's preprocessed images (uint8 N x H x W) and targets (class index or years)."""

    images: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)


@dataclass
class PreparedData:
    """The usable samples with their cache keys, the decode rejects, and the stacked images."""

    manifest: pd.DataFrame  # ingest's columns + cache_key, provenance
    rejects: pd.DataFrame  # path, reason: files that could not be decoded
    images: np.ndarray  # uint8 (N, crop, crop), row-aligned with `manifest`
    cache_hits: int

    def split(self, name: str) -> SplitData:
        rows = np.flatnonzero(self.manifest["split"].to_numpy() == name)
        if len(rows) == 0:
            raise ValueError(f"the {name!r} split has no usable images")
        return SplitData(self.images[rows], self.manifest["target"].to_numpy(dtype=np.float32)[rows])

    def rejects_with(self, earlier: pd.DataFrame) -> pd.DataFrame:
        return pd.concat([earlier, self.rejects], ignore_index=True)

    def example_input(self) -> torch.Tensor:
        return to_model_input(torch.from_numpy(self.images[:1]))


def resolve_workers(workers: int | None) -> int:
    """`workers`, or every core this process may run on when it is None."""
    if workers is not None:
        return workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _preprocess_or_reason(path: Path, config: PreprocessConfig) -> Preprocessed | str:
    """preprocess_file, with a failure returned as its reason (picklable, for worker processes)."""
    try:
        return preprocess_file(path, config)
    except UnreadableImage as exc:
        return str(exc)


def preprocess_files(paths: list[Path], config: PreprocessConfig) -> list[Preprocessed | str]:
    """preprocess_file over `paths`, a failure as its reason: one chunk of work for a worker."""
    return [_preprocess_or_reason(path, config) for path in paths]


def _hit_or_reason(path: Path, config: PreprocessConfig) -> Preprocessed | str | None:
    """The cached result, a failure's reason, or None when the file must be decoded."""
    try:
        return _probe_cache(path, config)[2]
    except UnreadableImage as exc:
        return str(exc)


def _init_worker() -> None:
    # One torch thread per process: the processes already fill the cores, and
    # torch's own thread pool on top would oversubscribe them.
    torch.set_num_threads(1)


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork where there is one: a worker starts in milliseconds with this module
    # already imported, where spawn or forkserver re-import torch (seconds, per
    # run). Safe here because a worker only runs preprocess_file: it touches no
    # lock or thread of the parent's (Prefect, MLflow), and _init_worker pins
    # torch to one thread before any torch op, as torch's DataLoader workers do.
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


class ChunkFuture(Protocol):
    def result(self) -> list[Preprocessed | str]: ...


# Sends one chunk of files to be preprocessed elsewhere (a worker process, a
# Dask worker): preprocess_files(chunk, config) there, its result when asked.
SubmitChunk = Callable[[list[Path]], ChunkFuture]


def chunk_size(files: int, workers: int) -> int:
    """Files per chunk: several chunks per worker keep every worker busy when some
    files (full-size CR) decode slower than others; up to 64 per chunk amortise
    the round trip (pickling a 49 KB crop back, a Dask task) over many files."""
    return max(1, min(64, files // (workers * 8)))


def _map_files(paths: list[Path], config: PreprocessConfig, workers: int,
               submit: SubmitChunk | None) -> list[Preprocessed | str]:
    """preprocess_file over `paths` in order, a failure as its reason.

    Cache hits are read here: a hit costs less than sending it to a worker and
    its 49 KB crop back. Misses go in chunks to `submit` as they are found, so
    workers decode while this process goes on looking; with no `submit`,
    `workers` local processes (this one for 1).
    """
    if submit is None and min(workers, len(paths)) <= 1:
        # One torch thread here too: on a busy machine torch's spinning thread
        # pool made a 256 px resize ten times slower than the decode.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return preprocess_files(paths, config)
        finally:
            torch.set_num_threads(threads)
    with ExitStack() as stack:
        if submit is None:
            # The executor starts its processes at the first submit: a run
            # where every file hits starts none.
            pool = stack.enter_context(ProcessPoolExecutor(
                min(workers, len(paths)), mp_context=_pool_context(), initializer=_init_worker))
            submit = partial(pool.submit, preprocess_files, config=config)
        results: list[Preprocessed | str | None] = []
        pending, chunk = [], []
        size = chunk_size(len(paths), workers)
        for index, path in enumerate(paths):
            found = _hit_or_reason(path, config)
            results.append(found)
            if found is None:
                chunk.append(index)
            if len(chunk) == size or (chunk and index == len(paths) - 1):
                pending.append((chunk, submit([paths[i] for i in chunk])))
                chunk = []
        for indices, future in pending:
            for index, result in zip(indices, future.result()):
                results[index] = result
    return results


def preprocess_dataset(manifest: pd.DataFrame, root: Path, config: PreprocessConfig,
                       submit: SubmitChunk | None = None) -> PreparedData:
    """Decode (or fetch from cache) every manifest row, across `config.workers` processes,
    or through `submit` (chunks of files to another executor, e.g. Dask) when given.

    Rows keep the manifest's order; rows that fail move to the rejects with their reason.
    With `frames: all`, a multi-frame file becomes one row per frame (column `frame`),
    each with the file's patient key and split.
    """
    images, keys, provenance, kept, frame_index, rejects = [], [], [], [], [], []
    hits = 0
    paths = [Path(root) / rel for rel in manifest["path"]]
    results = _map_files(paths, config, resolve_workers(config.workers), submit)
    for (index, rel), result in zip(manifest["path"].items(), results):
        if isinstance(result, str):
            rejects.append((rel, result))
            continue
        hits += result.cache_hit
        frames = result.image if result.image.ndim == 3 else result.image[None]
        steps = ";".join(result.provenance)
        for frame, image in enumerate(frames):
            images.append(image)
            keys.append(result.cache_key)
            frame_index.append(frame)
            kept.append(index)
            provenance.append(steps if len(frames) == 1 else f"{steps};frame:all({frame}/{len(frames)})")
    usable = manifest.loc[kept].reset_index(drop=True)
    usable["frame"], usable["cache_key"], usable["provenance"] = frame_index, keys, provenance
    stacked = np.stack(images) if images else np.zeros((0, config.crop, config.crop), np.uint8)
    return PreparedData(usable, pd.DataFrame(rejects, columns=["path", "reason"]), stacked, hits)
