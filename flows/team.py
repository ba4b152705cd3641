"""Several workers on several machines: one lock service and one cache for all of them.

Team mode is on when `RN50_REDIS_URL` is set in the worker's environment (the compose workers set it);
`rn50 run` and `make demo` leave it unset and keep the file locks under PREFECT_HOME (flows/locks.py) and
Prefect's local results. In team mode:

- The work dir is a shared file system mounted at the same path on every worker (the training nodes read
  the RecordIO from it too), and so is Prefect's result storage (PREFECT_RESULTS_LOCAL_STORAGE_PATH), where
  the stages' cache records live, so a run picked up by any worker finds every other worker's records. A
  shared file system, not S3: the work dir must be on one anyway, so the records need no other service or
  credential, and they live beside the data they describe. A shared directory
  carries a marker with an id written at its first use and recorded on the Prefect server; a worker whose
  directory at that path is not the shared one (a local disk, a missing mount) fails with one line.
- Stage locks are `prefect-redis`'s RedisLockManager against the team's Redis, with an expiry renewed
  every `RN50_LOCK_RENEW_S` while the holder lives: a holder that died (kill -9, a lost machine) loses its
  lock `RN50_LOCK_HOLD_S` after its last renewal, and the run that takes it over says so in one line.
  Redis unreachable is a TransientError naming Redis (the stage is retried), never a run without locks;
  a stage that already holds its lock still writes its cache record during an outage shorter than the bound.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from prefect_redis.locking import RedisLockManager

from flows.locks import HOLD_S, RENEW_S, LiveLockManager, _report, holder_identity, report_waiting
from tasks.common import StageError, TransientError

REDIS_ENV, RESULTS_ENV = "RN50_REDIS_URL", "PREFECT_RESULTS_LOCAL_STORAGE_PATH"
HOLD_ENV, RENEW_ENV = "RN50_LOCK_HOLD_S", "RN50_LOCK_RENEW_S"
MARKER = ".rn50-share-id"
POLL_S = 0.2
RELEASED_KEEP_S = 60  # how long a released lock's record says "released" (a waiter polls every POLL_S)


def redis_url() -> str | None:
    return os.environ.get(REDIS_ENV) or None


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = -1.0
    if not value > 0:
        raise StageError(f"{name}={raw!r}: expected a number of seconds > 0")
    return value


def bounds() -> tuple[float, float]:
    """(hold_s, renew_s) of the team's stage locks."""
    hold, renew = _seconds(HOLD_ENV, HOLD_S), _seconds(RENEW_ENV, RENEW_S)
    if renew * 2 > hold:
        raise StageError(f"{RENEW_ENV}={renew:g} must be at most half of {HOLD_ENV}={hold:g}: "
                         "a lock would expire between two renewals")
    return hold, renew


def lock_manager(file_locks: Path):
    """The stage tasks' lock manager: Redis in team mode, else the file locks in `file_locks`."""
    url = redis_url()
    if url is None:
        return LiveLockManager(file_locks)
    hold, renew = bounds()
    return TeamLockManager(url, hold_s=hold, renew_s=renew)


def results_dir() -> Path | None:
    """Where the stages' cache records go when set for a team (Prefect's local result storage), else None:
    Prefect's default, under this worker's own PREFECT_HOME."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    path = Path(settings.results.local_storage_path).expanduser()
    return None if path == Path(settings.home).expanduser() / "storage" else path


def redis_where(url: str) -> str:
    """host:port of a Redis URL, for messages (never the password)."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"


@contextlib.contextmanager
def talking_to_redis(where: str, doing: str) -> Iterator[None]:
    """Redis errors as the stage errors they are: unreachable is transient (retried), refused credentials
    or a refused command are not."""
    import redis.exceptions as rx

    try:
        yield
    except (rx.AuthenticationError, rx.AuthorizationError) as e:
        raise StageError(f"Redis at {where} refused the credentials of RN50_REDIS_URL ({e}): cannot {doing}") from None
    except (rx.ConnectionError, rx.TimeoutError) as e:
        raise TransientError(f"Redis at {where} is unreachable ({e}): cannot {doing}") from None
    except rx.RedisError as e:
        raise StageError(f"Redis at {where}: {e}: cannot {doing}") from None


# Both scripts act only while the lock holds `holder`, so a holder never touches a lock that passed on.
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('pexpire', KEYS[1], ARGV[2]); redis.call('pexpire', KEYS[2], ARGV[3]); return 1
elseif redis.call('exists', KEYS[1]) == 0 then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2]); redis.call('set', KEYS[2], ARGV[4], 'PX', ARGV[3]); return 2
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('set', KEYS[2], ARGV[2], 'PX', ARGV[3]); return redis.call('del', KEYS[1])
end
return redis.call('exists', KEYS[1]) * -1
"""


class TeamLockManager(RedisLockManager):
    """RedisLockManager with a bounded hold: a lock carries an expiry of `hold_s` that a heartbeat thread
    renews every `renew_s` while its holder lives (Prefect 3.8 passes no `hold_timeout`, and the base
    class's locks never expire). Beside each lock, `<lock>:holder` says who holds it (host, boot id, pid)
    and lives `2 * hold_s`, so the run that takes over an expired lock can name the holder that died.
    After a Redis restart that lost the lock (persistence off), the heartbeat takes it back if it is free."""

    def __init__(self, url: str, hold_s: float = HOLD_S, renew_s: float = RENEW_S) -> None:
        self.hold_s, self.renew_s = hold_s, renew_s
        super().__init__(connection_url=url)
        self._setup()

    def _setup(self) -> None:
        self.where = redis_where(self.connection_url)
        # key -> (holder, monotonic time before its last successful take or renewal), for the heartbeat
        self._held: dict[str, tuple[str, float]] = {}
        self._mutex = threading.Lock()
        self._heartbeat: threading.Thread | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "hold_s": self.hold_s, "renew_s": self.renew_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._setup()

    def _init_clients(self) -> None:
        from redis import Redis
        from redis.asyncio import Redis as AsyncRedis

        # Bounded waits: a Redis host that vanished is an error after seconds, not a hang.
        opts = {"socket_connect_timeout": 5, "socket_timeout": 10}
        self.client = Redis.from_url(self.connection_url, **opts)
        self.async_client = AsyncRedis.from_url(self.connection_url, **opts)

    @staticmethod
    def _holder_name(key: str) -> str:
        return f"lock:{key}:holder"

    def _ms(self, seconds: float) -> int:
        return max(1, int(seconds * 1000))

    def _holder_record(self, key: str) -> dict[str, Any]:
        raw = self.client.get(self._holder_name(key))
        try:
            rec = json.loads(raw) if raw else {}
        except ValueError:
            rec = {}
        return rec if isinstance(rec, dict) else {}

    def _me(self, holder: str) -> str:
        return json.dumps({"holder": holder, **holder_identity()})

    # -- LockManager ---------------------------------------------------------------------------------

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        from redis.lock import Lock

        name = self._lock_name_for_key(key)
        hold = hold_timeout or self.hold_s
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        waited_on: dict[str, Any] = {}
        with talking_to_redis(self.where, f"take the stage lock {key}"):
            while True:
                asked = time.monotonic()
                lock = Lock(self.client, name, timeout=hold, thread_local=False)
                if lock.acquire(token=holder, blocking=False):
                    break
                current = self.client.get(name)
                if current is not None and current.decode() == holder:
                    return True
                record = self._holder_record(key)
                if record.get("holder") == (current or b"").decode():
                    if record.get("holder") != waited_on.get("holder"):
                        report_waiting(key, record)
                    waited_on = record  # the live holder we wait for (its record may lag its lock by a moment)
                if deadline is not None and time.monotonic() > deadline:
                    return False
                time.sleep(POLL_S)
            before = self._holder_record(key)
            self.client.set(self._holder_name(key), self._me(holder), px=self._ms(2 * hold))
        self._locks[name] = lock
        with self._mutex:
            self._held[key] = (holder, asked)
        self._start_heartbeat()
        if waited_on and not before.get("released"):  # it expired: a release would have said so
            _report(f"broke the stale lock {key} in Redis: its holder ({waited_on.get('host', '?')} pid "
                    f"{waited_on.get('pid', '?')}) stopped renewing it for {hold:g} s")
        return True

    def release_lock(self, key: str, holder: str) -> None:
        name = self._lock_name_for_key(key)
        with self._mutex:  # the heartbeat stops renewing it first
            self._held.pop(key, None)
        self._locks.pop(name, None)
        released = json.dumps({"holder": holder, "released": True})
        try:
            with talking_to_redis(self.where, f"release the stage lock {key}"):
                done = self.client.eval(_RELEASE, 2, name, self._holder_name(key), holder, released,
                                        self._ms(RELEASED_KEEP_S))
        except TransientError as e:
            # The stage's work is done and recorded: it expires unrenewed instead.
            _report(f"{e}; it expires by itself within {self.hold_s:g} s")
            return
        if done == -1:
            _report(f"the stage lock {key} had passed to another holder before its release: it went "
                    f"unrenewed for {self.hold_s:g} s while this run held it")

    def _surely_mine(self, key: str, holder: str | None = None) -> bool:
        """This process took or renewed `key` (as `holder`) less than hold_s ago, so Redis still has it as ours
        (its expiry was set after that moment): known without asking Redis."""
        with self._mutex:
            mine, since = self._held.get(key, (None, 0.0))
        return mine is not None and holder in (None, mine) and time.monotonic() - since < self.hold_s

    # Prefect asks both before it writes a stage's cache record: a Redis outage at the end of a long stage
    # must not cost its record while the lock is still surely this process's.
    def is_locked(self, key: str) -> bool:
        try:
            with talking_to_redis(self.where, f"look up the stage lock {key}"):
                return bool(self.client.exists(self._lock_name_for_key(key)))
        except TransientError:
            if self._surely_mine(key):
                return True
            raise

    def is_lock_holder(self, key: str, holder: str) -> bool:
        try:
            with talking_to_redis(self.where, f"look up the stage lock {key}"):
                current = self.client.get(self._lock_name_for_key(key))
        except TransientError:
            if self._surely_mine(key, holder):
                return True
            raise
        return current is not None and current.decode() == holder

    # The file lock manager's own, on this class's is_locked, acquire_lock, _renew_forever: waiting polls
    # is_locked (not the base class's way: take and release a lock without expiry, which a waiter that died
    # in between would leave behind for good), the async forms run the sync ones in a thread.
    aacquire_lock = LiveLockManager.aacquire_lock
    wait_for_lock = LiveLockManager.wait_for_lock
    await_for_lock = LiveLockManager.await_for_lock
    _start_heartbeat = LiveLockManager._start_heartbeat

    # -- heartbeat -----------------------------------------------------------------------------------

    def renew(self) -> None:
        """One round of renewals of the locks this process holds."""
        with self._mutex:
            held = {key: holder for key, (holder, _) in self._held.items()}
        for key, holder in held.items():
            name = self._lock_name_for_key(key)
            asked = time.monotonic()
            outcome = self.client.eval(_RENEW, 2, name, self._holder_name(key), holder, self._ms(self.hold_s),
                                       self._ms(2 * self.hold_s), self._me(holder))
            with self._mutex:
                if self._held.get(key, (None,))[0] != holder:
                    continue  # released meanwhile: it was renewed at most once more, harmlessly
                if outcome:
                    self._held[key] = (holder, asked)
                if outcome == 0:
                    self._held.pop(key, None)
                    _report(f"lost the stage lock {key} in Redis to another holder: it went unrenewed for "
                            f"{self.hold_s:g} s")
                elif outcome == 2:
                    _report(f"took the stage lock {key} back: Redis at {self.where} had lost it (a restart "
                            "without persistence?)")

    def _renew_forever(self) -> None:
        failing = False
        while True:
            time.sleep(self.renew_s)
            try:
                self.renew()
                if failing:
                    _report(f"Redis at {self.where} answers again: stage locks renewed")
                failing = False
            except Exception as e:  # noqa: BLE001 - keep trying while the locks still have time left
                if not failing:
                    _report(f"cannot renew the stage locks: Redis at {self.where} ({e}); retrying every "
                            f"{self.renew_s:g} s")
                failing = True


# --- the shared directories -----------------------------------------------------------------------


def share_variable(path: Path) -> str:
    return "rn50_share_" + hashlib.sha256(str(path).encode()).hexdigest()[:24]


def _read_marker(marker: Path) -> str | None:
    try:
        return marker.read_text().strip()
    except FileNotFoundError:
        return None


def check_shared(path: Path, what: str) -> str:
    """The id of the shared directory `path`: its marker's, written at the first use (by any worker) and
    recorded on the Prefect server. StageError in one line when this machine's `path` is not that
    directory (no marker while the server records one, or another id)."""
    from prefect.variables import Variable

    path = Path(path).resolve()
    marker, variable = path / MARKER, share_variable(path)
    try:
        mine = _read_marker(marker)
        if mine is None and Variable.get(variable, default=None) is None:
            # First use: create the marker with its content in one step (of two workers, one wins).
            path.mkdir(parents=True, exist_ok=True)
            tmp = path / f".tmp-{MARKER}-{uuid.uuid4().hex}"
            tmp.write_text(uuid.uuid4().hex)
            try:
                os.link(tmp, marker)
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
            mine = _read_marker(marker)
    except OSError as e:
        raise StageError(f"{what} {path}: {e.strerror or e}") from None
    if mine:
        from prefect.exceptions import ObjectAlreadyExists

        with contextlib.suppress(ValueError, ObjectAlreadyExists):  # recorded already (by another worker too)
            Variable.set(variable, {"path": str(path), "id": mine}, overwrite=False)
    recorded = Variable.get(variable, default=None)
    theirs = recorded.get("id") if isinstance(recorded, dict) else None
    if not mine or mine != theirs:
        raise StageError(
            f"{what} {path} on {socket.gethostname()} is not the team's shared one: "
            + (f"its marker {MARKER} holds {mine}, " if mine else f"it has no marker {MARKER}, ")
            + f"the team's holds {theirs} (mount the shared file system at {path} on every worker)")
    return mine


def check_team(workdir: Path) -> None:
    """In team mode: the work dir and the result storage are the team's shared ones. No-op otherwise."""
    if redis_url() is None:
        return
    results = results_dir()
    if results is None:
        raise StageError(f"{REDIS_ENV} is set (team mode) but {RESULTS_ENV} is not: set it to a directory on "
                         "the shared file system, where every worker reads the stages' cache records")
    check_shared(Path(workdir), "the work dir")
    check_shared(results, f"the cache records' directory ({RESULTS_ENV})")
