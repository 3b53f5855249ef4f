"""A bounded background writer: the teacher's forward pass overlaps with cache writes.

The producer (the forward loop) hands finished items to :meth:`BackgroundWriter.submit`; one
worker thread calls ``sink_fn(item)`` on them in submission order. The queue is bounded, so a
slow sink blocks the producer (back-pressure) instead of piling results up in memory, and the
time the producer spends blocked is measured: ``stats().wait_fraction`` is the share of the
run during which the forward pass waited on the writer.

Items must be safe to use from another thread: move GPU tensors to (pinned) CPU memory and
synchronise before submitting.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from genrecal.extract.errors import WriterError

_STOP = object()


@dataclass(frozen=True)
class WriterStats:
    """Counters of a :class:`BackgroundWriter` (seconds are wall-clock, ``time.perf_counter``).

    submitted: items accepted by submit(); written: items sink_fn returned from;
    wait_seconds: producer time blocked in submit(); busy_seconds: worker time inside sink_fn;
    elapsed_seconds: from construction to the end of close() (or to now while open);
    waited: submits that found the queue full and blocked (back-pressure events).
    """

    submitted: int
    written: int
    wait_seconds: float
    busy_seconds: float
    elapsed_seconds: float
    waited: int = 0

    @property
    def wait_fraction(self) -> float:
        """Share of the elapsed time the producer spent blocked on the writer."""
        return self.wait_seconds / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    @property
    def busy_fraction(self) -> float:
        """Share of the elapsed time the worker spent writing."""
        return self.busy_seconds / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "wait_fraction": self.wait_fraction,
                "busy_fraction": self.busy_fraction}


class BackgroundWriter:
    """Calls ``sink_fn(item)`` on a worker thread, in order, behind a queue of ``max_queue``.

    Use as a context manager (or call :meth:`close`). One producer thread only. If sink_fn
    raises, the worker discards every later item and the failure is re-raised in the producer
    as :class:`WriterError` (the original exception and traceback as ``__cause__``) by the next
    submit() -- or by close() if no submit() has reported it yet.
    """

    def __init__(self, sink_fn: Callable[[Any], None], *, max_queue: int = 4,
                 name: str = "genrecal-writer"):
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise WriterError(f"BackgroundWriter: max_queue={max_queue!r} must be an int >= 1")
        self._sink = sink_fn
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._error: BaseException | None = None
        self._failed_index = -1
        self._error_reported = False
        self._closed = False
        self._submitted = self._written = self._waited = 0
        self._wait = self._busy = 0.0
        self._start = time.perf_counter()
        self._end: float | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return False

    # ------------------------------------------------------------------ producer side

    def submit(self, item: Any) -> None:
        """Queue ``item`` for ``sink_fn``; blocks while the queue is full."""
        self._raise_if_failed(again=True)
        if self._closed:
            raise WriterError("BackgroundWriter.submit() called after close(); submit every "
                              "item inside the `with BackgroundWriter(...)` block")
        t0 = time.perf_counter()
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._waited += 1
            self._queue.put(item)
        self._wait += time.perf_counter() - t0
        self._submitted += 1
        self._raise_if_failed(again=True)

    def close(self) -> None:
        """Write every queued item, stop the worker and re-raise an unreported sink failure.

        Idempotent. After a sink failure the remaining items are discarded, not written.
        """
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()
            self._end = time.perf_counter()
        self._raise_if_failed(again=False)

    def stats(self) -> WriterStats:
        end = time.perf_counter() if self._end is None else self._end
        return WriterStats(submitted=self._submitted, written=self._written,
                           wait_seconds=self._wait, busy_seconds=self._busy,
                           elapsed_seconds=end - self._start, waited=self._waited)

    @property
    def failed(self) -> bool:
        return self._error is not None

    def _raise_if_failed(self, *, again: bool) -> None:
        """Raise WriterError for a sink failure; ``again=False`` raises only if not yet raised."""
        if self._error is None or (self._error_reported and not again):
            return
        self._error_reported = True
        exc = self._error
        raise WriterError(
            f"background writer {self._thread.name!r} failed on item #{self._failed_index} "
            f"({type(exc).__name__}: {exc}); the items after it were discarded. Fix the cause "
            "and resume the job") from exc

    # ------------------------------------------------------------------ worker side

    def _run(self) -> None:
        index = 0
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is None:
                self._write(index, item)
            del item  # discarded or written: release it before blocking on the queue
            index += 1

    def _write(self, index: int, item: Any) -> None:
        t0 = time.perf_counter()
        try:
            self._sink(item)
        except BaseException as exc:  # noqa: BLE001 -- any failure must reach the producer
            self._failed_index = index
            self._error = exc
            return
        finally:
            self._busy += time.perf_counter() - t0
        self._written += 1
