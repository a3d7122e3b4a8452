"""Micro-batching: requests that arrive within a short window run as one forward pass.

One worker per model collects queued requests for up to `window_s` (or until `max_images`, never
past it), takes the model that is current at that moment, runs it off the event loop on the
model's own thread, and hands each request its rows. The model is read once per batch, so a swap
never splits a batch: batches that started keep the old version, the next batch gets the new one.
`window_s = 0` turns batching off: every request runs alone.

The queue is bounded (`max_queued` images: beyond, `Overloaded`, a 503 with Retry-After) and every
job has a deadline (`queue_timeout_s`): a job whose client went away (its future cancelled) or
whose deadline passed is dropped before a batch runs, so work nobody waits for never delays the
requests behind it. A worker that dies is restarted; `alive` tells readiness whether it runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from .repository import LoadedModel
from .telemetry import event


class VersionGone(Exception):
    """A request pinned to a version that was swapped out before its batch ran."""


class Overloaded(Exception):
    """The queue is full, or a job waited past its deadline: answered 503, to be retried after `retry_after` s."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Job:
    x: torch.Tensor  # float [n, 3, 32, 32] in [0, 1]
    version: int | None  # a pinned version, or None for whichever is current
    deadline: float  # time.monotonic() after which the job is dropped unrun
    future: asyncio.Future


class Batcher:
    def __init__(self, current: Callable[[], LoadedModel], window_s: float, max_images: int, max_queued: int,
                 queue_timeout_s: float, on_batch: Callable[[int, int], None] = lambda requests, images: None,
                 on_drop: Callable[[str], None] = lambda reason: None, on_restart: Callable[[], None] = lambda: None):
        self.current = current
        self.window_s, self.max_images = window_s, max_images
        self.max_queued, self.queue_timeout_s = max_queued, queue_timeout_s
        self.on_batch, self.on_drop, self.on_restart = on_batch, on_drop, on_restart
        self.jobs: deque[Job] = deque()
        self.queued = 0  # images in self.jobs
        self.arrived = asyncio.Event()
        self.seconds_per_image = 0.0  # running average, for Retry-After
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        self.task: asyncio.Task | None = None
        self.stopping = False

    # ---- life

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())
        self.task.add_done_callback(self._died)

    def _died(self, task: asyncio.Task) -> None:
        """The worker ended without being stopped: a bug. Log it and start another, or every request would hang."""
        if self.stopping:
            return
        error = "cancelled" if task.cancelled() else repr(task.exception())[:200]
        event("batching worker died; restarting it", logging.ERROR, error=error)
        self.on_restart()
        self.start()

    @property
    def alive(self) -> bool:
        return self.task is not None and not self.task.done()

    async def stop(self) -> None:
        self.stopping = True
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.pool.shutdown(wait=True)

    # ---- the queue

    def submit(self, x: torch.Tensor, version: int | None = None) -> asyncio.Future:
        """Queue images; the future gives (probabilities, version of the model that computed them).

        Cancel the future to withdraw the job (its batch will not include it). Raises Overloaded when full.
        """
        if self.queued + len(x) > self.max_queued:
            self._drop_dead()
        if self.queued + len(x) > self.max_queued:
            self.on_drop("queue full")
            raise Overloaded(f"the server is busy: {self.queued} images are waiting (at most {self.max_queued}); "
                             f"retry later", self.retry_after())
        job = Job(x, version, time.monotonic() + self.queue_timeout_s, asyncio.get_running_loop().create_future())
        self.jobs.append(job)
        self.queued += len(x)
        self.arrived.set()
        return job.future

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained (1 to 60)."""
        return max(1, min(60, math.ceil(self.queued * self.seconds_per_image)))

    def _head(self) -> Job | None:
        """The first job still worth running; jobs whose client left or whose deadline passed are dropped."""
        while self.jobs:
            job = self.jobs[0]
            if job.future.done():
                self._pop()
                self.on_drop("client gone")
            elif time.monotonic() > job.deadline:
                self._pop()
                self.on_drop("deadline")
                _settle(job, exc=Overloaded(f"the request waited over {self.queue_timeout_s:g} s for the model; "
                                            f"the server is overloaded, retry later", self.retry_after()))
            else:
                return job
        return None

    def _drop_dead(self) -> None:
        """Drop every dead job, not only those at the head (a full queue must not count them)."""
        live = deque()
        while self._head() is not None:
            live.append(self._pop())
        self.jobs, self.queued = live, sum(len(j.x) for j in live)

    def _pop(self) -> Job:
        job = self.jobs.popleft()
        self.queued -= len(job.x)
        return job

    async def _arrival(self, timeout: float | None) -> bool:
        """Wait for a new job (at most `timeout` s); False on timeout."""
        self.arrived.clear()
        try:
            await asyncio.wait_for(self.arrived.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def _collect(self) -> list[Job]:
        """The jobs of one forward pass: the first live one, then more for up to window_s, never past max_images."""
        jobs, images, until = [], 0, 0.0
        while True:
            job = self._head()
            if job is None:
                if not jobs:
                    await self._arrival(None)
                    continue
                if not await self._arrival(until - time.monotonic()):
                    return jobs
                continue
            if jobs and images + len(job.x) > self.max_images:
                return jobs  # it opens the next batch
            jobs.append(self._pop())
            images += len(job.x)
            if self.window_s <= 0 or images >= self.max_images:
                return jobs
            until = until or time.monotonic() + self.window_s

    # ---- the worker

    async def _run(self) -> None:
        while True:
            jobs = await self._collect()
            try:
                await self._run_batch(jobs)
            except Exception as e:  # a bug, not bad input: this batch's requests get it (a 500); the worker goes on
                for job in jobs:
                    _settle(job, exc=e)

    async def _run_batch(self, jobs: list[Job]) -> None:
        model = self.current()  # one read: the whole batch runs on this version
        run = []
        for job in jobs:
            if job.version is not None and job.version != model.version:
                _settle(job, exc=VersionGone(f"version {job.version} was unloaded; version {model.version} is serving"))
            elif not job.future.done():
                run.append(job)
        if not run:
            return
        x = run[0].x if len(run) == 1 else torch.cat([j.x for j in run])
        start = time.perf_counter()
        probs = await asyncio.get_running_loop().run_in_executor(self.pool, model.predict, x)
        self.seconds_per_image = 0.8 * self.seconds_per_image + 0.2 * (time.perf_counter() - start) / len(x)
        self.on_batch(len(run), len(x))
        start = 0
        for job in run:
            _settle(job, result=(probs[start:start + len(job.x)], model.version))
            start += len(job.x)


def _settle(job: Job, result=None, exc: BaseException | None = None) -> None:
    if job.future.done():  # the request went away
        return
    if exc is not None:
        job.future.set_exception(exc)
    else:
        job.future.set_result(result)
