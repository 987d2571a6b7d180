"""One writer per store: a lock file beside the store, held for the whole write, and a
writer that stops when the process that started it is gone.

The lock is an OS lock (``filelock``: ``flock`` on POSIX) on ``<store>.lock``: the kernel
releases it when its holder dies, however it dies, so a lock left by a killed run is taken
over by the next one without guessing from pids or ages. The holder writes its pid, host and
command to ``<store>.lock.owner`` so that a second writer can say who holds the store.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from pipeline.cache.store import CacheError
from schemas import layout as L

log = logging.getLogger(__name__)


class StoreLockedError(CacheError):
    """Another process holds the store's writer lock."""


def lock_paths(store: Path) -> tuple[Path, Path]:
    """``(<store>.lock, <store>.lock.owner)``."""
    return store.with_name(store.name + L.LOCK_SUFFIX), store.with_name(store.name + L.OWNER_SUFFIX)


def read_owner(store: Path) -> dict[str, Any] | None:
    """The holder recorded beside ``store`` (pid, host, command, since), if any."""
    try:
        data = json.loads(lock_paths(store)[1].read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


_RELEASE_GRACE_S = 2.0


def _holder_gone(owner: dict[str, Any] | None) -> bool:
    """Whether ``owner`` is a process of this host that has exited (or is a zombie)."""
    if not owner or owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    pid = owner["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _describe(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "another process (it has not named itself yet)"
    return (f"pid {owner.get('pid')} on {owner.get('host')} ({owner.get('command')!r}, "
            f"since {owner.get('since')})")


@contextmanager
def writer_lock(store: str | Path, *, command: str) -> Iterator[str]:
    """Hold the writer lock of ``store`` for the ``with`` block; yields a token unique to
    this hold (writers record it in the store and check it before each write).

    A second writer raises :class:`StoreLockedError` at once, naming the holder. A lock
    whose holder died is free again (the OS released it) and is taken over with a warning.
    """
    store = Path(store)
    lock_file, owner_file = lock_paths(store)
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(lock_file), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            owner = read_owner(store)
            if not _holder_gone(owner):
                raise
            # The holder has just died: the kernel frees its lock a moment after the exit.
            lock.acquire(timeout=_RELEASE_GRACE_S)
    except Timeout:
        raise StoreLockedError(
            f"{store} is being written by {_describe(read_owner(store))}; wait for that run to finish or "
            f"stop it (lock file {lock_file})") from None
    except OSError as exc:
        raise CacheError(f"cannot create the writer lock {lock_file} ({exc}); is the directory writable?") from exc
    try:
        previous = read_owner(store)
        if previous:
            log.warning("%s: taking over the writer lock left by %s, which is no longer running", store,
                        _describe(previous))
        token = uuid.uuid4().hex
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "token": token,
                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        tmp = owner_file.with_name(f".{owner_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps(owner) + "\n")
        os.replace(tmp, owner_file)
        try:
            yield token
        finally:
            owner_file.unlink(missing_ok=True)
    finally:
        lock.release()


_watchdog_started = False


def stop_with_parent(*, interval: float = 0.5) -> bool:
    """Kill this process (SIGKILL) as soon as its parent process is gone.

    A launcher killed with ``kill -9`` (``uv run``, a shell, ``dvc repro``) cannot take its
    child along; without this the child keeps writing as an orphan. A daemon thread compares
    ``os.getppid()`` with the parent at start (``prctl(PR_SET_PDEATHSIG)`` would follow the
    parent *thread*, which a launcher may retire early). Skipped under ``nohup`` (SIGHUP
    ignored: detached on purpose) and where there is no ``getppid``. Returns whether the watch
    runs; starting it twice is a no-op.
    """
    global _watchdog_started
    if _watchdog_started:
        return True
    if sys.platform == "win32" or signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
        return False
    parent = os.getppid()

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                sys.stderr.write(f"error: parent process {parent} is gone; stopping this writer "
                                 f"(pid {os.getpid()})\n")
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(interval)

    threading.Thread(target=watch, name="stop-with-parent", daemon=True).start()
    _watchdog_started = True
    return True
