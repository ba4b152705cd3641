"""Everything installed is checked against a recorded hash (issue 16, item 8).

- The Python environment comes from uv.lock via `uv sync --frozen`: every registry distribution in the lock
  carries a sha256, which uv verifies before installing (its default hash-checking mode).
- What the lock does not cover is installed only with `--require-hashes` from hash-pinned files: uv itself
  (scripts/requirements/uv.txt), the Horovod sdist, its build tools and cmake (scripts/requirements/), and
  the training image's packages (infra/requirements-node.txt). pip and uv are shown to refuse a file whose bytes
  differ (offline: a counterfeit distribution in a local find-links directory).
- The cached Horovod wheel is installed only if its sha256 matches the record written when it was built
  (scripts/build-horovod.sh, run here with a stand-in `uv` so nothing is downloaded or built).
"""
from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

from helpers import missing, require

ROOT = Path(__file__).resolve().parent.parent
HASHED = [ROOT / "infra/requirements-node.txt", *sorted((ROOT / "scripts/requirements").glob("*.txt"))]
INSTALLERS = [ROOT / p for p in ("scripts/install.sh", "scripts/build-horovod.sh", "infra/Dockerfile",
                                 "infra/compose/Dockerfile")]


def requirements(path: Path) -> dict[str, tuple[str, set[str]]]:
    """name -> (version, sha256 set) of a `--generate-hashes` style file; fails on anything unpinned."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!-]+)((?:\s+--hash=sha256:[0-9a-f]{64})+)", line)
        assert m, f"{path.name}: not a name==version line with sha256 hashes: {line!r}"
        out[m.group(1).lower()] = (m.group(2), set(re.findall(r"sha256:([0-9a-f]{64})", m.group(3))))
    assert out, f"{path} pins nothing"
    return out


def test_lock_has_a_hash_for_every_distribution():
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    unhashed = []
    for pkg in lock["package"]:
        if pkg.get("source", {}).get("editable") == ".":
            continue  # the project itself, from the checkout
        files = ([pkg["sdist"]] if "sdist" in pkg else []) + pkg.get("wheels", [])
        if not files or not all(re.fullmatch(r"sha256:[0-9a-f]{64}", f.get("hash", "")) for f in files):
            unhashed.append(pkg["name"])
    assert not unhashed, unhashed


def test_hash_pinned_files_pin_every_package():
    pins = {p.name: requirements(p) for p in HASHED}
    assert pins["horovod.txt"].keys() == {"horovod"} and pins["horovod.txt"]["horovod"][0] == "0.28.1"
    assert pins["uv.txt"].keys() == {"uv"}
    assert {"setuptools", "wheel", "packaging", "pip"} == pins["build-tools.txt"].keys()
    assert {"nvidia-dali-cuda120", "mlperf-logging", "astunparse", "gast", "dm-tree", "six", "pyyaml"} == \
        pins["requirements-node.txt"].keys()
    # Same versions as the lock wherever the lock has the package.
    lock = {p["name"]: p["version"] for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"]}
    for file, reqs in pins.items():
        for name, (version, _) in reqs.items():
            if name in lock and file != "requirements-node.txt":  # the node image is Python 3.10, its own set
                assert lock[name] == version, f"{file}: {name}=={version}, uv.lock has {lock[name]}"
    assert pins["requirements-node.txt"]["nvidia-dali-cuda120"][0] == lock["nvidia-dali-cuda120"]
    assert pins["requirements-node.txt"]["mlperf-logging"][0] == lock["mlperf-logging"]
    # build-horovod.sh builds the version the hash file pins.
    assert re.search(r"^HOROVOD_VERSION=0\.28\.1$", (ROOT / "scripts/build-horovod.sh").read_text(), re.M)


def _commands(path: Path) -> list[str]:
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    return [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]


def test_every_install_command_checks_hashes():
    """Each pip/uv install in the install scripts and Dockerfiles is hash-checked: `uv sync --frozen`, or
    `--require-hashes -r <hash-pinned file>`, or the cached Horovod wheel after its digest check."""
    seen = 0
    for path in INSTALLERS:
        for line in _commands(path):
            for cmd in re.split(r"&&|;|\|\||\bthen\b", line):
                words = cmd.split()
                if "sync" in words and "uv" in words:
                    seen += 1
                    assert "--frozen" in words, f"{path.name}: {cmd.strip()}"
                elif ("pip" in words and ({"install", "wheel", "download"} & set(words))):
                    seen += 1
                    # The cached or just-built wheel, or the source tree unpacked from the hash-checked sdist.
                    local_wheel = words[-1] in ('"$wheel"', '"$built"', '"$src"')
                    assert local_wheel or ("--require-hashes" in words and "-r" in words), f"{path.name}: {cmd.strip()}"
                    if "-r" in words:
                        req = words[words.index("-r") + 1].strip('"')
                        assert re.search(r"(requirements/|\$REQ/|requirements-node\.txt|uv-requirements\.txt)", req), req
    assert seen >= 8, seen


def test_the_cached_wheel_is_installed_only_after_its_digest_check():
    text = (ROOT / "scripts/build-horovod.sh").read_text()
    check = text.index('[ "$(cut -d\' \' -f1 "$record")" = "$(sha256 "$candidate")" ]')
    assert check < text.index('uv pip install --python "$PY" -q --no-deps --reinstall "$wheel"')


def _pip() -> list[str]:
    """A working `python -m pip`: the venv's (build-horovod.sh installs pip there only when it builds), else
    the system python3's, which scripts/install.sh uses to install uv."""
    for python in (sys.executable, shutil.which("python3", path=os.defpath + ":/usr/local/bin"), "/usr/bin/python3"):
        if python and subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode == 0:
            return [python, "-m", "pip"]
    missing("pip (in the venv or the system python3)")


def _counterfeit(links: Path, dist: str) -> None:
    """A well-formed distribution named `dist` whose bytes are not the published ones."""
    if dist.endswith(".whl"):
        name, version = dist.split("-")[:2]
        with zipfile.ZipFile(links / dist, "w") as z:
            z.writestr(f"{name}/__init__.py", "raise SystemExit('counterfeit')\n")
            info = f"{name}-{version}.dist-info"
            z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
            z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
            z.writestr(f"{info}/RECORD", "")
    else:
        base = dist[: -len(".tar.gz")]
        name, version = base.rsplit("-", 1)
        with tarfile.open(links / dist, "w:gz") as t:
            for member, data in [(f"{base}/PKG-INFO", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"),
                                 (f"{base}/setup.py", "raise SystemExit('counterfeit')\n")]:
                info = tarfile.TarInfo(member)
                info.size = len(data.encode())
                t.addfile(info, io.BytesIO(data.encode()))


@pytest.mark.parametrize("installer", ["pip", "uv"])
@pytest.mark.parametrize("file, dist", [
    ("scripts/requirements/horovod.txt", "horovod-0.28.1.tar.gz"),
    ("scripts/requirements/uv.txt", "uv-0.13.9-py3-none-any.whl"),
    ("infra/requirements-node.txt", "six-1.17.0-py2.py3-none-any.whl"),
])
def test_installers_refuse_a_counterfeit_distribution(tmp_path, file, dist, installer):
    """pip and uv (the two installers our scripts use), given the hash-pinned file and only a counterfeit of
    one pinned distribution, refuse it and install nothing."""
    links = tmp_path / "links"
    links.mkdir()
    _counterfeit(links, dist)
    req = tmp_path / "one.txt"
    wanted = dist.split("-")[0].replace("_", "-")
    version, hashes = requirements(ROOT / file)[wanted]
    req.write_text(f"{wanted}=={version} " + " ".join(f"--hash=sha256:{h}" for h in sorted(hashes)) + "\n")
    out = tmp_path / "out"
    common = ["--no-deps", "--no-index", "--find-links", str(links), "--require-hashes", "-r", str(req)]
    if installer == "pip":
        cmd = _pip() + ["download", *common, "-d", str(out), "--no-cache-dir"]
        refusal = "DO NOT MATCH THE HASHES"
    else:
        uv = shutil.which("uv", path=os.environ.get("PATH", "") + ":" + str(Path.home() / ".local/bin"))
        require(uv, "uv (scripts/install.sh installs it)")
        cmd = [uv, "pip", "install", *common, "--target", str(out), "--python", sys.executable, "--no-cache", "--no-config"]
        refusal = "HASH MISMATCH"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
    assert proc.returncode != 0
    assert refusal in proc.stderr.upper(), proc.stderr[-2000:]
    landed = [p.name for p in out.iterdir() if p.name.startswith(wanted)] if out.exists() else []
    assert not landed, landed  # (uv leaves only its .lock in --target)


def _run_build_horovod(tmp_path: Path, cache: Path) -> tuple[subprocess.CompletedProcess, str]:
    """build-horovod.sh with a venv whose python has no Horovod, and a stand-in `uv` that records its
    arguments and fails (so nothing is downloaded or built)."""
    venv, bindir, log = tmp_path / "venv", tmp_path / "bin", tmp_path / "uv.log"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    bindir.mkdir(exist_ok=True)
    (bindir / "uv").write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit 1\n')
    (bindir / "uv").chmod(0o755)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp_path), "VENV": str(venv), "MXNET_BUILD": "cpu",
           "RN50_WHEEL_CACHE": str(cache), "PYTHONNOUSERSITE": "1", "PYTHONPATH": str(tmp_path / "nothing")}
    # The venv's python would find Horovod; hide it so the script goes to its cache.
    (tmp_path / "nothing").mkdir(exist_ok=True)
    (tmp_path / "nothing" / "horovod").mkdir(exist_ok=True)
    (tmp_path / "nothing" / "horovod" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    proc = subprocess.run(["bash", str(ROOT / "scripts/build-horovod.sh")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    return proc, log.read_text() if log.exists() else ""


def _key_dir(cache: Path) -> Path:
    """Where build-horovod.sh keeps the cpu wheel: keyed by the digest of scripts/patches/horovod-0.28.1-*.patch."""
    import hashlib

    digests = "".join(hashlib.sha256(p.read_bytes()).hexdigest() + "\n"
                      for p in sorted((ROOT / "scripts/patches").glob("horovod-0.28.1-*.patch")))
    return cache / "horovod-0.28.1" / f"cpu-p{hashlib.sha256(digests.encode()).hexdigest()[:16]}"


def _cached_wheel(directory: Path) -> Path:
    """A cached wheel in `directory` with its matching digest record."""
    import hashlib

    directory.mkdir(parents=True)
    wheel = directory / "horovod-0.28.1-cp311-cp311-linux_x86_64.whl"
    wheel.write_bytes(b"the wheel as built")
    (directory / (wheel.name + ".sha256")).write_text(f"{hashlib.sha256(wheel.read_bytes()).hexdigest()}  {wheel.name}\n")
    return wheel


def test_a_tampered_cached_wheel_is_discarded_not_installed(tmp_path):
    import hashlib

    cache = tmp_path / "cache"
    flavour = _key_dir(cache)
    flavour.mkdir(parents=True)
    wheel = flavour / "horovod-0.28.1-cp311-cp311-linux_x86_64.whl"
    wheel.write_bytes(b"the wheel as built")
    record = wheel.with_name(wheel.name + ".sha256")
    record.write_text(f"{hashlib.sha256(b'the wheel as built').hexdigest()}  {wheel.name}\n")
    wheel.write_bytes(b"the wheel, swapped afterwards")  # same name, other bytes
    proc, uv_calls = _run_build_horovod(tmp_path, cache)
    assert "does not match its recorded sha256" in proc.stderr, proc.stderr[-2000:]
    assert not wheel.exists() and not record.exists()
    assert str(wheel) not in uv_calls, uv_calls  # never handed to the installer
    # It went on to a fresh build, whose first step installs the build tools hash-checked.
    assert "--require-hashes" in uv_calls and "requirements/build-tools.txt" in uv_calls, uv_calls
    assert proc.returncode != 0  # the stand-in uv fails that step


def test_a_cached_wheel_matching_its_record_is_installed(tmp_path):
    cache = tmp_path / "cache"
    wheel = _cached_wheel(_key_dir(cache))
    proc, uv_calls = _run_build_horovod(tmp_path, cache)
    assert str(wheel) in uv_calls.splitlines()[0], uv_calls
    assert "does not match" not in proc.stderr


def test_a_wheel_cached_without_the_patches_is_deleted_and_rebuilt(tmp_path):
    """Wheels that older versions of the script cached (the unpatched cpu/ directory, the flat layout before it)
    lack scripts/patches/: deleted, never installed; the script goes on to a fresh, patched build."""
    cache = tmp_path / "cache"
    unpatched = _cached_wheel(cache / "horovod-0.28.1" / "cpu")
    flat = cache / unpatched.name
    flat.write_bytes(b"a wheel of the flat layout")
    proc, uv_calls = _run_build_horovod(tmp_path, cache)
    assert not unpatched.exists() and not flat.exists(), list(cache.rglob("*"))
    assert str(unpatched) not in uv_calls and str(flat) not in uv_calls, uv_calls
    assert "--require-hashes" in uv_calls and "requirements/build-tools.txt" in uv_calls, uv_calls
    assert _key_dir(cache).name in proc.stdout, proc.stdout  # "building horovod 0.28.1 (cpu-p<digest>: ...)"
