"""`StreamedBody`, the body a handler reads while it arrives, as a unit."""

from __future__ import annotations

import asyncio

import pytest

from forkloop.server.request_body import HIGH_WATER, BodyFailed, StreamedBody


def test_pieces_come_out_in_order_and_more_is_false_exactly_once():
    async def main() -> list[tuple[bytes, bool]]:
        body = StreamedBody(on_drained=lambda: None)
        body.feed(b"ab")
        body.feed(b"cd")
        first = await body.read()
        body.feed(b"ef")
        body.finish()
        return [first, await body.read()]

    assert asyncio.run(main()) == [(b"abcd", True), (b"ef", False)]


def test_the_end_parsed_while_a_read_resumes_parsing_is_not_lost():
    """A read past the high-water mark lets the connection parse again at once;
    what that parse feeds, the body's end included, must come out of the next
    reads (it once came out as ``more=False`` with those pieces dropped)."""

    async def main() -> list[tuple[bytes, bool]]:
        body: StreamedBody

        def drained() -> None:  # the connection parses its stash: the rest, and the end
            body.feed(b"tail")
            body.finish()

        body = StreamedBody(on_drained=drained)
        assert body.feed(b"x" * (HIGH_WATER + 1)) is False  # past the mark: stop parsing
        reads = [await body.read()]
        while reads[-1][1]:
            reads.append(await body.read())
        return reads

    reads = asyncio.run(main())
    assert b"".join(data for data, _ in reads) == b"x" * (HIGH_WATER + 1) + b"tail"
    assert [more for _, more in reads] == [True] * (len(reads) - 1) + [False]


def test_a_failed_body_raises_after_what_arrived():
    async def main() -> None:
        body = StreamedBody(on_drained=lambda: None)
        body.feed(b"some")
        body.fail("the client went away")
        assert await body.read() == (b"some", True)
        with pytest.raises(BodyFailed, match="the client went away"):
            await body.read()

    asyncio.run(main())


def test_continue_is_owed_until_the_first_read_or_the_first_piece():
    owed = StreamedBody(on_drained=lambda: None, continue_owed=True)
    assert owed.take_continue() is True and owed.take_continue() is False
    sent_anyway = StreamedBody(on_drained=lambda: None, continue_owed=True)
    sent_anyway.feed(b"body without waiting")
    assert sent_anyway.take_continue() is False
