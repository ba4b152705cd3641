"""Pipeline configs: named YAML files in configs/pipeline/, with {source}/{workdir} filled in."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tasks import paths
from tasks.common import StageError

PROJECT = paths.REPO


def load_pipeline(name_or_path: str, source: str | None = None, workdir: str | None = None) -> dict[str, Any]:
    """The named pipeline config; `source`/`workdir` override its defaults."""
    cfg = yaml.safe_load(paths.resolve("pipeline", name_or_path).read_text())
    source = source or cfg.get("source")
    workdir = workdir or cfg.get("workdir")
    if not source or not workdir:
        raise StageError(f"pipeline {name_or_path!r} needs a source and a workdir (parameters or config)")
    if "://" not in source:
        source = str(PROJECT / source)  # absolute stays absolute: Path("/a") / "/b" == "/b"
    workdir = str(PROJECT / workdir)
    return _fill({**cfg, "source": source, "workdir": workdir}, {"source": source, "workdir": workdir})


def _fill(node: Any, values: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _fill(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, values) for v in node]
    if isinstance(node, str):
        return node.format(**values)
    return node
