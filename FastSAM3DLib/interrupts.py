"""Stopping a command (Ctrl+C, SIGTERM) without skipping the set-up or clean-up of a file.

A Python signal handler raises where the main thread happens to be. Right after a temporary file was created
(before its name is stored), or right after file descriptor 2 was redirected (before the ``try``
that restores it), that exception leaks the temporary or swallows the command's last message. The command
line installs :func:`raise_or_defer` as its handlers' way to raise; :func:`deferred` marks the few statements
that must run to the end: an interrupt arriving inside waits until the block is left, then is raised.
Outside the command line (Slicer, a Python console) nothing installs such handlers and :func:`deferred` only
counts.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

_depth = 0
_pending: Optional[BaseException] = None  # the first interrupt that arrived inside deferred()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Run the block to its end; an interrupt that arrives meanwhile is raised when the outermost block is left.

    Only the main thread counts (signal handlers run there); elsewhere, e.g. on Slicer's worker, it does nothing.
    """
    global _depth, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            exc, _pending = _pending, None
            raise exc


def raise_or_defer(exc: BaseException) -> None:
    """Raise ``exc`` now, or, inside :func:`deferred`, when that block is left (a signal handler's raise)."""
    global _pending
    if _depth > 0:
        _pending = _pending or exc
        return
    raise exc
