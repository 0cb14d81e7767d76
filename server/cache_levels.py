"""The cache levels behind a worker's own cache, stacked behind one interface.

A worker's `ResponseCache` is level one. Behind it there may be the
server-wide tier (`server.shared_cache`, level two: one fill per key per
machine) and the fleet tier (`server.fleet_cache`, level three: one fill per
key for every server that names the same store). The response cache asks
`current()` for "the level behind me" and calls ``acquire(key, wait)``; it
gets one of the answers every level gives (``Hit``, ``Varies``,
``Uncacheable``, a lease, ``ALONE`` or ``FALLBACK``) and never knows how
many levels answered. This module is where they are put in a row.

How the levels compose
----------------------
`Levels.acquire` asks each level in order, and goes on to the next level
only while it holds the lease of every level asked so far:

- a ``Hit`` from level N is handed to the leases held in front of it (their
  waiters get it as if this worker had computed it) and returned; a
  ``Failed`` likewise (their waiters get the failed fill's error);
- ``Uncacheable`` likewise (the marker is stored in front), ``Varies``
  stores a short-lived marker in front, so waiters there ask for their
  variant as this worker does;
- a lease from level N: held, and level N+1 is asked;
- ``ALONE`` from level N (the fill there failed, or waiting took longer than
  the route's lock timeout): compute here, under the leases already held;
- ``FALLBACK`` from level N (it is unavailable): the next level is still
  asked (the server-wide tier down does not take the fleet down with it);
  from the last level it means compute under the leases already held.

The leases held are ended together (`ChainedLease`): the result is stored in
every level that granted one, and a cancelled fill releases them all. Only the
front lease (the server's) counts waiters: waiters on other machines are not
counted, and a fleet lease whose filler's requests all left is released, so
that one of them takes the fill over (`server.fleet_cache`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, TypeGuard

from . import fleet_cache, shared_cache
from .shared_cache import FALLBACK, Failed, Hit, Uncacheable, Varies, _Alone

if TYPE_CHECKING:
    from .cache import Entry

VARY_MARKER_SECONDS = 1.0  # a Vary marker a deeper level found, kept this long in front


class Keeper(Protocol):
    def keep(self, key: bytes, blob: bytes) -> None: ...


class TierLease(Protocol):
    """A level's lease on one key's fill (`shared_cache.Lease`, `fleet_cache.FleetLease`)."""

    key: bytes
    took_over: bool
    on_abandoned: Callable[[], object] | None

    @property
    def tier(self) -> Keeper: ...

    @property
    def others_waiting(self) -> int: ...

    def store(self, entry: Entry) -> None: ...

    def store_encoded(self, blob: bytes) -> None: ...

    def fail(self) -> None: ...

    def error(self, failure: Entry) -> None: ...

    def release(self) -> None: ...


Answer = Hit | Varies | Uncacheable | Failed | TierLease | _Alone


class Level(Protocol):
    """What the response cache asks of the level behind it."""

    def keep(self, key: bytes, blob: bytes) -> None: ...

    async def acquire(self, key: bytes, wait_timeout: float) -> Answer: ...


def is_lease(answer: Answer) -> TypeGuard[TierLease]:
    return not isinstance(answer, (Hit, Varies, Uncacheable, Failed, _Alone))


class ChainedLease:
    """The leases of several levels on one fill, ended together."""

    def __init__(self, levels: Levels, leases: Sequence[TierLease]) -> None:
        self.levels = levels
        self.leases = leases
        self.key = leases[0].key
        self.took_over = any(lease.took_over for lease in leases)

    @property
    def tier(self) -> Keeper:
        return self.levels

    @property
    def on_abandoned(self) -> Callable[[], object] | None:
        return self.leases[0].on_abandoned

    @on_abandoned.setter
    def on_abandoned(self, callback: Callable[[], object] | None) -> None:
        self.leases[0].on_abandoned = callback

    @property
    def others_waiting(self) -> int:
        return sum(lease.others_waiting for lease in self.leases)

    def store(self, entry: Entry) -> None:
        for lease in self.leases:
            lease.store(entry)

    def store_encoded(self, blob: bytes) -> None:
        for lease in self.leases:
            lease.store_encoded(blob)

    def fail(self) -> None:
        for lease in self.leases:
            lease.fail()

    def error(self, failure: Entry) -> None:
        for lease in self.leases:
            lease.error(failure)

    def release(self) -> None:
        for lease in self.leases:
            lease.release()


class Levels:
    """Several levels asked in a row (see the essay)."""

    def __init__(self, levels: Sequence[Level]) -> None:
        self.levels = levels

    def keep(self, key: bytes, blob: bytes) -> None:
        for level in self.levels:
            level.keep(key, blob)

    async def acquire(self, key: bytes, wait_timeout: float) -> Answer:
        held: list[TierLease] = []
        answer: Answer = FALLBACK
        for level in self.levels:
            answer = await level.acquire(key, wait_timeout)
            if is_lease(answer):
                held.append(answer)
                continue
            if answer is FALLBACK:
                continue
            break
        if isinstance(answer, Hit):
            for lease in held:
                lease.store(answer.entry)
            return answer
        if isinstance(answer, Failed):  # the fill failed elsewhere: its error, here too
            for lease in held:
                lease.error(answer.entry)
            return answer
        if isinstance(answer, Uncacheable):
            for lease in held:
                lease.store_encoded(shared_cache.encode_uncacheable_marker(answer.until))
            return answer
        if isinstance(answer, Varies):
            marker = shared_cache.encode_vary_marker(
                answer.vary, time.monotonic() + VARY_MARKER_SECONDS
            )
            for lease in held:
                lease.store_encoded(marker)
            return answer
        if not held:
            return answer  # ALONE or FALLBACK
        # ALONE or FALLBACK behind a lease: compute here, for the levels whose leases are held
        return held[0] if len(held) == 1 else ChainedLease(self, held)


def current() -> Level | None:
    """The level behind this worker's own cache: the levels this process runs, in order."""
    shared: Level | None = shared_cache.current()
    fleet: Level | None = fleet_cache.current()
    levels = [level for level in (shared, fleet) if level is not None]
    if not levels:
        return None
    if len(levels) == 1:
        return levels[0]
    return Levels(levels)
