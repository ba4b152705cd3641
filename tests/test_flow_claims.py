"""README claims about the flow, checked against a real local Prefect server (SQLite, loopback, no worker):

- the nightly deployment runs at 02:00 UTC: the schedule as the server stores it after a real
  `prefect deploy --all` of prefect.yaml, and the start times of the runs the server schedules from it;
- "keys are content, never path strings": the work dir moved with `mv` and the source copied elsewhere
  (the original removed), and every stage of the next `rn50 run` is Cached, its results naming the new
  work dir. Before cached results were rebased onto the current work dir (flows/stages.py), this run
  failed reading the result logs at the old work dir's path (FileNotFoundError) to key compliance; with
  the archive key holding the demo's `file://{workdir}/archive` as it is, the archive ran again.
"""
from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import rn50
from helpers import free_port, prefect_api, stop_group, trained_runs

pytestmark = pytest.mark.slow
PREFECT = str(Path(sys.executable).parent / "prefect")


def _api(server, method: str, path: str, body: dict | None = None):
    return prefect_api(server.api_url, method, path, body)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A local Prefect server with the `rn50` pool and every prefect.yaml deployment, and no worker: nothing
    the server schedules (the nightly) is ever picked up while the tests run."""
    from flows.local import LocalPrefect
    from tasks.paths import REPO

    home = tmp_path_factory.mktemp("prefect-home")
    server = LocalPrefect(home, free_port())
    with open(home / "server.log", "wb") as log:
        proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(server.port)],
                                env=server.env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not server.healthy():
            assert proc.poll() is None and time.monotonic() < deadline, (home / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        for argv in (["work-pool", "create", "rn50", "--type", "process"], ["deploy", "--all", "--no-prompt"]):
            done = subprocess.run([PREFECT, *argv], env=server.env(), cwd=REPO, capture_output=True, text=True,
                                  timeout=600)
            assert done.returncode == 0, f"prefect {' '.join(argv)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        yield server
    finally:
        stop_group(proc)


def test_nightly_deployment_runs_at_0200_utc(prefect_server):
    d = _api(prefect_server, "GET", "/deployments/name/rn50/nightly")
    [sched] = d["schedules"]
    assert sched["active"] is True
    assert (sched["schedule"]["cron"], sched["schedule"]["timezone"]) == ("0 2 * * *", "UTC"), sched
    # What the server makes of it: the runs it schedules start at 02:00:00 UTC on consecutive days.
    now = dt.datetime.now(dt.timezone.utc)
    _api(prefect_server, "POST", f"/deployments/{d['id']}/schedule",
         {"start_time": now.isoformat(), "end_time": (now + dt.timedelta(days=3)).isoformat(), "min_runs": 3})
    runs = _api(prefect_server, "POST", "/flow_runs/filter",
                {"flow_runs": {"deployment_id": {"any_": [d["id"]]}, "state": {"type": {"any_": ["SCHEDULED"]}}},
                 "sort": "EXPECTED_START_TIME_ASC", "limit": 3})
    starts = [dt.datetime.fromisoformat(r["expected_start_time"].replace("Z", "+00:00")) for r in runs]
    assert len(starts) == 3, runs
    assert all(s.astimezone(dt.timezone.utc).time() == dt.time(2, 0) for s in starts), starts
    assert [b - a for a, b in zip(starts, starts[1:])] == [dt.timedelta(days=1)] * 2, starts
    assert now < starts[0] <= now + dt.timedelta(days=1), (now, starts)
    # The other deployments are not scheduled.
    for name in ("full", "train"):
        assert not _api(prefect_server, "GET", f"/deployments/name/rn50/{name}")["schedules"], name


def _run_flow(server, source: Path, wd: Path) -> dict:
    env = {k: v for k, v in server.env().items() if k.startswith(("PREFECT_", "RN50_"))}
    proc = rn50("run", source, wd, "--json", env=env, timeout=1500)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON on stdout (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    out = json.loads(lines[-1])
    out["returncode"], out["stderr"], out["output"] = proc.returncode, proc.stderr[-4000:], proc.stdout + proc.stderr
    return out


def test_moved_workdir_and_copied_source_are_all_cached(prefect_server, tmp_path):
    from tasks.synth import synthesize

    src, wd = tmp_path / "a" / "source", tmp_path / "a" / "work"
    synthesize(src)
    first = _run_flow(prefect_server, src, wd)
    assert first["returncode"] == 0 and first["state"] == "Completed", first

    elsewhere = tmp_path / "b" / "c"
    elsewhere.mkdir(parents=True)
    subprocess.run(["mv", str(wd), str(elsewhere / "moved-work")], check=True)
    shutil.copytree(src, elsewhere / "source-copy")
    shutil.rmtree(src)  # nothing may still read the old places
    moved = elsewhere / "moved-work"
    again = _run_flow(prefect_server, elsewhere / "source-copy", moved)
    assert again["returncode"] == 0 and again["state"] == "Completed", again
    assert again["stages"] == {**dict.fromkeys(first["stages"], "Cached"), "container": "Skipped",
                               "distribute": "Skipped"}, again["stages"]
    # The cached results name the moved work dir: the flow's summary line points at the run and archive there.
    [line] = [ln for ln in again["output"].splitlines() if "time to train:" in ln]
    [run_dir] = trained_runs(moved)
    assert f"({run_dir}); archived to file://{moved}/archive" in line, line
    assert str(wd) not in again["output"], again["output"][-3000:]
