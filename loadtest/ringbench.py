"""What one io_uring operation costs from Python: forkloop's ring against the PyPI binding.

    python -m forkloop.loadtest.ringbench            # forkloop's ring (proactor.ring.Ring)
    pip install liburing                    # in the same interpreter, to compare
    python -m forkloop.loadtest.ringbench --rounds 7

Three measures per binding, each the median of ``--rounds`` rounds:

* **NOP round trip**: prepare a batch of NOPs (1 or 32), submit them and wait for
  all their completions in one call, read the completions. CPU µs per operation
  (this process's user + system time over the round): the binding's own cost
  plus the kernel's for a NOP, which is the same for both.
* **send + recv**: one 64-byte send and one recv on a connected socket pair per
  submit (the shape of one request on a keep-alive connection), CPU µs per pair.
* **GIL while waiting**: a thread counts in a loop while the main thread waits
  0.2 s in the binding's submit-and-wait call; the count is compared with the
  same thread's count beside a ``time.sleep(0.2)``. 100 % means the wait
  releases the GIL fully; near 0 % means the loop would starve every other
  thread (and a ``call_soon_threadsafe`` caller with it).

The loop's choice between the two rests on these figures; README "Backends"
quotes them.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import threading
import time
from collections.abc import Callable

from ..proactor.buffers import Pinned
from ..proactor.ring import Ring

BATCHES = (1, 32)
PAIR_PAYLOAD = b"x" * 64


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def per_operation(run: Callable[[int], None], operations: int, rounds: int) -> float:
    """Median over ``rounds`` of CPU µs per operation of ``run(operations)``."""
    costs = []
    for _ in range(rounds):
        started = cpu_seconds()
        run(operations)
        costs.append((cpu_seconds() - started) / operations * 1e6)
    return statistics.median(costs)


def spins_beside(wait: Callable[[], None]) -> int:
    """How often a thread counts while the main thread runs ``wait()``."""
    count = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        time.sleep(0.05)  # let it start
        before = count[0]
        wait()
        return count[0] - before
    finally:
        stop.set()
        thread.join()


class ForkloopRing:
    name = "forkloop Ring (ctypes + mmap)"

    def __init__(self) -> None:
        self.ring = Ring(256)
        self.serial = 0

    def nops(self, batch: int) -> Callable[[int], None]:
        ring = self.ring

        def run(operations: int) -> None:
            user_data = 1
            for _ in range(operations // batch):
                for _ in range(batch):
                    ring.prepare_nop(user_data)
                    user_data += 1
                ring.submit(wait_for=batch)
                ring.completions()  # read the batch's completions: part of the round trip

        return run

    def send_recv(self, left: socket.socket, right: socket.socket) -> Callable[[int], None]:
        ring, buffer = self.ring, Pinned(bytearray(4096))  # as a transport's own buffer

        def run(operations: int) -> None:
            for user_data in range(1, 2 * operations, 2):
                ring.prepare_send(user_data, left.fileno(), PAIR_PAYLOAD)
                ring.prepare_recv(user_data + 1, right.fileno(), buffer)
                ring.submit(wait_for=2)
                for _, result, _ in ring.completions():
                    if result != len(PAIR_PAYLOAD):
                        raise OSError(-result, "send or recv did not move the payload")

        return run

    def wait(self, seconds: float) -> None:
        self.ring.prepare_timeout(1, seconds)
        self.ring.submit(wait_for=1)
        self.ring.completions()

    def close(self) -> None:
        self.ring.close()


class LiburingBinding:
    name = "PyPI liburing (Cython)"

    def __init__(self) -> None:
        import liburing

        self.lib = liburing
        self.ring = liburing.Ring()
        liburing.io_uring_queue_init(256, self.ring, 0)
        self.cqe = liburing.Cqe()

    def _reap(self) -> list[tuple[int, int, int]]:
        """The completions as (user_data, res, flags), as forkloop's ring returns them."""
        lib, ring, cqe = self.lib, self.ring, self.cqe
        ready = []
        entries = lib.io_uring_cqe_iter_init(ring)
        while lib.io_uring_cqe_iter_next(entries, cqe):
            entry = cqe[0]
            try:
                result = entry.res
            except OSError as exc:  # the binding raises for a negative res
                result = -(exc.errno or 0)
            ready.append((entry.user_data, result, entry.flags))
        lib.io_uring_cq_advance(ring, len(ready))
        return ready

    def nops(self, batch: int) -> Callable[[int], None]:
        lib, ring = self.lib, self.ring

        def run(operations: int) -> None:
            user_data = 1
            for _ in range(operations // batch):
                for _ in range(batch):
                    sqe = lib.io_uring_get_sqe(ring)
                    lib.io_uring_prep_nop(sqe)
                    lib.io_uring_sqe_set_data64(sqe, user_data)
                    user_data += 1
                lib.io_uring_submit_and_wait(ring, batch)
                self._reap()

        return run

    def send_recv(self, left: socket.socket, right: socket.socket) -> Callable[[int], None]:
        lib, ring, buffer = self.lib, self.ring, bytearray(4096)

        def run(operations: int) -> None:
            for user_data in range(1, 2 * operations, 2):
                sqe = lib.io_uring_get_sqe(ring)
                lib.io_uring_prep_send(sqe, left.fileno(), PAIR_PAYLOAD, len(PAIR_PAYLOAD), 0)
                lib.io_uring_sqe_set_data64(sqe, user_data)
                sqe = lib.io_uring_get_sqe(ring)
                lib.io_uring_prep_recv(sqe, right.fileno(), buffer, len(buffer), 0)
                lib.io_uring_sqe_set_data64(sqe, user_data + 1)
                lib.io_uring_submit_and_wait(ring, 2)
                for _, result, _ in self._reap():
                    if result != len(PAIR_PAYLOAD):
                        raise OSError(-result, "send or recv did not move the payload")

        return run

    def wait(self, seconds: float) -> None:
        lib = self.lib
        sqe = lib.io_uring_get_sqe(self.ring)
        lib.io_uring_prep_timeout(sqe, lib.timespec(seconds), 0, 0)
        lib.io_uring_sqe_set_data64(sqe, 1)
        lib.io_uring_submit_and_wait(self.ring, 1)
        self._reap()

    def close(self) -> None:
        self.lib.io_uring_queue_exit(self.ring)


def bindings() -> list[type]:
    found: list[type] = [ForkloopRing]
    try:
        import liburing  # noqa: F401
    except ImportError:
        print("(liburing is not installed here: `pip install liburing` to compare)\n")
    else:
        found.append(LiburingBinding)
    return found


def measure(binding_class: type, operations: int, rounds: int, sleep_spins: int) -> list[str]:
    binding = binding_class()
    left, right = socket.socketpair()
    try:
        row = [binding.name]
        for batch in BATCHES:
            row.append(f"{per_operation(binding.nops(batch), operations, rounds):.2f}")
        pair_cost = per_operation(binding.send_recv(left, right), operations // 4, rounds)
        row.append(f"{pair_cost:.2f}")
        spun = spins_beside(lambda: binding.wait(0.2))
        row.append(f"{100 * spun / sleep_spins:.0f} %")
        return row
    finally:
        left.close()
        right.close()
        binding.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m forkloop.loadtest.ringbench", description=__doc__
    )
    parser.add_argument("--operations", type=int, default=64_000, help="operations per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    sleep_spins = spins_beside(lambda: time.sleep(0.2))
    print(f"{args.operations:,} operations per round, median of {args.rounds} rounds")
    print(f"Linux {os.uname().release}, Python {platform.python_version()}\n")
    header = [
        "binding",
        *(f"NOP x{batch} µs/op" for batch in BATCHES),
        "send+recv µs/pair",
        "other thread runs while waiting",
    ]
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for binding_class in bindings():
        row = measure(binding_class, args.operations, args.rounds, sleep_spins)
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
