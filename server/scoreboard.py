"""The scoreboard: shared memory between the master and its workers.

Apache calls it the scoreboard; it is one anonymous shared ``mmap`` that the
master creates before it forks, so every worker inherits the same pages. Each
worker owns one slot and writes it; the master only reads slots, except to
clear a slot once its worker has been reaped.

A slot holds the worker's pid, generation (bumped on each reload), state
(booting, ready, stopping), a heartbeat timestamp and its counters. Writing a
slot is a `struct.pack_into` into memory: the heartbeat costs no system call
and no disk I/O (gunicorn's heartbeat is an ``fchmod`` of a temporary file).

Slot 0 is the *retired* slot: when a worker is reaped, the master adds its
last counters there, so totals over the server never go backwards when
workers come and go. The master also counts the workers it had to replace
there (`count`), and its state word is the *gate*: workers that have booted
wait for it to open before they accept a connection, and the master opens it
once every worker of the first generation is ready, so the server starts
answering whole, not one worker at a time. Totals are only as fresh as each worker's last publish,
which comes with its heartbeat (every second, or every half worker timeout when
that is shorter); a worker adds its own live counters when it answers ``/stats``.

Nothing here locks. A reader may see a slot half-written by its worker: that
costs one counter an update's worth of staleness, never a crash, because
every field is read as a whole aligned 8-byte word.
"""

from __future__ import annotations

import mmap
import struct
import time
from collections.abc import Mapping

# Every counter a slot holds, named once: the workers publish them, the master
# and `/stats` sum them, `/metrics` (`server.metrics`) and `forkloop loadtest`
# (`loadtest.runner`) read them by these names.
HTTP_COUNTERS = (
    "requests",
    "responses",
    "responses_2xx",
    "responses_3xx",
    "responses_4xx",
    "responses_5xx",
    "rejected",
    "timeouts",
    "open_connections",
    "connections_total",
)
CACHE_COUNTERS = (
    "cache_hits",
    "cache_misses",
    "cache_stale",
    "cache_updating",
    "cache_bypass",
    "cache_coalesced",
    "cache_computations",
)
# The server-wide tier (server.shared_cache): subsets of the hits above, and events that
# are not lookups, kept apart so that the lookups by result still add up.
SHARED_CACHE_COUNTERS = (
    "cache_shared_hits",
    "cache_shared_coalesced",
    "cache_takeovers",
    "cache_fallbacks",
    "cache_shared_failures",
)
# The fleet tier (server.fleet_cache), one store for several servers: its events, and
# how many workers find its breaker open (a gauge)
FLEET_CACHE_COUNTERS = (
    "cache_fleet_hits",
    "cache_fleet_coalesced",
    "cache_fleet_fills",
    "cache_fleet_takeovers",
    "cache_fleet_notifications",
    "cache_fleet_fenced",
    "cache_fleet_store_errors",
    "cache_fleet_fallbacks",
    "cache_fleet_breaker_open",
)
# The proxy's cache (server.proxy_cache): requests its fills sent upstream, those a 304
# answered, answers relayed without being stored, PURGEs done and refused
PROXY_CACHE_COUNTERS = (
    "cache_upstream_fills",
    "cache_revalidated",
    "cache_not_stored",
    "cache_purges",
    "cache_purges_refused",
)
CANCEL_REASONS = ("disconnect", "deadline", "shutdown")
CANCEL_COUNTERS = tuple(f"cancelled_{reason}" for reason in CANCEL_REASONS)
# Written by the master into the retired slot: workers it had to replace, by why.
RESTART_REASONS = ("died", "timeout", "retired", "boot_failed")
RESTART_COUNTERS = tuple(f"worker_restarts_{reason}" for reason in RESTART_REASONS)
# Responses by method and status: the methods and statuses worth a series of
# their own; any other method is "other", any other status its class ("4xx").
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other")
STATUSES = (
    *("200", "201", "202", "204", "206"),
    *("301", "302", "303", "304", "307", "308"),
    *("400", "401", "403", "404", "405", "408", "409", "410", "413", "414", "415"),
    *("422", "429", "431"),
    *("500", "501", "502", "503", "504", "505"),
    *("1xx", "2xx", "3xx", "4xx", "5xx"),
)
RESPONSE_COUNTERS = tuple(f"http_{method}_{status}" for method in METHODS for status in STATUSES)
# Seconds from a request's dispatch to its response; the last bucket is +Inf.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LATENCY_COUNTERS = (
    *(f"latency_bucket_{index}" for index in range(len(LATENCY_BUCKETS) + 1)),
    "latency_sum_microseconds",
)
COUNTERS = (
    HTTP_COUNTERS
    + CACHE_COUNTERS
    + SHARED_CACHE_COUNTERS
    + FLEET_CACHE_COUNTERS
    + PROXY_CACHE_COUNTERS
    + CANCEL_COUNTERS
    + RESTART_COUNTERS
    + RESPONSE_COUNTERS
    + LATENCY_COUNTERS
)
# Gauges: a reaped worker's value is dropped, not added to the retired slot.
GAUGES = ("open_connections", "cache_fleet_breaker_open")

FREE, BOOTING, READY, STOPPING = 0, 1, 2, 3
STATE_NAMES = {FREE: "free", BOOTING: "booting", READY: "ready", STOPPING: "stopping"}

# pid, generation, state, heartbeat (monotonic seconds), then the counters
_HEADER = struct.Struct("<qqqd")
_COUNTERS = struct.Struct(f"<{len(COUNTERS)}q")
SLOT_SIZE = _HEADER.size + _COUNTERS.size
RETIRED = 0


class Scoreboard:
    """``slots`` worker slots (plus the retired slot) in shared memory."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.memory = mmap.mmap(-1, SLOT_SIZE * (slots + 1))

    def _offset(self, slot: int) -> int:
        return SLOT_SIZE * slot

    # ---------------------------------------------------------------- worker side

    def claim(self, slot: int, pid: int, generation: int) -> None:
        _HEADER.pack_into(
            self.memory, self._offset(slot), pid, generation, BOOTING, time.monotonic()
        )
        _COUNTERS.pack_into(self.memory, self._offset(slot) + _HEADER.size, *([0] * len(COUNTERS)))

    def set_state(self, slot: int, state: int) -> None:
        struct.pack_into("<q", self.memory, self._offset(slot) + 16, state)

    def beat(self, slot: int, counters: Mapping[str, int] | None = None) -> None:
        """Prove the worker's loop is alive; publish its counters."""
        offset = self._offset(slot)
        struct.pack_into("<d", self.memory, offset + 24, time.monotonic())
        if counters is not None:
            values = [int(counters.get(name, 0)) for name in COUNTERS]
            _COUNTERS.pack_into(self.memory, offset + _HEADER.size, *values)

    # ---------------------------------------------------------------- master side

    def open_gate(self) -> None:
        """Let booted workers start accepting (the master, once all are ready)."""
        struct.pack_into("<q", self.memory, self._offset(RETIRED) + 16, READY)

    def gate_open(self) -> bool:
        return bool(self.read(RETIRED)[2] == READY)

    def read(self, slot: int) -> tuple[int, int, int, float]:
        """(pid, generation, state, heartbeat) of a slot."""
        return _HEADER.unpack_from(self.memory, self._offset(slot))

    def counters(self, slot: int) -> dict[str, int]:
        values = _COUNTERS.unpack_from(self.memory, self._offset(slot) + _HEADER.size)
        return dict(zip(COUNTERS, values, strict=True))

    def free_slot(self) -> int | None:
        for slot in range(1, self.slots + 1):
            if self.read(slot)[2] == FREE:
                return slot
        return None

    def retire(self, slot: int) -> None:
        """Fold a reaped worker's counters into the retired slot and free its slot."""
        retired = self.counters(RETIRED)
        for name, value in self.counters(slot).items():
            if name not in GAUGES:
                retired[name] += value
        _COUNTERS.pack_into(
            self.memory, self._offset(RETIRED) + _HEADER.size, *(retired[n] for n in COUNTERS)
        )
        _HEADER.pack_into(self.memory, self._offset(slot), 0, 0, FREE, 0.0)

    def count(self, name: str, amount: int = 1) -> None:
        """Master side: add to one of the retired slot's counters (worker restarts)."""
        index = COUNTERS.index(name)
        offset = self._offset(RETIRED) + _HEADER.size + 8 * index
        (value,) = struct.unpack_from("<q", self.memory, offset)
        struct.pack_into("<q", self.memory, offset, value + amount)

    def totals(
        self, own_slot: int | None = None, own: Mapping[str, int] | None = None
    ) -> dict[str, int]:
        """Counters summed over every worker, ever; ``own`` replaces ``own_slot``'s copy."""
        totals = dict.fromkeys(COUNTERS, 0)
        workers = 0
        for slot in range(0, self.slots + 1):
            if slot != RETIRED and self.read(slot)[2] == FREE:
                continue
            if slot != RETIRED:
                workers += 1
            values = own if (slot == own_slot and own is not None) else self.counters(slot)
            for name in COUNTERS:
                totals[name] += int(values.get(name, 0))
        totals["workers"] = workers
        return totals
