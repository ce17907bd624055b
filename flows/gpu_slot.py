"""The GPU slot: a Prefect global concurrency limit with one slot that every training holds.

Two trainings never share the device: a second training waits in its train stage until
the first releases the slot (its lease expires if a worker dies holding it). On a machine
without a GPU the slot still keeps trainings one at a time, which is what two CPU-bound
trainings want too. `prefect deploy` creates it (a build step in prefect.yaml), and so does
the train stage when it is missing (an ad-hoc run on a fresh server); neither changes an
existing limit. By hand: `prefect gcl create gpu --limit 1`; see it with `prefect gcl ls`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator
from uuid import UUID

from prefect import get_client, get_run_logger, runtime
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

GPU_SLOT = "gpu"
GPU_SLOTS = 1
# The log lines that bracket a training's hold on the slot (their timestamps show who held it when).
HOLDING, RELEASING = f"holding the {GPU_SLOT!r} concurrency slot", f"releasing the {GPU_SLOT!r} concurrency slot"


def ensure_gpu_slot() -> dict[str, int | str]:
    """Create the `gpu` limit with one slot unless it exists; returns its name and limit.

    Also a prefect.yaml build step (step outputs are dicts)."""
    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(GPU_SLOT)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_SLOT, limit=GPU_SLOTS))
            except ObjectAlreadyExists:  # another run created it in the meantime
                pass
            limit = client.read_global_concurrency_limit_by_name(GPU_SLOT)
    return {"name": limit.name, "limit": limit.limit}


@contextmanager
def gpu_slot() -> Iterator[None]:
    """Hold the GPU slot for the block (inside a task run), waiting for it as long as it takes."""
    ensure_gpu_slot()
    logger = get_run_logger()
    task_run_id = runtime.task_run.id
    holder = ConcurrencyLeaseHolder(type="task_run", id=UUID(task_run_id)) if task_run_id else None
    asked = time.monotonic()
    with concurrency(GPU_SLOT, occupy=1, strict=True, holder=holder):
        held = time.monotonic()
        logger.info("%s (waited %.1f s)", HOLDING, held - asked)
        try:
            yield
        finally:
            logger.info("%s after %.1f s", RELEASING, time.monotonic() - held)
