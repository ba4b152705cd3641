"""The optimizer's update and the training loop's overhead, on the CPU, in one run.

1. Update time of one step of full-width ResNet-50 v1.5 (1000 classes, 25,557,032 trainable
   parameters, 161 tensors): the multi-tensor LARS path (multi_sum_sq + multi_lars +
   preloaded_multi_sgd_mom_update in calls of `--aggregate` tensors, as NVIDIA's fit.py) against the
   per-tensor reference path, same weights, same gradients. Median of `--steps` timed steps after
   two warm-up steps; every step ends in mx.nd.waitall(). Goal: ratio >= 3.
2. The training loop's overhead, one rank, the cpu-demo config: images/s of
   - bare:       forward + backward + trainer.step over in-memory batches, nothing else;
   - loop (mem): rn50.train.train_one_epoch over the same in-memory batches (label smoothing, loss
                 accumulation, logging hooks: the loop's own cost);
   - loop (DALI): train_one_epoch fed by the real DALI CPU pipeline from a packed synthetic set
                 (decode + augmentation share the same cores).
   Goal: loop (mem) / bare >= 0.9.

    .venv/bin/python bench/optimizer.py [--steps 10] [--aggregate 54] [--loop-steps 30] [--rounds 3] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}"


def bench_update(steps: int, aggregate: int) -> dict:
    import mxnet as mx
    import numpy as np

    from rn50.model import count_trainable, resnet50_v1_5
    from rn50.optim import PolyWarmupSchedule, build_optimizer

    net = resnet50_v1_5(classes=1000)
    net.initialize(mx.init.Xavier(rnd_type="gaussian", factor_type="in", magnitude=2))
    net(mx.nd.zeros((1, 3, 64, 64)))
    params = [p for p in net.collect_params().values() if p.grad_req != "null"]
    n_params = count_trainable(net)
    rng = np.random.default_rng(0)
    grads = [mx.nd.array(rng.normal(0, 1e-2, p.shape).astype(np.float32)) for p in params]
    cfg = {"momentum": 0.9, "weight_decay": 5e-5, "lars_eta": 0.001, "lars_epsilon": 0.0, "optimizer": "lars"}
    result = {"tensors": len(params), "parameters": n_params}
    runs = {}
    for label, agg in (("per_tensor", 0), ("multi_tensor", aggregate)):
        opt = build_optimizer(cfg, PolyWarmupSchedule(10.5, 100, 1000), multi_precision=False, aggregate_num=agg)
        opt.idx2name = {i: p.name for i, p in enumerate(params)}
        opt.rescale_grad = 1.0 / 408
        runs[label] = (mx.optimizer.get_updater(opt), [p.data().copy() for p in params], [])
    idx = list(range(len(params)))
    # The two paths alternate step by step (same load on both); two warm-up steps each are not timed.
    for step in range(steps + 2):
        for label, (updater, weights, times) in runs.items():
            mx.nd.waitall()
            t0 = time.perf_counter()
            updater(idx, grads, weights)
            mx.nd.waitall()
            if step >= 2:
                times.append(time.perf_counter() - t0)
    for label, (_, _, times) in runs.items():
        result[f"{label}_ms"] = round(1000 * statistics.median(times), 2)
    finals = {label: weights for label, (_, weights, _) in runs.items()}
    result["ratio"] = round(result["per_tensor_ms"] / result["multi_tensor_ms"], 2)
    worst = max(float((a - b).abs().max().asscalar()) for a, b in zip(finals["per_tensor"], finals["multi_tensor"]))
    result["max_abs_weight_difference"] = worst
    return result


class _MemLoader:
    """The Loader interface over a fixed list of in-memory batches."""

    def __init__(self, batches):
        self._batches = batches

    def batches(self, n):
        for i in range(n):
            yield self._batches[i % len(self._batches)]


def bench_loop(loop_steps: int, rec: Path, rounds: int = 3) -> dict:
    import mxnet as mx
    import nvidia.dali.fn  # noqa: F401  (before horovod, see rn50/train.py)
    import horovod.mxnet as hvd
    import numpy as np
    from mxnet import autograd, gluon

    from rn50 import data as rdata
    from rn50.config import load_config
    from rn50.optim import smoothed_labels
    from rn50.train import build_model, build_trainer, train_one_epoch

    hvd.init()
    cfg = load_config("cpu-demo", ["log_every=0"])
    ctx, classes, batch = mx.cpu(), 10, cfg["batch_size"]
    rng = np.random.default_rng(0)
    crop = cfg["train_crop"]
    mem = [(mx.nd.array(rng.normal(0, 1, (batch, 3, crop, crop)).astype(np.float32)),
            mx.nd.array(rng.integers(0, classes, batch), dtype="int32")) for _ in range(8)]
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss(sparse_label=False)

    def fresh():
        mx.random.seed(1)
        net = build_model(cfg, classes, ctx, mx)
        _, trainer = build_trainer(cfg, net, steps_per_epoch=100, hvd=hvd)
        return net, trainer

    def bare(net, trainer, steps):
        targets = [smoothed_labels(y, classes, cfg["label_smoothing"]) for _, y in mem]
        mx.nd.waitall()
        t0 = time.perf_counter()
        for i in range(steps):
            x = mem[i % len(mem)][0]
            with autograd.record():
                loss = loss_fn(net(x), targets[i % len(mem)])
            loss.backward()
            trainer.step(batch)
        mx.nd.waitall()
        return steps * batch / (time.perf_counter() - t0)

    out = {"config": "cpu-demo", "batch": batch, "crop": crop, "width": cfg["width"], "steps": loop_steps,
           "rounds": rounds}
    dali = rdata.Loader(rdata.build_pipeline(rec, "train", cfg, 0, 1, None, seed=1), ctx)
    variants = {
        "bare_img_s": lambda net, tr, n: bare(net, tr, n),
        "loop_mem_img_s": lambda net, tr, n: train_one_epoch(net, tr, loss_fn, _MemLoader(mem), n, cfg, classes, ctx)["img_per_s"],
        "loop_dali_img_s": lambda net, tr, n: train_one_epoch(net, tr, loss_fn, dali, n, cfg, classes, ctx)["img_per_s"],
    }
    models = {}
    for key, run in variants.items():
        models[key] = fresh()
        run(*models[key], 5)  # warm-up: hybridization, memory pools, DALI's first batches
    # Interleaved rounds, median per variant: the machine's load drifts, a single pass would blame one variant.
    samples = {key: [] for key in variants}
    for _ in range(rounds):
        for key, run in variants.items():
            samples[key].append(run(*models[key], loop_steps))
    for key, values in samples.items():
        out[key] = round(statistics.median(values), 1)
    out["loop_mem_over_bare"] = round(out["loop_mem_img_s"] / out["bare_img_s"], 3)
    out["loop_dali_over_bare"] = round(out["loop_dali_img_s"] / out["bare_img_s"], 3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per path (median reported)")
    ap.add_argument("--aggregate", type=int, default=54, help="tensors per multi-tensor call (NVIDIA: 54)")
    ap.add_argument("--loop-steps", type=int, default=30, help="timed training steps per loop variant")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the loop variants (median reported)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    from rn50.tinydata import make_recordio

    with tempfile.TemporaryDirectory() as tmp:
        # Packed first: PIL's JPEG encoder fails (CMYK) once DALI's libraries are loaded in the process.
        rec = make_recordio(Path(tmp) / "rec", classes=10, train_per_class=64, val_per_class=2, seed=0)
        res = {"machine": _machine(), "update": bench_update(a.steps, a.aggregate), "loop": bench_loop(a.loop_steps, rec, a.rounds)}
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    u, lp = res["update"], res["loop"]
    print(f"machine: {res['machine']}, load average at the end {os.getloadavg()[0]:.1f}")
    print(f"optimizer update, ResNet-50 v1.5 full width ({u['parameters']:,} params, {u['tensors']} tensors), "
          f"median of {a.steps} steps:")
    print(f"  per-tensor   {u['per_tensor_ms']:8.1f} ms/step")
    print(f"  multi-tensor {u['multi_tensor_ms']:8.1f} ms/step  (aggregate {a.aggregate})")
    print(f"  ratio        {u['ratio']:8.2f}x  (goal >= 3); max |w_multi - w_per_tensor| = {u['max_abs_weight_difference']:.2e}")
    print(f"training loop, cpu-demo config (width {lp['width']}, {lp['crop']} px, batch {lp['batch']}), 1 rank, "
          f"{lp['steps']} steps x {lp['rounds']} interleaved rounds (median):")
    print(f"  bare fwd+bwd+update, in-memory  {lp['bare_img_s']:8.1f} img/s")
    print(f"  train_one_epoch, in-memory      {lp['loop_mem_img_s']:8.1f} img/s  ratio {lp['loop_mem_over_bare']:.3f} (goal >= 0.9)")
    print(f"  train_one_epoch, DALI CPU input {lp['loop_dali_img_s']:8.1f} img/s  ratio {lp['loop_dali_over_bare']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
