"""Archive stage against real targets: file://, moto's S3 server (fast unit tests, in-process but
over real HTTP on 127.0.0.1) and a real disk-backed SeaweedFS S3 server on loopback (tests/s3_server.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from s3_server import ACCESS_KEY, SECRET_KEY, seaweed_s3  # noqa: F401  (pytest fixture)
from tasks import archive as A
from tasks.common import StageError, s3_client

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def make_workdir(root: Path, big_mib: int = 0) -> Path:
    """A small work dir in the contract layout (plus hidden files that must not be archived)."""
    wd = root / "wd"
    files = {
        "runs/r1/result_0.txt": b":::MLLOG {}\n" * 50,
        "runs/r1/config.yaml": b"epochs: 4\n",
        "runs/r1/stdout.rank0.txt": b"hello\n",
        "runs/r1/checkpoints/epoch4.params": os.urandom(64 * 1024),
        "compliance/r1/report.md": b"# report\n",
        "compliance/r1/report.json": b"{}\n",
        "reports/pack.json": b'{"records": 10}\n',
        "configs/cpu-demo.yaml": b"batch: 32\n",
        "manifest.parquet": os.urandom(big_mib * MiB) if big_mib else b"PAR1...PAR1",
        ".stamps/pack.json": b"{}",
        "compliance/.tmp-r2.abc/report.json": b"half",
        "raw/ILSVRC2012_img_val.tar": b"not archived",
    }
    for rel, data in files.items():
        p = wd / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return wd


# the checkout's training/system configs ride along under repo/
REPO_CONFIGS = {f"repo/{d}/{p.name}": p for d in ("configs/training", "configs/systems")
                for p in sorted((REPO / d).glob("*.y*ml"))}
EXPECTED = sorted(["compliance/r1/report.json", "compliance/r1/report.md", "configs/cpu-demo.yaml", "manifest.parquet",
                   "reports/pack.json", "runs/r1/config.yaml", "runs/r1/result_0.txt", "runs/r1/stdout.rank0.txt",
                   *REPO_CONFIGS])


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


pytestmark = pytest.mark.usefixtures("isolated_aws_env")  # conftest: no user AWS settings reach these tests


def read_all(client, bucket: str, prefix: str) -> dict[str, bytes]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            out[o["Key"][len(prefix) + 1:]] = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def check_archive_contents(objs: dict[str, bytes], wd: Path, with_checkpoints: bool = False) -> None:
    expected = EXPECTED + (["runs/r1/checkpoints/epoch4.params"] if with_checkpoints else [])
    assert sorted(objs) == sorted(expected + ["MANIFEST.json"])
    man = json.loads(objs["MANIFEST.json"])
    assert [o["key"] for o in man["objects"]] == sorted(expected)
    assert "repo/configs/systems/local-cpu.yaml" in objs and "repo/configs/training/cpu-demo.yaml" in objs
    for o in man["objects"]:
        data = (REPO_CONFIGS.get(o["key"]) or wd / o["key"]).read_bytes()
        assert objs[o["key"]] == data and o["sha256"] == sha(data) and o["bytes"] == len(data)


# --- file:// ---------------------------------------------------------------------------------------


def test_file_uri_roundtrip_reupload_nothing_and_atomic(tmp_path):
    wd = make_workdir(tmp_path)
    dest = tmp_path / "archive"
    r = A.archive(wd, f"file://{dest}")
    assert r.uploaded == len(EXPECTED) + 1 and r.unchanged == 0 and r.verified == r.uploaded
    check_archive_contents({p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}, wd)

    again = A.archive(wd, f"file://{dest}")
    assert again.uploaded == 0 and again.unchanged == len(EXPECTED) + 1
    assert again.manifest_sha256 == r.manifest_sha256 and again.key == r.key

    (wd / "runs/r1/result_0.txt").write_bytes(b"changed\n")
    third = A.archive(wd, f"file://{dest}", include_checkpoints=True)
    assert sorted(o.key for o in third.objects if o.action == "uploaded") == [
        "MANIFEST.json", "runs/r1/checkpoints/epoch4.params", "runs/r1/result_0.txt"]
    assert third.manifest_sha256 != r.manifest_sha256
    check_archive_contents({p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()},
                           wd, with_checkpoints=True)
    assert not [p for p in dest.rglob(".tmp-*")]


@pytest.mark.parametrize("uri", ["http://x/y", "s3:///nobucket", "file://relative/path", "ftp://h/p"])
def test_bad_uri_is_a_stage_error(tmp_path, uri):
    wd = make_workdir(tmp_path)
    with pytest.raises(StageError) as e:
        A.archive(wd, uri)
    assert "\n" not in str(e.value)


def test_missing_or_empty_workdir(tmp_path):
    with pytest.raises(StageError, match="does not exist"):
        A.archive(tmp_path / "nope", f"file://{tmp_path}/a")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageError, match="nothing to archive"):
        A.archive(tmp_path / "empty", f"file://{tmp_path}/a")
    assert not (tmp_path / "a").exists()


# --- moto (fast) -------------------------------------------------------------------------------------


@pytest.fixture
def moto_s3(monkeypatch):
    """moto's S3 over real HTTP on 127.0.0.1 (a fake S3 implementation; SeaweedFS tests below use a real one)."""
    from moto.server import ThreadedMotoServer

    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "motokey",
           "AWS_SECRET_ACCESS_KEY": "motosecret", "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        yield s3_client()
    finally:
        srv.stop()


def test_moto_multipart_checksums_and_idempotence(tmp_path, moto_s3):
    wd = make_workdir(tmp_path, big_mib=11)
    moto_s3.create_bucket(Bucket="arch")
    r = A.archive(wd, "s3://arch/team/run1", multipart_threshold=5 * MiB, part_size=5 * MiB)
    big = next(o for o in r.objects if o.key == "manifest.parquet")
    assert big.multipart and big.action == "uploaded"
    assert not any(o.multipart for o in r.objects if o.key != "manifest.parquet")
    check_archive_contents(read_all(moto_s3, "arch", "team/run1"), wd)
    head = moto_s3.head_object(Bucket="arch", Key="team/run1/manifest.parquet")
    assert head["Metadata"]["sha256"] == big.sha256

    again = A.archive(wd, "s3://arch/team/run1", multipart_threshold=5 * MiB, part_size=5 * MiB)
    assert again.uploaded == 0 and again.bytes_uploaded == 0 and again.verified == len(again.objects)


def test_moto_missing_bucket_is_one_line_error(tmp_path, moto_s3):
    wd = make_workdir(tmp_path)
    with pytest.raises(StageError, match="bucket 'nobucket' does not exist") as e:
        A.archive(wd, "s3://nobucket/x")
    assert "\n" not in str(e.value)
    r = A.archive(wd, "s3://newbucket/x", create_bucket=True)
    assert r.uploaded == len(EXPECTED) + 1


# --- SeaweedFS (real S3 server on loopback) ---------------------------------------------------------


def test_seaweed_archive_verified_and_checksum_enforced(tmp_path, seaweed_s3, monkeypatch):
    for k, v in seaweed_s3.env().items():
        monkeypatch.setenv(k, v)
    wd = make_workdir(tmp_path, big_mib=12)
    r = A.archive(wd, "s3://rn50-archive/nightly/2026-11-23", create_bucket=True,
                  multipart_threshold=5 * MiB, part_size=5 * MiB)
    assert r.uploaded == len(EXPECTED) + 1 and r.verified == r.uploaded and r.retries == 0
    c = seaweed_s3.client()
    check_archive_contents(read_all(c, "rn50-archive", "nightly/2026-11-23"), wd)
    # the server holds the SHA-256 we sent (single part: the object checksum; multipart: composite of parts)
    small = c.head_object(Bucket="rn50-archive", Key="nightly/2026-11-23/reports/pack.json", ChecksumMode="ENABLED")
    import base64

    assert small["ChecksumSHA256"] == base64.b64encode(hashlib.sha256((wd / "reports/pack.json").read_bytes()).digest()).decode()
    big = c.head_object(Bucket="rn50-archive", Key="nightly/2026-11-23/manifest.parquet", ChecksumMode="ENABLED")
    assert big["ChecksumSHA256"].endswith("-3") and big["Metadata"]["sha256"] == sha((wd / "manifest.parquet").read_bytes())

    # the checksum is really sent with our client settings: a wrong one is refused by the server
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError, match="BadDigest"):
        s3_client().put_object(Bucket="rn50-archive", Key="x", Body=b"abc",
                                 ChecksumSHA256=base64.b64encode(hashlib.sha256(b"abd").digest()).decode())

    before = {k: c.head_object(Bucket="rn50-archive", Key=f"nightly/2026-11-23/{k}")["LastModified"]
              for k in EXPECTED + ["MANIFEST.json"]}
    again = A.archive(wd, "s3://rn50-archive/nightly/2026-11-23", multipart_threshold=5 * MiB, part_size=5 * MiB)
    assert again.uploaded == 0 and again.unchanged == len(EXPECTED) + 1
    after = {k: c.head_object(Bucket="rn50-archive", Key=f"nightly/2026-11-23/{k}")["LastModified"] for k in before}
    assert after == before


def test_seaweed_server_stopped_mid_upload_retries_then_everything_verified(tmp_path, seaweed_s3, monkeypatch, caplog):
    for k, v in seaweed_s3.env().items():
        monkeypatch.setenv(k, v)
    seaweed_s3.client().create_bucket(Bucket="flaky")
    wd = make_workdir(tmp_path, big_mib=12)
    restarted = threading.Event()
    events: list[tuple[str, int, int]] = []

    def progress(key: str, done: int, total: int) -> None:
        events.append((key, done, total))
        # after the first 5 MiB part of the multipart object: take the server down, bring it back in 2 s
        if key == "manifest.parquet" and done == 5 * MiB and not restarted.is_set():
            seaweed_s3.stop()
            threading.Timer(2.0, lambda: (seaweed_s3.start(), restarted.set())).start()

    caplog.set_level(logging.WARNING, logger="rn50.archive")
    r = A.archive(wd, "s3://flaky/run", multipart_threshold=5 * MiB, part_size=5 * MiB,
                  retries=10, backoff=0.5, max_backoff=4.0, progress=progress)
    assert restarted.wait(60)
    assert r.retries >= 1 and "retry" in caplog.text
    assert r.verified == len(EXPECTED) + 1
    check_archive_contents(read_all(seaweed_s3.client(), "flaky", "run"), wd)
    assert ("manifest.parquet", 12 * MiB, 12 * MiB) in events


def test_seaweed_credentials_never_printed_logged_or_written(tmp_path, seaweed_s3):
    """Run `rn50 archive` as a process with a recognisable secret; grep everything it produced."""
    wd = make_workdir(tmp_path)
    seaweed_s3.client().create_bucket(Bucket="secrets")
    env = {**os.environ, **seaweed_s3.env()}
    ok = subprocess.run([sys.executable, "-m", "tasks.cli", "archive", str(wd), "s3://secrets/a", "--json"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["verified"] == len(EXPECTED) + 1
    bad = subprocess.run([sys.executable, "-m", "tasks.cli", "archive", str(wd), "s3://secrets/b"], cwd=REPO,
                         env={**env, "AWS_SECRET_ACCESS_KEY": SECRET_KEY + "-wrong"}, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("rn50 archive: error:") and "credentials" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    objects = read_all(seaweed_s3.client(), "secrets", "a")
    for secret in (SECRET_KEY, ACCESS_KEY):
        for text in (ok.stdout, ok.stderr, bad.stdout, bad.stderr):
            assert secret not in text
        assert not [p for p, b in files.items() if secret.encode() in b]
        assert not [k for k, b in objects.items() if secret.encode() in b]


# --- hostile work dirs: links are never followed, nothing partial is left (issue 16, item 3) ----------


SECRET = b"-----BEGIN OPENSSH PRIVATE KEY----- worker's key\n"


def plant_secret(tmp_path: Path) -> Path:
    secret_dir = tmp_path / "worker-home" / ".ssh"
    secret_dir.mkdir(parents=True)
    (secret_dir / "id_ed25519").write_bytes(SECRET)
    return secret_dir


def archived_files(dest: Path) -> dict[str, bytes]:
    return {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}


def test_symlinks_in_the_work_dir_are_skipped_and_logged(tmp_path, caplog):
    wd = make_workdir(tmp_path)
    secret_dir = plant_secret(tmp_path)
    (wd / "runs/r1/id_ed25519").symlink_to(secret_dir / "id_ed25519")      # a link to a file
    (wd / "runs/r1/home").symlink_to(secret_dir)                           # a link to a directory
    (wd / "reports/environ.txt").symlink_to("/proc/self/environ")
    (wd / "configs").rename(tmp_path / "configs-elsewhere")
    (wd / "configs").symlink_to(tmp_path / "configs-elsewhere")            # a whole tree
    dest = tmp_path / "archive"
    caplog.set_level(logging.WARNING, logger="rn50.archive")
    r = A.archive(wd, f"file://{dest}")
    objs = archived_files(dest)
    assert not [k for k, b in objs.items() if SECRET in b or b"PATH=" in b]
    assert sorted(objs) == sorted([k for k in EXPECTED if k != "configs/cpu-demo.yaml"] + ["MANIFEST.json"])
    assert sorted(r.skipped) == ["configs/", "reports/environ.txt", "runs/r1/home/", "runs/r1/id_ed25519"]
    for key in r.skipped:
        assert f"not archived: {key} is a symbolic link" in caplog.text


def test_a_file_swapped_for_a_link_after_listing_is_not_followed(tmp_path, monkeypatch, caplog):
    """collect() saw regular files; before they are opened, one becomes a link to the key and one
    directory on another file's path becomes a link to a directory holding a fake of it."""
    wd = make_workdir(tmp_path)
    secret_dir = plant_secret(tmp_path)
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "report.md").write_bytes(SECRET)
    (decoy / "report.json").write_bytes(SECRET)
    real_collect = A.collect

    def collect_then_swap(*args, **kwargs):
        files = real_collect(*args, **kwargs)
        (wd / "runs/r1/result_0.txt").unlink()
        (wd / "runs/r1/result_0.txt").symlink_to(secret_dir / "id_ed25519")
        (wd / "compliance/r1").rename(tmp_path / "r1-moved")
        (wd / "compliance/r1").symlink_to(decoy)
        return files

    monkeypatch.setattr(A, "collect", collect_then_swap)
    caplog.set_level(logging.WARNING, logger="rn50.archive")
    dest = tmp_path / "archive"
    r = A.archive(wd, f"file://{dest}")
    objs = archived_files(dest)
    assert not [k for k, b in objs.items() if SECRET in b]
    assert {"runs/r1/result_0.txt", "compliance/r1/report.md", "compliance/r1/report.json"} == set(r.skipped)
    assert not {"runs/r1/result_0.txt", "compliance/r1/report.md"} & set(objs)
    assert "runs/r1/config.yaml" in objs and "not archived: runs/r1/result_0.txt: symbolic link" in caplog.text


def test_file_copy_that_fails_verification_is_removed_with_the_manifest(tmp_path):
    wd = make_workdir(tmp_path)
    dest = tmp_path / "archive"

    def tamper(key: str, done: int, total: int) -> None:  # the stored copy is altered after it was written
        if key == "reports/pack.json":
            (dest / key).write_bytes(b'{"records": 11}\n')

    with pytest.raises(StageError, match=r"^verification failed for file://.*/reports/pack.json$"):
        A.archive(wd, f"file://{dest}", progress=tamper)
    objs = archived_files(dest)
    assert "reports/pack.json" not in objs and "MANIFEST.json" not in objs
    assert not [p for p in dest.rglob(".tmp-*")]
    assert A.archive(wd, f"file://{dest}").verified == len(EXPECTED) + 1  # the next run completes it


def test_s3_copy_that_fails_verification_is_removed_with_the_manifest(tmp_path, moto_s3):
    wd = make_workdir(tmp_path)
    moto_s3.create_bucket(Bucket="arch-verify")

    def tamper(key: str, done: int, total: int) -> None:
        if key == "reports/pack.json":
            moto_s3.put_object(Bucket="arch-verify", Key=f"run/{key}", Body=b"tampered", Metadata={"sha256": "0" * 64})

    with pytest.raises(StageError, match=r"^verification failed for s3://arch-verify/run/reports/pack.json"):
        A.archive(wd, "s3://arch-verify/run", progress=tamper)
    keys = [o["Key"] for o in moto_s3.list_objects_v2(Bucket="arch-verify", Prefix="run/").get("Contents", [])]
    assert "run/reports/pack.json" not in keys and "run/MANIFEST.json" not in keys and "run/runs/r1/config.yaml" in keys


def test_s3_multipart_of_a_file_changing_underneath_is_aborted_not_completed(tmp_path, moto_s3):
    wd = make_workdir(tmp_path, big_mib=11)
    moto_s3.create_bucket(Bucket="arch-changing")

    def rewrite(key: str, done: int, total: int) -> None:  # after part 1: the rest of the file changes in place
        if key == "manifest.parquet" and done == 5 * MiB:
            with open(wd / key, "r+b") as f:
                f.seek(6 * MiB)
                f.write(b"\0" * MiB)

    with pytest.raises(StageError, match=r"^manifest.parquet changed while being archived$"):
        A.archive(wd, "s3://arch-changing/run", multipart_threshold=5 * MiB, part_size=5 * MiB, progress=rewrite)
    keys = [o["Key"] for o in moto_s3.list_objects_v2(Bucket="arch-changing", Prefix="run/").get("Contents", [])]
    assert "run/manifest.parquet" not in keys and "run/MANIFEST.json" not in keys
    assert not moto_s3.list_multipart_uploads(Bucket="arch-changing").get("Uploads")
