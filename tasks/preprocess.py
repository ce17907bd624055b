"""The preprocess stage: every manifest row as a cached 8-bit crop, in parallel.

Per file: read the bytes, look the result up in the cache (`tasks.cache`),
else decode (`tasks.decode.load_grey`), resize and crop (`tasks.transforms`)
and store it. Cache misses are decoded in worker processes, or on a Dask
cluster through a `submit` function (flows/dask_preprocess.py).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple, Protocol

import numpy as np
import pandas as pd
import torch

from configs import PreprocessConfig
from tasks.cache import ImageCache, cache_key
from tasks.decode import load_grey
from tasks.j2k import reduced_decode_floor
from tasks.rejects import UnreadableImage
from tasks.transforms import resize_and_crop, to_model_input


class Preprocessed(NamedTuple):
    image: np.ndarray  # uint8 crop x crop; frames x crop x crop for `frames: all` on a multi-frame file
    cache_key: str
    provenance: list[str]
    cache_hit: bool


def preprocess_file(path: Path, config: PreprocessConfig) -> Preprocessed:
    """One file as a cached uint8 crop, with its cache key and provenance.

    The key is sha256 of the file's bytes and the settings (`tasks.cache.cache_key`),
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
    ImageCache(config.cache_dir, config.crop).put(key, image, provenance)
    return Preprocessed(image, key, provenance, cache_hit=False)


def _probe_cache(path: Path, config: PreprocessConfig) -> tuple[bytes, str, Preprocessed | None]:
    """The file's bytes, its cache key, and its cached result when there is one."""
    try:
        data = path.read_bytes()
    except OSError as exc:  # permissions, a symlink loop, a vanished file, disk errors
        raise UnreadableImage(f"cannot read the file: {exc.strerror or exc}", path) from exc
    key = cache_key(hashlib.sha256(data).hexdigest(), config)
    cached = ImageCache(config.cache_dir, config.crop).get(key)
    return data, key, None if cached is None else Preprocessed(cached[0], key, cached[1], cache_hit=True)


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
