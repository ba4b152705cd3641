"""Prefect tasks for the stages: one thin wrapper each around the plain function in tasks/.

`stage()` adds what every stage gets from Prefect — retries of transient failures only, a content-keyed
cache with serializable isolation (two concurrent flow runs never both execute an expensive stage; a lock
whose holder died is broken, see flows/locks.py), a stamp recording the outputs, and the stage's
artifacts — so each wrapper below only says what is specific to it.

Results are cached relative to the work dir: a stage task returns (and Prefect persists) its result with
the work dir's path written as `$WORKDIR` (tasks.common.relocatable), and `Runner` puts the current work
dir back in (tasks.common.rebased) for a fresh result and a cached one alike. So a cache hit served to a
moved or copied work dir names that work dir's files, never the place the stage first ran in.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from prefect import task
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.states import Completed

from flows import team
from flows.cluster import CLUSTER_LIMIT, cluster_slot
from tasks.common import Workdir, is_transient, rebased, relocatable, write_stamp

LOCKS = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser() / "rn50-locks"


def _policy(stage: str) -> CacheKeyFnPolicy:
    # File locks in LOCKS on one machine; Redis locks when the worker is one of a team (flows/team.py).
    return CacheKeyFnPolicy(cache_key_fn=lambda ctx, params: f"rn50-{stage}-{params['key']}").configure(
        isolation_level="SERIALIZABLE", lock_manager=team.lock_manager(LOCKS))


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect's `retry_condition_fn`: retry what may go away by itself (network, S3 5xx, a lost node);
    a checksum mismatch, an unsafe archive, a bad config, a failed compliance check or a cancellation
    fails at once with its one-line reason."""
    from prefect.logging import get_run_logger

    try:
        state.result()
    except BaseException as e:  # noqa: BLE001 - the state's exception is what we judge
        if not is_transient(e):
            get_run_logger().info("%s: not retried (%s: a retry cannot change the outcome)", task.name, type(e).__name__)
        return is_transient(e)
    return False


# --- the stage modules' log lines in the flow run's Logs tab -----------------------------------------

# The stage modules log to `tasks.<stage>` (some to `rn50.<stage>`): plain loggers Prefect knows nothing
# of, below the WARNING level Prefect gives the root logger.
STAGE_LOGGERS = ("tasks", "rn50")


class RunLogForwarder(logging.Handler):
    """Re-logs the stage modules' records (INFO and above) through Prefect's run logger of the task run
    that installed it — also from the threads a stage starts, which do not carry Prefect's run context.
    Outside a Prefect run it does nothing."""

    def __init__(self, level: int = logging.INFO):
        super().__init__(level)
        self.run_logger: logging.LoggerAdapter | None = None
        try:
            from prefect.logging import get_run_logger

            self.run_logger = get_run_logger()
        except Exception:  # noqa: BLE001 - MissingContextError: not in a flow or task run
            self.run_logger = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.run_logger is None:
            return
        try:
            self.run_logger.log(record.levelno, "%s", record.getMessage(), exc_info=record.exc_info)
        except Exception:  # noqa: BLE001 - logging must never break a stage
            self.handleError(record)


_forwarding_lock = threading.Lock()
_forwarding: dict[str, Any] = {"depth": 0, "saved": []}


@contextlib.contextmanager
def stage_logs():
    """While a stage runs: its modules' INFO records go to the run logger (and not also to the root
    logger's console handler, which would print each of them twice in `rn50 run`)."""
    handler = RunLogForwarder()
    if handler.run_logger is None:
        yield
        return
    with _forwarding_lock:
        if _forwarding["depth"] == 0:
            _forwarding["saved"] = [(lg, lg.level, lg.propagate) for lg in map(logging.getLogger, STAGE_LOGGERS)]
            for lg, level, _ in _forwarding["saved"]:
                if level == logging.NOTSET or level > logging.INFO:
                    lg.setLevel(logging.INFO)
                lg.propagate = False
        _forwarding["depth"] += 1
        for name in STAGE_LOGGERS:
            logging.getLogger(name).addHandler(handler)
    try:
        yield
    finally:
        with _forwarding_lock:
            for name in STAGE_LOGGERS:
                logging.getLogger(name).removeHandler(handler)
            _forwarding["depth"] -= 1
            if _forwarding["depth"] == 0:
                for lg, level, propagate in _forwarding["saved"]:
                    lg.setLevel(level)
                    lg.propagate = propagate


# stage name -> still_there(result): outputs outside the work dir that a cached result needs (an image).
_STILL_THERE: dict[str, Callable[[dict], bool]] = {}


def stage(name: str, outputs: Callable[[Workdir, dict], Iterable[Path]], retries: int = 2,
          publish: Callable[[dict], None] | None = None, still_there: Callable[[dict], bool] | None = None):
    """Wrap `fn(workdir, **kwargs) -> Result` as the Prefect task `name`, called as `task(key, workdir, **kwargs)`.

    The task returns the result with work-dir paths as `$WORKDIR/...` (what Prefect's cache keeps); call it
    through `Runner`, which gives them back under the work dir of the run at hand. `outputs` are the files
    the stamp covers; `still_there(result)` checks what a cached result needs beyond them (the container
    stage's image): False runs the stage again."""
    if still_there is not None:
        _STILL_THERE[name] = still_there

    def deco(fn: Callable[..., Any]):
        def run(key: str, workdir: str, **kwargs: Any) -> dict:
            with stage_logs():
                result = fn(workdir, **kwargs).to_dict()
            wd = Workdir(workdir)
            write_stamp(wd, f"flow-{name}", key, result, outputs(wd, result))
            if publish:
                publish(result)
            return relocatable(result, wd.root, workdir)

        run.__name__, run.__doc__ = fn.__name__, fn.__doc__
        return task(name=name, retries=retries, retry_delay_seconds=[2, 10, 30], cache_policy=_policy(name),
                    retry_condition_fn=retry_if_transient, persist_result=True, result_serializer="json",
                    log_prints=True)(run)

    return deco


class Runner:
    """Calls stage tasks for one work dir: `run(task, key, **kwargs)` -> the stage's result dict, its
    `$WORKDIR` paths under this work dir.

    Keys are content, so Prefect's record for a key may come from another work dir (or from this one
    before it was moved). A cache hit counts only while this work dir's stamp for the stage has the same
    key and its outputs are still as the stage left them (and `still_there` holds); the result used is
    then the stamp's — the stage's result as it ran here (train's run id is this work dir's run), not
    whichever work dir Prefect's record was last written from. Otherwise the stage runs again, under a
    per-stage file lock in the work dir so that two concurrent runs of one work dir run it once: the
    second finds the first's fresh stamp. The cache lookup itself waits on the key's Prefect lock, so a
    concurrent run computing the same key finishes first."""

    def __init__(self, wd: Workdir, rerun: Iterable[str] = ()):
        self.wd, self.rerun = wd, set(rerun)

    def __call__(self, stage_task, key: str, **kwargs: Any) -> dict:
        name = stage_task.name
        print(f"{name}: cache key {key[:16]}" + (" (rerun requested)" if name in self.rerun else ""))
        state = stage_task.with_options(refresh_cache=name in self.rerun)(key, str(self.wd.root), return_state=True,
                                                                         **kwargs)
        if state.name != "Cached":
            return rebased(state.result(), self.wd.root)
        result, why = self.here(name, key)
        if result is not None:
            return result
        with self._stage_lock(name):
            result, _ = self.here(name, key)  # a concurrent run of this work dir may just have run it
            if result is not None:
                return result
            print(f"{name}: {why}; running it again")
            state = stage_task.with_options(refresh_cache=True)(key, str(self.wd.root), return_state=True, **kwargs)
            return rebased(state.result(), self.wd.root)

    def here(self, name: str, key: str) -> tuple[dict | None, str]:
        """(the stage's result as it ran in this work dir for `key`, "") while its stamp vouches for it;
        else (None, why not)."""
        from tasks.common import fingerprint, read_stamp

        stamp = read_stamp(self.wd, f"flow-{name}")
        if stamp is None or stamp.get("key") != key:
            return None, "this work dir has no result of it for this key"
        if fingerprint(stamp["outputs"], self.wd.root) != stamp["fingerprint"]:
            return None, "its outputs are missing or changed here"
        if name in _STILL_THERE and not _STILL_THERE[name](stamp["result"]):
            return None, "what its result names is gone"
        return stamp["result"], ""

    @contextlib.contextmanager
    def _stage_lock(self, name: str):
        import fcntl

        self.wd.stamps.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.wd.stamps / f".flow-{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if the holder dies
            yield
        finally:
            os.close(fd)


@task(name="skipped")
def skip(reason: str):
    """A stage the configuration does not ask for: visible in the UI as Skipped, with the reason."""
    return Completed(name="Skipped", message=f"skipped: {reason}")


# --- artifacts ------------------------------------------------------------------------------------


def _markdown(path_field: str, key: str, description: str) -> Callable[[dict], None]:
    def publish(r: dict) -> None:
        create_markdown_artifact(Path(r[path_field]).read_text(), key=key, description=description)
    return publish


class _Progress:
    """A Prefect progress artifact fed by a stage's progress(done, total) callback, at most every 1 %."""

    def __init__(self, description: str):
        self.id = create_progress_artifact(0.0, description=description)
        self.last = 0.0

    def __call__(self, done: int, total: int | None) -> None:
        pct = 100.0 * done / total if total else 0.0
        if pct - self.last >= 1.0 or done == total:
            self.last = pct
            update_progress_artifact(self.id, pct)


class _Progresses:
    """One progress artifact per part of a stage (fetch: each archive's bytes; verify: members extracted
    per split, then images decode-checked), created when that part starts; callback(part, done, total)."""

    def __init__(self, describe: Callable[[str], str]):
        self.describe, self.bars = describe, {}

    def __call__(self, part: str, done: int, total: int | None) -> None:
        bar = self.bars.get(part)
        if bar is None:
            bar = self.bars[part] = _Progress(self.describe(part))
        bar(done, total)


class _ObjectsProgress:
    """archive: objects stored (uploaded or found unchanged) of `total`, from storage's per-object byte
    callback(key, done, size); an object counts once all its bytes are stored."""

    def __init__(self, total: int, description: str):
        self.total, self.done, self.bar = total, set(), _Progress(description)

    def __call__(self, key: str, done: int, size: int) -> None:
        if done >= size and key not in self.done:
            self.done.add(key)
            self.bar(min(len(self.done), self.total), self.total)


class _EpochTable(threading.Thread):
    """Publish the per-epoch eval accuracy of the runs being trained, as the MLPerf logs grow."""

    def __init__(self, runs_dir: Path, interval_s: float = 10.0):
        super().__init__(daemon=True)
        self.runs_dir, self.interval_s, self.stop = runs_dir, interval_s, threading.Event()
        self.start_time, self.published = time.time(), None
        # The task's run context (contextvars), so the artifact belongs to this flow and task run: a plain
        # thread starts without it, and its artifacts would float free of the run.
        self.context = contextvars.copy_context()

    def rows(self) -> list[dict]:
        # A light scan, not mlperf_logging's parser: the logs are still being written.
        rows = []
        for log in sorted(self.runs_dir.glob("*/result_*.txt")):
            if log.stat().st_mtime < self.start_time:
                continue
            for line in log.read_text(errors="replace").splitlines():
                if ":::MLLOG" in line and '"eval_accuracy"' in line:
                    ev = json.loads(line.split(":::MLLOG", 1)[1])
                    rows.append({"run": log.parent.name, "log": log.name,
                                 "epoch": ev.get("metadata", {}).get("epoch_num"), "eval_accuracy": round(ev["value"], 4)})
        return rows

    def publish(self) -> None:
        rows = self.rows()
        if rows and rows != self.published:
            create_table_artifact(rows, key="training-progress", description="Eval accuracy per epoch (live)")
            self.published = rows

    def run(self) -> None:
        while not self.stop.wait(self.interval_s):
            self.context.run(self.publish)


# --- the stages -----------------------------------------------------------------------------------


@stage("fetch", outputs=lambda wd, r: [wd.raw / n for n in r["md5"]])
def fetch(workdir: str, source: str, md5_file: str | None) -> Any:
    from tasks.fetch import fetch as run

    return run(source, workdir, md5_file, progress=_Progresses(lambda name: f"fetch: {name} (bytes)"))


@stage("verify", outputs=lambda wd, r: [wd.manifest, wd.extracted],
       publish=_markdown("report", "data-verification", "Data verification (Great Expectations over the manifest)"))
def verify(workdir: str) -> Any:
    from tasks.verify import verify as run

    what = {"train": "verify: train members extracted", "val": "verify: val members extracted",
            "decode": "verify: images decode-checked"}
    return run(workdir, progress=_Progresses(lambda part: what.get(part, f"verify: {part}")))


@stage("pack", outputs=lambda wd, r: r["outputs"],
       publish=_markdown("report_md", "pack-report", "RecordIO pack report: counts, bytes, throughput, quirks"))
def pack(workdir: str, threads: int | None, full_check: bool) -> Any:
    from tasks.pack import pack as run

    return run(workdir, threads=threads, full_check=full_check, progress=_Progress("pack: records written"))


def _image_there(r: dict) -> bool:
    """The cached image is still in the engine (or, if it was pushed or found there, in its registry).
    An engine that does not answer counts as gone: the stage then runs and says so in one line."""
    import docker

    try:
        client = docker.from_env(version="auto")
        try:
            client.images.get(r["tag"])
            return True
        except docker.errors.ImageNotFound:
            if not (r.get("pushed") or r.get("source") == "registry"):
                return False
            client.images.get_registry_data(r["tag"])
            return True
    except Exception:  # noqa: BLE001 - no engine, no registry, not found: all "not there"
        return False


@stage("container", outputs=lambda wd, r: [], still_there=_image_there)
def container(workdir: str, from_image: str, registry: str | None, push: bool,
              build_args: dict[str, str] | None = None, network: str | None = None) -> Any:
    from tasks.container import build_image

    return build_image(from_image=from_image, registry=registry, push=push, build_args=build_args,
                       network_mode=network, log_path=Workdir(workdir).reports / "container-build.log")


def _distribution_table(r: dict) -> None:
    rows = [{"host": h["host"], "action": h["action"], "bytes_sent": h["bytes_sent"], "seconds": h["seconds"]}
            for h in r["hosts"]]
    if rows:
        create_table_artifact(rows, key="distribution", description=f"recordio onto {r['data_dir']}: {r['reason']}")


@stage("distribute", outputs=lambda wd, r: [], publish=_distribution_table)
def distribute(workdir: str, hosts: str) -> Any:
    """recordio onto every host's node-local data_dir (tasks.distribute): a progress bar of bytes per host."""
    from tasks.distribute import distribute as run

    result = run(workdir, hosts=hosts, progress=_Progresses(lambda host: f"distribute: bytes to {host}"))
    print(f"distribute: {'skipped: ' if result.skipped else ''}{result.reason}")
    return result


def _train(workdir: str, config: str, hosts: str | None, runs: int, image: str | None, timeout_s: float,
           seed: int | None = None, cluster_limit: str = CLUSTER_LIMIT) -> Any:
    from tasks.train import train as launch

    table = _EpochTable(Workdir(workdir).runs)
    table.start()
    try:
        return launch(workdir, hosts=hosts, config=config, runs=runs, image=image, timeout_s=timeout_s, seed=seed,
                      slot=lambda: cluster_slot(cluster_limit), on_handle=job_reporter())
    finally:
        table.stop.set()
        table.publish()


def job_reporter() -> Callable[[dict], None]:
    """What names the launcher's work outside this process (a Slurm job id and its state), on every change: in the
    stage log and in a table artifact."""
    from prefect.logging import get_run_logger

    rows: list[dict] = []

    def on_handle(facts: dict) -> None:
        if "job_state" not in facts or (rows and rows[-1]["state"] == facts["job_state"]):
            return
        rows.append({"job_id": facts.get("job_id"), "state": facts["job_state"],
                     "at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
        get_run_logger().info("train: slurm job %s is %s", facts.get("job_id"), facts["job_state"])
        create_table_artifact(rows, key="slurm-job", description=f"Slurm job {facts.get('job_id')}: {facts['job_state']}")

    return on_handle


train = stage("train", outputs=lambda wd, r: [r["run_dir"]], retries=1)(_train)
# The nightly regression trains fresh with fixed seeds; its own stamp keeps `rn50/full`'s train cache intact.
nightly_train = stage("train-nightly", outputs=lambda wd, r: [r["run_dir"]], retries=1)(_train)


def _nightly_artifacts(r: dict) -> None:
    from tasks.nightly import markdown_with_plot

    create_markdown_artifact(markdown_with_plot(r), key="nightly-convergence", description=r["reason"])


@stage("nightly", outputs=lambda wd, r: [r["plot_png"], r["report_json"], r["report_md"]],
       publish=_nightly_artifacts)
def nightly(workdir: str, logs: list[str], baseline: str, tolerance_epochs: float, tolerance_accuracy: float,
            target: float, context: dict, force_accept: bool = False, reason: str | None = None) -> Any:
    """Compare this night's convergence with the last accepted night; it becomes the baseline when it passed,
    when it is the first nightly of an empty history, or when a person forces it (`force_accept` with a
    `reason`, recorded in the history with who/when/why). Without a comparable baseline the stage fails
    (after publishing the plot); a regression is returned for the flow to fail on (`failed` in the result)."""
    from tasks.common import StageError
    from tasks.nightly import run_nightly

    result = run_nightly(logs, baseline, tolerance_epochs, tolerance_accuracy, target, force_accept=force_accept,
                         reason=reason, context=context)
    if result.failed and not result.regressed:
        _nightly_artifacts(result.to_dict())
        raise StageError(result.reason)
    return result


def _compliance_artifacts(r: dict) -> None:
    from tasks.compliance import table_rows

    create_table_artifact(table_rows(r), key="compliance", description=f"MLPerf compliance, ruleset {r['ruleset']}")
    create_markdown_artifact(Path(r["report_md"]).read_text(), key="compliance-report")
    h = r.get("health") or {}
    if "verdict" in h:  # the cluster's health: per-host table, and the report with its plot inline
        from tasks import health

        create_table_artifact(health.table_rows(h), key="cluster-health", description=h["verdict"])
        create_markdown_artifact(health.markdown_with_plot(h), key="cluster-health-report")


@stage("compliance", outputs=lambda wd, r: [r["report_json"], r["report_md"]],
       publish=_compliance_artifacts)
def compliance(workdir: str, logdir: str, ruleset: str, dataset: str) -> Any:
    """Gate: tasks.compliance.gate (the same as `rn50 check LOGDIR --gate`): every log passes the official
    checker, and the runs converged (all of them below 5 runs; MLPerf's set rule for a set of 5)."""
    from tasks.common import StageError
    from tasks.compliance import check, gate

    result = check(logdir, ruleset=ruleset, dataset=dataset)
    reason = gate(result)
    if reason:
        raise StageError(reason)
    return result


def _archive_artifacts(r: dict) -> None:
    from prefect.artifacts import create_link_artifact

    rows = [{"key": o["key"], "bytes": o["bytes"], "sha256": o.get("sha256", ""), "action": o["action"]}
            for o in r["objects"]]
    skipped = r.get("skipped") or []
    create_table_artifact(rows, key="archive-manifest", description=f"Archived to {r['uri']}" + (
        f"; {len(skipped)} symbolic link(s) not followed: {', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''}"
        if skipped else ""))
    if r["uri"].startswith("file://"):
        create_link_artifact(r["uri"].rstrip("/") + "/" + r["manifest_key"], link_text="MANIFEST.json",
                             key="archive-link")


@stage("archive", outputs=lambda wd, r: [], publish=_archive_artifacts)
def archive(workdir: str, uri: str, include_checkpoints: bool) -> Any:
    from tasks.archive import archive as run, collect

    total = len(collect(workdir, include_checkpoints)) + 1  # + MANIFEST.json
    return run(workdir, uri, include_checkpoints=include_checkpoints, create_bucket=True,
               progress=_ObjectsProgress(total, f"archive: objects stored in {uri}"))
