"""flows/team.py's lock manager against a real redis-server (tests/redis_server.py), without Prefect runs:
renewal while the holder lives, the bound after its kill -9 (a real process killed), a clean handover,
Redis unreachable or refusing the password, and the embedded default (no Redis: file locks, local results).
The two-machine proof with a Prefect server and workers is tests/test_team_redis.py."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT
from redis_server import RedisServer
from sshd_hosts import closed_loopback_port

HOLD, RENEW = 2.0, 0.5

HOLDER = """
import sys, time
from flows.team import TeamLockManager
m = TeamLockManager(sys.argv[1], hold_s=float(sys.argv[2]), renew_s=float(sys.argv[3]))
assert m.acquire_lock("rn50-pack-k", "holder-in-child")
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as r:
        yield r


def _manager(url: str):
    from flows.team import TeamLockManager

    return TeamLockManager(url, hold_s=HOLD, renew_s=RENEW)


def _broke_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "broke the stale lock" in r.getMessage()]


def test_embedded_default_needs_no_redis(monkeypatch, tmp_path):
    from flows import stages, team
    from flows.locks import LiveLockManager

    monkeypatch.delenv(team.REDIS_ENV, raising=False)
    assert type(team.lock_manager(tmp_path)) is LiveLockManager
    assert type(stages.fetch.cache_policy.lock_manager) is LiveLockManager  # as the stages got it at import
    team.check_team(tmp_path / "work")  # no-op: nothing written, no server asked
    assert not (tmp_path / "work").exists()


def test_team_mode_settings(monkeypatch, tmp_path, redis):
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    from flows import team
    from tasks.common import StageError

    monkeypatch.setenv(team.REDIS_ENV, redis.url())
    monkeypatch.setenv(team.HOLD_ENV, "6")
    monkeypatch.setenv(team.RENEW_ENV, "1.5")
    m = team.lock_manager(tmp_path)
    assert type(m) is team.TeamLockManager and (m.hold_s, m.renew_s) == (6.0, 1.5)
    with temporary_settings(updates={PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path / "results"}):
        assert team.results_dir() == tmp_path / "results"
    monkeypatch.setenv(team.RENEW_ENV, "4")
    with pytest.raises(StageError, match="at most half of RN50_LOCK_HOLD_S"):
        team.lock_manager(tmp_path)
    monkeypatch.setenv(team.RENEW_ENV, "soon")
    with pytest.raises(StageError, match="RN50_LOCK_RENEW_S='soon': expected a number"):
        team.lock_manager(tmp_path)
    # Prefect's default, under this worker's own PREFECT_HOME: not a team's.
    with temporary_settings(restore_defaults={PREFECT_RESULTS_LOCAL_STORAGE_PATH}):
        assert team.results_dir() is None
        with pytest.raises(StageError, match="PREFECT_RESULTS_LOCAL_STORAGE_PATH is not"):
            team.check_team(tmp_path / "work")


def test_lock_renewed_while_holder_lives_and_broken_after_kill(redis, caplog):
    """A real process holds the lock; its heartbeat keeps it past HOLD; after kill -9 a waiter takes it
    within HOLD (+ one poll) of the kill and says so in one line naming the dead holder."""
    import redis as redis_py

    r = redis_py.Redis.from_url(redis.url())
    child = subprocess.Popen([sys.executable, "-c", HOLDER, redis.url(), str(HOLD), str(RENEW)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert child.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        first = r.pttl("lock:rn50-pack-k")
        assert 0 < first <= HOLD * 1000
        # Renewed: its time to live goes back up while the holder lives, past the first expiry.
        while time.monotonic() - t0 < HOLD * 1.5:
            assert r.get("lock:rn50-pack-k") == b"holder-in-child"
            time.sleep(0.1)
        assert child.poll() is None
        m = _manager(redis.url())
        assert m.is_locked("rn50-pack-k") and not m.acquire_lock("rn50-pack-k", "waiter", acquire_timeout=0.5)
        child.send_signal(signal.SIGKILL)
        child.wait()
        killed = time.monotonic()
        with caplog.at_level(logging.WARNING):
            assert m.acquire_lock("rn50-pack-k", "waiter", acquire_timeout=HOLD + 5)  # never held forever
        took = time.monotonic() - killed
        assert took <= HOLD + 0.5, took
        lines = _broke_lines(caplog)
        assert len(lines) == 1 and f"pid {child.pid}" in lines[0] and f"{HOLD:g} s" in lines[0], lines
        assert m.is_lock_holder("rn50-pack-k", "waiter")
        m.release_lock("rn50-pack-k", "waiter")
        assert not m.is_locked("rn50-pack-k")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.fixture(params=["file", "redis"])
def two_managers(request, tmp_path):
    """Two lock managers of one backend, as two runs would have: the one-machine file locks or team Redis."""
    if request.param == "file":
        from flows.locks import LiveLockManager

        return LiveLockManager(tmp_path), LiveLockManager(tmp_path)
    url = request.getfixturevalue("redis").url()
    return _manager(url), _manager(url)


def test_a_waiter_says_once_which_holder_it_waits_for(two_managers, caplog):
    """A stage that is Running but idle in the UI says why, in one line naming the holder, not once a poll."""
    from flows.locks import holder_identity

    a, b = two_managers
    assert a.acquire_lock("rn50-verify-w", "a")
    try:
        with caplog.at_level(logging.INFO):
            assert not b.acquire_lock("rn50-verify-w", "b", acquire_timeout=1)  # several polls
    finally:
        a.release_lock("rn50-verify-w", "a")
    lines = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert lines == [f"waiting for the stage lock rn50-verify-w: {holder_identity()['host']} pid {os.getpid()} "
                     "holds it"], lines


def test_release_hands_over_at_once_without_a_stale_line(redis, caplog):
    a, b = _manager(redis.url()), _manager(redis.url())
    assert a.acquire_lock("rn50-verify-k", "a")
    got = threading.Event()
    waiter = threading.Thread(target=lambda: b.acquire_lock("rn50-verify-k", "b") and got.set())
    with caplog.at_level(logging.WARNING):
        waiter.start()
        assert not got.wait(0.5)  # b waits while a holds it
        a.release_lock("rn50-verify-k", "a")
        assert got.wait(2)
        waiter.join()
    assert not _broke_lines(caplog)
    assert b.is_lock_holder("rn50-verify-k", "b") and not a.is_lock_holder("rn50-verify-k", "a")
    b.release_lock("rn50-verify-k", "b")


def test_redis_unreachable_is_transient_and_names_redis():
    from flows.team import TeamLockManager
    from tasks.common import TransientError, is_transient

    port = closed_loopback_port()
    m = TeamLockManager(f"redis://:pw@127.0.0.1:{port}/0", hold_s=HOLD, renew_s=RENEW)
    with pytest.raises(TransientError) as e:
        m.acquire_lock("rn50-fetch-k", "h")
    msg = str(e.value)
    assert is_transient(e.value) and "\n" not in msg
    assert msg.startswith(f"Redis at 127.0.0.1:{port} is unreachable") and "rn50-fetch-k" in msg and ":pw@" not in msg


def test_wrong_password_is_not_transient(redis):
    from flows.team import TeamLockManager
    from tasks.common import StageError, is_transient

    m = TeamLockManager(redis.url(password="wrong-password-123"), hold_s=HOLD, renew_s=RENEW)
    with pytest.raises(StageError, match="refused the credentials of RN50_REDIS_URL") as e:
        m.acquire_lock("rn50-fetch-k", "h")
    assert not is_transient(e.value) and "wrong-password" not in str(e.value)


def test_redis_down_at_release_does_not_fail_the_stage(tmp_path, caplog):
    """The stage's work is recorded by then: the lock, unrenewed, expires by itself. After a restart
    (append-only file) the lock is back and ends with its expiry."""
    with RedisServer(tmp_path / "r") as srv:
        m = _manager(srv.url())
        assert m.acquire_lock("rn50-train-k", "h")
        srv.stop()
        with caplog.at_level(logging.WARNING):
            m.release_lock("rn50-train-k", "h")
        assert any("is unreachable" in r.getMessage() and "expires by itself within 2 s" in r.getMessage()
                   for r in caplog.records)
        srv.start()
        other = _manager(srv.url())
        t0 = time.monotonic()
        assert other.acquire_lock("rn50-train-k", "other", acquire_timeout=HOLD + 1)
        assert time.monotonic() - t0 <= HOLD + 0.5
        other.release_lock("rn50-train-k", "other")


def test_redis_down_before_the_record_is_written_keeps_a_lock_surely_held(tmp_path):
    """Prefect asks is_locked and is_lock_holder before it writes a stage's cache record. With Redis down, a
    lock this process took or renewed less than hold_s ago is still its own (Redis's expiry comes later), so
    the record of a long stage is not lost to an outage at its end; any other question is Redis's to answer:
    unreachable, transient."""
    from tasks.common import TransientError

    with RedisServer(tmp_path / "r") as srv:
        m = _manager(srv.url())
        assert m.acquire_lock("rn50-pack-k", "h")
        srv.stop()
        assert m.is_locked("rn50-pack-k") and m.is_lock_holder("rn50-pack-k", "h")
        for ask in (lambda: m.is_lock_holder("rn50-pack-k", "another-holder"), lambda: m.is_locked("rn50-verify-k")):
            with pytest.raises(TransientError, match=f"Redis at 127.0.0.1:{srv.port} is unreachable"):
                ask()
        with m._mutex:
            holder, since = m._held["rn50-pack-k"]
            m._held["rn50-pack-k"] = (holder, since - HOLD)  # as if its last renewal were hold_s ago: Redis may have expired it
        with pytest.raises(TransientError, match="cannot look up the stage lock rn50-pack-k"):
            m.is_lock_holder("rn50-pack-k", "h")
        m.release_lock("rn50-pack-k", "h")


def test_heartbeat_takes_a_lost_lock_back_and_gives_up_one_taken_over(redis, caplog):
    """Redis lost the lock (a restart without persistence: FLUSHALL here): the next renewal takes it back, one
    line. Another holder has it (its expiry passed while this holder stalled): the renewal leaves it, one line,
    and stops renewing it."""
    import pickle

    import redis as redis_py

    r = redis_py.Redis.from_url(redis.url())
    m = _manager(redis.url())
    assert m.acquire_lock("rn50-archive-k", "h")
    with caplog.at_level(logging.WARNING):
        r.flushall()
        m.renew()
        assert r.get("lock:rn50-archive-k") == b"h" and 0 < r.pttl("lock:rn50-archive-k") <= HOLD * 1000
        r.set("lock:rn50-archive-k", "someone-else", px=int(HOLD * 1000))
        m.renew()
        assert r.get("lock:rn50-archive-k") == b"someone-else" and "rn50-archive-k" not in m._held
    lines = [rec.getMessage() for rec in caplog.records]
    assert sum("took the stage lock rn50-archive-k back" in ln for ln in lines) == 1, lines
    assert sum("lost the stage lock rn50-archive-k in Redis to another holder" in ln for ln in lines) == 1, lines
    copy = pickle.loads(pickle.dumps(m))  # Prefect may copy a task's cache policy: the bound goes with it
    assert (copy.hold_s, copy.renew_s, copy.where) == (HOLD, RENEW, f"127.0.0.1:{redis.port}")
    r.delete("lock:rn50-archive-k")
