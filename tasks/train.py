"""Train stage (`rn50 train`, `tasks.train.train`): N runs of `python -m rn50.train` on the ranks a launcher
starts, each run writing runs/<run-id>/result_<n>.txt.

How ranks start is the launcher's business (tasks/launch: `ssh`, horovodrun over SSH, the default; `slurm`, one
batch job), chosen by the hosts file's `launcher:` value. Everything else is this stage's, the same on every
backend:
- World size by construction: the ranks are exactly global_batch_size / batch_size of the training config the
  ranks will run (with the `--set` overrides they get); a hosts file with other slots is refused (one line,
  exit 2 from the CLI) before anything runs or is written. Without --hosts, this machine gets one slot per GPU
  (`nvidia-smi -L`) for a GPU config, global_batch_size / batch_size slots for a CPU one.
- The ranks' environment (tasks.launch.rank_environment): an allow-list of this process's, the env profile,
  the hosts file's `env:`; never the worker's credentials.
- Every call is one *attempt* with a fresh run id and runs/<run-id>/status.json saying `running`, then one of
  `success`, `failed` (a marker FAILED beside it), `cancelled` (a Prefect cancel, SIGTERM or Ctrl-C: every rank
  and job is stopped, never retried), `lost-slot` (the cluster lease ended under the run: it is stopped, never
  left running beside the next holder) or `aborted` (its launcher was killed: the next attempt found it, stopped
  what it left and marked it). `cancelled` and `lost-slot` are written before the stop, with `stopping` until it
  ends: should the launcher be killed meanwhile, the next attempt finishes the stop. A failed attempt keeps its
  directory, so a retry starts clean beside it.
- Retries: a rank killed by a signal, crashed in native code or lost with its node or ssh session is a
  TransientError (Prefect retries it once); a rank that raised, a config error, a failed preflight or a timeout
  is a StageError (not retried).
- A killed launcher (kill -9) leaves nothing: the tether stops the ranks and runs what the backend registered
  (`scancel`); should the tether have died too, the next attempt reaps the dead one's recorded handle before it
  waits for the cluster slot.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import hashlib
import logging
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

from rn50.config import needs_gpu
from tasks import launch, paths, rank_logs
from tasks.common import (Result, StageError, TransientError, Workdir, file_digest, write_json_atomic,
                          write_text_atomic)
from tasks.holder import holder_identity, holder_is_gone
from tasks.inventory import Inventory, local_inventory
from tasks.launch.ssh import SshLauncher
from tasks.tether import Tether

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 6 * 3600
GPU_PROBE_TIMEOUT_S = 60


@dataclasses.dataclass
class TrainResult(Result):
    run_id: str
    run_dir: str
    status: str  # success
    config: str
    np: int  # ranks = global_batch_size / batch_size of the config
    hosts: list[str]
    runtime: str  # local | docker | slurm
    image: str | None
    runs: int
    seeds: list[int]
    results: list[str]  # result_<n>.txt, one per run
    result_md5: dict[str, str]
    logs: list[str]  # the launcher's logs and one log per rank and run
    data_digest: str  # digest of the recordio files the ranks read (sizes + idx md5 + rec samples)
    duration_s: float


# --- the training config: how many ranks, and whether they need GPUs ---------------------------------


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


class _LocalDefault(SshLauncher):
    """No --hosts: this machine, with one slot per GPU for a GPU config, else global_batch_size / batch_size."""

    def __init__(self, cfg: dict[str, Any]):
        if not needs_gpu(cfg):
            super().__init__(local_inventory(ranks_needed(cfg)))
            self.where = "the local default has"
            return
        gpus = local_gpu_count()
        if gpus == 0:
            raise StageError(f"config {cfg['name']!r} needs GPUs (float16 / NHWC / mixed decode), and `nvidia-smi -L` "
                             "lists none on this host; give --hosts")
        super().__init__(local_inventory(gpus))
        self.where = f"this host (no --hosts) has {gpus} GPU(s), so"

    def slots_text(self, need: int) -> tuple[str, str]:
        return self.where, f"give --hosts with {need} slot(s) in total"


def new_run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


# --- one attempt ----------------------------------------------------------------------------------------


def _finish(run_dir: Path, status: dict[str, Any]) -> None:
    write_json_atomic(run_dir / "status.json", status)
    if status["status"] != "success":
        write_text_atomic(run_dir / status["status"].upper(), status.get("error", status["status"]) + "\n")


def reap_orphans(wd: Workdir, launcher: launch.Launcher, logger: logging.Logger) -> list[str]:
    """Attempts of this work dir still `running`, or killed while stopping their ranks, whose launcher is gone
    (a kill -9 the tether did not outlive): stop what their recorded handle names; a running one is marked
    `aborted`, one that was stopping keeps its verdict. Returns their run ids."""
    import json

    reaped = []
    for path in sorted(wd.runs.glob("*/status.json")) if wd.runs.is_dir() else []:
        try:
            st = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(st, dict) or st.get("launcher") != launcher.name:
            continue
        if st.get("status") != "running" and st.get("stopping") is not True:
            continue
        if not isinstance(st.get("holder"), dict) or not holder_is_gone(st["holder"]):
            continue
        launcher.reap(st.get("handle") or {})
        half_stopped = st.pop("stopping", None) is True
        died = f"its launcher (pid {st['holder'].get('pid')}) died" + (" while stopping it" if half_stopped else "")
        stopped = f"stopped what it left ({st.get('handle') or 'nothing recorded'})"
        if st.get("status") == "running":
            st.update(status="aborted", error=f"{died}; {stopped}")
        else:
            st["error"] = f"{st.get('error') or st['status']}; {died}; the next attempt {stopped}"
        _finish(path.parent, st)
        logger.warning("train: attempt %s was left %s by a launcher that died: %s", path.parent.name,
                       "half-stopped" if half_stopped else "running", st["error"])
        reaped.append(path.parent.name)
    return reaped


class _Attempt:
    """The stage's side of a launcher's `events`: logs, the recorded handle, the tether."""

    def __init__(self, run_dir: Path, status: dict[str, Any], tether: Tether, logger: logging.Logger,
                 on_handle: Callable[[dict[str, Any]], None] | None):
        self.run_dir, self.status, self.tether, self.logger, self.on_handle = run_dir, status, tether, logger, on_handle
        self.announced: set[tuple[int, int]] = set()

    def line(self, run: int, rank: int | None, text: str) -> None:
        # The MLPerf log stays whole in the rank logs and result_<n>.txt; the task log gets what a person reads.
        if rank is None:
            self.logger.info("[run %d launcher] %s", run, text)
        elif rank == 0:
            self.logger.log(logging.DEBUG if rank_logs.machine(text) else logging.INFO, "[run %d rank 0] %s", run, text)
        else:
            if (run, rank) not in self.announced:
                self.announced.add((run, rank))
                self.logger.info("[run %d rank %d] output in %s", run, rank, self.run_dir / f"rank{rank}_{run}.log")
            self.logger.log(logging.WARNING if rank_logs.alarming(text) else logging.DEBUG,
                            "[run %d rank %d] %s", run, rank, text)

    def handle(self, **facts: str) -> None:
        self.status["handle"] = {**self.status.get("handle", {}), **facts}
        write_json_atomic(self.run_dir / "status.json", self.status)
        if self.on_handle is not None:
            self.on_handle(dict(self.status["handle"]))

    def on_death(self, argv: Sequence[str]) -> None:
        self.tether.on_death(list(argv))


@contextlib.contextmanager
def _stop_when_lost(lease: Any, launcher: launch.Launcher):
    """While the block runs: should the cluster lease be lost (`lease.lost`, a threading.Event), cancel the
    launcher at once. Yields a flag that is set when that happened."""
    lost, done, fired = getattr(lease, "lost", None), threading.Event(), threading.Event()

    def watch() -> None:
        while not done.is_set():
            if lost.wait(0.5):
                fired.set()
                launcher.cancel()
                return

    watcher = threading.Thread(target=watch, name="cluster-lease-watch", daemon=True) if lost is not None else None
    if watcher:
        watcher.start()
    try:
        yield fired
    finally:
        done.set()
        if watcher:
            watcher.join()


def train(
    workdir: Path | str,
    hosts: Path | str | Any = None,
    config: str = "cpu-demo",
    runs: int = 1,
    image: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    seed: int | None = None,
    entry: Sequence[str] | None = None,
    extra_args: Sequence[str] = (),
    logger: logging.Logger | None = None,
    slot: Callable[[], ContextManager[Any]] | None = None,
    on_handle: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Check, then `runs` runs of the rank program on the launcher's ranks, writing runs/<run-id>/result_<n>.txt.

    `hosts`: a hosts file (YAML path), its parsed document or a launcher (tasks.launch); None = this machine.
    `seed`: run n gets seed + n (default: a fresh random base, recorded in status.json).
    `entry`: the rank program (default `<python> -m rn50.train`); it is given
    `--config C --data D --out RUN_DIR --run-index N --seed S` and must write RUN_DIR/result_<N>.txt.
    `slot()`: a context manager held around the runs (the flow's cluster slot); what it yields may carry `lost`,
    a threading.Event set when the slot is lost, which stops the run (status `lost-slot`).
    `on_handle(facts)`: called whenever the backend records what names its work (a Slurm job id and state).
    """
    logger = logger or log
    wd = Workdir(workdir)
    if runs < 1:
        raise StageError(f"--runs must be >= 1, not {runs}")
    cfg = training_config(config, extra_args)
    if hosts is None:
        launcher = _LocalDefault(cfg)
    elif isinstance(hosts, Inventory):
        launcher = SshLauncher(hosts)
    else:
        launcher = launch.load(hosts, None if isinstance(hosts, (str, Path)) else "the hosts file")
    err = slot_error(cfg, launcher.ranks, *launcher.slots_text(ranks_needed(cfg)))
    if err:
        raise StageError(err)
    python = launcher.rank_python(image)
    entry = list(entry) if entry is not None else [python, "-m", "rn50.train"]
    data_dir = launcher.data_dir or str(wd.recordio)
    base_seed = seed if seed is not None else secrets.randbelow(2**31 - runs)
    seeds = [base_seed + n for n in range(runs)]
    run_id = new_run_id()
    run_dir = wd.runs / run_id
    argvs = tuple(tuple(entry + ["--config", config, "--data", data_dir, "--out", str(run_dir), "--run-index", str(n),
                                 "--seed", str(s)] + list(extra_args)) for n, s in enumerate(seeds))
    job = launch.Job(run_id=run_id, out_dir=run_dir, data_dir=data_dir, argvs=argvs,
                     env=launch.rank_environment(launcher, image), expected={}, timeout_s=timeout_s,
                     work_dir=str(wd.root), image=image, gpu_python=python if needs_gpu(cfg) else None)
    problems = launcher.check(job)
    if problems:
        raise StageError("preflight failed: " + "; ".join(problems))
    expected = launch.expected_data(wd.recordio)
    job = dataclasses.replace(job, expected=expected)
    reap_orphans(wd, launcher, logger)

    with slot() if slot else contextlib.nullcontext() as lease:
        run_dir.mkdir(parents=True)
        started = time.time()
        status: dict[str, Any] = {
            "run_id": run_id, "status": "running", "launcher": launcher.name, "config": config, "np": launcher.ranks,
            "runs": runs, "seeds": seeds, "hosts": launcher.hosts(), "runtime": launcher.runtime, "image": image,
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(), "holder": holder_identity(),
        }
        write_json_atomic(run_dir / "status.json", status)
        # Should this process die (kill -9), the tether stops the ranks it can see and runs what the backend
        # registered (scancel).
        tether = Tether()
        job = dataclasses.replace(job, env=tether.env(job.env))
        attempt = _Attempt(run_dir, status, tether, logger, on_handle)
        lost_slot = threading.Event()
        try:
            problems = launcher.preflight(job)
            if problems:
                raise StageError("preflight failed: " + "; ".join(problems))
            with _stop_when_lost(lease, launcher) as lost_slot:
                outcomes = launcher.run(job, attempt)
            results = _verdict(outcomes, job, lost_slot)
        except BaseException as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            cancelled = not isinstance(e, Exception)  # Prefect's TerminationSignal (a cancel), Ctrl-C, SIGTERM
            state = "lost-slot" if lost_slot.is_set() else "cancelled" if cancelled else "failed"
            status.update(status=state, error=msg, duration_s=round(time.time() - started, 3))
            if state != "failed":
                # The verdict is written before the stop, which may outlast the caller's patience (Prefect SIGKILLs
                # 30 s after its SIGTERM; scancel waits for the job): `stopping` tells reap_orphans to finish it.
                _finish(run_dir, {**status, "stopping": True})
                launcher.cancel()
            status.update(hosts=launcher.hosts() or status["hosts"])
            _finish(run_dir, status)
            if cancelled:
                logger.warning("train attempt %s cancelled (%s); every rank was stopped; its logs are kept in %s",
                               run_id, type(e).__name__, run_dir)
                raise  # as it came: a cancellation is never turned into a retryable failure
            logger.error("train attempt %s %s (kept in %s): %s", run_id, state, run_dir, msg)
            if isinstance(e, StageError):
                raise
            raise StageError(f"train attempt {run_id} failed: {msg}") from e
        finally:
            tether.close()
    status.update(status="success", hosts=launcher.hosts() or status["hosts"],
                  duration_s=round(time.time() - started, 3), results=[p.name for p in results])
    _finish(run_dir, status)
    logs = sorted(p for p in run_dir.glob("*.log") if p.is_file())
    return TrainResult(
        run_id=run_id, run_dir=str(run_dir), status="success", config=config, np=launcher.ranks,
        hosts=status["hosts"], runtime=launcher.runtime, image=image, runs=runs, seeds=seeds,
        results=[str(p) for p in results], result_md5={p.name: file_digest(p) for p in results},
        logs=[str(p) for p in logs], data_digest=hashlib.sha256(repr(sorted(expected.items())).encode()).hexdigest(),
        duration_s=status["duration_s"],
    )


def _verdict(outcomes: list[launch.RunOutcome], job: launch.Job, lost_slot: threading.Event) -> list[Path]:
    """The result files of a set whose every run succeeded; else the one-line error of the first that did not."""
    if lost_slot.is_set():
        raise TransientError("the cluster slot was lost (its lease ended on the server) while the runs were on "
                             "the cluster: every rank was stopped rather than train beside the next holder")
    results = []
    for out in outcomes:
        n = out.index
        if not out.ok:
            why = f": {out.failure}" if out.failure else ""
            if out.timed_out:
                raise StageError(f"run {n}: timed out after {job.timeout_s:.0f} s; ranks were stopped"
                                 + (f" ({out.failure})" if out.failure else ""))
            raise (TransientError if launch.is_transient(out.failure) else StageError)(f"run {n}: {out.summary}{why}")
        result = job.out_dir / f"result_{n}.txt"
        if not result.is_file():
            raise StageError(f"run {n}: ranks exited 0 but {result.name} was not written")
        if "run_stop" not in result.read_text():
            raise StageError(f"run {n}: {result.name} has no run_stop (the run did not finish)")
        results.append(result)
    if len(results) != job.runs:
        raise StageError(f"the launcher reported {len(results)} of {job.runs} run(s)")
    return results


# --- CLI ---------------------------------------------------------------------------------------------


DESCRIPTION = """\
Train: N runs (distinct seeds) of the ResNet-50 rank program on exactly as many ranks as the training config's
global batch divided by its per-rank batch, started by the hosts file's launcher (ssh: horovodrun over SSH, the
default; slurm: one batch job), each writing WORKDIR/runs/<run-id>/result_<n>.txt. Every host is checked first
(data, disk, GPUs); a hosts file whose slots do not match the config is refused before anything runs. Ctrl-C or
SIGTERM stops every rank and job and marks the attempt cancelled."""


def add_command(subparsers) -> None:
    p = subparsers.add_parser("train", help="launch training on the hosts file's ranks (SSH or Slurm)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir", type=Path, help="work directory holding recordio/ (from rn50 pack); runs/ is written here")
    p.add_argument("--hosts", type=Path, default=None,
                   help="hosts file (YAML, launcher: ssh or slurm) (default: this host, one slot per GPU for a GPU "
                        "config, the config's global batch / per-rank batch slots for a CPU config)")
    p.add_argument("--config", default="cpu-demo", help="configs/training/NAME.yaml or a path")
    p.add_argument("--runs", type=int, default=1, help="independent runs, distinct seeds (5 for a submission set)")
    p.add_argument("--image", default=None, help="image tag for runtime docker or Slurm containers (from rn50 build)")
    p.add_argument("--seed", type=int, default=None, help="seed of run 0 (run n uses seed+n)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds before a hung run is stopped")
    p.set_defaults(run=_cli)


def cancel_on_sigterm() -> None:
    """SIGTERM (`kill`, systemd, a batch system's stop) ends this process as Ctrl-C does: through the stage, which
    stops every rank and job and marks the attempt `cancelled`."""

    def terminated(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)


def _cli(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    cancel_on_sigterm()
    res = train(args.workdir, hosts=args.hosts, config=args.config, runs=args.runs, image=args.image,
                timeout_s=args.timeout, seed=args.seed)
    print(res.to_json())
    return 0
