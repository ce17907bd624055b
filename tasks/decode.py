"""Decode one DICOM, PNG or JPEG file to float grey in [0, 1], bright = dense (`load_grey`).

The format comes from the bytes (`tasks.formats`); DICOM goes through pydicom 3
and pylibjpeg (monochrome values through `tasks.voi`, single-frame JPEG 2000 at
reduced resolution through `tasks.j2k` when allowed), PNG and JPEG through
Pillow. Every step that changes pixel values is recorded as a short string in a
provenance list, so an image can be traced back to what was done to it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import ImageOps
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, get_decoder
from pydicom.uid import UID, JPEG2000TransferSyntaxes, JPEGExtended12Bit

from configs import FramePolicy, PreprocessConfig
from tasks.dicom import (PIXEL_DATA_KEYWORDS, PixelGeometry, code_string, header_int, is_lossy, pixel_geometry,
                         read_dataset, transfer_syntax)
from tasks.formats import ImageFormat, detect_format, open_image, pillow_failure
from tasks.j2k import ReducedDecodeFloor, decode_j2k_reduced
from tasks.rejects import RejectKind, UnreadableImage, exception_detail
from tasks.voi import IndexedGrey, expanded, monochrome_to_grey, padding_mask

log = logging.getLogger(__name__)

BT601_LUMA = (0.299, 0.587, 0.114)
EXIF_ORIENTATION = 0x0112
# (7FE0,0010) Pixel Data tag as it appears in little- and big-endian files.
_PIXEL_DATA_TAG_BYTES = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0"  # (FFFE,E0DD), little endian as every encapsulated syntax is
_COLOUR_PIS = ("RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR")


@dataclass(frozen=True)
class DecodeLimits:
    """What a file may ask to have decoded, checked from its header before any decoding:
    `max_pixels` rows x columns x the frames decoded (every frame under `frames: all`,
    else one), and `max_frames` frames in a file."""

    max_pixels: int
    max_frames: int

    @classmethod
    def from_config(cls, config: PreprocessConfig) -> DecodeLimits:
        return cls(config.max_pixels, config.max_frames)

    def check(self, height: int, width: int, frames: int, decoded_frames: int) -> None:
        if frames > self.max_frames:
            raise UnreadableImage(RejectKind.TOO_LARGE, f"{frames} frames, more than the limit of "
                                                        f"{self.max_frames} (preprocess.max_frames)")
        pixels = height * width * decoded_frames
        if pixels > self.max_pixels:
            frames_text = f" x {decoded_frames} frames" if decoded_frames > 1 else ""
            raise UnreadableImage(RejectKind.TOO_LARGE, f"{height}x{width}{frames_text} pixels, more than the limit "
                                                        f"of {self.max_pixels} (preprocess.max_pixels)")


DEFAULT_LIMITS = DecodeLimits.from_config(PreprocessConfig())


def load_grey(path: Path, *, data: bytes | None = None, frames: FramePolicy = FramePolicy.MIDDLE,
              voi_window: int = 0, floor: ReducedDecodeFloor | None = None, limits: DecodeLimits = DEFAULT_LIMITS,
              indexed: bool = False,
              dataset: pydicom.Dataset | None = None) -> tuple[np.ndarray | IndexedGrey, list[str]]:
    """Decode `path` to float32 HxW grey in [0, 1] (bright = dense) and its provenance.

    `data`, when given, is the file's content already read (so a caller that
    hashed the bytes decodes exactly what it hashed); `path` then only names it.
    `frames` picks the frame of a multi-frame DICOM (`all`: F x H x W, every
    frame); `voi_window` which of several header windows or VOI LUTs to apply
    (the first when the file has fewer). `floor`, when given, lets a JPEG 2000
    DICOM decode at 1/2, 1/4, ... resolution as long as its size stays within it
    (see `tasks.j2k.decode_j2k_reduced`); None decodes every pixel. `limits` are
    checked from the header before decoding. `indexed` lets an integer monochrome image
    come back as an IndexedGrey (its levels and each pixel's index) instead of one
    value per pixel, for a caller that can use it (`PreprocessSpec.to_uint8`). `dataset`:
    the DICOM data set already parsed from `data` (the service reads a request's header
    facts from it first), so that it is not parsed twice; the decode may change it.

    This is the fault boundary of one file: every failure, expected or not, is raised
    as UnreadableImage with a kind and a one-line detail (an unexpected error as kind
    `unexpected`, its traceback logged at DEBUG only).
    """
    path = Path(path)
    try:
        if data is None:
            data = read_image_file(path)
        fmt = detect_format(data)
        if fmt.is_dicom:
            grey, provenance = _load_dicom(data, fmt is ImageFormat.RAW_DICOM, frames, voi_window, floor, limits,
                                           dataset)
        else:
            grey, provenance = _load_pil(data, fmt, limits)
        grey = grey.map(unit_range) if isinstance(grey, IndexedGrey) else unit_range(grey)
        if not indexed:
            grey = np.ascontiguousarray(expanded(grey))
    except UnreadableImage as exc:
        exc.path = path
        raise
    except MemoryError as exc:
        raise UnreadableImage(RejectKind.TOO_LARGE, "not enough memory to decode it", path) from exc
    except Exception as exc:
        log.debug("unexpected error decoding %s", path, exc_info=True)
        raise UnreadableImage(RejectKind.UNEXPECTED, exception_detail(exc), path) from exc
    return grey, provenance


def unit_range(grey: np.ndarray) -> np.ndarray:
    """`grey` as float32 in [0, 1]: +inf -> 1, -inf -> 0, NaN -> 0; in place where it can be,
    so no second full-size copy is held."""
    grey = np.asarray(grey, dtype=np.float32)
    if not grey.flags.writeable:
        grey = grey.copy()
    # clip is vectorised (fmax/fmin, which drop NaN themselves, took five times as long
    # on a 256 px image), and NaN is rare enough to look for first.
    np.clip(grey, 0.0, 1.0, out=grey)
    nan = np.isnan(grey)
    if nan.any():
        grey[nan] = 0.0
    return grey


def read_image_file(path: Path) -> bytes:
    """A file's bytes; an OS error (permissions, a symlink loop, a vanished file) as an unreadable reject."""
    try:
        return path.read_bytes()
    except OSError as exc:  # permissions, a symlink loop, a vanished file, disk errors
        raise UnreadableImage(RejectKind.UNREADABLE, f"cannot read the file: {exc.strerror or exc}") from exc


def _load_pil(data: bytes, fmt: ImageFormat, limits: DecodeLimits) -> tuple[np.ndarray, list[str]]:
    with open_image(data, fmt, limits.max_pixels) as img:
        width, height = img.size  # from the header: nothing is decoded yet
        limits.check(height, width, frames=1, decoded_frames=1)
        try:
            img.load()
            orientation = img.getexif().get(EXIF_ORIENTATION, 1)
            # Orientation 2-8 turns or mirrors the stored pixels for display; 1 (or none) leaves them.
            oriented = ImageOps.exif_transpose(img) if orientation in range(2, 9) else img
        except (OSError, SyntaxError, ValueError) as exc:
            raise pillow_failure(data, fmt, "does not decode", exc) from exc
    provenance = [f"decode:{fmt.value}(mode={img.mode})"]
    if oriented is not img:
        provenance.append(f"exif_transpose(orientation={orientation})")
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


def _load_dicom(data: bytes, raw: bool, frames: FramePolicy, voi_window: int, floor: ReducedDecodeFloor | None,
                limits: DecodeLimits, dataset: pydicom.Dataset | None) -> tuple[np.ndarray | IndexedGrey, list[str]]:
    ds = read_dataset(data, raw=raw) if dataset is None else dataset
    if not any(k in ds for k in PIXEL_DATA_KEYWORDS):
        # pydicom stops quietly at the end of a truncated file, dropping a
        # partial Pixel Data element; if its tag is in the bytes, say so.
        if any(tag in data for tag in _PIXEL_DATA_TAG_BYTES):
            raise UnreadableImage(RejectKind.TRUNCATED, "the file ends inside its pixel data")
        raise UnreadableImage(RejectKind.NO_PIXEL_DATA, "DICOM has no pixel data")
    if not any(ds[k].value for k in PIXEL_DATA_KEYWORDS if k in ds):
        raise UnreadableImage(RejectKind.NO_PIXEL_DATA, "DICOM has no pixel data")

    provenance: list[str] = []
    syntax, inferred = transfer_syntax(ds)
    if inferred:
        ds.file_meta.TransferSyntaxUID = syntax  # where pydicom's decoders look for it
        # A guess, however well founded: show it beside the pixels it produced.
        provenance.append(f"transfer_syntax:inferred({syntax.name})")
    geometry = pixel_geometry(ds)
    limits.check(geometry.rows, geometry.columns, geometry.frames,
                 geometry.frames if frames is FramePolicy.ALL else 1)
    _check_pixel_data_length(ds, data, syntax, geometry)
    arr, pi = _decode_dicom_frames(ds, syntax, geometry, frames, provenance, floor)
    if pi in _COLOUR_PIS or (arr.ndim == 3 and arr.shape[-1] in (3, 4)):
        grey = _colour_to_grey(arr, pi, ds, provenance)
    else:
        padding = padding_mask(arr, ds, is_lossy(ds, syntax), provenance)
        grey = monochrome_to_grey(arr, ds, voi_window, provenance, padding)
        invert = []
        if pi == "MONOCHROME1":
            invert.append("MONOCHROME1")
        if code_string(ds, "PresentationLUTShape") == "INVERSE":
            invert.append("PresentationLUTShape=INVERSE")
        # One inversion even when both are set: for DX/MG images the standard
        # pairs MONOCHROME1 with INVERSE to describe the same single inversion.
        if invert:
            grey = grey.map(_inverted) if isinstance(grey, IndexedGrey) else _inverted(grey)
            provenance.append("invert:" + "+".join(invert))
        if padding is not None and padding.any():
            grey = expanded(grey)
            grey[padding] = 0.0  # padding is "no image": show it as air
            provenance.append(f"padding:zeroed({int(padding.sum())}px)")
    return grey, provenance


def _inverted(grey: np.ndarray) -> np.ndarray:
    return 1.0 - grey


def _check_pixel_data_length(ds: pydicom.Dataset, data: bytes, syntax: UID, geometry: PixelGeometry) -> None:
    """Truncated when the pixel data holds less than the header declares (native), or when a
    compressed stream ends before its sequence delimiter (encapsulated)."""
    if syntax.is_encapsulated:
        if _SEQUENCE_DELIMITER not in data[data.rfind(_PIXEL_DATA_TAG_BYTES[0]):]:
            raise UnreadableImage(RejectKind.TRUNCATED, "the compressed pixel data ends before its "
                                                        "sequence delimiter: the file is cut short")
        return
    if "PixelData" not in ds:
        return  # float pixel data: pydicom checks its length itself
    actual, expected = len(ds.PixelData), geometry.expected_bytes
    if actual < expected:
        frames = f", {geometry.frames} frames" if geometry.frames > 1 else ""
        raise UnreadableImage(RejectKind.TRUNCATED,
                              f"the pixel data holds {actual} of the {expected} bytes its header declares "
                              f"({geometry.rows}x{geometry.columns}{frames}, {geometry.samples} "
                              f"sample{'s' if geometry.samples > 1 else ''} of {geometry.bits_allocated} bits)")


def _decode_dicom_frames(ds: pydicom.Dataset, syntax: UID, geometry: PixelGeometry, frames: FramePolicy,
                         provenance: list[str], floor: ReducedDecodeFloor | None) -> tuple[np.ndarray, str]:
    """Decoded pixels of the frame(s) `frames` picks and the photometric interpretation they are in."""
    header_pi = geometry.photometric
    reduced = decode_j2k_reduced(ds, syntax, floor) if floor else None
    if reduced is not None:
        arr, level = reduced
        provenance.append(f"decode:dicom({syntax.name})")
        provenance.append(f"decode:reduced_resolution(1/{2**level},{geometry.rows}x{geometry.columns}"
                          f"->{arr.shape[0]}x{arr.shape[1]})")
        return arr, header_pi
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise UnreadableImage(RejectKind.UNSUPPORTED_SYNTAX, f"no decoder for transfer syntax {syntax.name}") from exc
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        raise UnreadableImage(RejectKind.UNSUPPORTED_SYNTAX,
                              f"no decoder for transfer syntax {syntax.name} (install {needs})")

    n_frames = geometry.frames
    index = {FramePolicy.MIDDLE: n_frames // 2, FramePolicy.FIRST: 0, FramePolicy.ALL: None}[frames]
    try:
        # Decode only the frame we keep: a cine loop can be hundreds of frames.
        # as_rgb: YBR_FULL and YBR_FULL_422 come back as RGB, by the standard's equations.
        arr, props = decoder.as_array(ds, index=index, as_rgb=True)
    except Exception as exc:
        raise _decode_failure(decoder, syntax, ds, geometry, exc) from exc
    provenance.append(f"decode:dicom({syntax.name})")
    if n_frames > 1 and index is not None:
        provenance.append(f"frame:{frames.value}({index + 1} of {n_frames})")  # numbered from 1, as DICOM does
    pi = str(props.get("photometric_interpretation") or header_pi).strip().upper()
    if pi != header_pi:
        # The decoder already converted (YCbCr JPEG / YBR_FULL_422 -> RGB).
        provenance.append(f"colour:{header_pi}->{pi}(decoder)")
    return arr, pi


def _decode_failure(decoder, syntax: UID, ds: pydicom.Dataset, geometry: PixelGeometry,
                    exc: Exception) -> UnreadableImage:
    """Why pixel data that passed the header checks did not decode. When at most one installed
    plugin can take the image and pydicom knows another that is not installed, that one
    implementation's failure is no proof the data is bad: a decoder limitation, naming what
    to install. When two or more failed, or the pixels are native, the data is corrupt."""
    bits = header_int(ds, "BitsStored", geometry.bits_allocated)
    # pydicom's Pillow plugin refuses JPEG Extended beyond 8 bits and colour JPEG 2000 beyond
    # 8 bits (pydicom/pixels/decoders/pillow.py): it is no second opinion on those.
    pillow_refuses = bits > 8 and (syntax == JPEGExtended12Bit or (syntax in JPEG2000TransferSyntaxes
                                                                   and geometry.samples > 1))
    able = [p for p in decoder.available_plugins if not (p == "pillow" and pillow_refuses)]
    if syntax.is_encapsulated and decoder.missing_dependencies and len(able) <= 1:
        return UnreadableImage(RejectKind.DECODER_LIMITATION,
                               f"{' and '.join(able) or 'no installed decoder'} cannot decode this {bits}-bit "
                               f"{syntax.name} image; not installed: {'; '.join(decoder.missing_dependencies)}: "
                               f"{exception_detail(exc)}")
    return UnreadableImage(RejectKind.CORRUPT, f"cannot decode the {syntax.name} pixel data: {exception_detail(exc)}")


def _colour_to_grey(arr: np.ndarray, pi: str, ds: pydicom.Dataset, provenance: list[str]) -> np.ndarray:
    # Colour images (ultrasound, secondary captures) are display-ready: they
    # carry no modality/VOI transform, so scale by the nominal range like a
    # PNG, not by a percentile window, to keep DICOM and PNG exports of the
    # same picture identical.
    if pi == "PALETTE COLOR":
        descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
        bits = descriptor[2] if isinstance(descriptor, (list, MultiValue)) and len(descriptor) == 3 else None
        if bits not in (8, 16) or "RedPaletteColorLookupTableData" not in ds:
            raise UnreadableImage(RejectKind.CORRUPT, "a PALETTE COLOR image without a valid palette colour "
                                                      "lookup table")
        try:
            rgb = apply_color_lut(arr, ds)
        except Exception as exc:
            raise UnreadableImage(RejectKind.CORRUPT,
                                  f"bad palette colour lookup table: {exception_detail(exc)}") from exc
        provenance.append("colour:palette_lut")
    else:
        bits = header_int(ds, "BitsStored") or header_int(ds, "BitsAllocated") or 8
        rgb = arr  # YBR_FULL(_422) arrive as RGB: the decoder converts them (as_rgb)
    rgb = rgb[..., :3].astype(np.float32) / float(2**bits - 1)
    provenance.append(f"scale:/{2**bits - 1}")
    provenance.append("colour:luminance(BT.601)")
    return _luminance(rgb)
