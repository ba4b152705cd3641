"""A stage's code version (flows/cache.py) covers every tasks module the stage runs, so changing how a stage
works invalidates its cache."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_code_version_covers_modules_loaded_by_name():
    """The launcher backends are loaded by name (tasks.launch.BACKENDS, "module:Class"): the train and distribute
    stages' code versions cover them as they cover an import, so a change in the Slurm backend reruns them."""
    import tasks.distribute
    import tasks.train
    from flows.cache import code_files

    for module in (tasks.train, tasks.distribute):
        names = {p.relative_to(ROOT).as_posix() for p in code_files(module)}
        assert {"tasks/launch/__init__.py", "tasks/launch/ssh.py", "tasks/launch/slurm.py"} <= names, sorted(names)
        assert "tasks/common.py" not in names  # shared plumbing stays out of every stage's version
