"""One thread runs the model; a bounded number of jobs may wait for it, the rest are refused at once."""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """Too many jobs are waiting; `retry_after` estimates in seconds when one slot frees."""

    def __init__(self, pending: int, retry_after: int):
        super().__init__(f"the server is busy with {pending} jobs; try again in about {retry_after} s")
        self.retry_after = retry_after


class ModelWorker:
    """Runs jobs one at a time on a single thread, so the model never runs concurrently into exhaustion.

    At most `capacity` jobs are pending (waiting or running); `submit` raises QueueFull beyond that.
    """

    def __init__(self, capacity: int = 8):
        if capacity < 1:
            raise ValueError("the queue capacity must be at least 1")
        self.capacity = capacity
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="controlnext-model")
        self._lock = threading.Lock()
        self._pending = 0
        self._mean_seconds = 5.0  # running mean of job durations, for Retry-After

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, fn: Callable[..., T], *args, **kwargs) -> "Future[T]":
        with self._lock:
            if self._pending >= self.capacity:
                raise QueueFull(self._pending, max(1, math.ceil(self._mean_seconds * self._pending)))
            self._pending += 1
        try:
            future = self._executor.submit(self._timed, fn, args, kwargs)
        except BaseException:
            self._release()
            raise
        future.add_done_callback(lambda _: self._release())
        return future

    def _timed(self, fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
        began = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * (time.perf_counter() - began)

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
