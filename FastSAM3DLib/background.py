"""Running slow work (model loading, clicks, downloads) off a GUI thread that keeps the GIL, as Slicer's does.

Slicer's main thread holds Python's GIL while its Qt event loop runs C++ code (PythonQt is initialised
without thread support), so a Python worker thread only runs while the main thread executes Python. A timer
callback that merely looks for results gives the worker a few microseconds per tick: a click measured
6.5x slower that way. :meth:`Worker.poll` is the timer callback's whole job: it waits for the worker
*with the GIL released* for up to :data:`YIELD_SECONDS` (returning as soon as a job finishes), then hands
back the finished jobs. With the timer at :data:`POLL_INTERVAL_MS`, the worker runs about 95 % of the time and
the GUI still handles its events about ten times a second while FastSAM3D works (a shorter yield costs a short
job a whole tick: with 40 ms, a 25 ms next click took 2.3x its free-running time in the emulation; with
100 ms every click, model load and download stays within 1.1x, see ``make bench``).

No Qt and no MRML here: the effect owns the timer and writes results on the main thread. The harness
``Testing/slicer_event_loop.py`` drives this same class under an emulation of Slicer's GIL regime.
"""
from __future__ import annotations

import queue
import threading
import time
import traceback
from typing import Callable, Hashable, List, NamedTuple, Optional

#: How often the GUI's timer calls :meth:`Worker.poll` while work is pending (milliseconds).
POLL_INTERVAL_MS = 5
#: How long one :meth:`Worker.poll` may keep the GUI thread, with the GIL released, waiting for a result.
YIELD_SECONDS = 0.1


class Finished(NamedTuple):
    """One finished job: its tag, its return value or the exception it raised, and its run time."""

    tag: Hashable
    value: object
    error: Optional[BaseException]
    seconds: float


class Worker:
    """One daemon thread runs every submitted job in order (keeps per-thread GPU state warm).

    Jobs are plain callables that must not touch Qt or MRML. The GUI thread submits them, then calls
    :meth:`poll` from a timer until :meth:`busy` is False. :meth:`cancelled` tells a long job (a download's
    progress callback) that the application is closing.
    """

    def __init__(self, name: str = "FastSAM3D worker") -> None:
        self._jobs: "queue.Queue" = queue.Queue()
        self._results: "queue.Queue[Finished]" = queue.Queue()
        self._finished = threading.Event()
        self._stopping = threading.Event()
        self._pending = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, tag: Hashable, job: Callable[[], object]) -> None:
        """Queue ``job``; its result comes back from :meth:`poll` with ``tag``."""
        if self._stopping.is_set():
            raise RuntimeError("the worker is stopped")
        self._pending += 1
        self._jobs.put((tag, job))

    def busy(self) -> bool:
        """Whether a submitted job has not been handed back by :meth:`poll` yet."""
        return self._pending > 0

    def cancelled(self) -> bool:
        """True once :meth:`stop` was called: long jobs should give up."""
        return self._stopping.is_set()

    def poll(self, budget: float = YIELD_SECONDS) -> List[Finished]:
        """The GUI timer's callback: let the worker run for up to ``budget`` seconds, then return finished jobs.

        The wait releases the GIL and ends early when a job finishes, so a short click is handed back at
        once. Returns the jobs finished since the last call, in order.
        """
        if self._pending and self._results.empty() and budget > 0:
            self._finished.wait(budget)
        done = []
        while True:
            try:
                done.append(self._results.get_nowait())
            except queue.Empty:
                break
        self._finished.clear()
        if not self._results.empty():  # a job finished between the loop and clear(): keep the signal
            self._finished.set()
        self._pending -= len(done)
        return done

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Ask the thread to end after its current job (pending jobs are dropped) and wait up to ``timeout``.

        Returns True when the thread has ended. Call it before the application quits so that no job is still
        inside a native library while the interpreter shuts down. Dropped jobs no longer count for :meth:`busy`;
        the running one does until :meth:`poll` hands it back.
        """
        self._stopping.set()
        while True:
            try:
                self._jobs.get_nowait()
            except queue.Empty:
                break
            self._pending -= 1
        self._jobs.put((None, None))
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            tag, job = self._jobs.get()
            if job is None:
                return
            start = time.perf_counter()
            try:
                value, error = job(), None
            except BaseException as exc:  # noqa: BLE001 - handed to the GUI thread, which reports it
                value, error = None, exc
                error.details = traceback.format_exc()
            self._results.put(Finished(tag, value, error, time.perf_counter() - start))
            self._finished.set()
