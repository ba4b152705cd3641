"""Pack stage: extracted/ -> recordio/{train,val}.{lst,rec,idx}, unresized MXNet RecordIO (im2rec pass-through).

What the outputs are, exactly: what MXNet's own `tools/im2rec.py --list --recursive` then `--pass-through`
produce for each split, byte for byte, except that labels are always the manifest's (sorted-WNID index,
identical for train and val). im2rec numbers class folders in the order it meets non-empty ones, so a
class missing from a split would shift every later label; when that happens the .lst is rewritten with
the manifest labels in im2rec's own format and the report says how many lines changed.

How:
- The .lst comes from im2rec.py's own `make_list` (tasks.recordio: the wheel's file, executed in-process
  with its mxnet/cv2 imports stubbed out because listing never touches them: this saves ~3 s of imports
  per split and keeps the exact walk order, extension filter, `random.seed(100)` shuffle and line format).
- Records are written by a pure-Python writer of the dmlc RecordIO format (tasks.recordio, including its
  escaping of the magic word inside payloads) in N forked workers (tasks.workers): each builds a batch of records in memory from one
  `readv` per image, receives the batch's start offset from the previous batch's worker (a ring of
  pipes), passes on its end offset, and `pwrite`s the batch in place. The output is the same bytes
  im2rec writes (tests compare against the real im2rec.py), at close to `cat` speed. `writer="im2rec"`
  runs the wheel's im2rec.py --pass-through instead, for audits; both go through the same verification.
- Everything is written in recordio/.tmp-pack-*/, verified (count = .lst lines, every .idx offset at a
  record header whose id/label/length match the .lst and manifest, records contiguous to the end of the
  file, a sample -- or all with full_check -- byte-identical to the source files), fsynced, and only then
  renamed into place. The stage's stamp is removed before any rename and written after the last, so a
  kill at any point leaves nothing that the cache or a re-run accepts; the next run removes the debris.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from tasks.common import (Result, StageError, Workdir, digest_of, file_digest, human_bytes, read_stamp,
                          stamp_valid, write_json_atomic, write_stamp, write_text_atomic)
from tasks.ilsvrc import MANIFEST_COLUMNS, SPLITS, manifest_digest
from tasks.recordio import (IM2REC_EXTS, IR_SIZE, LEN_MASK, MAGIC, REC_HEAD, encode_record, im2rec_path, make_list,
                            pad4, read_lst, read_record, record_size, write_lst)
from tasks.tether import die_with_parent
from tasks.workers import WorkerError, read_exact, run_forked

FORMAT_VERSION = 1
BATCH_BYTES = 4 << 20
BATCH_RECORDS = 1024
SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")

Progress = Callable[[int, int], None]


@dataclasses.dataclass
class SplitResult(Result):
    split: str
    records: int
    image_bytes: int
    rec_bytes: int
    idx_sha256: str
    lst_sha256: str
    relabelled: int          # .lst lines whose im2rec folder-order label differed from the manifest label
    escaped_records: int     # records whose payload held the RecordIO magic word (written as multi-part)
    checked_records: int     # records compared byte for byte with their source file


@dataclasses.dataclass
class PackResult(Result):
    workdir: str
    recordio: str
    key: str                 # cache key: manifest digest + settings digest
    manifest_digest: str
    settings: dict[str, Any]
    settings_digest: str
    content_digest: str      # sha256 over the outputs (.lst, .idx, .rec sizes) + manifest digest
    splits: dict[str, SplitResult]
    quirks: list[dict[str, Any]]
    outputs: list[str]
    writer: str
    threads: int
    full_check: bool
    seconds: dict[str, float]
    write_mib_s: float
    report_md: str
    report_json: str
    cached: bool


# --- keys -----------------------------------------------------------------------------------------

def pack_settings() -> dict[str, Any]:
    """Everything that determines the output bytes besides the manifest. Thread count and writer are
    not in it: every thread count and both writers give byte-identical files (tested)."""
    return {
        "format_version": FORMAT_VERSION,
        "im2rec_sha256": file_digest(im2rec_path(), "sha256"),
        "list": {"recursive": True, "shuffle": True, "exts": IM2REC_EXTS},
        "pass_through": True,
        "labels": "manifest (sorted-WNID index)",
    }


def pack_key(manifest_digest: str, settings: dict[str, Any] | None = None) -> str:
    return digest_of({"manifest": manifest_digest, "settings": digest_of(settings or pack_settings())})


# --- inputs ---------------------------------------------------------------------------------------


def _read_manifest(wd: Workdir):
    if not wd.manifest.is_file():
        raise StageError(f"{wd.manifest} does not exist: run `rn50 verify {wd.root}` first")
    import pandas as pd

    try:
        df = pd.read_parquet(wd.manifest)
    except Exception as e:  # pyarrow raises several unrelated types for a damaged file
        raise StageError(f"cannot read {wd.manifest}: {e}") from None
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise StageError(f"{wd.manifest} lacks column(s) {', '.join(missing)}: rerun `rn50 verify`")
    return df


def _expected(df) -> dict[str, dict[str, tuple]]:
    """Per split: path relative to extracted/<split> -> (label, bytes, md5, mode, format, path)."""
    wnids = sorted(set(df.wnid))
    want = {w: i for i, w in enumerate(wnids)}
    bad = df[df.wnid.map(want) != df.label]
    if len(bad):
        r = bad.iloc[0]
        raise StageError(f"manifest.parquet: {r.path} has label {r.label} but {r.wnid} is class {want[r.wnid]} of the "
                         f"sorted WNIDs ({len(bad)} such rows): rerun `rn50 verify`")
    out: dict[str, dict[str, tuple]] = {s: {} for s in SPLITS}
    extra = sorted(set(df.split) - set(SPLITS))
    if extra:
        raise StageError(f"manifest.parquet has unknown split(s) {extra}")
    for split, path, label, nbytes, md5, mode, fmt in df[
            ["split", "path", "label", "bytes", "md5", "mode", "format"]].itertuples(index=False):
        prefix = f"extracted/{split}/"
        if not path.startswith(prefix) or path.count("/") != 3:
            raise StageError(f"manifest.parquet: path {path!r} is not {prefix}<wnid>/<file>")
        out[split][path[len(prefix):]] = (int(label), int(nbytes), md5, mode, fmt, path)
    return out


def _check_tree(root: Path, expected: dict[str, tuple], split: str) -> None:
    """The split's tree must hold exactly the manifest's files, one level of class folders, nothing else:
    im2rec would silently skip or mislabel anything else."""
    if not root.is_dir():
        raise StageError(f"{root} does not exist: run `rn50 verify` first")
    seen: set[str] = set()
    problems: list[str] = []
    with os.scandir(root) as classes:
        for c in sorted(classes, key=lambda e: e.name):
            if not c.is_dir():
                problems.append(f"unexpected file {root / c.name} outside any class folder")
                continue
            n = 0
            with os.scandir(c.path) as files:
                for f in files:
                    rel = f"{c.name}/{f.name}"
                    if f.is_dir():
                        problems.append(f"unexpected directory {root / rel} inside a class folder")
                    elif not f.is_file():
                        problems.append(f"{root / rel} is not a regular file (dangling link, fifo, socket?)")
                    elif rel not in expected:
                        kind = "image" if os.path.splitext(f.name)[1].lower() in IM2REC_EXTS else "non-image file"
                        problems.append(f"{kind} {root / rel} is not in manifest.parquet")
                    else:
                        seen.add(rel)
                    n += 1
            if n == 0:
                problems.append(f"empty class folder {root / c.name}")
    missing = sorted(set(expected) - seen)
    if missing:
        problems.append(f"{root / missing[0]} is in manifest.parquet but missing from disk"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if problems:
        more = f" (+{len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise StageError(f"{split}: {problems[0]}{more}; the extracted tree must match manifest.parquet "
                         f"(rerun `rn50 verify`)")


def _fix_labels(lst: Path, items: list[tuple[int, float, str]], expected: dict[str, tuple], split: str) -> tuple[list, int]:
    """Check the .lst against the manifest; rewrite its labels (im2rec's format, same order) if they differ."""
    paths = [p for _, _, p in items]
    if len(set(paths)) != len(paths) or set(paths) != set(expected):
        extra = sorted(set(paths) - set(expected))[:1] or sorted(set(expected) - set(paths))[:1]
        raise StageError(f"{split}: im2rec's list ({len(paths)} files) differs from manifest.parquet "
                         f"({len(expected)} files), e.g. {extra}; rerun `rn50 verify`")
    if len({k for k, _, _ in items}) != len(items):
        raise StageError(f"{lst}: duplicate image indices")
    fixed = [(k, float(expected[p][0]), p) for k, _, p in items]
    changed = sum(1 for a, b in zip(items, fixed) if a[1] != b[1])
    if changed:
        write_lst(lst, fixed)
    return fixed, changed


def _pwrite_all(fd: int, data, offset: int, where: Path) -> None:
    view = memoryview(data)
    try:
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
    except OSError as e:
        raise WorkerError(_write_error(e, where)) from None


def _os_error(e: OSError, where: Path | str) -> str:
    if e.errno in (errno.ENOSPC, errno.EFBIG):
        return _write_error(e, where)
    return f"{where}: {e.strerror or e}"


def _write_error(e: OSError, where: Path | str) -> str:
    if e.errno == errno.ENOSPC:
        return f"no space left on device while writing {where}"
    if e.errno == errno.EFBIG:
        return f"file size limit exceeded while writing {where}"
    return f"cannot write {where}: {e.strerror or e}"


# --- the fast writer ------------------------------------------------------------------------------


def _batches(sizes: list[int]) -> list[tuple[int, int]]:
    out, lo, acc = [], 0, 0
    for i, n in enumerate(sizes):
        acc += record_size(n)
        if acc >= BATCH_BYTES or i + 1 - lo >= BATCH_RECORDS:
            out.append((lo, i + 1))
            lo, acc = i + 1, 0
    if lo < len(sizes):
        out.append((lo, len(sizes)))
    return out


def _write_fast(items: list[tuple[int, float, str]], sizes: list[int], root: Path, rec: Path, idx: Path,
                workers: int, tick: Callable[[int], None]) -> int:
    """Write .rec and .idx for `items` (the .lst order). Returns the number of escaped records."""
    import numpy as np

    too_big = next((i for i, n in enumerate(sizes) if IR_SIZE + n > LEN_MASK), None)
    if too_big is not None:
        raise StageError(f"{root / items[too_big][2]} is {sizes[too_big]:,} bytes; RecordIO records stop at 512 MiB")
    batches = _batches(sizes)
    total = sum(record_size(n) for n in sizes)
    fd = os.open(rec, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)  # RDWR: the escape path reads back
    try:
        if total:
            try:
                os.posix_fallocate(fd, 0, total)  # ENOSPC now, before any work, rather than mid-way
            except OSError as e:
                raise StageError(f"{_write_error(e, rec)} (needs {human_bytes(total)})") from None
        ring = [os.pipe() for _ in range(workers)]

        def build(lo: int, hi: int, rootfd: int) -> tuple[bytearray, int]:
            buf = bytearray(sum(record_size(n) for n in sizes[lo:hi]))
            view, extra, pos = memoryview(buf), bytearray(1), 0
            for i in range(lo, hi):
                key, label, path = items[i]
                n = sizes[i]
                REC_HEAD.pack_into(buf, pos, MAGIC, IR_SIZE + n, 0, label, key, 0)
                body = view[pos + 32:pos + 32 + n]
                try:
                    f = os.open(path, os.O_RDONLY, dir_fd=rootfd)  # a 2-component lookup, not the full path
                except FileNotFoundError:
                    raise WorkerError(f"{root / path} vanished after it was listed") from None
                except OSError as e:
                    raise WorkerError(f"cannot read {root / path}: {e.strerror}") from None
                try:
                    got = os.readv(f, [body, extra])  # one syscall; the extra byte catches a grown file
                except OSError as e:
                    raise WorkerError(f"cannot read {root / path}: {e.strerror}") from None
                finally:
                    os.close(f)
                if got != n:
                    raise WorkerError(f"{root / path} changed since verify: manifest says {n} bytes, file has "
                                       f"{'more' if got > n else got}; rerun `rn50 verify`")
                head = bytes(body[:8])
                if head[:3] != SIGNATURES[0] and head != SIGNATURES[1]:
                    raise WorkerError(f"{root / path} is not a JPEG or PNG (starts with {head!r})")
                pos += 8 + pad4(IR_SIZE + n)
            # Every record header holds the magic word once; any more means a payload holds it too.
            if np.count_nonzero(np.frombuffer(buf, dtype="<u4") == MAGIC) == hi - lo:
                return buf, 0
            parts, pos, escaped = [], 0, 0
            for i in range(lo, hi):
                size = record_size(sizes[i])
                part = encode_record(bytes(buf[pos + 8:pos + 8 + IR_SIZE + sizes[i]]))
                escaped += len(part) != size
                parts.append(part)
                pos += size
            return bytearray(b"".join(parts)), escaped

        def work(w: int, send: Callable[[Any], None]) -> None:
            ring_in, ring_out = ring[w][0], ring[(w + 1) % workers][1]
            rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
            for b in range(w, len(batches), workers):
                lo, hi = batches[b]
                buf, escaped = build(lo, hi, rootfd)
                start = struct.unpack("<q", read_exact(ring_in, 8))[0]
                with contextlib.suppress(BrokenPipeError):
                    os.write(ring_out, struct.pack("<q", start + len(buf)))
                _pwrite_all(fd, buf, start, rec)
                send(("batch", b, start, len(buf), escaped))

        placed: dict[int, tuple[int, int, int]] = {}

        def on_message(_w: int, msg: tuple) -> None:
            _, b, start, nbytes, escaped = msg
            placed[b] = (start, nbytes, escaped)
            tick(batches[b][1] - batches[b][0])

        os.write(ring[0][1], struct.pack("<q", 0))
        try:
            run_forked(workers, work, on_message, name="pack worker")
        finally:
            for r, w in ring:
                os.close(r)
                os.close(w)
        offsets, end, escaped = [], 0, 0
        for b, (lo, hi) in enumerate(batches):
            start, nbytes, esc = placed[b]
            if start != end:
                raise StageError(f"internal error: batch {b} of {rec} starts at {start}, expected {end}")
            if esc:  # the slow path: find the record starts by walking the headers
                pos = start
                for _ in range(lo, hi):
                    offsets.append(pos)
                    pos = read_record(fd, pos)[1]
            else:
                pos = start
                for i in range(lo, hi):
                    offsets.append(pos)
                    pos += record_size(sizes[i])
            end, escaped = start + nbytes, escaped + esc
        os.ftruncate(fd, end)
    finally:
        os.close(fd)
    try:  # fsync happens at commit, after verification
        with open(idx, "w") as f:
            f.writelines(f"{items[i][0]}\t{off}\n" for i, off in enumerate(offsets))
    except OSError as e:
        raise StageError(_write_error(e, idx)) from None
    return escaped


def _write_im2rec(prefix: Path, root: Path, threads: int, tick: Callable[[int], None]) -> None:
    """The wheel's im2rec.py --pass-through, for audits. It skips unreadable files with a message and
    exits 0, so its first complaint is kept for the error the verification will raise."""
    cmd = [sys.executable, str(im2rec_path()), "--pass-through", "--num-thread", str(threads), str(prefix), str(root)]
    complaint, last = None, 0
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          preexec_fn=die_with_parent(signal.SIGKILL)) as proc:
        for line in proc.stdout:
            if "count:" in line:
                count = int(line.rsplit("count:", 1)[1])
                tick(count - last)
                last = count
            elif complaint is None and ("error" in line.lower()):
                complaint = line.strip()
    if proc.returncode or complaint:
        raise StageError(f"im2rec.py --pass-through failed for {root}: {complaint or f'exit {proc.returncode}'}")


# --- verification ---------------------------------------------------------------------------------


def verify_split(split: str, tmp: Path, root: Path, items: list[tuple[int, float, str]], sizes: list[int],
                  sample: set[int], workers: int) -> tuple[int, int]:
    """Check the written files from disk. Returns (records compared with their sources, multi-part records)."""
    rec, idx = tmp / f"{split}.rec", tmp / f"{split}.idx"
    where = f"recordio/{split}"
    lines = idx.read_text().splitlines()
    if len(lines) != len(items):
        raise StageError(f"{where}.idx has {len(lines)} records but {split}.lst has {len(items)} lines")
    offsets = []
    for n, (line, (key, _, _)) in enumerate(zip(lines, items)):
        k, _, off = line.partition("\t")
        if int(k) != key:
            raise StageError(f"{where}.idx line {n + 1} has key {k}, the .lst has {key}")
        offsets.append(int(off))
    rec_size = rec.stat().st_size
    if not items:
        if rec_size:
            raise StageError(f"{where}.rec holds {rec_size} bytes but no records")
        return 0, 0

    def check(w: int, _send) -> tuple[int, int]:
        lo, hi = len(items) * w // workers, len(items) * (w + 1) // workers
        fd = os.open(rec, os.O_RDONLY)
        checked = multipart = 0
        try:
            for i in range(lo, hi):
                key, label, path = items[i]
                off = offsets[i]
                end = offsets[i + 1] if i + 1 < len(items) else rec_size
                what = f"{where}.rec record {i} (key {key}, {path}) at byte {off}"
                head = os.pread(fd, 32, off)
                if len(head) != 32:
                    raise WorkerError(f"{what}: .idx offset beyond the end of the file")
                magic, lrec, flag, rlabel, rid, _ = REC_HEAD.unpack(head)
                payload = None
                if magic == MAGIC and lrec >> 29 == 0:
                    length, rend = lrec & LEN_MASK, off + 8 + pad4(lrec & LEN_MASK)
                else:
                    try:
                        payload, rend = read_record(fd, off)
                    except ValueError as e:
                        raise WorkerError(f"{what}: .idx offset is not at a record header ({e})") from None
                    length = len(payload)
                    multipart += 1
                    _, _, flag, rlabel, rid, _ = REC_HEAD.unpack(b"\0" * 8 + payload[:IR_SIZE])
                if rend != end:
                    raise WorkerError(f"{what}: record ends at byte {rend}, the next record starts at {end}")
                if (flag, rid, rlabel) != (0, key, label) or length != IR_SIZE + sizes[i]:
                    raise WorkerError(f"{what}: header says id {rid}, label {rlabel}, {length - IR_SIZE} bytes; "
                                       f"expected id {key}, label {label}, {sizes[i]} bytes")
                if i in sample:
                    if payload is None:
                        payload = read_record(fd, off)[0]
                    with open(root / path, "rb") as f:
                        if payload[IR_SIZE:] != f.read():
                            raise WorkerError(f"{what}: image bytes differ from {root / path}")
                    checked += 1
        finally:
            os.close(fd)
        return checked, multipart

    counts = run_forked(workers, check, name="pack worker")
    return sum(c for c, _ in counts), sum(m for _, m in counts)


def _sample(n: int, always: set[int]) -> set[int]:
    """Evenly spread 1% (at least 64) of the records, plus every quirk."""
    want = min(n, max(64, n // 100))
    step = max(1, n // want) if want else 1
    return set(range(0, n, step)) | always


# --- the stage ------------------------------------------------------------------------------------


def _content_digest(mdigest: str, splits: dict[str, SplitResult]) -> str:
    """What downstream stages key on. The .idx fixes every record's position and size, the .lst its id,
    label and source path, and the manifest digest each source file's md5: together they pin the .rec."""
    h = hashlib.sha256(f"pack-v{FORMAT_VERSION}\n{mdigest}\n".encode())
    for s, r in sorted(splits.items()):
        h.update(f"{s}\t{r.records}\t{r.rec_bytes}\t{r.lst_sha256}\t{r.idx_sha256}\n".encode())
    return h.hexdigest()


def _clean_debris(out: Path) -> None:
    for p in out.glob(".tmp-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def pack(workdir: Path | str, threads: int | None = None, full_check: bool = False,
         progress: Optional[Progress] = None, force: bool = False, writer: str = "fast") -> PackResult:
    """Pack WORKDIR/extracted/ into WORKDIR/recordio/{train,val}.{lst,rec,idx}.

    `threads`: worker processes (default: the usable cores). `full_check`: compare every record with its
    source file, not a 1% sample. `progress(done, total)`: records written so far, both splits; it is
    called once with done=0 after listing and before any record is read. `force`: repack even if the
    stamp says the outputs for this manifest are complete. `writer`: "fast" or "im2rec" (same bytes)."""
    t0 = time.perf_counter()
    wd = workdir if isinstance(workdir, Workdir) else Workdir(workdir)
    if writer not in ("fast", "im2rec"):
        raise StageError(f"unknown writer {writer!r} (fast or im2rec)")
    workers = max(1, threads or len(os.sched_getaffinity(0)))
    df = _read_manifest(wd)
    mdigest = manifest_digest(df)
    settings = pack_settings()
    key = pack_key(mdigest, settings)
    if not force and stamp_valid(wd, "pack", key):
        res = read_stamp(wd, "pack")["result"]
        with contextlib.suppress(TypeError, KeyError, AttributeError):  # a stamp of another version: repack
            res["splits"] = {s: SplitResult(**r) for s, r in res["splits"].items()}
            return PackResult(**{**res, "cached": True})

    expected = _expected(df)
    quirk_rows = df[(df.format != "JPEG") | (df["mode"] != "RGB")]
    quirk_paths = {p: (f, m) for p, f, m in quirk_rows[["path", "format", "mode"]].itertuples(index=False)}
    del df, quirk_rows  # everything below works from `expected`; the frame would double the memory per image
    splits = [s for s in SPLITS if expected[s] or (wd.extracted / s).exists()]
    out = wd.recordio
    out.mkdir(parents=True, exist_ok=True)
    lock = os.open(out / ".pack.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + 10  # workers of a just-killed run may take a moment to die
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StageError(f"another `rn50 pack` is writing {out}") from None
                time.sleep(0.1)
        _clean_debris(out)
        # From here on the old outputs are no longer vouched for, whatever happens.
        (wd.stamps / "pack.json").unlink(missing_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-pack-", dir=out))
        try:
            try:
                result = _pack_into(wd, tmp, splits, expected, quirk_paths, workers, full_check, progress, writer)
            except OSError as e:  # listing, relabelling: anything not already worded for the user
                raise StageError(_os_error(e, e.filename or tmp)) from None
            seconds = result.pop("seconds")
            t_commit = time.perf_counter()
            outputs = [out / f"{s}.{ext}" for s in splits for ext in ("lst", "idx", "rec")]
            try:
                for p in outputs:  # durable before visible
                    with open(tmp / p.name, "rb") as f:
                        os.fsync(f.fileno())
                for p in outputs:
                    os.replace(tmp / p.name, p)
                dfd = os.open(out, os.O_RDONLY)
                os.fsync(dfd)
                os.close(dfd)
            except OSError as e:
                raise StageError(_os_error(e, e.filename or out)) from None
            outputs = [str(p) for p in outputs]
            seconds["commit"] = time.perf_counter() - t_commit
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        os.close(lock)

    seconds["total"] = time.perf_counter() - t0
    seconds = {k: round(v, 3) for k, v in seconds.items()}
    image_bytes = sum(r.image_bytes for r in result["splits"].values())
    res = PackResult(
        workdir=str(wd.root), recordio=str(out), key=key, manifest_digest=mdigest, settings=settings,
        settings_digest=digest_of(settings), content_digest=_content_digest(mdigest, result["splits"]),
        splits=result["splits"], quirks=result["quirks"], outputs=outputs, writer=writer, threads=workers,
        full_check=full_check, seconds=seconds,
        write_mib_s=round(image_bytes / (1 << 20) / max(seconds["write"], 1e-9), 1),
        report_md=str(wd.reports / "pack.md"), report_json=str(wd.reports / "pack.json"), cached=False)
    try:
        write_json_atomic(res.report_json, res.to_dict())
        write_text_atomic(res.report_md, _markdown(res))
        write_stamp(wd, "pack", key, res.to_dict(), outputs)
    except OSError as e:  # the outputs are complete, but without a stamp the next run repacks them
        raise StageError(_os_error(e, e.filename or wd.reports)) from None
    return res


def _pack_into(wd: Workdir, tmp: Path, splits: list[str], expected: dict, quirk_paths: dict, workers: int,
               full_check: bool, progress: Optional[Progress], writer: str) -> dict[str, Any]:
    seconds = {"list": 0.0, "write": 0.0, "verify": 0.0}
    t = time.perf_counter()
    lists = {}
    for s in splits:
        root = wd.extracted / s
        _check_tree(root, expected[s], s)
        try:
            lst = make_list(root, tmp / s)
            lists[s] = _fix_labels(lst, read_lst(lst), expected[s], s)
        except OSError as e:
            raise StageError(_os_error(e, e.filename or tmp / f"{s}.lst")) from None
    seconds["list"] = time.perf_counter() - t

    total = sum(len(items) for items, _ in lists.values())
    done = [0, 0.0]

    def tick(n: int) -> None:
        done[0] += n
        now = time.monotonic()
        if progress and (now - done[1] >= 0.2 or done[0] >= total):
            done[1] = now
            progress(done[0], total)

    if progress:
        progress(0, total)
    results, quirks = {}, []
    for s in splits:
        items, relabelled = lists[s]
        root = wd.extracted / s
        sizes = [expected[s][p][1] for _, _, p in items]
        t = time.perf_counter()
        escaped = 0
        if writer == "fast":
            escaped = _write_fast(items, sizes, root, tmp / f"{s}.rec", tmp / f"{s}.idx", workers, tick)
        else:
            _write_im2rec(tmp / s, root, workers, tick)
        seconds["write"] += time.perf_counter() - t

        t = time.perf_counter()
        mine = []
        for i, (key, _, p) in enumerate(items):
            q = quirk_paths.get(expected[s][p][5])
            if q:
                mine.append(i)
                quirks.append({"split": s, "path": expected[s][p][5], "key": key, "format": q[0], "mode": q[1],
                               "bytes": sizes[i]})
        sample = set(range(len(items))) if full_check else _sample(len(items), set(mine))
        checked, multipart = verify_split(s, tmp, root, items, sizes, sample, workers)
        if writer == "fast" and multipart != escaped:
            raise StageError(f"recordio/{s}.rec: {multipart} multi-part records found, the writer made {escaped}")
        escaped = multipart
        seconds["verify"] += time.perf_counter() - t
        results[s] = SplitResult(
            split=s, records=len(items), image_bytes=sum(sizes), rec_bytes=(tmp / f"{s}.rec").stat().st_size,
            idx_sha256=file_digest(tmp / f"{s}.idx", "sha256"), lst_sha256=file_digest(tmp / f"{s}.lst", "sha256"),
            relabelled=relabelled, escaped_records=escaped, checked_records=checked)
    return {"splits": results, "quirks": quirks, "seconds": seconds}


def _markdown(r: PackResult) -> str:
    lines = ["# Pack report", "",
             f"- work dir: `{r.workdir}` → `{r.recordio}`",
             f"- writer: {r.writer}, {r.threads} worker(s), check: {'every record' if r.full_check else 'sample + quirks'}",
             f"- cache key: `{r.key[:16]}`, content digest: `{r.content_digest[:16]}`, manifest: `{r.manifest_digest[:16]}`",
             "- time: " + ", ".join(f"{k} {v:.2f} s" for k, v in r.seconds.items()),
             f"- write throughput: {r.write_mib_s:,.1f} MiB/s of images", "",
             "| split | records | image bytes | .rec bytes | relabelled | escaped | byte-checked |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for s in r.splits.values():
        lines.append(f"| {s.split} | {s.records:,} | {s.image_bytes:,} ({human_bytes(s.image_bytes)}) | {s.rec_bytes:,} "
                     f"| {s.relabelled} | {s.escaped_records} | {s.checked_records:,} |")
    lines += ["", f"## Quirk files ({len(r.quirks)}), packed byte for byte", ""]
    if r.quirks:
        lines += ["| split | path | record id | format | mode | bytes |", "|---|---|---:|---|---|---:|"]
        lines += [f"| {q['split']} | `{q['path']}` | {q['key']} | {q['format']} | {q['mode']} | {q['bytes']:,} |"
                  for q in r.quirks]
    else:
        lines.append("none")
    return "\n".join(lines) + "\n"


# --- CLI ------------------------------------------------------------------------------------------


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pack", help="pack extracted/ into unresized MXNet RecordIO (im2rec pass-through), verified")
    p.add_argument("workdir", type=Path)
    p.add_argument("--threads", type=int, default=None, help="worker processes (default: all usable cores)")
    p.add_argument("--full-check", action="store_true", help="compare every record with its source file")
    p.add_argument("--force", action="store_true", help="repack even if the outputs are complete and current")
    p.add_argument("--writer", choices=["fast", "im2rec"], default="fast",
                   help="fast: parallel in-place writer (default); im2rec: the wheel's im2rec.py (same bytes)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=_cli)


def _cli(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    bar: list[tqdm] = []

    def progress(done: int, total: int) -> None:
        if not bar:
            bar.append(tqdm(total=total, unit="img", unit_scale=True, desc="pack", file=sys.stderr, disable=None))
        bar[0].update(done - bar[0].n)

    try:
        r = pack(args.workdir, threads=args.threads, full_check=args.full_check, progress=progress,
                 force=args.force, writer=args.writer)
    finally:
        if bar:
            bar[0].close()
    if args.json:
        print(r.to_json())
        return 0
    if r.cached:
        print(f"recordio in {r.recordio} is complete and current (key {r.key[:16]}); --force to repack")
    for s in r.splits.values():
        print(f"{s.split}: {s.records:,} records, {human_bytes(s.rec_bytes)} "
              f"({s.checked_records:,} byte-checked, {s.relabelled} relabelled)")
    if not r.cached:
        print(f"quirks packed byte for byte: {len(r.quirks)}; write {r.write_mib_s:,.0f} MiB/s; "
              f"total {r.seconds['total']:.1f} s")
    print(f"report: {r.report_md}")
    return 0
