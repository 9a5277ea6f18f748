"""The batcher's queue: two FIFO lanes, live traffic before background work (explanations).

A worker always takes a live item when one waits; a background item only when no live item waits or runs
(``live_idle``) and fewer than ``background_slots`` workers run background batches: background work fills the
engine's idle time and never shares the cores with a live batch. Built like ``asyncio.Queue`` (a deque per lane, a
deque of waiting getters' futures), so the live path costs what ``asyncio.Queue`` cost: one append and, when a
worker waits, one future.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

STOP = object()  # taken only when nothing else may be taken


class Lanes:
    def __init__(self, background_slots: int, live_idle: Callable[[], bool] = lambda: True) -> None:
        if background_slots < 1:
            raise ValueError("background work needs at least one slot")
        self.live: deque[Any] = deque()
        self.background: deque[Any] = deque()
        self.background_slots = background_slots
        self.live_idle = live_idle
        self.background_running = 0  # workers running a background batch (kept by the batcher)
        self._stops = 0
        self._getters: deque[asyncio.Future[None]] = deque()

    # -- putting -------------------------------------------------------------------------------------
    def put_live(self, item: Any) -> None:
        self.live.append(item)
        self.wake()

    def put_background(self, item: Any, *, front: bool = False) -> None:
        if front:  # preempted work goes back where it was: its explanation is the oldest
            self.background.appendleft(item)
        else:
            self.background.append(item)
        self.wake()

    def put_stop(self) -> None:
        self._stops += 1
        self.wake()

    def wake(self) -> None:
        """Let one waiting worker look again (after a put, or when a background slot frees)."""
        while self._getters:
            getter = self._getters.popleft()
            if not getter.done():
                getter.set_result(None)
                return

    # -- taking --------------------------------------------------------------------------------------
    def may_take_background(self) -> bool:
        return bool(self.background) and self.background_running < self.background_slots and self.live_idle()

    def take(self) -> Any | None:
        """The next item for a worker, STOP, or None when there is nothing it may take now."""
        if self.live:
            return self.live.popleft()
        if self.may_take_background():
            return self.background.popleft()
        if self._stops and not self.background and not self.background_running:  # everything accepted ran
            self._stops -= 1
            if self._stops:
                self.wake()  # the other workers' stops: they may have looked while background work still ran
            return STOP
        return None

    async def get(self) -> Any:
        while True:
            item = self.take()
            if item is not None:
                return item
            loop = asyncio.get_running_loop()
            getter = loop.create_future()
            self._getters.append(getter)
            # background work that may not start yet (live grace, busy slots) is looked at again in 10 ms
            # whatever happens: a missed wake-up costs at most that, never a stuck explanation
            recheck = loop.call_later(0.01, _settle, getter) if self.background else None
            try:
                await getter
            except asyncio.CancelledError:
                getter.cancel()
                if not getter.cancelled():  # woken and cancelled at once: pass the wake-up on
                    self.wake()
                raise
            finally:
                if recheck is not None:
                    recheck.cancel()

    def empty(self) -> bool:
        return not self.live


def _settle(getter: asyncio.Future[None]) -> None:
    if not getter.done():
        getter.set_result(None)
