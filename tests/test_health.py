"""tasks/health.py and the published-results table.

The table: scripts/mlperf_published_table.py run on real public logs (a subset copied under tests/fixtures/),
its rows equal to the committed tasks/data table's, and its figures equal to ones computed here
independently (plain JSON reading of the :::MLLOG lines, not the mlperf-logging parser the script uses).
The report: run directories written here (MLPerf log + rank timing as rn50/timing.py writes them), a host
named slow only beyond the threshold, the CPU demo said to have no published match, bad timing refused.
The real thing (two hosts, one slowed by a CPU quota): tests/test_cluster_health.py.
"""
from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import health
from tasks.common import StageError

REPO = Path(__file__).resolve().parent.parent
FIX = Path(__file__).resolve().parent / "fixtures"


def _mllog(path: Path):
    return [json.loads(line[len(":::MLLOG "):]) for line in path.read_text().splitlines() if line.startswith(":::MLLOG ")]


def _independent(logs: list[Path], accelerators: int) -> tuple[float, float]:
    """(steady img/s per accelerator, olympic-mean minutes) straight from the JSON lines."""
    per_run, ttts = [], []
    for log in logs:
        recs = _mllog(log)
        tput = {r["metadata"]["step"]: r["value"]["throughput"] for r in recs if r["key"] == "tracked_stats"}
        if not tput:  # no tracked_stats: train_samples over consecutive epoch_stop times
            n = next(r["value"] for r in recs if r["key"] == "train_samples")
            t = {r["metadata"]["epoch_num"]: r["time_ms"] for r in recs if r["key"] == "epoch_stop"}
            tput = {e: n / ((t[e] - t[e - 1]) / 1000) for e in t if e - 1 in t}
        per_run.append(statistics.median(v for e, v in tput.items() if e > min(tput)))
        start = next(r["time_ms"] for r in recs if r["key"] == "run_start")
        stop = [r for r in recs if r["key"] == "run_stop"]
        ok = stop and stop[0]["metadata"].get("status") == "success"
        ttts.append((stop[0]["time_ms"] - start) / 60000 if ok else float("inf"))
    middle = sorted(ttts)[1:-1]
    return statistics.median(per_run) / accelerators, sum(middle) / len(middle)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("table") / "published.csv"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "mlperf_published_table.py"), str(FIX / "mlperf-v4.0-resnet"),
                        "--v07-inspur", str(FIX / "mlperf-v0.7-inspur"), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return _rows(out)


def _rows(path: Path) -> dict[str, dict]:
    return {f"{r['submitter']}/{r['system']}": r for r in csv.DictReader(
        line for line in path.read_text().splitlines() if not line.startswith("#"))}


def test_published_table_is_the_scripts_output_and_matches_independent_figures(built):
    committed = _rows(health.PUBLISHED_TABLE)
    assert len(committed) == 37  # 36 v4.0 systems + the v0.7 Inspur NF5488
    for system, row in built.items():
        assert committed[system] == row, system  # the committed table is what the script builds from these logs
    v4 = FIX / "mlperf-v4.0-resnet"
    cases = [(f"{s}/{name}", sorted((v4 / s / "results" / name / "resnet").glob("*.txt")), n)
             for s, name, n in (("NVIDIA", "eos_n8_ngc24.04_mxnet", 64), ("NVIDIA", "eos_ngc24.04_mxnet", 8),
                                ("tinycorp", "tinybox_green", 6))]
    for system, logs, accelerators in cases:
        per_acc, ttt = _independent(logs, accelerators)
        row = built[system]
        assert int(row["accelerators"]) == accelerators
        assert float(row["img_per_s_per_accelerator"]) == pytest.approx(per_acc, abs=0.051), system
        assert float(row["time_to_train_min"]) == pytest.approx(ttt, abs=0.0006), system
    eos8 = built["NVIDIA/eos_n8_ngc24.04_mxnet"]
    assert (eos8["accelerator"], eos8["nodes"], eos8["converged"]) == ("NVIDIA H100-SXM5-80GB", "8", "4")
    assert round(float(eos8["time_to_train_min"]), 2) == 2.51  # MLPerf's published score for Eos_n8
    assert built["tinycorp/tinybox_green"]["throughput_source"] == "epoch_stop intervals"
    # Inspur v0.7: epoch_start -> epoch_stop; its run_start -> run_stop olympic mean is 33.37 min (DESIGN.md)
    insp = built["Inspur/NF5488"]
    assert insp["throughput_source"] == "epoch_start/epoch_stop" and float(insp["time_to_train_min"]) == pytest.approx(33.37, abs=0.01)


def _log_line(key, t, value=None, event="POINT_IN_TIME", **md):
    return ":::MLLOG " + json.dumps({"namespace": "", "time_ms": t, "event_type": event, "key": key, "value": value,
                                     "metadata": {"file": "x.py", "lineno": 1, **md}})


def _run_dir(root: Path, own: dict[str, list[float]], epochs: int = 4, ranks_per_host: int = 1) -> Path:
    """A run dir with one MLPerf log and rank timing: host -> own img/s per epoch (per rank)."""
    run = root / "runs" / "r1"
    (run / "timing").mkdir(parents=True)
    lines = [_log_line("train_samples", 0, 640), _log_line("run_start", 1000, event="INTERVAL_START")]
    recs, rank = [], 0
    for host, speeds in own.items():
        for _ in range(ranks_per_host):
            for e in range(1, epochs + 1):
                recs.append({"epoch": e, "rank": rank, "local_rank": 0, "host": host, "pid": 100 + rank, "steps": 10,
                             "images": 320, "seconds": 4.0, "img_per_s": 80.0, "sampled_steps": 3,
                             "own_img_per_s": speeds[e - 1], "step_ms_p50": 400.0, "step_ms_p95": 420.0,
                             "step_ms_max": 450.0, "data_wait_s": 0.1, "compute_s": 0.8, "allreduce_s": 0.3,
                             "data_wait_frac": 0.08, "allreduce_frac": 0.25, "run_index": 0})
            rank += 1
    for e in range(1, epochs + 1):
        lines += [_log_line("epoch_stop", 1000 + 4000 * e, event="INTERVAL_END", epoch_num=e),
                  _log_line("tracked_stats", 1000 + 4000 * e, {"throughput": 80.0 * rank}, step=e)]
    lines += [_log_line("eval_accuracy", 1000 + 4000 * epochs, 0.8, epoch_num=epochs),
              _log_line("run_stop", 1000 + 4000 * epochs, event="INTERVAL_END", status="success")]
    (run / "result_0.txt").write_text("\n".join(lines) + "\n")
    (run / "timing" / "run_0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return run


H100 = {"accelerator_model_name": "NVIDIA H100-SXM5-80GB", "accelerators_per_node": "8", "number_of_nodes": "2"}


def test_slow_host_named_beyond_the_threshold_only(tmp_path):
    # node-c's first epoch is fast (warm-up is left out); from epoch 2 on it runs 20 % below the others.
    run = _run_dir(tmp_path / "a", {"node-a": [50, 100, 101, 99], "node-b": [50, 98, 100, 102], "node-c": [90, 80, 79, 81]})
    r = health.report(run, tmp_path / "a" / "out", system=H100)
    assert r.slowest_host == "node-c" and [s["host"] for s in r.slow_hosts] == ["node-c"]
    assert r.slow_hosts[0]["own_img_per_s_per_gpu"] == 80 and r.slow_hosts[0]["median"] == 100
    assert r.verdict.startswith("slow host: node-c at 80 img/s per rank, 20.0 % below the hosts' median 100")
    assert r.img_per_s == 240 and r.img_per_s_per_gpu == 80 and r.runs[0]["time_to_train_min"] == pytest.approx(16 / 60)
    assert r.data_wait_frac == pytest.approx(0.08) and r.allreduce_frac == pytest.approx(0.25)
    md = Path(r.report_md).read_text()
    assert "| node-c | 1 | 80.0 |" in md and "SLOW" in md and Path(r.plot_png).read_bytes()[:4] == b"\x89PNG"
    assert json.loads(Path(r.report_json).read_text())["slowest_host"] == "node-c"
    # The same spread under a 25 % threshold names nobody; 3 % off the median is under the default 5 %.
    assert health.report(run, tmp_path / "a" / "o2", threshold=0.25).slowest_host is None
    near = _run_dir(tmp_path / "b", {"node-a": [100] * 4, "node-b": [97] * 4, "node-c": [100] * 4})
    r2 = health.report(near, tmp_path / "b" / "out")
    assert r2.slowest_host is None and r2.verdict.startswith("no slow host: all 3 host(s) within 5 %")


def test_published_comparison_names_the_closest_entries_and_says_so_for_a_cpu(tmp_path):
    table = health.load_published()
    pub = health.compare_published(H100, 7000.0, table)
    assert pub["matched"] and all(e["accelerator"].startswith("NVIDIA H100-SXM") for e in pub["entries"])
    assert pub["entries"][0]["accelerators"] == 16  # HPE's 2 x 8 H100 is the nearest count to 2 x 8
    first = pub["entries"][0]
    assert pub["text"].startswith(f"16x NVIDIA H100-SXM5-80GB: 7000 img/s per GPU here, "
                                  f"{first['img_per_s_per_accelerator']:.0f} in HPE's published run")
    assert first["percent_of_published"] == round(100 * 7000 / first["img_per_s_per_accelerator"], 1)
    a100 = health.compare_published({"accelerator_model_name": "NVIDIA A100", "accelerators_per_node": "8"}, 2800.0, table)
    assert [e["system"] for e in a100["entries"]] == ["NF5488"]
    cpu = health.compare_published({"accelerator_model_name": "N/A (CPU only)", "accelerators_per_node": "0"}, 90.0, table)
    assert not cpu["matched"] and cpu["text"].startswith("no published MLPerf ResNet result matches a CPU-only run")
    v100 = health.compare_published({"accelerator_model_name": "Tesla V100-PCIE-16GB", "accelerators_per_node": "4"}, 900.0, table)
    assert not v100["matched"] and "'Tesla V100-PCIE-16GB'" in v100["text"]


@pytest.mark.parametrize("line, msg", [
    ("not json", "line 1: not JSON"),
    ('{"epoch": 1, "rank": 0, "host": "a b"}', "line 1: host must be a host name"),
    ('{"epoch": -1, "rank": 0, "host": "a"}', "line 1: epoch must be a non-negative integer"),
])
def test_bad_timing_file_is_one_line_error(tmp_path, line, msg):
    run = _run_dir(tmp_path, {"node-a": [100] * 4})
    (run / "timing" / "run_0.jsonl").write_text(line + "\n")
    with pytest.raises(StageError) as e:
        health.report(run, tmp_path / "out")
    assert msg in str(e.value) and "\n" not in str(e.value)
    good = _run_dir(tmp_path / "g", {"node-a": [100] * 4})
    doc = json.loads((good / "timing" / "run_0.jsonl").read_text().splitlines()[0])
    doc["own_img_per_s"] = float("nan")
    (good / "timing" / "run_0.jsonl").write_text(json.dumps(doc) + "\n")
    with pytest.raises(StageError, match="own_img_per_s must be a finite number"):
        health.report(good, tmp_path / "g" / "out")
    assert not (tmp_path / "g" / "out").exists()  # nothing half-written


def test_rn50_check_writes_and_prints_the_health_report(tmp_path):
    run = _run_dir(tmp_path, {"node-a": [100] * 4, "node-b": [101] * 4, "node-c": [60] * 4})
    r = subprocess.run([sys.executable, "-m", "tasks.cli", "check", str(run), "--slow-host-threshold", "0.25"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "health: slow host: node-c at 60 img/s per rank, 40.0 % below the hosts' median 100" in r.stdout, r.stdout + r.stderr
    out = tmp_path / "compliance" / "r1"
    assert json.loads((out / "report.json").read_text())["health"]["slowest_host"] == "node-c"
    assert "## Cluster health" in (out / "report.md").read_text() and (out / "health.png").exists()
    bad = subprocess.run([sys.executable, "-m", "tasks.cli", "check", str(run), "--slow-host-threshold", "1.5"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().endswith("slow-host threshold must be in (0, 1), not 1.5")


def test_preflight_bandwidth_is_in_the_report_and_a_bad_file_is_refused(tmp_path):
    run = _run_dir(tmp_path, {"node-a": [100] * 4, "node-b": [100] * 4})
    pf = {"bytes": 64 << 20, "ranks": 16, "seconds": 0.05, "algbw_gbps": 1.342, "busbw_gbps": 2.516, "rounds": 3}
    (run / "timing" / "preflight_0.json").write_text(json.dumps(pf))
    r = health.report(run, tmp_path / "out")
    assert r.runs[0]["preflight"]["busbw_gbps"] == 2.516
    assert "- preflight (result_0.txt): allreduce of 64 MiB across 16 ranks, bus bandwidth 2.516 GB/s" in Path(r.report_md).read_text()
    (run / "timing" / "preflight_0.json").write_text(json.dumps({**pf, "busbw_gbps": "fast"}))
    with pytest.raises(StageError, match="preflight_0.json: want finite numbers >= 0 for bytes, ranks"):
        health.report(run, tmp_path / "out2")
