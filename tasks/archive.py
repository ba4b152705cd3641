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
Hidden files and directories (.stamps/, .tmp-*) are never archived. Symbolic links are never followed:
a link (to a file or a directory, anywhere in the trees) is skipped and logged, and each file is opened
with O_NOFOLLOW on every path component, its size taken from that open file (fstat), so a link swapped
in after the listing is skipped too. A rank or a shared file system cannot make the archive upload the
worker's keys or /proc/self/environ.

Integrity: every object is sent with its SHA-256 (x-amz-checksum-sha256, per part for multipart
uploads), so the server rejects corrupted bodies; the hex SHA-256 is also stored as object
metadata `sha256`. An object whose stored sha256 and size already match is not uploaded again.
After uploading, every object is read back in full and its SHA-256 compared. Transient failures
(connection refused/reset, timeouts, 5xx, throttling) are retried with exponential backoff.
Nothing partial is left on failure: a file that changes while it is sent is refused before the object
exists (multipart uploads are aborted), and an object that fails verification is deleted together
with MANIFEST.json (file:// and S3 alike). URIs, targets and retries live in tasks/storage.py.

Credentials come only from boto3's standard chain (AWS_* environment, ~/.aws, instance roles) or
an explicit `s3_options` mapping; they are never logged, printed or written anywhere.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

from tasks import storage
from tasks.common import Result, StageError, Workdir, digest_of, human_bytes
from tasks.paths import REPO
from tasks.storage import Progress, SymlinkError, fd_size, open_nofollow, sha256_stream

log = logging.getLogger("rn50.archive")

MANIFEST_NAME = "MANIFEST.json"
DEFAULT_MULTIPART_THRESHOLD = 64 << 20
DEFAULT_PART_SIZE = 16 << 20
MIN_PART_SIZE = 5 << 20  # S3's minimum for every part but the last
TOP_LEVEL_FILES = ("manifest.parquet",)
TREES = ("runs", "compliance", "reports", "configs")
REPO_CONFIGS = ("configs/training", "configs/systems")


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
    skipped: list[str] = dataclasses.field(default_factory=list)  # symbolic links not followed (keys; dirs end in /)


# --- what to archive ------------------------------------------------------------------------------


def _skip_link(key: str, skipped: list[str] | None) -> None:
    log.warning("not archived: %s is a symbolic link (links are never followed)", key)
    if skipped is not None:
        skipped.append(key)


def collect(workdir: str | os.PathLike, include_checkpoints: bool = False,
            include_repo_configs: bool = True, skipped: list[str] | None = None) -> list[tuple[str, Path]]:
    """(key, path) of every regular file to archive, sorted by key. Symbolic links (to files or
    directories, at any depth) are skipped, logged and appended to `skipped`, never followed."""
    wd = Workdir(workdir)
    out: list[tuple[str, Path]] = []

    def add(key: str, p: Path) -> None:
        if p.is_symlink():
            _skip_link(key, skipped)
        elif p.is_file():
            out.append((key, p))

    if include_repo_configs:
        for d in REPO_CONFIGS:
            for p in sorted((REPO / d).glob("*.y*ml")):
                add(f"repo/{d}/{p.name}", p)
    for name in TOP_LEVEL_FILES:
        add(name, wd.root / name)
    for tree in TREES:
        base = wd.root / tree
        if base.is_symlink():
            _skip_link(tree + "/", skipped)
            continue
        if not base.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(base):  # followlinks=False: links to dirs are not entered
            rel_dir = Path(dirpath).relative_to(wd.root)
            keep = []
            for d in sorted(dirnames):
                # Hidden = in-progress or bookkeeping (.tmp-*, .old-*); checkpoints are opt-in.
                if d.startswith(".") or (d == "checkpoints" and rel_dir.parts[0] == "runs" and not include_checkpoints):
                    continue
                if os.path.islink(os.path.join(dirpath, d)):
                    _skip_link((rel_dir / d).as_posix() + "/", skipped)
                    continue
                keep.append(d)
            dirnames[:] = keep
            for f in filenames:
                if not f.startswith("."):
                    add((rel_dir / f).as_posix(), Path(dirpath) / f)
    return sorted(out)


def manifest_bytes(entries: Iterable[ArchivedObject]) -> bytes:
    # No timestamps: identical content gives an identical manifest, so re-archiving uploads nothing.
    body = {"format": "rn50-archive/1", "key_root": "archive URI",
            "objects": [{"key": e.key, "bytes": e.bytes, "sha256": e.sha256} for e in entries]}
    return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()


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
    storage.parse_uri(uri)  # a bad URI fails before anything is read
    skipped: list[str] = []
    files = collect(wd, include_checkpoints, include_repo_configs, skipped)
    if not any(not k.startswith("repo/") for k, _ in files):
        raise StageError(f"nothing to archive in {wd} (no runs/, compliance/, reports/, configs/ or manifest.parquet)")
    if any(k == MANIFEST_NAME for k, _ in files):
        raise StageError(f"{wd}/{MANIFEST_NAME} would collide with the archive manifest")

    retry = storage.Retrier(retries, backoff, max_backoff, logger=log)
    target = storage.open_target(uri, s3_options=s3_options, retry=retry, multipart_threshold=multipart_threshold,
                                 part_size=part_size, progress=progress)
    target.check_bucket(create_bucket)

    entries: list[ArchivedObject] = []
    uploaded_bytes = 0

    def put_one(key: str, src: Any) -> ArchivedObject:
        """src: bytes, or a file opened without following links (size and content from that one fd)."""
        nonlocal uploaded_bytes
        if isinstance(src, bytes):
            size, sha = len(src), hashlib.sha256(src).hexdigest()
        else:
            size, sha = fd_size(src), sha256_stream(src)
        stored_sha, stored_size = target.stored_sha256(key)
        if stored_sha == sha and stored_size == size:
            log.info("unchanged %s", key)
            if progress:
                progress(key, size, size)
            return ArchivedObject(key, size, sha, "unchanged")
        multipart = target.put(key, src, size, sha)
        uploaded_bytes += size
        log.info("uploaded %s (%s%s)", key, human_bytes(size), ", multipart" if multipart else "")
        return ArchivedObject(key, size, sha, "uploaded", multipart)

    try:
        for key, path in files:
            try:
                src = open_nofollow(path)
            except SymlinkError as e:  # became a link (or a FIFO, ...) after collect() saw a regular file
                log.warning("not archived: %s: %s (links are never followed)", key, e.strerror)
                skipped.append(key)
                continue
            with src:
                entries.append(put_one(key, src))
        manifest = manifest_bytes(entries)
        # The manifest goes last so its presence means everything it lists was uploaded first.
        man = put_one(MANIFEST_NAME, manifest)
        for e in [*entries, man]:
            try:
                target.verify(e.key, e.bytes, e.sha256)
            except BaseException:
                # A copy that does not read back as what was sent is not kept, nor the manifest listing it.
                target.remove(e.key)
                if e.key != MANIFEST_NAME:
                    target.remove(MANIFEST_NAME)
                raise
    except StageError:
        raise
    except Exception as e:  # boto/OS errors left after retries: one line, no credentials in it
        raise StageError(f"archive to {uri} failed: {storage.describe_error(e)}") from None

    all_objs = [*entries, man]
    return ArchiveResult(
        uri=uri, objects=all_objs,
        uploaded=sum(o.action == "uploaded" for o in all_objs),
        unchanged=sum(o.action == "unchanged" for o in all_objs),
        bytes_uploaded=uploaded_bytes, verified=len(all_objs), retries=retry.count,
        manifest_key=MANIFEST_NAME, manifest_sha256=man.sha256, key=digest_of([uri, man.sha256]), skipped=skipped,
    )


# --- CLI ------------------------------------------------------------------------------------------


def add_command(subparsers) -> None:
    p = subparsers.add_parser("archive", help="upload logs, reports, manifest (and checkpoints) to s3:// or file://",
                              description="Copy what matters of WORKDIR (result logs, reports, the manifest and, if "
                                          "asked, checkpoints) to URI, s3://bucket/prefix or file:///path; every "
                                          "object is read back and its SHA-256 checked, and MANIFEST.json lists them.")
    p.add_argument("workdir", help="work directory to archive")
    p.add_argument("uri", help="s3://bucket/prefix or file:///path")
    p.add_argument("--include-checkpoints", action="store_true", help="also upload runs/*/checkpoints/")
    p.add_argument("--create-bucket", action="store_true", help="create the S3 bucket if it does not exist")
    p.add_argument("--multipart-threshold-mb", type=float, default=DEFAULT_MULTIPART_THRESHOLD / 2**20,
                   help="S3: files at least this large go up in parts (default %(default)g)")
    p.add_argument("--part-size-mb", type=float, default=DEFAULT_PART_SIZE / 2**20,
                   help="S3: size of one part (default %(default)g)")
    p.add_argument("--retries", type=int, default=8,
                   help="retries of a transient failure (timeouts, 5xx, throttling; default %(default)s)")
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
              f"{r.unchanged} unchanged, {r.verified} verified, {r.retries} retries"
              + (f", {len(r.skipped)} symbolic links skipped" if r.skipped else ""))
    return 0
