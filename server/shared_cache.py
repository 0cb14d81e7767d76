"""The server-wide cache tier, worker side: one fill per key for the whole server.

Each worker's `ResponseCache` is the first level (a hit there costs no IPC and
no system call). Behind it, this module is the second: a connection from the
worker to the cache process (`server.cache_process`), which the master forks
and supervises, over a Unix socket. The response cache never knows how many
levels there are: when its own single-flight leader has to fill a key, it
asks `current()` for the tier and calls `SharedTier.acquire`, which says one of

- ``Hit(entry)``: another worker filled the key (now or earlier): serve it,
  keep a local copy; no computation here;
- ``Lease``: this worker owns the fill for the whole server. It computes and
  then calls exactly one of `Lease.store` (the result is shareable), or
  `Lease.error` (it raised, or answered 5xx: every waiter elsewhere gets that
  failure once, and nothing is stored), or `Lease.fail` (the answer is not to
  be shared: waiters elsewhere compute for themselves), or leaves
  (cancellation: `Lease.release`, the fill passes to a waiter in another
  worker);
- ``Failed(entry)``: the fill this worker waited for failed; serve its error
  (or a stale entry within stale-if-error), and do not compute: a stampede on a
  failing origin costs the origin one call, not one per worker;
- ``ALONE``: compute here, under this worker's own single-flight (the tier is
  unreachable or hung, or the fill elsewhere failed).

Invariants
----------
1. Per worker, at most one request per key is in flight to the cache process:
   the local single-flight group is in front, so the cache process counts
   workers, not requests, and a worker's local followers are served by its
   leader's result.
2. Who owns a fill: the cache process grants one lease per key; the lease
   belongs to the worker's *connection*. A waiter learns of the result by a push
   on its connection (the answer to its GET, delayed): nothing polls.
3. A worker killed mid-fill closes its connection (the kernel does it, even
   on ``kill -9``); the cache process then grants the lease to the next waiter
   at once. There is no lock age to wait out: the owner is known dead.
4. The tier never makes a request fail. Every GET is acknowledged (``WAIT``,
   or its answer) within `ACK_TIMEOUT`; no acknowledgement, a closed or refused
   connection: the tier is *unavailable*; it says so in one logged error,
   answers ``ALONE`` to everything (per-worker single-flight, as without the
   tier), and tries to reconnect at most every `RECONNECT_INTERVAL` (the master
   restarts a cache process that died). A waiter waits at most the route's
   ``lock_timeout`` for a fill elsewhere, then computes alone.
5. Who cancels a fill: the holder, when its own requests have all left *and*
   no worker waits (the cache process tells the holder each change in its
   waiter count). While others wait, the holder's fill runs on without its own
   requests and is shared when it ends; when the last of them leaves, it is
   cancelled. A route with ``finish_abandoned_fills`` always finishes.
6. Freshness comes with the entry: the cache process serves only entries still
   fresh (``CLOCK_MONOTONIC`` is one clock for every process of the machine), so
   a stale local entry's refresh is itself one fill per server.

Wire format (both ways): ``!IBI`` = length of what follows the length, an
operation, a request id; then for operations on a key, ``!H`` key length, the
key, and the payload. An entry travels as ``!I`` metadata length, JSON
metadata, then the body.

Vary: a URL whose response varies is stored twice: the entry under its
*variant key* (the URL and the values of the headers Vary names), and a
*vary marker* under the URL's key, naming those headers. A GET of the URL
that finds the marker (``Varies``) asks again for its own variant. The filler
stores the variant before the marker, on one connection, so a waiter woken by
the marker finds the variant it shares with the filler already there.

Hit-for-miss: a fill whose response may not be shared (private, no-store, a
cookie...) stores an *uncacheable marker* under the URL's key for the route's
``hit_for_miss`` seconds; its waiters, and every worker that asks meanwhile,
compute for themselves without waiting on a lease.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cache import Entry

log = logging.getLogger("forkloop.cache")

HEADER = struct.Struct("!IBI")  # length of the rest, operation, request id
KEY_LENGTH = struct.Struct("!H")
META_LENGTH = struct.Struct("!I")
EXPIRY = struct.Struct("!d")
MAX_FRAME = 64 * 1024 * 1024

# worker -> cache process
GET, STORE, FAIL, RELEASE, ERROR = 1, 2, 3, 4, 6
# cache process -> worker
HIT, FILL, WAIT, ALONE_ANSWER, WAITERS, FAILED = 10, 11, 12, 13, 14, 17
# a newer cache process (after USR2) -> the old one, and back: every entry, then every later one
SYNC, REPLICA, SYNCED = 5, 15, 16
COUNT = struct.Struct("!I")

ACK_TIMEOUT = 1.0  # seconds a GET may go unacknowledged before the tier counts as hung
RECONNECT_INTERVAL = 0.25


def frame(operation: int, request_id: int, key: bytes = b"", payload: bytes = b"") -> bytes:
    body = KEY_LENGTH.pack(len(key)) + key + payload if key or payload else b""
    return HEADER.pack(HEADER.size - 4 + len(body), operation, request_id) + body


def parse_frames(buffer: bytearray) -> list[tuple[int, int, bytes, bytes]]:
    """Cut every whole frame off the front of ``buffer``: (operation, id, key, payload)."""
    frames = []
    while len(buffer) >= HEADER.size:
        length, operation, request_id = HEADER.unpack_from(buffer)
        if length > MAX_FRAME:
            raise ValueError(f"a frame of {length} bytes is larger than {MAX_FRAME}")
        end = 4 + length
        if len(buffer) < end:
            break
        key = payload = b""
        if end > HEADER.size:
            (key_length,) = KEY_LENGTH.unpack_from(buffer, HEADER.size)
            start = HEADER.size + KEY_LENGTH.size
            key = bytes(buffer[start : start + key_length])
            payload = bytes(buffer[start + key_length : end])
        del buffer[:end]
        frames.append((operation, request_id, key, payload))
    return frames


def encode_entry(entry: Entry) -> bytes:
    meta = json.dumps(
        [
            entry.status,
            entry.headers,
            entry.content_type,
            entry.stored_at,
            entry.fresh_until,
            entry.stale_while_revalidate_until,
            entry.stale_if_error_until,
            entry.compute_seconds,
        ]
    ).encode()
    return EXPIRY.pack(entry.fresh_until) + META_LENGTH.pack(len(meta)) + meta + entry.body


def encode_vary_marker(vary: tuple[str, ...], fresh_until: float) -> bytes:
    """Stored under a URL whose responses vary: which request headers pick the variant."""
    meta = json.dumps({"vary": list(vary)}).encode()
    return EXPIRY.pack(fresh_until) + META_LENGTH.pack(len(meta)) + meta


def encode_uncacheable_marker(until: float) -> bytes:
    """Stored under a URL whose response may not be shared (Varnish's hit-for-miss)."""
    meta = json.dumps({"uncacheable": True}).encode()
    return EXPIRY.pack(until) + META_LENGTH.pack(len(meta)) + meta


def variant_key(url: str, values: tuple[str | None, ...]) -> bytes:
    """The key of one variant: a JSON list (a URL's own key starts with '/')."""
    return json.dumps([url, list(values)]).encode()


def decode_entry(blob: bytes) -> Entry | Varies | Uncacheable:
    from .cache import Entry

    (length,) = META_LENGTH.unpack_from(blob, EXPIRY.size)
    start = EXPIRY.size + META_LENGTH.size
    meta = json.loads(blob[start : start + length])
    if isinstance(meta, dict):
        if meta.get("uncacheable"):
            return Uncacheable(EXPIRY.unpack_from(blob)[0])
        return Varies(tuple(meta["vary"]))
    status, headers, content_type, stored, fresh, swr, sie, took = meta
    body = blob[start + length :]
    return Entry(
        status, [tuple(h) for h in headers], content_type, body, stored, fresh, swr, sie, took
    )


@dataclass(frozen=True)
class Hit:
    entry: Entry
    waited: bool  # the key was being filled by another worker: this request was coalesced


@dataclass(frozen=True)
class Failed:
    """The fill this worker waited for failed: its error response, to serve as it is."""

    entry: Entry


@dataclass(frozen=True)
class Uncacheable:
    """The URL's response is not to be shared until ``until``: compute, and do not ask."""

    until: float


@dataclass(frozen=True)
class Varies:
    """The URL's responses vary on these request headers: ask again for the variant."""

    vary: tuple[str, ...]


class _Alone:
    """Compute in this worker: ALONE (the fill elsewhere failed, or waiting for it
    took longer than the route's lock timeout) or FALLBACK (the tier is unavailable)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


ALONE = _Alone("ALONE")
FALLBACK = _Alone("FALLBACK")


@dataclass
class SharedStats:
    shared_hits: int = 0  # GETs answered with an entry at once
    shared_coalesced: int = 0  # GETs that waited for another worker's fill and got its entry
    shared_fills: int = 0  # leases granted to this worker
    shared_takeovers: int = 0  # leases granted after waiting: a filler elsewhere left or died
    shared_fallbacks: int = 0  # GETs answered ALONE because the tier was unavailable
    shared_alone: int = 0  # GETs answered ALONE: the fill elsewhere was not to be shared
    shared_failed: int = 0  # GETs answered with the failure of the fill they waited for
    shared_unavailable: int = 0  # times the tier was found unavailable

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class Lease:
    """This worker owns the fill of ``key`` for the server: end it exactly once."""

    def __init__(self, tier: SharedTier, key: bytes, request_id: int, took_over: bool) -> None:
        self.tier = tier
        self.key = key
        self.request_id = request_id
        self.took_over = took_over
        self.ended = False
        # set while the fill runs on for waiters elsewhere after this worker's own requests
        # left: called when they have all left too
        self.on_abandoned: Callable[[], object] | None = None
        tier.leases[request_id] = self

    @property
    def others_waiting(self) -> int:
        """Requests (one per worker) waiting in other workers for this fill."""
        return self.tier.waiting.get(self.request_id, 0)

    def store(self, entry: Entry) -> None:
        self.store_encoded(encode_entry(entry))

    def store_encoded(self, blob: bytes) -> None:
        if len(blob) > self.tier.max_entry_bytes:
            self.fail()  # too big to share: it stays in this worker's cache
            return
        self._end(STORE, blob)

    def fail(self) -> None:
        self._end(FAIL)

    def error(self, failure: Entry) -> None:
        """The fill failed: its waiters get ``failure`` (a 5xx) once; nothing is stored."""
        blob = encode_entry(failure)
        if len(blob) > self.tier.max_entry_bytes:
            self.fail()
            return
        self._end(ERROR, blob)

    def release(self) -> None:
        self._end(RELEASE)

    def _end(self, operation: int, payload: bytes = b"") -> None:
        if not self.ended:
            self.ended = True
            self.on_abandoned = None
            self.tier.leases.pop(self.request_id, None)
            self.tier.waiting.pop(self.request_id, None)
            self.tier.send(operation, self.request_id, self.key, payload)


class _Client(asyncio.Protocol):
    def __init__(self, tier: SharedTier) -> None:
        self.tier = tier
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            frames = parse_frames(self.buffer)
        except ValueError as exc:
            self.tier.unavailable(f"the cache process sent a bad frame ({exc})")
            return
        for operation, request_id, _key, payload in frames:
            self.tier.answer(request_id, operation, payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self.tier.unavailable("the connection to the cache process closed")


class SharedTier:
    """This worker's connection to the cache process (the server-wide level)."""

    def __init__(
        self, path: str, max_entry_bytes: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = path
        self.max_entry_bytes = max_entry_bytes
        self.clock = clock
        self.stats = SharedStats()
        self.transport: asyncio.Transport | None = None
        self._answers: dict[int, asyncio.Queue[tuple[int, bytes]]] = {}
        self.leases: dict[int, Lease] = {}  # by request id: the fills this worker holds
        self.waiting: dict[int, int] = {}  # lease's request id -> waiters in other workers
        self._next_id = 1
        self._last_attempt = -RECONNECT_INTERVAL
        self._connecting: asyncio.Task[bool] | None = None
        self._reported = False  # one logged error per outage

    async def connect(self) -> bool:
        self._last_attempt = self.clock()
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_unix_connection(lambda: _Client(self), self.path)
        except OSError as exc:
            self.unavailable(f"cannot connect to the cache process at {self.path} ({exc})")
            return False
        self.transport = transport  # uvloop's is not an asyncio.Transport subclass: no isinstance
        if self._reported:
            log.info("worker reconnected to the shared cache at %s", self.path)
        self._reported = False
        return True

    @property
    def available(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def unavailable(self, why: str) -> None:
        transport, self.transport = self.transport, None
        if transport is not None:
            transport.abort()
        for answers in self._answers.values():
            answers.put_nowait((ALONE_ANSWER, b""))
        for lease in list(self.leases.values()):  # nobody elsewhere can be waiting now
            self.waiting[lease.request_id] = 0
            if lease.on_abandoned is not None:
                abandoned = lease.on_abandoned
                lease.release()
                abandoned()
        if not self._reported:
            self._reported = True
            self.stats.shared_unavailable += 1
            log.error("shared cache unavailable: %s; each worker fills for itself meanwhile", why)

    def send(self, operation: int, request_id: int, key: bytes, payload: bytes = b"") -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(operation, request_id, key, payload))

    def answer(self, request_id: int, operation: int, payload: bytes) -> None:
        if operation == WAITERS:
            self._count_waiters(request_id, COUNT.unpack(payload)[0])
            return
        answers = self._answers.get(request_id)
        if answers is not None:
            answers.put_nowait((operation, payload))

    def _count_waiters(self, request_id: int, count: int) -> None:
        lease = self.leases.get(request_id)
        if lease is None and request_id not in self._answers:
            return  # a lease that has ended meanwhile
        self.waiting[request_id] = count
        if count == 0 and lease is not None and lease.on_abandoned is not None:
            abandoned = lease.on_abandoned
            lease.release()
            abandoned()

    def _reconnect_soon(self) -> None:
        if self._connecting is None and self.clock() - self._last_attempt >= RECONNECT_INTERVAL:
            self._last_attempt = self.clock()
            task = asyncio.get_running_loop().create_task(self.connect())
            self._connecting = task
            task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[Any]) -> None:
        self._connecting = None

    def keep(self, key: bytes, blob: bytes) -> None:
        """Store ``blob`` under ``key`` without holding its lease (0 is no request's id)."""
        if len(blob) <= self.max_entry_bytes:
            self.send(STORE, 0, key, blob)

    async def acquire(
        self, key: bytes, wait_timeout: float
    ) -> Hit | Varies | Uncacheable | Failed | Lease | _Alone:
        """Ask the server-wide tier for ``key``: its entry, the fill's lease, or ALONE."""
        if not self.available:
            self._reconnect_soon()
            self.stats.shared_fallbacks += 1
            return FALLBACK
        request_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1
        answers: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        self._answers[request_id] = answers
        waited = False
        settled = False  # an answer was taken: whatever it was, the cache process knows
        try:
            self.send(GET, request_id, key)
            try:
                async with asyncio.timeout(ACK_TIMEOUT):
                    operation, payload = await answers.get()
            except TimeoutError:
                self.unavailable(f"the cache process did not answer within {ACK_TIMEOUT}s")
                self.stats.shared_fallbacks += 1
                return FALLBACK
            if operation == WAIT:
                waited = True
                try:
                    async with asyncio.timeout(wait_timeout or None):
                        operation, payload = await answers.get()
                except TimeoutError:
                    self.stats.shared_alone += 1
                    return ALONE
            settled = True
            if operation == HIT:
                found = decode_entry(payload)
                if isinstance(found, (Varies, Uncacheable)):
                    return found
                if waited:
                    self.stats.shared_coalesced += 1
                else:
                    self.stats.shared_hits += 1
                return Hit(found, waited)
            if operation == FAILED:
                self.stats.shared_failed += 1
                failure = decode_entry(payload)
                if isinstance(failure, (Varies, Uncacheable)):  # not from a worker of ours
                    return ALONE
                return Failed(failure)
            if operation == FILL:
                self.waiting.setdefault(request_id, 0)
                self.stats.shared_fills += 1
                if waited:
                    self.stats.shared_takeovers += 1
                return Lease(self, key, request_id, waited)
            if self.available:
                self.stats.shared_alone += 1
                return ALONE
            self.stats.shared_fallbacks += 1
            return FALLBACK
        finally:
            del self._answers[request_id]
            if not settled:
                # gone before an answer was taken (cancelled, timed out): not a waiter any
                # more, and a lease granted meanwhile passes on (a stray release is ignored)
                self.waiting.pop(request_id, None)
                self.send(RELEASE, request_id, key)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None


_tier: SharedTier | None = None


def install(tier: SharedTier | None) -> None:
    """Make ``tier`` this process's server-wide level (the worker does, at boot)."""
    global _tier
    _tier = tier


def current() -> SharedTier | None:
    return _tier
