"""The ring itself: setup, probe, batching, deadlines, full and overflowing queues, wakeups."""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import signal
import threading
import time

import pytest
from ring_support import collect, open_ring

from forkloop.proactor import abi
from forkloop.proactor import kernel as kernel_module
from forkloop.proactor import ring as ring_module
from forkloop.proactor.ring import Ring, RingUnavailable, Wakeup

NETWORK_OPCODES = {
    abi.OP_NOP,
    abi.OP_ACCEPT,
    abi.OP_CONNECT,
    abi.OP_RECV,
    abi.OP_SEND,
    abi.OP_SENDMSG,
    abi.OP_CLOSE,
    abi.OP_SHUTDOWN,
    abi.OP_TIMEOUT,
    abi.OP_ASYNC_CANCEL,
    abi.OP_POLL_ADD,
    abi.OP_READ,
}


def count_enters(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the ``to_submit`` of every io_uring_enter the ring makes from now on."""
    calls: list[int] = []
    real = ring_module._enter

    def counting(fd: int, to_submit: int, *args: object) -> int:
        calls.append(to_submit)
        return real(fd, to_submit, *args)

    monkeypatch.setattr(ring_module, "_enter", counting)
    return calls


def test_probe_reports_the_network_opcodes(ring: Ring) -> None:
    capabilities = ring.capabilities
    assert NETWORK_OPCODES <= capabilities.opcodes
    assert ring.probe() == capabilities.opcodes
    assert capabilities.features & abi.FEAT_NODROP
    assert "ACCEPT" in capabilities.describe()


def test_nop_completes_with_its_user_data(ring: Ring) -> None:
    ring.prepare_nop(7)
    assert collect(ring, 1) == [(7, 0, 0)]
    assert ring.in_flight == 0


def test_everything_queued_in_one_iteration_goes_in_one_enter(
    ring: Ring, monkeypatch: pytest.MonkeyPatch
) -> None:
    enters = count_enters(monkeypatch)
    for user_data in range(50):
        ring.prepare_nop(user_data)
    assert enters == [], "prepare_* must not enter the kernel"
    assert ring.submit(1, 5.0) == 50
    assert enters == [50]
    assert sorted(user_data for user_data, _, _ in ring.completions()) == list(range(50))


def test_submit_with_nothing_to_do_makes_no_system_call(
    ring: Ring, monkeypatch: pytest.MonkeyPatch
) -> None:
    ring.prepare_nop(1)
    collect(ring, 1)
    enters = count_enters(monkeypatch)
    assert ring.submit() == 0
    assert enters == []


def test_timeout_expires_with_etime(ring: Ring) -> None:
    started = time.monotonic()
    ring.prepare_timeout(1, 0.05)
    assert collect(ring, 1) == [(1, -errno.ETIME, 0)]
    assert time.monotonic() - started >= 0.045


def test_timeout_with_a_count_completes_when_enough_other_completions_arrive(ring: Ring) -> None:
    ring.prepare_timeout(1, 10.0, count=2)
    ring.prepare_nop(2)
    ring.prepare_nop(3)
    completions = collect(ring, 3)
    assert (1, 0, 0) in completions


def test_absolute_timeout_reads_the_monotonic_clock(ring: Ring) -> None:
    ring.prepare_timeout(1, time.monotonic() + 0.03, absolute=True)
    assert collect(ring, 1, timeout=2.0) == [(1, -errno.ETIME, 0)]


def test_wait_deadline_ends_an_empty_wait(ring: Ring) -> None:
    started = time.monotonic()
    ring.submit(1, 0.05)
    elapsed = time.monotonic() - started
    assert ring.completions() == []
    assert 0.04 <= elapsed < 2.0


def test_wait_deadline_without_ext_arg_uses_a_hidden_timeout(ring: Ring) -> None:
    ring._ext_arg = False  # what a 5.10 kernel offers
    started = time.monotonic()
    ring.submit(1, 0.05)
    assert ring.completions() == []
    assert 0.04 <= time.monotonic() - started < 2.0
    ring.prepare_nop(5)
    assert collect(ring, 1) == [(5, 0, 0)]
    assert ring.in_flight == 0
    assert ring._internal == set(), "the hidden timeout's completion was consumed"


def test_a_full_submission_queue_is_submitted_and_filling_continues(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with open_ring(8) as small:
        enters = count_enters(monkeypatch)
        for user_data in range(100):
            small.prepare_nop(user_data)
        small.submit()
        assert len(enters) == 100 // 8 + 1
        completions = collect(small, 100)
        assert sorted(user_data for user_data, _, _ in completions) == list(range(100))


class SeparatelyMappedRing(Ring):
    """A ring mapped as kernels before 5.4 require: SQ and CQ rings in two mappings."""

    def _map_rings(self, sq: dict[str, int], cq: dict[str, int]) -> None:
        self.features &= ~abi.FEAT_SINGLE_MMAP
        super()._map_rings(sq, cq)


def test_rings_mapped_separately_work_alike() -> None:
    ring = open_ring(16, SeparatelyMappedRing)
    try:
        assert len(ring._mappings) == 3
        ring.prepare_nop(1)
        ring.prepare_timeout(2, 0.01)
        assert sorted(collect(ring, 2)) == [(1, 0, 0), (2, -errno.ETIME, 0)]
    finally:
        ring.close()


def test_an_overflowing_completion_queue_loses_nothing() -> None:
    with open_ring(8, cq_entries=16) as small:
        for batch in range(10):
            for index in range(8):
                small.prepare_nop(batch * 8 + index)
            small.submit()
        assert small._sq_words[small._sq_flags_index] & abi.SQ_CQ_OVERFLOW, "no overflow happened"
        completions = small.completions()
        assert [user_data for user_data, _, _ in completions] == list(range(80))
        assert small.completions_lost == 0
        assert small.in_flight == 0


@pytest.mark.parametrize("code", [errno.EBUSY, errno.EAGAIN, errno.EINTR])
def test_a_refused_enter_keeps_the_submissions_queued_for_the_next_submit(
    ring: Ring, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    real = ring_module._enter
    refusals = [code]

    def busy_once(*args: object) -> int:
        if refusals:
            return -refusals.pop()
        return real(*args)

    monkeypatch.setattr(ring_module, "_enter", busy_once)
    ring.prepare_nop(1)
    ring.prepare_nop(2)
    assert ring.submit(1, 1.0) == 0
    assert ring.completions() == []
    assert sorted(collect(ring, 2)) == [(1, 0, 0), (2, 0, 0)]


def test_an_unexpected_enter_failure_raises(ring: Ring, monkeypatch: pytest.MonkeyPatch) -> None:
    real = ring_module._enter

    def failing(*args: object) -> int:
        return -errno.EFAULT

    ring.prepare_nop(1)
    monkeypatch.setattr(ring_module, "_enter", failing)
    with pytest.raises(OSError, match="io_uring_enter failed: Bad address"):
        ring.submit()
    monkeypatch.setattr(ring_module, "_enter", real)
    assert collect(ring, 1) == [(1, 0, 0)], "the failed submission stayed queued"


def test_a_user_data_in_flight_cannot_be_reused(ring: Ring) -> None:
    ring.prepare_timeout(1, 10.0)
    with pytest.raises(ValueError, match="in flight already"):
        ring.prepare_nop(1)
    ring.prepare_cancel(2, 1)
    collect(ring, 2)
    ring.prepare_nop(1)
    assert collect(ring, 1) == [(1, 0, 0)]


def test_a_span_outside_the_buffer_is_refused(ring: Ring) -> None:
    buffer = bytearray(16)
    with pytest.raises(ValueError, match="outside a buffer of 16 bytes"):
        ring.prepare_recv(1, 0, buffer, offset=8, length=16)
    assert ring.in_flight == 0


@pytest.mark.parametrize(
    ("code", "phrase"),
    [
        (errno.ENOSYS, "has no io_uring"),
        (errno.EPERM, "io_uring_disabled"),
        (errno.ENOMEM, "RLIMIT_MEMLOCK"),
    ],
)
def test_a_failing_setup_raises_ring_unavailable_saying_why(
    monkeypatch: pytest.MonkeyPatch, code: int, phrase: str
) -> None:
    real = kernel_module._syscall

    def refusing(number: int, *args: int) -> int:
        if number == abi.NR_IO_URING_SETUP:
            return -code
        return real(number, *args)

    monkeypatch.setattr(kernel_module, "_syscall", refusing)
    fds_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(RingUnavailable, match=phrase) as raised:
        Ring(64)
    assert raised.value.errno == code
    assert str(raised.value).startswith(f"[Errno {code}] io_uring is unavailable: ")
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_setup_falls_back_to_older_flags_when_the_kernel_rejects_newer_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = kernel_module._syscall

    def old_kernel(number: int, *args: int) -> int:
        if number == abi.NR_IO_URING_SETUP:
            flags = abi.PARAMS.unpack_from(ctypes.string_at(args[1], abi.PARAMS.size))[2]
            if flags & (abi.SETUP_SINGLE_ISSUER | abi.SETUP_COOP_TASKRUN):
                return -errno.EINVAL
        return real(number, *args)

    monkeypatch.setattr(kernel_module, "_syscall", old_kernel)
    with open_ring(32) as ring:
        assert not ring.capabilities.deferred_task_run
        assert ring.setup_flags & abi.SETUP_CQSIZE
        ring.prepare_timeout(1, 0.01)
        ring.prepare_nop(2)
        assert sorted(collect(ring, 2)) == [(1, -errno.ETIME, 0), (2, 0, 0)]


def wait_until_blocked_in_io_uring_enter(thread_id: int, timeout: float = 5.0) -> None:
    """Return once thread ``thread_id`` sits in io_uring_enter; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    path = f"/proc/self/task/{thread_id}/syscall"
    while time.monotonic() < deadline:
        with open(path) as state:
            if state.read().split(" ", 1)[0] == str(abi.NR_IO_URING_ENTER):
                return
    raise AssertionError("the loop thread never blocked in io_uring_enter")


def test_a_wakeup_from_another_thread_ends_the_wait_with_the_gil_released(ring: Ring) -> None:
    wakeup = Wakeup()
    loop_thread = threading.get_native_id()
    failures: list[BaseException] = []

    def waker() -> None:
        try:
            # Only possible while the loop thread has released the GIL.
            wait_until_blocked_in_io_uring_enter(loop_thread)
            wakeup.wake()
        except BaseException as error:  # reported by the main thread
            failures.append(error)

    try:
        wakeup.arm(ring, 1)
        thread = threading.Thread(target=waker)
        thread.start()
        started = time.monotonic()
        ring.submit(1, 10.0)
        completions = ring.completions()
        thread.join(5)
        assert not failures, failures
        assert completions == [(1, 8, 0)]
        assert time.monotonic() - started < 5.0
        wakeup.arm(ring, 1)  # re-armed; a second wake is seen as well
        wakeup.wake()
        assert collect(ring, 1) == [(1, 8, 0)]
    finally:
        wakeup.close()


def test_a_signal_ends_the_wait(ring: Ring) -> None:
    received: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda number, frame: received.append(number))
    loop_thread = threading.get_native_id()
    main_thread = threading.main_thread().ident
    assert threading.get_ident() == main_thread

    def sender() -> None:
        wait_until_blocked_in_io_uring_enter(loop_thread)
        signal.pthread_kill(main_thread, signal.SIGUSR1)

    try:
        thread = threading.Thread(target=sender)
        thread.start()
        started = time.monotonic()
        ring.submit(1, 10.0)
        elapsed = time.monotonic() - started
        thread.join(5)
        assert elapsed < 5.0
        assert received == [signal.SIGUSR1]
        assert ring.completions() == []
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_msg_ring_posts_a_completion_on_another_ring(ring: Ring) -> None:
    with open_ring(16) as other:
        other.submit()  # this thread becomes its issuer
        ring.prepare_msg_ring(1, other.fileno(), 42, 99)
        assert collect(ring, 1) == [(1, 0, 0)]
        assert collect(other, 1) == [(99, 42, 0)]


def test_a_single_issuer_ring_refuses_a_second_thread() -> None:
    with open_ring(16) as ring:
        if not ring.capabilities.deferred_task_run:
            pytest.skip("this kernel has no single-issuer ring (before 6.1): nothing to refuse")
        ring.prepare_nop(1)
        collect(ring, 1)
        errors: list[BaseException] = []

        def intruder() -> None:
            try:
                ring.prepare_nop(2)
                ring.submit()
            except RuntimeError as error:
                errors.append(error)

        thread = threading.Thread(target=intruder)
        thread.start()
        thread.join(5)
        assert errors and "single-issuer" in str(errors[0])
        assert collect(ring, 1) == [(2, 0, 0)], "the issuer still submits what was queued"


def test_a_single_issuer_ring_enters_by_its_registered_fd_and_gives_the_slot_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flags_seen: list[tuple[int, int]] = []
    real = ring_module._enter

    def recording(fd: int, to_submit: int, min_complete: int, flags: int, *rest: object) -> int:
        flags_seen.append((fd, flags))
        return real(fd, to_submit, min_complete, flags, *rest)

    ring = open_ring(16)
    if not ring.setup_flags & abi.SETUP_SINGLE_ISSUER:
        ring.close()
        pytest.skip("this kernel has no single-issuer ring (before 6.0): nothing registers")
    monkeypatch.setattr(ring_module, "_enter", recording)
    ring.prepare_nop(1)
    assert collect(ring, 1) == [(1, 0, 0)]
    assert ring.registered_ring_fd
    assert flags_seen and all(
        flags & abi.ENTER_REGISTERED_RING and fd != ring.fileno() for fd, flags in flags_seen
    ), "every enter names the ring by its registered slot"
    slot = flags_seen[0][0]
    ring.close()
    # The slot is free again: a new ring registered by this thread may take it.
    with open_ring(16) as another:
        another.prepare_nop(2)
        assert collect(another, 1) == [(2, 0, 0)]
        assert another._enter_fd == slot


def test_a_ring_without_single_issuer_enters_by_its_fd() -> None:
    with open_ring(16, single_issuer=False) as ring:
        ring.prepare_nop(1)
        assert collect(ring, 1) == [(1, 0, 0)]
        assert not ring.registered_ring_fd and ring._enter_fd == ring.fileno()


def test_a_ring_created_in_one_thread_can_be_driven_by_another() -> None:
    ring = open_ring(16)
    results: list[object] = []

    def loop_thread() -> None:
        try:
            ring.prepare_nop(1)
            results.extend(collect(ring, 1))
        except BaseException as error:
            results.append(error)

    thread = threading.Thread(target=loop_thread)
    thread.start()
    thread.join(5)
    ring.close()
    assert results == [(1, 0, 0)]


def test_a_ring_made_without_single_issuer_may_change_threads() -> None:
    with open_ring(16, single_issuer=False) as ring:
        assert not ring.setup_flags & abi.SETUP_SINGLE_ISSUER
        ring.prepare_nop(1)
        assert collect(ring, 1) == [(1, 0, 0)]
        results: list[object] = []
        thread = threading.Thread(
            target=lambda: (ring.prepare_nop(2), results.extend(collect(ring, 1)))
        )
        thread.start()
        thread.join(5)
        assert results == [(2, 0, 0)]


def test_a_forked_child_cannot_submit_to_its_parents_ring(ring: Ring) -> None:
    ring.prepare_timeout(1, 60.0)
    ring.submit()
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # the child reports what happened through the pipe, then leaves
        try:
            ring.prepare_nop(2)
            ring.submit()
            verdict = b"submitted"
        except RuntimeError as error:
            verdict = b"refused" if b"cannot be shared across fork" in str(error).encode() else b"?"
        ring.close()
        os.write(writer, verdict)
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as answer:
        assert answer.read() == b"refused"
    assert os.waitpid(child, 0)[1] == 0
    assert ring.owns(1), "the parent's timeout is untouched by the child's close"
    ring.prepare_cancel(3, 1)
    assert sorted(collect(ring, 2)) == [(1, -errno.ECANCELED, 0), (3, 0, 0)]


def test_close_cancels_what_is_in_flight_and_waits_for_it() -> None:
    ring = open_ring(16)
    reader, writer = os.pipe()
    buffer = bytearray(64)
    try:
        ring.prepare_read(1, reader, buffer)
        ring.prepare_timeout(2, 60.0)
        ring.submit()
        assert ring.in_flight == 2
        ring.close()
        assert ring.in_flight == 0
        assert not ring_module._ABANDONED
        buffer.extend(b"resizable again: the kernel let go")
    finally:
        os.close(reader)
        os.close(writer)


def test_features_an_older_kernel_lacks_are_refused_naming_the_fallback(ring: Ring) -> None:
    # What a 5.11 kernel offers: every opcode up to SHUTDOWN and RENAMEAT, EXT_ARG.
    ring.capabilities = dataclasses.replace(
        ring.capabilities,
        opcodes=frozenset(range(abi.OP_SHUTDOWN + 2)),
        features=abi.FEAT_NODROP | abi.FEAT_FAST_POLL | abi.FEAT_EXT_ARG,
    )
    refusals = {
        "multishot accept needs kernel 5.19": lambda: ring.prepare_accept(1, 0, multishot=True),
        "multishot recv needs kernel 6.0": lambda: ring.prepare_recv_provided(1, 0, 0),
        "multishot poll needs kernel 5.13": lambda: ring.prepare_poll_add(1, 0, multishot=True),
        "cancelling by fd needs kernel 5.19": lambda: ring.prepare_cancel_fd(1, 0),
        "MSG_RING needs kernel 5.18": lambda: ring.prepare_msg_ring(1, 0, 0, 0),
        "provided-buffer rings need kernel 5.19": lambda: ring.provide_buffers(2, 16),
    }
    for sentence, attempt in refusals.items():
        with pytest.raises(OSError, match=sentence) as raised:
            attempt()
        assert raised.value.errno == errno.ENOTSUP
    assert ring.in_flight == 0
