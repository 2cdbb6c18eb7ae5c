"""Admission control: a bound on generation requests in flight, and draining on shutdown.

One counter on the event loop (no lock needed: admission happens between awaits). It
bounds running + waiting requests, so a burst gets fast 429s instead of an unbounded
queue whose latency grows for everyone.
"""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import Counter, Gauge

from app.errors import HTTPError

IN_FLIGHT = Gauge("kaito_requests_in_flight", "Generation requests admitted and not yet finished.")
REJECTED = Counter(
    "kaito_rejected_requests", "Generation requests refused at admission.", ["reason"]
)

# Both reasons exported from the start (at 0), so rate() and alerts see a series before
# the first refusal.
for _reason in ("overload", "shutting_down"):
    REJECTED.labels(_reason)


class Admission:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        if self.draining:
            REJECTED.labels("shutting_down").inc()
            raise HTTPError(503, "The server is shutting down; retry on another replica.")
        if self.in_flight >= self.limit:
            REJECTED.labels("overload").inc()
            raise HTTPError(
                429,
                f"Too many requests in flight ({self.limit} admitted at once); retry shortly.",
                headers={"Retry-After": "1"},
            )
        self.in_flight += 1
        self._idle.clear()
        IN_FLIGHT.inc()
        try:
            yield
        finally:
            self.in_flight -= 1
            IN_FLIGHT.dec()
            if self.in_flight == 0:
                self._idle.set()

    async def drain(self, grace_seconds: float) -> bool:
        """Stops admitting and waits for in-flight requests; True if all finished in time."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace_seconds)
            return True
        except TimeoutError:
            return False
