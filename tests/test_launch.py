"""Launch stage on this machine: real horovodrun (Gloo), real ranks, real failures.

The rank program is tests/hvd_probe.py (same CLI as `python -m rn50.train`, a real Horovod allreduce,
rank 0 writes result_<n>.txt) so these tests take seconds; test_two_host_* add a real second host and
the real training package.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tasks.common import StageError, TransientError
from tasks.inventory import Host, Inventory, load_inventory, parse_inventory
from tasks.train import train as launch
from tests.sshd_hosts import closed_loopback_port

PROBE = [sys.executable, str(Path(__file__).with_name("hvd_probe.py"))]
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICI4WqqdxNOI7HMu0pgRZkAzZ4tjDwci38CLAdILqEuv"  # a throw-away key
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
    assert run_dir.parent == wd / "runs" and res.status == "success" and res.np == 2
    assert res.seeds == [100, 101]
    for n in (0, 1):
        text = (run_dir / f"result_{n}.txt").read_text()
        assert '"cache_clear"' in text and f'"value": {100 + n}' in text and "run_stop" in text
        for rank in (0, 1):
            log = (run_dir / f"rank{rank}_{n}.log").read_text()
            # Real allreduce over both ranks: 1 + 2; the cpu profile reached the rank.
            assert f"PROBE rank={rank} allreduce=3" in log and "omp=1" in log
    assert sorted(res.result_md5) == ["result_0.txt", "result_1.txt"]
    assert _status(run_dir)["status"] == "success" and not (run_dir / "FAILED").exists()


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
    assert Path(ok.run_dir) != failed[0] and ok.status == "success"
    assert (failed[0] / "FAILED").exists() and not (Path(ok.run_dir) / "FAILED").exists()


@pytest.mark.parametrize("sig", [signal.SIGSEGV])
def test_kill_one_rank_mid_run(wd, tmp_path, sig):
    """A rank crashed in native code (MXNet's SIGSEGV handler) is a transient failure, which the train stage
    retries once; the surviving rank is torn down. (A rank killed by SIGKILL: tests/test_launcher_conformance.py.)"""
    pids = tmp_path / "pids"
    pids.mkdir()
    inv = _local(PROBE_SLEEP="60", PROBE_PIDFILE_DIR=str(pids))
    killed = {}

    def running() -> bool:  # rank 1 is past hvd.init and sleeping
        return (pids / "rank1.pid").exists() and any(
            "PROBE rank=1" in p.read_text() for p in (wd / "runs").glob("*/rank1_0.log"))

    def killer():
        deadline = time.time() + 60
        while time.time() < deadline and not running():
            time.sleep(0.1)
        time.sleep(0.5)
        killed["pid"] = int((pids / "rank1.pid").read_text())
        os.kill(killed["pid"], sig)

    t = threading.Thread(target=killer)
    t.start()
    started = time.time()
    with pytest.raises(TransientError) as e:
        launch(wd, hosts=inv, entry=PROBE, timeout_s=120)
    t.join()
    assert time.time() - started < 50, "the surviving rank must be torn down, not left to sleep"
    # MXNet's handler prints "Segmentation fault: 11", then exits 255 or, seen under load, aborts (signal 6).
    assert re.search(r"rank 1 on localhost failed first \((crashed in native code, exit \d+|killed by signal 6)\)",
                     str(e.value)), str(e.value)
    (failed,) = list((wd / "runs").iterdir())
    assert (failed / "FAILED").exists() and "PROBE rank=1" in (failed / "rank1_0.log").read_text()
    ok = launch(wd, entry=PROBE, timeout_s=120)
    assert ok.status == "success" and Path(ok.run_dir) != failed


def test_hung_job_times_out_and_ranks_are_stopped(wd, tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    started = time.time()
    with pytest.raises(StageError, match="timed out after 15 s"):
        launch(wd, hosts=_local(PROBE_SLEEP="120", PROBE_PIDFILE_DIR=str(pids)), entry=PROBE, timeout_s=15)
    assert time.time() - started < 15 + 30
    time.sleep(1)
    # Both ranks started (they write their pid before sleeping); each must be gone.
    assert sorted(f.name for f in pids.iterdir()) == ["rank0.pid", "rank1.pid"]
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


def test_free_disk(wd):
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
    from tasks.launch import read_hosts_file  # launcher: slurm examples are checked in tests/test_slurm.py

    invs = {p.name: load_inventory(p) for p in root.glob("*.yaml") if read_hosts_file(p).get("launcher") != "slurm"}
    assert invs["local.yaml"].hosts == (Host("localhost", 2),)
    assert invs["nf5488-docker.yaml"].runtime == "docker" and invs["nf5488-docker.yaml"].total_slots == 16


def test_no_secrets_in_logs_or_artifacts(wd, tmp_path, monkeypatch, caplog):
    """Credentials in the caller's environment and the ssh key must not reach ranks, logs or files.
    Each rank prints its whole environment into its log, so a secret that reaches a rank shows there
    (checked: AWS_SECRET_ACCESS_KEY added to tasks.train.ENV_ALLOWLIST fails this test)."""
    secret_values = ["AKIAEXAMPLESECRET123", "prefect-api-key-s3cr3t", "hunter2-password"]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_values[0])
    monkeypatch.setenv("PREFECT_API_KEY", secret_values[1])
    monkeypatch.setenv("RN50_DB_PASSWORD", secret_values[2])
    key = tmp_path / "id_test"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAAtestkeymaterial\n"
                   "-----END OPENSSH PRIVATE KEY-----\n")
    inv = parse_inventory({"env": {"PROBE_PRINT_ENV": "1"}, "hosts": [{"host": "localhost", "slots": 2, "key": str(key)}]})
    caplog.set_level("INFO", logger="tasks.train")
    res = launch(wd, hosts=inv, entry=PROBE, timeout_s=120)
    for rank in (0, 1):
        dumps = [ln for ln in (Path(res.run_dir) / f"rank{rank}_0.log").read_text().splitlines()
                 if ln.startswith("PROBE env ")]
        assert len(dumps) == 1, f"rank {rank} printed no environment"
        env = json.loads(dumps[0][len("PROBE env "):])
        assert env["OMP_NUM_THREADS"] == "1" and env["PROBE_PRINT_ENV"] == "1"  # the dump is the rank's real env
        assert not {"AWS_SECRET_ACCESS_KEY", "PREFECT_API_KEY", "RN50_DB_PASSWORD"} & set(env), sorted(env)
    blobs = [caplog.text] + [p.read_bytes().decode(errors="replace") for p in Path(res.run_dir).rglob("*") if p.is_file()]
    for needle in secret_values + ["b3BlbnNzaC1rZXktdjEAAAAAtestkeymaterial", "PRIVATE KEY"]:
        assert not any(needle in b for b in blobs), needle


def test_cli_train_exit_codes(wd, tmp_path, capsys):
    import argparse

    import tasks.train

    parser = argparse.ArgumentParser()
    tasks.train.add_command(parser.add_subparsers())
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
    from tasks.launch import Job, rank_environment
    from tasks.launch.ssh import SshLauncher
    from tasks.ssh import Trust

    launcher = SshLauncher(load_inventory(Path(__file__).resolve().parent.parent / "configs" / "inventory"
                                          / "nf5488-docker.yaml"))
    job = Job("r", wd / "runs" / "r", "/data", (("python", "-m", "rn50.train"),), {}, 60.0, str(wd))
    assert launcher.check(job) == ["preflight: runtime docker needs an image (pass image=… / --image, e.g. from "
                                   "`rn50 build`)"]
    env = rank_environment(launcher, "rn50:abc")
    known = tmp_path / "known_hosts"
    known.write_text(f"[10.0.0.12]:12345 {HOST_KEY}\n[10.0.0.99]:12345 ssh-ed25519 AAAAother\n")
    trust = Trust(tmp_path / "cfg", known)
    argv = launcher.in_first_container(launcher.command(["python", "-m", "rn50.train"]), env, trust)
    # Strict host keys, and `--` before the host.
    assert argv[:7] == ["ssh", "-F", str(tmp_path / "cfg"), "-o", "StrictHostKeyChecking=yes", "--", "10.0.0.11"]
    remote = argv[7]
    # horovodrun's ssh in the container trusts only the second host's pinned key.
    assert f"'[10.0.0.12]:12345 {HOST_KEY}'" in remote and "10.0.0.99" not in remote
    assert "StrictHostKeyChecking=yes" in remote and remote.index("PATH=\"$d:$PATH\"") < remote.index("horovod")
    assert "python -m horovod.runner.launch -np 16 -H 10.0.0.11:8,10.0.0.12:8 --mpi" in remote
    assert "-p 12345 --disable-cache --network-interfaces ib0 python -m rn50.train" in remote
    assert "HOROVOD_NUM_NCCL_STREAMS=2" in remote and "NCCL_SOCKET_IFNAME=ib0" in remote
    # Neither the launcher's PATH nor its interpreter: the container's own (only the wrapper dir is prepended).
    assert "PATH=/" not in remote and "PYTHONPATH" not in remote and sys.executable not in remote


# --- hostile inventories (issue 16): validated as data, before any ssh or horovodrun -------------------

MARK = "/tmp/rn50-hostile-{tag}"


@pytest.mark.parametrize("doc, field", [
    ({"hosts": [{"host": "node1\nHost *\n  ProxyCommand touch {mark}"}]}, "hosts[0].host"),
    ({"hosts": [{"host": "-oProxyCommand=touch {mark}"}]}, "hosts[0].host"),
    ({"hosts": [{"host": "a b"}]}, "hosts[0].host"),
    ({"hosts": [{"host": "a,b"}]}, "hosts[0].host"),
    ({"hosts": [{"host": "n*"}]}, "hosts[0].host"),
    ({"hosts": [{"host": "a", "user": "root\n  ProxyCommand touch {mark}"}]}, "hosts[0].user"),
    ({"hosts": [{"host": "a", "user": "-l"}]}, "hosts[0].user"),
    ({"hosts": [{"host": "a", "key": "/k\nProxyCommand touch {mark}"}]}, "hosts[0].key"),
    ({"hosts": [{"host": "a", "key": 'k" x'}]}, "hosts[0].key"),
    ({"hosts": [{"host": "a", "interface": "eth0;touch {mark}"}]}, "hosts[0].interface"),
    ({"interface": "eth0 ib0", "hosts": [{"host": "a"}]}, "interface"),
    ({"container": "rn50;touch {mark}", "hosts": [{"host": "a"}]}, "container"),
    ({"env": {"X;touch {mark};Y": "1"}, "hosts": [{"host": "a"}]}, "env key"),
    ({"env": {"1X": "1"}, "hosts": [{"host": "a"}]}, "env key"),
    ({"python": "python;touch {mark}", "hosts": [{"host": "a"}]}, "python"),
    ({"data_dir": "relative/dir", "hosts": [{"host": "a"}]}, "data_dir"),
    ({"work_dir": "/w\n", "hosts": [{"host": "a"}]}, "work_dir"),
    ({"known_hosts": "/k\nx", "hosts": [{"host": "a"}]}, "known_hosts"),
    ({"min_free_bytes": "lots", "hosts": [{"host": "a"}]}, "min_free_bytes"),
    ({"hosts": [{"host": "a", "host_key": "ssh-ed25519 not-base64!"}]}, "hosts[0].host_key"),
    ({"hosts": [{"host": "a", "host_key": "ssh-rsa " + HOST_KEY.split()[1]}]}, "hosts[0].host_key"),  # type lies
    ({"launcher": "slurm", "hosts": [{"host": "a"}]}, "an inventory of hosts is for `launcher: ssh`"),
    ({"known_host": "/x", "hosts": [{"host": "a"}]}, "unknown key(s) ['known_host']"),
])
def test_hostile_inventory_values_are_one_line_errors_naming_the_field(doc, field):
    doc = json.loads(json.dumps(doc).replace("{mark}", MARK.format(tag="x")))
    with pytest.raises(StageError) as e:
        parse_inventory(doc, source="inv.yaml")
    msg = str(e.value)
    assert msg.startswith(f"inv.yaml: {field}") or field in msg, msg
    assert "\n" not in msg


def test_good_inventory_values_parse():
    inv = parse_inventory({"interface": "rn50v1a2b3c", "container": "rn50-node_2", "python": "/opt/py/bin/python3",
                           "env": {"NCCL_DEBUG": "INFO", "_X1": "a b;c'd"}, "known_hosts": "/etc/rn50/known_hosts",
                           "hosts": [{"host": "node-1.cluster", "user": "ml_user", "key": "~/.ssh/id_ed25519",
                                      "host_key": HOST_KEY + " root@node-1"},
                                     {"host": "10.0.0.12", "ssh_port": 12345, "host_key": [HOST_KEY]}]})
    assert inv.hosts[0].host_key == (HOST_KEY,) and inv.hosts[0].key.endswith("/.ssh/id_ed25519")
    assert inv.hosts[1].known_hosts_name == "[10.0.0.12]:12345" and inv.launcher == "ssh"
    assert dict(inv.env)["_X1"] == "a b;c'd"


@pytest.mark.parametrize("case", ["host", "env"])
def test_hostile_inventory_runs_nothing(wd, case):
    """Issue 16's reproductions: a host whose newline became ssh_config directives (the preflight ran the
    ProxyCommand), an env key that Horovod ran through a shell. Both now stop before any ssh or rank."""
    mark = Path(MARK.format(tag=f"{case}-{os.getpid()}"))
    mark.unlink(missing_ok=True)
    doc = {"hosts": [{"host": "localhost", "slots": 2}]}
    if case == "host":
        doc["hosts"].append({"host": f"127.0.0.2\nHost *\n  ProxyCommand touch {mark}", "slots": 1})
        field = "hosts[1].host"
    else:
        doc["env"] = {f"X;touch {mark};Y": "1"}
        field = "env key"
    try:
        with pytest.raises(StageError, match=re.escape(field)):
            launch(wd, hosts=parse_inventory(doc), entry=PROBE, timeout_s=60)
        assert not mark.exists(), "a hostile inventory value ran a command"
        assert not (wd / "runs").exists()
    finally:
        mark.unlink(missing_ok=True)


def test_env_values_reach_ranks_verbatim(wd):
    """Values are quoted wherever they reach a shell: shell syntax in a value is data for the rank."""
    value = "a b;touch /tmp/rn50-never $(id) `id` 'q' \"d\""
    res = launch(wd, hosts=_local(PROBE_PRINT_ENV="1", RN50_ODD=value), entry=PROBE, timeout_s=120)
    line = next(ln for ln in (Path(res.run_dir) / "rank1_0.log").read_text().splitlines() if ln.startswith("PROBE env "))
    assert json.loads(line[len("PROBE env "):])["RN50_ODD"] == value and not Path("/tmp/rn50-never").exists()


def test_ssh_commands_put_double_dash_before_the_host(tmp_path):
    from tasks.ssh import Remote

    argv = Remote(Host("10.0.0.12", 1, 22), tmp_path / "cfg").argv("true", first_contact=True)
    assert argv[argv.index("--") + 1] == "10.0.0.12" and argv[-1] == "true"
    assert "StrictHostKeyChecking=accept-new" in argv  # only the preflight's first contact may pin a key
    pinned = Remote(Host("10.0.0.12", 1, 22, host_key=(HOST_KEY,)), tmp_path / "cfg").argv("true", first_contact=True)
    assert "StrictHostKeyChecking=yes" in pinned  # a key the inventory gives is never replaced


def test_ssh_config_is_strict_and_quoted(tmp_path):
    from tasks.ssh import setup, write_wrapper

    inv = parse_inventory({"hosts": [{"host": "a", "ssh_port": 2222, "user": "u", "key": "/keys/my key%h"},
                                     {"host": "b", "host_key": HOST_KEY}]})
    trust = setup(tmp_path, inv.hosts, tmp_path / "kh")
    cfg = trust.config.read_text()
    assert "StrictHostKeyChecking yes" in cfg and "StrictHostKeyChecking no" not in cfg
    assert 'IdentityFile "/keys/my key%%h"' in cfg and f'UserKnownHostsFile "{tmp_path / "kh"}"' in cfg
    assert trust.inventory_keys.read_text() == f"b {HOST_KEY}\n"
    assert f'Host b\n  UserKnownHostsFile "{trust.inventory_keys}"' in cfg
    # horovodrun's ssh: Horovod adds `-o StrictHostKeyChecking=no`; ssh keeps the first value, ours.
    wrapper = write_wrapper(tmp_path / "bin", trust.config).read_text()
    assert wrapper.index("StrictHostKeyChecking=yes") < wrapper.index('"$@"')


def test_container_wrapper_script_trusts_only_the_given_keys(tmp_path):
    from tasks.ssh import container_wrapper_script

    lines = [f"[10.0.0.12]:12345 {HOST_KEY}", "odd 'quote' $(id)"]
    out = subprocess.run(["sh", "-c", container_wrapper_script(lines) + ' && cat "$d/known_hosts" "$(command -v ssh)"'],
                         capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("\n".join(lines) + "\n#!/bin/sh\nexec ")
    assert "-o StrictHostKeyChecking=yes" in out.stdout and "/known_hosts" in out.stdout


def test_workdir_unsafe_for_a_remote_shell_is_refused(tmp_path):
    odd = tmp_path / "my work;dir"
    (odd / "recordio").mkdir(parents=True)
    inv = parse_inventory({"hosts": [{"host": "localhost", "slots": 1}, {"host": "127.0.0.2", "slots": 1, "ssh_port": 1}]})
    with pytest.raises(StageError, match="passes through their shell unquoted"):
        launch(odd, hosts=inv, entry=PROBE)
    assert not (odd / "runs").exists()


# --- world size from the config, GPU preflight (issue 12) ------------------------------------------------
# No GPU exists on this machine: the GPU paths are driven by a fake `nvidia-smi` put first on PATH, which
# prints what the real one prints for `-L` (or fails as it does without a driver). Horovod is the real
# one here, built with Gloo only, so a GPU config must fail preflight on NCCL.

RN50 = Path(sys.executable).with_name("rn50")


def _fake_nvidia_smi(tmp_path, gpus: int = 0, fail: bool = False) -> Path:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    body = ('echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver." >&2; exit 9'
            if fail else "".join(f'echo "GPU {i}: NVIDIA A100-SXM4-40GB (UUID: GPU-fake-{i})"\n' for i in range(gpus)))
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n[ \"$1\" = -L ] || exit 2\n{body}\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    return bin_dir


def _config(tmp_path, name: str, **settings) -> str:
    import yaml

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def _nothing_written(wd: Path) -> bool:
    return not (wd / "runs").exists() and not list(wd.rglob("result_*.txt"))


@pytest.mark.parametrize("slots", [1, 3])
def test_inventory_slots_must_equal_the_configs_ranks(wd, slots):
    """cpu-demo states global_batch_size 64 = 2 x 32: 1 or 3 slots is refused before anything runs or is written."""
    inv = parse_inventory({"hosts": [{"host": "localhost", "slots": slots}]})
    with pytest.raises(StageError) as e:
        launch(wd, hosts=inv, entry=PROBE, timeout_s=60)
    msg = str(e.value)
    assert msg.startswith(f"preflight: the inventory has {slots} slot(s), but config 'cpu-demo' needs exactly 2 rank(s) "
                          f"(global_batch_size 64 = 2 x batch_size 32; {slots} rank(s) would train at global batch "
                          f"{32 * slots})"), msg
    assert "\n" not in msg and _nothing_written(wd)


def test_launcher_reads_the_overrides_the_ranks_get(wd):
    """`--set` in the rank program's arguments changes the config the ranks run: the launcher counts with it."""
    from tasks.train import ranks_needed, training_config

    assert ranks_needed(training_config("cpu-demo", ["--set", "global_batch_size=96"])) == 3
    assert ranks_needed(training_config("cpu-demo", ["--set=batch_size=16"])) == 4
    with pytest.raises(StageError, match=r"has 2 slot\(s\), but config 'cpu-demo' needs exactly 3 rank\(s\)"):
        launch(wd, hosts=_local(), entry=PROBE, extra_args=["--set", "global_batch_size=96"], timeout_s=60)
    with pytest.raises(StageError, match=r"training config 'cpu-demo': global_batch_size 65 is not a multiple"):
        launch(wd, entry=PROBE, extra_args=["--set", "global_batch_size=65"], timeout_s=60)
    assert _nothing_written(wd)


def test_cli_wrong_slots_exits_2_one_line_nothing_written(wd, tmp_path):
    """The contract from outside: `rn50 train WORKDIR --hosts INV` with the wrong number of slots."""
    inv = tmp_path / "three.yaml"
    inv.write_text("hosts:\n  - {host: localhost, slots: 3}\n")
    r = subprocess.run([str(RN50), "train", str(wd), "--hosts", str(inv)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "3 slot(s)" in lines[0] and "needs exactly 2 rank(s)" in lines[0], r.stderr
    assert r.stdout == "" and _nothing_written(wd)
    # --np is gone: the number of ranks comes from the config, nothing can contradict it.
    r = subprocess.run([str(RN50), "train", str(wd), "--np", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unrecognized arguments: --np 2" in r.stderr and _nothing_written(wd)


def test_cpu_config_local_default_is_global_over_per_rank_batch(wd, tmp_path, monkeypatch):
    """No --hosts and a CPU config: global_batch_size / batch_size ranks (here 3), really launched, without
    asking nvidia-smi (the fake one on PATH would fail) and without a GPU preflight."""
    monkeypatch.setenv("PATH", f"{_fake_nvidia_smi(tmp_path, fail=True)}:{os.environ['PATH']}")
    cfg = _config(tmp_path, "cpu-three", batch_size=32, global_batch_size=96)
    res = launch(wd, config=cfg, entry=PROBE, timeout_s=180)
    assert res.status == "success" and res.np == 3 and res.hosts == ["localhost:3"]
    for rank in range(3):
        assert f"PROBE rank={rank} size=3" in (Path(res.run_dir) / f"rank{rank}_0.log").read_text()


def test_gpu_config_local_default_counts_gpus(wd, tmp_path, monkeypatch):
    """No --hosts and a GPU config (nf5488-8xa100: 8 ranks): the slots are the GPUs `nvidia-smi -L` lists."""
    monkeypatch.setenv("PATH", f"{_fake_nvidia_smi(tmp_path, gpus=4)}:{os.environ['PATH']}")
    with pytest.raises(StageError) as e:
        launch(wd, config="nf5488-8xa100", entry=PROBE, timeout_s=60)
    assert str(e.value).startswith("preflight: this host (no --hosts) has 4 GPU(s), so 4 slot(s), but config "
                                   "'nf5488-8xa100' needs exactly 8 rank(s)"), str(e.value)
    assert _nothing_written(wd)
    # 8 GPUs: the slot count fits, so the GPU preflight runs, and this Gloo-only Horovod has no NCCL.
    _fake_nvidia_smi(tmp_path, gpus=8)
    with pytest.raises(StageError) as e:
        launch(wd, config="nf5488-8xa100", entry=PROBE, timeout_s=60)
    msg = str(e.value)
    assert msg == (f"preflight failed: host localhost: GPU preflight: Horovod in {sys.executable} is built without "
                   "NCCL (hvd.nccl_built() is false; build it with HOROVOD_GPU_OPERATIONS=NCCL: MXNET_BUILD=gpu make "
                   "install, or train in the NGC-based image)"), msg
    (run_dir,) = list((wd / "runs").iterdir())
    assert not list(run_dir.glob("rank*")) and not list(run_dir.glob("result_*"))  # no rank started
    # No nvidia-smi at all: no driver, said in one line.
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with pytest.raises(StageError, match=r"^no --hosts and a GPU config, but `nvidia-smi` is not installed here"):
        launch(wd, config="nf5488-8xa100", entry=PROBE, timeout_s=60)


@pytest.mark.parametrize("fake, want", [
    ({"gpus": 2}, "GPU preflight: 2 GPU(s) for 8 slot(s) (nvidia-smi -L), Horovod in "),
    ({"fail": True}, "GPU preflight: no working NVIDIA driver (nvidia-smi -L exit 9: NVIDIA-SMI has failed because "
                     "it couldn't communicate with the NVIDIA driver.), Horovod in "),
])
def test_gpu_preflight_per_host_gpus_driver_nccl(wd, tmp_path, monkeypatch, fake, want):
    """An inventory of 8 slots for the 8-rank GPU config: each GPU problem of the host is named in its one clause."""
    monkeypatch.setenv("PATH", f"{_fake_nvidia_smi(tmp_path, **fake)}:{os.environ['PATH']}")
    inv = parse_inventory({"hosts": [{"host": "localhost", "slots": 8}]})
    with pytest.raises(StageError) as e:
        launch(wd, hosts=inv, config="nf5488-8xa100", entry=PROBE, timeout_s=60)
    msg = str(e.value)
    assert msg.startswith("preflight failed: host localhost: " + want) and "without NCCL" in msg, msg
    assert msg.count("host localhost") == 1 and "\n" not in msg
