"""The data path at ImageNet-like bytes (issue 15): the synth imagenet profile, fetch's threaded single
pass (errors from its writer thread), verify's phase times and columnar index."""
from __future__ import annotations

import io
import resource
import subprocess
import sys
import tarfile

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from conftest import ROOT
from helpers import rewrite_first_class_tar
from tasks.ilsvrc import TRAIN_TAR, VAL_TAR
from tasks.synth import imagenet_size, synthesize


def _images(tar_path) -> list[bytes]:
    out = []
    with tarfile.open(tar_path) as outer:
        for m in outer:
            data = outer.extractfile(m).read()
            if m.name.endswith(".tar"):
                with tarfile.open(fileobj=io.BytesIO(data)) as inner:
                    out += [inner.extractfile(x).read() for x in inner]
            else:
                out.append(data)
    return out


def test_imagenet_size_distribution():
    rng = np.random.default_rng(0)
    sizes = np.array([imagenet_size(rng) for _ in range(5000)])
    short, long = sizes.min(1), sizes.max(1)
    assert 0.75 <= np.mean(long == 500) <= 0.85            # Flickr's 500 px medium size, as in ILSVRC2012
    assert 0.70 <= np.mean((short >= 250) & (short <= 500)) <= 0.95
    assert 330 <= np.median(short) <= 380
    assert 0.2 <= np.mean(sizes[:, 0] > sizes[:, 1]) <= 0.3  # a quarter portrait
    assert long.max() <= 1200


def test_synth_imagenet_profile_bytes_layout_and_quirks(tmp_path):
    kw = dict(classes=3, train_per_class=12, val_per_class=3, seed=5, profile="imagenet")
    a = synthesize(tmp_path / "a", workers=2, **kw)
    b = synthesize(tmp_path / "b", workers=1, **kw)
    assert a.md5 == b.md5  # per-image seeds: the bytes do not depend on the worker count
    train, val = _images(tmp_path / "a" / TRAIN_TAR), _images(tmp_path / "a" / VAL_TAR)
    assert len(train) == a.train_images and len(val) == 9
    jpegs = [d for d in train + val if d[:3] == b"\xff\xd8\xff"]
    assert 70_000 <= np.mean([len(d) for d in jpegs]) <= 160_000  # ILSVRC2012's mean is ~110 KB
    dims = [Image.open(io.BytesIO(d)).size for d in train + val]
    assert sum(max(d) == 500 for d in dims) >= len(dims) // 2
    assert min(min(d) for d in dims) >= 150
    assert a.quirks["png_as_jpeg"] and a.quirks["cmyk"] and a.quirks["grayscale"]
    small = synthesize(tmp_path / "c", classes=3, train_per_class=12, val_per_class=3, seed=5)
    assert small.md5 != a.md5


def _fsize_limit(nbytes: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


def test_fetch_write_error_in_writer_thread_is_one_line_and_nothing_kept(synth_source, tmp_path):
    """The writer thread's EFBIG must reach the user; swallowed, the MD5 (computed from the stream)
    would still match and a truncated archive would be accepted."""
    size = (synth_source / TRAIN_TAR).stat().st_size
    assert size > 200_000
    wd = tmp_path / "wd"
    proc = subprocess.run([sys.executable, "-m", "tasks.cli", "fetch", str(synth_source), str(wd), "--md5",
                           str(synth_source / "MD5SUMS")], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          preexec_fn=_fsize_limit(size // 3))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "cannot write" in proc.stderr
    assert not (wd / "raw" / TRAIN_TAR).exists()


def test_verify_reports_phases_and_a_complete_manifest(verified_workdir):
    import json

    stamp = json.loads((verified_workdir / ".stamps" / "verify.json").read_text())
    assert set(stamp["result"]["phases"]) == {"extract", "decode_check", "validate", "commit"}
    df = pd.read_parquet(verified_workdir / "manifest.parquet")
    assert df.md5.notna().all() and df.md5.str.len().eq(32).all()
    # every digest belongs to its own file (the hasher thread fills the column by index)
    import hashlib

    for rel, md5 in df[["path", "md5"]].sample(20, random_state=1).itertuples(index=False):
        assert hashlib.md5((verified_workdir / rel).read_bytes()).hexdigest() == md5
    assert (df.width > 0).all() and set(df["mode"]) >= {"RGB", "CMYK", "L"}


def test_manifest_reads_back_as_before_and_its_digest_matches(verified_workdir):
    """verify builds the manifest as an Arrow table; read back it is the frame DataFrame.to_parquet wrote
    (object string columns, int64, bool, a RangeIndex), and the digest verify reports is the one pack
    computes from it: the sorted rows, hashed as tab-separated text."""
    import hashlib
    import json

    from tasks.ilsvrc import MANIFEST_COLUMNS, manifest_digest

    df = pd.read_parquet(verified_workdir / "manifest.parquet")
    assert list(df.columns) == MANIFEST_COLUMNS
    assert {c: str(t) for c, t in df.dtypes.items()} == {
        "split": "object", "wnid": "object", "label": "int64", "path": "object", "bytes": "int64", "md5": "object",
        "width": "int64", "height": "int64", "mode": "object", "format": "object", "decodable": "bool"}
    assert isinstance(df.index, pd.RangeIndex)
    assert df.path.str.startswith("extracted/").all() and df.md5.str.fullmatch("[0-9a-f]{32}").all()
    expected = hashlib.sha256()
    for row in sorted(zip(df.path, df.md5, df.label, df.split)):
        expected.update(("\t".join(map(str, row)) + "\n").encode())
    result = json.loads((verified_workdir / ".stamps" / "verify.json").read_text())["result"]
    assert result["manifest_digest"] == manifest_digest(df) == expected.hexdigest()
    shuffled = df.sample(frac=1, random_state=3)  # any row order, any index
    assert manifest_digest(shuffled) == expected.hexdigest()
    arrow = pq.read_table(verified_workdir / "manifest.parquet").to_pandas(types_mapper=pd.ArrowDtype)
    assert manifest_digest(arrow) == expected.hexdigest()


def test_verify_refuses_a_member_name_that_is_not_utf8(workdir_copy):
    from conftest import rn50

    raw = workdir_copy / "raw"

    def first_name_latin1(inner):
        for i, m in enumerate(inner.getmembers()):
            data = inner.extractfile(m).read()
            m.name = m.name.replace(".JPEG", "_\xe9.JPEG") if i == 0 else m.name  # é as one latin-1 byte
            yield m, data

    rewrite_first_class_tar(raw / TRAIN_TAR, first_name_latin1, tarfile.GNU_FORMAT, encoding="latin-1")
    from tasks.common import file_digest
    from tasks.ilsvrc import write_fetch_record

    write_fetch_record(raw, TRAIN_TAR, file_digest(raw / TRAIN_TAR))
    proc = rn50("verify", workdir_copy)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "not UTF-8" in proc.stderr
    assert not (workdir_copy / "extracted.partial").exists()
