"""The Prefect layer: the `rn50` flow (pipeline.py, one screen) and its wiring.

stages.py wraps each plain stage function of `tasks/` as a Prefect task (retries of transient errors only,
content-keyed cache with stamps, artifacts, stage logs forwarded to the run log); cache.py holds the cache
keys; locks.py the stage locks; config.py the pipeline config schema; cli.py `rn50 run`; local.py a local
server + worker; alerts.py the nightly-failure automation.
"""
