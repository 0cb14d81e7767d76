"""The fleet tier: one cache and one fill per key for several servers sharing a Redis store.

Everything is real: a ``redis-server`` subprocess (`tests.server.redis_support`)
on a free port or a Unix socket, and for the server cases two forkloop masters
with two workers each and their cache processes (``--shared-cache on
--cache-url ...``), sent concurrent cold requests split between them. Fills are
counted by the test app (`tests.server.apps.fleet_fills`), which appends "pid key" to
a file per computation. Failures are real signals: ``kill -9`` of a whole
server, SIGKILL and SIGSTOP of the store.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from forkloop.loadtest.servers import free_port
from forkloop.server import settings
from forkloop.server.cache import Entry
from forkloop.server.fleet_cache import FleetLease, FleetTier, StoreNames
from forkloop.server.shared_cache import ALONE, FALLBACK, Failed, Hit
from tests.loop_under_test import LoopUnderTest
from tests.server.frontdoor_support import UserFolder, last_error_line, run_forkloop
from tests.server.master_support import MasterUnderTest, alive, wait_for
from tests.server.redis_support import ClusterUnderTest, StoreUnderTest
from tests.waiting import until

pytestmark = pytest.mark.timeout(120)


def _entry(body: bytes, ttl: float = 60) -> Entry:
    now = time.monotonic()
    return Entry(200, [("Cache-Control", "max-age=60")], "text/plain", body, now, now + ttl,
                 now + ttl, now + ttl, 0.01)  # fmt: skip


@pytest.fixture
def store(tmp_path):
    started = StoreUnderTest(tmp_path).start()
    yield started
    started.kill()


# ---------------------------------------------------------------------- settings


def test_the_store_is_named_by_flag_or_config_file(tmp_path):
    (tmp_path / "forkloop.toml").write_text(
        'cache_url = "unix:///run/redis.sock"\ncache_key_prefix = "shop:"\n'
        "cache_call_timeout = 0.05\ncache_max_entry = 4096\n"
    )
    environ: dict[str, str] = {}
    config = settings.resolve(argparse.Namespace(config="forkloop.toml"), environ, str(tmp_path))
    assert config.cache_url == "unix:///run/redis.sock"
    assert (config.cache_key_prefix, config.cache_call_timeout) == ("shop:", 0.05)
    assert config.cache_max_entry == 4096
    flagged = argparse.Namespace(cache_url="rediss://cache:6380/2")
    assert settings.resolve(flagged, environ, str(tmp_path)).cache_url == "rediss://cache:6380/2"
    assert settings.resolve(argparse.Namespace(), environ, str(tmp_path)).cache_url is None


@pytest.mark.parametrize(
    ("arguments", "fragments"),
    [
        (["--cache-url", "http://cache:6379"], ["--cache-url", "redis://HOST:PORT/DB"]),
        (["--cache-url", "unix://"], ["--cache-url", "unix://PATH"]),
        (["--cache-call-timeout", "0"], ["--cache-call-timeout must be more than 0"]),
    ],
)
def test_a_bad_store_setting_is_one_line_and_exit_2(tmp_path, arguments, fragments):
    folder = UserFolder(tmp_path / "project")
    result = run_forkloop(*arguments, cwd=folder.root)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    line = last_error_line(result)
    for fragment in fragments:
        assert fragment in line, line


# ---------------------------------------------------------------------- the tier itself


def test_a_waiter_on_another_server_is_notified_of_the_fill(store, backend: LoopUnderTest):
    async def main() -> None:
        # a lease longer than the test may run: only the notification can wake the waiter
        first, second = FleetTier(store.url, lease_ttl=600), FleetTier(store.url, lease_ttl=600)
        assert await first.connect() and await second.connect()
        lease = await first.acquire(b"/cold", 600)
        assert isinstance(lease, FleetLease)
        waiting = asyncio.ensure_future(second.acquire(b"/cold", 600))
        await until(lambda: second.parked == 1, timeout=10)  # blocked on its channel
        lease.store(_entry(b"filled once"))
        got = await waiting
        assert isinstance(got, Hit) and got.waited and got.entry.body == b"filled once"
        assert second.stats.fleet_notifications >= 1 and second.stats.fleet_fills == 0
        again = await second.acquire(b"/cold", 5)
        assert isinstance(again, Hit) and not again.waited
        await first.close()
        await second.close()

    backend.run(main)


def test_a_filler_that_leaves_hands_the_fill_to_a_waiter_elsewhere(store):
    async def main() -> None:
        first, second = FleetTier(store.url, lease_ttl=600), FleetTier(store.url, lease_ttl=600)
        assert await first.connect() and await second.connect()
        lease = await first.acquire(b"/left", 5)
        assert isinstance(lease, FleetLease)
        waiting = asyncio.ensure_future(second.acquire(b"/left", 5))
        await until(lambda: second.parked == 1, timeout=10)  # blocked on its channel
        lease.release()
        taken = await waiting
        assert isinstance(taken, FleetLease) and taken.took_over
        assert second.stats.fleet_takeovers == 1
        taken.fail()  # the next waiter would compute for itself
        await first.close()
        await second.close()

    asyncio.run(asyncio.wait_for(main(), 20))


def test_a_failed_fill_sends_its_waiters_to_compute_for_themselves(store):
    async def main() -> None:
        first, second = FleetTier(store.url, lease_ttl=600), FleetTier(store.url, lease_ttl=600)
        assert await first.connect() and await second.connect()
        lease = await first.acquire(b"/private", 5)
        assert isinstance(lease, FleetLease)
        waiting = asyncio.ensure_future(second.acquire(b"/private", 5))
        await until(lambda: second.parked == 1, timeout=10)
        lease.fail()
        assert await waiting is ALONE
        await first.close()
        await second.close()

    asyncio.run(asyncio.wait_for(main(), 20))


def test_a_failed_fill_gives_its_error_to_its_waiters_elsewhere(store):
    async def main() -> None:
        first, second = FleetTier(store.url, lease_ttl=600), FleetTier(store.url, lease_ttl=600)
        assert await first.connect() and await second.connect()
        lease = await first.acquire(b"/down", 600)
        assert isinstance(lease, FleetLease)
        waiting = asyncio.ensure_future(second.acquire(b"/down", 600))
        await until(lambda: second.parked == 1, timeout=10)
        now = time.monotonic()
        lease.error(Entry(503, [], "text/plain", b"origin down", now, now, now, now, 0.0))
        got = await waiting
        assert isinstance(got, Failed) and got.entry.status == 503
        assert got.entry.body == b"origin down"
        # nothing was stored: the next ask fills again
        assert isinstance(await second.acquire(b"/down", 600), FleetLease)
        await first.close()
        await second.close()

    asyncio.run(asyncio.wait_for(main(), 20))


def test_a_store_on_a_unix_socket_serves_the_fleet(tmp_path):
    store = StoreUnderTest(tmp_path, unix=True).start()
    try:

        async def main() -> None:
            tier = FleetTier(store.url)
            assert await tier.connect()
            lease = await tier.acquire(b"/unix", 5)
            assert isinstance(lease, FleetLease)
            lease.store(_entry(b"over a unix socket"))
            got = None
            while not isinstance(got, Hit):
                got = await tier.acquire(b"/unix", 5)
                assert not isinstance(got, FleetLease), "the store did not keep the entry"
            await tier.close()

        asyncio.run(asyncio.wait_for(main(), 20))
    finally:
        store.kill()


def test_an_entry_expires_in_the_store_when_its_stale_windows_end(store):
    async def main() -> None:
        tier = FleetTier(store.url, prefix="site-a:")
        assert await tier.connect()
        lease = await tier.acquire(b"/short", 5)
        assert isinstance(lease, FleetLease)
        lease.store(_entry(b"short-lived", ttl=30))
        name = StoreNames.of("site-a:", b"/short").value
        while await tier.client().pttl(name) < 0:  # stored by a task of its own
            await asyncio.sleep(0.01)
        assert 25_000 < await tier.client().pttl(name) <= 30_000
        await tier.close()

    asyncio.run(asyncio.wait_for(main(), 20))


def test_a_dead_store_is_bypassed_and_found_again_when_it_returns(store):
    async def main() -> None:
        tier = FleetTier(store.url)
        assert await tier.connect()
        store.kill()
        assert await tier.acquire(b"/down", 5) is FALLBACK
        assert tier.breaker_open and tier.stats.fleet_store_errors >= 1
        assert await tier.acquire(b"/down", 5) is FALLBACK  # no call while it is open
        store.start()
        while tier.breaker_open:  # the background probe closes it
            await asyncio.sleep(0.05)
        assert isinstance(await tier.acquire(b"/down", 5), FleetLease)
        await tier.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_frozen_store_is_bypassed_and_waiters_are_woken(store):
    async def main() -> None:
        first, second = FleetTier(store.url), FleetTier(store.url, call_timeout=0.2)
        assert await first.connect() and await second.connect()
        lease = await first.acquire(b"/frozen", 5)
        assert isinstance(lease, FleetLease)
        waiting = asyncio.ensure_future(second.acquire(b"/frozen", 30))
        await until(lambda: second.parked == 1, timeout=10)
        store.freeze()
        try:
            # the waiter asks again when the lease would expire: that call times out
            assert await waiting is FALLBACK
            assert await second.acquire(b"/other", 5) is FALLBACK
            assert second.breaker_open
        finally:
            store.thaw()
        await first.close()
        await second.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_cluster_fills_once_with_value_lease_and_channel_in_one_slot(tmp_path):
    cluster = ClusterUnderTest(tmp_path).start()
    try:
        names = StoreNames.of("forkloop:", b"/clustered")
        slots = {
            cluster.nodes[0].cli("cluster", "keyslot", n).strip() for n in vars(names).values()
        }
        assert len(slots) == 1

        async def main() -> None:
            first = FleetTier(cluster.url, lease_ttl=600)
            second = FleetTier(cluster.url, lease_ttl=600)
            assert await first.connect() and await second.connect()
            for key in (b"/clustered", b"/elsewhere", b"/a/third/one"):
                lease = await first.acquire(key, 5)
                assert isinstance(lease, FleetLease)
                waiting = asyncio.ensure_future(second.acquire(key, 5))
                await until(lambda: second.parked == 1, timeout=10)
                lease.store(_entry(b"from the cluster"))
                got = await waiting
                assert isinstance(got, Hit) and got.waited, got
            assert second.stats.fleet_notifications >= 3
            await first.close()
            await second.close()

        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        cluster.stop()


def test_a_cluster_failover_of_a_keys_master_is_survived(tmp_path, caplog):
    cluster = ClusterUnderTest(tmp_path, replicas=1).start()
    try:
        # a key whose master is not the node the URL names (the probe asks that one)
        key = next(
            k
            for k in (f"/failover/{n}".encode() for n in range(100))
            if cluster.node_of(StoreNames.of("forkloop:", k).value) is not cluster.nodes[0]
        )
        master = cluster.node_of(StoreNames.of("forkloop:", key).value)

        async def main() -> None:
            tier = FleetTier(cluster.url, call_timeout=0.2)
            assert await tier.connect()
            lease = await tier.acquire(key, 5)
            assert isinstance(lease, FleetLease)
            lease.store(_entry(b"before the failover"))
            while not isinstance(await tier.acquire(key, 5), Hit):
                await asyncio.sleep(0.01)  # stored by a task of its own
            master.kill()
            assert await tier.acquire(key, 5) is FALLBACK  # the breaker opens
            assert tier.breaker_open
            # the replica is promoted; the probe closes the breaker, the client
            # learns the new map, and the key is served (and fillable) again
            while True:
                await asyncio.sleep(0.1)
                if not tier.breaker_open:
                    got = await tier.acquire(key, 5)
                    if got is not FALLBACK:
                        break
            assert isinstance(got, (Hit, FleetLease)), got
            await tier.close()
            # one outage, one logged error, however often the breaker opened meanwhile
            errors = [r for r in caplog.records if "unavailable" in r.getMessage()]
            assert len(errors) == 1, [r.getMessage() for r in errors]
            assert [r for r in caplog.records if "is back" in r.getMessage()]

        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        cluster.stop()


# ---------------------------------------------------------------------- two servers


class FleetServer(MasterUnderTest):
    def __init__(
        self, tmp_path: Path, name: str, fills: Path, store_url: str, loop: str, shared: str
    ) -> None:
        folder = tmp_path / name
        folder.mkdir()
        self.metrics_port = free_port()
        super().__init__(
            loop,
            folder,
            "--workers",
            "2",
            "--shared-cache",
            shared,
            "--cache-url",
            store_url,
            "--cache-call-timeout",
            "0.2",
            "--metrics-bind",
            f"127.0.0.1:{self.metrics_port}",
            "--no-access-log",
            app="tests.server.apps.fleet_fills:app",
            env={"FORKLOOP_TEST_FILLS": str(fills)},
        )

    def tree(self) -> set[int]:
        return {self.pid, *self.workers()}

    def kill_everything(self) -> None:
        """``kill -9`` of the master, its workers and its cache process."""
        for pid in self.tree():
            os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: not any(alive(pid) for pid in self.tree()), 5)

    def pause(self, signum: int) -> None:
        for pid in self.tree():
            os.kill(pid, signum)

    def totals(self) -> dict[str, int]:
        return json.loads(self.get("/stats")[1])["server"]

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as answer:
            return answer.read().decode()


class Fleet:
    def __init__(self, tmp_path: Path, store_url: str, loop: str, shared: str = "on") -> None:
        self.fills_path = tmp_path / "fills"
        self.fills_path.touch()
        self.servers = [
            FleetServer(tmp_path, name, self.fills_path, store_url, loop, shared)
            for name in ("one", "two")
        ]

    def fills(self, key: str) -> list[int]:
        lines = self.fills_path.read_text().splitlines()
        return [int(pid) for pid, _, k in (line.partition(" ") for line in lines) if k == key]


@pytest.fixture
def fleet_on(tmp_path, store):
    """Two servers sharing ``store``, on the loop named: ``fleet_on("uvloop")``; with
    ``shared="off"``, no server-wide tier: every worker asks the store itself."""
    started: list[Fleet] = []

    def start(loop: str, shared: str = "on") -> Fleet:
        fleet = Fleet(tmp_path, store.url, loop, shared)
        started.append(fleet)
        processes = 3 if shared == "on" else 2  # the workers, and the cache process
        for server in fleet.servers:
            server.start()
            assert wait_for(lambda s=server: len(s.workers()) == processes, 10), server.tail()
        return fleet

    yield start
    for fleet in started:
        for server in fleet.servers:
            server.stop()


@pytest.fixture
def fleet(fleet_on):
    return fleet_on("asyncio")


async def _one(port: int, path: str) -> tuple[int, str]:
    """(status, X-Cache) of one GET on a connection of its own; (0, why) if it failed."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        answer = await reader.read()
        writer.close()
    except OSError as exc:
        return 0, str(exc)
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1")
    if not head.startswith("HTTP/1.1 "):
        return 0, f"no answer ({answer[:40]!r})"
    found = re.search(r"(?im)^x-cache: *(\w+)", head)
    return int(head[9:12]), found.group(1) if found else ""


def stampede(ports: list[int], path: str, count: int) -> list[tuple[int, str]]:
    """``count`` concurrent GETs of ``path``, dealt round-robin over ``ports``."""

    async def run() -> list[tuple[int, str]]:
        async with asyncio.timeout(60):
            return list(
                await asyncio.gather(*(_one(ports[i % len(ports)], path) for i in range(count)))
            )

    return asyncio.run(run())


def in_background(work) -> tuple[threading.Thread, list]:
    results: list = []
    thread = threading.Thread(target=lambda: results.append(work()))
    thread.start()
    return thread, results


def test_two_servers_sharing_a_store_compute_a_cold_key_once(fleet_on, backend: LoopUnderTest):
    fleet = fleet_on(backend.backend)
    ports = [server.port for server in fleet.servers]
    answers = stampede(ports, "/fill/cold?ms=300", 1000)
    assert [a for a in answers if a[0] != 200] == []
    assert len(fleet.fills("cold")) == 1
    assert sorted(c for _, c in answers).count("MISS") == 1
    # and once filled, a key is a hit on both servers without another computation
    assert {a for a in stampede(ports, "/fill/cold?ms=300", 100)} == {(200, "HIT")}
    assert len(fleet.fills("cold")) == 1
    # the counters, once every worker has published them (on its heartbeat)
    one, two = fleet.servers
    filled_by, other = (one, two) if fleet.fills("cold")[0] in one.workers() else (two, one)
    assert wait_for(lambda: filled_by.totals()["cache_fleet_fills"] == 1, 5)
    assert wait_for(lambda: other.totals()["cache_fleet_hits"] >= 1, 5), other.totals()
    assert wait_for(lambda: other.totals()["cache_fleet_notifications"] >= 1, 5)
    assert other.totals()["cache_fleet_fills"] == 0
    assert other.totals()["cache_fleet_store_errors"] == 0
    fill_line = 'forkloop_fleet_cache_events_total{event="fill"} 1.0'
    assert wait_for(lambda: fill_line in filled_by.metrics(), 5), filled_by.metrics()
    assert "forkloop_fleet_cache_breaker_open 0.0" in filled_by.metrics()


def test_without_the_server_wide_tier_every_worker_asks_the_fleet_and_it_fills_once(fleet_on):
    fleet = fleet_on("uvloop", shared="off")
    ports = [server.port for server in fleet.servers]
    answers = stampede(ports, "/fill/alone?ms=300", 1000)
    assert [a for a in answers if a[0] != 200] == []
    assert len(fleet.fills("alone")) == 1


def test_a_failing_origin_is_called_once_for_the_fleet(fleet):
    ports = [server.port for server in fleet.servers]
    answers = stampede(ports, "/broken/down?ms=300", 400)
    assert {status for status, _ in answers} == {503}
    assert len(fleet.fills("down")) == 1


def test_a_stale_entry_is_refreshed_once_for_the_fleet(fleet):
    ports = [server.port for server in fleet.servers]
    assert {status for status, _ in stampede(ports, "/swr/stale?ms=300", 200)} == {200}
    assert len(fleet.fills("stale")) == 1
    # max-age=1: once each server answers STALE, the entry is stale everywhere
    for port in ports:
        assert wait_for(
            lambda p=port: stampede([p], "/swr/stale?ms=300", 1)[0][1] in ("STALE", "UPDATING"),
            5,
            interval=0.1,
        )
    answers = stampede(ports, "/swr/stale?ms=300", 400)
    assert {status for status, _ in answers} == {200}
    assert {cache for _, cache in answers} <= {"STALE", "UPDATING", "HIT"}
    # both servers, both workers each, refreshed it: one computation for all of them
    assert wait_for(lambda: len(fleet.fills("stale")) >= 2, 5)
    assert len(fleet.fills("stale")) == 2


def test_killing_the_filling_server_hands_the_fill_to_the_other(fleet):
    one, two = fleet.servers
    doomed, _ = in_background(lambda: stampede([one.port], "/slow/victim?ms=3000", 20))
    assert wait_for(lambda: len(fleet.fills("victim")) == 1, 10)
    assert fleet.fills("victim")[0] in one.workers()
    survivors, results = in_background(lambda: stampede([two.port], "/slow/victim?ms=3000", 200))
    assert wait_for(lambda: two.totals()["requests"] >= 200, 10)
    one.kill_everything()
    survivors.join(60)
    doomed.join(60)
    assert [a for a in results[0] if a[0] != 200] == []
    computed = fleet.fills("victim")
    assert len(computed) == 2 and computed[1] in two.workers()
    assert wait_for(lambda: two.totals()["cache_fleet_takeovers"] == 1, 5), {
        k: v for k, v in two.totals().items() if "fleet" in k
    }


def test_a_paused_fillers_late_write_is_refused(fleet):
    one, two = fleet.servers
    first, _ = in_background(lambda: stampede([one.port], "/slow/fenced?ms=1000", 1))
    assert wait_for(lambda: len(fleet.fills("fenced")) == 1, 10)
    one.pause(signal.SIGSTOP)
    try:
        second, results = in_background(lambda: stampede([two.port], "/slow/fenced?ms=1000", 1))
        # the paused filler's lease expires; the other server takes the fill over
        assert wait_for(lambda: len(fleet.fills("fenced")) == 2, 10)
    finally:
        one.pause(signal.SIGCONT)
    first.join(30)
    second.join(30)
    assert results[0] == [(200, "MISS")]
    assert wait_for(lambda: one.totals()["cache_fleet_fenced"] == 1, 10), one.tail()
    assert two.totals()["cache_fleet_takeovers"] == 1


def test_killing_the_store_mid_stampede_fails_no_request_and_it_recovers(fleet, store):
    ports = [server.port for server in fleet.servers]
    running, results = in_background(lambda: stampede(ports, "/fill/during?ms=500", 400))
    assert wait_for(lambda: len(fleet.fills("during")) >= 1, 10)
    store.kill()
    running.join(60)
    assert [a for a in results[0] if a[0] != 200] == []
    # each server fills for itself meanwhile: once per server, never once per request
    assert len(fleet.fills("during")) <= 2
    assert [a for a in stampede(ports, "/fill/meanwhile?ms=100", 200) if a[0] != 200] == []
    assert len(fleet.fills("meanwhile")) == 2
    store.start()
    # back to one fill for the fleet once every breaker has closed (the probes' pace)
    attempts = iter(range(1000))

    def filled_once() -> bool:
        key = f"after{next(attempts)}"
        answers = stampede(ports, f"/fill/{key}?ms=100", 200)
        assert [a for a in answers if a[0] != 200] == []
        return len(fleet.fills(key)) == 1

    assert wait_for(filled_once, 20, interval=0.2)
    assert wait_for(
        lambda: sum(s.totals()["cache_fleet_breaker_open"] for s in fleet.servers) == 0, 5
    )
    # one logged error per worker that saw the outage, and one line when it ended
    for server in fleet.servers:
        log = server.log_path.read_text(errors="replace")
        errors = len(re.findall(r"fleet cache at \S+ unavailable", log))
        assert 1 <= errors <= 2, log[-3000:]
        assert len(re.findall(r"fleet cache at \S+ is back", log)) == errors, log[-3000:]


def test_a_frozen_store_fails_no_request(fleet, store):
    ports = [server.port for server in fleet.servers]
    store.freeze()
    try:
        answers = stampede(ports, "/fill/stopped?ms=100", 200)
    finally:
        store.thaw()
    assert [a for a in answers if a[0] != 200] == []
    assert len(fleet.fills("stopped")) == 2  # once per server: the server-wide tier still holds
