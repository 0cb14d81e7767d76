"""A ``sock_*`` operation that waits calls the socket's method as it is at each try.

stdlib asyncio looks ``sock.recv`` (and the rest) up anew every time the
socket becomes ready, so a method replaced while the operation waits, as test
doubles do, is the one that answers. A loop that bound the method when the
operation began would keep calling the old one, and a double that stands in
for a socket that never becomes readable would leave the operation waiting
forever.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import pytest

from tests.loop_under_test import LoopUnderTest

# Stock loops without one of these operations, checked to still lack it (raising
# NotImplementedError), so the test says when one gains it; forkloop's loops are never listed.
STOCK_LOOPS_WITHOUT = {"uvloop": {"sock_recvfrom"}}


class Double(socket.socket):
    """A socket whose methods a test may replace (socket.socket has slots, this has a dict)."""


def waiting_operations() -> dict[str, tuple[Callable[..., Any], str, Callable[..., Any], Any]]:
    """operation -> (how to start it, the method to replace, the replacement, its answer)."""
    buffer = bytearray(32)

    def recv_into(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> Any:
        return loop.sock_recv_into(sock, buffer)

    return {
        "sock_recv": (
            lambda loop, sock: loop.sock_recv(sock, 32),
            "recv",
            lambda size: b"from the double",
            b"from the double",
        ),
        "sock_recv_into": (recv_into, "recv_into", lambda into: 7, 7),
        "sock_recvfrom": (
            lambda loop, sock: loop.sock_recvfrom(sock, 32),
            "recvfrom",
            lambda size: (b"datagram", None),
            (b"datagram", None),
        ),
    }


@pytest.mark.parametrize("operation", list(waiting_operations()))
def test_a_waiting_sock_operation_calls_the_method_replaced_meanwhile(
    backend: LoopUnderTest, operation: str
):
    start, method, replacement, answer = waiting_operations()[operation]
    if operation in STOCK_LOOPS_WITHOUT.get(backend.id, ()):
        answer = NotImplementedError

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        left, right = socket.socketpair()
        double = Double(fileno=left.detach())
        double.setblocking(False)
        right.setblocking(False)
        with double, right:
            if answer is NotImplementedError:
                with pytest.raises(NotImplementedError):
                    await start(loop, double)
                return answer
            waiting = asyncio.ensure_future(start(loop, double))
            for _ in range(3):
                await asyncio.sleep(0)  # it tried, found nothing, and waits for readiness
            assert not waiting.done()
            setattr(double, method, replacement)
            right.send(b"x")  # ready: the next try is the replacement's
            return await asyncio.wait_for(waiting, 5)

    assert backend.run(main, timeout=10) == answer
