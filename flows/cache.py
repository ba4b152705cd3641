"""Cache keys of the rn50 flow: content, never path strings.

Each key names exactly what the stage's output depends on. Prefect stores a stage's result under
its key; the flow also checks the stage's stamp (tasks.common.stamp_valid) so that a cached stage
whose outputs were deleted or altered runs again. Nothing here reads image data: validating the
cache costs the same for 1 k and 1.28 M images.

No key holds the work dir's path, the source's location or a config file's path: moving the work dir
(`mv`) or reading the archives from a copy elsewhere keeps every key, and the results cached under them
name the work dir as `$WORKDIR` (flows/stages.py), so every stage is a cache hit there.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from tasks.common import Workdir, digest_of, relocatable

# Shared plumbing every stage imports (the work-dir layout, atomic writes, stamps, the repo's paths):
# not part of any stage's code version, or each change to it would throw away every cached stage.
SHARED = frozenset({"tasks.common", "tasks.paths"})


def _parse(path: Path) -> ast.AST:
    # CPython 3.11 before 3.11.8 keeps the AST converter's recursion depth in state shared by all threads
    # (gh-106905): an ast.parse racing one in another thread of the flow-run process (Prefect's own) can fail
    # with "AST constructor recursion depth mismatch". Seen once in a demo rerun after a cancel; parsing again
    # gives the right tree, so the flow does not fail on an interpreter bug.
    source = path.read_bytes()
    for attempt in (1, 2, 3):
        try:
            return ast.parse(source, str(path))
        except SystemError as e:
            if "recursion depth mismatch" not in str(e) or attempt == 3:
                raise


# A module loaded by name at run time ("tasks.launch.slurm:SlurmLauncher", the launcher registry) is a dependency
# as much as an import is.
_LOADED_BY_NAME = re.compile(r"(tasks(?:\.\w+)+):\w+")


def _tasks_imports(path: Path) -> set[str]:
    """The `tasks.*` modules a source file imports, at module level or inside functions, or names in a
    "module:attribute" string."""
    out: set[str] = set()
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = _LOADED_BY_NAME.fullmatch(node.value)
            if m:
                out.add(m.group(1))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("tasks."))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "tasks":
                out.update(f"tasks.{a.name}" for a in node.names)
            elif node.module.startswith("tasks."):
                out.add(node.module)
    return out


def code_files(module: Any) -> list[Path]:
    """The source files of a stage module and of every `tasks.*` module it depends on, directly or not
    (e.g. tasks.pack -> tasks.recordio, tasks.workers, tasks.ilsvrc), but the shared plumbing (SHARED)."""
    seen: dict[str, Path] = {module.__name__: Path(inspect.getfile(module))}
    todo = [seen[module.__name__]]
    while todo:
        for name in sorted(_tasks_imports(todo.pop()) - SHARED - set(seen)):
            spec = importlib.util.find_spec(name)
            if spec is None or not spec.origin or not spec.origin.endswith(".py"):
                continue  # `from tasks import x` where x is not a module
            seen[name] = Path(spec.origin)
            todo.append(seen[name])
    return [seen[n] for n in sorted(seen)]


@lru_cache(maxsize=None)
def code_version(module: Any) -> str:
    """Digest of a stage's source and of the tasks modules it uses: changing how a stage works invalidates its cache."""
    h = hashlib.sha256()
    for p in code_files(module):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def fetch_key(expected_md5: dict[str, str]) -> str:
    # The three archives are fully named by their digests, wherever they are downloaded from.
    return digest_of(["fetch", expected_md5])


def verify_key(fetched: dict[str, Any], code: str) -> str:
    return digest_of(["verify", fetched["md5"], code])


def pack_key(verified: dict[str, Any], code: str) -> str:
    # The pack stage's own key: manifest digest + the settings that determine the output bytes
    # (thread count and --full-check do not: every thread count writes identical files).
    from tasks.pack import pack_key as stage_key

    return digest_of(["pack", stage_key(verified["manifest_digest"]), code])


def container_key(context_digest: str, settings: dict[str, Any]) -> str:
    return digest_of(["container", context_digest, settings])


def distribute_key(packed: dict[str, Any], hosts_digest: str, code: str) -> str:
    # The packed bytes and the hosts file's contents (its hosts, data_dir, data_local) decide every copy.
    return digest_of(["distribute", packed["content_digest"], hosts_digest, code])


def train_key(packed: dict[str, Any], image: dict[str, Any] | None, settings: dict[str, Any], training_code: str) -> str:
    return digest_of(["train", packed["content_digest"], (image or {}).get("tag"), settings, training_code])


def train_settings(runs: int, hosts_digest: str | None, config_digest: str) -> dict[str, Any]:
    """What of the train section decides the runs: their number and the contents of the inventory and of
    the training config (not their file names or places: a copied inventory trains the same)."""
    return {"runs": runs, "hosts_digest": hosts_digest, "config_digest": config_digest}


def nightly_key(flow_run_id: Any) -> str:
    # A regression check is about tonight's run: never served from cache.
    return digest_of(["nightly", str(flow_run_id)])


def compliance_key(logs_digest: list[str], settings: dict[str, Any], code: str) -> str:
    return digest_of(["compliance", logs_digest, settings, code])


def archive_contents(workdir: str | Path, include_checkpoints: bool) -> list[list[Any]]:
    """What the archive stage would store: [key, size] of each file tasks.archive.collect lists (keys are
    relative to the work dir; the repo's configs by their bytes' digest). Sizes, not hashes: the files that
    matter most (logs, manifest, reports) are already pinned by the other stages' content digests."""
    from tasks.archive import collect

    out = []
    for key, path in collect(workdir, include_checkpoints):
        if key.startswith("repo/"):
            out.append([key, hashlib.sha256(path.read_bytes()).hexdigest()])
        else:
            out.append([key, path.stat().st_size])
    return out


def archive_key(parts: list[Any], settings: dict[str, Any], code: str, workdir: str | Path,
                contents: list[list[Any]] | None = None) -> str:
    """`parts`: the content digests of what is archived; `settings`: the archive section, its URI with the
    work dir written as `$WORKDIR` (the demo archives to file://{workdir}/archive, which moves with the work
    dir); `contents`: archive_contents() (the files to archive, by key and size)."""
    return digest_of(["archive", parts, relocatable(settings, Workdir(workdir).root, workdir), contents, code])


def tree_digest(root: Path, pattern: str = "**/*") -> str:
    """Digest of the source files under `root` (the training package is small; data is never hashed here)."""
    h = hashlib.sha256()
    for p in sorted(root.glob(pattern)):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()
