"""Forked worker processes for the data stages: run a function in N children, stream their messages to
the parent, and make sure none outlives the parent or an error.

Why fork rather than multiprocessing: the children inherit the parent's open files and in-memory lists
(a 1.28 M-entry .lst) for free, and a SIGKILL of the parent (the user's ^C twice, a cancelled flow run)
must not leave workers writing into its temporary files: each child asks the kernel for SIGKILL when its
parent dies (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import pickle
import select
import signal
import struct
from typing import Any, Callable

from tasks.common import StageError
from tasks.tether import die_with_parent


class WorkerError(Exception):
    """A one-line message from a worker, raised as StageError in the parent."""


def read_exact(fd: int, n: int) -> bytes:
    """n bytes from a pipe; WorkerError if its writer closed it first."""
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            raise WorkerError("worker ring closed early")
        data += chunk
    return data


@dataclasses.dataclass
class _Child:
    i: int
    pid: int | None   # None once reaped: the pid may be reused, never signal it again
    fd: int | None    # read end of its message pipe (non-blocking), None once closed
    pidfd: int | None  # readable once it exits; None where the kernel has no pidfd_open (polled instead)
    buf: bytes = b""
    done: tuple | None = None

    def pump(self, on_message: Callable[[int, Any], None] | None) -> bool:
        """Handle every whole message the child has sent so far; False when nothing more is there now."""
        try:
            chunk = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return False
        if not chunk:
            os.close(self.fd)
            self.fd = None
            return False
        self.buf += chunk
        while len(self.buf) >= 8:
            size = struct.unpack("<Q", self.buf[:8])[0]
            if len(self.buf) < 8 + size:
                break
            kind, *payload = msg = pickle.loads(self.buf[8:8 + size])
            self.buf = self.buf[8 + size:]
            if kind == "error":
                raise StageError(payload[0])
            if kind == "done":
                self.done = msg
            elif on_message:
                on_message(self.i, msg)
        return True


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # Linux < 5.3, or a sandbox without the call
        return None


def run_forked(n: int, fn: Callable[[int, Callable[[Any], None]], Any],
               on_message: Callable[[int, Any], None] | None = None, name: str = "worker") -> list[Any]:
    """Run fn(i, send) in n forked children; `send` streams messages to on_message in the parent.
    Returns each child's return value. The first error kills every child and raises StageError:
    a WorkerError's or StageError's message as it is, anything else with its type; a child that dies
    without reporting (OOM killer, kill -9) fails the call as soon as it is reaped, named `name` i of n.

    Children are reaped while the others still run, not after every pipe has closed: a child killed
    without reporting may leave the others blocked for good on what only it would have sent (pack's ring
    of offsets), each holding its own pipe open."""
    die = die_with_parent(signal.SIGKILL)
    children: list[_Child] = []
    try:
        for i in range(n):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # child
                code = 0
                try:
                    os.close(r)
                    die()
                    # No garbage collection in the child: a collection walks -- and writes to, so copies --
                    # every object inherited from the parent (a 1.28 M-entry listing's pages); workers make
                    # no reference cycles that need it, and they exit when done.
                    gc.disable()

                    def send(obj: Any, _w: int = w) -> None:
                        data = pickle.dumps(obj)
                        data = struct.pack("<Q", len(data)) + data
                        while data:
                            data = data[os.write(_w, data):]

                    send(("done", fn(i, send)))
                except BaseException as e:  # noqa: BLE001 - everything must reach the parent as one line
                    code = 1
                    msg = str(e) if isinstance(e, (WorkerError, StageError)) else f"{type(e).__name__}: {e}"
                    with contextlib.suppress(BaseException):
                        send(("error", msg))
                finally:
                    os._exit(code)
            os.close(w)
            os.set_blocking(r, False)  # drained after the child is reaped, whoever else holds its write end
            children.append(_Child(i, pid, r, _pidfd(pid)))
        running = list(children)
        while running:
            watch = [fd for c in running for fd in (c.fd, c.pidfd) if fd is not None]
            timeout = None if all(c.pidfd is not None for c in running) else 0.2
            ready = select.select(watch, [], [], timeout)[0]
            for c in running:
                if c.fd in ready:
                    c.pump(on_message)
            for c in list(running):
                pid, status = os.waitpid(c.pid, os.WNOHANG)
                if not pid:
                    continue
                running.remove(c)
                c.pid = None
                while c.fd is not None and c.pump(on_message):
                    pass  # what it sent before it exited
                if c.done is None:
                    why = (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                           else f"exit code {os.waitstatus_to_exitcode(status)}")
                    raise StageError(f"{name} {c.i + 1} of {n} died ({why}) without reporting "
                                     "(out of memory? killed?)")
        return [c.done[1] for c in children]
    finally:
        for c in children:
            if c.pid is not None:
                with contextlib.suppress(OSError):
                    os.kill(c.pid, signal.SIGKILL)
                with contextlib.suppress(OSError):
                    os.waitpid(c.pid, 0)
            for fd in (c.fd, c.pidfd):
                if fd is not None:
                    os.close(fd)
