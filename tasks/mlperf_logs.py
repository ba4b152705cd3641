"""MLPerf result logs: find them in a run directory and read them with mlperf-logging's own parser.

One reader for the stages that judge finished runs: compliance (run_start/run_stop, the last eval
before run_stop, submission fields) and nightly (the eval-accuracy curve, seed, logged setup). The
parser is the one the official compliance checker and result summarizer use, so what the stages read
is what the tools judge. (The live epoch table in flows/stages.py keeps its own light line scan: it
reads logs while they are still being written, which this parser is not meant for.)

  result_files(logdir)   runs/<run-id>/result_<n>.txt in run order (result_2 before result_10)
  parse(path, ruleset)   the parser's log lines; raises whatever the parser raises
  load(path, ruleset)    the same, or a one-line StageError (missing, not an MLPerf log, no :::MLLOG lines)
  summarize(lines)       LogSummary: run_start/run_stop (ms), status, evals up to run_stop, seed, values
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
from pathlib import Path
from typing import Any, Iterable

from tasks.common import StageError

PARSE_RULESET = "4.0.0"  # every training ruleset's parser reads the same `:::MLLOG {json}` lines
# Logged values worth keeping (the first occurrence of each): submission fields and the run's setup.
VALUE_KEYS = ("submission_org", "submission_division", "submission_status", "submission_platform",
              "submission_benchmark", "global_batch_size", "train_samples", "eval_samples", "opt_name")


@dataclasses.dataclass
class LogSummary:
    run_start: float | None  # ms
    run_stop: float | None  # ms, the first run_stop
    status: str  # run_stop's status, "no status" when it has none, "no run_stop" before one is logged
    evals: list[tuple[Any, Any]]  # (epoch_num, value) of every eval_accuracy before run_stop, in log order
    seed: int | None  # the first numeric seed
    values: dict[str, Any]  # VALUE_KEYS as first logged

    @property
    def stopped(self) -> bool:
        return self.run_stop is not None

    @property
    def last_eval(self) -> tuple[Any, Any]:
        """(epoch_num, accuracy) of the last evaluation before run_stop; (None, None) without one."""
        return self.evals[-1] if self.evals else (None, None)


def result_files(logdir: str | os.PathLike) -> list[Path]:
    """LOGDIR/result_*.txt, in run order."""
    def idx(p: Path) -> tuple[int, str]:
        m = re.match(r"result_(\d+)\.txt$", p.name)
        return (int(m.group(1)) if m else 1 << 30, p.name)

    return sorted((Path(p) for p in glob.glob(str(Path(logdir) / "result_*.txt"))), key=idx)


def parse(path: str | os.PathLike, ruleset: str = PARSE_RULESET) -> list[Any]:
    """mlperf-logging's parser on one file: its LogLines (lines it cannot read are left out)."""
    from mlperf_logging.compliance_checker.mlp_parser import parse_file

    lines, _failed = parse_file(str(path), ruleset=ruleset)
    return lines


def load(path: str | os.PathLike, ruleset: str = PARSE_RULESET) -> list[Any]:
    """parse(), with a one-line StageError for a missing file, an unparseable one or one without lines."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"result log {path} does not exist")
    try:
        lines = parse(path, ruleset)
    except Exception as e:  # the parser raises json errors etc. on a mangled line
        raise StageError(f"result log {path} is not an MLPerf log: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not lines:
        raise StageError(f"result log {path} has no :::MLLOG lines")
    return lines


def summarize(lines: Iterable[Any]) -> LogSummary:
    """The facts of one run from its parsed lines (see LogSummary)."""
    s = LogSummary(run_start=None, run_stop=None, status="no run_stop", evals=[], seed=None, values={})
    for ll in lines:
        v = ll.value if isinstance(ll.value, dict) else {}
        md = v.get("metadata") or {}
        if ll.key == "run_start" and s.run_start is None:
            s.run_start = float(ll.timestamp)
        elif ll.key == "run_stop" and s.run_stop is None:
            s.run_stop = float(ll.timestamp)
            s.status = str(md.get("status", "no status"))
        elif ll.key == "eval_accuracy" and s.run_stop is None:
            s.evals.append((md.get("epoch_num"), v.get("value")))
        elif ll.key == "seed" and s.seed is None and isinstance(v.get("value"), (int, float)):
            s.seed = int(v["value"])
        if ll.key in VALUE_KEYS:
            s.values.setdefault(ll.key, v.get("value"))
    return s
