"""Instant answers: a fresh cache hit answered from the parser, before it is a request.

A request goes a long way through the server before its answer is written:
a `Request` is built from the parser's pieces, queued, dispatched, routed,
handed to a handler, and its `Response` framed by the `ResponseWriter`. For
most requests each step has work to do. For a fresh hit in the response cache
none has: the answer is known byte for byte as soon as the request line is,
and the trip costs several times what parsing the request and writing the
answer cost. So the cache keeps, for each request target it has answered with
a fresh entry, the whole answer ready to write (status line, Date, Server,
the entry's header lines, ``X-Cache: HIT``, ``Age``, Content-Length and the
body), and the connection's reader asks for it when a request completes
(`server.parsing`): a hit is then answered from the parser callback, with no
`Request`, no task and no routing: a hit costs about a fifth less this way
(README, `forkloop bench --proxy`).

Which requests: a GET or HEAD whose target was answered before by a fresh hit
of the same method, in HTTP/1.1 with keep-alive, with no body, no framing
header, no Expect and no Upgrade, that nothing is queued or running ahead of
on its connection, on a connection that stays open after it (not draining,
not at its last keep-alive request). Everything else takes the usual way,
which gives the same answer.

What stays true
---------------
1. The answer is the one the usual way would give: the entry must still be
   the one stored for its URL (not replaced, evicted, purged here or, through
   the purge board, in another worker) and still fresh; the entry has no
   ``Vary`` (the request's headers do not matter) and its route no XFetch
   (a hit may not start a refresh). Otherwise the record is dropped.
2. Order: only when nothing is ahead of the request on its connection.
3. Counting: the request, its response by status, the cache hit, and the
   metrics by method and status (latency: none to speak of) are counted as
   for any request. Access log *lines* need the request's fields, so with an
   access log the reader never asks: `--no-access-log` turns instant answers
   on (as nginx's bench config turns its log off).
4. Date and Age: the ready bytes are rebuilt when the connection's
   Date/Server prefix changes, once a second; Age is counted then.

Known requests: a hit not even parsed
-------------------------------------
What the parser makes of a request depends on nothing but the request's bytes
and the parser's state, and between two requests that state is always the
same. So when one read held exactly one request, from a message boundary to
the next, and it was answered instantly, the connection's context remembers
those bytes with the request's target and method (`remember`). A later read
of the very same bytes, on any connection, at a message boundary, is that
request again: it is answered without going through the parser at all
(`HttpConnection.data_received`). All that depends on more than the bytes is
checked each time as on the parsed way: the connection's state (nothing
ahead, the client reading, not its last keep-alive request, not draining)
and the entry (still the one stored, still fresh); if any says no, the read
is parsed. An HTTP client on a keep-alive connection sends the same bytes
each time it asks for the same thing (a poller, a health check, a browser's
refetch, a load generator); any other read from a message boundary costs a
dictionary lookup on its bytes. A request over ``MAX_KNOWN_BYTES`` is always
parsed; the table holds at most ``MAX_KNOWN`` (it is cleared when full), so
at most 8 MiB of request bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import purges

if TYPE_CHECKING:
    from .cache import CacheStats
    from .freshness import Entry

MAX_READY = 4096  # targets kept ready (the table is cleared when full)
MAX_KNOWN = 4096  # known requests kept (the table is cleared when full)
MAX_KNOWN_BYTES = 2048  # longer requests are parsed every time
_NO_BODY_STATUSES = frozenset({204, 304})


class Ready:
    """One target's ready answers (``get``, ``head``: whole, as bytes), for the
    entry they were built from."""

    __slots__ = ("url", "entry", "status", "methods", "checked", "prefix", "get", "head", "large")

    def __init__(self, url: str, entry: Entry) -> None:
        self.url = url
        self.entry = entry
        self.status = entry.status
        self.methods: set[bytes] = set()
        self.checked = -1  # the cache's change count when the entry was last found stored
        self.prefix = b""  # the Date/Server prefix the bytes were built with
        self.get = b""
        self.head = b""
        self.large = len(entry.body) > 8192  # written at once, as respond() does


class InstantAnswers:
    """A cache's ready answers by request target; see the module's docstring.

    The cache counts its changes (a store, an eviction, a purge, a key turned
    hit-for-miss) in ``changes``; a ready answer asks the cache whether its entry
    is still stored only when that count has moved since it last asked."""

    def __init__(
        self,
        holds: Callable[[str, Entry], bool],
        stats: CacheStats,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.holds = holds  # is this entry still the one stored for this URL?
        self.stats = stats
        self.clock = clock
        self.enabled = False  # set by the service that asks (no access log lines)
        self.changes = 0
        self._ready: dict[bytes, Ready] = {}

    def offer(self, target: bytes, method: str, url: str, entry: Entry) -> None:
        """``target`` was just answered with a fresh hit on ``entry``: keep it ready."""
        if entry.status in _NO_BODY_STATUSES:
            return
        ready = self._ready.get(target)
        if ready is None or ready.entry is not entry:
            if len(self._ready) >= MAX_READY:
                self._ready.clear()
            ready = self._ready[target] = Ready(url, entry)
        ready.methods.add(method.encode())

    def answer(self, target: bytes, method: bytes, prefix: bytes) -> Ready | None:
        """The ready answer to ``method target`` (its bytes built with the
        connection's Date/Server ``prefix``); None to take the usual way."""
        ready = self._ready.get(target)
        if ready is None or method not in ready.methods:
            return None
        entry = ready.entry
        now = self.clock()
        board = purges.BOARD
        if (
            now >= entry.fresh_until
            or (ready.checked != self.changes and not self._still_held(ready))
            or (board is not None and board.times[hash(ready.url) & board.mask] >= entry.stored_at)
        ):
            del self._ready[target]
            return None
        if ready.prefix is not prefix:
            _build(ready, prefix, now)
        self.stats.hits += 1
        return ready

    def _still_held(self, ready: Ready) -> bool:
        if not self.holds(ready.url, ready.entry):
            return False
        ready.checked = self.changes
        return True

    def forget(self) -> None:
        self._ready.clear()


def remember(
    known: dict[bytes, tuple[bytes, bytes]], data: bytes, request: tuple[bytes, bytes]
) -> None:
    """``data`` is one whole request, ``request`` its target and method, answered
    instantly: a known request from now on."""
    if len(known) >= MAX_KNOWN:
        known.clear()
    known[data] = request


def _build(ready: Ready, prefix: bytes, now: float) -> None:
    """The answer's bytes as `ResponseWriter.respond` frames a hit (HTTP/1.1, kept open)."""
    from .http import STATUS_LINES, status_line

    entry = ready.entry
    status = entry.status
    head = b"%s%s%sX-Cache: HIT\r\nAge: %d\r\nContent-Length: %d\r\n\r\n" % (
        STATUS_LINES.get(status) or status_line(status),
        prefix,
        entry.header_block,
        now - entry.stored_at,
        len(entry.body),
    )
    ready.prefix = prefix
    ready.head = head
    ready.get = head + entry.body
