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
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out" / "cached_flow"
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
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                     sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200)
        flow_run = client.read_flow_run(flow_run_id)
    per = {tr.name.rsplit("-", 1)[0]: (tr.end_time - tr.start_time).total_seconds() for tr in runs
           if tr.start_time and tr.end_time}
    return (flow_run.end_time - flow_run.start_time).total_seconds(), per


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
            cached = run_flow(src, wd, env)
            assert all(v in ("Cached", "Skipped") for v in cached["stages"].values()), cached["stages"]
            flow_s, per = stage_seconds(cached["flow_run_id"])
            rows.append((name, sum(per.values()), flow_s, per))
    finally:
        server.down()
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"{'dataset':>8} {'stage time (s)':>15} {'flow run (s)':>13}  per stage")
    for name, total, flow_s, per in rows:
        print(f"{name:>8} {total:>15.2f} {flow_s:>13.2f}  " + ", ".join(f"{k} {v:.2f}" for k, v in per.items()))
    small, large = rows[0][1], rows[1][1]
    print(f"50k / 1k cached stage time: {large / small:.2f}x (goal: within 0.8-1.2x, each <= 3 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
