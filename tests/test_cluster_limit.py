"""One timed run per cluster at a time: the train stage's launch holds a slot of the Prefect global concurrency
limit `rn50-cluster`, so a second flow run waits (and says so) until the first releases it.

Real components: a local Prefect server (flows/local.py) and two flow-run processes started together. The
launch itself is replaced by a sleep that records when it held the cluster: what is under test is the slot,
not training (the real train stage runs inside `cluster_slot` — see flows/cluster.py, flows/stages.py `_train` and the flow tests).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from test_cancel import wait_for

pytestmark = pytest.mark.slow

HOLD = """
import json, os, sys, time
from prefect import flow
from flows.cluster import cluster_slot

@flow(name="hold-cluster")
def hold(limit: str, seconds: float, until: str = "") -> dict:
    with cluster_slot(limit):
        start = time.time()
        time.sleep(seconds)
        while until and not os.path.exists(until):  # then until the test lets go (bounded by its timeout)
            time.sleep(0.05)
        return {"start": start, "end": time.time()}

print("RESULT " + json.dumps(hold(sys.argv[1], float(sys.argv[2]), *sys.argv[3:])))
"""
WAITING, OURS = "waiting for the cluster (global concurrency limit 'rn50-cluster-test')", "the cluster is ours (waited"


@pytest.fixture(scope="module")
def server(bare_prefect_server):
    return bare_prefect_server


def test_two_runs_against_one_cluster_take_turns(server, tmp_path):
    """Two runs started together. The one that gets the cluster holds it until the other has been waiting for
    2 s (the test then creates the file it waits for), so they contend however long each start-up takes."""
    env = {**os.environ, **{k: v for k, v in server.env().items() if k.startswith("PREFECT_")}}
    release, logs = tmp_path / "release", [tmp_path / f"run-{i}.log" for i in range(2)]
    procs = []
    for log in logs:
        with open(log, "w") as f:
            procs.append(subprocess.Popen([sys.executable, "-c", HOLD, "rn50-cluster-test", "0", str(release)],
                                          env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True))
    try:
        waiting_since: list[float] = []

        def other_waited_2_s() -> bool:
            texts = [log.read_text() for log in logs]
            assert all(p.poll() is None for p in procs), texts
            held = [OURS in t for t in texts]
            assert held.count(True) < 2, texts  # both on the cluster at once
            if held.count(True) == 1 and WAITING in texts[held.index(False)]:
                waiting_since[:] = waiting_since or [time.monotonic()]
                return time.monotonic() - waiting_since[0] >= 2
            return False

        wait_for("one run holding the cluster while the other waits", other_waited_2_s, 300, every=0.1)
        release.touch()
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outs = [log.read_text() for log in logs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    spans = [json.loads(next(line[7:] for line in o.splitlines() if line.startswith("RESULT "))) for o in outs]
    spans.sort(key=lambda s: s["start"])
    assert spans[1]["start"] >= spans[0]["end"] - 0.5, spans  # never both on the cluster at once
    waited = [o for o in outs if WAITING in o]
    assert len(waited) == 2 and any(OURS in o and "waited 0 s" not in o and "waited 1 s" not in o for o in outs), outs

    # The limit was created with one slot, and both slots are free again.
    code = ("from prefect.client.orchestration import get_client\n"
            "with get_client(sync_client=True) as c:\n"
            "    l = c.read_global_concurrency_limit_by_name('rn50-cluster-test'); print(l.limit, l.active_slots)")
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["1", "0"], r.stdout + r.stderr


def test_a_killed_holder_s_slot_is_taken_over_at_once_on_its_machine(server):
    """SIGKILL of the run holding the cluster: the next run on this machine finds the recorded holder gone,
    releases its lease with one log line and starts in seconds, not after the 60 s lease."""
    import signal

    env = {**os.environ, **{k: v for k, v in server.env().items() if k.startswith("PREFECT_")}}
    first = subprocess.Popen([sys.executable, "-c", HOLD, "rn50-cluster-kill", "300"], env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:
            if "the cluster is ours" in line:
                break
        else:
            raise AssertionError(f"the first run never held the cluster (exit {first.wait()})")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    t0 = time.monotonic()
    second = subprocess.run([sys.executable, "-c", HOLD, "rn50-cluster-kill", "1"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    took = time.monotonic() - t0
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert f"released the cluster slot held by pid {first.pid} on " in out, out[-3000:]
    assert took < 40, f"the second run took {took:.0f} s: it waited for the lease to end ({out[-2000:]})"


JOB_ARTIFACT = """
from prefect import flow
from flows.stages import job_reporter

@flow(name="slurm-job-artifact")
def report():
    on_handle = job_reporter()
    on_handle({"job_id": "4242"})
    on_handle({"job_id": "4242", "job_state": "PENDING"})
    on_handle({"job_id": "4242", "job_state": "PENDING"})
    on_handle({"job_id": "4242", "job_state": "RUNNING"})
    on_handle({"job_id": "4242", "job_state": "COMPLETED"})

report()
"""


def test_slurm_job_states_reach_the_stage_log_and_an_artifact(server):
    """The train stage hands this callback to the launcher's handle (tests/test_slurm.py drives it on a real
    cluster): each state change once, in the stage log and the artifact."""
    env = {**os.environ, **{k: v for k, v in server.env().items() if k.startswith("PREFECT_")}}
    r = subprocess.run([sys.executable, "-c", JOB_ARTIFACT], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "train: slurm job 4242 is RUNNING" in r.stdout + r.stderr
    code = ("import json\nfrom prefect.client.orchestration import get_client\n"
            "from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey\n"
            "with get_client(sync_client=True) as c:\n"
            "    a = c.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=['slurm-job'])))\n"
            "    print(json.dumps(a[0].data if isinstance(a[0].data, str) else json.dumps(a[0].data)))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(json.loads(out.stdout))
    assert [(row["job_id"], row["state"]) for row in rows] == [("4242", "PENDING"), ("4242", "RUNNING"),
                                                              ("4242", "COMPLETED")]


LOSE = """
import sys
from prefect import flow
from prefect.client.orchestration import get_client
from flows.cluster import cluster_slot

@flow(name="lose-cluster")
def lose(limit: str) -> None:
    with cluster_slot(limit, renew_s=1.0) as lease:
        with get_client(sync_client=True) as c:
            c.release_concurrency_slots_with_lease(lease.id)  # the server ends the lease, as when it expires
        print("LOST", lease.lost.wait(60))

lose(sys.argv[1])
"""


def test_a_lease_the_server_ended_is_reported_lost(server):
    """The server ends the holder's lease (expired, or revoked): the next renewal gets 410 Gone and the lease's
    `lost` event is set, which the train stage turns into stopping the run (`lost-slot`, see
    tests/test_launcher_conformance.py); before, the 410 was only logged and the run went on training."""
    env = {**os.environ, **{k: v for k, v in server.env().items() if k.startswith("PREFECT_")}}
    r = subprocess.run([sys.executable, "-c", LOSE, "rn50-cluster-lose"], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=180)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "LOST True" in out, out[-3000:]
    assert "has ended on the server (410 Gone)" in out, out[-3000:]
