"""The launcher contract's conformance suite: the same test functions on every backend (tasks/launch).

A backend is parametrised here once: `ssh` (horovodrun over a real sshd on a second host: a network namespace
with its own hostname, tests/sshd_hosts.py) and `slurm` (a real two-node Slurm, tests/slurm_cluster.py). Rank 1
runs on the second host/node in both. Ranks are tests/hvd_probe.py (a real Horovod allreduce, the rank
program's CLI) except in the real-training test. A third backend must pass this list as it is.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from helpers import fake_recordio, missing
from tasks.common import StageError, TransientError
from tasks.train import train
from tests import slurm_cluster as slurm_env
from tests import sshd_hosts

PROBE = [sys.executable, str(Path(__file__).with_name("hvd_probe.py"))]
ROOT = Path(__file__).resolve().parent.parent
RN50 = Path(sys.executable).with_name("rn50")
pytestmark = [pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def ssh_host(tmp_path_factory):
    why = sshd_hosts.missing_requirements()
    if why:
        missing(f"cannot make a second host here: {why}")
    with sshd_hosts.netns_host(tmp_path_factory.mktemp("hostb"), hostname="rn50-node-b") as h:
        yield h


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = slurm_env.missing_requirements(two_nodes=True)
    if why:
        missing(f"no Slurm cluster here: {why}")
    with slurm_env.slurm_cluster(tmp_path_factory.mktemp("slurm"), second_node=True) as c:
        yield c


class Ssh:
    name = "ssh"

    def __init__(self, host):
        self.host = host

    def doc(self, slots: int = 1, **keys) -> dict:
        h = self.host
        return {**keys, "hosts": [{"host": h.local_addr, "slots": slots, "interface": h.iface},
                                  h.inventory_entry(slots=slots)]}

    def jobs(self) -> list[str]:
        return []

    def hostile(self) -> list[tuple[dict, str]]:
        return [({"hosts": [{"host": "-oProxyCommand=touch /tmp/rn50-pwned", "slots": 2}]}, "hosts[0].host"),
                ({"launcher": "sssh", "hosts": [{"host": "a", "slots": 2}]}, "launcher must be one of ssh, slurm")]


class Slurm:
    name = "slurm"

    def __init__(self, cluster):
        self.cluster = cluster

    def doc(self, slots: int = 1, slurm: dict | None = None, **keys) -> dict:
        return {**keys, "launcher": "slurm", "slurm": {"partition": "debug", "nodes": 2, "ntasks_per_node": slots,
                                                       "time": "30", "poll_s": 0.5, **(slurm or {})}}

    def jobs(self) -> list[str]:
        return self.cluster.squeue()

    def hostile(self) -> list[tuple[dict, str]]:
        # Every spelling sbatch would read as an option the launcher decides, including an unambiguous prefix.
        refused = ["--export=ALL", "--export-file=/proc/self/environ", "--exp=ALL", "--nodes=1", "--ntasks=9",
                   "--ntasks-per-node=4", "--partition=maint", "--time=9999", "--output=/tmp/x", "--error=/tmp/x",
                   "--chdir=/", "--uid=0", "--gid=0", "--wrap=id", "--array=1-3", "--hold", "--qo=high",
                   "-w", "--Export=ALL", "--export"]
        return [(self.doc(slurm={"extra_args": [a]}), "slurm.extra_args") for a in refused]


@pytest.fixture(params=["ssh", "slurm"])
def backend(request, monkeypatch):
    if request.param == "ssh":
        yield Ssh(request.getfixturevalue("ssh_host"))
        return
    cluster = request.getfixturevalue("slurm")
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    b = Slurm(cluster)
    yield b
    assert b.jobs() == [], "a job was left in the queue"


@pytest.fixture
def wd(tmp_path):
    return fake_recordio(tmp_path / "wd", 1 << 20)


def _status(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "status.json").read_text())


def _wait_for(pred, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {timeout} s")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _rank_pids(pids: Path, n: int = 2) -> list[int]:
    files = sorted(pids.glob("rank*.pid"))
    return len(files) == n and all(f.read_text() for f in files) and [int(f.read_text()) for f in files]


def _sleeping(backend, pids: Path, **env) -> dict:
    return backend.doc(env={"PROBE_SLEEP": "300", "PROBE_PIDFILE_DIR": str(pids), **env})


# --- what every backend must do --------------------------------------------------------------------------


def test_success_real_training_passes_the_4_0_0_checker(backend, tmp_path, caplog):
    """python -m rn50.train, cut down to converge in a minute, rank 1 on the second host; the official checker
    accepts result_0.txt; status.json says success. The stage log (what the flow run's Logs tab shows) carries the
    lines a person reads (epochs, evals), not the MLPerf log's JSON, which stays whole in the rank log."""
    from rn50.tinydata import make_recordio
    from tasks import compliance

    caplog.set_level("INFO", logger="tasks.train")
    wd = tmp_path / "wd"
    make_recordio(wd / "recordio", classes=4, train_per_class=24, val_per_class=8, seed=0, work=tmp_path / "img")
    res = train(wd, hosts=backend.doc(), config="cpu-demo", runs=1, seed=7, timeout_s=1200,
                extra_args=["--set", "depth=[1,1,1,1]", "--set", "batch_size=8", "--set", "global_batch_size=16",
                            "--set", "max_epochs=16"])
    run_dir = Path(res.run_dir)
    assert res.status == "success" and _status(run_dir)["status"] == "success" and res.np == 2
    assert (run_dir / "rank1_0.log").exists() and len(res.hosts) == 2
    r = compliance.check(run_dir, ruleset="4.0.0", dataset="synthetic", out_dir=tmp_path / "rep")
    assert r.logs_passed, r.logs[0].reason
    shown = [rec.getMessage() for rec in caplog.records if rec.name == "tasks.train" and rec.levelno >= 20]
    assert any("[run 0 rank 0] eval after epoch" in m for m in shown), shown[-20:]
    assert not any(":::MLLOG" in m for m in shown), [m for m in shown if ":::MLLOG" in m][:3]
    assert ":::MLLOG" in (run_dir / "rank0_0.log").read_text()


_LAUNCHER = r"""
import json, logging, sys
sys.path.insert(0, sys.argv[1])
logging.basicConfig(level=logging.INFO, format="%(message)s")
from tasks import train
train.cancel_on_sigterm()
train.train(sys.argv[2], hosts=json.loads(sys.argv[3]), entry=json.loads(sys.argv[4]), timeout_s=300)
"""


def _start_launcher(wd: Path, doc: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(ROOT), str(wd), json.dumps(doc), json.dumps(PROBE)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_of_the_launcher_cancels_every_rank_and_job(backend, wd, tmp_path):
    """SIGTERM (or Ctrl-C) of the process running the stage is a cancel: every rank and job gone within 30 s,
    status `cancelled` (with its marker), exit 143, never a retryable failure."""
    pids = tmp_path / "pids"
    pids.mkdir()
    proc = _start_launcher(wd, _sleeping(backend, pids))
    try:
        rank_pids = _wait_for(lambda: _rank_pids(pids), 180, "two ranks running")
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
    _wait_for(lambda: not any(_alive(p) for p in rank_pids) and not backend.jobs(), 30 - (time.time() - t0),
              "every rank and job gone")
    (run_dir,) = (wd / "runs").iterdir()
    assert _status(run_dir)["status"] == "cancelled" and (run_dir / "CANCELLED").exists()
    assert "cancelled (SystemExit)" in out


def _tether_of(pid: int) -> int:
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"tasks.tether" in argv and str(pid).encode() in argv:
                return int(d.name)
    raise AssertionError(f"no tether for pid {pid}")


@pytest.mark.parametrize("tether", ["alive", "killed too", "killed too, the launcher while stopping"])
def test_kill_9_of_the_launcher_leaves_no_rank_or_job_and_the_next_run_completes(backend, wd, tmp_path, tether):
    """kill -9 of the launching process: its tether stops the ranks and cancels the job; if the tether was killed
    too, the next run finds the attempt its dead launcher left `running`, stops what its recorded handle names
    before it takes the cluster, marks it `aborted`, and completes. A launcher killed while it stops the ranks of a
    cancel (as Prefect does 30 s after its SIGTERM) has already written `cancelled`: the next run finishes the
    stop and the attempt stays `cancelled`."""
    stopping = tether.endswith("while stopping")
    pids = tmp_path / "pids"
    pids.mkdir()
    # Ranks that ignore SIGTERM keep the launcher's stop going until its SIGKILL: the kill lands inside it.
    proc = _start_launcher(wd, _sleeping(backend, pids, **({"PROBE_IGNORE_TERM": "1"} if stopping else {})))
    try:
        rank_pids = _wait_for(lambda: _rank_pids(pids), 180, "two ranks running")
        (run_dir,) = (wd / "runs").iterdir()
        if backend.name == "slurm":
            _wait_for(lambda: _status(run_dir).get("handle", {}).get("job_id"), 30, "the job id recorded")
        if tether != "alive":
            os.kill(_tether_of(proc.pid), signal.SIGKILL)
        if stopping:
            proc.send_signal(signal.SIGTERM)
            _wait_for(lambda: _status(run_dir).get("stopping"), 60, "the cancel recorded before the stop")
        proc.kill()
        proc.communicate(timeout=30)
        if tether == "alive":
            _wait_for(lambda: not any(_alive(p) for p in rank_pids) and not backend.jobs(), 30,
                      "every rank and job gone")
        # The launcher died before its last word: `running`, or `cancelled` with its stop under way.
        assert _status(run_dir)["status"] == ("cancelled" if stopping else "running")
        slot_taken = []

        @contextlib.contextmanager
        def slot():
            slot_taken.append(backend.jobs())  # what was still queued when the next run took the cluster
            yield None

        res = train(wd, hosts=backend.doc(), entry=PROBE, timeout_s=300, slot=slot)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert res.status == "success" and slot_taken == [[]]
    final = _status(run_dir)
    if stopping:
        assert final["status"] == "cancelled" and (run_dir / "CANCELLED").exists() and "stopping" not in final
        assert "died while stopping it; the next attempt stopped what it left" in final["error"], final["error"]
    else:
        assert final["status"] == "aborted" and (run_dir / "ABORTED").exists()
    _wait_for(lambda: not any(_alive(p) for p in rank_pids), 30, "the dead launcher's ranks gone")


def test_a_killed_rank_is_transient_and_the_retry_succeeds(backend, wd, tmp_path, monkeypatch):
    """A rank killed by a signal (an OOM kill) fails the attempt as TransientError naming the rank (over ssh the
    launcher sees the rank's ssh session end with it, exit 255); the retry
    Prefect makes (a second call) succeeds in a fresh run dir. No file under the work dir holds the worker's
    environment (each rank of the retry prints its whole environment into its log)."""
    secret = "rn50-worker-secret-" + secrets.token_hex(4)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("PREFECT_API_KEY", secret)
    pids = tmp_path / "pids"
    pids.mkdir()

    def killer():
        rank_pids = _wait_for(lambda: _rank_pids(pids), 180, "two ranks running")
        os.kill(rank_pids[1], signal.SIGKILL)

    t = threading.Thread(target=killer)
    t.start()
    with pytest.raises(TransientError) as e:
        train(wd, hosts=_sleeping(backend, pids), entry=PROBE, timeout_s=300)
    t.join()
    assert re.search(r"rank 1 on \S+ failed first \((killed by signal 9|exit 255: the ssh session died with the "
                     r"rank)\)", str(e.value)), str(e.value)
    (failed,) = (wd / "runs").iterdir()
    assert _status(failed)["status"] == "failed" and (failed / "FAILED").exists()
    ok = train(wd, hosts=backend.doc(env={"PROBE_PRINT_ENV": "1"}), entry=PROBE, timeout_s=300)
    assert ok.status == "success" and Path(ok.run_dir) != failed
    assert "PROBE env " in (Path(ok.run_dir) / "rank1_0.log").read_text()
    for p in wd.rglob("*"):
        if p.is_file():
            assert secret.encode() not in p.read_bytes(), f"{p} holds the worker's environment"


def test_a_rank_that_raises_is_a_deterministic_one_line_failure(backend, wd):
    with pytest.raises(StageError) as e:
        train(wd, hosts=backend.doc(env={"PROBE_FAIL_RANK": "1"}), entry=PROBE, timeout_s=300)
    assert not isinstance(e.value, TransientError)
    msg = str(e.value)
    assert re.match(r"run 0: .*rank 1 on \S+ failed first \(.*\): RuntimeError: probe rank 1 failed on purpose$",
                    msg), msg
    (run_dir,) = (wd / "runs").iterdir()
    assert _status(run_dir)["status"] == "failed"


def _nothing_started(wd: Path, backend, jobs_before: int) -> None:
    assert not (wd / "runs").exists()
    if backend.name == "slurm":
        assert len(re.findall(r"_slurm_rpc_submit_batch_job", backend.cluster.ctld_log.read_text())) == jobs_before


def _submitted(backend) -> int:
    return len(re.findall(r"_slurm_rpc_submit_batch_job", backend.cluster.ctld_log.read_text())) \
        if backend.name == "slurm" else 0


def test_config_error_is_exit_2_one_line_nothing_started(backend, wd, tmp_path):
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text(yaml.safe_dump(backend.doc()))
    before = _submitted(backend)
    r = subprocess.run([str(RN50), "train", str(wd), "--hosts", str(hosts), "--config", "cpu-demoo"],
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "no training config 'cpu-demoo'" in lines[0], r.stderr
    _nothing_started(wd, backend, before)


def test_slots_other_than_the_configs_ranks_are_refused_before_anything(backend, wd):
    before = _submitted(backend)
    with pytest.raises(StageError) as e:
        train(wd, hosts=backend.doc(slots=2), entry=PROBE, timeout_s=300)
    msg = str(e.value)
    assert msg.startswith("preflight: ") and "4 slot(s), but config 'cpu-demo' needs exactly 2 rank(s)" in msg, msg
    _nothing_started(wd, backend, before)


def test_a_hostile_hosts_file_is_refused_in_one_line_before_anything(backend, wd, tmp_path):
    before = _submitted(backend)
    cases = backend.hostile() + [
        (backend.doc(env_profile="/proc/self/environ"), "is not a regular configuration file"),
        (backend.doc(env_profile="../../etc/passwd"), "is not a profile name"),
        (backend.doc(env={"X;id": "1"}), "env key"),
    ]
    for doc, needle in cases:
        with pytest.raises(StageError) as e:
            train(wd, hosts=doc, entry=PROBE, timeout_s=300)
        assert needle in str(e.value) and "\n" not in str(e.value), (doc, str(e.value))
    _nothing_started(wd, backend, before)
    assert not Path("/tmp/rn50-pwned").exists()


def test_a_lost_cluster_slot_stops_the_run_as_lost_slot(backend, wd, tmp_path):
    """The cluster lease ends under a running attempt (the server expired or revoked it): every rank and job is
    stopped at once and the attempt is `lost-slot`, a transient failure, never a silent second holder."""
    pids = tmp_path / "pids"
    pids.mkdir()
    lease = SimpleNamespace(lost=threading.Event())

    @contextlib.contextmanager
    def slot():
        yield lease

    def revoke():
        _wait_for(lambda: _rank_pids(pids), 180, "two ranks running")
        lease.lost.set()

    t = threading.Thread(target=revoke)
    t.start()
    t0 = time.time()
    with pytest.raises(TransientError, match="cluster slot was lost"):
        train(wd, hosts=_sleeping(backend, pids), entry=PROBE, timeout_s=300, slot=slot)
    t.join()
    assert time.time() - t0 < 240
    rank_pids = [int(p.read_text()) for p in pids.glob("rank*.pid")]
    _wait_for(lambda: not any(_alive(p) for p in rank_pids) and not backend.jobs(), 30, "every rank and job gone")
    (run_dir,) = (wd / "runs").iterdir()
    assert _status(run_dir)["status"] == "lost-slot" and (run_dir / "LOST-SLOT").exists()
