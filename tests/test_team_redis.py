"""Several workers on several machines, for real: one Prefect server on PostgreSQL (the compose server's
settings, tests/test_team_postgres.py), one Redis (Debian's redis-server, run as the compose service runs it),
and two workers that look like two machines — each in its own network namespace with its own hostname
(tests/sshd_hosts.py makes the hosts) and its own PREFECT_HOME, configured from the compose worker's team
settings — over one shared work dir path (one kernel here; a shared file system on a real team).

Proved, in order (the tests share the module's server and work dir):
  - two `rn50/full` runs at once, one per machine: every stage executes exactly once across both, the
    other run's is Cached, both complete; the cache records are in the shared directory, no file lock used;
  - `rn50/train` on the machine that did not run the data stages: fetch, verify, pack Cached, train runs;
  - the machine holding the pack lock is frozen and killed (every process of it, SIGKILL): the other
    machine's waiting run takes the lock over within the stated bound, with one line naming the dead
    holder, and completes; the pack output is whole;
  - Redis stopped while a run's pack computes: pack still records its result (its lock is surely its own for
    the hold bound), the next stage's error names Redis and is retried; Redis back: completed;
  - a third machine whose work dir path is not the shared file system: the run fails with one line.
Bounds are short here (RN50_LOCK_HOLD_S=20, RENEW_S=4); the defaults are 120 and 20.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, require, stop_group
from redis_server import PASSWORD as REDIS_PASSWORD, RedisServer
from sshd_hosts import missing_requirements, netns_host
from helpers import flow_run_logs
from test_team_postgres import AUTH, VENV_BIN, _call, _interpolate, postgres, prefect_on_postgres  # noqa: F401

pytestmark = pytest.mark.slow

HOLD, RENEW = 20.0, 4.0
STAGES = ("fetch", "verify", "pack", "train", "compliance", "archive")
DONE = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


class Team:
    def __init__(self, api: str, env: dict, shared: Path, redis: RedisServer, redis_host: str, base: Path):
        self.api, self.env, self.shared, self.redis, self.redis_host, self.base = api, env, shared, redis, redis_host, base
        self.workdir, self.source, self.checkout = shared / "work", shared / "synthetic", base / "checkout"
        self.hosts: dict[str, object] = {}
        self.workers: dict[str, subprocess.Popen] = {}
        self.deployments = {d["name"]: d["id"] for d in _call(api, "POST", "/deployments/filter", {})}

    def worker_env(self, name: str) -> dict:
        """The compose worker's team settings (and heartbeats, which the deployed automation watches), as this
        machine reaches the services."""
        worker = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["worker"]["environment"]
        team = {k: _interpolate(str(worker[k]), {"REDIS_PASSWORD": REDIS_PASSWORD})
                for k in ("RN50_REDIS_URL", "PREFECT_RESULTS_LOCAL_STORAGE_PATH", "PREFECT_FLOWS_HEARTBEAT_FREQUENCY")}
        team["RN50_REDIS_URL"] = team["RN50_REDIS_URL"].replace("@redis:6379/", f"@{self.redis_host}:{self.redis.port}/")
        team["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = team["PREFECT_RESULTS_LOCAL_STORAGE_PATH"].replace("/data/work", str(self.shared), 1)
        return {**self.env, **team, "PREFECT_HOME": str(self.base / f"home-{name}"), "PYTHONPATH": str(self.checkout),
                "RN50_PROJECT_DIR": str(self.checkout),
                "RN50_LOCK_HOLD_S": str(HOLD), "RN50_LOCK_RENEW_S": str(RENEW), "PREFECT_WORKER_QUERY_SECONDS": "1"}

    def start_worker(self, name: str, host, hide: Path | None = None) -> None:
        """The compose worker's command on queue `name`, inside `host`'s network namespace with its hostname
        (and `hide` under an empty tmpfs: a machine without the shared file system at that path)."""
        _call(self.api, "POST", "/work_pools/rn50/queues", {"name": name})
        cmd = [a for a in yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["worker"]["command"]
               if a != "--with-healthcheck"]
        cmd[0] = str(VENV_BIN / "prefect")
        cmd[cmd.index("--name") + 1] = f"worker-{name}"
        cmd += ["--work-queue", name]
        hosts = self.base / f"hosts-{name}"  # like any machine, it resolves its own name (Gloo looks it up)
        hosts.write_text(f"127.0.0.1 localhost\n{host.addr} {host.hostname}\n")
        setup = f"hostname {host.hostname} && mount --bind {hosts} /etc/hosts" + (
            f" && mount -t tmpfs rn50hide {hide}" if hide else "")
        argv = ["ip", "netns", "exec", host.netns, "unshare", "--uts", "--mount", "--propagation", "private",
                "sh", "-c", f'{setup} && exec "$0" "$@"', *cmd]
        with open(self.base / f"worker-{name}.log", "ab") as log:
            self.workers[name] = subprocess.Popen(argv, env=self.worker_env(name), cwd=self.checkout, stdout=log,
                                                  stderr=subprocess.STDOUT, start_new_session=True)
        self.hosts[name] = host

    def run(self, deployment: str, queue: str, **parameters) -> str:
        body = {"parameters": {"source": str(self.source), "workdir": str(self.workdir), **parameters},
                "work_queue_name": queue}
        return _call(self.api, "POST", f"/deployments/{self.deployments[deployment]}/create_flow_run", body)["id"]

    def flow_run(self, run_id: str) -> dict:
        return _call(self.api, "GET", f"/flow_runs/{run_id}")

    def wait(self, *run_ids: str, timeout: float = 900) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            runs = [self.flow_run(r) for r in run_ids]
            if all(r["state"]["type"] in DONE for r in runs):
                return runs
            if time.monotonic() > deadline:
                raise AssertionError(f"runs not done in {timeout} s: {[r['state'] for r in runs]}\n{self.worker_logs()}")
            time.sleep(1)

    def task_runs(self, run_id: str) -> list[dict]:
        return _call(self.api, "POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}, "limit": 200})

    def stage_states(self, run_id: str) -> dict[str, list[str]]:
        """stage -> the state names of its task runs in this flow run ("fetch-8e0" is stage fetch)."""
        out: dict[str, list[str]] = {}
        for t in sorted(self.task_runs(run_id), key=lambda t: t["expected_start_time"] or ""):
            out.setdefault(t["name"].rsplit("-", 1)[0], []).append(t["state"]["name"])
        return out

    def logs(self, run_id: str, stage: str | None = None, level: int = 0) -> list[dict]:
        """The ended flow run's log lines at `level` or above, or only those of its task runs of `stage`."""
        of_stage = None if stage is None else [t["id"] for t in self.task_runs(run_id)
                                               if t["name"].rsplit("-", 1)[0] == stage]
        return flow_run_logs(self.api, run_id, AUTH, level, of_stage)

    def worker_logs(self) -> str:
        return "\n".join(f"--- worker-{n}:\n" + (self.base / f"worker-{n}.log").read_text(errors="replace")[-6000:]
                         for n in self.workers)

    def log_size(self, machine: str) -> int:
        return (self.base / f"worker-{machine}.log").stat().st_size

    def wait_in_log(self, machine: str, since: int, text: str, within: float, what: str,
                    run_id: str | None = None) -> None:
        """Until `text` is in the machine's worker log after byte `since`: the worker writes a run's lines at
        once, the API's task states trail by seconds. Fails after `within` s, or when run `run_id` ended."""
        log, deadline = self.base / f"worker-{machine}.log", time.monotonic() + within
        while text.encode() not in log.read_bytes()[since:]:
            ended = run_id is not None and self.flow_run(run_id)["state"]["type"] in DONE
            assert time.monotonic() < deadline and not ended, \
                f"{what}: {self.stage_states(run_id) if run_id else ''}\n{self.worker_logs()}"
            time.sleep(0.1)

    def kill_machine(self, name: str, sig: int) -> None:
        """Signal every process of the machine (its network namespace: worker, flow run, sshd)."""
        pids = subprocess.run(["ip", "netns", "pids", self.hosts[name].netns], capture_output=True,
                              text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), sig)


@pytest.fixture(scope="module")
def team(postgres, tmp_path_factory):  # noqa: F811 - the PostgreSQL fixture of test_team_postgres
    from tasks.synth import synthesize

    why = missing_requirements()
    require(why is None, f"two netns machines: {why}")
    base = tmp_path_factory.mktemp("team")
    shared = base / "shared"
    k = secrets.randbelow(200) + 20
    with contextlib.ExitStack() as stack:
        machines = {}
        for i, name in enumerate(("a", "b", "c")):
            host = stack.enter_context(netns_host(base / f"host-{name}", hostname=f"rn50-worker-{name}",
                                                  ssh_port=2222, subnet=k + i))
            # Reach the services on machine a's link address (routed by this machine, where they run).
            subprocess.run(["ip", "-n", host.netns, "route", "add", "default", "via", host.local_addr], check=True)
            machines[name] = host
        services = machines["a"].local_addr
        redis = stack.enter_context(RedisServer(base / "redis", binds=(services, "127.0.0.1")))
        home = base / "server"
        home.mkdir()
        api, env = stack.enter_context(prefect_on_postgres(postgres, home, host=services))
        # The workers' checkout (the same path on every machine, as the README asks): a copy, so that edits to
        # this tree while the module runs cannot change the stages' code keys between its runs.
        checkout = base / "checkout"
        shutil.copytree(ROOT, checkout, ignore=shutil.ignore_patterns(".venv", ".git", ".demo", "__pycache__",
                                                                      "*.egg-info", ".pytest_cache"))
        deploy = subprocess.run(["sh", "infra/compose/deploy.sh"],
                                env={**env, "RN50_PIPELINE": "demo", "RN50_PROJECT_DIR": str(checkout)}, cwd=checkout,
                                capture_output=True, text=True, timeout=600)
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
        team = Team(api, env, shared, redis, services, base)
        synthesize(team.source)
        try:
            team.start_worker("a", machines["a"])
            team.start_worker("b", machines["b"])
            team.spare = machines["c"]
            yield team
        finally:
            for w in team.workers.values():
                stop_group(w)


def _executed(team: Team, run_ids: list[str]) -> dict[str, dict[str, list[str]]]:
    """stage -> flow run id -> its task runs' state names."""
    per_run = {r: team.stage_states(r) for r in run_ids}
    return {s: {r: per_run[r].get(s, []) for r in run_ids} for s in STAGES}


@pytest.fixture(scope="module")
def full_runs(team):
    """Two rn50/full runs submitted at once, one on each machine."""
    ids = [team.run("full", "a"), team.run("full", "b")]
    runs = team.wait(*ids)
    return ids, runs


def test_two_machines_run_each_stage_once(team, full_runs):
    ids, runs = full_runs
    assert [r["state"]["type"] for r in runs] == ["COMPLETED", "COMPLETED"], \
        f"{[r['state'] for r in runs]}\n{team.worker_logs()}"
    assert [r["work_queue_name"] for r in runs] == ["a", "b"]
    # They ran at the same time (the second started before the first ended), so the locks did the work.
    starts = sorted(datetime.fromisoformat(r["start_time"]) for r in runs)
    ends = sorted(datetime.fromisoformat(r["end_time"]) for r in runs)
    assert starts[1] < ends[0], (starts, ends)
    for stage, per_run in _executed(team, ids).items():
        states = sorted(s for names in per_run.values() for s in names)
        assert states == ["Cached", "Completed"], (stage, per_run)
    # The cache records are in the shared directory; neither machine used its own file locks or results.
    results = team.shared / "prefect-results"
    for stage in STAGES:
        assert list(results.glob(f"rn50-{stage}-*")), f"no shared record of {stage} in {results}"
    for name in ("a", "b"):
        home = team.base / f"home-{name}"
        assert not list((home / "rn50-locks").glob("*")) and not list((home / "storage").glob("rn50-*")), name
    assert (team.workdir / ".rn50-share-id").is_file() and (results / ".rn50-share-id").is_file()


def test_train_on_the_other_machine_uses_the_shared_cache(team, full_runs):
    ids, _ = full_runs
    ran_pack = next(r for r, names in _executed(team, ids)["pack"].items() if "Completed" in names)
    other = "b" if team.flow_run(ran_pack)["work_queue_name"] == "a" else "a"
    run_id = team.run("train", other)
    [run] = team.wait(run_id)
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{team.worker_logs()}"
    states = team.stage_states(run_id)
    assert {s: states[s] for s in ("fetch", "verify", "pack")} == {"fetch": ["Cached"], "verify": ["Cached"],
                                                                   "pack": ["Cached"]}, states
    assert states["train"] == ["Completed"], states


def _pack_lock(team: Team) -> tuple[str, dict]:
    """(lock name, holder record) of the pack lock, once it is held and its holder record written."""
    import redis as redis_py

    r = redis_py.Redis.from_url(team.redis.url("127.0.0.1"))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for name in r.scan_iter("lock:rn50-pack-*"):
            name = name.decode()
            if name.endswith(":holder"):
                continue
            token, raw = r.get(name), r.get(f"{name}:holder")
            record = json.loads(raw) if raw else {}
            if token and record.get("holder") == token.decode():
                return name, record
        time.sleep(0.005)  # the first holder, not the one a quick pack handed the lock to
    raise AssertionError(f"no pack lock held within 300 s\n{team.worker_logs()}")


def test_a_killed_machine_loses_its_lock_within_the_bound(team, full_runs):
    import redis as redis_py

    from tasks.recordio import read_lst, read_record

    seen = {n: team.log_size(n) for n in ("a", "b")}
    ids = {"a": team.run("full", "a", rerun=["pack"]), "b": team.run("full", "b", rerun=["pack"])}
    name, holder = _pack_lock(team)
    dead = next(n for n in ("a", "b") if holder["host"] == team.hosts[n].hostname)
    alive = "b" if dead == "a" else "a"
    team.kill_machine(dead, signal.SIGSTOP)  # frozen at once: it renews nothing from here on
    frozen = time.time()
    r = redis_py.Redis.from_url(team.redis.url("127.0.0.1"))
    assert r.get(name).decode() == holder["holder"], "the pack stage finished before its machine froze"
    # The other machine's run is waiting on that lock: its own log says so at once (the API's task states trail).
    waiting = f"waiting for the stage lock {name.removeprefix('lock:')}: {holder['host']} pid {holder['pid']} holds it"
    team.wait_in_log(alive, seen[alive], waiting, HOLD - RENEW, f"{alive} never waited on the frozen holder's lock")
    team.kill_machine(dead, signal.SIGKILL)
    team.workers.pop(dead).wait(30)

    [run] = team.wait(ids[alive])
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{team.worker_logs()}"
    assert team.stage_states(ids[alive])["pack"] == ["Completed"]
    pack_log = team.logs(ids[alive], "pack")
    broke = [entry for entry in pack_log if "broke the stale lock" in entry["message"]]
    assert len(broke) == 1, "\n".join([e["message"] for e in pack_log] + [team.worker_logs()])
    line = broke[0]["message"]
    assert f"{name.removeprefix('lock:')} in Redis: its holder ({holder['host']} pid {holder['pid']}) " \
           f"stopped renewing it for {HOLD:g} s" in line, line
    took = datetime.fromisoformat(broke[0]["timestamp"]).timestamp() - frozen
    assert HOLD - RENEW - 1 <= took <= HOLD + 5, took
    # Whole RecordIO: every listed image is a record at its .idx offset, and the records fill each .rec.
    rec_dir = team.workdir / "recordio"
    for split in ("train", "val"):
        listed = read_lst(rec_dir / f"{split}.lst")
        offsets = [int(ln.split("\t")[1]) for ln in (rec_dir / f"{split}.idx").read_text().splitlines()]
        assert len(offsets) == len(listed) > 0
        fd = os.open(rec_dir / f"{split}.rec", os.O_RDONLY)
        try:
            end = 0
            for offset in sorted(offsets):
                assert offset == end, (split, offset, end)
                payload, end = read_record(fd, offset)
                assert len(payload) > 24
            assert end == os.fstat(fd).st_size
        finally:
            os.close(fd)
    assert not list(rec_dir.glob(".tmp-*"))


def test_redis_down_is_a_retried_error_naming_redis(team, full_runs):
    """Redis stops while the run's pack stage (a rerun) computes under its lock: pack still records its result
    (its lock was renewed less than the hold bound ago, so it is surely still its own), the next stage cannot
    take its lock, fails with one line naming Redis and is retried (after 2 s); Redis is back by then (same
    port, its append-only file) and the run completes."""
    machine = next(iter(team.workers))  # a machine still alive
    seen = team.log_size(machine)
    run_id = team.run("full", machine, rerun=["pack"])
    _pack_lock(team)  # held by this run's pack: no other run is active
    team.redis.stop()
    try:
        team.wait_in_log(machine, seen, "cannot take the stage lock rn50-", 300,
                         "no stage failed to take its lock while Redis is down", run_id)
    finally:
        team.redis.start()
    [run] = team.wait(run_id)
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{team.worker_logs()}"
    after_pack = STAGES[STAGES.index("pack") + 1:]
    messages = [e["message"] for e in team.logs(run_id, level=30)]  # the run's warnings and errors
    messages += [e["message"] for stage in after_pack for e in team.logs(run_id, stage)]  # every line of those
    where = f"Redis at {team.redis_host}:{team.redis.port} is unreachable"
    failed = [m for m in messages if where in m and "cannot take the stage lock rn50-" in m]
    assert failed, messages
    assert REDIS_PASSWORD not in "\n".join(messages)
    stage = failed[0].split("cannot take the stage lock rn50-", 1)[1].split("-", 1)[0]
    assert stage in after_pack, failed[0]
    [retried] = [t for t in team.task_runs(run_id) if t["name"].rsplit("-", 1)[0] == stage]
    assert retried["state"]["name"] == "Cached" and retried["run_count"] >= 2, retried
    assert not any("error was encountered while committing" in m for m in messages), messages
    pack_lines = [e["message"] for e in team.logs(run_id, "pack", level=30)]
    assert any(where in m and "cannot release the stage lock rn50-pack-" in m and "expires by itself" in m
               for m in pack_lines), pack_lines  # Redis was down before pack ended
    # pack's record was written: the next run finds it.
    again = team.run("full", machine)
    [run] = team.wait(again)
    assert run["state"]["type"] == "COMPLETED" and team.stage_states(again)["pack"] == ["Cached"], \
        (run["state"], team.stage_states(again))


def test_a_machine_without_the_shared_work_dir_fails_in_one_line(team, full_runs):
    team.start_worker("c", team.spare, hide=team.shared)
    run_id = team.run("train", "c")
    [run] = team.wait(run_id)
    assert run["state"]["type"] == "FAILED", run["state"]
    message = run["state"]["message"]
    marker = (team.workdir / ".rn50-share-id").read_text().strip()
    assert f"the work dir {team.workdir} on rn50-worker-c is not the team's shared one: it has no marker " \
           f".rn50-share-id, the team's holds {marker}" in message, message
    assert not team.task_runs(run_id)  # no stage ran
