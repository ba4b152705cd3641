"""How often a training launch dies of a native crash: the rare start-up segfault of one rank.

Runs the train stage's own launcher (tasks.train.train, real horovodrun and ranks) RUNS times on a
work dir that already holds packed recordio/ (e.g. the demo's: `make demo`, then `--workdir .demo/work`),
and counts succeeded runs, crashes (a transient failure naming a segfault or abort) and other failures.
Each failed attempt keeps its run dir; its rank logs hold every Python thread's stack at the crash.
Several copies in parallel (`--parallel`) load the machine the way the test suite does. Run from the repo root:

    .venv/bin/python bench/crash_rate.py --workdir .demo/work --runs 100 --parallel 3

Every launch is appended to `--record` (default bench/results/crash_rate.jsonl, kept in the repo) with the
Horovod build it ran on (.venv/.horovod-build: the patches' digest) and the CPU, so measurements of one build add up
across sessions; `--summary` prints the totals per build.

Training is cut to `--epochs` (default 3). The crash this loop was written for happened in a rank's first
seconds (README: "A rank's start-up segfault"), so `--epochs 1` (one epoch, evaluated, no warm-up) measures
the same start-up at about half the cost of a launch.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RECORD = ROOT / "bench" / "results" / "crash_rate.jsonl"


def horovod_build() -> str:
    stamp = ROOT / ".venv" / ".horovod-build"
    return stamp.read_text().strip() if stamp.is_file() else "unknown"


def cpu_model() -> str:
    """The CPU the launches ran on (/proc/cpuinfo's model name): records of one build may come from several machines."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def summary(record: Path) -> str:
    """Launches, crashes and other outcomes per Horovod build, from the record."""
    per: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    first: dict[str, str] = {}
    for line in record.read_text().splitlines():
        entry = json.loads(line)
        per[entry["horovod_build"]][entry["outcome"]] += 1
        first.setdefault(entry["horovod_build"], entry["at"])
    return "\n".join(f"{build} (since {first[build]}): {sum(c.values())} launches: "
                     + ", ".join(f"{k} {v}" for k, v in sorted(c.items())) for build, c in per.items())


def overrides(epochs: int) -> list[str]:
    """`--set` arguments for a training cut to `epochs` epochs, the last one evaluated."""
    sets = [f"max_epochs={epochs}"]
    if epochs == 1:
        sets += ["eval_offset=0", "eval_period=1", "warmup_epochs=0"]
    return [a for kv in sets for a in ("--set", kv)]


def keep_first(recordio: Path, split: str, n: int) -> None:
    """Cut `split`.rec/.idx to their first `n` records: the .rec is contiguous, so it ends where record n starts."""
    idx = recordio / f"{split}.idx"
    lines = idx.read_text().splitlines()
    if n >= len(lines):
        return
    end = int(lines[n].split("\t")[1])
    with open(recordio / f"{split}.rec", "r+b") as f:
        f.truncate(end)
    idx.write_text("".join(line + "\n" for line in lines[:n]))


def one_copy(workdir: Path, runs: int, config: str, extra: list[str], deadline: float, tally: collections.Counter,
             crashes: list, lock, record: Path, setting: dict) -> None:
    from tasks import rank_logs
    from tasks.common import TransientError
    from tasks.train import train

    for _ in range(runs):
        if time.monotonic() >= deadline:
            return
        detail = ""
        try:
            res = train(workdir, config=config, extra_args=extra, timeout_s=600)
            outcome = res.status
            shutil.rmtree(res.run_dir)  # a succeeded run says nothing more; keep the disk small
        except TransientError as e:
            # The attempt just kept (run ids sort by time); a crash by the launcher's own rule.
            failed = sorted((workdir / "runs").glob("*/FAILED"))[-1].parent
            crashed = any(rank_logs.crashed(log.read_text(errors="replace").splitlines())
                          for log in failed.glob("rank*.log"))
            outcome, detail = ("crashed" if crashed else "transient"), f"{failed}: {e}"
            if crashed:
                with lock:
                    crashes.append(detail)
        except Exception as e:  # noqa: BLE001 - counted and shown, the loop goes on
            outcome, detail = f"failed ({type(e).__name__})", str(e)
            print(f"  {e}", file=sys.stderr)
        entry = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "outcome": outcome, **setting,
                 "load1": round(os.getloadavg()[0], 1), **({"detail": detail[:500]} if detail else {})}
        with lock:
            tally[outcome] += 1
            done = sum(tally.values())
            with open(record, "a") as f:
                f.write(json.dumps(entry) + "\n")
        print(f"  {done}: {outcome}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, help="a work dir holding recordio/{train,val}.{rec,idx}")
    ap.add_argument("--runs", type=int, default=50, help="launches per parallel copy (default 50)")
    ap.add_argument("--parallel", type=int, default=1, help="copies at once, each in its own work dir (default 1)")
    ap.add_argument("--config", default="cpu-demo", help="training config (default cpu-demo)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per launch (default 3; 1 = one evaluated epoch)")
    ap.add_argument("--train-images", type=int, default=0,
                    help="train on the first N packed images only (default 0: all); the start-up is the same")
    ap.add_argument("--minutes", type=float, default=0,
                    help="start no launch after this many minutes (default 0: no limit); the summary counts what ran")
    ap.add_argument("--record", type=Path, default=RECORD,
                    help=f"append each launch here (default {RECORD.relative_to(ROOT)})")
    ap.add_argument("--summary", action="store_true", help="print the record's totals per Horovod build, run nothing")
    args = ap.parse_args(argv)
    if args.summary:
        if not args.record.is_file():
            print(f"crash_rate: no record at {args.record}", file=sys.stderr)
            return 2
        print(summary(args.record))
        return 0
    if args.workdir is None:
        print("crash_rate: --workdir is required (a work dir holding recordio/)", file=sys.stderr)
        return 2
    if args.epochs < 1 or args.train_images < 0:
        print("crash_rate: --epochs must be at least 1 and --train-images at least 0", file=sys.stderr)
        return 2
    rec = args.workdir / "recordio"
    if not all((rec / f"{s}.{x}").is_file() for s in ("train", "val") for x in ("rec", "idx")):
        print(f"crash_rate: {rec} has no packed train/val .rec/.idx (run `make demo` first)", file=sys.stderr)
        return 2

    deadline = time.monotonic() + args.minutes * 60 if args.minutes > 0 else float("inf")
    tally: collections.Counter = collections.Counter()
    crashes: list[str] = []
    lock = threading.Lock()
    args.record.parent.mkdir(parents=True, exist_ok=True)
    setting = {"horovod_build": horovod_build(), "cpu": cpu_model(), "parallel": args.parallel, "epochs": args.epochs,
               "train_images": args.train_images or "all", "config": args.config}
    threads = []
    for n in range(args.parallel):
        # One work dir per copy: the train stage's lock would otherwise run them one after the other.
        wd = args.workdir.resolve().parent / f"crash-rate-{n}"
        shutil.copytree(rec, wd / "recordio", dirs_exist_ok=True)
        if args.train_images:
            keep_first(wd / "recordio", "train", args.train_images)
        threads.append(threading.Thread(target=one_copy, args=(wd, args.runs, args.config, overrides(args.epochs),
                                                               deadline, tally, crashes, lock, args.record,
                                                               setting)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = sum(tally.values())
    print(f"{total} launches: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.items())))
    for c in crashes:
        print(f"  crash: {c}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
