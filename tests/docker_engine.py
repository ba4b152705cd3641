"""A real Docker engine and a local base image for the docker tests.

Uses the engine at DOCKER_HOST / /var/run/docker.sock when one answers; otherwise starts Debian's
`dockerd` with the flags DESIGN.md gives (no iptables, no bridge: nothing touches the host network)
on a private socket, and stops it afterwards. No registry is reachable, so the base image comes from
`debootstrap --variant=minbase bookworm` piped into `docker import`; the rootfs tarball and the
engine's data root are cached under ~/.cache/rn50-pipeline/ so a rerun neither debootstraps nor
re-imports.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rn50-pipeline"
BASE_TAR = CACHE / "base" / "bookworm-minbase.tar"
BASE_TAG = "rn50-test/bookworm-minbase:1"
DEBIAN_MIRROR = "http://deb.debian.org/debian"


class NoEngine(Exception):
    pass


def _ping(base_url: str) -> bool:
    import docker

    try:
        docker.DockerClient(base_url=base_url, version="auto", timeout=5).ping()
        return True
    except Exception:
        return False


def _start_dockerd(data_root: Path, driver: str) -> tuple[subprocess.Popen, str, Path]:
    run = Path(tempfile.mkdtemp(prefix="rn50-dockerd-"))
    sock = f"unix://{run}/docker.sock"
    log = run / "dockerd.log"
    proc = subprocess.Popen(
        ["dockerd", f"--storage-driver={driver}", "--iptables=false", "--ip-masq=false", "--bridge=none",
         f"--data-root={data_root}", f"--exec-root={run}/exec", f"--pidfile={run}/dockerd.pid", "-H", sock],
        stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True,
    )
    deadline = time.time() + 30
    while time.time() < deadline and proc.poll() is None:
        if _ping(sock):
            return proc, sock, run
        time.sleep(0.3)
    proc.kill()
    proc.wait()
    tail = log.read_text().strip().splitlines()[-3:] if log.exists() else []
    shutil.rmtree(run, ignore_errors=True)
    raise NoEngine(f"dockerd --storage-driver={driver} did not come up: {' | '.join(tail)[:300]}")


@contextlib.contextmanager
def engine() -> Iterator[str]:
    """Yield a base_url of a running engine; stop the daemon afterwards only if we started it."""
    for url in filter(None, [os.environ.get("DOCKER_HOST"), "unix:///var/run/docker.sock"]):
        if _ping(url):
            yield url
            return
    if shutil.which("dockerd") is None:
        raise NoEngine("no Docker engine answers and `dockerd` is not installed (Debian: docker.io)")
    if os.geteuid() != 0:
        raise NoEngine("no Docker engine answers and starting dockerd needs root")
    errors = []
    proc = url = run = None
    # overlay2 first (measured to work here); vfs works on any filesystem, just slower.
    for driver in ("overlay2", "vfs"):
        try:
            proc, url, run = _start_dockerd(CACHE / f"dockerd-{driver}", driver)
            break
        except NoEngine as e:
            errors.append(str(e))
    if proc is None:
        raise NoEngine("; ".join(errors))
    try:
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(run, ignore_errors=True)


def base_image(base_url: str) -> str:
    """Tag of a minimal Debian bookworm image in the engine (debootstrapped once, then cached)."""
    import docker

    return debootstrap_image(docker.DockerClient(base_url=base_url, version="auto"), BASE_TAG, BASE_TAR)


def debootstrap_image(client, tag: str, tar: Path, include: str = "") -> str:
    """`tag` in the engine: bookworm minbase (+ `include`, comma-separated Debian packages), debootstrapped
    once into the tarball `tar` (kept as a cache outside the repo) and imported."""
    import docker.errors

    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    if not tar.exists():
        if shutil.which("debootstrap") is None:
            raise NoEngine(f"no cached {tar.name} and `debootstrap` is not installed (Debian: debootstrap)")
        tar.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=tar.parent) as tmp:
            rootfs = Path(tmp) / "rootfs"
            extra = [f"--include={include}"] if include else []
            r = subprocess.run(["debootstrap", "--variant=minbase", *extra, "bookworm", str(rootfs), DEBIAN_MIRROR],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise NoEngine(f"debootstrap failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
            part = tar.with_suffix(".tar.part")
            subprocess.run(["tar", "-C", str(rootfs), "-cf", str(part), "."], check=True)
            part.rename(tar)
    repo, name = tag.split(":")
    client.api.import_image(src=str(tar), repository=repo, tag=name)
    client.images.get(tag)
    return tag
