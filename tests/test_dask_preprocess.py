"""The preprocess stage on real Dask clusters (one reached by address, one started by `local`)
through prefect-dask's DaskTaskRunner."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pandas as pd
from distributed import LocalCluster
from prefect import get_client

from configs import PreprocessConfig
from flows.dask_preprocess import dask_task_runner, preprocess_on_dask
from tasks.cache import CACHE_SUFFIX
from tasks.preprocess import preprocess_dataset
from tests.conftest import MIXED_REJECTS


def test_dask_cluster_gives_the_local_pool_result(prefect_server, mixed_folder, tmp_path):
    root, manifest = mixed_folder
    config = PreprocessConfig(resize=256, crop=224, cache_dir=tmp_path / "pool", workers=2)
    pool = preprocess_dataset(manifest, root, config)
    # Threads, not processes: a worker process would import torch again (seconds
    # on a busy machine); the scheduler is real and reached by its address.
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        dask_config = config.model_copy(update={"cache_dir": tmp_path / "dask",
                                                "dask_address": cluster.scheduler_address})
        on_dask = preprocess_on_dask(manifest, root, dask_config)
        # The scheduler saw the chunk tasks: the work ran on Dask, not in a local pool.
        assert "preprocess_chunk" in cluster.scheduler.task_prefixes
    assert on_dask.cache_hits == 0
    assert dict(zip(on_dask.rejects["path"], on_dask.rejects["kind"])) == MIXED_REJECTS
    pd.testing.assert_frame_equal(on_dask.manifest, pool.manifest)
    pd.testing.assert_frame_equal(on_dask.rejects, pool.rejects)
    np.testing.assert_array_equal(on_dask.images, pool.images)
    assert len(list((tmp_path / "dask").rglob(f"*{CACHE_SUFFIX}"))) == len(pool.manifest)


def test_local_address_starts_a_cluster_of_single_threaded_worker_processes(prefect_server, mixed_folder, tmp_path):
    root, manifest = mixed_folder
    config = PreprocessConfig(resize=256, crop=224, cache_dir=tmp_path / "local", workers=2, dask_address="local")
    # Sized like the process pool: one decode per core, not Dask's default of several threads a worker.
    assert dask_task_runner(config).cluster_kwargs == {"n_workers": 2, "threads_per_worker": 1}
    pool = preprocess_dataset(manifest, root, config.model_copy(update={"cache_dir": tmp_path / "pool",
                                                                        "dask_address": None}))
    started = datetime.now(timezone.utc)
    on_dask = preprocess_on_dask(manifest, root, config)
    pd.testing.assert_frame_equal(on_dask.manifest, pool.manifest)
    pd.testing.assert_frame_equal(on_dask.rejects, pool.rejects)
    np.testing.assert_array_equal(on_dask.images, pool.images)
    with get_client(sync_client=True) as client:
        # A plain filter request: this Prefect server answers 422 to the nulls the typed client sends.
        runs = client.request("POST", "/task_runs/filter", json={
            "task_runs": {"name": {"like_": "preprocess-chunk"}, "start_time": {"after_": started.isoformat()}},
            "limit": 50, "offset": 0, "sort": "EXPECTED_START_TIME_DESC"}).json()
    # The misses went to the cluster as preprocess-chunk task runs, and every one of them finished.
    assert runs and {run["state_type"] for run in runs} == {"COMPLETED"}
