"""Single-flight: concurrent callers that ask for the same key share one execution.

    group = SingleFlight()
    body = await group.do(("GET", "/report"), lambda: render_report(params))

The first caller for a key starts the *work* (``fn()``, run in a task of its
own, whose first step runs at once, inside that caller's call, as Python
3.12's eager tasks do: `server.eager.eager_task`) and publishes it under the
key; every caller that arrives while the key is published joins that work
instead of starting another. When the work ends, each
caller still waiting gets its result, or raises its exception, and the key is
unpublished. Results are not kept: the next caller after the work ends starts
new work (keeping results is the cache's job, built on top of this module).

Vocabulary
----------
*work*      one execution of a caller's ``fn()``, in its own task. Only the ``fn``
            of the caller that starts it runs; the ``fn`` of a joining caller is
            ignored.
*leader*    the caller whose arrival started the work.
*follower*  a caller that joined work already running (a "coalesced" caller).
*waiter*    leader or follower, while it is waiting for the work.
*published* the group maps the key to this work, so new callers join it.

When the shared work is cancelled
---------------------------------
1. Never because a caller was cancelled while others still wait. The work does
   not run inside the leader (only its first step runs during the leader's
   call, as the work's task): cancelling the leader (or any follower, or letting
   its ``asyncio.timeout`` expire) makes that caller leave at once with its
   ``CancelledError`` (or ``TimeoutError``), and everyone else keeps waiting.
2. When the *last* waiter leaves, the group cancels the work and unpublishes its
   key in the same step, before the work has even seen the cancellation. A
   caller arriving a moment later starts fresh work rather than joining a dying
   one; for a while the old work (running its ``finally`` blocks) and the new one
   may both be running.
3. Unless a caller asked ``finish_if_abandoned=True``. Then the work runs to its
   end with nobody waiting, and stays published until then, so a new caller
   joins it (it is not dying, there is no reason to start over). The flag is a
   property of the work, not of one caller: once any caller of a work has asked
   for it, the work finishes. To keep the result of abandoned work (the cache
   does), store it inside ``fn``: ``fn`` runs exactly once per work, whether or
   not anyone is still waiting.
4. The group never cancels work for any other reason. `forget` only unpublishes.

Who gets what
-------------
- Work that returns: every waiter gets the same value.
- Work that raises: every waiter raises the same exception object, with the
  work's traceback. That includes ``BaseException`` subclasses (asyncio's own
  rule still applies to ``KeyboardInterrupt`` and ``SystemExit``: they also
  propagate out of the event loop).
- Work cancelled by someone other than this group (loop shutdown, or ``fn``
  letting a ``CancelledError`` of its own escape) while callers still wait: they
  raise `SharedWorkCancelled`, never a bare ``CancelledError``. A
  ``CancelledError`` in a task that nobody cancelled would look like a
  cancellation to ``asyncio.timeout`` and ``TaskGroup`` (a TaskGroup drops a
  child that ends cancelled without a word), so it is translated.
- A cancelled waiter raises ``CancelledError``, even if the work's result was
  already on its way: cancellation is never swallowed, and the group never calls
  ``uncancel()``, so ``Task.cancelling()`` stays exact and ``asyncio.timeout`` /
  ``TaskGroup`` keep working around `SingleFlight.do`.

Invariants
----------
- A key maps to at most one work, and only to work that is running and either
  has a waiter or was asked to finish if abandoned (or ended a moment ago: see
  below).
- Work that the group has cancelled is unpublished and has no waiters; nobody
  can join it afterwards.
- Every outcome of the work is retrieved exactly once by the group, whether or
  not anyone is waiting, so asyncio never reports "exception was never
  retrieved".
- The group is bound to the event loop its flights run on; joining a flight
  from another loop raises ``RuntimeError``, as does ``fn`` joining its own work
  (it would wait for itself forever).

Mechanism and cost
------------------
A flight is one task (the work), one done callback on it, and one future per
waiter. Waiters await their own future; they cannot share one, because
cancelling a task cancels the future it awaits. When the work ends, its done
callback (the loop's next step) unpublishes the key and sets every waiter's
future, waking them at once: nothing polls (nginx's ``proxy_cache_lock`` checks
every 500 ms). A caller that arrives between the end of the work and that
callback joins and is served by the work that just finished. A waiter that
leaves removes its future in O(1). ``asyncio.shield(work)`` per waiter would give
the same semantics for one more future and two more callbacks per waiter.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar

from .eager import eager_task

__all__ = ["SharedResult", "SharedWorkCancelled", "SingleFlight", "SingleFlightStats"]

T = TypeVar("T")

_ABANDONED = "every caller waiting for this single-flight work has left"


class SharedWorkCancelled(Exception):
    """The shared work was cancelled by something other than its group while callers
    waited: the event loop shutting down, or ``fn`` letting a CancelledError escape."""


@dataclass(frozen=True, slots=True)
class SharedResult(Generic[T]):
    """What `SingleFlight.do_with_info` returns: the work's value, and whether this
    caller joined work another caller had started (a coalesced caller) rather than
    starting it."""

    value: T
    coalesced: bool


@dataclass(frozen=True, slots=True)
class SingleFlightStats:
    """A snapshot of a group's counters."""

    leaders: int  # works started
    followers: int  # callers that joined running work instead of starting it
    cancelled_works: int  # works cancelled because their last waiter left
    cancelled_waiters: int  # callers that left before their work ended
    in_flight: int  # keys published now


class _Flight:
    """One work and the callers waiting for it."""

    __slots__ = ("key", "loop", "work", "waiters", "finish_if_abandoned")

    def __init__(self, key: Hashable, loop: asyncio.AbstractEventLoop) -> None:
        self.key = key
        self.loop = loop
        self.work: asyncio.Task[Any] | None = None
        # one future per waiter, in arrival order (a dict is an ordered set)
        self.waiters: dict[asyncio.Future[Any], None] = {}
        self.finish_if_abandoned = False


async def _run_work(fn: Callable[[], Awaitable[T]]) -> T:
    # fn() is called here, inside the work's task: whatever it raises, even
    # before returning an awaitable, reaches every waiter like any other failure.
    return await fn()


class SingleFlight:
    """A group of keyed works; concurrent callers of one key share one work.

    A group belongs to one event loop. Keys are any hashable values.
    """

    def __init__(self) -> None:
        self._flights: dict[Hashable, _Flight] = {}
        self._leaders = 0
        self._followers = 0
        self._cancelled_works = 0
        self._cancelled_waiters = 0

    async def do(
        self,
        key: Hashable,
        fn: Callable[[], Awaitable[T]],
        *,
        finish_if_abandoned: bool = False,
    ) -> T:
        """Return the result of ``fn()``, shared with every concurrent caller of ``key``.

        If work for ``key`` is running, wait for it (``fn`` is not called);
        otherwise start ``fn()`` in a new task and wait for that. Raises what the
        work raised. With ``finish_if_abandoned=True`` the work is not cancelled
        when all its callers have left: it runs to its end.
        """
        flight, waiter, _ = self._join(key, fn, finish_if_abandoned)
        try:
            value: T = await waiter
            return value
        except BaseException:
            # cancelled (or the coroutine closed); after a normal wake-up the
            # waiter is no longer registered and leaving does nothing
            self._leave(flight, waiter)
            raise

    async def do_with_info(
        self,
        key: Hashable,
        fn: Callable[[], Awaitable[T]],
        *,
        finish_if_abandoned: bool = False,
    ) -> SharedResult[T]:
        """Like `do`, and also say whether this caller joined work it did not start."""
        flight, waiter, coalesced = self._join(key, fn, finish_if_abandoned)
        try:
            value = await waiter
        except BaseException:
            self._leave(flight, waiter)
            raise
        return SharedResult(value, coalesced)

    def forget(self, key: Hashable) -> bool:
        """Unpublish ``key``: the next caller starts fresh work, while the callers
        already waiting keep waiting for the old work (which is still cancelled when
        they have all left). Returns whether work was published under ``key``."""
        return self._flights.pop(key, None) is not None

    def __contains__(self, key: object) -> bool:
        """Whether work is published under ``key`` (a caller now would join it)."""
        return key in self._flights

    @property
    def stats(self) -> SingleFlightStats:
        return SingleFlightStats(
            leaders=self._leaders,
            followers=self._followers,
            cancelled_works=self._cancelled_works,
            cancelled_waiters=self._cancelled_waiters,
            in_flight=len(self._flights),
        )

    def _join(
        self, key: Hashable, fn: Callable[[], Awaitable[Any]], finish_if_abandoned: bool
    ) -> tuple[_Flight, asyncio.Future[Any], bool]:
        """Register the calling task as a waiter of the work published under ``key``,
        starting and publishing that work first if there is none."""
        loop = asyncio.get_running_loop()
        flight = self._flights.get(key)
        if flight is None:
            coalesced = False
            flight = self._flights[key] = _Flight(key, loop)
            self._leaders += 1
            # its first step runs now (a fill's upstream request leaves at once)
            work = eager_task(loop, _run_work(fn), f"single-flight work for {key!r}")
            flight.work = work
            work.add_done_callback(partial(self._finish, flight))
        else:
            coalesced = True
            if flight.loop is not loop:
                raise RuntimeError(
                    f"single-flight work for {key!r} runs on another event loop; "
                    "a SingleFlight group serves one loop"
                )
            # (no work yet: its first step is running, inline, and asking)
            if flight.work is None or flight.work is asyncio.current_task(loop):
                raise RuntimeError(
                    f"single-flight work for {key!r} asked for its own key: "
                    "it would wait for itself forever"
                )
            self._followers += 1
        if finish_if_abandoned:
            flight.finish_if_abandoned = True
        waiter = loop.create_future()
        flight.waiters[waiter] = None
        return flight, waiter, coalesced

    def _leave(self, flight: _Flight, waiter: asyncio.Future[Any]) -> None:
        """A waiter left before being served; cancel the work if it was the last."""
        if waiter not in flight.waiters:
            return  # already served: the work has ended
        del flight.waiters[waiter]
        self._cancelled_waiters += 1
        work = flight.work
        if flight.waiters or flight.finish_if_abandoned or work is None or work.done():
            return
        # Unpublish before cancelling: the work may take its time to die, and a
        # caller arriving meanwhile must start afresh, not join it.
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        work.cancel(_ABANDONED)
        self._cancelled_works += 1

    def _finish(self, flight: _Flight, work: asyncio.Task[Any]) -> None:
        """The work ended: unpublish its key and serve every waiter."""
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        waiters = flight.waiters
        flight.waiters = {}
        # Retrieve the outcome even when nobody waits, so asyncio never reports it.
        value: Any = None
        error: BaseException | None
        if work.cancelled():
            if not waiters:
                return
            error = _cancelled_from_outside(flight.key, work)
        else:
            error = work.exception()
            if error is None:
                value = work.result()
        for waiter in waiters:
            if waiter.done():
                continue  # its caller was cancelled and has not run its handler yet
            if error is None:
                waiter.set_result(value)
            else:
                waiter.set_exception(error)


def _cancelled_from_outside(key: Hashable, work: asyncio.Task[Any]) -> SharedWorkCancelled:
    error = SharedWorkCancelled(
        f"single-flight work for {key!r} was cancelled by something other than its group"
    )
    try:
        work.result()
    except asyncio.CancelledError as cancelled:
        error.__cause__ = cancelled
    return error
