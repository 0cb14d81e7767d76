"""Subprocesses: ``subprocess_exec``/``subprocess_shell`` and the pipes they need.

A `SubprocessTransport` owns one `subprocess.Popen` child and up to three pipe
transports (stdin, stdout, stderr). Its events reach the
`asyncio.SubprocessProtocol` in this order, as in stdlib asyncio:

1. ``connection_made(transport)`` once every pipe is connected. Anything that
   happened meanwhile (output, the exit itself) is held back and replayed after
   it, in the order it happened.
2. ``pipe_data_received(fd, data)`` and ``pipe_connection_lost(fd, exc)`` for
   each pipe, and ``process_exited()`` when the child ends, in whatever order
   the kernel reports them.
3. ``connection_lost(None)`` once the child has exited *and* every pipe is
   closed; ``_wait()`` (what `asyncio.subprocess.Process.wait` awaits) returns
   the exit status at that moment.

Watching for the exit
---------------------
On Linux a pidfd (``os.pidfd_open``) becomes readable when the child exits, so
the exit is just one more fd on the poller: no SIGCHLD handler, no thread, and
no interference with other code that waits for its own children. The child is
then reaped with ``waitpid(pid, WNOHANG)``. Without pidfds, one daemon thread
per child blocks in ``waitpid`` and reports through ``call_soon_threadsafe``.
Return codes follow `subprocess`: the exit status, or ``-N`` for signal N.
"""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import IO, Any, TypeVar

from .loop import logger
from .loop_part import LoopPart
from .pipes import Pipe, ReadPipeTransport, WritePipeTransport
from .transport_base import AttachedProtocol, wait_until_started

P = TypeVar("P", bound=asyncio.BaseProtocol)
PipeTransportT = TypeVar("PipeTransportT", ReadPipeTransport, WritePipeTransport)
# A program or one of its arguments, as subprocess.Popen takes them.
Argument = str | bytes | os.PathLike[str] | os.PathLike[bytes]
Command = Argument | Sequence[Argument]
# stdin=, stdout=, stderr=: subprocess.PIPE, DEVNULL or STDOUT, an fd, a file, or None.
StandardStream = int | IO[Any] | None


class _PipeProtocol(asyncio.Protocol):
    """Forwards one pipe's events to the subprocess transport, tagged with its fd number."""

    def __init__(self, owner: SubprocessTransport, fd: int) -> None:
        self.owner = owner
        self.fd = fd
        self.pipe: asyncio.BaseTransport | None = None
        self.disconnected = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.pipe = transport

    def data_received(self, data: bytes) -> None:
        self.owner._defer(self.owner._protocol.pipe_data_received, self.fd, data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.disconnected = True
        self.owner._pipe_connection_lost(self.fd, exc)

    def pause_writing(self) -> None:
        self.owner._protocol.pause_writing()

    def resume_writing(self) -> None:
        self.owner._protocol.resume_writing()


class SubprocessTransport(asyncio.SubprocessTransport):
    """One child process and its standard streams."""

    _extra: dict[str, Any]  # asyncio.BaseTransport's, which typeshed does not show
    _protocol: AttachedProtocol  # a SubprocessProtocol; None once connection_lost was called

    def __init__(
        self,
        loop: Subprocesses,
        protocol: asyncio.BaseProtocol,
        args: Command,
        shell: bool,
        stdin: StandardStream,
        stdout: StandardStream,
        stderr: StandardStream,
        bufsize: int,
        waiter: asyncio.Future[None],
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self._loop = loop
        self._protocol = protocol
        self._closed = False
        self._returncode: int | None = None
        self._exit_waiters: list[asyncio.Future[int]] = []
        # Protocol events that happened before connection_made: (callback, arguments).
        self._pending: list[tuple[Callable[..., object], tuple[Any, ...]]] | None = []
        self._pipes: dict[int, _PipeProtocol | None] = {}
        self._finished = False
        self._pidfd: int | None = None
        if stdin == subprocess.PIPE:
            self._pipes[0] = None
        if stdout == subprocess.PIPE:
            self._pipes[1] = None
        if stderr == subprocess.PIPE:
            self._pipes[2] = None
        proc = subprocess.Popen(
            args,
            shell=shell,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            universal_newlines=False,
            bufsize=bufsize,
            **kwargs,
        )
        self._proc: subprocess.Popen[bytes] | None = proc  # None once connection_lost was called
        self._pid = proc.pid
        self._extra["subprocess"] = proc
        self._watch_exit()
        loop.create_task(self._connect_pipes(proc, waiter))

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"pid={self._pid}"
        return f"<{type(self).__name__} {state} returncode={self._returncode}>"

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        if not getattr(self, "_closed", True):
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            self.close()

    # the asyncio.SubprocessTransport interface ---------------------------------------

    def get_pid(self) -> int:
        return self._pid

    def get_returncode(self) -> int | None:
        return self._returncode

    def get_pipe_transport(self, fd: int) -> asyncio.BaseTransport | None:
        pipe = self._pipes.get(fd)
        return None if pipe is None else pipe.pipe

    def send_signal(self, signal: int) -> None:
        if self._proc is None:
            raise ProcessLookupError()
        self._proc.send_signal(signal)

    def terminate(self) -> None:
        if self._proc is None:
            raise ProcessLookupError()
        self._proc.terminate()

    def kill(self) -> None:
        if self._proc is None:
            raise ProcessLookupError()
        self._proc.kill()

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for pipe in self._pipes.values():
            if pipe is not None and pipe.pipe is not None:
                pipe.pipe.close()
        proc = self._proc
        if proc is not None and self._returncode is None and proc.poll() is None:
            if self._loop.get_debug():
                logger.warning("Closing a running child process: killing %r", self)
            try:
                proc.kill()
            except ProcessLookupError:
                pass

    async def _wait(self) -> int:
        """The exit status: at once if known, else once the child exited and its pipes closed."""
        if self._returncode is not None:
            return self._returncode
        waiter: asyncio.Future[int] = self._loop.create_future()
        self._exit_waiters.append(waiter)
        return await waiter

    # wiring -------------------------------------------------------------------------------

    async def _connect_pipes(
        self, proc: subprocess.Popen[bytes], waiter: asyncio.Future[None]
    ) -> None:
        loop = self._loop
        try:
            for fd, pipe in ((0, proc.stdin), (1, proc.stdout), (2, proc.stderr)):
                if pipe is None:
                    continue
                tagged = functools.partial(_PipeProtocol, self, fd)
                if fd == 0:
                    _, protocol = await loop.connect_write_pipe(tagged, pipe)
                else:
                    _, protocol = await loop.connect_read_pipe(tagged, pipe)
                self._pipes[fd] = protocol
            loop.call_soon(self._protocol.connection_made, self)
            for callback, args in self._pending or ():
                loop.call_soon(callback, *args)
            self._pending = None
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            if not waiter.cancelled():
                waiter.set_exception(exc)
        else:
            if not waiter.cancelled():
                waiter.set_result(None)

    def _defer(self, callback: Callable[..., object], *args: Any) -> None:
        """Deliver a protocol event now, or after connection_made if that is still to come."""
        if self._pending is not None:
            self._pending.append((callback, args))
        else:
            self._loop.call_soon(callback, *args)

    def _pipe_connection_lost(self, fd: int, exc: BaseException | None) -> None:
        self._defer(self._protocol.pipe_connection_lost, fd, exc)
        self._try_finish()

    def _watch_exit(self) -> None:
        try:
            pidfd = os.pidfd_open(self._pid)
        except (AttributeError, OSError):
            thread = threading.Thread(
                target=self._wait_in_thread, name=f"reactor-waitpid-{self._pid}", daemon=True
            )
            thread.start()
            return
        self._pidfd = pidfd
        self._loop._poller.set_reader(pidfd, self._on_pidfd_readable)
        self._loop._running_children().add(pidfd)

    def _on_pidfd_readable(self) -> None:
        pidfd, self._pidfd = self._pidfd, None
        if pidfd is None:
            return  # read once already
        self._loop._poller.clear_reader(pidfd)
        self._loop._running_children().discard(pidfd)
        os.close(pidfd)
        self._process_exited(self._reap())

    def _reap(self) -> int:
        try:
            pid, status = os.waitpid(self._pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = 0, 0
        if pid:
            return os.waitstatus_to_exitcode(status)
        proc = self._proc
        if proc is not None and proc.returncode is not None:
            return proc.returncode  # reaped already, by Popen.poll() in close()
        logger.warning("child process %s exited but could not be reaped; using 255", self._pid)
        return 255

    def _wait_in_thread(self) -> None:
        try:
            _, status = os.waitpid(self._pid, 0)
            returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            proc = self._proc
            returncode = (
                proc.returncode if proc is not None and proc.returncode is not None else 255
            )
        try:
            self._loop.call_soon_threadsafe(self._process_exited, returncode)
        except RuntimeError:
            pass  # the loop was closed meanwhile

    def _process_exited(self, returncode: int) -> None:
        if self._returncode is not None:
            return
        self._returncode = returncode
        if self._proc is not None and self._proc.returncode is None:
            self._proc.returncode = returncode  # so that Popen does not try to reap it too
        self._defer(self._protocol.process_exited)
        self._try_finish()

    def _try_finish(self) -> None:
        returncode = self._returncode
        if self._finished or returncode is None:
            return
        if all(pipe is not None and pipe.disconnected for pipe in self._pipes.values()):
            self._finished = True
            self._defer(self._finish, returncode)

    def _finish(self, returncode: int) -> None:
        """The child exited and every pipe closed: connection_lost(None), then the waiters."""
        try:
            self._protocol.connection_lost(None)
        finally:
            waiters, self._exit_waiters = self._exit_waiters, []
            for waiter in waiters:
                if not waiter.cancelled():
                    waiter.set_result(returncode)
            self._proc = None
            self._protocol = None


class Subprocesses(LoopPart):
    """The subprocess and pipe half of the loop's API (mixed into the concrete loop).

    Needs ``self._poller`` and the core (`reactor.loop_part.LoopPart`). The
    loop's ``_close_io`` should call `_close_child_watchers`.
    """

    def _running_children(self) -> set[int]:
        """Pidfds of children not yet exited (made on first use)."""
        try:
            return self._child_pidfds
        except AttributeError:
            self._child_pidfds: set[int] = set()
            return self._child_pidfds

    def _close_child_watchers(self) -> None:
        """The loop is closing: stop watching children that are still running."""
        for pidfd in getattr(self, "_child_pidfds", ()):
            self._poller.clear_reader(pidfd)
            os.close(pidfd)
        self._child_pidfds = set()

    async def subprocess_exec(
        self,
        protocol_factory: Callable[[], P],
        program: Argument,
        *args: Argument,
        stdin: StandardStream = subprocess.PIPE,
        stdout: StandardStream = subprocess.PIPE,
        stderr: StandardStream = subprocess.PIPE,
        universal_newlines: bool = False,
        shell: bool = False,
        bufsize: int = 0,
        encoding: str | None = None,
        errors: str | None = None,
        text: bool | None = None,
        **kwargs: Any,
    ) -> tuple[asyncio.SubprocessTransport, P]:
        if shell:
            raise ValueError("shell must be False")
        _check_binary_mode(universal_newlines, bufsize, encoding, errors, text)
        return await self._start_subprocess(
            protocol_factory, (program, *args), False, stdin, stdout, stderr, bufsize, kwargs
        )

    async def subprocess_shell(
        self,
        protocol_factory: Callable[[], P],
        cmd: str | bytes,
        *,
        stdin: StandardStream = subprocess.PIPE,
        stdout: StandardStream = subprocess.PIPE,
        stderr: StandardStream = subprocess.PIPE,
        universal_newlines: bool = False,
        shell: bool = True,
        bufsize: int = 0,
        encoding: str | None = None,
        errors: str | None = None,
        text: bool | None = None,
        **kwargs: Any,
    ) -> tuple[asyncio.SubprocessTransport, P]:
        if not isinstance(cmd, (bytes, str)):
            raise ValueError("cmd must be a string")
        if not shell:
            raise ValueError("shell must be True")
        _check_binary_mode(universal_newlines, bufsize, encoding, errors, text)
        return await self._start_subprocess(
            protocol_factory, cmd, True, stdin, stdout, stderr, bufsize, kwargs
        )

    async def _start_subprocess(
        self,
        protocol_factory: Callable[[], P],
        args: Command,
        shell: bool,
        stdin: StandardStream,
        stdout: StandardStream,
        stderr: StandardStream,
        bufsize: int,
        kwargs: dict[str, Any],
    ) -> tuple[SubprocessTransport, P]:
        protocol = protocol_factory()
        waiter: asyncio.Future[None] = self.create_future()
        transport = SubprocessTransport(
            self, protocol, args, shell, stdin, stdout, stderr, bufsize, waiter, **kwargs
        )
        try:
            await waiter
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException:
            transport.close()
            await transport._wait()
            raise
        return transport, protocol

    async def connect_read_pipe(
        self, protocol_factory: Callable[[], P], pipe: Pipe
    ) -> tuple[asyncio.ReadTransport, P]:
        return await self._connect_pipe(ReadPipeTransport, protocol_factory, pipe)

    async def connect_write_pipe(
        self, protocol_factory: Callable[[], P], pipe: Pipe
    ) -> tuple[asyncio.WriteTransport, P]:
        return await self._connect_pipe(WritePipeTransport, protocol_factory, pipe)

    async def _connect_pipe(
        self, kind: type[PipeTransportT], protocol_factory: Callable[[], P], pipe: Pipe
    ) -> tuple[PipeTransportT, P]:
        protocol = protocol_factory()
        waiter: asyncio.Future[None] = self.create_future()
        transport = kind(self, pipe, protocol, waiter)
        await wait_until_started(transport, waiter)
        return transport, protocol


def _check_binary_mode(
    universal_newlines: bool,
    bufsize: int,
    encoding: str | None,
    errors: str | None,
    text: bool | None,
) -> None:
    if universal_newlines:
        raise ValueError("universal_newlines must be False")
    if bufsize != 0:
        raise ValueError("bufsize must be 0")
    if text:
        raise ValueError("text must be False")
    if encoding is not None:
        raise ValueError("encoding must be None")
    if errors is not None:
        raise ValueError("errors must be None")
