"""Container stage: build the training image through the Docker Engine API, tagged by content.

The tag is rn50:<first 16 hex of sha256 over every file that goes into the build context, the base
image and the build args>. An image already carrying that tag (locally, or in the configured
registry) is a cache hit and nothing is done; otherwise the image is built from a minimal context
(never the work tree's venv or data), the build log is streamed, and the image is optionally pushed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import re
import sys
import tarfile
import time
from pathlib import Path
from typing import Iterable

from tasks.common import Result, StageError
from tasks.paths import REPO

log = logging.getLogger("rn50.container")

# The NGC tag NVIDIA used for MLPerf ResNet. Tags are mutable: pin a digest where you can reach the registry,
#   docker pull nvcr.io/nvidia/mxnet:23.09-py3 && docker inspect --format '{{index .RepoDigests 0}}' nvcr.io/nvidia/mxnet:23.09-py3
# and give `container.from_image: nvcr.io/nvidia/mxnet:23.09-py3@sha256:<digest>` (or `rn50 build --from ...`): the
# engine then refuses any other image under that name, and the digest is part of the content hash.
DEFAULT_FROM = "nvcr.io/nvidia/mxnet:23.09-py3"
# Exactly what infra/Dockerfile COPYs (plus the Dockerfile itself); nothing else in the tree (venv, data, runs,
# the compose stack's key and registry-login directories, .env) is hashed or sent to the engine.
CONTEXT_PATHS = ("infra/Dockerfile", "infra/requirements-node.txt", "infra/sshd_config", "infra/entrypoint.sh",
                 "rn50", "configs/training", "configs/env")
_SKIP_PARTS = {"__pycache__", ".pytest_cache"}
# Never part of an image even inside a context directory: private keys, certificates, registry logins,
# cloud credentials, dotenv files. Matched on every path component, case-insensitively.
_SECRET_DIRS = {".ssh", ".docker", ".aws", ".gnupg", "docker-config", "hostkeys"}
_SECRET_NAME = re.compile(
    r"^(id_[a-z0-9_]+(\.pub)?|ssh_host_.*|.*\.(pem|key|p12|pfx|jks|keystore|der|crt)|\.env(\..*)?|\.netrc|\.pypirc|"
    r"\.git-credentials|credentials(\.json)?|config\.json|.*\.secret|.*_secret)$", re.I)


# Build args the build sets itself: the base image is container.from_image (pinned by digest where given) and the
# content hash is the tag; both are recorded in the result and the image label, so a build arg may not change them.
PINNED_ARGS = {"FROM_IMAGE_NAME": "container.from_image (rn50 build --from)", "RN50_CONTENT_HASH": "the build"}
# Docker's predefined proxy args: they reach the RUN steps' network only, not the image or what is recorded.
_PROXY_ARGS = {p for n in ("HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "NO_PROXY", "ALL_PROXY") for p in (n, n.lower())}


def check_build_args(build_args: dict[str, str], root: Path = REPO) -> None:
    """A one-line StageError for a build arg that would make the recorded provenance false: one the build pins,
    or one infra/Dockerfile does not declare (BuildKit reads some, e.g. BUILDKIT_SYNTAX picks the frontend)."""
    declared = set(re.findall(r"^\s*ARG\s+([A-Za-z_][A-Za-z0-9_]*)", (root / "infra/Dockerfile").read_text(), re.M))
    allowed = declared - set(PINNED_ARGS)
    for k in build_args:
        if k in PINNED_ARGS:
            raise StageError(f"build arg {k} is set by {PINNED_ARGS[k]} and recorded as the image's provenance: "
                             f"refusing to override it")
        if k not in allowed | _PROXY_ARGS:
            raise StageError(f"build arg {k!r} is not an ARG of infra/Dockerfile (expected one of: "
                             f"{', '.join(sorted(allowed))}, or a proxy variable): refusing it")


def is_secret_path(rel: Path | str) -> bool:
    """True for a path that looks like a key, a credential or a registry/cloud config (see _SECRET_NAME)."""
    parts = Path(rel).parts
    return bool({p.lower() for p in parts[:-1]} & _SECRET_DIRS) or bool(parts and _SECRET_NAME.match(parts[-1]))


@dataclasses.dataclass
class ImageResult(Result):
    tag: str  # repository:content-hash (with the registry prefix when one is configured)
    built: bool  # False: cache hit, nothing was done
    content_hash: str
    image_id: str | None
    from_image: str
    pushed: bool
    source: str  # "local" | "registry" | "build"
    log_path: str | None
    duration_s: float


def context_files(root: Path = REPO) -> list[Path]:
    """Files of the build context, relative to `root`, sorted (so the hash is order-independent).

    Regular files only: symlinks are left out (a link to ~/.ssh would otherwise be hashed through), and so is
    anything `is_secret_path` matches, each with a warning."""
    out: set[Path] = set()
    for rel in CONTEXT_PATHS:
        p = root / rel
        candidates = [p] if p.is_file() or p.is_symlink() else sorted(p.rglob("*")) if p.is_dir() else []
        for f in candidates:
            r = f.relative_to(root)
            if _SKIP_PARTS & set(r.parts) or f.suffix in (".pyc", ".pyo"):
                continue
            if f.is_symlink():
                log.warning("build context: %s is a symlink, left out", r)
            elif is_secret_path(r):
                log.warning("build context: %s looks like a key or credential, left out", r)
            elif f.is_file():
                out.add(r)
    if Path("infra/Dockerfile") not in out:
        raise StageError(f"{root / 'infra/Dockerfile'} does not exist")
    return sorted(out)


def content_hash(root: Path = REPO, from_image: str = DEFAULT_FROM, build_args: dict[str, str] | None = None) -> str:
    h = hashlib.sha256()
    for rel in context_files(root):
        data = (root / rel).read_bytes()
        # path, mode bit that matters (executable), length, bytes: renames and chmod +x change the image too
        h.update(f"{rel}\0{(root / rel).stat().st_mode & 0o111:o}\0{len(data)}\0".encode())
        h.update(data)
    h.update(f"FROM_IMAGE_NAME={from_image}\0".encode())
    for k, v in sorted((build_args or {}).items()):
        h.update(f"ARG {k}={v}\0".encode())
    return h.hexdigest()[:16]


def context_tar(root: Path, files: Iterable[Path]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for rel in files:
            info = tar.gettarinfo(str(root / rel), arcname=str(rel))
            # Reproducible context: ownership and times do not change what is built.
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            with open(root / rel, "rb") as f:
                tar.addfile(info, f)
    buf.seek(0)
    return buf


def _client(docker_host: str | None):
    import docker

    try:
        client = docker.DockerClient(base_url=docker_host, version="auto") if docker_host else docker.from_env(version="auto")
        client.ping()
        return client
    except Exception as e:  # docker raises several unrelated types for "no engine"
        where = docker_host or "DOCKER_HOST / the default socket"
        raise StageError(f"no Docker engine reachable at {where}: {str(e).splitlines()[0][:200]}") from None


def _exists_locally(client, tag: str) -> str | None:
    import docker.errors

    try:
        return client.images.get(tag).id
    except docker.errors.ImageNotFound:
        return None


def _exists_in_registry(client, tag: str) -> bool:
    import docker.errors

    try:
        client.images.get_registry_data(tag)
        return True
    except docker.errors.NotFound:
        return False
    except docker.errors.APIError as e:
        # "manifest unknown" arrives as a plain APIError from some registries
        if "manifest unknown" in str(e).lower() or "not found" in str(e).lower():
            return False
        raise StageError(f"registry for {tag} did not answer: {str(e).splitlines()[0][:200]}") from None


def build_image(
    root: Path | str = REPO,
    from_image: str = DEFAULT_FROM,
    registry: str | None = None,
    push: bool = False,
    build_args: dict[str, str] | None = None,
    repository: str = "rn50",
    docker_host: str | None = None,
    network_mode: str | None = None,
    log_path: Path | str | None = None,
    logger: logging.Logger | None = None,
) -> ImageResult:
    """Build infra/Dockerfile (FROM `from_image`) as <registry/>rn50:<content hash> unless it exists.

    `build_args` are extra Dockerfile ARGs (e.g. RUNTIME_ENV, APT_PACKAGES, PIP_INSTALL); they are part
    of the hash. `network_mode` is passed to the build's RUN steps (e.g. "host" where the default
    bridge is disabled). The build log goes to the logger and, if given, to `log_path`.
    """
    logger = logger or log
    root = Path(root).resolve()
    started = time.time()
    build_args = {str(k): str(v) for k, v in (build_args or {}).items()}
    check_build_args(build_args, root)
    chash = content_hash(root, from_image, build_args)
    name = f"{registry.rstrip('/')}/{repository}" if registry else repository
    tag = f"{name}:{chash}"
    if push and not registry:
        raise StageError("--push needs --registry (where to push)")
    client = _client(docker_host)

    def result(**kw) -> ImageResult:
        return ImageResult(tag=tag, content_hash=chash, from_image=from_image,
                           log_path=str(log_path) if log_path else None,
                           duration_s=round(time.time() - started, 3), **kw)

    image_id = _exists_locally(client, tag)
    if image_id:
        logger.info("image %s already exists locally: nothing to build", tag)
        return result(built=False, image_id=image_id, pushed=False, source="local")
    if registry and _exists_in_registry(client, tag):
        logger.info("image %s already exists in %s: nothing to build", tag, registry)
        return result(built=False, image_id=None, pushed=False, source="registry")

    files = context_files(root)
    logger.info("building %s from %s (%d context files)", tag, from_image, len(files))
    args = {"FROM_IMAGE_NAME": from_image, "RN50_CONTENT_HASH": chash, **build_args}
    logfile = open(log_path, "w") if log_path else None
    lines: list[str] = []
    try:
        stream = client.api.build(
            fileobj=context_tar(root, files), custom_context=True, dockerfile="infra/Dockerfile",
            tag=tag, buildargs=args, rm=True, forcerm=True, pull=False, decode=True,
            network_mode=network_mode, labels={"org.rn50.content-hash": chash},
        )
        image_id = None
        for chunk in stream:
            if "stream" in chunk:
                for line in chunk["stream"].splitlines():
                    if line.strip():
                        lines.append(line)
                        logger.info("[build] %s", line)
                        if logfile:
                            logfile.write(line + "\n")
            if "aux" in chunk and "ID" in chunk["aux"]:
                image_id = chunk["aux"]["ID"]
            if "error" in chunk:
                err = chunk["error"].strip().splitlines()[-1] if chunk["error"].strip() else "unknown error"
                if logfile:
                    logfile.write("ERROR: " + chunk["error"] + "\n")
                raise StageError(f"docker build of {tag} failed: {err[:300]}")
    except StageError:
        raise
    except Exception as e:
        raise StageError(f"docker build of {tag} failed: {str(e).splitlines()[0][:300]}") from None
    finally:
        if logfile:
            logfile.close()
    image_id = image_id or _exists_locally(client, tag)
    if not image_id:
        raise StageError(f"docker build of {tag} finished but the engine has no such image")
    pushed = False
    if push:
        logger.info("pushing %s", tag)
        for chunk in client.api.push(name, tag=chash, stream=True, decode=True):
            if "error" in chunk:
                raise StageError(f"push of {tag} failed: {chunk['error'].strip()[:300]}")
            if chunk.get("status") and "id" not in chunk:
                logger.info("[push] %s", chunk["status"])
        pushed = True
    return result(built=True, image_id=image_id, pushed=pushed, source="build")


def add_command(subparsers) -> None:
    p = subparsers.add_parser("build", help="build the training image (content-addressed tag, cached)",
                              description="Build infra/Dockerfile through the Docker engine as rn50:<content hash> "
                                          "(the hash covers the build context, the base image and the build args). "
                                          "An image already carrying that tag, locally or in --registry, is reused and "
                                          "nothing is built. Prints the result as JSON.")
    p.add_argument("--from", dest="from_image", default=DEFAULT_FROM, help=f"base image (default {DEFAULT_FROM})")
    p.add_argument("--registry", default=None, help="registry prefix, e.g. registry.example:5000/team")
    p.add_argument("--push", action="store_true", help="push the built image to --registry")
    p.add_argument("--build-arg", action="append", default=[], metavar="NAME=VALUE",
                   help="extra Dockerfile ARG (e.g. RUNTIME_ENV=configs/env/cpu.env)")
    p.add_argument("--network", default=None, help="network mode for RUN steps (e.g. host)")
    p.add_argument("--log", type=Path, default=None, help="also write the build log here")
    p.set_defaults(run=_cli)


def _cli(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    build_args = {}
    for item in args.build_arg:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise StageError(f"--build-arg {item!r}: expected NAME=VALUE")
        build_args[k] = v
    res = build_image(from_image=args.from_image, registry=args.registry, push=args.push,
                      build_args=build_args, network_mode=args.network, log_path=args.log)
    print(res.to_json())
    return 0
