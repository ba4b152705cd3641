"""A stand-in rank program for launcher tests: same CLI as `python -m rn50.train`, tiny real work.

Each rank does a real Horovod (Gloo) allreduce, prints rank, hostname and network namespace (so a
test can prove where a rank ran), and rank 0 writes RUN_DIR/result_<N>.txt with MLPerf-style lines.
PROBE_FAIL_RANK=r makes rank r raise; PROBE_SLEEP=s makes every rank sleep s seconds first (to kill
or time out a rank mid-run); PROBE_IGNORE_TERM=1 makes every rank ignore SIGTERM (a rank stuck in native
code, so that stopping it takes the launcher's SIGKILL); PROBE_PIDFILE_DIR=d makes each rank write d/rank<r>.pid;
PROBE_PRINT_ENV=1 makes each rank print its whole environment as one JSON line (`PROBE env {...}`).
"""
import argparse
import json
import os
import signal
import socket
import sys
import time


def main():
    p = argparse.ArgumentParser()
    for a in ("--config", "--data", "--out"):
        p.add_argument(a, required=True)
    p.add_argument("--run-index", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if os.environ.get("PROBE_IGNORE_TERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.environ.get("PROBE_PIDFILE_DIR"):
        # Before the slow imports (horovodrun sets HOROVOD_RANK), so a test sees every started rank.
        with open(os.path.join(os.environ["PROBE_PIDFILE_DIR"], "rank%s.pid" % os.environ["HOROVOD_RANK"]), "w") as f:
            f.write(str(os.getpid()))
    import horovod.mxnet as hvd
    import mxnet as mx

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    netns = os.readlink("/proc/self/ns/net")
    print("PROBE rank=%d size=%d host=%s netns=%s seed=%d omp=%s" % (
        rank, size, socket.gethostname(), netns, a.seed, os.environ.get("OMP_NUM_THREADS")), flush=True)
    if os.environ.get("PROBE_PRINT_ENV") == "1":
        print("PROBE env " + json.dumps(dict(os.environ), sort_keys=True), flush=True)
    time.sleep(float(os.environ.get("PROBE_SLEEP", "0")))
    if os.environ.get("PROBE_FAIL_RANK") == str(rank):
        raise RuntimeError("probe rank %d failed on purpose" % rank)
    total = float(hvd.allreduce(mx.nd.array([rank + 1.0]), average=False, name="probe").asscalar())
    print("PROBE rank=%d allreduce=%g" % (rank, total), flush=True)
    if rank == 0:
        def line(key, value):
            return ":::MLLOG " + json.dumps({"key": key, "value": value, "metadata": {}}) + "\n"
        with open(os.path.join(a.out, "result_%d.txt" % a.run_index), "w") as f:
            f.write(line("cache_clear", True) + line("seed", a.seed) + line("run_start", None)
                    + line("allreduce", total) + line("run_stop", None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
