"""Launch stage on this machine: real horovodrun (Gloo), real ranks, real failures.

The rank program is tests/hvd_probe.py (same CLI as `python -m rn50.train`, a real Horovod allreduce,
rank 0 writes result_<n>.txt) so these tests take seconds; test_two_host_* add a real second host and
the real training package.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from tasks.common import StageError
from tasks.train import Inventory, Host, launch, load_inventory, parse_inventory
from tests.sshd_hosts import closed_loopback_port

PROBE = [sys.executable, str(Path(__file__).with_name("hvd_probe.py"))]
pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def wd(tmp_path):
    rec = tmp_path / "wd" / "recordio"
    rec.mkdir(parents=True)
    for split, n in (("train", 3 << 20), ("val", 400_000)):
        (rec / f"{split}.rec").write_bytes(os.urandom(n))
        (rec / f"{split}.idx").write_text("".join(f"{i}\t{i * 1000}\n" for i in range(50)))
    return tmp_path / "wd"


def _local(**env) -> Inventory:
    return Inventory(hosts=(Host("localhost", 2),), env=tuple(sorted(env.items())))


def _status(run_dir) -> dict:
    return json.loads((Path(run_dir) / "status.json").read_text())


def test_local_default_runs_with_distinct_seeds(wd):
    res = launch(wd, entry=PROBE, runs=2, seed=100, timeout_s=120)
    run_dir = Path(res.run_dir)
    assert run_dir.parent == wd / "runs" and res.status == "succeeded" and res.np == 2
    assert res.seeds == [100, 101]
    for n in (0, 1):
        text = (run_dir / f"result_{n}.txt").read_text()
        assert '"cache_clear"' in text and f'"value": {100 + n}' in text and "run_stop" in text
        for rank in (0, 1):
            log = (run_dir / f"rank{rank}_{n}.log").read_text()
            # Real allreduce over both ranks: 1 + 2; the cpu profile reached the rank.
            assert f"PROBE rank={rank} allreduce=3" in log and "omp=1" in log
    assert sorted(res.result_md5) == ["result_0.txt", "result_1.txt"]
    assert _status(run_dir)["status"] == "succeeded" and not (run_dir / "FAILED").exists()


def test_failing_rank_fails_stage_and_retry_is_clean(wd):
    with pytest.raises(StageError) as e:
        launch(wd, hosts=_local(PROBE_FAIL_RANK="1"), entry=PROBE, timeout_s=120)
    msg = str(e.value)
    assert "rank 1 on localhost failed first" in msg and "probe rank 1 failed on purpose" in msg
    failed = [d for d in (wd / "runs").iterdir()]
    assert len(failed) == 1 and (failed[0] / "FAILED").exists() and _status(failed[0])["status"] == "failed"
    assert "RuntimeError: probe rank 1 failed on purpose" in (failed[0] / "rank1_0.log").read_text()
    # What a Prefect retry does: call again. A fresh run id; the failed attempt stays as it was.
    ok = launch(wd, entry=PROBE, timeout_s=120)
    assert Path(ok.run_dir) != failed[0] and ok.status == "succeeded"
    assert (failed[0] / "FAILED").exists() and not (Path(ok.run_dir) / "FAILED").exists()


def test_kill_one_rank_mid_run(wd, tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    inv = _local(PROBE_SLEEP="60", PROBE_PIDFILE_DIR=str(pids))
    killed = {}

    def killer():
        deadline = time.time() + 60
        while time.time() < deadline and not (pids / "rank1.pid").exists():
            time.sleep(0.1)
        time.sleep(0.5)
        killed["pid"] = int((pids / "rank1.pid").read_text())
        os.kill(killed["pid"], signal.SIGKILL)

    t = threading.Thread(target=killer)
    t.start()
    started = time.time()
    with pytest.raises(StageError) as e:
        launch(wd, hosts=inv, entry=PROBE, timeout_s=120)
    t.join()
    assert time.time() - started < 50, "the surviving rank must be torn down, not left to sleep"
    assert "rank 1 on localhost failed first (killed by signal 9)" in str(e.value)
    (failed,) = list((wd / "runs").iterdir())
    assert (failed / "FAILED").exists() and "PROBE rank=1" in (failed / "rank1_0.log").read_text()
    ok = launch(wd, entry=PROBE, timeout_s=120)
    assert ok.status == "succeeded" and Path(ok.run_dir) != failed


def test_hung_job_times_out_and_ranks_are_stopped(wd, tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    started = time.time()
    with pytest.raises(StageError, match="timed out after 6 s"):
        launch(wd, hosts=_local(PROBE_SLEEP="120", PROBE_PIDFILE_DIR=str(pids)), entry=PROBE, timeout_s=6)
    assert time.time() - started < 40
    time.sleep(1)
    for f in pids.iterdir():
        with pytest.raises(ProcessLookupError):
            os.kill(int(f.read_text()), 0)
    (run_dir,) = list((wd / "runs").iterdir())
    assert _status(run_dir)["status"] == "failed"


def test_unreachable_host_fails_preflight_before_any_rank(wd):
    port = closed_loopback_port("127.0.0.3")
    inv = parse_inventory({"hosts": [{"host": "localhost", "slots": 1},
                                     {"host": "127.0.0.3", "slots": 1, "ssh_port": port}]})
    with pytest.raises(StageError) as e:
        launch(wd, hosts=inv, entry=PROBE, timeout_s=60)
    msg = str(e.value)
    assert msg.startswith("preflight failed: ") and f"host 127.0.0.3:{port} (ssh): ssh unreachable" in msg
    assert "refused" in msg.lower() and "\n" not in msg
    (run_dir,) = list((wd / "runs").iterdir())
    assert not list(run_dir.glob("rank*")) and not list(run_dir.glob("launcher_*"))  # no rank started
    assert (run_dir / "FAILED").exists()


def test_missing_and_wrong_data_fail_preflight(wd):
    (wd / "recordio" / "val.idx").unlink()
    with pytest.raises(StageError, match=r"missing val.idx \(run `rn50 pack` first\)"):
        launch(wd, entry=PROBE)
    assert not (wd / "runs").exists()  # a bad input writes nothing
    # An inventory data_dir whose copy differs from the launcher's: named per file, per host.
    other = wd / "other"
    other.mkdir()
    for f in ("train.rec", "train.idx", "val.rec"):
        (other / f).write_bytes((wd / "recordio" / f).read_bytes())
    (wd / "recordio" / "val.idx").write_text("0\t0\n")
    (other / "val.idx").write_text("0\t1\n")
    inv = parse_inventory({"data_dir": str(other), "hosts": [{"host": "localhost", "slots": 2}]})
    with pytest.raises(StageError) as e:
        launch(wd, hosts=inv, entry=PROBE)
    assert f"host localhost: {other}/val.idx differs from the launcher's copy (md5 mismatch)" in str(e.value)


def test_not_enough_slots_and_free_disk(wd):
    with pytest.raises(StageError, match="3 ranks requested but the inventory has only 2 slots"):
        launch(wd, entry=PROBE, np=3)
    assert not (wd / "runs").exists()
    inv = parse_inventory({"min_free_bytes": 1 << 60, "hosts": [{"host": "localhost", "slots": 2}]})
    with pytest.raises(StageError, match=r"host localhost: only \d+ MiB free under .*, need \d+ MiB"):
        launch(wd, hosts=inv, entry=PROBE)


@pytest.mark.parametrize("doc, needle", [
    ({}, "needs a non-empty `hosts:` list"),
    ({"hosts": [{"slots": 2}]}, "hosts[0] needs at least `host:`"),
    ({"hosts": [{"host": "a", "slots": 0}]}, "hosts[0] (a): slots must be >= 1"),
    ({"hosts": [{"host": "a", "ssh_port": "x"}]}, "slots and ssh_port must be integers"),
    ({"hosts": [{"host": "a", "sshport": 22}]}, "unknown key(s) ['sshport']"),
    ({"hosts": [{"host": "a"}, {"host": "a"}]}, "listed twice"),
    ({"runtime": "k8s", "hosts": [{"host": "a"}]}, "runtime must be `local` or `docker`"),
    ({"hosts": [{"host": "a", "interface": "eth0"}, {"host": "b", "interface": "ib0"}]}, "one common NIC name"),
])
def test_bad_inventory_is_one_line(doc, needle):
    with pytest.raises(StageError) as e:
        parse_inventory(doc)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_inventory_examples_parse():
    root = Path(__file__).resolve().parent.parent / "configs" / "inventory"
    invs = {p.name: load_inventory(p) for p in root.glob("*.yaml")}
    assert invs["local.yaml"].hosts == (Host("localhost", 2),)
    assert invs["nf5488-docker.yaml"].runtime == "docker" and invs["nf5488-docker.yaml"].total_slots == 16


def test_no_secrets_in_logs_or_artifacts(wd, tmp_path, monkeypatch, caplog):
    """Credentials in the caller's environment and the ssh key must not reach ranks, logs or files."""
    secret_values = ["AKIAEXAMPLESECRET123", "prefect-api-key-s3cr3t", "hunter2-password"]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_values[0])
    monkeypatch.setenv("PREFECT_API_KEY", secret_values[1])
    monkeypatch.setenv("RN50_DB_PASSWORD", secret_values[2])
    key = tmp_path / "id_test"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAAtestkeymaterial\n"
                   "-----END OPENSSH PRIVATE KEY-----\n")
    inv = parse_inventory({"hosts": [{"host": "localhost", "slots": 2, "key": str(key)}]})
    caplog.set_level("INFO", logger="rn50.train")
    res = launch(wd, hosts=inv, entry=PROBE, timeout_s=120)
    blobs = [caplog.text] + [p.read_bytes().decode(errors="replace") for p in Path(res.run_dir).rglob("*") if p.is_file()]
    for needle in secret_values + ["b3BlbnNzaC1rZXktdjEAAAAAtestkeymaterial", "PRIVATE KEY"]:
        assert not any(needle in b for b in blobs), needle


def test_cli_train_exit_codes(wd, tmp_path, capsys):
    import argparse

    from tasks import train

    parser = argparse.ArgumentParser()
    train.add_command(parser.add_subparsers())
    bad = tmp_path / "bad.yaml"
    bad.write_text("hosts: [{host: localhost, slots: 0}]\n")
    args = parser.parse_args(["train", str(wd), "--hosts", str(bad)])
    with pytest.raises(StageError, match="slots must be >= 1"):
        args.run(args)
    args = parser.parse_args(["train", str(wd), "--config", "no-such-config"])
    with pytest.raises(StageError, match="no training config 'no-such-config'"):
        args.run(args)


def test_docker_runtime_command_runs_horovodrun_in_first_container(wd, tmp_path):
    """Runtime docker (no GPU cluster here, so checked at the command level): horovodrun runs inside
    the first host's container over its sshd port, with the container's python and the runtime profile,
    and without the launcher's PATH/HOME."""
    from tasks.train import _in_first_container, _rank_env, check_inputs, horovod_command

    inv = load_inventory(Path(__file__).resolve().parent.parent / "configs" / "inventory" / "nf5488-docker.yaml")
    with pytest.raises(StageError, match="runtime docker needs an image"):
        check_inputs(inv, wd / "recordio", 16, None)
    env = _rank_env(inv, None)
    argv = _in_first_container(inv, horovod_command(inv, 16, ["python", "-m", "rn50.train"]), env, tmp_path / "cfg")
    assert argv[:4] == ["ssh", "-F", str(tmp_path / "cfg"), "10.0.0.11"]
    remote = argv[4]
    assert "python -m horovod.runner.launch -np 16 -H 10.0.0.11:8,10.0.0.12:8 --mpi" in remote
    assert "-p 12345 --disable-cache --network-interfaces ib0 python -m rn50.train" in remote
    assert "HOROVOD_NUM_NCCL_STREAMS=2" in remote and "NCCL_SOCKET_IFNAME=ib0" in remote
    assert "PATH=" not in remote and sys.executable not in remote
