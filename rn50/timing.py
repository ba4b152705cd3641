"""Per-rank step timing, gathered to rank 0 at every epoch's end: RUN_DIR/timing/run_<N>.jsonl.

One JSON line per rank and epoch (outside what the MLPerf checker reads; tasks/health.py reads it):
  run_index, epoch, rank, local_rank, host, steps, images, seconds, img_per_s (images / epoch wall time),
  sampled_steps, own_img_per_s (images / (data wait + compute): the rank's own speed, without waiting for
  its peers), step_ms_p50 / _p95 / _max, data_wait_s, compute_s, allreduce_s (sums over the sampled steps)
  and data_wait_frac / allreduce_frac (of the sampled steps' time).

Data-parallel ranks move in lock step, so img_per_s is the same on every rank; a slow rank shows as a
low own_img_per_s while its peers' allreduce_s grows (they wait for it inside the allreduce).

Sampled, so that it stays cheap: one step in `every` (64; more often when an epoch is short, so that it
has at least `min_samples`) runs instrumented, the others run as before (trainer.step, no syncs). An
instrumented step syncs the engine (`mx.nd.waitall()`) before its batch is fetched, after backward
(data wait + compute), after the gradient allreduce (trainer.step split in allreduce_grads + update) and
after the update: its step time and parts are exact, at the price of the overlap of the next batch's
fetch with its compute (bench/rank_timing.py: instrumenting every step cost 38-57 % on a loaded 2-core box,
so one in 64 costs under 1 %). Fractions are of the instrumented steps' time.
Ranks are gathered with one allgather of JSON bytes per epoch (no shared file system needed).
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, Dict, List


def timing_path(out: Path, run_index: int) -> Path:
    return Path(out) / "timing" / f"run_{run_index}.jsonl"


def percentile(values: List[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, -(-len(s) * q // 100) - 1))
    return s[int(k)]


class EpochClock:
    """Marks of one rank's instrumented steps within an epoch. `wait` blocks until the engine is idle."""

    def __init__(self, wait: Callable[[], None], every: int = 64, min_samples: int = 4,
                 clock: Callable[[], float] = time.perf_counter):
        self._wait, self._now = wait, clock
        self.every, self.min_samples = every, min_samples
        self.reset(0)

    def reset(self, steps: int) -> None:
        """Start an epoch of `steps` steps."""
        self._every = max(1, min(self.every, steps // self.min_samples)) if self.every > 0 else 0
        self.steps: List[float] = []
        self.data: List[float] = []
        self.compute: List[float] = []
        self.allreduce: List[float] = []
        self._begin = self._mark = 0.0

    @property
    def period(self) -> int:
        """Steps from one instrumented step to the next in the current epoch (0: none instrumented)."""
        return self._every

    def sampled(self, step: int) -> bool:
        """Whether step `step` (0-based) of the epoch is instrumented (never the first: it warms up)."""
        return self._every > 0 and step > 0 and step % self._every == 0

    def _lap(self) -> float:
        now = self._now()
        lap, self._mark = now - self._mark, now
        return lap

    def begin(self) -> None:
        """Before the step's batch is fetched: the work of earlier steps is finished first."""
        self._wait()
        self._begin = self._mark = self._now()

    def fetched(self) -> None:
        self.data.append(self._lap())

    def computed(self) -> None:
        self._wait()
        self.compute.append(self._lap())

    def reduced(self) -> None:
        self._wait()
        self.allreduce.append(self._lap())

    def updated(self) -> None:
        self._wait()
        self.steps.append(self._now() - self._begin)

    def summary(self, batch: int, seconds: float, steps: int) -> Dict[str, float]:
        n = len(self.steps)
        total, data, compute, reduce = sum(self.steps), sum(self.data), sum(self.compute), sum(self.allreduce)
        own = data + compute
        return {
            "steps": steps, "images": steps * batch, "seconds": round(seconds, 6),
            "img_per_s": round(steps * batch / seconds, 3) if seconds > 0 else 0.0,
            "sampled_steps": n,
            "own_img_per_s": round(n * batch / own, 3) if own > 0 else 0.0,
            "step_ms_p50": round(1000 * percentile(self.steps, 50), 3) if n else 0.0,
            "step_ms_p95": round(1000 * percentile(self.steps, 95), 3) if n else 0.0,
            "step_ms_max": round(1000 * max(self.steps), 3) if n else 0.0,
            "data_wait_s": round(data, 6), "compute_s": round(compute, 6), "allreduce_s": round(reduce, 6),
            "data_wait_frac": round(data / total, 4) if total > 0 else 0.0,
            "allreduce_frac": round(reduce / total, 4) if total > 0 else 0.0,
        }


def gather_json(obj: Dict, hvd, mx, name: str) -> List[Dict]:
    """Every rank's `obj`, in rank order (JSON bytes through two allgathers; one rank: no collective)."""
    if hvd.size() == 1:
        return [obj]
    import numpy as np

    data = json.dumps(obj, sort_keys=True).encode()
    sizes = hvd.allgather(mx.nd.array([len(data)], dtype="int64"), name=f"{name}.n").asnumpy()
    blob = hvd.allgather(mx.nd.array(np.frombuffer(data, dtype=np.uint8), dtype="uint8"), name=f"{name}.b")
    raw = blob.asnumpy().tobytes()
    out, at = [], 0
    for n in sizes.tolist():
        out.append(json.loads(raw[at:at + int(n)].decode()))
        at += int(n)
    return out


def preflight_bandwidth(hvd, mx, ctx, mib: float, rounds: int = 3) -> Dict[str, float]:
    """Time an allreduce of `mib` MiB of float32 across all ranks (after one warm-up; each round starts
    together after a one-element allreduce): algorithm bandwidth = bytes / median time, bus bandwidth =
    algbw x 2 (n - 1) / n (NCCL's convention: what each link carries in a ring allreduce)."""
    import statistics

    n = max(1, int(mib * 2 ** 20) // 4)
    x = mx.nd.ones((n,), ctx=ctx)
    hvd.allreduce(x, name="preflight.warm").wait_to_read()
    times = []
    for _ in range(rounds):
        hvd.allreduce(mx.nd.zeros((1,), ctx=ctx), name="preflight.sync").wait_to_read()
        t0 = time.perf_counter()
        hvd.allreduce(x, name="preflight.ar").wait_to_read()
        times.append(time.perf_counter() - t0)
    # Rank 0's figure for every rank, so that all of them take the same warn-or-refuse decision.
    t = float(hvd.broadcast(mx.nd.array([statistics.median(times)], ctx=ctx, dtype="float64"), root_rank=0,
                            name="preflight.t").asscalar())
    size = hvd.size()
    algbw = 4 * n / t / 1e9
    return {"bytes": 4 * n, "ranks": size, "seconds": round(t, 6), "algbw_gbps": round(algbw, 4),
            "busbw_gbps": round(algbw * 2 * (size - 1) / size, 4), "rounds": rounds}


class TimingLog:
    """RUN_DIR/timing/run_<N>.jsonl, written by rank 0 ("w" for a fresh attempt, "a" on resume)."""

    def __init__(self, out: Path, run_index: int, rank: int, append: bool = False):
        self.path = timing_path(out, run_index)
        self.run_index = run_index
        self.enabled = rank == 0
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a" if append else "w"):
                pass

    def write_preflight(self, result: Dict) -> None:
        if self.enabled:
            path = self.path.with_name(f"preflight_{self.run_index}.json")
            path.write_text(json.dumps(result, sort_keys=True) + "\n")

    def write(self, records: List[Dict]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            for r in records:
                f.write(json.dumps(dict(r, run_index=self.run_index), sort_keys=True) + "\n")


def rank_record(epoch: int, rank: int, local_rank: int, stats: Dict[str, float]) -> Dict:
    keep = {k: v for k, v in stats.items() if k not in ("loss",)}
    return dict(keep, epoch=epoch, rank=rank, local_rank=local_rank, host=socket.gethostname(), pid=os.getpid())
