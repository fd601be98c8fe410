"""The workdir: one run at a time (the lock), atomic writes that never follow a planted link, writability."""

import json
import os
import socket
import subprocess
import sys
import threading

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


def test_racing_runs_get_one_lock(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid()}))
    results = []

    def take():
        try:
            results.append(WorkdirLock(str(tmp_path)).acquire())
        except WorkdirError as err:
            results.append(err)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Same pid for all threads: after the first takes the stale lock, the others find a live owner.
    assert sum(isinstance(r, WorkdirLock) for r in results) == 1


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
