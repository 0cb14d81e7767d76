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

Signals, with nginx's meanings:

    TERM, INT  fast shutdown: workers get SIGTERM, SIGKILL after a short grace
    QUIT       graceful shutdown: listeners closed, in-flight requests finish
    HUP        reload: re-read the config file, start new workers, then stop
               the old ones gracefully; if the new ones cannot boot, keep the old
    USR1       reopen log files (here and in every worker)
    USR2       binary upgrade: exec a new master that inherits the listeners
    WINCH      gracefully stop the workers, keep the master (after USR2)
    TTIN/TTOU  one worker more / fewer

Workers are told apart from the upgraded master child by their pids; a worker
that exits before it reports ready has failed to boot. Boots that keep
failing back off exponentially, and at start the master gives up after a few
in a row instead of fork-storming (gunicorn exits on boot errors too).
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

from .config import Config
from .listeners import describe
from .scoreboard import BOOTING, FREE, READY, Scoreboard

log = logging.getLogger("forkloop.master")

BOOT_ERROR_EXIT = 3
FAST_SHUTDOWN_GRACE = 5.0
BOOT_FAILURES_BEFORE_HALT = 3
HANDLED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGCHLD,
)
UPGRADE_FDS_ENV = "FORKLOOP_LISTEN_FDS"


@dataclass(frozen=True)
class Supervision:
    """What a worker needs to know about the master watching it."""

    scoreboard: Scoreboard
    slot: int
    generation: int
    master_pid: int
    heartbeat_interval: float
    max_requests: int  # 0: never retire


@dataclass
class WorkerRecord:
    pid: int
    slot: int
    generation: int
    started: float
    killed_at: float = 0.0  # when SIGABRT was sent for a missed heartbeat
    stopping: bool = False


@dataclass
class Master:
    config: Config
    sockets: list[socket.socket]
    reload_config: Callable[[], Config]
    upgrade_argv: list[str]
    pid_file: str | None = None
    worker_timeout: float = 30.0
    graceful_timeout: float = 30.0
    max_requests: int = 0
    max_requests_jitter: int = 0
    workers: dict[int, WorkerRecord] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.target = self.config.workers
        self.generation = 1  # the generation serving now; a reload starts a newer one
        self.generations_started = 1
        self.scoreboard = Scoreboard(max(64, 4 * self.target))
        self.signals: list[int] = []
        self.stopping: str | None = None  # "fast" | "graceful"
        self.stop_deadline = 0.0
        self.reload_generation: int | None = None  # set while new workers boot on HUP
        self.boot_failures = 0
        self.next_spawn_at = 0.0
        self.ever_ready = False
        self.upgrade_pid: int | None = None
        self.exit_code = 0

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
            "master %d started: %d workers, loop %s, %s",
            os.getpid(),
            self.target,
            self.config.loop,
            ", ".join(describe(sock) for sock in self.sockets) or "reuse-port listeners per worker",
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
                    self.murder_workers()
                    self.manage_workers()
                    if self.exit_code:
                        self._stop("fast")
                        continue
                self._sleep(wakeup_read)
        finally:
            signal.set_wakeup_fd(-1)
            for sock in self.sockets:
                sock.close()
            self._remove_pid_file()
        log.info("master %d exiting", os.getpid())
        return self.exit_code

    def _sleep(self, wakeup_read: int) -> None:
        timeout = 0.25 if (self.stopping or self.reload_generation) else 0.5
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
            log.info("master %d got %s", os.getpid(), signal.Signals(signum).name)
            if signum in (signal.SIGTERM, signal.SIGINT):
                self._stop("fast")
            elif signum == signal.SIGQUIT:
                self._stop("graceful")
            elif signum == signal.SIGHUP:
                self.reload()
            elif signum == signal.SIGUSR1:
                self.reopen_logs()
            elif signum == signal.SIGUSR2:
                self.upgrade()
            elif signum == signal.SIGWINCH:
                self.target = 0
                log.info("stopping all workers gracefully; the master stays (HUP restarts them)")
            elif signum == signal.SIGTTIN:
                self.target += 1
            elif signum == signal.SIGTTOU:
                self.target = max(1, self.target - 1)

    # ------------------------------------------------------------------ workers

    def spawn_worker(self, generation: int) -> WorkerRecord | None:
        slot = self.scoreboard.free_slot()
        if slot is None:
            log.error("no free scoreboard slot: %d workers already", len(self.workers))
            return None
        jitter = random.randint(0, self.max_requests_jitter) if self.max_requests_jitter else 0
        # Claimed before the fork: afterwards only the worker writes its slot (a write
        # from here could land after the worker's READY and hide it).
        self.scoreboard.claim(slot, 0, generation)
        pid = os.fork()
        if pid == 0:  # the worker
            self._become_worker(
                slot, generation, self.max_requests + jitter if self.max_requests else 0
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
            for fd in self.wakeup_fds:
                os.close(fd)
            supervision = Supervision(
                self.scoreboard,
                slot,
                generation,
                os.getppid(),
                min(1.0, self.worker_timeout / 2),
                max_requests,
            )
            self.scoreboard.claim(slot, os.getpid(), generation)
            _set_process_title(f"forkloop: worker process #{slot}")
            worker = Worker(self.config, self.sockets, self.graceful_timeout, supervision)
            exit_code = worker.run()
        except BaseException as exc:  # noqa: BLE001 - a worker must never return into the master
            log.error(
                "worker %d failed: %s", os.getpid(), exc, exc_info=not isinstance(exc, ImportError)
            )
            exit_code = BOOT_ERROR_EXIT if self.scoreboard.read(slot)[2] == BOOTING else 1
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
            record = self.workers.pop(pid, None)
            if record is None:
                continue
            state = self.scoreboard.read(record.slot)[2]
            self.scoreboard.retire(record.slot)
            code = os.waitstatus_to_exitcode(status)
            how = f"exit code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
            if state == BOOTING and not record.stopping:
                self._boot_failed(record, how)
            elif not (record.stopping or self.stopping):
                log.warning("worker %d (#%d) died unexpectedly (%s)", pid, record.slot, how)
            else:
                log.info("worker %d (#%d) exited (%s)", pid, record.slot, how)

    def _boot_failed(self, record: WorkerRecord, how: str) -> None:
        if record.generation == self.reload_generation:
            log.error(
                "reload failed: a new worker could not boot (%s); keeping the old workers", how
            )
            for other in self.workers.values():
                if other.generation == self.reload_generation:
                    other.stopping = True
                    self._signal_worker(other, signal.SIGTERM)
            self.config, self.target = self.before_reload
            self.reload_generation = None
            return
        self.boot_failures += 1
        delay = min(0.1 * 2**self.boot_failures, 5.0)
        self.next_spawn_at = time.monotonic() + delay
        log.error("worker %d failed to boot (%s); next try in %.1fs", record.pid, how, delay)
        if not self.ever_ready and self.boot_failures >= BOOT_FAILURES_BEFORE_HALT:
            log.critical(
                "workers failed to boot %d times in a row; the master stops (see the errors above)",
                self.boot_failures,
            )
            self.exit_code = BOOT_ERROR_EXIT

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
            if now - heartbeat > self.worker_timeout:
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
        if self.reload_generation is not None:
            self._advance_reload()
            return
        current = [r for r in self.workers.values() if not r.stopping]
        if len(current) < self.target and time.monotonic() >= self.next_spawn_at:
            for _ in range(self.target - len(current)):
                self.spawn_worker(self.generation)
        elif len(current) > self.target:
            for record in sorted(current, key=lambda r: r.started)[: len(current) - self.target]:
                self._stop_worker(record)

    # ------------------------------------------------------------------ reload / upgrade

    def reload(self) -> None:
        try:
            config = self.reload_config()
        except Exception as exc:  # noqa: BLE001 - any bad config keeps the old workers
            log.error(
                "reload failed: cannot read the configuration (%s); keeping the old workers", exc
            )
            return
        if config.binds != self.config.binds or config.reuse_port != self.config.reuse_port:
            log.warning(
                "reload keeps the current listeners: changing --bind needs an upgrade (USR2)"
            )
            config = dataclasses.replace(
                config, binds=self.config.binds, reuse_port=self.config.reuse_port
            )
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
                self._stop_worker(record)
        log.info(
            "reload: generation %d serving; old workers stop gracefully", self.reload_generation
        )
        self.generation = self.reload_generation
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
        environment = {**os.environ, UPGRADE_FDS_ENV: ",".join(map(str, fds))}
        argv = [sys.executable, "-m", "forkloop", *self.upgrade_argv]
        pid = os.fork()
        if pid == 0:
            try:
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

    def _stop(self, how: str) -> None:
        if self.stopping == "fast" or self.stopping == how:
            return
        self.stopping = how
        for sock in self.sockets:  # new connections are refused once workers close theirs
            sock.close()
        self.sockets = []
        grace = (
            FAST_SHUTDOWN_GRACE if how == "fast" else self.graceful_timeout + FAST_SHUTDOWN_GRACE
        )
        self.stop_deadline = time.monotonic() + grace
        stop_signal = signal.SIGTERM if how == "fast" else signal.SIGQUIT
        for record in self.workers.values():
            record.stopping = True
            self._signal_worker(record, stop_signal)

    def _escalate_shutdown(self) -> None:
        if time.monotonic() > self.stop_deadline:
            for record in self.workers.values():
                log.warning("worker %d still alive after the grace: SIGKILL", record.pid)
                self._signal_worker(record, signal.SIGKILL)
            self.stop_deadline = time.monotonic() + 1.0

    def _stop_worker(self, record: WorkerRecord) -> None:
        record.stopping = True
        self._signal_worker(record, signal.SIGQUIT)

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
        if not self.pid_file:
            return
        with contextlib.suppress(OSError):
            with open(self.pid_file) as handle:
                if handle.read().strip() == str(os.getpid()):
                    os.unlink(self.pid_file)
        with contextlib.suppress(OSError):
            with open(self.pid_file + ".oldbin") as handle:
                if handle.read().strip() == str(os.getpid()):
                    os.unlink(self.pid_file + ".oldbin")


def _set_process_title(title: str) -> None:
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(title)
