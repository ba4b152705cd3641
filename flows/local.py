"""A local Prefect installation for the demo and the tests: server (SQLite), `rn50` process pool, worker.

    python -m flows.local up   [--home DIR] [--port N]   start server + worker, deploy prefect.yaml, create the
                                                         rn50-cluster limit and the nightly alert automation
    python -m flows.local down [--home DIR]              stop what `up` started

Everything binds 127.0.0.1, analytics are off, and the processes' ids are kept in HOME/pids so `down`
(or a test's teardown) stops exactly what was started.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tasks.paths import REPO

PROJECT = REPO
PREFECT = str(Path(sys.executable).parent / "prefect")


class LocalPrefect:
    def __init__(self, home: Path | str, port: int = 4200):
        self.home, self.port = Path(home).resolve(), port
        self.api_url = f"http://127.0.0.1:{port}/api"
        self.ui_url = f"http://127.0.0.1:{port}"

    def env(self) -> dict[str, str]:
        return {**os.environ,
                "PREFECT_HOME": str(self.home), "PREFECT_API_URL": self.api_url,
                "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(self.port),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "GX_ANALYTICS_ENABLED": "false",
                "PREFECT_UI_API_URL": self.api_url, "RN50_PROJECT_DIR": str(PROJECT),
                "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
                # Flow runs send heartbeats; the rn50-crash-zombie-runs automation (flows/alerts.py) marks a run
                # whose heartbeats stop (its worker died) Crashed.
                "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
                # Concurrency leases (the rn50-cluster slot) on disk, not in the server's memory: a slot held by a
                # run that was killed is freed by the server's repossessor once its lease expires, even across a
                # restart of the server.
                "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
                # The slot of a killed run is free within 5 s of its lease's end (default loop: 15 s), and a run
                # waiting for a slot asks again at least every 5 s (default: up to 30 s): on one machine's SQLite
                # server these loops cost nothing, and the next run starts up to 40 s sooner.
                "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "5",
                "PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS": "5",
                # The worker asks for scheduled runs every 2 s (default 10 s): `prefect deployment run` starts
                # within seconds, and one worker polling a local SQLite server costs nothing.
                "PREFECT_WORKER_QUERY_SECONDS": "2"}

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(argv, env=env or self.env(), cwd=PROJECT, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        (self.home / "pids").mkdir(exist_ok=True)
        (self.home / "pids" / name).write_text(str(proc.pid))
        return proc

    def _prefect(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([PREFECT, *args], env=self.env(), cwd=PROJECT, capture_output=True, text=True,
                              timeout=300)

    def start_server(self, name: str = "server", timeout_s: float = 120, **env: str) -> subprocess.Popen | None:
        """Start the server unless one answers on the port; wait until it is healthy."""
        if self.healthy():
            return None
        proc = self._spawn(name, [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                           env={**self.env(), **env})
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"Prefect server not healthy after {timeout_s}s; see {self.home / f'{name}.log'}")
            time.sleep(0.5)
        return proc

    def up(self, timeout_s: float = 120) -> "LocalPrefect":
        self.start_server(timeout_s=timeout_s)
        pool = self._prefect("work-pool", "create", "rn50", "--type", "process", "--overwrite")
        if pool.returncode:
            raise RuntimeError(f"work-pool create failed: {pool.stderr[-2000:] or pool.stdout[-2000:]}")
        if self._prefect("global-concurrency-limit", "inspect", "rn50-cluster").returncode:
            limit = self._prefect("global-concurrency-limit", "create", "rn50-cluster", "--limit", "1")
            if limit.returncode:
                raise RuntimeError(f"global-concurrency-limit create failed: {limit.stderr[-2000:] or limit.stdout[-2000:]}")
        deploy = self._prefect("deploy", "--all", "--no-prompt")
        if deploy.returncode:
            raise RuntimeError(f"prefect deploy failed: {deploy.stdout[-3000:]}{deploy.stderr[-2000:]}")
        # The automation that alerts when rn50/nightly fails (channel: RN50_ALERT_* or the rn50-alerts block).
        alerts = subprocess.run([sys.executable, "-m", "flows.alerts", "setup"], env=self.env(), cwd=PROJECT,
                                capture_output=True, text=True, timeout=120)
        if alerts.returncode:
            raise RuntimeError(f"alert automation setup failed: {alerts.stderr[-2000:] or alerts.stdout[-2000:]}")
        if not self._alive("worker"):
            self._spawn("worker", [PREFECT, "worker", "start", "--pool", "rn50", "--type", "process"])
        return self

    def _alive(self, name: str) -> bool:
        try:
            return not _exited(int((self.home / "pids" / name).read_text()))
        except (FileNotFoundError, ValueError):
            return False

    def down(self) -> None:
        for name in ("worker", "server"):
            pidfile = self.home / "pids" / name
            try:
                pid = int(pidfile.read_text())
            except (FileNotFoundError, ValueError):
                continue
            try:
                os.killpg(pid, signal.SIGTERM)
                deadline = time.monotonic() + 10
                while not _exited(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                os.killpg(pid, signal.SIGKILL)  # whatever of its process group is left
            except ProcessLookupError:
                pass
            pidfile.unlink(missing_ok=True)

    def run_deployment(self, name: str, *params: str, timeout_s: int = 1800,
                       watch: bool = True) -> subprocess.CompletedProcess:
        """`prefect deployment run rn50/<name>`: until the run ends (`watch`), else until it is scheduled."""
        args = ["deployment", "run", f"rn50/{name}"]
        if watch:
            args += ["--watch", "--watch-timeout", str(timeout_s)]
        for p in params:
            args += ["--param", p]
        return subprocess.run([PREFECT, *args], env=self.env(), cwd=PROJECT, capture_output=True, text=True,
                              timeout=timeout_s + 60)


def _exited(pid: int) -> bool:
    """True once `pid` is gone. A process this one spawned (the tests' servers) stays a zombie until it is reaped,
    and a zombie still answers kill(pid, 0): reap it here."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return True
    except ChildProcessError:  # not our child (`python -m flows.local down`)
        pass
    try:
        os.kill(pid, 0)
        return False
    except ProcessLookupError:
        return True


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m flows.local")
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("--home", default=str(PROJECT / ".demo" / "prefect"))
    p.add_argument("--port", type=int, default=int(os.environ.get("RN50_PREFECT_PORT", "4200")))
    args = p.parse_args()
    local = LocalPrefect(args.home, args.port)
    if args.action == "up":
        local.up()
        print(f"Prefect UI: {local.ui_url}  (API {local.api_url}; logs in {local.home})")
    else:
        local.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
