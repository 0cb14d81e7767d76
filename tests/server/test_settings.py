"""Settings as a user types them: flags, environment, config file, and every bad input.

Each bad input must stop `forkloop` with one line on stderr that names what
was wrong (the flag, the variable, the file and key) and what was expected,
exit status 2 for usage and configuration, 3 for a server that cannot start,
and never a traceback. Each command runs as a real process from a user's
folder that holds a ``server.py`` of its own.
"""

from __future__ import annotations

import argparse
import socket

import pytest

from forkloop.server import settings
from forkloop.server.config import DEFAULT_BIND
from tests.server.frontdoor_support import (
    Served,
    UserFolder,
    clean_environment,
    last_error_line,
    run_forkloop,
)


@pytest.fixture
def folder(tmp_path):
    return UserFolder(tmp_path / "project")


def assert_one_line_error(result, code: int, *fragments: str) -> None:
    line = last_error_line(result)
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for fragment in fragments:
        assert fragment in line, line


@pytest.mark.parametrize(
    ("arguments", "fragments"),
    [
        (["--workers", "0"], ["--workers must be at least 1, not 0"]),
        (["--workers", "-1"], ["--workers must be at least 1, not -1"]),
        (["--workers", "two"], ["--workers", "expected an integer, not 'two'"]),
        (["--bind", "127.0.0.1:99999"], ["port 99999 is not between 0 and 65535"]),
        (["--bind", "http://127.0.0.1:8000"], ["has a scheme", "e.g. 127.0.0.1:8000"]),
        (["--bind", "::1:8000"], ["must be in brackets: [::1]:8000"]),
        (["--port", "8000", "--bind", "127.0.0.1:8001"], ["use --bind HOST:PORT"]),
        (["--graceful-timeout", "-1"], ["--graceful-timeout must be at least 0"]),
        (["--worker-timeout", "0"], ["--worker-timeout must be more than 0"]),
        (["--wrokers", "2"], ["unknown option --wrokers", "did you mean --workers"]),
        (["127.0.0.1"], ["'127.0.0.1' is not an app", "--bind 127.0.0.1:8000"]),
        (["--loop", "nonesuch"], ["invalid choice: 'nonesuch'"]),
        (["--health-path", "healthz"], ["--health-path", "starting with '/'"]),
        (["--access-log-format", "{nope}"], ["unknown field {nope}", "{status}"]),
        (["--keyfile", "key.pem"], ["--keyfile needs --certfile"]),
        (["--certfile", "missing.pem"], ["cannot read --certfile", "missing.pem: no such file"]),
        (["--app-dir", "nowhere", "myapp:app"], ["--app-dir", "nowhere is not a directory"]),
    ],
)
def test_bad_command_line_is_one_line_and_exit_2(folder, arguments, fragments):
    result = run_forkloop(*arguments, cwd=folder.root)
    assert_one_line_error(result, 2, *fragments)


def test_invalid_certificate_names_the_files(folder):
    folder.write("cert.pem", "not a certificate\n")
    result = run_forkloop("--certfile", "cert.pem", cwd=folder.root)
    assert_one_line_error(result, 2, "cert.pem", "for TLS", "expected PEM")


@pytest.mark.parametrize(
    ("toml", "fragments"),
    [
        ('workers = "two"\n', ["forkloop.toml: workers must be an integer, not the string 'two'"]),
        ("workers = 0\n", ["forkloop.toml: workers must be at least 1, not 0"]),
        ("wokers = 2\n", ["forkloop.toml: unknown setting 'wokers'", "did you mean 'workers'"]),
        ("workers = [not toml\n", ["forkloop.toml is not valid TOML", "line 1"]),
        ("reuse_port = 1\n", ["reuse_port must be true or false, not the integer 1"]),
        ("bind = 8000\n", ["bind must be a list of strings, not the integer 8000"]),
        ('bind = "http://0.0.0.0:80"\n', ["forkloop.toml: bind", "has a scheme"]),
        ('app = "not an app"\n', ["forkloop.toml: app", "is not an app"]),
    ],
)
def test_bad_config_file_names_the_file_and_key(folder, toml, fragments):
    folder.write("forkloop.toml", toml)
    result = run_forkloop("--config", "forkloop.toml", cwd=folder.root)
    assert_one_line_error(result, 2, *fragments)


def test_missing_config_file_is_one_line(folder):
    result = run_forkloop("-c", "nowhere.toml", cwd=folder.root)
    assert_one_line_error(result, 2, "cannot read --config", "nowhere.toml: no such file")


@pytest.mark.parametrize(
    ("variable", "value", "fragments"),
    [
        ("FORKLOOP_WORKERS", "0", ["FORKLOOP_WORKERS='0'", "--workers must be at least 1"]),
        ("WEB_CONCURRENCY", "lots", ["WEB_CONCURRENCY='lots'", "expected an integer"]),
        ("FORKLOOP_ACCESS_LOG", "maybe", ["FORKLOOP_ACCESS_LOG='maybe'", "true or false"]),
        ("FORKLOOP_TERM", "slow", ["FORKLOOP_TERM='slow'", "graceful, fast"]),
    ],
)
def test_bad_environment_variable_is_named(folder, variable, value, fragments):
    result = run_forkloop(cwd=folder.root, env=clean_environment(**{variable: value}))
    assert_one_line_error(result, 2, *fragments)


def test_version_is_printed_and_exits_0(folder):
    for arguments in (["--version"], ["serve", "--version"]):
        if arguments[0] == "serve":
            import subprocess
            import sys

            result = subprocess.run(
                [sys.executable, "-c", "import sys; from forkloop.server.cli import main; "
                 "sys.exit(main())", *arguments],
                cwd=folder.root, capture_output=True, text=True, timeout=30,
            )  # fmt: skip
        else:
            result = run_forkloop(*arguments, cwd=folder.root)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("forkloop "), result.stdout


def test_help_shows_every_default_and_the_environment(folder):
    result = run_forkloop("--help", cwd=folder.root)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for fragment in (
        "--worker-timeout WORKER_TIMEOUT a worker whose event loop is blocked this long "
        "(seconds) is killed and replaced (default 30.0)",
        "(default 0: never)",  # --max-requests
        "finish on a graceful stop (default 30.0)",
        "error log level (default info)",
        "listen() backlog per socket (default 2048)",
        "(default: the CPU count, also read from WEB_CONCURRENCY)",
        "FORKLOOP_<OPTION>",
        "--host",
        "--uds",
        "--metrics-bind",
    ):
        assert fragment in text, fragment
    for line in result.stdout.split("\n  -")[1:]:
        option = line.split()[0]
        if option in ("h,", "-help", "-check-config", "-version"):
            continue
        assert "default" in line, f"no default shown for -{option}"


def test_host_and_port_are_a_shorthand_for_bind(folder):
    port = _free_port()
    served = Served(folder.root, "myapp:app", "--host", "127.0.0.1", "--port", str(port),
                    "--workers", "1", bind=False, port=port)  # fmt: skip
    try:
        served.start()
        assert served.get("/") == (200, b"hello from the user's app")
    finally:
        served.stop()


def test_flags_win_over_environment_over_config_file(folder):
    folder.write("forkloop.toml", 'workers = 3\nmax_body_size = 10\nlog_level = "warning"\n')
    base = str(folder.root)
    namespace = argparse.Namespace(config="forkloop.toml", workers=1)
    environ = {"FORKLOOP_WORKERS": "2", "WEB_CONCURRENCY": "5", "FORKLOOP_MAX_BODY_SIZE": "20"}
    config = settings.resolve(namespace, environ, base)
    assert config.workers == 1  # the flag
    assert config.limits.max_body_size == 20  # the environment over the file
    assert config.log_level == "warning"  # the file over the default
    config = settings.resolve(argparse.Namespace(config="forkloop.toml"), environ, base)
    assert config.workers == 2  # FORKLOOP_WORKERS before WEB_CONCURRENCY
    config = settings.resolve(argparse.Namespace(), {"WEB_CONCURRENCY": "5"}, base)
    assert config.workers == 5
    assert config.binds == (DEFAULT_BIND,)


def test_environment_sets_any_option_including_bind_and_flags(folder):
    port = _free_port()
    environment = clean_environment(
        FORKLOOP_BIND=f"127.0.0.1:{port}", FORKLOOP_WORKERS="1", FORKLOOP_ACCESS_LOG="false",
        FORKLOOP_APP="myapp:app",
    )  # fmt: skip
    served = Served(folder.root, env=environment, bind=False, port=port)
    try:
        served.start()
        assert served.get("/") == (200, b"hello from the user's app")
        assert len(served.workers()) == 1
        assert served.access_path.read_text() == ""  # FORKLOOP_ACCESS_LOG=false
    finally:
        served.stop()


def test_check_config_validates_and_exits_without_serving(folder):
    folder.write("forkloop.toml", 'app = "myapp:app"\nworkers = 2\n')
    result = run_forkloop("--check-config", "-c", "forkloop.toml", cwd=folder.root)
    assert result.returncode == 0, result.stderr
    assert "configuration OK: app myapp:app, 2 workers" in result.stdout
    folder.write("myapp.py", "this is not python (\n")
    result = run_forkloop("--check-config", "-c", "forkloop.toml", cwd=folder.root)
    assert result.returncode == 3
    assert "myapp.py:1: SyntaxError" in last_error_line(result)


def test_port_held_by_another_server_is_refused_even_with_reuse_port(folder):
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        result = run_forkloop(
            "myapp:app", "--reuse-port", "--bind", f"127.0.0.1:{port}", "--metrics-bind", "off",
            cwd=folder.root,
        )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert "another process already serves this port" in last_error_line(result)


def _free_port() -> int:
    from forkloop.loadtest.servers import free_port

    return free_port()


def test_sizes_take_nginx_units_on_the_command_line_in_the_environment_and_in_a_file(folder):
    folder.write("forkloop.toml", 'cache-size = "1GiB"\nshared-cache-size = 4096\n')
    namespace = argparse.Namespace(config="forkloop.toml")
    config = settings.resolve(namespace, {"FORKLOOP_WS_MAX_SIZE": "64k"}, str(folder.root))
    assert (config.cache_size, config.shared_cache_size) == (1 << 30, 4096)
    assert config.websocket.max_size == 64 << 10
    command_line = run_forkloop("--cache-size", "256MiB", "--check-config", cwd=folder.root)
    assert command_line.returncode == 0, command_line.stderr
    for size in ("256m", "256MB", "256 MiB"):
        assert settings.byte_size(size) == 256 << 20
    refused = run_forkloop("--cache-size", "lots", cwd=folder.root)
    assert refused.returncode == 2
    assert last_error_line(refused) == (
        "forkloop: argument --cache-size: expected a size in bytes (4096, 64KiB, 256MiB, "
        "1GiB), not 'lots'"
    )
