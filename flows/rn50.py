"""The `rn50` flow: raw ILSVRC2012 to a verified MLPerf ResNet-50 result, one cached stage after another."""
from __future__ import annotations

from prefect import flow

import tasks.fetch
import tasks.verify
from flows import cache, stages
from flows.config import load_pipeline
from tasks.common import Workdir, stamp_valid
from tasks.fetch import OFFICIAL_MD5, read_md5sums

STAGES = ("fetch", "verify", "pack", "container", "train", "compliance", "archive")


@flow(name="rn50", log_prints=True)
def rn50(source: str, workdir: str, pipeline: str = "demo", rerun: list[str] | None = None) -> dict:
    cfg = load_pipeline(pipeline, source=source, workdir=workdir)
    wd, rerun = Workdir(workdir), set(rerun or ())

    def run(task, stage: str, key: str, **kwargs):
        # A cached result counts only while the stage's outputs are still as it left them.
        fresh = stage in rerun or not stamp_valid(wd, f"flow-{stage}", key)
        return task.with_options(refresh_cache=fresh)(key, str(wd.root), **kwargs)

    md5_file = cfg["fetch"]["md5_file"]
    expected = read_md5sums(md5_file) if md5_file else OFFICIAL_MD5
    fetched = run(stages.fetch, "fetch", cache.fetch_key(expected), source=source, md5_file=md5_file)
    verified = run(stages.verify, "verify", cache.verify_key(fetched, cache.code_version(tasks.verify)))
    return {"fetch": fetched, "verify": verified}
