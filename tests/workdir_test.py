"""The workdir: one run at a time (the lock), atomic writes that never follow a planted link, writability."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from combo_jax.workdir import WorkdirError, WorkdirLock, check_writable, write_text_atomic


def test_a_held_workdir_is_refused_naming_the_holder(tmp_path):
    first = WorkdirLock(str(tmp_path / "run")).acquire()
    with pytest.raises(WorkdirError, match=rf"in use by another run: pid {os.getpid()} on host {socket.gethostname()}"):
        WorkdirLock(str(tmp_path / "run")).acquire()
    first.release()
    assert not os.path.exists(tmp_path / "run" / ".lock")
    with WorkdirLock(str(tmp_path / "run")) as again:  # free again
        assert again.held and again.took_over is None


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_stale_lock_of_a_dead_local_process_is_taken_over(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "since": 0}))
    lock = WorkdirLock(str(tmp_path)).acquire()
    assert lock.took_over["since"] == 0
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_a_lock_of_another_host_or_a_live_process_is_not_taken(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": 0}))
    with pytest.raises(WorkdirError, match=r"pid 1 on host elsewhere .* remove .*\.lock"):
        WorkdirLock(str(tmp_path)).acquire()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": live.pid, "since": 0}))
        with pytest.raises(WorkdirError, match=rf"pid {live.pid}"):
            WorkdirLock(str(tmp_path)).acquire()
    finally:
        live.kill()
        live.wait()
    # A reused pid: the recorded start time is not the live process's.
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "start": 1}))
    assert WorkdirLock(str(tmp_path)).acquire().took_over["start"] == 1


_RACER = """
import os, sys, time
from combo_jax.workdir import WorkdirError, WorkdirLock
workdir, go = sys.argv[1], sys.argv[2]
while not os.path.exists(go):
    time.sleep(0.001)
try:
    lock = WorkdirLock(workdir).acquire()
except WorkdirError:
    print("refused", flush=True)
else:
    print("won", flush=True)
    time.sleep(1.0)  # hold it while the others try
    lock.release()
"""


def test_racing_processes_get_one_lock(tmp_path):
    """Processes racing for one stale lock: exactly one takes it over, the others are refused (none removes
    the winner's fresh lock)."""
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid()}))
    go = tmp_path / "go"
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, str(tmp_path), str(go)], stdout=subprocess.PIPE,
                               text=True) for _ in range(8)]
    time.sleep(1.0)  # let every interpreter start and wait for the signal
    go.touch()
    outcomes = sorted(r.communicate(timeout=60)[0].strip() for r in racers)
    assert outcomes == ["refused"] * 7 + ["won"], outcomes


def test_two_runs_that_both_saw_the_stale_lock_get_one_lock(tmp_path, monkeypatch):
    """The interleaving that lets a naive takeover remove the winner's fresh lock: both runs judge the stale lock
    stale before either replaces it."""
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid()}))
    both_judged = threading.Barrier(2, timeout=10)
    judged = set()
    stale = WorkdirLock._stale

    def stale_then_wait(self, owner):
        verdict = stale(self, owner)
        if threading.get_ident() not in judged:  # only each run's first verdict waits for the other's
            judged.add(threading.get_ident())
            both_judged.wait()
        return verdict

    monkeypatch.setattr(WorkdirLock, "_stale", stale_then_wait)
    results = []

    def take():
        try:
            results.append(WorkdirLock(str(tmp_path)).acquire())
        except WorkdirError as err:
            results.append(err)

    threads = [threading.Thread(target=take) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Same pid for both threads: once one holds the lock, the other finds a live owner.
    assert sum(isinstance(r, WorkdirLock) for r in results) == 1, results


def test_a_link_planted_at_the_takeover_guard_is_refused_not_followed(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid()}))
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    os.symlink(victim, tmp_path / ".lock.takeover")
    with pytest.raises(WorkdirError, match=r"\.lock\.takeover"):
        WorkdirLock(str(tmp_path)).acquire()
    assert victim.read_text() == "keep"


def test_atomic_writes_replace_a_planted_link_and_never_follow_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "config.json").symlink_to(victim)
    write_text_atomic(str(tmp_path / "config.json"), "{}")
    assert victim.read_text() == "precious"
    assert not os.path.islink(tmp_path / "config.json") and (tmp_path / "config.json").read_text() == "{}"
    assert sorted(os.listdir(tmp_path)) == ["config.json", "victim.txt"]  # no temporary file left


def test_a_link_planted_at_the_lock_is_refused(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.makedirs(tmp_path / "run")
    (tmp_path / "run" / ".lock").symlink_to(victim)
    with pytest.raises(WorkdirError, match="symbolic link"):
        WorkdirLock(str(tmp_path / "run")).acquire()
    assert victim.read_text() == "precious"


def test_config_json_is_never_seen_half_written(tmp_path):
    """Every process of a multi-process job reads config.json (the resume check) while process 0 rewrites it."""
    path = str(tmp_path / "config.json")
    texts = [json.dumps({"seed": i, "pad": "x" * 200_000}) for i in range(2)]
    write_text_atomic(path, texts[0])
    torn, done = [], threading.Event()

    def read():
        while not done.is_set():
            with open(path) as f:
                text = f.read()
            if text not in texts:
                torn.append(len(text))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(300):
            write_text_atomic(path, texts[i % 2])
    finally:
        done.set()
        reader.join()
    assert not torn, f"a reader saw {len(torn)} partial files, e.g. of {torn[0]} characters"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_check_writable_creates_nothing(tmp_path):
    check_writable(str(tmp_path / "a" / "b"))
    assert os.listdir(tmp_path) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(WorkdirError, match="exists and is not a folder"):
        check_writable(str(tmp_path / "file"))
    with pytest.raises(WorkdirError, match="is not a folder"):
        check_writable(str(tmp_path / "file" / "run"))
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(WorkdirError, match="no write permission"):
            check_writable(str(locked / "run"))
