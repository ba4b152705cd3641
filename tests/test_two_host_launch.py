"""Two hosts on one machine: this one, and a network namespace with its own hostname (UTS
namespace), its own view of the filesystem (mount namespace) and a real OpenSSH server reachable
only over a veth pair (tests/sshd_hosts.py). horovodrun reaches rank 1 over SSH with a throw-away key.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from tasks.common import StageError
from tasks.train import launch, parse_inventory
from tests.sshd_hosts import missing_requirements, netns_host

PROBE = [sys.executable, str(Path(__file__).with_name("hvd_probe.py"))]
pytestmark = [pytest.mark.timeout(600)]
_why = missing_requirements()
if _why:
    pytestmark.append(pytest.mark.skip(reason=f"cannot make a second host here: {_why}"))


@pytest.fixture
def wd(tmp_path):
    rec = tmp_path / "wd" / "recordio"
    rec.mkdir(parents=True)
    for split in ("train", "val"):
        (rec / f"{split}.rec").write_bytes(os.urandom(2 << 20))
        (rec / f"{split}.idx").write_text("".join(f"{i}\t{i * 100}\n" for i in range(20)))
    return tmp_path / "wd"


def _inventory(h, port=None, **extra):
    return parse_inventory({**extra, "hosts": [{"host": h.local_addr, "slots": 1, "interface": h.iface},
                                               h.inventory_entry(port=port)]})


def _probe_line(run_dir: Path, rank: int) -> dict:
    text = (run_dir / f"rank{rank}_0.log").read_text()
    m = re.search(r"PROBE rank=%d size=2 host=(\S+) netns=(\S+)" % rank, text)
    assert m, text
    return {"host": m.group(1), "netns": m.group(2)}


def test_two_host_rank1_runs_over_ssh_on_the_other_host(wd, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "AKIATWOHOSTSECRET")
    caplog.set_level("INFO", logger="rn50.train")
    with netns_host(tmp_path / "hostb", hostname="rn50-node-b") as h:
        res = launch(wd, hosts=_inventory(h), entry=PROBE, runs=1, seed=7, timeout_s=180)
        sshd_log = "".join(p.read_text() for p in (tmp_path / "hostb").glob("sshd_*.log"))
    run_dir = Path(res.run_dir)
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


def test_two_host_killed_remote_rank_fails_stage_then_retry_succeeds(wd, tmp_path):
    with netns_host(tmp_path / "hostb") as h:
        with pytest.raises(StageError) as e:
            launch(wd, hosts=_inventory(h, env={"PROBE_FAIL_RANK": "1"}), entry=PROBE, timeout_s=120)
        assert f"rank 1 on {h.addr} failed first" in str(e.value)
        assert "probe rank 1 failed on purpose" in str(e.value)
        ok = launch(wd, hosts=_inventory(h), entry=PROBE, timeout_s=120)
    assert ok.status == "succeeded"
    runs = sorted(p.name for p in (wd / "runs").iterdir())
    assert len(runs) == 2 and sum((wd / "runs" / r / "FAILED").exists() for r in runs) == 1


def test_two_host_real_training_tiny(tmp_path):
    """The real training package (python -m rn50.train) across the two hosts, cut to 2 epochs."""
    pytest.importorskip("rn50.train")
    from rn50.tinydata import make_recordio

    wd = tmp_path / "wd"
    make_recordio(wd / "recordio", classes=4, train_per_class=16, val_per_class=4, work=tmp_path / "images")
    with netns_host(tmp_path / "hostb") as h:
        res = launch(wd, hosts=_inventory(h), config="cpu-demo", runs=1, seed=1, timeout_s=900,
                     extra_args=["--set", "max_epochs=2", "--set", "warmup_epochs=1"])
    log = Path(res.results[0]).read_text()
    assert '"run_stop"' in log and '"cache_clear"' in log
    assert Path(res.run_dir, "rank1_0.log").exists()


def test_two_host_docker_runtime_checks_the_image_each_host_runs(wd, tmp_path):
    """runtime: docker means the ssh port is the node container's sshd; a host whose sshd is not in a
    container of the requested image (here: a plain netns host) fails preflight, naming host and image."""
    with netns_host(tmp_path / "hostb") as h:
        inv = parse_inventory({"runtime": "docker", "hosts": [h.inventory_entry()]})
        with pytest.raises(StageError) as e:
            launch(wd, hosts=inv, image="rn50:0123456789abcdef", timeout_s=60, entry=PROBE)
    assert f"host {h.addr}:{h.ssh_port} (ssh): the container on ssh port {h.ssh_port} does not run rn50:0123456789abcdef" in str(e.value)
