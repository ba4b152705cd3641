"""Nightly convergence regression (tasks/nightly.py).

Logs are written with the project's own MLPerf logger (rn50.mllog.RunLogger over mlperf_logging.mllog,
what rn50.train uses), so they are read back by mlperf-logging's real parser; one test uses the five
real Inspur v0.7 result logs (tests/fixtures/mlperf-v0.7-inspur). The S3 baseline test runs against a real SeaweedFS server on loopback.
"""
from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import pytest

from rn50.mllog import RunLogger
from tasks import nightly as N
from tasks.common import StageError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import rn50  # noqa: E402
from s3_server import seaweed_s3  # noqa: E402,F401  (pytest fixture)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mlperf-v0.7-inspur"  # see its SOURCE.md
FAST = {2: 0.31, 4: 0.62, 6: 0.81}  # reaches 0.759 at epoch 6


def write_log(path: Path, accs: dict[float, float], seed: int = 1, gbs: int = 64, status: str | None = None,
              stop: bool = True, target: float = 0.759) -> Path:
    """An MLPerf result log like rn50.train writes: hyperparameters, one eval_accuracy per evaluated
    epoch, run_stop (status success once the target is reached, else aborted)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log = RunLogger(path, 0, echo=False)
    log.event("cache_clear", True)
    log.start("init_start")
    log.event("seed", seed)
    log.event("global_batch_size", gbs)
    log.event("opt_name", "lars")
    log.end("init_stop")
    log.start("run_start")
    log.event("train_samples", 1000)
    log.event("eval_samples", 200)
    for epoch, acc in sorted(accs.items()):
        log.end("epoch_stop", metadata={"epoch_num": epoch})
        log.event("eval_accuracy", acc, metadata={"epoch_num": epoch})
    if stop:
        reached = max(accs.values()) >= target if accs else False
        log.end("run_stop", metadata={"status": status or ("success" if reached else "aborted")})
    log.close()
    return path


def run_set(root: Path, curves: list[dict[float, float]], run_id: str = "run-a", **kw) -> list[Path]:
    """runs/<run_id>/result_<n>.txt, one per curve (seed n + 1)."""
    return [write_log(root / "runs" / run_id / f"result_{n}.txt", c, seed=n + 1, **kw) for n, c in enumerate(curves)]


def shifted(curve: dict[float, float], by: int) -> dict[float, float]:
    """The same curve, reached `by` epochs later (earlier epochs padded with the first value)."""
    first = min(curve.values())
    out = {e: first for e in range(2, 2 + by, 2)}
    out.update({e + by: a for e, a in curve.items()})
    return out


# --- reading --------------------------------------------------------------------------------------


def test_curve_and_epochs_to_target_from_a_constructed_log(tmp_path):
    log = write_log(tmp_path / "runs/r1/result_0.txt", FAST, seed=7)
    assert N.curve(log) == [(2, 0.31), (4, 0.62), (6, 0.81)]
    assert N.epochs_to_target(N.curve(log)) == 6
    assert N.epochs_to_target(N.curve(log), target=0.9) is None
    run = N.read_run(log)
    assert (run.seed, run.status, run.run_id, run.final_accuracy) == (7, "success", "r1", 0.81)
    assert run.setup == {"global_batch_size": 64, "opt_name": "lars", "train_samples": 1000, "eval_samples": 200}
    # a directory expands to its result logs in run order
    write_log(tmp_path / "runs/r1/result_1.txt", FAST, seed=8)
    assert [p.name for p in N.expand_logs([tmp_path / "runs/r1"])] == ["result_0.txt", "result_1.txt"]


# --- verdicts -------------------------------------------------------------------------------------


def test_no_baseline_is_accepted_and_then_the_same_curve_passes(tmp_path):
    base = tmp_path / "archive" / "nightly"
    first = run_set(tmp_path / "n1", [FAST, FAST, FAST], run_id="night-1")
    r = N.run_nightly(first, base, tolerance_epochs=2, tolerance_accuracy=0.02)
    assert r.verdict == "no-baseline" and r.accepted == str(base / "baseline.json")
    assert r.reason.startswith(f"nightly has no baseline at {base / 'baseline.json'}: 3 of 3 runs reach 0.759")
    doc = json.loads((base / "baseline.json").read_text())
    assert doc["run_ids"] == ["night-1"] and doc["epochs_to_target"] == 6 and len(doc["runs"]) == 3
    assert doc["runs"][0]["curve"] == [[2, 0.31], [4, 0.62], [6, 0.81]] and doc["accepted_at"]
    assert [p.read_text() for p in (base / "history").iterdir()] == [(base / "baseline.json").read_text()]
    # the report lands beside the work dir's reports, not inside the (stamped) run dir
    assert Path(r.report_json) == tmp_path / "n1/reports/nightly/night-1/nightly.json"
    assert json.loads(Path(r.report_json).read_text())["accepted"] == r.accepted

    second = run_set(tmp_path / "n2", [FAST, FAST, FAST], run_id="night-2")
    r2 = N.run_nightly(second, base)
    assert r2.verdict == "pass", r2.reason
    assert r2.reason == "nightly passed: epochs to 0.759 = 6 vs baseline 6 (tolerance 2)"
    assert r2.baseline["run_ids"] == ["night-1"] and r2.epochs_to_target == 6 and r2.failures == []
    assert json.loads((base / "baseline.json").read_text())["run_ids"] == ["night-2"]
    assert len(list((base / "history").iterdir())) == 2


def test_slower_convergence_beyond_tolerance_regresses_with_a_clear_message(tmp_path):
    base = tmp_path / "nightly"
    N.run_nightly(run_set(tmp_path / "b", [FAST]), base)
    before = (base / "baseline.json").read_bytes()

    within = N.compare(run_set(tmp_path / "w", [shifted(FAST, 2)]), base, tolerance_epochs=2)
    assert within.verdict == "pass" and within.epochs_to_target == 8

    slow = run_set(tmp_path / "s", [shifted(FAST, 3)])  # evals at 2, 4, 5, 7, 9: reaches 0.759 at epoch 9
    r = N.run_nightly(slow, base, tolerance_epochs=2, tolerance_accuracy=0.02)
    assert r.verdict == "regressed" and r.regressed
    assert r.reason == "nightly regressed: epochs to 0.759 = 9 vs baseline 6 (tolerance 2)"
    assert r.accepted is None and (base / "baseline.json").read_bytes() == before  # not accepted
    with pytest.raises(StageError, match="refusing to accept a regressed nightly") as e:
        N.accept(r, base)
    assert "\n" not in str(e.value)
    # a deliberate re-baseline still works, from the JSON the flow passes around, but only with a reason
    _one_line_error(lambda: N.accept(r.to_dict(), base, force=True), r"^a forced acceptance needs a reason")
    assert (base / "baseline.json").read_bytes() == before
    N.accept(r.to_dict(), base, force=True, reason="slower schedule on purpose")
    doc = json.loads((base / "baseline.json").read_text())
    assert doc["epochs_to_target"] == 9 and doc["forced"] is True and doc["why"] == "slower schedule on purpose"
    assert doc["accepted_by"] == N.who() and "@" in doc["accepted_by"]


def test_never_converging_run_regresses_when_the_baseline_converged(tmp_path):
    base = tmp_path / "nightly"
    N.run_nightly(run_set(tmp_path / "b", [FAST, FAST, FAST]), base)
    stuck = {2: 0.30, 4: 0.52, 6: 0.61, 8: 0.66}
    r = N.compare(run_set(tmp_path / "c", [FAST, stuck, FAST], run_id="night-x"), base)
    assert r.verdict == "regressed"
    assert r.reason == ("nightly regressed: 1 of 3 runs never reached 0.759 (night-x/result_1.txt seed 2: best 0.66 "
                        "by epoch 8); baseline: 3 of 3 reached it (epochs to 0.759 = 6)")
    assert r.runs[1].epochs_to_target is None and r.runs[1].status == "aborted" and r.converged_runs == 2

    none = N.compare(run_set(tmp_path / "d", [stuck, stuck, stuck]), base)
    assert none.verdict == "regressed" and none.epochs_to_target is None
    assert none.reason.startswith("nightly regressed: 3 of 3 runs never reached 0.759")


def test_median_over_seeds_tolerates_one_slow_seed_and_reports_the_mean(tmp_path):
    base = tmp_path / "nightly"
    N.run_nightly(run_set(tmp_path / "b", [FAST, FAST, FAST]), base)
    r = N.compare(run_set(tmp_path / "c", [FAST, shifted(FAST, 4), FAST]), base)
    assert r.verdict == "pass" and r.epochs_to_target == 6 and r.epochs_to_target_mean == pytest.approx(22 / 3, 1e-3)
    # most seeds slow: the median moves, and that is a regression
    r = N.compare(run_set(tmp_path / "d", [shifted(FAST, 4), shifted(FAST, 4), FAST]), base)
    assert r.verdict == "regressed" and r.reason == "nightly regressed: epochs to 0.759 = 10 vs baseline 6 (tolerance 2)"


def test_final_accuracy_decides_when_the_epoch_budget_ends_before_the_target(tmp_path):
    base = tmp_path / "nightly"
    N.run_nightly(run_set(tmp_path / "b", [{2: 0.40, 4: 0.60, 6: 0.70}]), base)
    ok = N.compare(run_set(tmp_path / "ok", [{2: 0.41, 4: 0.58, 6: 0.69}]), base, tolerance_accuracy=0.02)
    assert ok.verdict == "pass"
    assert ok.reason == ("nightly passed: neither this night nor the baseline reaches 0.759; "
                         "final accuracy 0.69 vs baseline 0.7 (tolerance 0.02)")
    low = N.compare(run_set(tmp_path / "low", [{2: 0.41, 4: 0.55, 6: 0.65}]), base, tolerance_accuracy=0.02)
    assert low.verdict == "regressed"
    assert low.reason == "nightly regressed: final accuracy 0.65 vs baseline 0.7 (tolerance 0.02)"


def test_optional_per_epoch_curve_tolerance(tmp_path):
    base = tmp_path / "nightly"
    N.run_nightly(run_set(tmp_path / "b", [FAST]), base)
    dip = {2: 0.31, 4: 0.50, 6: 0.80}  # same epochs to target, but 0.12 lower at epoch 4
    r = N.compare(run_set(tmp_path / "c", [dip]), base)
    assert r.verdict == "pass" and r.curve_gap == {"epoch": 4, "gap": pytest.approx(0.12)}
    r = N.compare(run_set(tmp_path / "d", [dip]), base, tolerance_curve=0.1)
    assert r.verdict == "regressed" and r.reason == ("nightly regressed: accuracy at epoch 4 0.120 below baseline "
                                                     "(tolerance 0.1)")


def test_other_setup_is_not_compared_and_target_is_recomputed_from_stored_curves(tmp_path):
    base = tmp_path / "nightly"
    N.run_nightly(run_set(tmp_path / "b", [FAST]), base, context={"config": "cpu-demo"})
    other = N.compare(run_set(tmp_path / "c", [shifted(FAST, 6)], gbs=128), base, context={"config": "cpu-demo"})
    assert other.verdict == "no-comparable-baseline" and other.failed
    assert other.reason.startswith("nightly has no comparable baseline: the one at ")
    assert "global_batch_size 64 -> 128" in other.reason and "--force-accept --reason" in other.reason
    cfg = N.compare(run_set(tmp_path / "d", [FAST]), base, context={"config": "other"})
    assert cfg.verdict == "no-comparable-baseline" and "config cpu-demo -> other" in cfg.reason
    # baseline stored at 0.759, compared at 0.6: both reach 0.6 at epoch 4
    lower = N.compare(run_set(tmp_path / "e", [FAST]), base, target=0.6, context={"config": "cpu-demo"})
    assert lower.verdict == "pass" and lower.reason.startswith("nightly passed: epochs to 0.6 = 4 vs baseline 4")


def test_no_free_pass_without_a_baseline_until_a_person_accepts(tmp_path):
    """Issue 16, item 7: only the first nightly of an empty history starts the baseline by itself. Deleting
    baseline.json, or changing a setting, must not let a regression through."""
    base = tmp_path / "nightly"
    first = N.run_nightly(run_set(tmp_path / "b", [FAST], run_id="night-1"), base, context={"config": "cpu-demo"})
    assert first.verdict == "no-baseline" and not first.failed and first.accepted == str(base / "baseline.json")
    doc = json.loads((base / "baseline.json").read_text())
    assert (doc["accepted_by"], doc["forced"], doc["why"]) == (N.who(), False, "first nightly of an empty history")
    assert first.acceptance["by"] == N.who() and first.acceptance["at"] == doc["accepted_at"]

    # the baseline disappears while the history exists: a much slower night is not accepted by itself
    (base / "baseline.json").unlink()
    slow = run_set(tmp_path / "s", [shifted(FAST, 8)], run_id="night-2")
    r = N.run_nightly(slow, base, context={"config": "cpu-demo"})
    assert r.verdict == "no-comparable-baseline" and r.failed and r.accepted is None
    assert r.reason.startswith(f"nightly has no comparable baseline: {base / 'baseline.json'} is missing although "
                               f"{base / 'history'}/ holds accepted baselines (1 of 1 runs reach 0.759, epochs to "
                               "0.759 = 14")
    assert not (base / "baseline.json").exists() and len(list((base / "history").iterdir())) == 1
    assert N.compare(slow, base, context={"config": "cpu-demo"}).verdict == "no-comparable-baseline"  # still
    _one_line_error(lambda: N.accept(r, base), r"^refusing to accept a nightly without a comparable baseline")

    # a person accepts: only with a reason, recorded with who and when in baseline.json and history/
    _one_line_error(lambda: N.run_nightly(slow, base, force_accept=True, context={"config": "cpu-demo"}),
                    r"^--force-accept needs --reason")
    _one_line_error(lambda: N.run_nightly(slow, base, reason="x", context={"config": "cpu-demo"}),
                    r"^--reason is recorded only with --force-accept$")
    assert not (base / "baseline.json").exists()
    forced = N.run_nightly(slow, base, force_accept=True, reason="new data pipeline, slower by design",
                           context={"config": "cpu-demo"})
    assert forced.verdict == "no-comparable-baseline" and not forced.failed
    assert forced.acceptance == {"by": N.who(), "at": forced.acceptance["at"], "forced": True,
                                 "why": "new data pipeline, slower by design", "location": str(base / "baseline.json")}
    history = sorted((base / "history").iterdir())
    assert len(history) == 2 and history[-1].read_text() == (base / "baseline.json").read_text()
    doc = json.loads(history[-1].read_text())
    assert (doc["forced"], doc["why"], doc["accepted_by"]) == (True, "new data pipeline, slower by design", N.who())
    assert "forced: new data pipeline" in Path(forced.report_md).read_text()
    assert N.run_nightly(slow, base, context={"config": "cpu-demo"}).verdict == "pass"

    # a changed setting: not compared, not accepted, fails
    other = N.run_nightly(run_set(tmp_path / "o", [FAST]), base, context={"config": "nf5488-8xa100"})
    assert other.verdict == "no-comparable-baseline" and other.failed and other.accepted is None
    assert json.loads((base / "baseline.json").read_text())["run_ids"] == ["night-2"]


def test_real_inspur_logs_against_themselves_and_with_the_last_eval_lost(tmp_path):
    """The five real MLPerf v0.7 result logs (converged at epoch 35) as baseline; a copy where one run's
    converging evaluation is cut off (run_stop aborted) is a regression."""
    logs = sorted(FIXTURES.glob("result_*.txt"))
    assert len(logs) == 5, f"the Inspur fixtures belong in {FIXTURES}"
    base = tmp_path / "nightly"
    first = N.run_nightly(logs, base, out_dir=tmp_path / "out1")
    assert first.verdict == "no-baseline" and first.epochs_to_target == 35 and first.converged_runs == 5
    assert [len(r.curve) for r in first.runs] == [9] * 5
    assert N.compare(logs, base, out_dir=tmp_path / "out2").verdict == "pass"

    cut = tmp_path / "cut" / "result_3.txt"
    cut.parent.mkdir()
    lines = [ln for ln in logs[2].read_text().splitlines() if '"epoch_num": 35' not in ln or "eval_accuracy" not in ln]
    cut.write_text("\n".join(ln.replace('"status": "success"', '"status": "aborted"') for ln in lines) + "\n")
    r = N.compare([*logs[:2], cut, *logs[3:]], base, out_dir=tmp_path / "out3")
    assert r.verdict == "regressed" and r.reason.startswith("nightly regressed: 1 of 5 runs never reached 0.759 "
                                                            "(cut/result_3.txt seed ")
    assert r.epochs_to_target == 35  # the median run still converged at 35


# --- plot and markdown ----------------------------------------------------------------------------


def test_plot_is_a_real_png_and_the_markdown_embeds_it(tmp_path):
    from PIL import Image

    base = tmp_path / "nightly"
    N.run_nightly(run_set(tmp_path / "b", [FAST, FAST]), base)
    r = N.compare(run_set(tmp_path / "c", [FAST, shifted(FAST, 4)]), base)
    png = Path(r.plot_png).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    with Image.open(r.plot_png) as im:
        assert im.format == "PNG" and im.size == (700, 400)
        colours = im.convert("RGB").getcolors(1 << 20)
    assert len(colours) > 50  # lines, text and legend were drawn, not a blank canvas
    md = N.markdown_with_plot(r.to_dict())
    assert md.startswith("# Nightly convergence: **PASS**\n\nnightly passed: epochs to 0.759 = 8 vs baseline 6")
    uri = md.split("](data:image/png;base64,", 1)[1].split(")", 1)[0]
    assert base64.b64decode(uri) == png
    assert "| this night | run-a/result_1.txt | 2 | 10 | 0.81 | success |" in md
    report = Path(r.report_md).read_text()
    assert "![convergence plot](convergence.png)" in report  # relative: readable from the archive
    # the plain plot() API: runs only, no baseline
    out = N.plot(r.runs, None, tmp_path / "solo.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- atomic baseline ------------------------------------------------------------------------------


def test_baseline_is_replaced_atomically_or_not_at_all(tmp_path, monkeypatch):
    """A crash between writing and renaming is simulated by making os.replace fail (a fake: killing
    the process at that exact instruction is not reproducible); the old baseline must survive intact."""
    base = tmp_path / "nightly"
    N.run_nightly(run_set(tmp_path / "b", [FAST]), base)
    before = (base / "baseline.json").read_bytes()
    r = N.compare(run_set(tmp_path / "c", [shifted(FAST, 2)], run_id="run-b"), base)

    import tasks.common

    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith("baseline.json"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(tasks.common.os, "replace", crash)
    with pytest.raises(StageError, match=r"^cannot write baseline .*baseline.json: No space left on device$"):
        N.accept(r, base)
    monkeypatch.undo()
    assert (base / "baseline.json").read_bytes() == before
    assert not [p for p in base.rglob(".tmp-*")]  # no half-written file left behind
    N.accept(r, base)
    assert json.loads((base / "baseline.json").read_text())["run_ids"] == ["run-b"]


# --- S3 -------------------------------------------------------------------------------------------


def test_baseline_next_to_an_s3_archive(tmp_path, seaweed_s3, monkeypatch, isolated_aws_env):
    for k, v in seaweed_s3.env().items():
        monkeypatch.setenv(k, v)
    client = seaweed_s3.client()
    client.create_bucket(Bucket="rn50-archive")
    loc = N.baseline_location("s3://rn50-archive/team/")
    assert loc == "s3://rn50-archive/team/nightly"

    r = N.run_nightly(run_set(tmp_path / "b", [FAST]), loc)
    assert r.verdict == "no-baseline" and r.accepted == "s3://rn50-archive/team/nightly/baseline.json"
    stored = json.loads(client.get_object(Bucket="rn50-archive", Key="team/nightly/baseline.json")["Body"].read())
    assert stored["epochs_to_target"] == 6
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="rn50-archive", Prefix="team/nightly/")["Contents"]]
    assert len(keys) == 2 and any(k.startswith("team/nightly/history/") for k in keys)

    r2 = N.run_nightly(run_set(tmp_path / "c", [shifted(FAST, 4)]), loc)
    assert r2.verdict == "regressed" and r2.reason == "nightly regressed: epochs to 0.759 = 10 vs baseline 6 (tolerance 2)"
    # the baseline object deleted while history/ holds documents: no free pass on S3 either
    client.delete_object(Bucket="rn50-archive", Key="team/nightly/baseline.json")
    r3 = N.run_nightly(run_set(tmp_path / "e", [shifted(FAST, 4)]), loc)
    assert r3.verdict == "no-comparable-baseline" and r3.failed and r3.accepted is None
    assert "s3://rn50-archive/team/nightly/history/ holds accepted baselines" in r3.reason
    with pytest.raises(StageError, match=r"^cannot read baseline s3://no-such-bucket/nightly/baseline.json: NoSuchBucket"):
        N.compare(run_set(tmp_path / "d", [FAST]), "s3://no-such-bucket/nightly")


# --- bad input ------------------------------------------------------------------------------------


def _one_line_error(fn, match: str) -> str:
    with pytest.raises(StageError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path):
    base = tmp_path / "nightly"
    out = tmp_path / "out"
    good = write_log(tmp_path / "runs/r/result_0.txt", FAST)
    no_eval = write_log(tmp_path / "runs/e/result_0.txt", {})
    no_stop = write_log(tmp_path / "runs/s/result_0.txt", FAST, stop=False)
    garbage = tmp_path / "runs/g/result_0.txt"
    garbage.parent.mkdir(parents=True)
    garbage.write_text("this is not an MLPerf log\n")
    cases = [
        ([tmp_path / "missing/result_0.txt"], base, r"result log .*missing/result_0.txt does not exist$"),
        ([good, no_eval], base, r"result log .*runs/e/result_0.txt has no eval_accuracy: nothing to compare$"),
        ([no_stop], base, r"has no run_stop: the run did not finish$"),
        ([garbage], base, r"has no :::MLLOG lines$"),
        ([tmp_path / "runs"], base, r"^no result_\*\.txt in "),
        ([], base, r"^no result logs given$"),
        ([good], "ftp://host/x", r"^baseline location 'ftp://host/x' must start with s3:// or file://$"),
    ]
    for logs, b, match in cases:
        _one_line_error(lambda: N.compare(logs, b, out_dir=out), match)
    _one_line_error(lambda: N.compare([good], base, tolerance_epochs=-1, out_dir=out), r"^tolerances must be >= 0$")
    _one_line_error(lambda: N.compare([good], base, target=1.5, out_dir=out), r"^target must be in \(0, 1\]")
    mixed = write_log(tmp_path / "runs/m/result_0.txt", FAST, gbs=256)
    _one_line_error(lambda: N.compare([good, mixed], base, out_dir=out),
                    r"^result logs are not one setup: global_batch_size is 64 in .* but 256 in ")
    base.mkdir()
    (base / "baseline.json").write_text("{not json")
    _one_line_error(lambda: N.compare([good], base, out_dir=out), r"^baseline .*baseline.json is not valid JSON")
    (base / "baseline.json").write_text(json.dumps({"runs": []}))
    _one_line_error(lambda: N.compare([good], base, out_dir=out), r"has no runs with curves; fix or remove it$")
    assert not out.exists()  # nothing half-written for any of them


def test_cli_exit_codes_through_the_rn50_console_script(tmp_path):
    """The real `rn50 nightly` (the installed console script, so tasks/cli.py must register it)."""
    base = tmp_path / "nightly"
    run_set(tmp_path / "b", [FAST])
    p = rn50("nightly", tmp_path / "b/runs/run-a", "--baseline", base)
    assert p.returncode == 0 and p.stdout.startswith("nightly has no baseline at "), p.stderr
    run_set(tmp_path / "c", [shifted(FAST, 4)])
    p = rn50("nightly", tmp_path / "c/runs/run-a", "--baseline", f"file://{base}", "--json")
    assert p.returncode == 1, p.stderr
    doc = json.loads(p.stdout)
    assert doc["verdict"] == "regressed" and doc["reason"].startswith("nightly regressed: epochs to 0.759 = 10")
    p = rn50("nightly", tmp_path / "nope", "--baseline", base)
    assert p.returncode == 2 and p.stderr.startswith("rn50 nightly: error: result log ") and p.stderr.count("\n") == 1

    (base / "baseline.json").unlink()
    p = rn50("nightly", tmp_path / "c/runs/run-a", "--baseline", base)
    assert p.returncode == 1 and p.stdout.startswith("nightly has no comparable baseline: "), p.stderr
    p = rn50("nightly", tmp_path / "c/runs/run-a", "--baseline", base, "--force-accept")
    assert p.returncode == 2 and p.stderr.startswith("rn50 nightly: error: --force-accept needs --reason")
    assert not (base / "baseline.json").exists()
    p = rn50("nightly", tmp_path / "c/runs/run-a", "--baseline", base, "--force-accept", "--reason", "slower on purpose")
    assert p.returncode == 0, p.stderr
    assert f"accepted by {N.who()} at " in p.stdout and p.stdout.rstrip().endswith(": slower on purpose")
    doc = json.loads((base / "baseline.json").read_text())
    assert (doc["forced"], doc["why"], doc["accepted_by"]) == (True, "slower on purpose", N.who())
