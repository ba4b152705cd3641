"""What every stage shares: the work-dir layout, one-line errors, atomic writes, digests, stamps.

Stages are plain functions; they raise `StageError` for anything a user can fix (bad input, bad
source, missing host). The CLI prints it as one line and exits non-zero; the flow fails the task.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

CHUNK = 1 << 20


class StageError(Exception):
    """An error the user can act on; its message is one line. Deterministic: running again gives the same."""


class TransientError(StageError):
    """A failure that may go away by itself (network, a server's 5xx, a node lost mid-run): worth a retry."""


def is_transient(e: BaseException) -> bool:
    """Whether a retry can help: a TransientError, or a network-level error that no stage translated.
    Deterministic StageErrors, programming errors and cancellation (BaseException) never are."""
    if isinstance(e, TransientError):
        return True
    if isinstance(e, StageError) or not isinstance(e, Exception):
        return False
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    from tasks.storage import is_retryable  # S3 5xx, throttling, botocore connection errors

    return is_retryable(e)


@dataclasses.dataclass(frozen=True)
class Workdir:
    """The layout under WORKDIR that the stage contracts in DESIGN.md name."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    raw = property(lambda self: self.root / "raw")
    extracted = property(lambda self: self.root / "extracted")
    manifest = property(lambda self: self.root / "manifest.parquet")
    reports = property(lambda self: self.root / "reports")
    recordio = property(lambda self: self.root / "recordio")
    runs = property(lambda self: self.root / "runs")
    compliance = property(lambda self: self.root / "compliance")
    stamps = property(lambda self: self.root / ".stamps")


class Result:
    """Mixin for stage results: small, typed, JSON-serialisable dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def file_digest(path: Path | str, algo: str = "md5") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def digest_of(obj: Any) -> str:
    """A stable sha256 of any JSON-able value (used for settings and cache keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def atomic_path(final: Path | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it over `final` only if the block succeeds.

    A kill at any point leaves `final` as it was (absent or the previous complete version)
    and at most a `.tmp-*` file that no reader looks at.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{final.name}.", suffix=suffix, dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp's 0600 would leak into the final file
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text_atomic(path: Path | str, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: Path | str, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


# --- results that survive moving the work dir --------------------------------------------------

WORKDIR_MARK = "$WORKDIR"
_MARK_RE = re.compile(re.escape(WORKDIR_MARK) + r"(?![\w.-])")


def relocatable(obj: Any, *roots: Path | str) -> Any:
    """`obj` (a JSON-able result) with every occurrence of a work-dir path in `roots` written as
    `$WORKDIR` (`/w/runs/x` -> `$WORKDIR/runs/x`, `file:///w/archive` -> `file://$WORKDIR/archive`), in
    values and dict keys at any depth. Only whole path components match: `/w2` is not `/w`."""
    pats = [re.compile(r"(?<![\w.-])" + re.escape(r) + r"(?![\w.-])")
            for r in sorted({str(r).rstrip("/") for r in roots}, key=len, reverse=True) if r and str(r).strip("/")]
    if not pats:
        return obj

    def conv(v: str) -> str:
        for pat in pats:
            v = pat.sub(lambda _m: WORKDIR_MARK, v)
        return v

    return _map_strings(obj, conv)


def rebased(obj: Any, root: Path | str) -> Any:
    """The inverse of `relocatable`: `$WORKDIR` replaced by `root`, the work dir the result is used in now."""
    root = str(root).rstrip("/") or "/"

    return _map_strings(obj, lambda v: _MARK_RE.sub(lambda _m: root, v) if WORKDIR_MARK in v else v)


def _map_strings(obj: Any, fn: Callable[[str], str]) -> Any:
    """`obj` with `fn` applied to every string in it (dict keys included); tuples become lists, as in JSON."""
    if isinstance(obj, str):
        return fn(obj)
    if isinstance(obj, dict):
        return {_map_strings(k, fn): _map_strings(x, fn) for k, x in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_map_strings(x, fn) for x in obj]
    return obj


# --- stamps: "this stage's outputs are complete and unchanged" without re-hashing data ------------


def fingerprint(paths: Iterable[Path | str], root: Path | None = None, depth: int = 2) -> list[list[Any]]:
    """Cheap identity of outputs: (path, size, mtime_ns) of each file, and of the directories up to
    `depth` levels below each directory given. Deleting or adding a file changes its directory's mtime;
    rewriting a file changes its own. With depth 2, extracted/ is covered down to its class folders
    (extracted/train/<wnid>) without listing them, so the cost grows with the number of classes,
    never with the number of images. Paths are reported relative to `root` when given."""
    def name(p: str | Path) -> str:
        return os.path.relpath(p, root) if root else str(p)

    out: list[list[Any]] = []
    for p in (Path(root, q) if root else Path(q) for q in paths):
        if not p.exists():
            out.append([name(p), None, None])
            continue
        st = p.stat()
        out.append([name(p), st.st_size if p.is_file() else None, st.st_mtime_ns])
        stack = [(p, 0)] if p.is_dir() else []
        while stack:
            d, level = stack.pop()
            if level >= depth:
                continue
            with os.scandir(d) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        out.append([name(entry.path), None, entry.stat().st_mtime_ns])
                        stack.append((Path(entry.path), level + 1))
    return sorted(out)


def write_stamp(wd: Workdir, stage: str, key: str, result: dict[str, Any], outputs: Iterable[Path | str]) -> None:
    """Record that `stage` finished for cache `key`, with the fingerprint of its outputs (paths relative
    to the work dir, so a copied or moved work dir is judged by its own files) and its result (work-dir
    paths written as `$WORKDIR`; read_stamp gives them back under the work dir it reads from)."""
    rel = [os.path.relpath(Path(p).resolve(), wd.root) for p in outputs]
    write_json_atomic(
        wd.stamps / f"{stage}.json",
        {"stage": stage, "key": key, "result": relocatable(result, wd.root), "outputs": rel,
         "fingerprint": fingerprint(rel, wd.root)},
    )


def read_stamp(wd: Workdir, stage: str) -> dict[str, Any] | None:
    try:
        stamp = json.loads((wd.stamps / f"{stage}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if isinstance(stamp, dict) and "result" in stamp:
        stamp["result"] = rebased(stamp["result"], wd.root)
    return stamp


def stamp_valid(wd: Workdir, stage: str, key: str | None = None) -> bool:
    """True when `stage` finished (for `key`, if given) and its outputs are still exactly as it left them."""
    stamp = read_stamp(wd, stage)
    if stamp is None or (key is not None and stamp.get("key") != key):
        return False
    return fingerprint(stamp["outputs"], wd.root) == stamp["fingerprint"]


S3_ROLES = ("source", "archive")


def s3_client(s3_options: dict[str, Any] | None = None, timeout: float = 20.0, attempts: int = 1,
              role: str | None = None):
    """boto3 S3 client from the standard AWS chain (AWS_ENDPOINT_URL, AWS_REGION/AWS_DEFAULT_REGION,
    AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws) plus explicit options; path-style, SigV4.
    `attempts`: botocore's own tries per request; the archive keeps 1 because its own retry loop
    backs off long enough to outlive a server restart.
    `role` ("source": reading source archives; "archive": writing results): when RN50_S3_<ROLE>_ACCESS_KEY_ID
    and RN50_S3_<ROLE>_SECRET_ACCESS_KEY are both set (and `s3_options` names no key), that identity is used
    instead of the standard chain, so one worker can read the data with a read-only key and write the
    archive with another (the team install does this)."""
    import boto3
    from botocore.config import Config

    opts = dict(s3_options or {})
    if role is not None:
        if role not in S3_ROLES:
            raise ValueError(f"unknown S3 role {role!r}")
        key = os.environ.get(f"RN50_S3_{role.upper()}_ACCESS_KEY_ID")
        secret = os.environ.get(f"RN50_S3_{role.upper()}_SECRET_ACCESS_KEY")
        if key and secret and "aws_access_key_id" not in opts:
            opts.update(aws_access_key_id=key, aws_secret_access_key=secret)
    session = boto3.session.Session()
    if not opts.get("region_name") and not session.region_name:
        opts["region_name"] = "us-east-1"
    cfg = Config(signature_version="s3v4", s3={"addressing_style": "path"},
                 connect_timeout=timeout, read_timeout=timeout * 3,
                 retries={"max_attempts": attempts, "mode": "standard"},
                 request_checksum_calculation="when_required", response_checksum_validation="when_required")
    return session.client("s3", config=cfg, **opts)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
