"""``--reload``: restart the workers when the app's code changes (development only).

The master stays as it is and keeps the sockets; only the workers are
replaced, exactly as on SIGHUP: new workers import the code as it is on disk
now, and only once they have booted are the old ones stopped gracefully. An
edit that leaves a syntax error therefore costs nothing: the reload fails
with one line naming the file and line, the old workers keep serving, and the
next save is tried again.

The watching runs in a process of its own (``python -m
forkloop.server.reloader``), started by the master with a fresh interpreter:
no thread in the master that would be copied half-way into every forked
worker, and none of the master's sockets held open by it (a listener kept
open by a watcher would queue connections nobody accepts after a stop). It
uses `watchfiles` (an optional extra: ``pip install 'forkloop[reload]'``),
which batches the events of one save, and sends SIGHUP to the master for each
batch that touches a ``.py`` file. It exits with the master (the kernel's
parent-death signal, and a check of its parent on every wake-up), on SIGINT
and on SIGTERM, quietly.

Reload is never on by default: a production server does not watch its files.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading

from .apploader import base_directory
from .config import Config
from .logs import configure_logging

log = logging.getLogger("forkloop.reload")


def watched_directory(config: Config, launch_dir: str) -> str:
    """The app's directory: ``--app-dir`` under ``--chdir`` (or where forkloop started)."""
    return os.path.abspath(os.path.join(base_directory(config, launch_dir), config.app_dir))


def start_reloader(config: Config, launch_dir: str) -> subprocess.Popen[bytes]:
    """Start the watcher for this (master) process; the master reaps it with its workers."""
    directory = watched_directory(config, launch_dir)
    command = [sys.executable, "-m", "forkloop.server.reloader", str(os.getpid()), directory]
    command += ["--log-level", config.log_level]
    return subprocess.Popen(command)  # fds are not inherited: no socket of the master's


def watch(master_pid: int, directory: str) -> None:
    import watchfiles

    stop = threading.Event()

    def leave(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, leave)
    signal.signal(signal.SIGTERM, leave)
    _exit_with_parent()
    changes_seen = watchfiles.watch(
        directory,
        watch_filter=watchfiles.PythonFilter(),
        stop_event=stop,
        debounce=200,
        step=50,
        rust_timeout=200,
        yield_on_timeout=True,
        raise_interrupt=False,
    )
    watching = False
    for changes in changes_seen:
        if os.getppid() != master_pid:
            return
        if not watching:  # the first wake-up: the watch is in place
            log.info("reload: watching the .py files under %s (development only)", directory)
            watching = True
        if not changes:
            continue
        files = sorted({os.path.relpath(path, directory) for _, path in changes})
        log.info("reload: %s changed; restarting the workers", ", ".join(files[:5]))
        try:
            os.kill(master_pid, signal.SIGHUP)
        except ProcessLookupError:
            return


def _exit_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forkloop-reloader")
    parser.add_argument("master_pid", type=int)
    parser.add_argument("directory")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    watch(args.master_pid, args.directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
