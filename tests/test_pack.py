"""The pack stage against the real im2rec.py, MXNet and DALI readers, real SIGKILLs, a real tmpfs, a real
file-size limit and a root process without its DAC capabilities. Trees are tiny and built with PIL; one
end-to-end test goes through `rn50 synth` -> `fetch --md5` -> `verify` -> `pack`."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers import missing
from tasks.common import StageError, Workdir, read_stamp, stamp_valid
from tasks.ilsvrc import manifest_digest
from tasks.pack import Listing, manifest_table_digest, pack, pack_key, read_manifest_table, verify_split
from tasks.recordio import MAGIC_BYTES, encode_record, im2rec_path, make_list, read_lst, read_record

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
OUTPUTS = [f"{s}.{e}" for s in ("train", "val") for e in ("lst", "idx", "rec")]


# --- building trees -------------------------------------------------------------------------------


def _jpeg(rng: np.random.Generator, mode: str = "RGB", size: int | None = None, magic: bool = False) -> bytes:
    size = size or int(rng.integers(24, 64))
    img = Image.fromarray((rng.random((size, size + 5, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    if mode == "PNG":
        img.save(buf, "PNG")
        return buf.getvalue()
    img.convert(mode).save(buf, "JPEG", quality=85)
    data = buf.getvalue()
    if magic:
        # A COM segment right after SOI whose text holds the RecordIO magic word at image offsets 8 and 12
        # (4-byte aligned in the record payload, after the 24-byte IRHeader) and 17 (not aligned).
        text = b"xx" + MAGIC_BYTES + MAGIC_BYTES + b"y" + MAGIC_BYTES + b"zzz"
        data = data[:2] + b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text + data[2:]
    return data


def make_workdir(root: Path, classes: int = 3, train: int = 12, val: int = 4, seed: int = 0,
                 val_skip: set[int] = frozenset(), size: int | None = None) -> Workdir:
    """extracted/{train,val}/<wnid>/*.JPEG and a manifest.parquet as `rn50 verify` writes them, with the quirks
    (PNG saved as .JPEG, CMYK, grayscale) and one JPEG holding the RecordIO magic word."""
    rng = np.random.default_rng(seed)
    wd = Workdir(root)
    wnids = sorted(f"n{int(x):08d}" for x in rng.choice(10**8, classes, replace=False))
    rows = []
    for split, per_class in (("train", train), ("val", val)):
        for c, w in enumerate(wnids):
            if split == "val" and c in val_skip:
                continue
            d = wd.extracted / split / w
            d.mkdir(parents=True)
            for i in range(per_class):
                kind = {(0, 0): "PNG", (0, 1): "CMYK", (1, 0): "L", (1, 1): "magic"}.get((c, i), "RGB")
                if split == "val":
                    kind = {0: "CMYK", 1: "L"}.get(i, "RGB") if c == classes - 1 else "RGB"
                data = _jpeg(rng, "RGB" if kind == "magic" else kind, size, magic=kind == "magic")
                name = f"{w}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{c * 1000 + i + 1:08d}.JPEG"
                (d / name).write_bytes(data)
                im = Image.open(io.BytesIO(data))
                rows.append({"split": split, "wnid": w, "label": c, "path": f"extracted/{split}/{w}/{name}",
                             "bytes": len(data), "md5": hashlib.md5(data).hexdigest(), "width": im.width,
                             "height": im.height, "mode": im.mode, "format": im.format, "decodable": True})
    pd.DataFrame(rows).to_parquet(wd.manifest, index=False)
    return wd


def manifest(wd: Workdir) -> pd.DataFrame:
    return pd.read_parquet(wd.manifest)


def im2rec_reference(wd: Workdir, split: str, lst: Path, out: Path) -> Path:
    """The real im2rec.py --pass-through on `lst` (copied to out/): returns the prefix of its .rec/.idx."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(lst, out / f"{split}.lst")
    subprocess.run([PY, str(im2rec_path()), "--pass-through", "--num-thread", "2", str(out / split),
                    str(wd.extracted / split)], check=True, capture_output=True)
    return out / split


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "tasks.cli", "pack", *args], cwd=REPO, capture_output=True, text=True, **kw)


def assert_nothing_written(wd: Workdir) -> None:
    left = sorted(p.name for p in wd.recordio.iterdir() if p.name != ".pack.lock") if wd.recordio.exists() else []
    assert left == [], f"half-written output kept: {left}"
    assert read_stamp(wd, "pack") is None


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("rn50 pack: error: "), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> tuple[Workdir, object]:
    wd = make_workdir(tmp_path_factory.mktemp("packed"))
    return wd, pack(wd, full_check=True)


# --- format and list fidelity ---------------------------------------------------------------------


def test_encode_record_matches_mxnet_writer_and_reader(tmp_path):
    import mxnet as mx

    payloads = [b"", b"a", b"abcd", MAGIC_BYTES, b"x" * 7 + MAGIC_BYTES, MAGIC_BYTES * 3 + b"tail",
                b"1234" + MAGIC_BYTES + b"5" + MAGIC_BYTES + b"67" + MAGIC_BYTES * 2, os.urandom(1001)]
    w = mx.recordio.MXRecordIO(str(tmp_path / "mx.rec"), "w")
    for p in payloads:
        w.write(p)
    w.close()
    ours = b"".join(encode_record(p) for p in payloads)
    assert (tmp_path / "mx.rec").read_bytes() == ours
    fd, pos = os.open(tmp_path / "mx.rec", os.O_RDONLY), 0
    try:
        for p in payloads:
            got, pos = read_record(fd, pos)
            assert got == p
        assert pos == len(ours)
    finally:
        os.close(fd)


def test_list_is_im2rec_list_byte_for_byte(tmp_path):
    wd = make_workdir(tmp_path / "wd", classes=4, train=9)
    ours = make_list(wd.extracted / "train", tmp_path / "ours")
    subprocess.run([PY, str(im2rec_path()), "--list", "--recursive", str(tmp_path / "ref"),
                    str(wd.extracted / "train")], check=True, capture_output=True)
    assert ours.read_bytes() == (tmp_path / "ref.lst").read_bytes()
    assert [k for k, _, _ in read_lst(ours)] != sorted(k for k, _, _ in read_lst(ours)), "not shuffled"
    state, path, modules = random.getstate(), list(sys.path), set(sys.modules)
    make_list(wd.extracted / "train", tmp_path / "again")
    assert random.getstate() == state, "im2rec's seed(100) leaked into the global random"
    assert sys.path == path and set(sys.modules) <= modules | {"rn50_im2rec"}, "listing touched global state"


@pytest.mark.parametrize("relative", [False, True])
def test_list_of_odd_names_is_im2rec_list(tmp_path, monkeypatch, relative):
    """make_list gives im2rec's own listing a quicker os.path.relpath; on names where the quick way does not
    apply (dot files, "..", spaces, non-ASCII, a relative root) it must still give im2rec's bytes."""
    root = tmp_path / "tree"
    names = {"n01": ["a.JPEG", ".hidden.jpg", "x..y.png", "sp ace.jpeg", "é.JPG", "notes.txt"],
             "n02.d": ["..z.jpg", "b.JPEG"], ".n03": ["c.png"], "n04 x": ["d.jpeg"]}
    for d, files in names.items():
        (root / d).mkdir(parents=True)
        for f in files:
            (root / d / f).write_bytes(b"\xff\xd8\xff")
    (root / "n01" / "sub").mkdir()
    (root / "n01" / "sub" / "deep.jpg").write_bytes(b"\xff\xd8\xff")
    monkeypatch.chdir(tmp_path)
    where = Path("tree") if relative else root
    ours = make_list(where, tmp_path / "ours")
    subprocess.run([PY, str(im2rec_path()), "--list", "--recursive", str(tmp_path / "ref"), str(where)],
                   check=True, capture_output=True)
    assert ours.read_bytes() == (tmp_path / "ref.lst").read_bytes()
    assert len(read_lst(ours)) == 10


@pytest.mark.parametrize("writer,threads", [("fast", 1), ("fast", 3), ("im2rec", 2)])
def test_outputs_are_what_im2rec_writes(tmp_path, packed, writer, threads):
    wd0, r0 = packed
    wd = Workdir(tmp_path / "wd")
    shutil.copytree(wd0.extracted, wd.extracted)
    shutil.copy(wd0.manifest, wd.manifest)
    r = pack(wd, threads=threads, writer=writer)
    assert r.key == r0.key and r.content_digest == r0.content_digest
    assert r.splits["train"].escaped_records == 1  # the JPEG holding the magic word
    for s in ("train", "val"):
        ref = im2rec_reference(wd, s, wd.recordio / f"{s}.lst", tmp_path / "ref")
        for ext in ("lst", "idx", "rec"):
            assert (wd.recordio / f"{s}.{ext}").read_bytes() == Path(f"{ref}.{ext}").read_bytes(), (s, ext)


def test_result_report_stamp_and_quirks(packed):
    wd, r = packed
    df = manifest(wd)
    assert not r.cached and r.full_check
    for s in ("train", "val"):
        assert r.splits[s].records == (df.split == s).sum() == r.splits[s].checked_records
        assert r.splits[s].image_bytes == df[df.split == s].bytes.sum()
        assert r.splits[s].rec_bytes == (wd.recordio / f"{s}.rec").stat().st_size
        assert len((wd.recordio / f"{s}.lst").read_text().splitlines()) == r.splits[s].records
    quirky = df[(df.format != "JPEG") | (df["mode"] != "RGB")]
    assert sorted(q["path"] for q in r.quirks) == sorted(quirky.path)
    assert {(q["format"], q["mode"]) for q in r.quirks} == {("PNG", "RGB"), ("JPEG", "CMYK"), ("JPEG", "L")}
    md = Path(r.report_md).read_text()
    assert all(q["path"] in md for q in r.quirks) and "Quirk files (5)" in md
    assert json.loads(Path(r.report_json).read_text())["content_digest"] == r.content_digest
    assert stamp_valid(wd, "pack", r.key)
    assert sorted(Path(p).name for p in r.outputs) == sorted(OUTPUTS)
    assert r.manifest_digest == manifest_digest(df) and r.key == pack_key(r.manifest_digest)


def test_progress_counts_every_record_once(tmp_path):
    wd = make_workdir(tmp_path, classes=3, train=30, val=4)
    calls = []
    r = pack(wd, threads=3, progress=lambda done, total: calls.append((done, total)))  # val: 1 batch, 3 workers
    total = r.splits["train"].records + r.splits["val"].records
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert [d for d, _ in calls].count(0) == 1, "progress(0, total) means: listed, nothing read yet; only once"
    assert len(set(calls)) == len(calls), f"a call without progress: {calls}"
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))


def test_labels_follow_manifest_when_val_lacks_a_class(tmp_path):
    wd = make_workdir(tmp_path, classes=4, val_skip={1})
    r = pack(wd)
    df = manifest(wd).set_index("path")
    assert r.splits["val"].relabelled > 0 and r.splits["train"].relabelled == 0
    for s in ("train", "val"):
        for k, label, rel in read_lst(wd.recordio / f"{s}.lst"):
            assert label == df.loc[f"extracted/{s}/{rel}", "label"]
    import mxnet as mx
    rec = mx.recordio.MXIndexedRecordIO(str(wd.recordio / "val.idx"), str(wd.recordio / "val.rec"), "r")
    for k, label, rel in read_lst(wd.recordio / "val.lst"):
        header, img = mx.recordio.unpack(rec.read_idx(k))
        assert header.label == label and img == (wd.extracted / "val" / rel).read_bytes()


# --- readers --------------------------------------------------------------------------------------


def test_mxnet_reads_every_record(packed):
    import mxnet as mx

    wd, _ = packed
    df = manifest(wd)
    for s in ("train", "val"):
        rec = mx.recordio.MXIndexedRecordIO(str(wd.recordio / f"{s}.idx"), str(wd.recordio / f"{s}.rec"), "r")
        got = {}
        for k, label, rel in read_lst(wd.recordio / f"{s}.lst"):
            header, img = mx.recordio.unpack(rec.read_idx(k))
            assert header.id == k and header.label == label
            assert img == (wd.extracted / s / rel).read_bytes()
            got[f"extracted/{s}/{rel}"] = label
        assert got == dict(zip(df[df.split == s].path, df[df.split == s].label.astype(float)))
        n = len(got)
        it = mx.io.ImageRecordIter(path_imgrec=str(wd.recordio / f"{s}.rec"), path_imgidx=str(wd.recordio / f"{s}.idx"),
                                   data_shape=(3, 16, 16), resize=20, batch_size=n, preprocess_threads=1,
                                   round_batch=False)
        batch = next(iter(it))
        labels = batch.label[0].asnumpy()[: n - batch.pad]
        assert batch.data[0].shape == (n, 3, 16, 16) and batch.pad == 0
        assert sorted(labels.tolist()) == sorted(df[df.split == s].label.astype(float).tolist())


def test_dali_reads_every_record_on_cpu(packed):
    from nvidia.dali import fn, pipeline_def, types

    wd, _ = packed
    df = manifest(wd)
    for s in ("train", "val"):
        n = int((df.split == s).sum())

        @pipeline_def(batch_size=n, num_threads=1, device_id=None)
        def pipe():
            jpegs, labels = fn.readers.mxnet(path=[str(wd.recordio / f"{s}.rec")],
                                             index_path=[str(wd.recordio / f"{s}.idx")],
                                             shard_id=0, num_shards=1, random_shuffle=False, name="r")
            images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
            return fn.resize(images, resize_x=16, resize_y=16), labels

        p = pipe()
        p.build()
        assert p.epoch_size("r") == n
        images, labels = p.run()
        assert images.as_array().shape == (n, 16, 16, 3)
        got = sorted(float(np.asarray(labels[i]).ravel()[0]) for i in range(n))
        assert got == sorted(df[df.split == s].label.astype(float).tolist())


# --- caching and restarts -------------------------------------------------------------------------


def test_rerun_is_cached_until_outputs_or_manifest_change(tmp_path):
    wd = make_workdir(tmp_path, classes=2, train=5, val=2)
    r1 = pack(wd)
    assert pack(wd).cached
    (wd.recordio / "val.idx").write_text((wd.recordio / "val.idx").read_text())  # rewritten: mtime changes
    r2 = pack(wd)
    assert not r2.cached and r2.content_digest == r1.content_digest
    df = manifest(wd)
    gone = df[df.split == "train"].iloc[0]
    (wd.root / gone.path).unlink()
    df.drop(index=gone.name).to_parquet(wd.manifest, index=False)
    r3 = pack(wd)
    assert not r3.cached and r3.key != r1.key and r3.splits["train"].records == r1.splits["train"].records - 1
    assert pack(wd, force=True).content_digest == r3.content_digest


def _no_process_mentions(text: str, within: float = 30.0) -> bool:
    """No live process has `text` in its command line (forked workers share the parent's) within `within`
    seconds. Workers get SIGKILL from the kernel the moment their parent dies, but on a loaded CI box
    their exit can take a while to be seen: the wait returns as soon as none is left."""
    deadline = time.monotonic() + within
    while True:
        alive = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    stat = (d / "stat").read_text()
                except OSError:
                    continue
                if text in cmd and stat.rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(d.name)
        if not alive:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                continue
    return out


def _wrote(pid: int) -> bool:
    """The process has written since it was forked (its own /proc/PID/io counter): so it is past the start of
    the worker, where it asks for the parent-death signal. A worker stopped before that could never get it."""
    try:
        io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    except (OSError, ValueError):
        return False
    return int(io.get("wchar", "0")) > 0


def _writing(proc: subprocess.Popen, wd: Workdir) -> bool:
    """The pack has forked its workers and every one of them is writing train.rec."""
    tmp = list(wd.recordio.glob(".tmp-pack-*/train.rec")) if wd.recordio.exists() else []
    workers = _children(proc.pid)
    return bool(tmp) and bool(workers) and all(_wrote(w) for w in workers)


def _kill9_with_workers_stopped(proc: subprocess.Popen) -> list[int]:
    """SIGSTOP the pack's forked workers, then SIGKILL the pack. A stopped worker can only go away through
    the parent-death SIGKILL the kernel sends it: without that it stays (stopped) however long the test
    waits, so the check does not depend on how fast a loaded box runs. Returns the workers' pids."""
    workers = _children(proc.pid)
    for w in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(w, signal.SIGSTOP)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return workers


def _reap(workers: list[int]) -> None:
    for w in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(w, signal.SIGKILL)


def test_kill9_mid_pack_then_rerun_completes(tmp_path):
    """A real SIGKILL of `rn50 pack` while it writes: nothing is accepted, the rerun repacks correctly."""
    wd = make_workdir(tmp_path, classes=4, train=500, val=20, size=110)  # ~45 MiB of noise JPEGs
    killed_mid_write = 0
    for attempt in range(6):
        proc = subprocess.Popen([PY, "-m", "tasks.cli", "pack", str(wd.root), "--force", "--threads", "1"],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120  # generous for a loaded box
        while proc.poll() is None and time.monotonic() < deadline:
            if _writing(proc, wd):
                break
            time.sleep(0.002)
        workers = []
        if proc.poll() is None:
            workers = _kill9_with_workers_stopped(proc)
            killed_mid_write += 1
        proc.wait()
        try:
            assert _no_process_mentions(str(wd.root)), "the killed pack's workers outlived it"
        finally:
            _reap(workers)
        assert read_stamp(wd, "pack") is None, "a killed pack left a stamp"
        assert not any((wd.recordio / o).exists() for o in OUTPUTS), "a killed pack left outputs in place"
        if killed_mid_write >= 2:
            break
    assert killed_mid_write >= 2, "never caught the pack mid-write"
    r = pack(wd, full_check=True)
    assert not r.cached and r.splits["train"].checked_records == r.splits["train"].records == 2000
    assert not list(wd.recordio.glob(".tmp-*")), "debris of the killed runs was not removed"
    ref = im2rec_reference(wd, "train", wd.recordio / "train.lst", tmp_path / "ref")
    assert (wd.recordio / "train.rec").read_bytes() == Path(f"{ref}.rec").read_bytes()


def _writes_to(pid: int, name: str) -> bool:
    """The process holds a file called `name` open for writing (pack's writers share the .rec's descriptor;
    the verification's workers are forked after the writer closed it)."""
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            if os.readlink(fd).endswith("/" + name):
                flags = (Path(f"/proc/{pid}/fdinfo") / fd.name).read_text().split("flags:")[1].split()[0]
                if int(flags, 8) & os.O_ACCMODE == os.O_WRONLY:
                    return True
    except (OSError, IndexError, ValueError):
        pass
    return False


def _written(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/io").read_text().split("wchar: ")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return 0


def test_a_writer_killed_mid_write_fails_pack_at_once_then_rerun_packs(tmp_path):
    """A real SIGKILL of one of two forked writers while it still has batches to write. Its successor waits
    on the ring for an offset that will never come: `rn50 pack` used to wait forever (with the stage lock's
    heartbeat keeping every other run out); now it fails at once with one line naming the worker, leaves no
    process and nothing accepted, and the rerun packs the bytes im2rec writes."""
    wd = make_workdir(tmp_path, classes=4, train=500, val=20, size=110)  # ~45 MiB: ~45 batches per writer
    train_bytes = int(manifest(wd).query("split == 'train'")["bytes"].sum())
    caught = None
    for attempt in range(6):
        proc = subprocess.Popen([PY, "-m", "tasks.cli", "pack", str(wd.root), "--force", "--threads", "2"],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        workers: list[int] = []
        try:
            deadline = time.monotonic() + 120  # generous for a loaded box
            while proc.poll() is None and time.monotonic() < deadline and not _writing(proc, wd):
                time.sleep(0.002)
            workers = _children(proc.pid)
            for w in workers:  # frozen while judged: a writer cannot finish between the check and the kill
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w, signal.SIGSTOP)
            victim = min(workers, key=_written, default=None)
            if (proc.poll() is None and len(workers) == 2 and all(_writes_to(w, "train.rec") for w in workers)
                    and _written(victim) < 0.4 * train_bytes):  # its share is half: batches are left
                os.kill(victim, signal.SIGKILL)
                t0 = time.monotonic()
                for w in workers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(w, signal.SIGCONT)
                try:
                    _, err = proc.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    pytest.fail("rn50 pack still runs 30 s after one of its writers was killed: it is wedged")
                caught = (time.monotonic() - t0, subprocess.CompletedProcess(proc.args, proc.returncode, "", err))
                break
            for w in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w, signal.SIGCONT)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            _reap(workers)
    assert caught, "never caught a writer with batches left"
    seconds, failed = caught
    assert_one_line_error(failed, "pack worker ", " of 2 died (signal 9) without reporting")
    assert seconds < 10, f"the failure took {seconds:.1f} s"
    assert _no_process_mentions(str(wd.root)), "a writer outlived the failed pack"
    assert read_stamp(wd, "pack") is None and not any((wd.recordio / o).exists() for o in OUTPUTS)
    again = cli(str(wd.root), "--threads", "2", "--full-check")
    assert again.returncode == 0, again.stderr
    assert not list(wd.recordio.glob(".tmp-*")), "debris of the failed run was not removed"
    ref = im2rec_reference(wd, "train", wd.recordio / "train.lst", tmp_path / "ref")
    assert (wd.recordio / "train.rec").read_bytes() == Path(f"{ref}.rec").read_bytes()


def test_kill9_during_repack_keeps_old_outputs_unaccepted(tmp_path):
    wd = make_workdir(tmp_path, classes=2, train=300, val=5, size=110)
    r = pack(wd)
    proc = subprocess.Popen([PY, "-m", "tasks.cli", "pack", str(wd.root), "--force", "--threads", "1"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120  # generous for a loaded box; the pack itself takes ~2 s idle
    while proc.poll() is None and not _writing(proc, wd):
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail("the repack never started writing within 120 s")
        time.sleep(0.005)
    assert proc.poll() is None, "the repack finished before it could be killed"
    workers = _kill9_with_workers_stopped(proc)
    try:
        assert _no_process_mentions(str(wd.root)), "the killed pack's workers outlived it"
    finally:
        _reap(workers)
    assert not stamp_valid(wd, "pack", r.key)
    assert pack(wd).cached is False


# --- bad input ------------------------------------------------------------------------------------


def test_no_manifest(tmp_path):
    proc = cli(str(tmp_path))
    assert_one_line_error(proc, "manifest.parquet does not exist", "rn50 verify")


@pytest.mark.parametrize("damage,needles", [
    ("duplicate", ["lists extracted/train/", "more than once", "rerun `rn50 verify`"]),
    ("null", ["column md5 has 1 missing value", "rerun `rn50 verify`"]),
    ("label", ["has label 0 but", "is class 1 of the sorted WNIDs", "rerun `rn50 verify`"]),
    ("split", ["unknown split(s) ['test']"]),
    ("path", ["is not extracted/val/<wnid>/<file>"]),
    ("column", ["lacks column(s) decodable"]),
])
def test_bad_manifest(tmp_path, damage, needles):
    wd = make_workdir(tmp_path, classes=2, train=3, val=2)
    df = manifest(wd)
    if damage == "duplicate":
        df = pd.concat([df, df[df.split == "train"].iloc[[1]]], ignore_index=True)
    elif damage == "null":
        df.loc[2, "md5"] = None
    elif damage == "label":
        df.loc[df.wnid == sorted(df.wnid)[-1], "label"] = 0
    elif damage == "split":
        df.loc[3, "split"] = "test"
    elif damage == "path":
        df.loc[df.split == "val", "path"] = df.loc[df.split == "val", "path"].str.replace("extracted/val/", "extracted/train/")
    elif damage == "column":
        df = df.drop(columns=["decodable"])
    df.to_parquet(wd.manifest, index=False)
    assert_one_line_error(cli(str(wd.root)), *needles)
    assert_nothing_written(wd)


@pytest.mark.parametrize("label_dtype", ["int64", "int32", "float64"])
def test_manifest_digest_is_ilsvrc_digest(tmp_path, label_dtype):
    """pack computes tasks.ilsvrc.manifest_digest from Arrow columns in chunks (the cache key that verify's
    digest must meet): the same value over several chunks, both splits, non-ASCII names, any row order, and
    label types Arrow writes as Python does (integers: Arrow builds the lines) or not (floats: Python does)."""
    rng = np.random.default_rng(1)
    n = 70_000  # more than two of manifest_table_digest's chunks
    wnids = [f"n{i:08d}" for i in range(7)]
    cls = rng.integers(0, 7, n)
    split = np.where(rng.random(n) < 0.1, "val", "train")
    names = [f"extracted/{s}/{wnids[c]}/{'é' if i % 9 == 0 else ''}img_{i}.JPEG" for i, (s, c) in enumerate(zip(split, cls))]
    df = pd.DataFrame({"split": split, "wnid": [wnids[c] for c in cls], "label": cls, "path": names,
                       "bytes": rng.integers(100, 10**6, n), "md5": [hashlib.md5(p.encode()).hexdigest() for p in names],
                       "width": 1, "height": 1, "mode": "RGB", "format": "JPEG", "decodable": True})
    df = df.sample(frac=1, random_state=3).astype({"label": label_dtype})  # float: Python's "3.0", not Arrow's "3"
    wd = Workdir(tmp_path)
    df.to_parquet(wd.manifest, index=False, row_group_size=20_000)
    assert manifest_table_digest(read_manifest_table(wd)) == manifest_digest(pd.read_parquet(wd.manifest))


def test_empty_class_folder(tmp_path):
    wd = make_workdir(tmp_path, classes=2, train=3, val=2)
    (wd.extracted / "train" / "n99999999").mkdir()
    assert_one_line_error(cli(str(wd.root)), "empty class folder", "n99999999")
    assert_nothing_written(wd)


def test_non_image_file_in_class_folder(tmp_path):
    wd = make_workdir(tmp_path, classes=2, train=3, val=2)
    cls = next((wd.extracted / "train").iterdir())
    (cls / "notes.txt").write_text("not an image\n")
    assert_one_line_error(cli(str(wd.root)), "non-image file", "notes.txt", "not in manifest.parquet")
    assert_nothing_written(wd)


def test_non_image_bytes_under_a_jpeg_name(tmp_path):
    wd = make_workdir(tmp_path, classes=2, train=3, val=2)
    victim = wd.root / manifest(wd).path.iloc[2]
    victim.write_bytes(b"<html>" + b"x" * (victim.stat().st_size - 6))  # same size, so only the content tells
    assert_one_line_error(cli(str(wd.root)), "is not a JPEG or PNG", victim.name)
    assert_nothing_written(wd)


def test_file_changed_since_verify(tmp_path):
    wd = make_workdir(tmp_path, classes=2, train=3, val=2)
    victim = wd.root / manifest(wd).path.iloc[1]
    victim.write_bytes(victim.read_bytes() + b"\0\0")
    assert_one_line_error(cli(str(wd.root)), "changed since verify", victim.name)
    assert_nothing_written(wd)


def test_unreadable_file(tmp_path):
    """root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (setpriv) is refused a mode-000 file like any user."""
    drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    if not shutil.which("setpriv") or subprocess.run([*drop, "true"], capture_output=True).returncode:
        missing("cannot drop capabilities with setpriv (util-linux) here")
    wd = make_workdir(tmp_path, classes=2, train=3, val=2)
    victim = wd.root / manifest(wd).path.iloc[4]
    victim.chmod(0)
    proc = subprocess.run([*drop, PY, "-m", "tasks.cli", "pack", str(wd.root)], cwd=REPO, capture_output=True,
                          text=True)
    assert_one_line_error(proc, "cannot read", victim.name, "Permission denied")
    assert_nothing_written(wd)


def test_file_vanished_between_list_and_pack(tmp_path):
    wd = make_workdir(tmp_path, classes=2, train=3, val=2)
    victim = wd.root / manifest(wd).path.iloc[3]

    def progress(done, total):  # called once with done=0 after listing, before any record is read
        if done == 0:
            victim.unlink()

    with pytest.raises(StageError, match=f"{victim.name} vanished after it was listed"):
        pack(wd, progress=progress)
    assert_nothing_written(wd)


def test_disk_full_on_a_small_tmpfs(tmp_path):
    wd = make_workdir(tmp_path, classes=3, train=40, val=4, size=100)
    wd.recordio.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(wd.recordio)],
                             capture_output=True)
    if mounted.returncode:
        missing(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        assert_one_line_error(cli(str(wd.root)), "no space left on device", "train.rec")
        assert_nothing_written(wd)
    finally:
        subprocess.run(["umount", str(wd.recordio)], check=True)


def test_failing_writer_file_size_limit(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse the writes (EFBIG; Python ignores SIGXFSZ)."""
    wd = make_workdir(tmp_path, classes=3, train=40, val=4, size=100)
    limit = 100_000
    proc = cli(str(wd.root), preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert_one_line_error(proc, "file size limit exceeded", "train.rec")
    assert_nothing_written(wd)
    proc = cli(str(wd.root), preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200)))
    assert_one_line_error(proc, "file size limit exceeded", "train.lst")  # im2rec's list writer fails first
    assert_nothing_written(wd)


def test_verification_catches_corruption(tmp_path, packed):
    """The checks themselves, on damaged copies of good outputs."""
    wd, _ = packed
    tmp = tmp_path / "t"
    shutil.copytree(wd.recordio, tmp)
    items = read_lst(tmp / "train.lst")
    df = manifest(wd).set_index("path")
    sizes = [int(df.loc[f"extracted/train/{p}", "bytes"]) for _, _, p in items]
    listing = Listing.of(items, sizes)
    n = len(items)
    every, none = np.ones(n, dtype=bool), np.zeros(n, dtype=bool)
    root = wd.extracted / "train"
    assert verify_split("train", tmp, root, listing, every, 2)[0] == n

    lines = (tmp / "train.idx").read_text().splitlines()
    k, off = lines[5].split("\t")
    (tmp / "train.idx").write_text("\n".join(lines[:5] + [f"{k}\t{int(off) + 4}"] + lines[6:]) + "\n")
    with pytest.raises(StageError, match="not at a record header|the next record starts at"):
        verify_split("train", tmp, root, listing, none, 2)
    (tmp / "train.idx").write_text("\n".join([f"{k}\t{int(off) + 4}"] + lines[1:]) + "\n")
    items0 = [(int(k), *items[0][1:])] + items[1:]
    with pytest.raises(StageError, match="not at a record header"):
        verify_split("train", tmp, root, Listing.of(items0, sizes), none, 1)
    (tmp / "train.idx").write_text("\n".join([f"{k}\t{off}"] + lines[1:]) + "\n")  # record 5's key at line 1
    with pytest.raises(StageError, match="idx line 1 has key"):
        verify_split("train", tmp, root, listing, none, 2)
    shutil.copy(wd.recordio / "train.idx", tmp / "train.idx")

    head = bytearray((tmp / "train.rec").read_bytes())
    # A header whose magic word (byte 0), part flag (top bits of byte 4's word), label (float32 at byte 12)
    # or id (u64 at byte 16) is wrong, all else intact.
    for at, error in ((0, "not at a record header"), (4, "not at a record header"), (12, "header says id"),
                      (16, "header says id")):
        data = bytearray(head)
        pos = int(lines[9].split("\t")[1]) + at
        data[pos:pos + 4] = struct.pack("<I", struct.unpack("<I", data[pos:pos + 4])[0] ^ 0x40000000)
        (tmp / "train.rec").write_bytes(data)
        with pytest.raises(StageError, match=error):
            verify_split("train", tmp, root, listing, none, 2)
    (tmp / "train.rec").write_bytes(head)
    wrong = list(sizes)
    wrong[11] -= 4  # the header's length is not the manifest's size of the file
    with pytest.raises(StageError, match="header says id"):
        verify_split("train", tmp, root, Listing.of(items, wrong), none, 2)
    (tmp / "train.rec").write_bytes(head[:-4])  # the last record cut short
    with pytest.raises(StageError, match="the next record starts at|beyond the end"):
        verify_split("train", tmp, root, listing, none, 2)

    data = bytearray(head)
    data[int(lines[7].split("\t")[1]) + 100] ^= 0xFF
    (tmp / "train.rec").write_bytes(data)
    sample = none.copy()
    sample[0] = True
    verify_split("train", tmp, root, listing, sample, 2)  # the sample misses record 7 ...
    with pytest.raises(StageError, match="image bytes differ"):  # ... the full check does not
        verify_split("train", tmp, root, listing, every, 2)

    (tmp / "train.idx").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(StageError, match="has 47 records but train.lst has 48 lines|records but train.lst has"):
        verify_split("train", tmp, root, listing, none, 2)


# --- end to end -----------------------------------------------------------------------------------


def test_synth_fetch_verify_pack_cli(tmp_path):
    src, wd = tmp_path / "src", tmp_path / "wd"
    for args in (["synth", str(src), "--classes", "4", "--train-per-class", "12", "--val-per-class", "3"],
                 ["fetch", str(src), str(wd), "--md5", str(src / "MD5SUMS")], ["verify", str(wd)]):
        subprocess.run([PY, "-m", "tasks.cli", *args], cwd=REPO, check=True, capture_output=True)
    proc = cli(str(wd), "--json", "--full-check")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    df = pd.read_parquet(wd / "manifest.parquet")
    assert {s: r["splits"][s]["records"] for s in ("train", "val")} == df.split.value_counts().to_dict()
    assert any(q["format"] == "PNG" for q in r["quirks"]) and any(q["mode"] == "CMYK" for q in r["quirks"])
    again = cli(str(wd))
    assert again.returncode == 0 and "complete and current" in again.stdout
    for s in ("train", "val"):
        ref = im2rec_reference(Workdir(wd), s, wd / "recordio" / f"{s}.lst", tmp_path / "ref")
        assert (wd / "recordio" / f"{s}.rec").read_bytes() == Path(f"{ref}.rec").read_bytes()
