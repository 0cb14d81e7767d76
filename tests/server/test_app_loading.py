"""Loading the user's app as uvicorn and gunicorn users expect, from a real folder.

Every server here runs ``python -m forkloop`` from a folder that holds the
user's module and a ``server.py`` of the user's that exits if imported: the
current directory is importable, nothing forkloop installs collides with it.
"""

from __future__ import annotations

import pytest

from tests.server.frontdoor_support import (
    ASGI_APP,
    HELLO_APP,
    Served,
    UserFolder,
    last_error_line,
    run_forkloop,
)


@pytest.fixture
def folder(tmp_path):
    return UserFolder(tmp_path / "project")


def test_app_in_the_current_directory_is_served_beside_a_user_server_py(folder):
    served = Served(folder.root, "myapp:app", "--workers", "2").start()
    try:
        assert served.get("/") == (200, b"hello from the user's app")
        assert "server.py was imported" not in served.log()
    finally:
        served.stop()


def test_app_dir_puts_another_folder_on_the_import_path(folder):
    folder.write("src/inner.py", HELLO_APP)
    served = Served(folder.root, "inner:app", "--app-dir", "src", "--workers", "1").start()
    try:
        assert served.get("/") == (200, b"hello from the user's app")
    finally:
        served.stop()


def test_chdir_moves_before_loading_and_relative_paths_keep_their_meaning(folder):
    folder.write("site/pages.py", HELLO_APP)
    folder.write("forkloop.toml", "workers = 1\n")
    served = Served(
        folder.root, "pages:app", "--chdir", "site", "--config", "forkloop.toml"
    ).start()
    try:
        assert served.get("/") == (200, b"hello from the user's app")
        assert len(served.workers()) == 1
    finally:
        served.stop()


def test_factory_is_called_for_the_app(folder):
    folder.write(
        "made.py",
        HELLO_APP.replace("app = App()", "app = App()\n\ndef create_app():\n    return app\n"),
    )
    served = Served(folder.root, "made:create_app", "--factory", "--workers", "1").start()
    try:
        assert served.get("/") == (200, b"hello from the user's app")
    finally:
        served.stop()


def test_function_without_factory_says_to_add_it(folder):
    folder.write("made.py", "from myapp import app\n\ndef create_app():\n    return app\n")
    result = run_forkloop("made:create_app", "--metrics-bind", "off", cwd=folder.root)
    assert result.returncode == 3
    assert "add --factory" in last_error_line(result)


def test_syntax_error_is_reported_once_with_file_and_line_and_exit_3(folder):
    folder.write("broken.py", "import os\n\ndef f(:\n    pass\n")
    result = run_forkloop("broken:app", "--workers", "2", "--metrics-bind", "off", cwd=folder.root)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("SyntaxError") == 1, result.stderr
    assert "broken.py:3: SyntaxError" in result.stderr
    assert "next try" not in result.stderr
    assert len(result.stderr.splitlines()) <= 8, result.stderr


def test_error_while_importing_names_the_innermost_file_and_line(folder):
    folder.write("fails.py", "import helper\napp = None\n")
    folder.write("helper.py", "x = 1\nraise RuntimeError('database is not configured')\n")
    result = run_forkloop("fails:app", "--workers", "2", "--metrics-bind", "off", cwd=folder.root)
    assert result.returncode == 3
    assert "Traceback" not in result.stderr
    line = last_error_line(result)
    assert "helper.py:2: RuntimeError: database is not configured" in line, line
    assert result.stderr.count("database is not configured") == 1, result.stderr


def test_debug_log_level_shows_the_traceback(folder):
    folder.write("fails.py", "raise RuntimeError('boom at import')\n")
    result = run_forkloop(
        "fails:app", "--workers", "1", "--log-level", "debug", "--metrics-bind", "off",
        cwd=folder.root,
    )  # fmt: skip
    assert result.returncode == 3
    assert "Traceback (most recent call last)" in result.stderr
    assert "fails.py:1: RuntimeError: boom at import" in last_error_line(result)


def test_missing_module_says_where_it_looked(folder):
    result = run_forkloop("nosuch:app", "--metrics-bind", "off", cwd=folder.root)
    assert result.returncode == 3
    line = last_error_line(result)
    assert "no module named 'nosuch'" in line
    assert str(folder.root) in line
    assert "--app-dir" in line


@pytest.mark.parametrize(
    ("source", "spec", "expected"),
    [
        ("app = {'not': 'an app'}\n", "wrong:app", "wrong:app is a dict, not a forkloop App"),
        ("app = 1\n", "wrong:application", "has no attribute 'application' (it has: app)"),
        (
            "async def app(scope):\n    pass\n",
            "wrong:app",
            "wrong:app is a function, not a forkloop App (forkloop.server.App) or an ASGI app",
        ),
    ],
)
def test_wrong_object_says_what_was_expected(folder, source, spec, expected):
    folder.write("wrong.py", source)
    result = run_forkloop(spec, "--workers", "2", "--metrics-bind", "off", cwd=folder.root)
    assert result.returncode == 3
    assert "Traceback" not in result.stderr
    assert expected in last_error_line(result), result.stderr
    assert result.stderr.count(expected) == 1, result.stderr


def test_no_master_reports_the_import_error_once(folder):
    folder.write("broken.py", "def f(:\n")
    result = run_forkloop("broken:app", "--no-master", "--metrics-bind", "off", cwd=folder.root)
    assert result.returncode == 3
    assert "broken.py:1: SyntaxError" in last_error_line(result)
    assert "Traceback" not in result.stderr


def test_asgi_app_is_served_with_its_lifespan_and_the_health_path(folder):
    folder.write("asgiapp.py", ASGI_APP)
    served = Served(folder.root, "asgiapp:app", "--workers", "2").start()
    try:
        assert served.get("/hello") == (200, b'{"path": "/hello", "lifespan": true}')
        assert served.get("/healthz") == (200, b"ok\n")  # answered before the ASGI app
    finally:
        served.stop()


def test_starlette_app_is_served(folder):
    folder.write(
        "webapp.py",
        "from starlette.applications import Starlette\n"
        "from starlette.responses import PlainTextResponse\n"
        "from starlette.routing import Route\n"
        "async def home(request):\n    return PlainTextResponse('starlette here')\n"
        "app = Starlette(routes=[Route('/', home)])\n",
    )
    served = Served(folder.root, "webapp:app", "--workers", "1").start()
    try:
        assert served.get("/") == (200, b"starlette here")
    finally:
        served.stop()


def test_failing_lifespan_is_retried_then_reported_once_as_the_last_line(folder):
    folder.write(
        "nodb.py",
        "async def app(scope, receive, send):\n"
        "    assert scope['type'] == 'lifespan'\n"
        "    await receive()\n"
        "    await send({'type': 'lifespan.startup.failed', 'message': 'no database'})\n",
    )
    result = run_forkloop("nodb:app", "--workers", "1", "--metrics-bind", "off", cwd=folder.root)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    last = last_error_line(result)
    assert "cannot start:" in last and "lifespan startup failed: no database" in last, last
    assert result.stderr.count("no database") == 2, result.stderr  # once when first seen, once last
    assert result.stderr.count("next worker boot in") == 2, result.stderr  # 3 tries, 2 waits


SCOPE_ECHO = (
    "import json\n"
    "async def app(scope, receive, send):\n"
    "    if scope['type'] != 'http':\n"
    "        raise RuntimeError('no lifespan here')\n"
    "    body = json.dumps({'client': scope['client'][0], 'scheme': scope['scheme']}).encode()\n"
    "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
    "    await send({'type': 'http.response.body', 'body': body})\n"
)


def _scope_seen(served: Served, *headers: tuple[str, str]) -> dict:
    import http.client
    import json

    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
    try:
        connection.request("GET", "/", headers=dict(headers))
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ((), {"client": "127.0.0.1", "scheme": "http"}),  # off: the headers are not believed
        (("--proxy-headers",), {"client": "203.0.113.7", "scheme": "https"}),
        (
            ("--proxy-headers", "--forwarded-allow-ips", "10.9.9.9"),
            {"client": "127.0.0.1", "scheme": "http"},
        ),
        (
            ("--proxy-headers", "--forwarded-allow-ips", "*"),
            {"client": "203.0.113.7", "scheme": "https"},
        ),
    ],
)
def test_proxy_headers_are_believed_only_from_allowed_peers(folder, flags, expected):
    folder.write("scopeapp.py", SCOPE_ECHO)
    served = Served(folder.root, "scopeapp:app", "--workers", "1", *flags).start()
    try:
        forwarded = (
            ("X-Forwarded-For", "198.51.100.1, 203.0.113.7"),
            ("X-Forwarded-Proto", "https"),
        )
        assert _scope_seen(served, *forwarded) == expected
    finally:
        served.stop()


def test_interface_names_what_the_app_must_be(folder):
    folder.write("scopeapp.py", SCOPE_ECHO)
    as_native = run_forkloop(
        "scopeapp:app", "--interface", "native", "--no-master", cwd=folder.root
    )
    assert as_native.returncode == 3
    assert "not a forkloop App" in last_error_line(as_native)
    as_asgi = run_forkloop("myapp:app", "--interface", "asgi", "--no-master", cwd=folder.root)
    assert as_asgi.returncode == 3
    assert "is a forkloop App, not an ASGI app (--interface asgi)" in last_error_line(as_asgi)


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_disconnect_grace_must_be_seconds_or_off(folder, value):
    result = run_forkloop(
        "myapp:app", "--disconnect-grace", value, "--check-config", cwd=folder.root
    )
    assert result.returncode == 2
    assert last_error_line(result) == (
        f"forkloop: --disconnect-grace: seconds (0 or more) or off, not {value!r}"
    )
