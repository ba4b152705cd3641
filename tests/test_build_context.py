"""Build contexts carry no keys, registry logins or .env (issue 16, item 2).

A copy of the repository gets the secrets a team really keeps next to it planted: the node SSH key in
infra/compose/ssh/ (where the README puts it), a `docker login` config in infra/compose/docker-config/, the
compose .env, and key/credential files inside the very directories the images copy. Then:
- the training image's context (tasks/container.py, sent to the engine as a tar) holds none of them, and
  exactly the files infra/Dockerfile COPYs;
- the project image's context (infra/compose/Dockerfile, the repository root filtered by the ignore file)
  holds none of them, computed with the docker SDK's own .dockerignore matcher (what docker-compose 1.x
  sends) and, on a real engine, by building a probe image that copies the whole context and listing it.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from helpers import missing
from tasks.container import context_tar, context_files, is_secret_path

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_DOCKERFILE = "infra/compose/Dockerfile"
KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nplanted-by-test_build_context\n-----END OPENSSH PRIVATE KEY-----\n"
PLANTED = {
    "infra/compose/ssh/id_ed25519": KEY,                                   # the README's place for the node key
    "infra/compose/docker-config/config.json": '{"auths": {"registry.example.com": {"auth": "cGxhbnRlZA=="}}}\n',
    ".env": "S3_SECRET_KEY=planted-by-test_build_context\n",
    "infra/id_rsa": KEY,                                                   # infra/ itself (the old training context)
    "infra/hostkeys/ssh_host_ed25519_key": KEY,
    "configs/env/.env": "AWS_SECRET_ACCESS_KEY=planted\n",                 # in a directory both images copy
    "configs/training/.env.local": "TOKEN=planted\n",
    "rn50/server.pem": KEY,
    "rn50/.docker/config.json": '{"auths": {}}\n',
    "tasks/credentials": "[default]\naws_secret_access_key = planted\n",  # the project image copies tasks/
    "flows/.ssh/id_ecdsa": KEY,
    "scripts/requirements/deploy.key": KEY,
}


def _copy_commands(dockerfile: Path) -> list[list[str]]:
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    return [[a for a in ln.split()[1:-1] if not a.startswith("--")] for ln in text.splitlines() if ln.startswith("COPY ")]


@pytest.fixture
def tree(tmp_path) -> Path:
    """The repository's tracked files, plus the planted secrets and a symlink to a secret outside the tree."""
    root = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (ROOT / name).is_file() and not (ROOT / name).is_symlink():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, root / name)
    for name, text in PLANTED.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "outside-secret").write_text(KEY)
    (root / "rn50" / "leak.py").symlink_to(tmp_path / "outside-secret")
    return root


def test_planted_files_all_look_like_secrets():
    assert all(is_secret_path(p) for p in PLANTED), [p for p in PLANTED if not is_secret_path(p)]
    assert not any(is_secret_path(p) for p in ("rn50/train.py", "configs/env/gpu.env", "infra/sshd_config",
                                                "configs/training/nf5488-8xa100.yaml", "infra/entrypoint.sh"))


def test_training_context_is_what_the_dockerfile_copies_and_no_secret(tree):
    files = [str(f) for f in context_files(tree)]
    assert not set(PLANTED) & set(files), set(PLANTED) & set(files)
    assert "rn50/leak.py" not in files
    # What reaches the engine is exactly that list, with no byte of the planted keys.
    with tarfile.open(fileobj=context_tar(tree, [Path(f) for f in files])) as tar:
        members = tar.getmembers()
        assert sorted(m.name for m in members) == sorted(files)
        assert all(m.isfile() for m in members)
        for m in members:
            assert b"planted" not in tar.extractfile(m).read(), m.name
    # Every file is the Dockerfile or under something it COPYs (the env profile ARG points into configs/env/).
    sources = {s.rstrip("/").replace("${RUNTIME_ENV}", "configs/env") for src in _copy_commands(tree / "infra/Dockerfile")
               for s in src}
    sources = {str(Path(s).parent) if s.startswith("configs/env") else s for s in sources}
    for f in files:
        assert f == "infra/Dockerfile" or any(f == s or f.startswith(s + "/") for s in sources), f
    for s in sources:
        assert any(f == s or f.startswith(s + "/") for f in files), f"the context lacks {s}, which the image COPYs"


def _ignore_patterns(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_project_image_ignore_files_agree():
    # BuildKit (docker compose v2) reads the Dockerfile's own ignore file; the classic builder and
    # docker-compose 1.x read the root one. They must be the same list.
    assert (ROOT / ".dockerignore").read_text() == (ROOT / "infra/compose/Dockerfile.dockerignore").read_text()


def test_project_image_context_has_the_sources_and_no_secret(tree):
    from docker.utils.build import exclude_paths

    included = set(exclude_paths(str(tree), _ignore_patterns(tree / ".dockerignore"), dockerfile=COMPOSE_DOCKERFILE))
    assert not set(PLANTED) & included, set(PLANTED) & included
    assert not {p for p in included if p.startswith((".venv/", ".git/", "tests/"))}
    for src in _copy_commands(tree / COMPOSE_DOCKERFILE):
        for s in src:
            s = s.rstrip("/")
            assert s in included or any(p.startswith(s + "/") for p in included), f"COPY {s} would find nothing"


@pytest.mark.timeout(600)
def test_project_image_context_on_a_real_engine(docker_url, tree):
    """What a real engine receives for infra/compose/Dockerfile: a probe Dockerfile at that path (so the same
    ignore files apply) copies the entire context into an image, which is then listed."""
    import docker

    from tests.docker_engine import NoEngine, base_image

    try:
        base = base_image(docker_url)
    except NoEngine as e:
        missing(f"no base image for the probe: {e}")
    (tree / COMPOSE_DOCKERFILE).write_text(f"FROM {base}\nCOPY . /ctx/\n")
    client = docker.DockerClient(base_url=docker_url, version="auto")
    tag = "rn50-test/context-probe:1"
    try:
        client.images.build(path=str(tree), dockerfile=COMPOSE_DOCKERFILE, tag=tag, network_mode="none", rm=True)
        listing = client.containers.run(tag, ["find", "/ctx", "-type", "f"], network_mode="none", remove=True)
        sent = {line[len("/ctx/"):] for line in listing.decode().splitlines()}
        grep = client.containers.run(tag, ["sh", "-c", "grep -rl planted /ctx || true"], network_mode="none", remove=True)
    finally:
        try:
            client.images.remove(tag, force=True)
        except docker.errors.ImageNotFound:
            pass
    assert "rn50/train.py" in sent and "uv.lock" in sent and "infra/compose/deploy.sh" in sent
    assert not set(PLANTED) & sent, set(PLANTED) & sent
    assert grep.decode().split() == [], grep.decode()
