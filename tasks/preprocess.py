"""The preprocess stage: every manifest row as a cached 8-bit crop, in parallel.

Per file: read the bytes, look the result up in the cache (`tasks.cache`),
else decode (`tasks.decode.load_grey`), resize and crop (`tasks.transforms`);
each chunk of misses is stored as one cache shard. Cache misses are decoded in
worker processes, or on a Dask cluster through a `submit` function
(flows/dask_preprocess.py).
"""

from __future__ import annotations

import hashlib
import logging
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
from tasks.cache import Entry, ImageCache, cache_key
from tasks.decode import DecodeLimits, load_grey, read_image_file
from tasks.rejects import Reject, RejectKind, UnreadableImage, exception_detail, rejects_frame
from tasks.transforms import PreprocessSpec, to_model_input

log = logging.getLogger(__name__)


class Preprocessed(NamedTuple):
    image: np.ndarray  # uint8 crop x crop; frames x crop x crop for `frames: all` on a multi-frame file
    cache_key: str
    provenance: list[str]
    cache_hit: bool


def preprocess_file(path: Path, config: PreprocessConfig) -> Preprocessed:
    """One file as a cached uint8 crop, with its cache key and provenance.

    The key is sha256 of the file's bytes and the settings (`tasks.cache.cache_key`),
    so renamed or moved files still hit and edited files miss. A hit reads about
    50 KB and decodes nothing; a miss is decoded and stored as a shard of its own.
    """
    cache = ImageCache(config.cache_dir, config.crop)
    result = _preprocess_one(Path(path), config, cache)
    if not result.cache_hit:
        _store(cache, [_entry(result)])
    return result


def _probe_cache(path: Path, config: PreprocessConfig,
                 cache: ImageCache | None) -> tuple[bytes, str, Preprocessed | None]:
    """The file's bytes, its cache key, and its result from `cache` when that holds it."""
    data = read_image_file(path)
    key = cache_key(hashlib.sha256(data).hexdigest(), PreprocessSpec.from_config(config).cache_token(),
                    config.frames, config.voi_window)
    cached = cache.get(key) if cache is not None else None
    return data, key, None if cached is None else Preprocessed(cached[0], key, cached[1], cache_hit=True)


def _preprocess_one(path: Path, config: PreprocessConfig, cache: ImageCache | None) -> Preprocessed:
    """The file's result from `cache`, else decoded, resized and cropped (not stored)."""
    data, key, hit = _probe_cache(path, config, cache)
    if hit is not None:
        return hit
    spec = PreprocessSpec.from_config(config)
    grey, provenance = load_grey(path, data=data, frames=config.frames, voi_window=config.voi_window,
                                 floor=spec.decode_floor, limits=DecodeLimits.from_config(config), indexed=True)
    image, steps = spec.to_uint8(grey)
    return Preprocessed(image, key, provenance + steps, cache_hit=False)


def _entry(result: Preprocessed) -> Entry:
    return result.cache_key, result.image, result.provenance


def _store(cache: ImageCache, entries: list[Entry]) -> None:
    """`entries` as one cache shard. A failed write (a full disk, a read-only cache) costs only
    the caching: the files keep the crops just made, and a later run decodes them again."""
    try:
        cache.put(entries)
    except Exception as exc:
        log.warning("could not store %d preprocessed files in the cache at %s (%s); they are used "
                    "uncached", len(entries), cache.cache_dir, exception_detail(exc))


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
    rejects: pd.DataFrame  # REJECT_COLUMNS (tasks.rejects): files that could not be decoded
    images: np.ndarray  # uint8 (N, crop, crop), row-aligned with `manifest`
    cache_hits: int

    def _rows(self, name: str) -> np.ndarray:
        rows = np.flatnonzero(self.manifest["split"].to_numpy() == name)
        if len(rows) == 0:
            raise ValueError(f"the {name!r} split has no usable images")
        return rows

    def split(self, name: str) -> SplitData:
        rows = self._rows(name)
        return SplitData(self.images[rows], self.targets(name))

    def targets(self, name: str) -> np.ndarray:
        """One split's labels (class index or age) alone, without copying its images."""
        return self.manifest["target"].to_numpy(dtype=np.float32)[self._rows(name)]

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


def _preprocess_or_reject(path: Path, config: PreprocessConfig, cache: ImageCache | None) -> Preprocessed | Reject:
    """_preprocess_one inside one file's fault boundary: any failure is returned as its
    reject (picklable, for worker processes), an unexpected one as kind `unexpected`."""
    try:
        return _preprocess_one(path, config, cache)
    except UnreadableImage as exc:
        return exc.reject()
    except Exception as exc:  # a bug, a library's surprise: this file's problem, not the run's
        log.debug("unexpected error preprocessing %s", path, exc_info=True)
        return Reject(RejectKind.UNEXPECTED, exception_detail(exc))


def _preprocess_into(paths: list[Path], config: PreprocessConfig, cache: ImageCache, *, probe: bool,
                     shard_entries: int) -> list[Preprocessed | Reject]:
    """Each file's result in order, a failure as its reject. With `probe`, hits are read from
    `cache`; what is decoded goes into `cache` as shards of `shard_entries`, and what was
    decoded before an interruption (Ctrl-C, an error) is stored too, so a rerun resumes."""
    results: list[Preprocessed | Reject] = []
    fresh: list[Entry] = []
    try:
        for path in paths:
            result = _preprocess_or_reject(path, config, cache if probe else None)
            results.append(result)
            if isinstance(result, Preprocessed) and not result.cache_hit:
                fresh.append(_entry(result))
            if len(fresh) == shard_entries:
                _store(cache, fresh)
                fresh = []
    finally:
        if fresh:
            _store(cache, fresh)
    return results


def preprocess_files(paths: list[Path], config: PreprocessConfig) -> list[Preprocessed | Reject]:
    """Cache misses decoded and stored as one shard, a failure as its reject: one chunk of
    work for a worker (the caller has looked them up already)."""
    return _preprocess_into(paths, config, ImageCache(config.cache_dir, config.crop), probe=False,
                            shard_entries=len(paths))


def _hit_or_reject(path: Path, config: PreprocessConfig, cache: ImageCache) -> Preprocessed | Reject | None:
    """The cached result, a failure's reject, or None when the file must be decoded."""
    try:
        return _probe_cache(path, config, cache)[2]
    except UnreadableImage as exc:
        return exc.reject()


def _init_worker() -> None:
    # One torch thread per process: the processes already fill the cores, and
    # torch's own thread pool on top would oversubscribe them.
    torch.set_num_threads(1)


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork where there is one: a worker starts in milliseconds with this module
    # already imported, where spawn or forkserver re-import torch (seconds, per
    # run). Safe here because a worker only runs preprocess_files: it touches no
    # lock or thread of the parent's (Prefect, MLflow), and _init_worker pins
    # torch to one thread before any torch op, as torch's DataLoader workers do.
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


class ChunkFuture(Protocol):
    def result(self) -> list[Preprocessed | Reject]: ...


# Sends one chunk of files to be preprocessed elsewhere (a worker process, a
# Dask worker): preprocess_files(chunk, config) there, its result when asked.
# A worker that dies (a crash, the OOM killer) makes result() raise.
SubmitChunk = Callable[[list[Path]], ChunkFuture]


class _Alone:
    """One chunk in a worker process of its own: if a file kills it, only this chunk fails
    (in a shared pool, one dead worker fails every chunk still pending)."""

    def __init__(self, chunk: list[Path], config: PreprocessConfig):
        self._pool = ProcessPoolExecutor(1, mp_context=_pool_context(), initializer=_init_worker)
        self._future = self._pool.submit(preprocess_files, chunk, config)

    def result(self) -> list[Preprocessed | Reject]:
        try:
            return self._future.result()
        finally:
            self._pool.shutdown()


def chunk_size(files: int, workers: int) -> int:
    """Files per chunk (and cache shard): several chunks per worker keep every worker busy
    when some files (full-size CR) decode slower than others; up to 64 per chunk amortise
    the round trip (pickling a 49 KB crop back, a Dask task) and the shard write over many
    files, and bound what a killed worker loses."""
    return max(1, min(64, files // (workers * 8)))


def _run_each(chunks: list[list[Path]], submit: SubmitChunk, limit: int) -> list[list | BaseException]:
    """Each chunk through `submit`, at most `limit` at a time, in order; a chunk whose worker
    died gives the exception instead of its results."""
    outcomes: list[list | BaseException] = []
    for start in range(0, len(chunks), limit):
        futures = [submit(chunk) for chunk in chunks[start:start + limit]]
        for future in futures:
            try:
                outcomes.append(future.result())
            except Exception as exc:  # BrokenProcessPool, Dask's KilledWorker, a lost task
                outcomes.append(exc)
    return outcomes


def _retry_alone(failed: list[list[int]], paths: list[Path], submit_alone: SubmitChunk,
                 limit: int) -> dict[int, Preprocessed | Reject]:
    """Results for chunks (of indices into `paths`) whose worker died: each chunk again on a
    worker of its own (a dead worker stored no shard, so all are decoded again), then, for a
    chunk that dies again, each of its files alone. A file that kills even its own worker is
    a reject."""
    results: dict[int, Preprocessed | Reject] = {}
    suspects: list[int] = []
    for indices, outcome in zip(failed, _run_each([[paths[i] for i in c] for c in failed], submit_alone, limit)):
        if isinstance(outcome, BaseException):
            suspects += indices
        else:
            results.update(zip(indices, outcome))
    for index, outcome in zip(suspects, _run_each([[paths[i]] for i in suspects], submit_alone, limit)):
        if isinstance(outcome, BaseException):
            results[index] = Reject(RejectKind.WORKER_DIED, f"the worker process decoding it died (a crash, or "
                                                            f"the out-of-memory killer): {type(outcome).__name__}")
        else:
            results[index] = outcome[0]
    return results


def _map_files(paths: list[Path], config: PreprocessConfig, workers: int,
               submit: SubmitChunk | None) -> list[Preprocessed | Reject]:
    """preprocess_file over `paths` in order, a failure as its reject.

    Cache hits are read here: a hit costs less than sending it to a worker and
    its 49 KB crop back. Misses go in chunks to `submit` as they are found, so
    workers decode while this process goes on looking, and each chunk becomes one
    cache shard; with no `submit`, `workers` local processes (this one for 1,
    storing a shard per chunk of misses). Chunks whose worker died are retried
    (`_retry_alone`), so a file that crashes its decoder costs one reject.
    """
    cache = ImageCache(config.cache_dir, config.crop)
    size = chunk_size(len(paths), workers)
    if submit is None and min(workers, len(paths)) <= 1:
        # One torch thread here too: on a busy machine torch's spinning thread
        # pool made a 256 px resize ten times slower than the decode.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _preprocess_into(paths, config, cache, probe=True, shard_entries=size)
        finally:
            torch.set_num_threads(threads)
    with ExitStack() as stack:
        if submit is None:
            # The executor starts its processes at the first submit: a run
            # where every file hits starts none.
            pool = stack.enter_context(ProcessPoolExecutor(
                min(workers, len(paths)), mp_context=_pool_context(), initializer=_init_worker))
            submit, submit_alone = partial(pool.submit, preprocess_files, config=config), partial(_Alone, config=config)
        else:
            submit_alone = submit  # a Dask task already runs apart: a killed worker fails only its own tasks
        results: list[Preprocessed | Reject | None] = []
        pending, chunk = [], []
        # An empty cache holds no hit: the workers read and hash each file anyway, so
        # reading and hashing it here first too would only keep a core from decoding.
        probe = bool(cache.index)
        for index, path in enumerate(paths):
            found = _hit_or_reject(path, config, cache) if probe else None
            results.append(found)
            if found is None:
                chunk.append(index)
            if len(chunk) == size or (chunk and index == len(paths) - 1):
                pending.append((chunk, submit([paths[i] for i in chunk])))
                chunk = []
        failed = []
        for indices, future in pending:
            try:
                results_of_chunk = future.result()
            except Exception as exc:
                log.warning("a worker died with %d files to preprocess (%s); retrying them apart",
                            len(indices), type(exc).__name__)
                failed.append(indices)
                continue
            for index, result in zip(indices, results_of_chunk):
                results[index] = result
    for index, result in _retry_alone(failed, paths, submit_alone, workers).items():
        results[index] = result
    return results


def preprocess_dataset(manifest: pd.DataFrame, root: Path, config: PreprocessConfig,
                       submit: SubmitChunk | None = None) -> PreparedData:
    """Decode (or fetch from cache) every manifest row, across `config.workers` processes,
    or through `submit` (chunks of files to another executor, e.g. Dask) when given.

    Rows keep the manifest's order; rows that fail move to the rejects with their kind.
    With `frames: all`, a multi-frame file becomes one row per frame (column `frame`),
    each with the file's patient key and split.
    """
    images, keys, provenance, kept, frame_index, rejects = [], [], [], [], [], []
    hits = 0
    paths = [Path(root) / rel for rel in manifest["path"]]
    results = _map_files(paths, config, resolve_workers(config.workers), submit)
    for (index, rel), result in zip(manifest["path"].items(), results):
        if isinstance(result, Reject):
            log.info("rejected %s (%s): %s", rel, result.kind.value, result.detail)
            rejects.append((rel, result))
            continue
        hits += result.cache_hit
        frames = result.image if result.image.ndim == 3 else result.image[None]
        steps = ";".join(result.provenance)
        for frame, image in enumerate(frames, start=1):  # numbered from 1, as DICOM does
            images.append(image)
            keys.append(result.cache_key)
            frame_index.append(frame)
            kept.append(index)
            provenance.append(steps if len(frames) == 1 else f"{steps};frame:all({frame} of {len(frames)})")
    usable = manifest.loc[kept].reset_index(drop=True)
    usable["frame"], usable["cache_key"], usable["provenance"] = frame_index, keys, provenance
    stacked = np.stack(images) if images else np.zeros((0, config.crop, config.crop), np.uint8)
    return PreparedData(usable, rejects_frame(rejects), stacked, hits)
