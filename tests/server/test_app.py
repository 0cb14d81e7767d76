"""Routing, requests and responses, without a network."""

from __future__ import annotations

import pytest

from forkloop.server.app import App, import_app
from forkloop.server.http import HeaderError, Request, Response, as_response, encode_header
from forkloop.server.listeners import parse_bind


def make_request(method: str, target: bytes, headers=()) -> Request:
    return Request(method, target, "1.1", list(headers), ("127.0.0.1", 1), True)


def test_static_and_placeholder_routes_resolve():
    app = App()

    @app.get("/items/{item_id}")
    def item(request):
        return Response(request.params["item_id"])

    @app.get("/files/{rest:path}")
    def files(request):
        return Response(request.params["rest"])

    request = make_request("GET", b"/items/42")
    route = app.resolve(request)
    assert route.handler is item
    assert request.params == {"item_id": "42"}
    request = make_request("GET", b"/files/a/b/c.txt")
    assert app.resolve(request).handler is files
    assert request.params == {"rest": "a/b/c.txt"}


def test_head_falls_back_to_get_and_405_lists_allowed_methods():
    app = App()
    app.get("/x")(lambda request: Response("x"))
    app.post("/x")(lambda request: Response("y"))
    assert app.resolve(make_request("HEAD", b"/x")).method == "GET"
    response = app.resolve(make_request("PUT", b"/x"))
    assert response.status == 405
    assert ("Allow", "GET, HEAD, POST") in response.headers


def test_duplicate_route_is_refused():
    app = App()
    app.get("/x")(lambda request: Response("x"))
    with pytest.raises(ValueError, match="already routed"):
        app.get("/x")(lambda request: Response("x"))


def test_request_path_query_and_headers():
    request = make_request(
        "GET",
        b"/a%20b/c?x=1&x=2&y=",
        [(b"Content-Type", b"text/plain"), (b"X-A", b"1"), (b"x-a", b"2")],
    )
    assert request.path == "/a b/c"
    assert request.raw_path == b"/a%20b/c"
    assert request.query == {"x": ["1", "2"], "y": [""]}
    assert request.query_param("x") == "1"
    assert request.headers["content-type"] == "text/plain"
    assert request.headers.get("X-A") == "1, 2"
    assert request.headers.get_all("x-a") == ["1", "2"]
    assert "X-A" in request.headers


def test_absolute_form_target_routes_on_its_path():
    request = make_request("GET", b"http://example.com/items?q=1")
    assert request.path == "/items"
    assert request.query_string == "q=1"


def test_response_helpers_and_header_validation():
    assert Response.json({"a": 1}).body == b'{"a":1}'
    assert Response.json({"a": 1}).content_type == "application/json"
    assert as_response("hi").body == b"hi"
    assert as_response({"k": "v"}).content_type == "application/json"
    with pytest.raises(TypeError, match="expected a Response"):
        as_response(42)
    with pytest.raises(HeaderError, match="CR, LF or NUL"):
        encode_header("X-A", "a\r\nb")
    with pytest.raises(HeaderError, match="not an HTTP token"):
        encode_header("X A", "b")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8000", "127.0.0.1:8000"),
        (":8000", "0.0.0.0:8000"),
        ("[::1]:8000", "[::1]:8000"),
        ("unix:/tmp/x.sock", "unix:/tmp/x.sock"),
    ],
)
def test_bind_addresses_parse(text, expected):
    assert str(parse_bind(text)) == expected


@pytest.mark.parametrize(
    "text", ["8000", "localhost", "::1:80", "unix:", "host:99999", "host:8\u00b2"]
)
def test_bad_bind_addresses_are_refused_with_a_hint(text):
    with pytest.raises(ValueError):
        parse_bind(text)


def test_import_app_errors_name_the_problem():
    with pytest.raises(ImportError, match="has no attribute 'nope'"):
        import_app("forkloop.server.demo:nope")
    with pytest.raises(ImportError, match="not a forkloop App"):
        import_app("forkloop.server.demo:HELLO")
    assert import_app("forkloop.server.demo:app").resolve(make_request("GET", b"/")).path == "/"
