"""A generation's events on their way to its client. The event loop alone owns a channel.

The decode thread never touches it: its events arrive through the scheduler's hand-over
(app/engine/scheduler.py), which runs on the event loop. The channel is bounded by ``backlog``
characters not yet taken by the client's writer: a client that reads more slowly than the
model writes is cut off rather than buffered without bound."""

from __future__ import annotations

import asyncio
import logging

from app.engine.request import Done, Event, Failed, TextRun

log = logging.getLogger("charrnn.channel")


class EventChannel:
    def __init__(self, backlog: int):
        self.backlog = backlog
        self.queued = 0  # characters in the queue
        self.closed = False  # the final event is in the queue
        # Set when the client is cut off for reading too slowly: its writer may be stuck in
        # a socket write that will never finish, so whoever serves it closes the connection.
        self.cut_off = asyncio.Event()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def deliver(self, events: list[Event]) -> bool:
        """Queue events; False if the client fell ``backlog`` characters behind and was cut
        off instead (its unread events are replaced by a final ``Failed``)."""
        for event in events:
            if self.closed:
                return True
            if isinstance(event, TextRun):
                if self.queued + len(event.text) > self.backlog:
                    self._cut_off()
                    return False
                self.queued += len(event.text)
            self._queue.put_nowait(event)
            if isinstance(event, Done | Failed):
                self.closed = True
        return True

    def fail(self, event: Failed) -> None:
        """End the stream now with ``event`` (after what is already queued)."""
        if not self.closed:
            self.closed = True
            self._queue.put_nowait(event)

    async def get(self) -> Event:
        """The next event, waiting for it."""
        return self._taken(await self._queue.get())

    def get_nowait(self) -> Event | None:
        """The next event if one is waiting."""
        return None if self._queue.empty() else self._taken(self._queue.get_nowait())

    def _taken(self, event: Event) -> Event:
        if isinstance(event, TextRun):
            self.queued -= len(event.text)
        return event

    def _cut_off(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()
        self.queued = 0
        self.fail(Failed("the client read too slowly; stream cut off", "slow_client"))
        log.warning("cut off a client %d characters behind", self.backlog)
        self.cut_off.set()
