"""Fetch stage: bring the three ILSVRC2012 archives into WORKDIR/raw/, MD5-checked while streaming.

SOURCE is a local directory, an http(s):// base URL, or s3://bucket/prefix. Each archive streams into
raw/.partial/<name>.part while its MD5 is computed; an interrupted download resumes from the bytes
already there (HTTP Range / S3 ranged GET). Only an archive whose digest matches the expected one is
renamed to raw/<name>; a mismatching one is moved to raw/rejected/ and never used.

Bounded: an archive announced larger than its cap (tasks.ilsvrc.ARCHIVE_CAP) is refused before any byte
moves, and a download never writes more than the size its source announced (without an announcement,
than that cap): a source that sends more is a one-line error and its partial file is removed.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import dataclasses
import hashlib
import os
import queue
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO, Callable, Optional

from tasks.common import Result, StageError, TransientError, Workdir, human_bytes, s3_client
from tasks.ilsvrc import ARCHIVE_CAP, ARCHIVES, OFFICIAL_MD5, read_fetch_record, read_md5sums, write_fetch_record

Progress = Callable[[str, int, Optional[int]], None]


@dataclasses.dataclass
class FetchResult(Result):
    source: str
    raw_dir: str
    md5: dict[str, str]
    bytes: dict[str, int]
    downloaded: list[str]
    reused: list[str]
    seconds: float


# --- sources: size(name) and open(name, offset) -> a byte stream starting at offset -------------


class LocalSource:
    def __init__(self, root: str):
        self.root = Path(root)
        if not self.root.is_dir():
            raise StageError(f"source directory {root} does not exist")

    def size(self, name: str) -> int:
        try:
            return (self.root / name).stat().st_size
        except FileNotFoundError:
            raise StageError(f"source has no {name} (looked in {self.root})") from None

    def open(self, name: str, offset: int) -> BinaryIO:
        f = open(self.root / name, "rb", buffering=0)  # chunks are read straight into the hasher's buffers
        f.seek(offset)
        if hasattr(os, "posix_fadvise"):  # read ahead further
            os.posix_fadvise(f.fileno(), offset, 0, os.POSIX_FADV_SEQUENTIAL)
        return f


class HttpSource:
    def __init__(self, base: str):
        self.base = base if base.endswith("/") else base + "/"

    def _url(self, name: str) -> str:
        return urllib.parse.urljoin(self.base, urllib.parse.quote(name))

    def size(self, name: str) -> int | None:
        """The size the server announces (HEAD Content-Length), None when it announces none."""
        try:
            with urllib.request.urlopen(urllib.request.Request(self._url(name), method="HEAD"), timeout=60) as r:
                length = r.headers["Content-Length"]
                return int(length) if length is not None and length.strip().isdigit() else None
        except urllib.error.HTTPError as e:
            raise StageError(f"source has no {name}: HTTP {e.code} for {self._url(name)}") from None
        except (urllib.error.URLError, OSError) as e:
            raise TransientError(f"cannot reach {self._url(name)}: {getattr(e, 'reason', e)}") from None

    def open(self, name: str, offset: int) -> BinaryIO:
        req = urllib.request.Request(self._url(name), headers={"Range": f"bytes={offset}-"} if offset else {})
        try:
            r = urllib.request.urlopen(req, timeout=60)
        except urllib.error.HTTPError as e:
            raise (TransientError if e.code >= 500 else StageError)(f"download of {name} failed: HTTP {e.code}") from None
        except (urllib.error.URLError, OSError) as e:
            raise TransientError(f"cannot reach {self._url(name)}: {getattr(e, 'reason', e)}") from None
        if offset and r.status != 206:
            r.close()
            raise _RangeIgnored()
        return r


class S3Source:
    def __init__(self, uri: str):
        parsed = urllib.parse.urlparse(uri)
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        if not self.bucket:
            raise StageError(f"no bucket in {uri}")
        # Endpoint, region and credentials come from the standard AWS environment / config files.
        self.s3 = s3_client(timeout=60.0, attempts=5, role="source")

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _call(self, what: str, fn, **kw):
        from botocore.exceptions import BotoCoreError, ClientError

        from tasks import storage

        try:
            return fn(Bucket=self.bucket, Key=kw.pop("Key"), **kw)
        except ClientError as e:
            if storage.is_not_found(e):
                raise StageError(f"source has no {what} (s3://{self.bucket}/{self._key(what)})") from None
            raise (TransientError if storage.is_retryable(e) else StageError)(
                f"S3 error for {what}: {storage.error_code(e) or '?'}") from None
        except BotoCoreError as e:
            raise (TransientError if storage.is_retryable(e) else StageError)(f"S3 error for {what}: {e}") from None

    def size(self, name: str) -> int:
        return int(self._call(name, self.s3.head_object, Key=self._key(name))["ContentLength"])

    def open(self, name: str, offset: int) -> BinaryIO:
        kw = {"Range": f"bytes={offset}-"} if offset else {}
        return self._call(name, self.s3.get_object, Key=self._key(name), **kw)["Body"]


class _RangeIgnored(Exception):
    pass


def open_source(uri: str):
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        return HttpSource(uri)
    if scheme == "s3":
        return S3Source(uri)
    if scheme == "file":
        return LocalSource(urllib.parse.urlparse(uri).path)
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        return LocalSource(uri)
    raise StageError(f"unsupported source scheme {scheme!r} in {uri} (use a directory, http(s)://, or s3://)")


# --- the stage ------------------------------------------------------------------------------------


def _verified_copy(raw: Path, name: str, expected: str) -> bool:
    """True when raw/<name> was verified before and has not changed since (no re-hash)."""
    record = read_fetch_record(raw, name)
    try:
        st = (raw / name).stat()
    except FileNotFoundError:
        return False
    return record == {"md5": expected, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _check_announced(name: str, size: int | None) -> None:
    if size is not None and size > ARCHIVE_CAP[name]:
        raise StageError(f"the source announces {size:,} bytes for {name}, over the {human_bytes(ARCHIVE_CAP[name])} "
                         f"cap for this ILSVRC2012 archive")


_PIPE_CHUNK = 4 << 20   # bytes per read: large buffers, so hashlib and the writes release the GIL for long
_PIPE_BUFFERS = 6        # chunk buffers in all: the hasher may be up to 5 chunks (20 MiB) behind the reader


class _Hasher:
    """MD5 of a stream's chunks in a thread of its own, on a ring of reusable chunk buffers.

    The thread that reads also writes; hashing is the only other busy thread, so on two cores it has one
    to itself (with reading, writing and hashing in three threads, the slowest of them, hashing, got
    two thirds of a core at times). Buffers are reused, never reallocated: no page faults per chunk. A
    buffer goes back to the reader only once hashed; the reader waits for one when the hasher is
    behind. After an error the thread still hands buffers back, and `put`/`finish` re-raise it."""

    def __init__(self, md5, name: str):
        self.md5, self.error = md5, None
        self.free: queue.Queue = queue.Queue()
        for _ in range(_PIPE_BUFFERS):
            self.free.put(bytearray(_PIPE_CHUNK))
        self.todo: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.todo.get()) is not None:
            buf, n = item
            if self.error is None:
                try:
                    with memoryview(buf) as view:
                        self.md5.update(view[:n])
                except BaseException as e:  # noqa: BLE001 - handed to the reader
                    self.error = e
            self.free.put(buf)

    def buffer(self) -> bytearray:
        """A buffer the hasher is done with (waits while it is _PIPE_BUFFERS chunks behind)."""
        return self.free.get()

    def put(self, buf: bytearray, n: int) -> None:
        """Hash buf[:n]; the buffer comes back from `buffer` once hashed."""
        if self.error is not None:
            raise self.error
        self.todo.put((buf, n))

    def stop(self) -> None:
        """End the thread after the chunks already queued (idempotent)."""
        if self.thread.is_alive():
            self.todo.put(None)
            self.thread.join()

    def finish(self) -> None:
        self.stop()
        if self.error is not None:
            raise self.error


def _download(src, name: str, raw: Path, total: int | None, progress: Progress | None) -> tuple[str, Path]:
    """Stream `name` into raw/.partial/<name>.part, MD5 on the way. Never writes more than `total` (the
    size the source announced) or, without an announcement, than the archive's cap: a source that
    sends more is an error and the partial file is removed.

    One pass at hashing speed: this thread reads each chunk into a buffer, hands it to the hashing
    thread and writes it while that thread hashes it (hashlib releases the GIL on large buffers), so
    reading and writing overlap hashing, and the bytes hashed are exactly the bytes written. The
    file's pages are flushed as they are written, so the final fsync finds little left to do."""
    partial = raw / ".partial" / f"{name}.part"
    partial.parent.mkdir(parents=True, exist_ok=True)
    md5 = hashlib.md5()
    limit = total if total is not None else ARCHIVE_CAP[name]
    # Without an announced size there is no telling a complete partial file from a cut one: start over.
    offset = partial.stat().st_size if partial.exists() and total is not None else 0
    if offset > limit or (offset and total is None):
        partial.unlink()
        offset = 0
    if offset:  # resuming: the bytes already here are hashed once, the rest as they arrive
        with open(partial, "rb") as f:
            while chunk := f.read(_PIPE_CHUNK):
                md5.update(chunk)
    try:
        stream = src.open(name, offset) if total is None or offset < total else None
    except _RangeIgnored:
        offset, md5 = 0, hashlib.md5()
        stream = src.open(name, 0)
    done = offset
    with open(partial, "r+b" if offset else "wb", buffering=0) as out:
        out.seek(offset)
        out.truncate()
        if stream is not None:
            writeback = _Writeback(out.fileno(), offset)
            hasher = _Hasher(md5, f"md5 {name}")
            try:
                with stream:
                    while True:
                        buf = hasher.buffer()
                        # Ask for at most one byte past the limit: that byte, if it comes, is never written.
                        n = _read_into(stream, buf, min(_PIPE_CHUNK, limit + 1 - done))
                        if not n:
                            break
                        if done + n > limit:
                            out.close()
                            partial.unlink(missing_ok=True)
                            raise StageError(
                                f"{name}: the source sent more than the {total:,} bytes it announced; nothing kept"
                                if total is not None else
                                f"{name}: the source sent more than {human_bytes(limit)} (the cap for this "
                                f"ILSVRC2012 archive) without announcing a size; nothing kept")
                        hasher.put(buf, n)
                        try:
                            with memoryview(buf) as view:
                                left = view[:n]
                                while left:
                                    left = left[out.write(left):]
                        except OSError as e:  # ENOSPC, EFBIG
                            raise StageError(f"cannot write {partial}: {e.strerror or e}") from None
                        done += n
                        writeback.wrote(done)
                        if progress:
                            progress(name, done, total)
            finally:  # the hashing thread ends before the file is used or closed, whatever happened
                hasher.stop()
            hasher.finish()
        os.fsync(out.fileno())
    if total is not None and done != total:
        raise TransientError(f"{name}: download truncated at {done} of {total} bytes; run again to resume")
    return md5.hexdigest(), partial


def _read_into(stream, buf: bytearray, n: int) -> int:
    """Read up to n bytes into buf[:n]; short only at the end of the stream (HTTP and S3 bodies may
    return less per call). Streams without readinto are read and copied."""
    readinto = getattr(stream, "readinto", None)
    got = 0
    with memoryview(buf) as view:
        while got < n:
            if readinto is not None:
                k = readinto(view[got:n])
            else:
                data = stream.read(n - got)
                k = len(data)
                view[got:got + k] = data
            if not k:
                break
            got += k
    return got


_WRITEBACK = 64 << 20
_WRITEBACK_LAG = 2
try:
    _sync_file_range = ctypes.CDLL(None, use_errno=True).sync_file_range
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
except (OSError, AttributeError):
    _sync_file_range = None


class _Writeback:
    """Starts writing out every _WRITEBACK bytes written (Linux sync_file_range; elsewhere nothing, and the
    final fsync does it all), and waits for one such range to be on disk only once _WRITEBACK_LAG later
    ones have been started. Dirty pages stay under ~(_WRITEBACK_LAG + 1) x _WRITEBACK, so the final fsync
    finds little left, and the reading thread seldom waits on the disk: a wait longer than it takes to hash
    the chunks queued (~20 MiB, ~30 ms) would leave the MD5 thread idle."""

    def __init__(self, fd: int, offset: int):
        self.fd, self.end, self.started = fd, offset, collections.deque()

    def wrote(self, done: int) -> None:
        """The file now holds `done` bytes."""
        if done - self.end < _WRITEBACK:
            return
        if _sync_file_range is not None:
            _sync_file_range(self.fd, self.end, done - self.end, 2)  # SYNC_FILE_RANGE_WRITE: start, no wait
            self.started.append((self.end, done))
            if len(self.started) > _WRITEBACK_LAG:
                start, end = self.started.popleft()  # WAIT_BEFORE | WRITE | WAIT_AFTER
                _sync_file_range(self.fd, start, end - start, 1 | 2 | 4)
        self.end = done


def fetch(source: str, workdir: Path | str, md5_file: Path | str | None = None,
          progress: Progress | None = None) -> FetchResult:
    t0 = time.perf_counter()
    expected = read_md5sums(md5_file) if md5_file else dict(OFFICIAL_MD5)
    wd = Workdir(workdir)
    src = open_source(source)
    sizes = {name: src.size(name) for name in ARCHIVES}  # every archive must exist before any byte moves
    for name in ARCHIVES:
        _check_announced(name, sizes[name])
    wd.raw.mkdir(parents=True, exist_ok=True)
    downloaded, reused = [], []
    for name in ARCHIVES:
        final = wd.raw / name
        if _verified_copy(wd.raw, name, expected[name]) and sizes[name] in (None, final.stat().st_size):
            reused.append(name)
            sizes[name] = final.stat().st_size
            continue
        digest, partial = _download(src, name, wd.raw, sizes[name], progress)
        sizes[name] = partial.stat().st_size
        if digest != expected[name]:
            rejected = wd.raw / "rejected" / f"{name}.{digest}"
            rejected.parent.mkdir(exist_ok=True)
            os.replace(partial, rejected)
            raise StageError(f"{name}: MD5 mismatch: expected {expected[name]}, got {digest} "
                             f"(file kept aside as {rejected}, not used)")
        os.replace(partial, final)
        write_fetch_record(wd.raw, name, digest)
        downloaded.append(name)
    shutil.rmtree(wd.raw / ".partial", ignore_errors=True)
    return FetchResult(source, str(wd.raw), {n: expected[n] for n in ARCHIVES}, sizes, downloaded, reused,
                       round(time.perf_counter() - t0, 2))


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fetch", help="download the three ILSVRC2012 archives into WORKDIR/raw and check their MD5s",
                       description="Bring the three ILSVRC2012 archives from SOURCE into WORKDIR/raw, checking each "
                                   "one's MD5 while it streams. An interrupted download resumes; an archive whose "
                                   "digest does not match is moved to WORKDIR/raw/rejected and never used.")
    p.add_argument("source", help="a directory, an http(s):// base URL, or s3://bucket/prefix")
    p.add_argument("workdir", type=Path, help="work directory (created if missing)")
    p.add_argument("--md5", type=Path, help="md5sum-format file of expected digests (default: the official ones)")
    p.set_defaults(run=_cli)


def _cli(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def progress(name: str, done: int, total: int | None) -> None:
        bar = bars.get(name)  # not `or`: a tqdm without a total refuses bool()
        if bar is None:
            bar = bars[name] = tqdm(desc=name, total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=None)
        bar.update(done - bar.n)

    try:
        r = fetch(args.source, args.workdir, args.md5, progress)
    finally:
        for bar in bars.values():
            bar.close()
    for name in ARCHIVES:
        how = "reused (already verified)" if name in r.reused else "downloaded"
        print(f"{name}: md5 {r.md5[name]} ok, {how}")
    print(f"raw archives in {r.raw_dir}")
    return 0
