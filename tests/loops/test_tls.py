"""TLS over the loop's transports: ssl= on servers and connections, streams, start_tls.

The certificate is the suites' one (the ``certificate`` fixture,
`tests/certificates.py`): self-signed for ``localhost``, made for this run.
"""

from __future__ import annotations

import asyncio
import ssl

import pytest

from tests.certificates import Certificate
from tests.loop_under_test import LoopUnderTest
from tests.loops.loop_support import Echo, Recorder, port_of


def _contexts(certificate: Certificate) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(certificate.certfile, certificate.keyfile)
    client_context = ssl.create_default_context(cafile=certificate.certfile)
    return server_context, client_context


def test_tls_echo_over_create_server_and_create_connection(backend: LoopUnderTest, certificate):
    server_context, client_context = _contexts(certificate)

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", 0, ssl=server_context)
        transport, client = await loop.create_connection(
            Recorder, "127.0.0.1", port_of(server), ssl=client_context, server_hostname="localhost"
        )
        payload = b"secret " * 50_000  # several TLS records
        transport.write(payload)
        echoed = await client.received(len(payload))
        peer_cert = transport.get_extra_info("peercert")
        transport.close()
        await client.lost
        server.close()
        await server.wait_closed()
        return echoed == payload, peer_cert["subject"]

    matches, subject = backend.run(main, timeout=20)
    assert matches
    assert (("commonName", "localhost"),) in subject


def test_tls_rejects_a_certificate_the_client_does_not_trust(backend: LoopUnderTest, certificate):
    server_context, _ = _contexts(certificate)
    untrusting = ssl.create_default_context()  # system roots only: our certificate is unknown

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", 0, ssl=server_context)
        try:
            with pytest.raises(ssl.SSLCertVerificationError):
                await loop.create_connection(
                    Recorder,
                    "127.0.0.1",
                    port_of(server),
                    ssl=untrusting,
                    server_hostname="localhost",
                )
        finally:
            server.close()

    backend.run(main, timeout=20)


def test_tls_streams_and_start_tls_upgrade(backend: LoopUnderTest, certificate):
    server_context, client_context = _contexts(certificate)

    async def upgrade_then_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        assert await reader.readline() == b"STARTTLS\n"
        writer.write(b"GO\n")
        await writer.drain()
        await writer.start_tls(server_context)
        line = await reader.readline()
        writer.write(line.upper())
        await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(upgrade_then_echo, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        writer.write(b"STARTTLS\n")
        assert await reader.readline() == b"GO\n"
        await writer.start_tls(client_context, server_hostname="localhost")
        writer.write(b"now encrypted\n")
        reply = await reader.readline()
        cipher = writer.get_extra_info("cipher")
        writer.close()
        server.close()
        return reply, cipher is not None

    assert backend.run(main, timeout=20) == (b"NOW ENCRYPTED\n", True)
