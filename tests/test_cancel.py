"""Cancel, crash, kill: a stopped run never wedges the next one and never leaves ranks running.

Real components: a local Prefect server and worker (flows/local.py), real horovodrun and rn50.train ranks,
`rn50 run` as a user starts it, and a real SeaweedFS S3 server for the transient-failure case.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import RN50, ROOT
from flows.local import PREFECT

pytestmark = pytest.mark.slow


def procs_of(wd: Path) -> list[tuple[int, str]]:
    """Processes whose command line names the work dir: horovodrun and the ranks of a run in it."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(wd) in cmd and ("rn50.train" in cmd or "horovod" in cmd):
            out.append((int(d.name), cmd[:160]))
    return out


def alive(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(pid)
    return out


def wait_for(what: str, check, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def two_ranks(procs: list[tuple[int, str]]) -> bool:
    """At least two rank processes (not horovodrun) among `procs_of(wd)`."""
    return sum("rn50.train" in c and "horovod" not in c for _, c in procs) >= 2


def wait_for_ranks(wd: Path, proc: subprocess.Popen | None = None, timeout: float = 400) -> list[tuple[int, str]]:
    def ranks():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before training started:\n"
                                 f"{proc.stderr.read()[-3000:] if proc.stderr else ''}")
        found = procs_of(wd)
        return found if two_ranks(found) else None

    return wait_for("2 training ranks running", ranks, timeout)


def wait_for_first_epoch(wd: Path, proc: subprocess.Popen) -> None:
    """Both ranks of the newest attempt alive and past their first epoch: the kill lands inside the epoch loop,
    with the stage lock and the cluster slot held (a kill between a failed attempt and its 2 s-later retry, should
    a rank die at start-up, would find neither)."""
    def trained_an_epoch():
        newest = sorted(d for d in (wd / "runs").iterdir() if d.is_dir())[-1]
        log = newest / "rank0_0.log"
        return (not (newest / "FAILED").exists() and log.is_file()
                and '"key": "epoch_stop"' in log.read_text(errors="replace")
                and two_ranks(procs_of(wd)))

    wait_for_ranks(wd, proc)
    wait_for("an attempt past its first epoch, both ranks alive", trained_an_epoch, 400)


@pytest.fixture(scope="module")
def demo_source(tmp_path_factory) -> Path:
    from tasks.synth import synthesize

    out = tmp_path_factory.mktemp("demo-synth")
    synthesize(out)
    return out


# --- locks ----------------------------------------------------------------------------------------


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_a_lock_whose_holder_died_is_broken_with_one_log_line(tmp_path, caplog):
    from flows.locks import LiveLockManager, boot_id, pid_namespace, process_start_time

    locks = LiveLockManager(tmp_path)
    dead = _dead_pid()
    (tmp_path / "k.lock").write_text(json.dumps({
        "holder": "someone", "expiration": time.time() + 3600, "host": os.uname().nodename,
        "boot_id": boot_id(), "pid_ns": pid_namespace(), "pid": dead, "pid_start": "1"}))
    t0 = time.monotonic()
    with caplog.at_level("WARNING"):
        assert locks.acquire_lock("k", holder="me", acquire_timeout=10)
    assert time.monotonic() - t0 < 5
    assert [r.message for r in caplog.records if "stale lock" in r.message] == [
        f"broke the stale lock k.lock: its holder (pid {dead} on {os.uname().nodename}) is gone"]
    assert json.loads((tmp_path / "k.lock").read_text())["pid"] == os.getpid()
    locks.release_lock("k", "me")
    assert not (tmp_path / "k.lock").exists()

    # A live holder keeps its lock: the waiter times out instead of breaking it.
    assert locks.acquire_lock("k", holder="first")
    other = LiveLockManager(tmp_path)
    assert not other.acquire_lock("k", holder="second", acquire_timeout=1.5)
    assert json.loads((tmp_path / "k.lock").read_text())["holder"] == "first"
    assert process_start_time(os.getpid()) == json.loads((tmp_path / "k.lock").read_text())["pid_start"]


def test_prefects_own_never_expiring_lock_is_broken_once_unrenewed(tmp_path):
    from flows.locks import LiveLockManager

    lock = tmp_path / "k.lock"
    lock.write_text('{"holder": "x", "expiration": null}')  # what FileSystemLockManager writes
    locks = LiveLockManager(tmp_path, hold_s=2)
    assert not locks.acquire_lock("k", holder="me", acquire_timeout=0.5)  # fresh: maybe still held
    old = time.time() - 10
    os.utime(lock, (old, old))
    assert locks.acquire_lock("k", holder="me", acquire_timeout=2)


def test_a_held_lock_is_renewed_and_expires_when_its_holder_stops_renewing(tmp_path):
    from flows.locks import LiveLockManager

    locks = LiveLockManager(tmp_path, hold_s=1.5, renew_s=0.3)
    assert locks.acquire_lock("k", holder="me")
    first = json.loads((tmp_path / "k.lock").read_text())["expiration"]
    time.sleep(2.5)
    assert json.loads((tmp_path / "k.lock").read_text())["expiration"] > first + 1  # renewed
    assert LiveLockManager(tmp_path).stale_reason("k") is None
    # A holder on another host (no pid to check) that stopped renewing: stale after hold_s.
    rec = json.loads((tmp_path / "k.lock").read_text())
    locks.release_lock("k", "me")
    (tmp_path / "j.lock").write_text(json.dumps({**rec, "host": "elsewhere", "expiration": time.time() - 1}))
    assert "stopped renewing" in LiveLockManager(tmp_path).stale_reason("j")


# --- retries: transient only ----------------------------------------------------------------------


def _env(server) -> dict[str, str]:
    return {**os.environ, **{k: v for k, v in server.env().items() if k.startswith(("PREFECT_", "RN50_"))}}


def _task_runs(server, flow_run_id: str) -> list:
    code = ("import json,sys; from flows.cli import task_runs; "
            "print(json.dumps([{'name': t.name, 'state': t.state.name, 'run_count': t.run_count} "
            "for t in task_runs(sys.argv[1])]))")
    out = subprocess.run([sys.executable, "-c", code, flow_run_id], env=_env(server), cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_md5_mismatch_fails_at_once_without_a_retry(prefect_server, demo_source, tmp_path):
    bad = tmp_path / "src"
    bad.mkdir()
    for p in demo_source.iterdir():
        (bad / p.name).symlink_to(p)
    (bad / "MD5SUMS").unlink()
    lines = (demo_source / "MD5SUMS").read_text().splitlines()
    lines = [("0" * 32 + line[32:]) if "devkit" in line else line for line in lines]
    (bad / "MD5SUMS").write_text("\n".join(lines) + "\n")
    wd = tmp_path / "wd"
    proc = subprocess.run([RN50, "run", str(bad), str(wd), "--json"], env=_env(prefect_server), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    out = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    assert proc.returncode != 0 and out["stages"]["fetch"] == "Failed", out
    [fetch] = [t for t in _task_runs(prefect_server, out["flow_run_id"]) if t["name"].startswith("fetch")]
    assert fetch["run_count"] == 1, fetch
    assert "Retry" not in proc.stdout + proc.stderr
    assert "MD5 mismatch" in proc.stdout + proc.stderr
    assert [p.name for p in (wd / "raw" / "rejected").iterdir() if "devkit" in p.name]


FETCH_FROM_S3 = """
import sys
from prefect import flow
from flows import stages

@flow(name="fetch-only")
def fetch_only(source, wd, md5_file):
    return stages.fetch("transient-test-" + sys.argv[4], wd, source=source, md5_file=md5_file)

print(fetch_only(sys.argv[1], sys.argv[2], sys.argv[3]))
"""


def test_a_transient_s3_outage_during_fetch_is_retried_and_completes(prefect_server, demo_source, tmp_path):
    from s3_server import SeaweedS3

    with SeaweedS3(tmp_path / "s3") as s3:
        client = s3.client()
        client.create_bucket(Bucket="data")
        for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"):
            client.upload_file(str(demo_source / name), "data", f"in/{name}")
        s3.stop()
        env = {**_env(prefect_server), **s3.env()}
        proc = subprocess.Popen([sys.executable, "-c", FETCH_FROM_S3, "s3://data/in", str(tmp_path / "wd"),
                                 str(demo_source / "MD5SUMS"), str(time.time_ns())],
                                env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            from prefect.client.orchestration import get_client  # noqa: F401 - ensures the client imports

            def awaiting_retry():
                code = ("import sys; from prefect.client.orchestration import get_client\n"
                        "from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName\n"
                        "with get_client(sync_client=True) as c:\n"
                        "    trs = c.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_='fetch')))\n"
                        "    print(' '.join(t.state.name for t in trs if t.state))")
                r = subprocess.run([sys.executable, "-c", code], env=_env(prefect_server), cwd=ROOT,
                                   capture_output=True, text=True, timeout=60)
                return "AwaitingRetry" in r.stdout or "Retrying" in r.stdout

            wait_for("fetch failed and awaits its retry", awaiting_retry, 120)
            s3.start()
            output, _ = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert "Retry 1/2" in output, output[-3000:]
    for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"):
        assert (tmp_path / "wd" / "raw" / name).stat().st_size == (demo_source / name).stat().st_size


# --- cancel through the worker ---------------------------------------------------------------------


def _flow_run_state(server, flow_run_id: str) -> str:
    code = ("import sys; from prefect.client.orchestration import get_client\n"
            "with get_client(sync_client=True) as c: print(c.read_flow_run(sys.argv[1]).state.name)")
    r = subprocess.run([sys.executable, "-c", code, flow_run_id], env=_env(server), cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    return r.stdout.strip()


def _start_deployment(server, name: str, **params) -> str:
    """`prefect deployment run rn50/<name>` as an operator types it, not waiting for the run: its id."""
    started = server.run_deployment(name, *[f"{k}={v}" for k, v in params.items()], timeout_s=60, watch=False)
    assert started.returncode == 0, started.stderr[-2000:]
    return next(line.split()[-1] for line in started.stdout.splitlines() if "UUID" in line)


def test_cancel_during_training_stops_every_rank_and_the_next_run_completes(prefect_server, demo_source, tmp_path):
    wd = tmp_path / "wd"
    flow_run_id = _start_deployment(prefect_server, "train", source=demo_source, workdir=wd)

    ranks = wait_for_ranks(wd)
    # Cancel inside the epoch loop: the rank processes exist a few seconds before MXNet has imported.
    wait_for("rank 0 in its first epoch", lambda: any('"key": "epoch_start"' in log.read_text(errors="replace")
                                                      for log in wd.glob("runs/*/rank0_0.log")), 120)
    cancel = subprocess.run([PREFECT, "flow-run", "cancel", flow_run_id], env=_env(prefect_server), cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    t0 = time.monotonic()
    wait_for("no horovodrun or rank of the cancelled run", lambda: not alive(p for p, _ in procs_of(wd))
             and not alive(p for p, _ in ranks), 30)
    assert time.monotonic() - t0 <= 30
    assert wait_for("flow run Cancelled", lambda: _flow_run_state(prefect_server, flow_run_id) == "Cancelled", 90)

    trains = [t for t in _task_runs(prefect_server, flow_run_id) if t["name"].startswith("train")]
    assert len(trains) == 1 and trains[0]["run_count"] == 1, trains  # never retried
    [attempt] = [d for d in (wd / "runs").iterdir() if d.is_dir()]
    status = json.loads((attempt / "status.json").read_text())
    assert status["status"] == "cancelled", f"status.json {status}; the worker's log ends:\n" + "\n".join(
        (prefect_server.home / "worker.log").read_text(errors="replace").splitlines()[-40:])
    assert (attempt / "CANCELLED").is_file() and list(attempt.glob("rank*_0.log"))  # logs kept

    again = prefect_server.run_deployment("train", *[f"{k}={v}" for k, v in
                                                     (("source", demo_source), ("workdir", wd))], timeout_s=900)
    assert again.returncode == 0 and "Completed" in again.stdout, again.stdout[-3000:] + again.stderr[-2000:]


# --- kill -9 of `rn50 run` ------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def test_sigkill_of_rn50_run_leaves_no_orphan_and_a_rerun_completes(demo_source, tmp_path):
    """`rn50 run` without PREFECT_API_URL: the Prefect server it starts for the run is one of its processes, and
    the rerun must get the cluster slot the killed run held (released by the rerun, which finds its holder gone)."""
    wd = tmp_path / "wd"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    proc = subprocess.Popen([RN50, "run", str(demo_source), str(wd), "--json"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_first_epoch(wd, proc)
        family = _descendants(proc.pid) + [p for p, _ in procs_of(wd)]
        assert any("server\0start" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
                   for p in alive(family)), "the run's Prefect server was expected among its processes"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        wait_for("every process `rn50 run` started is gone", lambda: not alive(family) and not procs_of(wd), 30)
    finally:
        if proc.poll() is None:
            proc.kill()
    rerun = subprocess.run([RN50, "run", str(demo_source), str(wd), "--json"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=900)
    out = json.loads([ln for ln in rerun.stdout.splitlines() if ln.startswith("{")][-1])
    assert rerun.returncode == 0 and out["state"] == "Completed", rerun.stderr[-3000:]
    assert out["stages"]["train"] == "Completed"
    assert "broke the stale lock rn50-train-" in rerun.stdout + rerun.stderr
    # The killed attempt was left `running`; the rerun found its launcher gone and marked it.
    assert "was left running by a launcher that died" in rerun.stdout + rerun.stderr, rerun.stdout[-3000:]
    statuses = [json.loads(p.read_text())["status"] for p in (wd / "runs").glob("*/status.json")]
    assert "aborted" in statuses and "success" in statuses and "running" not in statuses, statuses
    # ... and took over the killed run's cluster slot at once rather than after its lease (flows/cluster.py).
    assert "released the cluster slot held by pid " in rerun.stdout + rerun.stderr
    # Every log reached the run's own server before it was stopped (else Prefect retries for a minute at exit).
    assert "Error logging to API" not in rerun.stderr, rerun.stderr[-3000:]


# --- a worker that dies with its machine ----------------------------------------------------------


def test_a_dead_worker_leaves_a_crashed_run_and_the_next_run_completes_from_cache(prefect_server, demo_source,
                                                                                   tmp_path):
    """The worker, the flow-run process and everything below them die at once (a machine crash): heartbeats stop,
    the rn50-crash-zombie-runs automation marks the run Crashed, and `rn50/full` afterwards completes from the
    cached data stages (the dead holder's stage lock is broken, its cluster slot repossessed)."""
    import psutil

    wd = tmp_path / "wd"
    flow_run_id = _start_deployment(prefect_server, "full", source=demo_source, workdir=wd)
    ranks = wait_for_ranks(wd)

    worker = psutil.Process(int((prefect_server.home / "pids" / "worker").read_text()))
    machine = [worker] + worker.children(recursive=True) + [psutil.Process(p) for p, _ in ranks]
    for proc in machine:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    wait_for("the worker, its flow run and the ranks dead", lambda: not alive(p.pid for p in machine), 30)
    state = wait_for("the run marked Crashed", lambda: _flow_run_state(prefect_server, flow_run_id) == "Crashed", 240,
                     every=5)
    assert state

    prefect_server.up()  # a new worker, as after the machine's reboot
    again = prefect_server.run_deployment("full", f"source={demo_source}", f"workdir={wd}", timeout_s=900)
    assert again.returncode == 0 and "Completed" in again.stdout, again.stdout[-3000:] + again.stderr[-2000:]
    rerun_id = next(line.split()[-1] for line in again.stdout.splitlines() if "UUID" in line)
    states = {t["name"].rsplit("-", 1)[0]: t["state"] for t in _task_runs(prefect_server, rerun_id)}
    assert all(states[s] == "Cached" for s in ("fetch", "verify", "pack")), states
    assert states["train"] == "Completed", states
