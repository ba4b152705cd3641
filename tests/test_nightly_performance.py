"""The nightly's rule 5 (tasks/nightly.py): time to train, aggregate throughput and per-host speed kept in the
baseline's history and judged against its medians; a host that dropped is named.

Nights are run directories written here: an MLPerf log by the project's own logger (rn50.mllog.RunLogger, read
back by mlperf-logging's parser) with tracked_stats, and rank timing as rn50/timing.py writes it. The real
two-host night with one host slowed by a CPU quota: tests/test_cluster_health.py.
"""
from __future__ import annotations

import json
from pathlib import Path

from rn50.mllog import RunLogger
from tasks import nightly as N

ACC = {1: 0.5, 2: 0.8}


def night(root: Path, run_id: str, hosts: dict[str, float], img_per_s: float = 200.0, minutes: float = 1.0) -> Path:
    """runs/<run_id>/result_0.txt + timing/run_0.jsonl: two epochs, one rank per host with that own img/s."""
    run = root / "runs" / run_id
    log = RunLogger(run / "result_0.txt", 0, echo=False)
    log.event("seed", 1)
    log.event("global_batch_size", 64)
    log.event("opt_name", "lars")
    log._ml.start(key="run_start", time_ms=1_000)
    log.event("train_samples", 1000)
    log.event("eval_samples", 200)
    for epoch, acc in ACC.items():
        log.end("epoch_stop", metadata={"epoch_num": epoch})
        log.tracked_stats(epoch, img_per_s)
        log.event("eval_accuracy", acc, metadata={"epoch_num": epoch})
    log._ml.end(key="run_stop", time_ms=1_000 + int(minutes * 60_000), metadata={"status": "success"})
    log.close()
    (run / "timing").mkdir()
    recs = [{"epoch": e, "rank": r, "local_rank": 0, "host": h, "steps": 15, "images": 480, "seconds": 5.0,
             "img_per_s": img_per_s / len(hosts), "sampled_steps": 4, "own_img_per_s": v, "step_ms_p50": 300.0,
             "step_ms_p95": 320.0, "step_ms_max": 330.0, "data_wait_s": 0.1, "compute_s": 1.0, "allreduce_s": 0.2,
             "data_wait_frac": 0.08, "allreduce_frac": 0.15, "run_index": 0}
            for e in ACC for r, (h, v) in enumerate(sorted(hosts.items()))]
    (run / "timing" / "run_0.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
    return run / "result_0.txt"


def test_history_is_kept_and_a_dropped_host_fails_the_nightly_by_name(tmp_path):
    base = tmp_path / "baseline"
    first = N.run_nightly([night(tmp_path, "n1", {"node-a": 100.0, "node-b": 102.0})], base)
    assert first.verdict == "no-baseline" and first.performance == {
        "time_to_train_min": 1.0, "img_per_s": 200.0, "ranks": 2, "hosts": {"node-a": 100.0, "node-b": 102.0}}
    second = N.run_nightly([night(tmp_path, "n2", {"node-a": 98.0, "node-b": 100.0}, img_per_s=196.0)], base)
    assert second.verdict == "pass", second.reason
    doc = json.loads((base / "baseline.json").read_text())
    assert [h["run_ids"] for h in doc["performance_history"]] == [["n1"], ["n2"]]
    assert doc["performance_history"][1]["hosts"] == {"node-a": 98.0, "node-b": 100.0}

    slow = N.run_nightly([night(tmp_path, "n3", {"node-a": 99.0, "node-b": 60.0}, img_per_s=150.0)], base,
                         tolerance_throughput=0.5)
    assert slow.verdict == "regressed" and slow.failed
    assert slow.failures == ["host node-b dropped: 60 img/s per rank vs its recent median 101 (-40.6 %; 0.61x the "
                             "other hosts' speed, 1.02x recently; threshold 5 %)"]
    assert slow.reason.startswith("nightly regressed: host node-b dropped") and "node-a" not in slow.reason
    # Not accepted: the slow night does not enter the history the next night is judged against.
    assert [h["run_ids"] for h in json.loads((base / "baseline.json").read_text())["performance_history"]] == [["n1"], ["n2"]]
    report = json.loads(Path(slow.report_json).read_text())
    assert report["performance"]["hosts"]["node-b"] == 60.0 and len(report["performance_history"]) == 2
    assert Path(slow.perf_plot_png).read_bytes()[:4] == b"\x89PNG" and "performance.png" in Path(slow.report_md).read_text()
    assert "data:image/png;base64," in N.markdown_with_plot(slow).split("over the nights]")[1]


def test_every_host_slower_is_a_throughput_regression_not_a_host_named(tmp_path):
    base = tmp_path / "baseline"
    N.run_nightly([night(tmp_path, "n1", {"node-a": 100.0, "node-b": 90.0}, img_per_s=180.0)], base)
    # Both hosts 40 % slower (a driver, a shared load): no host fell behind the other.
    r = N.run_nightly([night(tmp_path, "n2", {"node-a": 60.0, "node-b": 54.0}, img_per_s=108.0)], base)
    assert r.failures == ["throughput 108 img/s vs recent median 180 (-40.0 %, tolerance 5 %)"]
    # One host alone: its own drop is the rule.
    N.run_nightly([night(tmp_path, "s1", {"solo": 100.0})], tmp_path / "b2")
    solo = N.run_nightly([night(tmp_path, "s2", {"solo": 80.0})], tmp_path / "b2", tolerance_throughput=0.5)
    assert solo.failures == ["host solo dropped: 80 img/s per rank vs its recent median 100 (-20.0 %, threshold 5 %)"]


def test_time_to_train_and_throughput_regress_beyond_their_tolerances(tmp_path):
    base = tmp_path / "baseline"
    N.run_nightly([night(tmp_path, "n1", {"node-a": 100.0}, img_per_s=200.0, minutes=2.0)], base)
    same_speed_longer = N.run_nightly([night(tmp_path, "n2", {"node-a": 100.0}, img_per_s=200.0, minutes=2.5)], base)
    assert same_speed_longer.failures == ["time to train 2.5 min vs recent median 2 min (+25.0 %, tolerance 15 %)"]
    slower = N.run_nightly([night(tmp_path, "n3", {"node-a": 100.0}, img_per_s=160.0, minutes=2.1)], base)
    assert slower.failures == ["throughput 160 img/s vs recent median 200 (-20.0 %, tolerance 5 %)"]
    within = N.run_nightly([night(tmp_path, "n4", {"node-a": 97.0}, img_per_s=192.0, minutes=2.2)], base)
    assert within.verdict == "pass", within.reason


def test_a_baseline_without_performance_history_judges_convergence_only(tmp_path):
    base = tmp_path / "baseline"
    N.run_nightly([night(tmp_path, "n1", {"node-a": 100.0})], base)
    doc = json.loads((base / "baseline.json").read_text())
    del doc["performance_history"]  # a baseline accepted before the nightly kept time and throughput
    (base / "baseline.json").write_text(json.dumps(doc))
    r = N.run_nightly([night(tmp_path, "n2", {"node-a": 10.0}, img_per_s=20.0, minutes=9.0)], base)
    assert r.verdict == "pass" and r.failures == []
    assert [h["run_ids"] for h in json.loads((base / "baseline.json").read_text())["performance_history"]] == [["n2"]]


def test_scaling_efficiency_against_the_latest_one_host_night(tmp_path):
    base = tmp_path / "baseline"
    one = night(tmp_path, "n1", {"node-a": 100.0}, img_per_s=200.0)  # one host, two ranks on it
    lines = (one.parent / "timing" / "run_0.jsonl").read_text().splitlines()
    second_rank = [json.dumps(dict(json.loads(x), rank=1)) for x in lines]
    (one.parent / "timing" / "run_0.jsonl").write_text("\n".join(lines + second_rank) + "\n")
    first = N.run_nightly([one], base)
    assert first.performance["ranks"] == 2 and first.scaling is None  # nothing to compare one host with
    two = N.run_nightly([night(tmp_path, "n2", {"node-a": 95.0, "node-b": 95.0}, img_per_s=180.0)], base,
                        tolerance_throughput=0.2, host_drop=0.2)
    assert two.verdict == "pass", two.reason
    assert two.scaling == {"efficiency": 0.9, "reference_at": first.acceptance["at"], "reference_per_rank": 100.0}
    assert "scaling efficiency: 90.0 % of the img/s per rank of the one-host night" in Path(two.report_md).read_text()
