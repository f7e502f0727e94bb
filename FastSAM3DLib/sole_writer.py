"""One writer per output folder: an evaluation or a training run holds its folder's lock while it writes there."""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Callable, Optional

#: Seconds after which a lock nobody refreshes is broken (where the system cannot tell that its holder died).
STALE_AFTER_S = 300.0
#: Seconds between two refreshes of the lock by its holder (well under :data:`STALE_AFTER_S`).
REFRESH_EVERY_S = 30.0


@contextlib.contextmanager
def sole_writer(folder: Optional[Path], lock_name: str, doing: str, refusal: Callable[[str, Path], Exception]):
    """Hold the lock ``folder / lock_name`` (the folder made here when new) while the block runs.

    Two runs writing into one folder would each rewrite its files from their own view (an evaluation's records,
    a training run's log and checkpoint). A second one is refused with ``refusal(holder, lock_path)`` (``holder``
    says who holds it). Where the system cannot tell that a holder died (no ``flock``: Windows), a thread
    refreshes the lock and one not refreshed for :data:`STALE_AFTER_S` is broken. A new folder the run leaves
    empty is removed. Where the folder cannot be made or locked (a file of that name, a read-only disk), the
    block runs unlocked: its own writes say what to do.
    """
    if folder is None:
        yield
        return
    from .files import remove_empty_folders
    from .weights.filelock import FileLock, LockTimeout, LockUnavailable

    created = [f for f in (folder, *folder.parents) if not f.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        yield
        return
    lock = FileLock(folder / lock_name, stale_after=STALE_AFTER_S, timeout=2.0, doing=doing)  # > GRACE: a dead
    try:                                                                                      # holder's goes
        lock.acquire()
    except LockTimeout as exc:
        raise refusal(str(exc).split(" is held by ")[-1], lock.path) from None
    except LockUnavailable:
        yield
        return
    stop = threading.Event()

    def refresh():
        while not stop.wait(REFRESH_EVERY_S):
            lock.heartbeat()

    beat = threading.Thread(target=refresh, name=f"FastSAM3D lock of {folder.name}", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        lock.release()
        remove_empty_folders(created)
