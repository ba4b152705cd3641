"""A real Slurm cluster for the Slurm launcher tests: Debian's slurm-wlm 22.05 and munge, private daemons.

`slurm_cluster(tmp)` starts a throw-away munged (own key and socket), slurmctld and one slurmd per node,
all with their state, spool, pid and log files under `tmp`, and stops them (and every job step left) on exit.

Nodes:
- one node (`second_node=False`): this machine's hostname at 127.0.0.1; everything binds loopback only.
- two nodes: a veth pair to a network namespace (like tests/sshd_hosts.py) that also has its own UTS and
  mount namespaces; node A is this machine at the veth's local address, node B the namespace at the other
  end, with its own hostname and a slurmd of its own. Both addresses exist only on that veth pair, and
  `CommunicationParameters=NoInAddrAny` makes every daemon bind its own address, never 0.0.0.0.
  `hide` lists directories that look empty on node B (tmpfs over them), to make "data missing on a node".

Clients (sbatch, srun, squeue, scontrol, scancel) find the cluster through `SLURM_CONF`:
`cluster.env` is what a test puts into os.environ.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from sshd_hosts import missing_netns

SLURMCTLD, SLURMD, MUNGED = "/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged"


def missing_requirements(two_nodes: bool = False) -> str | None:
    """Why a cluster cannot be started here, or None."""
    for path in (SLURMCTLD, SLURMD, MUNGED, "/usr/sbin/mungekey"):
        if not os.path.exists(path):
            return f"{path} is not installed (Debian: slurm-wlm, munge; scripts/install-system.sh)"
    for tool in ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian: slurm-client)"
    if os.geteuid() != 0:
        return "needs root (slurmd runs jobs as their submitting user; SlurmUser=root here)"
    return missing_netns() if two_nodes else None


def free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


@dataclass
class Node:
    name: str
    addr: str
    netns: str | None = None


@dataclass
class SlurmCluster:
    dir: Path
    conf: Path
    nodes: list[Node]
    partition: str = "debug"
    down_partition: str = "maint"
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    @property
    def ctld_log(self) -> Path:
        return self.dir / "slurmctld.log"

    def run(self, *argv: str, timeout: float = 20) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **self.env})

    def squeue(self) -> list[str]:
        out = self.run("squeue", "-h", "-o", "%i %T %j").stdout
        return [ln for ln in out.splitlines() if ln.strip()]

    def node_pids(self, node: Node) -> list[int]:
        """Processes in node B's network namespace (slurmd, its stepds and the ranks)."""
        if node.netns is None:
            return []
        out = subprocess.run(["ip", "netns", "pids", node.netns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]


def _wait(pred, what: str, timeout: float, logs: Sequence[Path] = ()) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.2)
    tail = ""
    for p in logs:
        if p.exists():
            tail += f"\n--- {p.name}:\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
    raise RuntimeError(f"{what} not within {timeout} s{tail}")


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


@contextlib.contextmanager
def slurm_cluster(tmp: Path, second_node: bool = False, cpus: int = 2, hide: Sequence[Path] = (),
                  node_a_name: str = "rn50-slurm-a", node_b_name: str = "rn50-slurm-b") -> Iterator[SlurmCluster]:
    d = Path(tmp)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o755)  # munged refuses group/world-writable directories on the key/socket path
    procs: list[subprocess.Popen] = []
    # slurmstepd's and munged's unix sockets live in the spool dir; their paths must stay under 108 bytes.
    short = Path(tempfile.mkdtemp(prefix="rn50sl-", dir="/tmp"))
    os.chmod(short, 0o755)
    env = dict(os.environ)
    tag = secrets.token_hex(3)
    netns = iface = None
    here = os.uname().nodename
    try:
        # --- network: loopback, or a veth pair into a fresh namespace -------------------------------
        if second_node:
            netns, iface, peer = f"rn50s{tag}", f"rn50w{tag}", f"rn50q{tag}"
            k = secrets.randbelow(250) + 2
            addr_a, addr_b = f"10.214.{k}.1", f"10.214.{k}.2"
            _run("ip", "netns", "add", netns)
            _run("ip", "link", "add", iface, "type", "veth", "peer", "name", peer, "netns", netns)
            _run("ip", "-n", netns, "link", "set", peer, "name", iface)
            _run("ip", "addr", "add", f"{addr_a}/30", "dev", iface)
            _run("ip", "link", "set", iface, "up")
            _run("ip", "-n", netns, "addr", "add", f"{addr_b}/30", "dev", iface)
            _run("ip", "-n", netns, "link", "set", iface, "up")
            _run("ip", "-n", netns, "link", "set", "lo", "up")
            # Node A stays in our network namespace but gets its own hostname (resolving to the veth address),
            # so that slurmd, slurmctld and the sruns of its batch scripts bind that address, which B reaches.
            here = node_a_name
            nodes = [Node(here, addr_a), Node(node_b_name, addr_b, netns)]
        else:
            addr_a = "127.0.0.1"
            nodes = [Node(here, addr_a)]

        # --- munge: own key, socket, pid, log, seed ----------------------------------------------
        key, sock = d / "munge.key", short / "munge.socket"
        _run("/usr/sbin/mungekey", "--create", "--keyfile", str(key), "--force")
        os.chmod(key, 0o400)
        procs.append(subprocess.Popen(
            [MUNGED, "--foreground", "--force", f"--key-file={key}", f"--socket={sock}", f"--pid-file={d / 'munged.pid'}",
             f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munged.seed'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        _wait(sock.exists, "munged socket", 10, [d / "munged.log"])

        # --- slurm.conf ------------------------------------------------------------------------------
        ctld_port, slurmd_port = free_port(addr_a), free_port(addr_a)
        srun_lo = 40000 + secrets.randbelow(20000)
        conf = d / "slurm.conf"
        node_lines = "\n".join(
            f"NodeName={n.name} NodeAddr={n.addr} NodeHostname={n.name} CPUs={cpus} State=UNKNOWN" for n in nodes)
        conf.write_text(f"""ClusterName=rn50t{tag}
SlurmctldHost={here}({addr_a})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SrunPortRange={srun_lo}-{srun_lo + 200}
CommunicationParameters=NoInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={short / 'spool-%n'}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd-%n.pid'}
SlurmctldLogFile={d / 'slurmctld.log'}
SlurmdLogFile={d / 'slurmd-%n.log'}
SlurmctldDebug=info
SlurmdDebug=info
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
KillWait=5
MessageTimeout=10
InactiveLimit=0
MinJobAge=5
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=maint Nodes=ALL MaxTime=INFINITE State=DOWN
""")
        (d / "state").mkdir(exist_ok=True)
        env["SLURM_CONF"] = str(conf)
        cluster = SlurmCluster(d, conf, nodes, procs=procs)

        # --- daemons -----------------------------------------------------------------------------------
        hosts_file = d / "hosts"
        hosts_file.write_text("127.0.0.1 localhost\n" + "".join(f"{n.addr} {n.name}\n" for n in nodes))

        def on_host(node: Node | None, argv: list[str]) -> list[str]:
            """Two-node mode: run argv with the node's own hostname and /etc/hosts (and, on node B, in its
            network namespace, with `hide` under tmpfs); the file system is otherwise shared (NFS/Lustre)."""
            if not second_node:
                return argv
            name = node.name if node else here
            mounts = f"mount --bind '{hosts_file}' /etc/hosts && "
            pre = ["unshare", "--uts", "--mount", "--propagation", "private"]
            if node is not None and node.netns:
                mounts += "".join(f"mount -t tmpfs rn50hide '{p}' && " for p in hide)
                # nsenter, not `ip netns exec`: that remounts /sys without the cgroup tree slurmd 22.05 needs.
                pre += ["nsenter", f"--net=/run/netns/{node.netns}"]
            return pre + ["sh", "-c", f"hostname '{name}' && {mounts}exec \"$0\" \"$@\"", *argv]

        procs.append(subprocess.Popen(on_host(None, [SLURMCTLD, "-D", "-i", "-f", str(conf)]), env=env,
                                      stdout=open(d / "slurmctld.out", "w"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
        for n in nodes:
            (short / f"spool-{n.name}").mkdir(exist_ok=True)
            argv = on_host(n, [SLURMD, "-D", "-f", str(conf), "-N", n.name])
            procs.append(subprocess.Popen(argv, env=env, stdout=open(d / f"slurmd-{n.name}.out", "w"),
                                          stderr=subprocess.STDOUT, start_new_session=True))

        def idle() -> bool:
            r = subprocess.run(["sinfo", "-h", "-p", "debug", "-N", "-o", "%N %t"], capture_output=True,
                               text=True, env=env, timeout=10)
            states = dict(ln.split() for ln in r.stdout.splitlines() if ln.strip())
            return len(states) == len(nodes) and all(s == "idle" for s in states.values())

        _wait(idle, "every slurmd idle", 30,
              [d / "slurmctld.log"] + [d / f"slurmd-{n.name}.log" for n in nodes] + [d / f"slurmd-{n.name}.out" for n in nodes])
        yield cluster
    finally:
        # Stop every job first (so no rank outlives the cluster), then the daemons, newest first.
        if "SLURM_CONF" in env:
            with contextlib.suppress(Exception):
                subprocess.run(["scancel", "--full", "--quiet", "--user", "root"], env=env, capture_output=True, timeout=10)
        if netns:
            for pid in subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for p in reversed(procs):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        # slurmstepd processes of the root-namespace node are children of no one we hold: find them by
        # their spool directory on the command line... they do not carry it; match the cluster's conf via
        # /proc/<pid>/environ instead (SLURM_CONF is in every stepd and rank environment).
        for pid in _pids_with_env("SLURM_CONF", str(d / "slurm.conf")):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if iface:
            subprocess.run(["ip", "link", "del", iface], capture_output=True)
        if netns:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        shutil.rmtree(short, ignore_errors=True)


def _pids_with_env(name: str, value: str) -> list[int]:
    needle = f"{name}={value}".encode()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            out.append(int(entry))
    return out
