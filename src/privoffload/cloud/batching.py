"""Micro-batching: requests that arrive within a short window run as one forward pass.

One worker per model collects queued requests for up to `window_s` (or until `max_images`), takes
the model that is current at that moment, runs it off the event loop on the model's own thread,
and hands each request its rows. The model is read once per batch, so a swap never splits a batch:
batches that started keep the old version, the next batch gets the new one. `window_s = 0` turns
batching off: every request runs alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .repository import LoadedModel


class VersionGone(Exception):
    """A request pinned to a version that was swapped out before its batch ran."""


@dataclass
class Job:
    x: torch.Tensor  # float [n, C, H, W] in [0, 1] (the model's shape)
    version: int | None  # a pinned version, or None for whichever is current
    future: asyncio.Future = field(default=None)


class Batcher:
    def __init__(self, current: Callable[[], LoadedModel], window_s: float, max_images: int,
                 on_batch: Callable[[int, int], None] = lambda requests, images: None):
        self.current = current
        self.window_s = window_s
        self.max_images = max_images
        self.on_batch = on_batch
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.pool.shutdown(wait=True)

    async def submit(self, x: torch.Tensor, version: int | None = None) -> tuple[np.ndarray, int]:
        """Queue images; returns (probabilities, version of the model that computed them)."""
        job = Job(x, version, asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        return await job.future

    async def _collect(self) -> list[Job]:
        jobs = [await self.queue.get()]
        if self.window_s <= 0:
            return jobs
        images = len(jobs[0].x)
        deadline = time.perf_counter() + self.window_s
        while images < self.max_images:
            try:
                job = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), left)
                except asyncio.TimeoutError:
                    break
            jobs.append(job)
            images += len(job.x)
        return jobs

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            model = self.current()  # one read: the whole batch runs on this version
            run = []
            for job in jobs:
                if job.version is not None and job.version != model.version:
                    _settle(job, exc=VersionGone(f"version {job.version} was unloaded; version {model.version} is serving"))
                else:
                    run.append(job)
            if not run:
                continue
            try:
                x = run[0].x if len(run) == 1 else torch.cat([j.x for j in run])
                probs = await loop.run_in_executor(self.pool, model.predict, x)
            except Exception as e:  # a bug, not bad input: every waiting request gets it (a 500)
                for job in run:
                    _settle(job, exc=e)
                continue
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
