"""Signal handlers and the executor: real signals sent to this process, real threads."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import threading

import pytest

from tests.loop_under_test import LoopUnderTest

# signals ----------------------------------------------------------------------


def test_signal_handler_runs_in_the_loop_when_the_signal_arrives(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        delivered = loop.create_future()

        def on_signal(tag):
            delivered.set_result((tag, threading.get_ident(), asyncio.get_running_loop()))

        loop.add_signal_handler(signal.SIGUSR1, on_signal, "usr1")
        try:
            os.kill(os.getpid(), signal.SIGUSR1)
            tag, thread, running = await delivered
        finally:
            loop.remove_signal_handler(signal.SIGUSR1)
        return tag, thread == threading.get_ident(), running is loop

    assert backend.run(main, timeout=10) == ("usr1", True, True)


def test_signal_sent_while_the_loop_sleeps_wakes_it(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        delivered = loop.create_future()
        loop.add_signal_handler(signal.SIGUSR2, delivered.set_result, "woken")
        idle = threading.Event()

        def send_signal_later():
            idle.wait(5)
            os.kill(os.getpid(), signal.SIGUSR2)

        sender = threading.Thread(target=send_signal_later)
        sender.start()
        loop.call_soon(idle.set)
        try:
            return await delivered
        finally:
            sender.join(5)
            loop.remove_signal_handler(signal.SIGUSR2)

    assert backend.run(main, timeout=10) == "woken"


def test_every_signal_of_a_burst_reaches_a_handler(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        seen = set()
        both = loop.create_future()

        def on_signal(signum):
            seen.add(signum)
            if len(seen) == 2 and not both.done():
                both.set_result(None)

        loop.add_signal_handler(signal.SIGUSR1, on_signal, signal.SIGUSR1)
        loop.add_signal_handler(signal.SIGUSR2, on_signal, signal.SIGUSR2)
        try:
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGUSR2)
            await both
        finally:
            loop.remove_signal_handler(signal.SIGUSR1)
            loop.remove_signal_handler(signal.SIGUSR2)
        return seen

    assert backend.run(main, timeout=10) == {signal.SIGUSR1, signal.SIGUSR2}


def test_remove_signal_handler_restores_the_default_and_says_whether_one_was_set(
    backend: LoopUnderTest,
):
    async def main():
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, lambda: None)
        installed = signal.getsignal(signal.SIGUSR1)
        removed = loop.remove_signal_handler(signal.SIGUSR1)
        removed_again = loop.remove_signal_handler(signal.SIGUSR1)
        return (
            installed is not signal.SIG_DFL,
            removed,
            removed_again,
            signal.getsignal(signal.SIGUSR1),
        )

    assert backend.run(main, timeout=10) == (True, True, False, signal.SIG_DFL)


def test_add_signal_handler_refuses_uncatchable_signals_and_coroutines(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        with pytest.raises((RuntimeError, OSError, ValueError)):
            loop.add_signal_handler(signal.SIGKILL, lambda: None)
        with pytest.raises(TypeError):
            loop.add_signal_handler(signal.SIGUSR1, main)
        with pytest.raises((ValueError, RuntimeError)):
            loop.add_signal_handler(12345, lambda: None)

    backend.run(main, timeout=10)


# the executor ---------------------------------------------------------------------------


def test_run_in_executor_returns_the_result_from_another_thread(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        caller = threading.get_ident()
        result, thread = await loop.run_in_executor(
            None, lambda a, b: (a + b, threading.get_ident()), 2, 3
        )
        return result, thread != caller

    assert backend.run(main, timeout=10) == (5, True)


def test_run_in_executor_propagates_the_exception(backend: LoopUnderTest):
    def fail():
        raise LookupError("from the executor")

    async def main():
        loop = asyncio.get_running_loop()
        with pytest.raises(LookupError, match="from the executor"):
            await loop.run_in_executor(None, fail)

    backend.run(main, timeout=10)


def test_set_default_executor_is_used_by_run_in_executor_and_to_thread(backend: LoopUnderTest):
    executor = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="chosen-executor")

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_default_executor(executor)
        direct = await loop.run_in_executor(None, lambda: threading.current_thread().name)
        via_to_thread = await asyncio.to_thread(lambda: threading.current_thread().name)
        return direct, via_to_thread

    try:
        direct, via_to_thread = backend.run(main, timeout=10)
    finally:
        executor.shutdown(wait=True)
    assert direct.startswith("chosen-executor")
    assert via_to_thread.startswith("chosen-executor")


def test_explicit_executor_argument_is_used(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="explicit") as pool:
            return await loop.run_in_executor(pool, lambda: threading.current_thread().name)

    assert backend.run(main, timeout=10).startswith("explicit")


def test_shutdown_default_executor_waits_for_running_work(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        started = threading.Event()
        release = threading.Event()
        finished = []

        def work():
            started.set()
            release.wait(5)
            finished.append("work")

        pending = loop.run_in_executor(None, work)
        await loop.run_in_executor(None, started.wait, 5)
        release.set()
        await loop.shutdown_default_executor()
        await pending
        return finished

    assert backend.run(main, timeout=10) == ["work"]


def test_many_executor_jobs_complete_concurrently(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(*(loop.run_in_executor(None, pow, i, 2) for i in range(200)))
        return results

    assert backend.run(main, timeout=20) == [i * i for i in range(200)]
