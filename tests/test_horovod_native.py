"""The Horovod we build (scripts/build-horovod.sh) against the mxnet wheel, tested where its native code used
to corrupt memory.

The rare start-up crash of a rank (README: "A rank's start-up segfault") was a use-after-free in Horovod
0.28.1: EnqueueTensorBroadcast logged the op's name, owned by MXNet's engine op, after queueing the op; when
the background thread completed the broadcast first, the engine had already freed the name. On a busy box that
needs the enqueuing thread to be descheduled at one exact line, about once in 100-200 launches. Here gdb (in
non-stop mode, so every other thread runs on) holds the enqueuing thread right after AddToTensorQueue returns
until the broadcast has completed: the unpatched build then reads freed memory on every broadcast and the rank
dies of a segfault; the patched one logs before queueing and survives.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from helpers import require

pytestmark = pytest.mark.slow

HOLD_S = 4.0  # the broadcast completes in well under this (HOROVOD_CYCLE_TIME below), even on a loaded box

# The rank program: three broadcasts, each checked.
PROBE = """
import mxnet as mx
import horovod.mxnet as hvd
hvd.init()
for i in range(3):
    got = hvd.broadcast(mx.nd.array([i + 1.0]), root_rank=0, name="held.%d" % i).asscalar()
    assert got == i + 1.0, (hvd.rank(), i, got)
print("rank %d: 3 broadcasts" % hvd.rank(), flush=True)
"""

# gdb, non-stop: a breakpoint just after EnqueueTensorBroadcast's call to AddToTensorQueue (found by
# disassembly once mpi_lib is loaded) that sleeps HOLD_S in the hitting thread only, then lets it go on.
GDB_SCRIPT = r"""
import re, time, gdb
gdb.execute("set pagination off")
gdb.execute("set confirm off")
gdb.execute("set non-stop on")
gdb.execute("handle SIGSEGV SIGABRT SIGBUS nostop noprint pass")
HOLD = float(%(hold)r)
armed = []

class Hold(gdb.Breakpoint):
    def stop(self):
        print("held after AddToTensorQueue", flush=True)
        time.sleep(HOLD)
        return False

def arm(event):
    if armed or "mpi_lib" not in (event.new_objfile.filename or ""):
        return
    fn = gdb.lookup_global_symbol("horovod::common::EnqueueTensorBroadcast")
    start = int(fn.value().address)
    insns = gdb.selected_inferior().architecture().disassemble(start, start + 0x2000)
    for ins, nxt in zip(insns, insns[1:]):
        if ins["asm"].startswith("call") and "AddToTensorQueue" in ins["asm"]:
            armed.append(Hold("*%%d" %% nxt["addr"], internal=True))
            return
    raise gdb.GdbError("no call to AddToTensorQueue in EnqueueTensorBroadcast")

gdb.events.new_objfile.connect(arm)
gdb.execute("run")
if not armed:
    gdb.execute("quit 99")
code = gdb.convenience_variable("_exitcode")
sig = gdb.convenience_variable("_exitsignal")
gdb.execute("quit %%d" %% (int(code) if code is not None else 128 + int(sig)))
"""


def test_a_broadcast_whose_name_is_freed_while_its_enqueuing_thread_is_held_does_not_crash(tmp_path: Path) -> None:
    require(shutil.which("gdb"), "gdb (scripts/install-system.sh installs it)")
    py = Path(sys.executable)
    (tmp_path / "probe.py").write_text(PROBE)
    (tmp_path / "hold.py").write_text(GDB_SCRIPT % {"hold": HOLD_S})
    # Rank 0 runs under gdb (held), rank 1 as is.
    (tmp_path / "rank.sh").write_text(
        "#!/bin/sh\n"
        f'if [ "$HOROVOD_RANK" = 0 ]; then exec gdb -q -nx -batch -x {tmp_path}/hold.py --args {py} {tmp_path}/probe.py; fi\n'
        f"exec {py} {tmp_path}/probe.py\n")
    os.chmod(tmp_path / "rank.sh", 0o755)
    # Rank 1 waits for rank 0's slow start under gdb (symbols of libmxnet.so) at Gloo's rendezvous: 30 s by default.
    env = {**os.environ, "HOROVOD_CYCLE_TIME": "1", "HOROVOD_GLOO_TIMEOUT_SECONDS": "600", "OMP_NUM_THREADS": "1",
           "MXNET_CPU_WORKER_NTHREADS": "1"}
    proc = subprocess.run([str(py.parent / "horovodrun"), "--gloo", "-np", "2", "-H", "localhost:2",
                           "--start-timeout", "300", str(tmp_path / "rank.sh")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert re.search(r"rank 0: 3 broadcasts", out) and re.search(r"rank 1: 3 broadcasts", out), out[-4000:]
    assert out.count("held after AddToTensorQueue") == 3, out[-4000:]  # every broadcast was held
