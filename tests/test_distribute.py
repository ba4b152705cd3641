"""The distribute stage (tasks/distribute.py, the backends' `distribute`): recordio onto node-local data dirs.

SSH: host A is this machine, host B a network namespace with a real sshd (tests/sshd_hosts.py) whose data dir is
an empty tmpfs (`hide`), so each host really has its own copy at the same path; B's files are read through
/proc/<pid>/root of a process in its mount namespace. Slurm: the real two-node cluster (tests/slurm_cluster.py)
with node B's data dir hidden the same way; the staging step runs inside the training job.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import fake_recordio, missing
from tasks.common import StageError
from tasks.distribute import distribute
from tasks.inventory import parse_inventory
from tasks.train import train
from tests import sshd_hosts

PROBE = [sys.executable, str(Path(__file__).with_name("hvd_probe.py"))]
ROOT = Path(__file__).resolve().parent.parent
RN50 = Path(sys.executable).with_name("rn50")
FILES = ("train.idx", "train.rec", "val.idx", "val.rec")
REC = 16 << 20  # train.rec: four 4 MiB chunks of the copy loop
pytestmark = [pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """A directory on this machine (host A's disk) that host B sees as its own empty disk."""
    return tmp_path_factory.mktemp("nodes")


def _host(tmp_path_factory, nodes, **kw):
    why = sshd_hosts.missing_requirements()
    if why:
        missing(f"cannot make a second host here: {why}")
    return sshd_hosts.netns_host(tmp_path_factory.mktemp("hostb"), hostname="rn50-node-b", hide=[nodes], **kw)


@pytest.fixture(scope="module")
def host_b(tmp_path_factory, nodes):
    with _host(tmp_path_factory, nodes) as h:
        yield h


@pytest.fixture
def wd(tmp_path):
    return fake_recordio(tmp_path / "wd", REC, val_bytes=3 << 20)


@pytest.fixture
def data_dir(nodes):
    return nodes / f"data-{secrets.token_hex(3)}"


def _doc(h, data_dir: Path, **keys) -> dict:
    return {"data_dir": str(data_dir), "data_local": True, **keys,
            "hosts": [{"host": h.local_addr, "slots": 1, "interface": h.iface}, h.inventory_entry(slots=1)]}


def on_b(h, path: Path) -> Path:
    """`path` as host B sees it (its mount namespace: the tmpfs over `nodes`)."""
    pid = subprocess.run(["ip", "netns", "pids", h.netns], capture_output=True, text=True).stdout.split()[0]
    return Path(f"/proc/{pid}/root") / Path(path).relative_to("/")


def _md5(p: Path) -> str:
    return hashlib.md5(p.read_bytes()).hexdigest()


def _same_as_source(wd: Path, d: Path) -> None:
    for name in FILES:
        assert _md5(d / name) == _md5(wd / "recordio" / name), name
    assert sorted(p.name for p in d.iterdir()) == [".rn50-verified", *FILES], "a .part was left at the end"


def _by_host(res) -> dict:
    return {r["host"]: r for r in res.hosts}


def test_a_fresh_host_gets_verified_copies_the_run_trains_and_a_second_run_skips(host_b, wd, data_dir):
    seen: dict[str, list] = {}
    res = distribute(wd, _doc(host_b, data_dir), progress=lambda h, done, total: seen.setdefault(h, []).append(
        (done, total)))
    b = host_b.inventory_entry()
    b_label = f"{b['host']}:{b['ssh_port']}"
    total = sum((wd / "recordio" / n).stat().st_size for n in FILES)
    assert not res.skipped and res.bytes_sent == 2 * total
    assert {r["host"]: r["action"] for r in res.hosts} == {host_b.local_addr: "copied", b_label: "copied"}
    assert seen[b_label][-1] == (total, total) and len(seen[b_label]) > 4  # bytes per host, chunk by chunk
    _same_as_source(wd, data_dir)
    _same_as_source(wd, on_b(host_b, data_dir))
    # Host B's copy is its own: nothing of it is in host A's directory (the tmpfs hides A's from B and back).
    assert on_b(host_b, data_dir).stat().st_dev != data_dir.stat().st_dev

    ran = train(wd, hosts=_doc(host_b, data_dir), entry=PROBE, timeout_s=300)
    assert ran.status == "success" and "host=rn50-node-b" in (Path(ran.run_dir) / "rank1_0.log").read_text()

    again = distribute(wd, _doc(host_b, data_dir))
    assert again.bytes_sent == 0 and {r["action"] for r in again.hosts} == {"verified"}
    assert all(f["action"] == "verified (stamp)" for r in again.hosts for f in r["files"].values())


def test_a_corrupted_byte_and_a_truncated_idx_are_copied_again_a_touched_file_is_reverified(host_b, wd, data_dir):
    doc = _doc(host_b, data_dir)
    distribute(wd, doc)
    rec_b, idx_b = on_b(host_b, data_dir / "train.rec"), on_b(host_b, data_dir / "val.idx")
    with open(rec_b, "r+b") as f:  # one byte in the middle: size and the sampled head/tail still match
        f.seek(REC // 2)
        byte = f.read(1)
        f.seek(REC // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    idx_b.write_bytes(idx_b.read_bytes()[:-7])
    os.utime(data_dir / "train.idx")  # host A: same bytes, new mtime: its stamp no longer matches

    res = _by_host(distribute(wd, doc))
    b = res[f"{host_b.addr}:{host_b.ssh_port}"]
    assert b["action"] == "copied" and {n: f["action"] for n, f in b["files"].items()} == {
        "train.idx": "verified (stamp)", "train.rec": "copied", "val.idx": "copied", "val.rec": "verified (stamp)"}
    assert b["files"]["train.rec"]["sent"] == REC and b["files"]["train.rec"]["resumed_from"] == 0
    a = res[host_b.local_addr]
    assert a["action"] == "verified" and a["bytes_sent"] == 0 and a["files"]["train.idx"]["action"] == "verified (md5)"
    _same_as_source(wd, on_b(host_b, data_dir))
    _same_as_source(wd, data_dir)


_KILLED = r"""
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
from tasks.distribute import distribute
victim = sys.argv[4]

def progress(host, done, total):
    if host == victim and done >= total // 2:
        os.kill(os.getpid(), signal.SIGKILL)  # the launcher dies half-way through host B's copy

distribute(sys.argv[2], json.loads(sys.argv[3]), progress=progress)
"""


def test_a_copy_killed_half_way_resumes_where_it_stopped(host_b, wd, data_dir):
    doc = _doc(host_b, data_dir)
    victim = f"{host_b.addr}:{host_b.ssh_port}"
    p = subprocess.run([sys.executable, "-c", _KILLED, str(ROOT), str(wd), json.dumps(doc), victim],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]
    part = on_b(host_b, data_dir / ".train.rec.part")
    assert 0 < part.stat().st_size < REC  # half a copy, and only under its temporary name
    assert not on_b(host_b, data_dir / "train.rec").exists()

    b = _by_host(distribute(wd, doc))[victim]
    rec = b["files"]["train.rec"]
    assert rec["action"] == "copied" and rec["resumed_from"] > 0 and rec["sent"] == REC - rec["resumed_from"] < REC
    _same_as_source(wd, on_b(host_b, data_dir))


def test_a_host_without_room_fails_in_one_line_naming_it_and_the_bytes(tmp_path_factory, nodes, wd, data_dir,
                                                                       tmp_path):
    with _host(tmp_path_factory, nodes, hide_size="4m") as small:
        hosts = tmp_path / "hosts.yaml"
        hosts.write_text(yaml.safe_dump(_doc(small, data_dir)))
        r = subprocess.run([str(RN50), "distribute", str(wd), "--hosts", str(hosts)], capture_output=True,
                           text=True, timeout=300)
        lines = r.stderr.strip().splitlines()
        need = sum((wd / "recordio" / n).stat().st_size for n in FILES)
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert lines[0].startswith(f"rn50 distribute: error: host {small.addr}:{small.ssh_port}: not enough space "
                                   f"under {data_dir}: the copy needs {need} bytes, "), lines[0]
        assert not on_b(small, data_dir).exists()  # nothing was written there


def test_a_hostile_data_dir_is_one_literal_path_on_every_host(host_b, wd, nodes, tmp_path):
    """data_dir reaches a shell on each host (sh -c here, ssh there): every use is quoted, so shell syntax in it
    names a directory and runs nothing."""
    marker = tmp_path / "pwned"
    data_dir = nodes / f"it's $(touch {marker}) `touch {marker}`; d-{secrets.token_hex(2)}"
    res = distribute(wd, _doc(host_b, data_dir))
    assert {r["action"] for r in res.hosts} == {"copied"} and not marker.exists()
    _same_as_source(wd, data_dir)
    _same_as_source(wd, on_b(host_b, data_dir))


def test_shared_or_unset_data_dir_is_skipped_with_its_reason(host_b, wd, data_dir):
    shared = distribute(wd, _doc(host_b, data_dir, data_local=False))
    assert shared.skipped and shared.reason.startswith(f"data_local is false: {data_dir} is on a file system the "
                                                       "hosts share")
    unset = distribute(wd, {"hosts": _doc(host_b, data_dir)["hosts"]})
    assert unset.skipped and "data_dir is unset" in unset.reason
    assert not data_dir.exists() and not on_b(host_b, data_dir).exists()


@pytest.mark.parametrize("keys, needle", [
    ({"data_local": "yes", "data_dir": "/d"}, "data_local must be true or false"),
    ({"data_local": True}, "data_local: true needs data_dir"),
])
def test_data_local_is_validated_as_data(keys, needle):
    with pytest.raises(StageError, match=needle):
        parse_inventory({**keys, "hosts": [{"host": "a"}]}, "hosts.yaml")


# --- the flow's stage: cached, with bytes per host in the UI ---------------------------------------------


_FLOW = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from prefect import flow, runtime
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from flows import stages

@flow(name="distribute-only")
def only(wd, hosts):
    states = [stages.distribute("k-" + sys.argv[4], wd, hosts=hosts, return_state=True) for _ in range(2)]
    return str(runtime.flow_run.id), [s.name for s in states], states[0].result()

run_id, states, result = only(sys.argv[2], sys.argv[3])
with get_client(sync_client=True) as c:
    arts = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
print(json.dumps({"states": states, "result": result,
                  "artifacts": [{"type": a.type, "key": a.key, "description": a.description, "data": a.data}
                                for a in arts]}))
"""


def test_the_flow_stage_shows_bytes_per_host_and_is_cached(bare_prefect_server, host_b, wd, data_dir, tmp_path):
    """A real Prefect server: the stage's progress artifacts (one per host, bytes) reach 100 %, a table names
    what each host got, and the second call with the same key is Cached without touching the hosts."""
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text(yaml.safe_dump(_doc(host_b, data_dir)))
    p = subprocess.run([sys.executable, "-c", _FLOW, str(ROOT), str(wd), str(hosts), secrets.token_hex(4)],
                       env=bare_prefect_server.env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["states"] == ["Completed", "Cached"]
    b_label = f"{host_b.addr}:{host_b.ssh_port}"
    bars = {a["description"]: a["data"] for a in out["artifacts"] if a["type"] == "progress"}
    assert bars == {f"distribute: bytes to {host_b.local_addr}": 100.0, f"distribute: bytes to {b_label}": 100.0}
    [table] = [a for a in out["artifacts"] if a["key"] == "distribution"]
    assert {r["host"]: r["action"] for r in json.loads(table["data"])} == {host_b.local_addr: "copied",
                                                                           b_label: "copied"}
    assert out["result"]["bytes_sent"] == 2 * sum((wd / "recordio" / n).stat().st_size for n in FILES)
    _same_as_source(wd, on_b(host_b, data_dir))


# --- Slurm: staging inside the training allocation --------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tmp_path_factory, nodes):
    from tests import slurm_cluster

    why = slurm_cluster.missing_requirements(two_nodes=True)
    if why:
        missing(f"no Slurm cluster here: {why}")
    with slurm_cluster.slurm_cluster(tmp_path_factory.mktemp("slurm"), second_node=True, hide=[nodes]) as c:
        yield c


def _slurm_doc(data_dir: Path) -> dict:
    return {"launcher": "slurm", "data_dir": str(data_dir), "data_local": True,
            "slurm": {"partition": "debug", "nodes": 2, "ntasks_per_node": 1, "time": "30", "poll_s": 0.5}}


def test_slurm_stages_on_each_node_inside_the_training_job(slurm, wd, data_dir, monkeypatch):
    """The flow's stage only reads the source's digests; the training job's first step (one task per node) copies
    recordio to each node's own data_dir, verified, and the ranks read it there; the next job finds the stamped
    copies and copies nothing."""
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    res = distribute(wd, _slurm_doc(data_dir))
    assert res.skipped and "inside the training job" in res.reason and res.hosts == []
    assert json.loads((wd / "recordio" / ".rn50-md5.json").read_text())["train.rec"]["md5"] == _md5(
        wd / "recordio" / "train.rec")

    node_b = slurm.nodes[1]
    b_dir = Path(f"/proc/{slurm.node_pids(node_b)[0]}/root") / data_dir.relative_to("/")
    for n in (1, 2):
        ran = train(wd, hosts=_slurm_doc(data_dir), entry=PROBE, timeout_s=300)
        run_dir = Path(ran.run_dir)
        job_id = json.loads((run_dir / "status.json").read_text())["handle"]["job_id"]
        logs = {p.name: p.read_text() for p in run_dir.glob("stage_*.log")}
        assert sorted(logs) == [f"stage_{node.name}.log" for node in slurm.nodes], logs
        for node in slurm.nodes:
            log = logs[f"stage_{node.name}.log"]
            assert f"rn50-stage: {node.name}: in job {job_id}\n" in log, log  # the training job's own allocation
            if n == 1:
                assert f"rn50-stage: {node.name}: copied train.rec ({REC} bytes from offset 0)" in log, log
            else:
                assert "copied" not in log and log.count(" stamp\n") == len(FILES), log
        assert "host=rn50-slurm-b" in (run_dir / "rank1_0.log").read_text()
        _same_as_source(wd, data_dir)
        _same_as_source(wd, b_dir)
        assert b_dir.stat().st_dev != data_dir.stat().st_dev
    assert slurm.squeue() == []


def test_slurm_staging_without_room_fails_the_job_before_any_rank_in_one_line(slurm, wd, monkeypatch):
    """A data_dir with no room on the nodes (here /proc, 0 bytes free): the staging step fails, naming the node and
    the bytes (the first node to fail stops the step: srun --kill-on-bad-exit), and no run starts."""
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    with pytest.raises(StageError) as e:
        train(wd, hosts=_slurm_doc(Path("/proc/rn50-no-room")), entry=PROBE, timeout_s=300)
    need = sum((wd / "recordio" / n).stat().st_size for n in FILES)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("run 0: slurm job ") and "staging the data failed: " in msg, msg
    errors = msg.split("staging the data failed: ", 1)[1].split("; ")
    names = "|".join(node.name for node in slurm.nodes)
    for err in errors:
        assert re.fullmatch(rf"node ({names}): not enough space under /proc/rn50-no-room: the copy needs {need} "
                            "bytes, 0 are free", err), msg
    (run_dir,) = (wd / "runs").iterdir()
    assert not list(run_dir.glob("rank*")) and slurm.squeue() == []
