"""The on-disk cache of preprocessed images: uint8 crops keyed by file content and settings.

Entries are packed many to a file: each chunk of cache misses a worker decodes becomes
one shard, written once through a temporary file and a rename (`tasks.io`), so a reader
sees a whole shard or none of it and a killed run loses at most the chunks in flight.
A shard starts with its own index (key, offset, shape, provenance per entry); an
`ImageCache` reads every shard's index once, then a hit is one seek and one read of
about 50 KB that decodes nothing. Shards are never rewritten: workers write different
shards (each named by the keys it holds), and a damaged shard is dropped and its entries
rebuilt. The key includes the preprocessing settings, so a change of spec simply misses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np

from configs import FramePolicy
from tasks.io import write_bytes_atomic

log = logging.getLogger(__name__)

# Part of every cache key: bump whenever the pixels preprocessing produces for
# the same file and settings could change, so old cache entries stop matching.
PIPELINE_VERSION = 4  # 2: JPEG 2000 decoded at reduced resolution when the resize allows;
# 3: HTJ2K decoded at reduced resolution too; provenance records a transfer syntax
# inferred from the encoding; 4: a tolerance band around lossy padding, frames numbered
# from 1, provenance of only the steps that changed something

# A shard is this line, the length of its JSON index as 8 little-endian bytes, the index
# {"entries": [[key, offset, shape, provenance], ...]} (offsets from the end of the index),
# then the entries' uint8 pixels in C order. One file per image cost 0.08-0.9 ms per
# write (benchmarks/RESULTS.md), as much as decoding a 256 px ultrasound.
SHARD_SUFFIX = ".u8shard"
SHARD_MAGIC = b"medxfer-cache-shard 1\n"
_INDEX_LENGTH = struct.Struct("<Q")

Entry = tuple[str, np.ndarray, list[str]]  # key, image, provenance


def cache_key(digest: str, spec_token: str, frames: FramePolicy, voi_window: int) -> str:
    """The key of a file whose content has sha256 `digest`, decoded with `frames` and `voi_window`
    and transformed by the spec whose `PreprocessSpec.cache_token()` is `spec_token`."""
    settings = f"v{PIPELINE_VERSION}:{spec_token}:frames={frames.value}:voi_window={voi_window}"
    return hashlib.sha256(f"{digest}:{settings}".encode()).hexdigest()


@dataclass(frozen=True)
class Location:
    """Where one entry's pixels are."""

    shard: Path
    offset: int  # from the start of the file
    shape: tuple[int, ...]
    provenance: tuple[str, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


class DamagedShard(ValueError):
    pass


class ImageCache:
    """The shards under `cache_dir`. `get` gives None for anything it cannot use (rebuilt);
    `put` writes one new shard. The index is read at the first `get` and covers the shards
    present then, and those this object writes."""

    def __init__(self, cache_dir: Path, crop: int):
        self.cache_dir, self.crop = Path(cache_dir), crop

    def shards(self) -> list[Path]:
        return sorted(self.cache_dir.glob(f"*/*{SHARD_SUFFIX}"))

    @cached_property
    def index(self) -> dict[str, Location]:
        index: dict[str, Location] = {}
        for shard in self.shards():
            try:
                index.update((key, location) for key, location in read_index(shard).items()
                             if location.shape[-2:] == (self.crop, self.crop))
            except FileNotFoundError:  # removed since it was listed
                continue
            except (OSError, DamagedShard) as exc:
                # Shards are complete when they appear and never rewritten: a damaged one stays
                # damaged, so it goes and its entries are decoded again.
                log.warning("cache shard %s is damaged (%s): removed, its entries will be rebuilt", shard.name, exc)
                shard.unlink(missing_ok=True)
        return index

    def get(self, key: str) -> tuple[np.ndarray, list[str]] | None:
        """The cached image and provenance; None when the cache does not hold it whole."""
        location = self.index.get(key)
        if location is None:
            return None
        try:
            with open(location.shard, "rb") as handle:
                handle.seek(location.offset)
                data = handle.read(location.size)
        except OSError:
            return None
        if len(data) != location.size:
            return None
        return np.frombuffer(data, dtype=np.uint8).reshape(location.shape), list(location.provenance)

    def put(self, entries: Sequence[Entry]) -> Path | None:
        """`entries` as one new shard (none for no entries); returns its path."""
        if not entries:
            return None
        name = hashlib.sha256("".join(key for key, _, _ in entries).encode()).hexdigest()
        shard = self.cache_dir / name[:2] / f"{name}{SHARD_SUFFIX}"
        rows, pixels, offset = [], [], 0
        for key, image, provenance in entries:
            data = np.ascontiguousarray(image, dtype=np.uint8).tobytes()
            rows.append([key, offset, list(image.shape), list(provenance)])
            pixels.append(data)
            offset += len(data)
        header = json.dumps({"entries": rows}).encode()
        write_bytes_atomic(shard, b"".join([SHARD_MAGIC, _INDEX_LENGTH.pack(len(header)), header, *pixels]))
        if "index" in self.__dict__:  # what this object writes it can read back
            start = len(SHARD_MAGIC) + _INDEX_LENGTH.size + len(header)
            self.index.update((key, Location(shard, start + row_offset, tuple(shape), tuple(provenance)))
                              for key, row_offset, shape, provenance in rows)
        return shard


def read_index(shard: Path) -> dict[str, Location]:
    """The entries of one shard by key; DamagedShard when its index is unreadable or the file
    is not as long as the index says."""
    with open(shard, "rb") as handle:
        head = handle.read(len(SHARD_MAGIC) + _INDEX_LENGTH.size)
        if len(head) != len(SHARD_MAGIC) + _INDEX_LENGTH.size or not head.startswith(SHARD_MAGIC):
            raise DamagedShard("not a cache shard")
        (length,) = _INDEX_LENGTH.unpack_from(head, len(SHARD_MAGIC))
        header = handle.read(length)
        size = handle.seek(0, 2)
    start = len(head) + length
    try:
        rows = json.loads(header)["entries"]
        # Interned: a large cache's entries repeat the same few provenance steps.
        index = {str(key): Location(shard, start + int(offset), tuple(int(n) for n in shape),
                                    tuple(sys.intern(str(step)) for step in provenance))
                 for key, offset, shape, provenance in rows}
    except (ValueError, KeyError, TypeError) as exc:
        raise DamagedShard(f"unreadable index: {exc}") from None
    end = max((location.offset + location.size for location in index.values()), default=start)
    if size != end:
        raise DamagedShard(f"{size} bytes where its index needs {end}")
    return index
