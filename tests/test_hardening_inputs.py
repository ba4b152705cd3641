"""Hostile inputs that reach the parsers and the recorded provenance (issue 24): a devkit meta.mat that declares
more than it holds, config placeholders, build args that would falsify the image's record, and the help text
of every subcommand."""
from __future__ import annotations

import argparse
import io
import json
import re
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from conftest import ROOT, rn50
from tasks.common import StageError
from tasks.ilsvrc import DEVKIT_GROUND_TRUTH, DEVKIT_META, DEVKIT_TGZ

# --- meta.mat: declared sizes ----------------------------------------------------------------------
# MAT v5 written by hand (scipy.io.savemat writes only what it holds): element = tag (type, bytes) + data padded to 8.


def _el(mtype: int, data: bytes) -> bytes:
    return struct.pack("<II", mtype, len(data)) + data + b"\0" * (-len(data) % 8)


def _matrix_head(cls: int, dims: list[int], name: bytes) -> bytes:
    """Array flags, dimensions and name of a miMATRIX (class: 1 cell, 2 struct, 6 double)."""
    return _el(6, struct.pack("<II", cls, 0)) + _el(5, struct.pack(f"<{len(dims)}i", *dims)) + _el(1, name)


def _mat(matrix_payload: bytes, declared: int | None = None) -> bytes:
    """A MAT file of one compressed variable (the devkit's `synsets`), its tag saying `declared` bytes if given."""
    header = b"MATLAB 5.0 MAT-file".ljust(116) + b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"
    tag = struct.pack("<II", 14, len(matrix_payload) if declared is None else declared)
    return header + _el(15, zlib.compress(tag + matrix_payload))


def _struct(rows: int, fields: int) -> bytes:
    names = b"".join(f"f{i}".encode().ljust(8, b"\0") for i in range(fields))
    return _mat(_matrix_head(2, [rows, 1], b"synsets") + _el(5, struct.pack("<i", 8)) + _el(1, names))


def _nested_cells(levels: int) -> bytes:
    """A 1x1 cell holding a 1x1 cell ... `levels` deep (40 KB for 20,000), built outside in."""
    leaf = _el(14, _matrix_head(6, [0, 0], b"") + _el(9, b""))
    sizes, size = [], len(leaf)
    for _ in range(levels):
        size += 48
        sizes.append(size)
    parts = [struct.pack("<II", 14, s - 8) + _matrix_head(1, [1, 1], b"") for s in reversed(sizes)]
    return _mat(b"".join(parts)[8:] + leaf)  # the outer tag is _mat's


def _devkit(path: Path, meta: bytes, ground_truth: bytes = b"1\n") -> Path:
    dk = path / DEVKIT_TGZ
    with tarfile.open(dk, "w:gz") as tar:
        for name, data in ((f"ILSVRC2012_devkit_t12/{DEVKIT_META}", meta),
                           (f"ILSVRC2012_devkit_t12/{DEVKIT_GROUND_TRUTH}", ground_truth)):
            m = tarfile.TarInfo(name)
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    return dk


# read_devkit in a fresh process: its peak RSS growth over the imports, and its one-line error.
_READ_DEVKIT = """
import json, resource, sys
from pathlib import Path
import scipy.io
from tasks.common import StageError
from tasks.verify import read_devkit
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    dk, error = read_devkit(Path(sys.argv[1])), None
except StageError as e:
    dk, error = None, str(e)
print(json.dumps({"error": error, "classes": dk and len(dk.wnids),
                  "growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


def _read_devkit(dk: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", _READ_DEVKIT, str(dk)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, f"read_devkit died ({proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(proc.stdout)


@pytest.mark.parametrize("meta,needle", [
    # loadmat allocated 8 bytes a cell before reading one
    (lambda: _mat(_matrix_head(1, [32_000_000, 1], b"synsets")), "a 32,000,000 x 1 cell array"),
    # the same behind a tag claiming 2 GiB: loadmat reads the header without checking the length
    (lambda: _mat(_matrix_head(1, [32_000_000, 1], b"synsets"), declared=0x7FFFFFF0), "a 32,000,000 x 1 cell array"),
    # 1,000,000 x 16 fields = 16 M slots, 8 bytes each
    (lambda: _struct(1_000_000, 16), "a 1,000,000 x 1 struct of 16 fields"),
    # field names are checked against each other, in quadratic time
    (lambda: _struct(1, 5_000), "a struct of 5,000 fields"),
    # loadmat reads nested arrays recursively: 20,000 levels (40 KB) overflowed its C stack
    (lambda: _nested_cells(20_000), "arrays nested more than 4 deep"),
], ids=["huge-cell", "overlong-tag", "struct-slots", "struct-fields", "deep-nesting"])
def test_meta_mat_declaring_more_than_ilsvrc_is_refused_with_memory_bounded(tmp_path, meta, needle):
    out = _read_devkit(_devkit(tmp_path, meta()))
    assert out["error"] and "\n" not in out["error"], out
    assert out["error"].startswith(f"{DEVKIT_TGZ}: devkit meta.mat declares {needle}"), out["error"]
    assert out["growth_mib"] < 32, out


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "compressed"])
def test_meta_mat_the_size_of_ilsvrc2012s_is_read(tmp_path, compressed):
    """The bounds leave room for the real file: 1,860 synsets of 8 fields, long glosses, 40 children each."""
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    synsets = np.zeros((1860, 1), dtype=[(f, object) for f in fields])
    for i in range(1860):
        row = synsets[i, 0]
        row["ILSVRC2012_ID"], row["WNID"], row["words"], row["gloss"] = np.array([[i + 1.0]]), f"n{i:08d}", "w" * 60, "g" * 300
        row["num_children"], row["children"] = np.array([[0.0]]), np.arange(40.0).reshape(1, -1)
        row["wordnet_height"], row["num_train_images"] = np.array([[0.0]]), np.array([[1300.0]])
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": synsets}, do_compression=compressed)
    out = _read_devkit(_devkit(tmp_path, buf.getvalue(), b"1\n1860\n"))
    assert out["error"] is None and out["classes"] == 1860, out


# --- pipeline config placeholders -----------------------------------------------------------------


def _pipeline(tmp_path: Path, uri: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"train: {{config: demo}}\narchive: {{uri: '{uri}'}}\n")
    return path


def test_config_paths_with_braces_are_filled_literally(tmp_path):
    from flows.config import load_pipeline

    source, workdir = tmp_path / "a{b}c", tmp_path / "w{0}{source}"
    cfg = load_pipeline("demo", source=str(source), workdir=str(workdir))
    assert cfg["source"] == str(source) and cfg["workdir"] == str(workdir)
    assert cfg["fetch"]["md5_file"] == f"{source}/MD5SUMS"
    assert cfg["archive"]["uri"] == f"file://{workdir}/archive"


@pytest.mark.parametrize("uri", ["file://{workdir.__class__}/x", "file://{workdir!r}", "file://{0}/x", "{nope}"])
def test_config_unknown_placeholder_is_a_one_line_schema_error(tmp_path, uri):
    from flows.config import load_pipeline

    with pytest.raises(StageError) as e:
        load_pipeline(str(_pipeline(tmp_path, uri)), source=str(tmp_path), workdir=str(tmp_path / "wd"))
    placeholder = re.search(r"\{[^}]*\}", uri).group(0)
    assert f"archive.uri: unknown placeholder {placeholder!r}" in str(e.value) and "\n" not in str(e.value)


def test_rn50_run_refuses_an_unknown_placeholder_before_starting_anything(tmp_path):
    proc = rn50("run", tmp_path, tmp_path / "wd", "--pipeline", _pipeline(tmp_path, "file://{home}/a"), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().startswith("rn50 run: error: pipeline config ") and len(proc.stderr.splitlines()) == 1
    assert "archive.uri: unknown placeholder '{home}'" in proc.stderr
    assert not (tmp_path / "wd").exists()


# --- build args and the recorded provenance -------------------------------------------------------


@pytest.mark.parametrize("key", ["FROM_IMAGE_NAME", "RN50_CONTENT_HASH", "BUILDKIT_SYNTAX"])
def test_build_args_that_would_falsify_the_record_are_refused(tmp_path, key):
    from flows.config import validate_pipeline
    from tasks.container import build_image

    # refused before any engine is asked (there is none at this address)
    with pytest.raises(StageError, match=rf"^build arg '?{key}'? .*refusing") as e:
        build_image(build_args={key: "evil"}, docker_host=f"unix://{tmp_path}/no-engine.sock")
    assert "\n" not in str(e.value)
    raw = {"train": {"config": "demo"}, "archive": {"uri": "file:///x"}, "container": {"build_args": {key: "evil"}}}
    with pytest.raises(StageError, match=rf"^pipeline config t: container\.build_args: build arg '?{key}'? "):
        validate_pipeline(raw, "t")
    proc = rn50("build", "--build-arg", f"{key}=evil", env={"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"})
    assert proc.returncode == 2 and proc.stderr.startswith("rn50 build: error: build arg"), proc.stderr[-2000:]
    assert len(proc.stderr.splitlines()) == 1


def test_build_args_the_dockerfile_declares_are_accepted():
    from flows.config import validate_pipeline

    args = {"RUNTIME_ENV": "configs/env/cpu.env", "APT_PACKAGES": "openssh-server", "PIP_INSTALL": "0",
            "HTTPS_PROXY": "http://proxy:3128"}
    raw = {"train": {"config": "demo"}, "archive": {"uri": "file:///x"}, "container": {"build_args": args}}
    assert validate_pipeline(raw, "t").container.build_args == args


# --- help text ------------------------------------------------------------------------------------

# Python that leaked into help texts: docstring markup and parameter names that are not options.
_INTERNAL = re.compile(r"`|:param|\bArgs:|\bReturns:|\bprogress\b|\blogger\b|\bon_job\b|\bentry\b|\bextra_args\b")
_IDENTIFIER = re.compile(r"\b[a-z]+(?:_[a-z0-9]+)+\b")  # snake_case: a Python name, not words for a user


def _subcommands() -> list[str]:
    from tasks.cli import build_parser

    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return list(sub.choices)


@pytest.mark.parametrize("command", _subcommands())
def test_subcommand_help_is_written_for_users(command):
    proc = rn50(command, "--help", env={"COLUMNS": "100"})
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    # argparse prints: usage, a blank line, the description, a blank line, the argument sections
    description = text.split("\n\n")[1]
    assert description.strip().endswith(".") and not description.startswith(("positional", "options")), text
    assert not _INTERNAL.search(text), _INTERNAL.search(text).group(0) + "\n" + text
    assert not _IDENTIFIER.search(description), _IDENTIFIER.search(description).group(0) + "\n" + text
