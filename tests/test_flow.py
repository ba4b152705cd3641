"""The `rn50` flow end to end: stage states, content-keyed caching, invalidation, rerun, concurrency.

Runs `rn50 run --json` (the flow in-process) against a real local Prefect server started here.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from conftest import rn50
from helpers import trained_runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_source(tmp_path_factory) -> Path:
    from tasks.synth import synthesize

    out = tmp_path_factory.mktemp("demo-synth")
    synthesize(out)  # the default size: the cpu-demo config converges on it in about a minute
    return out


def run_flow(server, source: Path, wd: Path, *extra: str) -> dict:
    env = {k: v for k, v in server.env().items() if k.startswith(("PREFECT_", "RN50_"))}
    proc = rn50("run", source, wd, "--json", *extra, env=env, timeout=1500)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON on stdout (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    out = json.loads(lines[-1])
    out["returncode"], out["output"] = proc.returncode, proc.stdout + proc.stderr
    out["log"] = [line for line in proc.stderr.splitlines() if "key " in line or "again" in line or "Finished" in line]
    return out


EVERY = ("fetch", "verify", "pack", "train", "compliance", "archive")


@pytest.fixture(scope="module")
def first_run(prefect_server, demo_source, tmp_path_factory):
    wd = tmp_path_factory.mktemp("flow") / "wd"
    return wd, run_flow(prefect_server, demo_source, wd)


def test_full_flow_runs_every_stage(first_run):
    wd, out = first_run
    assert out["returncode"] == 0 and out["state"] == "Completed", out
    assert out["stages"]["container"] == out["stages"]["distribute"] == "Skipped"
    assert all(out["stages"][s] == "Completed" for s in EVERY), out["stages"]
    assert (wd / "archive" / "MANIFEST.json").is_file()
    [run_dir] = trained_runs(wd)
    assert (run_dir / "result_0.txt").read_text().count('"key": "run_stop"') == 1


def test_second_run_is_all_cached_and_invalidation_reruns_only_what_changed(prefect_server, demo_source, first_run):
    wd, _ = first_run
    out = run_flow(prefect_server, demo_source, wd)
    assert out["stages"] == {**{s: "Cached" for s in EVERY}, "container": "Skipped",
                             "distribute": "Skipped"}, out["stages"]

    # Outputs deleted: the stage runs again; what it feeds is unchanged in content, so stays cached.
    (wd / "manifest.parquet").unlink()
    out = run_flow(prefect_server, demo_source, wd)
    assert out["stages"]["verify"] == "Completed" and (wd / "manifest.parquet").is_file()
    assert out["stages"]["fetch"] == "Cached" and out["stages"]["pack"] == "Cached"
    assert out["stages"]["train"] == "Cached"

    # Outputs altered: the packed records are rewritten.
    rec = wd / "recordio" / "val.rec"
    with open(rec, "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff\xff\xff")
    out = run_flow(prefect_server, demo_source, wd)
    assert out["stages"]["pack"] == "Completed", out["stages"]
    assert out["stages"]["train"] == "Cached"  # same manifest + settings -> same content digest
    assert out["returncode"] == 0


def test_rerun_train_reruns_train_and_what_follows_only(prefect_server, demo_source, first_run):
    wd, _ = first_run
    before = set(trained_runs(wd))
    out = run_flow(prefect_server, demo_source, wd, "--rerun", "train")
    assert out["returncode"] == 0, out
    assert {s: out["stages"][s] for s in ("fetch", "verify", "pack")} == dict.fromkeys(("fetch", "verify", "pack"), "Cached")
    assert {s: out["stages"][s] for s in ("train", "compliance", "archive")} == dict.fromkeys(
        ("train", "compliance", "archive"), "Completed")
    assert len(set(trained_runs(wd)) - before) == 1


def test_a_result_from_another_workdir_never_replaces_this_ones(prefect_server, demo_source, first_run, tmp_path):
    """Keys are content: another work dir with the same data writes Prefect's records for the same keys.
    Back in the first work dir every stage is a cache hit with the results it had there (its own run),
    not the other work dir's: with Prefect's record, compliance would look for the other run's logs here."""
    from tasks.common import Workdir, read_stamp

    wd, _ = first_run
    other = run_flow(prefect_server, demo_source, tmp_path / "other")
    assert other["returncode"] == 0 and other["stages"]["train"] == "Completed", other
    out = run_flow(prefect_server, demo_source, wd)
    assert out["returncode"] == 0, out
    assert out["stages"] == {**{s: "Cached" for s in EVERY}, "container": "Skipped",
                             "distribute": "Skipped"}, out["stages"]
    run_dir = Path(read_stamp(Workdir(wd), "flow-train")["result"]["run_dir"])
    assert run_dir.parent == wd / "runs" and (run_dir / "result_0.txt").is_file()
    [line] = [ln for ln in out["output"].splitlines() if "time to train:" in ln]
    assert f"({run_dir}); archived to file://{wd}/archive" in line, line


def test_two_concurrent_runs_execute_each_stage_once(prefect_server, demo_source, tmp_path):
    wd = tmp_path / "wd"
    results: list[dict] = []
    threads = [threading.Thread(target=lambda: results.append(run_flow(prefect_server, demo_source, wd)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r["returncode"] == 0 for r in results), results
    for stage in ("verify", "pack", "train"):
        states = sorted(r["stages"][stage] for r in results)
        assert states == ["Cached", "Completed"], (stage, states, results[0]["log"], results[1]["log"])
    assert len(trained_runs(wd)) == 1  # one rank set trained; the other run waited and took the cache


def _last_line(stderr: str) -> str:
    # Prefect's events client may still report, at interpreter exit and after our error, that it is
    # flushing (seen under load 9): "... | WARNING | EventsWorker - Still processing items: ...".
    return [ln for ln in stderr.strip().splitlines() if "| EventsWorker - " not in ln][-1]


def test_bad_pipeline_and_missing_source_fail_clearly(prefect_server, tmp_path):
    env = {k: v for k, v in prefect_server.env().items() if k.startswith(("PREFECT_", "RN50_"))}
    proc = rn50("run", tmp_path / "nope", tmp_path / "wd", env=env, timeout=600)
    assert proc.returncode != 0
    assert str(tmp_path / "nope") in _last_line(proc.stderr)
    proc = rn50("run", tmp_path, tmp_path / "wd", "--pipeline", "no-such", env=env, timeout=600)
    assert proc.returncode != 0 and "no pipeline config 'no-such'" in _last_line(proc.stderr)


def test_nightly_accepts_a_baseline_then_fails_a_regression(prefect_server, demo_source, first_run):
    wd, _ = first_run
    out = run_flow(prefect_server, demo_source, wd, "--nightly")
    assert out["returncode"] == 0 and out["stages"]["nightly"] == "Completed", out
    assert out["stages"]["train"] == "NotRun" and out["stages"]["train-nightly"] == "Completed"
    baseline = wd / "archive" / "nightly" / "baseline.json"
    doc = json.loads(baseline.read_text())
    assert doc["run_ids"] and doc["epochs_to_target"] is not None

    # A baseline that converged at the first evaluation makes tonight's run a regression.
    first_eval = doc["curve"][0][0]
    for holder in [doc, *doc["runs"]]:
        holder["curve"] = [[first_eval, 0.95]]
        holder["epochs_to_target"], holder["final_accuracy"] = first_eval, 0.95
    baseline.write_text(json.dumps(doc))
    out = run_flow(prefect_server, demo_source, wd, "--nightly")
    assert out["returncode"] != 0 and out["state"] == "Failed", out
    assert out["stages"]["nightly"] == "Completed" and out["stages"]["compliance"] == "NotRun"
    assert json.loads(baseline.read_text())["curve"] == [[first_eval, 0.95]]  # a regression is never accepted
    reports = list((wd / "reports" / "nightly").glob("*/convergence.png"))
    assert len(reports) == 2 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in reports)
