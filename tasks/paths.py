"""Where things are in this checkout, and the one resolver for "a config name or a path".

Every config kind keeps its folder under `configs/` (see configs/README.md). A value that names a
file (it has a suffix or a `/`) is taken as a path; anything else is a name in the kind's folder.
`rn50/config.py` resolves training configs the same way on its own: the training package runs on the
nodes without `tasks/`.
"""
from __future__ import annotations

from pathlib import Path

from tasks.common import StageError

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
# kind -> (folder, file suffix)
KINDS = {
    "pipeline": (CONFIGS / "pipeline", ".yaml"),
    "training": (CONFIGS / "training", ".yaml"),
    "systems": (CONFIGS / "systems", ".yaml"),
    "inventory": (CONFIGS / "inventory", ".yaml"),
    "env": (CONFIGS / "env", ".env"),
}


def known(kind: str) -> list[str]:
    folder, suffix = KINDS[kind]
    return sorted(p.stem for p in folder.glob(f"*{suffix}"))


def is_path(name_or_path: str | Path) -> bool:
    s = str(name_or_path)
    return "/" in s or bool(Path(s).suffix)


def resolve(kind: str, name_or_path: str | Path) -> Path:
    """The file a config name or path stands for; a one-line StageError naming the known ones if absent."""
    folder, suffix = KINDS[kind]
    path = Path(name_or_path) if is_path(name_or_path) else folder / f"{name_or_path}{suffix}"
    if not path.is_file():
        where = str(path) if is_path(name_or_path) else f"{path.relative_to(REPO)}"
        raise StageError(f"no {kind} config {str(name_or_path)!r}: {where} does not exist "
                         f"(known: {', '.join(known(kind)) or 'none'})")
    return path
