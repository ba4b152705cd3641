"""Train stage (`rn50 train`, `tasks.train.train`): run `python -m rn50.train` across the hosts of an
inventory with Horovod's launcher.

What replaces the seeds' hand-edited scripts: a YAML inventory (tasks/inventory.py: hosts, slots, ssh
port/user/key, interface, local or docker runtime), SSH with pinned host keys (tasks/ssh.py), a
preflight that fails with one line naming the host before any rank starts, `horovodrun` (Gloo on CPU; `--mpi` where Horovod was built with MPI) with every rank's
output streamed into the log and into runs/<run-id>/, a timeout for hung jobs, and `--runs N` runs
with distinct seeds, one result_<n>.txt each.

World size by construction: the ranks are exactly global_batch_size / batch_size of the training config the
ranks will run (rn50.config.load_config, with the `--set` overrides they get); an inventory with other slots
is refused (one line, exit 2 from the CLI) before anything runs or is written. Without --hosts, this machine
gets one slot per GPU (`nvidia-smi -L`) for a GPU config, global_batch_size / batch_size slots for a CPU one.
A GPU config (float16 / NHWC / DALI mixed decode) is also preflighted on every host, inside the node
container for runtime docker: GPUs >= slots, a working driver, hvd.nccl_built() in the ranks' Python.

Every call is one *attempt* with a fresh run id. A failed attempt keeps its directory, marked by
FAILED and status.json, so a retry (what Prefect does) starts clean beside it and nothing is lost.
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

from rn50.config import needs_gpu
from tasks import paths, rank_logs
from tasks.common import Result, StageError, TransientError, Workdir, file_digest, write_json_atomic, write_text_atomic
from tasks.tether import Tether, die_with_parent
from tasks.inventory import Host, Inventory, load_inventory, local_inventory, read_env_file
from tasks.ssh import (CONNECT_TIMEOUT_S, Remote, Trust, container_wrapper_script, host_key_problem, is_local,
                       is_local_name, prepare_known_hosts, write_wrapper)
from tasks.ssh import setup as ssh_setup

log = logging.getLogger(__name__)

RECORDIO_FILES = ("train.rec", "train.idx", "val.rec", "val.idx")
# The .rec files can be ~140 GB; a digest of their first and last MiB plus the exact size (and the
# full digest of the .idx, which holds every record's offset) catches a wrong or truncated copy
# without reading the whole file on every host before every launch.
SAMPLE_BYTES = 1 << 20
DEFAULT_TIMEOUT_S = 6 * 3600
STOP_GRACE_S = 10  # after SIGTERM, before SIGKILL: horovodrun's own teardown of ranks and ssh sessions
PROBE_TIMEOUT_S = CONNECT_TIMEOUT_S + 60
# Characters a run directory may hold when ranks run on other hosts: Horovod runs `cd <dir>` there
# through the remote shell without quoting it.
SHELL_SAFE_PATH = re.compile(r"/[A-Za-z0-9_./+,:@=-]*")
# Environment variables handed to horovodrun (and from it to every rank, on every host, on the
# command line): nothing else from the caller's environment, so credentials (AWS_*, PREFECT_API_KEY,
# tokens) held by the flow's worker never reach a remote command line or a log.
ENV_ALLOWLIST = ("HOME", "LANG", "LC_ALL", "USER", "LOGNAME", "TMPDIR", "TZ", "PYTHONPATH")


@dataclasses.dataclass
class TrainResult(Result):
    run_id: str
    run_dir: str
    status: str  # succeeded | failed
    config: str
    np: int  # ranks = global_batch_size / batch_size of the config
    hosts: list[str]
    runtime: str
    image: str | None
    runs: int
    seeds: list[int]
    results: list[str]  # result_<n>.txt, one per run
    result_md5: dict[str, str]
    logs: list[str]  # launcher log and one log per rank and run
    data_digest: str  # digest of the recordio files the ranks read (sizes + idx md5 + rec samples)
    duration_s: float


# --- the training config: how many ranks, and whether they need GPUs ---------------------------------

GPU_PROBE_TIMEOUT_S = 60


def config_overrides(extra_args: Sequence[str]) -> list[str]:
    """The `--set KEY=VALUE` overrides among the rank program's extra arguments: the launcher counts ranks
    from the config the ranks will really run."""
    out, args = [], list(extra_args)
    for i, a in enumerate(args):
        if a == "--set" and i + 1 < len(args):
            out.append(args[i + 1])
        elif a.startswith("--set="):
            out.append(a[len("--set="):])
    return out


def training_config(config: str, extra_args: Sequence[str] = ()) -> dict[str, Any]:
    """The resolved training config, read by the training package's own loader (rn50.config.load_config)."""
    from rn50.config import ConfigError, load_config

    path = paths.resolve("training", config)
    try:
        return load_config(str(path), config_overrides(extra_args))
    except ConfigError as e:
        raise StageError(f"training config {config!r}: {e}") from None


def ranks_needed(cfg: dict[str, Any]) -> int:
    """global_batch_size / batch_size: the one world size the config's hyper-parameters are tuned for."""
    return cfg["global_batch_size"] // cfg["batch_size"]


def slot_error(cfg: dict[str, Any], slots: int, where: str, fix: str) -> str | None:
    """One line when `slots` differs from the ranks the config needs, else None."""
    from rn50.config import world_size_error

    if world_size_error(cfg, slots) is None:
        return None
    need, bs = ranks_needed(cfg), cfg["batch_size"]
    return (f"preflight: {where} {slots} slot(s), but config {cfg['name']!r} needs exactly {need} rank(s) "
            f"(global_batch_size {cfg['global_batch_size']} = {need} x batch_size {bs}; {slots} rank(s) would "
            f"train at global batch {slots * bs}): {fix}")


def local_gpu_count() -> int:
    """GPUs `nvidia-smi -L` lists on this machine; a one-line StageError when it cannot tell."""
    try:
        p = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=GPU_PROBE_TIMEOUT_S,
                           stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise StageError("no --hosts and a GPU config, but `nvidia-smi` is not installed here (no NVIDIA driver); "
                         "give --hosts, or use a CPU config") from None
    except subprocess.TimeoutExpired:
        raise StageError(f"no --hosts and a GPU config: `nvidia-smi -L` hung for {GPU_PROBE_TIMEOUT_S} s") from None
    if p.returncode != 0:
        why = ([ln.strip() for ln in (p.stdout + p.stderr).splitlines() if ln.strip()] or [f"exit {p.returncode}"])[-1]
        raise StageError(f"no --hosts and a GPU config, but `nvidia-smi -L` failed here: {why[:200]}")
    return len(_GPU_LINE.findall(p.stdout))


_GPU_LINE = re.compile(r"^GPU \d+:", re.M)


def local_default(cfg: dict[str, Any]) -> Inventory:
    """No --hosts: this machine with one slot per GPU for a GPU config, else global_batch_size / batch_size."""
    if not needs_gpu(cfg):
        return local_inventory(ranks_needed(cfg))
    gpus = local_gpu_count()
    if gpus == 0:
        raise StageError(f"config {cfg['name']!r} needs GPUs (float16 / NHWC / mixed decode), and `nvidia-smi -L` "
                         "lists none on this host; give --hosts")
    return local_inventory(gpus)


# --- preflight ----------------------------------------------------------------------------------------


def expected_data(recordio: Path) -> dict[str, dict[str, Any]]:
    """Size, full md5 of each .idx and md5 of the first/last MiB of each .rec, from the launcher's copy."""
    missing = [f for f in RECORDIO_FILES if not (recordio / f).is_file()]
    if missing:
        raise StageError(f"{recordio}: missing {', '.join(missing)} (run `rn50 pack` first)")
    out = {}
    for name in RECORDIO_FILES:
        p = recordio / name
        size = p.stat().st_size
        if name.endswith(".idx"):
            out[name] = {"size": size, "md5": file_digest(p)}
        else:
            with open(p, "rb") as f:
                head = hashlib.md5(f.read(SAMPLE_BYTES)).hexdigest()
                f.seek(max(0, size - SAMPLE_BYTES))
                tail = hashlib.md5(f.read(SAMPLE_BYTES)).hexdigest()
            out[name] = {"size": size, "head_md5": head, "tail_md5": tail}
    return out


def gpu_probe_script(python: str, timeout_s: int = GPU_PROBE_TIMEOUT_S) -> str:
    """POSIX sh: `gpus N` (GPUs `nvidia-smi -L` lists) or `gpus_error WHY` (no driver), then `nccl yes|no` or
    `nccl_error WHY` (whether Horovod, as imported by `python`, the ranks' interpreter, was built with NCCL)."""
    q = shlex.quote
    nccl = 'import horovod.mxnet as hvd; print("nccl", "yes" if hvd.nccl_built() else "no")'
    return "; ".join([
        "if command -v nvidia-smi >/dev/null 2>&1; then "
        f"gpu_out=$(timeout {timeout_s} nvidia-smi -L 2>&1); gpu_rc=$?; "
        'if [ "$gpu_rc" -eq 0 ]; then echo gpus $(printf "%s\\n" "$gpu_out" | grep -c "^GPU [0-9][0-9]*:"); '
        'else echo gpus_error "nvidia-smi -L exit $gpu_rc: $(printf "%s\\n" "$gpu_out" | grep . | tail -n 1)"; fi; '
        "else echo gpus_error nvidia-smi not found; fi",
        f"nccl_out=$({q(python)} -c {q(nccl)} 2>&1); "
        'if printf "%s\\n" "$nccl_out" | grep -q "^nccl "; then printf "%s\\n" "$nccl_out" | grep "^nccl " | tail -n 1; '
        'else echo nccl_error "$(printf "%s\\n" "$nccl_out" | grep . | tail -n 1)"; fi',
    ])


def gpu_problems(facts: dict[str, str], slots: int, python: str) -> list[str]:
    """What a host's GPU probe output (gpu_probe_script) says is wrong for `slots` ranks on it."""
    problems = []
    if "gpus_error" in facts:
        problems.append(f"no working NVIDIA driver ({facts['gpus_error'][:200]})")
    else:
        try:
            gpus = int(facts.get("gpus", "0"))
        except ValueError:
            gpus = 0
        if gpus < slots:
            problems.append(f"{gpus} GPU(s) for {slots} slot(s) (nvidia-smi -L)")
    if facts.get("nccl") == "no":
        problems.append(f"Horovod in {python} is built without NCCL (hvd.nccl_built() is false; build it with "
                        "HOROVOD_GPU_OPERATIONS=NCCL: MXNET_BUILD=gpu make install, or train in the NGC-based image)")
    elif facts.get("nccl") != "yes":
        problems.append(f"cannot check NCCL: {python} -c 'import horovod.mxnet' failed "
                        f"({facts.get('nccl_error', 'no output')[:200]})")
    return problems


def _probe_script(data_dir: str, work_dir: str, runtime: str, image: str | None, gpu_python: str | None = None) -> str:
    """POSIX sh run on each host; prints `key value` lines that `_check_host` reads. `gpu_python`: also
    probe the GPUs, the driver and Horovod's NCCL for a GPU config, with the ranks' interpreter."""
    q = shlex.quote
    # Gloo looks up each host's own name; an unresolvable one crashes hvd.init() with a bare segfault.
    parts = ["echo ok 1", 'h=$(hostname); if getent hosts "$h" >/dev/null 2>&1; then echo resolves yes; else echo resolves "$h"; fi']
    for name in RECORDIO_FILES:
        f = q(f"{data_dir}/{name}")
        parts.append(f"if [ -f {f} ]; then echo size:{name} $(stat -c %s {f}); else echo size:{name} missing; fi")
        if name.endswith(".idx"):
            parts.append(f"[ -f {f} ] && echo md5:{name} $(md5sum < {f} | cut -d' ' -f1)")
        else:
            parts.append(f"[ -f {f} ] && echo head_md5:{name} $(head -c {SAMPLE_BYTES} {f} | md5sum | cut -d' ' -f1)")
            parts.append(
                f"[ -f {f} ] && echo tail_md5:{name} "
                f"$(tail -c {SAMPLE_BYTES} {f} | md5sum | cut -d' ' -f1)"
            )
    # Free space where the ranks write: the nearest existing parent of the work dir.
    parts.append(
        f"d={q(work_dir)}; while [ ! -d \"$d\" ]; do d=$(dirname \"$d\"); done; "
        "echo free_kib $(df -Pk \"$d\" | awk 'NR==2 {print $4}')"
    )
    if runtime == "docker":
        # We are inside the node's container: it must run the image built from this source tree.
        parts.append("echo image $(cat /etc/rn50/content-hash 2>/dev/null || echo none)")
    if gpu_python:
        parts.append(gpu_probe_script(gpu_python))
    return "; ".join(parts) + "; true"


def _check_host(host: Host, remote: Remote, expected: dict, inv: Inventory, data_dir: str, work_dir: str,
                image: str | None, trust: Trust, gpu_python: str | None = None) -> list[str]:
    where = f"host {host.label}" + ("" if remote.local else " (ssh)")
    try:
        # The probe is the first contact with a host: the one ssh call allowed to pin a new host's key.
        proc = remote.run(_probe_script(data_dir, work_dir, inv.runtime, image, gpu_python), timeout=PROBE_TIMEOUT_S,
                          first_contact=True)
    except subprocess.TimeoutExpired:
        return [f"{where}: no answer within {PROBE_TIMEOUT_S} s"]
    facts: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        k, _, v = line.partition(" ")
        facts[k] = v.strip()
    if proc.returncode != 0 or "ok" not in facts:
        key_problem = None if remote.local else host_key_problem(proc.stderr, host, trust.known_hosts)
        if key_problem:
            return [f"{where}: {key_problem}"]
        msg = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return [f"{where}: ssh unreachable: {msg}" if not remote.local else f"{where}: probe failed: {msg}"]
    errors = []
    if facts.get("resolves", "yes") != "yes":
        errors.append(f"{where}: its hostname {facts['resolves']!r} does not resolve (add it to /etc/hosts; Gloo needs it)")
    for name, exp in expected.items():
        got = facts.get(f"size:{name}")
        if got in (None, "missing"):
            errors.append(f"{where}: {data_dir}/{name} is missing")
            continue
        if int(got) != exp["size"]:
            errors.append(f"{where}: {data_dir}/{name} has {got} bytes, expected {exp['size']}")
            continue
        for k in ("md5", "head_md5", "tail_md5"):
            if k in exp and facts.get(f"{k}:{name}") != exp[k]:
                errors.append(f"{where}: {data_dir}/{name} differs from the launcher's copy ({k} mismatch)")
                break
    try:
        free = int(facts.get("free_kib", "0")) * 1024
    except ValueError:
        free = 0
    if free < inv.min_free_bytes:
        errors.append(f"{where}: only {free >> 20} MiB free under {work_dir}, need {inv.min_free_bytes >> 20} MiB")
    if inv.runtime == "docker" and image and facts.get("image") != image.rsplit(":", 1)[-1]:
        errors.append(f"{where}: the container on ssh port {host.ssh_port} does not run {image} "
                      f"(it runs content hash {facts.get('image', 'none')}; start it with infra/start-node.sh)")
    if gpu_python:
        problems = gpu_problems(facts, host.slots, gpu_python)
        if problems:  # one clause per host for all its GPU problems
            errors.append(f"{where}: GPU preflight: " + ", ".join(problems))
    return errors


def over_ssh(inv: Inventory) -> bool:
    """Whether any rank or probe reaches its host over ssh."""
    return inv.runtime == "docker" or not all(is_local(h) for h in inv.hosts)


def known_hosts_path(inv: Inventory, wd: Workdir) -> Path:
    """Where the inventory's first-contact host keys are pinned."""
    return Path(inv.known_hosts) if inv.known_hosts else wd.root / ".ssh" / "known_hosts"


def check_inputs(inv: Inventory, recordio: Path, image: str | None, wd: Workdir | None = None) -> dict[str, Any]:
    """What can be judged on the launcher alone; nothing is written when this fails."""
    if wd is not None and over_ssh(inv) and not SHELL_SAFE_PATH.fullmatch(str(wd.runs)):
        raise StageError(f"workdir {str(wd.root)!r}: ranks on other hosts start in {wd.runs}/<run-id>, which Horovod "
                         "passes through their shell unquoted; use a path of letters, digits and ._+,:@=/-")
    if inv.runtime == "docker" and not image:
        raise StageError("preflight: runtime docker needs an image (pass image=… / --image, e.g. from `rn50 build`)")
    if inv.runtime == "docker" and len({h.ssh_port for h in inv.hosts}) > 1:
        # horovodrun runs inside the first container and reaches the others with one -p PORT.
        raise StageError("preflight: runtime docker needs the same ssh_port (the containers' sshd) on every host")
    return expected_data(recordio)


def preflight(inv: Inventory, expected: dict[str, Any], data_dir: str, work_dir: str, trust: Trust,
              image: str | None = None, gpu_python: str | None = None) -> None:
    """Check every host before any rank starts; raise one StageError line listing every failure.
    `gpu_python` (GPU configs): also GPUs >= slots, a working driver and Horovod's NCCL on every host."""
    errors: list[str] = []
    lock = threading.Lock()

    def one(h: Host) -> None:
        errs = _check_host(h, Remote(h, trust.config, inv.runtime), expected, inv, data_dir, work_dir, image, trust,
                           gpu_python)
        with lock:
            errors.extend(errs)

    threads = [threading.Thread(target=one, args=(h,)) for h in inv.hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        order = {h.label: i for i, h in enumerate(inv.hosts)}
        errors.sort(key=lambda e: order.get(e.split(" ")[1], 0))
        raise StageError("preflight failed: " + "; ".join(errors))


# --- launch -------------------------------------------------------------------------------------------


RANK_LINE = re.compile(r"^\[(\d+)\]<(stdout|stderr)>:(.*)$")
EXIT_LINE = re.compile(r"^Process (\d+) exit with status code (-?\d+)\.")


def new_run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def horovod_command(inv: Inventory, np: int, rank_argv: Sequence[str], start_timeout_s: int = 60) -> list[str]:
    hosts = ",".join(f"{h.host}:{h.slots}" for h in inv.hosts)
    argv = [sys.executable, "-m", "horovod.runner.launch", "-np", str(np), "-H", hosts,
            f"--{inv.controller}", "--start-timeout", str(start_timeout_s),
            # Horovod's own cache would skip the ssh check for an hour after one success.
            "--disable-cache"]
    if inv.interface:
        argv += ["--network-interfaces", inv.interface]
    return argv + list(rank_argv)


def in_first_container(inv: Inventory, argv: list[str], env: dict[str, str], trust: Trust) -> list[str]:
    """Runtime docker: run horovodrun inside the first host's container (as the seeds did by hand);
    it reaches the other containers' sshd with the key mounted at /root/.ssh (infra/start-node.sh),
    trusting only the host keys pinned on the launcher."""
    h0 = inv.hosts[0]
    inner = [inv.python or "python"] + argv[1:]  # the container's interpreter (as the ranks use), not the launcher's
    if h0.ssh_port:
        inner[inner.index("--disable-cache"):inner.index("--disable-cache")] = ["-p", str(h0.ssh_port)]
    keep = {k: v for k, v in env.items() if k not in ("PATH", "HOME", "PYTHONPATH", "USER", "LOGNAME")}
    remote = (container_wrapper_script(trust.lines(inv.hosts[1:])) + " && cd /tmp && env "
              + " ".join(f"{k}={shlex.quote(v)}" for k, v in keep.items()) + " " + shlex.join(inner))
    return ["ssh", "-F", str(trust.config), "-o", "StrictHostKeyChecking=yes", "--", h0.host, remote]


def rank_env(inv: Inventory, ssh_bin: Path | None) -> dict[str, str]:
    env = {k: os.environ[k] for k in ENV_ALLOWLIST if k in os.environ}
    path = [str(Path(sys.executable).parent), "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
    if ssh_bin:
        path.insert(0, str(ssh_bin))
    env["PATH"] = ":".join(path)
    env.update(read_env_file(inv.env_profile))
    env.update(dict(inv.env))
    if inv.interface:
        env.setdefault("NCCL_SOCKET_IFNAME", inv.interface)
    env["PYTHONUNBUFFERED"] = "1"
    return env


_DEATH_SIGNALS = {signal.SIGKILL, signal.SIGTERM, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS}


class _Streamer:
    """Splits horovodrun's prefixed output into per-rank logs, the launcher log and the task log."""

    def __init__(self, run_dir: Path, run_index: int, logger: logging.Logger, hosts_of_rank: dict[int, str]):
        self.dir, self.n, self.logger, self.hosts_of_rank = run_dir, run_index, logger, hosts_of_rank
        self.launcher = open(run_dir / f"launcher_{run_index}.log", "a", buffering=1)
        self.rank_files: dict[int, Any] = {}
        self.tail: dict[int, list[str]] = {}
        self.exits: list[tuple[int, int]] = []  # (rank, code) in the order horovod saw them
        self.lock = threading.Lock()

    def paths(self) -> list[Path]:
        return [Path(self.launcher.name)] + [Path(f.name) for f in self.rank_files.values()]

    def feed(self, line: str) -> None:
        line = line.rstrip("\n")
        with self.lock:
            self.launcher.write(line + "\n")
            m = RANK_LINE.match(line)
            if m:
                rank, stream, text = int(m.group(1)), m.group(2), m.group(3)
                f = self.rank_files.get(rank)
                if f is None:
                    f = self.rank_files[rank] = open(self.dir / f"rank{rank}_{self.n}.log", "a", buffering=1)
                    if rank != 0:  # rank 0's lines go to the task log; the others' only to their files
                        self.logger.info("[run %d rank %d] output in %s", self.n, rank, f.name)
                f.write(text + "\n")
                if stream == "stderr" and text.strip():
                    self.tail.setdefault(rank, []).append(text.strip())
                    del self.tail[rank][:-20]
                self.logger.log(logging.INFO if rank == 0 else logging.DEBUG, "[run %d rank %d] %s", self.n, rank, text)
                return
            e = EXIT_LINE.match(line)
            if e:
                self.exits.append((int(e.group(1)), int(e.group(2))))
            self.logger.info("[run %d launcher] %s", self.n, line)

    def _blame(self) -> tuple[int, int | None, str] | None:
        """The rank to blame: the first to exit non-zero that did not merely lose a peer (a Gloo
        "connection closed/reset by peer" is the echo of another rank's death), else the first to exit."""
        failed = [(r, c) for r, c in self.exits if c != 0]
        if not failed:
            return None
        primary = [(r, c) for r, c in failed if not self._lost_peer(r)]
        if not primary:
            # Under load the rank that raised can still be tearing down when its peers' "shut down" exits
            # arrive and horovodrun stops it: blame a rank that printed an exception of its own.
            primary = [(r, None) for r in sorted(self.tail) if r not in dict(failed) and not self._lost_peer(r)
                       and rank_logs.raised(self.tail[r])]
        rank, code = (primary or failed)[0]
        host = self.hosts_of_rank.get(rank, "?")
        if code is None:
            return rank, code, "raised, then stopped by horovodrun"
        # Through the launcher's `sh -c`, a rank that died by signal N exits 128+N: SIGKILL/SIGTERM (an OOM kill, a
        # stop), or a native crash (SIGSEGV, SIGABRT, SIGBUS).
        if code < 0 or code - 128 in _DEATH_SIGNALS:
            return rank, code, f"killed by signal {-code if code < 0 else code - 128}"
        if rank_logs.crashed(self.tail.get(rank, [])):
            return rank, code, f"crashed in native code, exit {code}"
        if code == 255 and not is_local_name(host):
            return rank, code, "exit 255: the ssh session died with the rank"
        return rank, code, f"exit {code}"

    def first_failure(self) -> str | None:
        blamed = self._blame()
        if blamed is None:
            return None
        rank, _, reason = blamed
        err = rank_logs.last_error(self.tail.get(rank, []))
        return f"rank {rank} on {self.hosts_of_rank.get(rank, '?')} failed first ({reason})" + (f": {err}" if err else "")

    def lost_to_signal_or_ssh(self) -> bool:
        """The blamed rank was killed or lost with its ssh session without raising an exception of its own:
        an OOM kill or a node hiccup, which a retry may not meet again."""
        blamed = self._blame()
        if blamed is None or blamed[1] is None:
            return False
        rank, _, reason = blamed
        return (reason.startswith(("killed by signal", "exit 255", "crashed in native code"))
                and not rank_logs.raised(self.tail.get(rank, [])))

    def _lost_peer(self, rank: int) -> bool:
        return rank_logs.lost_peer(self.tail.get(rank, []))

    def close(self) -> None:
        self.launcher.close()
        for f in self.rank_files.values():
            f.close()


def _hosts_of_rank(inv: Inventory, np: int) -> dict[int, str]:
    out, r = {}, 0
    for h in inv.hosts:  # horovod fills hosts in order, slot by slot
        for _ in range(h.slots):
            if r < np:
                out[r] = h.host
            r += 1
    return out


def _run_one(argv: list[str], env: dict[str, str], cwd: Path, streamer: _Streamer, timeout_s: float) -> tuple[int, bool]:
    # horovodrun gets SIGTERM if this thread dies (kill -9 of the flow or `rn50 run`); on SIGTERM it stops its
    # local ranks (through Horovod's middleman processes) and its ssh sessions.
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, errors="replace", start_new_session=True,
                            preexec_fn=die_with_parent(signal.SIGTERM))
    timed_out = threading.Event()

    def kill_on_timeout() -> None:
        timed_out.set()
        _stop(proc)

    timer = threading.Timer(timeout_s, kill_on_timeout)
    timer.daemon = True
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            streamer.feed(line)
        code = proc.wait()
    except BaseException:  # a cancel (Prefect's TerminationSignal), Ctrl-C, or an error of ours
        _stop(proc)
        raise
    finally:
        timer.cancel()
    return code, timed_out.is_set()


def _stop(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM lets horovodrun tear down its ranks and ssh sessions; SIGKILL the group if it hangs."""
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()


def reap_remote(inv: Inventory, trust: Trust, run_dir: Path, logger: logging.Logger) -> None:
    """After a cancel: stop whatever of this run still runs on the other hosts (ranks, or horovodrun itself
    inside the first node's container). Every process of the run names its run directory on its command line."""
    pattern = shlex.quote("--out " + re.escape(str(run_dir)))
    for host in inv.hosts:
        remote = Remote(host, trust.config, inv.runtime)
        if remote.local:
            continue
        try:
            remote.run(f"pkill -TERM -f -- {pattern}; sleep 2; pkill -KILL -f -- {pattern}; true", timeout=20)
        except subprocess.TimeoutExpired:
            logger.warning("cancel: %s did not answer; its ranks end when their ssh session is gone", host.label)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _finish(run_dir: Path, status: dict[str, Any]) -> None:
    write_json_atomic(run_dir / "status.json", status)
    if status["status"] in ("failed", "cancelled"):
        write_text_atomic(run_dir / status["status"].upper(), status.get("error", status["status"]) + "\n")


def train(
    workdir: Path | str,
    hosts: Path | str | Inventory | None = None,
    config: str = "cpu-demo",
    runs: int = 1,
    image: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    seed: int | None = None,
    entry: Sequence[str] | None = None,
    extra_args: Sequence[str] = (),
    logger: logging.Logger | None = None,
    on_job: Callable[[str, str], None] | None = None,
) -> TrainResult:
    """Preflight, then `runs` Horovod jobs of `python -m rn50.train` writing runs/<run-id>/result_<n>.txt.

    Exactly global_batch_size / batch_size ranks of the training config (with the `--set` overrides in
    `extra_args`): an inventory whose slots differ is refused before anything runs or is written.
    A hosts file saying `launcher: slurm` goes to tasks.slurm.launch (one sbatch job, srun ranks);
    `on_job(job_id, state)` is then called on every Slurm job state change.

    `hosts`: inventory YAML path (or a parsed Inventory); None = this machine, one slot per GPU
    (`nvidia-smi -L`) for a GPU config, global_batch_size / batch_size slots for a CPU config.
    A GPU config (float16 / NHWC / mixed decode) is also preflighted on every host for GPUs >= slots,
    a working driver and a Horovod built with NCCL in the ranks' interpreter.
    `seed`: run n gets seed + n (default: a fresh random base, recorded in status.json).
    `entry`: the rank program (default `<python> -m rn50.train`); it is given
    `--config C --data D --out RUN_DIR --run-index N --seed S` and must write RUN_DIR/result_<N>.txt.
    """
    logger = logger or log
    from tasks import slurm

    if isinstance(hosts, slurm.SlurmSpec) or (isinstance(hosts, (str, Path)) and slurm.is_slurm_file(hosts)):
        spec = hosts if isinstance(hosts, slurm.SlurmSpec) else slurm.load(hosts)
        return slurm.launch(workdir, spec, config=config, runs=runs, image=image, timeout_s=timeout_s, seed=seed,
                            entry=entry, extra_args=extra_args, logger=logger, on_job=on_job)
    wd = Workdir(workdir)
    if runs < 1:
        raise StageError(f"--runs must be >= 1, not {runs}")
    cfg = training_config(config, extra_args)
    if hosts is None:
        inv = local_default(cfg)
        where = (f"this host (no --hosts) has {inv.total_slots} GPU(s), so" if needs_gpu(cfg)
                 else "the local default has")
        fix = f"give --hosts with {ranks_needed(cfg)} slot(s) in total"
    else:
        inv = hosts if isinstance(hosts, Inventory) else load_inventory(hosts)
        where = "the inventory has" if isinstance(hosts, Inventory) else f"inventory {hosts} has"
        fix = f"give its hosts {ranks_needed(cfg)} slot(s) in total"
    err = slot_error(cfg, inv.total_slots, where, fix)
    if err:
        raise StageError(err)
    np = inv.total_slots
    python = inv.python or ("python" if inv.runtime == "docker" else sys.executable)
    if entry is None:
        entry = [python, "-m", "rn50.train"]
    recordio = wd.recordio
    data_dir = inv.data_dir or str(recordio)
    base_seed = seed if seed is not None else secrets.randbelow(2**31 - runs)
    seeds = [base_seed + n for n in range(runs)]

    expected = check_inputs(inv, recordio, image, wd)
    data_digest = hashlib.sha256(repr(sorted(expected.items())).encode()).hexdigest()

    run_id = new_run_id()
    run_dir = wd.runs / run_id
    run_dir.mkdir(parents=True)
    launcher_dir = run_dir / ".launcher"
    if over_ssh(inv):
        prepare_known_hosts(known_hosts_path(inv, wd))
    trust = ssh_setup(launcher_dir, inv.hosts, known_hosts_path(inv, wd))
    started = time.time()
    status: dict[str, Any] = {
        "run_id": run_id, "status": "running", "config": config, "np": np, "runs": runs, "seeds": seeds,
        "hosts": [f"{h.label}:{h.slots}" for h in inv.hosts], "runtime": inv.runtime, "image": image,
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(),
    }
    write_json_atomic(run_dir / "status.json", status)
    logs: list[Path] = []
    # Should this process die (kill -9), the tether stops horovodrun and the local ranks it leaves behind.
    tether = Tether()
    try:
        preflight(inv, expected, data_dir, str(inv.work_dir or wd.root), trust, image,
                  gpu_python=python if needs_gpu(cfg) else None)
        ssh_bin = write_wrapper(launcher_dir / "bin", trust.config).parent
        env = tether.env(rank_env(inv, ssh_bin))
        results = []
        for n, s in enumerate(seeds):
            rank_argv = list(entry) + ["--config", config, "--data", data_dir, "--out", str(run_dir),
                                       "--run-index", str(n), "--seed", str(s)] + list(extra_args)
            argv = horovod_command(inv, np, rank_argv)
            if inv.runtime == "docker":
                argv = in_first_container(inv, argv, env, trust)
            logger.info("run %d/%d (seed %d): %s", n + 1, runs, s, shlex.join(argv))
            streamer = _Streamer(run_dir, n, logger, _hosts_of_rank(inv, np))
            try:
                code, timed_out = _run_one(argv, env, run_dir, streamer, timeout_s)
            finally:
                streamer.close()
                logs += [p for p in streamer.paths() if p not in logs]
            if timed_out:
                raise StageError(f"run {n}: timed out after {timeout_s:.0f} s; ranks were stopped"
                                 + (f" ({streamer.first_failure()})" if streamer.first_failure() else ""))
            if code != 0:
                why = streamer.first_failure() or rank_logs.last_error(
                    [ln.strip() for ln in Path(streamer.launcher.name).read_text().splitlines() if ln.strip()])
                # A rank killed by a signal, or an ssh session lost with its rank, may be a node hiccup: worth a
                # retry. A rank that raised fails the same way again.
                lost = streamer.lost_to_signal_or_ssh()
                raise (TransientError if lost else StageError)(f"run {n}: horovodrun exit {code}: {why}")
            result = run_dir / f"result_{n}.txt"
            if not result.is_file():
                raise StageError(f"run {n}: ranks exited 0 but {result.name} was not written")
            if "run_stop" not in result.read_text():
                raise StageError(f"run {n}: {result.name} has no run_stop (the run did not finish)")
            results.append(result)
    except BaseException as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        cancelled = not isinstance(e, Exception)  # Prefect's TerminationSignal (a cancel), Ctrl-C, SystemExit
        status.update(status="cancelled" if cancelled else "failed", error=msg,
                      duration_s=round(time.time() - started, 3))
        _finish(run_dir, status)
        if cancelled:
            logger.warning("train attempt %s cancelled (%s); its logs are kept in %s", run_id, type(e).__name__, run_dir)
            reap_remote(inv, trust, run_dir, logger)
            raise  # as it came: a cancellation is never turned into a retryable failure
        logger.error("train attempt %s failed (kept in %s): %s", run_id, run_dir, msg)
        if isinstance(e, StageError):
            raise
        raise StageError(f"train attempt {run_id} failed: {msg}") from e
    finally:
        tether.close()
    status.update(status="succeeded", duration_s=round(time.time() - started, 3),
                  results=[p.name for p in results])
    _finish(run_dir, status)
    return TrainResult(
        run_id=run_id, run_dir=str(run_dir), status="succeeded", config=config, np=np,
        hosts=status["hosts"], runtime=inv.runtime, image=image, runs=runs, seeds=seeds,
        results=[str(p) for p in results], result_md5={p.name: file_digest(p) for p in results},
        logs=[str(p) for p in logs], data_digest=data_digest, duration_s=status["duration_s"],
    )


# --- CLI ---------------------------------------------------------------------------------------------


def add_command(subparsers) -> None:
    p = subparsers.add_parser("train", help="launch Horovod training across the inventory's hosts",
                              description=train.__doc__)
    p.add_argument("workdir", type=Path)
    p.add_argument("--hosts", type=Path, default=None,
                   help="inventory YAML (default: this host, one slot per GPU for a GPU config, "
                        "global_batch_size / batch_size slots for a CPU config)")
    p.add_argument("--config", default="cpu-demo", help="configs/training/NAME.yaml or a path")
    p.add_argument("--runs", type=int, default=1, help="independent runs, distinct seeds (5 for a submission set)")
    p.add_argument("--image", default=None, help="image tag for runtime: docker (from `rn50 build`)")
    p.add_argument("--seed", type=int, default=None, help="seed of run 0 (run n uses seed+n)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds before a hung run is stopped")
    p.set_defaults(run=_cli)


def _cli(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    res = train(args.workdir, hosts=args.hosts, config=args.config, runs=args.runs, image=args.image,
                 timeout_s=args.timeout, seed=args.seed)
    print(res.to_json())
    return 0
