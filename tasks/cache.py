"""The on-disk cache of preprocessed images: uint8 crops keyed by file content and settings.

A hit reads one small file (about 50 KB for a 224 crop) and decodes nothing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from configs import FramePolicy
from tasks.io import write_bytes_atomic

# Part of every cache key: bump whenever the pixels preprocessing produces for
# the same file and settings could change, so old cache entries stop matching.
PIPELINE_VERSION = 4  # 2: JPEG 2000 decoded at reduced resolution when the resize allows;
# 3: HTJ2K decoded at reduced resolution too; provenance records a transfer syntax
# inferred from the encoding; 4: a tolerance band around lossy padding, frames numbered
# from 1, provenance of only the steps that changed something

# A cache entry is this line, a JSON line {"shape": [...], "provenance": [...]},
# then the uint8 pixels in C order. An .npz (a zip of two .npy files) cost
# about 0.4 ms to write per image, more than decoding a 256 px ultrasound.
CACHE_SUFFIX = ".u8img"
CACHE_MAGIC = b"medxfer-cache 1\n"


def cache_key(digest: str, spec_token: str, frames: FramePolicy, voi_window: int) -> str:
    """The key of a file whose content has sha256 `digest`, decoded with `frames` and `voi_window`
    and transformed by the spec whose `PreprocessSpec.cache_token()` is `spec_token`."""
    settings = f"v{PIPELINE_VERSION}:{spec_token}:frames={frames.value}:voi_window={voi_window}"
    return hashlib.sha256(f"{digest}:{settings}".encode()).hexdigest()


class ImageCache:
    """Entries under `cache_dir`, one file per key; `get` gives None for anything it cannot use."""

    def __init__(self, cache_dir: Path, crop: int):
        self.cache_dir, self.crop = Path(cache_dir), crop

    def path(self, key: str) -> Path:
        # Two-character shards keep directories small for large datasets.
        return self.cache_dir / key[:2] / f"{key}{CACHE_SUFFIX}"

    def get(self, key: str) -> tuple[np.ndarray, list[str]] | None:
        """The cached image and provenance; None for a missing, damaged or foreign entry (rebuilt)."""
        return read_entry(self.path(key), self.crop)

    def put(self, key: str, image: np.ndarray, provenance: list[str]) -> None:
        write_entry(self.path(key), image, provenance)


def read_entry(entry: Path, crop: int) -> tuple[np.ndarray, list[str]] | None:
    """The image and provenance in the entry file `entry`; None when it is missing, damaged,
    or not of `crop` x `crop` images."""
    try:
        data = entry.read_bytes()
    except OSError:
        return None
    if not data.startswith(CACHE_MAGIC):
        return None
    header_end = data.find(b"\n", len(CACHE_MAGIC))
    if header_end < 0:
        return None
    try:
        header = json.loads(data[len(CACHE_MAGIC):header_end])
        shape, provenance = tuple(header["shape"]), [str(step) for step in header["provenance"]]
        image = np.frombuffer(data, dtype=np.uint8, offset=header_end + 1).reshape(shape)
    except (ValueError, KeyError, TypeError):  # truncated or damaged: rebuild it
        return None
    if image.shape[-2:] != (crop, crop):
        return None
    return image, provenance


def write_entry(entry: Path, image: np.ndarray, provenance: list[str]) -> None:
    header = json.dumps({"shape": list(image.shape), "provenance": provenance}).encode()
    # A hidden *.tmp beside the entry, renamed into place: a killed run leaves
    # at most a stray temp file, never a half-written entry.
    write_bytes_atomic(entry, CACHE_MAGIC + header + b"\n" + np.ascontiguousarray(image, dtype=np.uint8).tobytes())
