"""An interrupt (Ctrl+C, SIGTERM) arriving while a file is set up or cleaned up waits until that is done.

The end-to-end check is Testing/test_reliability_files.py's SIGTERM test: before this mechanism, a SIGTERM
sent as soon as the temporary appeared lost the command's last message or left the temporary in 3-5 of 16 runs
under load (two runs at a time); with it, none of 16.
"""
import os
import signal
import threading

import pytest

from FastSAM3DLib import files, interrupts


def test_an_interrupt_inside_waits_until_the_outermost_block_is_left():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            with interrupts.deferred():
                interrupts.raise_or_defer(KeyboardInterrupt())
                interrupts.raise_or_defer(KeyboardInterrupt())  # a second one while the first waits: one raise
                done.append("inner")
            done.append("outer")  # still runs: the interrupt waits for the outermost block
    assert done == ["inner", "outer"]
    with interrupts.deferred():  # nothing left pending
        pass
    with pytest.raises(KeyboardInterrupt):
        interrupts.raise_or_defer(KeyboardInterrupt())  # outside any block: at once


def test_other_threads_do_not_defer_the_main_threads_interrupts():
    inside, release, outcome = threading.Event(), threading.Event(), []

    def worker():  # Slicer's worker writes files inside deferred() blocks too
        try:
            with interrupts.deferred():
                inside.set()
                release.wait(10)
            outcome.append("done")
        except BaseException as exc:  # noqa: BLE001 - a thread's exception would not fail the test
            outcome.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    inside.wait(10)
    try:
        with pytest.raises(KeyboardInterrupt):
            interrupts.raise_or_defer(KeyboardInterrupt())
    finally:
        release.set()
        thread.join(10)
    assert outcome == ["done"]  # the block ran once, to its end, and raised nothing on the worker


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs signal.pthread_kill")
def test_a_signal_during_the_set_up_of_a_temporary_leaves_nothing(tmp_path, monkeypatch):
    """SIGTERM right after the temporary file was created (before its name was stored) still removes it."""
    real_create = files.atomic._create_temporary

    def create_then_signal(*args, **kwargs):
        result = real_create(*args, **kwargs)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)  # handled at the next bytecode
        return result

    def handler(signum, frame):
        interrupts.raise_or_defer(KeyboardInterrupt())

    previous = signal.signal(signal.SIGUSR1, handler)
    monkeypatch.setattr(files.atomic, "_create_temporary", create_then_signal)
    try:
        with pytest.raises(KeyboardInterrupt):
            with files.atomic_output(tmp_path / "label.nii", suffix=".nii") as tmp:
                tmp.write_bytes(b"never")
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs signal.pthread_kill")
def test_a_signal_while_stderr_is_redirected_leaves_it_restored(capfd):
    """SIGTERM right after descriptor 2 was redirected: the message printed after the interrupt still shows."""
    real_dup2 = files.native_stderr.os.dup2

    def dup2_then_signal(fd, fd2, *args):
        result = real_dup2(fd, fd2, *args)
        if fd2 == 2 and not signalled:
            signalled.append(1)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
        return result

    def handler(signum, frame):
        interrupts.raise_or_defer(KeyboardInterrupt())

    signalled = []
    previous = signal.signal(signal.SIGUSR1, handler)
    files.native_stderr.os.dup2 = dup2_then_signal
    try:
        with pytest.raises(KeyboardInterrupt):
            with files.native_stderr_captured():
                pass
    finally:
        files.native_stderr.os.dup2 = real_dup2
        signal.signal(signal.SIGUSR1, previous)
    os.write(2, b"after the interrupt\n")
    assert "after the interrupt" in capfd.readouterr().err


_SIGNAL_DURING_AN_IMPORT = """
import signal, sys
from FastSAM3DLib import cli

def run(argv):
    import halfway  # sends the signal to this process half-way through its own import
    return 0

cli._run = run
status = cli.main([])
print(status, "halfway" in sys.modules and sys.modules["halfway"].COMPLETE)
"""


@pytest.mark.parametrize("signal_name, ctrl_c, status", [("SIGINT", "default", 130), ("SIGTERM", "default", 143),
                                                          ("SIGINT", "ignored", 0)])
def test_the_command_line_lets_an_import_finish_before_it_stops(tmp_path, signal_name, ctrl_c, status):
    """Ctrl+C while PyTorch or numpy imports gave recursion errors, an abort, or a finished command. A command
    started with Ctrl+C ignored (nohup, a background job of a shell without job control) keeps ignoring it.

    The child's Ctrl+C is set either way: a test run itself started in the background inherits it ignored."""
    import subprocess
    import sys

    (tmp_path / "halfway.py").write_text(
        "import os, signal, time\n"
        f"os.kill(os.getpid(), signal.{signal_name})\n"
        "time.sleep(0.2)  # the handler runs here\n"
        "COMPLETE = True\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), root]))
    handler = signal.SIG_DFL if ctrl_c == "default" else signal.SIG_IGN
    out = subprocess.run([sys.executable, "-c", _SIGNAL_DURING_AN_IMPORT], capture_output=True, text=True, env=env,
                         timeout=120, preexec_fn=lambda: signal.signal(signal.SIGINT, handler))
    assert out.stdout.split() == [str(status), "True"], (out.stdout, out.stderr)
    if status:
        assert out.stderr.strip().startswith("error: ") and len(out.stderr.strip().splitlines()) == 1
    else:
        assert out.stderr == ""
