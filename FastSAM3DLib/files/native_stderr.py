"""What C/C++ libraries (ITK, niftilib, MetaIO) print on file descriptor 2, collected and put into the error
message instead, so that a failing command prints exactly one ``error:`` line."""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Iterable, Iterator, List

from .. import interrupts


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[List[str]]:
    """Collect what C/C++ libraries print on file descriptor 2 while the block runs (a list, filled at the end).

    Where file descriptor 2 cannot be redirected, nothing is collected and the text goes where it went.
    """
    lines: List[str] = []
    saved = sink = None
    try:
        with interrupts.deferred():  # a Ctrl+C waits until descriptor 2 is redirected and will be restored
            try:
                if sys.stderr is not None:
                    sys.stderr.flush()
                saved = os.dup(2)
            except (OSError, ValueError, AttributeError):
                saved = None  # cannot redirect: the text goes where it went
            if saved is not None:
                try:
                    sink = tempfile.TemporaryFile()
                except OSError:
                    sink = open(os.devnull, "w+b")
                os.dup2(sink.fileno(), 2)
        yield lines
    finally:
        with interrupts.deferred():  # and the restoring runs to its end (else the last message is lost)
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
            if sink is not None:
                sink.seek(0)
                text = sink.read(1 << 16).decode("utf-8", "replace")
                lines.extend(line.strip() for line in text.splitlines() if line.strip())
                sink.close()


def itk_reason(error: BaseException, native: Iterable[str] = ()) -> str:
    """One line saying why ITK failed: the last line of its exception, plus what it printed itself."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    reason = lines[-1] if lines else type(error).__name__
    extra = [line for line in native if line not in reason][:3]
    return "; ".join([reason, *extra])
