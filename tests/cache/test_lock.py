"""One writer per store (`pipeline.cache.lock`): a second writer is refused at once naming
the holder, a dead holder's lock is taken over, and a writer dies with its parent.

Child processes here import only the lock module (no torch): each starts in about a second.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.cache.lock import StoreLockedError, lock_paths, read_owner, writer_lock

ROOT = Path(__file__).resolve().parents[2]

# A writer: take the store's lock, say so, then write forever.
HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pipeline.cache.lock import stop_with_parent, writer_lock
    if sys.argv[2] == "watch":
        stop_with_parent(interval=0.1)
    with writer_lock(Path(sys.argv[1]), command="test holder"):
        print("locked", flush=True)
        while True:
            time.sleep(0.05)
""")

# A launcher (as `uv run` is): start the writer, print its pid, wait for it.
LAUNCHER = textwrap.dedent("""
    import signal, subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], stdout=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    print(child.pid, flush=True)
    print(child.stdout.readline().strip(), flush=True)
    child.wait()
""")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is not a writer
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def wait_until(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))


def test_a_second_writer_is_refused_at_once_naming_the_holder(tmp_path: Path) -> None:
    store = tmp_path / "cache.zarr"
    with writer_lock(store, command="cifd embed") as token:
        owner = read_owner(store)
        assert owner is not None and owner["pid"] == os.getpid() and owner["token"] == token
        began = time.monotonic()
        with pytest.raises(StoreLockedError) as info:
            with writer_lock(store, command="cifd embed"):
                pass
        assert time.monotonic() - began < 1.0
        message = str(info.value)
        assert "\n" not in message
        assert f"is being written by pid {os.getpid()} on {socket.gethostname()} ('cifd embed'" in message
        assert str(lock_paths(store)[0]) in message
    assert read_owner(store) is None  # released: the owner file goes with the lock
    with writer_lock(store, command="cifd embed"):
        pass


def test_a_lock_left_by_a_killed_writer_is_taken_over(tmp_path: Path, caplog) -> None:
    store = tmp_path / "cache.zarr"
    holder = start(["-c", HOLDER, str(store), "plain"])
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError, match=f"pid {holder.pid} on"):
            with writer_lock(store, command="second"):
                pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        holder.kill()
    assert json.loads(lock_paths(store)[1].read_text())["pid"] == holder.pid  # it had no chance to clean up
    with caplog.at_level(logging.WARNING, logger="pipeline.cache.lock"):
        with writer_lock(store, command="next run"):  # the OS released the dead holder's lock
            assert read_owner(store)["pid"] == os.getpid()
    assert f"taking over the writer lock left by pid {holder.pid}" in caplog.text


def test_a_writer_dies_with_its_killed_parent(tmp_path: Path) -> None:
    """`kill -9` of the launcher (as of `uv run cifd embed`) leaves no writer behind."""
    for watch, survives in (("plain", True), ("watch", False)):
        store = tmp_path / f"{watch}.zarr"
        launcher = start(["-c", LAUNCHER, HOLDER, str(store), watch])
        writer = int(launcher.stdout.readline())
        try:
            assert launcher.stdout.readline().strip() == "locked"
            os.kill(launcher.pid, signal.SIGKILL)
            launcher.wait(timeout=30)
            gone = wait_until(lambda: not alive(writer), timeout=10 if not survives else 1.5)
            assert gone is not survives, f"{watch}: writer alive={not gone}"
            if not survives:
                with writer_lock(store, command="next run"):  # and its lock is free
                    pass
        finally:
            if alive(writer):
                os.kill(writer, signal.SIGKILL)


@pytest.mark.slow
def test_kill_9_of_the_launcher_of_cifd_embed_leaves_no_writer(tmp_path: Path, shards_dir, teacher_file,
                                                               embed_settings) -> None:
    """The real command under a launcher: `cifd embed` holds the lock (waiting here for a
    scheduler that never answers); the launcher is killed with -9; `cifd embed` follows."""
    import yaml

    store = tmp_path / "cache.zarr"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "paths": {"shards": str(shards_dir), "teacher": str(teacher_file), "cache": str(store),
                  "metrics": str(tmp_path / "metrics")},
        "embed": {**embed_settings.to_dict(), "scheduler": "tcp://127.0.0.1:9"}}))
    command = "import sys; from stages.cli import main; sys.argv[0] = 'cifd'; main()"
    launcher = start(["-c", LAUNCHER, command, "embed", "--params", str(params)])
    writer = int(launcher.stdout.readline())
    try:
        assert wait_until(lambda: (read_owner(store) or {}).get("pid") == writer, timeout=120), "never locked"
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)
        assert wait_until(lambda: not alive(writer), timeout=10), "cifd embed outlived its launcher"
    finally:
        if alive(writer):
            os.kill(writer, signal.SIGKILL)
    with writer_lock(store, command="next run"):
        pass
