"""The `rn50` flow with `container.runtime: docker`: the container stage builds for real through the flow.

`rn50 run` (the flow in-process, against a local Prefect server started here) with a pipeline config
written by the test: `runtime: docker`, `from_image` = the debootstrapped Debian base the docker tests
use (tests/docker_engine.py: Debian's dockerd on a private socket, no registry), and the offline build
args (APT_PACKAGES="", PIP_INSTALL=0: the two Dockerfile steps that need the network). The image is the
real infra/Dockerfile. Training stays local (`train.hosts: null`): the image tag is part of train's key
and result, but the ranks run on this machine — the container launch itself (`infra/start-node.sh`,
horovodrun into the container) is tests/test_train_docker_runtime.py's, and doing it inside a flow run
here would add several minutes for nothing the two tests do not already cover between them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import rn50

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
OFFLINE_ARGS = {"APT_PACKAGES": "", "PIP_INSTALL": "0", "RUNTIME_ENV": "configs/env/cpu.env"}
STAGES = ("fetch", "verify", "pack", "container", "train", "compliance", "archive")
NO_HOSTS = {"distribute": "Skipped"}  # the demo trains on this machine: nothing to copy


def _client(url: str):
    import docker

    return docker.DockerClient(base_url=url, version="auto")


def _remove(url: str, tag: str) -> None:
    import docker

    try:
        _client(url).images.remove(tag, force=True)
    except docker.errors.ImageNotFound:
        pass


def run_flow(server, docker_url: str, source: Path, wd: Path, pipeline: Path) -> dict:
    env = {k: v for k, v in server.env().items() if k.startswith(("PREFECT_", "RN50_"))}
    env["DOCKER_HOST"] = docker_url  # the engine the container stage builds with (docker.from_env)
    proc = rn50("run", source, wd, "--pipeline", pipeline, "--json", env=env, timeout=1500)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON on stdout (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    out = json.loads(lines[-1])
    out["returncode"], out["stderr"] = proc.returncode, proc.stderr[-4000:]
    return out


def test_flow_with_docker_runtime_builds_the_image_then_caches_it(prefect_server, docker_url, docker_base, tmp_path):
    base = docker_base
    from tasks.common import Workdir, read_stamp
    from tasks.container import REPO, content_hash
    from tasks.synth import synthesize

    pipeline = tmp_path / "docker-pipeline.yaml"
    demo = yaml.safe_load((REPO / "configs" / "pipeline" / "demo.yaml").read_text())
    demo["container"] = {"runtime": "docker", "from_image": base, "registry": None, "push": False,
                         "build_args": OFFLINE_ARGS, "network": "none"}
    demo["train"]["hosts"] = None
    pipeline.write_text(yaml.safe_dump(demo, sort_keys=False))

    tag = f"rn50:{content_hash(REPO, base, OFFLINE_ARGS)}"
    _remove(docker_url, tag)  # the stage must build it, not find it from an earlier run
    src, wd = tmp_path / "source", tmp_path / "work"
    synthesize(src)
    try:
        first = run_flow(prefect_server, docker_url, src, wd, pipeline)
        assert first["returncode"] == 0 and first["state"] == "Completed", first
        assert first["stages"] == {**dict.fromkeys(STAGES, "Completed"), **NO_HOSTS}, first["stages"]
        image = _client(docker_url).images.get(tag)
        assert image.labels.get("org.rn50.content-hash") == tag.split(":")[1]
        built = read_stamp(Workdir(wd), "flow-container")["result"]
        assert (built["tag"], built["built"], built["source"]) == (tag, True, "build"), built
        assert "Successfully built" in (wd / "reports" / "container-build.log").read_text()
        trained = read_stamp(Workdir(wd), "flow-train")["result"]
        assert trained["image"] == tag and trained["runtime"] == "local", trained  # hosts: null trains here

        again = run_flow(prefect_server, docker_url, src, wd, pipeline)
        assert again["returncode"] == 0
        assert again["stages"] == {**dict.fromkeys(STAGES, "Cached"), **NO_HOSTS}, again["stages"]

        # The image is the container stage's output: gone from the engine, the stage builds it again
        # (same content, same tag), and nothing after it changes.
        _remove(docker_url, tag)
        rebuilt = run_flow(prefect_server, docker_url, src, wd, pipeline)
        assert rebuilt["returncode"] == 0, rebuilt
        assert rebuilt["stages"] == {**dict.fromkeys(STAGES, "Cached"), "container": "Completed", **NO_HOSTS}, \
            rebuilt["stages"]
        assert _client(docker_url).images.get(tag).id
    finally:
        _remove(docker_url, tag)
        shutil.rmtree(src, ignore_errors=True)
