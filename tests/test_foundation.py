"""synth -> fetch -> verify, through the real CLI, from a directory, a real HTTP server and a real S3 server."""
from __future__ import annotations

import collections
import gzip
import http.server
import io
import json
import os
import resource
import subprocess
import tarfile
import threading
from pathlib import Path

import pandas as pd
import pytest
import scipy.io

from conftest import RN50, SMALL, rn50
from helpers import rewrite_first_class_tar
from tasks.ilsvrc import DEVKIT_TGZ, OFFICIAL_MD5, TRAIN_TAR, VAL_TAR, read_md5sums, write_fetch_record


# --- synth ----------------------------------------------------------------------------------------


def test_synth_layout_ids_and_quirks(synth_source):
    with tarfile.open(synth_source / TRAIN_TAR) as outer:
        inner_names = outer.getnames()
        assert all(n.endswith(".tar") and "/" not in n for n in inner_names)
        assert len(inner_names) == SMALL["classes"]
        first = tarfile.open(fileobj=outer.extractfile(inner_names[0]))
        assert all(n.startswith(inner_names[0][:-4] + "_") and n.endswith(".JPEG") for n in first.getnames())
    with tarfile.open(synth_source / VAL_TAR) as val:
        names = val.getnames()
        assert names[0] == "ILSVRC2012_val_00000001.JPEG"
        assert len(names) == SMALL["classes"] * SMALL["val_per_class"]
    with tarfile.open(synth_source / DEVKIT_TGZ) as dk:
        meta = scipy.io.loadmat(io.BytesIO(dk.extractfile("ILSVRC2012_devkit_t12/data/meta.mat").read()),
                                squeeze_me=True)["synsets"]
        gt = dk.extractfile("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt").read().split()
    assert set(meta.dtype.names) >= {"ILSVRC2012_ID", "WNID", "num_children", "num_train_images", "words"}
    leaves = [s for s in meta if int(s["num_children"]) == 0]
    assert len(leaves) == SMALL["classes"] and len(meta) > len(leaves)  # inner synsets too, as in the real devkit
    by_id = sorted(leaves, key=lambda s: int(s["ILSVRC2012_ID"]))
    # The trap of the real devkit: ID order is not sorted-WNID order.
    assert [str(s["WNID"]) for s in by_id] != sorted(str(s["WNID"]) for s in leaves)
    assert len(gt) == len(names)
    v = SMALL["val_per_class"]  # one mislabelled val image: top-1 below 1.0, as the MLPerf checker requires
    assert sorted(collections.Counter(gt).values()) == [v - 1] + [v] * (SMALL["classes"] - 2) + [v + 1]
    md5 = read_md5sums(synth_source / "MD5SUMS")
    assert set(md5) == {TRAIN_TAR, VAL_TAR, DEVKIT_TGZ}


def test_synth_is_reproducible_and_cli_reports(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        out = rn50("synth", d, "--classes", 3, "--train-per-class", 4, "--val-per-class", 2, "--seed", 7, check=True)
        assert "wrote" in out.stdout and "MD5SUMS" in out.stdout
    assert (a / "MD5SUMS").read_text() == (b / "MD5SUMS").read_text()
    assert rn50("synth", tmp_path / "c", "--classes", 1).returncode != 0


# --- fetch + verify: the three sources ------------------------------------------------------------


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server that honours `Range: bytes=N-` and can cut the first response short."""

    cut_after: dict[str, int] = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            return self.send_error(404)
        data = path.read_bytes()
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        cut = self.cut_after.pop(path.name, None)
        self.wfile.write(body[:cut] if cut is not None else body)
        if cut is not None:
            self.close_connection = True


@pytest.fixture
def http_source(synth_source):
    handler = lambda *a, **kw: RangeHandler(*a, directory=str(synth_source), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    server.server_close()


def _fetch_verify(source: str, synth_source: Path, wd: Path, env: dict | None = None) -> None:
    out = rn50("fetch", source, wd, "--md5", synth_source / "MD5SUMS", env=env, check=True)
    assert out.stdout.count("ok, downloaded") == 3
    out = rn50("verify", wd, check=True)
    assert "expectations passed" in out.stdout
    df = pd.read_parquet(wd / "manifest.parquet")
    assert (df.split == "train").sum() > 0 and (df.split == "val").sum() == SMALL["classes"] * SMALL["val_per_class"]
    for rel in df.path.sample(10, random_state=0):
        assert (wd / rel).is_file()


def test_fetch_verify_from_directory(synth_source, tmp_path):
    _fetch_verify(str(synth_source), synth_source, tmp_path / "wd")
    again = rn50("fetch", synth_source, tmp_path / "wd", "--md5", synth_source / "MD5SUMS", check=True)
    assert again.stdout.count("reused (already verified)") == 3


def test_fetch_from_http_resumes_a_truncated_download(synth_source, http_source, tmp_path):
    wd = tmp_path / "wd"
    size = (synth_source / TRAIN_TAR).stat().st_size
    RangeHandler.cut_after[TRAIN_TAR] = size // 3
    first = rn50("fetch", http_source, wd, "--md5", synth_source / "MD5SUMS")
    assert first.returncode == 2
    assert first.stderr.strip().count("\n") == 0 and "truncated" in first.stderr
    assert not (wd / "raw" / TRAIN_TAR).exists()          # never visible under its final name
    partial = wd / "raw" / ".partial" / f"{TRAIN_TAR}.part"
    assert partial.stat().st_size == size // 3
    _fetch_verify(http_source, synth_source, wd)           # resumes with a Range request


def test_fetch_verify_from_real_s3(synth_source, tmp_path):
    from s3_server import SeaweedS3

    with SeaweedS3(tmp_path / "s3") as srv:
        s3 = srv.client()
        s3.create_bucket(Bucket="imagenet")
        for name in (TRAIN_TAR, VAL_TAR, DEVKIT_TGZ):
            s3.upload_file(str(synth_source / name), "imagenet", f"ilsvrc2012/{name}")
        _fetch_verify("s3://imagenet/ilsvrc2012", synth_source, tmp_path / "wd", env=srv.env())


def _devkit_truth(devkit: Path) -> dict[str, str]:
    """Val file name -> WNID, read straight from the devkit the way its readme says: line i of the ground
    truth is image i's ILSVRC2012_ID, and meta.mat's synsets map ILSVRC2012_ID -> WNID."""
    with tarfile.open(devkit) as dk:
        meta = scipy.io.loadmat(io.BytesIO(dk.extractfile("ILSVRC2012_devkit_t12/data/meta.mat").read()),
                                squeeze_me=True)["synsets"]
        ids = dk.extractfile("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt").read().split()
    wnid_of = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in meta}
    return {f"ILSVRC2012_val_{i:08d}.JPEG": wnid_of[int(x)] for i, x in enumerate(ids, 1)}


def test_verify_sorts_val_by_devkit_ids_not_by_order(verified_workdir):
    """Every val image sits in the class the devkit's ground truth names, and carries that class's label.
    Mutation that must fail here (the known trap): reading ILSVRC2012_IDs as sorted-WNID indices in
    verify.read_devkit (`by_id = {i + 1: w for i, w in enumerate(sorted(leaf WNIDs))}`)."""
    df = pd.read_parquet(verified_workdir / "manifest.parquet")
    wnids = sorted(df.wnid.unique())
    assert (df.label == df.wnid.map({w: i for i, w in enumerate(wnids)})).all()
    truth = _devkit_truth(verified_workdir / "raw" / DEVKIT_TGZ)
    val = df[df.split == "val"]
    assert sorted(val.path.str.rsplit("/", n=1).str[-1]) == sorted(truth), "val images missing or extra"
    wrong = [(p, w, truth[p.rsplit("/", 1)[-1]]) for p, w in zip(val.path, val.wnid) if truth[p.rsplit("/", 1)[-1]] != w]
    assert not wrong, f"{len(wrong)} of {len(val)} val images in the wrong class, e.g. {wrong[0]}"
    assert all(p == f"extracted/val/{w}/{p.rsplit('/', 1)[-1]}" for p, w in zip(val.path, val.wnid))
    assert all((verified_workdir / p).is_file() for p in val.path)
    # Same label for the same class in train and val.
    assert df.groupby("wnid").label.nunique().eq(1).all()
    report = json.loads((verified_workdir / "reports" / "verify.json").read_text())
    assert all(e["success"] for e in report["expectations"])
    quirks = report["quirks"]
    assert quirks["png_as_jpeg"] == ["extracted/train/n02105855/n02105855_2933.JPEG"]
    assert len(quirks["cmyk"]) >= 2 and len(quirks["grayscale"]) >= 2
    assert set(df["mode"]) >= {"RGB", "CMYK", "L"} and set(df.format) == {"JPEG", "PNG"}


# --- bad input ------------------------------------------------------------------------------------


def _one_line_error(proc, *needles):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_fetch_refuses_synthetic_archives_against_official_md5s(synth_source, tmp_path):
    wd = tmp_path / "wd"
    proc = rn50("fetch", synth_source, wd)
    _one_line_error(proc, "MD5 mismatch", OFFICIAL_MD5[TRAIN_TAR], TRAIN_TAR)
    assert not (wd / "raw" / TRAIN_TAR).exists()
    assert len(list((wd / "raw" / "rejected").iterdir())) == 1


def test_fetch_missing_archive_and_unknown_scheme(synth_source, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in (TRAIN_TAR, DEVKIT_TGZ):
        os.link(synth_source / name, src / name)
    _one_line_error(rn50("fetch", src, tmp_path / "wd", "--md5", synth_source / "MD5SUMS"), "no", VAL_TAR)
    assert not (tmp_path / "wd" / "raw").exists()  # nothing moved before every archive was found
    _one_line_error(rn50("fetch", "ftp://example.invalid/x", tmp_path / "wd2"), "unsupported source scheme")


def _rewrite_tar(path: Path, add: list[tarfile.TarInfo], data: bytes = b"x") -> None:
    with tarfile.open(path) as old:
        members = [(m, old.extractfile(m).read() if m.isfile() else None) for m in old]
    with tarfile.open(path, "w") as new:
        for m, d in members:
            new.addfile(m, io.BytesIO(d) if d is not None else None)
        for m in add:
            new.addfile(m, io.BytesIO(data) if m.isfile() else None)


def _record_as_fetched(raw: Path, name: str) -> None:
    """Refresh fetch's record of a tampered archive, as fetching a tampered source would."""
    from tasks.common import file_digest

    write_fetch_record(raw, name, file_digest(raw / name))


def _evil(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type, m.linkname, m.size = kind, link, (1 if kind == tarfile.REGTYPE else 0)
    return m


@pytest.mark.parametrize("member", [
    _evil("../evil.JPEG"),
    _evil("/etc/x"),
    _evil("escape.JPEG", tarfile.SYMTYPE, "../../../../etc/passwd"),
], ids=["dotdot", "absolute", "escaping-symlink"])
def test_verify_refuses_escaping_members(workdir_copy, tmp_path, member):
    raw = workdir_copy / "raw"
    _rewrite_tar(raw / VAL_TAR, [member])
    _record_as_fetched(raw, VAL_TAR)
    before = set(p for p in tmp_path.rglob("*"))
    _one_line_error(rn50("verify", workdir_copy), "refusing member", member.name)
    assert not (workdir_copy / "extracted.partial").exists()
    assert not Path("/etc/x").exists() or Path("/etc/x").stat().st_size != 1
    assert set(p for p in tmp_path.rglob("*")) <= before | {workdir_copy / ".stamps"}


def test_verify_devkit_without_ground_truth(workdir_copy):
    raw = workdir_copy / "raw"
    with tarfile.open(raw / DEVKIT_TGZ) as old:
        keep = [(m, old.extractfile(m).read()) for m in old if m.isfile() and "ground_truth" not in m.name]
    with tarfile.open(raw / DEVKIT_TGZ, "w:gz") as new:
        for m, d in keep:
            new.addfile(m, io.BytesIO(d))
    _record_as_fetched(raw, DEVKIT_TGZ)
    _one_line_error(rn50("verify", workdir_copy), "ground_truth")


def test_verify_fails_when_counts_disagree_with_devkit(workdir_copy):
    """A train image missing from the archive breaks the devkit's per-class count: the suite says so."""
    raw = workdir_copy / "raw"
    rewrite_first_class_tar(raw / TRAIN_TAR,
                            lambda inner: [(m, inner.extractfile(m).read()) for m in inner.getmembers()[1:]])
    _record_as_fetched(raw, TRAIN_TAR)
    proc = rn50("verify", workdir_copy)
    _one_line_error(proc, "expectations failed", "train_per_class")
    report = (workdir_copy / "reports" / "verify.md").read_text()
    assert "FAIL" in report
    assert not (workdir_copy / "extracted.partial").exists()
    assert (workdir_copy / "extracted").exists()  # the previous verified tree is untouched by a failed run


def test_verify_without_fetch(tmp_path):
    _one_line_error(rn50("verify", tmp_path / "empty"), "rn50 fetch")


def test_synth_names_stay_unique_past_the_png_number(tmp_path):
    """The PNG-in-disguise is n02105855_2933.JPEG; a class that large must not get a second 2933."""
    from tasks.synth import synthesize

    synthesize(tmp_path, classes=2, train_per_class=2934, val_per_class=1, seed=3)
    with tarfile.open(tmp_path / TRAIN_TAR) as outer:
        inner = tarfile.open(fileobj=outer.extractfile("n02105855.tar"))
        names = inner.getnames()
    assert len(names) == len(set(names)) and "n02105855_2933.JPEG" in names


def test_verify_refuses_a_duplicate_member(workdir_copy):
    raw = workdir_copy / "raw"
    with tarfile.open(raw / VAL_TAR) as old:
        first = old.getmembers()[0]
        data = old.extractfile(first).read()
    _rewrite_tar(raw / VAL_TAR, [first], data)
    _record_as_fetched(raw, VAL_TAR)
    _one_line_error(rn50("verify", workdir_copy), "twice", first.name)
    assert not (workdir_copy / "extracted.partial").exists()


# --- bounded extraction and fetch (hostile archives and sources) ----------------------------------


def _gzip_bomb(member: str, size: int) -> bytes:
    """A one-member gzip of a tar holding `member` of `size` zero bytes (1 GiB -> 4.7 MB), built from one
    deflated 1 MiB block repeated (full flushes make the blocks independent) in well under a second."""
    import struct
    import zlib

    info = tarfile.TarInfo(member)
    info.size = size
    header, chunk, end = info.tobuf(tarfile.GNU_FORMAT), b"\0" * (1 << 20), b"\0" * 1024

    def deflate(data: bytes, mode: int) -> bytes:
        c = zlib.compressobj(1, zlib.DEFLATED, -15)
        return c.compress(data) + c.flush(mode)

    crc = zlib.crc32(header)
    for _ in range(size // len(chunk)):
        crc = zlib.crc32(chunk, crc)
    crc = zlib.crc32(end, crc)
    body = (deflate(header, zlib.Z_FULL_FLUSH) + deflate(chunk, zlib.Z_FULL_FLUSH) * (size // len(chunk))
            + deflate(end, zlib.Z_FINISH))
    return (b"\x1f\x8b\x08\x00\0\0\0\0\x00\xff" + body
            + struct.pack("<II", crc, (len(header) + size + len(end)) & 0xFFFFFFFF))


def _verify_capped(wd: Path) -> subprocess.CompletedProcess:
    """`rn50 verify` with a 256 MiB file-size limit, so code that extracts a bomb fails fast, not the disk."""
    limit = 256 << 20
    return subprocess.run([RN50, "verify", str(wd)], capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))


def _nothing_extracted(wd: Path) -> None:
    assert not (wd / "extracted.partial").exists()
    assert not any(p.stat().st_size > (1 << 20) for p in (wd / "extracted").rglob("*") if p.is_file())


def test_verify_refuses_a_gzip_bomb_named_tar(workdir_copy):
    """The 4.7 MB gzip named ILSVRC2012_img_val.tar holding a 1 GiB member: refused on its first bytes,
    never decompressed (transparent decompression read the member into memory)."""
    raw = workdir_copy / "raw"
    (raw / VAL_TAR).write_bytes(_gzip_bomb("ILSVRC2012_val_00000001.JPEG", 1 << 30))
    _record_as_fetched(raw, VAL_TAR)
    proc = _verify_capped(workdir_copy)
    _one_line_error(proc, VAL_TAR, "gzip-compressed", "refusing")
    _nothing_extracted(workdir_copy)


def test_verify_refuses_an_oversized_member(workdir_copy):
    """A val image over the per-image cap (tasks.ilsvrc.IMAGE_CAP) is refused before its bytes are read."""
    from tasks.ilsvrc import IMAGE_CAP

    raw = workdir_copy / "raw"
    with tarfile.open(raw / VAL_TAR) as old:
        members = [(m, old.extractfile(m).read()) for m in old]
    m0, d0 = members[0]
    big = d0 + b"\0" * (IMAGE_CAP + 1 - len(d0))  # still a decodable JPEG: trailing bytes are ignored
    m0.size = len(big)
    members[0] = (m0, big)
    with tarfile.open(raw / VAL_TAR, "w") as new:
        for m, d in members:
            new.addfile(m, io.BytesIO(d))
    _record_as_fetched(raw, VAL_TAR)
    proc = _verify_capped(workdir_copy)
    _one_line_error(proc, VAL_TAR, m0.name, f"{IMAGE_CAP + 1:,} bytes", "cap for one image")
    _nothing_extracted(workdir_copy)


def _devkit_with(raw: Path, name: str, data: bytes) -> None:
    """Rewrite the devkit with member `name` replaced (or added) by `data`."""
    with tarfile.open(raw / DEVKIT_TGZ) as old:
        keep = [(m, old.extractfile(m).read()) for m in old if m.isfile() and m.name != name]
    with tarfile.open(raw / DEVKIT_TGZ, "w:gz") as new:
        for m, d in keep:
            new.addfile(m, io.BytesIO(d))
        m = tarfile.TarInfo(name)
        m.size = len(data)
        new.addfile(m, io.BytesIO(data))
    _record_as_fetched(raw, DEVKIT_TGZ)


def _inflating_mat(nbytes: int) -> bytes:
    """A small compressed MAT file whose `synsets` inflates to `nbytes` (a zip bomb inside meta.mat)."""
    import numpy as np

    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": np.zeros(nbytes, np.uint8)}, do_compression=True)
    return buf.getvalue()


def _many_headers(n: int) -> bytes:
    """n empty members in a tar: n x 512 bytes of headers that no member size accounts for."""
    return b"".join(tarfile.TarInfo(f"ILSVRC2012_devkit_t12/x/{i}").tobuf(tarfile.GNU_FORMAT) for i in range(n))


@pytest.mark.parametrize("member,data,needle", [
    ("ILSVRC2012_devkit_t12/readme.txt", b"\0" * (100 << 20), "over the 64.0 MiB cap for a devkit file"),
    ("ILSVRC2012_devkit_t12/empty.tar", "headers", "decompresses to more than 64.0 MiB"),
    ("ILSVRC2012_devkit_t12/data/meta.mat", b"\0" * ((16 << 20) + 1), "over the 16.0 MiB cap"),
    ("ILSVRC2012_devkit_t12/data/meta.mat", "mat", "inflates to more than 16.0 MiB"),
    ("././@PaxHeader", "pax", "over the 1.0 MiB cap"),
], ids=["devkit-member", "devkit-unpacked", "meta.mat-size", "meta.mat-inflated", "pax-header"])
def test_verify_refuses_an_oversized_devkit(workdir_copy, member, data, needle):
    raw = workdir_copy / "raw"
    if data == "headers":  # 140,000 empty members spliced in as raw headers: 68 MiB decompressed
        with tarfile.open(raw / DEVKIT_TGZ) as old:
            keep = [(m, old.extractfile(m).read()) for m in old if m.isfile()]
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as new:
            for m, d in keep:
                new.addfile(m, io.BytesIO(d))
        body = buf.getvalue().rstrip(b"\0")
        body += b"\0" * (-len(body) % 512) + _many_headers(140_000) + b"\0" * 1024
        (raw / DEVKIT_TGZ).write_bytes(gzip.compress(body, 1))
        _record_as_fetched(raw, DEVKIT_TGZ)
    elif data == "pax":  # a pax extended header of 100 MiB (tarfile reads one whole into memory)
        with tarfile.open(raw / DEVKIT_TGZ) as old:
            keep = [(m, old.extractfile(m).read()) for m in old if m.isfile()]
        pax = tarfile.TarInfo(member)
        pax.type, pax.size = tarfile.XHDTYPE, 100 << 20
        body = pax.tobuf(tarfile.USTAR_FORMAT) + b"\0" * (100 << 20)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as new:
            for m, d in keep:
                new.addfile(m, io.BytesIO(d))
        (raw / DEVKIT_TGZ).write_bytes(gzip.compress(body + buf.getvalue(), 1))
        _record_as_fetched(raw, DEVKIT_TGZ)
    else:
        _devkit_with(raw, member, _inflating_mat(100 << 20) if data == "mat" else data)
    proc = _verify_capped(workdir_copy)
    _one_line_error(proc, DEVKIT_TGZ, needle)
    _nothing_extracted(workdir_copy)


class HostileHandler(http.server.BaseHTTPRequestHandler):
    """Serves the synthetic archives, except that `announce` overrides a file's HEAD Content-Length (None:
    no Content-Length at all) and `stream` makes GET send that many zero bytes instead of the file."""

    root: Path
    announce: dict[str, int | None] = {}
    stream: dict[str, int] = {}

    def log_message(self, *args):
        pass

    def _name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def do_HEAD(self):
        name = self._name()
        self.send_response(200)
        length = self.announce.get(name, (self.root / name).stat().st_size)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def do_GET(self):
        name = self._name()
        self.send_response(200)
        if name not in self.announce:
            self.send_header("Content-Length", str((self.root / name).stat().st_size))
        self.end_headers()  # HTTP/1.0: without a length the body ends when the connection closes
        try:
            if name in self.stream:
                for _ in range(self.stream[name] >> 20):
                    self.wfile.write(b"\0" * (1 << 20))
            else:
                self.wfile.write((self.root / name).read_bytes())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading, as it should


@pytest.fixture
def hostile_http(synth_source):
    handlers = []

    def start(announce: dict, stream: dict) -> str:
        handler = type("Handler", (HostileHandler,), {"root": synth_source, "announce": announce, "stream": stream})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        handlers.append(server)
        return f"http://127.0.0.1:{server.server_port}/"

    yield start
    for server in handlers:
        server.shutdown()
        server.server_close()


def _raw_files(wd: Path) -> dict[str, int]:
    raw = wd / "raw"
    return {str(p.relative_to(raw)): p.stat().st_size for p in raw.rglob("*") if p.is_file()} if raw.exists() else {}


def test_fetch_never_writes_more_than_announced(synth_source, hostile_http, tmp_path):
    """HEAD says 10 bytes, GET streams 64 MiB: at most the 10 bytes are ever written, and none are kept."""
    url = hostile_http({TRAIN_TAR: 10}, {TRAIN_TAR: 64 << 20})
    wd = tmp_path / "wd"
    proc = rn50("fetch", url, wd, "--md5", synth_source / "MD5SUMS")
    _one_line_error(proc, TRAIN_TAR, "more than the 10 bytes it announced", "nothing kept")
    assert _raw_files(wd) == {}, _raw_files(wd)


def test_fetch_without_announced_size(synth_source, hostile_http, tmp_path):
    """No Content-Length at all: a download is held to the archive's cap (16 MiB for the devkit), and one
    within it is fetched and checked as usual."""
    quiet = {name: None for name in (TRAIN_TAR, VAL_TAR, DEVKIT_TGZ)}
    out = rn50("fetch", hostile_http(quiet, {}), tmp_path / "ok", "--md5", synth_source / "MD5SUMS", check=True)
    assert out.stdout.count("ok, downloaded") == 3
    wd = tmp_path / "wd"
    proc = rn50("fetch", hostile_http(quiet, {DEVKIT_TGZ: 17 << 20}), wd, "--md5", synth_source / "MD5SUMS")
    _one_line_error(proc, DEVKIT_TGZ, "more than 16.0 MiB", "without announcing a size", "nothing kept")
    assert DEVKIT_TGZ not in _raw_files(wd) and f".partial/{DEVKIT_TGZ}.part" not in _raw_files(wd)


def test_fetch_refuses_an_announced_size_over_the_cap(synth_source, hostile_http, tmp_path):
    wd = tmp_path / "wd"
    proc = rn50("fetch", hostile_http({DEVKIT_TGZ: (16 << 20) + 1}, {}), wd, "--md5", synth_source / "MD5SUMS")
    _one_line_error(proc, DEVKIT_TGZ, f"{(16 << 20) + 1:,} bytes", "over the 16.0 MiB cap")
    assert _raw_files(wd) == {}  # nothing moved


# --- verify's own tar reader: tarfile's header semantics, stricter about damage ----------------------


def _retar(path: Path, fmt: int, rename: dict[str, str] | None = None, pax: bool = False) -> None:
    """Rewrite a tar in `fmt`, members renamed by `rename`; `pax` gives each member its own pax header."""
    with tarfile.open(path) as old:
        members = [(m, old.extractfile(m).read()) for m in old]
    with tarfile.open(path, "w", format=fmt) as new:
        for m, d in members:
            m.name = (rename or {}).get(m.name, m.name)
            if pax:
                m.pax_headers = {"comment": f"re-tarred {m.name}"}
            new.addfile(m, io.BytesIO(d))


def test_verify_reads_gnu_long_names_and_pax_headers(workdir_copy):
    """A re-tarred copy (GNU long names in an inner class tar, a pax header before every val image)
    verifies to the same images, the long name included."""
    raw = workdir_copy / "raw"
    with tarfile.open(raw / TRAIN_TAR) as outer:
        first = tarfile.open(fileobj=outer.extractfile(next(iter(outer)))).getmembers()[0].name
    long_name = first.replace(".JPEG", "_" + "x" * 150 + ".JPEG")

    def first_renamed(inner):
        for m in inner.getmembers():
            data = inner.extractfile(m).read()
            m.name = long_name if m.name == first else m.name
            yield m, data

    m0, _ = rewrite_first_class_tar(raw / TRAIN_TAR, first_renamed, tarfile.GNU_FORMAT)
    _retar(raw / VAL_TAR, tarfile.PAX_FORMAT, pax=True)
    for name in (TRAIN_TAR, VAL_TAR):
        _record_as_fetched(raw, name)
    before = pd.read_parquet(workdir_copy / "manifest.parquet")
    rn50("verify", workdir_copy, check=True)
    after = pd.read_parquet(workdir_copy / "manifest.parquet")
    wnid = m0.name.removesuffix(".tar")
    renamed = f"extracted/train/{wnid}/{first}"
    assert set(after.path) == (set(before.path) - {renamed}) | {f"extracted/train/{wnid}/{long_name}"}
    assert sorted(after.md5) == sorted(before.md5)
    assert (workdir_copy / "extracted" / "train" / wnid / long_name).stat().st_size > 0


def _damage(path: Path, at_member: int, how: str) -> str:
    """Damage a plain tar in place at its `at_member`-th header: `checksum` flips a byte of the header,
    `truncate` cuts the file inside that member's data. Returns the member's name."""
    with tarfile.open(path) as t:
        m = t.getmembers()[at_member]
    if how == "checksum":
        with open(path, "r+b") as f:
            f.seek(m.offset + 10)
            f.write(b"\x7f")
    else:
        os.truncate(path, m.offset_data + m.size // 2)
    return m.name


@pytest.mark.parametrize("how,needle", [("checksum", "bad checksum"), ("truncate", "truncated")])
def test_verify_refuses_a_damaged_tar(workdir_copy, how, needle):
    """tarfile's stream mode took a bad header past the first one for the end of the archive (the images
    after it silently missing); verify's reader says the archive is damaged, as for a cut member."""
    raw = workdir_copy / "raw"
    name = _damage(raw / VAL_TAR, 3, how)
    _record_as_fetched(raw, VAL_TAR)
    proc = rn50("verify", workdir_copy)
    _one_line_error(proc, VAL_TAR, "damaged archive", needle)
    if how == "truncate":
        assert name in proc.stderr
    assert not (workdir_copy / "extracted.partial").exists()


def test_verify_refuses_a_class_tar_named_dotdot(workdir_copy):
    """An inner tar `x/...tar` would make the class directory `..`: the images would land beside the splits."""
    raw = workdir_copy / "raw"
    with tarfile.open(raw / TRAIN_TAR) as old:
        first = old.getmembers()[0]
    _retar(raw / TRAIN_TAR, tarfile.GNU_FORMAT, rename={first.name: "x/...tar"})
    _record_as_fetched(raw, TRAIN_TAR)
    _one_line_error(rn50("verify", workdir_copy), TRAIN_TAR, "unexpected member", "x/...tar")
    assert not (workdir_copy / "extracted.partial").exists()
