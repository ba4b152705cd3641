"""Two hosts on one machine: this one, and a network namespace with its own hostname (UTS
namespace), its own view of the filesystem (mount namespace) and a real OpenSSH server reachable
only over a veth pair (tests/sshd_hosts.py). horovodrun reaches rank 1 over SSH with a throw-away key,
trusting only the host key pinned on first contact (or given in the inventory).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import fake_recordio

from tasks.common import StageError
from tasks.inventory import parse_inventory
from tasks.train import train as launch
from tests.sshd_hosts import missing_requirements, netns_host

PROBE = [sys.executable, str(Path(__file__).with_name("hvd_probe.py"))]
pytestmark = [pytest.mark.timeout(600)]
_why = missing_requirements()
if _why:
    pytestmark.append(pytest.mark.skip(reason=f"cannot make a second host here: {_why}"))


@pytest.fixture
def wd(tmp_path):
    return fake_recordio(tmp_path / "wd", 2 << 20)


def _inventory(h, port=None, **extra):
    return parse_inventory({**extra, "hosts": [{"host": h.local_addr, "slots": 1, "interface": h.iface},
                                               h.inventory_entry(port=port)]})


def _status(run_dir: Path) -> str:
    return json.loads((Path(run_dir) / "status.json").read_text())["status"]


def _probe_line(run_dir: Path, rank: int) -> dict:
    text = (run_dir / f"rank{rank}_0.log").read_text()
    m = re.search(r"PROBE rank=%d size=2 host=(\S+) netns=(\S+)" % rank, text)
    assert m, text
    return {"host": m.group(1), "netns": m.group(2)}


def test_two_host_rank1_runs_over_ssh_on_the_other_host(wd, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "AKIATWOHOSTSECRET")
    caplog.set_level("INFO", logger="tasks.train")
    with netns_host(tmp_path / "hostb", hostname="rn50-node-b") as h:
        res = launch(wd, hosts=_inventory(h), entry=PROBE, runs=1, seed=7, timeout_s=180)
        sshd_log = "".join(p.read_text() for p in (tmp_path / "hostb").glob("sshd_*.log"))
    run_dir = Path(res.run_dir)
    assert res.status == "success" and _status(run_dir) == "success"
    # First contact pinned the host's real key in the work dir's known_hosts.
    assert (wd / ".ssh" / "known_hosts").read_text().split("\n")[0] == f"[{h.addr}]:{h.ssh_port} {h.host_key_pub}"
    r0, r1 = _probe_line(run_dir, 0), _probe_line(run_dir, 1)
    assert r0["host"] == os.uname().nodename and r1["host"] == "rn50-node-b"
    assert r0["netns"] == os.readlink("/proc/self/ns/net") and r1["netns"] != r0["netns"]
    assert "PROBE rank=1 allreduce=3" in (run_dir / "rank1_0.log").read_text()  # real cross-host allreduce
    assert "Accepted publickey for root" in sshd_log  # rank 1 arrived through sshd, with the key
    assert res.hosts == [f"{h.local_addr}:1", f"{h.addr}:{h.ssh_port}:1"]
    # Neither the private key nor the caller's credentials reached a log or an artifact.
    key = h.key.read_text().splitlines()[1]
    blobs = [caplog.text] + [p.read_text(errors="replace") for p in run_dir.rglob("*") if p.is_file()]
    assert not any(key in b or "AKIATWOHOSTSECRET" in b for b in blobs)


def test_two_host_wrong_ssh_port_fails_preflight(wd, tmp_path):
    with netns_host(tmp_path / "hostb") as h:
        with pytest.raises(StageError) as e:
            launch(wd, hosts=_inventory(h, port=h.ssh_port + 1), entry=PROBE, timeout_s=60)
    msg = str(e.value)
    assert f"host {h.addr}:{h.ssh_port + 1} (ssh): ssh unreachable" in msg and "refused" in msg.lower()
    (run_dir,) = list((wd / "runs").iterdir())
    assert not list(run_dir.glob("rank*")) and json.loads((run_dir / "status.json").read_text())["status"] == "failed"


def test_two_host_missing_data_on_one_host_fails_preflight(wd, tmp_path):
    # On host b the recordio directory is an empty tmpfs: the files exist here but not there.
    with netns_host(tmp_path / "hostb", hide=[wd / "recordio"]) as h:
        with pytest.raises(StageError) as e:
            launch(wd, hosts=_inventory(h), entry=PROBE, timeout_s=60)
    msg = str(e.value)
    assert f"host {h.addr}:{h.ssh_port} (ssh): {wd / 'recordio'}/train.rec is missing" in msg
    assert f"host {h.local_addr}:" not in msg  # the launcher's host is fine and not blamed
    assert not list((wd / "runs").glob("*/rank*"))


def test_two_host_docker_runtime_checks_the_image_each_host_runs(wd, tmp_path):
    """runtime: docker means the ssh port is the node container's sshd; a host whose sshd is not in a
    container of the requested image (here: a plain netns host) fails preflight, naming host and image."""
    with netns_host(tmp_path / "hostb") as h:
        # The inventory pins the host's key itself: ssh gets in (the failure is the image, not the key)
        # and nothing is added to the first-contact file.
        inv = parse_inventory({"runtime": "docker", "hosts": [{**h.inventory_entry(slots=2), "host_key": h.host_key_pub}]})
        with pytest.raises(StageError) as e:
            launch(wd, hosts=inv, image="rn50:0123456789abcdef", timeout_s=60, entry=PROBE)
    assert f"host {h.addr}:{h.ssh_port} (ssh): the container on ssh port {h.ssh_port} does not run rn50:0123456789abcdef" in str(e.value)
    assert (wd / ".ssh" / "known_hosts").read_text() == ""


def test_two_host_changed_host_key_fails_preflight_naming_the_host(wd, tmp_path):
    """A node that shows another host key than the one pinned on first contact (reinstalled, or
    impersonated) fails preflight naming it, before any rank; horovodrun's own ssh (Horovod passes
    `-o StrictHostKeyChecking=no`) refuses it too; a wrong `host_key:` in the inventory fails the same way."""
    with netns_host(tmp_path / "hostb") as h:
        first = launch(wd, hosts=_inventory(h), entry=PROBE, timeout_s=120)
        subnet, old_key = h.subnet, h.host_key_pub
    assert first.status == "success"
    with netns_host(tmp_path / "hostb2", subnet=subnet, key=h.key) as h2:
        assert h2.addr == h.addr and h2.host_key_pub != old_key
        with pytest.raises(StageError) as e:
            launch(wd, hosts=_inventory(h2), entry=PROBE, timeout_s=60)
        # What horovodrun runs for a remote rank, through the launcher's ssh wrapper of the first run.
        wrapper = Path(first.run_dir) / ".launcher" / "bin" / "ssh"
        hvd = subprocess.run([str(wrapper), "-o", "PasswordAuthentication=no", "-o", "StrictHostKeyChecking=no",
                              h2.addr, "-p", str(h2.ssh_port), "echo", "reached"],
                             capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        with pytest.raises(StageError) as e_inv:
            launch(wd, hosts=parse_inventory({"hosts": [{**h2.inventory_entry(slots=2), "host_key": old_key}]}),
                   entry=PROBE, timeout_s=60)
    msg = str(e.value)
    assert msg.startswith(f"preflight failed: host {h2.addr}:{h2.ssh_port} (ssh): host key changed") and "\n" not in msg
    assert str(wd / ".ssh" / "known_hosts") in msg
    assert hvd.returncode != 0 and "reached" not in hvd.stdout and "Host key verification failed" in hvd.stderr
    assert f"host {h2.addr}:{h2.ssh_port} (ssh): its host key is not the one the inventory pins" in str(e_inv.value)
    failed = [p for p in (wd / "runs").iterdir() if p != Path(first.run_dir)]
    assert len(failed) == 2 and all(_status(p) == "failed" and not list(p.glob("rank*")) for p in failed)
    # The pinned key was not replaced by the new one.
    assert old_key in (wd / ".ssh" / "known_hosts").read_text() and h2.host_key_pub not in (wd / ".ssh" / "known_hosts").read_text()


def test_node_sshd_started_by_the_image_entrypoint(wd, tmp_path):
    """infra/entrypoint.sh + infra/sshd_config as the node container runs them: sshd listens on the
    cluster address only, sessions get the image's environment from SetEnv (PATH included) and never
    from ~/.ssh/environment, TCP forwarding is refused, and the launcher trains through it."""
    repo = Path(__file__).resolve().parent.parent
    etc = tmp_path / "etc-rn50"
    etc.mkdir()
    (etc / "sshd_config").write_text((repo / "infra" / "sshd_config").read_text())
    (etc / "runtime.env").write_text("RN50_PROFILE_MARK=from-profile\nOMP_NUM_THREADS=1\n")
    node_path = "/opt/rn50-test/bin:" + os.environ.get("PATH", "/usr/bin:/bin")
    with netns_host(tmp_path / "hostb", node_etc=etc, node_env={"PATH": node_path, "PYTHONPATH": "/opt/rn50"}) as h:
        listening = subprocess.run(["ip", "netns", "exec", h.netns, "ss", "-Hltn"], capture_output=True, text=True).stdout
        known = tmp_path / "kh"
        known.write_text(f"[{h.addr}]:{h.ssh_port} {h.host_key_pub}\n")
        ssh = ["ssh", "-F", "none", "-i", str(h.key), "-p", str(h.ssh_port), "-o", "BatchMode=yes",
               "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known}", "-l", "root"]
        env = subprocess.run(ssh + ["--", h.addr, "env"], capture_output=True, text=True, timeout=30)
        forward = subprocess.run(ssh + ["-W", f"127.0.0.1:{h.ssh_port}", "--", h.addr],
                                 capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        res = launch(wd, hosts=_inventory(h), entry=PROBE, timeout_s=120)
    addrs = {line.split()[3] for line in listening.splitlines()}
    assert addrs == {f"{h.addr}:{h.ssh_port}"}, listening
    assert env.returncode == 0, env.stderr
    session = dict(line.split("=", 1) for line in env.stdout.splitlines() if "=" in line)
    # (root's ~/.bashrc on this machine may prepend to PATH; sshd's own default has no /opt/rn50-test/bin)
    assert "/opt/rn50-test/bin" in session["PATH"].split(":") and session["PYTHONPATH"] == "/opt/rn50"
    assert session["RN50_PROFILE_MARK"] == "from-profile" and "RN50_FROM_USER_ENVIRONMENT" not in session
    assert forward.returncode != 0 and "administratively prohibited" in forward.stderr, forward.stderr
    assert res.status == "success" and _probe_line(Path(res.run_dir), 1)["host"] == h.hostname


def test_two_host_gpu_preflight_names_each_failing_host(wd, tmp_path):
    """A GPU config (float16, 2 ranks) is preflighted on every host, over ssh for the remote one. No GPU exists
    here: host b's sessions get a fake `nvidia-smi` on their PATH (listing one GPU), this host has none at all;
    the real Horovod is Gloo-only. One clause per host: here no driver and no NCCL, there no NCCL."""
    repo = Path(__file__).resolve().parent.parent
    etc = tmp_path / "etc-rn50"
    etc.mkdir()
    (etc / "sshd_config").write_text((repo / "infra" / "sshd_config").read_text())
    (etc / "runtime.env").write_text("OMP_NUM_THREADS=1\n")
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text('#!/bin/sh\necho "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-fake-0)"\n')
    (fake / "nvidia-smi").chmod(0o755)
    cfg = tmp_path / "gpu-two.yaml"
    cfg.write_text("dtype: float16\nbatch_size: 32\nglobal_batch_size: 64\n")
    assert subprocess.run(["sh", "-c", "command -v nvidia-smi"], capture_output=True).returncode != 0
    with netns_host(tmp_path / "hostb", node_etc=etc, node_env={"PATH": f"{fake}:{os.environ['PATH']}"}) as h:
        with pytest.raises(StageError) as e:
            launch(wd, hosts=_inventory(h), config=str(cfg), entry=PROBE, timeout_s=120)
    nccl = (f"Horovod in {sys.executable} is built without NCCL (hvd.nccl_built() is false; build it with "
            "HOROVOD_GPU_OPERATIONS=NCCL: MXNET_BUILD=gpu make install, or train in the NGC-based image)")
    assert str(e.value) == (f"preflight failed: host {h.local_addr}: GPU preflight: no working NVIDIA driver "
                            f"(nvidia-smi not found), {nccl}; host {h.addr}:{h.ssh_port} (ssh): GPU preflight: {nccl}")
    (run_dir,) = list((wd / "runs").iterdir())
    assert _status(run_dir) == "failed" and not list(run_dir.glob("rank*"))
