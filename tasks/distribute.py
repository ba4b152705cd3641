"""Distribute stage (`rn50 distribute WORKDIR --hosts FILE`): the work dir's recordio/ onto every host's node-local
`data_dir`, each copy proven by its full md5, between `pack` (or `container`) and `train`.

Where the data lives is the hosts file's business: `data_dir` (where the ranks read recordio/; default the work
dir's own) and `data_local` (false, the default: data_dir is on a file system the hosts share, so there is one copy
and nothing to distribute; true: each host has its own copy there). The launcher backend does the copying
(tasks.launch, `distribute`): the ssh backend streams over its pinned SSH trust, resumable and verified; the slurm
backend stages inside the training job (its first srun step), since node-local disks are often wiped between jobs
and the next job may get other nodes, so this stage only reads the source's digests for it and says so.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

from tasks import launch
from tasks.common import Result, StageError, Workdir

log = logging.getLogger(__name__)

DEFAULT_PARALLEL = 4  # hosts copied at once: each stream is one ssh process and one reader of the source


@dataclasses.dataclass
class DistributeResult(Result):
    skipped: bool
    reason: str  # why skipped, or a one-line summary
    launcher: str | None
    data_dir: str | None
    hosts: list[dict[str, Any]]  # per host: host, action (copied | verified | in-job), bytes_sent, seconds, files
    bytes_sent: int
    source_md5: dict[str, str]
    duration_s: float


def _nothing_to_copy(wd: Workdir, launcher: Any) -> str | None:
    if launcher is None:
        return f"no hosts file: the ranks read {wd.recordio} on this machine"
    if not launcher.data_dir:
        return f"data_dir is unset: the ranks read the work dir's {wd.recordio}"
    if not launcher.data_local:
        return (f"data_local is false: {launcher.data_dir} is on a file system the hosts share "
                "(set data_local: true in the hosts file when it is on each host's own disk)")
    return None


def skip_reason(workdir: Path | str, hosts: Path | str | None) -> str | None:
    """Why the hosts file leaves nothing to distribute (the flow shows the stage as Skipped), or None."""
    return _nothing_to_copy(Workdir(workdir), None if hosts is None else launch.load(hosts))


def distribute(workdir: Path | str, hosts: Path | str | Any = None,
               progress: Callable[[str, int, int], None] | None = None,
               parallel: int = DEFAULT_PARALLEL) -> DistributeResult:
    """Put WORKDIR/recordio onto the data_dir of every host the hosts file names, when it says data_local: true.

    `progress(host, bytes_done, bytes_total)` is called as the bytes of each host's copy go out."""
    t0 = time.monotonic()
    wd = Workdir(workdir)
    if parallel < 1:
        raise StageError(f"--parallel must be >= 1, not {parallel}")

    def skipped(reason: str, launcher: Any = None) -> DistributeResult:
        log.info("distribute: skipped: %s", reason)
        return DistributeResult(True, reason, getattr(launcher, "name", None), getattr(launcher, "data_dir", None),
                                [], 0, {}, round(time.monotonic() - t0, 3))

    launcher = None if hosts is None else launch.load(hosts)
    why = _nothing_to_copy(wd, launcher)
    if why:
        return skipped(why, launcher)
    expected = launch.source_digests(wd.recordio)
    records = launcher.distribute(wd.recordio, wd.root, expected, progress, parallel)
    md5 = {n: e["md5"] for n, e in sorted(expected.items())}
    if records and all(r["action"] == "in-job" for r in records):
        return dataclasses.replace(skipped(records[0]["reason"], launcher), source_md5=md5)
    sent = sum(r["bytes_sent"] for r in records)
    copied = [r["host"] for r in records if r["action"] == "copied"]
    reason = (f"{len(records)} host(s): copied to {', '.join(copied)} ({sent} bytes)" if copied
              else f"{len(records)} host(s) already hold verified copies")
    for r in records:
        log.info("distribute: %s: %s, %d bytes sent in %.1f s", r["host"], r["action"], r["bytes_sent"], r["seconds"])
    return DistributeResult(False, reason, launcher.name, launcher.data_dir, records, sent, md5,
                            round(time.monotonic() - t0, 3))


# --- CLI ---------------------------------------------------------------------------------------------


DESCRIPTION = """\
Distribute: copy WORKDIR/recordio to the data directory on every host's own disk, when the hosts file says the
data is local to each host; several hosts at once, each copy written under a temporary name, resumed where a cut
copy stopped, proven by its full MD5 on the host, then renamed. A host whose copy is already verified is passed in
seconds. Nothing is copied when the hosts share one file system for the data. On a Slurm cluster the training job
copies the data onto its own nodes first, so this only computes the digests of the source."""


def add_command(subparsers) -> None:
    p = subparsers.add_parser("distribute", help="copy the packed data onto every host's node-local data_dir",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir", type=Path)
    p.add_argument("--hosts", type=Path, required=True, help="hosts file (YAML) of the cluster, SSH hosts or Slurm")
    p.add_argument("--parallel", type=int, default=DEFAULT_PARALLEL, help="hosts copied at once")
    p.set_defaults(run=_cli)


def _cli(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    res = distribute(args.workdir, hosts=args.hosts, parallel=args.parallel)
    print(res.to_json())
    return 0
