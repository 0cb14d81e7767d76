"""Unix stream sockets and datagram endpoints (UDP and Unix datagrams)."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from tests.loop_under_test import LoopUnderTest
from tests.loops.loop_support import DatagramRecorder, Echo, Recorder

# Unix stream sockets --------------------------------------------------------------


def test_unix_echo_over_a_path(backend: LoopUnderTest, tmp_path):
    path = str(tmp_path / "echo.sock")

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(Echo, path)
        transport, client = await loop.create_unix_connection(Recorder, path)
        transport.write(b"over unix")
        echoed = await client.received(9)
        can_write_eof = transport.can_write_eof()
        transport.close()
        await client.lost
        server.close()
        await server.wait_closed()
        return echoed, can_write_eof, server.sockets

    echoed, can_write_eof, sockets = backend.run(main, timeout=10)
    assert echoed == b"over unix"
    assert can_write_eof
    assert len(sockets) == 0


def test_unix_server_replaces_a_stale_socket_file(backend: LoopUnderTest, tmp_path):
    path = str(tmp_path / "stale.sock")
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(path)
    leftover.close()  # the file stays behind, as after a crash
    assert os.path.exists(path)

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(Echo, path)
        transport, client = await loop.create_unix_connection(Recorder, path)
        transport.write(b"fresh")
        echoed = await client.received(5)
        transport.close()
        server.close()
        return echoed

    assert backend.run(main, timeout=10) == b"fresh"


def test_unix_server_and_connection_on_existing_sockets(backend: LoopUnderTest, tmp_path):
    path = str(tmp_path / "existing.sock")

    async def main():
        loop = asyncio.get_running_loop()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        server = await loop.create_unix_server(Echo, sock=listener)
        client_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client_sock.setblocking(False)
        await loop.sock_connect(client_sock, path)
        transport, client = await loop.create_unix_connection(Recorder, sock=client_sock)
        transport.write(b"existing")
        echoed = await client.received(8)
        transport.close()
        server.close()
        return echoed

    assert backend.run(main, timeout=10) == b"existing"


def test_unix_half_close_delivers_eof_and_keeps_the_reply_path(backend: LoopUnderTest, tmp_path):
    path = str(tmp_path / "half.sock")

    async def main():
        loop = asyncio.get_running_loop()
        accepted = loop.create_future()

        def factory():
            protocol = Recorder(keep_open_on_eof=True)
            accepted.set_result(protocol)
            return protocol

        server = await loop.create_unix_server(factory, path)
        transport, client = await loop.create_unix_connection(Recorder, path)
        transport.write(b"done talking")
        transport.write_eof()
        server_side = await accepted
        await server_side.eof
        server_side.transport.write(b"ok")
        server_side.transport.close()
        reply = await client.received(2)
        await client.lost
        server.close()
        return bytes(server_side.data), reply

    assert backend.run(main, timeout=10) == (b"done talking", b"ok")


# datagrams ----------------------------------------------------------------------------


def test_udp_echo_between_a_server_and_a_connected_client(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        server_transport, server = await loop.create_datagram_endpoint(
            lambda: DatagramRecorder(echo=True), local_addr=("127.0.0.1", 0)
        )
        address = server_transport.get_extra_info("sockname")
        client_transport, client = await loop.create_datagram_endpoint(
            DatagramRecorder, remote_addr=address
        )
        for i in range(10):
            client_transport.sendto(b"datagram %d" % i)
        echoed = [(await client.datagram(i + 1))[0] for i in range(10)]
        peer = client_transport.get_extra_info("peername")
        client_transport.close()
        client_lost = await client.lost
        server_transport.close()
        await server.lost
        return echoed, tuple(peer) == tuple(address), client_lost

    echoed, peer_matches, client_lost = backend.run(main, timeout=10)
    assert sorted(echoed) == sorted(b"datagram %d" % i for i in range(10))
    assert peer_matches
    assert client_lost is None


def test_udp_sendto_an_explicit_address_from_an_unconnected_endpoint(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        receiver_transport, receiver = await loop.create_datagram_endpoint(
            DatagramRecorder, local_addr=("127.0.0.1", 0)
        )
        sender_transport, _ = await loop.create_datagram_endpoint(
            DatagramRecorder, family=socket.AF_INET
        )
        sender_transport.sendto(b"addressed", receiver_transport.get_extra_info("sockname"))
        data, _ = await receiver.datagram(1)
        sender_transport.close()
        receiver_transport.close()
        return data

    assert backend.run(main, timeout=10) == b"addressed"


def test_connected_udp_endpoint_refuses_another_address(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        server_transport, _ = await loop.create_datagram_endpoint(
            DatagramRecorder, local_addr=("127.0.0.1", 0)
        )
        client_transport, _ = await loop.create_datagram_endpoint(
            DatagramRecorder, remote_addr=server_transport.get_extra_info("sockname")
        )
        with pytest.raises(ValueError):
            client_transport.sendto(b"x", ("127.0.0.1", 9))
        client_transport.close()
        server_transport.close()

    backend.run(main, timeout=10)


def test_udp_endpoint_on_an_existing_socket(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        transport, receiver = await loop.create_datagram_endpoint(DatagramRecorder, sock=sock)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"to existing", sock.getsockname())
        data, _ = await receiver.datagram(1)
        transport.close()
        return data

    assert backend.run(main, timeout=10) == b"to existing"


def test_udp_to_a_closed_port_reports_error_received(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            closed = probe.getsockname()
        transport, client = await loop.create_datagram_endpoint(
            DatagramRecorder, remote_addr=closed
        )
        transport.sendto(b"anyone?")
        # Linux answers with ICMP port unreachable; the connected socket reports it.
        transport.sendto(b"anyone at all?")
        error = await client.error
        transport.close()
        return error

    assert isinstance(backend.run(main, timeout=10), ConnectionRefusedError)


def test_unix_datagram_endpoints_exchange_datagrams(backend: LoopUnderTest, tmp_path):
    server_path = str(tmp_path / "dgram-server.sock")
    client_path = str(tmp_path / "dgram-client.sock")

    async def main():
        loop = asyncio.get_running_loop()
        server_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        server_sock.bind(server_path)
        client_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        client_sock.bind(client_path)
        server_transport, _ = await loop.create_datagram_endpoint(
            lambda: DatagramRecorder(echo=True), sock=server_sock
        )
        client_transport, client = await loop.create_datagram_endpoint(
            DatagramRecorder, sock=client_sock
        )
        client_transport.sendto(b"unix datagram", server_path)
        echoed, _ = await client.datagram(1)
        client_transport.close()
        server_transport.close()
        return echoed

    assert backend.run(main, timeout=10) == b"unix datagram"
