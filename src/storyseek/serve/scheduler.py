"""The one decode loop: a single thread owns the model and the engine; HTTP handlers only queue.

    handler (event loop)              decode thread
    submit(job) --- pending FIFO ---> admit while slots are free: prefill, first token
                                      step: one token for every active row
    job.events  <-- one hand-off ---  outputs of the step, per job (one wake-up per step)
    cancel(job) --- cancelled set --> the job's rows leave at the next step, freeing their slots

No thread per request: a request is a `Job` (its n rows plus an asyncio queue of events) and costs
nothing while it waits. A waiting job is admitted once all of its rows fit (first come, first served).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from .engine import Engine, Output, Row


class QueueFull(Exception):
    """More requests are waiting than --max-queue allows."""


@dataclass
class Event:
    """Text for choice `index`; `finish_reason` set on the choice's last event.
    `error` set (and nothing else) when the server could not finish the job."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Job:
    rows: list[Row]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    unfinished: int = 0

    def __post_init__(self) -> None:
        self.unfinished = len(self.rows)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt) for r in self.rows)

    @property
    def completion_tokens(self) -> int:
        return sum(r.generated for r in self.rows)


class Scheduler:
    def __init__(self, engine: Engine, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self._pending: deque[Job] = deque()
        self._cancelled: set[int] = set()  # id(job)
        self._owner: dict[int, tuple[Job, int]] = {}  # id(row) -> (its job, its choice index)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="storyseek-decode", daemon=True)
        self.steps = 0  # decode steps run (for /health and tests)

    # ------------------------------------------------------------ event-loop side
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            if len(self._pending) >= self.max_queue and not self._admissible_now(job):
                raise QueueFull(f"{len(self._pending)} requests are already waiting (--max-queue {self.max_queue})")
            self._pending.append(job)
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: its rows stop at the next step (a no-op for a finished job)."""
        with self._lock:
            if job.unfinished:
                self._cancelled.add(id(job))
                self._wake.notify()

    def stop(self) -> None:
        """End the loop; every unfinished job gets an error event."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def load(self) -> dict[str, int]:
        with self._lock:
            return {"active": len(self.engine.rows), "queued": len(self._pending), "free_slots": self.engine.free}

    def _admissible_now(self, job: Job) -> bool:
        """A job that fits into free slots right now, with nobody ahead of it, never waits in the queue."""
        return not self._pending and len(job.rows) <= self.engine.free

    # -------------------------------------------------------------- decode thread
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self._pending or self.engine.rows or self._cancelled):
                    self._wake.wait()
                if self._stopping:
                    break
                cancelled, self._cancelled = self._cancelled, set()
                for job in [j for j in self._pending if id(j) in cancelled]:
                    self._pending.remove(job)
                    job.unfinished = 0
                admitted, free = [], self.engine.free + sum(id(self._owner[id(r)][0]) in cancelled for r in self.engine.rows)
                while self._pending and len(self._pending[0].rows) <= free:
                    admitted.append(self._pending.popleft())
                    free -= len(admitted[-1].rows)
            try:
                self._drop(cancelled)
                self._deliver(self._admit(admitted))  # a row may end at its first token: gone before the step
                if self.engine.rows:
                    self._deliver(self.engine.step())
                    self.steps += 1
                time.sleep(0)  # let the event loop thread take the GIL and send what this step wrote
            except Exception as e:  # a bug or an out-of-memory must not take the server down: fail the batch
                self._fail(self._active_jobs(), f"decoding failed: {type(e).__name__}: {e}")
        with self._lock:
            pending, self._pending = list(self._pending), deque()
        self._fail(pending + self._active_jobs(), "the server is shutting down")

    def _active_jobs(self) -> list[Job]:
        return list({id(job): job for job, _ in self._owner.values()}.values())

    def _admit(self, jobs: list[Job]) -> list[Output]:
        outputs = []
        for job in jobs:
            for index, row in enumerate(job.rows):
                self._owner[id(row)] = (job, index)
                outputs.append(self.engine.add(row))
        return outputs

    def _drop(self, cancelled: set[int]) -> None:
        for row in list(self.engine.rows):
            job, _ = self._owner[id(row)]
            if id(job) in cancelled:
                self.engine.remove(row)
                del self._owner[id(row)]
                job.unfinished -= 1

    def _deliver(self, outputs: list[Output]) -> None:
        """Hand the step's text to the jobs' queues (one call into the event loop per loop), and
        free the slots of finished rows."""
        sends: dict[int, tuple[Job, list[Event]]] = {}
        for out in outputs:
            job, index = self._owner[id(out.row)]
            if out.text or out.finish_reason:
                sends.setdefault(id(job), (job, []))[1].append(Event(index, out.text, out.finish_reason))
            if out.finish_reason:
                self.engine.remove(out.row)
                del self._owner[id(out.row)]
                job.unfinished -= 1
        by_loop: dict[int, list[tuple[Job, list[Event]]]] = {}
        for job, events in sends.values():
            by_loop.setdefault(id(job.loop), []).append((job, events))
        for batch in by_loop.values():
            _call_soon(batch[0][0].loop, _put_all, batch)

    def _fail(self, jobs: list[Job], message: str) -> None:
        for job in jobs:
            for row in job.rows:
                if self._owner.pop(id(row), None) and any(r is row for r in self.engine.rows):
                    self.engine.remove(row)
            job.unfinished = 0
            _call_soon(job.loop, _put_all, [(job, [Event(-1, error=message)])])


def _put_all(batch: list[tuple[Job, list[Event]]]) -> None:
    for job, events in batch:
        for event in events:
            job.events.put_nowait(event)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the event loop is closed (shutdown): nobody is listening any more
        pass
