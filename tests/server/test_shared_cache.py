"""The shared cache tier: one fill per key for the whole server, across pre-forked workers.

Real processes: a master with 4 workers and its cache process (``--shared-cache
on``), real signals (``kill -9`` of the filling worker, of the cache process,
SIGSTOP), and a stampede of concurrent cold requests spread by the kernel over
every worker. Fills are counted by the test app (`tests.server.apps.fills`),
which appends a line per computation to a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import re
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import pytest

from forkloop.server.cache import CachePolicy, ResponseCache
from forkloop.server.cache_process import SharedStore
from forkloop.server.cache_process import _Connection as CacheConnection
from forkloop.server.http import Request, Response
from forkloop.server.shared_cache import (
    ALONE_ANSWER,
    COUNT,
    FAILED,
    FILL,
    HIT,
    WAIT,
    WAITERS,
    SharedTier,
)
from tests.server.master_support import MasterUnderTest, alive, wait_for

pytestmark = pytest.mark.timeout(120)

WORKERS = 4


class SharedCacheServer(MasterUnderTest):
    def __init__(self, backend: str, tmp_path: Path, *options: str, workers: int = WORKERS) -> None:
        self.fills_path = tmp_path / "fills"
        self.fills_path.touch()
        super().__init__(
            backend,
            tmp_path,
            "--workers",
            str(workers),
            "--shared-cache",
            "on",
            "--no-access-log",
            *options,
            app="tests.server.apps.fills:app",
            env={"FORKLOOP_TEST_FILLS": str(self.fills_path)},
        )

    def cache_processes(self) -> list[int]:
        """Every cache process the master started, in order (from its log lines)."""
        return [int(pid) for pid in re.findall(r"cache process (\d+) serving", self.full_log())]

    def full_log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def http_workers(self) -> set[int]:
        return self.workers() - set(self.cache_processes())

    def fills(self, key: str) -> list[int]:
        """The pids that computed ``key``, in order."""
        lines = self.fills_path.read_text().splitlines()
        return [int(pid) for pid, _, k in (line.partition(" ") for line in lines) if k == key]


@pytest.fixture
def server(tmp_path):
    servers: list[SharedCacheServer] = []

    def start(backend: str, *options: str, workers: int = WORKERS) -> SharedCacheServer:
        started = SharedCacheServer(backend, tmp_path, *options, workers=workers)
        servers.append(started)
        started.start()
        assert wait_for(lambda: len(started.http_workers()) == workers, 10), started.tail()
        return started

    yield start
    for started in servers:
        started.stop()


async def _one(port: int, path: str) -> tuple[int, str]:
    """(status, X-Cache) of one GET on a connection of its own; (0, error) if it failed."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        return 0, f"connect: {exc}"
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        answer = await reader.read()
    except OSError as exc:
        return 0, f"read: {exc}"
    finally:
        writer.close()
    if not answer.startswith(b"HTTP/1.1 "):
        return 0, f"no answer ({answer[:40]!r})"
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1")
    found = re.search(r"(?im)^x-cache: *(\w+)", head)
    return int(head[9:12]), found.group(1) if found else ""


def stampede(port: int, path: str, count: int, timeout: float = 30) -> list[tuple[int, str]]:
    async def run() -> list[tuple[int, str]]:
        async with asyncio.timeout(timeout):
            return list(await asyncio.gather(*(_one(port, path) for _ in range(count))))

    return asyncio.run(run())


def test_a_stampede_over_every_worker_computes_once(server, backend):
    master = server(backend.backend)
    answers = stampede(master.port, "/fill/cold?ms=200", 1000)
    assert [a for a in answers if a[0] != 200] == []
    statuses = [cache for _, cache in answers]
    assert statuses.count("MISS") == 1, sorted(set(statuses))
    assert statuses.count("HIT") == 999
    assert len(master.fills("cold")) == 1

    # server-wide figures: once every worker has published its counters, one computation,
    # and the other workers' waits counted
    def totals() -> dict:
        return json.loads(master.get("/stats")[1])["server"]

    assert wait_for(lambda: totals()["cache_hits"] + totals()["cache_misses"] >= 1000, 5)
    server_wide = totals()
    assert server_wide["cache_computations"] == 1
    assert server_wide["cache_shared_coalesced"] >= 1  # other workers waited for the fill
    assert server_wide["cache_fallbacks"] == 0


def test_a_value_filled_by_one_worker_is_a_hit_in_every_other(server):
    master = server("asyncio")
    assert stampede(master.port, "/fill/once?ms=10", 1) == [(200, "MISS")]
    answers = stampede(master.port, "/fill/once?ms=10", 200)
    assert {a for a in answers} == {(200, "HIT")}
    assert len(master.fills("once")) == 1


def test_a_stale_entry_is_refreshed_once_for_the_whole_server(server):
    master = server("asyncio")
    answers = stampede(master.port, "/swr/stale?ms=200", 400)
    assert {status for status, _ in answers} == {200}
    assert len(master.fills("stale")) == 1
    # max-age=1: once a request is answered STALE, the entry is stale in every worker
    assert wait_for(
        lambda: stampede(master.port, "/swr/stale?ms=200", 1)[0][1] in ("STALE", "UPDATING"),
        5,
        interval=0.1,
    )
    answers = stampede(master.port, "/swr/stale?ms=200", 1000)
    assert {status for status, _ in answers} == {200}
    assert {cache for _, cache in answers} <= {"STALE", "UPDATING", "HIT"}
    assert wait_for(lambda: len(master.fills("stale")) == 2, 5)
    # refreshed everywhere now: every worker's hits are fresh, and nothing refreshes again
    assert wait_for(
        lambda: {c for _, c in stampede(master.port, "/swr/stale?ms=200", 200)} == {"HIT"}, 5
    )
    assert len(master.fills("stale")) == 2


@pytest.mark.parametrize(("query", "status"), [("", 503), ("&raise=1", 500)])
def test_a_failing_fill_gives_its_error_to_every_waiter_and_runs_once(server, query, status):
    master = server("asyncio")
    answers = stampede(master.port, f"/broken/down?ms=200{query}", 400)
    assert {code for code, _ in answers} == {status}
    assert len(master.fills("down")) == 1  # a failing origin is not stampeded either
    # nothing was stored: the next request tries again
    assert stampede(master.port, f"/broken/down?ms=10{query}", 1)[0][0] == status
    assert len(master.fills("down")) == 2


def test_killing_the_filling_worker_hands_the_fill_over_at_once(server):
    master = server("asyncio")
    results: list[list[tuple[int, str]]] = []
    thread = threading.Thread(
        target=lambda: results.append(stampede(master.port, "/fill/victim?ms=3000", 200))
    )
    thread.start()
    assert wait_for(lambda: len(master.fills("victim")) == 1, 10)
    victim = master.fills("victim")[0]
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    # a waiting worker takes the fill over: no lock age to wait out
    assert wait_for(lambda: len(master.fills("victim")) == 2, 2), master.tail()
    assert time.monotonic() - killed < 1.0
    thread.join(30)
    answers = results[0]
    assert master.fills("victim")[1] != victim
    # only the connections the killed worker held go unanswered (the kernel spreads
    # accepts unevenly: that may be most of them); every other request gets its 200,
    # filled by the worker that took over
    failed = [a for a in answers if a[0] != 200]
    assert all(status == 0 for status, _ in failed), failed[:5]
    served = [cache for status, cache in answers if status == 200]
    assert served and served.count("MISS") == 1, served
    assert len(master.fills("victim")) == 2


def test_killing_the_cache_process_fails_no_request_and_it_comes_back(server):
    master = server("asyncio")
    first = master.cache_processes()[0]
    os.kill(first, signal.SIGKILL)
    answers = stampede(master.port, "/fill/during?ms=100", 200)
    assert {status for status, _ in answers} == {200}
    assert wait_for(lambda: len(master.cache_processes()) == 2, 5), master.tail()
    assert alive(master.cache_processes()[1])
    assert "shared cache unavailable" in master.full_log()
    # back: workers reconnect, and a stampede computes once again
    keys = iter(range(100))

    def one_fill_for_a_fresh_key() -> bool:
        key = f"after{next(keys)}"
        stampede(master.port, f"/fill/{key}?ms=100", 100)
        return len(master.fills(key)) == 1

    assert wait_for(one_fill_for_a_fresh_key, 10, interval=0.1), master.tail()


def test_a_stopped_cache_process_fails_no_request_and_is_replaced(server):
    master = server("asyncio")
    cache_pid = master.cache_processes()[0]
    os.kill(cache_pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        answers = stampede(master.port, "/fill/hung?ms=100", 100)
        assert {status for status, _ in answers} == {200}
        assert time.monotonic() - started < 10
        # the master sees the missed heartbeat, kills it and starts another
        assert wait_for(lambda: len(master.cache_processes()) == 2, 10), master.tail()
        assert "missed its heartbeat" in master.full_log()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(cache_pid, signal.SIGCONT)
    keys = iter(range(100))

    def one_fill_for_a_fresh_key() -> bool:
        key = f"resumed{next(keys)}"
        stampede(master.port, f"/fill/{key}?ms=100", 100)
        return len(master.fills(key)) == 1

    assert wait_for(one_fill_for_a_fresh_key, 10, interval=0.1), master.tail()


def test_reload_keeps_the_shared_entries(server):
    master = server("asyncio")
    assert stampede(master.port, "/fill/kept?ms=10", 1) == [(200, "MISS")]
    old = master.http_workers()
    master.signal(signal.SIGHUP)
    assert wait_for(
        lambda: master.http_workers().isdisjoint(old) and len(master.http_workers()) == WORKERS,
        15,
    ), master.tail()
    # new workers, empty local caches: the entry comes from the shared tier
    answers = stampede(master.port, "/fill/kept?ms=10", 50)
    assert {a for a in answers} == {(200, "HIT")}
    assert len(master.fills("kept")) == 1
    assert len(master.cache_processes()) == 1


def test_quit_stops_the_cache_process_and_removes_its_socket(server):
    master = server("asyncio")
    assert stampede(master.port, "/fill/last?ms=10", 10)[0][0] == 200
    cache_pid = master.cache_processes()[0]
    found = re.search(r"serving the shared cache on (\S+)", master.full_log())
    assert found is not None and os.path.exists(found.group(1))
    master.signal(signal.SIGQUIT)
    assert master.process is not None
    assert master.process.wait(15) == 0, master.tail()
    assert not alive(cache_pid)
    assert f"cache process {cache_pid} stopped" in master.full_log()
    assert not os.path.exists(os.path.dirname(found.group(1)))


# ---------------------------------------------------------------------- the store, in-process


class RecordingConnection:
    """Records the answers the store sends; the holder's waiter counts apart."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, int, bytes]] = []
        self.waiter_counts: list[int] = []

    def send(self, operation: int, request_id: int, payload: bytes = b"") -> None:
        if operation == WAITERS:
            self.waiter_counts.append(COUNT.unpack(payload)[0])
        else:
            self.sent.append((operation, request_id, payload))


def _blob(fresh_until: float, size: int = 10) -> bytes:
    import struct

    return struct.pack("!d", fresh_until) + b"x" * size


def test_store_grants_one_lease_and_pushes_the_entry_to_every_waiter():
    store = SharedStore(1 << 20)
    a, b, c = RecordingConnection(), RecordingConnection(), RecordingConnection()
    store.get(a, 1, b"k")  # type: ignore[arg-type]
    store.get(b, 7, b"k")  # type: ignore[arg-type]
    store.get(c, 9, b"k")  # type: ignore[arg-type]
    assert a.sent == [(FILL, 1, b"")]
    assert b.sent == [(WAIT, 7, b"")] and c.sent == [(WAIT, 9, b"")]
    blob = _blob(time.monotonic() + 60)
    store.store(a, 1, b"k", blob)  # type: ignore[arg-type]
    assert b.sent[-1] == (HIT, 7, blob) and c.sent[-1] == (HIT, 9, blob)
    store.get(c, 10, b"k")  # type: ignore[arg-type]
    assert c.sent[-1] == (HIT, 10, blob)


def test_store_passes_the_lease_of_a_closed_connection_to_the_first_waiter():
    store = SharedStore(1 << 20)
    a, b, c = RecordingConnection(), RecordingConnection(), RecordingConnection()
    for connection, request_id in ((a, 1), (b, 2), (c, 3)):
        store.get(connection, request_id, b"k")  # type: ignore[arg-type]
    store.forget_connection(a)  # type: ignore[arg-type]
    assert b.sent[-1] == (FILL, 2, b"")
    store.fail(b, 2, b"k")  # type: ignore[arg-type]
    assert c.sent[-1] == (ALONE_ANSWER, 3, b"")
    assert store.flights == {}


def test_store_pushes_a_failed_fill_to_every_waiter_and_keeps_nothing():
    store = SharedStore(1 << 20)
    a, b = RecordingConnection(), RecordingConnection()
    store.get(a, 1, b"k")  # type: ignore[arg-type]
    store.get(b, 2, b"k")  # type: ignore[arg-type]
    failure = _blob(time.monotonic())
    store.error(a, 1, b"k", failure)  # type: ignore[arg-type]
    assert b.sent[-1] == (FAILED, 2, failure)
    assert store.flights == {} and store.entries == OrderedDict()
    store.get(b, 3, b"k")  # type: ignore[arg-type]
    assert b.sent[-1] == (FILL, 3, b"")  # the next ask fills anew


def test_store_forgets_a_fill_when_every_waiter_has_left():
    store = SharedStore(1 << 20)
    a, b = RecordingConnection(), RecordingConnection()
    store.get(a, 1, b"k")  # type: ignore[arg-type]
    store.get(b, 2, b"k")  # type: ignore[arg-type]
    store.release(b, 2, b"k")  # type: ignore[arg-type]
    assert a.waiter_counts == [1, 0]  # the holder knows nobody else waits now
    store.release(a, 1, b"k")  # type: ignore[arg-type]
    assert store.flights == {}
    assert b.sent == [(WAIT, 2, b"")]


def test_store_stays_within_its_byte_bound_under_a_flood_of_distinct_keys():
    store = SharedStore(100_000)
    writer = RecordingConnection()
    for number in range(5_000):
        key = f"key{number}".encode()
        store.get(writer, number, key)  # type: ignore[arg-type]
        store.store(writer, number, key, _blob(time.monotonic() + 60, 1000))  # type: ignore[arg-type]
        assert store.size <= 100_000
    assert store.stats.evictions > 4_000
    assert store.flights == {}


# ------------------------------------------- two workers' caches and a cache process, in-process


class Fill:
    """A handler that counts its starts, ends and cancellations, and ends when told."""

    def __init__(self, vary: bool = False) -> None:
        self.started = 0
        self.finished = 0
        self.cancelled = 0
        self.release = asyncio.Event()
        self.vary = vary

    async def __call__(self, request: Request) -> Response:
        self.started += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.finished += 1
        if self.vary:
            language = request.headers.get("accept-language", "none")
            return Response(
                f"value in {language}\n",
                headers={"Cache-Control": "max-age=60", "Vary": "Accept-Language"},
            )
        return Response("value\n", headers={"Cache-Control": "max-age=60"})


async def two_workers(tmp_path: Path) -> tuple[ResponseCache, ResponseCache, SharedStore, object]:
    """Two workers' caches, each with its own connection to one cache process's store."""
    store = SharedStore(1 << 20)
    path = str(tmp_path / "cache.sock")
    server = await asyncio.get_running_loop().create_unix_server(
        lambda: CacheConnection(store), path
    )
    caches = []
    for _ in range(2):
        tier = SharedTier(path, 1 << 16)
        assert await tier.connect()
        caches.append(ResponseCache(shared_tier=lambda tier=tier: tier))
    return caches[0], caches[1], store, server


def get(cache: ResponseCache, handler: Fill, language: str | None = None) -> asyncio.Task[Response]:
    async def serve() -> Response:
        answer = cache.serve(make_request("/k", language), handler, CachePolicy(ttl=60))
        return await answer if inspect.isawaitable(answer) else answer

    return asyncio.get_running_loop().create_task(serve())


def make_request(target: str, language: str | None = None) -> Request:
    headers = [] if language is None else [(b"accept-language", language.encode())]
    return Request("GET", target.encode(), "1.1", headers, ("127.0.0.1", 1), True)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


def test_the_filler_whose_requests_left_finishes_for_the_waiters_in_another_worker(tmp_path):
    async def scenario() -> None:
        first, second, store, server = await two_workers(tmp_path)
        handler = Fill()
        filler = get(first, handler)
        await until(lambda: handler.started == 1)
        waiter = get(second, handler)
        await until(lambda: any(f.waiters for f in store.flights.values()))
        filler.cancel()  # the filling worker's only request leaves
        await asyncio.sleep(0)
        handler.release.set()
        answer = await asyncio.wait_for(waiter, 5)
        assert answer.status == 200 and answer.header("x-cache") == "HIT"
        assert (handler.started, handler.finished, handler.cancelled) == (1, 1, 0)
        assert first.stats.computations == 1 and second.stats.computations == 0
        server.close()

    asyncio.run(scenario())


def test_a_fill_is_cancelled_when_every_waiter_in_every_worker_has_left(tmp_path):
    async def scenario() -> None:
        first, second, store, server = await two_workers(tmp_path)
        handler = Fill()
        filler = get(first, handler)
        await until(lambda: handler.started == 1)
        waiter = get(second, handler)
        await until(lambda: any(f.waiters for f in store.flights.values()))
        filler.cancel()
        await asyncio.sleep(0.05)
        assert handler.cancelled == 0  # a worker still waits: the fill runs on
        waiter.cancel()
        await until(lambda: handler.cancelled == 1)
        await until(lambda: not store.flights)
        assert handler.finished == 0
        server.close()

    asyncio.run(scenario())


def test_a_variant_filled_by_one_worker_is_a_hit_in_another_and_other_variants_compute(
    tmp_path,
):
    async def scenario() -> None:
        first, second, store, server = await two_workers(tmp_path)
        handler = Fill(vary=True)
        handler.release.set()
        english = await asyncio.wait_for(get(first, handler, "en"), 5)
        assert english.header("x-cache") == "MISS" and english.body == b"value in en\n"
        again = await asyncio.wait_for(get(second, handler, "en"), 5)
        assert again.header("x-cache") == "HIT" and again.body == b"value in en\n"
        assert second.stats.computations == 0 and second.stats.shared_hits == 1
        french = await asyncio.wait_for(get(second, handler, "fr"), 5)
        assert french.header("x-cache") == "MISS" and french.body == b"value in fr\n"
        assert handler.started == 2
        # and the French variant is now a hit in the first worker too
        back = await asyncio.wait_for(get(first, handler, "fr"), 5)
        assert back.body == b"value in fr\n" and back.header("x-cache") == "HIT"
        assert first.stats.computations == 1
        server.close()

    asyncio.run(scenario())


def test_an_uncacheable_answer_is_remembered_for_every_worker(tmp_path):
    async def scenario() -> None:
        first, second, store, server = await two_workers(tmp_path)
        calls = 0

        async def private(request: Request) -> Response:
            nonlocal calls
            calls += 1
            return Response(f"yours {calls}\n", headers={"Cache-Control": "private"})

        def ask(cache: ResponseCache) -> asyncio.Task[Response]:
            async def serve() -> Response:
                answer = cache.serve(make_request("/me"), private, CachePolicy(ttl=60))
                return await answer if inspect.isawaitable(answer) else answer

            return asyncio.get_running_loop().create_task(serve())

        assert (await asyncio.wait_for(ask(first), 5)).header("x-cache") == "MISS"
        await until(lambda: b"/me" in store.entries)  # the hit-for-miss marker
        # another worker computes for itself, with no lease, and remembers it
        answer = await asyncio.wait_for(ask(second), 5)
        assert answer.body == b"yours 2\n"
        assert second.stats.shared_hits == 0 and not store.flights
        again = await asyncio.wait_for(ask(second), 5)
        assert again.header("x-cache") == "BYPASS" and again.body == b"yours 3\n"
        server.close()

    asyncio.run(scenario())


# ---------------------------------------------------------------------- binary upgrade (USR2)


def test_a_binary_upgrade_keeps_the_shared_entries(server):
    master = server("asyncio")
    assert stampede(master.port, "/fill/upgraded?ms=10", 1) == [(200, "MISS")]
    master.signal(signal.SIGUSR2)
    assert wait_for(lambda: master.full_log().count("ready:") == 2, 20), master.tail()
    new_master = int(re.findall(r"master (\d+) starting", master.full_log())[-1])
    try:
        assert "copied 1 entries from the old master's cache process" in master.full_log()
        master.signal(signal.SIGQUIT)
        assert master.process is not None
        assert master.process.wait(15) == 0, master.tail()
        # only the new master's workers are left, and they have never seen the key
        answers = stampede(master.port, "/fill/upgraded?ms=10", 50)
        assert {a for a in answers} == {(200, "HIT")}
        assert len(master.fills("upgraded")) == 1
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(new_master, signal.SIGTERM)
        assert wait_for(lambda: not alive(new_master), 15)


def test_a_new_cache_process_copies_the_old_ones_entries_and_then_each_new_one(tmp_path):
    from forkloop.server.cache_process import seed

    async def scenario() -> None:
        old = SharedStore(1 << 20)
        path = str(tmp_path / "old.sock")
        server = await asyncio.get_running_loop().create_unix_server(
            lambda: CacheConnection(old), path
        )
        fresh = _blob(time.monotonic() + 60)
        old.keep(b"first", fresh)
        old.keep(b"expired", _blob(time.monotonic() - 1))
        old.keep(b"second", fresh)
        new = SharedStore(1 << 20)
        await seed(new, path)
        assert list(new.entries) == [b"first", b"second"]  # fresh ones, in LRU order
        old.keep(b"later", fresh)  # filled by an old worker while both generations serve
        await until(lambda: b"later" in new.entries)
        assert new.stats.replicated == 3
        server.close()

    asyncio.run(scenario())


def test_a_new_cache_process_starts_cold_when_the_old_one_is_gone(tmp_path):
    from forkloop.server.cache_process import seed

    async def scenario() -> None:
        new = SharedStore(1 << 20)
        await asyncio.wait_for(seed(new, str(tmp_path / "nobody.sock")), 5)
        assert new.entries == OrderedDict()

    asyncio.run(scenario())


# ---------------------------------------------------------------------- /metrics


def test_metrics_show_the_shared_tier_from_the_workers_and_the_cache_process(server):
    from forkloop.loadtest.servers import free_port
    from tests.server.test_metrics import eventually, scrape, value

    metrics_port = free_port()
    master = server(
        "asyncio",
        "--metrics-bind",
        f"127.0.0.1:{metrics_port}",
        "--shared-cache-size",
        "1000000",
        workers=2,
    )
    assert {code for code, _ in stampede(master.port, "/fill/scraped?ms=200", 200)} == {200}

    # the kernel spreads connections over the two workers as it likes: ask until one
    # request was spared its computation by the other worker's fill, and one got the
    # error of the other worker's failing fill
    def spared(samples: dict) -> bool:
        return (
            value(samples, "forkloop_shared_cache_lookups_total", result="hit")
            + value(samples, "forkloop_shared_cache_lookups_total", result="coalesced")
            >= 1
        )

    keys = iter(range(1000))

    def one_of_each() -> bool:
        samples = scrape(metrics_port)
        if not spared(samples):
            stampede(master.port, "/fill/scraped?ms=200", 20)
        if value(samples, "forkloop_shared_cache_lookups_total", result="failed") < 1:
            stampede(master.port, f"/broken/scraped{next(keys)}?ms=100", 100)
            return False
        return spared(samples)

    assert wait_for(one_of_each, 30, interval=0.1), master.tail()
    # the cache process's figures are as of its last beat: settled once nothing is in flight
    samples = eventually(
        metrics_port,
        lambda s: (
            value(s, "forkloop_shared_cache_entries") == 1
            and value(s, "forkloop_shared_cache_leases") == 0
            and value(s, "forkloop_shared_cache_waiters") == 0
        ),
    )
    # counted on both sides: by the cache process that served the waiters, by the waiters
    assert value(samples, "forkloop_shared_cache_process_served_total") == value(
        samples, "forkloop_shared_cache_lookups_total", result="coalesced"
    )
    assert value(samples, "forkloop_shared_cache_up") == 1
    assert value(samples, "forkloop_shared_cache_limit_bytes") == 1_000_000
    assert 0 < value(samples, "forkloop_shared_cache_bytes") < 1_000_000
    assert value(samples, "forkloop_shared_cache_process_errors_total") >= 1
    for name in (
        "forkloop_shared_cache_worker_takeovers_total",
        "forkloop_shared_cache_fallbacks_total",
        "forkloop_shared_cache_process_takeovers_total",
        "forkloop_shared_cache_process_evictions_total",
    ):
        assert value(samples, name) == 0, name
