"""The team server path for real: Prefect on PostgreSQL, configured as docker-compose.yml configures it.

A throw-away PostgreSQL cluster (Debian's `postgresql`: initdb/pg_ctl, as the `postgres` user when run as
root) on a free loopback port with password (scram) authentication, the `prefect-server` service's own
environment and command from docker-compose.yml (the database URL pointing at that cluster instead of the
`postgres` service, loopback instead of 0.0.0.0, HTTP basic auth on), `infra/compose/deploy.sh` run with the
compose client environment (twice: the second deploy changes nothing), the compose worker command, and one
`rn50/full` run on a synthetic set: Completed, artifacts present, the `rn50-cluster` limit and the nightly
alert automation created once.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, free_port, missing, stop_group
from helpers import prefect_api

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
PASSWORD = "pg-test-1"           # letters, digits, - and _ only (it goes into a URL), as the README asks
AUTH = "rn50:team-secret"


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        missing("PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb; scripts/install-system.sh installs postgresql)")
    return Path(found[-1]).parent


def _as_db_user(argv: list[str]) -> list[str]:
    """initdb refuses to run as root: run the server's tools as `postgres` then."""
    if os.geteuid() != 0:
        return argv
    if not shutil.which("runuser"):
        missing("runuser (util-linux), to run initdb as the postgres user")
    return ["runuser", "-u", "postgres", "--", *argv]


@pytest.fixture(scope="module")
def postgres():
    """(host, port) of a fresh cluster with user and database `prefect`, as the compose `postgres` service."""
    pg = _pg_bin()
    if os.geteuid() == 0:
        try:
            import pwd

            pw = pwd.getpwnam("postgres")
        except KeyError:
            missing("the postgres system user (created by Debian's postgresql package)")
    # Not under pytest's tmp dir: that is private to root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="rn50-pg-"))
    if os.geteuid() == 0:
        os.chown(root, pw.pw_uid, pw.pw_gid)
    data, port = root / "data", free_port()
    pwfile = root / "pw"
    pwfile.write_text(PASSWORD + "\n")
    if os.geteuid() == 0:
        os.chown(pwfile, pw.pw_uid, pw.pw_gid)
    subprocess.run(_as_db_user([str(pg / "initdb"), "-D", str(data), "-U", "prefect", f"--pwfile={pwfile}",
                                "--auth=scram-sha-256", "-E", "UTF8", "--no-instructions"]),
                   check=True, capture_output=True, timeout=120)
    start = _as_db_user([str(pg / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
                         "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"])
    try:
        subprocess.run(start, check=True, capture_output=True, timeout=90)
        subprocess.run([str(pg / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "prefect"],
                       check=True, capture_output=True, timeout=60, env={**os.environ, "PGPASSWORD": PASSWORD})
        yield "127.0.0.1", port
    finally:
        subprocess.run(_as_db_user([str(pg / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?message}, from `env`."""
    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env:
            return env[name]
        if op == ":-":
            return arg
        raise AssertionError(f"compose variable {name} not set by the test")
    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value)


@pytest.fixture(scope="module")
def team_server(postgres, tmp_path_factory):
    """The compose `prefect-server` service on the test's PostgreSQL: (api_url, client env)."""
    with prefect_on_postgres(postgres, tmp_path_factory.mktemp("team-prefect")) as server:
        yield server


@contextlib.contextmanager
def prefect_on_postgres(postgres, home: Path, host: str = "127.0.0.1"):
    """The compose `prefect-server` service on `postgres`, listening on `host` (loopback, or an address a
    test made): (api_url, client env)."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["prefect-server"]
    db_host, db_port = postgres
    port = free_port()
    dotenv = {"POSTGRES_PASSWORD": PASSWORD, "PREFECT_AUTH_STRING": AUTH, "RN50_PUBLIC_URL": f"http://{host}:{port}"}
    server_env = {k: _interpolate(str(v), dotenv) for k, v in service["environment"].items()}
    # The compose network's names and wildcard binds, as this machine reaches them (loopback only).
    server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"].replace(
        "@postgres:5432/", f"@{db_host}:{db_port}/")
    assert server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://prefect:")
    assert server_env["PREFECT_SERVER_API_AUTH_STRING"] == AUTH
    server_env.update(PREFECT_SERVER_API_HOST=host, PREFECT_SERVER_API_PORT=str(port))
    command = [{"0.0.0.0": host, "4200": str(port)}.get(a, a) for a in service["command"]]
    assert command[:3] == ["prefect", "server", "start"]
    command[0] = str(VENV_BIN / "prefect")

    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base.update(PREFECT_HOME=str(home), PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    log = open(home / "server.log", "ab")
    server = subprocess.Popen(command, env={**base, **server_env}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    api = f"http://{host}:{port}/api"
    client_env = {**base, **{k: _interpolate(str(v), dotenv) for k, v in compose["x-client-env"].items()}}
    client_env.update(PREFECT_API_URL=api, RN50_PROJECT_DIR=str(ROOT))
    try:
        deadline = time.monotonic() + 180  # the first start runs the PostgreSQL migrations
        while True:
            try:
                _call(api, "GET", "/health")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"Prefect server on PostgreSQL not healthy: {(home / 'server.log').read_text()[-3000:]}")
                time.sleep(1)
        yield api, client_env
    finally:
        stop_group(server)
        log.close()


def _call(api: str, method: str, path: str, body: dict | None = None, auth: str | None = AUTH):
    return prefect_api(api, method, path, body, auth=auth)


def _state(api: str) -> dict:
    deps = _call(api, "POST", "/deployments/filter", {})
    return {"deployments": sorted((d["name"], d["id"], json.dumps(d["parameters"], sort_keys=True)) for d in deps),
            "automations": sorted((a["name"], a["id"]) for a in _call(api, "POST", "/automations/filter", {})),
            "limits": sorted((x["name"], x["limit"]) for x in _call(api, "POST", "/v2/concurrency_limits/filter", {})),
            "pools": sorted(p["name"] for p in _call(api, "POST", "/work_pools/filter", {}))}


def test_team_server_on_postgresql_deploys_and_runs_full(team_server, tmp_path):
    from tasks.synth import synthesize

    api, env = team_server
    # basic auth is on: without credentials the API refuses
    with pytest.raises(urllib.error.HTTPError) as e:
        _call(api, "POST", "/deployments/filter", {}, auth=None)
    assert e.value.code == 401

    deploy = {**env, "RN50_PIPELINE": "demo"}
    first = subprocess.run(["sh", "infra/compose/deploy.sh"], env=deploy, cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    before = _state(api)
    assert [d[0] for d in before["deployments"]] == ["full", "nightly", "train"], before
    assert all(json.loads(d[2])["pipeline"] == "demo" for d in before["deployments"])
    assert before["limits"] == [("rn50-cluster", 1)] and before["pools"] == ["rn50"], before
    assert [a[0] for a in before["automations"]] == ["rn50-crash-zombie-runs", "rn50-nightly-failed"], before
    again = subprocess.run(["sh", "infra/compose/deploy.sh"], env=deploy, cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert _state(api) == before  # idempotent: same ids, parameters, one automation, one limit

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    worker_cmd = [a for a in compose["services"]["worker"]["command"] if a != "--with-healthcheck"]
    worker_cmd[0] = str(VENV_BIN / "prefect")
    log = open(tmp_path / "worker.log", "ab")
    worker = subprocess.Popen(worker_cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        src, wd = tmp_path / "synthetic", tmp_path / "work"
        synthesize(src)
        run = subprocess.run([str(VENV_BIN / "prefect"), "deployment", "run", "rn50/full", "--param", f"source={src}",
                              "--param", f"workdir={wd}", "--watch", "--watch-timeout", "1200"],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=1300)
    finally:
        stop_group(worker)
        log.close()
    out = run.stdout + run.stderr
    ids = re.findall(r"UUID:\s*([0-9a-f-]{36})", out)
    assert ids, out[-3000:]
    flow_run = _call(api, "GET", f"/flow_runs/{ids[0]}")
    assert flow_run["state"]["type"] == "COMPLETED", (flow_run["state"], (tmp_path / "worker.log").read_text()[-3000:])
    arts = _call(api, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [ids[0]]}}, "limit": 200})
    keys = {a["key"] for a in arts if a.get("key")}
    assert {"data-verification", "pack-report", "compliance", "compliance-report", "archive-manifest"} <= keys, keys
    assert (wd / "archive" / "MANIFEST.json").is_file()
