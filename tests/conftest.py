"""Shared fixtures: one small synthetic ILSVRC2012, fetched and verified once per session.

Tests that change a work dir take `workdir_copy` (a fresh copy); the session ones are read-only.
`isolated_aws_env` keeps the user's AWS settings away from a test. Shared plain helpers (free_port,
stop_group, missing/require for strict mode) live in tests/helpers.py and are re-exported here.

Strict mode (RN50_STRICT=1, set by .ci/run): a test that would be skipped fails instead, with the skip's
reason: CI never stays green because a real component (Docker, sshd, Chromium, SeaweedFS, ...) is missing.
"""
from __future__ import annotations

import os
import shutil
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import STRICT, Receiver, clear_aws_env, free_port, missing, require, stop_group  # noqa: F401  (re-exported)

ROOT = Path(__file__).resolve().parent.parent
RN50 = str(Path(sys.executable).parent / "rn50")

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

# Small but complete: every quirk, uneven class sizes, IDs out of sorted-WNID order.
SMALL = dict(classes=6, train_per_class=24, val_per_class=6, seed=1)


def rn50(*args: str, check: bool = False, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real `rn50` console script."""
    proc = subprocess.run([RN50, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"rn50 {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def synth_source(tmp_path_factory) -> Path:
    from tasks.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, **SMALL)
    return out


@pytest.fixture(scope="session")
def verified_workdir(tmp_path_factory, synth_source) -> Path:
    from tasks.fetch import fetch
    from tasks.verify import verify

    wd = tmp_path_factory.mktemp("verified")
    fetch(str(synth_source), wd, synth_source / "MD5SUMS")
    verify(wd)
    return wd


@pytest.fixture
def workdir_copy(verified_workdir, tmp_path) -> Path:
    dst = tmp_path / "wd"
    shutil.copytree(verified_workdir, dst, symlinks=True)
    return dst


@pytest.fixture
def isolated_aws_env(monkeypatch, tmp_path) -> None:
    """No user AWS config, credentials or AWS_* variable leaks into the test."""
    clear_aws_env(monkeypatch, tmp_path)


# --- strict mode: no silent skips in CI ------------------------------------------------------------


def _strict_message(longrepr) -> str:
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    reason = reason.removeprefix("Skipped: ")
    return f"RN50_STRICT=1 and the test was skipped, which CI does not accept: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if STRICT and rep.skipped and not hasattr(rep, "wasxfail"):
        rep.outcome, rep.longrepr = "failed", _strict_message(rep.longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    rep = outcome.get_result()
    if STRICT and rep.skipped:  # a module-level skip / importorskip
        rep.outcome, rep.longrepr = "failed", _strict_message(rep.longrepr)


# --- a real Docker engine, started once for the session ---------------------------------------------


@pytest.fixture(scope="session")
def docker_url():
    """The URL of a Docker engine: the one at DOCKER_HOST / the default socket, or Debian's dockerd started
    on a private socket (tests/docker_engine.py) and stopped at the end of the session."""
    from tests.docker_engine import NoEngine, engine

    try:
        with engine() as url:
            yield url
    except NoEngine as e:
        missing(f"no Docker engine can be started here: {e}")


@pytest.fixture(scope="session")
def docker_base(docker_url) -> str:
    """The debootstrapped Debian bookworm minbase image the test images build on (no registry here)."""
    from tests.docker_engine import NoEngine, base_image

    try:
        return base_image(docker_url)
    except NoEngine as e:
        missing(f"no base image for the test containers: {e}")


# --- a local Prefect server and worker, one per test module -----------------------------------------


@pytest.fixture(scope="module")
def bare_prefect_server(tmp_path_factory):
    """flows/local.py's server alone (no worker, no deployments), on a free loopback port; stopped after the module."""
    from flows.local import LocalPrefect

    local = LocalPrefect(tmp_path_factory.mktemp("prefect-home"), free_port())
    local.start_server()
    yield local
    local.down()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """flows/local.py's server + `rn50` process pool + worker + deployments, on a free loopback port; stopped
    after the module. Its env() points a subprocess at it."""
    from flows.local import LocalPrefect

    server = LocalPrefect(tmp_path_factory.mktemp("prefect-home"), free_port())
    server.up()
    yield server
    server.down()


@dataclass
class DemoRun:
    local: "LocalPrefect"  # noqa: F821
    receiver: Receiver
    source: Path
    workdir: Path
    run_id: str


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """One finished `rn50/full` demo run through a local Prefect server + worker, shared by the modules that
    look at it without changing it (the UI pages, the Logs tab, progress artifacts, the run form) and by the
    alert test that runs the nightly after it (test_operation_ui.py sorts before test_operations.py, so the
    pages see this run's artifacts as the newest). The alert automation posts to `receiver` on loopback."""
    from flows.local import LocalPrefect
    from tasks.synth import synthesize

    base = tmp_path_factory.mktemp("demo-run")
    receiver = Receiver()
    local = LocalPrefect(base / "prefect-home", free_port())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RN50_ALERT_WEBHOOK_URL", receiver.url)  # `up` saves the rn50-alerts block from it
        try:
            local.up()
            src, wd = base / "synthetic", base / "work"
            synthesize(src)
            proc = local.run_deployment("full", f"source={src}", f"workdir={wd}", timeout_s=1200)
            out = proc.stdout + proc.stderr
            assert proc.returncode == 0 and "Completed" in out, \
                f"rn50/full did not complete ({proc.returncode}):\n{out[-3000:]}\nworker log: {local.home / 'worker.log'}"
            ids = re.findall(r"UUID:\s*([0-9a-f-]{36})", out)
            assert ids, f"no flow run id in `prefect deployment run` output:\n{out[-2000:]}"
            yield DemoRun(local, receiver, src, wd, ids[0])
        finally:
            local.down()
            receiver.stop()
