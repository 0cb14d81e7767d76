"""The purge board: a ``PURGE`` in one worker reaches every worker's cache.

Each worker keeps its own first-level cache (`server.cache`), so a ``PURGE``
that lands on one worker cannot reach into the others' memory. It leaves a
mark instead, on a board they all read: one anonymous shared ``mmap`` of
``SLOTS`` clock readings, made by the master before it forks (nginx keeps its
cache's keys in a shared zone for the same reason). A purge of a URL writes
the time now into the URL's slot; a worker's hit on an entry stored *before*
that time is a miss instead, and the entry is dropped.

Invariants
----------
1. One clock for every process: ``CLOCK_MONOTONIC``, as the entries' own
   ``stored_at`` (`time.monotonic`).
2. A slot is chosen by the URL's ``hash()``: workers are forked from one
   master, so they share its hash seed, and a string's hash is computed once
   and kept by the string (the hit path pays a shift and an index). Two URLs
   that share a slot only cost each other a spurious miss after a purge,
   never a stale hit.
3. The board exists only when purging is allowed (``--purge-allow``); without
   it a hit pays one module attribute read.
4. A write is one aligned 8-byte store: a reader sees the old time or the new
   one, never a torn value.
"""

from __future__ import annotations

import mmap
import time

SLOTS = 1 << 14


class PurgeBoard:
    """When each URL (by slot) was last purged, shared by every worker."""

    def __init__(self, slots: int = SLOTS) -> None:
        if slots & (slots - 1):
            raise ValueError("the board's slots must be a power of two")
        self.mask = slots - 1
        self.memory = mmap.mmap(-1, slots * 8)  # anonymous, shared across fork
        self.times = memoryview(self.memory).cast("d")

    def stamp(self, url: str) -> None:
        """``url`` was purged now: entries stored before now are gone, everywhere."""
        self.times[hash(url) & self.mask] = time.monotonic()

    def purged_since(self, url: str, stored_at: float) -> bool:
        return self.times[hash(url) & self.mask] >= stored_at


BOARD: PurgeBoard | None = None


def install(board: PurgeBoard | None) -> None:
    """Make ``board`` this process's (the master's, before it forks its workers)."""
    global BOARD
    BOARD = board


def stamp(url: str) -> None:
    if BOARD is not None:
        BOARD.stamp(url)
