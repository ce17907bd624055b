"""The preprocess stage on a Dask cluster: chunks of files as Prefect tasks on prefect-dask's DaskTaskRunner.

`preprocess.dask_address` picks the cluster (a scheduler address, or "local"
for a temporary LocalCluster). The work is `tasks.preprocess.preprocess_dataset`
unchanged: cache hits are still read here, and each chunk of misses becomes one
`preprocess-chunk` task run on a Dask worker. Dask workers must be able to
import this project and read `data.root` and `preprocess.cache_dir` under the
same paths (a shared file system), like the process pool's workers do.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from configs import PreprocessConfig
from tasks.preprocess import PreparedData, Preprocessed, preprocess_dataset, preprocess_files, resolve_workers
from tasks.rejects import Reject

if TYPE_CHECKING:
    from prefect_dask import DaskTaskRunner


@task(name="preprocess-chunk", cache_policy=NO_CACHE)
def preprocess_chunk(paths: list[Path], config: PreprocessConfig) -> list[Preprocessed | Reject]:
    return preprocess_files(paths, config)


@flow(name="preprocess-on-dask")
def _preprocess_flow(manifest: pd.DataFrame, root: Path, config: PreprocessConfig) -> PreparedData:
    return preprocess_dataset(manifest, root, config, submit=lambda chunk: preprocess_chunk.submit(chunk, config))


def preprocess_on_dask(manifest: pd.DataFrame, root: Path, config: PreprocessConfig) -> PreparedData:
    """preprocess_dataset, with the decoding done on the Dask cluster `config.dask_address` names."""
    if config.dask_address is None:
        raise ValueError("preprocess.dask_address is not set")
    return _preprocess_flow.with_options(task_runner=dask_task_runner(config))(manifest, root, config)


def dask_task_runner(config: PreprocessConfig) -> DaskTaskRunner:
    """A DaskTaskRunner on the scheduler at `config.dask_address`, or on a temporary LocalCluster for "local".

    The local cluster has `config.workers` (default: every usable core)
    single-threaded worker processes, like the process pool: decoding is
    mostly Python holding the GIL, so Dask's default of several threads per
    worker would leave cores idle.
    """
    # Imported here: prefect-dask (dask, distributed) is needed only by runs that use it.
    from prefect_dask import DaskTaskRunner

    if config.dask_address == "local":
        return DaskTaskRunner(cluster_kwargs={"n_workers": resolve_workers(config.workers), "threads_per_worker": 1})
    return DaskTaskRunner(address=config.dask_address)
