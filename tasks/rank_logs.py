"""Reading what ranks printed, for the one-line failure a launcher reports (SSH and Slurm alike).

A rank that dies takes its peers with it: their "connection closed/reset by peer" or "Horovod has been shut
down" lines are echoes, not causes. The line worth quoting is a traceback's exception line, else a crash
message, else the last line.
"""
from __future__ import annotations

import re
from typing import Iterable

_EXCEPTION = re.compile(r"^[A-Za-z_.]*(Error|Exception|Interrupt|Exit)\b")
_FATAL = re.compile(r"Segmentation fault|Fatal Python error|Killed|Bus error|Illegal instruction")
_PEER_LOST = re.compile(r"Connection (closed|reset) by peer|Broken pipe|Horovod has been shut down"
                        r"|ranks? (has|have) (finished|shut)", re.I)


def raised(lines: Iterable[str]) -> bool:
    """The rank printed an exception of its own."""
    return any(_EXCEPTION.match(line.strip()) for line in lines)


def crashed(lines: Iterable[str]) -> bool:
    """The rank crashed in native code: MXNet's SIGSEGV handler prints "Segmentation fault: 11", then exits."""
    return any(line.strip().startswith("Segmentation fault") for line in lines)


def lost_peer(lines: Iterable[str]) -> bool:
    """The rank only reports that another one went away."""
    return any(_PEER_LOST.search(line) for line in lines)


def machine(line: str) -> bool:
    """A line for programs, not people: the MLPerf log's `:::MLLOG {json}` lines."""
    return ":::MLLOG" in line


def alarming(line: str) -> bool:
    """A line a person should see from any rank: an exception, a crash, a warning or an error."""
    s = line.strip()
    return bool(_EXCEPTION.match(s) or _FATAL.search(s) or re.search(r"\b(warning|error)\b", s, re.I)) and not machine(s)


def last_error(lines: Iterable[str]) -> str:
    """The line a human would quote: a traceback's exception line, a crash, else the last line (launcher
    chatter such as `srun:` lines left out)."""
    lines = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("srun:")]
    for line in reversed(lines):
        if _EXCEPTION.match(line):
            return line[:300]
    for line in lines:
        if _FATAL.search(line):
            return line[:300]
    return lines[-1][:300] if lines else ""
