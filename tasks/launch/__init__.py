"""The launcher contract: what the train stage needs from whatever starts its ranks.

A backend is one module of this package with one class that does the things below, registered in
`BACKENDS` under the hosts file's `launcher:` value (`ssh`, the default, or `slurm`). A backend knows its
section of the hosts file and how ranks start, run, stop and are cleaned up on its kind of cluster; it knows
nothing of Prefect, of status files, results or retries. The train stage (tasks/train.py) owns those, so every
guarantee that must hold on every backend (statuses, cancel, retry rules, a lost cluster slot, orphans of a
killed launcher, the ranks' environment) is written once, above the backends.

    parse(doc, source)       classmethod: its hosts file, validated as data; a one-line StageError
    ranks                    how many ranks it starts (the stage refuses a mismatch with the config)
    slots_text(need)         (where, fix): the words of that refusal
    rank_python(image)       the ranks' interpreter (the hosts file's, the image's, or this one)
    check(job)               what can be judged without touching a host; [] to go on (nothing is written before)
    preflight(job)           one line per problem found before any rank starts; [] to go on
    run(job, events)         job.argvs one run after another, stopping at the first that fails;
                             a RunOutcome per run started
    cancel()                 from any thread: stop every rank and job of the running job within 30 s
    reap(handle)             stop what a killed launcher left, from the handle it recorded (events.handle)
    distribute(src, work_dir, expected, progress, parallel)
                             put the recordio files of `src` onto every host's node-local `data_dir` (hosts
                             file `data_local: true`), each copy proven by its full md5 (`expected`:
                             source_digests()); one dict per host ({host, action, bytes_sent, files}); action
                             `in-job` says the backend stages inside the training job instead (Slurm)

`events` is the stage's: `line(run, rank, text)` streams output (rank None: the launcher's own), `handle(**facts)`
records what names the running work outside this process (a Slurm job id) where the next run finds it, and
`on_death(argv)` asks the stage's tether to run argv should this process die by SIGKILL.

A Kubernetes MPIJob backend would be one more module, `tasks/launch/mpijob.py`: `parse` reads a `kubernetes:`
section (namespace, image, workers, slots per worker, resources, the data volume); `ranks` is workers x slots;
`preflight` asks the API server for the namespace, the quota and the data volume claim; `run` creates one MPIJob
per run whose launcher pod runs the rank argv, records its name with `events.handle(mpijob=NAME)`, registers
`kubectl delete mpijob NAME` with `events.on_death`, streams the pods' logs through `events.line` and maps the
worker pods' termination reasons (Error, OOMKilled, a signal) to a RankFailure; `cancel` and `reap` delete the
MPIJob. `distribute` would return `in-job`, as Slurm's does: with node-local data each worker pod gets an init
container that runs NODE_SH's rn50_stage (the Slurm staging step's script) from the shared volume into an emptyDir
or a local PersistentVolume before its rank starts, since pods may land on any node. It is not built: no Kubernetes
control plane runs on the machines this project is tested on.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import re
import signal
from pathlib import Path
from typing import Any, ClassVar, Protocol, Sequence

from tasks import paths, rank_logs
from tasks.common import StageError, file_digest, write_json_atomic

# launcher: value -> "module:Class"; imported on use, so no backend imports another or the stage.
BACKENDS = {"ssh": "tasks.launch.ssh:SshLauncher", "slurm": "tasks.launch.slurm:SlurmLauncher"}

RECORDIO_FILES = ("train.rec", "train.idx", "val.rec", "val.idx")
# The .rec files can be ~140 GB: their size, the md5 of their first and last MiB and the full md5 of each .idx
# (which holds every record's offset) catch a wrong or truncated copy without reading it all before each launch.
SAMPLE_BYTES = 1 << 20
# What the ranks get of the launching process's environment: nothing else, so the worker's credentials (AWS_*,
# PREFECT_API_KEY, tokens) never reach a rank, a remote command line, a batch script or a log.
ENV_ALLOWLIST = ("HOME", "LANG", "LC_ALL", "USER", "LOGNAME", "TMPDIR", "TZ", "PYTHONPATH")
STD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ENV_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
ENV_PROFILE_MAX_BYTES = 64 << 10
# Places whose files are not configuration, whatever they hold: an env profile there is refused.
_NOT_CONFIG = ("/proc/", "/sys/", "/dev/")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# How a rank failed, as a backend saw it. The stage retries the kinds a second attempt may not meet again.
RAISED, EXITED, SIGNALLED, NATIVE_CRASH, LOST_SESSION, NODE_FAILED = (
    "raised", "exited", "signalled", "native-crash", "lost-session", "node-failed")
TRANSIENT_KINDS = (SIGNALLED, NATIVE_CRASH, LOST_SESSION, NODE_FAILED)
_DEATH_SIGNALS = {signal.SIGKILL, signal.SIGTERM, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS}


@dataclasses.dataclass(frozen=True)
class Job:
    """One attempt of the train stage, as a backend sees it."""

    run_id: str
    out_dir: Path  # the ranks' --out; the backend writes its logs here (launcher_<n>.log, rank<r>_<n>.log)
    data_dir: str  # recordio as the ranks see it
    argvs: tuple[tuple[str, ...], ...]  # the rank program's argv, one per run
    env: dict[str, str]  # the ranks' environment, before the backend adds its own (PATH, rendezvous)
    timeout_s: float  # per run
    work_dir: str  # the work dir's root as the ranks see it
    expected: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # expected_data() of recordio
    image: str | None = None  # the container stage's image, for backends that run ranks in one
    gpu_python: str | None = None  # a GPU config: the interpreter whose Horovod must have NCCL

    @property
    def runs(self) -> int:
        return len(self.argvs)


@dataclasses.dataclass(frozen=True)
class RankFailure:
    rank: int
    host: str
    kind: str  # one of RAISED .. NODE_FAILED
    detail: str  # e.g. "killed by signal 9", "exited with exit code 1"
    error: str  # the rank's own last error line, or ""

    def __str__(self) -> str:
        where = f" on {self.host}" if self.host else ""
        return f"rank {self.rank}{where} failed first ({self.detail})" + (f": {self.error}" if self.error else "")


@dataclasses.dataclass(frozen=True)
class RunOutcome:
    index: int
    ok: bool
    summary: str = ""  # the backend's one-line verdict when not ok, e.g. "horovodrun exit 1", "slurm job 7 FAILED"
    failure: RankFailure | None = None
    timed_out: bool = False


class Events(Protocol):
    def line(self, run: int, rank: int | None, text: str) -> None: ...

    def handle(self, **facts: str) -> None: ...

    def on_death(self, argv: Sequence[str]) -> None: ...


class Launcher(Protocol):
    name: ClassVar[str]
    ranks: int
    data_dir: str | None  # recordio as the ranks see it (None: the work dir's)
    env_profile: str | None  # None: gpu when the ranks run in an image, else cpu
    env: tuple[tuple[str, str], ...]
    interface: str | None
    runtime: str  # what TrainResult records: local | docker | slurm
    data_local: bool  # data_dir is on each host's own disk (the distribute stage copies it there)

    @classmethod
    def parse(cls, doc: Any, source: str) -> "Launcher": ...

    def slots_text(self, need: int) -> tuple[str, str]: ...

    def rank_python(self, image: str | None) -> str: ...

    def hosts(self) -> list[str]: ...

    def check(self, job: Job) -> list[str]: ...

    def preflight(self, job: Job) -> list[str]: ...

    def run(self, job: Job, events: Events) -> list[RunOutcome]: ...

    def cancel(self) -> None: ...

    def reap(self, handle: dict[str, Any]) -> None: ...

    def distribute(self, src: Path, work_dir: Path, expected: dict[str, dict[str, Any]],
                   progress: Any = None, parallel: int = 4) -> list[dict[str, Any]]: ...


# --- the hosts file ----------------------------------------------------------------------------------


def backend_class(name: Any, source: str = "hosts file") -> type:
    if not isinstance(name, str) or name not in BACKENDS:
        raise StageError(f"{source}: launcher must be one of {', '.join(BACKENDS)}, not {str(name)[:40]!r}")
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def read_hosts_file(path: Path | str) -> Any:
    """The YAML document of a hosts file, or a one-line error. Size-capped: it is data from a user."""
    import yaml

    path = Path(path)
    try:
        if path.stat().st_size > 1 << 20:
            raise StageError(f"hosts file {path} is larger than 1 MiB")
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise StageError(f"hosts file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise StageError(f"hosts file {path} cannot be read: {e}") from None
    except yaml.YAMLError as e:
        raise StageError(f"hosts file {path} is not valid YAML: {str(e).splitlines()[0]}") from None


def load(hosts: Any, source: str | None = None) -> Launcher:
    """A launcher from a hosts file path, its parsed document, or a launcher already built."""
    if hasattr(hosts, "run") and hasattr(hosts, "preflight"):
        return hosts
    if isinstance(hosts, (str, Path)):
        source = source or str(hosts)
        hosts = read_hosts_file(hosts)
    source = source or "hosts file"
    name = hosts.get("launcher", "ssh") if isinstance(hosts, dict) else "ssh"
    return backend_class(name, source).parse(hosts, source)


# --- the ranks' environment ----------------------------------------------------------------------------


def check_env_profile(value: Any, source: str) -> str:
    """An env profile is a name in configs/env/ or a readable KEY=value text file; validated at parse time."""
    if isinstance(value, str) and ENV_PROFILE_NAME.fullmatch(value):
        if not (paths.KINDS["env"][0] / f"{value}.env").is_file():
            raise StageError(f"{source}: env_profile {value!r} is not in configs/env/ "
                             f"(known: {', '.join(paths.known('env'))})")
        return value
    if not isinstance(value, str) or not value.startswith("/") or _CONTROL.search(value):
        raise StageError(f"{source}: env_profile {str(value)[:60]!r} is not a profile name (configs/env/NAME.env) "
                         "or an absolute path")
    read_env_file(value, source)
    return value


def read_env_file(profile: str, source: str | None = None) -> dict[str, str]:
    """KEY=VALUE lines (the format the Dockerfile's entrypoint sources): `#` comments, no expansion. A path must
    be a regular file of at most 64 KiB of text outside /proc, /sys and /dev."""
    path = paths.resolve("env", profile)
    where = f"{source}: env_profile {profile}" if source else f"env profile {path}"
    real = os.path.realpath(path)
    if real.startswith(_NOT_CONFIG) or not Path(real).is_file():
        raise StageError(f"{where}: {real} is not a regular configuration file")
    if Path(real).stat().st_size > ENV_PROFILE_MAX_BYTES:
        raise StageError(f"{where}: larger than {ENV_PROFILE_MAX_BYTES >> 10} KiB")
    data = Path(real).read_bytes()
    if b"\0" in data:
        raise StageError(f"{where}: holds NUL bytes; expected NAME=value lines")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise StageError(f"{where}: is not UTF-8 text; expected NAME=value lines") from None
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        k, sep, v = line.partition("=")
        if not sep or not ENV_KEY_RE.fullmatch(k.strip()):
            raise StageError(f"{where}:{n}: expected NAME=value, got {line[:60]!r}")
        out[k.strip()] = v.strip().strip('"').strip("'")
    return out


def check_env(value: Any, source: str) -> tuple[tuple[str, str], ...]:
    env = value or {}
    if not isinstance(env, dict):
        raise StageError(f"{source}: `env:` must be a mapping of NAME: value")
    for k, v in env.items():
        if not isinstance(k, str) or not ENV_KEY_RE.fullmatch(k):
            raise StageError(f"{source}: env key {str(k)[:40]!r} is not a variable name ([A-Za-z_][A-Za-z0-9_]*)")
        if not isinstance(v, (str, int, float, bool)) or "\x00" in str(v):
            raise StageError(f"{source}: env.{k} must be a string or number without NUL bytes")
    return tuple(sorted((str(k), str(v)) for k, v in env.items()))


def rank_environment(launcher: Launcher, image: str | None) -> dict[str, str]:
    """The ranks' environment on every backend, before the backend adds PATH and its own: the allow-list of this
    process's, the env profile, the hosts file's `env:`, the interface."""
    env = {k: os.environ[k] for k in ENV_ALLOWLIST if k in os.environ}
    env.update(read_env_file(launcher.env_profile or ("gpu" if image else "cpu")))
    env.update(dict(launcher.env))
    if launcher.interface:
        env.setdefault("HOROVOD_GLOO_IFACE", launcher.interface)
        env.setdefault("NCCL_SOCKET_IFNAME", launcher.interface)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --- data and failures -----------------------------------------------------------------------------------


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


def exit_kind(code: int | None, lines: Sequence[str], remote: bool = False) -> tuple[str, str]:
    """(kind, detail) of a rank's exit `code` as its launcher reported it (negative: killed by that signal; 128+N:
    through a shell; None: stopped after it raised) and its output: the one rule every backend classifies by."""
    if code is None:
        return RAISED, "raised, then stopped by its launcher"
    sig = -code if code < 0 else code - 128 if code - 128 in _DEATH_SIGNALS else None
    if sig is not None:
        kind = NATIVE_CRASH if sig in (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS) else SIGNALLED
        detail = f"killed by signal {sig}"
    elif rank_logs.crashed(lines):
        kind, detail = NATIVE_CRASH, f"crashed in native code, exit {code}"
    elif code == 255 and remote:
        kind, detail = LOST_SESSION, "exit 255: the ssh session died with the rank"
    else:
        kind, detail = EXITED, f"exit {code}"
    return (RAISED if rank_logs.raised(lines) else kind), detail


def is_transient(failure: RankFailure | None) -> bool:
    """A rank killed, crashed in native code or lost with its node or session may be a node hiccup that a retry
    does not meet again; a rank that raised fails the same way again."""
    return failure is not None and failure.kind in TRANSIENT_KINDS


# --- node-local copies of the data (the distribute stage) ------------------------------------------------

MD5_CACHE = ".rn50-md5.json"  # beside the source files; hidden, so the archive stage leaves it out
STAMPS = ".rn50-verified"  # under data_dir: one stamp per verified copy, "SIZE MTIME FULL_MD5"


def source_digests(recordio: Path) -> dict[str, dict[str, Any]]:
    """expected_data() plus every file's full md5 (`md5`), which proves a copy. Read once per file version: cached
    in recordio/.rn50-md5.json under each file's size and mtime_ns, so a rerun does not re-read 140 GB."""
    out = expected_data(recordio)
    cache_path = recordio / MD5_CACHE
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    changed = False
    for name, exp in out.items():
        st = (recordio / name).stat()
        version = f"{st.st_size}:{st.st_mtime_ns}"
        hit = cache.get(name)
        if isinstance(hit, dict) and hit.get("version") == version and re.fullmatch(r"[0-9a-f]{32}",
                                                                                     str(hit.get("md5"))):
            exp["md5"] = hit["md5"]
            continue
        exp["md5"] = exp.get("md5") or file_digest(recordio / name)  # an .idx's is in expected_data already
        cache[name], changed = {"version": version, "md5": exp["md5"]}, True
    if changed:
        write_json_atomic(cache_path, cache)
    return out


def node_specs(expected: dict[str, dict[str, Any]]) -> list[str]:
    """NAME SIZE MD5 HEAD TAIL per file (`-`: no sample), the words NODE_SH's functions take."""
    return [w for name, e in sorted(expected.items())
            for w in (name, str(e["size"]), e["md5"], e.get("head_md5", "-"), e.get("tail_md5", "-"))]


# POSIX sh functions run on a host, the same on every backend. A copy is written to DIR/.NAME.part (resumed from
# its size), its full md5 checked, then renamed to DIR/NAME and stamped: a rank never sees half a file.
# rn50_state: `have NAME stamp` when the file has its size, sampled digests (the preflight's rule) and a stamp
# of its current size and mtime with the right md5 (seconds, whatever the size); `have NAME md5` when only the
# stamp is off but a full md5 on the host matches (then stamped); else `need NAME PART_BYTES OLD_BYTES`.
NODE_SH = r'''
rn50_stamp() {
  mkdir -p "$1/.rn50-verified" && echo "$(stat -c '%s %.9Y' "$1/$2") $3" > "$1/.rn50-verified/.$2.tmp" \
    && mv -f "$1/.rn50-verified/.$2.tmp" "$1/.rn50-verified/$2"
}
rn50_state() {
  _f="$1/$2" _p="$1/.$2.part"
  _part=$(stat -c %s "$_p" 2>/dev/null || echo 0)
  if [ "$_part" -gt "$3" ]; then rm -f "$_p"; _part=0; fi
  _old=$(stat -c %s "$_f" 2>/dev/null || echo 0)
  if [ -f "$_f" ] && [ "$_old" = "$3" ] \
     && { [ "$5" = - ] || [ "$(head -c SAMPLE "$_f" | md5sum | cut -c1-32)" = "$5" ]; } \
     && { [ "$6" = - ] || [ "$(tail -c SAMPLE "$_f" | md5sum | cut -c1-32)" = "$6" ]; }; then
    if [ "$(cat "$1/.rn50-verified/$2" 2>/dev/null)" = "$(stat -c '%s %.9Y' "$_f") $4" ]; then
      echo "have $2 stamp"; return 0
    fi
    if [ "$(md5sum < "$_f" | cut -c1-32)" = "$4" ]; then rn50_stamp "$1" "$2" "$4" && echo "have $2 md5"; return; fi
  fi
  echo "need $2 $_part $_old"
}
rn50_receive() {
  rm -f "$1/$2" "$1/.rn50-verified/$2" && mkdir -p "$1" && truncate -s "$3" "$1/.$2.part" && cat >> "$1/.$2.part"
}
rn50_finish() {
  _got=$(md5sum < "$1/.$2.part" | cut -c1-32)
  if [ "$_got" != "$3" ]; then rm -f "$1/.$2.part"; echo "bad $2 $_got"; return 1; fi
  rm -f "$1/.rn50-verified/$2" && mv -f "$1/.$2.part" "$1/$2" && rn50_stamp "$1" "$2" "$3" && echo "done $2"
}
rn50_free() {
  _d=$1; while [ ! -d "$_d" ]; do _d=$(dirname "$_d"); done; df -PB1 "$_d" | awk 'NR==2 {print $4}'
}
_rn50_need() { _todo="$_todo $2 " _need=$((_need + $5 - $3)) _room=$((_room + $4)); }
rn50_stage() {
  _src=$1 _dir=$2; shift 2; _specs=$* _h=$(hostname) _todo= _need=0 _room=$(rn50_free "$_dir")
  set -- $_specs
  while [ $# -ge 5 ]; do
    _st=$(rn50_state "$_dir" "$1" "$2" "$3" "$4" "$5")
    echo "rn50-stage: $_h: $_st"
    case $_st in need\ *) _rn50_need $_st "$2" ;; esac
    shift 5
  done
  if [ "$_need" -gt "$_room" ]; then
    echo "rn50-stage: error: node $_h: not enough space under $_dir: the copy needs $_need bytes, $_room are free"
    return 3
  fi
  set -- $_specs
  while [ $# -ge 5 ]; do
    case "$_todo" in *" $1 "*)
      _off=$(stat -c %s "$_dir/.$1.part" 2>/dev/null || echo 0)
      tail -c +$((_off + 1)) "$_src/$1" | rn50_receive "$_dir" "$1" "$_off" \
        || { echo "rn50-stage: error: node $_h: copying $_src/$1 to $_dir failed"; return 4; }
      _r=$(rn50_finish "$_dir" "$1" "$3") \
        || { echo "rn50-stage: error: node $_h: $_dir/$1: the copy's md5 is not the source's ($_r)"; return 5; }
      echo "rn50-stage: $_h: copied $1 ($(($2 - _off)) bytes from offset $_off)" ;;
    esac
    shift 5
  done
}
'''.replace("SAMPLE", str(SAMPLE_BYTES))
