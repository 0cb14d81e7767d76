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
workers come and go. Totals are only as fresh as each worker's last publish,
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

COUNTERS = (
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
    "cache_hits",
    "cache_misses",
    "cache_stale",
    "cache_updating",
    "cache_bypass",
    "cache_coalesced",
    "cache_computations",
    "cancelled_disconnect",
    "cancelled_deadline",
    "cancelled_shutdown",
)

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
            if name != "open_connections":
                retired[name] += value
        _COUNTERS.pack_into(
            self.memory, self._offset(RETIRED) + _HEADER.size, *(retired[n] for n in COUNTERS)
        )
        _HEADER.pack_into(self.memory, self._offset(slot), 0, 0, FREE, 0.0)

    def totals(self, own_slot: int | None = None, own: Mapping[str, int] | None = None) -> dict:
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
