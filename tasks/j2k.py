"""Reduced-resolution decoding of JPEG 2000 and HTJ2K: stop the wavelet synthesis early.

A JPEG 2000 codestream is a wavelet pyramid, so a decoder can give the image at
1/2, 1/4, ... resolution without entropy-decoding the finer bands. Preprocessing
uses it when the resize would discard those details anyway.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pydicom
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.uid import HTJ2K, HTJ2KLossless, HTJ2KLosslessRPCL, JPEG2000, JPEG2000Lossless

# HTJ2K (Part 15) keeps Part 1's wavelet pyramid and main header; only the block coder differs.
_J2K_SYNTAXES = (JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K)
# A reduced decode keeps the side the resize targets at this many times its target, not at
# the target itself: the resize then still halves the image at least, so its antialiasing
# filter, not the wavelet's coarser low-pass, shapes the output. On RG3_J2KR the crop
# differs from the full decode's by 0.35 8-bit levels on average at 1/2 resolution, 1.0 at 1/4.
REDUCED_DECODE_MARGIN = 2


@dataclass(frozen=True)
class ReducedDecodeFloor:
    """How small a reduced-resolution decode may go: its short side at least `short_side`
    and its long side at least `long_side` pixels (0: no floor on that side).
    `tasks.transforms.PreprocessSpec.decode_floor` gives the one a model needs; training,
    evaluation, export checks, scoring and serving all decode with it, so every one of them
    sees the same pixels for the same file."""

    short_side: int = 0
    long_side: int = 0

    def allows(self, height: int, width: int) -> bool:
        return min(height, width) >= self.short_side and max(height, width) >= self.long_side


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


def decode_j2k_reduced(ds: pydicom.Dataset, tsyntax, floor: ReducedDecodeFloor) -> tuple[np.ndarray, int] | None:
    """A single-frame monochrome JPEG 2000 image decoded at 1/2**level resolution, and level.

    A JPEG 2000 codestream is a wavelet pyramid: its LL band after `level`
    halvings is a low-pass, subsampled copy of the image, in the same units,
    and a decoder can stop there without entropy-decoding the finer bands (at
    1/4, about 1/16 of the work). The resize would discard those details
    anyway. `level` is the largest whose size `floor` still allows, so the
    resize still only shrinks.

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
    level = _reduction_level(header, floor)
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


def _reduction_level(header: _J2kHeader, floor: ReducedDecodeFloor) -> int:
    """Largest number of halvings whose size `floor` allows and that Pillow decodes."""
    for level in range(header.levels, 0, -1):
        power = 2**level
        if not floor.allows(-(-header.height // power), -(-header.width // power)):
            continue
        # Pillow sizes a reduced image as round(n / 2**level) where OpenJPEG
        # makes ceil(n / 2**level), and fails the decode when they differ
        # (1841 px at 1/4: 460 vs 461), so only take levels where they agree.
        if all((n + power // 2) // power == -(-n // power) for n in (header.width, header.height)):
            return level
    return 0

