"""Decode one DICOM, PNG or JPEG file to float grey in [0, 1], bright = dense (`load_grey`).

The format comes from the bytes (`tasks.formats`); DICOM goes through pydicom 3
and pylibjpeg (monochrome values through `tasks.voi`, single-frame JPEG 2000 at
reduced resolution through `tasks.j2k` when allowed), PNG and JPEG through
Pillow. Every step that changes pixel values is recorded as a short string in a
provenance list, so an image can be traced back to what was done to it.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, get_decoder

from configs import FramePolicy
from tasks.dicom import inferred_transfer_syntax
from tasks.formats import sniff
from tasks.j2k import decode_j2k_reduced
from tasks.rejects import UnreadableImage
from tasks.voi import monochrome_to_grey, padding_mask

BT601_LUMA = (0.299, 0.587, 0.114)
_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# (7FE0,0010) Pixel Data tag as it appears in little- and big-endian files.
_PIXEL_DATA_TAG_BYTES = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")
_COLOUR_PIS = ("RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR")


def load_grey(path: Path, *, data: bytes | None = None, frames: FramePolicy = FramePolicy.MIDDLE,
              voi_window: int = 0, min_short_side: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Decode `path` to float32 HxW grey in [0, 1] (bright = dense) and its provenance.

    `data`, when given, is the file's content already read (so a caller that
    hashed the bytes decodes exactly what it hashed); `path` then only names it.
    `frames` picks the frame of a multi-frame DICOM (`all`: F x H x W, every
    frame); `voi_window` which of several header windows or VOI LUTs to apply
    (the first when the file has fewer). `min_short_side`, when given, lets a
    JPEG 2000 DICOM decode at 1/2, 1/4, ... resolution as long as its short side
    stays at least that many pixels (see `tasks.j2k.decode_j2k_reduced`); None decodes
    every pixel.
    Raises UnreadableImage for anything that is not a decodable DICOM, PNG or JPEG.
    """
    path = Path(path)
    if data is None:
        data = path.read_bytes()
    if not data:
        raise UnreadableImage("empty file", path)
    kind = sniff(data)
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
    reduced = decode_j2k_reduced(ds, tsyntax, min_short_side) if min_short_side else None
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
        grey = monochrome_to_grey(arr, ds, voi_window, provenance)
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
        padding = padding_mask(arr, ds)
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


