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
  escaping of the magic word inside payloads) in N forked workers (tasks.workers): each builds a 512 KiB
  batch of records in its one reused buffer from one `readv` per image, receives the batch's start offset
  from the previous batch's worker (a ring of pipes), passes on its end offset, and `pwrite`s the batch in
  place. The output is the same bytes im2rec writes (tests compare against the real im2rec.py), at about
  `cat` speed. `writer="im2rec"` runs the wheel's im2rec.py --pass-through instead, for audits; both go
  through the same verification. Per image, the manifest, .lst and offsets are kept as arrays, not Python
  objects (see "Memory" below).
- Everything is written in recordio/.tmp-pack-*/, verified (count = .lst lines, every .idx offset at a
  record header whose id/label/length match the .lst and manifest, records contiguous to the end of the
  file: checked as arrays over every record's header, one pread each; a sample -- or all with
  full_check -- byte-identical to the source files), fsynced, and only then
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
from tasks.ilsvrc import MANIFEST_COLUMNS, SPLITS
from tasks.recordio import (IM2REC_EXTS, IR_SIZE, LEN_MASK, MAGIC, REC_HEAD, encode_record, im2rec_path, make_list,
                            pad4, read_lst_columns, read_record)
from tasks.tether import die_with_parent
from tasks.workers import WorkerError, read_exact, run_forked

FORMAT_VERSION = 1
# 512 KiB: a batch buffer that fits in a core's L2. With 4 MiB batches the kernel time of reading the
# images into the buffer and writing it out was ~2.5x higher (1.2 GB: sys 1.7-2.2 s vs 0.6-0.7 s, measured);
# smaller ones (128 KiB) cost more in per-batch work than they save.
BATCH_BYTES = 512 << 10
BATCH_RECORDS = 1024
SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")
ZEROS = bytes(4)
HEAD_DTYPE = [("magic", "<u4"), ("lrec", "<u4"), ("flag", "<u4"), ("label", "<f4"), ("id", "<u8"), ("id2", "<u8")]

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
#
# Memory: at 1.28 M images, every 100 bytes kept per image is 128 MB. So the manifest is read as Arrow
# columns (a pandas frame of Python objects cost ~900 bytes per image), and what is kept through the write
# is arrays: per split, the manifest's relative paths, labels and sizes, then the .lst as columns. Python
# objects per image exist only transiently, in one phase at a time (the tree check's set, im2rec's list).

MANIFEST_NEEDED = ["split", "wnid", "label", "path", "bytes", "md5", "mode", "format"]


@dataclasses.dataclass
class SplitManifest:
    """One split of the manifest, sorted by path: paths relative to extracted/<split>/, labels, sizes,
    and which rows are quirks (not an RGB JPEG) with their (full path, format, mode)."""
    rel: Any                 # pyarrow string array
    labels: Any              # float64 numpy (the record header's label)
    sizes: Any               # int64 numpy
    quirks: dict[int, tuple[str, str, str]]


@dataclasses.dataclass
class Listing:
    """One split's .lst as columns, in .lst order: im2rec's index, the manifest label, the path under
    extracted/<split>/ and the manifest's byte count of the file."""
    keys: Any                # int64 numpy
    labels: Any              # float64 numpy
    paths: Any               # pyarrow string array
    sizes: Any               # int64 numpy

    @classmethod
    def of(cls, items: list[tuple[int, float, str]], sizes: list[int]) -> "Listing":
        import numpy as np
        import pyarrow as pa

        return cls(np.array([k for k, _, _ in items], dtype=np.int64),
                   np.array([label for _, label, _ in items], dtype=np.float64),
                   pa.array([p for _, _, p in items], pa.string()), np.array(sizes, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.keys)

    def rows(self, lo: int, hi: int) -> list[tuple[int, float, str, int]]:
        """(index, label, path, bytes) of records lo..hi-1, as Python values."""
        return list(zip(self.keys[lo:hi].tolist(), self.labels[lo:hi].tolist(),
                        self.paths.slice(lo, hi - lo).to_pylist(), self.sizes[lo:hi].tolist()))


def read_manifest_table(wd: Workdir):
    """The manifest's columns pack needs, as a pyarrow Table (checked: present, no missing values)."""
    if not wd.manifest.is_file():
        raise StageError(f"{wd.manifest} does not exist: run `rn50 verify {wd.root}` first")
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        manifest = pq.ParquetFile(wd.manifest, pre_buffer=False)
        missing = [c for c in MANIFEST_COLUMNS if c not in manifest.schema_arrow.names]
        if missing:
            raise StageError(f"{wd.manifest} lacks column(s) {', '.join(missing)}: rerun `rn50 verify`")
        # Streamed in batches on one thread: read_table's whole-row-group decode (and its threads' malloc
        # arenas) peaked at ~250 bytes per image for ~130 bytes of columns; this, at ~190.
        schema = pa.schema([manifest.schema_arrow.field(c) for c in MANIFEST_NEEDED])
        table = pa.Table.from_batches(list(manifest.iter_batches(batch_size=1 << 16, columns=MANIFEST_NEEDED,
                                                                 use_threads=False)), schema=schema)
    except StageError:
        raise
    except Exception as e:  # pyarrow raises several unrelated types for a damaged file
        raise StageError(f"cannot read {wd.manifest}: {e}") from None
    for c in MANIFEST_NEEDED:
        if table.column(c).null_count:
            raise StageError(f"manifest.parquet: column {c} has {table.column(c).null_count} missing value(s): "
                             f"rerun `rn50 verify`")
    return table


def manifest_table_digest(table) -> str:
    """tasks.ilsvrc.manifest_digest of the same manifest (tested equal): sha256 over "path<TAB>md5<TAB>label
    <TAB>split\n" per row in path order, Python's str() of each value. Computed from Arrow columns in chunks,
    the lines built by Arrow itself when that gives the same text (string columns, integer labels; ~20x
    faster than Python str/join), by Python otherwise. Arrow's sort is stable, like the pandas one."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    names = ["path", "md5", "label", "split"]
    cols = table.select(names)
    by_arrow = (pa.types.is_integer(cols.schema.field("label").type)
                and all(pa.types.is_string(cols.schema.field(c).type) for c in ("path", "md5", "split")))
    order = pc.sort_indices(cols.column("path"))
    h = hashlib.sha256()
    for lo in range(0, len(order), 1 << 15):
        part = cols.take(order.slice(lo, 1 << 15))
        if by_arrow:
            line = pc.binary_join_element_wise(part["path"], part["md5"], pc.cast(part["label"], pa.string()),
                                               part["split"], "\t")
            text = pc.binary_join_element_wise(line, "\n", "").combine_chunks()
            bounds = np.frombuffer(text.buffers()[1], dtype=np.int32)[text.offset:text.offset + len(text) + 1]
            if len(text):
                h.update(memoryview(text.buffers()[2])[int(bounds[0]):int(bounds[-1])])
        else:
            rows = zip(*(part.column(c).to_pylist() for c in names))
            h.update("".join("\t".join(map(str, row)) + "\n" for row in rows).encode())
    return h.hexdigest()


def _expected(table) -> dict[str, SplitManifest]:
    """Check the manifest's labels, splits and paths; per split, what pack needs of it. Works on bitmaps and
    one split's paths at a time: a full extra copy of every path would cost ~50 bytes per image."""
    import numpy as np
    import pyarrow.compute as pc

    def mask(arr) -> Any:
        return arr.to_numpy(zero_copy_only=False)

    wnid, label, split, path = (table.column(c) for c in ("wnid", "label", "split", "path"))
    want = mask(pc.index_in(wnid, value_set=pc.unique(wnid).sort()))
    labels = mask(label)
    bad = np.flatnonzero(want != labels)
    if len(bad):
        r = table.slice(int(bad[0]), 1).to_pylist()[0]
        raise StageError(f"manifest.parquet: {r['path']} has label {r['label']} but {r['wnid']} is class "
                         f"{want[bad[0]]} of the sorted WNIDs ({len(bad)} such rows): rerun `rn50 verify`")
    del want
    extra = sorted(set(pc.unique(split).to_pylist()) - set(SPLITS))
    if extra:
        raise StageError(f"manifest.parquet has unknown split(s) {extra}")
    in_split = {s: mask(pc.equal(split, s)) for s in SPLITS}
    # Every path is extracted/<split>/<wnid>/<file>: its own split's folder, exactly three slashes.
    ok = mask(pc.equal(pc.count_substring(path, "/"), 3))
    for s, rows in in_split.items():
        ok[rows] &= mask(pc.starts_with(path, f"extracted/{s}/"))[rows]
    bad = np.flatnonzero(~ok)
    if len(bad):
        i = int(bad[0])
        raise StageError(f"manifest.parquet: path {path[i].as_py()!r} is not extracted/{split[i].as_py()}/<wnid>/<file>")
    del ok
    quirk = ~(mask(pc.equal(table.column("format"), "JPEG")) & mask(pc.equal(table.column("mode"), "RGB")))
    sizes = table.column("bytes").to_numpy()
    out = {}
    for s, rows in in_split.items():
        rows = np.flatnonzero(rows)
        rel = pc.utf8_slice_codeunits(path.take(rows), len(f"extracted/{s}/"))
        order = pc.sort_indices(rel).to_numpy()
        rel = rel.take(order)
        rows = rows[order]
        if len(rel) > 1:
            same = np.flatnonzero(mask(pc.equal(rel.slice(1), rel.slice(0, len(rel) - 1))))
            if len(same):
                dup = f"extracted/{s}/{rel[int(same[0])].as_py()}"
                raise StageError(f"manifest.parquet lists {dup} more than once ({len(same)} repeats): "
                                 f"rerun `rn50 verify`")
        quirks = {}
        for i in np.flatnonzero(quirk[rows]).tolist():
            r = table.slice(int(rows[i]), 1).select(["path", "format", "mode"]).to_pylist()[0]
            quirks[i] = (r["path"], r["format"], r["mode"])
        out[s] = SplitManifest(rel=rel, labels=labels[rows].astype(np.float64), sizes=sizes[rows].astype(np.int64),
                               quirks=quirks)
    return out


def _check_tree(root: Path, expected: SplitManifest, split: str) -> None:
    """The split's tree must hold exactly the manifest's files, one level of class folders, nothing else:
    im2rec would silently skip or mislabel anything else."""
    if not root.is_dir():
        raise StageError(f"{root} does not exist: run `rn50 verify` first")
    unseen = set(expected.rel.to_pylist())  # transient: gone when the check is done
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
                    elif rel not in unseen:
                        kind = "image" if os.path.splitext(f.name)[1].lower() in IM2REC_EXTS else "non-image file"
                        problems.append(f"{kind} {root / rel} is not in manifest.parquet")
                    else:
                        unseen.discard(rel)
                    n += 1
            if n == 0:
                problems.append(f"empty class folder {root / c.name}")
    if unseen:
        problems.append(f"{root / min(unseen)} is in manifest.parquet but missing from disk"
                        + (f" (and {len(unseen) - 1} more)" if len(unseen) > 1 else ""))
    if problems:
        more = f" (+{len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise StageError(f"{split}: {problems[0]}{more}; the extracted tree must match manifest.parquet "
                         f"(rerun `rn50 verify`)")


def _listing(lst: Path, expected: SplitManifest, split: str) -> tuple[Listing, int, dict[int, tuple[str, str, str]]]:
    """Read im2rec's .lst and match it to the manifest: the same files, once each, distinct indices. Labels
    come from the manifest; the .lst is rewritten (im2rec's format, same order) where its labels differ.
    Returns the listing, how many lines were relabelled, and the quirks by .lst position."""
    import numpy as np
    import pyarrow.compute as pc

    keys, lst_labels, paths = read_lst_columns(lst)
    row = pc.index_in(paths, value_set=expected.rel)
    if (row.null_count or len(paths) != len(expected.rel)
            or np.bincount(row.to_numpy(zero_copy_only=False), minlength=len(expected.rel)).max(initial=1) != 1):
        ours, theirs = set(paths.to_pylist()), set(expected.rel.to_pylist())
        extra = sorted(ours - theirs)[:1] or sorted(theirs - ours)[:1]
        raise StageError(f"{split}: im2rec's list ({len(paths)} files) differs from manifest.parquet "
                         f"({len(expected.rel)} files), e.g. {extra}; rerun `rn50 verify`")
    if len(np.unique(keys)) != len(keys):
        raise StageError(f"{lst}: duplicate image indices")
    row = row.to_numpy()
    listing = Listing(keys=keys, labels=expected.labels[row], paths=paths, sizes=expected.sizes[row])
    changed = int(np.count_nonzero(lst_labels != listing.labels))
    if changed:
        with open(lst, "w") as f:
            for lo in range(0, len(listing), 1 << 16):
                f.writelines(f"{k}\t{label:f}\t{p}\n" for k, label, p, _ in listing.rows(lo, lo + (1 << 16)))
    position = np.empty(len(row), dtype=np.int64)  # .lst position of each manifest row
    position[row] = np.arange(len(row))
    quirks = {int(position[r]): q for r, q in expected.quirks.items()}
    return listing, changed, quirks


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


def _record_sizes(sizes):
    """Bytes each record takes when its payload holds no magic word (numpy int64)."""
    return 8 + ((IR_SIZE + sizes + 3) & ~3)


def _batches(rec_sizes) -> list[tuple[int, int]]:
    """Consecutive record ranges of about BATCH_BYTES (a record starting past a multiple of BATCH_BYTES opens
    a new batch) and at most BATCH_RECORDS records. Batching decides only who writes what, never the bytes."""
    import numpy as np

    n = len(rec_sizes)
    if not n:
        return []
    starts = np.cumsum(rec_sizes) - rec_sizes
    cuts = np.flatnonzero(np.diff(starts // BATCH_BYTES)) + 1
    out = []
    for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), n]):
        out += [(a, min(a + BATCH_RECORDS, hi)) for a in range(lo, hi, BATCH_RECORDS)]
    return out


def _reserve_space(fd: int, rec: Path, total: int) -> None:
    """ENOSPC now, before any work, rather than mid-way; and the space is ours. (Measured against a plain
    free-space check at 512 KiB batches: no slower, kernel time 0.48-0.77 vs 0.56-0.63 s for 1.2 GB.)"""
    if total:
        try:
            os.posix_fallocate(fd, 0, total)
        except OSError as e:
            raise StageError(f"{_write_error(e, rec)} (needs {human_bytes(total)})") from None


def _write_fast(listing: Listing, root: Path, rec: Path, idx: Path, workers: int,
                tick: Callable[[int], None]) -> int:
    """Write .rec and .idx for `listing` (the .lst order). Returns the number of escaped records."""
    import numpy as np

    sizes = listing.sizes
    too_big = np.flatnonzero(IR_SIZE + sizes > LEN_MASK)
    if len(too_big):
        i = int(too_big[0])
        raise StageError(f"{root / listing.paths[i].as_py()} is {int(sizes[i]):,} bytes; RecordIO records stop at 512 MiB")
    rec_sizes = _record_sizes(sizes)
    batches = _batches(rec_sizes)
    ends = np.cumsum(rec_sizes)
    batch_bytes = max((int(ends[hi - 1] - ends[lo] + rec_sizes[lo]) for lo, hi in batches), default=0)
    total = int(ends[-1]) if len(ends) else 0
    fd = os.open(rec, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _reserve_space(fd, rec, total)
        ring = [os.pipe() for _ in range(workers)]

        def build(lo: int, hi: int, rootfd: int, buf: bytearray) -> tuple[Any, list[int] | None]:
            """The batch's records in buf (reused: every byte is written, padding included). Returns the
            bytes to write and, if a payload held the magic word, each record's size as written."""
            view, extra, pos = memoryview(buf), bytearray(1), 0
            for key, label, path, n in listing.rows(lo, hi):
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
                end = pos + 8 + pad4(IR_SIZE + n)
                buf[pos + 32 + n:end] = ZEROS[:end - pos - 32 - n]
                pos = end
            # Every record header holds the magic word once; any more means a payload holds it too.
            if np.count_nonzero(np.frombuffer(buf, dtype="<u4", count=pos // 4) == MAGIC) == hi - lo:
                return view[:pos], None
            parts, start = [], 0
            for i in range(lo, hi):
                size = int(rec_sizes[i])
                parts.append(encode_record(bytes(buf[start + 8:start + 8 + IR_SIZE + int(sizes[i])])))
                start += size
            return b"".join(parts), [len(p) for p in parts]

        def work(w: int, send: Callable[[Any], None]) -> None:
            """Batches w, w + workers, ...; to the parent only progress (~5 a second) and escaped batches:
            a message per 512 KiB batch cost the parent ~2 us of CPU per image."""
            ring_in, ring_out = ring[w][0], ring[(w + 1) % workers][1]
            rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
            buf = bytearray(batch_bytes)  # one per worker, reused: no page faults on fresh memory per batch
            unreported, last = 0, time.monotonic()
            for b in range(w, len(batches), workers):
                lo, hi = batches[b]
                data, written = build(lo, hi, rootfd, buf)
                start = struct.unpack("<q", read_exact(ring_in, 8))[0]
                with contextlib.suppress(BrokenPipeError):
                    os.write(ring_out, struct.pack("<q", start + len(data)))
                _pwrite_all(fd, data, start, rec)
                if written is not None:
                    send(("escaped", b, start, written))
                unreported += hi - lo
                if time.monotonic() - last >= 0.2:
                    send(("progress", unreported))
                    unreported, last = 0, time.monotonic()
            if unreported:
                send(("progress", unreported))

        escaped_batches: dict[int, tuple[int, list[int]]] = {}

        def on_message(_w: int, msg: tuple) -> None:
            if msg[0] == "escaped":
                escaped_batches[msg[1]] = (msg[2], msg[3])
            else:
                tick(msg[1])

        os.write(ring[0][1], struct.pack("<q", 0))
        try:
            run_forked(workers, work, on_message, name="pack worker")
            # The end offset of the last batch, passed on to the worker that would have written the next.
            end = struct.unpack("<q", read_exact(ring[len(batches) % workers][0], 8))[0]
        finally:
            for r, w in ring:
                os.close(r)
                os.close(w)
        escaped = 0
        for b, (_, written) in escaped_batches.items():  # the rare multi-part records: their sizes as written
            lo, hi = batches[b]
            escaped += int(np.count_nonzero(np.array(written) != rec_sizes[lo:hi]))
            rec_sizes[lo:hi] = written
        offsets = np.cumsum(rec_sizes) - rec_sizes
        wrong = [b for b, (start, _) in escaped_batches.items() if start != offsets[batches[b][0]]]
        if wrong or end != int(rec_sizes.sum()):
            raise StageError(f"internal error: the records of {rec} end at {end}, expected {int(rec_sizes.sum())}"
                             + (f"; batch {wrong[0]} is misplaced" if wrong else ""))
        os.ftruncate(fd, int(rec_sizes.sum()))
    finally:
        os.close(fd)
    try:  # fsync happens at commit, after verification
        with open(idx, "w") as f:
            for lo in range(0, len(offsets), 1 << 16):
                f.writelines(f"{k}\t{off}\n" for k, off in zip(listing.keys[lo:lo + (1 << 16)].tolist(),
                                                                offsets[lo:lo + (1 << 16)].tolist()))
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


def _read_idx(idx: Path, keys, where: str):
    """The .idx's offsets (int64 numpy) after checking its keys, line by line, against the .lst's."""
    from array import array

    import numpy as np

    offsets = array("q")
    n = 0
    with open(idx) as f:
        for n, line in enumerate(f, 1):
            k, _, off = line.rstrip("\n").partition("\t")
            if n <= len(keys):
                try:
                    if int(k) != keys[n - 1]:
                        raise StageError(f"{where}.idx line {n} has key {k}, the .lst has {keys[n - 1]}")
                    offsets.append(int(off))
                except ValueError:
                    raise StageError(f"{where}.idx line {n} is not 'key<TAB>offset': {line.strip()!r}") from None
    if n != len(keys):
        raise StageError(f"{where}.idx has {n} records but {where.rsplit('/', 1)[1]}.lst has {len(keys)} lines")
    return np.frombuffer(offsets, dtype=np.int64)


def verify_split(split: str, tmp: Path, root: Path, listing: Listing, sample, workers: int) -> tuple[int, int]:
    """Check the written files from disk. `sample`: a bool per record, whether to compare its bytes with
    the source file. Returns (records compared with their sources, multi-part records)."""
    import numpy as np

    rec, idx = tmp / f"{split}.rec", tmp / f"{split}.idx"
    where = f"recordio/{split}"
    keys, labels, sizes = listing.keys, listing.labels, listing.sizes
    offsets = _read_idx(idx, keys, where)
    rec_size = rec.stat().st_size
    if not len(listing):
        if rec_size:
            raise StageError(f"{where}.rec holds {rec_size} bytes but no records")
        return 0, 0

    def one(fd: int, i: int) -> tuple[bool, bool]:
        """Every check of record i, one record at a time; (compared with its source, multi-part)."""
        key, label, path, n = listing.rows(i, i + 1)[0]
        off = int(offsets[i])
        end = int(offsets[i + 1]) if i + 1 < len(offsets) else rec_size
        what = f"{where}.rec record {i} (key {key}, {path}) at byte {off}"
        if off < 0:
            raise WorkerError(f"{what}: negative .idx offset")
        head = os.pread(fd, 32, off)
        if len(head) != 32:
            raise WorkerError(f"{what}: .idx offset beyond the end of the file")
        magic, lrec, flag, rlabel, rid, _ = REC_HEAD.unpack(head)
        payload = None
        multipart = not (magic == MAGIC and lrec >> 29 == 0)
        if not multipart:
            length, rend = lrec & LEN_MASK, off + 8 + pad4(lrec & LEN_MASK)
        else:
            try:
                payload, rend = read_record(fd, off)
            except ValueError as e:
                raise WorkerError(f"{what}: .idx offset is not at a record header ({e})") from None
            length = len(payload)
            _, _, flag, rlabel, rid, _ = REC_HEAD.unpack(b"\0" * 8 + payload[:IR_SIZE])
        if rend != end:
            raise WorkerError(f"{what}: record ends at byte {rend}, the next record starts at {end}")
        if (flag, rid, rlabel) != (0, key, label) or length != IR_SIZE + n:
            raise WorkerError(f"{what}: header says id {rid}, label {rlabel}, {length - IR_SIZE} bytes; "
                               f"expected id {key}, label {label}, {n} bytes")
        if sample[i]:
            if payload is None:
                payload = read_record(fd, off)[0]
            with open(root / path, "rb") as f:
                if payload[IR_SIZE:] != f.read():
                    raise WorkerError(f"{what}: image bytes differ from {root / path}")
        return bool(sample[i]), multipart

    def check(w: int, _send) -> tuple[int, int]:
        """The headers of a chunk of records are read (one pread each: a mapping of the .rec would count
        its pages in the workers' RSS) and checked as arrays; a record that fails any of those checks -- or
        is multi-part, or sampled -- then goes through `one`, which says exactly what is wrong, if anything."""
        lo, hi = len(listing) * w // workers, len(listing) * (w + 1) // workers
        fd = os.open(rec, os.O_RDONLY)
        checked = multipart = 0
        blank = bytes(32)
        try:
            for a in range(lo, hi, 1 << 13):
                b = min(hi, a + (1 << 13))
                off = offsets[a:b]
                end = np.append(offsets[a + 1:b + 1], rec_size) if b == len(offsets) else offsets[a + 1:b + 1]
                inside = (off >= 0) & (off + 32 <= rec_size)
                raw = b"".join([os.pread(fd, 32, o) if ok else blank
                                for o, ok in zip(off.tolist(), inside.tolist())])
                head = np.frombuffer(raw, dtype=HEAD_DTYPE) if len(raw) == 32 * (b - a) else None
                if head is None:  # a short read: the file changed under us; let `one` say where
                    fine = np.zeros(b - a, dtype=bool)
                else:
                    length = (head["lrec"] & LEN_MASK).astype(np.int64)
                    fine = (inside & (head["magic"] == MAGIC) & (head["lrec"] >> 29 == 0)
                            & (off + 8 + ((length + 3) & ~3) == end) & (head["flag"] == 0)
                            & (keys[a:b] >= 0) & (head["id"] == keys[a:b].astype(np.uint64))
                            & (head["label"].astype(np.float64) == labels[a:b]) & (length == IR_SIZE + sizes[a:b]))
                for i in (np.flatnonzero(~fine | sample[a:b]) + a).tolist():
                    c, m = one(fd, i)
                    checked += c
                    multipart += m
        finally:
            os.close(fd)
        return checked, multipart

    counts = run_forked(workers, check, name="pack worker")
    return sum(c for c, _ in counts), sum(m for _, m in counts)


def _sample(n: int, always) -> Any:
    """Evenly spread 1% (at least 64) of the records, plus every quirk: a bool per record."""
    import numpy as np

    want = min(n, max(64, n // 100))
    step = max(1, n // want) if want else 1
    mask = np.zeros(n, dtype=bool)
    mask[::step] = True
    mask[list(always)] = True
    return mask


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
    with _arrow_memory_given_back():
        return _pack(workdir, threads, full_check, progress, force, writer)


@contextlib.contextmanager
def _arrow_memory_given_back():
    """While pack runs, Arrow allocates from jemalloc, which hands freed memory back to the system: the
    Python objects of the listing phase then reuse the pages the manifest table held. The default pool
    (mimalloc) kept them: peak RSS 573 vs 373 bytes per image (measured, 100k- and 400k-image trees). Only
    the pool of new allocations changes; every buffer is freed to the pool it came from."""
    import pyarrow as pa

    try:
        pool = pa.jemalloc_memory_pool()
    except NotImplementedError:  # a pyarrow built without jemalloc
        yield
        return
    before = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    try:
        yield
    finally:
        pa.set_memory_pool(before)


def _pack(workdir: Path | str, threads: int | None, full_check: bool, progress: Optional[Progress], force: bool,
          writer: str) -> PackResult:
    t0 = time.perf_counter()
    wd = workdir if isinstance(workdir, Workdir) else Workdir(workdir)
    if writer not in ("fast", "im2rec"):
        raise StageError(f"unknown writer {writer!r} (fast or im2rec)")
    workers = max(1, threads or len(os.sched_getaffinity(0)))
    table = read_manifest_table(wd)
    mdigest = manifest_table_digest(table)
    table = table.drop_columns(["md5"])  # the digest was its only use
    settings = pack_settings()
    key = pack_key(mdigest, settings)
    if not force and stamp_valid(wd, "pack", key):
        res = read_stamp(wd, "pack")["result"]
        with contextlib.suppress(TypeError, KeyError, AttributeError):  # a stamp of another version: repack
            res["splits"] = {s: SplitResult(**r) for s, r in res["splits"].items()}
            return PackResult(**{**res, "cached": True})

    expected = _expected(table)
    del table  # everything below works from `expected`
    splits = [s for s in SPLITS if len(expected[s].rel) or (wd.extracted / s).exists()]
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
                result = _pack_into(wd, tmp, splits, expected, workers, full_check, progress, writer)
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


def _pack_into(wd: Workdir, tmp: Path, splits: list[str], expected: dict[str, SplitManifest], workers: int,
               full_check: bool, progress: Optional[Progress], writer: str) -> dict[str, Any]:
    import numpy as np

    seconds = {"list": 0.0, "write": 0.0, "verify": 0.0}
    t = time.perf_counter()
    lists = {}
    for s in splits:
        root = wd.extracted / s
        _check_tree(root, expected[s], s)
        try:
            lists[s] = _listing(make_list(root, tmp / s), expected[s], s)
        except OSError as e:
            raise StageError(_os_error(e, e.filename or tmp / f"{s}.lst")) from None
        del expected[s]  # the listing holds what the rest needs
    seconds["list"] = time.perf_counter() - t

    total = sum(len(listing) for listing, _, _ in lists.values())
    done = [0, 0.0]

    def tick(n: int) -> None:
        if not n:  # progress(0, total) is called once, before any record is read
            return
        done[0] += n
        now = time.monotonic()
        if progress and (now - done[1] >= 0.2 or done[0] >= total):
            done[1] = now
            progress(done[0], total)

    if progress:
        progress(0, total)
    results, quirks = {}, []
    for s in splits:
        listing, relabelled, split_quirks = lists[s]
        root = wd.extracted / s
        t = time.perf_counter()
        escaped = 0
        if writer == "fast":
            escaped = _write_fast(listing, root, tmp / f"{s}.rec", tmp / f"{s}.idx", workers, tick)
        else:
            _write_im2rec(tmp / s, root, workers, tick)
        seconds["write"] += time.perf_counter() - t

        t = time.perf_counter()
        for i, (path, fmt, mode) in sorted(split_quirks.items()):
            quirks.append({"split": s, "path": path, "key": int(listing.keys[i]), "format": fmt, "mode": mode,
                           "bytes": int(listing.sizes[i])})
        sample = np.ones(len(listing), dtype=bool) if full_check else _sample(len(listing), split_quirks)
        checked, multipart = verify_split(s, tmp, root, listing, sample, workers)
        if writer == "fast" and multipart != escaped:
            raise StageError(f"recordio/{s}.rec: {multipart} multi-part records found, the writer made {escaped}")
        escaped = multipart
        seconds["verify"] += time.perf_counter() - t
        results[s] = SplitResult(
            split=s, records=len(listing), image_bytes=int(listing.sizes.sum()),
            rec_bytes=(tmp / f"{s}.rec").stat().st_size,
            idx_sha256=file_digest(tmp / f"{s}.idx", "sha256"), lst_sha256=file_digest(tmp / f"{s}.lst", "sha256"),
            relabelled=relabelled, escaped_records=escaped, checked_records=checked)
        del lists[s]
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
    p = sub.add_parser("pack", help="pack extracted/ into unresized MXNet RecordIO (im2rec pass-through), verified",
                       description="Pack the verified images of WORKDIR/extracted into WORKDIR/recordio/{train,val}."
                                   "{lst,rec,idx}: the bytes MXNet's im2rec.py writes in pass-through mode (no resizing), "
                                   "with the manifest's labels, then check the records against their source files.")
    p.add_argument("workdir", type=Path, help="work directory that rn50 verify filled")
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
