"""Cache keys of the rn50 flow: content, never path strings.

Each key names exactly what the stage's output depends on. Prefect stores a stage's result under
its key; the flow also checks the stage's stamp (tasks.common.stamp_valid) so that a cached stage
whose outputs were deleted or altered runs again. Nothing here reads image data: validating the
cache costs the same for 1 k and 1.28 M images.
"""
from __future__ import annotations

import hashlib
import inspect
from functools import lru_cache
from pathlib import Path
from typing import Any

from tasks.common import digest_of


@lru_cache(maxsize=None)
def code_version(module: Any) -> str:
    """Digest of a stage's source file: changing how a stage works invalidates its cache."""
    return hashlib.sha256(Path(inspect.getfile(module)).read_bytes()).hexdigest()[:16]


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


def train_key(packed: dict[str, Any], image: dict[str, Any] | None, settings: dict[str, Any], training_code: str) -> str:
    return digest_of(["train", packed["content_digest"], (image or {}).get("tag"), settings, training_code])


def nightly_key(flow_run_id: Any) -> str:
    # A regression check is about tonight's run: never served from cache.
    return digest_of(["nightly", str(flow_run_id)])


def compliance_key(logs_digest: list[str], settings: dict[str, Any], code: str) -> str:
    return digest_of(["compliance", logs_digest, settings, code])


def archive_key(parts: list[Any], settings: dict[str, Any], code: str) -> str:
    return digest_of(["archive", parts, settings, code])


def tree_digest(root: Path, pattern: str = "**/*") -> str:
    """Digest of the source files under `root` (the training package is small; data is never hashed here)."""
    h = hashlib.sha256()
    for p in sorted(root.glob(pattern)):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()
