"""Stage locks that a dead holder cannot wedge.

The stages run with SERIALIZABLE isolation so two flow runs never both execute an expensive stage for the
same key: the first takes a lock file, the second waits on it. Prefect's `FileSystemLockManager` writes
those locks without an expiry when, as here, the transaction gives no `hold_timeout` (it never does in
Prefect 3.8): a holder killed by `kill -9`, or by a cancel that kills the flow-run process, leaves a lock
that blocks that cache key forever.

`LiveLockManager` records who holds a lock (host, boot id, PID namespace, pid and the pid's start time) and
keeps an expiry that a heartbeat thread renews while the holder lives. A lock is stale, and is broken with
one log line, when
  - its holder ran on this machine (same boot) in this PID namespace and that process is gone, or
  - its expiry passed without renewal (a holder on another host or in another PID namespace -- a container
    that shares the host name -- that died, or one that hung for `hold_s`).
The lock file is created with its content in one step (link of a finished temp file), so a reader never
sees a half-written lock. Judging a lock and breaking it, renewing it and releasing it each happen under an
flock of one file in the lock directory (GUARD): two waiters that found the same lock stale cannot break it
in turn (the second would remove the lock the first has just taken), and a late renewal cannot overwrite
the lock of the holder that came next.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from prefect.locking.filesystem import FileSystemLockManager

from tasks.holder import boot_id, holder_identity, pid_is_ours, pid_namespace, process_start_time  # noqa: F401

log = logging.getLogger(__name__)

HOLD_S = 120.0  # a lock not renewed for this long is stale, wherever its holder ran
RENEW_S = 20.0
GUARD = ".rn50-guard"  # in the lock directory; never a lock itself (those are <key>.lock)


def _report(msg: str, level: int = logging.WARNING) -> None:
    """One line in the flow run's log when there is a run context, else in the process log."""
    try:
        from prefect.logging import get_run_logger

        get_run_logger().log(level, msg)
    except Exception:
        log.log(level, msg)


def report_waiting(key: str, holder_record: dict[str, Any]) -> None:
    """The one line a run logs when it starts to wait for a stage lock: a stage Running but idle says why."""
    _report(f"waiting for the stage lock {key}: {holder_record.get('host', '?')} pid "
            f"{holder_record.get('pid', '?')} holds it", logging.INFO)


class LiveLockManager(FileSystemLockManager):
    def __init__(self, lock_files_directory: Path, hold_s: float = HOLD_S, renew_s: float = RENEW_S) -> None:
        super().__init__(lock_files_directory)
        self.hold_s, self.renew_s = hold_s, renew_s
        self._held: dict[str, str] = {}  # key -> holder, for the heartbeat
        self._mutex = threading.Lock()
        self._heartbeat: threading.Thread | None = None

    # -- the lock file ------------------------------------------------------------------------------

    def _record(self, holder: str) -> dict[str, Any]:
        return {"holder": holder, "expiration": time.time() + self.hold_s, **holder_identity()}

    def _read(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._lock_path_for_key(key).read_bytes())
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {}  # unreadable or written by another lock manager: judged by the file's age below

    def _write(self, path: Path, record: dict[str, Any], exclusive: bool) -> bool:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            if not exclusive:
                os.replace(tmp, path)
                return True
            try:
                os.link(tmp, path)  # fails if the lock exists: create-with-content in one step
                return True
            except FileExistsError:
                return False
        finally:
            Path(tmp).unlink(missing_ok=True)

    def stale_reason(self, key: str) -> str | None:
        """Why the lock on `key` may be broken, or None while its holder may still be working."""
        rec = self._read(key)
        if rec is None:
            return None
        path = self._lock_path_for_key(key)
        if not rec or not isinstance(rec.get("expiration"), (int, float)):
            # No expiry we understand (e.g. Prefect's own `"expiration": null`): stale once unrenewed as long.
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                return None
            return f"an unrenewed lock without a live holder record, {age:.0f} s old" if age > self.hold_s else None
        if pid_is_ours(rec):
            pid = rec.get("pid")
            if isinstance(pid, int) and process_start_time(pid) != rec.get("pid_start"):
                return f"its holder (pid {pid} on {rec['host']}) is gone"
        if rec["expiration"] < time.time():
            return f"its holder ({rec.get('host', '?')} pid {rec.get('pid', '?')}) stopped renewing it"
        return None

    @contextlib.contextmanager
    def _guarded(self, deadline: float | None = None) -> Iterator[bool]:
        """Hold the lock directory's guard (an exclusive flock of GUARD) for the block; True once held, False
        if `deadline` (monotonic) passed first. Held for a read and a rename or unlink, so polling is cheap."""
        fd = os.open(self.lock_files_directory / GUARD, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() > deadline:
                        yield False
                        return
                    time.sleep(0.01)
            yield True
        finally:
            os.close(fd)  # closing the only descriptor of this open file drops the flock

    def _break_if_stale(self, key: str, deadline: float | None = None) -> bool:
        """Remove the lock on `key` if it is stale: True if it is gone (broken here or meanwhile released)."""
        path = self._lock_path_for_key(key)
        with self._guarded(deadline) as held:
            # Judged and removed under the guard: what is removed is the record judged, not one that another
            # waiter wrote after breaking the same stale lock, nor one its holder has just renewed.
            reason = self.stale_reason(key) if held else None
            if reason is None:
                return False
            try:
                path.unlink()
            except FileNotFoundError:
                return True
        self._locks.pop(key, None)
        _report(f"broke the stale lock {path.name}: {reason}")
        return True

    # -- LockManager ---------------------------------------------------------------------------------

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        self._ensure_lock_files_directory_exists()
        path = self._lock_path_for_key(key)
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        waited_on = None
        while True:
            if self._write(path, self._record(holder), exclusive=True):
                with self._mutex:
                    self._held[key] = holder
                self._locks.pop(key, None)
                self._start_heartbeat()
                return True
            rec = self._read(key)
            if rec and rec.get("holder") == holder:
                return True
            if rec and rec.get("holder") != waited_on:
                waited_on = rec.get("holder")
                report_waiting(key, rec)
            if not self._break_if_stale(key, deadline):
                if deadline is not None and time.monotonic() > deadline:
                    return False
                time.sleep(0.2)

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        import anyio

        return await anyio.to_thread.run_sync(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        with self._mutex, self._guarded():  # the heartbeat never re-creates a released lock
            rec = self._read(key)
            if not rec or rec.get("holder") != holder:
                raise ValueError(f"No lock held by {holder} for transaction with key {key}")
            self._held.pop(key, None)
            self._lock_path_for_key(key).unlink(missing_ok=True)
        self._locks.pop(key, None)

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        if self._read(key) is None:
            return False
        return not self._break_if_stale(key)

    def is_lock_holder(self, key: str, holder: str) -> bool:
        rec = self._read(key)
        return bool(rec) and rec.get("holder") == holder and self.stale_reason(key) is None

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        import anyio

        return await anyio.to_thread.run_sync(self.wait_for_lock, key, timeout)

    # -- heartbeat -----------------------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        with self._mutex:
            if self._heartbeat is None or not self._heartbeat.is_alive():
                self._heartbeat = threading.Thread(target=self._renew_forever, name="rn50-lock-heartbeat",
                                                   daemon=True)
                self._heartbeat.start()

    def _renew_forever(self) -> None:
        while True:
            time.sleep(self.renew_s)
            with self._mutex:
                if not self._held:
                    continue
                with self._guarded():  # taken after _mutex, as in release_lock
                    for key, holder in self._held.items():
                        rec = self._read(key)
                        if rec and rec.get("holder") == holder:
                            self._write(self._lock_path_for_key(key), self._record(holder), exclusive=False)
