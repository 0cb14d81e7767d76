"""asyncio streams (StreamReader/StreamWriter) on top of the loop's transports."""

from __future__ import annotations

import asyncio

from tests.loop_under_test import LoopUnderTest


async def _line_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while line := await reader.readline():
        writer.write(line.upper())
        await writer.drain()
    writer.close()
    await writer.wait_closed()


def test_streams_echo_lines(backend: LoopUnderTest):
    async def main():
        server = await asyncio.start_server(_line_echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        replies = []
        for word in (b"alpha", b"beta", b"gamma"):
            writer.write(word + b"\n")
            await writer.drain()
            replies.append(await reader.readline())
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return replies

    assert backend.run(main, timeout=10) == [b"ALPHA\n", b"BETA\n", b"GAMMA\n"]


def test_streams_move_a_large_payload_with_drain_and_readexactly(backend: LoopUnderTest):
    payload = bytes(range(256)) * 16 * 1024  # 4 MiB

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.readexactly(len(payload))
        writer.write(len(data).to_bytes(8, "big") + data[-16:])
        await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(sink, "127.0.0.1", 0, limit=64 * 1024)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for offset in range(0, len(payload), 256 * 1024):
            writer.write(payload[offset : offset + 256 * 1024])
            await writer.drain()
        size = int.from_bytes(await reader.readexactly(8), "big")
        tail = await reader.readexactly(16)
        writer.close()
        await writer.wait_closed()
        server.close()
        return size, tail

    assert backend.run(main, timeout=20) == (len(payload), payload[-16:])


def test_streams_half_close_lets_the_server_read_to_eof_then_answer(backend: LoopUnderTest):
    async def count_until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        data = await reader.read()  # everything until the client's write_eof()
        writer.write(b"%d bytes" % len(data))
        await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(count_until_eof, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x" * 100_000)
        assert writer.can_write_eof()
        writer.write_eof()
        answer = await reader.read()
        at_eof = reader.at_eof()
        writer.close()
        await writer.wait_closed()
        server.close()
        return answer, at_eof

    assert backend.run(main, timeout=10) == (b"100000 bytes", True)


def test_stream_reader_sees_eof_when_the_peer_closes(backend: LoopUnderTest):
    async def say_bye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        writer.write(b"bye")
        writer.close()
        await writer.wait_closed()

    async def main():
        server = await asyncio.start_server(say_bye, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        data = await reader.read()
        after = await reader.read(10)
        writer.close()
        await writer.wait_closed()
        server.close()
        return data, after, reader.at_eof()

    assert backend.run(main, timeout=10) == (b"bye", b"", True)


def test_unix_streams_echo_lines(backend: LoopUnderTest, tmp_path):
    path = str(tmp_path / "streams.sock")

    async def main():
        server = await asyncio.start_unix_server(_line_echo, path)
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"over a unix stream\n")
        reply = await reader.readline()
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return reply

    assert backend.run(main, timeout=10) == b"OVER A UNIX STREAM\n"


def test_stream_writer_reports_peer_address_and_transport(backend: LoopUnderTest):
    async def main():
        server = await asyncio.start_server(_line_echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        peer = writer.get_extra_info("peername")
        closing_before = writer.is_closing()
        writer.close()
        await writer.wait_closed()
        server.close()
        return peer, closing_before, writer.is_closing(), port

    peer, closing_before, closing_after, port = backend.run(main, timeout=10)
    assert peer == ("127.0.0.1", port)
    assert (closing_before, closing_after) == (False, True)
