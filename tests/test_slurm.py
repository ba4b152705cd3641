"""The Slurm backend's own behaviour against a real Slurm (Debian slurm-wlm 22.05 + munge; tests/slurm_cluster.py).
What every backend must do (cancel, kill -9, killed rank, config errors, hostile hosts files, lost slot, real
training) is in tests/test_launcher_conformance.py.

The cluster has two nodes: this machine (hostname rn50-slurm-a in its own UTS namespace) and a network
namespace with its own hostname and slurmd (rn50-slurm-b), joined by a veth pair; the file system is
shared, as NFS/Lustre would be. Rank 1 really runs on the second node. Ranks are tests/hvd_probe.py
(a real Horovod allreduce, same CLI as rn50.train) except in the real-training test.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import fake_recordio, missing
from tasks.common import StageError
from tasks.launch import slurm
from tasks.train import train
from tests.slurm_cluster import missing_requirements, slurm_cluster

PROBE = [sys.executable, str(Path(__file__).with_name("hvd_probe.py"))]
ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.timeout(600)]
_why = missing_requirements(two_nodes=True)
needs_cluster = pytest.mark.skipif(_why is not None, reason=f"no Slurm cluster here: {_why}")


def _doc(**slurm_keys) -> dict:
    return {"launcher": "slurm", "slurm": {"partition": "debug", "nodes": 2, "ntasks_per_node": 1, "time": "30",
                                           "poll_s": 0.5, **slurm_keys}}


@pytest.fixture
def wd(tmp_path):
    return fake_recordio(tmp_path / "wd", 1 << 20)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if _why:
        missing(_why)
    with slurm_cluster(tmp_path_factory.mktemp("slurm"), second_node=True) as c:
        yield c


@pytest.fixture
def on_cluster(cluster, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    yield cluster
    assert cluster.squeue() == [], "a job was left in the queue"


def _status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def _job_names(cluster) -> list[str]:
    """Jobs slurmctld accepted, from its log (accounting is off, so no sacct)."""
    return re.findall(r"_slurm_rpc_submit_batch_job: JobId=\d+ InitPrio=\d+", cluster.ctld_log.read_text())


# --- the inventory, as data -------------------------------------------------------------------------------


def test_slurm_inventory_parses_and_rejects_bad_values_in_one_line(tmp_path):
    spec = slurm.parse({**_doc(account="ml", extra_args=["--gres=gpu:8", "--qos=high", "--exclude=n3"],
                               container_image="reg.example:5000/rn50:abc"),
                        "data_dir": "/lustre/rec", "env": {"NCCL_DEBUG": "INFO"}})
    assert (spec.partition, spec.nodes, spec.ntasks, spec.time_s, spec.exclusive) == ("debug", 2, 2, 1800, True)
    assert slurm.enroot_image(spec.container_image) == "reg.example:5000#rn50:abc"
    assert slurm.enroot_image("nvcr.io/nvidia/mxnet:23.09-py3") == "nvcr.io#nvidia/mxnet:23.09-py3"
    assert [slurm.parse_time(t) for t in ("90", "01:30", "1:00:00", "1-00", "2-03:04:05")] == [5400, 90, 3600, 86400, 183845]
    bad = [
        ({"launcher": "slurm"}, "needs a `slurm:` mapping"),
        ({"launcher": "slurm", "slurm": {"nodes": 1}}, "slurm.partition is required"),
        (_doc(partition="debug; rm -rf /"), "slurm.partition"),
        (_doc(nodes=0), "slurm.nodes must be an integer >= 1"),
        (_doc(time="an hour"), "slurm.time 'an hour' is not a Slurm time"),
        (_doc(extra_args="--exclusive"), "slurm.extra_args must be a list"),
        (_doc(extra_args=["-w node1"]), "slurm.extra_args: '-w node1' is not one of the sbatch options it may add"),
        (_doc(extra_args=["--exp=ALL"]), "slurm.extra_args: '--exp=ALL' is not one of"),
        (_doc(extra_args=["--qos=a\nb"]), "slurm.extra_args"),
        (_doc(max_pending="soon"), "slurm.max_pending 'soon' is not a Slurm time"),
        (_doc(mpi="openmpi"), "slurm.mpi must be none, pmix or pmi2"),
        (_doc(colour="red"), "unknown slurm key(s) ['colour']"),
        ({**_doc(), "hosts": [{"host": "a"}]}, "unknown key(s) ['hosts']"),
        ({**_doc(), "data_dir": "relative/path"}, "data_dir must be an absolute path"),
    ]
    for doc, want in bad:
        with pytest.raises(StageError) as e:
            slurm.parse(doc, source="inv.yaml")
        assert want in str(e.value) and "\n" not in str(e.value), (doc, str(e.value))


def test_slurm_batch_script_quotes_every_value(tmp_path):
    """A hostile value (quotes, $(), ;) ends up as one literal argv element of srun, never shell syntax."""
    pwned = tmp_path / "pwned"
    evil = f"/data/it's $(touch {pwned}); `touch {pwned}`"
    spec = slurm.parse({**_doc(), "env": {"EVIL": evil}})
    fake = tmp_path / "bin"
    fake.mkdir()
    (tmp_path / "run" / ".slurm").mkdir(parents=True)
    script = slurm.batch_script(spec, tmp_path / "run", tmp_path / "run" / ".slurm",
                                {"EVIL": evil, "PATH": f"{fake}:/usr/bin:/bin"},
                                "/usr/bin/python3", [["python", "-m", "rn50.train", "--data", evil]], [])
    path = tmp_path / "job.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    # Run the script with `srun` replaced by a printer of its argv: the value arrives intact.
    (fake / "srun").write_text('#!/bin/bash\nfor a in "$@"; do printf "%s\\n" "$a"; done > "$ARGV_OUT"\n')
    (fake / "srun").chmod(0o755)
    out = tmp_path / "argv"
    r = subprocess.run(["bash", str(path)], env={"ARGV_OUT": str(out),
                                                 "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n1"},
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    argv = out.read_text().splitlines()
    assert argv[argv.index("--data") + 1] == evil and not pwned.exists()
    assert "export EVIL=" in script


def test_slurm_slots_must_equal_the_configs_ranks_before_anything(wd, tmp_path):
    """nodes x ntasks_per_node must be global_batch_size / batch_size (cpu-demo: 2): refused before slurmctld is
    asked anything (no SLURM_CONF needed) and before any run dir; from outside, `rn50 train` exits 2, one line."""
    import yaml

    with pytest.raises(StageError) as e:
        train(wd, hosts=_doc(ntasks_per_node=2), entry=PROBE, timeout_s=300)
    assert str(e.value).startswith("preflight: slurm nodes x ntasks_per_node = 2 x 2 = 4 slot(s), but config "
                                   "'cpu-demo' needs exactly 2 rank(s) (global_batch_size 64 = 2 x batch_size 32; "
                                   "4 rank(s) would train at global batch 128): set slurm.nodes x "
                                   "slurm.ntasks_per_node to 2"), str(e.value)
    assert not (wd / "runs").exists()
    inv = tmp_path / "cluster.yaml"
    inv.write_text(yaml.safe_dump(_doc(nodes=1)))
    r = subprocess.run([str(Path(sys.executable).with_name("rn50")), "train", str(wd), "--hosts", str(inv)],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "SLURM_CONF": "/nonexistent"})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "= 1 x 1 = 1 slot(s)" in lines[0], r.stderr
    assert not (wd / "runs").exists() and not list(wd.rglob("result_*.txt"))


# --- a real cluster --------------------------------------------------------------------------------------


@needs_cluster
def test_slurm_two_nodes_probe_ranks_one_job_for_two_runs(wd, on_cluster, caplog):
    caplog.set_level("INFO", logger="tasks.train")
    handles = []
    res = train(wd, hosts=_doc(), entry=PROBE, runs=2, seed=11, timeout_s=300, on_handle=handles.append)
    run_dir = Path(res.run_dir)
    assert res.status == "success" and res.np == 2 and res.hosts == ["rn50-slurm-a", "rn50-slurm-b"]
    assert res.runtime == "slurm"
    job_id = _status(run_dir)["handle"]["job_id"]
    states = [h.get("job_state") for h in handles if h.get("job_id") == job_id]
    assert states[-1] == "COMPLETED" and "RUNNING" in states
    for n in (0, 1):
        assert '"value": %d' % (11 + n) in (run_dir / f"result_{n}.txt").read_text()
        r0, r1 = (run_dir / f"rank0_{n}.log").read_text(), (run_dir / f"rank1_{n}.log").read_text()
        assert "host=rn50-slurm-a" in r0 and "host=rn50-slurm-b" in r1  # rank 1 really ran on node B
        netns = re.search(r"netns=(\S+)", r1).group(1)
        assert netns != os.readlink("/proc/self/ns/net")  # ... in its own network namespace
        assert "PROBE rank=1 allreduce=3" in r1  # a real cross-node allreduce over the Gloo rendezvous
    # One allocation for both runs, with --exclusive; the controller's log shows it.
    ctld = on_cluster.ctld_log.read_text()
    # 2 tasks but #CPUs=4: --exclusive took both nodes whole.
    assert f"sched: Allocate JobId={job_id} NodeList=rn50-slurm-a,rn50-slurm-b #CPUs=4 Partition=debug" in ctld, ctld[-2000:]
    assert "--exclusive" in caplog.text and f"slurm job {job_id}: RUNNING" in caplog.text
    assert "[run 1 rank 0] PROBE rank=0" in caplog.text  # rank output streamed into the stage log
    # sbatch's last option is --export=NONE: nothing before it can hand the job the worker's environment.
    sbatch = next(ln for ln in caplog.text.splitlines() if "sbatch: sbatch " in ln)
    assert sbatch.split()[-2] == "--export=NONE", sbatch


@needs_cluster
@pytest.mark.parametrize("doc, want", [
    (_doc(partition="nosuch"), "preflight failed: partition 'nosuch' does not exist"),
    (_doc(partition="maint"), "preflight failed: partition maint is DOWN, not UP"),
    (_doc(nodes=3), "preflight failed: partition debug has 2 node(s); slurm.nodes is 3"),
    (_doc(ntasks_per_node=3), "only 0 of 2 node(s) are up with 3 CPUs (ntasks_per_node=3); slurm.nodes is 2"),
    (_doc(time="5"), "slurm.time 5 is shorter than 1 run(s) x the 00:10:00 timeout (00:10:00)"),
])
def test_slurm_preflight_scheduler_errors_one_line_no_job(wd, on_cluster, doc, want):
    before = len(_job_names(on_cluster))
    spec = slurm.parse(doc)
    with pytest.raises(StageError) as e:  # a global batch that fits the slots: the scheduler's checks are reached
        train(wd, hosts=doc, entry=PROBE, timeout_s=600, extra_args=["--set", f"global_batch_size={32 * spec.ntasks}"])
    assert want in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert len(_job_names(on_cluster)) == before and not (wd / "runs").exists()


@needs_cluster
def test_slurm_preflight_data_missing_on_the_second_node(wd, tmp_path, monkeypatch):
    # On node B the recordio directory is an empty tmpfs: the probe job's task there cannot read it.
    with slurm_cluster(tmp_path / "cl", second_node=True, hide=[wd / "recordio"]) as c:
        monkeypatch.setenv("SLURM_CONF", str(c.conf))
        with pytest.raises(StageError) as e:
            train(wd, hosts=slurm.SlurmLauncher(slurm.parse(_doc()), probe_timeout_s=60), entry=PROBE, timeout_s=300)
        msg = str(e.value)
        assert msg.startswith("preflight failed: node rn50-slurm-b: ") and "\n" not in msg
        assert f"{wd / 'recordio'}/train.rec is missing or unreadable" in msg and "rn50-slurm-a" not in msg
        (run_dir,) = (wd / "runs").iterdir()
        assert not (run_dir / ".slurm" / "job.sh").exists() and "handle" not in _status(run_dir)
        assert len(_job_names(c)) == 1  # only the probe job was ever submitted
        assert c.squeue() == []


@needs_cluster
def test_slurm_gpu_preflight_through_the_probe_job(wd, on_cluster, tmp_path):
    """A GPU config (float16) on Slurm: the probe job checks, on every node in the ranks' environment, the GPUs
    (`nvidia-smi -L`), the driver and hvd.nccl_built() of the ranks' Python. No GPU exists here: a fake
    nvidia-smi, on the PATH the hosts file gives the ranks, lists one GPU on node A and none on node B; the real
    Horovod is Gloo-only, so both nodes fail on NCCL, each in one clause, and no training job is submitted."""
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text('#!/bin/sh\n[ "$(hostname)" = rn50-slurm-a ] && '
                                     'echo "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-fake-0)"\nexit 0\n')
    (fake / "nvidia-smi").chmod(0o755)
    cfg = tmp_path / "gpu-two.yaml"
    cfg.write_text("dtype: float16\nbatch_size: 32\nglobal_batch_size: 64\n")
    path = f"{fake}:{Path(sys.executable).parent}:{slurm.STD_PATH}"
    before = len(_job_names(on_cluster))
    with pytest.raises(StageError) as e:
        train(wd, hosts=slurm.SlurmLauncher(slurm.parse({**_doc(), "env": {"PATH": path}}), probe_timeout_s=120),
              config=str(cfg), entry=PROBE, timeout_s=300)
    msg = str(e.value)
    nccl = (f"Horovod in {sys.executable} is built without NCCL (hvd.nccl_built() is false; build it with "
            "HOROVOD_GPU_OPERATIONS=NCCL: MXNET_BUILD=gpu make install, or train in the NGC-based image)")
    assert msg == (f"preflight failed: node rn50-slurm-a: GPU preflight: {nccl}; "
                   f"node rn50-slurm-b: GPU preflight: 0 GPU(s) for 1 slot(s) (nvidia-smi -L), {nccl}"), msg
    (run_dir,) = (wd / "runs").iterdir()
    assert not (run_dir / ".slurm" / "job.sh").exists() and "handle" not in _status(run_dir)
    assert len(_job_names(on_cluster)) == before + 1  # the probe job only


@needs_cluster
def test_slurm_queue_wait_is_bounded_by_max_pending_with_slurms_reason(wd, on_cluster):
    """A job that cannot start (here: --begin an hour from now) is cancelled once it has been PENDING for
    slurm.max_pending, with Slurm's pending reason in the one-line error; nothing is left in the queue."""
    t0 = time.time()
    with pytest.raises(StageError) as e:
        train(wd, hosts=_doc(max_pending="0:03", extra_args=["--begin=now+3600"]), entry=PROBE, timeout_s=300)
    msg = str(e.value)
    assert re.fullmatch(r"slurm job \d+ still PENDING after slurm.max_pending 0:03 \(Slurm's reason: BeginTime\); "
                        r"cancelled", msg), msg
    assert time.time() - t0 < 120
    (run_dir,) = (wd / "runs").iterdir()
    assert _status(run_dir)["status"] == "failed" and _status(run_dir)["handle"]["job_state"] == "PENDING"


def test_slurm_inventory_examples_parse():
    examples = sorted((ROOT / "configs" / "inventory").glob("slurm-*.yaml"))
    specs = {p.name: slurm.parse(slurm.contract.read_hosts_file(p), str(p)) for p in examples}
    assert specs["slurm-cpu.yaml"].ntasks == 4 and specs["slurm-cpu.yaml"].exclusive
    gpu = specs["slurm-nf5488-pyxis.yaml"]
    assert gpu.ntasks == 16 and gpu.gpus_per_node == 8 and gpu.interface == "ib0"
