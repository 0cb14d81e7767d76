"""The timer heap: which scheduled callbacks are due, and when the next one is.

What a timer is
---------------
``loop.call_at(when, callback)`` makes an `asyncio.TimerHandle` and pushes it
here. The heap holds ``(when, sequence, handle)`` tuples rather than the handles
themselves: tuples compare in C, first by deadline and then by a sequence
number that only grows, so two timers with the same deadline fire in the order
they were scheduled and the handles' own (Python-level) comparison methods are
never called. Ordering therefore costs one float comparison per heap step.

Cancelled timers and why they must not pile up
----------------------------------------------
Cancelling a handle does not touch the heap: removing from the middle of a heap
is O(n), and most code cancels far more timers than it lets fire (every
``asyncio.timeout()`` block that finishes in time cancels one). A cancelled
entry stays in place and is dropped when it reaches the top. That alone leaks:
a server that sets a 60-second timeout per request and cancels it a millisecond
later would keep a minute's worth of dead entries. So the queue also counts
cancellations, and once more than half of a heap of at least
`COMPACT_MINIMUM_SIZE` entries are cancelled it rebuilds the heap from the live
entries. Each rebuild is paid for by the half-heap of cancellations that
triggered it, so the cost stays O(1) amortised per cancellation, and the memory
held by dead timers is never more than the memory held by live ones.

The count may overestimate: `asyncio.TimerHandle.cancel()` reports every first
cancellation to the loop, including cancellations of timers that already fired
and left the heap (``asyncio.wait_for`` does exactly that). An overestimate only
makes a rebuild come early; the rebuild recounts, so the error never
accumulates.

Clock
-----
Deadlines are `time.monotonic` seconds, the loop's ``time()``. A timer is due
when its deadline is no later than *now* plus the clock's resolution, so a
timer whose deadline equals the current reading fires in this iteration rather
than costing one more trip through the poller.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from heapq import heapify, heappop, heappush

# Below this many entries a heap full of cancelled timers is cheap enough to keep.
COMPACT_MINIMUM_SIZE = 100

CLOCK_RESOLUTION = time.get_clock_info("monotonic").resolution


class TimerQueue:
    """Scheduled `asyncio.TimerHandle` objects ordered by deadline, then by arrival."""

    __slots__ = ("heap", "_cancelled", "_sequence")

    def __init__(self) -> None:
        # (deadline, sequence, handle) tuples. The list object is never replaced,
        # so the loop may keep it and peek at heap[0][0] without calling in here.
        self.heap: list[tuple[float, int, asyncio.TimerHandle]] = []
        self._cancelled = 0
        self._sequence = itertools.count()

    def __len__(self) -> int:
        return len(self.heap)

    def __bool__(self) -> bool:
        return bool(self.heap)

    def push(self, when: float, handle: asyncio.TimerHandle) -> None:
        heappush(self.heap, (when, next(self._sequence), handle))

    def note_cancelled(self, handle: asyncio.TimerHandle) -> None:
        """Record that ``handle`` is being cancelled; compact if dead entries dominate.

        `asyncio.TimerHandle.cancel` reports before it marks itself cancelled,
        so the compaction is told which handle to leave out.
        """
        self._cancelled += 1
        size = len(self.heap)
        if self._cancelled * 2 > size and size >= COMPACT_MINIMUM_SIZE:
            self.compact(handle)

    def compact(self, dying: asyncio.TimerHandle | None = None) -> None:
        """Rebuild the heap, in place, from its live entries."""
        heap = self.heap
        heap[:] = [entry for entry in heap if entry[2] is not dying and not entry[2].cancelled()]
        heapify(heap)
        self._cancelled = 0

    def next_deadline(self) -> float | None:
        """The deadline of the earliest live timer, or None when there is none."""
        heap = self.heap
        while heap:
            entry = heap[0]
            if not entry[2].cancelled():
                return entry[0]
            heappop(heap)
            if self._cancelled:
                self._cancelled -= 1
        return None

    def pop_due(self, now: float, run: Callable[[asyncio.TimerHandle], object]) -> None:
        """Hand every live timer due at ``now`` to ``run``, earliest first."""
        heap = self.heap
        limit = now + CLOCK_RESOLUTION
        while heap:
            entry = heap[0]
            if entry[0] > limit:
                return
            heappop(heap)
            handle = entry[2]
            if handle.cancelled():
                if self._cancelled:
                    self._cancelled -= 1
            else:
                run(handle)

    def clear(self) -> None:
        """Forget every timer (the loop is closing; none of them will fire)."""
        self.heap.clear()
        self._cancelled = 0
