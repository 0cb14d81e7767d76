"""Where a zero-copy send starts to pay: the sender's CPU per MiB, copied against zero-copy.

    python -m forkloop.loadtest.zerocopy                        # over loopback, 16 KiB .. 4 MiB
    python -m forkloop.loadtest.zerocopy --sink --port 9000     # on another host: the receiver
    python -m forkloop.loadtest.zerocopy --peer HOST:9000       # here: send to it over the NIC

The proactor's transports send a body of at least
`proactor.sending.ZERO_COPY_SEND_FROM` bytes with ``IORING_OP_SEND_ZC`` (the
kernel sends from the body's own pages and says with a second completion
when it has let go of them) instead of ``IORING_OP_SEND`` (the kernel copies
the body into socket buffers first), to peers on other hosts only. This
script measures the trade where the transport makes it: through forkloop's
ring (`proactor.ring.Ring`), one send in flight on one TCP connection, a
short send resubmitted from where it stopped, as `proactor.sending` does.

For each body size it sends ``--megabytes`` MiB in bodies of that size, once
copied and once zero-copy, in alternating order over ``--rounds`` rounds, and
reports the median of the sending process's CPU time (user + system, so the
kernel's work done for the sender counts) per MiB. The receiver is another
process (``--sink``) that reads and discards; on loopback its CPU is not
counted, but the kernel's delivery of each segment runs in the sender's
context and is. That is why loopback cannot show the gain: delivering a
zero-copy segment to a local socket copies its pages after all
(``skb_orphan_frags_rx``), so zero copy saves no copy there and adds the page
pinning and the notification. Only ``--peer`` over a real NIC measures the
saving the threshold is for. README "The proactor at every load" quotes
both and says how the threshold was set.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from ..proactor import abi
from ..proactor.ring import Ring
from .servers import free_port

SIZES = tuple(1024 * kib for kib in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096))
MiB = 1024 * 1024
SINK_READ = 1024 * 1024
SEND_FLAGS = socket.MSG_NOSIGNAL


def sink(port: int, host: str) -> None:
    """Accept connections one after another and read each to its end, discarding the bytes."""
    with socket.create_server((host, port), backlog=16) as listener:
        print(f"sink listening on {host}:{port}", flush=True)
        buffer = bytearray(SINK_READ)
        while True:
            connection, _ = listener.accept()
            with connection:
                while connection.recv_into(buffer):
                    pass


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # microseconds, where os.times() has ticks
    return usage.ru_utime + usage.ru_stime


class Sender:
    """One connection to the sink, and a ring that sends bodies over it one at a time."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.ring = Ring(64)
        if not self.ring.capabilities.zero_copy_send:
            self.ring.close()
            raise SystemExit("this kernel has no IORING_OP_SEND_ZC (it needs Linux 6.0)")
        self.connection = socket.create_connection(address)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connection.setblocking(False)
        self.user_data = 0
        self.notifications_due = 0

    def send_body(self, body: bytes, zero_copy: bool) -> None:
        """Send all of ``body``: resubmit what a short send left, as a transport does."""
        fd = self.connection.fileno()
        offset = 0
        while offset < len(body):
            self.user_data += 1
            sent_by = self.user_data
            if zero_copy:
                self.ring.prepare_send_zero_copy(sent_by, fd, body, offset=offset, flags=SEND_FLAGS)
            else:
                self.ring.prepare_send(sent_by, fd, body, offset=offset, flags=SEND_FLAGS)
            result = None
            while result is None:
                self.ring.submit(wait_for=1)
                for user_data, res, flags in self.ring.completions():
                    if flags & abi.CQE_F_NOTIF:
                        self.notifications_due -= 1
                        continue
                    if user_data == sent_by:
                        result = res
                        if flags & abi.CQE_F_MORE:
                            self.notifications_due += 1  # the pages are let go of later
            if result < 0:
                raise OSError(-result, os.strerror(-result))
            offset += result

    def settle(self) -> None:
        """Wait for the notifications still due: until then the kernel holds the pages."""
        while self.notifications_due > 0:
            self.ring.submit(wait_for=1)
            for _, _, flags in self.ring.completions():
                if flags & abi.CQE_F_NOTIF:
                    self.notifications_due -= 1

    def close(self) -> None:
        self.settle()
        self.connection.close()
        self.ring.close()


def cpu_per_mebibyte(sender: Sender, size: int, megabytes: int, zero_copy: bool) -> float:
    """CPU µs of this process per MiB sent in bodies of ``size`` bytes."""
    body = os.urandom(size)
    count = max(1, megabytes * MiB // size)
    started = cpu_seconds()
    for _ in range(count):
        sender.send_body(body, zero_copy)
    sender.settle()
    return (cpu_seconds() - started) / (count * size / MiB) * 1e6


@contextmanager
def local_sink() -> Iterator[tuple[str, int]]:
    """A sink process on 127.0.0.1, stopped afterwards."""
    port = free_port()
    command = [sys.executable, "-m", "forkloop.loadtest.zerocopy", "--sink", "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        process.stdout.readline()  # "sink listening on ..."
        yield ("127.0.0.1", port)
    finally:
        process.terminate()
        process.wait(timeout=10)


def measure(
    address: tuple[str, int], megabytes: int, rounds: int
) -> list[tuple[int, float, float]]:
    sender = Sender(address)
    try:
        for size in SIZES[:2]:  # warm up the connection's buffers and the page cache
            cpu_per_mebibyte(sender, size, 4, False)
            cpu_per_mebibyte(sender, size, 4, True)
        rows = []
        for size in SIZES:
            copied: list[float] = []
            zero_copy: list[float] = []
            for round_number in range(rounds):
                order = (False, True) if round_number % 2 == 0 else (True, False)
                for mode in order:
                    cost = cpu_per_mebibyte(sender, size, megabytes, mode)
                    (zero_copy if mode else copied).append(cost)
            rows.append((size, statistics.median(copied), statistics.median(zero_copy)))
            print(f"{size // 1024} KiB done", file=sys.stderr, flush=True)
        return rows
    finally:
        sender.close()


def table(rows: list[tuple[int, float, float]]) -> str:
    lines = [
        "| body | copied (SEND): CPU µs per MiB | zero-copy (SEND_ZC): CPU µs per MiB | zero-copy / copied |",
        "|---:|---:|---:|---:|",
    ]
    for size, copied, zero_copy in rows:
        lines.append(
            f"| {size // 1024:,} KiB | {copied:,.0f} | {zero_copy:,.0f} | {zero_copy / copied:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sink", action="store_true", help="be the receiving end and wait")
    parser.add_argument("--port", type=int, default=9000, help="the sink's port (with --sink)")
    parser.add_argument("--bind", default="127.0.0.1", help="the sink's address (with --sink)")
    parser.add_argument("--peer", help="HOST:PORT of a sink on another host (default: loopback)")
    parser.add_argument("--megabytes", type=int, default=32, help="MiB sent per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if args.sink:
        try:
            sink(args.port, args.bind)
        except KeyboardInterrupt:
            pass
        return
    if args.megabytes < 1 or args.rounds < 1:
        parser.error("--megabytes and --rounds must be at least 1")
    if args.peer:
        host, _, port = args.peer.rpartition(":")
        if not host or not port.isdigit():
            parser.error(f"--peer wants HOST:PORT, not {args.peer!r}")
        rows = measure((host, int(port)), args.megabytes, args.rounds)
        path = f"to {args.peer}"
    else:
        with local_sink() as address:
            rows = measure(address, args.megabytes, args.rounds)
        path = "over loopback"
    print(
        f"\nOne TCP connection {path}, one send in flight; {args.megabytes} MiB per "
        f"measurement, median of {args.rounds}; Linux {platform.release()}, "
        f"Python {platform.python_version()}\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
