"""A ramp for locust: the users rise in equal steps over the run.

    locust -f loadtest/locustfile.py,loadtest/ramp.py --headless \\
        --users 100 --spawn-rate 50 --run-time 60s --ramp-steps 5
    forkloop loadtest --users 100 --duration 60 --ramp 5        # the same, per scenario

With 100 users, 60 s and 5 steps: 20 users for the first 12 s, 40 for the
next 12 s, and so on up to 100; each step's users are started at
``--spawn-rate`` per second. Where the rate stops rising as users are added,
the server (or the load generator: see the report's *load gen CPU*) is
saturated; where the latency starts rising with them, requests are queueing.

Locust uses a `LoadTestShape` whenever one is in its locustfiles, and then
takes the user count from the shape alone. This one lives in its own file so
that it is an option: name it after ``-f`` to use it, leave it out for a
constant load. It reads locust's own ``--users``, ``--spawn-rate`` and
``--run-time`` (``use_common_options``) and adds ``--ramp-steps``. Without
``--run-time`` each step lasts ``--ramp-step-seconds`` (10 s by default) and
the last step runs until stopped. It runs on the master only; a
distributed run's workers need no copy of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol, TypeVar, cast

from locust import LoadTestShape, events
from locust.argument_parser import LocustArgumentParser

Handler = TypeVar("Handler", bound=Callable[..., None])


class Hook(Protocol):
    """A locust `EventHook` as typed here (locust leaves it unannotated): add_listener
    registers a handler and returns it unchanged."""

    def add_listener(self, handler: Handler) -> Handler: ...


def listener(hook: Hook) -> Callable[[Handler], Handler]:
    """``@listener(events.x)``: ``@events.x.add_listener``, with the handler's types kept."""
    return hook.add_listener


@listener(events.init_command_line_parser)
def add_ramp_options(parser: LocustArgumentParser) -> None:
    parser.add_argument(
        "--ramp-steps", type=int, default=4, help="ramp: equal steps up to --users (default 4)"
    )
    parser.add_argument(
        "--ramp-step-seconds",
        type=float,
        default=10.0,
        help="ramp: seconds per step when there is no --run-time (default 10)",
    )


class StepRamp(LoadTestShape):
    """``--users`` reached in ``--ramp-steps`` equal steps spread over ``--run-time``."""

    use_common_options = True

    def tick(self) -> tuple[int, float] | None:
        assert self.runner is not None  # locust gives the shape its runner before it ticks
        options = self.runner.environment.parsed_options
        assert options is not None  # a shape runs from locust's command line, options parsed
        steps = max(1, options.ramp_steps)
        # LoadTestShape.get_run_time is unannotated: seconds since the test started
        elapsed = cast(Callable[[], float], self.get_run_time)()
        if options.run_time:
            if elapsed >= options.run_time:
                return None
            step_seconds = options.run_time / steps
        else:
            step_seconds = options.ramp_step_seconds
        step = min(steps, int(elapsed // step_seconds) + 1)
        users = max(1, math.ceil(options.num_users * step / steps))
        return users, options.spawn_rate
