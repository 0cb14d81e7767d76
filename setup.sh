#!/usr/bin/env sh
# Everything the tests and benchmarks need, on a fresh Debian/Ubuntu machine:
# the system tools (wrk drives the benchmarks' HTTP load; redis-server, Debian's
# Redis 7, is the store the fleet-cache tests start; nginx is the peer of
# forkloop bench --proxy, started with its own config, never as a service) and a virtualenv in
# .venv with forkloop installed editable, its test and load-test extras
# (pytest, locust, Starlette, FastAPI, the peers uvicorn, granian and hypercorn),
# ruff and mypy. Safe to run again: it installs only what is missing.
set -eu
cd "$(dirname "$0")"

SYSTEM_PACKAGES="wrk redis-server nginx"
missing=""
for tool in $SYSTEM_PACKAGES; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || missing="$missing $tool"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" -eq 0 ]; then
        as_root=""
    elif command -v sudo >/dev/null 2>&1; then
        as_root="sudo"
    else
        echo "setup.sh: needs$missing; install them (apt-get install$missing) or run as root" >&2
        exit 2
    fi
    $as_root apt-get update -qq
    $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[test,loadtest]'
