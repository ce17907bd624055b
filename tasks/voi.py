"""Monochrome pixel values to display grey: modality LUT, VOI (LUT, window or percentile), padding.

Everything here works on stored values as the decoder gives them and returns
float grey in [0, 1]; each step that ran is appended to a provenance list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pydicom
import torch
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

from tasks.dicom import header_float
from tasks.rejects import RejectKind, UnreadableImage, exception_detail

PERCENTILE_WINDOW = (0.5, 99.5)
# On lossy-compressed images, padding pixels no longer all equal PixelPaddingValue: the codec
# rings at the sharp edge between padding and image (on a real CT compressed 40:1 as JPEG 2000,
# 9 % of them still did). Pixels within this fraction of the way from the padding value to the
# image's median stored value (or beyond the padding value) count as padding: on that CT, 10 %
# brings the windowed image back to within 1.3 8-bit levels of its lossless twin, where the
# exact value alone left it 83 levels off.
LOSSY_PADDING_BAND = 0.1


@dataclass(frozen=True)
class IndexedGrey:
    """A grey image as its grey levels and, per pixel, the index of its level: what the
    elementwise header transforms give for integer pixels, before the lookup. Further
    elementwise steps (`map`) then run once per level, and a crop only picks indices."""

    levels: np.ndarray  # float32, one per stored value from the image's lowest to its highest
    index: np.ndarray  # uint8 or uint16, the image's shape

    @property
    def shape(self) -> tuple[int, ...]:
        return self.index.shape

    @property
    def ndim(self) -> int:
        return self.index.ndim

    def map(self, step: Callable[[np.ndarray], np.ndarray]) -> IndexedGrey:
        """An elementwise `step` applied to every pixel, by applying it to every level."""
        return IndexedGrey(np.asarray(step(self.levels), dtype=np.float32), self.index)

    def expand(self) -> np.ndarray:
        return np.take(self.levels, self.index)  # take: a third faster than levels[index]


def expanded(grey: np.ndarray | IndexedGrey) -> np.ndarray:
    """`grey` as one value per pixel."""
    return grey.expand() if isinstance(grey, IndexedGrey) else grey


def monochrome_to_grey(arr: np.ndarray, ds: pydicom.Dataset, voi_window: int, provenance: list[str],
                        padding: np.ndarray | None) -> np.ndarray | IndexedGrey:
    """Modality LUT, then VOI (LUT, window or percentile, the last over the pixels that are not
    `padding`), scaled to [0, 1].

    The header transforms are elementwise, so for 8/16-bit integer pixels they
    run once per stored value in arr.min()..arr.max() and are returned as an
    IndexedGrey, looked up per pixel only when needed: the same numbers, and a
    3.6-megapixel CR needs at most 65,536 evaluations of pydicom's float64
    windowing instead of 3.6 million.
    """
    stored, lookup = _stored_value_table(arr)
    slope, intercept = header_float(ds, "RescaleSlope"), header_float(ds, "RescaleIntercept")
    try:
        values = apply_modality_lut(stored, ds)
    except Exception as exc:
        raise UnreadableImage(RejectKind.CORRUPT, f"the modality LUT does not apply: {exception_detail(exc)}") from exc
    if ds.get("ModalityLUTSequence"):
        provenance.append("modality_lut:lut_sequence")
    elif slope is not None and intercept is not None:
        provenance.append(f"modality_lut:rescale(slope={slope:g},intercept={intercept:g})")

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
    except (ValueError, TypeError, NotImplementedError, IndexError, KeyError, AttributeError) as exc:
        # A broken VOI header should not lose the image: fall back to the
        # data-driven window and say so.
        provenance.append(f"voi:ignored({type(exc).__name__})")  # the type only: its text may quote the header
        grey = None
    if grey is None:
        grey = _percentile_window(values, lookup, padding)
        provenance.append("voi:percentile({:g},{:g})".format(*PERCENTILE_WINDOW))
    # Clip and cast the table, then look up: the same numbers, without a
    # float64 copy of a full-size image (29 MB for a 1955x1841 CR).
    grey = np.clip(grey, 0.0, 1.0).astype(np.float32)
    return grey if lookup is None else IndexedGrey(grey, lookup)


def _stored_value_table(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(every value from arr.min() to arr.max(), each pixel's index into it) for 8/16-bit
    integer pixels; (arr, None) otherwise."""
    if arr.dtype.kind not in "iu" or arr.dtype.itemsize > 2 or arr.size == 0:
        return arr, None
    low, high = int(arr.min()), int(arr.max())
    # The index in the fewest bytes (1 or 2 per pixel: a 50-megapixel image's lookup in 50 or
    # 100 MB, not 200): arr - low in arr's own width wraps like two's complement, and read as
    # unsigned it is exact, since high - low < 2**bits.
    lookup = np.subtract(arr, arr.dtype.type(low)).view(f"u{arr.dtype.itemsize}")
    if high - low < 256 and arr.dtype.itemsize > 1:
        lookup = lookup.astype(np.uint8)
    return np.arange(low, high + 1, dtype=np.int64), lookup


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


def padding_mask(arr: np.ndarray, ds: pydicom.Dataset, lossy: bool,
                 provenance: list[str]) -> np.ndarray | None:
    """Pixels equal to PixelPaddingValue (or in the padding range), on stored values; for a
    `lossy` image, everything within LOSSY_PADDING_BAND of it or beyond it (the step that
    says so goes into `provenance`). None when the header names no padding."""
    pad = header_float(ds, "PixelPaddingValue")
    if pad is None:
        return None
    limit = header_float(ds, "PixelPaddingRangeLimit")
    lo, hi = sorted((pad, pad if limit is None else limit))
    if not lossy:
        return (arr >= lo) & (arr <= hi)
    exact = (arr >= lo) & (arr <= hi)
    rest = arr[~exact]
    if rest.size == 0:
        return exact
    median = float(np.median(rest))
    if median > hi:  # padding below the image, as for CT's -2000 or -3024: and everything lower
        edge = hi + LOSSY_PADDING_BAND * (median - hi)
        mask = arr <= edge
    else:
        edge = lo - LOSSY_PADDING_BAND * (lo - median)
        mask = arr >= edge
    provenance.append(f"padding:lossy_band({'<=' if median > hi else '>='}{edge:g})")
    return mask


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
        lo, hi = _histogram_percentiles(values, _counts(sample, len(values)), PERCENTILE_WINDOW)
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float32)  # a constant image
    return (values.astype(np.float64) - lo) / (hi - lo)


def _counts(indices: np.ndarray, length: int, chunk: int = 1 << 22) -> np.ndarray:
    """np.bincount of `indices`, a chunk at a time: bincount copies its input to 8-byte integers,
    which for a whole 50-megapixel image is 400 MB. 8-bit indices are counted by torch, which
    reads them as they are: 31 against 75 us on a 256 px image, where the count was the
    largest step after pydicom's own (torch has no bincount for uint16)."""
    counts = np.zeros(length, dtype=np.int64)
    for start in range(0, indices.size, chunk):
        part = indices[start:start + chunk]
        if part.dtype == np.uint8:
            counts += torch.bincount(torch.from_numpy(part), minlength=length).numpy()
        else:
            counts += np.bincount(part, minlength=length)
    return counts


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
