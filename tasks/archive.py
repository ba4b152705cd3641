"""Archive stage: copy what matters of a work dir to `s3://bucket/prefix` or `file:///path`, verified.

What is archived (keys are paths relative to WORKDIR, under the URI's prefix):
  runs/**              result logs, per-rank stdout, run configs (runs/*/checkpoints/** only with
                       include_checkpoints=True)
  compliance/**        compliance reports and the generated submission package
  reports/**           verify / pack reports
  configs/**           configs copied into the work dir, if any
  manifest.parquet     the image manifest
  repo/configs/training/*.yaml, repo/configs/systems/*.yaml
                       the training and system configs of this checkout (include_repo_configs=True)
  MANIFEST.json        written last: {"objects": [{"key", "bytes", "sha256"}]} for everything above
Hidden files and directories (.stamps/, .tmp-*) are never archived.

Integrity: every object is sent with its SHA-256 (x-amz-checksum-sha256, per part for multipart
uploads), so the server rejects corrupted bodies; the hex SHA-256 is also stored as object
metadata `sha256`. An object whose stored sha256 and size already match is not uploaded again.
After uploading, every object is read back in full and its SHA-256 compared. Transient failures
(connection refused/reset, timeouts, 5xx, throttling) are retried with exponential backoff.

Credentials come only from boto3's standard chain (AWS_* environment, ~/.aws, instance roles) or
an explicit `s3_options` mapping; they are never logged, printed or written anywhere.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import urlparse

from tasks.paths import REPO
from tasks.common import CHUNK, Result, StageError, Workdir, atomic_path, digest_of, human_bytes, s3_client

log = logging.getLogger("rn50.archive")

MANIFEST_NAME = "MANIFEST.json"
DEFAULT_MULTIPART_THRESHOLD = 64 << 20
DEFAULT_PART_SIZE = 16 << 20
MIN_PART_SIZE = 5 << 20  # S3's minimum for every part but the last
TOP_LEVEL_FILES = ("manifest.parquet",)
TREES = ("runs", "compliance", "reports", "configs")
REPO_CONFIGS = ("configs/training", "configs/systems")

Progress = Callable[[str, int, int], None]  # (key, bytes done for this object, object size)


@dataclasses.dataclass
class ArchivedObject(Result):
    key: str  # relative to the archive root (the URI)
    bytes: int
    sha256: str
    action: str  # "uploaded" | "unchanged"
    multipart: bool = False


@dataclasses.dataclass
class ArchiveResult(Result):
    uri: str
    objects: list[ArchivedObject]
    uploaded: int
    unchanged: int
    bytes_uploaded: int
    verified: int  # objects re-read and checksum-verified (all of them, MANIFEST.json included)
    retries: int
    manifest_key: str
    manifest_sha256: str  # digest of MANIFEST.json: changes iff any archived content changes
    key: str  # cache key: sha256 of (uri, manifest_sha256)


# --- what to archive ------------------------------------------------------------------------------


def collect(workdir: str | os.PathLike, include_checkpoints: bool = False,
            include_repo_configs: bool = True) -> list[tuple[str, Path]]:
    """(key, path) of every file to archive, sorted by key."""
    wd = Workdir(workdir)
    out: list[tuple[str, Path]] = []
    if include_repo_configs:
        for d in REPO_CONFIGS:
            for p in sorted((REPO / d).glob("*.y*ml")):
                out.append((f"repo/{d}/{p.name}", p))
    for name in TOP_LEVEL_FILES:
        p = wd.root / name
        if p.is_file():
            out.append((name, p))
    for tree in TREES:
        base = wd.root / tree
        if not base.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            rel_dir = Path(dirpath).relative_to(wd.root)
            # Hidden = in-progress or bookkeeping (.tmp-*, .old-*); checkpoints are opt-in.
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                                 and not (d == "checkpoints" and rel_dir.parts[0] == "runs" and not include_checkpoints))
            for f in filenames:
                if not f.startswith("."):
                    p = Path(dirpath) / f
                    if p.is_file():
                        out.append(((rel_dir / f).as_posix(), p))
    return sorted(out)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def manifest_bytes(entries: Iterable[ArchivedObject]) -> bytes:
    # No timestamps: identical content gives an identical manifest, so re-archiving uploads nothing.
    body = {"format": "rn50-archive/1", "key_root": "archive URI",
            "objects": [{"key": e.key, "bytes": e.bytes, "sha256": e.sha256} for e in entries]}
    return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()


# --- URI parsing ----------------------------------------------------------------------------------


def parse_uri(uri: str) -> tuple[str, str, str]:
    """("s3", bucket, prefix) or ("file", "", absolute path)."""
    u = urlparse(uri)
    if u.scheme == "s3":
        if not u.netloc:
            raise StageError(f"archive URI {uri!r} has no bucket (expected s3://bucket/prefix)")
        return "s3", u.netloc, u.path.strip("/")
    if u.scheme == "file":
        if u.netloc not in ("", "localhost") or not u.path.startswith("/"):
            raise StageError(f"archive URI {uri!r} must be file:///absolute/path")
        return "file", "", u.path
    raise StageError(f"archive URI {uri!r} must start with s3:// or file://")


# --- retries --------------------------------------------------------------------------------------

_RETRY_CODES = {"RequestTimeout", "RequestTimeoutException", "SlowDown", "Throttling", "ThrottlingException",
                "InternalError", "ServiceUnavailable", "OperationAborted", "BadGateway", "GatewayTimeout"}


def _retryable(e: BaseException) -> bool:
    from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError

    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return err.get("Code") in _RETRY_CODES or int(status) >= 500
    return isinstance(e, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError))


def _describe(e: BaseException) -> str:
    from botocore.exceptions import ClientError

    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        return f"{err.get('Code', 'error')}: {err.get('Message', '')}".strip().rstrip(":")
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")


class _Retrier:
    def __init__(self, retries: int, backoff: float, max_backoff: float):
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.count = 0

    def __call__(self, what: str, fn: Callable[[], Any]) -> Any:
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as e:
                if not _retryable(e) or attempt == self.retries:
                    raise
                delay = min(self.backoff * 2 ** attempt, self.max_backoff)
                self.count += 1
                log.warning("%s failed (%s); retry %d/%d in %.1fs", what, _describe(e), attempt + 1, self.retries, delay)
                time.sleep(delay)


# --- S3 -------------------------------------------------------------------------------------------


class _S3Target:
    def __init__(self, bucket: str, prefix: str, client, retry: _Retrier, threshold: int, part_size: int,
                 progress: Progress | None):
        self.bucket, self.prefix, self.c, self.retry = bucket, prefix, client, retry
        self.threshold, self.part_size, self.progress = threshold, part_size, progress

    def full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.full(key)}"

    def check_bucket(self, create: bool) -> None:
        from botocore.exceptions import ClientError

        try:
            self.retry(f"HEAD bucket {self.bucket}", lambda: self.c.head_bucket(Bucket=self.bucket))
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            if code in ("404", "NoSuchBucket", "NotFound") and create:
                self.retry(f"create bucket {self.bucket}", lambda: self.c.create_bucket(Bucket=self.bucket))
                return
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StageError(f"bucket {self.bucket!r} does not exist (create it, or pass --create-bucket)") from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StageError(f"access to bucket {self.bucket!r} denied ({code}): check the credentials "
                                 "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / profile) and the endpoint") from None
            raise StageError(f"cannot access bucket {self.bucket!r}: {_describe(e)}") from None

    def stored_sha256(self, key: str) -> tuple[str | None, int | None]:
        from botocore.exceptions import ClientError

        try:
            h = self.retry(f"HEAD {self.where(key)}", lambda: self.c.head_object(Bucket=self.bucket, Key=self.full(key)))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None, None
            raise
        return (h.get("Metadata") or {}).get("sha256"), h.get("ContentLength")

    def put(self, key: str, path: Path | None, data: bytes | None, size: int, sha: str) -> bool:
        """Upload; returns True when it went multipart."""
        meta = {"sha256": sha}
        if size >= self.threshold and path is not None:
            self._multipart(key, path, size, meta)
            return True
        body = data if data is not None else path.read_bytes()
        digest = hashlib.sha256(body).digest()
        if digest.hex() != sha:
            raise StageError(f"{path} changed while being archived")
        b64 = base64.b64encode(digest).decode()
        self.retry(f"PUT {self.where(key)}", lambda: self.c.put_object(
            Bucket=self.bucket, Key=self.full(key), Body=body, ChecksumSHA256=b64, Metadata=meta))
        if self.progress:
            self.progress(key, size, size)
        return False

    def _multipart(self, key: str, path: Path, size: int, meta: dict[str, str]) -> None:
        from botocore.exceptions import ClientError

        where = self.where(key)
        for restart in range(3):
            up = self.retry(f"start multipart {where}", lambda: self.c.create_multipart_upload(
                Bucket=self.bucket, Key=self.full(key), Metadata=meta, ChecksumAlgorithm="SHA256"))
            uid = up["UploadId"]
            try:
                parts, done = [], 0
                with open(path, "rb") as f:
                    for n in range(1, -(-size // self.part_size) + 1):
                        chunk = f.read(self.part_size)
                        b64 = base64.b64encode(hashlib.sha256(chunk).digest()).decode()
                        r = self.retry(f"PUT part {n} of {where}", lambda: self.c.upload_part(
                            Bucket=self.bucket, Key=self.full(key), UploadId=uid, PartNumber=n, Body=chunk,
                            ChecksumSHA256=b64))
                        parts.append({"PartNumber": n, "ETag": r["ETag"], "ChecksumSHA256": b64})
                        done += len(chunk)
                        if self.progress:
                            self.progress(key, done, size)
                self.retry(f"complete multipart {where}", lambda: self.c.complete_multipart_upload(
                    Bucket=self.bucket, Key=self.full(key), UploadId=uid, MultipartUpload={"Parts": parts}))
                return
            except ClientError as e:
                # A server that lost the upload (restart without state) forgets its id: start over.
                if e.response.get("Error", {}).get("Code") == "NoSuchUpload" and restart < 2:
                    log.warning("%s: server lost multipart upload; starting it again", where)
                    self.retry.count += 1
                    continue
                self._abort(key, uid)
                raise
            except BaseException:
                self._abort(key, uid)
                raise

    def _abort(self, key: str, uid: str) -> None:
        try:
            self.c.abort_multipart_upload(Bucket=self.bucket, Key=self.full(key), UploadId=uid)
        except Exception:  # best effort: lifecycle rules clean up what this cannot
            pass

    def verify(self, key: str, size: int, sha: str) -> None:
        def read() -> tuple[str, int, str | None]:
            r = self.c.get_object(Bucket=self.bucket, Key=self.full(key))
            h, n = hashlib.sha256(), 0
            for chunk in r["Body"].iter_chunks(CHUNK):
                h.update(chunk)
                n += len(chunk)
            return h.hexdigest(), n, (r.get("Metadata") or {}).get("sha256")

        got, n, meta = self.retry(f"GET {self.where(key)}", read)
        if got != sha or n != size or meta != sha:
            raise StageError(f"verification failed for {self.where(key)}: read back {n} bytes sha256 {got[:12]}…,"
                             f" expected {size} bytes {sha[:12]}… (metadata {str(meta)[:12]})")


# --- file:// --------------------------------------------------------------------------------------


class _FileTarget:
    def __init__(self, root: str, progress: Progress | None):
        self.root, self.progress = Path(root), progress

    def where(self, key: str) -> str:
        return f"file://{self.root / key}"

    def check_bucket(self, create: bool) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StageError(f"cannot create archive directory {self.root}: {e.strerror}") from None

    def stored_sha256(self, key: str) -> tuple[str | None, int | None]:
        p = self.root / key
        return (sha256_file(p), p.stat().st_size) if p.is_file() else (None, None)

    def put(self, key: str, path: Path | None, data: bytes | None, size: int, sha: str) -> bool:
        # Copy beside the destination, check, then rename: readers see the old or the new file, never half.
        with atomic_path(self.root / key) as tmp:
            h = hashlib.sha256()
            with open(tmp, "wb") as out:
                if data is not None:
                    out.write(data)
                    h.update(data)
                else:
                    with open(path, "rb") as src:
                        while chunk := src.read(CHUNK):
                            out.write(chunk)
                            h.update(chunk)
            if h.hexdigest() != sha:
                raise StageError(f"{path} changed while being archived")
        if self.progress:
            self.progress(key, size, size)
        return False

    def verify(self, key: str, size: int, sha: str) -> None:
        p = self.root / key
        if not p.is_file() or p.stat().st_size != size or sha256_file(p) != sha:
            raise StageError(f"verification failed for {self.where(key)}")


# --- the stage ------------------------------------------------------------------------------------


def archive(
    workdir: str | os.PathLike,
    uri: str,
    include_checkpoints: bool = False,
    *,
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
    part_size: int = DEFAULT_PART_SIZE,
    retries: int = 8,
    backoff: float = 0.5,
    max_backoff: float = 8.0,
    create_bucket: bool = False,
    include_repo_configs: bool = True,
    s3_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> ArchiveResult:
    """Archive WORKDIR to URI; see the module docstring. s3_options go to boto3's client()
    (endpoint_url, region_name, aws_access_key_id, ...), e.g. from a Prefect AWS credentials block."""
    wd = Path(workdir)
    if not wd.is_dir():
        raise StageError(f"work dir {wd} does not exist")
    if part_size < MIN_PART_SIZE:
        raise StageError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3 minimum)")
    if multipart_threshold < part_size:
        multipart_threshold = part_size
    scheme, bucket, prefix = parse_uri(uri)
    files = collect(wd, include_checkpoints, include_repo_configs)
    if not any(not k.startswith("repo/") for k, _ in files):
        raise StageError(f"nothing to archive in {wd} (no runs/, compliance/, reports/, configs/ or manifest.parquet)")
    if any(k == MANIFEST_NAME for k, _ in files):
        raise StageError(f"{wd}/{MANIFEST_NAME} would collide with the archive manifest")

    retry = _Retrier(retries, backoff, max_backoff)
    if scheme == "s3":
        target: Any = _S3Target(bucket, prefix, s3_client(s3_options), retry, multipart_threshold, part_size, progress)
    else:
        target = _FileTarget(prefix, progress)
    target.check_bucket(create_bucket)

    entries: list[ArchivedObject] = []
    uploaded_bytes = 0

    def put_one(key: str, path: Path | None, data: bytes | None) -> ArchivedObject:
        nonlocal uploaded_bytes
        size = len(data) if data is not None else path.stat().st_size
        sha = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(path)
        stored_sha, stored_size = target.stored_sha256(key)
        if stored_sha == sha and stored_size == size:
            log.info("unchanged %s", key)
            return ArchivedObject(key, size, sha, "unchanged")
        multipart = target.put(key, path, data, size, sha)
        uploaded_bytes += size
        log.info("uploaded %s (%s%s)", key, human_bytes(size), ", multipart" if multipart else "")
        return ArchivedObject(key, size, sha, "uploaded", multipart)

    try:
        for key, path in files:
            entries.append(put_one(key, path, None))
        manifest = manifest_bytes(entries)
        # The manifest goes last so its presence means everything it lists was uploaded first.
        man = put_one(MANIFEST_NAME, None, manifest)
        for e in [*entries, man]:
            target.verify(e.key, e.bytes, e.sha256)
    except StageError:
        raise
    except Exception as e:  # boto/OS errors left after retries: one line, no credentials in it
        raise StageError(f"archive to {uri} failed: {_describe(e)}") from None

    all_objs = [*entries, man]
    return ArchiveResult(
        uri=uri, objects=all_objs,
        uploaded=sum(o.action == "uploaded" for o in all_objs),
        unchanged=sum(o.action == "unchanged" for o in all_objs),
        bytes_uploaded=uploaded_bytes, verified=len(all_objs), retries=retry.count,
        manifest_key=MANIFEST_NAME, manifest_sha256=man.sha256, key=digest_of([uri, man.sha256]),
    )


# --- CLI ------------------------------------------------------------------------------------------


def add_command(subparsers) -> None:
    p = subparsers.add_parser("archive", help="upload logs, reports, manifest (and checkpoints) to s3:// or file://",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("workdir")
    p.add_argument("uri", help="s3://bucket/prefix or file:///path")
    p.add_argument("--include-checkpoints", action="store_true", help="also upload runs/*/checkpoints/")
    p.add_argument("--create-bucket", action="store_true", help="create the S3 bucket if it does not exist")
    p.add_argument("--multipart-threshold-mb", type=float, default=DEFAULT_MULTIPART_THRESHOLD / 2**20)
    p.add_argument("--part-size-mb", type=float, default=DEFAULT_PART_SIZE / 2**20)
    p.add_argument("--retries", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=_run)


def _run(args) -> int:
    # Our progress/retry lines on stderr; not the root logger, which would let botocore chatter through.
    if not logging.getLogger().handlers and not log.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
    r = archive(args.workdir, args.uri, include_checkpoints=args.include_checkpoints,
                multipart_threshold=int(args.multipart_threshold_mb * 2**20), part_size=int(args.part_size_mb * 2**20),
                retries=args.retries, create_bucket=args.create_bucket)
    if args.json:
        print(r.to_json())
    else:
        print(f"archived {len(r.objects)} objects to {r.uri}: {r.uploaded} uploaded ({human_bytes(r.bytes_uploaded)}), "
              f"{r.unchanged} unchanged, {r.verified} verified, {r.retries} retries")
    return 0
