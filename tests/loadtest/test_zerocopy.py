"""loadtest/zerocopy.py: both kinds of send deliver every byte, in order, and the table reads."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from forkloop.loadtest.zerocopy import Sender, table


@pytest.mark.parametrize("zero_copy", [False, True], ids=["copied", "zero-copy"])
def test_sender_delivers_bodies_larger_than_the_socket_buffer_whole_and_in_order(
    zero_copy: bool,
) -> None:
    bodies = [os.urandom(4 * 1024 * 1024), os.urandom(100_000)]
    received = bytearray()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        sender = Sender(listener.getsockname())
        connection, _ = listener.accept()
        connection.settimeout(10)

        def read_all() -> None:
            with connection:
                while chunk := connection.recv(1 << 20):
                    received.extend(chunk)

        reader = threading.Thread(target=read_all)
        reader.start()
        try:
            for body in bodies:
                sender.send_body(body, zero_copy)
        finally:
            sender.close()  # waits for the notifications of zero-copy sends, then closes
            reader.join(timeout=10)
    assert not reader.is_alive()
    assert sender.notifications_due == 0
    assert bytes(received) == b"".join(bodies)


def test_table_gives_each_size_both_costs_and_their_ratio() -> None:
    text = table([(64 * 1024, 200.0, 300.0), (4 * 1024 * 1024, 100.0, 80.0)])
    assert "| 64 KiB | 200 | 300 | 1.50 |" in text
    assert "| 4,096 KiB | 100 | 80 | 0.80 |" in text
