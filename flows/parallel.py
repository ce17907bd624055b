"""Task runs in parallel on a flow's task runner, a bounded number at a time.

Training runs (tuning trials, learning-curve points) are submitted as Prefect tasks so
they spread over whatever runner the flow has (threads here; Dask or work-pool workers
where a site has them), but only `width` at once: each holds a model and a share of
the cores, and a search must see finished trials before it samples the next.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from prefect.futures import PrefectFuture, as_completed

from tasks.preprocess import resolve_workers


def in_flight(submit_next: Callable[[int], PrefectFuture | None], width: int) -> Iterator[PrefectFuture]:
    """Call `submit_next(runs in flight)` until it returns None or `width` runs are in flight;
    yield each run as it finishes, then top up again."""
    running: list[PrefectFuture] = []
    while True:
        while len(running) < width and (future := submit_next(len(running))) is not None:
            running.append(future)
        if not running:
            return
        done = next(as_completed(running))
        running.remove(done)
        yield done


@contextmanager
def threads_per_run(width: int) -> Iterator[None]:
    """Split this process's cores between `width` runs in threads, instead of each oversubscribing them."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, resolve_workers(None) // width))
    try:
        yield
    finally:
        torch.set_num_threads(before)
