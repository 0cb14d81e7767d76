"""The cache process: the server-wide cache tier and its one-fill-per-key leases.

The master forks it before the first worker (as nginx forks its cache
manager) and restarts it when it dies, or kills it first when its loop has
not beaten its shared-memory heartbeat for `HANG_TIMEOUT` seconds; it outlives reloads (HUP), so new
workers see the old workers' entries. It serves no HTTP. It listens on a Unix
socket; every worker keeps one connection to it (`server.shared_cache` is the
worker's side and defines the wire format).

State, and who owns it
----------------------
- ``entries``: an LRU of encoded entries bounded by ``max_bytes`` in total (the
  key and a fixed overhead counted with each), each with the time it stops being
  fresh. The process never decodes an entry: it stores bytes and one number.
- ``flights``: for each key being filled, the *holder* (the connection and
  request id that owns the lease) and the *waiters* (connection, request id),
  in arrival order.

Rules
-----
1. GET of a fresh entry: ``HIT`` at once. Of a key being filled: ``WAIT`` at
   once (so the worker knows the process is alive), then one push later. Else
   the asker becomes the holder: ``FILL``.
2. STORE by the holder: the entry is kept (if it fits) and every waiter gets
   ``HIT`` with it, in the same step; the flight ends. A STORE from anyone else
   only keeps the entry.
3. FAIL by the holder: every waiter gets ``ALONE`` (computes for itself: an
   unshareable answer is not shared); the flight ends. ERROR by the holder
   (the fill raised or answered 5xx): every waiter gets ``FAILED`` with the
   error response, which is not kept; the flight ends, and the next GET fills
   anew.
4. RELEASE by the holder (its requests left), or the holder's connection
   closing (the worker exited or was killed): the lease passes at once to the
   first waiter (``FILL``); with no waiter the flight ends. RELEASE by a waiter
   removes it; a closing connection removes all of its waiters.
5. Whenever a flight's waiters change, its holder is told how many there are
   (``WAITERS``, after its ``FILL``): that is how a fill is cancelled exactly when
   every waiter in every worker has left (`server.shared_cache`, rule 6).
6. Nothing here waits on a worker: every step is a reaction to one frame or
   one closed connection, and every answer is written before the next frame is
   read. A slow or stopped worker delays nobody but itself.

Binary upgrade (USR2)
---------------------
The old master hands the new one the path of its cache process's socket
(``FORKLOOP_UPGRADE_CACHE``). The new master's cache process, before it
accepts its own workers (they wait in the listen queue, at most
`SEED_TIMEOUT`), connects to the old one as a *follower* and sends ``SYNC``;
the old process answers every fresh entry, oldest first (``REPLICA``, so the
LRU order survives), then ``SYNCED``, and from then on copies every entry it
keeps to its followers as it keeps it. While both generations serve, an entry
either fills reaches both tiers; when the old master is told to QUIT, its
cache process exits and the new one just stops following. Flights are not
handed over: a fill under way in the old generation ends there (its waiters
are old workers). The old process that cannot be reached, or does not finish
within `SEED_TIMEOUT`, costs the new one nothing but a cold start (logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import mmap
import os
import signal
import socket
import struct
import tempfile
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from .shared_cache import (
    ALONE_ANSWER,
    COUNT,
    ERROR,
    EXPIRY,
    FAIL,
    FAILED,
    FILL,
    GET,
    HIT,
    RELEASE,
    REPLICA,
    STORE,
    SYNC,
    SYNCED,
    WAIT,
    WAITERS,
    frame,
    parse_frames,
)

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger("forkloop.cache")

ENTRY_OVERHEAD = 128  # bytes counted per entry beyond its key and encoded value
UPGRADE_CACHE_ENV = "FORKLOOP_UPGRADE_CACHE"  # the old master's cache socket, on USR2
SEED_TIMEOUT = 0.5  # seconds a new cache process waits for the old one's entries


@dataclass
class _Flight:
    holder: tuple[_Connection, int]
    waiters: deque[tuple[_Connection, int]] = field(default_factory=deque)


@dataclass
class StoreStats:
    hits: int = 0
    fills: int = 0
    waits: int = 0
    takeovers: int = 0
    stores: int = 0
    evictions: int = 0
    too_big: int = 0
    errors: int = 0  # fills that failed, their failure pushed to every waiter
    served: int = 0  # waiters handed the entry of a fill another worker did
    replicated: int = 0  # entries copied from the cache process of the master this one upgraded


class SharedStore:
    """Entries and flights: everything the cache process knows, with no I/O."""

    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.clock = clock
        self.size = 0
        self.entries: OrderedDict[bytes, tuple[float, bytes]] = OrderedDict()
        self.flights: dict[bytes, _Flight] = {}
        self.followers: list[_Connection] = []  # newer cache processes (USR2) copying entries
        self.stats = StoreStats()

    def get(self, connection: _Connection, request_id: int, key: bytes) -> None:
        stored = self.entries.get(key)
        if stored is not None:
            fresh_until, blob = stored
            if self.clock() < fresh_until:
                self.entries.move_to_end(key)
                self.stats.hits += 1
                connection.send(HIT, request_id, blob)
                return
        flight = self.flights.get(key)
        if flight is not None:
            flight.waiters.append((connection, request_id))
            self.stats.waits += 1
            connection.send(WAIT, request_id)
            self._tell_holder(flight)
            return
        self.flights[key] = _Flight((connection, request_id))
        self.stats.fills += 1
        connection.send(FILL, request_id)

    def store(self, connection: _Connection, request_id: int, key: bytes, blob: bytes) -> None:
        self.keep(key, blob)
        flight = self.flights.get(key)
        if flight is not None and flight.holder == (connection, request_id):
            del self.flights[key]
            self.stats.served += len(flight.waiters)
            for waiter, waiter_id in flight.waiters:
                waiter.send(HIT, waiter_id, blob)

    def fail(self, connection: _Connection, request_id: int, key: bytes) -> None:
        flight = self.flights.get(key)
        if flight is not None and flight.holder == (connection, request_id):
            del self.flights[key]
            for waiter, waiter_id in flight.waiters:
                waiter.send(ALONE_ANSWER, waiter_id)

    def error(self, connection: _Connection, request_id: int, key: bytes, failure: bytes) -> None:
        flight = self.flights.get(key)
        if flight is not None and flight.holder == (connection, request_id):
            del self.flights[key]
            self.stats.errors += 1
            for waiter, waiter_id in flight.waiters:
                waiter.send(FAILED, waiter_id, failure)

    def release(self, connection: _Connection, request_id: int, key: bytes) -> None:
        flight = self.flights.get(key)
        if flight is None:
            return
        if flight.holder == (connection, request_id):
            self._pass_lease(key, flight)
        else:
            with contextlib.suppress(ValueError):
                flight.waiters.remove((connection, request_id))
                self._tell_holder(flight)

    def sync(self, follower: _Connection) -> None:
        """A newer cache process (the master was upgraded) asks for every fresh entry,
        oldest first, and then for each entry as it is kept."""
        now = self.clock()
        for key, (fresh_until, blob) in self.entries.items():
            if now < fresh_until:
                follower.send_keyed(REPLICA, key, blob)
        follower.send(SYNCED, 0)
        self.followers.append(follower)

    def forget_connection(self, connection: _Connection) -> None:
        """A worker's connection closed: its waiters leave, its leases pass on."""
        if connection in self.followers:
            self.followers.remove(connection)
        for key, flight in list(self.flights.items()):
            waiting = len(flight.waiters)
            flight.waiters = deque(w for w in flight.waiters if w[0] is not connection)
            if flight.holder[0] is connection:
                self._pass_lease(key, flight)
            elif len(flight.waiters) != waiting:
                self._tell_holder(flight)

    def _pass_lease(self, key: bytes, flight: _Flight) -> None:
        if not flight.waiters:
            del self.flights[key]
            return
        flight.holder = flight.waiters.popleft()
        self.stats.takeovers += 1
        connection, request_id = flight.holder
        connection.send(FILL, request_id)
        self._tell_holder(flight)

    def _tell_holder(self, flight: _Flight) -> None:
        """The holder learns how many wait on its fill: it finishes a fill its own
        requests left while another worker still waits, and cancels it when nobody does."""
        connection, request_id = flight.holder
        connection.send(WAITERS, request_id, COUNT.pack(len(flight.waiters)))

    def keep(self, key: bytes, blob: bytes) -> None:
        size = len(key) + len(blob) + ENTRY_OVERHEAD
        if size > self.max_bytes:
            self.stats.too_big += 1
            return
        (fresh_until,) = EXPIRY.unpack_from(blob)
        old = self.entries.pop(key, None)
        if old is not None:
            self.size -= len(key) + len(old[1]) + ENTRY_OVERHEAD
        self.entries[key] = (fresh_until, blob)
        self.size += size
        self.stats.stores += 1
        for follower in self.followers:
            follower.send_keyed(REPLICA, key, blob)
        while self.size > self.max_bytes:
            oldest, (_, oldest_blob) = self.entries.popitem(last=False)
            self.size -= len(oldest) + len(oldest_blob) + ENTRY_OVERHEAD
            self.stats.evictions += 1


class _Connection(asyncio.Protocol):
    """One worker's connection."""

    def __init__(self, store: SharedStore) -> None:
        self.store = store
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self, operation: int, request_id: int, payload: bytes = b"") -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(operation, request_id, b"", payload))

    def send_keyed(self, operation: int, key: bytes, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(operation, 0, key, payload))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            frames = parse_frames(self.buffer)
        except ValueError as exc:
            log.error("cache process: closing a worker's connection: %s", exc)
            assert self.transport is not None
            self.transport.abort()
            return
        store = self.store
        for operation, request_id, key, payload in frames:
            if operation == GET:
                store.get(self, request_id, key)
            elif operation == STORE:
                store.store(self, request_id, key, payload)
            elif operation == FAIL:
                store.fail(self, request_id, key)
            elif operation == RELEASE:
                store.release(self, request_id, key)
            elif operation == ERROR:
                store.error(self, request_id, key, payload)
            elif operation == SYNC:
                store.sync(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.store.forget_connection(self)


class _Follower(asyncio.Protocol):
    """This cache process's connection to the one of the master it upgraded: a copy
    of every entry there, then of each entry kept there, until that process exits."""

    def __init__(self, store: SharedStore, synced: asyncio.Future[int]) -> None:
        self.store = store
        self.synced = synced
        self.buffer = bytearray()
        self.copied = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(frame(SYNC, 0))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            frames = parse_frames(self.buffer)
        except ValueError as exc:
            log.error("cache process: the old cache process sent a bad frame (%s)", exc)
            assert self.transport is not None
            self.transport.abort()
            return
        for operation, _request_id, key, payload in frames:
            if operation == REPLICA:
                self.store.keep(key, payload)
                self.store.stats.replicated += 1
                self.copied += 1
            elif operation == SYNCED and not self.synced.done():
                self.synced.set_result(self.copied)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.synced.done():
            self.synced.set_exception(ConnectionError("it closed the connection"))
        else:
            log.info("cache process %d: the old cache process is gone", os.getpid())


async def seed(store: SharedStore, path: str) -> None:
    """Copy the entries of the old master's cache process (USR2), within `SEED_TIMEOUT`;
    the connection stays open, copying later entries, after that."""
    loop = asyncio.get_running_loop()
    synced: asyncio.Future[int] = loop.create_future()
    try:
        async with asyncio.timeout(SEED_TIMEOUT):
            await loop.create_unix_connection(lambda: _Follower(store, synced), path)
            copied = await asyncio.shield(synced)
    except (OSError, TimeoutError) as exc:
        synced.cancel()  # nobody awaits it now; entries that still come are kept
        why = str(exc) or f"no answer within {SEED_TIMEOUT}s"
        log.warning(
            "cache process %d: could not copy the old cache process's entries at %s (%s); "
            "starting with what came",
            os.getpid(),
            path,
            why,
        )
        return
    log.info(
        "cache process %d copied %d entries from the old master's cache process",
        os.getpid(),
        copied,
    )


RESTART_DELAY = 0.1  # seconds before restarting a cache process that died; doubles, up to 5
BEAT_INTERVAL = 0.25  # seconds between the cache process's heartbeats
HANG_TIMEOUT = 3.0  # a cache process whose loop has not beaten this long is killed


# What the cache process publishes on its board at each beat (for /metrics): gauges
# first, then counters (which start again from 0 when the process is restarted).
BOARD_GAUGES = ("entries", "bytes", "limit_bytes", "leases", "waiters")
BOARD_COUNTERS = ("hits", "fills", "waits", "takeovers", "stores", "evictions", "errors", "served")
BOARD_FIGURES = BOARD_GAUGES + BOARD_COUNTERS


class Heartbeat:
    """A small shared file the cache process writes at each beat: the time (the master
    reads it to find a hung process) and its figures (workers read them for /metrics).

    A file, not anonymous memory, so that a worker needs only the cache socket's path
    to find it: ``board`` beside ``cache.sock``."""

    LAYOUT = struct.Struct(f"d{len(BOARD_FIGURES)}q")

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "wb") as board:
            board.write(bytes(self.LAYOUT.size))
        with open(path, "r+b") as board:
            self.memory = mmap.mmap(board.fileno(), self.LAYOUT.size)
        self.beat()

    def beat(self, store: SharedStore | None = None) -> None:
        figures = [0] * len(BOARD_FIGURES)
        if store is not None:
            stats = store.stats
            figures = [
                len(store.entries),
                store.size,
                store.max_bytes,
                len(store.flights),
                sum(len(flight.waiters) for flight in store.flights.values()),
                *(getattr(stats, name) for name in BOARD_COUNTERS),
            ]
        self.LAYOUT.pack_into(self.memory, 0, time.monotonic(), *figures)

    def age(self) -> float:
        return time.monotonic() - float(self.LAYOUT.unpack_from(self.memory, 0)[0])


def board_path(socket_path: str) -> str:
    """Where the board of the cache process listening at ``socket_path`` is."""
    return os.path.join(os.path.dirname(socket_path), "board")


def read_board(path: str) -> dict[str, float] | None:
    """A worker's reading of the board at ``path``: the figures, and ``age_seconds``
    since the last beat; None when there is no board to read."""
    try:
        with open(path, "rb") as board:
            raw = board.read(Heartbeat.LAYOUT.size)
    except OSError:
        return None
    if len(raw) < Heartbeat.LAYOUT.size:
        return None
    beat, *figures = Heartbeat.LAYOUT.unpack(raw)
    reading: dict[str, float] = dict(zip(BOARD_FIGURES, figures, strict=True))
    reading["age_seconds"] = time.monotonic() - beat
    return reading


class CacheProcessKeeper:
    """The master's side: bind the socket once, fork the cache process, restart it.

    The master binds and keeps the listening socket, so it outlives every cache
    process: a worker that connects while the cache process is being restarted
    waits in the listen queue rather than being refused, and a reload (HUP)
    keeps the process, and so its entries."""

    def __init__(self, config: Config) -> None:
        self.max_bytes = config.shared_cache_size
        self.directory = tempfile.mkdtemp(prefix="forkloop-cache-")
        self.path = os.path.join(self.directory, "cache.sock")
        self.listener: socket.socket | None = listen(self.path)
        self.pid: int | None = None
        self.started = 0.0
        self.next_start = 0.0
        self.failures = 0
        self.heartbeat = Heartbeat(board_path(self.path))
        self.killed = False  # SIGKILL sent for a missed heartbeat
        # after USR2: the old master's cache socket, whose entries the first process copies
        self.seed_from = os.environ.pop(UPGRADE_CACHE_ENV, None)

    def keep_running(self, close_in_child: Callable[[], None]) -> None:
        """Start the cache process if it is not running (and its back-off allows); kill
        it if it hangs (the next turn after its reaping starts another)."""
        if self.pid is not None:
            age = self.heartbeat.age()
            if age > HANG_TIMEOUT and not self.killed:
                log.error(
                    "cache process %d missed its heartbeat for %.1fs: killing it", self.pid, age
                )
                self.killed = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            return
        if self.listener is None or time.monotonic() < self.next_start:
            return
        self.started = time.monotonic()
        self.killed = False
        self.heartbeat.beat()
        seed_from, self.seed_from = self.seed_from, None
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                close_in_child()
                code = run(self.listener, self.max_bytes, self.heartbeat, seed_from)
            except BaseException:  # noqa: BLE001 - never return into the master's loop
                log.exception("cache process %d failed", os.getpid())
            finally:
                logging.shutdown()
                os._exit(code)
        self.pid = pid

    def reaped(self, pid: int, status: int) -> bool:
        """True when ``pid`` was the cache process (which the next turn restarts)."""
        if pid != self.pid:
            return False
        self.pid = None
        code = os.waitstatus_to_exitcode(status)
        how = f"exit code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
        if self.listener is None:
            return True  # stopping
        lived = time.monotonic() - self.started
        self.failures = 0 if lived > 10 else self.failures + 1
        delay = min(RESTART_DELAY * 2 ** max(self.failures - 1, 0), 5.0) if self.failures else 0
        self.next_start = time.monotonic() + delay
        log.warning(
            "cache process %d died unexpectedly (%s); restarting it%s",
            pid,
            how,
            f" in {delay:.1f}s" if delay else "",
        )
        return True

    def close_listener(self) -> None:
        """In a worker: the listening socket is the cache process's, not the worker's."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def stop(self) -> None:
        """Stop the cache process (bounded wait) and remove its socket."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        pid, self.pid = self.pid, None
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        break
                time.sleep(0.01)
            else:
                with contextlib.suppress(ProcessLookupError, ChildProcessError):
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
        for path in (self.path, self.heartbeat.path):
            with contextlib.suppress(OSError):
                os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(self.directory)


def listen(path: str) -> socket.socket:
    """The cache process's socket, bound by the master (so workers can connect at once)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(1024)
    return sock


async def serve(
    sock: socket.socket, max_bytes: int, heartbeat: Heartbeat, seed_from: str | None = None
) -> None:
    loop = asyncio.get_running_loop()

    store = SharedStore(max_bytes)

    def beat() -> None:
        heartbeat.beat(store)
        loop.call_later(BEAT_INTERVAL, beat)

    beat()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if seed_from is not None:
        await seed(store, seed_from)
    server = await loop.create_unix_server(lambda: _Connection(store), sock=sock)
    log.info(
        "cache process %d serving the shared cache on %s (%d bytes)",
        os.getpid(),
        sock.getsockname(),
        max_bytes,
    )
    await stop.wait()
    server.close()
    log.info("cache process %d stopped", os.getpid())


def run(
    sock: socket.socket, max_bytes: int, heartbeat: Heartbeat, seed_from: str | None = None
) -> int:
    """The cache process's life, in the child the master forked."""
    _exit_with_parent()
    asyncio.run(serve(sock, max_bytes, heartbeat, seed_from))
    return 0


PR_SET_PDEATHSIG = 1


def _exit_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
