"""The fleet tier: one cache and one fill per key for every server that names one store.

A site on several machines runs a forkloop server on each, behind a load
balancer. The worker's own cache (`server.cache`) and the server-wide tier
(`server.shared_cache`) make one computation per key *per machine*; this
module, the third level, makes it one per fleet, on a Redis or Valkey store
the site already runs (``--cache-url redis://HOST:PORT/DB``, ``rediss://``,
``unix://PATH``). It has the shared tier's interface, so `server.cache_levels`
can stack it behind that one and the response cache never knows it is there:
`FleetTier.acquire` answers ``Hit(entry)``, ``Varies``, ``Uncacheable``, a
`FleetLease`, ``ALONE`` or ``FALLBACK``.

Who talks to the store
----------------------
Each worker, through its own client (a connection pool for commands, one
pub/sub connection for notifications, `server.fleet_notifications`). The
levels are asked in order, and a level is only asked by whoever holds the
level in front's lease: a worker's local single-flight leader asks the
cache process, and only the worker that
holds the *server's* lease asks the fleet. So at most one request per key per
machine reaches the store, and the cache process stays what it is, a process
that never waits on anything. (Had the cache process talked to Redis, a slow
store would have been waited on by the one process every worker needs.)

The lease, its bound, and fencing
---------------------------------
Keys: ``PREFIX{DIGEST}:value``, ``PREFIX{DIGEST}:lease`` and the shard channel
``PREFIX{DIGEST}:done``, where DIGEST is a hash of the cache key. The braces
are a Redis Cluster hash tag: the value, the lease and the channel of one key
always live in one slot, so one script touches them all on one node, and the
notification is a sharded publish (``SPUBLISH``, Redis 7) that reaches only
the subscribers of that slot's node.

1. ``acquire`` runs one script: the value, if it is there and still fresh
   (its wall-clock deadline is the blob's first eight bytes); else the lease
   (``SET lease TOKEN NX PX LEASE_TTL``, TOKEN random per fill); else the
   lease's remaining time. One round trip for a hit, a fill or a wait.
2. The filler renews the lease every ``LEASE_TTL / 3`` while it computes (a
   script that extends it only if it still holds TOKEN), and ends it with one
   script that checks TOKEN, deletes the lease, stores the value (with ``PX``:
   it expires in the store when its stale windows end) and publishes what
   happened (``stored``, ``failed`` or ``released``), atomically.
3. A filler that lost its lease (it was paused or cut off for longer than
   ``LEASE_TTL``, and another server took over) finds another TOKEN there or
   none: its late write is refused (the *fence*; counted as ``fenced``).
4. A waiter subscribes to the key's channel, then asks again (so a fill that
   ended in between is not missed), then sleeps until a notification comes
   or the lease's remaining time runs out, whichever is first. Nothing polls:
   a live filler's waiter wakes once per lease period at most, and a dead
   filler's waiter takes the lease over when it expires.

``LEASE_TTL`` is two seconds. A filler that dies (``kill -9``, a machine lost)
cannot release anything: the store is told nothing, so the bound on a takeover
is the lease's lifetime. Two seconds keeps that wait short next to a human's
patience, while a live filler would have to miss two renewals in a row (its
loop blocked, or the store unreachable, for over 1.3 s) to lose a lease it
still uses; and a lost lease costs one extra computation, never a wrong answer,
because of the fence.

Failure is never an outage
--------------------------
Every call has a deadline (``--cache-call-timeout``). An error, a refused
connection or a deadline missed opens the *breaker*: one logged error, every
waiter in this worker woken with ``FALLBACK`` at once, and every ``acquire``
answers ``FALLBACK`` without touching the network until a background probe
(a new client connecting, after `PROBE_INTERVAL`, backing off to
`PROBE_INTERVAL_MAX`) succeeds; then the breaker closes by itself, and one
line says so. A breaker that opens again before any call worked (a cluster
whose failed master is not yet replaced: the probe's node answers, the key's
does not) logs nothing more and probes less often. Under
``FALLBACK`` the levels in front (the server-wide lease, the worker's own
single-flight) still coalesce: the fleet is lost, not the machine's
guarantees. A waiter on a store that froze mid-wait notices at its next wake,
within ``LEASE_TTL`` plus one call timeout.

A fill that fails (raises, or answers 5xx) ends the lease as ``errored``:
the same script keeps its error response under ``PREFIX{DIGEST}:error`` for
`ERROR_KEPT` seconds, and its waiters on every server read it and serve it
(``Failed``), computing nothing: a stampede on a failing origin costs it one
call for the fleet. An answer that may not be shared ends it as ``failed``:
the waiters compute for themselves.

Clocks
------
Entries cross machines, and ``CLOCK_MONOTONIC`` is per machine: entries are
stored with wall-clock times (converted on the way in and out), and a fleet
trusts its machines' clocks to agree to well within an entry's lifetime, as
HTTP caches do with ``Date``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .fleet_notifications import (
    Notifications,
    StoreUnavailable,
    close_quietly,
    first_of,
)
from .shared_cache import (
    ALONE,
    EXPIRY,
    FALLBACK,
    Failed,
    Hit,
    Uncacheable,
    Varies,
    _Alone,
    decode_entry,
    encode_entry,
    encode_uncacheable_marker,
    encode_vary_marker,
)

if TYPE_CHECKING:
    from .cache import Entry

log = logging.getLogger("forkloop.cache")

LEASE_TTL = 2.0  # seconds; why two: the module's essay
WAKE_MARGIN = 0.005  # seconds after a lease's expiry before a waiter asks for it
PROBE_INTERVAL = 0.25  # seconds between the open breaker's probes at first
PROBE_INTERVAL_MAX = 2.0

# KEYS: value, lease. ARGV: wall-clock now, token, lease milliseconds.
# -> {1, value} | {2} (the lease is the caller's) | {3, the lease's milliseconds left}
GET_OR_LEASE = """
local value = redis.call('GET', KEYS[1])
if value and struct.unpack('>d', value) > tonumber(ARGV[1]) then return {1, value} end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then return {2} end
return {3, redis.call('PTTL', KEYS[2])}
"""
# KEYS: lease. ARGV: token, lease milliseconds. -> 1 renewed, 0 lost
RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""
# KEYS: value, lease, error. ARGV: token, outcome, channel, blob, blob milliseconds.
# -> 1 done, 0 refused (the lease is not the caller's any more: the fence)
FINISH = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
if ARGV[2] == 'stored' then redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[5]) end
if ARGV[2] == 'errored' then redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[5]) end
redis.call('SPUBLISH', ARGV[3], ARGV[2])
return 1
"""
STORED, FAILED, ERRORED, RELEASED = b"stored", b"failed", b"errored", b"released"
ERROR_KEPT = 5.0  # seconds a failed fill's error stays in the store for its waiters to read


@dataclass
class FleetStats:
    fleet_hits: int = 0  # entries found in the store (with or without waiting)
    fleet_coalesced: int = 0  # of those, found after waiting for another server's fill
    fleet_fills: int = 0  # leases granted to this worker
    fleet_takeovers: int = 0  # leases granted after waiting: a filler elsewhere left or died
    fleet_notifications: int = 0  # fills ended elsewhere, told by the store
    fleet_fenced: int = 0  # late writes refused: this worker's lease had passed on
    fleet_store_errors: int = 0  # calls that failed or missed their deadline
    fleet_fallbacks: int = 0  # acquires answered FALLBACK (the breaker was open)
    fleet_breaker_open: int = 0  # 1 while the breaker is open

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class StoreNames:
    """The store's names for one cache key: one hash slot for them all."""

    value: str
    lease: str
    channel: str
    error: str  # a failed fill's error response, briefly, for its waiters

    @classmethod
    def of(cls, prefix: str, key: bytes) -> StoreNames:
        tag = f"{prefix}{{{hashlib.blake2b(key, digest_size=16).hexdigest()}}}"
        return cls(f"{tag}:value", f"{tag}:lease", f"{tag}:done", f"{tag}:error")


# ---------------------------------------------------------------------- clocks


def _wall_offset() -> float:
    return time.time() - time.monotonic()


def to_wall(blob: bytes) -> tuple[bytes, float]:
    """A shared-tier blob (monotonic times) as the store keeps it (wall-clock times),
    and the wall-clock moment it may leave the store."""
    return _shift(blob, _wall_offset())


def from_wall(blob: bytes) -> Entry | Varies | Uncacheable:
    """What the store keeps, decoded, with this machine's monotonic times."""
    decoded = decode_entry(blob)
    by = -_wall_offset()
    if isinstance(decoded, Uncacheable):
        return Uncacheable(decoded.until + by)
    if isinstance(decoded, Varies):
        return decoded
    decoded.stored_at += by
    decoded.fresh_until += by
    decoded.stale_while_revalidate_until += by
    decoded.stale_if_error_until += by
    return decoded


def _shift(blob: bytes, by: float) -> tuple[bytes, float]:
    decoded = decode_entry(blob)
    if isinstance(decoded, Uncacheable):
        return encode_uncacheable_marker(decoded.until + by), decoded.until + by
    if isinstance(decoded, Varies):
        (until,) = EXPIRY.unpack_from(blob)
        return encode_vary_marker(decoded.vary, until + by), until + by
    moved = dataclasses.replace(
        decoded,
        stored_at=decoded.stored_at + by,
        fresh_until=decoded.fresh_until + by,
        stale_while_revalidate_until=decoded.stale_while_revalidate_until + by,
        stale_if_error_until=decoded.stale_if_error_until + by,
    )
    last = max(moved.fresh_until, moved.stale_while_revalidate_until, moved.stale_if_error_until)
    return encode_entry(moved), last


# ---------------------------------------------------------------------- the lease


class FleetLease:
    """This worker owns the fill of ``key`` for the fleet: end it exactly once."""

    def __init__(self, tier: FleetTier, key: bytes, token: str, took_over: bool) -> None:
        self.tier = tier
        self.key = key
        self.names = StoreNames.of(tier.prefix, key)
        self.token = token
        self.took_over = took_over
        self.ended = False
        self.on_abandoned: Callable[[], object] | None = None  # never called: see others_waiting
        self.renewer = asyncio.get_running_loop().create_task(self._renew())

    @property
    def others_waiting(self) -> int:
        """Waiters on other machines are not counted: when this worker's requests leave,
        the lease is released and one of them takes the fill over."""
        return 0

    def store(self, entry: Entry) -> None:
        self.store_encoded(encode_entry(entry))

    def store_encoded(self, blob: bytes) -> None:
        if len(blob) > self.tier.max_entry_bytes:
            self.fail()  # too big to share: it stays on this machine
            return
        self._end(STORED, blob)

    def fail(self) -> None:
        self._end(FAILED)

    def error(self, failure: Entry) -> None:
        """The fill failed (raised, or answered 5xx): its waiters on every server get
        ``failure`` once, and compute nothing; nothing is stored as the key's value."""
        blob = encode_entry(failure)
        if len(blob) > self.tier.max_entry_bytes:
            self.fail()
            return
        self._end(ERRORED, blob)

    def release(self) -> None:
        self._end(RELEASED)

    def _end(self, outcome: bytes, blob: bytes = b"") -> None:
        if self.ended:
            return
        self.ended = True
        self.renewer.cancel()
        self.tier.in_background(self._finish(outcome, blob))

    async def _finish(self, outcome: bytes, blob: bytes) -> None:
        arguments: list[str | bytes | int] = [self.token, outcome, self.names.channel]
        if outcome == STORED:
            stored, last = to_wall(blob)
            lifetime = int((last - time.time()) * 1000)
            if lifetime <= 0:
                outcome = FAILED  # nothing left of it to share
                arguments[1] = outcome
            else:
                arguments += [stored, lifetime]
        elif outcome == ERRORED:
            arguments += [to_wall(blob)[0], int(ERROR_KEPT * 1000)]
        names = self.names
        try:
            done = await self.tier.script(
                FINISH, [names.value, names.lease, names.error], arguments
            )
        except StoreUnavailable:
            return  # the lease expires by itself; waiters take over
        if not done:
            self.tier.stats.fleet_fenced += 1
            log.warning(
                "fleet cache refused a late %s of %r: the lease had passed to another filler",
                outcome.decode(),
                self.key[:200],
            )

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.tier.lease_ttl / 3)
            try:
                kept = await self.tier.script(
                    RENEW, [self.names.lease], [self.token, int(self.tier.lease_ttl * 1000)]
                )
            except StoreUnavailable:
                return
            if not kept:
                log.warning("fleet cache: the lease of %r expired mid-fill", self.key[:200])
                return


# ---------------------------------------------------------------------- the tier


class FleetTier:
    """This worker's client of the fleet's store (the third cache level)."""

    def __init__(
        self,
        url: str,
        prefix: str = "forkloop:",
        call_timeout: float = 0.1,
        max_entry_bytes: int = 1024 * 1024,
        lease_ttl: float = LEASE_TTL,
    ) -> None:
        self.url = url
        self.lease_ttl = lease_ttl
        self.prefix = prefix
        self.call_timeout = call_timeout
        self.max_entry_bytes = max_entry_bytes
        self.stats = FleetStats()
        self.notifications = Notifications(self)
        self.background: set[asyncio.Task[Any]] = set()
        self._client: Any = None  # redis.asyncio.Redis or RedisCluster
        self._scripts: dict[str, Any] = {}
        self._waiters: set[asyncio.Future[None]] = set()  # woken when the breaker opens
        self.parked = 0  # waits blocked on a notification right now
        self._prober: asyncio.Task[None] | None = None
        self._outage = False  # an error was logged, and no call has worked since
        self._announced = False  # the outage's end was logged
        self._probe_interval = PROBE_INTERVAL

    # ------------------------------------------------------------------ the client

    def client(self) -> Any:
        if self._client is None:
            self._client = _new_client(self.url, self.call_timeout, cluster=False)
        return self._client

    async def connect(self) -> bool:
        """Reach the store (and learn whether it is a cluster) with a client of its own,
        which then serves every call; False: the breaker is open."""
        client = _new_client(self.url, self.call_timeout, cluster=False)
        try:
            info = await self.call(client.info("cluster"), checking=True)
            if info.get("cluster_enabled"):
                await close_quietly(client)
                client = _new_client(self.url, self.call_timeout, cluster=True)
                await self.call(client.initialize(), checking=True)
        except StoreUnavailable:
            self.in_background(close_quietly(client))
            return False
        replaced, self._client = self._client, client
        self._scripts.clear()
        if replaced is not None:
            self.in_background(close_quietly(replaced))
        if not self._outage:
            log.info(
                "worker %d uses the fleet cache at %s", os.getpid(), _without_password(self.url)
            )
        return True

    @property
    def breaker_open(self) -> bool:
        return self.stats.fleet_breaker_open == 1

    async def call(self, awaitable: Any, checking: bool = False) -> Any:
        """One call to the store, within the call timeout; any failure opens the breaker.
        A ``checking`` call (connecting) does not count as the store being back."""
        if self.breaker_open and not checking:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise StoreUnavailable
        try:
            async with asyncio.timeout(self.call_timeout):
                answer = await awaitable
        except TimeoutError:
            self.open_breaker(f"a call took longer than {self.call_timeout}s")
        except (redis.RedisError, OSError) as exc:
            self.open_breaker(str(exc) or type(exc).__name__)
        else:
            if self._outage and not checking:  # the first call that worked since the error
                self._outage = False
                self._probe_interval = PROBE_INTERVAL
            return answer
        raise StoreUnavailable

    async def script(self, source: str, keys: list[str], arguments: list[Any]) -> Any:
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.client().register_script(source)
        return await self.call(script(keys=keys, args=arguments))

    def open_breaker(self, why: str) -> None:
        self.stats.fleet_store_errors += 1
        if self.breaker_open:
            return
        self.stats.fleet_breaker_open = 1
        if self._outage:  # it opened again before any call worked: probe less often
            self._probe_interval = min(self._probe_interval * 2, PROBE_INTERVAL_MAX)
        else:  # one logged error per outage
            self._outage = True
            self._announced = False
            log.error(
                "fleet cache at %s unavailable: %s; each server fills for itself until it is back",
                _without_password(self.url),
                why,
            )
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.notifications.reset()
        client, self._client = self._client, None
        self._scripts.clear()
        if client is not None:
            self.in_background(close_quietly(client))
        if self._prober is None or self._prober.done():
            self._prober = asyncio.get_running_loop().create_task(self._probe())

    async def _probe(self) -> None:
        """While the breaker is open: connect anew now and then; once that works, close it
        (nothing else uses the client meanwhile, so a cluster's map is learnt first)."""
        while True:
            await asyncio.sleep(self._probe_interval)
            try:
                connected = await self.connect()
            except Exception as exc:  # noqa: BLE001 - the probe must outlive any surprise
                log.warning("fleet cache probe failed unexpectedly: %r", exc)
                connected = False
            if connected:
                self.stats.fleet_breaker_open = 0  # calls go to the store again
                if not self._announced:
                    self._announced = True
                    log.info("fleet cache at %s is back", _without_password(self.url))
                return
            self._probe_interval = min(self._probe_interval * 2, PROBE_INTERVAL_MAX)

    def in_background(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    # ------------------------------------------------------------------ the level's interface

    def keep(self, key: bytes, blob: bytes) -> None:
        """Store ``blob`` under ``key`` without holding its lease (a Vary marker)."""
        if len(blob) <= self.max_entry_bytes and not self.breaker_open:
            self.in_background(self._keep(key, blob))

    async def _keep(self, key: bytes, blob: bytes) -> None:
        stored, last = to_wall(blob)
        lifetime = int((last - time.time()) * 1000)
        if lifetime > 0:
            with contextlib.suppress(StoreUnavailable):
                await self.call(
                    self.client().set(StoreNames.of(self.prefix, key).value, stored, px=lifetime)
                )

    async def acquire(
        self, key: bytes, wait_timeout: float
    ) -> Hit | Varies | Uncacheable | Failed | FleetLease | _Alone:
        """Ask the fleet for ``key``: its entry, the fill's lease, or ALONE / FALLBACK."""
        if self.breaker_open:
            self.stats.fleet_fallbacks += 1
            return FALLBACK
        names = StoreNames.of(self.prefix, key)
        token = os.urandom(12).hex()
        try:
            answer = await self._get_or_lease(names, token)
            if answer[0] != 3:
                return self._answered(key, token, answer, waited=False)
            return await self._wait(key, names, token, wait_timeout)
        except StoreUnavailable:
            self.stats.fleet_fallbacks += 1
            return FALLBACK

    async def _get_or_lease(self, names: StoreNames, token: str) -> list[Any]:
        arguments = [repr(time.time()), token, int(self.lease_ttl * 1000)]
        answer: list[Any] = await self.script(GET_OR_LEASE, [names.value, names.lease], arguments)
        return answer

    def _answered(
        self, key: bytes, token: str, answer: list[Any], waited: bool
    ) -> Hit | Varies | Uncacheable | FleetLease:
        if answer[0] == 2:
            self.stats.fleet_fills += 1
            self.stats.fleet_takeovers += waited
            return FleetLease(self, key, token, took_over=waited)
        found = from_wall(answer[1])
        if isinstance(found, (Varies, Uncacheable)):
            return found
        self.stats.fleet_hits += 1
        self.stats.fleet_coalesced += waited
        return Hit(found, waited)

    async def _wait(
        self, key: bytes, names: StoreNames, token: str, wait_timeout: float
    ) -> Hit | Varies | Uncacheable | Failed | FleetLease | _Alone:
        """Another server fills ``key``: wait for its notification, or its lease's end."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_timeout if wait_timeout else float("inf")
        queue = await self.notifications.listen(names.channel)
        broken: asyncio.Future[None] = loop.create_future()
        self._waiters.add(broken)
        try:
            while True:
                answer = await self._get_or_lease(names, token)  # a fill may have ended already
                if answer[0] != 3:
                    return self._answered(key, token, answer, waited=True)
                now = loop.time()
                if now >= deadline:
                    return ALONE  # waited the route's lock timeout
                lease_left = answer[1] / 1000 if answer[1] > 0 else self.lease_ttl
                wake = min(deadline, now + lease_left + WAKE_MARGIN)
                self.parked += 1
                try:
                    message = await first_of(queue, broken, wake - now)
                finally:
                    self.parked -= 1
                if broken.done():
                    raise StoreUnavailable
                if message == FAILED:
                    return ALONE  # not shared: compute for ourselves
                if message == ERRORED:  # its error, once: nobody here computes
                    failure = await self.call(self.client().get(names.error))
                    found = from_wall(failure) if failure else None
                    if found is None or isinstance(found, (Varies, Uncacheable)):
                        return ALONE  # gone already: compute for ourselves
                    return Failed(found)
                # stored, released, or the lease's time is up: ask again
        finally:
            self._waiters.discard(broken)
            await self.notifications.stop_listening(names.channel, queue)

    async def close(self) -> None:
        for task in (self._prober, self.notifications.reader):
            if task is not None:
                task.cancel()
        if self.notifications.pubsub is not None:
            await close_quietly(self.notifications.pubsub)
        if self._client is not None:
            await close_quietly(self._client)


def _new_client(url: str, timeout: float, cluster: bool) -> Any:
    """redis-py's asyncio client: no retries of its own (the breaker decides), and every
    socket operation bounded by the call timeout."""
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if cluster:
        return redis.asyncio.RedisCluster.from_url(url, **options)
    return redis.asyncio.from_url(url, health_check_interval=0, **options)


def _without_password(url: str) -> str:
    scheme, separator, rest = url.partition("://")
    if "@" in rest.split("/", 1)[0]:
        rest = "***@" + rest.partition("@")[2]
    return scheme + separator + rest


def check_url(url: str) -> str | None:
    """Why ``url`` cannot name a store, or None when it can."""
    if url.startswith(("redis://", "rediss://")):
        return None
    if url.startswith("unix://") and len(url) > len("unix://"):
        return None
    return "must be redis://HOST:PORT/DB, rediss://HOST:PORT/DB or unix://PATH"


_tier: FleetTier | None = None


def install(tier: FleetTier | None) -> None:
    global _tier
    _tier = tier


def current() -> FleetTier | None:
    return _tier


def counters() -> dict[str, int]:
    """The fleet tier's counters for the scoreboard (zeros when there is none)."""
    return (_tier.stats if _tier is not None else FleetStats()).as_dict()
