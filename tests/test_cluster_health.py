"""The proof of issue 26 on the CPU path: two real hosts (this one, and a network namespace with its own
hostname and a real sshd, tests/sshd_hosts.py), the real launcher (tasks.train.train -> horovodrun over ssh ->
python -m rn50.train), real training. First a night where neither host is slowed: the health report names no
host and the nightly accepts it as the baseline. Then, once the next run has finished its first epoch, every
process of the second host (its sshd, the ssh session, the rank) is put in a cgroup with a CPU quota of 2 % of
a core (cgroup v1 cpu.cfs_quota_us, the v1 form of cgroup v2's cpu.max: a real slowdown the kernel enforces,
nothing the code reads): the compliance stage's health report names that host as the slow one, and the
nightly fails naming it. (A quota from the start would slow the rank's start-up too, for minutes; a fifth of a
core was no slowdown at all while other jobs kept this 2-core machine at load ~20.)

Thresholds are 60 % here, not the default 5 %: the two hosts share this 2-core machine with whatever else runs
on it (load ~20 from other jobs when this was written), and an unthrottled host's own speed was seen 2.1x off the
other's over a short run (60 % below the median of two is a 4x gap); the quota slows it by far more (16x).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import threading
from pathlib import Path

import pytest

from tasks import compliance, nightly
from tasks.inventory import parse_inventory
from tasks.train import train as launch
from tests.sshd_hosts import missing_requirements, netns_host

CPU_CGROUP = Path("/sys/fs/cgroup/cpu")  # cgroup v1 cpu controller (this machine has no v2 cpu controller)
pytestmark = [pytest.mark.timeout(1500)]
_why = missing_requirements() or (None if (CPU_CGROUP / "cpu.cfs_quota_us").exists() or (CPU_CGROUP / "cgroup.procs").exists()
                                  else f"no cgroup v1 cpu controller at {CPU_CGROUP}")
if _why:
    pytestmark.append(pytest.mark.skip(reason=f"cannot slow a second host here: {_why}"))
ARGS = ["--set", "max_epochs=4", "--set", "warmup_epochs=1", "--set", "eval_offset=3", "--set", "eval_period=4",
        "--set", "depth=[1,1,1,1]"]


@contextlib.contextmanager
def cpu_quota(fraction: float):
    """A cpu cgroup limited to `fraction` of one CPU; processes moved into it (and their children) stay there."""
    cg = CPU_CGROUP / f"rn50-slow-{secrets.token_hex(3)}"
    cg.mkdir()
    try:
        (cg / "cpu.cfs_period_us").write_text("100000")
        (cg / "cpu.cfs_quota_us").write_text(str(int(100000 * fraction)))
        yield cg
    finally:
        for pid in (cg / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError, OSError):
                (CPU_CGROUP / "cgroup.procs").write_text(pid)
        cg.rmdir()


def _move_host_into(cg: Path, netns: str) -> int:
    """Every process of the host (its sshd, the sessions and the rank they started) into the cgroup."""
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=True).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, OSError):  # a short-lived session process may be gone
            (cg / "cgroup.procs").write_text(pid)
    return len(pids)


def _slow_down_after_epoch_1(cg: Path, netns: str, runs: Path, before: set, moved: list, stop: threading.Event):
    """Once the new run's rank 0 has written epoch 1's timing (both ranks' lines), put the host in the cgroup:
    its start-up (imports, model build) runs at full speed, the later epochs under the quota."""
    while not stop.is_set():
        for timing in runs.glob("*/timing/run_0.jsonl"):
            lines = timing.read_text().splitlines()
            if timing.parent.parent.name not in before and len(lines) >= 2:
                n = _move_host_into(cg, netns)
                rank1 = next(json.loads(x)["pid"] for x in lines if json.loads(x)["rank"] == 1)
                moved.append((n, cg.name in Path(f"/proc/{rank1}/cgroup").read_text()))
                return
        stop.wait(0.05)


def _throttled(cg: Path) -> int:
    return int(dict(line.split() for line in (cg / "cpu.stat").read_text().splitlines())["nr_throttled"])


def test_slowed_host_is_named_by_the_report_and_fails_the_nightly(tmp_path):
    from rn50.tinydata import make_recordio

    wd = tmp_path / "wd"
    make_recordio(wd / "recordio", classes=4, train_per_class=80, val_per_class=4, work=tmp_path / "images")
    base = tmp_path / "nightly-baseline"
    here = os.uname().nodename
    moved: list = []
    stop = threading.Event()
    with cpu_quota(0.02) as cg, netns_host(tmp_path / "hostb", hostname="rn50-node-b") as h:
        inv = parse_inventory({"hosts": [{"host": h.local_addr, "slots": 1, "interface": h.iface}, h.inventory_entry()]})
        fair = launch(wd, hosts=inv, config="cpu-demo", runs=1, seed=1, timeout_s=900, extra_args=ARGS)
        mover = threading.Thread(target=_slow_down_after_epoch_1, args=(cg, h.netns, wd / "runs",
                                                                        {p.name for p in (wd / "runs").iterdir()}, moved, stop))
        mover.start()
        try:
            slowed = launch(wd, hosts=inv, config="cpu-demo", runs=1, seed=1, timeout_s=1200, extra_args=ARGS)
        finally:
            stop.set()
            mover.join()
        throttled = _throttled(cg)
    # host b's rank itself was in the cgroup, and the kernel really held it back
    assert moved and moved[0][0] >= 2 and moved[0][1] and throttled > 0, (moved, throttled)

    fair_check = compliance.check(fair.run_dir, slow_host_threshold=0.6)
    fair_health = fair_check.health
    assert {x["host"] for x in fair_health["hosts"]} == {here, "rn50-node-b"}
    print(f"fair: {fair_health['verdict']}: " + ", ".join(f"{x['host']} {x['own_img_per_s_per_gpu']:.1f}" for x in fair_health["hosts"]))
    assert fair_health["slowest_host"] is None, fair_health["verdict"]
    first = nightly.run_nightly(fair.results, base, tolerance_accuracy=1.0, host_drop=0.6)
    assert first.verdict == "no-baseline" and set(first.performance["hosts"]) == {here, "rn50-node-b"}

    slow_check = compliance.check(slowed.run_dir, slow_host_threshold=0.6)
    hs = slow_check.health
    print(f"slowed: {hs['verdict']}")
    assert hs["slowest_host"] == "rn50-node-b", hs["verdict"]
    assert hs["verdict"].startswith("slow host: rn50-node-b at ")
    assert "rn50-node-b" in Path(slow_check.out_dir, "health.md").read_text()
    assert "## Cluster health" in Path(slow_check.report_md).read_text()
    own = {x["host"]: x["own_img_per_s_per_gpu"] for x in hs["hosts"]}
    assert own["rn50-node-b"] < 0.4 * own[here]

    second = nightly.run_nightly(slowed.results, base, tolerance_accuracy=1.0, host_drop=0.6)
    print(f"nightly: {second.reason}")
    assert second.failed and second.verdict == "regressed"
    # Only the slowed host: this one may be slower too when the machine's load rose, but not behind its peer.
    dropped = [f for f in second.failures if f.startswith("host ")]
    assert len(dropped) == 1 and dropped[0].startswith("host rn50-node-b dropped: "), second.failures
    assert "rn50-node-b" in second.reason
