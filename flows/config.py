"""Pipeline configs: named YAML files in configs/pipeline/, with {source}/{workdir} filled in."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tasks.common import StageError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "pipeline"


def load_pipeline(name_or_path: str, **values: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    try:
        cfg = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise StageError(f"no pipeline config {name_or_path!r} (known: {known})") from None
    return _fill(cfg, values)


def _fill(node: Any, values: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _fill(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, values) for v in node]
    if isinstance(node, str):
        return node.format(**values)
    return node
