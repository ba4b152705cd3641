"""Compliance stage: judge MLPerf ResNet-50 result logs with the OFFICIAL mlperf-logging tools.

Nothing here re-implements a rule. Every verdict comes from running, as subprocesses, the tools
of mlperf-logging (4.1.68):
  - compliance checker, once per `result_*.txt`  -> its exit code is the verdict;
  - RCP checker on the set                       -> exit code (only for real-ImageNet sets of >= 5 runs);
  - package checker on a generated submission    -> exits 0 even on errors, so its OUTPUT is the verdict;
  - result summarizer on the same package        -> the official set score, compared with ours.
Their full outputs go into the report. What this module adds: reading run_start/run_stop, epochs
and accuracy from the logs (with the package's own parser), the MLPerf set rule for resnet
(5 runs, at most one non-converged, olympic mean), the submission layout, and the reports.

Set of fewer than 5 logs (e.g. the flow's single demo run): every log still gets its official
verdict, but the set is reported as "not an official set" (set.passed = false, with the reason).
`ComplianceResult.logs_passed` is the per-log verdict a single-run demo gates on
(`rn50 check LOGDIR --gate logs`). `gate()` is the one pass/fail policy of the stage: the flow's
compliance task and `rn50 check LOGDIR --gate` both call it (every log passes; the runs converged;
the MLPerf set rule for a set of 5). Result logs are found and read by tasks/mlperf_logs.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from tasks import health, mlperf_logs, paths
from tasks.common import Result, StageError, Workdir, digest_of, file_digest, write_json_atomic, write_text_atomic

BENCHMARK = "resnet"
SET_SIZE = 5  # mlperf_logging.benchmark_meta: resnet needs 5 result files
MAX_FAILED = 1  # olympic scoring drops one non-converged run
IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000
DEFAULT_RULESET = "4.0.0"
SYSTEMS_DIR = paths.KINDS["systems"][0]
TOOL_TIMEOUT = 600

# MLPerf 4.x system descriptions must use these availability strings (system_desc_checker).
_STATUS_WORDING = {
    "onprem": "Available on-premise",
    "available": "Available on-premise",
    "cloud": "Available cloud",
    "preview": "Preview",
    "research": "Research, Development, or Internal (RDI)",
}


@dataclasses.dataclass
class ToolRun(Result):
    """One run of an official tool: what ran, how it ended, everything it printed."""

    tool: str
    command: list[str]
    exit_code: int
    output: str
    passed: bool | None  # None: the tool's verdict could not be read
    summary: str  # one line


@dataclasses.dataclass
class LogVerdict(Result):
    file: str
    passed: bool
    time_to_train_min: float | None
    epochs: float | None
    accuracy: float | None
    status: str
    reason: str
    sha256: str
    global_batch_size: int | None
    checker: ToolRun


@dataclasses.dataclass
class ComplianceResult(Result):
    logdir: str
    ruleset: str
    dataset: str  # "imagenet" | "synthetic"
    logs: list[LogVerdict]
    logs_passed: bool  # every log passed the ruleset: what a single-run demo gates on
    set_passed: bool  # MLPerf set rule for resnet (5 runs, <= 1 failure, RCP when applicable)
    set_reason: str
    set_time_to_train_min: float | None  # olympic mean, as result_summarizer computes it
    rcp: dict[str, Any]  # {"applicable", "passed", "reason", "version", "run": ToolRun|None}
    package: dict[str, Any]  # {"generated", "path", "system", "passed", "reason", "checker", "summarizer", ...}
    out_dir: str
    report_md: str
    report_json: str
    key: str  # sha256 of (log digests, ruleset, dataset, system description, rcp version): the cache key
    health: dict[str, Any] | None = None  # tasks.health.report (health.md/.json/.png beside report.md)

    def cli_json(self) -> dict[str, Any]:
        """The exact object `rn50 check --json` prints (contract in issue 6)."""
        return {
            "ruleset": self.ruleset,
            "logs": [
                {k: getattr(v, k) for k in ("file", "passed", "time_to_train_min", "epochs", "status", "reason")}
                for v in self.logs
            ],
            "set": {"passed": self.set_passed, "time_to_train_min": self.set_time_to_train_min},
        }


# --- helpers --------------------------------------------------------------------------------------


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def resnet_rulesets() -> list[str]:
    """Training rulesets of the installed mlperf-logging that still know resnet, oldest first."""
    from mlperf_logging.benchmark_meta import get_allowed_benchmarks
    from mlperf_logging.compliance_checker.mlp_compliance import rule_choices

    out = []
    for r in rule_choices():
        try:
            if BENCHMARK in get_allowed_benchmarks("training", r):
                out.append(r)
        except Exception:  # a ruleset the metadata does not describe has no resnet for us
            continue
    return sorted(out, key=_version_key)


def _rcp_rulesets() -> set[str]:
    import mlperf_logging.rcp_checker as rc

    base = Path(rc.__file__).parent
    return {p.parent.name.split("_", 1)[1] for p in base.glob(f"training_*/rcps_{BENCHMARK}.json")}


def _run_tool(tool: str, args: list[str], cwd: Path) -> tuple[list[str], int, str]:
    cmd = [sys.executable, "-m", f"mlperf_logging.{tool}", *args]
    try:
        p = subprocess.run(
            cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TOOL_TIMEOUT,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
    except subprocess.TimeoutExpired as e:
        return cmd, -1, (e.stdout or "") + f"\n[timed out after {TOOL_TIMEOUT}s]"
    return cmd, p.returncode, p.stdout


def _problems(output: str) -> list[str]:
    """The WARNING/ERROR messages a checker printed, in order, without duplicates or its final banner."""
    seen: list[str] = []
    for line in output.splitlines():
        m = re.match(r"^(?:WARNING|ERROR)\s*-\s*(.*\S)", line)
        if not m:
            continue
        msg = m.group(1).strip()
        if msg in ("FAILED",) or msg.startswith("PACKAGE CHECKER") or msg in seen:
            continue
        seen.append(msg)
    if not seen and "Traceback" in output:
        seen.append(output.strip().splitlines()[-1])
    return seen


def _one_line(msgs: list[str], limit: int = 400) -> str:
    s = "; ".join(m.replace("\n", " ") for m in msgs)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _log_facts(path: Path, ruleset: str) -> dict[str, Any]:
    """run_start/run_stop, convergence epoch, accuracy, status and submission fields (tasks.mlperf_logs)."""
    facts: dict[str, Any] = {"run_start": None, "run_stop": None, "status": "no run_stop", "epochs": None,
                             "accuracy": None, "values": {}}
    try:
        lines = mlperf_logs.parse(path, ruleset)
    except Exception as e:  # unreadable file: the checker's verdict will say so
        facts["status"] = f"unparseable: {e}"
        return facts
    s = mlperf_logs.summarize(lines)
    epochs, accuracy = s.last_eval
    return {"run_start": s.run_start, "run_stop": s.run_stop, "status": s.status, "epochs": epochs,
            "accuracy": accuracy, "values": s.values}


def olympic_mean(scores: list[float], n_failed: int, max_dropped: int = MAX_FAILED) -> float | None:
    """result_summarizer's _compute_olympic_average: drop the fastest and (unless a failed run was
    already dropped) the slowest; None when nothing is left or too many runs failed."""
    if n_failed > max_dropped:
        return None
    s = sorted(scores)
    kept = s[max_dropped: len(s) - (max_dropped - n_failed)]
    return sum(kept) / len(kept) if kept else None


# --- system description ---------------------------------------------------------------------------


def detect_host() -> dict[str, str]:
    """Facts about this machine for the MLPerf system description."""
    model, sockets = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            if k.strip() == "model name" and model == "unknown":
                model = v.strip()
            elif k.strip() == "physical id":
                sockets.add(v.strip())
    except OSError:
        pass
    try:
        import psutil

        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 0
        mem = f"{psutil.virtual_memory().total / 2**30:.0f} GB"
    except Exception:
        cores, mem = os.cpu_count() or 0, "unknown"
    osname = platform.platform()
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                osname = line.split("=", 1)[1].strip('"')
    except OSError:
        pass

    def version(dist: str) -> str | None:
        from importlib import metadata

        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    mx = version("mxnet") or version("mxnet-cu110")
    stack = [f"Python {platform.python_version()}"]
    if hv := version("horovod"):
        stack.append(f"Horovod {hv} (Gloo)")
    if dali := version("nvidia-dali-cuda120"):
        stack.append(f"DALI {dali}")
    return {
        "host_processor_model_name": model,
        "host_processors_per_node": str(max(len(sockets), 1)),
        "host_processor_core_count": str(cores),
        "host_processor_vcpu_count": str(os.cpu_count() or 0),
        "host_memory_capacity": mem,
        "accelerators_per_node": "0",
        "framework": f"MXNet {mx}" if mx else "MXNet (not installed)",
        "other_software_stack": ", ".join(stack),
        "operating_system": osname,
    }


def load_system_config(system: str | os.PathLike | None, platform_name: str | None) -> tuple[str, dict]:
    """Resolve the system config: a path, a name in configs/systems/, or (None) the config whose
    match_platforms lists the logs' submission_platform, else local-cpu."""
    if system is None:
        for p in sorted(SYSTEMS_DIR.glob("*.yaml")):
            cfg = yaml.safe_load(p.read_text()) or {}
            if platform_name and platform_name in (cfg.get("match_platforms") or []):
                return p.stem, cfg
        system = "local-cpu"
    p = paths.resolve("systems", system)
    try:
        cfg = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise StageError(f"system description {p} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(cfg.get("system"), dict):
        raise StageError(f"system description {p} has no 'system:' mapping")
    return p.stem, cfg


def system_description(cfg: dict, log_values: dict[str, Any]) -> dict[str, str]:
    """Fill a system config's "auto" fields from the logs and this host."""
    host = detect_host()
    out: dict[str, str] = {}
    for k, v in cfg["system"].items():
        if v != "auto":
            out[k] = "" if v is None else str(v)
        elif k == "submitter":
            out[k] = str(log_values.get("submission_org") or "unknown")
        elif k == "division":
            out[k] = str(log_values.get("submission_division") or "open")
        elif k == "status":
            s = str(log_values.get("submission_status") or "research")
            out[k] = _STATUS_WORDING.get(s.lower(), s)
        elif k == "system_name":
            out[k] = f"{host['host_processor_core_count']}-core {host['host_processor_model_name']} (CPU only)"
        elif k in host:
            out[k] = host[k]
        else:
            out[k] = "unknown"
    return out


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "unknown"


# --- the stage ------------------------------------------------------------------------------------


def default_out_dir(logdir: Path) -> Path:
    """WORKDIR/compliance/<run-id> for WORKDIR/runs/<run-id>; LOGDIR/compliance for a loose log dir."""
    if logdir.parent.name == "runs":
        return Workdir(logdir.parent.parent).compliance / logdir.name
    return logdir / "compliance"


def check(
    logdir: str | os.PathLike,
    ruleset: str = DEFAULT_RULESET,
    dataset: str = "auto",
    system: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    rcp_version: str | None = None,
    slow_host_threshold: float = health.SLOW_HOST_THRESHOLD,
) -> ComplianceResult:
    """Run the official checkers on LOGDIR/result_*.txt and write compliance reports.

    dataset: "imagenet" | "synthetic" | "auto" (imagenet iff every log records train_samples
    1,281,167 and eval_samples 50,000). RCPs apply to ImageNet only.
    rcp_version: RCP table to use; default = the ruleset when it has resnet RCPs (>= 1.0.0).
    slow_host_threshold: the health report names a host this far below the hosts' median (tasks/health.py).
    """
    logdir = Path(logdir).resolve()
    if not logdir.is_dir():
        raise StageError(f"log directory {logdir} does not exist")
    known = resnet_rulesets()
    if ruleset not in known:
        raise StageError(f"ruleset {ruleset!r} has no resnet benchmark in mlperf-logging; use one of {', '.join(known)}")
    if dataset not in ("auto", "imagenet", "synthetic"):
        raise StageError(f"dataset must be auto, imagenet or synthetic, not {dataset!r}")
    if not (0 < slow_host_threshold < 1):
        raise StageError(f"slow-host threshold must be in (0, 1), not {slow_host_threshold}")
    files = mlperf_logs.result_files(logdir)
    if not files:
        raise StageError(f"no result_*.txt in {logdir}")
    rcp_tables = _rcp_rulesets()
    if rcp_version is not None and rcp_version not in rcp_tables:
        raise StageError(f"no resnet RCPs for version {rcp_version!r}; have {', '.join(sorted(rcp_tables, key=_version_key))}")
    # Resolve the system description before any work, so a typo fails fast and writes nothing.
    sys_name, sys_cfg = load_system_config(system, _log_facts(files[0], ruleset)["values"].get("submission_platform"))
    out = Path(out_dir).resolve() if out_dir else default_out_dir(logdir)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}.", dir=out.parent))
        stage.chmod(0o755)  # mkdtemp's 0700 would survive the rename
    except OSError as e:
        raise StageError(f"cannot write the report next to {out}: {e.strerror}") from e

    try:
        result = _check_into(stage, out, logdir, files, ruleset, dataset, sys_name, sys_cfg, rcp_version, rcp_tables,
                             slow_host_threshold)
        # Swap the finished tree in whole (the result already names the final paths).
        old = None
        if out.exists():
            old = out.parent / f".old-{out.name}.{os.getpid()}"
            os.replace(out, old)
        os.replace(stage, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return result
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _relocate(obj: Any, old: str, new: str) -> Any:
    """Replace the staging dir by the final dir in every string of a result (tool outputs name it)."""
    if isinstance(obj, str):
        return obj.replace(old, new)
    if isinstance(obj, list):
        return [_relocate(x, old, new) for x in obj]
    if isinstance(obj, dict):
        return {k: _relocate(v, old, new) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            setattr(obj, f.name, _relocate(getattr(obj, f.name), old, new))
    return obj


def _check_into(stage: Path, out: Path, logdir: Path, files: list[Path], ruleset: str, dataset: str,
                sys_name: str, sys_cfg: dict, rcp_version: str | None, rcp_tables: set[str],
                slow_host_threshold: float = health.SLOW_HOST_THRESHOLD) -> ComplianceResult:
    scratch = stage / "tool-logs"
    scratch.mkdir()

    # 1. The compliance checker on every log: its exit code is the verdict.
    verdicts: list[LogVerdict] = []
    facts_by_file: dict[str, dict] = {}
    for f in files:
        cmd, rc, output = _run_tool(
            "compliance_checker",
            ["--usage", "training", "--ruleset", ruleset, "--log_output", str(scratch / f"{f.stem}.log"), str(f)],
            cwd=scratch,
        )
        passed = rc == 0
        problems = _problems(output)
        reason = "ok" if passed else (_one_line(problems) or f"compliance checker exited {rc}")
        facts = _log_facts(f, ruleset)
        if not passed and facts["accuracy"] == 1.0:
            reason += ("; the checker refuses a top-1 of 1.0 as implausible: this validation set is too small or "
                       "too easy to prove a result")
        facts_by_file[f.name] = facts
        ttt = ((facts["run_stop"] - facts["run_start"]) / 60000.0
               if facts["run_start"] is not None and facts["run_stop"] is not None else None)
        gbs = facts["values"].get("global_batch_size")
        verdicts.append(LogVerdict(
            file=f.name, passed=passed, time_to_train_min=ttt,
            epochs=facts["epochs"], accuracy=facts["accuracy"], status=facts["status"], reason=reason,
            sha256=file_digest(f, "sha256"), global_batch_size=int(gbs) if isinstance(gbs, (int, float)) else None,
            checker=ToolRun("compliance_checker", cmd, rc, output, passed, "SUCCESS" if passed else reason),
        ))

    first_values = next((fa["values"] for fa in facts_by_file.values() if fa["values"]), {})
    if dataset == "auto":
        # Judge by the logs that record their sample counts (a broken log says nothing about the data).
        counts = [(fa["values"].get("train_samples"), fa["values"].get("eval_samples"))
                  for fa in facts_by_file.values() if "train_samples" in fa["values"]]
        real = bool(counts) and all(c == (IMAGENET_TRAIN, IMAGENET_VAL) for c in counts)
        dataset = "imagenet" if real else "synthetic"

    n, n_failed = len(verdicts), sum(not v.passed for v in verdicts)
    logs_passed = n_failed == 0

    # 2. RCP checker: real ImageNet, a full set, a ruleset (or explicit version) that has RCPs.
    rcp_ver = rcp_version or (ruleset if ruleset in rcp_tables else None)
    rcp: dict[str, Any] = {"applicable": False, "passed": None, "version": rcp_ver, "reason": "", "run": None,
                           "scaling_factor": None}
    if dataset != "imagenet":
        rcp["reason"] = ("not applicable: synthetic data; RCPs are reference epochs-to-converge on real ImageNet "
                         f"({IMAGENET_TRAIN:,} train images), a run on other data cannot be compared with them")
    elif n < SET_SIZE:
        rcp["reason"] = f"not applicable: RCP checks need a set of {SET_SIZE} runs, {logdir.name} has {n}"
    elif rcp_ver is None:
        rcp["reason"] = (f"not applicable: ruleset {ruleset} predates RCPs (first in training 1.0.0); "
                         f"pass rcp_version (e.g. {max(rcp_tables, key=_version_key)}) to compare anyway")
    else:
        cmd, rc, output = _run_tool(
            "rcp_checker",
            ["--rcp_usage", "training", "--rcp_version", rcp_ver, "--log_output", str(scratch / "rcp_checker.log"),
             str(logdir)],
            cwd=scratch,
        )
        msg = next((m.group(1) for m in re.finditer(r"-\s*(.*?), RCP test (?:PASSED|FAILED)", output)), None)
        m = re.search(r"normalized by factor of .*? = ([0-9.]+)", output)
        subm = re.search(r"Submission mean epochs: ([0-9.]+)", output)
        ref = re.search(r"'BS': (\d+).*'RCP Mean': ([0-9.]+)", output)
        if msg and subm and ref:
            msg += (f" (GBS {ref.group(1)}: submission mean {float(subm.group(1)):.2f} epochs, "
                    f"RCP mean {float(ref.group(2)):.2f}" + (f", score normalised x{float(m.group(1)):.4f}" if m else "") + ")")
        rcp.update(applicable=True, passed=rc == 0, reason=(msg or _one_line(_problems(output)) or f"exit {rc}"),
                   run=ToolRun("rcp_checker", cmd, rc, output, rc == 0, msg or f"exit {rc}").to_dict(),
                   scaling_factor=float(m.group(1)) if m else None)

    # 3. The MLPerf set rule for resnet.
    scores = [v.time_to_train_min for v in verdicts if v.passed and v.time_to_train_min is not None]
    set_ttt = olympic_mean(scores, n - len(scores)) if n >= SET_SIZE else None
    if n != SET_SIZE:
        set_passed = False
        set_reason = (f"not an official set: MLPerf resnet needs exactly {SET_SIZE} runs, {logdir.name} has {n}"
                      f" ({n - n_failed} passed the {ruleset} checker)")
    elif n_failed > MAX_FAILED:
        set_passed = False
        set_reason = f"{n_failed} of {n} runs failed the {ruleset} checker; MLPerf allows at most {MAX_FAILED}"
    elif rcp["applicable"] and not rcp["passed"]:
        set_passed = False
        set_reason = f"RCP check failed: {rcp['reason']}"
    else:
        set_passed = True
        set_reason = (f"{n - n_failed} of {n} runs passed the {ruleset} checker"
                      + (f"; RCP: {rcp['reason']}" if rcp["applicable"] else ""))

    # 4. Submission package + package checker + result summarizer (full sets only).
    package: dict[str, Any] = {"generated": False, "system_config": sys_name}
    if n == SET_SIZE:
        package = _package(stage / "submission", files, ruleset, sys_name, sys_cfg, first_values, set_ttt, scratch)
    else:
        package["reason"] = f"not generated: a submission needs {SET_SIZE} result files, have {n}"

    key = digest_of({"logs": [[v.file, v.sha256] for v in verdicts], "ruleset": ruleset, "dataset": dataset,
                     "system": sys_cfg, "rcp_version": rcp_version})
    shutil.rmtree(scratch, ignore_errors=True)
    result = ComplianceResult(
        logdir=str(logdir), ruleset=ruleset, dataset=dataset, logs=verdicts, logs_passed=logs_passed,
        set_passed=set_passed, set_reason=set_reason, set_time_to_train_min=set_ttt, rcp=rcp, package=package,
        out_dir=str(out), report_md=str(out / "report.md"), report_json=str(out / "report.json"), key=key,
    )
    try:  # the cluster's health beside the verdict; a broken timing file does not change the verdict
        result.health = health.report(logdir, stage, system=sys_cfg.get("system"), threshold=slow_host_threshold).to_dict()
    except StageError as e:
        result.health = {"error": str(e)}
    _relocate(result, str(stage), str(out))
    write_json_atomic(stage / "report.json", result.to_dict())
    write_text_atomic(stage / "report.md", render_markdown(result))
    return result


def _package(root: Path, files: list[Path], ruleset: str, sys_name: str, sys_cfg: dict, values: dict,
             set_ttt: float | None, scratch: Path) -> dict[str, Any]:
    desc = system_description(sys_cfg, values)
    org = _slug(desc.get("submitter") or "unknown")
    sys_id = _slug(sys_name)
    org_dir = root / org
    bench = org_dir / "results" / sys_id / BENCHMARK
    bench.mkdir(parents=True)
    for i, f in enumerate(files):
        shutil.copyfile(f, bench / f"result_{i}.txt")
    (org_dir / "systems").mkdir()
    (org_dir / "systems" / f"{sys_id}.json").write_text(json.dumps(desc, indent=2) + "\n")

    cmd, rc, output = _run_tool(
        "package_checker",
        [str(org_dir), "training", ruleset, "--log_output", str(scratch / "package_checker.log")], cwd=scratch,
    )
    # The package checker exits 0 whatever it finds: its banner is the verdict.
    if "FOUND NO ERRORS" in output:
        passed: bool | None = True
    elif "FOUND ERRORS" in output:
        passed = False
    else:
        passed = None
    errors = [line.split("-", 1)[1].strip() for line in output.splitlines() if line.startswith("ERROR")]
    reason = "no errors" if passed else (_one_line(errors) or f"no verdict printed (exit {rc})")
    checker = ToolRun("package_checker", cmd, rc, output, passed, reason)

    csv = scratch / "summary.csv"
    scmd, src, soutput = _run_tool("result_summarizer", [str(org_dir), "training", ruleset, "--csv", str(csv)],
                                   cwd=scratch)
    score = None
    if csv.exists():
        import pandas as pd

        try:
            col = pd.read_csv(csv)[BENCHMARK].dropna()
            score = float(col.iloc[0]) if len(col) else None
        except (KeyError, ValueError, pd.errors.EmptyDataError):
            score = None
    scaling = None
    if (bench / "scaling.json").exists():  # written by the RCP step of the package checker/summarizer
        scaling = json.loads((bench / "scaling.json").read_text()).get("scaling_factor")
    expected = None if set_ttt is None else set_ttt * (scaling or 1.0)
    agrees = None if (score is None or expected is None) else abs(score - expected) < 1e-6
    summarizer = ToolRun("result_summarizer", scmd, src, soutput, score is not None,
                         f"resnet score {score:.4f} min" if score is not None else "no score")
    return {
        "generated": True, "path": str(org_dir), "org": org, "system": sys_id, "system_config": sys_name,
        "system_description": desc, "passed": passed, "reason": reason, "checker": checker.to_dict(),
        "summarizer": summarizer.to_dict(), "summarizer_time_to_train_min": score, "rcp_scaling_factor": scaling,
        "summarizer_agrees": agrees,
    }


# --- the gate -------------------------------------------------------------------------------------

GATES = ("flow", "set", "logs")


def gate(result: ComplianceResult, policy: str = "flow") -> str | None:
    """Whether the compliance stage passes: None when it does, else the one-line reason.

    "flow", what the rn50 flow's compliance stage and `rn50 check LOGDIR --gate` enforce: every log passes
    the official checker, and the runs converged: all of them for a demo or a regression (fewer than 5
    runs), MLPerf's set rule (5 runs, at most one failure, the RCP check when it applies) for a set.
    "set": MLPerf's set rule alone (the default exit code of `rn50 check`). "logs": every log passes the
    checker (a single-run demo that need not converge)."""
    if policy not in GATES:
        raise StageError(f"gate must be one of {', '.join(GATES)}, not {policy!r}")
    if policy == "set":
        return None if result.set_passed else f"the set fails: {result.set_reason}"
    failed = [v for v in result.logs if not v.passed]
    if failed:
        return (f"{len(failed)} log(s) fail ruleset {result.ruleset}: "
                + "; ".join(f"{Path(v.file).name}: {v.reason}" for v in failed))
    if policy == "logs":
        return None
    if len(result.logs) >= SET_SIZE and not result.set_passed:
        return f"the set fails: {result.set_reason}"
    unconverged = [v for v in result.logs if v.status != "success"]
    if len(result.logs) < SET_SIZE and unconverged:
        return (f"{len(unconverged)} run(s) did not reach the target: "
                + "; ".join(f"{Path(v.file).name}: {v.status} at epoch {v.epochs}, top-1 {v.accuracy}"
                            for v in unconverged))
    return None


# --- reports --------------------------------------------------------------------------------------


def _fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def table_rows(result: ComplianceResult | dict[str, Any]) -> list[dict[str, Any]]:
    """One row per run, for prefect.artifacts.create_table_artifact(table=...); from the result or its dict."""
    logs = result["logs"] if isinstance(result, dict) else [dataclasses.asdict(v) for v in result.logs]
    return [
        {"file": v["file"], "passed": v["passed"],
         "time_to_train_min": None if v["time_to_train_min"] is None else round(v["time_to_train_min"], 2),
         "epochs": v["epochs"], "accuracy": v["accuracy"], "status": v["status"], "reason": v["reason"]}
        for v in logs
    ]


def render_markdown(r: ComplianceResult) -> str:
    L = [f"# MLPerf compliance: `{r.logdir}`", "",
         f"- ruleset: training {r.ruleset} (mlperf-logging, official checkers)",
         f"- data: {r.dataset}",
         f"- every log passes: **{'yes' if r.logs_passed else 'no'}**",
         f"- set verdict: **{'PASS' if r.set_passed else 'FAIL'}** — {r.set_reason}",
         f"- set time-to-train (olympic mean): {_fmt(r.set_time_to_train_min)} min", "",
         "| log | passed | time-to-train (min) | epochs | accuracy | status | reason |",
         "|---|---|---|---|---|---|---|"]
    for v in r.logs:
        L.append(f"| {v.file} | {'yes' if v.passed else 'NO'} | {_fmt(v.time_to_train_min)} | {_fmt(v.epochs)} | "
                 f"{_fmt(v.accuracy, 4)} | {v.status} | {v.reason.replace('|', '/')} |")
    rcp = r.rcp
    L += ["", "## RCP check", "",
          f"- {'applicable' if rcp['applicable'] else 'not applicable'}; version {rcp['version'] or '-'}; "
          f"passed: {_fmt(rcp['passed'])}", f"- {rcp['reason']}"]
    p = r.package
    L += ["", "## Submission package", ""]
    if p.get("generated"):
        L += [f"- layout: `{p['path']}` (results/{p['system']}/{BENCHMARK}/result_0..4.txt, systems/{p['system']}.json;"
              f" system config `{p['system_config']}`)",
              f"- package checker: **{'PASS' if p['passed'] else 'FAIL' if p['passed'] is False else 'no verdict'}** — "
              f"{p['reason']}",
              f"- result summarizer: {_fmt(p['summarizer_time_to_train_min'], 4)} min "
              f"(RCP scaling factor {_fmt(p['rcp_scaling_factor'], 4)}); "
              f"ours {_fmt(r.set_time_to_train_min, 4)} min; agree: {_fmt(p['summarizer_agrees'])}"]
    else:
        L.append(f"- {p.get('reason', 'not generated')}")
    h = r.health or {}
    L += ["", "## Cluster health", "", f"- {h['verdict']} (health.md, health.png)" if "verdict" in h else
          f"- no health report: {h.get('error', 'not made')}"]
    L += ["", "## Full tool output", ""]
    runs = [(v.file, v.checker.to_dict()) for v in r.logs]
    if rcp.get("run"):
        runs.append(("RCP", rcp["run"]))
    if p.get("generated"):
        runs += [("package", p["checker"]), ("package", p["summarizer"])]
    for label, t in runs:
        L += [f"### {t['tool']} — {label} (exit {t['exit_code']})", "", f"`{' '.join(t['command'])}`", "", "```",
              t["output"].rstrip(), "```", ""]
    return "\n".join(L) + "\n"


# --- CLI ------------------------------------------------------------------------------------------


def add_command(subparsers) -> None:
    p = subparsers.add_parser("check", help="judge MLPerf result logs with the official mlperf-logging checkers",
                              description="Judge the MLPerf ResNet-50 result logs in LOGDIR with the official "
                                          "mlperf-logging tools: each log against the ruleset, the set rule (5 runs, "
                                          "olympic mean), the RCPs where they apply, and the submission package. "
                                          "Writes report.md and report.json.")
    p.add_argument("logdir", help="directory holding result_*.txt")
    p.add_argument("--ruleset", default=DEFAULT_RULESET, help=f"training ruleset (default {DEFAULT_RULESET}, the newest with resnet)")
    p.add_argument("--dataset", default="auto", choices=["auto", "imagenet", "synthetic"],
                   help="what the runs trained on; RCPs apply to imagenet only (auto: from train/eval_samples)")
    p.add_argument("--system", default=None, help="system description: name in configs/systems/ or a .yaml path")
    p.add_argument("--out", default=None, help="report directory (default WORKDIR/compliance/<run-id>)")
    p.add_argument("--rcp-version", default=None, help="RCP table version (default: the ruleset's, if it has one)")
    p.add_argument("--slow-host-threshold", type=float, default=health.SLOW_HOST_THRESHOLD,
                   help="the health report names a host this far below the hosts' median img/s (default %(default)s)")
    p.add_argument("--gate", nargs="?", const="flow", choices=GATES, default="set",
                   help="exit 1 with the one-line reason unless the runs pass: bare --gate (= flow) is the rn50 "
                        "flow's compliance gate (every log passes and converged; the MLPerf set rule for 5 runs); "
                        "set: the MLPerf set rule (the default); logs: every log passes the checker")
    p.add_argument("--json", action="store_true", help="print the verdict as one JSON object")
    p.set_defaults(run=_run)


def _run(args) -> int:
    r = check(args.logdir, ruleset=args.ruleset, dataset=args.dataset, system=args.system, out_dir=args.out,
              rcp_version=args.rcp_version, slow_host_threshold=args.slow_host_threshold)
    if args.json:
        print(json.dumps(r.cli_json()))
    else:
        for v in r.logs:
            print(f"{v.file}: {'PASS' if v.passed else 'FAIL'}  ttt={_fmt(v.time_to_train_min)} min  "
                  f"epochs={_fmt(v.epochs)}  status={v.status}  {'' if v.passed else v.reason}".rstrip())
        print(f"set: {'PASS' if r.set_passed else 'FAIL'}  ttt={_fmt(r.set_time_to_train_min)} min  ({r.set_reason})")
        print(f"RCP: {r.rcp['reason']}")
        if r.package.get("generated"):
            print(f"package checker: {'PASS' if r.package['passed'] else 'FAIL'} ({r.package['reason']})")
        print(f"report: {r.report_md}")
        if r.health:
            print(f"health: {r.health.get('verdict') or 'no report: ' + r.health.get('error', '')}")
    reason = gate(r, args.gate)
    if reason:
        print(f"rn50 check: gate {args.gate} failed: {reason}", file=sys.stderr)
    return 1 if reason else 0
