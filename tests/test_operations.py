"""Operating the pipeline in Prefect: stage logs and rank 0's epochs in the Logs tab, progress artifacts,
typed parameters and pipeline-config schema errors, the nightly-failure alert.

Everything is real: a local Prefect server + `rn50` process worker (flows.local.LocalPrefect, SQLite,
loopback, free port), `flows.local up` creating the rn50-cluster limit and the alert automation with a
custom-webhook block that posts to a receiver on 127.0.0.1. One rn50/full demo run is shared by the tests
(conftest's session `demo_run`, which the UI page tests also read).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, rn50
from helpers import flow_run_logs, prefect_api, trained_runs
from tasks.common import StageError

pytestmark = pytest.mark.slow


# --- the schema, no server ------------------------------------------------------------------------


def _demo() -> dict:
    return yaml.safe_load((ROOT / "configs/pipeline/demo.yaml").read_text())


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c["train"].update(thredas=2),
     r"^pipeline config (\S+?): train\.thredas: unknown key \(expected one of: config, hosts, runs, timeout_minutes, "
     r"cluster_limit\)$"),
    (lambda c: c["pack"].update(threads="two"), r"^pipeline config (\S+?): pack\.threads: expected a valid integer, got 'two'$"),
    (lambda c: c["pack"].update(full_check="no"), r"^pipeline config (\S+?): pack\.full_check: expected a valid boolean"),
    (lambda c: c["container"].update(runtime="podman"),
     r"^pipeline config (\S+?): container\.runtime: expected 'local' or 'docker', got 'podman'$"),
    (lambda c: c["archive"].pop("uri"), r"^pipeline config (\S+?): archive\.uri: required value missing"),
    (lambda c: c.update(nightly_runs=3), r"^pipeline config (\S+?): nightly_runs: unknown key"),
])
def test_schema_errors_are_one_line_naming_file_key_and_expectation(tmp_path, mutate, expected):
    from flows.config import load_pipeline

    cfg = _demo()
    mutate(cfg)
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(StageError) as e:
        load_pipeline(str(path), source=str(tmp_path), workdir=str(tmp_path / "wd"))
    msg = str(e.value)
    assert "\n" not in msg
    m = re.match(expected, msg)
    assert m and m.group(1) == str(path), msg


def test_shipped_configs_match_the_schema_and_keep_cluster_limit():
    from flows.config import load_pipeline

    demo = load_pipeline("demo")
    team = load_pipeline(str(ROOT / "infra/compose/pipeline-team.yaml"))
    assert demo["train"]["cluster_limit"] == team["train"]["cluster_limit"] == "rn50-cluster"
    assert demo["archive"]["uri"] == f"file://{demo['workdir']}/archive"  # {workdir} filled in after the check


# --- a real server, worker and one demo run ---------------------------------------------------------


def _api(local, method: str, path: str, body: dict | None = None):
    return prefect_api(local.api_url, method, path, body)


def _run_id(proc: subprocess.CompletedProcess) -> str:
    ids = re.findall(r"UUID:\s*([0-9a-f-]{36})", proc.stdout + proc.stderr)
    assert ids, f"no flow run id in `prefect deployment run` output:\n{(proc.stdout + proc.stderr)[-2000:]}"
    return ids[0]


@pytest.fixture(scope="module")
def ops(demo_run):
    """(LocalPrefect, webhook Receiver, source, workdir, flow run id of one finished rn50/full demo run)."""
    return demo_run.local, demo_run.receiver, demo_run.source, demo_run.workdir, demo_run.run_id


def test_logs_tab_has_stage_messages_and_rank0_epochs(ops):
    local, _, _, wd, run_id = ops
    logs = flow_run_logs(local.api_url, run_id)
    msgs = [entry["message"] for entry in logs]
    epochs = [m for m in msgs if re.match(r"\[run 0 rank 0\] epoch \d+: .*img/s", m)]
    evals = [m for m in msgs if re.match(r"\[run 0 rank 0\] eval after epoch \d+: top-1 0\.\d+", m)]
    assert epochs and evals, f"no rank 0 epoch/eval lines among {len(msgs)} log lines: {msgs[:40]}"
    assert len(epochs) >= len(evals) and any("run_stop: success" in m for m in msgs)
    # other ranks: where their output is, and only their warnings and errors beyond that
    from tasks.rank_logs import alarming

    assert not [m for m in msgs if re.match(r"\[run 0 rank 1\] (?!output in )", m) and not alarming(m)]
    assert not [m for m in msgs if ":::MLLOG" in m]  # the MLPerf log stays in the rank log and result file
    [rank1] = [m for m in msgs if m.startswith("[run 0 rank 1] output in ")]
    assert Path(rank1.rsplit(" ", 1)[1]).is_file()
    # the stage modules' own messages: tasks.train (launch), rn50.archive (each object), at INFO
    assert any(re.match(r"\[run 0 launcher\] run 1/1: \S+ -m horovod\.runner\.launch ", m) for m in msgs), msgs[:40]
    uploaded = [entry for entry in logs if entry["message"].startswith("uploaded ")]
    assert uploaded and all(entry["level"] == 20 for entry in uploaded)
    assert all(entry["task_run_id"] for entry in uploaded)  # attributed to the archive task run


def test_progress_artifacts_reach_100_percent(ops):
    local, _, _, _, run_id = ops
    arts = _api(local, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]},
                                                                  "type": {"any_": ["progress"]}}, "limit": 200})
    final = {a["description"]: a["data"] for a in arts}
    expected = {"fetch: ILSVRC2012_img_train.tar (bytes)", "fetch: ILSVRC2012_img_val.tar (bytes)",
                "fetch: ILSVRC2012_devkit_t12.tar.gz (bytes)", "verify: train members extracted",
                "verify: val members extracted", "verify: images decode-checked", "pack: records written"}
    assert expected <= set(final), sorted(final)
    [archive] = [d for d in final if d.startswith("archive: objects stored in file://")]
    assert all(final[d] == pytest.approx(100.0) for d in [*expected, archive]), final


def test_parameters_are_typed_in_the_run_form(ops):
    local = ops[0]
    dep = _api(local, "GET", "/deployments/name/rn50/full")
    props = dep["parameter_openapi_schema"]["properties"]
    assert {"const": "demo", "type": "string"} in props["pipeline"]["anyOf"] or \
        any("demo" in (o.get("enum") or []) for o in props["pipeline"]["anyOf"]), props["pipeline"]
    assert {"type": "string"} in props["pipeline"]["anyOf"]  # a path to the team's config still fits
    [array] = [o for o in props["rerun"]["anyOf"] if o.get("type") == "array"]
    assert array["items"]["enum"] == ["fetch", "verify", "pack", "container", "distribute", "train", "compliance",
                                      "archive"]


def test_unknown_key_fails_before_any_flow_run(ops, tmp_path):
    local, _, src, _, _ = ops
    cfg = _demo()
    cfg["train"]["thredas"] = 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    before = _api(local, "POST", "/flow_runs/count", {})
    env = {k: v for k, v in local.env().items() if k.startswith(("PREFECT_", "RN50_"))}
    t0 = time.monotonic()
    proc = rn50("run", src, tmp_path / "wd", "--pipeline", bad, env=env, timeout=60)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0 and elapsed < 10, (proc.returncode, elapsed)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.thredas: unknown key" in lines[0] and str(bad) in lines[0], proc.stderr
    assert _api(local, "POST", "/flow_runs/count", {}) == before
    assert not (tmp_path / "wd").exists()

    # A deployment run is checked by the flow itself: Failed, with the same one line.
    proc = local.run_deployment("full", f"source={src}", f"workdir={tmp_path / 'wd2'}", f"pipeline={bad}", timeout_s=300)
    run = _api(local, "GET", f"/flow_runs/{_run_id(proc)}")
    assert run["state"]["type"] == "FAILED" and "train.thredas: unknown key" in run["state"]["message"], run["state"]
    assert not (tmp_path / "wd2").exists()


def test_automation_and_cluster_limit_are_listed_and_setup_is_idempotent(ops):
    local = ops[0]
    prefect = str(Path(sys.executable).parent / "prefect")
    wide = {**local.env(), "COLUMNS": "250"}  # rich truncates the table's names to the terminal width
    ls = subprocess.run([prefect, "automation", "ls"], env=wide, capture_output=True, text=True, timeout=120)
    assert "rn50-nightly-failed" in ls.stdout, ls.stdout + ls.stderr
    gcl = subprocess.run([prefect, "global-concurrency-limit", "ls"], env=wide, capture_output=True, text=True,
                         timeout=120)
    assert "rn50-cluster" in gcl.stdout, gcl.stdout + gcl.stderr
    again = subprocess.run([sys.executable, "-m", "flows.alerts", "setup"], env=local.env(), cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "custom-webhook/rn50-alerts" in again.stdout, again.stdout + again.stderr
    autos = _api(local, "POST", "/automations/filter", {})
    named = [a for a in autos if a["name"] == "rn50-nightly-failed"]
    assert len(named) == 1 and named[0]["enabled"], autos
    [action] = named[0]["actions"]
    assert action["type"] == "send-notification" and "flow_run.state.message" in action["body"]


def test_failed_nightly_posts_the_reason_to_the_webhook(ops):
    """A baseline that converged at the first evaluation (as in test_flow's nightly test) makes tonight's
    run a regression: the nightly run ends Failed and the automation posts the reason."""
    from tasks import nightly as N

    local, receiver, src, wd, _ = ops
    [log] = [run_dir / "result_0.txt" for run_dir in trained_runs(wd)]
    baseline_dir = N.baseline_location(f"file://{wd}/archive")
    N.run_nightly([log], baseline_dir)
    baseline = wd / "archive" / "nightly" / "baseline.json"
    doc = json.loads(baseline.read_text())
    first_eval = doc["curve"][0][0]
    for holder in [doc, *doc["runs"]]:
        holder["curve"] = [[first_eval, 0.95]]
        holder["epochs_to_target"], holder["final_accuracy"] = first_eval, 0.95
    baseline.write_text(json.dumps(doc))

    proc = local.run_deployment("nightly", f"source={src}", f"workdir={wd}", timeout_s=1200)
    run = _api(local, "GET", f"/flow_runs/{_run_id(proc)}")
    assert run["state"]["type"] == "FAILED", run["state"]
    reason = run["state"]["message"]
    assert reason.startswith("nightly regressed: "), reason
    deadline = time.monotonic() + 90
    while not any(reason in b for b in receiver.bodies) and time.monotonic() < deadline:
        time.sleep(1)
    hits = [json.loads(b) for b in receiver.bodies if reason in b]
    assert hits, f"no notification with {reason!r}; received: {receiver.bodies}"
    assert "rn50/nightly" in hits[0]["subject"] and "Failed" in hits[0]["subject"], hits[0]
    assert hits[0]["body"].startswith(reason)
