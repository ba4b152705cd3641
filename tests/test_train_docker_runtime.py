"""Launch stage, `runtime: docker`, end to end against a real Docker engine (tests/docker_engine.py).

The node image is the real infra/Dockerfile (built by tasks.container.build_image: entrypoint,
sshd_config, rn50/ copied to /opt/rn50, content hash) on a debootstrapped Debian bookworm that also
carries openssh-server and the shared libraries the venv's native wheels need (cached under
~/.cache/rn50-pipeline/ like the minbase tarball). The node container is started by the real
infra/start-node.sh (host network, sshd on a free port, a throw-away authorized key).

What stands in for the NGC image's Python stack (pip cannot reach PyPI inside containers here): the
host's interpreter and the project's venv are bind-mounted read-only at their own absolute paths and
the image's `python` (/usr/local/bin/python) is a shim that execs the venv's interpreter. The repo
checkout is NOT mounted: the ranks import rn50 from the image's /opt/rn50, as on a real node. The
shim prints one stderr line with its pid namespace, which is how the test proves the ranks ran in the
container (the container has its own pid namespace; /.dockerenv exists only there).
"""
from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import missing
from tasks.common import StageError
from tasks.inventory import Inventory, parse_inventory
from tasks.train import train as launch
from tests.sshd_hosts import closed_loopback_port, make_key

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parent.parent
# The venv (sys.prefix) and the interpreter it was made from (sys.base_prefix), mounted as they are here.
VENV, PY_HOME = Path(sys.prefix), Path(sys.base_prefix)
# openssh-server for start-node.sh's sshd; libs found missing by `ldd` over the venv's .so files
# in the minbase image (MXNet/Horovod: libgomp, libquadmath; stdlib sqlite3).
NODE_PACKAGES = "openssh-server,libgomp1,libquadmath0,libsqlite3-0"
NODE_BASE_TAG = "rn50-test/bookworm-sshd:1"
OFFLINE_ARGS = {"APT_PACKAGES": "", "PIP_INSTALL": "0", "RUNTIME_ENV": "configs/env/cpu.env"}
SHIM = f"""#!/bin/sh
# rn50 test image: the host's venv (bind-mounted at its own path) is this image's Python.
[ -f /.dockerenv ] && echo "rn50-test-node python: dockerenv pidns=$(readlink /proc/self/ns/pid)" >&2
exec {VENV}/bin/python "$@"
"""


@pytest.fixture(scope="module")
def docker_cli(docker_url):
    if shutil.which("docker") is None:
        missing("the `docker` CLI (used by infra/start-node.sh) is not installed (Debian: docker.io)")
    return docker_url


def _node_base(client) -> str:
    """Debian bookworm minbase + NODE_PACKAGES, debootstrapped once and cached as a tarball."""
    from tests.docker_engine import CACHE, debootstrap_image

    return debootstrap_image(client, NODE_BASE_TAG, CACHE / "base" / "bookworm-sshd.tar", NODE_PACKAGES)


@pytest.fixture(scope="module")
def node_image(docker_cli, tmp_path_factory):
    """rn50:<content hash> built from infra/Dockerfile on the node base plus the python shim."""
    docker_url = docker_cli
    import io

    import docker

    from tasks.container import build_image
    from tests.docker_engine import NoEngine

    client = docker.DockerClient(base_url=docker_url, version="auto")
    try:
        base = _node_base(client)
    except NoEngine as e:
        missing(f"no node base image: {e}")
    shim = base64.b64encode(SHIM.encode()).decode()
    dockerfile = f"FROM {base}\nRUN echo {shim} | base64 -d > /usr/local/bin/python && chmod 755 /usr/local/bin/python\n"
    shim_tag = f"rn50-test/bookworm-sshd-venv:{hashlib.sha256(SHIM.encode()).hexdigest()[:12]}"
    client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=shim_tag, network_mode="none", rm=True)
    img = build_image(REPO, from_image=shim_tag, build_args=OFFLINE_ARGS, docker_host=docker_url,
                      network_mode="none", log_path=tmp_path_factory.mktemp("build") / "build.log")
    yield img.tag
    # Every change to rn50/ or infra/ gives a new tag: keep only the (stable) bases in the cached engine.
    if img.built:
        client.images.remove(img.tag, force=True)


@pytest.fixture(scope="module")
def node(docker_url, node_image, tmp_path_factory):
    """A packed tiny set and the node container serving it, started by infra/start-node.sh."""
    from rn50.tinydata import make_recordio

    tmp = tmp_path_factory.mktemp("dockernode")
    wd = tmp / "wd"
    make_recordio(wd / "recordio", classes=4, train_per_class=16, val_per_class=4, work=tmp / "images")
    (wd / "runs").mkdir()
    key = make_key(tmp)
    port = closed_loopback_port()
    name = f"rn50-test-node-{os.getpid()}"
    env = {**os.environ, "DOCKER_HOST": docker_url, "RN50_CONTAINER": name, "RN50_RUNS_DIR": str(wd / "runs"),
           # Host network: the node's sshd listens on loopback only; its host key is kept in tmp.
           "RN50_SSH_LISTEN": "127.0.0.1", "RN50_HOSTKEY_DIR": str(tmp / "hostkeys"),
           "RN50_DOCKER_ARGS": f"-v {PY_HOME}:{PY_HOME}:ro -v {VENV}:{VENV}:ro"}
    try:
        r = subprocess.run(["bash", str(REPO / "infra" / "start-node.sh"), node_image, str(wd / "recordio"),
                            str(port), f"{key}.pub"], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        _wait_port(port)
        listening = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout.split()
        assert f"127.0.0.1:{port}" in listening and not any(a.endswith(f"*:{port}") for a in listening), listening
        yield {"wd": wd, "port": port, "key": key, "image": node_image, "name": name, "env": env,
               "host_key": tmp / "hostkeys" / "ssh_host_ed25519_key.pub"}
    finally:
        subprocess.run(["docker", "rm", "-f", name], env=env, capture_output=True, timeout=60)


def _wait_port(port: int, timeout: float = 20) -> None:
    import socket

    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"the node container's sshd did not listen on 127.0.0.1:{port}")


def _inventory(node) -> Inventory:
    return parse_inventory({
        "runtime": "docker", "env_profile": "cpu", "min_free_bytes": 1 << 20,
        "hosts": [{"host": "127.0.0.1", "slots": 2, "ssh_port": node["port"], "user": "root", "key": str(node["key"])}],
    })


def test_docker_runtime_trains_inside_the_node_container(node):
    t0 = time.time()
    res = launch(node["wd"], hosts=_inventory(node), config="cpu-demo", image=node["image"], runs=1, seed=3,
                 timeout_s=600, extra_args=["--set", "max_epochs=2", "--set", "warmup_epochs=1"])
    elapsed = time.time() - t0
    run_dir = Path(res.run_dir)
    assert res.status == "success" and res.runtime == "docker" and res.image == node["image"] and res.np == 2
    text = Path(res.results[0]).read_text()
    # Two real epochs and an eval; run_stop's status is the real verdict: success exactly when an
    # eval reached cpu-demo's target.
    import json

    from rn50.config import load_config

    events = [json.loads(ln.split(":::MLLOG ", 1)[1]) for ln in text.splitlines() if ":::MLLOG " in ln]
    assert sum(e["key"] == "epoch_stop" for e in events) == 2
    accuracies = [e["value"] for e in events if e["key"] == "eval_accuracy"]
    (stop,) = [e for e in events if e["key"] == "run_stop"]
    target = load_config("cpu-demo")["target_accuracy"]
    assert accuracies and stop["metadata"]["status"] == ("success" if max(accuracies) >= target else "aborted")
    # The launcher pinned the node's own host key (made by the entrypoint, kept on the host).
    pinned = (node["wd"] / ".ssh" / "known_hosts").read_text()
    assert " ".join(node["host_key"].read_text().split()[:2]) in pinned
    # The checkout is not in the container: the ranks imported rn50 from the image's /opt/rn50.
    probe = f"if [ -e {REPO}/rn50 ]; then echo checkout; elif [ -f /opt/rn50/rn50/train.py ]; then echo image; fi"
    exec_ = ["docker", "exec", node["name"], "sh", "-c", probe]
    assert subprocess.run(exec_, env=node["env"], capture_output=True, text=True).stdout.strip() == "image"
    # horovodrun and both ranks ran the image's python, in the container's pid namespace.
    ours = os.readlink("/proc/self/ns/pid")
    launcher = (run_dir / "launcher_0.log").read_text().splitlines()
    assert any(ln.startswith("rn50-test-node python: dockerenv pidns=") for ln in launcher)
    for rank in (0, 1):
        log = (run_dir / f"rank{rank}_0.log").read_text()
        marks = [ln for ln in log.splitlines() if ln.startswith("rn50-test-node python: dockerenv pidns=")]
        assert marks, log[-2000:]
        assert all(ln.split("pidns=")[1] != ours for ln in marks)
    # The launcher came in through the container's sshd with the throw-away key.
    logs = subprocess.run(["docker", "logs", node["name"]], env=node["env"], capture_output=True, text=True).stderr
    assert "Accepted publickey for root" in logs
    print(f"docker runtime training run: {elapsed:.1f} s")


def test_docker_runtime_wrong_image_fails_preflight(node):
    wrong = "rn50:0123456789abcdef"
    with pytest.raises(StageError) as e:
        launch(node["wd"], hosts=_inventory(node), config="cpu-demo", image=wrong, timeout_s=60)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"host 127.0.0.1:{node['port']} (ssh): the container on ssh port {node['port']} does not run {wrong}" in msg
    assert f"content hash {node['image'].split(':')[1]}" in msg
