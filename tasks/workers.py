"""Forked worker processes for the data stages: run a function in N children, stream their messages to
the parent, and make sure none outlives the parent or an error.

Why fork rather than multiprocessing: the children inherit the parent's open files and in-memory lists
(a 1.28 M-entry .lst) for free, and a SIGKILL of the parent (the user's ^C twice, a cancelled flow run)
must not leave workers writing into its temporary files: each child asks the kernel for SIGKILL when its
parent dies (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import contextlib
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


def run_forked(n: int, fn: Callable[[int, Callable[[Any], None]], Any],
               on_message: Callable[[int, Any], None] | None = None, name: str = "worker") -> list[Any]:
    """Run fn(i, send) in n forked children; `send` streams messages to on_message in the parent.
    Returns each child's return value. The first error kills every child and raises StageError:
    a WorkerError's or StageError's message as it is, anything else with its type; a child that dies
    without reporting (OOM killer) is named `name` in the error."""
    die = die_with_parent(signal.SIGKILL)
    children: list[list[Any]] = []
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
            children.append([pid, r, b"", None])
        open_fds = {c[1]: c for c in children}
        while open_fds:
            ready, _, _ = select.select(list(open_fds), [], [], 1.0)
            for fd in ready:
                c = open_fds[fd]
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    del open_fds[fd]
                    os.close(fd)
                    c[1] = None
                    continue
                c[2] += chunk
                while len(c[2]) >= 8:
                    size = struct.unpack("<Q", c[2][:8])[0]
                    if len(c[2]) < 8 + size:
                        break
                    kind, *payload = msg = pickle.loads(c[2][8:8 + size])
                    c[2] = c[2][8 + size:]
                    if kind == "error":
                        raise StageError(payload[0])
                    if kind == "done":
                        c[3] = msg
                    elif on_message:
                        on_message(children.index(c), msg)
        results = []
        for pid, _, _, done in children:
            _, status = os.waitpid(pid, 0)
            if done is None:
                why = (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                       else f"exit code {os.waitstatus_to_exitcode(status)}")
                raise StageError(f"a {name} died ({why}) without reporting; out of memory?")
            results.append(done[1])
        children = []
        return results
    finally:
        for pid, r, _, _ in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.waitpid(pid, 0)
            if r is not None:
                os.close(r)
