"""The `slurm` backend: `launcher: slurm` in the hosts file; one batch job runs the set's runs, ranks started by
`srun` inside it, no SSH between nodes.

Hosts file:

    launcher: slurm
    slurm:
      partition: debug          # required
      nodes: 2                  # required
      ntasks_per_node: 8        # ranks per node (= GPUs per node on a GPU cluster); nodes x this must be
                                # the config's global_batch_size / batch_size (else refused)
      time: "01:00:00"          # job time limit; must cover runs x the stage timeout
      max_pending: "01:00:00"   # longest queue wait (Slurm time); then the job is cancelled, naming Slurm's reason
      account: null
      exclusive: true           # --exclusive (the default: a timed run shares no node)
      gpus_per_node: null       # set -> --gpus-per-node=N and a preflight check of the nodes' gres
      extra_args: []            # more sbatch options from SBATCH_OPTIONS only, each one `--name=value` element
      container_image: null     # set -> srun --container-image (Pyxis/Enroot); default: the image the
                                # container stage built when one is given
      container_mounts: []      # extra SRC:DST mounts; the data dir and the work dir are always mounted
      mpi: none                 # none: Gloo rendezvous from SLURM_* (below); pmix|pmi2: MPI-built Horovod
    data_dir: /lustre/imagenet/recordio   # recordio as seen by the nodes (default WORKDIR/recordio)
    data_local: false           # true: data_dir is node-local (e.g. /raid); the job stages recordio there first
    python: null                # interpreter on the nodes (default: this one; `python` in a container)
    interface: null             # HOROVOD_GLOO_IFACE / NCCL_SOCKET_IFNAME
    env_profile: cpu            # configs/env/<profile>.env (gpu when a container image is used), or a path
    env: {}

Design choices
- One batch job for the N runs of a set, not one job per run: one queue wait, and the N timed runs of a
  submission set run back to back on the same exclusively held nodes, as NVIDIA's `run.sub` runs its NEXP
  experiments in one allocation. The price: the time limit must cover all N runs (checked before submitting),
  and a failed run ends the job (later runs are not started).
- sbatch options are data: the launcher decides partition, nodes, tasks, time, output, working directory and
  environment; `extra_args` may only add options of SBATCH_OPTIONS, spelled in full (sbatch also reads an
  unambiguous prefix such as `--exp` as `--export`: only exact names are accepted), and `--export=NONE` is the
  last option, so the job never sees the worker's environment.
- Rendezvous: Horovod's Gloo rendezvous driven from SLURM_* variables, in a static bash prelude each rank runs
  before the rank program: HOROVOD_RANK/SIZE/LOCAL_RANK/CROSS_RANK/... come from SLURM_PROCID/NTASKS/LOCALID/
  NODEID/NNODES; rank 0 starts Horovod's own RendezvousServer (the HTTP KV store horovodrun runs) in the
  background on the launch node, bound to SLURM_LAUNCH_NODE_IPADDR, and publishes its port in the run directory,
  which every node shares anyway. This needs nothing but Horovod with Gloo, so the CPU test path (Debian Slurm,
  no PMIx library) and a GPU cluster run the same code; NCCL still carries the GPU allreduces. `mpi: pmix`
  switches to `srun --mpi=pmix` and HOROVOD_CONTROLLER=mpi (the NGC way); the prelude then only execs the rank.
- Ranks: `srun --kill-on-bad-exit=1 [--container-image ...] bash -c PRELUDE ... RANK ARGV`; srun writes each
  task's output to rank<r>_<n>.log, the batch script's own to slurm-job.log. The batch script is generated with
  every value shlex-quoted and exports the ranks' environment (tasks.launch.rank_environment).
- Preflight: what slurmctld tells (`scontrol show partition/node`: state, nodes, CPUs, GPUs, time limits), then
  a one-task-per-node probe job in the ranks' environment and container that checks the data dir from the
  compute nodes and, for a GPU config, the GPUs, the driver and hvd.nccl_built(); every failure one line.
- Watching: `scontrol show job` every poll_s; a job PENDING longer than max_pending is cancelled (the run holds
  the cluster slot while it waits); a RUNNING job is bounded by runs x the stage timeout. The job id is
  recorded (events.handle) and `scancel JOBID` registered with the stage's tether (events.on_death), so a
  kill -9 of the launcher leaves no job behind.
"""
from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from tasks import launch as contract
from tasks import rank_logs
from tasks.common import StageError, write_text_atomic
from tasks.inventory import data_local
from tasks.launch.probe import gpu_probe_script, gpu_problems

TERMINAL = {"COMPLETED", "FAILED", "TIMEOUT", "NODE_FAIL", "CANCELLED", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}
DEFAULT_POLL_S = 5.0
DEFAULT_MAX_PENDING = "01:00:00"
CANCEL_WAIT_S = 30.0
PROBE_TIMEOUT_S = 300.0
STD_PATH = contract.STD_PATH
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
# The sbatch options `extra_args` may add: none of them changes what the launcher decided (partition, nodes,
# tasks, time, output, working directory, environment, user, array, hold, script). Anything else — any other
# option, a prefix, a short option — is refused.
SBATCH_OPTIONS = frozenset({
    "--acctg-freq", "--begin", "--comment", "--constraint", "--core-spec", "--cores-per-socket", "--cpu-freq",
    "--cpus-per-task", "--deadline", "--exclude", "--gpu-bind", "--gpu-freq", "--gpus-per-task", "--gres",
    "--gres-flags", "--hint", "--licenses", "--mail-type", "--mail-user", "--mcs-label", "--mem", "--mem-bind",
    "--mem-per-cpu", "--mem-per-gpu", "--network", "--nice", "--nodelist", "--prefer", "--priority", "--profile",
    "--qos", "--reservation", "--signal", "--sockets-per-node", "--spread-job", "--switches", "--thread-spec",
    "--threads-per-core", "--tmp", "--wckey",
})
_OPTION = re.compile(r"(--[a-z][a-z-]*)(?:=([^\x00-\x1f\x7f]*))?")


@dataclasses.dataclass(frozen=True)
class SlurmSpec:
    partition: str
    nodes: int
    ntasks_per_node: int = 1
    time: str = "01:00:00"
    account: str | None = None
    exclusive: bool = True
    gpus_per_node: int | None = None
    extra_args: tuple[str, ...] = ()
    container_image: str | None = None
    container_mounts: tuple[str, ...] = ()
    mpi: str = "none"  # none | pmix | pmi2
    data_dir: str | None = None
    data_local: bool = False  # stage WORKDIR/recordio to data_dir on each node, in the job, before the runs
    python: str | None = None
    interface: str | None = None
    env_profile: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    poll_s: float = DEFAULT_POLL_S
    max_pending: str = DEFAULT_MAX_PENDING

    @property
    def ntasks(self) -> int:
        return self.nodes * self.ntasks_per_node

    @property
    def time_s(self) -> float:
        return parse_time(self.time)

    @property
    def max_pending_s(self) -> float:
        return parse_time(self.max_pending)


# --- the hosts file ------------------------------------------------------------------------------------


def parse_time(value: str) -> float:
    """Slurm's time formats (min, min:s, h:min:s, d-h, d-h:min, d-h:min:s) in seconds; UNLIMITED = inf."""
    v = str(value).strip()
    if v.upper() in ("UNLIMITED", "INFINITE"):
        return float("inf")
    m = _TIME.match(v)
    if not m:
        raise ValueError(v)
    d, a, b, c = m.groups()
    if d is not None:  # d-h[:min[:s]]
        return int(d) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    if c is not None:  # h:min:s
        return int(a) * 3600 + int(b) * 60 + int(c)
    if b is not None:  # min:s
        return int(a) * 60 + int(b)
    return int(a) * 60  # min


def _fmt_s(s: float) -> str:
    s = int(s)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _int(doc: dict, key: str, source: str, default: int | None = None, minimum: int = 1) -> int | None:
    v = doc.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise StageError(f"{source}: slurm.{key} must be an integer >= {minimum}, not {v!r}")
    return v


def _str(v: Any, what: str, source: str, pattern: re.Pattern | None = _NAME) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not v or "\n" in v or "\0" in v or (pattern and not pattern.match(v)):
        raise StageError(f"{source}: {what} {v!r} is not a valid value")
    return v


def _time(s: dict, key: str, default: str, source: str) -> str:
    value = str(s.get(key, default))
    try:
        if parse_time(value) <= 0:
            raise ValueError(value)
    except ValueError:
        raise StageError(f"{source}: slurm.{key} {value[:40]!r} is not a Slurm time (e.g. 90, 01:30:00, "
                         "1-00:00:00)") from None
    return value


def check_extra_args(value: Any, source: str) -> tuple[str, ...]:
    """Each element one `--name` or `--name=value` with `name` spelled in full from SBATCH_OPTIONS."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise StageError(f"{source}: slurm.extra_args must be a list of sbatch options (`--name=value` strings)")
    for a in value:
        m = _OPTION.fullmatch(a)
        if not m or m.group(1) not in SBATCH_OPTIONS:
            raise StageError(f"{source}: slurm.extra_args: {a[:60]!r} is not one of the sbatch options it may add "
                             "(spelled in full, as --name=value); the launcher sets partition, nodes, tasks, time, "
                             "output, chdir and --export=NONE itself")
    return tuple(value)


def parse(doc: Any, source: str = "hosts file") -> SlurmSpec:
    """Validate a `launcher: slurm` hosts file as data; every error is one line naming the key."""
    if not isinstance(doc, dict) or doc.get("launcher") != "slurm":
        raise StageError(f"{source}: not a `launcher: slurm` hosts file")
    known = {"launcher", "slurm", "data_dir", "data_local", "python", "interface", "env_profile", "env", "runtime"}
    extra = set(doc) - known
    if extra:
        raise StageError(f"{source}: unknown key(s) {sorted(map(str, extra))} for launcher: slurm (hosts come from Slurm)")
    s = doc.get("slurm")
    if not isinstance(s, dict):
        raise StageError(f"{source}: launcher: slurm needs a `slurm:` mapping with at least partition and nodes")
    skeys = {"partition", "nodes", "ntasks_per_node", "time", "account", "exclusive", "gpus_per_node",
             "extra_args", "container_image", "container_mounts", "mpi", "poll_s", "max_pending"}
    extra = set(s) - skeys
    if extra:
        raise StageError(f"{source}: unknown slurm key(s) {sorted(map(str, extra))}")
    for req in ("partition", "nodes"):
        if s.get(req) is None:
            raise StageError(f"{source}: slurm.{req} is required")
    exclusive = s.get("exclusive", True)
    if not isinstance(exclusive, bool):
        raise StageError(f"{source}: slurm.exclusive must be true or false")
    mounts = s.get("container_mounts") or []
    if not isinstance(mounts, list) or not all(isinstance(m, str) and ":" in m and "," not in m and "\n" not in m
                                               and "\0" not in m for m in mounts):
        raise StageError(f"{source}: slurm.container_mounts must be a list of SRC:DST[:FLAGS] strings")
    mpi = s.get("mpi", "none")
    if mpi not in ("none", "pmix", "pmi2"):
        raise StageError(f"{source}: slurm.mpi must be none, pmix or pmi2, not {mpi!r}")
    poll = s.get("poll_s", DEFAULT_POLL_S)
    if isinstance(poll, bool) or not isinstance(poll, (int, float)) or not 0.1 <= poll <= 300:
        raise StageError(f"{source}: slurm.poll_s must be a number of seconds between 0.1 and 300")
    data_dir = doc.get("data_dir")
    if data_dir is not None and (not isinstance(data_dir, str) or not data_dir.startswith("/")
                                 or re.search(r"[\x00-\x1f\x7f]", data_dir)):
        raise StageError(f"{source}: data_dir must be an absolute path on the nodes")
    # No env_profile: the stage picks gpu when the ranks run in an image, else cpu.
    profile = doc.get("env_profile")
    return SlurmSpec(
        partition=_str(s["partition"], "slurm.partition", source), nodes=_int(s, "nodes", source),
        ntasks_per_node=_int(s, "ntasks_per_node", source, 1), time=_time(s, "time", "01:00:00", source),
        max_pending=_time(s, "max_pending", DEFAULT_MAX_PENDING, source),
        account=_str(s.get("account"), "slurm.account", source),
        exclusive=exclusive, gpus_per_node=_int(s, "gpus_per_node", source, None),
        extra_args=check_extra_args(s.get("extra_args"), source),
        container_image=_str(s.get("container_image"), "slurm.container_image", source,
                             re.compile(r"^[^\s'\"\\]+$")),
        container_mounts=tuple(mounts), mpi=mpi, data_dir=data_dir, data_local=data_local(doc, source),
        python=_str(doc.get("python"), "python", source, re.compile(r"^[^\s'\"\\]+$")),
        interface=_str(doc.get("interface"), "interface", source),
        env_profile=None if profile is None else contract.check_env_profile(profile, source),
        env=contract.check_env(doc.get("env"), source), poll_s=float(poll),
    )


# --- talking to Slurm ------------------------------------------------------------------------------------


def _slurm(argv: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise StageError(f"`{argv[0]}` is not installed on the launcher (Debian: slurm-client)") from None
    except subprocess.TimeoutExpired:
        raise StageError(f"`{' '.join(argv[:3])}` got no answer from slurmctld within {timeout:.0f} s") from None


def _kv(line: str) -> dict[str, str]:
    """`scontrol -o` output: space-separated Key=Value (values without spaces for the keys we read)."""
    out = {}
    for tok in line.split():
        k, sep, v = tok.partition("=")
        if sep:
            out[k] = v
    return out


def _err(proc: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit {proc.returncode}"


def job_info(job_id: str) -> dict[str, str] | None:
    """scontrol's view of the job, or None when slurmctld no longer knows it (after MinJobAge)."""
    p = _slurm(["scontrol", "show", "job", "-o", job_id])
    if p.returncode != 0:
        if "Invalid job id" in p.stderr:
            return None
        raise StageError(f"scontrol show job {job_id}: {_err(p)}")
    return _kv(p.stdout.splitlines()[0]) if p.stdout.strip() else None


def hostnames(nodelist: str) -> list[str]:
    if not nodelist or nodelist in ("(null)", "None"):
        return []
    p = _slurm(["scontrol", "show", "hostnames", nodelist])
    return p.stdout.split() if p.returncode == 0 else [nodelist]


def scancel(job_id: str, wait_s: float = CANCEL_WAIT_S) -> str | None:
    """Cancel the job and wait (bounded) until slurmctld reports it ended; returns the last state seen."""
    _slurm(["scancel", job_id])
    deadline = time.monotonic() + wait_s
    state = None
    while time.monotonic() < deadline:
        info = job_info(job_id)
        if info is None:
            return state
        state = info.get("JobState")
        if state in TERMINAL:
            return state
        time.sleep(0.5)
    return state


# --- preflight ------------------------------------------------------------------------------------------


def _gpus(gres: str) -> int:
    """GPUs in a node's Gres string, e.g. `gpu:8`, `gpu:a100:8(S:0-1)`, `gpu:a100:4,gpu:v100:4`."""
    n = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and parts[-1].isdigit():
            n += int(parts[-1])
    return n


def check_scheduler(spec: SlurmSpec, timeout_s: float, runs: int) -> list[str]:
    """What slurmctld can tell without running anything: partition, nodes, CPUs, GPUs, time limits."""
    errors: list[str] = []
    p = _slurm(["scontrol", "show", "partition", "-o", spec.partition])
    if p.returncode != 0 or not p.stdout.strip():
        why = _err(p)
        if "not found" in why.lower() or not p.stdout.strip():
            return [f"partition {spec.partition!r} does not exist"]
        return [f"scontrol show partition {spec.partition}: {why}"]
    part = _kv(p.stdout.splitlines()[0])
    if part.get("State") != "UP":
        errors.append(f"partition {spec.partition} is {part.get('State', '?')}, not UP")
    max_nodes = part.get("MaxNodes", "UNLIMITED")
    if max_nodes.isdigit() and int(max_nodes) < spec.nodes:
        errors.append(f"partition {spec.partition} allows at most {max_nodes} nodes per job; slurm.nodes is {spec.nodes}")
    q = _slurm(["scontrol", "show", "node", "-o"])
    nodes = [_kv(ln) for ln in q.stdout.splitlines() if ln.strip()] if q.returncode == 0 else []
    members = [n for n in nodes if spec.partition in n.get("Partitions", "").split(",")]
    bad_state = ("DOWN", "DRAIN", "FAIL", "NOT_RESPONDING", "FUTURE", "POWERED_DOWN", "INVALID")
    usable = [n for n in members if not any(b in n.get("State", "") for b in bad_state)]
    cpus_needed = spec.ntasks_per_node
    fit = [n for n in usable if int(n.get("CPUTot", "0") or 0) >= cpus_needed
           and (not spec.gpus_per_node or _gpus(n.get("Gres", "")) >= spec.gpus_per_node)]
    if len(members) < spec.nodes:
        errors.append(f"partition {spec.partition} has {len(members)} node(s); slurm.nodes is {spec.nodes}")
    elif len(fit) < spec.nodes:
        what = f"{cpus_needed} CPUs" + (f" and {spec.gpus_per_node} GPUs" if spec.gpus_per_node else "")
        errors.append(f"partition {spec.partition}: only {len(fit)} of {len(members)} node(s) are up with {what} "
                      f"(ntasks_per_node={spec.ntasks_per_node}); slurm.nodes is {spec.nodes}")
    need = runs * timeout_s
    if spec.time_s < need:
        errors.append(f"slurm.time {spec.time} is shorter than {runs} run(s) x the {_fmt_s(timeout_s)} timeout "
                      f"({_fmt_s(need)}); raise slurm.time or lower the timeout")
    max_time = part.get("MaxTime", "UNLIMITED")
    try:
        if parse_time(max_time) < spec.time_s:
            errors.append(f"partition {spec.partition}'s MaxTime {max_time} is shorter than slurm.time {spec.time}")
    except ValueError:
        pass
    return errors


# The probe each node runs: the recordio files must be readable there (size printed for comparison); with a
# GPU script (tasks.launch.probe, GPU configs only) also the GPUs, the driver and Horovod's NCCL.
_PROBE = r'''d=$1 gpu=$2; shift 2; h=$(hostname)
for f in "$@"; do
  if [ -r "$d/$f" ] && head -c 1 "$d/$f" >/dev/null 2>&1; then echo "rn50-probe $h ok $f $(stat -c %s "$d/$f")"
  else echo "rn50-probe $h missing $f"; fi
done
if [ -n "$gpu" ]; then
  sh -c "$gpu" | while IFS= read -r line; do echo "rn50-probe $h gpu $line"; done
fi'''


def probe_data(spec: SlurmSpec, data_dir: str, expected: dict[str, dict[str, Any]], job_dir: Path,
               image: str | None, timeout_s: float = PROBE_TIMEOUT_S, env: dict[str, str] | None = None,
               gpu_python: str | None = None) -> list[str]:
    """A short job, one task per node, in the ranks' environment `env` (and container), that checks the data
    dir from the compute nodes; with `gpu_python` (a GPU config) also GPUs >= ntasks_per_node, a working
    driver and hvd.nccl_built() in that interpreter, one line per failing node."""
    out = job_dir / "probe.log"
    gpu = gpu_probe_script(gpu_python) if gpu_python else ""
    step = ["srun", "--ntasks-per-node=1", *_container_args(spec, image, data_dir, None), "sh", "-c", _PROBE,
            "rn50-probe", data_dir, gpu, *contract.RECORDIO_FILES]
    exports = [f"export {k}={shlex.quote(v)}" for k, v in sorted((env or {"PATH": contract.STD_PATH}).items())
               if contract.ENV_KEY_RE.fullmatch(k)]
    script = "\n".join(["#!/bin/bash", "set -u", *exports, "export SLURM_EXPORT_ENV=ALL", shlex.join(step)]) + "\n"
    path = write_text_atomic(job_dir / "probe.sh", script)
    argv = _sbatch_argv(spec, "rn50-probe", out, job_dir, minutes=max(1, int(timeout_s // 60)), probe=True)
    job_id = _submit(argv + [str(path)])
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            info = job_info(job_id)
            state = info.get("JobState") if info else "GONE"
            if state in TERMINAL or state == "GONE":
                break
            if time.monotonic() > deadline:
                scancel(job_id)
                return [f"the data probe job {job_id} did not finish within {timeout_s:.0f} s (state {state})"]
            time.sleep(min(spec.poll_s, 1.0))
    except BaseException:
        scancel(job_id)
        raise
    text = out.read_text(errors="replace") if out.exists() else ""
    errors, seen = [], set()
    gpu_facts: dict[str, dict[str, str]] = {}
    for ln in text.splitlines():
        parts = ln.split()
        if len(parts) >= 4 and parts[0] == "rn50-probe":
            host, verdict, name = parts[1], parts[2], parts[3]
            seen.add(host)
            if verdict == "gpu":
                gpu_facts.setdefault(host, {})[name] = ln.split(None, 4)[4].strip() if len(parts) > 4 else ""
            elif verdict == "missing":
                errors.append(f"node {host}: {data_dir}/{name} is missing or unreadable")
            elif name in expected and len(parts) >= 5 and int(parts[4]) != expected[name]["size"]:
                errors.append(f"node {host}: {data_dir}/{name} has {parts[4]} bytes, expected {expected[name]['size']}")
    if gpu_python:
        for host in sorted(seen):
            problems = gpu_problems(gpu_facts.get(host, {}), spec.ntasks_per_node, gpu_python)
            if problems:  # one clause per node for all its GPU problems
                errors.append(f"node {host}: GPU preflight: " + ", ".join(problems))
    if not seen:
        tail = [ln.strip() for ln in text.splitlines() if ln.strip()]
        errors.append(f"the data probe job {job_id} ended {state} without output"
                      + (f": {tail[-1][:200]}" if tail else f" (is {job_dir} on a file system the nodes share?)"))
    return errors


# --- the batch job -------------------------------------------------------------------------------------


# Run by rank 0 (in the background, in the ranks' interpreter and container): Horovod's own rendezvous
# server (what horovodrun runs), bound to the launch node's address; scope sizes from the uniform layout.
RDZV_PY = r'''
import os, sys, threading, time
from horovod.runner.http.http_server import RendezvousHTTPServer, RendezvousHandler
path, addr = sys.argv[1], sys.argv[2]
size, local_size, nnodes = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
class Sizes(dict):
    def __contains__(self, k):
        return k == "global" or k.startswith(("local_", "cross_"))
    def __getitem__(self, k):
        return size if k == "global" else local_size if k.startswith("local_") else nnodes
srv = RendezvousHTTPServer((addr, 0), RendezvousHandler, 0)
srv.scope_size = Sizes()
threading.Thread(target=srv.serve_forever, daemon=True).start()
with open(path + ".tmp", "w") as f:
    f.write("%d\n" % srv.server_address[1])
os.replace(path + ".tmp", path)
parent = os.getppid()
while os.getppid() == parent:
    time.sleep(1)
'''

# Every rank runs this before the rank program: SLURM_* -> HOROVOD_*, then the rendezvous (Gloo) or MPI.
PRELUDE = r'''set -u
rdzv=$1 local_size=$2 mpi=$3 py=$4; shift 4
export HOROVOD_HOSTNAME="$SLURMD_NODENAME" HOROVOD_RANK="$SLURM_PROCID" HOROVOD_SIZE="$SLURM_NTASKS" \
  HOROVOD_LOCAL_RANK="$SLURM_LOCALID" HOROVOD_LOCAL_SIZE="$local_size" \
  HOROVOD_CROSS_RANK="$SLURM_NODEID" HOROVOD_CROSS_SIZE="$SLURM_NNODES"
if [ "$mpi" != none ]; then export HOROVOD_CONTROLLER=mpi HOROVOD_CPU_OPERATIONS=mpi; exec "$@"; fi
export HOROVOD_CONTROLLER=gloo HOROVOD_CPU_OPERATIONS=gloo
server=
if [ "$SLURM_PROCID" = 0 ]; then
  "$py" -c "$RN50_RDZV_PY" "$rdzv" "$SLURM_LAUNCH_NODE_IPADDR" "$SLURM_NTASKS" "$local_size" "$SLURM_NNODES" &
  server=$!
fi
i=0
while [ ! -s "$rdzv" ]; do
  i=$((i + 1))
  if [ $i -gt 1200 ]; then echo "rn50: no rendezvous port in $rdzv after 120 s (is the run dir shared by the nodes?)" >&2; exit 97; fi
  if [ -n "$server" ] && ! kill -0 "$server" 2>/dev/null; then echo "rn50: the rendezvous server on rank 0 died" >&2; exit 98; fi
  sleep 0.1
done
export HOROVOD_GLOO_RENDEZVOUS_ADDR="$SLURM_LAUNCH_NODE_IPADDR" HOROVOD_GLOO_RENDEZVOUS_PORT="$(cat "$rdzv")"
"$@"
rc=$?
[ -n "$server" ] && kill "$server" 2>/dev/null
exit $rc'''


def enroot_image(image: str) -> str:
    """`registry.example:5000/rn50:tag` -> Pyxis/Enroot's `registry.example:5000#rn50:tag`."""
    first, sep, rest = image.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost") and "#" not in image:
        return f"{first}#{rest}"
    return image


def _container_args(spec: SlurmSpec, image: str | None, data_dir: str, workdir: str | None) -> list[str]:
    img = spec.container_image or image
    if not img:
        return []
    mounts = [f"{data_dir}:{data_dir}:ro"] + ([f"{workdir}:{workdir}"] if workdir else []) + list(spec.container_mounts)
    return [f"--container-image={enroot_image(img)}", f"--container-mounts={','.join(mounts)}",
            "--no-container-mount-home", f"--container-workdir={workdir or '/tmp'}"]


def _sbatch_argv(spec: SlurmSpec, name: str, output: Path, chdir: Path, minutes: int | None = None,
                 probe: bool = False) -> list[str]:
    argv = ["sbatch", "--parsable", f"--job-name={name}", f"--partition={spec.partition}",
            f"--nodes={spec.nodes}", f"--output={output}", f"--chdir={chdir}"]
    if probe:
        argv += ["--ntasks-per-node=1", f"--time={minutes}"]
        if spec.gpus_per_node:  # where gres confines devices, a probe without GPUs would see none
            argv.append(f"--gpus-per-node={spec.gpus_per_node}")
    else:
        argv += [f"--ntasks-per-node={spec.ntasks_per_node}", f"--time={spec.time}"]
        if spec.exclusive:
            argv.append("--exclusive")
        if spec.gpus_per_node:
            argv.append(f"--gpus-per-node={spec.gpus_per_node}")
        argv += list(spec.extra_args)
    if spec.account:
        argv.append(f"--account={spec.account}")
    # Last, so that no option before it can undo it: the worker's environment (S3 keys, Prefect auth) stays out.
    return argv + ["--export=NONE"]


def _submit(argv: list[str]) -> str:
    p = _slurm(argv, timeout=60)
    job_id = p.stdout.strip().split(";")[0]
    if p.returncode != 0 or not job_id.isdigit():
        raise StageError(f"sbatch refused the job: {_err(p)}")
    return job_id

# --- the batch job -------------------------------------------------------------------------------------


def batch_script(spec: SlurmSpec, run_dir: Path, job_dir: Path, env: dict[str, str], python: str,
                 rank_argvs: Sequence[Sequence[str]], container: Sequence[str],
                 stage_from: tuple[str, Sequence[str]] | None = None) -> str:
    """The job: export the rank environment, then one srun step per run; stop at the first failed run.
    `stage_from` (data_local): (the shared recordio dir, contract.node_specs) for a first step, one task per node,
    that stages it to data_dir (verified, resumed, skipped where a stamped copy is there), outside any container."""
    q = shlex.quote
    lines = ["#!/bin/bash", f"# generated by rn50 (tasks/launch/slurm.py) for {run_dir.name}", "set -u",
             "export SLURM_EXPORT_ENV=ALL  # sbatch --export=NONE would otherwise reach every srun"]
    lines += [f"export {k}={q(v)}" for k, v in sorted(env.items()) if contract.ENV_KEY_RE.fullmatch(k)]
    lines.append('echo "rn50: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST (batch host $(hostname))"')
    if stage_from is not None:
        src, specs = stage_from
        stage = ["srun", "--kill-on-bad-exit=1", f"--ntasks={spec.nodes}", "--ntasks-per-node=1",
                 f"--output={run_dir}/stage_%N.log", "bash", "-c",
                 contract.NODE_SH + 'echo "rn50-stage: $(hostname): in job $SLURM_JOB_ID"; rn50_stage "$@"',
                 "rn50-stage", src, str(spec.data_dir), *specs]
        lines += [shlex.join(stage), "rc=$?", f"echo $rc > {q(str(job_dir / 'stage.rc'))}",
                  'if [ "$rc" -ne 0 ]; then echo "rn50: staging the data onto the nodes failed (exit $rc)"; '
                  'exit "$rc"; fi']
    step = ["srun", "--kill-on-bad-exit=1", f"--mpi={spec.mpi}", f"--ntasks={spec.ntasks}",
            f"--ntasks-per-node={spec.ntasks_per_node}", "--distribution=block", *container]
    for n, argv in enumerate(rank_argvs):
        rank = [*step, f"--output={run_dir}/rank%t_{n}.log", "bash", "-c", PRELUDE, "rn50-rank",
                str(job_dir / f"rdzv_{n}"), str(spec.ntasks_per_node), spec.mpi, python, *argv]
        lines += [f'echo "rn50: run {n} starts $(date -u +%FT%TZ)"', shlex.join(rank), "rc=$?",
                  f"echo $rc > {q(str(job_dir / f'run_{n}.rc'))}",
                  f'echo "rn50: run {n} ended with exit $rc"',
                  'if [ "$rc" -ne 0 ]; then exit "$rc"; fi']
    return "\n".join(lines) + "\n"


# --- failures: which rank to blame ---------------------------------------------------------------------


_TASK_EXIT = re.compile(r"srun: error: (\S+): tasks? ([\d,\-]+): (Exited with exit code (\d+)|Killed|Terminated|.*)")


def _ranks(spec: str) -> list[int]:
    out = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def first_failure(run_dir: Path, job_log: Path, n: int) -> contract.RankFailure | None:
    """The rank that failed first in run n: the first `srun: error: NODE: task R: ...` line whose rank did not
    merely lose a peer, with its last error line from rank<R>_<n>.log."""
    text = job_log.read_text(errors="replace") if job_log.exists() else ""
    start = text.find(f"rn50: run {n} starts")
    exits: list[tuple[int, str, str | None]] = []
    for ln in text[start if start >= 0 else 0:].splitlines():
        m = _TASK_EXIT.search(ln)
        if m and "Exited with exit code 0" not in ln:
            for r in _ranks(m.group(2)):
                exits.append((r, m.group(1), m.group(3)))
    logs = {}
    for r in {r for r, _, _ in exits} | {int(p.name[4:].split("_")[0]) for p in run_dir.glob(f"rank*_{n}.log")}:
        p = run_dir / f"rank{r}_{n}.log"
        logs[r] = p.read_text(errors="replace").splitlines() if p.exists() else []
    cands = [(r, node, why) for r, node, why in exits if not rank_logs.lost_peer(logs.get(r, []))]
    if not cands:
        # No srun verdict (e.g. scancel): blame a rank that printed an exception of its own.
        cands = [(r, "", None) for r in sorted(logs) if rank_logs.raised(logs[r]) and not rank_logs.lost_peer(logs[r])]
    if not cands and exits:
        cands = exits
    if not cands:
        return None
    r, node, why = cands[0]
    lines = logs.get(r, [])
    m = re.fullmatch(r"Exited with exit code (\d+)", why or "")
    code = int(m.group(1)) if m else -9 if why == "Killed" else -15 if why == "Terminated" else None
    kind, detail = contract.exit_kind(code, lines)
    return contract.RankFailure(r, node, kind, why.lower() if why and code is not None and kind in (
        contract.RAISED, contract.EXITED) else detail, rank_logs.last_error(lines))


class _Tail:
    """Hands new lines of the job's files to the stage while the job runs."""

    def __init__(self, events: contract.Events):
        self.events, self.pos = events, {}

    def poll(self, files: Sequence[Path], which: Any) -> None:
        for p in files:
            try:
                with open(p, "r", errors="replace") as f:
                    f.seek(self.pos.get(p, 0))
                    chunk = f.read()
                    cut = chunk.rfind("\n") + 1  # keep a partial last line for the next poll
                    self.pos[p] = self.pos.get(p, 0) + len(chunk[:cut].encode())
            except FileNotFoundError:
                continue
            run, rank = which(p)
            for ln in chunk[:cut].splitlines():
                self.events.line(run, rank, ln)


_RANK_LOG = re.compile(r"rank(\d+)_(\d+)\.log$")


class SlurmLauncher:
    name = "slurm"
    runtime = "slurm"

    def __init__(self, spec: SlurmSpec, source: str = "hosts file", probe_timeout_s: float = PROBE_TIMEOUT_S):
        self.spec, self.source, self.probe_timeout_s = spec, source, probe_timeout_s
        self.ranks = spec.ntasks
        self.data_dir, self.env_profile, self.env, self.interface = (spec.data_dir, spec.env_profile, spec.env,
                                                                     spec.interface)
        self.data_local = spec.data_local
        self._job_id: str | None = None
        self._timed_out = False
        self._node_list: list[str] = []

    @classmethod
    def parse(cls, doc: Any, source: str) -> "SlurmLauncher":
        return cls(parse(doc, source), source)

    def slots_text(self, need: int) -> tuple[str, str]:
        s = self.spec
        return (f"slurm nodes x ntasks_per_node = {s.nodes} x {s.ntasks_per_node} =",
                f"set slurm.nodes x slurm.ntasks_per_node to {need}")

    def hosts(self) -> list[str]:
        return list(self._node_list)

    def rank_python(self, image: str | None) -> str:
        return self.spec.python or ("python" if self.spec.container_image or image else sys.executable)

    def _image(self, job: contract.Job) -> str | None:
        return self.spec.container_image or job.image

    def environment(self, job: contract.Job) -> dict[str, str]:
        env = dict(job.env)
        containerized = bool(self._image(job))
        # sbatch --export=NONE: the job starts with no PATH at all.
        env.setdefault("PATH", STD_PATH if containerized else f"{Path(self.rank_python(job.image)).parent}:{STD_PATH}")
        if containerized:
            env.pop("PYTHONPATH", None)  # the image's own
        env["RN50_RDZV_PY"] = RDZV_PY
        return env

    def check(self, job: contract.Job) -> list[str]:
        return check_scheduler(self.spec, job.timeout_s, job.runs)

    def preflight(self, job: contract.Job) -> list[str]:
        job_dir = job.out_dir / ".slurm"
        job_dir.mkdir(parents=True, exist_ok=True)
        # Node-local data is staged by the job itself: before it, the nodes must read the shared source.
        data = f"{job.work_dir}/recordio" if self.spec.data_local else job.data_dir
        return probe_data(self.spec, data, job.expected, job_dir, job.image, self.probe_timeout_s,
                          env=self.environment(job), gpu_python=job.gpu_python)

    def run(self, job: contract.Job, events: contract.Events) -> list[contract.RunOutcome]:
        spec, run_dir = self.spec, job.out_dir
        job_dir, job_log = run_dir / ".slurm", run_dir / "slurm-job.log"
        container = _container_args(spec, job.image, job.data_dir, job.work_dir)
        stage_from = None
        if spec.data_local:  # the source's full md5s: cached beside it by the distribute stage
            src = Path(job.work_dir) / "recordio"
            stage_from = (str(src), contract.node_specs(contract.source_digests(src)))
        script = batch_script(spec, run_dir, job_dir, self.environment(job), self.rank_python(job.image),
                              [list(a) for a in job.argvs], container, stage_from)
        script_path = write_text_atomic(job_dir / "job.sh", script)
        argv = _sbatch_argv(spec, f"rn50-{job.run_id}", job_log, run_dir) + [str(script_path)]
        events.line(0, None, f"sbatch: {shlex.join(argv)}")
        self._job_id = job_id = _submit(argv)
        events.on_death(["scancel", job_id])
        events.handle(job_id=job_id)
        events.line(0, None, f"slurm job {job_id} submitted (partition {spec.partition}, {spec.nodes} node(s) x "
                             f"{spec.ntasks_per_node} task(s))")
        state, info = self._watch(job, events, job_log)
        staged = job_dir / "stage.rc"
        if staged.exists() and staged.read_text().strip() != "0":
            errors = [ln.split("rn50-stage: error: ", 1)[1] for p in sorted(run_dir.glob("stage_*.log"))
                      for ln in p.read_text(errors="replace").splitlines() if "rn50-stage: error: " in ln]
            return [contract.RunOutcome(0, False, f"slurm job {job_id} {state}: staging the data failed: "
                                                  + ("; ".join(errors) or f"exit {staged.read_text().strip()}"))]
        outcomes = []
        for n in range(job.runs):
            rc = job_dir / f"run_{n}.rc"
            if state == "COMPLETED" or (rc.exists() and rc.read_text().strip() == "0"):
                outcomes.append(contract.RunOutcome(n, True))
                continue
            failure = first_failure(run_dir, job_log, n)
            why = "" if failure else (rank_logs.last_error(job_log.read_text(errors="replace").splitlines())
                                      if job_log.exists() else "") or (info or {}).get("Reason", "")
            timed_out = state == "TIMEOUT" or self._timed_out
            if state == "NODE_FAIL" and failure is None:
                failure = contract.RankFailure(-1, "", contract.NODE_FAILED, "a node failed", why)
            outcomes.append(contract.RunOutcome(n, False, f"slurm job {job_id} {state}" + (f": {why}" if why else ""),
                                                failure, timed_out))
            break
        return outcomes

    def _watch(self, job: contract.Job, events: contract.Events, job_log: Path) -> tuple[str, dict | None]:
        spec, run_dir, job_id = self.spec, job.out_dir, self._job_id
        tail = _Tail(events)
        last_state, info, running_since, pending_since = None, None, None, time.monotonic()

        def which(p: Path) -> tuple[int, int | None]:
            m = _RANK_LOG.search(p.name)
            return (int(m.group(2)), int(m.group(1))) if m else (0, None)

        while True:
            info = job_info(job_id)
            state = info.get("JobState", "UNKNOWN") if info else None
            if state is None:
                # slurmctld forgot the job (MinJobAge passed between polls): judge by the run markers.
                rcs = [run_dir / ".slurm" / f"run_{n}.rc" for n in range(job.runs)]
                state = "COMPLETED" if all(p.exists() and p.read_text().strip() == "0" for p in rcs) else "FAILED"
            if state != last_state:
                reason = info.get("Reason") if info else None
                events.line(0, None, f"slurm job {job_id}: {state}"
                                     + (f" (reason {reason})" if reason not in (None, "None") else ""))
                if info and info.get("NodeList") not in (None, "(null)", ""):
                    self._node_list = hostnames(info["NodeList"])
                events.handle(job_id=job_id, job_state=state)
                last_state = state
            if state == "RUNNING" and running_since is None:
                running_since = time.monotonic()
            tail.poll([job_log, *sorted(run_dir.glob("stage_*.log")), *sorted(run_dir.glob("rank*_*.log"))], which)
            if state in TERMINAL:
                return state, info
            if state == "PENDING" and time.monotonic() - pending_since > spec.max_pending_s:
                reason = (info or {}).get("Reason", "?")
                scancel(job_id)
                raise StageError(f"slurm job {job_id} still PENDING after slurm.max_pending {spec.max_pending} "
                                 f"(Slurm's reason: {reason}); cancelled")
            if running_since is not None and time.monotonic() - running_since > job.runs * job.timeout_s:
                self._timed_out = True
                scancel(job_id)
            time.sleep(spec.poll_s)

    def cancel(self) -> None:
        if self._job_id is not None:
            self.reap({"job_id": self._job_id})

    def distribute(self, src: Path, work_dir: Path, expected: dict[str, dict[str, Any]], progress: Any = None,
                   parallel: int = 4) -> list[dict[str, Any]]:
        """Nothing here: with data_local the training job stages the data on its own nodes (its first srun step,
        batch_script's stage_from). Node-local disks are wiped between jobs on many clusters and the next job may
        get other nodes, so a copy made by another job is not one the training can count on."""
        return [{"host": "every node of the training job", "action": "in-job", "bytes_sent": 0, "seconds": 0.0,
                 "files": {}, "reason": f"launcher slurm stages {src} to {self.data_dir} on each node inside the "
                                        "training job (its first srun step), where node-local disks are its own"}]

    def reap(self, handle: dict[str, Any]) -> None:
        job_id = str(handle.get("job_id") or "")
        if not job_id.isdigit():
            return
        info = job_info(job_id)
        if info is not None and info.get("JobState") not in TERMINAL:
            scancel(job_id)
