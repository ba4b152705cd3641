"""Host inventories: which hosts train, how to reach them, and what environment their ranks get.

An inventory is YAML (configs/inventory/*.yaml or any path):

    launcher: ssh              # optional: this file is for the ssh launcher (tasks/launch/ssh.py)
    runtime: local | docker    # ranks run directly on the host, or inside the node container (infra/start-node.sh)
    controller: gloo | mpi
    interface: eth0            # one NIC name common to all hosts
    data_dir / work_dir / python / env_profile / env / container / min_free_bytes
    data_local: false          # true: data_dir is on each host's own disk; `rn50 distribute` copies recordio there
    known_hosts: /path         # where first-contact host keys are pinned (default WORKDIR/.ssh/known_hosts)
    hosts:
      - {host: node2, slots: 8, ssh_port: 22, user: root, key: ~/.ssh/id_ed25519, host_key: "ssh-ed25519 AAAA..."}

Every value is validated here as data, before anything runs: names that reach an ssh_config, a command
line or a remote shell (host, user, interface, container, env keys, python) must match strict patterns,
paths must be absolute and free of control characters, so a hostile inventory is a one-line StageError
naming the field — never a directive in the generated ssh_config or a word in a shell.
"""
from __future__ import annotations

import base64
import dataclasses
import re
from pathlib import Path
from typing import Any

from tasks import launch
from tasks.common import StageError

DEFAULT_MIN_FREE_BYTES = 1 << 30
RUNTIMES = ("local", "docker")
CONTROLLERS = ("gloo", "mpi")

# Host names and IPv4 addresses (RFC 1123 labels, `_` tolerated); never a leading `-` (an ssh option),
# never whitespace, `,`/`:` (Horovod's -H syntax), `*?!` (ssh_config patterns) or `%` (ssh tokens).
HOST_RE = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
USER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
IFACE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,14}")  # Linux IFNAMSIZ - 1
CONTAINER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # Docker's container-name rule
PYTHON_RE = re.compile(r"[A-Za-z0-9_./+-]+")  # a command name or an absolute path, one shell word
HOST_KEY_RE = re.compile(r"((?:ssh|ecdsa|sk)-[A-Za-z0-9@.-]+) ([A-Za-z0-9+/]+={0,3})(?: [^\x00-\x1f\x7f]*)?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclasses.dataclass(frozen=True)
class Host:
    host: str
    slots: int
    ssh_port: int | None = None
    user: str | None = None
    key: str | None = None  # path of the private key file; its content is never read
    interface: str | None = None
    host_key: tuple[str, ...] = ()  # pinned public host key(s), "TYPE BASE64" (the inventory's `host_key:`)

    @property
    def label(self) -> str:
        return f"{self.host}:{self.ssh_port}" if self.ssh_port else self.host

    @property
    def known_hosts_name(self) -> str:
        """The name ssh looks this host up by in a known_hosts file."""
        return f"[{self.host}]:{self.ssh_port}" if self.ssh_port and self.ssh_port != 22 else self.host


@dataclasses.dataclass(frozen=True)
class Inventory:
    hosts: tuple[Host, ...]
    runtime: str = "local"  # local | docker
    controller: str = "gloo"  # gloo | mpi (MPI needs a Horovod built with it: GPU clusters, NGC image)
    interface: str | None = None  # common NIC name (Gloo iface, NCCL_SOCKET_IFNAME)
    python: str | None = None  # interpreter on the hosts; default: this one (local) / `python` (docker)
    data_dir: str | None = None  # recordio/ path on every host; default: WORKDIR/recordio
    work_dir: str | None = None  # where ranks write on every host (free-disk check); default: WORKDIR
    env_profile: str = "cpu"  # configs/env/<profile>.env, or a path
    env: tuple[tuple[str, str], ...] = ()
    container: str = "rn50-node"  # docker runtime: name of the per-host container running sshd
    min_free_bytes: int = DEFAULT_MIN_FREE_BYTES
    launcher: str = "ssh"
    known_hosts: str | None = None  # pinned host keys; default WORKDIR/.ssh/known_hosts
    data_local: bool = False  # data_dir is node-local (each host its own copy), not a shared file system

    @property
    def total_slots(self) -> int:
        return sum(h.slots for h in self.hosts)


def local_inventory(slots: int) -> Inventory:
    """This machine alone, `slots` ranks: what `rn50 train` uses without --hosts (tasks.train decides how
    many: global_batch_size / batch_size for a CPU config, the GPUs `nvidia-smi -L` lists for a GPU one)."""
    return Inventory(hosts=(Host("localhost", slots),))

_TOP_KEYS = {f.name for f in dataclasses.fields(Inventory)}
_HOST_KEYS = {f.name for f in dataclasses.fields(Host)}


def read_inventory_file(path: Path | str) -> Any:
    """The YAML document of a hosts file (SSH inventory or `launcher: slurm`), or a one-line error."""
    import yaml

    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise StageError(f"inventory {path} does not exist") from None
    except yaml.YAMLError as e:
        raise StageError(f"inventory {path} is not valid YAML: {str(e).splitlines()[0]}") from None


def load_inventory(path: Path | str) -> Inventory:
    """Parse and validate an inventory YAML."""
    return parse_inventory(read_inventory_file(path), source=str(path))


def _match(pattern: re.Pattern, value: Any, field: str, source: str, what: str) -> str:
    if not isinstance(value, (str, int)) or isinstance(value, bool) or not pattern.fullmatch(str(value)):
        raise StageError(f"{source}: {field} {_show(value)} is not {what}")
    return str(value)


def _show(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 60 else s[:57] + "..."


def _path(value: Any, field: str, source: str, absolute: bool = True) -> str:
    if not isinstance(value, str) or not value or _CONTROL.search(value) or '"' in value:
        raise StageError(f"{source}: {field} {_show(value)} is not a path (no control characters or quotes)")
    value = str(Path(value).expanduser())
    if absolute and not value.startswith("/"):
        raise StageError(f"{source}: {field} {_show(value)} must be an absolute path")
    return value


def _int(value: Any, field: str, source: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not re.fullmatch(r"[0-9]+", str(value)):
        raise StageError(f"{source}: {field} {_show(value)} must be an integer")
    n = int(value)
    if n < lo or (hi is not None and n > hi):
        raise StageError(f"{source}: {field} {n} must be in [{lo}, {hi if hi is not None else '...'}]")
    return n


def _host_keys(value: Any, field: str, source: str) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    out = []
    for v in items:
        m = HOST_KEY_RE.fullmatch(v.strip()) if isinstance(v, str) else None
        ok = m is not None
        if ok:
            try:
                blob = base64.b64decode(m.group(2), validate=True)
                ok = blob[4:4 + len(m.group(1))] == m.group(1).encode()  # the blob names its own type
            except ValueError:
                ok = False
        if not ok:
            raise StageError(f"{source}: {field} {_show(v)} is not a public host key "
                             "(`TYPE BASE64`, as in the host's /etc/ssh/ssh_host_*_key.pub)")
        out.append(f"{m.group(1)} {m.group(2)}")
    return tuple(out)


def data_local(doc: dict, source: str) -> bool:
    """The hosts file's `data_local:` (both launchers): true needs a data_dir, the place of each host's copy."""
    value = doc.get("data_local", False)
    if not isinstance(value, bool):
        raise StageError(f"{source}: data_local must be true or false, not {_show(value)}")
    if value and not doc.get("data_dir"):
        raise StageError(f"{source}: data_local: true needs data_dir (where each host keeps its copy of recordio/)")
    return value


def parse_inventory(doc: Any, source: str = "inventory") -> Inventory:
    if not isinstance(doc, dict) or not isinstance(doc.get("hosts"), list) or not doc["hosts"]:
        raise StageError(f"{source}: needs a non-empty `hosts:` list of {{host, slots, ssh_port}}")
    extra = set(doc) - _TOP_KEYS
    if extra:
        raise StageError(f"{source}: unknown key(s) {sorted(map(str, extra))}")
    hosts = []
    for i, h in enumerate(doc["hosts"]):
        if not isinstance(h, dict) or "host" not in h:
            raise StageError(f"{source}: hosts[{i}] needs at least `host:`")
        name = _match(HOST_RE, h["host"], f"hosts[{i}].host", source, "a host name or IPv4 address")
        where = f"hosts[{i}] ({name})"
        extra = set(h) - _HOST_KEYS
        if extra:
            raise StageError(f"{source}: {where}: unknown key(s) {sorted(map(str, extra))}")
        try:
            slots = int(h.get("slots", 1))
            port = None if h.get("ssh_port") is None else int(h["ssh_port"])
        except (TypeError, ValueError):
            raise StageError(f"{source}: {where}: slots and ssh_port must be integers") from None
        if slots < 1:
            raise StageError(f"{source}: {where}: slots must be >= 1")
        if port is not None and not 0 < port < 65536:
            raise StageError(f"{source}: {where}: ssh_port {port} is not a TCP port")
        user = None if h.get("user") is None else _match(USER_RE, h["user"], f"hosts[{i}].user", source, "a user name")
        key = None if not h.get("key") else _path(h["key"], f"hosts[{i}].key", source)
        iface = (None if not h.get("interface")
                 else _match(IFACE_RE, h["interface"], f"hosts[{i}].interface", source, "a network interface name"))
        host_key = () if not h.get("host_key") else _host_keys(h["host_key"], f"hosts[{i}].host_key", source)
        hosts.append(Host(name, slots, port, user, key, iface, host_key))
    names = [h.host for h in hosts]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise StageError(f"{source}: host(s) {dup} listed twice; give one entry with the total slots")
    launcher = doc.get("launcher", "ssh")
    if launcher != "ssh":
        raise StageError(f"{source}: an inventory of hosts is for `launcher: ssh`, not {_show(launcher)}")
    runtime = doc.get("runtime", "local")
    if runtime not in RUNTIMES:
        raise StageError(f"{source}: runtime must be `local` or `docker`, not {_show(runtime)}")
    controller = doc.get("controller", "gloo")
    if controller not in CONTROLLERS:
        raise StageError(f"{source}: controller must be `gloo` or `mpi`, not {_show(controller)}")
    env = launch.check_env(doc.get("env"), source)
    top_iface = doc.get("interface")
    if top_iface:
        _match(IFACE_RE, top_iface, "interface", source, "a network interface name")
    ifaces = {h.interface for h in hosts if h.interface} | ({str(top_iface)} if top_iface else set())
    if len(ifaces) > 1:
        # Horovod's Gloo transport takes one interface name for all ranks.
        raise StageError(f"{source}: hosts name different interfaces {sorted(ifaces)}; Horovod needs one common NIC name")
    opt = {}
    for field in ("data_dir", "work_dir", "known_hosts"):
        if doc.get(field) is not None:
            opt[field] = _path(doc[field], field, source)
    if doc.get("python") is not None:
        opt["python"] = _match(PYTHON_RE, doc["python"], "python", source, "an interpreter name or path")
    container = _match(CONTAINER_RE, doc.get("container", "rn50-node"), "container", source, "a container name")
    min_free = _int(doc.get("min_free_bytes", DEFAULT_MIN_FREE_BYTES), "min_free_bytes", source, 0)
    opt["data_local"] = data_local(doc, source)
    profile = launch.check_env_profile(doc.get("env_profile", "gpu" if runtime == "docker" else "cpu"), source)
    return Inventory(
        hosts=tuple(hosts),
        runtime=runtime,
        controller=controller,
        interface=next(iter(ifaces), None),
        env_profile=profile,
        env=env,
        container=container,
        min_free_bytes=min_free,
        launcher=launcher,
        **opt,
    )
