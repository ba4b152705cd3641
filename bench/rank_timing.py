"""Overhead of the per-rank step timing (rn50/timing.py) on the training step, on this machine.

Runs itself under `horovodrun --gloo -np N` (default 2, the cpu-demo world size): every rank trains the
cpu-demo model (unmodified config) on the real DALI CPU pipeline from a packed tiny set, and rotates
train_one_epoch without a clock (trainer.step, no syncs), with the EpochClock as training uses it (one
step in `--every` instrumented) and with every step instrumented, `--steps` steps each, for `--rounds`
rounds after a warm-up. Rank 0 reports the median seconds per step of each and the overhead = timed /
plain - 1, with the per-round ratios (the machine's own noise), and the estimate for training's period
(EpochClock's default, 64): every-step overhead / 64. Goal: overhead <= 1 % of step time.

    .venv/bin/python bench/rank_timing.py [--np 2] [--steps 64] [--rounds 7] [--every 16] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.optimizer import _machine  # noqa: E402


def _rank_main(a) -> int:
    import mxnet as mx
    import nvidia.dali.fn  # noqa: F401  (before horovod, see rn50/train.py)
    import horovod.mxnet as hvd
    from mxnet import gluon

    from rn50 import data as rdata
    from rn50.config import load_config
    from rn50.timing import EpochClock
    from rn50.train import _set_thread_env, build_model, build_trainer, train_one_epoch

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    cfg = load_config("cpu-demo", [f"global_batch_size={32 * size}"])
    _set_thread_env(cfg)
    ctx, classes = mx.cpu(), 10
    mx.random.seed(1)
    net = build_model(cfg, classes, ctx, mx)
    _, trainer = build_trainer(cfg, net, steps_per_epoch=100, hvd=hvd)
    hvd.broadcast_parameters(net.collect_params(), root_rank=0)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss(sparse_label=False)
    loader = rdata.Loader(rdata.build_pipeline(Path(a.rec), "train", cfg, rank, size, None, seed=1 + rank), ctx)
    default_every = EpochClock(mx.nd.waitall).every  # what training uses
    clocks = {"plain": None, "sampled": EpochClock(mx.nd.waitall, every=a.every),
              "every_step": EpochClock(mx.nd.waitall, every=1)}

    def run(name: str) -> float:
        s = train_one_epoch(net, trainer, loss_fn, loader, a.steps, cfg, classes, ctx, clock=clocks[name])
        return s["seconds"] / a.steps

    for name in clocks:
        run(name)  # warm-up: hybridization, memory pools, DALI's first batches
    times = {name: [] for name in clocks}
    names = list(clocks)
    for i in range(a.rounds):
        for name in names[i % 3:] + names[:i % 3]:  # rotate which goes first
            times[name].append(run(name))
    if rank == 0:
        med = {name: statistics.median(v) for name, v in times.items()}
        out = {"machine": _machine(), "ranks": size, "config": "cpu-demo", "batch_per_rank": cfg["batch_size"],
               "steps": a.steps, "rounds": a.rounds, "every": clocks["sampled"].period, "default_every": default_every,
               **{f"{name}_ms_per_step": round(1000 * m, 2) for name, m in med.items()},
               "sampled_overhead_pct": round(100 * (med["sampled"] / med["plain"] - 1), 2),
               "every_step_overhead_pct": round(100 * (med["every_step"] / med["plain"] - 1), 2),
               # What one instrumented step costs, spread over training's period: less noisy than the sampled
               # variant's own ratio, whose effect is smaller than the load's.
               "default_estimate_pct": round(100 * (med["every_step"] / med["plain"] - 1) / default_every, 2),
               "sampled_round_pct": [round(100 * (t / p - 1), 2) for t, p in zip(times["sampled"], times["plain"])],
               "load_avg_end": round(os.getloadavg()[0], 2)}
        Path(a.out).write_text(json.dumps(out))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--np", type=int, default=2)
    ap.add_argument("--steps", type=int, default=64, help="steps per measurement")
    ap.add_argument("--every", type=int, default=16,
                    help="sampling period of the 'sampled' variant (at most steps / 4, as in training)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved plain/timed rounds (median reported)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rec", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.rank_main:
        return _rank_main(a)
    from rn50.tinydata import make_recordio

    with tempfile.TemporaryDirectory() as tmp:
        rec = make_recordio(Path(tmp) / "rec", classes=10, train_per_class=64, val_per_class=2, seed=0)
        out = Path(tmp) / "result.json"
        hvdrun = str(Path(sys.executable).parent / "horovodrun")
        cmd = [hvdrun, "--gloo", "-np", str(a.np), "-H", f"localhost:{a.np}", sys.executable, __file__,
               "--rank-main", "--rec", str(rec), "--out", str(out), "--steps", str(a.steps), "--rounds", str(a.rounds),
               "--every", str(a.every)]
        t0 = time.time()
        p = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)
        if p.returncode != 0:
            print((p.stdout + p.stderr)[-3000:], file=sys.stderr)
            return p.returncode
        res = json.loads(out.read_text())
        res["wall_s"] = round(time.time() - t0, 1)
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"machine: {res['machine']}, load average at the end {res['load_avg_end']}")
    print(f"cpu-demo, {res['ranks']} Gloo ranks x batch {res['batch_per_rank']}, {res['steps']} steps x "
          f"{res['rounds']} interleaved rounds (median):")
    print(f"  plain (trainer.step, no syncs)              {res['plain_ms_per_step']:8.2f} ms/step")
    print(f"  sampled (1 step in {res['every']} instrumented)        {res['sampled_ms_per_step']:8.2f} ms/step  "
          f"overhead {res['sampled_overhead_pct']:+.2f} % (goal <= 1 %); per round {res['sampled_round_pct']}")
    print(f"  every step instrumented (4 syncs per step)  {res['every_step_ms_per_step']:8.2f} ms/step  "
          f"overhead {res['every_step_overhead_pct']:+.2f} %, i.e. {res['default_estimate_pct']:+.2f} % "
          f"at training's 1 step in {res['default_every']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
