"""A second "host" on this machine for launcher tests: a network namespace joined to ours by a veth
pair, its own UTS namespace (so its hostname differs), its own mount namespace (so a test can hide
files from it), and a real OpenSSH server (Debian openssh-server) reachable only through the veth.

Addresses are 10.213.<k>.1 (our end) and 10.213.<k>.2 (its end); they exist only on this veth pair.
Both ends carry the same interface name, so Horovod finds one common NIC name on both hosts.
Everything is torn down by the context manager that created it.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

SSHD = "/usr/sbin/sshd"


def missing_netns() -> str | None:
    """Why a network namespace cannot be made here (tools, rights), or None."""
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian: iproute2 / util-linux)"
    probe = f"rn50probe{secrets.token_hex(2)}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def missing_requirements() -> str | None:
    """Why a netns host cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (ip netns, sshd)"
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian: openssh-client)"
    if not os.path.exists(SSHD):
        return f"{SSHD} is not installed (Debian: openssh-server)"
    return missing_netns()


@dataclass
class NetnsHost:
    netns: str
    hostname: str
    iface: str
    local_addr: str  # our end of the veth
    addr: str  # the host's address (sshd listens here)
    ssh_port: int
    key: Path  # throw-away client private key authorised on this host
    host_key: Path  # the sshd's private host key (its public half: host_key_pub)
    subnet: int  # k in 10.213.<k>.0/30: pass it to a new netns_host to get the same address
    user: str = "root"

    @property
    def host_key_pub(self) -> str:
        """`TYPE BASE64` of the sshd's host key, as an inventory's `host_key:` or a known_hosts line holds it."""
        return " ".join(Path(f"{self.host_key}.pub").read_text().split()[:2])

    def inventory_entry(self, slots: int = 1, port: int | None = None) -> dict:
        return {"host": self.addr, "slots": slots, "ssh_port": port or self.ssh_port, "user": self.user,
                "key": str(self.key), "interface": self.iface}


def make_key(directory: Path) -> Path:
    key = directory / "id_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rn50-test", "-f", str(key)], check=True)
    return key


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


def _wait_port(addr: str, port: int, netns: str, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        # Connect from our side of the veth: that is the path the launcher's ssh takes.
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((addr, port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"sshd in {netns} did not listen on {addr}:{port} within {timeout} s")


@contextlib.contextmanager
def netns_host(workdir: Path, hostname: str = "rn50-node-b", ssh_port: int = 2222,
               hide: Sequence[Path] = (), key: Path | None = None, subnet: int | None = None,
               node_etc: Path | None = None, node_env: dict[str, str] | None = None,
               hide_size: str | None = None) -> Iterator[NetnsHost]:
    """Start the host; `hide` lists directories that appear empty on it (tmpfs mounted over them, each at most
    `hide_size` big when given, e.g. "2m": a small disk).
    Every start gets a fresh sshd host key; `subnet` reuses an earlier host's address (a reinstalled node).

    `node_etc`: start sshd the way the rn50 image does instead, with infra/entrypoint.sh (RN50_ETC=node_etc,
    which holds sshd_config and runtime.env; RN50_SSH_LISTEN = the host's address; `node_env` added to
    its environment). root's home then gets (in the host's mount namespace only) the authorized key and a ~/.ssh/environment
    that sets RN50_FROM_USER_ENVIRONMENT=1 (which sshd must ignore)."""
    workdir.mkdir(parents=True, exist_ok=True)
    tag = secrets.token_hex(3)
    netns, iface, peer = f"rn50t{tag}", f"rn50v{tag}", f"rn50p{tag}"
    k = subnet if subnet is not None else secrets.randbelow(250) + 2
    local_addr, addr = f"10.213.{k}.1", f"10.213.{k}.2"
    key = key or make_key(workdir)
    host_key = workdir / f"host_{tag}"
    if node_etc is None:
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key))
    (workdir / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
    cfg = workdir / f"sshd_config_{tag}"
    cfg.write_text(
        f"Port {ssh_port}\nListenAddress {addr}\nHostKey {host_key}\n"
        f"AuthorizedKeysFile {workdir / 'authorized_keys'}\nPidFile {workdir / f'sshd_{tag}.pid'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\nPrintMotd no\nUseDNS no\nMaxStartups 50\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    proc = None
    _run("ip", "netns", "add", netns)
    try:
        _run("ip", "link", "add", iface, "type", "veth", "peer", "name", peer, "netns", netns)
        _run("ip", "-n", netns, "link", "set", peer, "name", iface)
        _run("ip", "addr", "add", f"{local_addr}/30", "dev", iface)
        _run("ip", "link", "set", iface, "up")
        _run("ip", "-n", netns, "addr", "add", f"{addr}/30", "dev", iface)
        _run("ip", "-n", netns, "link", "set", iface, "up")
        _run("ip", "-n", netns, "link", "set", "lo", "up")
        # Like any host, it resolves its own name (Gloo looks it up): its own /etc/hosts.
        hosts_file = workdir / f"hosts_{tag}"
        hosts_file.write_text(f"127.0.0.1 localhost\n{addr} {hostname}\n")
        mounts = f"mount --bind {hosts_file} /etc/hosts && "
        size = f"-o size={hide_size} " if hide_size else ""
        mounts += "".join(f"mount -t tmpfs {size}rn50hide '{p}' && " for p in hide)
        start = f"exec {SSHD} -D -e -f {cfg}"
        if node_etc is not None:
            host_key = node_etc / "hostkeys" / "ssh_host_ed25519_key"
            entry = Path(__file__).resolve().parent.parent / "infra" / "entrypoint.sh"
            env = " ".join(shlex.quote(f"{k}={v}") for k, v in {
                **(node_env or {}), "RN50_ETC": str(node_etc), "RN50_STATE_DIR": str(workdir / f"state_{tag}"),
                "RN50_SSH_LISTEN": addr}.items())
            # root's home gets a private overlay (the real /root below it, unchanged: the venv's
            # interpreter may live there), so the authorized key exists only in this namespace.
            ovl = workdir / f"root_{tag}"
            mounts += (f"mkdir -p {ovl} && mount -t tmpfs rn50root {ovl} && mkdir {ovl}/u {ovl}/w && "
                       f"mount -t overlay rn50root -o lowerdir=/root,upperdir={ovl}/u,workdir={ovl}/w /root && "
                       "mkdir -m 700 /root/.ssh && "
                       f"cp {workdir / 'authorized_keys'} /root/.ssh/authorized_keys && "
                       "echo RN50_FROM_USER_ENVIRONMENT=1 > /root/.ssh/environment && ")
            start = f"exec env {env} sh {entry} sshd {ssh_port}"
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, "unshare", "--uts", "--mount", "--propagation", "private",
             "sh", "-c", f"hostname {hostname} && {mounts}{start}"],
            stdout=subprocess.DEVNULL, stderr=open(workdir / f"sshd_{tag}.log", "w"),
        )
        _wait_port(addr, ssh_port, netns)
        yield NetnsHost(netns, hostname, iface, local_addr, addr, ssh_port, key, host_key, k)
    finally:
        # Everything left in the namespace was started by this host (sshd and its sessions' ranks).
        pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(10)
        subprocess.run(["ip", "link", "del", iface], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


def closed_loopback_port(addr: str = "127.0.0.1") -> int:
    """A loopback port nothing listens on (bound then released)."""
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]
