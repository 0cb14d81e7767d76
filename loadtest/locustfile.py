"""Locust scenarios against forkloop's demo app: one user class per scenario.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 HelloUser
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --tags cached stampede

`forkloop loadtest` runs these for you, one scenario at a time against each
backend, and writes a report; this file is also an ordinary locustfile that
locust's web UI or a distributed run can use as it is.

Every scenario is a `FastHttpUser` (geventhttpclient: a fraction of the CPU
of the ``requests``-based `HttpUser`, which matters when the load generator
and the server share two cores). Each is selected by its user class
(``<Scenario>User``) or by its tag (the scenario's name):

hello     keep-alive GETs of ``/``; the body must be ``Hello, World!``.
cached    GETs of ``/cached/{key}`` with keys drawn from a Zipf distribution
          (``--zipf-keys`` keys, exponent ``--zipf-exponent``): a few hot keys
          answered from the cache, a long tail of cold ones that cost the
          server ``--compute-ms`` each. The body must be ``value of {key}``
          and ``X-Cache`` one of HIT, MISS, STALE, UPDATING, BYPASS.
stampede  bursts: every ``--stampede-every`` seconds of wall-clock time, every
          user (in every locust process, on every machine whose clock is
          synchronised) asks for the same cold key at the same instant. The
          key is named after the burst's time slot, so it is cold whatever ran
          before; the server's single-flight cache should compute it once
          (``--stampede-ms``) and count the rest as *coalesced*: once per
          worker that the burst reaches, or once for the whole server when
          it runs ``--shared-cache on`` (``forkloop loadtest --shared-cache on``).
cancel    GETs of ``/slow?ms=5000`` abandoned by the client after
          ``--abandon-after`` seconds: the client closes the connection, the
          server must cancel the handler (``/stats`` ``cancelled.disconnect``).
          A timeout is the expected outcome and counts as a success; an
          answer that arrives is a failure (the server did not wait).
upload    POSTs of ``/echo`` with bodies of mixed sizes (0 B to 256 KiB),
          half sent with ``Content-Length``, half chunked; the echo must be
          the same bytes.
churn     GETs of ``/`` with ``Connection: close``: a new TCP connection per
          request, so accept and close are on the measured path.

Every request uses ``catch_response``: a wrong body, header or status is a
failure with a sentence saying what was wrong, not only a non-2xx status.

Locust patches the standard library with gevent when it is imported. Nothing
that runs a server may import this module; `loadtest.runner` only shells out
to ``python -m locust``. The options below are locust command-line options
(they reach the workers of a distributed run with the master's spawn message),
read when a user starts, never at import time.
"""

from __future__ import annotations

import functools
import json
import random
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, cast

import gevent
from geventhttpclient.connectionpool import ConnectionPool
from geventhttpclient.header import Headers
from locust import FastHttpUser, events, tag, task
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment
from locust.runners import WorkerRunner

CACHE_STATES = frozenset({"HIT", "MISS", "STALE", "UPDATING", "BYPASS"})
HELLO = b"Hello, World!"
SLOW_MS = 5000  # far longer than any sensible --abandon-after
UPLOAD_SIZES = (0, 100, 4096, 65536, 262144)
UPLOAD_WEIGHTS = (2, 4, 3, 2, 1)
UPLOAD_BYTES = random.Random(20).randbytes(max(UPLOAD_SIZES))

# name: (default, help); read with option(environment, name)
OPTIONS = {
    "zipf_keys": (1000, "cached: distinct keys"),
    "zipf_exponent": (1.1, "cached: Zipf exponent s; the key of rank k has weight 1/k^s"),
    "compute_ms": (20, "cached: milliseconds the server computes on a miss"),
    "stampede_every": (1.0, "stampede: seconds between bursts, each on a new cold key"),
    "stampede_ms": (200, "stampede: milliseconds the server computes the cold key"),
    "abandon_after": (0.1, "cancel: seconds after which the client gives up on /slow"),
}


Handler = TypeVar("Handler", bound=Callable[..., None])


class Hook(Protocol):
    """A locust `EventHook` as typed here (locust leaves it unannotated): add_listener
    registers a handler and returns it unchanged."""

    def add_listener(self, handler: Handler) -> Handler: ...


def listener(hook: Hook) -> Callable[[Handler], Handler]:
    """``@listener(events.x)``: ``@events.x.add_listener``, with the handler's types kept."""
    return hook.add_listener


class CaughtResponse(Protocol):
    """What the scenarios use of locust's `ResponseContextManager` (``catch_response=True``).

    Locust leaves its success() and failure() unannotated, and does not declare
    ``error``: the exception it sets on a response whose request failed (status 0).
    """

    @property
    def status_code(self) -> int: ...  # 0: no response
    @property
    def content(self) -> bytes: ...
    @property
    def headers(self) -> Headers | None: ...
    @property
    def error(self) -> Exception | None: ...
    def success(self) -> None: ...
    def failure(self, exc: str | Exception) -> None: ...


@listener(events.init_command_line_parser)
def add_scenario_options(parser: LocustArgumentParser) -> None:
    for name, (default, help_text) in OPTIONS.items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=type(default),
            default=default,
            help=f"{help_text} (default %(default)s)",
        )


def option(environment: Environment, name: str) -> Any:
    """A scenario option as given to locust, or its default when run without locust's parser."""
    default = OPTIONS[name][0]
    return getattr(environment.parsed_options, name, default)


def _set_no_delay(self: ConnectionPool, sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# geventhttpclient leaves Nagle's algorithm on. A chunked upload is then written
# as a head and small chunks, the last of which waits for the server's delayed
# ACK: 40 ms added to every chunked request, a cost of the load generator, not of
# the server. curl, browsers and asyncio set TCP_NODELAY; so does this process,
# by patching the hook every pool calls on a new connection (mypy flags any
# assignment to a method; this one is meant, and its signature is checked).
ConnectionPool.after_connect = _set_no_delay  # type: ignore[method-assign]


@listener(events.init)
def save_final_failures_at_exit(environment: Environment, **kwargs: object) -> None:
    """``--json-file NAME``: also the failures as they stand at the end, in NAME_failures.json.

    Locust's JSON file holds no failures, and it writes ``_failures.csv`` once
    a second but not at exit, so the CSV misses the last second's.
    `loadtest.runner` reads this file. Only the process that holds the run's
    totals writes it: a standalone locust or the master, not its workers.
    """

    @listener(environment.events.quit)
    def save_final_failures(**kwargs: object) -> None:
        json_file = getattr(environment.parsed_options, "json_file", None)
        if not json_file or isinstance(environment.runner, WorkerRunner):
            return
        assert environment.runner is not None  # made before the init event that added this
        failures = list(environment.runner.stats.serialize_errors().values())
        with open(f"{json_file}_failures.json", "w") as handle:
            json.dump(failures, handle, indent=1)


def judge(response: CaughtResponse, problem: str | None) -> None:
    """Record the response as a failure saying ``problem``, or as a success if there is none."""
    if problem is None:
        response.success()
    else:
        response.failure(problem)


def unexpected(response: CaughtResponse, body: bytes | None, status: int = 200) -> str | None:
    """What is wrong with ``response`` as a sentence, or None if it has ``status`` and ``body``."""
    if not response.status_code:
        return f"no response: {response.error!r}"
    if response.status_code != status:
        return f"status {response.status_code}, expected {status}"
    if body is not None and response.content != body:
        return f"body {response.content[:60]!r} ({len(response.content or b'')} bytes), expected {body[:60]!r} ({len(body)} bytes)"
    return None


@functools.lru_cache(maxsize=8)
def zipf_cumulative_weights(keys: int, exponent: float) -> list[float]:
    """Cumulative weights of ranks 1..keys under Zipf's law, for `random.choices`."""
    total, cumulative = 0.0, []
    for rank in range(1, keys + 1):
        total += 1.0 / rank**exponent
        cumulative.append(total)
    return cumulative


class HelloUser(FastHttpUser):
    """Keep-alive GETs of ``/``: the cheapest request the server answers."""

    @tag("hello")
    @task
    def hello(self) -> None:
        with self.client.get("/", name="/", catch_response=True) as response:
            judge(response, unexpected(response, HELLO))


class CachedUser(FastHttpUser):
    """GETs of ``/cached/{key}``, keys from a Zipf distribution: hot keys hit, cold keys miss."""

    @tag("cached")
    @task
    def cached(self) -> None:
        weights = zipf_cumulative_weights(
            option(self.environment, "zipf_keys"), option(self.environment, "zipf_exponent")
        )
        rank = random.choices(range(1, len(weights) + 1), cum_weights=weights)[0]
        key = f"z{rank}"
        path = f"/cached/{key}?ms={option(self.environment, 'compute_ms')}"
        with self.client.get(path, name="/cached/[zipf key]", catch_response=True) as response:
            judge(response, cache_problem(response, key))


def cache_problem(response: CaughtResponse, key: str) -> str | None:
    problem = unexpected(response, f"value of {key}\n".encode())
    if problem is not None:
        return problem
    assert response.headers is not None  # a response came: unexpected() found its status
    state = response.headers.get("X-Cache")
    if state not in CACHE_STATES:
        return f"X-Cache {state!r}, expected one of {', '.join(sorted(CACHE_STATES))}"
    return None


class StampedeUser(FastHttpUser):
    """Every user asks for the same cold key at the same instant, once per time slot."""

    def on_start(self) -> None:
        gevent.sleep(self.wait_time())  # the first burst is synchronised too

    def wait_time(self) -> float:
        every: float = option(self.environment, "stampede_every")
        return every - time.time() % every

    @tag("stampede")
    @task
    def stampede(self) -> None:
        # woken at a slot boundary, give or take a few ms either way: round to it
        slot = round(time.time() / option(self.environment, "stampede_every"))
        key = f"stampede-{slot}"
        path = f"/cached/{key}?ms={option(self.environment, 'stampede_ms')}"
        with self.client.get(path, name="/cached/[stampede key]", catch_response=True) as response:
            judge(response, cache_problem(response, key))


class CancelUser(FastHttpUser):
    """GETs of a slow handler, abandoned by the client long before the answer."""

    def __init__(self, environment: Environment) -> None:
        self.network_timeout = option(environment, "abandon_after")
        super().__init__(environment)

    @tag("cancel")
    @task
    def cancel(self) -> None:
        path = f"/slow?ms={SLOW_MS}"
        with self.client.get(path, name="/slow (abandoned)", catch_response=True) as response:
            # only a failed request has .error; under RetriesExceeded the cause is .original
            failed = getattr(response, "error", None)
            error = getattr(failed, "original", failed)
            if isinstance(error, TimeoutError | gevent.Timeout):
                response.success()  # the client gave up, as this scenario means it to
            elif response.status_code:
                response.failure(
                    f"status {response.status_code} before the client's timeout of "
                    f"{self.network_timeout} s: the server did not wait {SLOW_MS} ms"
                )
            else:
                response.failure(f"no response, and not a timeout: {failed!r}")


class UploadUser(FastHttpUser):
    """POSTs of ``/echo``: mixed body sizes, with Content-Length or chunked."""

    @tag("upload")
    @task
    def upload(self) -> None:
        size = random.choices(UPLOAD_SIZES, weights=UPLOAD_WEIGHTS)[0]
        body = UPLOAD_BYTES[:size]
        headers = {"Content-Type": "application/octet-stream"}
        if random.random() < 0.5:
            headers["Transfer-Encoding"] = "chunked"  # geventhttpclient then frames it in chunks
            name = "/echo (chunked)"
        else:
            name = "/echo (Content-Length)"
        with self.client.post(
            "/echo",
            # bytes: "String/bytes" says locust's docstring; its annotation leaves bytes out
            data=cast(Any, body),
            headers=headers,
            name=name,
            catch_response=True,
        ) as response:
            judge(response, unexpected(response, body))


class ChurnUser(FastHttpUser):
    """GETs of ``/`` on a new connection each: ``Connection: close`` both ways."""

    @tag("churn")
    @task
    def churn(self) -> None:
        with self.client.get(
            "/", headers={"Connection": "close"}, name="/ (new connection)", catch_response=True
        ) as response:
            problem = unexpected(response, HELLO)
            if problem is None and response.headers.get("Connection", "").lower() != "close":
                problem = "the server kept the connection open after Connection: close"
            judge(response, problem)
