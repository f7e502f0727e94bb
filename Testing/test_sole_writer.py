"""One writer per output folder (FastSAM3DLib.sole_writer): the lock, the refusal, and where it runs unlocked."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from FastSAM3DLib import sole_writer as sole_writer_module
from FastSAM3DLib.sole_writer import sole_writer
from FastSAM3DLib.weights import filelock

REPO = Path(__file__).resolve().parents[1]


class Refused(Exception):
    pass


def refusal(holder, path):
    return Refused(f"{path} is held by {holder}")


def test_a_second_writer_of_the_folder_is_refused_and_the_first_goes_on(tmp_path):
    folder = tmp_path / "runs" / "a"
    with sole_writer(folder, ".lock", "evaluating", refusal):
        (folder / "records.jsonl").write_text("one\n")
        with pytest.raises(Refused) as err:
            with sole_writer(folder, ".lock", "evaluating", refusal):
                pytest.fail("the second writer ran")
        assert str(err.value) == f"{folder / '.lock'} is held by process {os.getpid()}"  # who holds it, and where
        (folder / "records.jsonl").write_text("one\ntwo\n")  # the first still writes
    with sole_writer(folder, ".lock", "evaluating", refusal):  # released: the next run may write
        pass
    assert sorted(p.name for p in folder.iterdir()) == ["records.jsonl"]  # no lock left behind


def test_a_new_folder_the_run_leaves_empty_is_removed_and_one_it_wrote_in_stays(tmp_path):
    with sole_writer(tmp_path / "new" / "empty", ".lock", "training", refusal):
        assert (tmp_path / "new" / "empty").is_dir()
    assert sorted(tmp_path.iterdir()) == []
    kept = tmp_path / "kept"
    with sole_writer(kept, ".lock", "training", refusal):
        (kept / "log.txt").write_text("step 1\n")
    assert [p.name for p in kept.iterdir()] == ["log.txt"]
    with sole_writer(kept, ".lock", "training", refusal):  # an existing folder stays even when left empty
        (kept / "log.txt").unlink()
    assert kept.is_dir()


def test_no_folder_runs_the_block_without_a_lock():
    ran = []
    with sole_writer(None, ".lock", "evaluating", refusal):
        ran.append(True)
    assert ran == [True]


def test_a_folder_that_cannot_be_made_runs_the_block_whose_own_writes_then_say_what_to_do(tmp_path):
    (tmp_path / "taken").write_text("a file where the folder would go")
    ran = []
    with sole_writer(tmp_path / "taken", ".lock", "evaluating", refusal):
        ran.append(True)
    assert ran == [True] and (tmp_path / "taken").read_text() == "a file where the folder would go"


def test_a_folder_that_cannot_be_locked_runs_the_block_unlocked(tmp_path, monkeypatch):
    """Some network drives refuse locks (LockUnavailable): the run is not refused for that."""
    def unavailable(self, on_wait=None):
        raise filelock.LockUnavailable("locks are not supported here")

    monkeypatch.setattr(filelock.FileLock, "acquire", unavailable)
    ran = []
    with sole_writer(tmp_path / "share", ".lock", "evaluating", refusal):
        ran.append(True)
    assert ran == [True] and not (tmp_path / "share" / ".lock").exists()


@pytest.mark.parametrize("refreshing", [True, False])
def test_without_flock_a_long_run_keeps_its_lock_by_refreshing_it(tmp_path, monkeypatch, refreshing):
    """Where the system cannot tell whether the holder lives (Windows, a network drive without locks), only the
    holder's refreshes keep its lock from being broken as stale once it is older than STALE_AFTER_S: the run in
    another process holds the folder past that age, and a second run is still refused while it refreshes."""
    stale_after, refresh_every = 3.0, (0.2 if refreshing else 3600.0)
    folder = tmp_path / "run"
    code = ("import sys, time; from pathlib import Path; from FastSAM3DLib import sole_writer; "
            "from FastSAM3DLib.weights import filelock; filelock.fcntl = None; filelock._HEARTBEAT_EVERY = 0.1; "
            f"sole_writer.STALE_AFTER_S = {stale_after}; sole_writer.REFRESH_EVERY_S = {refresh_every}\n"
            "with sole_writer.sole_writer(Path(sys.argv[1]), '.lock', 'training', RuntimeError):\n"
            "    print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        time.sleep(stale_after + 1.0)  # older than STALE_AFTER_S: only a refresh makes it look alive
        monkeypatch.setattr(filelock, "fcntl", None)
        monkeypatch.setattr(sole_writer_module, "STALE_AFTER_S", stale_after)
        if refreshing:
            with pytest.raises(Refused, match=f"held by process {holder.pid}"):
                with sole_writer(folder, ".lock", "training", refusal):
                    pytest.fail("the second writer ran while the first refreshed its lock")
        else:  # the control: a lock nobody refreshes is broken, so the refreshes above are what kept it
            with sole_writer(folder, ".lock", "training", refusal):
                pass
    finally:
        holder.kill()
        holder.wait()
