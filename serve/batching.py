"""Micro-batching: requests that arrive within a short window share one model run."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0

    @property
    def mean_batch(self) -> float:
        return self.items / self.batches if self.batches else 0.0


class MicroBatcher(Generic[Item, Result]):
    """Collects submitted items for up to `window_s` (or `max_batch` items), runs them
    together in a worker thread, and hands each caller its own result.

    Up to `lanes` batches run at once (serve.concurrent_batches), each in its own thread;
    one lane gathers at a time, so a batch fills while the others run.
    """

    def __init__(self, run: Callable[[Sequence[Item]], Sequence[Result]], max_batch: int, window_s: float,
                 lanes: int = 1):
        self._run, self.max_batch, self.window_s, self.lanes = run, max_batch, window_s, lanes
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future]] = asyncio.Queue()
        self._gathering = asyncio.Lock()  # one lane gathers at a time, or lanes would split batches
        self._workers: list[asyncio.Task] = []
        self.stats = BatchStats()

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._serve()) for _ in range(self.lanes)]

    async def stop(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    async def submit(self, item: Item) -> Result:
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _collect(self) -> list[tuple[Item, asyncio.Future]]:
        batch = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + self.window_s
        while len(batch) < self.max_batch:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                batch.append(self._queue.get_nowait() if remaining <= 0
                             else await asyncio.wait_for(self._queue.get(), remaining))
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
        return batch

    async def _serve(self) -> None:
        while True:
            async with self._gathering:
                batch = await self._collect()
            items = [item for item, _ in batch]
            try:
                results = await asyncio.to_thread(self._run, items)
            except Exception as exc:  # the callers see the error; the worker keeps serving
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.stats.batches += 1
            self.stats.items += len(items)
            for (_, future), result in zip(batch, results):
                if not future.done():  # the client may have gone away
                    future.set_result(result)
