"""Plain stage code: no Prefect here (the Prefect tasks that wrap these functions live in flows/stages.py).

One module per stage — synth, fetch, verify, pack, container, distribute, train, compliance, archive, nightly —
each a function taking explicit paths/URIs/config and returning a small JSON-serialisable result, plus its
`rn50 <stage>` sub-command (tasks/cli.py). Shared concerns have a module each: common (work dir, one-line
errors, atomic writes, stamps), paths (repo root, config resolver), ilsvrc (ILSVRC2012 facts and caps),
recordio (MXNet RecordIO, im2rec's list code), workers (forked workers), storage (s3:// and file://),
mlperf_logs (result logs), inventory + ssh (SSH launcher), slurm (Slurm launcher), tether (processes that
die with their parent). Stages import only public names of each other.
"""
