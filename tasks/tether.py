"""Processes that die with the process that started them, even when that one is killed with SIGKILL.

A stage that starts long-lived processes (horovodrun and its ranks, a temporary Prefect server) must not
leave them running when it is cancelled or killed: on a cluster an orphaned rank keeps the GPUs busy.
Two mechanisms, used together:

- `die_with_parent()`: a `preexec_fn` that asks the kernel (PR_SET_PDEATHSIG) to send SIGTERM to the child
  when the thread that started it ends. Direct children only, and only while that thread lives — which
  holds for the launcher, whose thread waits on the child.
- `Tether`: a watchdog process (`python -m tasks.tether`) in its own session. It waits for its parent to
  die, then stops every process whose environment carries the tether's token (`RN50_TETHER=<token>`):
  SIGTERM first (horovodrun tears down its ssh sessions and remote ranks on SIGTERM), SIGKILL after a
  grace period. Grandchildren inherit the token with the environment, so this reaches what
  PR_SET_PDEATHSIG cannot (ranks started by horovodrun, the uvicorn server Prefect starts).
  It can also run commands the owner registered (`Tether.on_death(argv)`), for what is not a process here:
  `scancel JOBID` for a Slurm batch job.
  On a normal exit the owner calls `Tether.close()`, which stops the watchdog without killing anything.
"""
from __future__ import annotations

import ctypes
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

TAG = "RN50_TETHER"
PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A Popen `preexec_fn` (or a call in a forked child): the child gets `sig` when the starting thread ends.
    libc is resolved here, before the fork: dlopen in a child forked from a threaded process (a Prefect
    worker) could deadlock on a loader lock another thread held at fork time."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: no parent-death signal, the tether still applies
        prctl = None
    parent = os.getpid()

    def preexec() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return preexec


def tagged_pids(token: str) -> list[int]:
    """Processes (other than this one) whose environment holds RN50_TETHER=<token>."""
    needle = f"{TAG}={token}".encode()
    me, out = os.getpid(), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            env = (d / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            out.append(int(d.name))
    return out


def kill_tagged(token: str, grace_s: float = 10.0) -> list[int]:
    """SIGTERM every process carrying `token`, then SIGKILL what is left after `grace_s`. Returns the pids."""
    pids = tagged_pids(token)
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and tagged_pids(token):
        time.sleep(0.2)
    for pid in tagged_pids(token):
        _signal(pid, signal.SIGKILL)
    return pids


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Tether:
    """Start a watchdog for this process; `env(base)` adds the token to a child's environment."""

    def __init__(self, grace_s: float = 10.0, token: str | None = None):
        self.token = token or secrets.token_hex(8)
        env = {k: v for k, v in os.environ.items() if k != TAG}  # the watchdog must not kill itself
        self.proc = subprocess.Popen([sys.executable, "-m", "tasks.tether", str(os.getpid()), self.token, str(grace_s)],
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     start_new_session=True, cwd=Path(__file__).resolve().parent.parent)

    def env(self, base: dict[str, str]) -> dict[str, str]:
        return {**base, TAG: self.token}

    def on_death(self, argv: list[str]) -> None:
        """Should the owner die, the watchdog also runs `argv` (no shell; bounded to 60 s) after its kills."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"run " + json.dumps(list(argv)).encode() + b"\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        """The owner is done: stop the watchdog, kill nothing."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b"done\n")
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "Tether":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _watch(parent: int, token: str, grace_s: float) -> int:
    """Wait until `parent` dies (our parent pid changes) or says "done" on stdin; `run ARGV-JSON` lines
    register commands to run after the kills."""
    import select

    commands: list[list[str]] = []
    poll = select.poll()
    poll.register(sys.stdin.fileno(), select.POLLIN | select.POLLHUP)
    while os.getppid() == parent:
        if poll.poll(500):
            line = sys.stdin.readline()
            if line.strip() == "done":
                return 0
            if line.startswith("run "):
                commands.append([str(a) for a in json.loads(line[4:])])
                continue
            # EOF without "done": the parent is dying (its end of the pipe closed); fall through.
            break
    while os.getppid() == parent:  # the pipe closes a moment before the parent is reaped
        time.sleep(0.2)
    kill_tagged(token, grace_s)
    for argv in commands:
        try:
            subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=60)
        except (OSError, subprocess.SubprocessError):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(_watch(int(sys.argv[1]), sys.argv[2], float(sys.argv[3])))
