"""Dynamic batching: requests that arrive close together run as one call on the model worker.

The first request of a batch waits `window_s` for company, but only when company is likely:
when another session is still active (a lone session's round never waits) and fewer than
`max_batch` are already waiting. A session counts as active until it has been silent for
ACTIVE_GAPS times the gap between its last two requests (a decoding session asks once a round),
and at most `active_s` seconds: so a session that has finished stops making the next one wait
within a few of its rounds, not for a second (on a fast host, where a round takes 10 ms, that
second cost every session that followed another a window's wait on most of its rounds).
Requests that arrive while a batch runs form the next one. A session appears at most once per
batch (its cache cannot be extended twice in one forward).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, Sequence, TypeVar

from specdec.serving import ModelWorker, Timed

J = TypeVar("J")
R = TypeVar("R")

ACTIVE_GAPS = 4.0  # a session silent for this many of its own request gaps has stopped asking


@dataclass
class _Seen:
    last: float  # its latest request
    gap: float | None = None  # between its last two requests (None: it has asked once)

    def active(self, now: float, active_s: float) -> bool:
        horizon = active_s if self.gap is None else min(active_s, ACTIVE_GAPS * self.gap)
        return now - self.last < horizon


@dataclass
class _Waiting(Generic[J]):
    job: J
    future: asyncio.Future
    arrived: float


class Batcher(Generic[J, R]):
    def __init__(
        self,
        worker: ModelWorker,
        run: Callable[[Sequence[J]], Sequence[R | BaseException]],
        key: Callable[[J], Hashable],
        window_s: float,
        max_batch: int,
        on_batch: Callable[[int], None] | None = None,
        active_s: float = 1.0,
    ):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.worker = worker
        self.run = run  # one outcome (result or exception) per job, in order
        self.key = key
        self.window_s = window_s
        self.max_batch = max_batch
        self.on_batch = on_batch
        self.active_s = active_s
        self._waiting: list[_Waiting[J]] = []
        self._drainer: asyncio.Task | None = None
        self._seen: dict[Hashable, _Seen] = {}  # session -> when it asked

    def _company_expected(self) -> bool:
        """More than one session is active (forgetting those that are not)."""
        now = time.perf_counter()
        self._seen = {k: seen for k, seen in self._seen.items() if seen.active(now, self.active_s)}
        return len(self._seen) > 1

    def _arrived(self, key: Hashable, now: float) -> None:
        seen = self._seen.get(key)
        self._seen[key] = _Seen(now) if seen is None else _Seen(now, now - seen.last)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    async def submit(self, job: J) -> Timed:
        """Run `job` in the next batch; returns its result with queue and compute times."""
        future = asyncio.get_running_loop().create_future()
        arrived = time.perf_counter()
        self._arrived(self.key(job), arrived)
        self._waiting.append(_Waiting(job, future, arrived))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await future

    def _take_batch(self) -> list[_Waiting[J]]:
        batch, keys, rest = [], set(), []
        for waiting in self._waiting:
            if waiting.future.cancelled():
                continue
            key = self.key(waiting.job)
            if len(batch) < self.max_batch and key not in keys:
                batch.append(waiting)
                keys.add(key)
            else:
                rest.append(waiting)
        self._waiting = rest
        return batch

    async def _drain(self) -> None:
        while self._waiting:
            if self.window_s > 0 and len(self._waiting) < self.max_batch and self._company_expected():
                await asyncio.sleep(self.window_s)
            batch = self._take_batch()
            if not batch:
                continue
            if self.on_batch:
                self.on_batch(len(batch))
            started = time.perf_counter()
            try:
                timed = await self.worker.run(lambda: self.run([w.job for w in batch]))
                outcomes = list(timed.value)
            except BaseException as exc:  # noqa: BLE001 - the batch failed as a whole
                timed, outcomes = Timed(None, 0.0, 0.0), [exc] * len(batch)
            for waiting, outcome in zip(batch, outcomes):
                if waiting.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    waiting.future.set_exception(outcome)
                else:
                    waiting.future.set_result(
                        Timed(outcome, started - waiting.arrived + timed.queue_s, timed.compute_s, len(batch))
                    )
