"""Handlers started inline on a borrowed task (`server.eager`) see what a task of their own gives.

Each request runs in its own copy of the context, sees one current task from
its first step to its last, and can be cancelled by it; cancels it leaves
behind never reach the next request; anyio (FastAPI's threads, cancel scopes
and task groups) works on it. Checked through real sockets with ASGI
apps (which start every request this way) and, for the cancels an app aims at
its own task, on the starter directly. Every backend.
"""

from __future__ import annotations

import asyncio
import contextvars
import json

import anyio
import pytest
from fastapi import FastAPI

from forkloop.server.asgi import AsgiApp
from forkloop.server.eager import EagerStarter, eager_task
from tests.server.support import RawClient, running_server

seen_by: contextvars.ContextVar[str] = contextvars.ContextVar("seen_by", default="nobody")


async def answer(send, body: bytes) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


async def remembers_the_path(scope, receive, send) -> None:
    """Answers with the value the ContextVar had when the request began, then sets
    it to its own path; /suspend awaits before answering, /inline does not."""
    if scope["type"] != "http":
        return
    before = seen_by.get()
    seen_by.set(scope["path"])
    if scope["path"] == "/suspend":
        await asyncio.sleep(0)
    await answer(send, before.encode())


@pytest.mark.parametrize("path", ["/inline", "/suspend"])
def test_a_context_variable_set_by_one_request_is_not_seen_by_the_next(backend, path):
    with running_server(backend, AsgiApp(remembers_the_path)) as server:
        with RawClient(server.port) as client:
            for _ in range(3):
                client.request("GET", path)
                assert client.read_reply().body == b"nobody"
            pipelined = f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode() * 4
            client.send(pipelined)  # the next starts from the end of the one before
            assert [reply.body for reply in client.read_replies(4)] == [b"nobody"] * 4


async def same_task_throughout(scope, receive, send) -> None:
    """/same: one current task across awaits; /timeout: asyncio.timeout cancels a
    sleep of the request's own, which answers after catching it."""
    if scope["type"] != "http":
        return
    first = asyncio.current_task()
    if scope["path"] == "/timeout":
        try:
            async with asyncio.timeout(0.01):
                await asyncio.sleep(30)
        except TimeoutError:
            await answer(send, b"timed out")
        return
    await asyncio.sleep(0)
    await receive()
    await asyncio.sleep(0)
    same = first is not None and first is asyncio.current_task()
    await answer(send, b"same" if same else b"changed")


def test_a_request_sees_one_current_task_from_its_first_step_to_its_last(backend):
    with running_server(backend, AsgiApp(same_task_throughout)) as server:
        with RawClient(server.port) as client:
            for _ in range(3):
                client.request("GET", "/same")
                assert client.read_reply().body == b"same"


def test_asyncio_timeout_in_a_request_cancels_only_what_it_awaits(backend):
    with running_server(backend, AsgiApp(same_task_throughout)) as server:
        with RawClient(server.port) as client:
            client.request("GET", "/timeout")
            assert client.read_reply().body == b"timed out"
            client.request("GET", "/same")  # the timeout left nothing behind
            assert client.read_reply().body == b"same"


def test_a_cancel_of_its_own_task_in_the_first_step_reaches_the_next_await(backend):
    outcome: list[str] = []

    async def cancels_itself() -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            outcome.append("cancelled")
            task.uncancel()

    async def main() -> None:
        starter = EagerStarter(asyncio.get_running_loop())
        host = starter.start(cancels_itself())
        assert host is not None  # it suspended
        for _ in range(20):
            if outcome:
                break
            await asyncio.sleep(0)

    backend.run(main)
    assert outcome == ["cancelled"]


def test_a_cancel_left_behind_by_a_finished_request_never_reaches_the_next(backend):
    outcome: list[str] = []

    async def cancels_itself_and_returns() -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()

    async def sleeps() -> None:
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise
        outcome.append("slept")

    async def main() -> None:
        starter = EagerStarter(asyncio.get_running_loop())
        for _ in range(3):
            assert starter.start(cancels_itself_and_returns()) is None  # finished at once
            await asyncio.sleep(0)
        host = starter.start(sleeps())
        assert host is not None
        for _ in range(200):
            if outcome:
                break
            await asyncio.sleep(0.005)

    backend.run(main)
    assert outcome == ["slept"]


@pytest.mark.parametrize("running_map", ["asyncio's", "none", "one that is never filled"])
def test_a_handler_started_inside_a_running_task_runs_on_its_host(
    backend, monkeypatch, running_map
):
    """As when a handler's end starts the next pipelined request: the running task
    steps aside for the first step and is current again after it, however the
    Python at hand lets the starter find it."""
    from forkloop.server import eager

    if running_map == "none":
        monkeypatch.setattr(eager, "_RUNNING", None)
    elif running_map == "one that is never filled":
        monkeypatch.setattr(eager, "_RUNNING", {})
    seen: list[object] = []

    async def handler() -> None:
        seen.append(asyncio.current_task())
        await asyncio.sleep(0)
        seen.append(asyncio.current_task())

    async def main() -> None:
        outer = asyncio.current_task()
        host = EagerStarter(asyncio.get_running_loop()).start(handler())
        assert asyncio.current_task() is outer
        assert host is not None and host is not outer
        for _ in range(20):
            if len(seen) == 2:
                break
            await asyncio.sleep(0)
        assert seen == [host, host]

    backend.run(main)


def anyio_app() -> FastAPI:
    api = FastAPI()

    @api.get("/sync")
    def in_a_thread() -> dict[str, str]:  # FastAPI runs it in anyio's thread pool
        return {"ran": "in a thread"}

    @api.get("/move-on")
    async def moves_on() -> dict[str, bool]:
        with anyio.move_on_after(0.01) as scope:
            await anyio.sleep(30)
        return {"cancelled": scope.cancelled_caught}

    @api.get("/group")
    async def in_a_group() -> dict[str, list[int]]:
        done: list[int] = []

        async def child(n: int) -> None:
            await anyio.sleep(0)
            done.append(n)

        async with anyio.create_task_group() as group:
            for n in range(3):
                group.start_soon(child, n)
        return {"done": sorted(done)}

    return api


def test_anyio_cancel_scopes_threads_and_task_groups_work_on_the_host(backend):
    with running_server(backend, AsgiApp(anyio_app(), lifespan="off")) as server:
        with RawClient(server.port) as client:
            for _ in range(2):  # twice on one connection: nothing left behind
                client.request("GET", "/sync")
                assert json.loads(client.read_reply().body) == {"ran": "in a thread"}
                client.request("GET", "/move-on")
                assert json.loads(client.read_reply().body) == {"cancelled": True}
                client.request("GET", "/group")
                assert json.loads(client.read_reply().body) == {"done": [0, 1, 2]}


# ---------------------------------------------------------------------- eager_task
#
# A task whose first step runs inline, as the task (single-flight work starts
# this way, so a fill's upstream request leaves before the rest of the loop
# iteration's callbacks run).


def test_an_eager_task_runs_its_first_step_at_once_as_itself(backend):
    async def main() -> None:
        loop = asyncio.get_running_loop()
        outer = asyncio.current_task()
        release = loop.create_future()
        seen: list[object] = []

        async def work() -> str:
            seen.append(asyncio.current_task())
            seen_by.set("the work")
            await release
            seen.append(asyncio.current_task())
            return "done"

        task = eager_task(loop, work(), "eager")
        assert seen == [task]  # ran before eager_task returned, as the task itself
        assert asyncio.current_task() is outer and seen_by.get() == "nobody"
        release.set_result(None)
        assert await task == "done" and seen == [task, task]

    backend.run(main)


def test_an_eager_task_that_ends_or_fails_in_its_first_step_says_so_as_a_task(backend):
    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def at_once() -> int:
            return 7

        async def fails() -> None:
            raise ValueError("in the first step")

        assert await eager_task(loop, at_once()) == 7
        with pytest.raises(ValueError, match="in the first step"):
            await eager_task(loop, fails())

    backend.run(main)


def test_cancelling_an_eager_task_before_it_runs_cancels_what_its_first_step_awaits(backend):
    async def main() -> None:
        loop = asyncio.get_running_loop()
        awaited = loop.create_future()
        cleaned: list[bool] = []

        async def work() -> None:
            try:
                await awaited
            finally:
                cleaned.append(awaited.cancelled())

        task = eager_task(loop, work())
        task.cancel()  # before the loop has run the task at all
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cleaned == [True] and task.cancelled()

    backend.run(main)
