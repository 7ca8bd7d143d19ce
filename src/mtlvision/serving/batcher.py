"""Dynamic batching: images of concurrent requests gathered into one forward pass.

One worker task takes the first waiting item, waits at most ``max_wait_s`` for others (taking at most
``max_batch``), and runs the batch in a single worker thread, so the event loop keeps accepting requests
while the model runs and the model is never run by two threads at once. Items queued while a batch runs
form the next one. This is the batching of Clipper (Crankshaw et al., NSDI 2017) and of Triton's dynamic
batcher; it is a few lines of asyncio, so no serving framework is needed for it (LitServe's batching would
also fit, but it brings its own server and process model on top of the FastAPI app served here).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


@dataclass
class Batched:
    """One item's result and how it was computed."""

    value: Any
    batch_size: int
    queue_ms: float
    model_ms: float


class DynamicBatcher:
    """Run ``run(items) -> results`` (one result per item, in order) on batches of submitted items.

    Args:
        run: the batch function, called in one worker thread; an exception fails every item of its batch.
        max_batch: most items per call.
        max_wait_s: how long the first item of a batch waits for more.
        setup: called once in the worker thread before its first batch (e.g. to set PyTorch's threads).
    """

    def __init__(
        self,
        run: Callable[[Sequence[Any]], Sequence[Any]],
        max_batch: int,
        max_wait_s: float,
        setup: Callable[[], None] | None = None,
    ) -> None:
        self.run = run
        self.setup = setup
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.batches = 0
        self.items = 0
        self._queue: asyncio.Queue[tuple[Any, asyncio.Future[Batched], float]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Start the worker on the running event loop."""
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtlvision-model", initializer=self.setup)
        self._worker = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        """Stop the worker; items still queued fail with a RuntimeError."""
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        while self._queue is not None and not self._queue.empty():
            _, future, _ = self._queue.get_nowait()
            if not future.done():
                future.set_exception(RuntimeError("the service stopped before this image was run"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._worker = self._executor = None

    async def submit(self, item: Any) -> Batched:
        """Queue ``item`` and wait for its result."""
        if self._queue is None or self._worker is None:
            raise RuntimeError("the batcher is not started (start() runs in the application's lifespan)")
        future: asyncio.Future[Batched] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future, time.perf_counter()))
        return await future

    async def _gather(self) -> list[tuple[Any, asyncio.Future[Batched], float]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [entry for entry in await self._gather() if not entry[1].done()]  # a client may have left
            if not batch:
                continue
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.run, [item for item, _, _ in batch])
            except Exception as exc:  # the batch's requests report it; the worker keeps serving
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            model_ms = (time.perf_counter() - started) * 1000
            self.batches += 1
            self.items += len(batch)
            for (_, future, queued), value in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(Batched(value, len(batch), (started - queued) * 1000, model_ms))
