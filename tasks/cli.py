"""`rn50` command line: one sub-command per stage.

Each stage module exposes `add_command(subparsers)`, which registers its parser and sets
`run=<function(args) -> exit code>`. Errors a user can fix (`StageError`) print as one line
on stderr with exit code 2; nothing else is printed for them.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# Order is the order of `rn50 --help`, which is the order of the pipeline.
COMMAND_MODULES = [
    "tasks.synth",
    "tasks.fetch",
    "tasks.verify",
    "tasks.pack",
    "tasks.container",
    "tasks.distribute",
    "tasks.train",
    "tasks.compliance",
    "tasks.archive",
    "tasks.nightly",
    "flows.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rn50", description="Raw ILSVRC2012 to a verified MLPerf ResNet-50 v1.5 result, stage by stage."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tasks.common import StageError

    # Offline and private, as under `make`: no analytics from Prefect (incl. its temporary server) or GX.
    for k, v in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "1"), ("GX_ANALYTICS_ENABLED", "false"),
                 # Prefect's temporary server (no PREFECT_API_URL) may need longer than its 20 s on a busy 2-core box.
                 ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")):
        os.environ.setdefault(k, v)

    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except StageError as e:
        print(f"rn50 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rn50 {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
