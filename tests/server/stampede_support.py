"""A stampede: many concurrent GETs of one path, each on a connection of its own."""

from __future__ import annotations

import asyncio
import re


async def _one(port: int, path: str) -> tuple[int, str, bytes]:
    """(status, X-Cache, body) of one GET; (0, error, b"") if it failed."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        return 0, f"connect: {exc}", b""
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        answer = await reader.read()
    except OSError as exc:
        return 0, f"read: {exc}", b""
    finally:
        writer.close()
    if not answer.startswith(b"HTTP/1.1 "):
        return 0, f"no answer ({answer[:40]!r})", b""
    head, _, body = answer.partition(b"\r\n\r\n")
    text = head.decode("latin-1")
    found = re.search(r"(?im)^x-cache: *(\w+)", text)
    return int(text[9:12]), found.group(1) if found else "", body


def stampede(port: int, path: str, count: int, timeout: float = 30) -> list[tuple[int, str, bytes]]:
    """``count`` concurrent GETs of ``path``: (status, X-Cache, body) of each."""

    async def run() -> list[tuple[int, str, bytes]]:
        async with asyncio.timeout(timeout):
            return list(await asyncio.gather(*(_one(port, path) for _ in range(count))))

    return asyncio.run(run())
