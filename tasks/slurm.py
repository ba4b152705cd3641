"""Slurm launcher for the train stage: `launcher: slurm` in the hosts file, ranks started by `srun` inside one
batch job, no SSH between nodes.

Inventory (the file given to `--hosts` / the pipeline's `train.hosts`):

    launcher: slurm
    slurm:
      partition: debug          # required
      nodes: 2                  # required
      ntasks_per_node: 8        # ranks per node (= GPUs per node on a GPU cluster); nodes x this must be
                                # the config's global_batch_size / batch_size (else refused)
      time: "01:00:00"          # job time limit; must cover runs x the stage timeout
      account: null
      exclusive: true           # --exclusive (the default: a timed run shares no node)
      gpus_per_node: null       # set -> --gpus-per-node=N and a preflight check of the nodes' gres
      extra_args: []            # more sbatch options, each one argv element starting with `--`
      container_image: null     # set -> srun --container-image (Pyxis/Enroot); default: the image the
                                # container stage built when one is given
      container_mounts: []      # extra SRC:DST mounts; the data dir and the work dir are always mounted
      mpi: none                 # none: Gloo rendezvous from SLURM_* (below); pmix|pmi2: MPI-built Horovod
    data_dir: /lustre/imagenet/recordio   # recordio as seen by the nodes (default WORKDIR/recordio)
    python: null                # interpreter on the nodes (default: this one; `python` in a container)
    interface: null             # HOROVOD_GLOO_IFACE / NCCL_SOCKET_IFNAME
    env_profile: cpu            # configs/env/<profile>.env (gpu when a container image is used)
    env: {}

Design choices
- One batch job for the N runs of a set, not one job per run: one queue wait, and the N timed runs of
  a submission set run back to back on the same exclusively held nodes, as NVIDIA's `run.sub` runs its
  NEXP experiments in one allocation; another job cannot slip in between runs and skew the timings.
  The price: the time limit must cover all N runs (preflight checks it), and a failed run ends the
  job (later runs are not started; the stage fails as with SSH).
- Rendezvous: Horovod's Gloo rendezvous driven from SLURM_* variables, in a static bash prelude each
  rank runs before the rank program: HOROVOD_RANK/SIZE/LOCAL_RANK/CROSS_RANK/... come from
  SLURM_PROCID/NTASKS/LOCALID/NODEID/NNODES; rank 0 starts Horovod's own RendezvousServer (the HTTP
  KV store horovodrun runs) in the background on the launch node (the batch host, where block
  distribution puts rank 0), bound to SLURM_LAUNCH_NODE_IPADDR; it publishes its port in the run
  directory, which every node shares anyway (rank logs and result_<n>.txt are written there). This
  needs nothing but Horovod with Gloo, so the CPU test path (Debian Slurm, no PMIx library) and a GPU
  cluster run the same code; the NGC image's Horovod is built with Gloo as well as MPI, and NCCL
  still carries the GPU allreduces. `mpi: pmix` switches to `srun --mpi=pmix` and HOROVOD_CONTROLLER=mpi
  (the NGC way, for sites that prefer it); the prelude then only execs the rank.
- Ranks: `srun --kill-on-bad-exit=1 [--container-image ...] bash -c PRELUDE ... python -m rn50.train
  --config C --data D --out RUN_DIR --run-index N --seed S`, exactly the ssh launcher's rank contract;
  srun writes each task's output to RUN_DIR/rank<r>_<n>.log, the batch script's own to
  RUN_DIR/slurm-<jobid>.log. The batch script is generated with every value shlex-quoted; sbatch gets
  an argv list, `--export=NONE` (the worker's credentials stay out of the job) and the rank environment
  (allow-list + env profile + inventory env) as quoted exports in the script.
- Preflight: nodes x ntasks_per_node against the config's world size (before slurmctld is asked anything),
  the scheduler (`scontrol show partition/node`), then a one-task-per-node probe job in the ranks' environment
  and container that checks the data dir from the compute nodes and, for a GPU config, GPUs >= ntasks_per_node,
  the driver (`nvidia-smi -L`) and hvd.nccl_built() of the ranks' Python; every failure is one line, before the
  real job.
- Monitoring polls `scontrol show job`; `on_job(job_id, state)` is called on every state change (the
  flow uses it for its log/artifact); any exception or signal while the job is queued or running
  (SIGTERM, KeyboardInterrupt, Prefect's TerminationSignal, an exception raised by `on_job`) scancels
  the job, waits (bounded) for it to end, and re-raises the original exception. A job that ends
  FAILED, TIMEOUT, NODE_FAIL, CANCELLED, ... fails the stage with the state and the first failing
  rank's error (one line).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import logging
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from tasks import rank_logs
from tasks.inventory import ENV_KEY_RE
from tasks.common import StageError, Workdir, file_digest, write_json_atomic, write_text_atomic

log = logging.getLogger("tasks.train")  # the train stage's logger

RECORDIO_FILES = ("train.rec", "train.idx", "val.rec", "val.idx")
ENV_ALLOWLIST = ("HOME", "LANG", "LC_ALL", "USER", "LOGNAME", "TMPDIR", "TZ", "PYTHONPATH")
TERMINAL = {"COMPLETED", "FAILED", "TIMEOUT", "NODE_FAIL", "CANCELLED", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}
DEFAULT_POLL_S = 5.0
CANCEL_WAIT_S = 30.0
PROBE_TIMEOUT_S = 300.0
STD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


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
    python: str | None = None
    interface: str | None = None
    env_profile: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    poll_s: float = DEFAULT_POLL_S

    @property
    def ntasks(self) -> int:
        return self.nodes * self.ntasks_per_node

    @property
    def time_s(self) -> float:
        return parse_time(self.time)


# --- inventory ------------------------------------------------------------------------------------------


def is_slurm(doc: Any) -> bool:
    return isinstance(doc, dict) and doc.get("launcher") == "slurm"


def is_slurm_file(path: Path | str) -> bool:
    """True when the hosts file says `launcher: slurm` (errors are left to the loader that owns the file)."""
    import yaml

    try:
        return is_slurm(yaml.safe_load(Path(path).read_text()))
    except (OSError, yaml.YAMLError):
        return False


def load(path: Path | str) -> SlurmSpec:
    from tasks.inventory import read_inventory_file

    return parse(read_inventory_file(path), source=str(path))


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


def parse(doc: Any, source: str = "inventory") -> SlurmSpec:
    """Validate a `launcher: slurm` inventory as data; every error is one line naming the key."""
    if not is_slurm(doc):
        raise StageError(f"{source}: not a `launcher: slurm` inventory")
    known = {"launcher", "slurm", "data_dir", "python", "interface", "env_profile", "env", "runtime"}
    extra = set(doc) - known
    if extra:
        raise StageError(f"{source}: unknown key(s) {sorted(extra)} for launcher: slurm (hosts come from Slurm)")
    s = doc.get("slurm")
    if not isinstance(s, dict):
        raise StageError(f"{source}: launcher: slurm needs a `slurm:` mapping with at least partition and nodes")
    skeys = {"partition", "nodes", "ntasks_per_node", "time", "account", "exclusive", "gpus_per_node",
             "extra_args", "container_image", "container_mounts", "mpi", "poll_s"}
    extra = set(s) - skeys
    if extra:
        raise StageError(f"{source}: unknown slurm key(s) {sorted(extra)}")
    for req in ("partition", "nodes"):
        if s.get(req) is None:
            raise StageError(f"{source}: slurm.{req} is required")
    partition = _str(s["partition"], "slurm.partition", source)
    nodes = _int(s, "nodes", source)
    tpn = _int(s, "ntasks_per_node", source, 1)
    time_ = str(s.get("time", "01:00:00"))
    try:
        if parse_time(time_) <= 0:
            raise ValueError(time_)
    except ValueError:
        raise StageError(f"{source}: slurm.time {time_!r} is not a Slurm time (e.g. 90, 01:30:00, 1-00:00:00)") from None
    exclusive = s.get("exclusive", True)
    if not isinstance(exclusive, bool):
        raise StageError(f"{source}: slurm.exclusive must be true or false")
    extra_args = s.get("extra_args") or []
    if not isinstance(extra_args, list) or not all(isinstance(a, str) and a.startswith("--") and "\n" not in a
                                                   and "\0" not in a for a in extra_args):
        raise StageError(f"{source}: slurm.extra_args must be a list of sbatch options, each starting with `--`")
    mounts = s.get("container_mounts") or []
    if not isinstance(mounts, list) or not all(isinstance(m, str) and ":" in m and "," not in m and "\n" not in m
                                               for m in mounts):
        raise StageError(f"{source}: slurm.container_mounts must be a list of SRC:DST[:FLAGS] strings")
    mpi = s.get("mpi", "none")
    if mpi not in ("none", "pmix", "pmi2"):
        raise StageError(f"{source}: slurm.mpi must be none, pmix or pmi2, not {mpi!r}")
    env = doc.get("env") or {}
    if not isinstance(env, dict) or not all(ENV_KEY_RE.fullmatch(str(k)) for k in env):
        raise StageError(f"{source}: `env:` must be a mapping of NAME: value")
    poll = s.get("poll_s", DEFAULT_POLL_S)
    if isinstance(poll, bool) or not isinstance(poll, (int, float)) or not 0.1 <= poll <= 300:
        raise StageError(f"{source}: slurm.poll_s must be a number of seconds between 0.1 and 300")
    data_dir = doc.get("data_dir")
    if data_dir is not None and (not isinstance(data_dir, str) or not data_dir.startswith("/")):
        raise StageError(f"{source}: data_dir must be an absolute path on the nodes")
    return SlurmSpec(
        partition=partition, nodes=nodes, ntasks_per_node=tpn, time=time_,
        account=_str(s.get("account"), "slurm.account", source),
        exclusive=exclusive, gpus_per_node=_int(s, "gpus_per_node", source, None),
        extra_args=tuple(extra_args),
        container_image=_str(s.get("container_image"), "slurm.container_image", source,
                             re.compile(r"^[^\s'\"\\]+$")),
        container_mounts=tuple(mounts), mpi=mpi, data_dir=data_dir,
        python=_str(doc.get("python"), "python", source, re.compile(r"^[^\s'\"\\]+$")),
        interface=_str(doc.get("interface"), "interface", source),
        env_profile=_str(doc.get("env_profile"), "env_profile", source, re.compile(r"^[^\s'\"\\]+$")),
        env=tuple(sorted((str(k), str(v)) for k, v in env.items())), poll_s=float(poll),
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
# GPU script (tasks.train.gpu_probe_script, GPU configs only) also the GPUs, the driver and Horovod's NCCL.
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
    from tasks.train import gpu_probe_script, gpu_problems

    out = job_dir / "probe.log"
    gpu = gpu_probe_script(gpu_python) if gpu_python else ""
    step = ["srun", "--ntasks-per-node=1", *_container_args(spec, image, data_dir, None), "sh", "-c", _PROBE,
            "rn50-probe", data_dir, gpu, *RECORDIO_FILES]
    exports = [f"export {k}={shlex.quote(v)}" for k, v in sorted((env or {"PATH": STD_PATH}).items())
               if ENV_KEY_RE.fullmatch(k)]
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
            f"--nodes={spec.nodes}", f"--output={output}", f"--chdir={chdir}", "--export=NONE"]
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
    return argv


def _submit(argv: list[str]) -> str:
    p = _slurm(argv, timeout=60)
    job_id = p.stdout.strip().split(";")[0]
    if p.returncode != 0 or not job_id.isdigit():
        raise StageError(f"sbatch refused the job: {_err(p)}")
    return job_id


def rank_env(spec: SlurmSpec, python: str, containerized: bool) -> dict[str, str]:
    from tasks.inventory import read_env_file

    env = {k: os.environ[k] for k in ENV_ALLOWLIST if k in os.environ}
    # sbatch --export=NONE: the job starts with no PATH at all.
    env["PATH"] = STD_PATH if containerized else f"{Path(python).parent}:{STD_PATH}"
    if containerized:
        env.pop("PYTHONPATH", None)  # the image's own
    env.update(read_env_file(spec.env_profile or ("gpu" if containerized else "cpu")))
    env.update(dict(spec.env))
    if spec.interface:
        env.setdefault("HOROVOD_GLOO_IFACE", spec.interface)
        env.setdefault("NCCL_SOCKET_IFNAME", spec.interface)
    env["PYTHONUNBUFFERED"] = "1"
    env["RN50_RDZV_PY"] = RDZV_PY
    return env


def batch_script(spec: SlurmSpec, run_dir: Path, job_dir: Path, env: dict[str, str], python: str,
                 rank_argvs: Sequence[Sequence[str]], container: Sequence[str]) -> str:
    """The job: export the rank environment, then one srun step per run; stop at the first failed run."""
    q = shlex.quote
    lines = ["#!/bin/bash", f"# generated by rn50 (tasks/slurm.py) for {run_dir.name}", "set -u",
             "export SLURM_EXPORT_ENV=ALL  # sbatch --export=NONE would otherwise reach every srun"]
    lines += [f"export {k}={q(v)}" for k, v in sorted(env.items()) if ENV_KEY_RE.fullmatch(k)]
    lines.append('echo "rn50: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST (batch host $(hostname))"')
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


def first_failure(run_dir: Path, job_log: Path, n: int) -> str | None:
    """The rank that failed first in run n: the first `srun: error: NODE: task R: Exited` line whose rank did
    not merely lose a peer; its last error line from rank<R>_<n>.log."""
    text = job_log.read_text(errors="replace") if job_log.exists() else ""
    start = text.find(f"rn50: run {n} starts")
    exits = []
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
        cands = [(r, "?", "raised") for r in sorted(logs)
                 if rank_logs.raised(logs[r]) and not rank_logs.lost_peer(logs[r])]
    if not cands and exits:
        cands = exits
    if not cands:
        return None
    r, node, why = cands[0]
    err = rank_logs.last_error(logs.get(r, []))
    where = f" on {node}" if node != "?" else ""
    return f"rank {r}{where} failed first ({why.lower()})" + (f": {err}" if err else "")


# --- launch ---------------------------------------------------------------------------------------------


class _Tail:
    """Streams new lines of the job's files into the stage log while the job runs."""

    def __init__(self, logger: logging.Logger):
        self.logger, self.pos = logger, {}

    def poll(self, files: Sequence[Path], label: Callable[[Path], str]) -> None:
        for p in files:
            try:
                with open(p, "r", errors="replace") as f:
                    f.seek(self.pos.get(p, 0))
                    chunk = f.read()
                    # keep a partial last line for the next poll
                    cut = chunk.rfind("\n") + 1
                    self.pos[p] = self.pos.get(p, 0) + len(chunk[:cut].encode())
            except FileNotFoundError:
                continue
            for ln in chunk[:cut].splitlines():
                self.logger.info("[%s] %s", label(p), ln)


def _terminating_on_sigterm():
    """For the CLI: SIGTERM raises SystemExit in the main thread (so the job is scancelled), unless someone
    (Prefect's engine) already handles it."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL)


def launch(
    workdir: Path | str,
    spec: SlurmSpec,
    config: str = "cpu-demo",
    runs: int = 1,
    image: str | None = None,
    timeout_s: float = 6 * 3600,
    seed: int | None = None,
    entry: Sequence[str] | None = None,
    extra_args: Sequence[str] = (),
    logger: logging.Logger | None = None,
    on_job: Callable[[str, str], None] | None = None,
    probe_timeout_s: float = PROBE_TIMEOUT_S,
):
    """Preflight through Slurm, then one batch job whose srun steps run the `runs` runs of `rank program
    --config C --data D --out RUN_DIR --run-index N --seed S` on nodes x ntasks_per_node ranks, which must be
    the config's global_batch_size / batch_size (refused before anything is submitted or written)."""
    from rn50.config import needs_gpu
    from tasks.train import TrainResult, expected_data, new_run_id, ranks_needed, slot_error, training_config

    logger = logger or log
    wd = Workdir(workdir)
    if runs < 1:
        raise StageError(f"--runs must be >= 1, not {runs}")
    cfg = training_config(config, extra_args)
    err = slot_error(cfg, spec.ntasks, f"slurm nodes x ntasks_per_node = {spec.nodes} x {spec.ntasks_per_node} =",
                     f"set slurm.nodes x slurm.ntasks_per_node to {ranks_needed(cfg)}")
    if err:
        raise StageError(err)
    containerized = bool(spec.container_image or image)
    python = spec.python or ("python" if containerized else sys.executable)
    if entry is None:
        entry = [python, "-m", "rn50.train"]
    data_dir = spec.data_dir or str(wd.recordio)
    base_seed = seed if seed is not None else secrets.randbelow(2**31 - runs)
    seeds = [base_seed + n for n in range(runs)]
    expected = expected_data(wd.recordio)
    data_digest = hashlib.sha256(repr(sorted(expected.items())).encode()).hexdigest()

    errors = check_scheduler(spec, timeout_s, runs)
    if errors:
        raise StageError("preflight failed: " + "; ".join(errors))

    run_id = new_run_id()
    run_dir = wd.runs / run_id
    job_dir = run_dir / ".slurm"
    job_dir.mkdir(parents=True)
    started = time.time()
    status: dict[str, Any] = {
        "run_id": run_id, "status": "running", "launcher": "slurm", "config": config, "np": spec.ntasks,
        "runs": runs, "seeds": seeds, "partition": spec.partition, "nodes": spec.nodes,
        "ntasks_per_node": spec.ntasks_per_node, "image": spec.container_image or image,
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(),
    }
    write_json_atomic(run_dir / "status.json", status)
    restore = _terminating_on_sigterm()
    job_id: str | None = None
    job_log = run_dir / "slurm-job.log"
    try:
        env = rank_env(spec, python, containerized)
        errors = probe_data(spec, data_dir, expected, job_dir, image, probe_timeout_s, env=env,
                            gpu_python=python if needs_gpu(cfg) else None)
        if errors:
            raise StageError("preflight failed: " + "; ".join(errors))
        container = _container_args(spec, image, data_dir, str(wd.root))
        rank_argvs = [list(entry) + ["--config", config, "--data", data_dir, "--out", str(run_dir),
                                     "--run-index", str(n), "--seed", str(s)] + list(extra_args)
                      for n, s in enumerate(seeds)]
        script = batch_script(spec, run_dir, job_dir, env, python, rank_argvs, container)
        script_path = write_text_atomic(job_dir / "job.sh", script)
        argv = _sbatch_argv(spec, f"rn50-{run_id}", job_log, run_dir) + [str(script_path)]
        logger.info("sbatch: %s", shlex.join(argv))
        job_id = _submit(argv)
        status["job_id"] = job_id
        write_json_atomic(run_dir / "status.json", status)
        logger.info("slurm job %s submitted (partition %s, %d node(s) x %d task(s))", job_id, spec.partition,
                    spec.nodes, spec.ntasks_per_node)
        state, info = _monitor(job_id, spec, run_dir, job_log, runs, timeout_s, logger, on_job, status)
        if state != "COMPLETED":
            n = _failed_run(job_dir, runs)
            why = first_failure(run_dir, job_log, n) if n is not None else None
            if not why:
                why = rank_logs.last_error(job_log.read_text(errors="replace").splitlines()) if job_log.exists() else ""
                why = why or (info or {}).get("Reason", "")
            run_part = f"run {n}: " if n is not None else ""
            raise StageError(f"slurm job {job_id} {state}: {run_part}{why}".rstrip(": "))
        results = []
        for n in range(runs):
            result = run_dir / f"result_{n}.txt"
            if not result.is_file():
                raise StageError(f"run {n}: slurm job {job_id} COMPLETED but {result.name} was not written")
            if "run_stop" not in result.read_text():
                raise StageError(f"run {n}: {result.name} has no run_stop (the run did not finish)")
            results.append(result)
    except BaseException as e:
        if job_id is not None:
            info = job_info(job_id)
            if info is not None and info.get("JobState") not in TERMINAL:
                logger.warning("cancelling slurm job %s (%s)", job_id, type(e).__name__)
                final = scancel(job_id)
                status["job_state"] = final or "CANCELLED"
                if on_job is not None and not isinstance(e, _CallbackError):
                    try:
                        on_job(job_id, status["job_state"])
                    except Exception:  # the callback must not mask the original error
                        pass
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        status.update(status="failed", error=msg, duration_s=round(time.time() - started, 3))
        _finish(run_dir, status)
        logger.error("train attempt %s failed (kept in %s): %s", run_id, run_dir, msg)
        if isinstance(e, _CallbackError):
            raise e.__cause__ from None
        raise
    finally:
        if restore:
            restore()
    status.update(status="succeeded", duration_s=round(time.time() - started, 3),
                  results=[p.name for p in results])
    _finish(run_dir, status)
    logs = [job_log] + sorted(run_dir.glob("rank*_*.log"))
    return TrainResult(
        run_id=run_id, run_dir=str(run_dir), status="succeeded", config=config, np=spec.ntasks,
        hosts=status.get("hosts", []), runtime="slurm", image=spec.container_image or image, runs=runs, seeds=seeds,
        results=[str(p) for p in results], result_md5={p.name: file_digest(p) for p in results},
        logs=[str(p) for p in logs if p.exists()], data_digest=data_digest, duration_s=status["duration_s"],
    )


class _CallbackError(Exception):
    """Carries an exception raised by on_job through the cancel path."""


def _failed_run(job_dir: Path, runs: int) -> int | None:
    """The first run that did not end with exit 0 (the job stops there), or None when all did."""
    for n in range(runs):
        rc = job_dir / f"run_{n}.rc"
        if not rc.exists() or rc.read_text().strip() != "0":
            return n
    return None


def _finish(run_dir: Path, status: dict[str, Any]) -> None:
    write_json_atomic(run_dir / "status.json", status)
    if status["status"] == "failed":
        write_text_atomic(run_dir / "FAILED", status.get("error", "failed") + "\n")


def _monitor(job_id: str, spec: SlurmSpec, run_dir: Path, job_log: Path, runs: int, timeout_s: float,
             logger: logging.Logger, on_job, status: dict[str, Any]) -> tuple[str, dict | None]:
    tail = _Tail(logger)
    last_state, info, running_since = None, None, None
    pattern = re.compile(r"rank(\d+)_(\d+)\.log$")

    def label(p: Path) -> str:
        m = pattern.search(p.name)
        return f"run {m.group(2)} rank {m.group(1)}" if m else f"job {job_id}"

    while True:
        info = job_info(job_id)
        state = info.get("JobState", "UNKNOWN") if info else None
        if state is None:
            # slurmctld forgot the job (MinJobAge passed between polls): judge by the run markers.
            rcs = [run_dir / ".slurm" / f"run_{n}.rc" for n in range(runs)]
            state = "COMPLETED" if all(p.exists() and p.read_text().strip() == "0" for p in rcs) else "FAILED"
        if state != last_state:
            logger.info("slurm job %s: %s%s", job_id, state,
                        f" (reason {info.get('Reason')})" if info and info.get("Reason") not in (None, "None") else "")
            if info and info.get("NodeList") not in (None, "(null)", ""):
                status["hosts"] = hostnames(info["NodeList"])
            status["job_state"] = state
            write_json_atomic(run_dir / "status.json", status)
            if on_job is not None:
                try:
                    on_job(job_id, state)
                except BaseException as e:
                    if isinstance(e, Exception):
                        raise _CallbackError(str(e)) from e
                    raise
            last_state = state
        if state == "RUNNING" and running_since is None:
            running_since = time.monotonic()
        tail.poll([job_log] + sorted(run_dir.glob("rank*_*.log")), label)
        if state in TERMINAL:
            return state, info
        if running_since is not None and time.monotonic() - running_since > runs * timeout_s:
            scancel(job_id)
            raise StageError(f"slurm job {job_id}: timed out after {runs * timeout_s:.0f} s; cancelled")
        time.sleep(spec.poll_s)
