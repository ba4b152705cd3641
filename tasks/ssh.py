"""SSH plumbing of the launcher: reaching the inventory's hosts, and trusting only their pinned keys.

- `write_ssh_config`: one `Host` block per inventory entry (port, user, key), so each host keeps its own
  settings although horovodrun takes a single -p/-i for all of them; `StrictHostKeyChecking yes`.
- Host keys are pinned per inventory: a host's `host_key:` in the inventory, else the key it showed on
  first contact, kept in a known_hosts file beside the work dir's state (WORKDIR/.ssh/known_hosts, or the
  inventory's `known_hosts:`). Only the preflight probe may add a key, and only for a host not yet known
  (`accept-new`); a host whose key changed fails preflight, naming it. horovodrun's own ssh calls go
  through `write_wrapper`, which puts `StrictHostKeyChecking=yes` before Horovod's
  `-o StrictHostKeyChecking` with the value `no` (ssh keeps the first value it reads).
- `Remote`: runs a short POSIX sh script on one host, directly when the host is this machine.

Every host name and path reaching an ssh_config or a command line was validated by tasks.inventory;
ssh commands put `--` before the host.
"""
from __future__ import annotations

import dataclasses
import shlex
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Iterable, Sequence

from tasks.common import StageError, write_text_atomic
from tasks.inventory import Host

CONNECT_TIMEOUT_S = 5
# What ssh prints when a known host shows another key (with any LogLevel that shows errors).
_CHANGED = "REMOTE HOST IDENTIFICATION HAS CHANGED"
_VERIFY_FAILED = "Host key verification failed"


def _local_addresses() -> set[str]:
    import psutil

    addrs = {"127.0.0.1"}
    for infos in psutil.net_if_addrs().values():
        addrs |= {i.address for i in infos if i.family == socket.AF_INET}
    return addrs


def is_local(host: Host) -> bool:
    """The rule horovodrun applies: a host whose address is one of ours runs its ranks without ssh."""
    if host.host == "localhost":
        return True
    try:
        return socket.gethostbyname(host.host) in _local_addresses()
    except OSError:
        return False


def is_local_name(host: str) -> bool:
    return is_local(Host(host, 1))


def _q(value: str) -> str:
    """An ssh_config argument: double-quoted (the inventory rejects `"` and control characters in paths)."""
    return '"' + value.replace("%", "%%") + '"'


def write_ssh_config(path: Path, hosts: Sequence[Host], known_hosts: Path, inventory_keys: Path | None = None) -> Path:
    """The ssh_config every ssh of a run uses (`ssh -F`); `inventory_keys` holds the hosts' `host_key:`s."""
    lines = []
    for h in hosts:
        lines.append(f"Host {h.host}")
        if h.ssh_port:
            lines.append(f"  Port {h.ssh_port}")
        if h.user:
            lines.append(f"  User {h.user}")
        if h.key:
            lines += [f"  IdentityFile {_q(h.key)}", "  IdentitiesOnly yes"]
        if h.host_key and inventory_keys is not None:
            lines.append(f"  UserKnownHostsFile {_q(str(inventory_keys))}")
    lines += [
        "Host *",
        "  BatchMode yes",
        "  PasswordAuthentication no",
        f"  ConnectTimeout {CONNECT_TIMEOUT_S}",
        "  StrictHostKeyChecking yes",
        f"  UserKnownHostsFile {_q(str(known_hosts))}",
        "  CheckHostIP no",
        "  HashKnownHosts no",
        "  UpdateHostKeys no",
        "  ForwardAgent no",
        "  ClearAllForwardings yes",
        "  LogLevel ERROR",
        "  ServerAliveInterval 15",
        "  ServerAliveCountMax 4",
    ]
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def write_inventory_keys(path: Path, hosts: Iterable[Host]) -> Path | None:
    """A known_hosts file of the keys the inventory pins (`host_key:`); None when it pins none."""
    lines = [f"{h.known_hosts_name} {k}" for h in hosts for k in h.host_key]
    if not lines:
        return None
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def prepare_known_hosts(path: Path) -> Path:
    """The per-inventory known_hosts file (created empty, in a 0700 directory, on first use)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        path.touch(mode=0o600)
    return path


def known_host_lines(files: Iterable[Path | None], hosts: Iterable[Host]) -> list[str]:
    """The entries of `files` (plain, unhashed known_hosts) that name one of `hosts`."""
    names = {h.known_hosts_name for h in hosts}
    out = []
    for f in files:
        if f is None or not Path(f).is_file():
            continue
        for line in Path(f).read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and not line.startswith("#") and set(fields[0].split(",")) & names:
                out.append(" ".join(fields[:3]))
    return out


def write_wrapper(bin_dir: Path, config: Path) -> Path:
    """An `ssh` first on horovodrun's PATH: adds `-F config` and strict host-key checking to the
    command Horovod builds (which itself turns host-key checking off)."""
    real = shutil.which("ssh")
    if real is None:
        raise StageError("the `ssh` client is not installed on the launcher (Debian: openssh-client)")
    bin_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / "ssh"
    write_text_atomic(wrapper, f"#!/bin/sh\nexec {shlex.quote(real)} -F {shlex.quote(str(config))} "
                               '-o StrictHostKeyChecking=yes "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def container_wrapper_script(known_hosts_lines: Sequence[str]) -> str:
    """POSIX sh, run first in the node container that hosts horovodrun (runtime docker): a temporary
    `ssh` first on PATH that trusts only `known_hosts_lines` (the launcher's pinned keys of the hosts),
    removed when the shell exits. The caller appends its command after `&&`."""
    q = shlex.quote
    lines = " ".join(q(line) for line in known_hosts_lines) or "''"
    return (
        'real=$(command -v ssh) && d=$(mktemp -d) && trap \'rm -rf "$d"\' EXIT && '
        f'printf "%s\\n" {lines} > "$d/known_hosts" && '
        "printf '#!/bin/sh\\nexec \"%s\" -o StrictHostKeyChecking=yes -o \"UserKnownHostsFile=%s/known_hosts\" "
        "-o CheckHostIP=no -o UpdateHostKeys=no \"$@\"\\n' \"$real\" \"$d\" > \"$d/ssh\" && "
        'chmod 700 "$d/ssh" && PATH="$d:$PATH" && export PATH'
    )


def host_key_problem(stderr: str, host: Host, known_hosts: Path) -> str | None:
    """One line naming the host when ssh refused it for its host key; None for any other failure."""
    if _CHANGED not in stderr and _VERIFY_FAILED not in stderr:
        return None
    if host.host_key:
        return ("its host key is not the one the inventory pins (hosts: host_key:); if the host was "
                "reinstalled, check its new key and update the inventory")
    return (f"host key changed: it no longer matches the key pinned in {known_hosts} on first contact; "
            f"if the host was reinstalled, check its new key, then "
            f"`ssh-keygen -R '{host.known_hosts_name}' -f {known_hosts}`")


@dataclasses.dataclass(frozen=True)
class Trust:
    """The files one run's ssh calls use: its ssh_config, the inventory's pinned first-contact keys, and
    the keys the inventory itself gives (`host_key:`), if any."""

    config: Path
    known_hosts: Path
    inventory_keys: Path | None = None

    def lines(self, hosts: Iterable[Host]) -> list[str]:
        """The pinned keys of `hosts`, as known_hosts lines."""
        return known_host_lines([self.inventory_keys, self.known_hosts], hosts)


def setup(launcher_dir: Path, hosts: Sequence[Host], known_hosts: Path) -> Trust:
    """Write a run's ssh_config (and the inventory's keys) under `launcher_dir`; `known_hosts` is the
    inventory's persistent file of first-contact keys (`prepare_known_hosts` creates it)."""
    inventory_keys = write_inventory_keys(launcher_dir / "known_hosts.inventory", hosts)
    config = write_ssh_config(launcher_dir / "ssh_config", hosts, known_hosts, inventory_keys)
    return Trust(config, known_hosts, inventory_keys)


class Remote:
    """Runs short shell scripts on one host: directly when local, over ssh otherwise."""

    def __init__(self, host: Host, ssh_config: Path | None, runtime: str = "local"):
        # With runtime docker the ssh port is the node container's sshd: always go through it.
        self.host, self.ssh_config = host, ssh_config
        self.local = runtime == "local" and is_local(host)

    def argv(self, script: str, first_contact: bool = False) -> list[str]:
        if self.local:
            return ["sh", "-c", script]
        # First contact pins a host the inventory gives no key for; a known host's key must match.
        trust = "accept-new" if first_contact and not self.host.host_key else "yes"
        return ["ssh", "-F", str(self.ssh_config), "-o", f"StrictHostKeyChecking={trust}", "--", self.host.host, script]

    def run(self, script: str, timeout: float = 60, first_contact: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(script, first_contact), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
