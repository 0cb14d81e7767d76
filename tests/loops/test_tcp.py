"""TCP: servers, connections, transports, flow control and the sock_* operations."""

from __future__ import annotations

import asyncio
import io
import socket

import pytest

from tests.loop_under_test import LoopUnderTest
from tests.loops.loop_support import (
    BufferedEcho,
    Echo,
    Recorder,
    bytes_waiting,
    ipv6_loopback_works,
    port_of,
    rst_close,
)
from tests.waiting import until

# echo ------------------------------------------------------------------------------


def test_tcp_echo_between_protocols(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", 0)
        transport, client = await loop.create_connection(Recorder, "127.0.0.1", port_of(server))
        transport.write(b"hello ")
        transport.writelines([b"over ", bytearray(b"tcp"), memoryview(b"!")])
        echoed = await client.received(15)
        transport.close()
        lost = await client.lost
        server.close()
        await server.wait_closed()
        return echoed, lost, client.events

    echoed, lost, events = backend.run(main, timeout=10)
    assert echoed == b"hello over tcp!"
    assert lost is None
    assert events == ["made", "data", "lost"]


def test_buffered_protocol_receives_into_its_own_buffer(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        protocols = []

        def factory():
            protocols.append(BufferedEcho())
            return protocols[-1]

        server = await loop.create_server(factory, "127.0.0.1", 0)
        transport, client = await loop.create_connection(Recorder, "127.0.0.1", port_of(server))
        payload = bytes(range(256)) * 64  # larger than the protocol's 1 KiB buffer
        transport.write(payload)
        echoed = await client.received(len(payload))
        transport.close()
        await client.lost
        server.close()
        return echoed == payload, protocols[0].get_buffer_calls

    matches, calls = backend.run(main, timeout=10)
    assert matches
    assert calls >= 16


def test_large_write_is_delivered_whole(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", 0)
        transport, client = await loop.create_connection(Recorder, "127.0.0.1", port_of(server))
        payload = bytes(range(256)) * 16 * 1024  # 4 MiB: more than any socket buffer
        transport.write(payload)
        echoed = await client.received(len(payload))
        transport.close()
        server.close()
        return echoed == payload

    assert backend.run(main, timeout=20)


def test_messages_of_every_size_arrive_whole_and_in_order(backend: LoopUnderTest):
    # One message at a time, each read by the server before the next is sent, so
    # reads come back empty-ish, exactly full, over-full and huge in turn (the
    # reactor reads small until a read comes back full; these are its edges).
    sizes = [1, 478, 479, 480, 512, 4096, 70_000, 3, 1, 2, 5, 8, 479, 200_000, 13]

    async def main():
        loop = asyncio.get_running_loop()
        server_side, transport, client, server = await _pair(loop)
        sent = bytearray()
        for number, size in enumerate(sizes):
            message = bytes([number]) * size
            transport.write(message)
            sent += message
            await server_side.received(len(sent))
        transport.close()
        server.close()
        return bytes(server_side.data) == bytes(sent)

    assert backend.run(main, timeout=20)


def test_a_bulk_upload_is_not_delivered_in_small_pieces(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        server_side, transport, client, server = await _pair(loop)
        transport.write(b"x" * 100)  # a small read first: the reader starts small
        transport.write(bytes(4 * 1024 * 1024))
        transport.write_eof()
        await server_side.eof
        transport.close()
        server.close()
        return server_side.reads, len(server_side.data)

    chunks, size = backend.run(main, timeout=20)
    assert size == 100 + 4 * 1024 * 1024
    assert chunks <= size // 8192  # reads of 479 bytes would make it 8,700


def test_create_connection_to_a_closed_port_raises_connection_refused(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with pytest.raises(ConnectionRefusedError):
            await loop.create_connection(Recorder, "127.0.0.1", port)

    backend.run(main, timeout=10)


# servers --------------------------------------------------------------------------------


def test_create_server_listens_on_every_host_in_a_list(backend: LoopUnderTest):
    hosts = ["127.0.0.1", "::1"] if ipv6_loopback_works() else ["127.0.0.1"]

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, hosts, 0)
        families = sorted(sock.family for sock in server.sockets)
        replies = []
        for sock in server.sockets:
            host, port = sock.getsockname()[:2]
            transport, client = await loop.create_connection(Recorder, host, port)
            transport.write(host.encode())
            replies.append(await client.received(len(host)))
            transport.close()
        server.close()
        await server.wait_closed()
        return families, sorted(replies)

    families, replies = backend.run(main, timeout=10)
    assert len(families) == len(hosts)
    assert replies == sorted(host.encode() for host in hosts)


def test_reuse_port_lets_two_servers_share_a_port(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        first = await loop.create_server(Echo, "127.0.0.1", 0, reuse_port=True)
        port = port_of(first)
        second = await loop.create_server(Echo, "127.0.0.1", port, reuse_port=True)
        shared = port_of(second) == port
        first.close()
        second.close()
        return shared

    assert backend.run(main, timeout=10)


def test_binding_a_busy_port_without_reuse_port_fails(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        first = await loop.create_server(Echo, "127.0.0.1", 0)
        try:
            with pytest.raises(OSError):
                await loop.create_server(Echo, "127.0.0.1", port_of(first))
        finally:
            first.close()

    backend.run(main, timeout=10)


def test_create_server_accepts_on_an_existing_socket(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        server = await loop.create_server(Echo, sock=listener, backlog=10)
        transport, client = await loop.create_connection(Recorder, "127.0.0.1", port_of(server))
        transport.write(b"via sock=")
        echoed = await client.received(9)
        transport.close()
        server.close()
        return echoed

    assert backend.run(main, timeout=10) == b"via sock="


def test_start_serving_false_defers_accepting_until_start_serving(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", 0, start_serving=False)
        before = server.is_serving()
        await server.start_serving()
        after = server.is_serving()
        transport, client = await loop.create_connection(Recorder, "127.0.0.1", port_of(server))
        transport.write(b"x")
        await client.received(1)
        transport.close()
        server.close()
        return before, after, server.is_serving()

    assert backend.run(main, timeout=10) == (False, True, False)


def test_server_close_keeps_live_connections_and_refuses_new_ones(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", 0)
        port = port_of(server)
        transport, client = await loop.create_connection(Recorder, "127.0.0.1", port)
        transport.write(b"before")
        await client.received(6)
        server.close()
        assert server.sockets == () or not server.is_serving()
        transport.write(b" after")
        echoed = await client.received(12)
        with pytest.raises(ConnectionRefusedError):
            await loop.create_connection(Recorder, "127.0.0.1", port)
        transport.close()
        await client.lost
        await server.wait_closed()
        return echoed

    assert backend.run(main, timeout=10) == b"before after"


def test_wait_closed_returns_once_the_server_is_closed_and_connections_are_gone(
    backend: LoopUnderTest,
):
    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", 0)
        transport, client = await loop.create_connection(Recorder, "127.0.0.1", port_of(server))
        transport.write(b"x")
        await client.received(1)
        waiter = asyncio.ensure_future(server.wait_closed())
        await asyncio.sleep(0)
        server.close()
        transport.close()
        await client.lost
        await asyncio.wait_for(waiter, 5)
        return waiter.done()

    assert backend.run(main, timeout=10)


def test_serve_forever_ends_by_cancellation_and_closes_the_server(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", 0, start_serving=False)
        serving = asyncio.ensure_future(server.serve_forever())
        await until(server.is_serving)
        with pytest.raises(RuntimeError):
            await server.serve_forever()
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
        return server.is_serving(), len(server.sockets)

    assert backend.run(main, timeout=10) == (False, 0)


def test_server_is_an_async_context_manager(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        async with await loop.create_server(Echo, "127.0.0.1", 0) as server:
            assert server.get_loop() is loop
            assert server.is_serving()
            assert len(server.sockets) == 1
        return server.is_serving()

    assert backend.run(main, timeout=10) is False


# connections from existing sockets -----------------------------------------------------------


def test_create_connection_on_an_existing_socket(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", 0)
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port_of(server)))
        transport, client = await loop.create_connection(Recorder, sock=sock)
        transport.write(b"sock")
        echoed = await client.received(4)
        transport.close()
        server.close()
        return echoed

    assert backend.run(main, timeout=10) == b"sock"


def test_create_connection_binds_the_local_address(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", 0)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            local_port = probe.getsockname()[1]
        transport, _ = await loop.create_connection(
            Recorder, "127.0.0.1", port_of(server), local_addr=("127.0.0.1", local_port)
        )
        sockname = transport.get_extra_info("sockname")
        transport.close()
        server.close()
        return sockname[1] == local_port

    assert backend.run(main, timeout=10)


def test_connect_accepted_socket_wraps_a_socket_from_accept(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        client = socket.socket()
        client.setblocking(False)
        connecting = asyncio.ensure_future(loop.sock_connect(client, listener.getsockname()))
        accepted, _ = await loop.sock_accept(listener)
        await connecting
        transport, server_side = await loop.connect_accepted_socket(Recorder, accepted)
        await loop.sock_sendall(client, b"to accepted")
        received = await server_side.received(11)
        transport.close()
        client.close()
        listener.close()
        return received

    assert backend.run(main, timeout=10) == b"to accepted"


# transports -------------------------------------------------------------------------------------


async def _pair(loop, server_protocol=Recorder, client_protocol=Recorder):
    """A connected (server protocol, client transport, client protocol, server) quadruple."""
    accepted = loop.create_future()

    def factory():
        protocol = server_protocol()
        accepted.set_result(protocol)
        return protocol

    server = await loop.create_server(factory, "127.0.0.1", 0)
    transport, client = await loop.create_connection(client_protocol, "127.0.0.1", port_of(server))
    server_side = await accepted
    await server_side.made
    return server_side, transport, client, server


def test_get_extra_info_reports_socket_and_both_addresses(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        server_side, transport, client, server = await _pair(loop)
        info = {name: transport.get_extra_info(name) for name in ("sockname", "peername")}
        info["socket family"] = transport.get_extra_info("socket").family
        peer_of_server = server_side.transport.get_extra_info("peername")
        missing = transport.get_extra_info("no-such-key", "default")
        port = port_of(server)
        transport.close()
        server.close()
        return info, peer_of_server, missing, port

    info, peer_of_server, missing, port = backend.run(main, timeout=10)
    assert info["peername"] == ("127.0.0.1", port)
    assert tuple(info["sockname"]) == tuple(peer_of_server)
    assert info["socket family"] == socket.AF_INET
    assert missing == "default"


def test_the_socket_in_extra_info_cannot_be_closed_under_the_transport(backend: LoopUnderTest):
    # asyncio hands out a TransportSocket, uvloop a PseudoSocket; neither closes.
    async def main():
        loop = asyncio.get_running_loop()
        server_side, transport, client, server = await _pair(loop)
        shown = transport.get_extra_info("socket")
        with pytest.raises((AttributeError, TypeError)):
            shown.close()
        transport.write(b"still open")
        await server_side.received(10)
        transport.close()
        server.close()
        return bytes(server_side.data)

    assert backend.run(main, timeout=10) == b"still open"


def test_write_eof_half_closes_and_the_peer_can_still_answer(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        server_side, transport, client, server = await _pair(
            loop, server_protocol=lambda: Recorder(keep_open_on_eof=True)
        )
        assert transport.can_write_eof()
        transport.write(b"question")
        transport.write_eof()
        await server_side.eof
        assert bytes(server_side.data) == b"question"
        server_side.transport.write(b"answer")
        server_side.transport.close()
        answer = await client.received(6)
        await client.eof
        lost = await client.lost
        await server_side.lost
        server.close()
        return answer, lost, client.events, server_side.events

    answer, lost, client_events, server_events = backend.run(main, timeout=10)
    assert answer == b"answer"
    assert lost is None
    assert client_events == ["made", "data", "eof", "lost"]
    assert server_events == ["made", "data", "eof", "lost"]


def test_eof_received_returning_false_closes_the_transport(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        server_side, transport, client, server = await _pair(loop)
        transport.write_eof()
        await server_side.eof
        server_lost = await server_side.lost
        await client.eof
        await client.lost
        server.close()
        return server_lost, server_side.transport.is_closing()

    assert backend.run(main, timeout=10) == (None, True)


def test_write_after_write_eof_is_an_error(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        _, transport, _, server = await _pair(loop)
        transport.write_eof()
        with pytest.raises(RuntimeError):
            transport.write(b"too late")
        transport.close()
        server.close()

    backend.run(main, timeout=10)


def test_write_refuses_objects_that_are_not_bytes(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        _, transport, _, server = await _pair(loop)
        with pytest.raises(TypeError):
            transport.write("text is not bytes")
        transport.close()
        server.close()

    backend.run(main, timeout=10)


def test_pause_reading_holds_data_in_the_kernel_until_resume(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        server_side, transport, client, server = await _pair(loop)
        server_transport = server_side.transport
        assert server_transport.is_reading()
        server_transport.pause_reading()
        assert not server_transport.is_reading()
        transport.write(b"held back")
        server_socket = server_transport.get_extra_info("socket")
        await until(lambda: bytes_waiting(server_socket) == 9)
        for _ in range(5):
            await asyncio.sleep(0)  # give a reading transport every chance to read
        held = bytes(server_side.data)
        server_transport.resume_reading()
        assert server_transport.is_reading()
        released = await server_side.received(9)
        transport.close()
        server.close()
        return held, released

    assert backend.run(main, timeout=10) == (b"", b"held back")


def test_slow_reader_makes_the_writer_pause_and_then_resume(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        server_side, transport, client, server = await _pair(loop)
        transport.pause_reading()  # the client stops reading: the server's writes back up
        writer = server_side.transport
        writer.set_write_buffer_limits(high=64 * 1024, low=16 * 1024)
        assert writer.get_write_buffer_limits() == (16 * 1024, 64 * 1024)
        payload = bytes(range(256)) * 32 * 1024  # 8 MiB, more than the kernel buffers hold
        writer.write(payload)
        await server_side.paused
        buffered = writer.get_write_buffer_size()
        transport.resume_reading()
        await server_side.resumed
        received = await client.received(len(payload))
        transport.close()
        server.close()
        return buffered, received == payload, server_side.events

    buffered, intact, events = backend.run(main, timeout=20)
    assert buffered > 64 * 1024
    assert intact
    assert events.index("pause") < events.index("resume")


def test_close_flushes_buffered_data_before_connection_lost(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        server_side, transport, client, server = await _pair(loop)
        payload = b"z" * (4 * 1024 * 1024)
        server_side.transport.write(payload)
        server_side.transport.close()
        assert server_side.transport.is_closing()
        received = await client.received(len(payload))
        server_lost = await server_side.lost
        await client.lost
        server.close()
        return len(received), server_lost

    assert backend.run(main, timeout=20) == (4 * 1024 * 1024, None)


def test_abort_drops_buffered_data_and_loses_the_connection_at_once(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        server_side, transport, client, server = await _pair(loop)
        transport.pause_reading()
        writer = server_side.transport
        writer.write(b"q" * (8 * 1024 * 1024))
        assert writer.get_write_buffer_size() > 0
        writer.abort()
        assert writer.is_closing()
        server_lost = await server_side.lost
        transport.resume_reading()
        client_lost = await client.lost
        server.close()
        return server_lost, len(client.data), client_lost

    server_lost, client_received, client_lost = backend.run(main, timeout=20)
    assert server_lost is None
    assert client_received < 8 * 1024 * 1024
    assert client_lost is None or isinstance(client_lost, ConnectionError)


def test_peer_reset_reports_connection_reset_error(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        accepted = loop.create_future()

        def factory():
            protocol = Recorder()
            accepted.set_result(protocol)
            return protocol

        server = await loop.create_server(factory, "127.0.0.1", 0)
        raw = socket.socket()
        raw.setblocking(False)
        await loop.sock_connect(raw, ("127.0.0.1", port_of(server)))
        server_side = await accepted
        await server_side.made
        rst_close(raw)
        lost = await server_side.lost
        server.close()
        return lost

    assert isinstance(backend.run(main, timeout=10), ConnectionResetError)


def test_closing_twice_calls_connection_lost_once(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        _, transport, client, server = await _pair(loop)
        transport.close()
        transport.close()
        transport.abort()
        await client.lost
        for _ in range(3):
            await asyncio.sleep(0)
        server.close()
        return client.events.count("lost")

    assert backend.run(main, timeout=10) == 1


def test_set_protocol_switches_where_data_goes(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        server_side, transport, client, server = await _pair(loop)
        replacement = Recorder()
        server_side.transport.set_protocol(replacement)
        assert server_side.transport.get_protocol() is replacement
        transport.write(b"to the new protocol")
        received = await replacement.received(19)
        transport.close()
        await replacement.lost
        server.close()
        return received, bytes(server_side.data)

    assert backend.run(main, timeout=10) == (b"to the new protocol", b"")


# sock_* operations and fd callbacks -------------------------------------------------------------


def test_sock_operations_round_trip(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        client = socket.socket()
        client.setblocking(False)
        accepting = asyncio.ensure_future(loop.sock_accept(listener))
        await loop.sock_connect(client, listener.getsockname())
        conn, address = await accepting
        payload = b"p" * (2 * 1024 * 1024)
        sending = asyncio.ensure_future(loop.sock_sendall(client, payload))
        received = bytearray()
        while len(received) < len(payload):
            received += await loop.sock_recv(conn, 65536)
        await sending
        buffer = bytearray(16)
        await loop.sock_sendall(conn, b"reply")
        count = await loop.sock_recv_into(client, buffer)
        client_address = client.getsockname()
        for sock in (client, conn, listener):
            sock.close()
        return len(received), address == client_address, bytes(buffer[:count])

    assert backend.run(main, timeout=20) == (2 * 1024 * 1024, True, b"reply")


def test_cancelled_sock_recv_leaves_the_socket_usable(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        left, right = socket.socketpair()
        for sock in (left, right):
            sock.setblocking(False)
        pending = asyncio.ensure_future(loop.sock_recv(left, 100))
        await asyncio.sleep(0)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        right.send(b"later")
        data = await loop.sock_recv(left, 100)
        left.close()
        right.close()
        return data

    assert backend.run(main, timeout=10) == b"later"


# Stock loops that lack loop.sock_sendfile(), and why they are excused: uvloop
# keeps AbstractEventLoop's stub, which raises NotImplementedError (the server
# never calls sock_sendfile). Each is checked to still lack it, so the test says
# when one gains it. forkloop's own loops are never listed: a NotImplementedError
# from them fails the test.
STOCK_LOOPS_WITHOUT_SOCK_SENDFILE = {"uvloop"}


def test_sock_sendfile_sends_a_file_natively_and_by_fallback(backend: LoopUnderTest, tmp_path):
    content = bytes(range(256)) * 4096
    path = tmp_path / "payload.bin"
    path.write_bytes(content)

    async def main():
        loop = asyncio.get_running_loop()
        results = []
        for source in (open(path, "rb"), io.BytesIO(content)):
            left, right = socket.socketpair()
            for sock in (left, right):
                sock.setblocking(False)
            with source, left, right:
                first = await loop.sock_sendfile(left, source, 1000, 1000)
                sending = asyncio.ensure_future(loop.sock_sendfile(left, source, 2000, 499_000))
                received = bytearray()
                while len(received) < 500_000:
                    received += await loop.sock_recv(right, 65536)
                sent = first + await sending
                results.append((sent, bytes(received) == content[1000:501_000], source.tell()))
        return results

    if backend.backend in STOCK_LOOPS_WITHOUT_SOCK_SENDFILE:
        with pytest.raises(NotImplementedError):
            backend.run(main, timeout=20)
        return
    assert backend.run(main, timeout=20) == [(500_000, True, 501_000)] * 2


def test_add_reader_and_writer_call_back_until_removed(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        left, right = socket.socketpair()
        for sock in (left, right):
            sock.setblocking(False)
        calls = {"read": 0, "write": 0}
        readable = loop.create_future()
        writable = loop.create_future()

        def on_readable():
            calls["read"] += 1
            if not readable.done():
                readable.set_result("r")

        def on_writable():
            calls["write"] += 1
            if not writable.done():
                writable.set_result("w")

        loop.add_reader(left.fileno(), on_readable)
        loop.add_writer(right, on_writable)
        right.send(b"ping")
        results = await asyncio.gather(readable, writable)
        loop.remove_reader(left.fileno())
        loop.remove_writer(right)
        before = dict(calls)
        right.send(b"more")
        for _ in range(5):
            await asyncio.sleep(0)
        left.close()
        right.close()
        return results, before == calls

    assert backend.run(main, timeout=10) == (["r", "w"], True)


def test_getaddrinfo_and_getnameinfo_resolve_localhost(backend: LoopUnderTest):
    async def main():
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)
        host, port = await loop.getnameinfo(("127.0.0.1", 80), socket.NI_NUMERICHOST)
        return {info[4][1] for info in infos}, host

    ports, host = backend.run(main, timeout=10)
    assert ports == {80}
    assert host == "127.0.0.1"
