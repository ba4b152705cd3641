"""Verify stage: extract the archives safely, index every image, and hold the index to the devkit.

raw/ -> extracted/{train,val}/<wnid>/*.JPEG, manifest.parquet, reports/verify.{md,json}.

Every expectation is derived from the three archives, because they are all a real user has: the class
set and per-class train counts come from the devkit's meta.mat (num_train_images), the val count from
the ground-truth file. Val images are sorted into class folders through ILSVRC2012_ID -> WNID from
meta.mat; the IDs are NOT sorted-WNID class indices. Quirks (PNG saved as .JPEG, CMYK, grayscale) are
reported, not failed on: training decoders must cope with them as they do for the real dataset.

Extraction goes to extracted.partial/ and is renamed to extracted/ only after the manifest passed,
so a kill or a failure never leaves a tree that a later run would take as verified.

Extraction is bounded (caps and their reasons in tasks.ilsvrc): each archive's size; the two .tar files
read as plain tar streams (compressed data under a .tar name is refused, never decompressed); per
member, a class tar or an image; inner class tars streamed, never held in memory; the devkit's
decompressed stream, its meta.mat (also inflated, and what its arrays declare) and ground truth. Members
are checked before any of their bytes are read; a violation is a one-line error and extracted.partial/ is
removed.
"""
from __future__ import annotations

import argparse
import array
import collections
import dataclasses
import gzip
import hashlib
import io
import math
import os
import posixpath
import queue
import shutil
import struct
import tarfile
import threading
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

from tasks.common import (Result, StageError, Workdir, atomic_path, digest_of, human_bytes, read_stamp, stamp_valid,
                          write_json_atomic, write_stamp, write_text_atomic)
from tasks.ilsvrc import (ARCHIVE_CAP, ARCHIVES, CLASS_TAR_CAP, DEVKIT_GROUND_TRUTH, DEVKIT_META, DEVKIT_TGZ,
                          DEVKIT_UNPACKED_CAP, GROUND_TRUTH_CAP, IMAGE_CAP, MANIFEST_COLUMNS, META_MAT_ARRAYS, META_MAT_CAP,
                          META_MAT_DEPTH, META_MAT_ELEMENTS, META_MAT_FIELDS, TAR_HEADER_CAP,
                          TRAIN_TAR, VAL_NAME, VAL_TAR, manifest_digest, read_fetch_record)

Progress = Callable[[str, int, Optional[int]], None]


@dataclasses.dataclass
class VerifyResult(Result):
    workdir: str
    manifest: str
    manifest_digest: str
    archives_digest: str
    classes: int
    train_images: int
    val_images: int
    bytes: int
    quirks: dict[str, list[str]]
    expectations: list[dict[str, Any]]
    report: str
    reused: bool
    seconds: float
    phases: dict[str, float] = dataclasses.field(default_factory=dict)  # extract, decode_check, validate, commit


# --- safe extraction ------------------------------------------------------------------------------


def _check_member(archive: str, m: tarfile.TarInfo) -> None:
    """Refuse absolute paths, `..`, links leaving the archive's tree, and device/fifo members."""
    name = m.name
    norm = posixpath.normpath(name)
    if name.startswith("/") or norm == ".." or norm.startswith("../") or "/../" in f"/{name}/":
        raise StageError(f"{archive}: refusing member {name!r}: its path leaves the extraction directory")
    if m.issym() or m.islnk():
        target = m.linkname if m.islnk() else posixpath.join(posixpath.dirname(norm), m.linkname)
        t = posixpath.normpath(target)
        if m.linkname.startswith("/") or t == ".." or t.startswith("../"):
            raise StageError(f"{archive}: refusing member {name!r}: link to {m.linkname!r} points outside")
        raise StageError(f"{archive}: refusing member {name!r}: links are not expected in ILSVRC2012 archives")
    if not (m.isfile() or m.isdir()):
        raise StageError(f"{archive}: refusing member {name!r}: not a regular file")
    if m.issparse():  # its data would expand beyond what the archive holds
        raise StageError(f"{archive}: refusing member {name!r}: sparse files are not expected in ILSVRC2012 archives")


# Leading bytes of the compressed formats tarfile's "r|*" would have decompressed transparently.
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"),
               (b"\x04\x22\x4d\x18", "lz4"))
_DAMAGED = (tarfile.TarError, EOFError, OSError, zlib.error)


def _open_archive(path: Path) -> BinaryIO:
    """raw/<name>, opened for reading once its size is within the archive's cap (tasks.ilsvrc.ARCHIVE_CAP)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise StageError(f"{path} does not exist: run `rn50 fetch` first") from None
    size, cap = os.fstat(f.fileno()).st_size, ARCHIVE_CAP[path.name]
    if size > cap:
        f.close()
        raise StageError(f"{path.name} is {size:,} bytes, over the {human_bytes(cap)} cap for this ILSVRC2012 archive")
    return f


class _Capped:
    """A read-only stream over `f` that raises StageError(message) once more than `cap` bytes came out."""

    def __init__(self, f, cap: int, message: str):
        self.f, self.cap, self.message, self.count = f, cap, message, 0

    def read(self, n: int = -1) -> bytes:
        left = self.cap + 1 - self.count
        data = self.f.read(left if n is None or n < 0 else min(n, left))
        self.count += len(data)
        if self.count > self.cap:
            raise StageError(self.message)
        return data


class _BoundedTarInfo(tarfile.TarInfo):
    """A header whose own data (pax extended header, GNU long name/link), which tarfile reads into memory
    in one piece, is refused over TAR_HEADER_CAP."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        info = super().frombuf(buf, encoding, errors)
        if info.type in _META_TYPES and info.size > TAR_HEADER_CAP:
            raise _HeaderTooBig(f"a tar header of {info.size:,} bytes, over the {human_bytes(TAR_HEADER_CAP)} cap "
                                f"for one")
        return info


class _HeaderTooBig(Exception):
    pass


_META_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
               tarfile.GNUTYPE_LONGLINK)


class _TarStream:
    """A plain tar read front to back from any `read(n)` stream, with no buffering of its own: the
    headers are parsed by tarfile's own TarInfo code (checksum, GNU long names, pax headers, sparse
    maps), the member data is read straight from `f` in one piece (an image) or through a window (an
    inner tar). tarfile's streaming mode copies everything through 10 KiB records and joins them: at
    ~110 KB per image that was most of extraction's time.

    It doubles as the `tarfile` argument of TarInfo.fromtarfile: `fileobj` (read/tell), `encoding`,
    `errors`, `pax_headers`, and `offset`, which fromtarfile sets to where the next header starts."""

    encoding, errors = tarfile.ENCODING, "surrogateescape"

    def __init__(self, label: str, f):
        self.label, self.f, self.pos, self.offset, self.pax_headers = label, f, 0, 0, {}
        self.fileobj = self

    def tell(self) -> int:
        return self.pos

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        self.pos += len(data)
        return data

    def skip_to(self, offset: int) -> None:
        """Read on to `offset` (the next header), dropping the bytes: padding, or what a member's reader left."""
        while self.pos < offset:
            if not self.read(min(offset - self.pos, 1 << 20)):
                raise StageError(f"{self.label}: damaged archive (it ends inside a member)")

    def next(self) -> tarfile.TarInfo | None:
        """The next member's header, or None at the end of the archive."""
        self.skip_to(self.offset)
        at = self.pos
        try:
            return _BoundedTarInfo.fromtarfile(self)
        except tarfile.EOFHeaderError:  # a zero block: the end-of-archive marker
            return None
        except tarfile.EmptyHeaderError:  # the stream ends on a header boundary without the marker (as tarfile)
            if at == 0:
                raise StageError(f"{self.label}: damaged archive (empty file)") from None
            return None
        except tarfile.HeaderError as e:  # tarfile stops silently at a bad header past the first one; this refuses it
            raise StageError(f"{self.label}: damaged archive ({e} at byte {at:,})") from None

    def data(self, m: tarfile.TarInfo) -> bytes:
        """The whole data of member `m` (its size already checked against its cap)."""
        try:
            data = self.read(m.size)
        except _DAMAGED as e:
            raise StageError(f"{self.label}: damaged archive ({e})") from None
        if len(data) != m.size:
            raise StageError(f"{self.label}: damaged archive ({m.name} is truncated)")
        return data

    def window(self, m: tarfile.TarInfo) -> "_Window":
        """A stream of member `m`'s data only (for an inner tar)."""
        return _Window(self, m.size)


class _Window:
    """At most `size` bytes of `stream`, read through; the outer reader skips what is left after it."""

    def __init__(self, stream: _TarStream, size: int):
        self.stream, self.left = stream, size

    def read(self, n: int) -> bytes:
        data = self.stream.read(min(n, self.left))
        self.left -= len(data)
        return data


def _members(label: str, fileobj, member_cap: int, what: str, total_cap: int):
    """Yield (TarInfo, _TarStream) for each regular file of a PLAIN tar read as a stream; read a member's
    bytes with `_TarStream.data` (or `.window`). Each member is checked (path, type, size against
    `member_cap` and the running total against `total_cap`) before any of its bytes are read.
    Compressed data is refused, never decompressed: ILSVRC2012's .tar files are plain tars."""
    head = fileobj.peek(8)[:8] if hasattr(fileobj, "peek") else b""
    kind = next((k for magic, k in _COMPRESSED if head.startswith(magic)), None)
    if kind:
        raise StageError(f"{label} is {kind}-compressed data, not the plain tar ILSVRC2012 ships: refusing to "
                         f"decompress it")
    total, stream = 0, _TarStream(label, fileobj)
    try:
        while (m := stream.next()) is not None:
            _check_member(label, m)
            if not m.isfile():
                continue
            if m.size > member_cap:
                raise StageError(f"{label}: member {m.name!r} is {m.size:,} bytes, over the "
                                 f"{human_bytes(member_cap)} cap for {what}")
            total += m.size
            if total > total_cap:
                raise StageError(f"{label}: members add up to more than {human_bytes(total_cap)}, the cap for "
                                 f"the whole archive")
            yield m, stream
    except _DAMAGED as e:
        raise StageError(f"{label}: damaged archive ({e})") from None
    except _HeaderTooBig as e:
        raise StageError(f"{label}: {e}") from None


_HASH_BATCH = 2 << 20     # image bytes handed to a hashing thread at once (one queue operation per ~20 images)
_HASH_BACKLOG = 8 << 20   # image bytes written but not yet hashed, at most (plus one batch)


class _Index:
    """What extraction learns about each image, in compact columns (a few dozen bytes per image and no
    Python object per image: 1.33 M of them would cost ~0.3 GB), and the writer of the image files.

    Files are written with O_EXCL (a duplicate name in an archive is an error, never a silent
    overwrite). Their MD5s are computed by `hashers` threads on batches of images (hashlib releases the
    GIL on large buffers), so hashing runs on the other core while this thread reads the tar stream and
    writes the files; the bytes waiting for a hasher are bounded (_HASH_BACKLOG), whatever the images' sizes."""

    def __init__(self, root: Path, workdir: Path, hashers: int = 1):
        self.root, self.prefix = root, str(root.relative_to(workdir)).replace("extracted.partial", "extracted", 1)
        self.splits: list[str] = []           # split names, and WNIDs, in order of first appearance
        self.wnids: list[str] = []
        self._split_code: dict[str, int] = {}
        self._wnid_code: dict[str, int] = {}
        self.split = bytearray()              # per image: index into self.splits
        self.wnid = array.array("I")          # per image: index into self.wnids
        self.names = bytearray()              # per image: its file name (UTF-8), concatenated
        self.name_ends = array.array("Q")     # per image: end of its name in self.names
        self.bytes = array.array("q")
        self.md5 = bytearray()                # per image: its 16-byte digest, filled in by the hashers
        self._dirs: dict[tuple[int, int], str] = {}
        self._batch: list[tuple[int, bytes]] = []
        self._batch_bytes = self._in_flight = 0
        self._room = threading.Condition()
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._threads = [threading.Thread(target=self._hash, name=f"verify md5 {i}", daemon=True)
                         for i in range(max(1, hashers))]
        for t in self._threads:
            t.start()

    def __len__(self) -> int:
        return len(self.bytes)

    def _hash(self) -> None:
        md5, new = self.md5, hashlib.md5
        while (batch := self._queue.get()) is not None:
            size = 0
            for i, data in batch:
                size += len(data)
                if self._error is None:
                    try:
                        md5[16 * i:16 * i + 16] = new(data).digest()
                    except BaseException as e:  # noqa: BLE001 - raised in the extracting thread
                        self._error = e
            del batch, data
            with self._room:
                self._in_flight -= size
                self._room.notify()

    def _code(self, codes: dict[str, int], names: list[str], name: str) -> int:
        code = codes.get(name)
        if code is None:
            code = codes[name] = len(names)
            names.append(name)
        return code

    def store(self, name: str, data: bytes, split: str, wnid: str) -> None:
        try:
            encoded = name.encode()
            wnid.encode()
        except UnicodeEncodeError:  # tarfile decodes a name's invalid UTF-8 bytes as surrogates
            raise StageError(f"the {split} archive holds {wnid!r}/{name!r}, a name that is not UTF-8") from None
        s, w = self._code(self._split_code, self.splits, split), self._code(self._wnid_code, self.wnids, wnid)
        d = self._dirs.get((s, w))
        if d is None:
            os.makedirs(f"{self.root}/{split}/{wnid}", exist_ok=True)
            d = self._dirs[s, w] = f"{self.root}/{split}/{wnid}/"
        try:
            fd = os.open(d + name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            raise StageError(f"the {split} archive holds {wnid}/{name} twice") from None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        i = len(self.bytes)
        self.split.append(s)
        self.wnid.append(w)
        self.names += encoded
        self.name_ends.append(len(self.names))
        self.bytes.append(len(data))
        self.md5 += bytes(16)
        self._batch.append((i, data))
        self._batch_bytes += len(data)
        if self._batch_bytes >= _HASH_BATCH:
            self._send()

    def _send(self) -> None:
        if self._error is not None:
            raise self._error
        with self._room:  # wait while the hashers are more than _HASH_BACKLOG behind
            while self._in_flight > _HASH_BACKLOG and self._error is None:
                self._room.wait()
            self._in_flight += self._batch_bytes
        self._queue.put(self._batch)
        self._batch, self._batch_bytes = [], 0

    def finish(self) -> None:
        """Hash what is left and wait for the last digests (idempotent)."""
        if self._threads:
            if self._batch:
                self._send()
            for _ in self._threads:
                self._queue.put(None)
            for t in self._threads:
                t.join()
            self._threads = []
        if self._error is not None:
            raise self._error

    def name(self, i: int) -> str:
        return self.names[self.name_ends[i - 1] if i else 0:self.name_ends[i]].decode()

    def paths(self, lo: int = 0, hi: int | None = None, root: str | None = None) -> list[str]:
        """`<root>/<split>/<wnid>/<name>` of images lo..hi (root: extracted/, as the manifest says)."""
        root = self.prefix if root is None else root
        dirs = [[f"{root}/{s}/{w}/" for w in self.wnids] for s in self.splits]
        split, wnid, name = self.split, self.wnid, self.name
        return [dirs[split[i]][wnid[i]] + name(i) for i in range(lo, len(self) if hi is None else hi)]


# --- devkit ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Devkit:
    wnids: list[str]                    # leaf synsets = the classes, sorted: label = index here
    num_train_images: dict[str, int]
    val_wnids: list[str]                # per val image (1-based index - 1): its class


def _mat_inflated_size(data: bytes, cap: int) -> int:
    """Bytes a v5 MAT file's top-level elements take once inflated (compressed ones are inflated here in
    bounded steps, the output dropped), stopping as soon as `cap` is passed: loadmat would inflate a
    compressed element in one piece, whatever its size."""
    if len(data) < 136:
        return len(data)  # too short to hold an element: loadmat says what is wrong
    endian = "<" if data[126:128] == b"IM" else ">"
    pos, total = 128, 0
    while pos + 8 <= len(data) and total <= cap:
        mtype, nbytes = struct.unpack(endian + "II", data[pos:pos + 8])
        if mtype >> 16:  # small data element: type and size share the first word, data in the second
            total, pos = total + 8, pos + 8
            continue
        if mtype == 15:  # miCOMPRESSED: zlib data of one element
            inflate, left = zlib.decompressobj(), data[pos + 8:pos + 8 + nbytes]
            try:
                while left and total <= cap:
                    total += len(inflate.decompress(left, 1 << 20))
                    left = inflate.unconsumed_tail
            except zlib.error:
                return total  # loadmat reports the damage
            pos += 8 + nbytes
        else:
            total, pos = total + nbytes, pos + 8 + ((nbytes + 7) & ~7)
    return total


# MAT v5 array classes ILSVRC2012's meta.mat may hold (its synsets are a struct of numbers and text); object,
# sparse, function and opaque arrays are refused.
_MX_CLASSES = {1: "cell", 2: "struct", 4: "char", 6: "double", 7: "single", 8: "int8", 9: "uint8", 10: "int16",
               11: "uint16", 12: "int32", 13: "uint32", 14: "int64", 15: "uint64"}
_MI_MATRIX, _MI_COMPRESSED = 14, 15


def _mat_declaration_problem(data: bytes) -> str | None:
    """What a v5 MAT file declares beyond ILSVRC2012's meta.mat (the bounds in tasks.ilsvrc), read from the
    array headers before loadmat allocates from them; None if nothing (damage is left to loadmat to report).
    Call it only on a file whose inflated size was checked: compressed elements are inflated here whole."""
    if len(data) < 136:
        return None
    endian = "<" if data[126:128] == b"IM" else ">"
    seen = {"arrays": 0}

    def element(buf: bytes, pos: int) -> tuple[int, bytes, int] | None:
        """(type, payload, next position) of the element at `pos`; None if its tag is cut off. A payload
        shorter than its tag says is what there is: loadmat reads an array's header before its size matters."""
        if pos + 8 > len(buf):
            return None
        mtype, nbytes = struct.unpack(endian + "II", buf[pos:pos + 8])
        if mtype >> 16:  # small data element: type and size share the first word, data in the second
            return mtype & 0xFFFF, buf[pos + 4:pos + 4 + (mtype >> 16)], pos + 8
        return mtype, buf[pos + 8:pos + 8 + nbytes], pos + 8 + nbytes + (-nbytes % 8)

    def int32s(payload: bytes) -> tuple[int, ...]:
        return struct.unpack(f"{endian}{len(payload) // 4}i", payload[:len(payload) // 4 * 4])

    def matrix(buf: bytes, depth: int) -> str | None:
        seen["arrays"] += 1
        if seen["arrays"] > META_MAT_ARRAYS:
            return f"more than {META_MAT_ARRAYS:,} arrays"
        if depth > META_MAT_DEPTH:
            return f"arrays nested more than {META_MAT_DEPTH} deep"
        flags = element(buf, 0)
        dims = flags and element(buf, flags[2])
        name = dims and element(buf, dims[2])
        if not name or len(flags[1]) < 4:
            return None
        cls, shape = struct.unpack(endian + "I", flags[1][:4])[0] & 0xFF, int32s(dims[1])
        kind, size = _MX_CLASSES.get(cls), math.prod(shape)
        declared = " x ".join(f"{d:,}" for d in shape)
        if kind is None:
            return f"an array of MATLAB class {cls} (object, sparse, function or opaque; ILSVRC2012's holds none)"
        if min(shape, default=0) < 0:
            return f"a {declared} {kind} array (a negative dimension)"
        if size > META_MAT_ELEMENTS:
            return f"a {declared} {kind} array, more than the {META_MAT_ELEMENTS:,} elements allowed for one array"
        pos = name[2]
        if kind == "struct":
            length = element(buf, pos)
            names = length and element(buf, length[2])
            if not names or not int32s(length[1]) or int32s(length[1])[0] <= 0:
                return None
            fields = len(names[1]) // int32s(length[1])[0]
            if fields > META_MAT_FIELDS:
                return f"a struct of {fields:,} fields, more than the {META_MAT_FIELDS} allowed"
            if size * fields > META_MAT_ELEMENTS:
                return (f"a {declared} struct of {fields} fields, more than the {META_MAT_ELEMENTS:,} elements "
                        f"allowed for one array")
            pos = names[2]
        elif kind != "cell":
            return None  # numbers and text: loadmat sizes them from their data, not from the declaration
        while (sub := element(buf, pos)) and sub[0] == _MI_MATRIX:
            if problem := matrix(sub[1], depth + 1):
                return problem
            pos = sub[2]
        return None

    pos = 128
    while pos + 8 <= len(data):
        mtype, nbytes = struct.unpack(endian + "II", data[pos:pos + 8])
        payload = data[pos + 8:pos + 8 + nbytes]
        if mtype == _MI_COMPRESSED:
            try:
                inner = element(zlib.decompressobj().decompress(payload, META_MAT_CAP + 1), 0)
            except zlib.error:
                return None
            mtype, payload = inner[:2] if inner else (0, b"")
        if mtype == _MI_MATRIX and (problem := matrix(payload, 1)):
            return problem
        pos += 8 + nbytes  # top-level elements are not padded (as scipy.io reads them)
    return None


def read_devkit(path: Path) -> Devkit:
    """The devkit's classes, per-class train counts and per-val-image class, read from its .tar.gz with the
    decompressed stream, meta.mat and the ground truth each held to a cap (tasks.ilsvrc)."""
    import scipy.io

    meta = gt = None
    with _open_archive(path) as f:
        if f.peek(2)[:2] != b"\x1f\x8b":
            raise StageError(f"{path.name} is not gzip-compressed: not an ILSVRC2012 devkit")
        stream = _Capped(gzip.GzipFile(fileobj=f, mode="rb"), DEVKIT_UNPACKED_CAP,
                         f"{path.name} decompresses to more than {human_bytes(DEVKIT_UNPACKED_CAP)}, far more than "
                         f"the ILSVRC2012 devkit holds: refusing it")
        for m, tar in _members(path.name, stream, DEVKIT_UNPACKED_CAP, "a devkit file", DEVKIT_UNPACKED_CAP):
            for suffix, cap in ((DEVKIT_META, META_MAT_CAP), (DEVKIT_GROUND_TRUTH, GROUND_TRUTH_CAP)):
                if m.name.endswith(suffix):
                    if m.size > cap:
                        raise StageError(f"{path.name}: {m.name} is {m.size:,} bytes, over the {human_bytes(cap)} cap "
                                         f"for {suffix}")
                    data = tar.data(m)
                    if suffix == DEVKIT_META:
                        meta = data
                    else:
                        gt = data
    if meta is not None and _mat_inflated_size(meta, META_MAT_CAP) > META_MAT_CAP:
        raise StageError(f"{path.name}: {DEVKIT_META} inflates to more than {human_bytes(META_MAT_CAP)}, the cap "
                         f"for it: refusing to load it")
    if meta is not None and (problem := _mat_declaration_problem(meta)):
        raise StageError(f"{path.name}: devkit meta.mat declares {problem}: refusing to load it (ILSVRC2012's "
                         f"is one 1,860 x 1 struct of 8 fields)")
    if meta is None:
        raise StageError(f"{path.name}: devkit has no data/meta.mat")
    if gt is None:
        raise StageError(f"{path.name}: devkit has no data/ILSVRC2012_validation_ground_truth.txt")
    try:
        synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
        leaves = [s for s in synsets if int(s["num_children"]) == 0]
        by_id = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}
        counts = {str(s["WNID"]): int(s["num_train_images"]) for s in leaves}
    except Exception as e:  # a malformed .mat can fail in many ways; all mean the same to the user
        raise StageError(f"{path.name}: unreadable data/meta.mat ({type(e).__name__}: {e})") from None
    try:
        val = [by_id[int(line)] for line in gt.decode().split()]
    except (ValueError, KeyError) as e:
        raise StageError(f"{path.name}: ground truth names an ILSVRC2012_ID that meta.mat lacks ({e})") from None
    return Devkit(sorted(counts), counts, val)


# --- image facts (run in worker processes) --------------------------------------------------------


def _inspect(paths: list[str]) -> list[tuple[int, int, str, str, bool]]:
    from PIL import Image

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                w, h, mode, fmt = im.width, im.height, im.mode, im.format or "?"
                # draft() decodes JPEGs at 1/8 scale: every byte of entropy data is still decoded.
                im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
                im.load()
            out.append((w, h, mode, fmt, True))
        except Exception:
            out.append((0, 0, "", "", False))
    return out


def _inspect_all(root: Path, index: _Index, workers: int, progress: Progress | None = None) -> dict[str, Any]:
    """Width, height, mode, format and decodability of each image of `index` (written under `root`), as
    columns (mode and format as codes into the lists "modes" and "formats"). At most 2 x workers chunks
    of paths are in flight."""
    import numpy as np

    n, chunk = len(index), 512
    cols = {"width": np.zeros(n, np.int64), "height": np.zeros(n, np.int64), "mode": np.zeros(n, np.uint16),
            "format": np.zeros(n, np.uint16), "decodable": np.zeros(n, bool), "modes": [], "formats": []}
    codes: dict[tuple[str, str], int] = {}
    base = str(root)

    def code(kind: str, name: str) -> int:
        c = codes.get((kind, name))
        if c is None:
            c = codes[kind, name] = len(cols[kind])
            cols[kind].append(name)
        return c

    def jobs():
        for lo in range(0, n, chunk):
            yield lo, index.paths(lo, min(n, lo + chunk), root=base)

    def take(lo: int, facts: list[tuple]) -> None:
        for i, (w, h, mode, fmt, ok) in enumerate(facts, lo):
            cols["width"][i], cols["height"][i], cols["decodable"][i] = w, h, ok
            cols["mode"][i], cols["format"][i] = code("modes", mode), code("formats", fmt)
        if progress:
            progress("decode", lo + len(facts), n)

    if workers <= 1 or n <= chunk:
        for lo, ps in jobs():
            take(lo, _inspect(ps))
        return cols
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        pending: collections.deque = collections.deque()
        for lo, ps in jobs():
            pending.append((lo, pool.submit(_inspect, ps)))
            if len(pending) >= 2 * workers:
                lo0, fut = pending.popleft()
                take(lo0, fut.result())
        while pending:
            lo0, fut = pending.popleft()
            take(lo0, fut.result())
    return cols


# --- expectations ---------------------------------------------------------------------------------


def _validate(df, devkit: Devkit) -> list[dict[str, Any]]:
    """Great Expectations suites over the manifest and its per-class counts; one dict per expectation."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    import pandas as pd
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = ctx.data_sources.add_pandas("rn50")
    E = gx.expectations
    n_train = sum(devkit.num_train_images.values())
    lo, hi = min(devkit.num_train_images.values()), max(devkit.num_train_images.values())
    val_expected = pd.Series(devkit.val_wnids).value_counts()

    def per_class(split: str, expected) -> "pd.DataFrame":
        got = df.wnid[df.split == split].value_counts()
        frame = pd.DataFrame({"wnid": devkit.wnids})
        frame["count"] = frame.wnid.map(got).fillna(0).astype(int)
        frame["expected"] = frame.wnid.map(expected).fillna(0).astype(int)
        return frame

    # GX fingerprints every batch it is given by hashing all of its rows, which turns each string column
    # into a Python object per row for the time of the hash (~450 B per row for `path`). So each batch
    # holds only the columns its expectations read: the two unique-per-image string columns alone,
    # the rest with the repeated strings as categoricals (hashed per category, not per row).
    rest = pd.DataFrame({"split": df.split.astype("category"), "wnid": df.wnid.astype("category"),
                         "label": df.label, "decodable": df.decodable, "bytes": df.bytes})
    batches = [  # (suite, frame, expectations), in the order the report lists them
        ("images", rest, [E.ExpectTableRowCountToEqual(value=n_train + len(devkit.val_wnids))]),
        ("images", df[["path"]], [E.ExpectColumnValuesToBeUnique(column="path")]),
        ("images", df[["md5"]], [E.ExpectColumnValuesToNotBeNull(column="md5")]),
        ("images", rest, [
            E.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "val"]),
            E.ExpectColumnValuesToBeInSet(column="wnid", value_set=devkit.wnids),
            E.ExpectColumnValuesToBeBetween(column="label", min_value=0, max_value=len(devkit.wnids) - 1),
            E.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True]),
            E.ExpectColumnValuesToBeBetween(column="bytes", min_value=1),
        ]),
        ("train_images", rest.loc[rest.split == "train", ["split"]], [E.ExpectTableRowCountToEqual(value=n_train)]),
        ("val_images", rest.loc[rest.split == "val", ["split"]],
         [E.ExpectTableRowCountToEqual(value=len(devkit.val_wnids))]),
        ("train_per_class", per_class("train", devkit.num_train_images), [
            E.ExpectTableRowCountToEqual(value=len(devkit.wnids)),
            E.ExpectColumnPairValuesToBeEqual(column_A="count", column_B="expected"),
            E.ExpectColumnValuesToBeBetween(column="count", min_value=lo, max_value=hi),
        ]),
        ("val_per_class", per_class("val", val_expected), [
            E.ExpectColumnPairValuesToBeEqual(column_A="count", column_B="expected"),
        ]),
    ]
    out = []
    for i, (name, frame, expectations) in enumerate(batches):
        asset = source.add_dataframe_asset(f"{name}-{i}")
        batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": frame})
        suite = gx.ExpectationSuite(f"{name}-{i}")
        for e in expectations:
            suite.add_expectation(e)
        for r in batch.validate(suite).results:
            cfg = r.expectation_config
            kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "value_set") or len(str(v)) < 200}
            if "batch_id" in kwargs:  # the suite's data, as one batch per suite was named
                kwargs["batch_id"] = f"rn50-{name}"
            res = r.result or {}
            out.append({"suite": name, "expectation": cfg.type, "kwargs": kwargs, "success": bool(r.success),
                        "observed": res.get("observed_value", res.get("unexpected_count")),
                        "examples": [str(x) for x in (res.get("partial_unexpected_list") or [])[:5]]})
    return out


def _table(index: _Index, label: dict[str, int], facts: dict[str, Any]):
    """The manifest (MANIFEST_COLUMNS: plain string, int64 and bool columns) as an Arrow table, built from
    the index's compact columns without a Python object per image: the strings live in Arrow buffers
    (~100 B per image in all), where a pandas object column costs ~80 B per string besides."""
    import binascii

    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(index)
    split = np.frombuffer(index.split, np.uint8).astype(np.int32)
    wnid = np.frombuffer(index.wnid, np.uint32).astype(np.int32)

    def strings(codes, names: list[str]):
        return pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()), pa.array(names, pa.string())).cast(pa.string())

    dirs = strings(split * len(index.wnids) + wnid,
                   [f"{index.prefix}/{s}/{w}/" for s in index.splits for w in index.wnids])
    name_offsets = np.zeros(n + 1, np.int64)
    name_offsets[1:] = np.frombuffer(index.name_ends, np.uint64)
    names = pa.LargeStringArray.from_buffers(n, pa.py_buffer(name_offsets), pa.py_buffer(index.names))
    hexed = binascii.hexlify(index.md5)
    md5 = pa.StringArray.from_buffers(n, pa.py_buffer(np.arange(0, 32 * (n + 1), 32, dtype=np.int32)),
                                      pa.py_buffer(hexed))
    columns = {
        "split": strings(split, index.splits), "wnid": strings(wnid, index.wnids),
        "label": pa.array(np.array([label.get(w, -1) for w in index.wnids], np.int64)[wnid]),
        "path": pc.binary_join_element_wise(dirs, names.cast(pa.string()), ""),
        "bytes": pa.array(np.frombuffer(index.bytes, np.int64)), "md5": md5,
        "width": pa.array(facts["width"]), "height": pa.array(facts["height"]),
        "mode": strings(facts["mode"].astype(np.int32), facts["modes"]),
        "format": strings(facts["format"].astype(np.int32), facts["formats"]),
        "decodable": pa.array(facts["decodable"]),
    }
    table = pa.table({c: columns[c] for c in MANIFEST_COLUMNS})
    # The pandas metadata DataFrame.to_parquet would have written for this frame (object string columns,
    # no index), so readers get the same frame as before.
    meta = pa.Schema.from_pandas(table.slice(0, 1).to_pandas(), preserve_index=False).metadata
    return table.replace_schema_metadata(meta)


def _report(wd: Workdir, r: dict[str, Any]) -> Path:
    lines = ["# Data verification report", "",
             f"- classes: {r['classes']}, train images: {r['train_images']:,}, val images: {r['val_images']:,}",
             f"- bytes: {r['bytes']:,}, manifest digest: `{r['manifest_digest'][:16]}`", "",
             "| suite | expectation | observed | result |", "|---|---|---|---|"]
    for e in r["expectations"]:
        lines.append(f"| {e['suite']} | {e['expectation']} | {e['observed']} | {'pass' if e['success'] else '**FAIL** ' + ', '.join(e['examples'])} |")
    lines += ["", "## Quirks (reported, not failed on)", ""]
    for kind, paths in r["quirks"].items():
        lines.append(f"- {kind}: {len(paths)}" + (": " + ", ".join(f"`{p}`" for p in paths[:20]) if paths else ""))
    write_json_atomic(wd.reports / "verify.json", r)
    return write_text_atomic(wd.reports / "verify.md", "\n".join(lines) + "\n")


def archives_digest(wd: Workdir) -> str:
    """Digest of the three verified archives, from the fetch stage's records (no re-hash)."""
    md5 = {}
    for name in ARCHIVES:
        record = read_fetch_record(wd.raw, name)
        if not record or "md5" not in record:
            raise StageError(f"{wd.raw / name} has not been fetched and verified; run `rn50 fetch` first")
        md5[name] = record["md5"]
    return digest_of(md5)


def verify(workdir: Path | str, workers: int | None = None, progress: Progress | None = None) -> VerifyResult:
    t0 = time.perf_counter()
    wd = Workdir(workdir)
    key = archives_digest(wd)
    if stamp_valid(wd, "verify", key):
        stamp = read_stamp(wd, "verify")
        return VerifyResult(**{**stamp["result"], "reused": True, "seconds": round(time.perf_counter() - t0, 2)})

    import pandas as pd
    import pyarrow.parquet as pq

    phases: dict[str, float] = {}
    t = time.perf_counter()
    devkit = read_devkit(wd.raw / DEVKIT_TGZ)
    partial = wd.root / "extracted.partial"
    shutil.rmtree(partial, ignore_errors=True)
    index = _Index(partial, wd.root)
    try:
        # Caps (tasks.ilsvrc): each archive's size; per member, a class tar or an image; inner class tars
        # are streamed from the outer one, never held in memory.
        try:
            with _open_archive(wd.raw / TRAIN_TAR) as f:
                for inner, tar in _members(TRAIN_TAR, f, CLASS_TAR_CAP, "one class tar", ARCHIVE_CAP[TRAIN_TAR]):
                    wnid = inner.name.rsplit("/", 1)[-1].removesuffix(".tar")
                    if not inner.name.endswith(".tar") or wnid in ("", ".", ".."):
                        raise StageError(f"{TRAIN_TAR}: unexpected member {inner.name!r} (expected <wnid>.tar)")
                    label = f"{TRAIN_TAR}/{inner.name}"
                    for m, itar in _members(label, tar.window(inner), IMAGE_CAP, "one image", inner.size):
                        index.store(posixpath.basename(m.name), itar.data(m), "train", wnid)
                    if progress:
                        progress("train", len(index), sum(devkit.num_train_images.values()))
            n_train = len(index)
            with _open_archive(wd.raw / VAL_TAR) as f:
                for m, tar in _members(VAL_TAR, f, IMAGE_CAP, "one image", ARCHIVE_CAP[VAL_TAR]):
                    match = VAL_NAME.search(m.name)
                    if not match or "/" in m.name:
                        raise StageError(f"{VAL_TAR}: unexpected member {m.name!r} (expected ILSVRC2012_val_NNNNNNNN.JPEG)")
                    number = int(match.group(1))
                    if not 1 <= number <= len(devkit.val_wnids):
                        raise StageError(f"{VAL_TAR}: {m.name} has no line in the devkit's ground truth "
                                         f"({len(devkit.val_wnids)} lines)")
                    index.store(m.name, tar.data(m), "val", devkit.val_wnids[number - 1])
                    if progress and (len(index) - n_train) % 1000 == 0:
                        progress("val", len(index) - n_train, len(devkit.val_wnids))
        finally:
            index.finish()
        if progress:
            progress("val", len(index) - n_train, len(devkit.val_wnids))
        if not len(index):
            raise StageError("the archives hold no images")
        phases["extract"] = time.perf_counter() - t

        t = time.perf_counter()
        facts = _inspect_all(partial, index, workers or os.cpu_count() or 1, progress)
        phases["decode_check"] = time.perf_counter() - t
        t = time.perf_counter()
        label = {w: i for i, w in enumerate(devkit.wnids)}
        table = _table(index, label, facts)
        del index, facts
        df = table.to_pandas(types_mapper=pd.ArrowDtype)  # the Arrow buffers, not copied
        expectations = _validate(df, devkit)
        quirks = {
            "png_as_jpeg": df.path[(df.format == "PNG")].tolist(),
            "cmyk": df.path[df["mode"] == "CMYK"].tolist(),
            "grayscale": df.path[df["mode"] == "L"].tolist(),
            "undecodable": df.path[~df.decodable].tolist(),
        }
        result = {
            "workdir": str(wd.root), "manifest": str(wd.manifest), "manifest_digest": manifest_digest(df),
            "archives_digest": key, "classes": len(devkit.wnids), "train_images": int((df.split == "train").sum()),
            "val_images": int((df.split == "val").sum()), "bytes": int(df.bytes.sum()), "quirks": quirks,
            "expectations": expectations, "report": str(wd.reports / "verify.md"), "reused": False,
        }
        _report(wd, {**result, "seconds": round(time.perf_counter() - t0, 2)})
        failed = [e for e in expectations if not e["success"]]
        if failed:
            raise StageError(f"{len(failed)} of {len(expectations)} data expectations failed: "
                             + "; ".join(f"{e['suite']}.{e['expectation']} (observed {e['observed']})" for e in failed[:4])
                             + f" — see {wd.reports / 'verify.md'}")
        phases["validate"] = time.perf_counter() - t
        t = time.perf_counter()
        with atomic_path(wd.manifest) as tmp:
            pq.write_table(table, tmp)
        shutil.rmtree(wd.extracted, ignore_errors=True)
        os.replace(partial, wd.extracted)
        phases["commit"] = time.perf_counter() - t
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["phases"] = {k: round(v, 3) for k, v in phases.items()}
    write_stamp(wd, "verify", key, result, [wd.manifest, wd.extracted])
    return VerifyResult(**result)


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="extract the archives safely, build manifest.parquet and validate it",
                       description="Extract the fetched archives of WORKDIR/raw into WORKDIR/extracted with every size "
                                   "bounded, index every image into WORKDIR/manifest.parquet and hold it to the devkit "
                                   "(classes, per-class counts, val labels). Reports go to WORKDIR/reports/verify.*; "
                                   "nothing is left as verified unless every check passed.")
    p.add_argument("workdir", type=Path, help="work directory that rn50 fetch filled")
    p.add_argument("--workers", type=int, default=None, help="processes for decoding checks (default: all cores)")
    p.set_defaults(run=_cli)


def _cli(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def progress(split: str, done: int, total: int | None) -> None:
        bar = bars.get(split) or bars.setdefault(split, tqdm(desc=f"extract {split}", total=total, unit="img", disable=None))
        bar.update(done - bar.n)

    try:
        r = verify(args.workdir, args.workers, progress)
    finally:
        for bar in bars.values():
            bar.close()
    passed = sum(e["success"] for e in r.expectations)
    print(f"{r.classes} classes, {r.train_images:,} train + {r.val_images:,} val images: "
          f"{passed}/{len(r.expectations)} expectations passed{' (already verified)' if r.reused else ''}")
    print("quirks: " + ", ".join(f"{k} {len(v)}" for k, v in r.quirks.items()))
    print(f"manifest: {r.manifest}\nreport:   {r.report}")
    return 0
