"""Prefect tasks for the stages: one thin wrapper each around the plain function in tasks/.

`stage()` adds what every stage gets from Prefect — retries, a content-keyed cache with serializable
isolation (two concurrent flow runs never both execute an expensive stage), a stamp recording the
outputs, and the stage's artifacts — so each wrapper below only says what is specific to it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.locking.filesystem import FileSystemLockManager

from tasks.common import Workdir, write_stamp

LOCKS = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser() / "rn50-locks"


def _policy(stage: str) -> CacheKeyFnPolicy:
    return CacheKeyFnPolicy(cache_key_fn=lambda ctx, params: f"rn50-{stage}-{params['key']}").configure(
        isolation_level="SERIALIZABLE", lock_manager=FileSystemLockManager(LOCKS))


def stage(name: str, outputs: Callable[[Workdir, dict], Iterable[Path]], retries: int = 2,
          publish: Callable[[dict], None] | None = None):
    """Wrap `fn(workdir, **kwargs) -> Result` as the Prefect task `name`, called as `task(key, workdir, **kwargs)`."""

    def deco(fn: Callable[..., Any]):
        def run(key: str, workdir: str, **kwargs: Any) -> dict:
            result = fn(workdir, **kwargs).to_dict()
            wd = Workdir(workdir)
            write_stamp(wd, f"flow-{name}", key, result, outputs(wd, result))
            if publish:
                publish(result)
            return result

        run.__name__, run.__doc__ = fn.__name__, fn.__doc__
        return task(name=name, retries=retries, retry_delay_seconds=[2, 10, 30], cache_policy=_policy(name),
                    persist_result=True, result_serializer="json", log_prints=True)(run)

    return deco


# --- artifacts ------------------------------------------------------------------------------------


def _verify_artifacts(r: dict) -> None:
    create_markdown_artifact(Path(r["report"]).read_text(), key="data-verification",
                             description="Data verification report (Great Expectations over manifest.parquet)")


# --- the stages -----------------------------------------------------------------------------------


@stage("fetch", outputs=lambda wd, r: [wd.raw / n for n in r["md5"]])
def fetch(workdir: str, source: str, md5_file: str | None) -> Any:
    from tasks.fetch import fetch as run

    return run(source, workdir, md5_file)


@stage("verify", outputs=lambda wd, r: [wd.manifest, wd.extracted], publish=_verify_artifacts)
def verify(workdir: str) -> Any:
    from tasks.verify import verify as run

    return run(workdir)
