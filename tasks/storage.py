"""Storage shared by the stages: `s3://bucket/prefix` and `file:///path` URIs, object access, retries.

Used by fetch (an `s3://` source), archive (the target it uploads to and verifies) and nightly (the
baseline store next to the archive). Nothing here knows about a stage: errors are left to the caller,
which words them (`describe_error` gives the one-line cause, never a credential).

  parse_uri(uri)            -> ("s3", bucket, prefix) | ("file", "", /absolute/path)
  is_not_found(e)           an S3 "no such object" answer (404, NoSuchKey, NotFound)
  describe_error(e)         one line: "Code: Message" for S3, "Type: first line" otherwise
  Retrier                   exponential backoff for transient S3 failures (5xx, throttling, connection)
  open_target(uri, ...)     S3Target | FileTarget: put (with SHA-256), verify, read, write, remove
  open_nofollow(path)       a regular file opened without following any symlink on its path

Integrity on S3: every object is sent with its SHA-256 (x-amz-checksum-sha256, per part for multipart
uploads), so the server rejects corrupted bodies; the hex SHA-256 is also stored as object metadata
`sha256`. On a file system: copy beside the destination, check, rename.
"""
from __future__ import annotations

import base64
import errno
import hashlib
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Union
from urllib.parse import urlparse

from tasks.common import CHUNK, StageError, atomic_path, s3_client

log = logging.getLogger("rn50.storage")

Progress = Callable[[str, int, int], None]  # (key, bytes done for this object, object size)

NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})  # no such object
BUCKET_MISSING_CODES = frozenset({"404", "NoSuchBucket", "NotFound"})
_DENIED = frozenset({"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"})
_RETRY_CODES = frozenset({"RequestTimeout", "RequestTimeoutException", "SlowDown", "Throttling", "ThrottlingException",
                          "InternalError", "ServiceUnavailable", "OperationAborted", "BadGateway", "GatewayTimeout"})


# --- URIs -----------------------------------------------------------------------------------------


def parse_uri(uri: str, what: str = "archive URI") -> tuple[str, str, str]:
    """("s3", bucket, prefix) or ("file", "", absolute path); `what` names the URI in the error."""
    u = urlparse(uri)
    if u.scheme == "s3":
        if not u.netloc:
            raise StageError(f"{what} {uri!r} has no bucket (expected s3://bucket/prefix)")
        return "s3", u.netloc, u.path.strip("/")
    if u.scheme == "file":
        if u.netloc not in ("", "localhost") or not u.path.startswith("/"):
            raise StageError(f"{what} {uri!r} must be file:///absolute/path")
        return "file", "", u.path
    raise StageError(f"{what} {uri!r} must start with s3:// or file://")


def join_key(prefix: str, key: str) -> str:
    return f"{prefix}/{key}" if prefix else key


# --- errors ---------------------------------------------------------------------------------------


def error_code(e: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError ("NoSuchKey", "403", ...); None for anything else."""
    response = getattr(e, "response", None)
    if not isinstance(response, dict):
        return None
    return (response.get("Error") or {}).get("Code")


def is_not_found(e: BaseException, codes: frozenset[str] = NOT_FOUND_CODES) -> bool:
    """An S3 "no such object" answer (by default), as opposed to an error worth reporting."""
    return error_code(e) in codes


def is_retryable(e: BaseException) -> bool:
    """Transient: connection refused/reset, timeouts, 5xx, throttling."""
    from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError

    if isinstance(e, ClientError):
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return error_code(e) in _RETRY_CODES or int(status) >= 500
    return isinstance(e, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError))


def describe_error(e: BaseException) -> str:
    """One line naming the cause; built from the error code and message only, so no credential."""
    response = getattr(e, "response", None)
    if isinstance(response, dict) and "Error" in response:
        err = response.get("Error", {})
        return f"{err.get('Code', 'error')}: {err.get('Message', '')}".strip().rstrip(":")
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")


class Retrier:
    """`retry(what, fn)`: call fn, retrying transient failures with exponential backoff; `count` retries so far."""

    def __init__(self, retries: int = 0, backoff: float = 0.5, max_backoff: float = 8.0,
                 logger: logging.Logger | None = None):
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.log = logger or log
        self.count = 0

    def __call__(self, what: str, fn: Callable[[], Any]) -> Any:
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as e:
                if not is_retryable(e) or attempt == self.retries:
                    raise
                delay = min(self.backoff * 2 ** attempt, self.max_backoff)
                self.count += 1
                self.log.warning("%s failed (%s); retry %d/%d in %.1fs", what, describe_error(e), attempt + 1,
                                 self.retries, delay)
                time.sleep(delay)


# --- reading local files without following links --------------------------------------------------


class SymlinkError(OSError):
    """The path (or one of its directories) is a symbolic link, or not a regular file."""


def open_nofollow(path: str | os.PathLike) -> BinaryIO:
    """Open a regular file for reading, refusing a symlink anywhere on its (absolute) path.

    Each directory is opened relative to the previous one with O_NOFOLLOW, so a component swapped for
    a link after the caller looked at it is refused too, not followed. Raises SymlinkError for a link
    or a non-regular file (FIFO, device): the caller skips it. Size and content come from the one fd."""
    p = Path(os.path.abspath(path))
    parts = p.parts[1:]
    flags_dir = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(p.anchor, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            try:
                nfd = os.open(part, flags_dir, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise SymlinkError(e.errno, "a directory on the path is a symbolic link", str(p)) from None
                raise
            os.close(fd)
            fd = nfd
        try:
            ffd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0),
                          dir_fd=fd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise SymlinkError(e.errno, "symbolic link", str(p)) from None
            raise
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(ffd).st_mode):
        os.close(ffd)
        raise SymlinkError(errno.EINVAL, "not a regular file", str(p))
    return os.fdopen(ffd, "rb")


def fd_size(f: BinaryIO) -> int:
    return os.fstat(f.fileno()).st_size


def sha256_stream(f: BinaryIO) -> str:
    """SHA-256 of a file object from its start (leaves it at the end)."""
    f.seek(0)
    h = hashlib.sha256()
    while chunk := f.read(CHUNK):
        h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)


# --- targets --------------------------------------------------------------------------------------

Source = Union[BinaryIO, bytes]  # an open file (read from its start) or the bytes themselves


class S3Target:
    """Objects under s3://bucket/prefix."""

    scheme = "s3"

    def __init__(self, bucket: str, prefix: str, client, retry: Retrier | None = None,
                 multipart_threshold: int = 64 << 20, part_size: int = 16 << 20, progress: Progress | None = None):
        self.bucket, self.prefix, self.c = bucket, prefix, client
        self.retry = retry or Retrier()
        self.threshold, self.part_size, self.progress = multipart_threshold, part_size, progress

    def full(self, key: str) -> str:
        return join_key(self.prefix, key)

    def where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.full(key)}"

    def check_bucket(self, create: bool) -> None:
        """The bucket exists and is accessible (created when `create`), else a one-line StageError."""
        from botocore.exceptions import ClientError

        try:
            self.retry(f"HEAD bucket {self.bucket}", lambda: self.c.head_bucket(Bucket=self.bucket))
        except ClientError as e:
            code = error_code(e)
            if code in BUCKET_MISSING_CODES and create:
                self.retry(f"create bucket {self.bucket}", lambda: self.c.create_bucket(Bucket=self.bucket))
                return
            if code in BUCKET_MISSING_CODES:
                raise StageError(f"bucket {self.bucket!r} does not exist (create it, or pass --create-bucket)") from None
            if code in _DENIED:
                raise StageError(f"access to bucket {self.bucket!r} denied ({code}): check the credentials "
                                 "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / profile) and the endpoint") from None
            raise StageError(f"cannot access bucket {self.bucket!r}: {describe_error(e)}") from None

    def stored_sha256(self, key: str) -> tuple[str | None, int | None]:
        """(metadata sha256, size) of a stored object; (None, None) when there is none."""
        from botocore.exceptions import ClientError

        try:
            h = self.retry(f"HEAD {self.where(key)}", lambda: self.c.head_object(Bucket=self.bucket, Key=self.full(key)))
        except ClientError as e:
            if is_not_found(e, NOT_FOUND_CODES):
                return None, None
            raise
        return (h.get("Metadata") or {}).get("sha256"), h.get("ContentLength")

    def put(self, key: str, src: Source, size: int, sha: str) -> bool:
        """Upload `size` bytes whose SHA-256 is `sha`; True when it went multipart. A source whose bytes no
        longer match `sha` is a StageError and leaves no object behind."""
        meta = {"sha256": sha}
        if size >= self.threshold and not isinstance(src, bytes):
            self._multipart(key, src, size, meta)
            return True
        if isinstance(src, bytes):
            body = src
        else:
            src.seek(0)
            body = src.read(size + 1)
        digest = hashlib.sha256(body).digest()
        if digest.hex() != sha or len(body) != size:
            raise StageError(f"{key} changed while being archived")
        b64 = base64.b64encode(digest).decode()
        self.retry(f"PUT {self.where(key)}", lambda: self.c.put_object(
            Bucket=self.bucket, Key=self.full(key), Body=body, ChecksumSHA256=b64, Metadata=meta))
        if self.progress:
            self.progress(key, size, size)
        return False

    def _multipart(self, key: str, src: BinaryIO, size: int, meta: dict[str, str]) -> None:
        from botocore.exceptions import ClientError

        where = self.where(key)
        for restart in range(3):
            up = self.retry(f"start multipart {where}", lambda: self.c.create_multipart_upload(
                Bucket=self.bucket, Key=self.full(key), Metadata=meta, ChecksumAlgorithm="SHA256"))
            uid = up["UploadId"]
            try:
                parts, done, whole = [], 0, hashlib.sha256()
                src.seek(0)
                for n in range(1, -(-size // self.part_size) + 1):
                    chunk = src.read(min(self.part_size, size - done))
                    whole.update(chunk)
                    b64 = base64.b64encode(hashlib.sha256(chunk).digest()).decode()
                    r = self.retry(f"PUT part {n} of {where}", lambda: self.c.upload_part(
                        Bucket=self.bucket, Key=self.full(key), UploadId=uid, PartNumber=n, Body=chunk,
                        ChecksumSHA256=b64))
                    parts.append({"PartNumber": n, "ETag": r["ETag"], "ChecksumSHA256": b64})
                    done += len(chunk)
                    if self.progress:
                        self.progress(key, done, size)
                # The parts are checked one by one by the server; the whole must still be what was hashed,
                # or the object would carry a sha256 its content does not have: never complete it then.
                if done != size or src.read(1) or whole.hexdigest() != meta["sha256"]:
                    raise StageError(f"{key} changed while being archived")
                self.retry(f"complete multipart {where}", lambda: self.c.complete_multipart_upload(
                    Bucket=self.bucket, Key=self.full(key), UploadId=uid, MultipartUpload={"Parts": parts}))
                return
            except ClientError as e:
                # A server that lost the upload (restart without state) forgets its id: start over.
                if error_code(e) == "NoSuchUpload" and restart < 2:
                    self.retry.log.warning("%s: server lost multipart upload; starting it again", where)
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
        """Read the object back in full; a StageError unless its bytes, size and metadata match."""
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

    def remove(self, key: str) -> bool:
        """Delete the object, best effort (a failure is logged, not raised); True when the delete went through."""
        try:
            self.retry(f"DELETE {self.where(key)}", lambda: self.c.delete_object(Bucket=self.bucket, Key=self.full(key)))
            return True
        except Exception as e:
            self.retry.log.warning("could not remove %s: %s", self.where(key), describe_error(e))
            return False

    def read(self, key: str) -> bytes | None:
        """The object's bytes; None when there is no such object. Other errors are raised."""
        try:
            return self.retry(f"GET {self.where(key)}",
                              lambda: self.c.get_object(Bucket=self.bucket, Key=self.full(key))["Body"].read())
        except Exception as e:
            if is_not_found(e, NOT_FOUND_CODES):
                return None
            raise

    def write(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        """One PUT (S3 never shows a partial object), with the checksum the server checks; returns where."""
        b64 = base64.b64encode(hashlib.sha256(data).digest()).decode()
        self.retry(f"PUT {self.where(key)}", lambda: self.c.put_object(
            Bucket=self.bucket, Key=self.full(key), Body=data, ChecksumSHA256=b64, ContentType=content_type))
        return self.where(key)

    def has_any(self, prefix: str) -> bool:
        """True when at least one object's key starts with prefix (relative to the target's prefix)."""
        r = self.retry(f"LIST {self.where(prefix)}", lambda: self.c.list_objects_v2(
            Bucket=self.bucket, Prefix=self.full(prefix), MaxKeys=1))
        return bool(r.get("KeyCount") or r.get("Contents"))


class FileTarget:
    """Files under a directory (a `file://` URI or a plain path)."""

    scheme = "file"

    def __init__(self, root: str | os.PathLike, progress: Progress | None = None):
        self.root, self.progress = Path(root), progress

    def path(self, key: str) -> Path:
        return self.root / key

    def where(self, key: str) -> str:
        return f"file://{self.root / key}"

    def check_bucket(self, create: bool) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StageError(f"cannot create archive directory {self.root}: {e.strerror}") from None

    def stored_sha256(self, key: str) -> tuple[str | None, int | None]:
        p = self.root / key
        if p.is_symlink() or not p.is_file():
            return None, None
        return sha256_file(p), p.stat().st_size

    def put(self, key: str, src: Source, size: int, sha: str) -> bool:
        # Copy beside the destination, check, then rename: readers see the old or the new file, never half.
        with atomic_path(self.root / key) as tmp:
            h, n = hashlib.sha256(), 0
            with open(tmp, "wb") as out:
                if isinstance(src, bytes):
                    out.write(src)
                    h.update(src)
                    n = len(src)
                else:
                    src.seek(0)
                    while chunk := src.read(CHUNK):
                        out.write(chunk)
                        h.update(chunk)
                        n += len(chunk)
            if h.hexdigest() != sha or n != size:
                raise StageError(f"{key} changed while being archived")
        if self.progress:
            self.progress(key, size, size)
        return False

    def verify(self, key: str, size: int, sha: str) -> None:
        p = self.root / key
        if p.is_symlink() or not p.is_file() or p.stat().st_size != size or sha256_file(p) != sha:
            raise StageError(f"verification failed for {self.where(key)}")

    def remove(self, key: str) -> bool:
        try:
            (self.root / key).unlink(missing_ok=True)
            return True
        except OSError as e:
            log.warning("could not remove %s: %s", self.where(key), e.strerror)
            return False

    def read(self, key: str) -> bytes | None:
        """The file's bytes; None when there is none. IsADirectoryError and other OSErrors are raised."""
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, key: str, data: bytes, content_type: str = "") -> str:
        with atomic_path(self.root / key) as tmp:
            tmp.write_bytes(data)
        return str(self.root / key)

    def has_any(self, prefix: str) -> bool:
        """True when a file under root starts with prefix ("history/" = any file in history/)."""
        d, _, start = prefix.rpartition("/")
        base = self.root / d
        try:
            return any(e.name.startswith(start) and not e.name.startswith(".") for e in os.scandir(base))
        except (FileNotFoundError, NotADirectoryError):
            return False


Target = Union[S3Target, FileTarget]


def open_target(uri: str, *, what: str = "archive URI", s3_options: dict[str, Any] | None = None,
                retry: Retrier | None = None, multipart_threshold: int = 64 << 20, part_size: int = 16 << 20,
                progress: Progress | None = None) -> Target:
    """The target an `s3://` or `file://` URI names; a plain path (no scheme) is a directory."""
    if "://" not in uri:
        return FileTarget(Path(uri).resolve(), progress)
    scheme, bucket, prefix = parse_uri(uri, what)
    if scheme == "s3":
        return S3Target(bucket, prefix, s3_client(s3_options, role="archive"), retry, multipart_threshold,
                        part_size, progress)
    return FileTarget(prefix, progress)
