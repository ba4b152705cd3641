"""Stage locks and the cluster slot's holder record under races and containers (issue 24).

Real components: lock files and flocks in a real directory, and a real second PID namespace (`unshare --pid
--fork --mount-proc`, as root) that shares this machine's host name and kernel, as containers run with
`network_mode: host` or one hostname in compose do.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

from conftest import ROOT
from flows.cluster import holder_is_gone
from flows.locks import LiveLockManager, boot_id, pid_namespace, process_start_time
from helpers import missing


def test_two_waiters_that_judged_one_stale_lock_never_both_hold_it(tmp_path):
    """Waiter B judges a dead holder's lock stale; before B breaks it, waiter A judges the same lock stale,
    breaks it and takes the key (forced: A runs inside B's judgement). B used to break whatever lock was at
    the path by then -- A's -- and take the key too: two holders, and A's release raised. Now judging and
    breaking happen under one flock, so A cannot break in between and exactly one waiter holds the key."""
    lock = tmp_path / "k.lock"
    lock.write_text(json.dumps({"holder": "dead", "expiration": time.time() - 1, "host": "elsewhere",
                                "boot_id": "x", "pid_ns": 1, "pid": 1, "pid_start": "1"}))
    a, b = LiveLockManager(tmp_path), LiveLockManager(tmp_path)
    a_got: list[bool] = []
    judge = b.stale_reason

    def judge_then_let_a_in(key: str) -> str | None:
        reason = judge(key)
        if reason and not a_got:
            a_got.append(a.acquire_lock("k", holder="A", acquire_timeout=1))
        return reason

    b.stale_reason = judge_then_let_a_in
    b_got = b.acquire_lock("k", holder="B", acquire_timeout=5)
    assert a_got, "B never judged the lock stale"
    holders = [h for h, got in (("A", a_got[0]), ("B", b_got)) if got]
    assert len(holders) == 1, f"both waiters hold the key: {holders}"
    assert json.loads(lock.read_text())["holder"] == holders[0]
    {"A": a, "B": b}[holders[0]].release_lock("k", holders[0])
    assert not lock.exists()


def test_a_late_renewal_never_overwrites_the_next_holders_lock(tmp_path):
    """A holder's heartbeat reads its lock, finds it its own, and rewrites it with a new expiry. If the lock
    expired (the holder was stalled) and a waiter broke and took it between that read and that write, the
    heartbeat used to overwrite the waiter's lock: two holders. Forced here by running the waiter inside the
    heartbeat's read; the renewal and the break now exclude each other."""
    lock = tmp_path / "k.lock"
    holder = LiveLockManager(tmp_path, hold_s=0.2, renew_s=0.5)  # the lock expires between renewals
    waiter = LiveLockManager(tmp_path)
    waiter_got: list[bool] = []
    read = holder._read

    def read_then_let_the_waiter_in(key: str):
        rec = read(key)
        if threading.current_thread().name == "rn50-lock-heartbeat" and not waiter_got:
            waiter_got.append(waiter.acquire_lock("k", holder="waiter", acquire_timeout=1))
            done.set()
        return rec

    done = threading.Event()
    holder._read = read_then_let_the_waiter_in
    assert holder.acquire_lock("k", holder="first")
    assert done.wait(30), "the heartbeat never renewed"
    on_disk = json.loads(lock.read_text())["holder"]
    assert not (waiter_got[0] and on_disk == "first"), "the late renewal overwrote the lock the waiter had taken"
    (holder if on_disk == "first" else waiter).release_lock("k", on_disk)


HOLDER = """
import json, sys
from pathlib import Path
from flows.locks import LiveLockManager, holder_identity
locks = LiveLockManager(Path(sys.argv[1]))
assert locks.acquire_lock("k", holder="in-container")
print(json.dumps(holder_identity()), flush=True)
sys.stdin.read()  # holds the lock until the test closes stdin
locks.release_lock("k", "in-container")
print("released", flush=True)
"""


def test_a_live_holder_in_another_pid_namespace_keeps_its_lock_and_slot(tmp_path):
    """A live lock holder in another PID namespace on this host (same host name, same boot id): its pid
    means another process out here, so judging it by pid broke its lock (and would release its cluster
    slot) while it ran. Now such a holder is judged like one on another host: by expiry only."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        missing("root and unshare(1), for a second PID namespace")
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", HOLDER,
                             str(tmp_path)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line, f"the holder in the new PID namespace failed (exit {proc.wait()})"
        ident = json.loads(line)
        # The premise: same host name and kernel, and the recorded pid is some other process out here.
        assert (ident["host"], ident["boot_id"]) == (socket.gethostname(), boot_id())
        assert process_start_time(ident["pid"]) != ident["pid_start"]

        waiter = LiveLockManager(tmp_path)
        assert waiter.stale_reason("k") is None
        assert not waiter.acquire_lock("k", holder="host", acquire_timeout=1), "broke a live holder's lock"
        assert json.loads((tmp_path / "k.lock").read_text())["holder"] == "in-container"
        assert not holder_is_gone({"lease_id": "00000000-0000-0000-0000-000000000000", **ident}), \
            "would release a live holder's cluster slot"
        assert ident["pid_ns"] != pid_namespace()

        proc.stdin.close()
        assert proc.stdout.readline() == "released\n"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Once such a holder stops renewing, its lock expires like a remote one's.
    (tmp_path / "k.lock").write_text(json.dumps({"holder": "in-container", **ident, "expiration": time.time() - 1}))
    assert "stopped renewing" in LiveLockManager(tmp_path).stale_reason("k")


def test_a_holder_record_without_a_pid_namespace_is_judged_by_expiry_only(tmp_path):
    """A record that does not say which PID namespace its pid belongs to (another version of this code) is
    not judged by pid: a dead-looking pid does not break it before it expires; after, it does."""
    rec = {"holder": "old", "host": socket.gethostname(), "boot_id": boot_id(), "pid": 1, "pid_start": "0"}
    (tmp_path / "k.lock").write_text(json.dumps({**rec, "expiration": time.time() + 3600}))
    assert LiveLockManager(tmp_path).stale_reason("k") is None
    assert not holder_is_gone(rec)
    (tmp_path / "k.lock").write_text(json.dumps({**rec, "expiration": time.time() - 1}))
    assert "stopped renewing" in LiveLockManager(tmp_path).stale_reason("k")
