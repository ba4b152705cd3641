"""Nightly convergence regression: this night's runs against the last accepted nightly (the baseline).

Inputs are MLPerf result logs (`runs/<run-id>/result_<n>.txt`), read with mlperf-logging's own parser
(the one tasks/compliance.py and the result summarizer use). From each log: the eval-accuracy curve
[(epoch, eval_accuracy)] up to run_stop, epochs-to-target (the first evaluated epoch whose accuracy
reaches the target, what the RCP checker calls the convergence epoch), the final accuracy, the seed.

How N runs (seeds) are compared with the baseline's runs; each rule that fails is named in the verdict:
  1. convergence: a smaller share of runs reaching the target than the baseline had is a regression
     (with an all-converged baseline: ANY run that never reaches it).
  2. epochs-to-target: the median over runs (a non-converged run counts as infinitely late, so the
     median is robust to one slow seed but not to most) later than the baseline's by more than
     `tolerance_epochs`.
  3. final accuracy: median over runs lower than the baseline's by more than `tolerance_accuracy`.
     Training stops at the first evaluation at or above the target, so above the target the final
     accuracy only says where the last evaluation fell; it is compared capped at the target. It
     therefore matters when runs do not reach the target within their epoch budget.
  4. optional (`tolerance_curve`): the median accuracy-per-epoch curve below the baseline's by more than
     that at any epoch both evaluated. Off by default: early-epoch accuracy on a small set jumps by
     tenths between seeds, so only a generous tolerance is meaningful. The largest gap is always reported.
  5. time and throughput (when the baseline has a performance history, `performance_history` in
     baseline.json, the last PERF_KEEP accepted nights): the median time to train over runs more than
     `tolerance_time` (15 %) above the history's median, the median steady aggregate img/s more than
     `tolerance_throughput` (5 %) below it, or a host whose own img/s per rank (tasks/health.py: the
     rank's speed without its wait for peers) is more than `host_drop` (5 %) below its own median over
     the history and, with other hosts, whose speed relative to theirs fell by as much too (a slowdown
     of every host is the throughput rule's): that host is named. A failing night is not accepted, so it
     never lowers the medians.
The median curve: at each evaluated epoch, the median over runs; a run that has already stopped
contributes its final accuracy (it stopped because it was done).

Runs are comparable only on the same setup: global batch size, train/eval sample counts and optimizer,
as logged, plus an optional caller `context` (e.g. training config name, data digest).

Nothing passes for lack of a baseline (a regression must not pass by deleting a file). Verdicts:
  pass / regressed        compared with the stored baseline by the rules above;
  no-baseline             the very first nightly of an EMPTY history (no baseline.json, nothing in
                          history/): accepted as the baseline by itself;
  no-comparable-baseline  baseline.json is missing while history/ holds accepted baselines, or the
                          baseline is of another setup (the differences are named): the nightly FAILS
                          until a person accepts a new baseline explicitly (`rn50 nightly ... --force-accept
                          --reason "..."`, or run_nightly(force_accept=True, reason=...) from the flow).
Every accepted baseline records who (user@host), when, why and whether it was forced.

Baseline storage, "next to the archive": a directory (local path, `file:///dir`, or `s3://bucket/prefix`,
for an archive URI A use `baseline_location(A)` = A/nightly) holding
  baseline.json                      per-run curves, epochs-to-target, run ids, setup, accepted at/by, why
  history/<accepted-at>_<run-id>.json  every baseline ever accepted (the same document)
Both are written whole (tasks/storage.py): a rename beside the target on a file system, a single PUT on
S3 (an S3 object appears complete or not at all). Epochs-to-target are recomputed from the stored curves
at compare time, so a different target compares correctly against an old baseline. Logs are read by
tasks/mlperf_logs.py.
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime as _dt
import getpass
import hashlib
import json
import math
import os
import socket
import statistics
from pathlib import Path
from typing import Any, Iterable, Sequence

from tasks import health, mlperf_logs, storage
from tasks.common import Result, StageError, digest_of, file_digest, write_json_atomic, write_text_atomic

TARGET = 0.759
BASELINE_FILE = "baseline.json"
FORMAT_VERSION = 1
PARSE_RULESET = mlperf_logs.PARSE_RULESET
HISTORY_DIR = "history/"
# Verdicts: the first nightly of an empty history starts the baseline by itself; every other way of having
# nothing to compare with fails until a person accepts a new baseline explicitly (force_accept + reason).
PASSING = ("pass", "no-baseline")
FAILING = ("regressed", "no-comparable-baseline")
# Logged facts that must agree for two sets of runs to be comparable.
SETUP_KEYS = ("global_batch_size", "train_samples", "eval_samples", "opt_name")
PERF_KEEP = 7  # accepted nights whose time, throughput and per-host speed the next night is judged against


@dataclasses.dataclass
class RunCurve(Result):
    log: str
    run_id: str  # the log's directory name (runs/<run-id>/result_<n>.txt)
    seed: int | None
    curve: list[list[float]]  # [[epoch, eval_accuracy], ...] in epoch order
    epochs_to_target: float | None  # None: never reached the target
    final_accuracy: float | None
    status: str  # run_stop status ("success" | "aborted")
    setup: dict[str, Any]  # SETUP_KEYS as logged
    sha256: str


@dataclasses.dataclass
class NightlyResult(Result):
    verdict: str  # "pass" | "regressed" | "no-baseline" (first ever) | "no-comparable-baseline"
    reason: str  # one line; on regression the flow's failure message
    target: float
    tolerance_epochs: float
    tolerance_accuracy: float
    tolerance_curve: float | None
    runs: list[RunCurve]
    converged_runs: int
    epochs_to_target: float | None  # median over runs (None: the median run never reached the target)
    epochs_to_target_mean: float | None  # over the runs that reached it
    final_accuracy: float | None  # median over runs
    curve: list[list[float]]  # median accuracy per evaluated epoch
    baseline_location: str  # where baseline.json is read from and accepted to
    baseline: dict[str, Any] | None  # the baseline's runs and the same aggregates; None when there is none
    failures: list[str]  # every rule that failed (the reason starts with the first)
    curve_gap: dict[str, float] | None  # {"epoch", "gap"}: largest baseline-minus-current median accuracy
    context: dict[str, Any]
    out_dir: str
    plot_png: str
    report_json: str
    report_md: str
    accepted: str | None  # where the baseline was written, when this result was accepted
    key: str  # digest of the log digests, the baseline document, target and tolerances
    acceptance: dict[str, Any] | None = None  # {"by": user@host, "at", "forced", "why", "location"} once accepted
    # This night's time to train, aggregate img/s and per-host own img/s per rank (medians over its runs),
    # the baseline's history of them (oldest first), and the tolerances of rule 5.
    performance: dict[str, Any] | None = None
    performance_history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    tolerance_time: float = 0.15
    tolerance_throughput: float = 0.05
    host_drop: float = 0.05
    perf_plot_png: str | None = None
    scaling: dict[str, Any] | None = None  # scaling_efficiency() against the history's latest one-host night

    @property
    def regressed(self) -> bool:
        return self.verdict == "regressed"

    @property
    def failed(self) -> bool:
        """The nightly fails: it regressed or had nothing comparable, and no person accepted it."""
        return self.verdict in FAILING and not (self.acceptance and self.acceptance.get("forced"))

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "failed": self.failed}


# --- reading logs ---------------------------------------------------------------------------------


def _num(x: Any) -> float | int:
    x = float(x)
    return int(x) if x.is_integer() else x


def read_run(result_log: str | os.PathLike) -> RunCurve:
    """One run's curve and facts from its MLPerf log (eval_accuracy lines up to the first run_stop)."""
    path = Path(result_log).resolve()
    log = mlperf_logs.summarize(mlperf_logs.load(path, PARSE_RULESET))
    by_epoch: dict[float, float] = {}
    for epoch, value in log.evals:
        if epoch is None or not isinstance(value, (int, float)):
            raise StageError(f"result log {path}: an eval_accuracy line has no epoch_num or no numeric value")
        by_epoch[_num(epoch)] = float(value)  # a resumed run re-evaluating an epoch: last wins
    if not by_epoch:
        raise StageError(f"result log {path} has no eval_accuracy: nothing to compare")
    if not log.stopped:
        raise StageError(f"result log {path} has no run_stop: the run did not finish")
    seed, status = log.seed, log.status
    setup = {k: log.values[k] for k in SETUP_KEYS if k in log.values}
    pts = [[e, a] for e, a in sorted(by_epoch.items())]
    return RunCurve(log=str(path), run_id=path.parent.name, seed=seed, curve=pts,
                    epochs_to_target=None, final_accuracy=pts[-1][1], status=status,
                    setup=setup, sha256=file_digest(path, "sha256"))


def curve(result_log: str | os.PathLike) -> list[tuple[float, float]]:
    """[(epoch, eval_accuracy), ...] of one MLPerf result log, in epoch order."""
    return [(e, a) for e, a in read_run(result_log).curve]


def epochs_to_target(points: Iterable[Sequence[float]], target: float = TARGET) -> float | None:
    """The first evaluated epoch whose accuracy reaches `target`; None when none does."""
    return next((e for e, a in sorted(points, key=lambda p: p[0]) if a >= target), None)


def expand_logs(run_logs: Iterable[str | os.PathLike]) -> list[Path]:
    """Result logs from files and directories (a directory gives its result_*.txt, in run order)."""
    out: list[Path] = []
    for p in map(Path, run_logs):
        if p.is_dir():
            found = mlperf_logs.result_files(p)
            if not found:
                raise StageError(f"no result_*.txt in {p}")
            out += found
        else:
            out.append(p)
    if not out:
        raise StageError("no result logs given")
    return out


# --- aggregates -----------------------------------------------------------------------------------


def _median_epochs(etts: list[float | None]) -> float | None:
    m = statistics.median([math.inf if e is None else e for e in etts])
    return None if math.isinf(m) else _num(m)


def _median_curve(curves: list[list[list[float]]]) -> list[list[float]]:
    epochs = sorted({e for c in curves for e, _ in c})
    out = []
    for e in epochs:
        vals = []
        for c in curves:
            at = dict((ce, a) for ce, a in c)
            if e in at:
                vals.append(at[e])
            elif c and e > c[-1][0]:
                vals.append(c[-1][1])  # stopped already: its final accuracy stands
        if vals:
            out.append([e, statistics.median(vals)])
    return out


def _summarise(runs: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """Aggregates of a set of runs (dicts with "curve"), epochs-to-target recomputed at `target`."""
    etts = [epochs_to_target(r["curve"], target) for r in runs]
    reached = [e for e in etts if e is not None]
    finals = [r["curve"][-1][1] for r in runs]
    return {
        "epochs_to_target_per_run": etts,
        "converged_runs": len(reached),
        "n_runs": len(runs),
        "epochs_to_target": _median_epochs(etts),
        "epochs_to_target_mean": _num(round(statistics.mean(reached), 3)) if reached else None,
        "final_accuracy": statistics.median(finals),
        "best_accuracy": [max(a for _, a in r["curve"]) for r in runs],
        "curve": _median_curve([r["curve"] for r in runs]),
    }


def _setup(runs: list[dict[str, Any]], context: dict[str, Any]) -> dict[str, Any]:
    first = runs[0].get("setup") or {}
    for r in runs[1:]:
        other = r.get("setup") or {}
        if other != first:
            k = next(k for k in sorted(set(first) | set(other)) if first.get(k) != other.get(k))
            raise StageError(f"result logs are not one setup: {k} is {first.get(k)} in {runs[0]['log']} "
                             f"but {other.get(k)} in {r['log']}")
    return {**first, **(context or {})}


# --- baseline storage -----------------------------------------------------------------------------


def baseline_location(archive_uri: str) -> str:
    """Where the nightly baseline lives for an archive URI: <uri>/nightly."""
    return archive_uri.rstrip("/") + "/nightly"


class BaselineStore:
    """baseline.json and history/ under a directory, a file:// URI or an s3:// URI (tasks.storage)."""

    def __init__(self, location: str | os.PathLike, s3_options: dict[str, Any] | None = None):
        loc = str(location)
        self.location = loc if "://" in loc else str(Path(loc).resolve())
        self.target = storage.open_target(self.location, what="baseline location", s3_options=s3_options)

    def where(self, name: str) -> str:
        t = self.target
        return str(t.path(name)) if isinstance(t, storage.FileTarget) else t.where(name)

    def _fail(self, verb: str, name: str, e: Exception) -> StageError:
        if isinstance(e, IsADirectoryError):
            return StageError(f"baseline {self.where(name)} is a directory")
        why = e.strerror if isinstance(e, OSError) and e.strerror else storage.describe_error(e)
        return StageError(f"cannot {verb} baseline {self.where(name)}: {why}")

    def read(self, name: str) -> bytes | None:
        try:
            return self.target.read(name)
        except Exception as e:  # OS and S3 errors: one line, no credentials
            raise self._fail("read", name, e) from None

    def write(self, name: str, data: bytes) -> str:
        """Written whole: a rename beside the target on a file system, one checksummed PUT on S3."""
        try:
            self.target.write(name, data, content_type="application/json")
        except Exception as e:
            raise self._fail("write", name, e) from None
        return self.where(name)

    def has_history(self) -> bool:
        """True when any baseline was ever accepted here (history/ holds at least one document)."""
        try:
            return self.target.has_any(HISTORY_DIR)
        except Exception as e:
            raise self._fail("read", HISTORY_DIR, e) from None


def load_baseline(baseline_dir: str | os.PathLike, s3_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The stored baseline document, or None when there is none yet."""
    store = BaselineStore(baseline_dir, s3_options)
    raw = store.read(BASELINE_FILE)
    if raw is None:
        return None
    where = store.where(BASELINE_FILE)
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StageError(f"baseline {where} is not valid JSON ({e}); fix or remove it") from None
    runs = doc.get("runs") if isinstance(doc, dict) else None
    if (not isinstance(runs, list) or not runs
            or not all(isinstance(r, dict) and isinstance(r.get("curve"), list) and r["curve"] for r in runs)):
        raise StageError(f"baseline {where} has no runs with curves; fix or remove it")
    try:
        for r in runs:
            r["curve"] = sorted([_num(e), float(a)] for e, a in r["curve"])
    except (TypeError, ValueError):
        raise StageError(f"baseline {where} has a malformed curve (want [[epoch, accuracy], ...])") from None
    doc["sha256"] = hashlib.sha256(raw).hexdigest()
    return doc


# --- compare --------------------------------------------------------------------------------------


def _g(x: float | None, nd: int = 3) -> str:
    if x is None:
        return "never"
    return f"{x:g}" if isinstance(x, int) or float(x).is_integer() else f"{x:.{nd}f}".rstrip("0").rstrip(".")


def default_out_dir(first_log: Path) -> Path:
    """WORKDIR/reports/nightly/<run-id> for WORKDIR/runs/<run-id>/result_n.txt (not under the run dir:
    that is the train stage's stamped output); <log dir>/nightly otherwise."""
    run_dir = first_log.resolve().parent
    if run_dir.parent.name == "runs":
        return run_dir.parent.parent / "reports" / "nightly" / run_dir.name
    return run_dir / "nightly"


_FORCE_HINT = "a person must accept a new baseline explicitly (rn50 nightly ... --force-accept --reason WHY)"


def compare(
    run_logs: Sequence[str | os.PathLike],
    baseline_dir: str | os.PathLike,
    tolerance_epochs: float = 2,
    tolerance_accuracy: float = 0.02,
    target: float = TARGET,
    tolerance_curve: float | None = None,
    context: dict[str, Any] | None = None,
    out_dir: str | os.PathLike | None = None,
    s3_options: dict[str, Any] | None = None,
    tolerance_time: float = 0.15,
    tolerance_throughput: float = 0.05,
    host_drop: float = 0.05,
) -> NightlyResult:
    """Compare this night's runs with the baseline in `baseline_dir`; write the plot and report.

    Nothing is written until every log and the baseline have been read. Writes out_dir/convergence.png,
    out_dir/performance.png, out_dir/nightly.json and out_dir/report.md. Does not raise on regression: read `verdict`/`reason`.
    """
    if not (0 < target <= 1):
        raise StageError(f"target must be in (0, 1], not {target}")
    if tolerance_epochs < 0 or tolerance_accuracy < 0 or (tolerance_curve is not None and tolerance_curve < 0):
        raise StageError("tolerances must be >= 0")
    if not all(0 <= t < 1 for t in (tolerance_time, tolerance_throughput, host_drop)):
        raise StageError("time, throughput and host tolerances must be fractions in [0, 1)")
    logs = expand_logs(run_logs)
    runs = [read_run(p) for p in logs]
    perf = performance([health.run_performance(p) for p in logs])
    store = BaselineStore(baseline_dir, s3_options)
    base_doc = load_baseline(baseline_dir, s3_options)
    first_ever = base_doc is None and not store.has_history()
    for r in runs:
        r.epochs_to_target = epochs_to_target(r.curve, target)
    run_dicts = [dataclasses.asdict(r) for r in runs]
    cur = _summarise(run_dicts, target)
    setup = _setup(run_dicts, context or {})
    tol = f"tolerance {_g(tolerance_epochs)}"

    failures: list[str] = []
    baseline: dict[str, Any] | None = None
    gap = None
    this_night = (f"{cur['converged_runs']} of {cur['n_runs']} runs reach {target:g}, epochs to {target:g} = "
                  f"{_g(cur['epochs_to_target'])}, final accuracy {_g(cur['final_accuracy'])}")
    if first_ever:
        verdict = "no-baseline"
        reason = (f"nightly has no baseline at {store.where(BASELINE_FILE)}: {this_night}; "
                  "accept() makes this the baseline")
    elif base_doc is None:  # deleted, or never written after a history: never a free pass
        verdict = "no-comparable-baseline"
        reason = (f"nightly has no comparable baseline: {store.where(BASELINE_FILE)} is missing although "
                  f"{store.where(HISTORY_DIR.rstrip('/'))}/ holds accepted baselines ({this_night}); {_FORCE_HINT}")
    else:
        base = _summarise(base_doc["runs"], target)
        baseline = {"location": store.where(BASELINE_FILE), "accepted_at": base_doc.get("accepted_at"),
                    "run_ids": base_doc.get("run_ids") or sorted({r.get("run_id") for r in base_doc["runs"]}),
                    "setup": base_doc.get("setup") or {}, "runs": base_doc["runs"], "sha256": base_doc["sha256"], **base}
        differs = sorted(k for k in set(setup) | set(baseline["setup"])
                         if k in setup and k in baseline["setup"] and setup[k] != baseline["setup"][k])
        if differs:
            verdict = "no-comparable-baseline"
            reason = (f"nightly has no comparable baseline: the one at {baseline['location']} is for another setup ("
                      + ", ".join(f"{k} {baseline['setup'][k]} -> {setup[k]}" for k in differs)
                      + f"); {_FORCE_HINT} (the old one stays in history/)")
        else:
            failures = _judge(runs, cur, base, target, tolerance_epochs, tolerance_accuracy, tolerance_curve)
            failures += judge_performance(perf, base_doc.get("performance_history") or [], tolerance_time,
                                          tolerance_throughput, host_drop)
            gap = _largest_gap(cur["curve"], base["curve"])
            if failures:
                verdict, reason = "regressed", "nightly regressed: " + "; ".join(failures)
            else:
                verdict = "pass"
                if cur["epochs_to_target"] is not None or base["epochs_to_target"] is not None:
                    parts = [f"epochs to {target:g} = {_g(cur['epochs_to_target'])} vs baseline "
                             f"{_g(base['epochs_to_target'])} ({tol})"]
                else:
                    parts = [f"neither this night nor the baseline reaches {target:g}"]
                if not (cur["converged_runs"] == cur["n_runs"] and base["converged_runs"] == base["n_runs"]):
                    parts.append(f"final accuracy {_g(cur['final_accuracy'])} vs baseline "
                                 f"{_g(base['final_accuracy'])} (tolerance {_g(tolerance_accuracy)})")
                reason = "nightly passed: " + "; ".join(parts)

    out = Path(out_dir).resolve() if out_dir else default_out_dir(logs[0])
    key = digest_of({"logs": [r.sha256 for r in runs], "baseline": base_doc and base_doc["sha256"], "target": target,
                     "tolerances": [tolerance_epochs, tolerance_accuracy, tolerance_curve, tolerance_time,
                                    tolerance_throughput, host_drop], "context": context})
    result = NightlyResult(
        verdict=verdict, reason=reason, target=target, tolerance_epochs=tolerance_epochs,
        tolerance_accuracy=tolerance_accuracy, tolerance_curve=tolerance_curve, runs=runs,
        converged_runs=cur["converged_runs"], epochs_to_target=cur["epochs_to_target"],
        epochs_to_target_mean=cur["epochs_to_target_mean"], final_accuracy=cur["final_accuracy"], curve=cur["curve"],
        baseline_location=store.location,
        baseline=baseline, failures=failures, curve_gap=gap, context=setup, out_dir=str(out),
        plot_png=str(out / "convergence.png"), report_json=str(out / "nightly.json"), report_md=str(out / "report.md"),
        accepted=None, key=key, performance=perf,
        performance_history=list((base_doc or {}).get("performance_history") or []), tolerance_time=tolerance_time,
        scaling=scaling_efficiency(perf, list((base_doc or {}).get("performance_history") or [])),
        tolerance_throughput=tolerance_throughput, host_drop=host_drop, perf_plot_png=str(out / "performance.png"),
    )
    plot(result, None, out / "convergence.png")
    plot_performance(result, out / "performance.png")
    write_report(result)
    return result


def _judge(runs: list[RunCurve], cur: dict, base: dict, target: float, tol_e: float, tol_a: float,
           tol_c: float | None) -> list[str]:
    f: list[str] = []
    cur_share, base_share = cur["converged_runs"] / cur["n_runs"], base["converged_runs"] / base["n_runs"]
    if cur_share < base_share:
        missing = [r for r in runs if r.epochs_to_target is None]
        who = ", ".join(f"{Path(r.log).parent.name}/{Path(r.log).name} seed {r.seed}: best "
                        f"{_g(max(a for _, a in r.curve))} by epoch {_g(r.curve[-1][0])}" for r in missing[:3])
        f.append(f"{len(missing)} of {cur['n_runs']} runs never reached {target:g} ({who}"
                 f"{', ...' if len(missing) > 3 else ''}); baseline: {base['converged_runs']} of {base['n_runs']} "
                 f"reached it (epochs to {target:g} = {_g(base['epochs_to_target'])})")
    ce, be = cur["epochs_to_target"], base["epochs_to_target"]
    if be is not None and (ce is None or ce - be > tol_e) and not (ce is None and f):
        f.append(f"epochs to {target:g} = {_g(ce)} vs baseline {_g(be)} (tolerance {_g(tol_e)})")
    ca, ba = min(cur["final_accuracy"], target), min(base["final_accuracy"], target)
    if ba - ca > tol_a and not f:  # a run short of the target is already named above
        f.append(f"final accuracy {_g(cur['final_accuracy'])} vs baseline {_g(base['final_accuracy'])} "
                 f"(tolerance {_g(tol_a)})")
    if tol_c is not None:
        g = _largest_gap(cur["curve"], base["curve"])
        if g and g["gap"] > tol_c:
            f.append(f"accuracy at epoch {_g(g['epoch'])} {g['gap']:.3f} below baseline (tolerance {_g(tol_c)})")
    return f


def performance(per_run: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Medians over a night's runs of tasks.health.run_performance's figures (None: no run has any)."""
    def med(xs):
        xs = [x for x in xs if x is not None]
        return round(statistics.median(xs), 4) if xs else None

    hosts = sorted({h for r in per_run for h in r["hosts"]})
    out = {"time_to_train_min": med([r["time_to_train_min"] for r in per_run]),
           "img_per_s": med([r["img_per_s"] for r in per_run]),
           "ranks": max((r.get("ranks") or 0 for r in per_run), default=0) or None,
           "hosts": {h: med([r["hosts"].get(h) for r in per_run]) for h in hosts}}
    return out if out["time_to_train_min"] is not None or out["img_per_s"] is not None or hosts else None


def scaling_efficiency(perf: dict[str, Any] | None, history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """img/s per rank of a multi-host night against the latest accepted one-host night's (the same setup, as
    every night compared here): {"efficiency", "reference_at", "reference_per_rank"}; None without both."""
    def per_rank(n):
        return n["img_per_s"] / n["ranks"] if n.get("img_per_s") and n.get("ranks") else None

    if not perf or len(perf.get("hosts") or {}) < 2 or per_rank(perf) is None:
        return None
    ref = next((n for n in reversed(history) if len(n.get("hosts") or {}) == 1 and per_rank(n)), None)
    if ref is None:
        return None
    return {"efficiency": round(per_rank(perf) / per_rank(ref), 4), "reference_at": ref.get("at"),
            "reference_per_rank": round(per_rank(ref), 2)}


def judge_performance(perf: dict[str, Any] | None, history: list[dict[str, Any]], tol_time: float,
                      tol_throughput: float, host_drop: float) -> list[str]:
    """Rule 5: time to train, aggregate throughput and each host against the medians of the history."""
    if not perf or not history:
        return []
    f: list[str] = []

    def past(get):
        xs = [x for x in (get(h) for h in history) if isinstance(x, (int, float)) and x > 0]
        return statistics.median(xs) if xs else None

    t, t0 = perf.get("time_to_train_min"), past(lambda h: h.get("time_to_train_min"))
    if t is not None and t0 and t > t0 * (1 + tol_time):
        f.append(f"time to train {_g(t)} min vs recent median {_g(t0)} min (+{100 * (t / t0 - 1):.1f} %, "
                 f"tolerance {100 * tol_time:g} %)")
    x, x0 = perf.get("img_per_s"), past(lambda h: h.get("img_per_s"))
    if x is not None and x0 and x < x0 * (1 - tol_throughput):
        f.append(f"throughput {_g(x, 1)} img/s vs recent median {_g(x0, 1)} ({100 * (x / x0 - 1):.1f} %, "
                 f"tolerance {100 * tol_throughput:g} %)")
    hosts = perf.get("hosts") or {}
    for host, v in sorted(hosts.items()):
        v0 = past(lambda h: (h.get("hosts") or {}).get(host))
        if v is None or not v0 or v >= v0 * (1 - host_drop):
            continue
        why = f"({100 * (v / v0 - 1):.1f} %, threshold {100 * host_drop:g} %)"
        if len(hosts) > 1:  # and it fell behind the others: a slowdown of every host is not one host's
            r, r0 = _peer_ratio(hosts, host), past(lambda h: _peer_ratio(h.get("hosts") or {}, host))
            if r is None or not r0 or r >= r0 * (1 - host_drop):
                continue
            why = f"({100 * (v / v0 - 1):.1f} %; {r:.2f}x the other hosts' speed, {r0:.2f}x recently; threshold {100 * host_drop:g} %)"
        f.append(f"host {host} dropped: {_g(v, 1)} img/s per rank vs its recent median {_g(v0, 1)} {why}")
    return f


def _peer_ratio(hosts: dict[str, float | None], host: str) -> float | None:
    """A host's own img/s per rank over the median of the other hosts' in the same night."""
    others = [x for h, x in hosts.items() if h != host and x]
    return hosts[host] / statistics.median(others) if others and hosts.get(host) else None


def plot_performance(result: NightlyResult | dict[str, Any], out_png: str | os.PathLike) -> Path:
    """Time to train, aggregate img/s and each host's own img/s per rank over the accepted nights and this one."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    r = _as_dict(result)
    nights = list(r.get("performance_history") or []) + ([dict(r["performance"], at="this night")]
                                                        if r.get("performance") else [])
    fig = Figure(figsize=(7, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, 3, i) for i in (1, 2, 3)]
    xs = list(range(1, len(nights) + 1))
    colour = "#c0392b" if r["verdict"] in FAILING else "#1f77b4"
    for ax, key, label in ((axes[0], "time_to_train_min", "time to train (min)"), (axes[1], "img_per_s", "img/s")):
        pts = [(x, n.get(key)) for x, n in zip(xs, nights) if n.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", color=colour)
        ax.set_title(label, fontsize=9)
    for host in sorted({h for n in nights for h in (n.get("hosts") or {})}):
        pts = [(x, n["hosts"][host]) for x, n in zip(xs, nights) if (n.get("hosts") or {}).get(host)]
        axes[2].plot(*zip(*pts), marker=".", label=host)
    axes[2].set_title("own img/s per rank, by host", fontsize=9)
    if axes[2].lines:
        axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("night (last = this one)", fontsize=8)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return health.save_png(fig, out_png)


def _largest_gap(cur: list[list[float]], base: list[list[float]]) -> dict[str, float] | None:
    b = dict((e, a) for e, a in base)
    gaps = [(b[e] - a, e) for e, a in cur if e in b]
    if not gaps:
        return None
    g, e = max(gaps)
    return {"epoch": e, "gap": round(g, 6)}


# --- accept ---------------------------------------------------------------------------------------


def _as_dict(result: NightlyResult | dict[str, Any]) -> dict[str, Any]:
    return result.to_dict() if isinstance(result, NightlyResult) else result


def who() -> str:
    """user@host of whoever runs this process (recorded with every accepted baseline)."""
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry and no LOGNAME/USER (some containers)
        user = f"uid-{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def _accept(r: dict[str, Any], location: str | os.PathLike, force: bool, why: str | None,
            s3_options: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    why = (why or "").strip()
    if force and not why:
        raise StageError("a forced acceptance needs a reason (--reason \"...\"): it is recorded in the history")
    if "\n" in why:
        raise StageError("the acceptance reason must be one line")
    if r["verdict"] in FAILING and not force:
        what = "a regressed nightly" if r["verdict"] == "regressed" else "a nightly without a comparable baseline"
        raise StageError(f"refusing to accept {what} as the baseline ({r['reason']}); a person re-baselines "
                         "deliberately with force=True and a reason (--force-accept --reason WHY)")
    store = BaselineStore(location, s3_options)
    if r["verdict"] == "no-baseline" and not force and (store.read(BASELINE_FILE) is not None or store.has_history()):
        raise StageError(f"refusing to start a baseline by itself at {store.where(BASELINE_FILE)}: a baseline was "
                         "accepted there since this comparison; compare again")
    now = _dt.datetime.now(_dt.timezone.utc)
    record = {"by": who(), "at": now.isoformat(timespec="seconds"), "forced": bool(force),
              "why": why if force else ("first nightly of an empty history" if r["verdict"] == "no-baseline"
                                        else "passed against the previous baseline")}
    run_ids = sorted({x["run_id"] for x in r["runs"]})
    doc = {
        "format": FORMAT_VERSION,
        "accepted_at": record["at"],
        "accepted_by": record["by"],
        "forced": record["forced"],
        "why": record["why"],
        "verdict": r["verdict"],
        "reason": r["reason"],
        "target": r["target"],
        "run_ids": run_ids,
        "setup": r["context"],
        "epochs_to_target": r["epochs_to_target"],
        "final_accuracy": r["final_accuracy"],
        "curve": r["curve"],
        "runs": [{k: x[k] for k in ("run_id", "log", "seed", "curve", "epochs_to_target", "final_accuracy",
                                    "status", "setup", "sha256")} for x in r["runs"]],
        "replaces": (r.get("baseline") or {}).get("accepted_at"),
        "performance_history": (list(r.get("performance_history") or [])
                                + ([{**r["performance"], "at": record["at"], "run_ids": run_ids}]
                                   if r.get("performance") else []))[-PERF_KEEP:],
    }
    data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    store.write(f"{HISTORY_DIR}{now.strftime('%Y%m%dT%H%M%SZ')}_{run_ids[0]}.json", data)
    where = store.write(BASELINE_FILE, data)
    return where, {**record, "location": where}


def accept(result: NightlyResult | dict[str, Any], baseline_dir: str | os.PathLike | None = None,
           force: bool = False, s3_options: dict[str, Any] | None = None, reason: str | None = None) -> str:
    """Make `result`'s runs the baseline. By itself only when it passed, or when it is the first nightly of
    an empty history; anything else ("regressed", "no-comparable-baseline") needs a person: `force=True`
    with a one-line `reason`. Writes history/<accepted-at>_<run-id>.json, then baseline.json, each recording
    who (user@host), when and why; returns where baseline.json was written."""
    r = _as_dict(result)
    location = baseline_dir if baseline_dir is not None else r["baseline_location"]
    where, record = _accept(r, location, force, reason, s3_options)
    if isinstance(result, NightlyResult):
        result.accepted, result.acceptance = where, record
    return where


def run_nightly(run_logs: Sequence[str | os.PathLike], baseline_dir: str | os.PathLike, tolerance_epochs: float = 2,
                tolerance_accuracy: float = 0.02, target: float = TARGET, accept_on_pass: bool = True,
                force_accept: bool = False, reason: str | None = None, **kwargs: Any) -> NightlyResult:
    """compare(), then accept() when it passed or is the first nightly of an empty history: what the nightly
    flow calls. `force_accept` with a one-line `reason`: a person makes this night the baseline whatever
    the verdict (recorded with who/when/why). Never raises on a failing verdict (so the plot can be
    published first); the caller fails with `result.reason` when `result.failed`."""
    if force_accept and not (reason or "").strip():
        raise StageError("--force-accept needs --reason \"...\" (who, when and why are recorded in the history)")
    if (reason or "").strip() and not force_accept:
        raise StageError("--reason is recorded only with --force-accept")
    result = compare(run_logs, baseline_dir, tolerance_epochs, tolerance_accuracy, target, **kwargs)
    if force_accept or (accept_on_pass and result.verdict in PASSING):
        accept(result, baseline_dir, force=force_accept, s3_options=kwargs.get("s3_options"), reason=reason)
        write_report(result)
    return result


# --- plot and reports -----------------------------------------------------------------------------


def plot(current: NightlyResult | dict[str, Any] | Sequence[RunCurve], baseline: dict[str, Any] | None,
         out_png: str | os.PathLike, target: float = TARGET) -> Path:
    """Accuracy per epoch of this night's runs (blue) against the baseline's (grey), medians bold, target
    dashed. `current`: a NightlyResult (its baseline is used when `baseline` is None) or a list of runs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(current, (NightlyResult, dict)):
        r = _as_dict(current)
        runs, med, baseline = r["runs"], r["curve"], baseline if baseline is not None else r["baseline"]
        target, verdict = r["target"], r["verdict"]
        title = {"pass": "PASS", "regressed": "REGRESSED", "no-baseline": "no baseline",
                 "no-comparable-baseline": "NO COMPARABLE BASELINE"}[verdict]
        title += f" — epochs to {target:g}: {_g(r['epochs_to_target'])}"
        if baseline:
            title += f" vs baseline {_g(_summarise(baseline['runs'], target)['epochs_to_target'])}"
    else:
        runs = [dataclasses.asdict(x) if isinstance(x, RunCurve) else x for x in current]
        med, verdict, title = _summarise(runs, target)["curve"], None, "nightly"
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colour = "#c0392b" if verdict in FAILING else "#1f77b4"
    if baseline:
        b_runs = baseline["runs"]
        for i, x in enumerate(b_runs):
            ax.plot(*zip(*x["curve"]), color="0.6", lw=1, ls="--", marker=".", ms=4,
                    label="baseline runs" if i == 0 and len(b_runs) > 1 else None)
        b_med = baseline.get("curve") or _summarise(b_runs, target)["curve"]
        ax.plot(*zip(*b_med), color="0.25", lw=2.2, marker="o", ms=4,
                label=f"baseline ({baseline.get('accepted_at') or 'stored'}"
                      f"{', median' if len(b_runs) > 1 else ''})")
    seeds = ", ".join(str(x.get("seed")) for x in runs[:6]) + (", ..." if len(runs) > 6 else "")
    for i, x in enumerate(runs):
        ax.plot(*zip(*x["curve"]), color=colour, lw=1, alpha=0.45 if len(runs) > 1 else 1, marker=".", ms=4,
                label=f"this night's runs (seeds {seeds})" if i == 0 and len(runs) > 1 else None)
    ax.plot(*zip(*med), color=colour, lw=2.4, marker="o", ms=5,
            label=f"this night (median of {len(runs)} runs)" if len(runs) > 1 else f"this night (seed {seeds})")
    ax.axhline(target, color="#2ca02c", ls=":", lw=1.5, label=f"target {target:g}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("eval top-1 accuracy")
    ax.set_ylim(0, 1.0)
    ax.grid(alpha=0.3)
    ax.set_title(f"Nightly convergence: {title}", fontsize=11)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return health.save_png(fig, out_png)  # also creates out_png's directory


def _run_rows(r: dict[str, Any]) -> list[str]:
    rows = ["| set | run | seed | epochs to target | final accuracy | status |", "|---|---|---|---|---|---|"]
    sets = [("this night", r["runs"])] + ([("baseline", r["baseline"]["runs"])] if r.get("baseline") else [])
    for name, runs in sets:
        for x in runs:
            ett = epochs_to_target(x["curve"], r["target"])
            rows.append(f"| {name} | {x['run_id']}/{Path(x['log']).name} | {x.get('seed')} | {_g(ett)} | "
                        f"{_g(x['final_accuracy'])} | {x.get('status')} |")
    return rows


def _markdown(r: dict[str, Any], image: str, perf_image: str | None = None) -> str:
    b = r.get("baseline")
    L = [f"# Nightly convergence: **{r['verdict'].upper()}**", "", r["reason"], "",
         f"![convergence plot]({image})", "",
         f"- target: {r['target']:g} top-1; tolerances: {_g(r['tolerance_epochs'])} epochs, "
         f"{_g(r['tolerance_accuracy'])} accuracy" + (f", {_g(r['tolerance_curve'])} per-epoch" if r.get("tolerance_curve") is not None else ""),
         f"- this night: {r['converged_runs']} of {len(r['runs'])} runs reach the target; epochs to target median "
         f"{_g(r['epochs_to_target'])}, mean {_g(r['epochs_to_target_mean'])}; final accuracy median {_g(r['final_accuracy'])}"]
    if b:
        L.append(f"- baseline (accepted {b.get('accepted_at')}, runs {', '.join(map(str, b['run_ids']))}): "
                 f"{b['converged_runs']} of {b['n_runs']} reach it; epochs to target median {_g(b['epochs_to_target'])}, "
                 f"mean {_g(b['epochs_to_target_mean'])}; final accuracy median {_g(b['final_accuracy'])}")
        if r.get("curve_gap"):
            g = r["curve_gap"]
            L.append(f"- largest per-epoch shortfall against the baseline: {g['gap']:+.3f} at epoch {_g(g['epoch'])}")
    perf, hist = r.get("performance"), r.get("performance_history") or []
    if perf:
        hosts = ", ".join(f"{h} {_g(v, 1)}" for h, v in (perf.get("hosts") or {}).items()) or "no per-rank timing"
        L.append(f"- this night's performance: time to train {_g(perf.get('time_to_train_min'))} min, "
                 f"{_g(perf.get('img_per_s'), 1)} img/s; own img/s per rank by host: {hosts} "
                 f"(against the median of {len(hist)} accepted night(s); tolerances: time +{100 * r.get('tolerance_time', 0):g} %, "
                 f"throughput -{100 * r.get('tolerance_throughput', 0):g} %, host -{100 * r.get('host_drop', 0):g} %)")
    if r.get("scaling"):
        sc = r["scaling"]
        L.append(f"- scaling efficiency: {100 * sc['efficiency']:.1f} % of the img/s per rank of the one-host night "
                 f"accepted {sc['reference_at']} ({_g(sc['reference_per_rank'], 1)})")
    L.append(f"- baseline location: `{r['baseline_location']}`" + (f"; accepted as the new baseline: `{r['accepted']}`"
                                                                    if r.get("accepted") else ""))
    acc = r.get("acceptance")
    if acc:
        L.append(f"- accepted by {acc['by']} at {acc['at']}" + (f", forced: {acc['why']}" if acc["forced"] else f" ({acc['why']})"))
    if perf_image:
        L += ["", f"![time to train, throughput and per-host speed over the nights]({perf_image})"]
    L += ["", *_run_rows(r), ""]
    return "\n".join(L)


def markdown_with_plot(result: NightlyResult | dict[str, Any]) -> str:
    """The report as Markdown with the plot embedded as a data: URI (for a Prefect markdown artifact)."""
    r = _as_dict(result)
    png = Path(r["plot_png"]).read_bytes()
    perf = r.get("perf_plot_png")
    perf_uri = ("data:image/png;base64," + base64.b64encode(Path(perf).read_bytes()).decode()
                if perf and Path(perf).exists() else None)
    return _markdown(r, "data:image/png;base64," + base64.b64encode(png).decode(), perf_uri)


def write_report(result: NightlyResult) -> None:
    try:
        write_text_atomic(result.report_md, _markdown(result.to_dict(), Path(result.plot_png).name,
                                                      Path(result.perf_plot_png).name if result.perf_plot_png else None))
        write_json_atomic(result.report_json, result.to_dict())
    except OSError as e:
        raise StageError(f"cannot write nightly report in {result.out_dir}: {e.strerror}") from None


# --- CLI ------------------------------------------------------------------------------------------


def add_command(subparsers) -> None:
    p = subparsers.add_parser("nightly", help="compare result logs' convergence with the stored nightly baseline",
                              description="Convergence regression: compare this night's result logs (epochs to the "
                                          "target accuracy, final accuracy) with the last accepted night stored under "
                                          "--baseline. Exit 1 if they regressed beyond the tolerances; a passing night "
                                          "becomes the new baseline unless --no-accept.")
    p.add_argument("logs", nargs="+", help="result_*.txt files or run directories holding them")
    p.add_argument("--baseline", required=True,
                   help="baseline directory: a path, file:///dir or s3://bucket/prefix (for an archive URI A: A/nightly)")
    p.add_argument("--target", type=float, default=TARGET, help="target eval accuracy (default %(default)s)")
    p.add_argument("--tolerance-epochs", type=float, default=2,
                   help="median epochs to the target may be this many more than the baseline's (default %(default)s)")
    p.add_argument("--tolerance-accuracy", type=float, default=0.02,
                   help="median final accuracy may be this much lower than the baseline's (default %(default)s)")
    p.add_argument("--tolerance-curve", type=float, default=None, help="also fail on a per-epoch accuracy shortfall")
    p.add_argument("--tolerance-time", type=float, default=0.15,
                   help="median time to train may be this fraction above the recent nights' median (default %(default)s)")
    p.add_argument("--tolerance-throughput", type=float, default=0.05,
                   help="median img/s may be this fraction below the recent nights' median (default %(default)s)")
    p.add_argument("--host-drop", type=float, default=0.05,
                   help="fail naming a host whose own img/s per rank is this fraction below its recent median "
                        "(default %(default)s)")
    p.add_argument("--out", default=None, help="report directory (default WORKDIR/reports/nightly/<run-id>)")
    p.add_argument("--no-accept", action="store_true", help="do not store a passing result as the new baseline")
    p.add_argument("--force-accept", action="store_true",
                   help="a person makes this night the baseline whatever the verdict (needs --reason)")
    p.add_argument("--reason", default=None,
                   help="why this night is force-accepted; recorded in the history with user@host and the time")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    r = run_nightly(args.logs, args.baseline, args.tolerance_epochs, args.tolerance_accuracy, args.target,
                    accept_on_pass=not args.no_accept, force_accept=args.force_accept, reason=args.reason,
                    tolerance_curve=args.tolerance_curve, out_dir=args.out, tolerance_time=args.tolerance_time,
                    tolerance_throughput=args.tolerance_throughput, host_drop=args.host_drop)
    if args.json:
        print(json.dumps(r.to_dict()))
    else:
        print(r.reason)
        print(f"plot: {r.plot_png}\nreport: {r.report_md}" + (f"\nbaseline written: {r.accepted}" if r.accepted else ""))
        if r.acceptance and r.acceptance["forced"]:
            print(f"accepted by {r.acceptance['by']} at {r.acceptance['at']}: {r.acceptance['why']}")
    return 1 if r.failed else 0
