"""Proxied prefixes beside an app's own routes: ``app.proxy()`` and ``[[proxy]]``.

One server answers its own routes and sends the others to a real upstream
(tests/server/upstream_support.py): in process for a forkloop `App` on every
backend, and through ``python -m forkloop --config`` for an ASGI app.
"""

from __future__ import annotations

import pytest

from forkloop.server.app import App
from forkloop.server.http import Response
from tests.server.frontdoor_support import Served, UserFolder, last_error_line, run_forkloop
from tests.server.support import RawClient, running_server
from tests.server.upstream_support import Upstream

pytestmark = pytest.mark.timeout(60)

ASGI_APP = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"asgi " + scope["path"].encode()})
"""


def site(upstream_port: int) -> App:
    app = App()

    @app.get("/")
    def home(request):
        return Response("home")

    @app.get("/api/local")
    def local(request):
        return Response("answered here")

    upstream = f"http://127.0.0.1:{upstream_port}"
    app.proxy("/api/", upstream)
    app.proxy("/echo", upstream)
    app.proxy("/cache/", upstream, cache=True)
    app.proxy("/cache/live/", upstream)  # the longest prefix wins: not cached
    return app


def test_an_app_answers_its_routes_and_proxies_its_prefixes(backend):
    with Upstream() as upstream, running_server(backend, site(upstream.port)) as server:
        with RawClient(server.port) as client:
            replies = {}
            for target in ("/", "/api/local", "/api/hello", "/elsewhere"):
                client.request("GET", target)
                replies[target] = client.read_reply()
            for _ in range(2):
                for target in ("/cache/c?max_age=60", "/cache/live/l?max_age=60"):
                    client.request("GET", target)
                    replies[target] = client.read_reply()
            client.request("POST", "/echo", body=b"a whole body")
            replies["posted"] = client.read_reply()
    assert replies["/"].body == b"home" and replies["/api/local"].body == b"answered here"
    assert replies["/api/hello"].body == b"hello from upstream"
    assert replies["/elsewhere"].status == 404
    assert replies["/cache/c?max_age=60"].header("x-cache") == "HIT"
    assert upstream.seen.counts[b"/cache/c"] == 1 and upstream.seen.counts[b"/cache/live/l"] == 2
    assert replies["posted"].body == b"a whole body"
    assert b"/api/local" not in b"".join(upstream.seen.heads)


def test_a_config_file_puts_proxied_prefixes_in_front_of_an_asgi_app(tmp_path):
    folder = UserFolder(tmp_path / "project", ASGI_APP, module="asgiapp")
    with Upstream() as upstream:
        folder.write(
            "forkloop.toml",
            f'app = "asgiapp:app"\n\n[[proxy]]\nprefix = "/cache/"\n'
            f'upstream = ["http://127.0.0.1:{upstream.port}"]\ncache = true\n',
        )
        served = Served(folder.root, "--config", "forkloop.toml", "--workers", "1").start()
        try:
            own = served.get("/mine")
            proxied = [served.get("/cache/s?max_age=60") for _ in range(2)]
        finally:
            served.stop()
    assert own == (200, b"asgi /mine")
    assert proxied == [(200, b"s #1"), (200, b"s #1")]
    assert upstream.seen.counts[b"/cache/s"] == 1


@pytest.mark.parametrize(
    ("section", "said"),
    [
        ('[[proxy]]\nprefix = "api"\nupstream = "http://127.0.0.1:9"\n', "prefix must be a path"),
        ('[[proxy]]\nprefix = "/api/"\n', "upstream must be a URL or a list of URLs (/api/)"),
        ('[[proxy]]\nprefix = "/a/"\nupstream = "ftp://h:1"\n', "upstream "),
        ('[[proxy]]\nprefix = "/a/"\nupstream = "http://h:1"\nhost = 1\n', "unknown key 'host'"),
        ('proxy = "http://h:1"\n', "proxy sections are written [[proxy]]"),
    ],
)
def test_a_bad_proxy_section_is_a_one_line_error(tmp_path, section, said):
    (tmp_path / "forkloop.toml").write_text(section)
    result = run_forkloop("--config", "forkloop.toml", "--check-config", cwd=tmp_path)
    assert result.returncode == 2
    line = last_error_line(result)
    assert line.startswith("forkloop: ") and "forkloop.toml: [[proxy]]: " in line and said in line
