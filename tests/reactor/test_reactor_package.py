"""The reactor's public surface and the behaviour it promises beyond the common contract."""

from __future__ import annotations

import asyncio
import socket

import pytest

from forkloop import reactor
from forkloop.server import backends
from tests.loops.loop_support import Echo, Recorder, port_of


def test_backend_registry_builds_reactor_loops():
    loop = backends.get("reactor").new_event_loop()
    try:
        assert isinstance(loop, reactor.EventLoop)
        assert isinstance(loop, asyncio.AbstractEventLoop)
    finally:
        loop.close()


def test_run_returns_the_coroutine_result_on_a_reactor_loop():
    async def main():
        return type(asyncio.get_running_loop())

    assert reactor.run(main()) is reactor.EventLoop


def test_run_passes_debug_mode_to_the_loop():
    async def main():
        return asyncio.get_running_loop().get_debug()

    assert reactor.run(main(), debug=True) is True


def test_install_makes_asyncio_run_use_reactor_loops():
    async def main():
        return type(asyncio.get_running_loop())

    previous = asyncio.get_event_loop_policy()
    try:
        reactor.install()
        assert isinstance(asyncio.get_event_loop_policy(), reactor.EventLoopPolicy)
        assert asyncio.run(main()) is reactor.EventLoop
    finally:
        asyncio.set_event_loop_policy(previous)


def test_remove_reader_and_writer_report_whether_anything_was_removed():
    async def main():
        loop = asyncio.get_running_loop()
        left, right = socket.socketpair()
        loop.add_reader(left, lambda: None)
        loop.add_writer(left, lambda: None)
        results = (
            loop.remove_reader(left),
            loop.remove_reader(left),
            loop.remove_writer(left),
            loop.remove_writer(left),
        )
        left.close()
        right.close()
        return results

    assert reactor.run(main()) == (True, False, True, False)


def test_add_reader_refuses_an_fd_owned_by_a_transport():
    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", 0)
        transport, _ = await loop.create_connection(Recorder, "127.0.0.1", port_of(server))
        fd = transport.get_extra_info("socket").fileno()
        with pytest.raises(RuntimeError, match="used by transport"):
            loop.add_reader(fd, lambda: None)
        transport.close()
        server.close()

    reactor.run(main())


def test_loop_sendfile_sends_a_file_over_a_transport(tmp_path):
    content = bytes(range(256)) * 1024
    path = tmp_path / "file.bin"
    path.write_bytes(content)

    async def main():
        loop = asyncio.get_running_loop()
        accepted = loop.create_future()

        def factory():
            protocol = Recorder()
            accepted.set_result(protocol)
            return protocol

        server = await loop.create_server(factory, "127.0.0.1", 0)
        transport, _ = await loop.create_connection(Recorder, "127.0.0.1", port_of(server))
        receiver = await accepted
        transport.write(b"header:")
        with open(path, "rb") as file:
            sent = await loop.sendfile(transport, file, 100)
        received = await receiver.received(7 + len(content) - 100)
        transport.close()
        server.close()
        return sent, received

    sent, received = reactor.run(main())
    assert sent == len(content) - 100
    assert received == b"header:" + content[100:]


def test_unix_datagram_endpoint_by_path(tmp_path):
    from tests.loops.loop_support import DatagramRecorder

    server_path = str(tmp_path / "server.sock")
    client_path = str(tmp_path / "client.sock")

    async def main():
        loop = asyncio.get_running_loop()
        server_transport, _ = await loop.create_datagram_endpoint(
            lambda: DatagramRecorder(echo=True), local_addr=server_path, family=socket.AF_UNIX
        )
        client_transport, client = await loop.create_datagram_endpoint(
            DatagramRecorder,
            local_addr=client_path,
            remote_addr=server_path,
            family=socket.AF_UNIX,
        )
        client_transport.sendto(b"by path")
        echoed, _ = await client.datagram(1)
        client_transport.close()
        server_transport.close()
        return echoed

    assert reactor.run(main()) == b"by path"


def test_unclosed_loop_warns_when_collected():
    loop = reactor.new_event_loop()
    with pytest.warns(ResourceWarning, match="unclosed event loop"):
        loop.__del__()
    assert loop.is_closed()


def test_large_unix_datagrams_arrive_whole(tmp_path):
    from tests.loops.loop_support import DatagramRecorder

    async def main():
        loop = asyncio.get_running_loop()
        receiver_sock, sender = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        receiver_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        transport, receiver = await loop.create_datagram_endpoint(
            DatagramRecorder, sock=receiver_sock
        )
        payload = bytes(range(256)) * 600  # 150 KiB: more than one stream read
        sender.send(payload)
        data, _ = await receiver.datagram(1)
        transport.close()
        sender.close()
        return data == payload

    assert reactor.run(main())


def test_server_closed_by_its_own_protocol_factory_stops_accepting_quietly():
    async def main():
        loop = asyncio.get_running_loop()
        errors = []
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        servers = []

        def factory():
            servers[0].close()
            return Echo()

        servers.append(await loop.create_server(factory, "127.0.0.1", 0))
        port = port_of(servers[0])
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        await servers[0].wait_closed()
        for _ in range(5):
            await asyncio.sleep(0)
        for client in clients:
            client.close()
        return errors

    assert reactor.run(main()) == []
