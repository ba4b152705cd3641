"""MXNet RecordIO as im2rec writes it: the record format (dmlc framing + MXNet's IRHeader) and im2rec's
.lst list files.

- Records: `encode_record` is dmlc's RecordIOWriter::WriteRecord (including its escaping of the magic word
  inside payloads), `read_record` its reader; `REC_HEAD` packs a whole pass-through record header.
- Lists: `make_list` is `im2rec.py --list --recursive` run in-process from the mxnet wheel's own file
  (same walk order, extension filter, seed-100 shuffle and line format); `read_lst`/`write_lst` read and
  write its `index<TAB>label<TAB>path` lines (`read_lst_columns`: the same, as compact columns).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import struct
import types
from pathlib import Path

from tasks.common import StageError

MAGIC = 0xCED7230A  # dmlc::RecordIOWriter::kMagic
MAGIC_BYTES = struct.pack("<I", MAGIC)
LEN_MASK = (1 << 29) - 1  # the low 29 bits of a part header hold its length; the top 3 its cflag
REC_HEAD = struct.Struct("<IIIfQQ")  # dmlc header (magic, cflag<<29|len) + mxnet IRHeader (flag, label, id, id2)
IR_SIZE = 24  # mxnet's IRHeader
IM2REC_EXTS = [".jpeg", ".jpg", ".png"]  # im2rec.py's default --exts

# --- records --------------------------------------------------------------------------------------


def pad4(n: int) -> int:
    return (n + 3) & ~3


def record_size(image_bytes: int) -> int:
    """Bytes a pass-through record of an image takes when its payload holds no magic word."""
    return 8 + pad4(IR_SIZE + image_bytes)


def encode_record(payload: bytes) -> bytes:
    """dmlc RecordIOWriter::WriteRecord: a 4-byte-aligned magic word inside the payload splits the
    record into parts (cflag 1 = first, 2 = middle, 3 = last) and is dropped; readers put it back."""
    import numpy as np

    n = len(payload)
    words = np.frombuffer(payload, dtype="<u4", count=n // 4)
    hits = (np.flatnonzero(words == MAGIC) * 4).tolist()
    out, dptr = [], 0
    for i in hits:
        out += [struct.pack("<II", MAGIC, ((1 if dptr == 0 else 2) << 29) | (i - dptr)), payload[dptr:i]]
        dptr = i + 4
    out += [struct.pack("<II", MAGIC, ((3 if dptr else 0) << 29) | (n - dptr)), payload[dptr:],
            b"\0" * (pad4(n) - n)]
    return b"".join(out)


def read_record(fd: int, offset: int) -> tuple[bytes, int]:
    """The payload of the record at `offset` (parts joined as dmlc's reader does) and where it ends."""
    parts, pos = [], offset
    while True:
        head = os.pread(fd, 8, pos)
        if len(head) != 8:
            raise ValueError(f"truncated record header at byte {pos}")
        magic, lrec = struct.unpack("<II", head)
        cflag, n = lrec >> 29, lrec & LEN_MASK
        if magic != MAGIC or cflag not in ((0, 1) if not parts else (2, 3)):
            raise ValueError(f"no record {'header' if not parts else 'continuation'} at byte {pos}")
        data = os.pread(fd, n, pos + 8)
        if len(data) != n:
            raise ValueError(f"truncated record at byte {pos}")
        parts.append(data)
        pos += 8 + pad4(n)
        if cflag in (0, 3):
            return MAGIC_BYTES.join(parts), pos


# --- im2rec's lists -------------------------------------------------------------------------------


def im2rec_path() -> Path:
    """tools/im2rec.py of the installed mxnet wheel."""
    spec = importlib.util.find_spec("mxnet")
    if spec is None or not spec.submodule_search_locations:
        raise StageError("mxnet is not installed: the pack stage needs its tools/im2rec.py")
    path = Path(list(spec.submodule_search_locations)[0]) / "tools" / "im2rec.py"
    if not path.is_file():
        raise StageError(f"{path} is missing from the mxnet wheel")
    return path


def _os_for_listing() -> types.ModuleType:
    """The os module for im2rec's listing, but for os.path.relpath. list_image calls relpath(file, root) once
    per file, on a path os.walk built under root: ~40% of the listing's time (~6 us a call). When root is an
    absolute, normalised path and the file is root + "/" + a remainder with no empty, "." or ".." part,
    relpath is exactly that remainder; every other case goes to the real relpath."""
    normal: dict[str, bool] = {}

    def relpath(path, start=os.curdir):
        if type(path) is str and type(start) is str:
            ok = normal.get(start)
            if ok is None:
                ok = normal[start] = start != "/" and os.path.isabs(start) and os.path.normpath(start) == start
            if ok and path.startswith(start) and path[len(start):len(start) + 1] == "/":
                rest = path[len(start) + 1:]
                if rest and not rest.endswith("/") and "//" not in rest and "/." not in "/" + rest:
                    return rest
        return os.path.relpath(path, start)

    fast_path = types.ModuleType("os.path")
    fast_path.__getattr__ = lambda name: getattr(os.path, name)
    fast_path.relpath = relpath
    fast_os = types.ModuleType("os")
    fast_os.__getattr__ = lambda name: getattr(os, name)
    fast_os.path = fast_path
    return fast_os


def _load_im2rec():
    """im2rec.py from the wheel as a module, without importing mxnet or cv2 (its list code uses neither).

    Its imports of mxnet, cv2 and sys resolve to stand-ins (no 3 s of imports, no edit of the real
    sys.path), its os to one whose path.relpath is quicker on the paths it lists (_os_for_listing), and it
    gets a private Random (its `random.seed(100)` must not reseed the caller's) and a
    private `print` (it prints the folder->label map to stdout). Nothing global is touched, so this is
    safe in a threaded Prefect worker."""
    import builtins
    import random

    path = im2rec_path()
    stand_ins = {"mxnet": types.ModuleType("mxnet"), "cv2": types.ModuleType("cv2"),
                 "sys": types.SimpleNamespace(path=[], argv=[str(path)]), "os": _os_for_listing()}

    def _import(name, globals=None, locals=None, fromlist=(), level=0):
        return stand_ins.get(name) or builtins.__import__(name, globals, locals, fromlist, level)

    mod = types.ModuleType("rn50_im2rec")
    mod.__file__ = str(path)
    mod.__builtins__ = {**vars(builtins), "__import__": _import}
    exec(compile(path.read_text(), str(path), "exec"), mod.__dict__)
    mod.random = random.Random()
    mod.folder_labels = []
    mod.print = lambda *a, **k: mod.folder_labels.append(a)
    return mod


def make_list(root: Path, prefix: Path) -> Path:
    """`im2rec.py --list --recursive PREFIX ROOT` (shuffled, seed 100), in-process. Returns PREFIX.lst."""
    im2rec = _load_im2rec()
    # An absolute root: the listed paths are relative to it either way, and relpath is quick on these.
    args = argparse.Namespace(root=os.path.abspath(root), prefix=str(prefix), recursive=True, exts=IM2REC_EXTS,
                              shuffle=True, chunks=1, train_ratio=1.0, test_ratio=0.0)
    im2rec.make_list(args)
    return Path(f"{prefix}.lst")


def read_lst(path: Path) -> list[tuple[int, float, str]]:
    """(index, label, path relative to the list's root) per line of an im2rec .lst."""
    items = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3:
                raise StageError(f"{path}:{n}: expected 'index<TAB>label<TAB>path', got {line.strip()!r}")
            items.append((int(parts[0]), float(parts[1]), parts[2]))
    return items


def read_lst_columns(path: Path, chunk: int = 1 << 16):
    """read_lst's lines as three columns: index (int64 numpy), label (float64 numpy), path (pyarrow string
    array). Same parsing and errors; no Python object is kept per line (a tuple per line of a 1.28 M-line
    list costs ~200 bytes, these columns ~60)."""
    from array import array

    import numpy as np
    import pyarrow as pa

    keys, labels, chunks, paths = array("q"), array("d"), [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3:
                raise StageError(f"{path}:{n}: expected 'index<TAB>label<TAB>path', got {line.strip()!r}")
            try:
                keys.append(int(parts[0]))
                labels.append(float(parts[1]))
            except (ValueError, OverflowError):
                raise StageError(f"{path}:{n}: index or label is not a number: {line.strip()!r}") from None
            paths.append(parts[2])
            if len(paths) == chunk:
                chunks.append(pa.array(paths, pa.string()))
                paths = []
    chunks.append(pa.array(paths, pa.string()))
    return (np.frombuffer(keys, dtype=np.int64), np.frombuffer(labels, dtype=np.float64),
            pa.chunked_array(chunks, pa.string()).combine_chunks())


def write_lst(path: Path, items) -> None:
    """Lines in the format of im2rec.py's write_list (labels printed with %f), from (index, label, path) rows."""
    with open(path, "w") as f:
        f.writelines(f"{k}\t{label:f}\t{p}\n" for k, label, p in items)
