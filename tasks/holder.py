"""Who holds something (a stage lock, the cluster slot, a running train attempt), and whether that holder is gone.

An identity is host name, boot id, PID namespace, pid and the pid's start time. Only a holder on this host, in
this boot and this PID namespace can be judged from here: containers that share a host name but not a PID
namespace see other processes under the same pid, so such a holder is trusted to its lease or expiry.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat): pid + this is unique."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def pid_namespace() -> int | None:
    """The inode of this process's PID namespace."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def holder_identity() -> dict[str, Any]:
    """This process as a holder: host, boot id, PID namespace, pid and its start time."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot_id": boot_id(), "pid_ns": pid_namespace(), "pid": pid,
            "pid_start": process_start_time(pid)}


def pid_is_ours(record: dict[str, Any]) -> bool:
    """The recorded pid names a process this one can look up: same host, same boot, same PID namespace.
    A record without a namespace (another version, another OS) is judged like one from another host."""
    ns = pid_namespace()
    return (ns is not None and record.get("pid_ns") == ns and record.get("host") == socket.gethostname()
            and record.get("boot_id") == boot_id())


def holder_is_gone(record: dict[str, Any]) -> bool:
    """True when the recorded holder ran on this machine and is gone: this machine rebooted since, or that
    process no longer exists. A holder elsewhere (another host or PID namespace) is never judged from here."""
    if record.get("host") == socket.gethostname() and record.get("boot_id") and record.get("boot_id") != boot_id():
        return True
    if not pid_is_ours(record):
        return False
    pid = record.get("pid")
    return not isinstance(pid, int) or process_start_time(pid) != record.get("pid_start")
