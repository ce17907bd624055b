"""The preprocess stage: every manifest row as a cached 8-bit crop, in parallel.

Per file: read the bytes, look the result up in the cache (`tasks.cache`),
else decode (`tasks.decode.load_grey`), resize and crop (`tasks.transforms`)
and store it. Cache misses are decoded in worker processes, or on a Dask
cluster through a `submit` function (flows/dask_preprocess.py).
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
from tasks.cache import ImageCache, cache_key
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
    so renamed or moved files still hit and edited files miss. A hit reads one
    small file (about 50 KB) and decodes nothing.
    """
    path = Path(path)
    spec = PreprocessSpec.from_config(config)
    data, key, hit = _probe_cache(path, config)
    if hit is not None:
        return hit
    grey, provenance = load_grey(path, data=data, frames=config.frames, voi_window=config.voi_window,
                                 floor=spec.decode_floor, limits=DecodeLimits.from_config(config))
    image, steps = spec.to_uint8(grey)
    provenance = provenance + steps
    ImageCache(config.cache_dir, config.crop).put(key, image, provenance)
    return Preprocessed(image, key, provenance, cache_hit=False)


def _probe_cache(path: Path, config: PreprocessConfig) -> tuple[bytes, str, Preprocessed | None]:
    """The file's bytes, its cache key, and its cached result when there is one."""
    data = read_image_file(path)
    key = cache_key(hashlib.sha256(data).hexdigest(), PreprocessSpec.from_config(config).cache_token(),
                    config.frames, config.voi_window)
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
    rejects: pd.DataFrame  # REJECT_COLUMNS (tasks.rejects): files that could not be decoded
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


def _preprocess_or_reject(path: Path, config: PreprocessConfig) -> Preprocessed | Reject:
    """preprocess_file inside one file's fault boundary: any failure is returned as its
    reject (picklable, for worker processes), an unexpected one as kind `unexpected`."""
    try:
        return preprocess_file(path, config)
    except UnreadableImage as exc:
        return exc.reject()
    except Exception as exc:  # a cache write on a full disk, a bug: this file's problem, not the run's
        log.debug("unexpected error preprocessing %s", path, exc_info=True)
        return Reject(RejectKind.UNEXPECTED, exception_detail(exc))


def preprocess_files(paths: list[Path], config: PreprocessConfig) -> list[Preprocessed | Reject]:
    """preprocess_file over `paths`, a failure as its reject: one chunk of work for a worker."""
    return [_preprocess_or_reject(path, config) for path in paths]


def _hit_or_reject(path: Path, config: PreprocessConfig) -> Preprocessed | Reject | None:
    """The cached result, a failure's reject, or None when the file must be decoded."""
    try:
        return _probe_cache(path, config)[2]
    except UnreadableImage as exc:
        return exc.reject()


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
    """Files per chunk: several chunks per worker keep every worker busy when some
    files (full-size CR) decode slower than others; up to 64 per chunk amortise
    the round trip (pickling a 49 KB crop back, a Dask task) over many files."""
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
    worker of its own (files it had finished are cache hits now), then, for a chunk that
    dies again, each of its files alone. A file that kills even its own worker is a reject."""
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
    workers decode while this process goes on looking; with no `submit`,
    `workers` local processes (this one for 1). Chunks whose worker died are
    retried (`_retry_alone`), so a file that crashes its decoder costs one reject.
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
            submit, submit_alone = partial(pool.submit, preprocess_files, config=config), partial(_Alone, config=config)
        else:
            submit_alone = submit  # a Dask task already runs apart: a killed worker fails only its own tasks
        results: list[Preprocessed | Reject | None] = []
        pending, chunk = [], []
        size = chunk_size(len(paths), workers)
        for index, path in enumerate(paths):
            found = _hit_or_reject(path, config)
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
