"""The demo app that `forkloop serve` runs by default: its routes and its answers to bad queries."""

from __future__ import annotations

import json

import pytest

from forkloop.server.demo import app
from tests.server.support import RawClient, running_server


def test_demo_routes_answer(backend, request):
    key = request.node.callspec.id  # the app, and so its cache, is shared by every test
    with running_server(backend, app) as server:
        client = RawClient(server.port)
        for path in (
            "/",
            "/healthz",
            "/slow?ms=1",
            "/stream?chunks=3&size=4",
            f"/cached/{key}?ms=1",
        ):
            client.request("GET", path)
        hello, health, slow, stream, cached = client.read_replies(5)
        assert (hello.status, health.status, slow.status) == (200, 200, 200)
        assert slow.body == b"slept 1 ms\n"
        assert stream.body == b"x" * 12
        assert cached.body == f"value of {key}\n".encode() and cached.header("x-cache") == "MISS"
        client.request("POST", "/echo", body=b"round trip")
        assert client.read_reply().body == b"round trip"
        client.request("GET", "/stats")
        assert json.loads(client.read_reply().body)["requests"] >= 7
        client.close()


# "²" and "١" pass str.isdigit(); int() refuses the first, so they must be caught before it
@pytest.mark.parametrize("query", ["ms=abc", "ms=-1", "ms=%C2%B2", "ms=%D9%A1", "ms="])
def test_demo_refuses_a_bad_number_with_400_and_keeps_the_connection(backend, query):
    with running_server(backend, app) as server:
        client = RawClient(server.port)
        client.request("GET", f"/slow?{query}")
        client.request("GET", f"/stream?chunks=1&{query.replace('ms', 'size')}")
        client.request("GET", "/")
        refused, refused_too, hello = client.read_replies(3)
        assert (refused.status, refused_too.status, hello.status) == (400, 400, 200)
        client.close()
