"""A real Redis server for tests: Debian's `redis-server` (scripts/install-system.sh installs it).

    with RedisServer(tmp_path, binds=("127.0.0.1",)) as r:   # r.url(host) -> redis://:PASSWORD@host:port/0
        r.stop(); r.start()                                    # same port, same data dir (append-only file)

Password set, loopback (or addresses the test made) only, append-only persistence as the compose `redis`
service runs it, no RDB snapshots; the server is stopped by the context manager that started it.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Sequence

from helpers import free_port, missing, stop_group

PASSWORD = "rn50-redis-test-pw-0001"


def redis_binary() -> str:
    found = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if not found:
        missing("redis-server (Debian's redis-server; scripts/install-system.sh installs it)")
    return found


class RedisServer:
    def __init__(self, directory: Path, binds: Sequence[str] = ("127.0.0.1",), port: int | None = None):
        self.dir, self.binds, self.port = Path(directory), tuple(binds), port or free_port()
        self.binary = redis_binary()
        self.proc: subprocess.Popen | None = None

    def url(self, host: str | None = None, password: str = PASSWORD) -> str:
        return f"redis://:{password}@{host or self.binds[0]}:{self.port}/0"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "redis.conf"  # the password in a file, not on the command line
        conf.write_text(f"requirepass {PASSWORD}\nbind {' '.join(self.binds)}\nport {self.port}\n"
                        f"dir {self.dir}\nappendonly yes\nappendfsync everysec\nsave \"\"\n"
                        "protected-mode yes\ndaemonize no\n")
        log = open(self.dir / "redis.log", "ab")
        self.proc = subprocess.Popen([self.binary, str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex((self.binds[0], self.port)) == 0:
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {(self.dir / 'redis.log').read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)  # SIGTERM: redis-server flushes the append-only file and exits
            self.proc = None

    def __enter__(self) -> "RedisServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
