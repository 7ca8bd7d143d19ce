"""The dynamic batcher on its own: batches up to max_batch gathered within max_wait, every item gets its own
result, a failing batch fails only its items, and the worker thread's setup runs once."""

from __future__ import annotations

import asyncio
import threading

import pytest

from mtlvision.serving.batcher import DynamicBatcher


def test_concurrent_items_are_batched_up_to_the_limit_and_keep_their_results() -> None:
    calls: list[list[int]] = []

    def run(items):
        calls.append(list(items))
        return [item * 10 for item in items]

    async def scenario():
        batcher = DynamicBatcher(run, max_batch=4, max_wait_s=0.5)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        finally:
            await batcher.stop()

    results = asyncio.run(scenario())
    assert [r.value for r in results] == [i * 10 for i in range(10)]
    assert [len(c) for c in calls] == [4, 4, 2]  # all queued at once: full batches, then the rest
    assert [r.batch_size for r in results] == [4] * 8 + [2] * 2


def test_a_lone_item_waits_at_most_max_wait() -> None:
    async def scenario():
        batcher = DynamicBatcher(lambda items: list(items), max_batch=8, max_wait_s=0.05)
        await batcher.start()
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            result = await batcher.submit("x")
            return result, loop.time() - started
        finally:
            await batcher.stop()

    result, waited = asyncio.run(scenario())
    assert result.value == "x" and result.batch_size == 1
    assert 0.04 <= waited < 5  # it waited for company, then ran alone


def test_a_failing_batch_fails_its_items_and_the_worker_keeps_serving() -> None:
    setups: list[str] = []

    def run(items):
        if "bad" in items:
            raise ValueError("boom")
        return [item.upper() for item in items]

    async def scenario():
        batcher = DynamicBatcher(
            run, max_batch=2, max_wait_s=0.2, setup=lambda: setups.append(threading.current_thread().name)
        )
        await batcher.start()
        try:
            failed = await asyncio.gather(batcher.submit("bad"), batcher.submit("ok"), return_exceptions=True)
            later = await batcher.submit("fine")
            return failed, later
        finally:
            await batcher.stop()

    failed, later = asyncio.run(scenario())
    assert all(isinstance(f, ValueError) for f in failed)
    assert later.value == "FINE"
    assert len(setups) == 1 and setups[0].startswith("mtlvision-model")


def test_submit_before_start_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="not started"):
        asyncio.run(DynamicBatcher(lambda items: items, 2, 0.0).submit(1))
