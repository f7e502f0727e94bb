"""The effect's worker under Slicer's GIL regime (Testing/slicer_event_loop.py): the mechanism, not timings.

Timings (a click and a download, free-running vs inside the emulated loop) are measured by ``make bench``.
"""
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from FastSAM3DLib.background import Worker
from slicer_event_loop import hold_gil, run_event_loop


class Spinner:
    """A pure-Python job (it needs the GIL for every step) that counts until told to stop."""

    def __init__(self):
        self.count = 0
        self.stop = threading.Event()
        self.started = threading.Event()

    def __call__(self):
        self.started.set()
        while not self.stop.is_set():
            self.count += 1
        return self.count


@pytest.fixture
def spinning_worker():
    worker, spinner = Worker(), Spinner()
    worker.submit("spin", spinner)
    assert spinner.started.wait(10)
    yield worker, spinner
    spinner.stop.set()
    worker.stop(10)


def progress_during(spinner, action):
    before = spinner.count
    action()
    return spinner.count - before


def test_the_emulated_qt_loop_starves_a_python_worker(spinning_worker):
    worker, spinner = spinning_worker
    held = progress_during(spinner, lambda: hold_gil(0.05))
    released = progress_during(spinner, lambda: time.sleep(0.05))
    assert released > 1000
    # a few ms of handing the GIL over remain; the 50 ms in C give the worker nothing
    assert held < released / 4, (held, released)  # the harness reproduces Slicer's constraint


def test_poll_gives_the_worker_the_gil_while_the_old_callback_did_not(spinning_worker):
    worker, spinner = spinning_worker
    old = progress_during(spinner, lambda: [worker.poll(0) for _ in range(5)])  # collect results only
    new = progress_during(spinner, lambda: worker.poll(0.05))
    held = progress_during(spinner, lambda: hold_gil(0.05))
    assert new > 4 * max(old, held, 1), (old, new, held)
    assert worker.busy() and worker.poll(0) == []


def test_poll_still_gives_the_worker_the_gil_after_handing_back_a_result():
    """The signal of a finished job is reset when its result is handed back: else every later poll would return
    at once and the next click would crawl as it did under the old callback."""
    worker, spinner = Worker(), Spinner()
    worker.submit("quick", lambda: 1)
    assert [f.value for f in run_event_loop(worker, loop_seconds=0.01)] == [1]
    worker.submit("spin", spinner)
    assert spinner.started.wait(10)
    try:
        polled = progress_during(spinner, lambda: worker.poll(0.05))
        held = progress_during(spinner, lambda: hold_gil(0.05))
        assert polled > 4 * max(held, 1), (polled, held)
    finally:
        spinner.stop.set()
        worker.stop(10)


def test_poll_hands_back_a_finished_job_at_once_not_after_its_budget():
    worker = Worker()
    release = threading.Event()
    start = time.perf_counter()
    worker.submit(("click", 1), lambda: release.wait(10) and "mask")
    threading.Timer(0.05, release.set).start()
    finished = worker.poll(30.0)
    elapsed = time.perf_counter() - start
    assert elapsed < 10  # the 30 s budget is an upper bound, not a sleep
    assert [(f.tag, f.value, f.error) for f in finished] == [(("click", 1), "mask", None)]
    assert 0 < finished[0].seconds <= elapsed  # the job's own run time (the effect reports it)
    assert not worker.busy()
    assert worker.stop(5)


def test_poll_returns_at_once_when_nothing_is_pending():
    """The GUI timer may fire once more after the last result: an idle poll must not hold the GUI for its budget."""
    worker = Worker()
    start = time.perf_counter()
    assert worker.poll(30.0) == []
    worker.submit("quick", lambda: 1)
    assert [f.value for f in run_event_loop(worker, loop_seconds=0.01)] == [1]
    assert worker.poll(30.0) == [] and not worker.busy()
    assert time.perf_counter() - start < 10  # twice a 30 s budget, not waited
    assert worker.stop(5)


def test_a_job_still_running_does_not_keep_the_application_from_quitting():
    """Slicer may quit without stopping the worker (its Python shuts down with the thread inside a job): the
    thread is a daemon, so the interpreter exits instead of waiting for the job."""
    script = ("import threading; from FastSAM3DLib.background import Worker; "
              "worker, started = Worker(), threading.Event(); "
              "worker.submit('stuck', lambda: started.set() or threading.Event().wait()); "
              "assert started.wait(10); print('quitting')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and done.stdout.strip() == "quitting", done.stderr


def test_jobs_run_in_order_under_the_emulated_loop_and_errors_come_back_with_details():
    worker, order = Worker(), []

    def failing():
        order.append("fail")
        raise ValueError("bad click")

    worker.submit("a", lambda: order.append("a") or 1)
    worker.submit("b", failing)
    worker.submit("c", lambda: order.append("c") or 3)
    finished = run_event_loop(worker, loop_seconds=0.01)
    assert order == ["a", "fail", "c"]
    assert [f.tag for f in finished] == ["a", "b", "c"]
    assert finished[0].value == 1 and finished[2].value == 3
    assert isinstance(finished[1].error, ValueError) and "bad click" in finished[1].error.details
    assert worker.stop(5)


def test_stop_drops_queued_jobs_and_tells_the_running_one_to_give_up():
    worker, ran, seen_cancel = Worker(), [], threading.Event()
    started = threading.Event()

    def long_download():
        started.set()
        while not worker.cancelled():  # what a download's progress callback checks
            time.sleep(0.01)
        seen_cancel.set()

    worker.submit("download", long_download)
    worker.submit("click", lambda: ran.append("click"))
    assert started.wait(10)
    assert worker.stop(10)
    assert seen_cancel.is_set() and ran == []
    assert worker.busy()  # the download finished but was not handed back yet; the dropped click is not waited for
    assert [job.tag for job in worker.poll(0)] == ["download"]
    assert not worker.busy()
    with pytest.raises(RuntimeError):
        worker.submit("late", lambda: None)


def test_a_growing_click_through_a_server_in_another_process_works_under_the_emulated_loop(one_torch_thread):
    """The make bench row: growth sends one request per region from the worker, which gets the GIL only while the
    effect's poll yields it; the server is another process, as a real one is."""
    pytest.importorskip("uvicorn", reason="the server extra is not installed")
    from FastSAM3DLib.benchmarks import host

    row = host._remote_growth_row("test CPU")
    assert row["name"] == "slicer_loop_remote_grow_ratio" and row["skipped"] is None, row
    assert row["value"] > 0 and row["note"].startswith("3 regions"), row
