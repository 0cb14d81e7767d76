"""The reactor's timer heap: ordering, cancellation and the cleanup of dead timers."""

from __future__ import annotations

import asyncio

from forkloop import reactor
from forkloop.reactor.timers import COMPACT_MINIMUM_SIZE, TimerQueue


def _run(main):
    with asyncio.Runner(loop_factory=reactor.new_event_loop) as runner:
        return runner.run(main())


def test_timers_with_equal_deadlines_fire_in_scheduling_order():
    async def main():
        loop = asyncio.get_running_loop()
        when = loop.time() + 0.005
        fired = []
        done = loop.create_future()
        for i in range(200):
            loop.call_at(when, fired.append, i)
        loop.call_at(when, done.set_result, None)
        await done
        return fired

    assert _run(main) == list(range(200))


def test_timer_never_fires_before_its_deadline_by_loop_time():
    async def main():
        loop = asyncio.get_running_loop()
        early = []
        done = loop.create_future()
        remaining = 100

        def check(when):
            nonlocal remaining
            if loop.time() < when:
                early.append(when - loop.time())
            remaining -= 1
            if not remaining:
                done.set_result(None)

        for i in range(100):
            when = loop.time() + 0.0001 * i
            loop.call_at(when, check, when)
        await done
        return early

    assert _run(main) == []


def test_a_million_cancelled_timeouts_never_pile_up_in_the_heap():
    async def main():
        loop = asyncio.get_running_loop()
        keep = [loop.call_later(3600, print) for _ in range(10)]
        peak = 0
        for _ in range(100):
            for _ in range(10_000):
                loop.call_later(60, print).cancel()
            peak = max(peak, len(loop._timers))
            await asyncio.sleep(0)
        live = len(loop._timers)
        for handle in keep:
            handle.cancel()
        return peak, live

    peak, live = _run(main)
    assert peak <= 2 * COMPACT_MINIMUM_SIZE + 20
    assert live >= 10


def test_timeouts_that_complete_in_time_leave_nothing_behind():
    async def main():
        loop = asyncio.get_running_loop()
        for _ in range(20_000):
            async with asyncio.timeout(30):
                pass
        await asyncio.sleep(0)
        return len(loop._timers)

    assert _run(main) < 2 * COMPACT_MINIMUM_SIZE


class _FakeHandle:
    def __init__(self, name):
        self.name = name
        self._cancelled = False

    def cancelled(self):
        return self._cancelled


def test_queue_pops_due_timers_earliest_first_and_skips_cancelled_ones():
    queue = TimerQueue()
    handles = {name: _FakeHandle(name) for name in "abcde"}
    for when, name in ((5.0, "e"), (1.0, "a"), (3.0, "c"), (2.0, "b"), (4.0, "d")):
        queue.push(when, handles[name])
    handles["b"]._cancelled = True
    queue.note_cancelled(handles["b"])
    due = []
    queue.pop_due(3.5, lambda handle: due.append(handle.name))
    assert due == ["a", "c"]
    assert queue.next_deadline() == 4.0
    handles["d"]._cancelled = True
    assert queue.next_deadline() == 5.0
    queue.clear()
    assert queue.next_deadline() is None and not queue


def test_compaction_drops_dead_entries_but_keeps_live_ones():
    queue = TimerQueue()
    live = [_FakeHandle(f"live{i}") for i in range(COMPACT_MINIMUM_SIZE)]
    dead = [_FakeHandle(f"dead{i}") for i in range(3 * COMPACT_MINIMUM_SIZE)]
    for i, handle in enumerate(live + dead):
        queue.push(float(i), handle)
    for handle in dead:
        queue.note_cancelled(handle)
        handle._cancelled = True
    assert len(queue) < 2 * COMPACT_MINIMUM_SIZE + 1
    due = []
    queue.pop_due(1e9, lambda handle: due.append(handle.name))
    assert due == [handle.name for handle in live]
