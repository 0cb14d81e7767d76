"""The master process: bind, pre-fork, supervise, obey nginx's signals.

The master serves no requests. It binds the listening sockets (or inherits
them from a previous master or from systemd), forks the workers, and then
runs one loop, gunicorn's arbiter shape:

    handle the signals recorded since the last turn
    reap_workers()     collect exited children, retire their slots
    murder_workers()   kill workers whose heartbeat is older than --worker-timeout
    manage_workers()   spawn or stop workers to reach the target count
    sleep until a signal or the next heartbeat check

Signal handlers only append the signal to a list; ``signal.set_wakeup_fd``
wakes the loop's ``select``. Everything else happens in the loop, one step at
a time, so no handler ever runs in the middle of a fork or a reap.

Readiness: the master binds its sockets but does not let them listen until
every worker of the first generation has booted (imported the app, built its
loop); then it opens the scoreboard's gate and the workers start accepting.
An orchestrator's probe is refused until the server can answer it whole.

Signals, with the meanings Kubernetes, Docker, systemd and gunicorn users
expect (nginx's, where those agree):

    TERM       graceful shutdown by default (``--term graceful``): listeners
               closed, in-flight requests finish within --graceful-timeout;
               a second TERM makes it fast. ``--term fast`` gives nginx's
               meaning: fast at once
    INT        fast shutdown: workers get SIGINT (cancel in-flight requests,
               answer 503), SIGKILL after a short grace
    QUIT       graceful shutdown, whatever --term says
    HUP        reload: re-read the config file, start new workers, then stop
               the old ones gracefully; if the new ones cannot boot, keep the old
    USR1       reopen log files (here and in every worker)
    USR2       binary upgrade: exec a new master that inherits the listeners
    WINCH      gracefully stop the workers, keep the master (after USR2)
    TTIN/TTOU  one worker more / fewer

Workers are told apart from the upgraded master child by their pids; a worker
that exits before it reports ready has failed to boot. A worker that cannot
load the app writes the one-line reason to the master's boot-error pipe
before it exits, and the master logs it once, however many workers failed
alike. At start an app that cannot load stops the master at once (exit 3);
other boot failures are retried with an exponential back-off, and the master
gives up after a few in a row instead of fork-storming (gunicorn exits on
boot errors too). Later, a worker that cannot boot is retried with the same
back-off while the others serve.

Every log line says what happened from the operator's side: which worker
stopped, and why (``worker 4242 (#2) stopped: fast shutdown requested
(SIGINT)``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import backends, purges
from .apploader import AppLoadError
from .cache_process import UPGRADE_CACHE_ENV, CacheProcessKeeper
from .config import Config
from .listeners import (
    UPGRADE_FDS_ENV,
    UPGRADE_FROM_ENV,
    UPGRADE_METRICS_FD_ENV,
    describe,
    parse_bind,
    remove_unix_sockets,
)
from .logs import configure_logging
from .scoreboard import BOOTING, FREE, READY, STOPPING, Scoreboard
from .worker import stop_kind

log = logging.getLogger("forkloop.master")

BOOT_ERROR_EXIT = 3
FAST_SHUTDOWN_GRACE = 5.0
BOOT_FAILURES_BEFORE_HALT = 3
HANDLED_SIGNALS = tuple(
    getattr(signal, f"SIG{name}")
    for name in ("TERM", "INT", "QUIT", "HUP", "USR1", "USR2", "WINCH", "TTIN", "TTOU", "CHLD")
)


@dataclass(frozen=True)
class Supervision:
    """What a worker needs to know about the master watching it."""

    scoreboard: Scoreboard
    slot: int
    generation: int
    master_pid: int
    heartbeat_interval: float
    max_requests: int  # 0: never retire
    shared_cache: str | None = None  # the cache process's socket, when there is one


@dataclass
class WorkerRecord:
    pid: int
    slot: int
    generation: int
    started: float
    killed_at: float = 0.0  # when SIGABRT was sent for a missed heartbeat
    stopping: bool = False
    why: str = ""  # what the master asked of it, for the line that reports its exit


class BootErrors:
    """The pipe workers write the reason they could not boot to, one line each."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self.by_pid: dict[int, tuple[str, str]] = {}  # pid -> (kind, message)
        self._partial = b""

    def report(self, kind: str, message: str) -> None:
        """Worker side: one write below PIPE_BUF, so lines from workers never interleave."""
        line = f"{os.getpid()}\t{kind}\t{' '.join(message.split())}"[:4000] + "\n"
        with contextlib.suppress(OSError):
            os.write(self.write_fd, line.encode("utf-8", "replace"))

    def collect(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.read_fd, 65536):
                self._partial += chunk
        *lines, self._partial = self._partial.split(b"\n")
        for line in lines:
            pid, _, rest = line.decode("utf-8", "replace").partition("\t")
            kind, _, message = rest.partition("\t")
            if pid.isdigit():
                self.by_pid[int(pid)] = (kind, message)

    def pop(self, pid: int) -> tuple[str, str] | None:
        self.collect()
        return self.by_pid.pop(pid, None)


@dataclass
class Master:
    config: Config
    sockets: list[socket.socket]
    reload_config: Callable[[], Config]
    upgrade_argv: list[str]
    metrics_socket: socket.socket | None = None
    launch_dir: str = field(default_factory=os.getcwd)
    workers: dict[int, WorkerRecord] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.target = self.config.workers
        self.pid_file = self.config.pid_file
        self.generation = 1  # the generation serving now; a reload starts a newer one
        self.generations_started = 1
        self.scoreboard = Scoreboard(max(64, 4 * self.target))
        self.boot_errors = BootErrors()
        self.signals: list[int] = []
        self.stopping: str | None = None  # "fast" | "graceful"
        self.stop_deadline = 0.0
        self.reload_generation: int | None = None  # set while new workers boot on HUP
        self.boot_failures = 0
        self.last_boot_error = ""
        self.next_spawn_at = 0.0
        self.ever_ready = False
        self.upgrade_pid: int | None = None
        self.exit_code = 0
        self.failure = ""  # why the master gave up, when it did
        self.cache_process = CacheProcessKeeper(self.config) if self.config.shared_cache else None
        if self.config.upstreams and self.config.cache:  # a PURGE must reach every worker
            purges.install(purges.PurgeBoard())
        self.unix_addresses = [
            address
            for address in map(parse_bind, self.config.binds)
            if address.family == socket.AF_UNIX
        ]

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        self._write_pid_file()
        wakeup_read, wakeup_write = os.pipe()
        os.set_blocking(wakeup_read, False)
        os.set_blocking(wakeup_write, False)
        signal.set_wakeup_fd(wakeup_write)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, self._record_signal)
        self.wakeup_fds = (wakeup_read, wakeup_write)
        log.info(
            "master %d starting %s on %s, loop %s",
            os.getpid(),
            f"{self.target} worker" + "s" * (self.target != 1),
            ", ".join(describe(sock) for sock in self.sockets) or "reuse-port listeners per worker",
            backends.resolve(self.config.loop).name,
        )
        try:
            while True:
                self._handle_signals()
                self.reap_workers()
                if self.stopping and not self.workers:
                    break
                if self.stopping:
                    self._escalate_shutdown()
                else:
                    if self.cache_process is not None:
                        self.cache_process.keep_running(self._close_in_child)
                    self.murder_workers()
                    self.manage_workers()
                    self.open_gate_when_ready()
                    if self.exit_code:
                        self._stop("fast", None)
                        continue
                self._sleep(wakeup_read)
        finally:
            signal.set_wakeup_fd(-1)
            if self.cache_process is not None:
                self.cache_process.stop()
            self._close_listeners()
            if self.upgrade_pid is None:  # an upgraded master owns the socket files now
                remove_unix_sockets(self.unix_addresses)
            self._remove_pid_file()
        if self.exit_code:
            # the last line an operator reads says why, once
            log.critical("cannot start: %s", self.failure)
        else:
            log.info("master %d exiting", os.getpid())
        return self.exit_code

    def open_gate_when_ready(self) -> None:
        """Let the workers accept once every worker of the first generation has booted."""
        if self.scoreboard.gate_open():
            return
        ready = [r for r in self.workers.values() if self.scoreboard.read(r.slot)[2] == READY]
        if len(ready) < self.target:
            return
        for sock in self.sockets:
            sock.listen(self.config.backlog)
        self.scoreboard.open_gate()
        metrics = ""
        if self.metrics_socket is not None:
            metrics = f"; metrics on {describe(self.metrics_socket)}/metrics"
        log.info(
            "ready: %s serving on %s%s",
            f"{len(ready)} worker" + "s" * (len(ready) != 1),
            ", ".join(describe(sock) for sock in self.sockets) or "reuse-port listeners",
            metrics,
        )

    def _sleep(self, wakeup_read: int) -> None:
        timeout = 0.25 if (self.stopping or self.reload_generation) else 0.5
        if not self.stopping and not self.scoreboard.gate_open():
            timeout = 0.02  # workers report ready in shared memory, not by a signal
        with contextlib.suppress(InterruptedError):
            select.select([wakeup_read], [], [], timeout)
        with contextlib.suppress(BlockingIOError):
            while os.read(wakeup_read, 4096):
                pass

    def _record_signal(self, signum: int, frame: object) -> None:
        self.signals.append(signum)

    def _handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGCHLD:
                continue  # reap_workers() runs every turn
            name = signal.Signals(signum).name
            if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                self._stop(stop_kind(signum, self.config.term, self.stopping), name)
            elif signum == signal.SIGHUP:
                log.info("master %d got SIGHUP: reloading", os.getpid())
                self.reload()
            elif signum == signal.SIGUSR1:
                log.info("master %d got SIGUSR1: reopening log files", os.getpid())
                self.reopen_logs()
            elif signum == signal.SIGUSR2:
                self.upgrade()
            elif signum == signal.SIGWINCH:
                self.target = 0
                log.info(
                    "SIGWINCH: stopping all workers gracefully; the master stays (HUP restarts them)"
                )
            elif signum == signal.SIGTTIN:
                self.target += 1
                log.info("SIGTTIN: one worker more, %d", self.target)
            elif signum == signal.SIGTTOU:
                self.target = max(1, self.target - 1)
                log.info("SIGTTOU: one worker fewer, %d", self.target)

    # ------------------------------------------------------------------ workers

    def spawn_worker(self, generation: int) -> WorkerRecord | None:
        slot = self.scoreboard.free_slot()
        if slot is None:
            log.error("no free scoreboard slot: %d workers already", len(self.workers))
            return None
        config = self.config
        jitter = random.randint(0, config.max_requests_jitter) if config.max_requests_jitter else 0
        # Claimed before the fork: afterwards only the worker writes its slot (a write
        # from here could land after the worker's READY and hide it).
        self.scoreboard.claim(slot, 0, generation)
        pid = os.fork()
        if pid == 0:  # the worker
            self._become_worker(
                slot, generation, config.max_requests + jitter if config.max_requests else 0
            )
        record = WorkerRecord(pid, slot, generation, time.monotonic())
        self.workers[pid] = record
        return record

    def _become_worker(self, slot: int, generation: int, max_requests: int) -> None:
        from .worker import Worker

        exit_code = 0
        try:
            signal.set_wakeup_fd(-1)
            for signum in HANDLED_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                # until the worker's loop installs its own: a stop while booting
                signal.signal(signum, _stop_while_booting)
            for fd in (*self.wakeup_fds, self.boot_errors.read_fd):
                os.close(fd)
            if self.cache_process is not None:
                self.cache_process.close_listener()
            supervision = Supervision(
                self.scoreboard,
                slot,
                generation,
                os.getppid(),
                min(1.0, self.config.worker_timeout / 2),
                max_requests,
                self.cache_process.path if self.cache_process is not None else None,
            )
            self.scoreboard.claim(slot, os.getpid(), generation)
            _set_process_title(f"forkloop: worker process #{slot}")
            worker = Worker(self.config, self.sockets, supervision, self.metrics_socket)
            exit_code = worker.run()
        except StopWhileBooting:
            exit_code = 0
        except AppLoadError as exc:
            self.boot_errors.report("app", str(exc))
            if exc.details:
                log.debug("worker %d could not load the app:\n%s", os.getpid(), exc.details)
            exit_code = BOOT_ERROR_EXIT
        except BaseException as exc:  # noqa: BLE001 - a worker must never return into the master
            booting = self.scoreboard.read(slot)[2] == BOOTING
            if booting:
                self.boot_errors.report("boot", f"{type(exc).__name__}: {exc}")
                log.debug("worker %d failed to boot", os.getpid(), exc_info=True)
            else:
                log.error("worker %d failed: %s", os.getpid(), exc, exc_info=True)
            exit_code = BOOT_ERROR_EXIT if booting else 1
        finally:
            logging.shutdown()
            os._exit(exit_code)

    def reap_workers(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.upgrade_pid:
                self._upgrade_failed(status)
                continue
            if self.cache_process is not None and self.cache_process.reaped(pid, status):
                continue
            record = self.workers.pop(pid, None)
            if record is None:
                continue
            state = self.scoreboard.read(record.slot)[2]
            self.scoreboard.retire(record.slot)
            code = os.waitstatus_to_exitcode(status)
            how = f"exit code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
            name = f"worker {pid} (#{record.slot})"
            if state == BOOTING and not record.stopping:
                self._boot_failed(record, how)
            elif record.killed_at:
                self.scoreboard.count("worker_restarts_timeout")
                log.warning("%s stopped: killed for a missed heartbeat (%s)", name, how)
            elif not (record.stopping or self.stopping):
                if state == STOPPING and code == 0:
                    self.scoreboard.count("worker_restarts_retired")
                    log.info("%s stopped: retired (--max-requests); replacing it", name)
                else:
                    self.scoreboard.count("worker_restarts_died")
                    log.warning("%s died unexpectedly (%s); replacing it", name, how)
            elif self.exit_code:
                log.debug("%s stopped (%s): %s", name, how, record.why)
            elif code == 0:
                log.info("%s stopped: %s", name, record.why or "stop requested")
            else:
                log.warning("%s stopped (%s): %s", name, how, record.why or "stop requested")

    def _boot_failed(self, record: WorkerRecord, how: str) -> None:
        self.scoreboard.count("worker_restarts_boot_failed")
        kind, message = self.boot_errors.pop(record.pid) or ("", "")
        reason = message or f"it exited before it was ready ({how})"
        if record.generation == self.reload_generation:
            log.error("reload failed: %s; keeping the old workers", reason)
            for other in self.workers.values():
                if other.generation == self.reload_generation:
                    other.stopping = True
                    self._signal_worker(other, signal.SIGTERM)
            self.config, self.target = self.before_reload
            self.reload_generation = None
            return
        if self.exit_code:
            return  # already giving up: the reason was logged once
        self.boot_failures += 1
        if not self.ever_ready and (
            kind == "app" or self.boot_failures >= BOOT_FAILURES_BEFORE_HALT
        ):
            # an app that cannot be imported will not import on a second try
            self.failure = reason
            self.exit_code = BOOT_ERROR_EXIT
            return
        delay = min(0.1 * 2**self.boot_failures, 5.0)
        self.next_spawn_at = time.monotonic() + delay
        if reason != self.last_boot_error:
            log.error("worker %d could not boot: %s", record.pid, reason)
            self.last_boot_error = reason
        log.info("next worker boot in %.1fs (failure %d in a row)", delay, self.boot_failures)

    def murder_workers(self) -> None:
        """Kill workers whose loop has not beaten for --worker-timeout (SIGABRT, then SIGKILL)."""
        now = time.monotonic()
        for record in list(self.workers.values()):
            _, _, state, heartbeat = self.scoreboard.read(record.slot)
            if state == FREE:
                continue
            if record.killed_at:
                if now - record.killed_at > 1.0:
                    self._signal_worker(record, signal.SIGKILL)
                continue
            if now - heartbeat > self.config.worker_timeout:
                log.error(
                    "worker %d (#%d) missed its heartbeat for %.1fs: killing it",
                    record.pid,
                    record.slot,
                    now - heartbeat,
                )
                record.killed_at = now
                record.stopping = True
                self._signal_worker(record, signal.SIGABRT)

    def manage_workers(self) -> None:
        ready = [r for r in self.workers.values() if self.scoreboard.read(r.slot)[2] == READY]
        if ready:
            self.ever_ready = True
            if self.boot_failures and any(r.generation == self.generation for r in ready):
                self.boot_failures = 0
                self.last_boot_error = ""
        if self.reload_generation is not None:
            self._advance_reload()
            return
        current = [r for r in self.workers.values() if not r.stopping]
        if len(current) < self.target and time.monotonic() >= self.next_spawn_at:
            for _ in range(self.target - len(current)):
                self.spawn_worker(self.generation)
        elif len(current) > self.target:
            for record in sorted(current, key=lambda r: r.started)[: len(current) - self.target]:
                self._stop_worker(record, "fewer workers wanted (graceful)")

    # ------------------------------------------------------------------ reload / upgrade

    def reload(self) -> None:
        try:
            config = self.reload_config()
        except Exception as exc:  # noqa: BLE001 - any bad config keeps the old workers
            log.error(
                "reload failed: cannot read the configuration (%s); keeping the old workers", exc
            )
            return
        bound = (
            "binds",
            "reuse_port",
            "metrics_bind",
            "backlog",
            "chdir",
            "app_dir",
            "pid_file",
            "shared_cache",  # the cache process outlives reloads: its entries stay
            "shared_cache_size",
        )
        changed = [name for name in bound if getattr(config, name) != getattr(self.config, name)]
        if changed:
            log.warning(
                "reload keeps %s as they are: changing them needs an upgrade (USR2)",
                ", ".join(name.replace("_", "-") for name in changed),
            )
            config = dataclasses.replace(
                config, **{name: getattr(self.config, name) for name in bound}
            )
        if config.log_level != self.config.log_level:
            configure_logging(config.log_level)
        self.before_reload = (self.config, self.target)
        self.config = config
        self.target = config.workers
        self.generations_started += 1
        self.reload_generation = self.generations_started
        log.info(
            "reload: starting %d workers of generation %d", self.target, self.reload_generation
        )
        for _ in range(self.target):
            self.spawn_worker(self.reload_generation)

    def _advance_reload(self) -> None:
        new = [
            r
            for r in self.workers.values()
            if r.generation == self.reload_generation and not r.stopping
        ]
        if not new or not all(self.scoreboard.read(r.slot)[2] == READY for r in new):
            return
        for record in self.workers.values():
            if record.generation != self.reload_generation and not record.stopping:
                self._stop_worker(record, "replaced by a reload (graceful)")
        log.info(
            "reload: generation %d serving; old workers stop gracefully", self.reload_generation
        )
        self.generation = self.reload_generation or self.generation
        self.reload_generation = None

    def reopen_logs(self) -> None:
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.close()  # reopened on the next record
        for record in self.workers.values():
            self._signal_worker(record, signal.SIGUSR1)

    def upgrade(self) -> None:
        if self.upgrade_pid is not None:
            log.warning("an upgrade is already under way (new master %d)", self.upgrade_pid)
            return
        fds = [sock.fileno() for sock in self.sockets]
        for fd in fds:
            os.set_inheritable(fd, True)
        if self.pid_file:
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.pid_file, self.pid_file + ".oldbin")
        environment = {
            **os.environ,
            UPGRADE_FDS_ENV: ",".join(map(str, fds)),
            UPGRADE_FROM_ENV: str(os.getpid()),
        }
        if self.metrics_socket is not None:
            os.set_inheritable(self.metrics_socket.fileno(), True)
            environment[UPGRADE_METRICS_FD_ENV] = str(self.metrics_socket.fileno())
        if self.cache_process is not None:  # the new cache process copies this one's entries
            environment[UPGRADE_CACHE_ENV] = self.cache_process.path
        argv = [sys.executable, "-m", "forkloop", *self.upgrade_argv]
        pid = os.fork()
        if pid == 0:
            try:
                os.chdir(self.launch_dir)  # relative paths in the argv mean what they meant
                os.execve(sys.executable, argv, environment)
            finally:
                os._exit(127)
        self.upgrade_pid = pid
        log.info(
            "upgrade: new master %d started; WINCH then QUIT this master (%d)", pid, os.getpid()
        )

    def _upgrade_failed(self, status: int) -> None:
        log.error("upgrade: the new master exited (%s); this master carries on", status)
        self.upgrade_pid = None
        if self.pid_file:
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.pid_file + ".oldbin", self.pid_file)

    # ------------------------------------------------------------------ shutdown

    def _stop(self, how: str, signal_name: str | None) -> None:
        """Stop every worker, ``how`` = "graceful" or "fast"; None: the master gives up."""
        if self.stopping == "fast" or self.stopping == how:
            log.info("master %d got %s: already stopping (%s)", os.getpid(), signal_name, how)
            return
        why = f"{how} shutdown requested ({signal_name})"
        if self.stopping == "graceful":
            why = f"fast shutdown requested ({signal_name} during the graceful one)"
        if signal_name is None:
            why = "the master could not start the server"
        elif how == "graceful":
            log.info(
                "master %d got %s: graceful shutdown, in-flight requests get up to %gs "
                "(another SIGTERM or SIGINT: fast)",
                os.getpid(),
                signal_name,
                self.config.graceful_timeout,
            )
        else:
            log.info("master %d got %s: fast shutdown", os.getpid(), signal_name)
        self.stopping = how
        self._close_listeners()  # new connections are refused once workers close theirs too
        grace = FAST_SHUTDOWN_GRACE
        if how == "graceful":
            grace += self.config.graceful_timeout
        self.stop_deadline = time.monotonic() + grace
        # SIGINT means fast to a worker whatever --term says; SIGQUIT means graceful.
        stop_signal = signal.SIGINT if how == "fast" else signal.SIGQUIT
        for record in self.workers.values():
            record.stopping = True
            record.why = why
            self._signal_worker(record, stop_signal)

    def _close_listeners(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []
        if self.metrics_socket is not None:
            self.metrics_socket.close()
            self.metrics_socket = None

    def _escalate_shutdown(self) -> None:
        if time.monotonic() > self.stop_deadline:
            for record in self.workers.values():
                log.warning("worker %d still alive after the grace: SIGKILL", record.pid)
                self._signal_worker(record, signal.SIGKILL)
            self.stop_deadline = time.monotonic() + 1.0

    def _stop_worker(self, record: WorkerRecord, why: str) -> None:
        record.stopping = True
        record.why = why
        self._signal_worker(record, signal.SIGQUIT)

    def _close_in_child(self) -> None:
        """In a forked child that is not a worker: the master's descriptors go."""
        signal.set_wakeup_fd(-1)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        for fd in (*self.wakeup_fds, self.boot_errors.read_fd, self.boot_errors.write_fd):
            os.close(fd)
        for sock in self.sockets:
            sock.close()
        if self.metrics_socket is not None:
            self.metrics_socket.close()

    def _signal_worker(self, record: WorkerRecord, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signum)

    # ------------------------------------------------------------------ pid file

    def _write_pid_file(self) -> None:
        if self.pid_file:
            with open(self.pid_file + ".tmp", "w") as handle:
                handle.write(f"{os.getpid()}\n")
            os.replace(self.pid_file + ".tmp", self.pid_file)

    def _remove_pid_file(self) -> None:
        """Remove the pid file (or its .oldbin after an upgrade) if it still names us."""
        for path in (self.pid_file, f"{self.pid_file}.oldbin") if self.pid_file else ():
            with contextlib.suppress(OSError), open(path) as handle:
                if handle.read().strip() == str(os.getpid()):
                    os.unlink(path)


class StopWhileBooting(BaseException):
    """A stop signal reached a worker before its loop was there to take it."""


def _stop_while_booting(signum: int, frame: object) -> None:
    raise StopWhileBooting


def _set_process_title(title: str) -> None:
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(title)
