"""Benchmark: a fully cached `rn50` flow costs the same for 1 k and 50 k images.

For each size: make a synthetic set, run the flow once to fill the caches, then once more and read
every stage's task-run time from the Prefect API. Cache validation must not re-hash data, so the
cached stage time must be flat (goal: <= 3 s, within +-20 % between the two sizes).

    .venv/bin/python bench/cached_flow.py            # ~10 min on 2 cores (the 50 k set is trained once)
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out" / "cached_flow"
REPEAT = 3  # cached runs per size; medians are reported
SIZES = {  # 10 classes keeps the cpu-demo config converging in a couple of epochs at both sizes
    "1k": dict(classes=10, train_per_class=90, val_per_class=10),
    "50k": dict(classes=10, train_per_class=4900, val_per_class=100),
}


def run_flow(source: Path, wd: Path, env: dict) -> dict:
    proc = subprocess.run([str(Path(sys.executable).parent / "rn50"), "run", str(source), str(wd), "--json"],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode or not lines:
        raise SystemExit(f"flow failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def stage_seconds(flow_run_id: str) -> tuple[float, dict[str, float]]:
    from prefect.client.orchestration import get_client

    from flows.cli import task_runs

    runs = task_runs(flow_run_id)
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
    per = {tr.name.rsplit("-", 1)[0]: (tr.end_time - tr.start_time).total_seconds() for tr in runs
           if tr.start_time and tr.end_time}
    return (flow_run.end_time - flow_run.start_time).total_seconds(), per


def stamp_seconds(wd: Path) -> float:
    """What the flow adds to a cached stage: checking every stage's stamp against its outputs (best of 5)."""
    from tasks.common import Workdir, read_stamp, stamp_valid

    w = Workdir(wd)
    stages = [p.stem for p in w.stamps.glob("flow-*.json")]
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        assert all(stamp_valid(w, s, read_stamp(w, s)["key"]) for s in stages)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    from flows.local import LocalPrefect
    from tasks.synth import synthesize

    server = LocalPrefect(OUT / "prefect", int(os.environ.get("RN50_BENCH_PORT", "4390"))).up()
    env = {**os.environ, **{k: v for k, v in server.env().items() if k.startswith(("PREFECT_", "RN50_"))}}
    os.environ.update(env)
    rows = []
    try:
        for name, size in SIZES.items():
            src, wd = OUT / name / "source", OUT / name / "work"
            if not (src / "MD5SUMS").exists():
                t = time.perf_counter()
                synthesize(src, **size)
                print(f"{name}: synthesized in {time.perf_counter() - t:.0f} s", flush=True)
            t = time.perf_counter()
            first = run_flow(src, wd, env)
            print(f"{name}: filling run {first['stages']} in {time.perf_counter() - t:.0f} s", flush=True)
            samples = []
            for _ in range(REPEAT):
                cached = run_flow(src, wd, env)
                assert all(v in ("Cached", "Skipped") for v in cached["stages"].values()), cached["stages"]
                samples.append(stage_seconds(cached["flow_run_id"]))
            flow_s = statistics.median(s[0] for s in samples)
            per = {k: statistics.median(s[1][k] for s in samples) for k in samples[0][1]}
            rows.append((name, sum(per.values()), flow_s, per, stamp_seconds(wd)))
    finally:
        server.down()
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"{'dataset':>8} {'stage time (s)':>15} {'flow run (s)':>13} {'stamp checks (s)':>17}  per stage (medians of {REPEAT})")
    for name, total, flow_s, per, stamps in rows:
        print(f"{name:>8} {total:>15.3f} {flow_s:>13.3f} {stamps:>17.4f}  " + ", ".join(f"{k} {v:.3f}" for k, v in per.items()))
    (s_name, s_total, s_flow, _, s_stamps), (l_name, l_total, l_flow, _, l_stamps) = rows
    print(f"{l_name} / {s_name}: flow run {l_flow / s_flow:.2f}x, stamp checks {l_stamps / s_stamps:.2f}x "
          f"(goal: <= 3 s each and flat within +-20 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
