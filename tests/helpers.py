"""Helpers shared by the test modules (plain functions; the fixtures are in conftest.py).

    from helpers import missing, require, free_port, stop_group, clear_aws_env

Strict mode: with RN50_STRICT=1 (exported by .ci/run), a real-component test whose component is missing
(no Docker engine, no root, no debootstrap mirror, no netns/sshd, no Chromium, no `weed`, ...) FAILS,
naming what is missing, instead of being skipped; outside CI it is skipped with that reason (`-rs`).
conftest.py also turns any other skip into a failure in strict mode, so a bare `pytest.skip` cannot
hide a missing component in CI either.
"""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterable, NoReturn

import pytest

STRICT = os.environ.get("RN50_STRICT", "").strip().lower() not in ("", "0", "false", "no")


def missing(what: str) -> NoReturn:
    """A component this test needs is not here: skip (fail under RN50_STRICT=1), saying what is missing."""
    if STRICT:
        pytest.fail(f"RN50_STRICT=1 and a component is missing: {what}", pytrace=False)
    pytest.skip(what)


def require(condition: object, what: str) -> None:
    """`missing(what)` unless `condition` holds."""
    if not condition:
        missing(what)


def fake_recordio(workdir: Path, rec_bytes: int = 1 << 20, val_bytes: int | None = None, records: int = 20) -> Path:
    """A work dir whose recordio/ holds random .rec bytes and a plausible .idx: what the launcher checks and
    copies, for rank programs that never read it (tests/hvd_probe.py)."""
    rec = Path(workdir) / "recordio"
    rec.mkdir(parents=True)
    for split, n in (("train", rec_bytes), ("val", rec_bytes if val_bytes is None else val_bytes)):
        (rec / f"{split}.rec").write_bytes(os.urandom(n))
        (rec / f"{split}.idx").write_text("".join(f"{i}\t{i * 100}\n" for i in range(records)))
    return Path(workdir)


def trained_runs(workdir: Path) -> list[Path]:
    """The run directories of `workdir` whose training succeeded. Any other run directory must be an attempt whose
    launcher was killed, kept and marked aborted: a failed attempt (retried or not) fails the test. Failed attempts
    used to be let through for a rank's start-up segfault, fixed since (README: "A rank's start-up segfault")."""
    done = []
    for run_dir in sorted((Path(workdir) / "runs").iterdir()):
        status = json.loads((run_dir / "status.json").read_text())["status"]
        if status == "success":
            done.append(run_dir)
        else:
            assert status == "aborted" and (run_dir / "ABORTED").is_file(), (run_dir, status)
    return done


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop a process started with start_new_session=True and everything it spawned: SIGTERM to its
    process group, SIGKILL after `timeout` seconds. A process that already exited is just reaped."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def clear_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No AWS_* variable, config file, credentials file or instance metadata of the user reaches the test."""
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def prefect_api(api_url: str, method: str, path: str, body: dict | None = None, auth: str | None = None,
                attempts: int = 6):
    """One call of a Prefect server's REST API (`api_url` ends in /api), JSON in and out, never via a proxy.
    A 503 (Prefect's answer while a busy server's SQLite is locked) is retried with backoff, as Prefect's own
    client does. `auth`: "user:password" for a server with basic auth."""
    import base64
    import time
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for attempt in range(attempts):
        req = urllib.request.Request(api_url + path, method=method, headers=headers,
                                     data=None if body is None else json.dumps(body).encode())
        try:
            with opener.open(req, timeout=30) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            if e.code != 503 or attempt == attempts - 1:
                raise
            time.sleep(2 ** attempt)


def flow_run_logs(api_url: str, run_id: str, auth: str | None = None, level: int = 0,
                  task_run_ids: list[str] | None = None, within: float = 30) -> list[dict]:
    """An ended flow run's log lines at `level` or above (only those of `task_run_ids`, if given), oldest first.
    A run's process sets its final state before it logs "Finished in state" and sends its last batch of lines
    (up to PREFECT_LOGGING_TO_API_BATCH_INTERVAL, 2 s, of them) as it exits: a completed or failed run's lines
    are read once that line is in, or after `within` s."""
    import time

    run = prefect_api(api_url, "GET", f"/flow_runs/{run_id}", auth=auth)
    if run["state"]["type"] in ("COMPLETED", "FAILED"):  # a crashed or cancelled run may never log its end
        end = {"flow_run_id": {"any_": [run_id]}, "task_run_id": {"is_null_": True}}
        deadline = time.monotonic() + within
        while time.monotonic() < deadline and not any(
                line["message"].startswith("Finished in state") for line in prefect_api(
                    api_url, "POST", "/logs/filter", {"logs": end, "sort": "TIMESTAMP_DESC", "limit": 5}, auth=auth)):
            time.sleep(0.2)
    where: dict = {"flow_run_id": {"any_": [run_id]}, "level": {"ge_": level}}
    if task_run_ids is not None:
        where["task_run_id"] = {"any_": task_run_ids}
    out: list[dict] = []
    while True:
        page = prefect_api(api_url, "POST", "/logs/filter", {"logs": where, "sort": "TIMESTAMP_ASC", "limit": 200,
                                                             "offset": len(out)}, auth=auth)
        out += page
        if len(page) < 200:
            return out


class Receiver(ThreadingHTTPServer):
    """A webhook receiver on loopback: keeps every POST's body (and its path, query included)."""

    def __init__(self):
        bodies: list[str] = []
        paths: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                n = int(self.headers.get("Content-Length") or 0)
                bodies.append(self.rfile.read(n).decode(errors="replace"))
                paths.append(self.path)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", free_port()), Handler)
        self.bodies, self.paths = bodies, paths
        self.url = f"http://127.0.0.1:{self.server_address[1]}/rn50-alerts"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def rewrite_first_class_tar(archive: Path, members_of: Callable[[tarfile.TarFile], Iterable[tuple[tarfile.TarInfo, bytes]]],
                            fmt: int = tarfile.DEFAULT_FORMAT, encoding: str | None = None) -> tuple[tarfile.TarInfo, tarfile.TarFile]:
    """Rewrite an ILSVRC train archive (a tar of per-class tars) with its first class tar rebuilt from
    `members_of(inner)`'s (TarInfo, data) pairs, in tar format `fmt`. Returns the class member and the old inner tar."""
    with tarfile.open(archive) as old:
        members = [(m, old.extractfile(m).read()) for m in old]
    m0, d0 = members[0]
    inner = tarfile.open(fileobj=io.BytesIO(d0))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, **({"encoding": encoding} if encoding else {})) as out:
        for m, data in members_of(inner):
            out.addfile(m, io.BytesIO(data))
    m0.size = len(buf.getvalue())
    members[0] = (m0, buf.getvalue())
    with tarfile.open(archive, "w") as new:
        for m, d in members:
            new.addfile(m, io.BytesIO(d))
    return m0, inner
