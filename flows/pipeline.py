"""The `rn50` flow: raw ILSVRC2012 to a verified MLPerf ResNet-50 result, one cached stage after another."""
from __future__ import annotations

from pathlib import Path

from prefect import flow, runtime
from prefect.states import Failed

import tasks.archive
import tasks.compliance
import tasks.pack
import tasks.verify
from flows import cache, stages
from flows.config import load_pipeline
from rn50.config import load_config
from tasks.common import Workdir, file_digest, stamp_valid
from tasks.container import content_hash
from tasks.fetch import OFFICIAL_MD5, read_md5sums
from tasks.nightly import baseline_location

STAGES = ("fetch", "verify", "pack", "container", "train", "compliance", "archive")
RN50_PACKAGE = Path(__file__).resolve().parent.parent / "rn50"


@flow(name="rn50", log_prints=True)
def rn50(source: str | None = None, workdir: str | None = None, pipeline: str = "demo",
         rerun: list[str] | None = None, nightly: bool = False) -> dict:
    """`nightly`: train fresh with the pipeline's fixed seeds and fail if convergence regressed
    against the last accepted nightly (kept next to the archive)."""
    cfg = load_pipeline(pipeline, source=source, workdir=workdir)
    wd, rerun = Workdir(cfg["workdir"]), set(rerun or ())

    def run(task, stage: str, key: str, **kwargs):
        # A cached result counts only while the stage's outputs are still as it left them (its stamp).
        # Checked after the cache lookup, which waits on the stage's lock: a concurrent run that is
        # computing the same key finishes first, and this one then takes its result from the cache.
        state = task.with_options(refresh_cache=stage in rerun)(key, str(wd.root), return_state=True, **kwargs)
        if state.name == "Cached" and not stamp_valid(wd, f"flow-{stage}", key):
            print(f"{stage}: cached result's outputs are missing or changed here; running it again")
            state = task.with_options(refresh_cache=True)(key, str(wd.root), return_state=True, **kwargs)
        return state.result()

    f, p, c, t, q, a = (cfg[s] for s in ("fetch", "pack", "container", "train", "compliance", "archive"))
    expected = read_md5sums(f["md5_file"]) if f["md5_file"] else OFFICIAL_MD5
    fetched = run(stages.fetch, "fetch", cache.fetch_key(expected), source=cfg["source"], md5_file=f["md5_file"])
    verified = run(stages.verify, "verify", cache.verify_key(fetched, cache.code_version(tasks.verify)))
    pack_settings = {"threads": p["threads"], "full_check": p["full_check"]}
    packed = run(stages.pack, "pack", cache.pack_key(verified, pack_settings, cache.code_version(tasks.pack)),
                 **pack_settings)
    image = None
    if c["runtime"] == "docker":
        image = run(stages.container, "container", cache.container_key(content_hash(from_image=c["from_image"]), c),
                    from_image=c["from_image"], registry=c["registry"], push=c["push"])
    else:
        stages.skip.with_options(name="container")("no container runtime requested")
    train_settings = {"config": t["config"], "hosts": t["hosts"], "runs": t["runs"],
                      "hosts_digest": file_digest(t["hosts"]) if t["hosts"] else None}
    launch = dict(config=t["config"], hosts=t["hosts"], image=image and image["tag"], timeout_s=60 * t["timeout_minutes"])
    if nightly:
        n = cfg["nightly"]
        trained = run(stages.nightly_train, "train-nightly", cache.nightly_key(runtime.flow_run.id),
                      runs=n["runs"], seed=n["seed"], **launch)
        regression = run(stages.nightly, "nightly", cache.nightly_key(runtime.flow_run.id),
                         logs=trained["results"], baseline=baseline_location(a["uri"]),
                         tolerance_epochs=n["tolerance_epochs"], tolerance_accuracy=n["tolerance_accuracy"],
                         target=load_config(t["config"])["target_accuracy"],
                         context={"config": t["config"], "manifest_digest": verified["manifest_digest"]})
        print(f"nightly: {regression['verdict']}: {regression['reason']}")
        if regression["verdict"] == "regressed":
            return Failed(message=regression["reason"])
    else:
        trained = run(stages.train, "train", cache.train_key(packed, image, train_settings, cache.tree_digest(RN50_PACKAGE)),
                      runs=t["runs"], **launch)
    trained["logs_digest"] = [file_digest(r, "sha256") for r in trained["results"]]
    checked = run(stages.compliance, "compliance", cache.compliance_key(trained, q, cache.code_version(tasks.compliance)),
                  logdir=trained["run_dir"], ruleset=q["ruleset"], dataset=q["dataset"])
    archived = run(stages.archive, "archive",
                   cache.archive_key([verified["manifest_digest"], packed["content_digest"], trained["run_id"],
                                      checked["key"]], a, cache.code_version(tasks.archive)),
                   uri=a["uri"], include_checkpoints=a["include_checkpoints"])
    ttt = checked["logs"][0]["time_to_train_min"] if checked["logs"] else None
    print(f"time to train: {ttt:.2f} min ({trained['run_dir']}); archived to {archived['uri']}")
    return {"workdir": str(wd.root), "run_dir": trained["run_dir"], "time_to_train_min": ttt,
            "compliance_report": checked["report_md"], "archive": archived["uri"]}
