"""The worker's signs of consumption from its event loop's own turns, with a fake hub and clock.

Beside the real worker's tests (``tests/test_celery_worker.py``: a full pool for twice the stall
timeout neither reconnects nor stops; silenced connections are caught), these pin the rule itself,
which a real loop cannot be made to break on demand: a turn counts when it comes no later than the
timer its poll waited for, plus ``LATE``; a late one (the loop was blocked) never does.
"""

from __future__ import annotations

import types

import pytest

from safe_scheduler.components import celery_consumption as cc

pytestmark = pytest.mark.celery


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class Consumption:
    def __init__(self, answers_read: bool = True) -> None:
        self.answers_read = answers_read
        self.full = True
        self.signs = 0

    def busy(self) -> bool:
        return self.full

    def sign(self) -> None:
        self.signs += 1


class Loop:
    """A kombu hub as the bootstep sees it: its timer's queue (eta first) and its on_tick set."""

    def __init__(self, clock: Clock, step_cls: type) -> None:
        self.clock = clock
        self.timer = types.SimpleNamespace(_queue=[])
        self.on_tick: set = set()
        self.step = step_cls(None)
        self.step.start(types.SimpleNamespace(hub=self, timer=None))

    def turn_after(self, seconds: float, next_timer_in: float | None = 2.0) -> None:
        """The loop turns ``seconds`` after the last turn; then its next timer entry is due in ``next_timer_in``."""
        self.clock.now += seconds
        self.timer._queue[:] = [] if next_timer_in is None else [(self.clock.now + next_timer_in, 0, None)]
        for callback in list(self.on_tick):
            callback()


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(cc, "time", clock)
    return clock


def _loop(clock: Clock, consumption: Consumption) -> Loop:
    loop = Loop(clock, cc._consumer_ticks(consumption))
    loop.turn_after(0.0)  # the first turn, right after the start
    consumption.signs = 0  # the start's own sign, and the first turn's
    return loop


def test_turns_on_time_with_a_full_pool_are_signs_at_most_one_a_second(clock):
    consumption = Consumption()
    loop = _loop(clock, consumption)
    for _ in range(10):
        loop.turn_after(0.25)
    assert consumption.signs == 2  # 2.5 s of turns: one look a second
    loop.turn_after(2.0)
    assert consumption.signs == 3


def test_a_late_turn_is_no_sign_and_the_next_one_on_time_is(clock):
    consumption = Consumption()
    loop = _loop(clock, consumption)
    loop.turn_after(2.0)
    assert consumption.signs == 1
    loop.turn_after(2.0 + cc.LATE + 0.1)  # its poll waited for a timer 2 s away: blocked meanwhile
    assert consumption.signs == 1
    loop.turn_after(2.0)
    assert consumption.signs == 2


def test_the_poll_waits_for_the_next_timer_at_most_ten_seconds(clock):
    consumption = Consumption()
    loop = _loop(clock, consumption)
    loop.turn_after(2.0, next_timer_in=60.0)
    signs = consumption.signs
    loop.turn_after(cc.POLL_AT_MOST + cc.LATE - 0.1, next_timer_in=60.0)
    assert consumption.signs == signs + 1
    loop.turn_after(cc.POLL_AT_MOST + cc.LATE + 0.1, next_timer_in=None)
    assert consumption.signs == signs + 1
    loop.turn_after(cc.POLL_WITHOUT_TIMERS + cc.LATE - 0.1, next_timer_in=None)
    assert consumption.signs == signs + 2


def test_on_redis_a_pool_with_room_gives_no_sign_from_turns(clock):
    consumption = Consumption()
    loop = _loop(clock, consumption)
    consumption.full = False  # the BRPOP answers are the signs then
    for _ in range(5):
        loop.turn_after(1.0)
    assert consumption.signs == 0


def test_elsewhere_every_turn_on_time_counts(clock):
    consumption = Consumption(answers_read=False)
    loop = _loop(clock, consumption)
    consumption.full = False
    for _ in range(5):
        loop.turn_after(1.0)
    assert consumption.signs == 5


def test_stopped_it_leaves_the_loop(clock):
    consumption = Consumption()
    loop = _loop(clock, consumption)
    loop.step.stop(None)
    assert not loop.on_tick
