"""What the loop tells the threads that watch it (VacMon, metrics): LMs started and ended,
passes run, events reacted to.

The loop calls these between its own steps, so an observer must only take note (a counter, a
queue, a flag) and do its work in its own thread: never block, never read the store here. A
failing observer is logged and the loop goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from lmrunner.state import LmRecord

LOG = logging.getLogger(__name__)


class Observer:
    """Does nothing by default: an observer overrides what it wants to know."""

    def started(self, record: LmRecord) -> None:
        """An LM is running (its record says how it was started)."""

    def ended(self, record: LmRecord) -> None:
        """An LM's end is recorded (outcome, accounting): its record as stored."""

    def passed(self, seconds: float, blocked: str | None) -> None:
        """A pass ran for ``seconds``; ``blocked`` says why the state directory cannot take
        more LMs now (full, read-only), None when it can."""

    def reacted(self, seconds: float) -> None:
        """An engine's event (an LM may have ended) was handled this long after it came."""


class Observers(Observer):
    """Tells each of several observers, each failure its own (logged, never the loop's)."""

    def __init__(self, observers: Sequence[Observer] = ()) -> None:
        self.observers = tuple(observers)

    def _each(self, call: Callable[[Observer], None]) -> None:
        for each in self.observers:
            try:
                call(each)
            except Exception:  # an observer's bug must not stop the loop
                LOG.exception("observer %s failed", type(each).__name__)

    def started(self, record: LmRecord) -> None:
        self._each(lambda each: each.started(record))

    def ended(self, record: LmRecord) -> None:
        self._each(lambda each: each.ended(record))

    def passed(self, seconds: float, blocked: str | None) -> None:
        self._each(lambda each: each.passed(seconds, blocked))

    def reacted(self, seconds: float) -> None:
        self._each(lambda each: each.reacted(seconds))
