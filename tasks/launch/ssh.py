"""The `ssh` backend (the default): `horovodrun` on this machine starts the ranks on the inventory's hosts over
SSH (Gloo; `--mpi` where Horovod was built with MPI), or inside the first host's node container (runtime docker).

The inventory (tasks/inventory.py) names the hosts, their slots and how to reach them; SSH trusts only pinned
host keys (tasks/ssh.py). Preflight probes every host at once over that trust (the first contact may pin a new
host's key): the data dir's copy of the recordio, the host's own name resolving (Gloo needs it), free disk, the
node container's image, and for a GPU config the GPUs, driver and NCCL. Every rank's output is split from
horovodrun's prefixed stream into rank<r>_<n>.log; horovodrun's own lines go to launcher_<n>.log.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, Sequence

from tasks import launch as contract
from tasks import rank_logs
from tasks.common import StageError, TransientError
from tasks.inventory import Host, Inventory, parse_inventory
from tasks.launch.probe import gpu_probe_script, gpu_problems
from tasks.ssh import (CONNECT_TIMEOUT_S, Remote, Trust, container_wrapper_script, host_key_problem, is_local,
                       prepare_known_hosts, write_wrapper)
from tasks.ssh import setup as ssh_setup
from tasks.tether import die_with_parent

log = logging.getLogger(__name__)

STOP_GRACE_S = 10  # after SIGTERM, before SIGKILL: horovodrun's own teardown of ranks and ssh sessions
PROBE_TIMEOUT_S = CONNECT_TIMEOUT_S + 60
# Characters a run directory may hold when ranks run on other hosts: Horovod runs `cd <dir>` there through the
# remote shell without quoting it.
SHELL_SAFE_PATH = re.compile(r"/[A-Za-z0-9_./+,:@=-]*")
RANK_LINE = re.compile(r"^\[(\d+)\]<(stdout|stderr)>:(.*)$")
EXIT_LINE = re.compile(r"^Process (\d+) exit with status code (-?\d+)\.")


class SshLauncher:
    name = "ssh"

    def __init__(self, inv: Inventory, source: str = "the inventory"):
        self.inv, self.source = inv, source
        self.ranks = inv.total_slots
        self.data_dir, self.env_profile, self.env = inv.data_dir, inv.env_profile, inv.env
        self.interface, self.runtime, self.data_local = inv.interface, inv.runtime, inv.data_local
        self._trust: Trust | None = None
        self._proc: subprocess.Popen | None = None
        self._job: contract.Job | None = None
        self._mutex = threading.Lock()
        self._stopped = False

    @classmethod
    def parse(cls, doc: Any, source: str) -> "SshLauncher":
        return cls(parse_inventory(doc, source), f"inventory {source}")

    def slots_text(self, need: int) -> tuple[str, str]:
        return f"{self.source} has", f"give its hosts {need} slot(s) in total"

    def hosts(self) -> list[str]:
        return [f"{h.label}:{h.slots}" for h in self.inv.hosts]

    def rank_python(self, image: str | None = None) -> str:
        return self.inv.python or ("python" if self.inv.runtime == "docker" else sys.executable)

    def over_ssh(self) -> bool:
        """Whether any rank or probe reaches its host over ssh."""
        return self.inv.runtime == "docker" or not all(is_local(h) for h in self.inv.hosts)

    def known_hosts(self, work_dir: str) -> Path:
        """Where the inventory's first-contact host keys are pinned."""
        return Path(self.inv.known_hosts) if self.inv.known_hosts else Path(work_dir) / ".ssh" / "known_hosts"

    # --- before anything starts ------------------------------------------------------------------------

    def check(self, job: contract.Job) -> list[str]:
        inv = self.inv
        if self.over_ssh() and not SHELL_SAFE_PATH.fullmatch(str(job.out_dir.parent)):
            return [f"workdir {job.work_dir!r}: ranks on other hosts start in {job.out_dir.parent}/<run-id>, which "
                    "Horovod passes through their shell unquoted; use a path of letters, digits and ._+,:@=/-"]
        if inv.runtime == "docker" and not job.image:
            return ["preflight: runtime docker needs an image (pass image=… / --image, e.g. from `rn50 build`)"]
        if inv.runtime == "docker" and len({h.ssh_port for h in inv.hosts}) > 1:
            # horovodrun runs inside the first container and reaches the others with one -p PORT.
            return ["preflight: runtime docker needs the same ssh_port (the containers' sshd) on every host"]
        return []

    def preflight(self, job: contract.Job) -> list[str]:
        known = self.known_hosts(job.work_dir)
        if self.over_ssh():
            prepare_known_hosts(known)
        self._trust = ssh_setup(job.out_dir / ".launcher", self.inv.hosts, known)
        errors: list[str] = []
        lock = threading.Lock()

        def one(h: Host) -> None:
            errs = self._check_host(h, job)
            with lock:
                errors.extend(errs)

        threads = [threading.Thread(target=one, args=(h,)) for h in self.inv.hosts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        order = {h.label: i for i, h in enumerate(self.inv.hosts)}
        return sorted(errors, key=lambda e: order.get(e.split(" ")[1], 0))

    def _probe_script(self, job: contract.Job) -> str:
        """POSIX sh run on each host; prints `key value` lines that `_check_host` reads."""
        q = shlex.quote
        # Gloo looks up each host's own name; an unresolvable one crashes hvd.init() with a bare segfault.
        parts = ["echo ok 1",
                 'h=$(hostname); if getent hosts "$h" >/dev/null 2>&1; then echo resolves yes; else echo resolves "$h"; fi']
        for name in contract.RECORDIO_FILES:
            f = q(f"{job.data_dir}/{name}")
            parts.append(f"if [ -f {f} ]; then echo size:{name} $(stat -c %s {f}); else echo size:{name} missing; fi")
            if name.endswith(".idx"):
                parts.append(f"[ -f {f} ] && echo md5:{name} $(md5sum < {f} | cut -d' ' -f1)")
            else:
                n = contract.SAMPLE_BYTES
                parts.append(f"[ -f {f} ] && echo head_md5:{name} $(head -c {n} {f} | md5sum | cut -d' ' -f1)")
                parts.append(f"[ -f {f} ] && echo tail_md5:{name} $(tail -c {n} {f} | md5sum | cut -d' ' -f1)")
        # Free space where the ranks write: the nearest existing parent of the work dir.
        parts.append(f"d={q(self.inv.work_dir or job.work_dir)}; while [ ! -d \"$d\" ]; do d=$(dirname \"$d\"); done; "
                     "echo free_kib $(df -Pk \"$d\" | awk 'NR==2 {print $4}')")
        if self.inv.runtime == "docker":
            # We are inside the node's container: it must run the image built from this source tree.
            parts.append("echo image $(cat /etc/rn50/content-hash 2>/dev/null || echo none)")
        if job.gpu_python:
            parts.append(gpu_probe_script(job.gpu_python))
        return "; ".join(parts) + "; true"

    def _check_host(self, host: Host, job: contract.Job) -> list[str]:
        inv, trust = self.inv, self._trust
        remote = Remote(host, trust.config, inv.runtime)
        where = f"host {host.label}" + ("" if remote.local else " (ssh)")
        try:
            # The probe is the first contact with a host: the one ssh call allowed to pin a new host's key.
            proc = remote.run(self._probe_script(job), timeout=PROBE_TIMEOUT_S, first_contact=True)
        except subprocess.TimeoutExpired:
            return [f"{where}: no answer within {PROBE_TIMEOUT_S} s"]
        facts: dict[str, str] = {}
        for line in proc.stdout.splitlines():
            k, _, v = line.partition(" ")
            facts[k] = v.strip()
        if proc.returncode != 0 or "ok" not in facts:
            key_problem = None if remote.local else host_key_problem(proc.stderr, host, trust.known_hosts)
            if key_problem:
                return [f"{where}: {key_problem}"]
            msg = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            return [f"{where}: ssh unreachable: {msg}" if not remote.local else f"{where}: probe failed: {msg}"]
        errors = []
        if facts.get("resolves", "yes") != "yes":
            errors.append(f"{where}: its hostname {facts['resolves']!r} does not resolve (add it to /etc/hosts; "
                          "Gloo needs it)")
        for name, exp in job.expected.items():
            got = facts.get(f"size:{name}")
            if got in (None, "missing"):
                errors.append(f"{where}: {job.data_dir}/{name} is missing")
                continue
            if int(got) != exp["size"]:
                errors.append(f"{where}: {job.data_dir}/{name} has {got} bytes, expected {exp['size']}")
                continue
            for k in ("md5", "head_md5", "tail_md5"):
                if k in exp and facts.get(f"{k}:{name}") != exp[k]:
                    errors.append(f"{where}: {job.data_dir}/{name} differs from the launcher's copy ({k} mismatch)")
                    break
        try:
            free = int(facts.get("free_kib", "0")) * 1024
        except ValueError:
            free = 0
        if free < inv.min_free_bytes:
            errors.append(f"{where}: only {free >> 20} MiB free under {inv.work_dir or job.work_dir}, "
                          f"need {inv.min_free_bytes >> 20} MiB")
        if inv.runtime == "docker" and job.image and facts.get("image") != job.image.rsplit(":", 1)[-1]:
            errors.append(f"{where}: the container on ssh port {host.ssh_port} does not run {job.image} "
                          f"(it runs content hash {facts.get('image', 'none')}; start it with infra/start-node.sh)")
        if job.gpu_python:
            problems = gpu_problems(facts, host.slots, job.gpu_python)
            if problems:  # one clause per host for all its GPU problems
                errors.append(f"{where}: GPU preflight: " + ", ".join(problems))
        return errors

    # --- the runs ------------------------------------------------------------------------------------------

    def command(self, rank_argv: Sequence[str], start_timeout_s: int = 60) -> list[str]:
        inv = self.inv
        argv = [sys.executable, "-m", "horovod.runner.launch", "-np", str(self.ranks),
                "-H", ",".join(f"{h.host}:{h.slots}" for h in inv.hosts),
                f"--{inv.controller}", "--start-timeout", str(start_timeout_s),
                # Horovod's own cache would skip the ssh check for an hour after one success.
                "--disable-cache"]
        if inv.interface:
            argv += ["--network-interfaces", inv.interface]
        return argv + list(rank_argv)

    def in_first_container(self, argv: list[str], env: dict[str, str], trust: Trust) -> list[str]:
        """Runtime docker: run horovodrun inside the first host's container (as the seeds did by hand); it reaches
        the other containers' sshd with the key mounted at /root/.ssh (infra/start-node.sh), trusting only the host
        keys pinned on the launcher."""
        inv = self.inv
        h0 = inv.hosts[0]
        inner = [self.rank_python()] + argv[1:]  # the container's interpreter (as the ranks use), not the launcher's
        if h0.ssh_port:
            at = inner.index("--disable-cache")
            inner[at:at] = ["-p", str(h0.ssh_port)]
        keep = {k: v for k, v in env.items() if k not in ("PATH", "HOME", "PYTHONPATH", "USER", "LOGNAME")}
        remote = (container_wrapper_script(trust.lines(inv.hosts[1:])) + " && cd /tmp && env "
                  + " ".join(f"{k}={shlex.quote(v)}" for k, v in keep.items()) + " " + shlex.join(inner))
        return ["ssh", "-F", str(trust.config), "-o", "StrictHostKeyChecking=yes", "--", h0.host, remote]

    def environment(self, job: contract.Job) -> dict[str, str]:
        ssh_bin = write_wrapper(job.out_dir / ".launcher" / "bin", self._trust.config).parent
        # horovodrun's own ssh calls go through the wrapper that keeps host keys pinned, whatever PATH env: gives.
        path = job.env.get("PATH") or f"{Path(sys.executable).parent}:{contract.STD_PATH}"
        return {**job.env, "PATH": f"{ssh_bin}:{path}"}

    def run(self, job: contract.Job, events: contract.Events) -> list[contract.RunOutcome]:
        self._job = job
        events.handle(out_dir=str(job.out_dir))
        env = self.environment(job)
        outcomes = []
        for n, rank_argv in enumerate(job.argvs):
            argv = self.command(rank_argv)
            if self.inv.runtime == "docker":
                argv = self.in_first_container(argv, env, self._trust)
            events.line(n, None, f"run {n + 1}/{job.runs}: {shlex.join(argv)}")
            streamer = _Streamer(job.out_dir, n, events, self._hosts_of_rank())
            try:
                code, timed_out = self._run_one(argv, env, job.out_dir, streamer, job.timeout_s)
            finally:
                streamer.close()
            if code == 0 and not timed_out:
                outcomes.append(contract.RunOutcome(n, True))
                continue
            failure = streamer.first_failure()
            summary = (f"timed out after {job.timeout_s:.0f} s; ranks were stopped" if timed_out
                       else f"horovodrun exit {code}")
            if failure is None and not timed_out:
                summary += ": " + rank_logs.last_error(streamer.launcher_lines())
            outcomes.append(contract.RunOutcome(n, False, summary, failure, timed_out))
            break
        return outcomes

    def _hosts_of_rank(self) -> dict[int, str]:
        out, r = {}, 0
        for h in self.inv.hosts:  # horovod fills hosts in order, slot by slot
            for _ in range(h.slots):
                out[r] = h.host
                r += 1
        return out

    def _run_one(self, argv: list[str], env: dict[str, str], cwd: Path, streamer: "_Streamer",
                 timeout_s: float) -> tuple[int, bool]:
        with self._mutex:
            if self._stopped:
                raise StageError("cancelled before the run started")
            # horovodrun gets SIGTERM if this thread dies; on SIGTERM it stops its local ranks (through Horovod's
            # middleman processes) and its ssh sessions.
            proc = self._proc = subprocess.Popen(
                argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                text=True, errors="replace", start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM))
        timed_out = threading.Event()

        def kill_on_timeout() -> None:
            timed_out.set()
            _stop(proc)

        timer = threading.Timer(timeout_s, kill_on_timeout)
        timer.daemon = True
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                streamer.feed(line)
            return proc.wait(), timed_out.is_set()
        finally:
            timer.cancel()

    def cancel(self) -> None:
        with self._mutex:
            self._stopped = True
            proc, job = self._proc, self._job
        if proc is not None:
            _stop(proc)
        if job is not None:
            self.reap({"out_dir": str(job.out_dir)})

    def reap(self, handle: dict[str, Any]) -> None:
        """Stop every process of a run on every host (ranks, or horovodrun inside the first node's container):
        each names its run directory on its command line."""
        out_dir = handle.get("out_dir")
        if not out_dir:
            return
        # `[-]-out`: the pattern does not match the command line of the shell that runs pkill.
        pattern = shlex.quote("[-]-out " + re.escape(out_dir))
        script = f"pkill -TERM -f -- {pattern}; sleep 2; pkill -KILL -f -- {pattern}; true"
        with tempfile.TemporaryDirectory(prefix="rn50-reap-") as tmp:
            trust = self._trust or ssh_setup(Path(tmp), self.inv.hosts, self.known_hosts(str(Path(out_dir).parent.parent)))
            here = False
            for host in self.inv.hosts:
                remote = Remote(host, trust.config, self.inv.runtime)
                if remote.local:
                    if here:
                        continue
                    here = True
                try:
                    remote.run(script, timeout=20)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not answer; its ranks end when their ssh session is gone", host.label)

    # --- node-local data ---------------------------------------------------------------------------------

    def distribute(self, src: Path, work_dir: Path, expected: dict[str, dict[str, Any]], progress: Any = None,
                   parallel: int = 4) -> list[dict[str, Any]]:
        """Copy `src`'s recordio files to data_dir on every host, `parallel` hosts at once, over the same pinned
        SSH trust the runs use (this may be the first contact that pins a host's key). Per host: one call finds
        what is there (NODE_SH rn50_state), free space is checked, then each missing, partial or wrong file is
        streamed from its .part's size into `cat >> .part` and proven by a full md5 on the host before its
        rename. progress(host, bytes_done, bytes_total)."""
        known = self.known_hosts(str(work_dir))
        if self.over_ssh():
            prepare_known_hosts(known)
        here, targets = False, []
        for h in self.inv.hosts:  # one copy per machine: several local entries share this one's disk
            if self.inv.runtime == "local" and is_local(h):
                if here:
                    continue
                here = True
            targets.append(h)
        with tempfile.TemporaryDirectory(prefix="rn50-distribute-") as tmp:
            trust = ssh_setup(Path(tmp), self.inv.hosts, known)
            # One authenticated connection per host carries all its calls (a handshake costs ~1 s on a busy
            # host; a copy makes 1 + one per file); the masters are closed below, or 30 s idle after a kill.
            with open(trust.config, "a") as f:
                f.write(f"  ControlMaster auto\n  ControlPath {tmp}/cm-%C\n  ControlPersist 30\n")
            copy = _HostCopy(src, str(self.data_dir), expected, trust, self.inv.runtime, progress)
            try:
                with ThreadPoolExecutor(max(1, min(parallel, len(targets)))) as pool:
                    # Each thread in a copy of this one's context: the caller's (e.g. Prefect's run, for progress).
                    futures = [pool.submit(contextvars.copy_context().run, copy.run, h) for h in targets]
                    done = [f.exception() or f.result() for f in futures]
            finally:
                for h in targets:
                    if not Remote(h, trust.config, self.inv.runtime).local:
                        subprocess.run(["ssh", "-F", str(trust.config), "-O", "exit", "--", h.host],
                                       capture_output=True, stdin=subprocess.DEVNULL, timeout=30)
        errors = [e for e in done if isinstance(e, BaseException)]
        for e in errors:
            if not isinstance(e, StageError):
                raise e
        if errors:
            kind = TransientError if all(isinstance(e, TransientError) for e in errors) else StageError
            raise kind("; ".join(str(e) for e in errors))
        return done


class _HostCopy:
    """Puts the source files onto one host's data_dir (SshLauncher.distribute)."""

    CHUNK = 4 << 20

    def __init__(self, src: Path, data_dir: str, expected: dict[str, dict[str, Any]], trust: Trust, runtime: str,
                 progress: Any):
        self.src, self.dir, self.expected, self.trust, self.runtime = src, data_dir, expected, trust, runtime
        self.progress = progress or (lambda host, done, total: None)

    def _call(self, remote: Remote, where: str, script: str, timeout: float, first: bool = False) -> list[str]:
        try:
            proc = remote.run(contract.NODE_SH + script, timeout=timeout, first_contact=first)
        except subprocess.TimeoutExpired:
            raise TransientError(f"{where}: no answer within {timeout:.0f} s") from None
        if proc.returncode != 0:
            raise _failure(proc.returncode, proc.stderr, remote, self.trust, where)
        return proc.stdout.split("\n")

    def run(self, host: Host) -> dict[str, Any]:
        q, d = shlex.quote, self.dir
        remote = Remote(host, self.trust.config, self.runtime)
        where, t0 = f"host {host.label}", time.monotonic()
        total = sum(e["size"] for e in self.expected.values())
        # A full md5 on the host (a stamp that no longer matches) reads at disk speed; allow 20 MB/s.
        check = "".join(f"rn50_state {q(d)} {' '.join(map(q, contract.node_specs({n: e})))}\n"
                        for n, e in sorted(self.expected.items())) + f"echo free $(rn50_free {q(d)})"
        lines = self._call(remote, where, check, 120 + total / 20e6, first=True)
        files: dict[str, dict[str, Any]] = {}
        free, need = 0, []
        for ln in lines:
            w = ln.split()
            if len(w) == 3 and w[0] == "have":
                files[w[1]] = {"action": f"verified ({w[2]})", "sent": 0}
            elif len(w) == 4 and w[0] == "need" and w[1] in self.expected:
                need.append((w[1], int(w[2]), int(w[3])))
            elif len(w) == 2 and w[0] == "free" and w[1].isdigit():
                free = int(w[1])
        if len(files) + len(need) != len(self.expected):
            raise StageError(f"{where}: could not read the state of {d} there: {' | '.join(lines)[:200]}")
        to_send = sum(self.expected[n]["size"] - part for n, part, _ in need)
        room = free + sum(old for _, _, old in need)  # a wrong file is removed before its copy is written
        if to_send > room:
            raise StageError(f"{where}: not enough space under {d}: the copy needs {to_send} bytes, {room} are free")
        sent = 0
        if need:
            self.progress(host.label, 0, to_send)
        for name, part, _ in need:
            n = self._send(remote, where, name, part, lambda k: self.progress(host.label, sent + k, to_send))
            sent += n
            files[name] = {"action": "copied", "sent": n, "resumed_from": part}
        return {"host": host.label, "action": "copied" if need else "verified", "bytes_sent": sent,
                "seconds": round(time.monotonic() - t0, 3), "files": files}

    def _send(self, remote: Remote, where: str, name: str, offset: int, progress: Any) -> int:
        """Stream src/name from `offset` into the host's .part (truncated to `offset` first), then, in the same
        session, its full md5 there and the rename; bytes sent."""
        d, md5 = shlex.quote(self.dir), self.expected[name]["md5"]
        # A stream cut short (this process killed) leaves the .part as it is, to be resumed: finished only whole.
        size = self.expected[name]["size"]
        script = contract.NODE_SH + (f"rn50_receive {d} {name} {offset} && [ $(stat -c %s {d}/.{name}.part) = {size} ]"
                                     f" && rn50_finish {d} {name} {md5}")
        sent = 0
        with open(self.src / name, "rb") as f, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            f.seek(offset)
            proc = subprocess.Popen(remote.argv(script), stdin=subprocess.PIPE, stdout=out, stderr=err)
            finished = False
            try:
                while chunk := f.read(self.CHUNK):
                    proc.stdin.write(chunk)
                    sent += len(chunk)
                    progress(sent)
                finished = True
                proc.stdin.close()
            except BrokenPipeError:
                finished = True  # the remote end died: its exit code and stderr say why
            finally:
                if not finished:
                    proc.kill()  # stopped on our side: what reached the .part is resumed next time
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.close()
                code = proc.wait()
            out.seek(0)
            said = out.read().decode(errors="replace").split()
            if code != 0 and said[:1] == ["bad"]:
                raise TransientError(f"{where}: the copy of {name} has md5 {(said + ['?'] * 3)[2]} after the "
                                     f"transfer, not {md5}; it was removed (a retry copies it again)")
            if code != 0:
                err.seek(0)
                raise _failure(code, err.read().decode(errors="replace"), remote, self.trust, where,
                               f"copying {name} to {self.dir} failed")
        return sent


def _failure(code: int, stderr: str, remote: Remote, trust: Trust, where: str, what: str = "") -> StageError:
    """One line for a failed call on a host: a host key refused (not retried), the connection (transient), or the
    command's own last line."""
    if not remote.local:
        key = host_key_problem(stderr, remote.host, trust.known_hosts)
        if key:
            return StageError(f"{where}: {key}")
    msg = (stderr.strip().splitlines() or [f"exit {code}"])[-1]
    if code == 255 and not remote.local:
        return TransientError(f"{where}: ssh failed: {msg}")
    return StageError(f"{where}: {what or 'the command failed'}: {msg}")


def _stop(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM lets horovodrun tear down its ranks and ssh sessions; SIGKILL the group if it hangs."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


class _Streamer:
    """Splits horovodrun's prefixed output into per-rank logs and the launcher log, and hands every line on."""

    def __init__(self, out_dir: Path, run_index: int, events: contract.Events, hosts_of_rank: dict[int, str]):
        self.dir, self.n, self.events, self.hosts_of_rank = out_dir, run_index, events, hosts_of_rank
        self.launcher: IO[str] = open(out_dir / f"launcher_{run_index}.log", "a", buffering=1)
        self.rank_files: dict[int, IO[str]] = {}
        self.tail: dict[int, list[str]] = {}
        self.exits: list[tuple[int, int]] = []  # (rank, code) in the order horovod saw them

    def feed(self, line: str) -> None:
        line = line.rstrip("\n")
        self.launcher.write(line + "\n")
        m = RANK_LINE.match(line)
        if m:
            rank, stream, text = int(m.group(1)), m.group(2), m.group(3)
            f = self.rank_files.get(rank)
            if f is None:
                f = self.rank_files[rank] = open(self.dir / f"rank{rank}_{self.n}.log", "a", buffering=1)
            f.write(text + "\n")
            if stream == "stderr" and text.strip():
                self.tail.setdefault(rank, []).append(text.strip())
                del self.tail[rank][:-20]
            self.events.line(self.n, rank, text)
            return
        e = EXIT_LINE.match(line)
        if e:
            self.exits.append((int(e.group(1)), int(e.group(2))))
        self.events.line(self.n, None, line)

    def launcher_lines(self) -> list[str]:
        return [ln.strip() for ln in Path(self.launcher.name).read_text().splitlines() if ln.strip()]

    def first_failure(self) -> contract.RankFailure | None:
        """The first rank to exit non-zero that did not merely lose a peer (a Gloo "connection closed/reset by
        peer" is the echo of another rank's death), else the first to exit."""
        failed = [(r, c) for r, c in self.exits if c != 0]
        lost_peer = lambda r: rank_logs.lost_peer(self.tail.get(r, []))  # noqa: E731
        primary: list[tuple[int, int | None]] = [(r, c) for r, c in failed if not lost_peer(r)]
        if not primary:
            # Under load the rank that raised can still be tearing down when its peers' "shut down" exits arrive
            # and horovodrun stops it: blame a rank that printed an exception of its own.
            primary = [(r, None) for r in sorted(self.tail) if r not in dict(failed) and not lost_peer(r)
                       and rank_logs.raised(self.tail[r])]
        if not (primary or failed):
            return None
        rank, code = (primary or failed)[0]
        host = self.hosts_of_rank.get(rank, "?")
        lines = self.tail.get(rank, [])
        kind, detail = contract.exit_kind(code, lines, remote=not is_local(Host(host, 1)))
        return contract.RankFailure(rank, host, kind, detail, rank_logs.last_error(lines))

    def close(self) -> None:
        self.launcher.close()
        for f in self.rank_files.values():
            f.close()
