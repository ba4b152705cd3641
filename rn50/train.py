"""Train ResNet-50 v1.5 the MLPerf way: Horovod data parallel, DALI input, LARS, MLPerf log.

    python -m rn50.train --config NAME_OR_PATH --data RECORDIO_DIR --out RUN_DIR \\
        [--run-index N] [--seed S] [--resume] [--set KEY=VALUE ...]

Run it directly (1 rank) or under `horovodrun --gloo -np N -H host:slots ...` (N ranks), with
N = global_batch_size / batch_size of the config (any other N exits 2 before anything is logged).
Rank 0 writes RUN_DIR/result_<N>.txt (the MLPerf log) and RUN_DIR/checkpoints/run_<N>/; the
process exits 0 after logging run_stop, with status "success" (top-1 reached the target) or
"aborted" (the last evaluation on the grid came first). Bad input exits 2 with a one-line message.

`train()` is the outline of a run, in the order MLPerf times it:
  init (model, optimizer, broadcast of rank 0's weights; not timed) -> run_start -> DALI pipelines
  (the first touch of the data is timed) -> blocks of epochs (`train_one_epoch`), each ending in an
  evaluation over ALL validation images (`evaluate`: each rank scores its shard, the counts are summed)
  at epochs eval_offset + 1 + k * eval_period only -> run_stop.
Timed configs write their one checkpoint after run_stop (outside the timed region, its time
printed); non-timed runs write one at every evaluation so that --resume can continue them.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from rn50.config import ConfigError, eval_epochs, load_config, needs_gpu, world_size_error

_QUIET_RANK_GRACE_S = 15  # see _error


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m rn50.train", description="ResNet-50 v1.5 MLPerf training.")
    ap.add_argument("--config", required=True, help="a name in configs/training/ (e.g. cpu-demo) or a .yaml path")
    ap.add_argument("--data", type=Path, help="directory holding {train,val}.{rec,idx} (required to train)")
    ap.add_argument("--out", type=Path, help="run directory (log, checkpoints) (required to train)")
    ap.add_argument("--print-config", action="store_true",
                    help="print the resolved config (defaults + file + --set) as JSON and exit (for cache keys)")
    ap.add_argument("--run-index", type=int, default=0, help="N in result_<N>.txt (default 0)")
    ap.add_argument("--seed", type=int, default=None, help="base seed (default: random, logged)")
    ap.add_argument("--resume", action="store_true",
                    help="continue from the latest checkpoint; refused for timed configs (timed: true)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one config setting (repeatable); e.g. --set max_epochs=2")
    return ap.parse_args(argv)


def _set_thread_env(cfg: Dict) -> None:
    # Must happen before mxnet is imported: its OpenMP pool is sized at load time.
    if cfg["omp_threads"]:
        os.environ["OMP_NUM_THREADS"] = str(cfg["omp_threads"])
        os.environ.setdefault("MXNET_CPU_WORKER_NTHREADS", "1")
    os.environ.setdefault("HOROVOD_FUSION_THRESHOLD", str(int(cfg["horovod_fusion_threshold_mb"] * 1024 * 1024)))
    os.environ.setdefault("HOROVOD_CYCLE_TIME", str(cfg["horovod_cycle_time_ms"]))


def _drop_page_cache(paths: List[Path]) -> bool:
    """Evict the dataset files from the page cache (MLPerf's cache_clear) without needing root."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for p in paths:
        fd = os.open(str(p), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


class Checkpoints:
    """RUN_DIR/checkpoints/run_<N>/: epoch_<E>.params/.states plus latest.json, the pointer that is
    written (atomically) last, so a reader never sees a half-written checkpoint."""

    KEEP = 2

    def __init__(self, root: Path):
        self.root = root

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def save(self, net, trainer, epoch: int, meta: Dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        params, states = self.root / f"epoch_{epoch}.params", self.root / f"epoch_{epoch}.states"
        for final, save in ((params, net.save_parameters), (states, trainer.save_states)):
            tmp = final.with_name(f".tmp-{final.name}")
            save(str(tmp))
            os.replace(tmp, final)
        pointer = dict(meta, epoch=epoch, params=params.name, states=states.name)
        tmp = self.root / ".tmp-latest.json"
        tmp.write_text(json.dumps(pointer, indent=2, sort_keys=True))
        os.replace(tmp, self.root / "latest.json")
        for old in sorted(self.root.glob("epoch_*.params"), key=lambda p: int(p.stem.split("_")[1]))[:-self.KEEP]:
            old.unlink(missing_ok=True)
            old.with_suffix(".states").unlink(missing_ok=True)

    def latest(self) -> Optional[Dict]:
        try:
            return json.loads((self.root / "latest.json").read_text())
        except FileNotFoundError:
            return None


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if args.print_config:
            print(json.dumps(cfg, indent=2, sort_keys=True))
            return 0
        if args.data is None or args.out is None:
            raise ConfigError("--data and --out are required")
        if args.resume and cfg["timed"]:
            raise ConfigError(f"config {cfg['name']!r} is a timed MLPerf run (timed: true) and never resumes; "
                              "rerun without --resume for a fresh attempt, or use --set timed=false for a regression run")
        for split in ("train", "val"):
            for ext in ("rec", "idx"):
                if not (args.data / f"{split}.{ext}").is_file():
                    raise ConfigError(f"missing {args.data / f'{split}.{ext}'} (run `rn50 pack` first)")
        if args.run_index < 0:
            raise ConfigError("--run-index must be >= 0")
        # Under horovodrun the world size is known before Horovod starts: refuse a wrong one at once.
        launched = os.environ.get("HOROVOD_SIZE")
        if launched and launched.isdigit():
            problem = world_size_error(cfg, int(launched))
            if problem:
                raise ConfigError(problem)
    except ConfigError as e:
        _error(e)
        return 2
    _set_thread_env(cfg)
    try:
        return train(cfg, args.data, args.out, args.run_index, args.seed, args.resume)
    except ConfigError as e:
        _error(e)
        return 2


def _error(e: Exception) -> None:
    # Every rank hits the same config error; only rank 0 says it, so the launcher shows one line. The
    # other ranks wait a little before exiting: horovodrun kills every rank once one fails, and a rank 1
    # that failed first would take rank 0 down before it had said why. Rank 0's exit ends the wait.
    if os.environ.get("HOROVOD_RANK", "0") == "0":
        print(f"rn50.train: error: {e}", file=sys.stderr)
    else:
        time.sleep(_QUIET_RANK_GRACE_S)


def train(cfg: Dict, data_dir: Path, out: Path, run_index: int = 0, seed: Optional[int] = None,
          resume: bool = False) -> int:
    """One MLPerf run on this rank; returns the exit code (0 after run_stop)."""
    import mxnet as mx
    # DALI must be loaded before Horovod: horovod.mxnet loads its library RTLD_GLOBAL, which exports
    # libmxnet.so's static libjpeg/libtiff/zlib to every library loaded later; DALI loaded after it binds
    # to those instead of its own and its first pipeline run segfaults (DALI 1.35 + Horovod 0.28.1).
    import nvidia.dali.fn  # noqa: F401
    import horovod.mxnet as hvd
    from mxnet import gluon

    from rn50 import data as rdata
    from rn50 import timing
    from rn50.mllog import RunLogger

    report_native_crashes()
    hvd.init()
    rank, size, local_rank = hvd.rank(), hvd.size(), hvd.local_rank()
    problem = world_size_error(cfg, size)
    if problem:
        raise ConfigError(problem)  # before anything is logged or written
    gpu, ctx = _device(cfg, local_rank, mx)  # likewise: a GPU config on a CPU box writes nothing
    ckpt = Checkpoints(Path(out) / "checkpoints" / f"run_{run_index}")
    resume_from = ckpt.latest() if resume else None
    log = RunLogger(Path(out) / f"result_{run_index}.txt", rank, append=resume_from is not None)
    timings = timing.TimingLog(Path(out), run_index, rank, append=resume_from is not None)
    clock = timing.EpochClock(mx.nd.waitall)
    if rank == 0 and not resume:
        ckpt.clear()  # a fresh attempt never inherits a previous attempt's state
    if resume_from is not None:
        log.note(f"# resumed from checkpoint epoch {resume_from['epoch']} (non-timed run)")
    say = _Say(rank)

    # ---- init (not timed) ------------------------------------------------------------------------
    log.event("cache_clear", _drop_page_cache([data_dir / "train.rec", data_dir / "val.rec"]))
    log.start("init_start")
    log.log_submission(cfg)
    base_seed = _agree_on_seed(seed, rank, size, ctx, hvd, mx)
    log.event("seed", base_seed)

    n_train = rdata.count_records(data_dir / "train.idx")
    n_val = rdata.count_records(data_dir / "val.idx")
    classes = cfg["classes"] or rdata.max_label(data_dir) + 1
    if classes < 2:
        raise ConfigError(f"cannot tell the number of classes from {data_dir} (no .lst files); set `classes`")
    batch, global_batch = cfg["batch_size"], cfg["global_batch_size"]
    steps_per_epoch = n_train // global_batch
    if steps_per_epoch < 1:
        raise ConfigError(f"{n_train} train images is less than one global batch ({global_batch})")

    net = build_model(cfg, classes, ctx, mx)
    schedule, trainer = build_trainer(cfg, net, steps_per_epoch, hvd)
    start_epoch = 1
    if resume_from is not None:
        net.load_parameters(str(ckpt.root / resume_from["params"]), ctx=ctx)
        trainer.load_states(str(ckpt.root / resume_from["states"]))
        start_epoch = resume_from["epoch"] + 1
    hvd.broadcast_parameters(net.collect_params(), root_rank=0)  # every rank starts from rank 0's weights
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss(sparse_label=False)

    # lars_opt_learning_rate_decay_steps: steps from the first one to end_lr (the RCP table's meaning).
    log.log_hyperparameters(cfg, global_batch, batch, cfg["warmup_epochs"], schedule.total_steps)
    if cfg["preflight_allreduce_mb"] > 0:
        _preflight(cfg, timing.preflight_bandwidth(hvd, mx, ctx, cfg["preflight_allreduce_mb"]), timings, say)
    log.end("init_stop")
    _barrier(hvd, mx, ctx)

    # ---- run (timed) -----------------------------------------------------------------------------
    log.start("run_start")
    log.event("train_samples", n_train)
    log.event("eval_samples", n_val)
    # The pipelines open and start reading the data: inside the timed region, as NVIDIA builds them.
    train_loader = rdata.Loader(rdata.build_pipeline(data_dir, "train", cfg, rank, size, gpu, seed=base_seed + rank), ctx)
    val_loader = rdata.Loader(rdata.build_pipeline(data_dir, "val", cfg, rank, size, gpu, seed=base_seed + rank), ctx)
    evals = [e for e in eval_epochs(cfg["max_epochs"], cfg["eval_period"], cfg["eval_offset"]) if e >= start_epoch]
    say(f"rn50.train: {cfg['name']}: {size} rank(s) on {ctx}, {classes} classes, {n_train} train / {n_val} val, "
        f"global batch {global_batch}, {steps_per_epoch} steps/epoch, evals after epochs {evals}")

    status, accuracy, epoch, block_first = "aborted", 0.0, start_epoch - 1, start_epoch
    for block_last in evals:
        log.start("block_start", metadata={"first_epoch_num": block_first, "epoch_count": block_last - block_first + 1})
        for epoch in range(block_first, block_last + 1):
            log.start("epoch_start", metadata={"epoch_num": epoch})
            stats = train_one_epoch(net, trainer, loss_fn, train_loader, steps_per_epoch, cfg, classes, ctx,
                                    say=say, epoch=epoch, clock=clock)
            ranks = timing.gather_json(timing.rank_record(epoch, rank, local_rank, stats), hvd, mx, "timing")
            total = sum(r["img_per_s"] for r in ranks)
            log.end("epoch_stop", metadata={"epoch_num": epoch, "throughput_img_per_s_per_rank": round(stats["img_per_s"], 2),
                                            "throughput_img_per_s_total": round(total, 2)})
            log.tracked_stats(epoch, total)
            timings.write(ranks)
            say(f"epoch {epoch}: loss {stats['loss']:.4f} lr {trainer.learning_rate:.4g} {stats['seconds']:.1f}s "
                f"{stats['img_per_s']:.1f} img/s/rank (rank 0) {total:.1f} img/s total")

        log.start("eval_start", metadata={"epoch_num": epoch})
        correct, seen = evaluate(net, val_loader, n_val, rank, size, batch, ctx, hvd)
        accuracy = correct / seen
        log.end("eval_stop", metadata={"epoch_num": epoch})
        log.event("eval_accuracy", accuracy, metadata={"epoch_num": epoch})
        log.end("block_stop", metadata={"first_epoch_num": block_first})
        say(f"eval after epoch {epoch}: top-1 {accuracy:.4f} ({correct}/{seen})")
        if rank == 0 and not cfg["timed"]:
            ckpt.save(net, trainer, epoch, _ckpt_meta(cfg, accuracy, base_seed, size))
        block_first = epoch + 1
        if accuracy >= cfg["target_accuracy"]:
            status = "success"
            break

    log.end("run_stop", metadata={"status": status})
    say(f"run_stop: {status} at epoch {epoch}, top-1 {accuracy:.4f} (target {cfg['target_accuracy']})")
    log.close()

    # ---- after the timed region ------------------------------------------------------------------
    if rank == 0 and cfg["timed"] and epoch >= start_epoch:
        t0 = time.time()
        ckpt.save(net, trainer, epoch, _ckpt_meta(cfg, accuracy, base_seed, size))
        say(f"checkpoint of epoch {epoch} written after run_stop in {time.time() - t0:.2f}s (outside the timed region)")
    _barrier(hvd, mx, ctx)
    return 0


def _preflight(cfg: Dict, bw: Dict[str, float], timings, say) -> None:
    """Report the preflight bandwidth; below the expected figure warn, or refuse (exit 2) when configured."""
    timings.write_preflight(bw)
    say(f"preflight: allreduce of {bw['bytes'] / 2 ** 20:g} MiB across {bw['ranks']} rank(s) in {bw['seconds'] * 1000:.1f} ms: "
        f"bus bandwidth {bw['busbw_gbps']:g} GB/s (algorithm {bw['algbw_gbps']:g} GB/s)")
    expected = cfg["expected_busbw_gbps"]
    if expected and bw["busbw_gbps"] < expected:
        msg = f"preflight bus bandwidth {bw['busbw_gbps']:g} GB/s is below the expected {expected:g} GB/s"
        if cfg["preflight_refuse"]:
            raise ConfigError(msg + " (preflight_refuse: true)")
        say(f"warning: {msg}")


def train_one_epoch(net, trainer, loss_fn, loader, steps: int, cfg: Dict, classes: int, ctx,
                    say=None, epoch: int = 0, clock=None) -> Dict[str, float]:
    """`steps` optimizer steps over batches from `loader` (every rank takes the same number, or the
    allreduce would hang). Returns this rank's mean loss, seconds and images/s; with `clock` (an
    rn50.timing.EpochClock) also its step-time, data-wait and allreduce figures."""
    import mxnet as mx
    from mxnet import autograd

    from rn50.optim import smoothed_labels

    batch = cfg["batch_size"]
    t0 = time.time()
    loss_sum = mx.nd.zeros((1,), ctx=ctx)
    if clock is not None:
        clock.reset(steps)
    batches = loader.batches(steps)
    for step in range(steps):
        timed = clock is not None and clock.sampled(step)
        if timed:
            clock.begin()
        x, y = next(batches)
        if timed:
            clock.fetched()
        target = smoothed_labels(y, classes, cfg["label_smoothing"], dtype="float32")
        with autograd.record():
            out = net(x).astype("float32", copy=False)
            loss = loss_fn(out, target)
        loss.backward()
        if timed:  # trainer.step in its two halves, so that the allreduce is timed apart
            clock.computed()
            trainer.allreduce_grads()
            clock.reduced()
            trainer.update(batch)
            clock.updated()
        else:
            trainer.step(batch)
        loss_sum += loss.mean()
        if say is not None and cfg["log_every"] and (step + 1) % cfg["log_every"] == 0:
            say(f"  epoch {epoch} step {step + 1}/{steps} lr {trainer.learning_rate:.4g}")
    mean_loss = float(loss_sum.asscalar()) / steps  # also waits for the epoch's work
    seconds = time.time() - t0
    stats = {"loss": mean_loss, "seconds": seconds, "img_per_s": steps * batch / seconds}
    if clock is not None:
        stats.update(clock.summary(batch, seconds, steps))
    return stats


def evaluate(net, loader, n_val: int, rank: int, size: int, batch: int, ctx, hvd):
    """Top-1 over ALL validation images: each rank scores its own shard (DALI pads it to whole
    batches; the padding is dropped), the counts are summed across ranks. Returns (correct, seen)."""
    import mxnet as mx

    from rn50 import data as rdata

    begin, end = rdata.shard_bounds(n_val, rank, size)
    correct, seen = 0, 0
    for x, y in loader.batches(rdata.val_batches_per_shard(n_val, size, batch)):
        keep = min(batch, (end - begin) - seen)
        if keep > 0:
            pred = net(x).argmax(axis=1).astype("int32")
            correct += int((pred[:keep] == y[:keep]).sum().asscalar())
            seen += keep
    counts = hvd.allreduce(mx.nd.array([correct, seen], ctx=ctx, dtype="float64"), op=hvd.Sum, name="eval")
    correct_all, seen_all = (int(v) for v in counts.asnumpy())
    if seen_all != n_val:
        raise RuntimeError(f"evaluation saw {seen_all} of {n_val} validation images")
    return correct_all, seen_all


def build_model(cfg: Dict, classes: int, ctx, mx):
    from rn50.model import resnet50_v1_5

    net = resnet50_v1_5(classes=classes, layers=cfg["depth"], width=cfg["width"], layout=cfg["layout"],
                        bn_momentum=cfg["bn_momentum"], bn_eps=cfg["bn_eps"],
                        zero_init_last_bn=cfg["bn_zero_init_last"])
    # He (MSRA) init for convs, as the reference; BN, biases and the classifier keep their own initializers.
    net.initialize(mx.init.Xavier(rnd_type="gaussian", factor_type="in", magnitude=2), ctx=ctx)
    if cfg["dtype"] == "float16":
        net.cast("float16")
    # No dummy forward here: an inference-mode forward on CPU leaves conv weights in MKL-DNN's
    # blocked layout, whose byte size differs from the plain one and breaks Horovod's broadcast.
    # Shapes are deferred; Horovod broadcasts each parameter right after its deferred init.
    if cfg["hybridize"]:
        net.hybridize(static_alloc=True, static_shape=True)
    return net


def build_trainer(cfg: Dict, net, steps_per_epoch: int, hvd):
    """The poly-warm-up schedule and Horovod's trainer around the (multi-tensor) LARS optimizer."""
    from rn50.optim import PolyWarmupSchedule, build_optimizer

    decay_epochs = cfg["decay_epochs"] or cfg["max_epochs"]
    schedule = PolyWarmupSchedule(cfg["base_lr"], int(round(cfg["warmup_epochs"] * steps_per_epoch)),
                                  decay_epochs * steps_per_epoch, cfg["end_lr"], cfg["lr_power"])
    optimizer = build_optimizer(cfg, schedule, multi_precision=cfg["dtype"] == "float16")
    trainer = hvd.DistributedTrainer(net.collect_params(), optimizer, num_groups=cfg["horovod_num_groups"])
    return schedule, trainer


def _device(cfg: Dict, local_rank: int, mx):
    gpu = local_rank if mx.context.num_gpus() > 0 else None
    if gpu is None and needs_gpu(cfg):
        raise ConfigError(f"config {cfg['name']!r} needs a GPU (dtype float16 / NHWC / mixed decode); none found")
    return gpu, (mx.gpu(gpu) if gpu is not None else mx.cpu())


def report_native_crashes() -> None:
    """On SIGSEGV/SIGBUS/SIGABRT, print every Python thread's stack to stderr (the rank log), then hand the
    signal on to the handler installed before (MXNet's, which prints "Segmentation fault: 11" and aborts).
    Call it after mxnet is imported, so MXNet's handler is the one chained. Without it a native crash says no
    more than "Segmentation fault: 11"; with it the log shows where each Python thread was (the thread that
    faulted may be a native one, e.g. an engine worker)."""
    import faulthandler

    faulthandler.enable(file=sys.stderr, all_threads=True)


def _agree_on_seed(seed: Optional[int], rank: int, size: int, ctx, hvd, mx) -> int:
    """Rank 0 picks the base seed, everyone agrees on it; ranks seed with base + rank so their
    augmentations and shuffles differ."""
    import numpy as np

    base = seed if seed is not None else random.SystemRandom().randrange(1, 2 ** 31 - size)
    base = int(hvd.broadcast(mx.nd.array([base], ctx=ctx, dtype="float64"), root_rank=0, name="seed").asscalar())
    mx.random.seed(base + rank)
    np.random.seed(base + rank)
    random.seed(base + rank)
    return base


def _ckpt_meta(cfg: Dict, accuracy: float, seed: int, size: int) -> Dict:
    return {"accuracy": accuracy, "config": cfg["name"], "seed": seed, "ranks": size,
            "global_batch": cfg["global_batch_size"]}


class _Say:
    """print() on rank 0 only."""

    def __init__(self, rank: int):
        self.rank = rank

    def __call__(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)


def _barrier(hvd, mx, ctx) -> None:
    # Same name on every rank (Horovod matches collectives by name); sequential reuse is fine.
    hvd.allreduce(mx.nd.zeros((1,), ctx=ctx), name="barrier").wait_to_read()


if __name__ == "__main__":
    sys.exit(main())
