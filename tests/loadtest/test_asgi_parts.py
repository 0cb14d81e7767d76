"""`loadtest.asgi_parts` runs each part of an ASGI request for real (callgrind aside)."""

from __future__ import annotations

import asyncio

import pytest

from forkloop.loadtest.asgi_parts import PARTS, run_part


@pytest.mark.parametrize("part", PARTS)
def test_each_part_runs_and_the_whole_requests_are_answered(part):
    async def main() -> None:
        connection = run_part(asyncio.get_running_loop(), part, 50)
        answered = connection.context.stats.responses[200]
        if part in ("request", "native", "native-async", "app", "writer"):
            assert answered == 50
        else:
            assert answered == 0  # parse and scope answer nothing

    asyncio.run(main())


def test_an_unknown_part_is_refused():
    with pytest.raises(ValueError, match="no part 'nothing'"):
        asyncio.run(_run("nothing"))


async def _run(part: str) -> None:
    run_part(asyncio.get_running_loop(), part, 1)
