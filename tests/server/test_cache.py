"""The response cache: hits, single-flight misses, staleness, Vary, bounds; every backend.

Most tests drive `ResponseCache` directly on the backend's loop with a fake
clock, so time-based rules are exact and nothing sleeps; the stampede and the
disconnects go through real sockets.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import time

from forkloop.server.app import App
from forkloop.server.cache import CachePolicy, ResponseCache
from forkloop.server.http import Request, Response
from tests.server.support import RawClient, running_server


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def request(target: str = "/r", headers=(), method: str = "GET") -> Request:
    raw = [(n.encode(), v.encode()) for n, v in headers]
    return Request(method, target.encode(), "1.1", raw, ("127.0.0.1", 1), True)


async def fetch(
    cache: ResponseCache, handler, policy: CachePolicy, target: str = "/r", headers=(), method="GET"
):
    result = cache.serve(request(target, headers, method), handler, policy)
    if inspect.isawaitable(result):
        result = await result
    return result


class Counted:
    """A handler that counts its calls, can be held at a gate, and says what to answer."""

    def __init__(
        self, cache_control: str = "max-age=60", body: str = "v", status: int = 200
    ) -> None:
        self.calls = 0
        self.finished = 0
        self.cancelled = 0
        self.gate: asyncio.Event | None = None
        self.cache_control = cache_control
        self.body = body
        self.status = status
        self.fail: BaseException | None = None
        self.extra_headers: list[tuple[str, str]] = []

    async def __call__(self, req: Request) -> Response:
        self.calls += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.fail is not None:
                raise self.fail
            headers = [("Cache-Control", self.cache_control), *self.extra_headers]
            return Response(f"{self.body}{self.calls}", self.status, headers)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.finished += 1


POLICY = CachePolicy()


async def settle(condition, turns: int = 50) -> None:
    """Let the loop turn until ``condition`` holds (at most ``turns`` turns)."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)


def test_fresh_entry_is_a_hit_and_expires_with_max_age(backend):
    async def main():
        clock, handler = Clock(), Counted("max-age=10")
        cache = ResponseCache(clock=clock)
        first = await fetch(cache, handler, POLICY)
        assert first.header("x-cache") == "MISS"
        hit = cache.serve(request(), handler, POLICY)
        assert isinstance(hit, Response), "a fresh hit must be answered inline, without a task"
        assert hit.header("x-cache") == "HIT" and hit.body == b"v1"
        clock.now += 10.5
        again = await fetch(cache, handler, POLICY)
        assert again.header("x-cache") == "MISS" and again.body == b"v2"

    backend.run(main)


def test_get_and_head_share_one_entry_and_other_methods_bypass(backend):
    async def main():
        cache, handler = ResponseCache(clock=Clock()), Counted()
        await fetch(cache, handler, POLICY)
        assert (await fetch(cache, handler, POLICY, method="HEAD")).header("x-cache") == "HIT"
        assert (await fetch(cache, handler, POLICY, method="POST")).header("x-cache") == "BYPASS"
        assert handler.calls == 2

    backend.run(main)


def test_query_order_does_not_split_the_key(backend):
    async def main():
        cache, handler = ResponseCache(clock=Clock()), Counted()
        await fetch(cache, handler, POLICY, "/r?b=2&a=1")
        assert (await fetch(cache, handler, POLICY, "/r?a=1&b=2")).header("x-cache") == "HIT"

    backend.run(main)


def test_concurrent_misses_make_one_computation(backend):
    async def main():
        cache, handler = ResponseCache(clock=Clock()), Counted()
        handler.gate = asyncio.Event()
        waiters = [asyncio.ensure_future(fetch(cache, handler, POLICY)) for _ in range(200)]
        await asyncio.sleep(0)
        handler.gate.set()
        replies = await asyncio.gather(*waiters)
        assert handler.calls == 1
        assert {reply.body for reply in replies} == {b"v1"}
        assert cache.stats.coalesced == 199

    backend.run(main)


def test_leader_leaving_does_not_cancel_the_fill_for_the_others(backend):
    async def main():
        cache, handler = ResponseCache(clock=Clock()), Counted()
        handler.gate = asyncio.Event()
        leader = asyncio.ensure_future(fetch(cache, handler, POLICY))
        await asyncio.sleep(0)
        follower = asyncio.ensure_future(fetch(cache, handler, POLICY))
        await asyncio.sleep(0)
        leader.cancel()
        await asyncio.sleep(0)
        handler.gate.set()
        assert (await follower).body == b"v1"
        assert handler.cancelled == 0

    backend.run(main)


def test_everyone_leaving_cancels_the_fill_and_the_next_request_recomputes(backend):
    async def main():
        cache, handler = ResponseCache(clock=Clock()), Counted()
        handler.gate = asyncio.Event()
        waiters = [asyncio.ensure_future(fetch(cache, handler, POLICY)) for _ in range(3)]
        await asyncio.sleep(0)
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        await asyncio.sleep(0)
        assert handler.cancelled == 1 and handler.finished == 1
        handler.gate.set()
        assert (await fetch(cache, handler, POLICY)).body == b"v2"

    backend.run(main)


def test_route_may_ask_abandoned_fills_to_finish_and_be_stored(backend):
    async def main():
        policy = CachePolicy(finish_abandoned_fills=True)
        cache, handler = ResponseCache(clock=Clock()), Counted()
        handler.gate = asyncio.Event()
        waiter = asyncio.ensure_future(fetch(cache, handler, policy))
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.sleep(0)
        handler.gate.set()
        for _ in range(5):
            await asyncio.sleep(0)
        assert handler.cancelled == 0
        assert (await fetch(cache, handler, policy)).header("x-cache") == "HIT"
        assert handler.calls == 1

    backend.run(main)


def test_follower_past_the_lock_timeout_computes_alone_and_does_not_store(backend):
    async def main():
        policy = CachePolicy(lock_timeout=0.05)
        cache, slow = ResponseCache(clock=Clock()), Counted(body="slow")
        slow.gate = asyncio.Event()
        leader = asyncio.ensure_future(fetch(cache, slow, policy))
        await asyncio.sleep(0)
        fast = Counted(body="fast")
        follower = await fetch(cache, fast, policy)
        assert follower.body == b"fast1" and follower.header("x-cache") == "MISS"
        assert cache.stats.lock_timeouts == 1
        slow.gate.set()
        assert (await leader).body == b"slow1"
        assert (await fetch(cache, fast, policy)).body == b"slow1"  # the leader's result was stored

    backend.run(main)


def test_exception_reaches_every_waiter_from_one_call(backend):
    async def main():
        cache, handler = ResponseCache(clock=Clock()), Counted()
        handler.gate, handler.fail = asyncio.Event(), RuntimeError("backend down")
        waiters = [asyncio.ensure_future(fetch(cache, handler, POLICY)) for _ in range(5)]
        await asyncio.sleep(0)
        handler.gate.set()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and str(r) == "backend down" for r in results)
        assert handler.calls == 1

    backend.run(main)


def test_stale_while_revalidate_serves_stale_once_and_refreshes_once(backend):
    async def main():
        clock, handler = Clock(), Counted("max-age=10, stale-while-revalidate=30")
        cache = ResponseCache(clock=clock)
        await fetch(cache, handler, POLICY)
        clock.now += 15
        handler.gate = asyncio.Event()
        first = await fetch(cache, handler, POLICY)
        second = await fetch(cache, handler, POLICY)
        assert (first.header("x-cache"), first.body) == ("STALE", b"v1")
        assert (second.header("x-cache"), second.body) == ("UPDATING", b"v1")
        await settle(lambda: handler.calls == 2)
        assert handler.calls == 2  # exactly one background refresh
        handler.gate.set()
        for _ in range(5):
            await asyncio.sleep(0)
        fresh = await fetch(cache, handler, POLICY)
        assert (fresh.header("x-cache"), fresh.body) == ("HIT", b"v2")

    backend.run(main)


def test_stale_if_error_serves_the_stale_entry_when_the_refresh_fails(backend):
    async def main():
        clock, handler = Clock(), Counted("max-age=10, stale-if-error=60")
        cache = ResponseCache(clock=clock)
        await fetch(cache, handler, POLICY)
        clock.now += 20
        handler.fail = RuntimeError("origin down")
        stale = await fetch(cache, handler, POLICY)
        assert (stale.header("x-cache"), stale.body) == ("STALE", b"v1")
        handler.fail, handler.status = None, 503
        stale = await fetch(cache, handler, POLICY)
        assert (stale.header("x-cache"), stale.body) == ("STALE", b"v1")
        clock.now += 100
        handler.status = 200
        assert (await fetch(cache, handler, POLICY)).header("x-cache") == "MISS"

    backend.run(main)


def test_vary_keeps_one_entry_per_header_value(backend):
    async def main():
        cache, handler = ResponseCache(clock=Clock()), Counted()
        handler.extra_headers = [("Vary", "Accept-Language")]
        fr = await fetch(cache, handler, POLICY, headers=[("Accept-Language", "fr")])
        de = await fetch(cache, handler, POLICY, headers=[("Accept-Language", "de")])
        fr_again = await fetch(cache, handler, POLICY, headers=[("Accept-Language", "fr")])
        assert (fr.body, de.body, fr_again.body) == (b"v1", b"v2", b"v1")
        assert fr_again.header("x-cache") == "HIT"

    backend.run(main)


def test_no_store_is_not_cached_and_its_followers_bypass(backend):
    async def main():
        cache, handler = ResponseCache(clock=Clock()), Counted("no-store")
        handler.gate = asyncio.Event()
        waiters = [asyncio.ensure_future(fetch(cache, handler, POLICY)) for _ in range(3)]
        await asyncio.sleep(0)
        handler.gate.set()
        replies = await asyncio.gather(*waiters)
        assert sorted(r.header("x-cache") for r in replies) == ["BYPASS", "BYPASS", "MISS"]
        assert handler.calls == 3  # nobody got another client's response
        assert (await fetch(cache, handler, POLICY)).header("x-cache") == "BYPASS"  # hit-for-miss

    backend.run(main)


def test_private_response_never_reaches_another_client(backend):
    async def main():
        cache, handler = ResponseCache(clock=Clock()), Counted("private, max-age=60")
        handler.gate = asyncio.Event()
        first = asyncio.ensure_future(fetch(cache, handler, POLICY))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(fetch(cache, handler, POLICY))
        await asyncio.sleep(0)
        handler.gate.set()
        assert {(await first).body, (await second).body} == {b"v1", b"v2"}

    backend.run(main)


def test_lru_is_bounded_by_bytes_not_entries(backend):
    async def main():
        cache = ResponseCache(max_bytes=10_000, clock=Clock())
        handler = Counted(body="x" * 3000)
        for name in "abcde":
            await fetch(cache, handler, POLICY, f"/{name}")
        assert cache.size <= 10_000
        assert len(cache) == 3
        assert (await fetch(cache, handler, POLICY, "/e")).header("x-cache") == "HIT"
        assert (await fetch(cache, handler, POLICY, "/a")).header("x-cache") == "MISS"
        assert cache.stats.evictions >= 2

    backend.run(main)


def test_xfetch_refreshes_early_near_expiry(backend):
    async def main():
        clock, handler = Clock(), Counted("max-age=10")
        cache = ResponseCache(clock=clock)
        policy = CachePolicy(xfetch_beta=1e9)  # certain refresh once the entry's delta is non-zero
        handler.gate = asyncio.Event()
        first = asyncio.ensure_future(fetch(cache, handler, policy))
        await settle(lambda: handler.calls == 1)
        clock.now += 0.5  # the computation "took" half a second
        handler.gate.set()
        await first
        clock.now += 9
        hit = await fetch(cache, handler, policy)
        assert hit.header("x-cache") == "HIT"
        await settle(lambda: handler.calls == 2)
        await settle(lambda: False, turns=5)  # and no second refresh follows
        assert handler.calls == 2 and cache.stats.refreshes == 1

    backend.run(main)


def test_ttl_comes_from_the_route_when_the_handler_sends_none(backend):
    async def main():
        clock, handler = Clock(), Counted(cache_control="")
        cache = ResponseCache(clock=clock)
        policy = CachePolicy(ttl=5)
        await fetch(cache, handler, policy)
        assert (await fetch(cache, handler, policy)).header("x-cache") == "HIT"
        clock.now += 6
        assert (await fetch(cache, handler, policy)).header("x-cache") == "MISS"
        no_ttl = Counted(cache_control="")
        await fetch(cache, no_ttl, POLICY, "/other")
        assert (await fetch(cache, no_ttl, POLICY, "/other")).header("x-cache") == "BYPASS"
        # a max-age that is not a plain ASCII number ("²" passes str.isdigit) falls back too
        odd = Counted(cache_control="max-age=\u00b2, stale-while-revalidate=1\u00b2")
        await fetch(cache, odd, policy, "/odd")
        assert (await fetch(cache, odd, policy, "/odd")).header("x-cache") == "HIT"
        clock.now += 6
        assert (await fetch(cache, odd, policy, "/odd")).header("x-cache") == "MISS"

    backend.run(main)


# ---------------------------------------------------------------------- over HTTP


def http_app():
    app = App()
    gate: dict = {}
    log = {"calls": 0, "cancelled": 0, "finished": 0}

    @app.get("/cached/{key}", cache=CachePolicy(ttl=60))
    async def cached(req: Request) -> Response:
        log["calls"] += 1
        try:
            await gate.setdefault("event", asyncio.Event()).wait()
            return Response(f"value of {req.params['key']}\n")
        except asyncio.CancelledError:
            log["cancelled"] += 1
            raise
        finally:
            log["finished"] += 1

    return app, gate, log


def test_500_concurrent_cold_requests_make_one_computation_and_500_identical_answers(backend):
    app, gate, log = http_app()
    with running_server(backend, app) as server:
        clients = [RawClient(server.port, timeout=20) for _ in range(500)]
        try:
            for client in clients:
                client.request("GET", "/cached/hot")
            deadline = time.monotonic() + 15
            while server.call(lambda: app.cache.waiting) < 499 and time.monotonic() < deadline:
                time.sleep(0.02)
            server.call(lambda: gate["event"].set())
            replies = [client.read_reply() for client in clients]
        finally:
            for client in clients:
                client.close()
        assert log["calls"] == 1
        assert {(r.status, r.body) for r in replies} == {(200, b"value of hot\n")}


def test_all_clients_leaving_cancels_the_computation_and_the_next_recomputes(backend):
    app, gate, log = http_app()
    with running_server(backend, app) as server:
        clients = [RawClient(server.port) for _ in range(3)]
        for client in clients:
            client.request("GET", "/cached/cold")
        deadline = time.monotonic() + 5
        while server.call(lambda: app.cache.waiting) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        first_leaves = clients.pop(0)
        first_leaves.sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        first_leaves.close()
        time.sleep(0.1)
        assert log["cancelled"] == 0, "the leader leaving cancelled the fill for its followers"
        for client in clients:
            client.close()
        deadline = time.monotonic() + 5
        while log["finished"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert log["cancelled"] == 1
        server.call(lambda: gate["event"].set())
        with RawClient(server.port) as client:
            client.request("GET", "/cached/cold")
            reply = client.read_reply()
        assert reply.body == b"value of cold\n"
        assert log["calls"] == 2
