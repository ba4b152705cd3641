"""Container stage against a real Docker engine (Debian's docker.io, started here if none runs).

The test image is the real infra/Dockerfile on a locally debootstrapped Debian base (no registry is
reachable): APT_PACKAGES="" and PIP_INSTALL=0 skip the two steps that need the network, everything
else (COPY of rn50/, the env profile, the entrypoint, the content-hash label) is exercised for real.
"""
from __future__ import annotations

import shutil

import pytest

from helpers import missing
from tasks.common import StageError
from tasks.container import REPO, build_image, content_hash, context_files

pytestmark = pytest.mark.timeout(600)
OFFLINE_ARGS = {"APT_PACKAGES": "", "PIP_INSTALL": "0"}


@pytest.fixture
def tree(tmp_path):
    """A copy of the build context, so a test can change rn50/ without touching the work tree."""
    root = tmp_path / "src"
    for rel in context_files(REPO):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, root / rel)
    return root


def _run(url, tag, *cmd):
    import docker

    client = docker.DockerClient(base_url=url, version="auto")
    return client.containers.run(tag, list(cmd), network_mode="none", remove=True).decode().strip()


def _remove(url, *tags):
    import docker

    client = docker.DockerClient(base_url=url, version="auto")
    for t in tags:
        try:
            client.images.remove(t, force=True)
        except docker.errors.ImageNotFound:
            pass


def test_docker_build_cache_hit_and_rebuild_on_change(docker_url, docker_base, tree, tmp_path):
    base = docker_base
    tags = []
    first = build_image(tree, from_image=base, build_args=OFFLINE_ARGS, docker_host=docker_url,
                        network_mode="none", log_path=tmp_path / "build.log")
    tags.append(first.tag)
    try:
        assert first.built and first.source == "build"
        assert first.tag == f"rn50:{first.content_hash}" and len(first.content_hash) == 16
        assert first.content_hash == content_hash(tree, base, OFFLINE_ARGS)
        assert "Successfully built" in (tmp_path / "build.log").read_text()
        # The image carries the hash, the package and the runtime profile (exported by the entrypoint).
        assert _run(docker_url, first.tag, "cat", "/etc/rn50/content-hash") == first.content_hash
        assert _run(docker_url, first.tag, "sh", "-c", "test -f /opt/rn50/rn50/__init__.py && echo yes") == "yes"
        assert _run(docker_url, first.tag, "sh", "-c", "echo $MXNET_ENGINE_TYPE $OMP_NUM_THREADS") == \
            "ThreadedEnginePerDevice 3"

        again = build_image(tree, from_image=base, build_args=OFFLINE_ARGS, docker_host=docker_url, network_mode="none")
        assert (again.built, again.source, again.tag, again.image_id) == (False, "local", first.tag, first.image_id)

        (tree / "rn50" / "__init__.py").write_text((tree / "rn50" / "__init__.py").read_text() + "\n# changed\n")
        changed = build_image(tree, from_image=base, build_args=OFFLINE_ARGS, docker_host=docker_url, network_mode="none")
        tags.append(changed.tag)
        assert changed.built and changed.tag != first.tag
        assert _run(docker_url, changed.tag, "tail", "-n1", "/opt/rn50/rn50/__init__.py") == "# changed"
    finally:
        _remove(docker_url, *tags)


def test_docker_build_failure_is_one_line(docker_url, tree):
    # A base image that is neither local nor pullable (no registry here): the build must fail cleanly.
    with pytest.raises(StageError) as e:
        build_image(tree, from_image="rn50-test/does-not-exist:1", build_args=OFFLINE_ARGS,
                    docker_host=docker_url, network_mode="none")
    assert "docker build of rn50:" in str(e.value) and "\n" not in str(e.value)


def test_docker_unreachable_engine_is_one_line(tmp_path):
    with pytest.raises(StageError) as e:
        build_image(REPO, docker_host=f"unix://{tmp_path}/no-such.sock")
    assert "no Docker engine reachable" in str(e.value) and "\n" not in str(e.value)


def test_content_hash_tracks_context_only(tree):
    h0 = content_hash(tree)
    (tree / "rn50" / "__pycache__").mkdir(exist_ok=True)
    (tree / "rn50" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"junk")
    (tree / "configs" / "inventory").mkdir(exist_ok=True)
    (tree / "configs" / "inventory" / "mine.yaml").write_text("hosts: []\n")
    (tree / "infra" / "compose" / "ssh").mkdir(parents=True, exist_ok=True)
    (tree / "infra" / "compose" / "ssh" / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (tree / "infra" / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (tree / "infra" / "start-node.sh").write_text("# not copied into the image\n")
    (tree / "README.md").write_text("not in the context\n")
    (tree / "uv.lock").write_text("the training image does not install from the lock\n")
    assert content_hash(tree) == h0
    assert content_hash(tree, from_image="other:1") != h0
    assert content_hash(tree, build_args={"RUNTIME_ENV": "configs/env/cpu.env"}) != h0
    (tree / "infra" / "requirements-node.txt").write_text((tree / "infra" / "requirements-node.txt").read_text() + "\n")
    assert content_hash(tree) != h0


def test_training_image_has_no_stock_sshd_host_keys(docker_url, tree):
    """Debian's openssh-server makes host keys when installed; every container of the image would share them
    and anyone with the image holds them. The node's sshd uses its own key (/etc/rn50/hostkeys), so the image
    must carry none in /etc/ssh. Built on a base with openssh-server installed (as APT_PACKAGES does it)."""
    import docker

    from tests.docker_engine import CACHE, NoEngine, debootstrap_image

    client = docker.DockerClient(base_url=docker_url, version="auto")
    try:  # the node base of test_train_docker_runtime.py (same tag and cached tarball)
        base = debootstrap_image(client, "rn50-test/bookworm-sshd:1", CACHE / "base" / "bookworm-sshd.tar",
                                 "openssh-server,libgomp1,libquadmath0,libsqlite3-0")
    except NoEngine as e:
        missing(f"no sshd base image: {e}")
    keys = "ls /etc/ssh | grep '^ssh_host_' || true"
    assert _run(docker_url, base, "sh", "-c", keys), "the base has no stock host keys: the test would prove nothing"
    res = build_image(tree, from_image=base, build_args=OFFLINE_ARGS, docker_host=docker_url, network_mode="none")
    try:
        assert _run(docker_url, res.tag, "sh", "-c", keys) == ""
        assert _run(docker_url, res.tag, "sh", "-c", "test -x /usr/sbin/sshd && echo sshd") == "sshd"
    finally:
        _remove(docker_url, res.tag)
